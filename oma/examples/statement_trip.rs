//! What one statement's round trip to SQLite costs the OMA, and what sending a death's four
//! writes together saves (see `store/batch.rs`).
//!
//! `cargo run --release -p oma --example statement_trip [ROUNDS]`
//!
//! Through sqlx's Any driver, as the store does, on a WAL database in a temporary directory:
//! - one indexed SELECT, back to back (the threads stay busy) and after 20 ms of idleness (as
//!   between two deaths, when sqlx's worker thread and the runtime's have gone to sleep);
//! - after 20 ms of idleness, four single-row UPDATEs inside a transaction sent one by one,
//!   then the same four as one multi-statement string (the baseline and the change, in the
//!   same run, alternating).

use std::time::{Duration, Instant};

use sqlx::{AnyConnection, Connection, Executor};

const IDLE: Duration = Duration::from_millis(20);

fn report(name: &str, mut us: Vec<u128>) {
    us.sort_unstable();
    let at = |p: usize| us[(us.len() * p / 100).min(us.len() - 1)];
    println!(
        "{name:<44} p50 {:>5} us  p90 {:>5} us  p99 {:>5} us  ({} samples)",
        at(50),
        at(90),
        at(99),
        us.len()
    );
}

async fn select(conn: &mut AnyConnection) -> u128 {
    let start = Instant::now();
    sqlx::query("SELECT v FROM t WHERE id = $1")
        .bind("a")
        .fetch_all(&mut *conn)
        .await
        .expect("select");
    start.elapsed().as_micros()
}

/// Four updates in a transaction, one by one or `together`; the time between BEGIN and
/// COMMIT (the statements only).
async fn four_updates(conn: &mut AnyConnection, together: bool) -> u128 {
    let mut tx = conn.begin().await.expect("begin");
    let start = Instant::now();
    let one = |i: usize| format!("UPDATE t SET v = v + 1 WHERE id = ${i}");
    if together {
        let sql = (1..=4).map(one).collect::<Vec<_>>().join(";\n");
        let mut query = sqlx::query(&sql);
        for id in ["a", "b", "c", "d"] {
            query = query.bind(id);
        }
        query.execute(&mut *tx).await.expect("updates");
    } else {
        for id in ["a", "b", "c", "d"] {
            sqlx::query(&one(1))
                .bind(id)
                .execute(&mut *tx)
                .await
                .expect("update");
        }
    }
    let took = start.elapsed().as_micros();
    tx.commit().await.expect("commit");
    took
}

#[tokio::main]
async fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .map_or(200, |r| r.parse().expect("ROUNDS must be a number"));
    sqlx::any::install_default_drivers();
    let dir = tempfile::tempdir().expect("temporary directory");
    let url = format!("sqlite://{}/trip.db?mode=rwc", dir.path().display());
    let mut conn = AnyConnection::connect(&url).await.expect("open");
    for sql in [
        "PRAGMA journal_mode = WAL",
        "PRAGMA synchronous = FULL",
        "CREATE TABLE t (id TEXT PRIMARY KEY, v BIGINT NOT NULL)",
        "INSERT INTO t VALUES ('a', 0), ('b', 0), ('c', 0), ('d', 0)",
    ] {
        conn.execute(sql).await.expect("set-up");
    }
    let mut busy = Vec::new();
    for _ in 0..rounds * 6 {
        busy.push(select(&mut conn).await);
    }
    let (mut idle, mut apart, mut together) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        tokio::time::sleep(IDLE).await;
        idle.push(select(&mut conn).await);
        tokio::time::sleep(IDLE).await;
        apart.push(four_updates(&mut conn, false).await);
        tokio::time::sleep(IDLE).await;
        together.push(four_updates(&mut conn, true).await);
    }
    report("one SELECT, back to back", busy);
    report("one SELECT, after 20 ms idle", idle);
    report("four UPDATEs one by one, after idle", apart);
    report("four UPDATEs as one string, after idle", together);
}
