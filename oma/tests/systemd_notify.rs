//! The `oma` binary under a stand-in for systemd's notification socket (an abstract one, as
//! `@name`): `READY=1` with its status once migrated and bound, `RELOADING=1` then `READY=1`
//! around a SIGHUP, `STOPPING=1` at shutdown, and `WATCHDOG=1` only while its loops make
//! progress. On PostgreSQL an operator's session that holds a lock on the jobs table (a
//! long `LOCK TABLE`, a migration by hand) blocks the poller's cycle: the pings stop until the
//! lock is released.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use sqlx::Connection;
use test_support::KillOnDrop;
use test_support::notify::{NotifySocket, assert_stopping_ends_pings, pings};

const TIMEOUT: Duration = Duration::from_secs(30);

/// `WatchdogSec=4`: a ping every 2 s.
const WATCHDOG_USEC: &str = "4000000";

type Lines = Arc<(Mutex<Vec<Value>>, Condvar)>;

/// The OMA, its JSON log read line by line.
struct Oma {
    child: KillOnDrop,
    lines: Lines,
}

impl Oma {
    fn start(database: &str, socket: &NotifySocket) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_oma"))
            .args(["--listen", "127.0.0.1:0", "--log-format", "json"])
            .args(["--poll-interval-secs", "0.2", "--database", database])
            .env("OMA_OPERATOR_TOKEN", common::OPERATOR)
            .env("NOTIFY_SOCKET", socket.env())
            .env("WATCHDOG_USEC", WATCHDOG_USEC)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start oma");
        let stdout = child.stdout.take().unwrap();
        let lines: Lines = Arc::default();
        let sink = Arc::clone(&lines);
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let value = serde_json::from_str(&line).unwrap_or(Value::String(line));
                sink.0.lock().unwrap().push(value);
                sink.1.notify_all();
            }
        });
        Self {
            child: KillOnDrop(child),
            lines,
        }
    }

    /// Waits for the log line whose `event` field is `event`.
    fn wait_event(&self, event: &str) -> Value {
        let deadline = Instant::now() + TIMEOUT;
        let mut lines = self.lines.0.lock().unwrap();
        loop {
            if let Some(v) = lines.iter().find(|v| v["fields"]["event"] == event) {
                return v["fields"].clone();
            }
            let now = Instant::now();
            assert!(now < deadline, "no {event} within {TIMEOUT:?}: {lines:?}");
            lines = self.lines.1.wait_timeout(lines, deadline - now).unwrap().0;
        }
    }

    fn signal(&self, signal: &str) {
        let pid = self.child.0.id().to_string();
        let status = Command::new("kill").args([signal, &pid]).status().unwrap();
        assert!(status.success());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifies_systemd_and_withholds_pings_while_a_loop_is_stuck_on_the_database() {
    for db in common::test_dbs().await {
        let name = format!("oma-notify-test-{}", uuid::Uuid::new_v4().simple());
        let socket = NotifySocket::bind_abstract(&name).unwrap();
        let mut oma = Oma::start(&db.url, &socket);
        let active = oma.wait_event("systemd_notify");
        assert_eq!(active["socket"], format!("@{name}"));
        let got = socket.wait_until("two pings", TIMEOUT, |m| pings(m) >= 2);
        let database = if db.backend == "sqlite" {
            "sqlite"
        } else {
            "postgresql"
        };
        let ready = format!("READY=1\nSTATUS=database {database}; polling 0 active job(s)");
        assert!(got[0].starts_with(&ready), "{}: {got:?}", db.backend);

        oma.signal("-HUP");
        socket.wait_until("RELOADING=1 then READY=1", TIMEOUT, |m| {
            m.iter()
                .skip_while(|m| !m.starts_with("RELOADING=1\n"))
                .skip(1)
                .any(|m| m.starts_with("READY=1\n"))
        });

        if db.backend == "postgres" {
            stuck_on_a_lock(&db.url, &oma, &socket).await;
        }

        oma.signal("-TERM");
        let status = tokio::task::block_in_place(|| oma.child.0.wait()).unwrap();
        assert!(
            status.success(),
            "{}: oma stopped with {status}",
            db.backend
        );
        assert_stopping_ends_pings(&socket.messages());
    }
}

/// Holds an exclusive lock on the jobs table: the poller's next cycle waits for it, so the
/// pings stop; they resume once the lock is gone.
async fn stuck_on_a_lock(url: &str, oma: &Oma, socket: &NotifySocket) {
    let mut operator = sqlx::PgConnection::connect(url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut operator).await.unwrap();
    sqlx::query("LOCK TABLE replication_jobs IN ACCESS EXCLUSIVE MODE")
        .execute(&mut operator)
        .await
        .unwrap();
    let withheld = tokio::task::block_in_place(|| oma.wait_event("watchdog_ping_withheld"));
    assert!(
        withheld["loops"].as_str().unwrap().contains("poller"),
        "{withheld}"
    );
    let before = pings(&socket.messages());
    // Three ping intervals: a healthy OMA would ping three times.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let during = pings(&socket.messages()) - before;
    assert!(during <= 1, "{during} pings while the poller was stuck");
    sqlx::query("ROLLBACK")
        .execute(&mut operator)
        .await
        .unwrap();
    tokio::task::block_in_place(|| {
        oma.wait_event("watchdog_ping_resumed");
        let resumed = pings(&socket.messages());
        socket.wait_until("a ping after the lock", TIMEOUT, |m| pings(m) > resumed);
    });
}
