//! SQLite I/O errors end the OMA.
//!
//! After `SQLITE_IOERR` or `SQLITE_FULL` on a `COMMIT`, SQLite may or may not have rolled the
//! transaction back, and sqlx's count of open transactions on that connection no longer
//! matches SQLite's: the soak saw the pool's connection carry on with every later
//! "transaction" nested (as savepoints) inside one that never commits, so the OMA answered
//! 202/`replicating` for jobs that lived only in that connection and were gone after its next
//! restart (docs/RELIABILITY.md; `oma/tests/sqlite_io_errors.rs`). As PostgreSQL does on a
//! failed fsync, the OMA stops using the database at once: it ends with
//! [`EXIT_SQLITE_IO_ERROR`], before the connection serves anything else, and its supervisor
//! (systemd's `Restart=on-failure`) starts it again, which recovers the WAL from the files.

/// The OMA's exit code after a SQLite I/O error (`EX_TEMPFAIL`: start again later).
pub const EXIT_SQLITE_IO_ERROR: i32 = 75;

/// SQLite's primary result codes that mean the files may not hold what the connection
/// believes: `SQLITE_IOERR` (with its extended codes) and `SQLITE_FULL`.
const SQLITE_IOERR: i64 = 10;
const SQLITE_FULL: i64 = 13;

/// The SQLite (extended) result code of `error` if it is an I/O error or a full disk.
///
/// SQLite's codes reach sqlx as decimal numbers of at most four digits; PostgreSQL's are
/// five-character SQLSTATEs, which never match.
pub(crate) fn sqlite_io_code(error: &sqlx::Error) -> Option<i64> {
    let sqlx::Error::Database(db) = error else {
        return None;
    };
    let code = db.code()?;
    if code.len() >= 5 {
        return None;
    }
    let code: i64 = code.parse().ok()?;
    matches!(code & 0xff, SQLITE_IOERR | SQLITE_FULL).then_some(code)
}

/// Ends the process if `error` is a SQLite I/O error (see the module's documentation).
pub(crate) fn exit_on_sqlite_io_error(error: &sqlx::Error) {
    let Some(code) = sqlite_io_code(error) else {
        return;
    };
    tracing::error!(
        event = "sqlite_io_error",
        code,
        error = %error,
        exit_code = EXIT_SQLITE_IO_ERROR,
        "SQLite reported an I/O error on the database files; the OMA exits so that its \
         supervisor starts it again on a fresh connection (WAL recovery); check the disk \
         (dmesg, free space) if it repeats"
    );
    // Also straight to stderr: the log writer may not get to run again before the exit.
    eprintln!(
        "oma: event=sqlite_io_error code={code} error=\"{error}\": exiting with code \
         {EXIT_SQLITE_IO_ERROR} so that the supervisor restarts the OMA on a fresh database \
         connection; check the disk (dmesg, free space) if it repeats"
    );
    std::process::exit(EXIT_SQLITE_IO_ERROR);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_sqlite_io_errors_are_classified() {
        // A real SQLite error that is no I/O error: a constraint (code 1555 or 19).
        let mut conn = <sqlx::SqliteConnection as sqlx::Connection>::connect("sqlite::memory:")
            .await
            .unwrap();
        sqlx::query("CREATE TABLE t (id INTEGER PRIMARY KEY)")
            .execute(&mut conn)
            .await
            .unwrap();
        sqlx::query("INSERT INTO t VALUES (1)")
            .execute(&mut conn)
            .await
            .unwrap();
        let error = sqlx::query("INSERT INTO t VALUES (1)")
            .execute(&mut conn)
            .await
            .unwrap_err();
        assert_eq!(sqlite_io_code(&error), None);
        assert_eq!(sqlite_io_code(&sqlx::Error::RowNotFound), None);
    }
}
