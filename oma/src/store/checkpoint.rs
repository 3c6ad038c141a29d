//! SQLite's WAL checkpoints, off the commit path.
//!
//! Left to itself, SQLite copies the write-ahead log back into the database file (a
//! checkpoint) inside the commit that takes the log past 1,000 pages: that one commit also
//! writes the pages and syncs the database file, milliseconds more for whichever death the
//! OMA happens to be committing then (the kill-to-commit benchmark's commit step went from
//! p99 2.7 ms to 2.0 ms without it). So the store runs a PASSIVE checkpoint every few seconds
//! on a connection of its own, which in WAL mode runs beside the writer without blocking it,
//! and keeps SQLite's automatic checkpoint only as a backstop, far above what a few seconds
//! of intake write, in case this task ever falls behind or stops.

use std::time::Duration;

use sqlx::{AnyConnection, Connection, Row};
use tokio::sync::watch;

/// Pages in the WAL at which a commit checkpoints by itself (SQLite's default is 1,000):
/// about 40 MB with 4 KiB pages.
pub(crate) const BACKSTOP_PAGES: u32 = 10_000;

/// Time between two background checkpoints. Each one that copies anything makes the next
/// commit rewrite and sync the WAL's header once, so this is seconds, not milliseconds.
pub(crate) const INTERVAL: Duration = Duration::from_secs(5);

/// Checkpoint runs in a row that could not copy the whole WAL (readers in the way) before a
/// warning: a minute at the shipped interval.
const LAGGING_RUNS: u32 = 12;

/// Checkpoints the SQLite database at `url` every `interval` until `stop` says so or its
/// sender is gone (the store closed, or every clone of it dropped), then closes its
/// connection.
pub(crate) fn spawn_every(
    url: String,
    mut stop: watch::Receiver<bool>,
    interval: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut conn: Option<AnyConnection> = None;
        // Whether the last attempt failed, so that a lasting failure is logged once.
        let mut failing = false;
        // Checkpoints in a row that left frames behind.
        let mut lagging = 0;
        loop {
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                // `Store::close`, or the last store dropped (the sender with it).
                _ = stop.changed() => break,
            }
            match checkpoint(&url, &mut conn).await {
                Ok(complete) => {
                    if failing {
                        failing = false;
                        tracing::info!("background WAL checkpoints work again");
                    }
                    lagging = if complete { 0 } else { lagging + 1 };
                    if lagging == LAGGING_RUNS {
                        tracing::warn!(
                            runs = lagging,
                            "background WAL checkpoints keep leaving part of the WAL behind \
                             (long readers?); the WAL grows until SQLite's own checkpoint at \
                             {BACKSTOP_PAGES} pages"
                        );
                    }
                }
                Err(error) => {
                    // A broken connection is opened afresh next time.
                    conn = None;
                    if !failing {
                        failing = true;
                        tracing::warn!(error = %error,
                            "background WAL checkpoint failed; commits checkpoint by \
                             themselves past {BACKSTOP_PAGES} pages meanwhile, check that the \
                             database file is readable and writable");
                    }
                }
            }
        }
        if let Some(conn) = conn
            && let Err(error) = conn.close().await
        {
            tracing::warn!(%error, "closing the checkpoint connection failed");
        }
    })
}

/// One PASSIVE checkpoint; whether it copied the whole WAL.
async fn checkpoint(url: &str, conn: &mut Option<AnyConnection>) -> Result<bool, sqlx::Error> {
    let conn = match conn {
        Some(conn) => conn,
        // Never `mode=rwc`: a checkpoint must not create a database that has gone.
        None => conn.insert(AnyConnection::connect(&url.replace("mode=rwc", "mode=rw")).await?),
    };
    // (busy, frames in the WAL, frames copied); -1 for both counts outside WAL mode.
    let row = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
        .fetch_one(&mut *conn)
        .await?;
    let (log, copied): (i64, i64) = (row.try_get(1)?, row.try_get(2)?);
    Ok(copied >= log)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;
    use std::path::Path;

    /// Rows in `vmas` as the database file holds them, ignoring the WAL (`immutable=1`
    /// reads the main file only): what checkpoints have copied so far (none while even the
    /// schema is only in the WAL).
    async fn vmas_in_main_file(path: &Path) -> i64 {
        let url = format!("sqlite://{}?immutable=1", path.display());
        let mut conn = AnyConnection::connect(&url).await.unwrap();
        let tables: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM sqlite_master WHERE name = 'vmas'")
                .fetch_one(&mut conn)
                .await
                .unwrap();
        if tables == 0 {
            return 0;
        }
        sqlx::query_scalar("SELECT COUNT(*) FROM vmas")
            .fetch_one(&mut conn)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn commits_leave_checkpoints_to_the_background_task() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("oma.db");
        let store = Store::connect_with(path.to_str().unwrap(), None)
            .await
            .unwrap();
        // Past SQLite's default threshold of 1,000 pages (where a commit would have
        // checkpointed by itself) and far below the backstop's 10,000. The WAL file only
        // grows while nothing checkpoints, so its size counts the pages written.
        let frames = || {
            std::fs::metadata(path.with_extension("db-wal")).map_or(0, |m| m.len()) / (4096 + 24)
        };
        let mut vmas = 0;
        while frames() <= 1_200 && vmas < 2_000 {
            vmas += 1;
            let id = format!("vma-{vmas}");
            store
                .upsert_vma(&id, "http://127.0.0.1:9", &id)
                .await
                .unwrap();
        }
        assert_eq!(
            vmas_in_main_file(&path).await,
            0,
            "a commit copied the WAL into the database file by itself"
        );

        // `immutable=1` promises SQLite that nobody writes the file, so the main file is only
        // read while no checkpoint runs: each round lets the task run, stops it, waits for its
        // checkpoint in progress to end, then reads.
        let url = format!("sqlite://{}", path.display());
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let (stop, running) = watch::channel(false);
            let task = spawn_every(url.clone(), running, Duration::from_millis(50));
            tokio::time::sleep(Duration::from_millis(200)).await;
            stop.send(true).unwrap();
            task.await.unwrap();
            if vmas_in_main_file(&path).await == vmas {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the background checkpoint never copied the WAL"
            );
        }
    }

    #[tokio::test]
    async fn closing_the_store_ends_the_checkpoints_and_their_connection() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("oma.db");
        let store = Store::connect_with(path.to_str().unwrap(), Some(Duration::from_millis(20)))
            .await
            .unwrap();
        store
            .upsert_vma("vma-1", "http://127.0.0.1:9", "token")
            .await
            .unwrap();
        // A few checkpoints, so that the task's own connection is open.
        tokio::time::sleep(Duration::from_millis(200)).await;
        store.close().await;
        // SQLite removes the WAL when the last connection to the database closes: the pool's
        // and the checkpoints' both (the store itself is still alive here).
        let wal = path.with_extension("db-wal");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while wal.exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "the checkpoints' connection outlived Store::close"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
