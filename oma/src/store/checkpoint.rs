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

use std::sync::Weak;
use std::time::Duration;

use sqlx::{AnyConnection, Connection, Executor};

/// Pages in the WAL at which a commit checkpoints by itself (SQLite's default is 1,000):
/// about 40 MB with 4 KiB pages.
pub(crate) const BACKSTOP_PAGES: u32 = 10_000;

/// Time between two background checkpoints. Each one that copies anything makes the next
/// commit rewrite and sync the WAL's header once, so this is seconds, not milliseconds.
pub(crate) const INTERVAL: Duration = Duration::from_secs(5);

/// Checkpoints the SQLite database at `url` every `interval` until `alive` can no longer be
/// upgraded (every clone of the store is gone).
pub(crate) fn spawn_every(url: String, alive: Weak<()>, interval: Duration) {
    tokio::spawn(async move {
        let mut conn: Option<AnyConnection> = None;
        // Whether the last attempt failed, so that a lasting failure is logged once.
        let mut failing = false;
        loop {
            tokio::time::sleep(interval).await;
            if alive.upgrade().is_none() {
                return;
            }
            match checkpoint(&url, &mut conn).await {
                Ok(()) if failing => {
                    failing = false;
                    tracing::info!("background WAL checkpoints work again");
                }
                Ok(()) => {}
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
    });
}

async fn checkpoint(url: &str, conn: &mut Option<AnyConnection>) -> Result<(), sqlx::Error> {
    let conn = match conn {
        Some(conn) => conn,
        // Never `mode=rwc`: a checkpoint must not create a database that has gone.
        None => conn.insert(AnyConnection::connect(&url.replace("mode=rwc", "mode=rw")).await?),
    };
    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;
    use std::path::Path;
    use std::sync::Arc;

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
        // Every commit appends at least one page to the WAL, so this passes SQLite's default
        // threshold of 1,000 pages, where a commit would have checkpointed by itself.
        let vmas = 1_100;
        for i in 0..vmas {
            let id = format!("vma-{i}");
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

        let alive = Arc::new(());
        spawn_every(
            format!("sqlite://{}", path.display()),
            Arc::downgrade(&alive),
            Duration::from_millis(50),
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while vmas_in_main_file(&path).await < vmas {
            assert!(
                std::time::Instant::now() < deadline,
                "the background checkpoint never copied the WAL"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
