//! A transaction's writes, sent to the database in as few round trips as it takes.
//!
//! On SQLite every statement is a round trip to sqlx's worker thread for the connection, and
//! on a host that has gone idle between two deaths the first round trip costs a thread wake-up
//! or two: 256 us at the median on the two-core virtual machine of the benchmarks, against
//! 26 us when the threads are busy (`cargo run --release -p oma --example statement_trip`). A death's intake wrote four statements (the job, its VM context, the
//! audit entry, the event id); on SQLite they now go together, as one multi-statement string
//! whose `$N` placeholders number the arguments across all of them (sqlx's SQLite driver binds
//! `$N` to the N-th argument of the whole string). PostgreSQL's extended protocol takes one
//! statement per message, so there each statement still goes on its own.
//!
//! Only data-changing statements go here (a SELECT would count the previous statement's rows
//! again). Each statement says how many rows it must change; a batch reports whether the sum matched,
//! which is the optimistic lock's fence (`WHERE version = ...` matching no row) and the event
//! ids' duplicate check. On SQLite, where the connection is the only writer, a mismatch cannot
//! come from a race, but it is still checked, so a broken invariant makes the caller roll back
//! and retry instead of committing half a change.

use sqlx::any::{Any, AnyArguments};
use sqlx::{AnyConnection, Arguments, Encode, Type};

use super::{Backend, StoreError};

/// Arguments after which pending SQLite statements are sent even though more will follow
/// (SQLite accepts up to 32,766 per statement; no single statement here comes near).
const MAX_ARGS: usize = 10_000;

/// Statements of one transaction waiting to be sent, with their arguments.
pub(crate) struct Writes<'q> {
    /// Send statements together (SQLite) rather than one by one (PostgreSQL).
    together: bool,
    sql: String,
    args: AnyArguments<'q>,
    /// Arguments bound so far, i.e. the number of the last placeholder handed out.
    bound: usize,
    /// Rows the pending statements must change between them.
    expected_rows: u64,
}

impl<'q> Writes<'q> {
    /// Writes for a transaction on `backend`.
    pub(crate) fn new(backend: Backend) -> Self {
        Self {
            together: backend == Backend::Sqlite,
            sql: String::new(),
            args: AnyArguments::default(),
            bound: 0,
            expected_rows: 0,
        }
    }

    /// Binds `value` as the next argument and returns its placeholder (`$N`).
    pub(crate) fn arg<T>(&mut self, value: T) -> Result<String, StoreError>
    where
        T: 'q + Encode<'q, Any> + Type<Any>,
    {
        self.args.add(value).map_err(sqlx::Error::Encode)?;
        self.bound += 1;
        Ok(format!("${}", self.bound))
    }

    /// Ends one statement (its placeholders from [`Writes::arg`]), which must change exactly
    /// `rows` rows. Sends what is pending unless statements go together and there is room
    /// for more. Returns `false` when sent statements changed another number of rows than
    /// they had to: the caller rolls back and retries.
    pub(crate) async fn end(
        &mut self,
        conn: &mut AnyConnection,
        sql: &str,
        rows: u64,
    ) -> Result<bool, StoreError> {
        self.sql.push_str(sql);
        self.sql.push_str(";\n");
        self.expected_rows += rows;
        if self.together && self.bound < MAX_ARGS {
            return Ok(true);
        }
        self.flush(conn).await
    }

    /// Sends what is pending, in one round trip. Returns `false` as [`Writes::end`] does.
    pub(crate) async fn flush(&mut self, conn: &mut AnyConnection) -> Result<bool, StoreError> {
        if self.sql.is_empty() {
            return Ok(true);
        }
        let sql = std::mem::take(&mut self.sql);
        let args = std::mem::take(&mut self.args);
        let expected = std::mem::take(&mut self.expected_rows);
        self.bound = 0;
        let done = sqlx::query_with(&sql, args).execute(&mut *conn).await?;
        Ok(done.rows_affected() == expected)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::Connection;

    async fn sqlite() -> AnyConnection {
        sqlx::any::install_default_drivers();
        let mut conn = AnyConnection::connect("sqlite::memory:").await.unwrap();
        sqlx::query("CREATE TABLE t (id TEXT PRIMARY KEY, v BIGINT NOT NULL)")
            .execute(&mut conn)
            .await
            .unwrap();
        conn
    }

    async fn values(conn: &mut AnyConnection) -> Vec<(String, i64)> {
        sqlx::query_as("SELECT id, v FROM t ORDER BY id")
            .fetch_all(conn)
            .await
            .unwrap()
    }

    /// Adds the statements of the tests below: two inserts and an update of `a`.
    async fn three(
        w: &mut Writes<'_>,
        conn: &mut AnyConnection,
        update_rows: u64,
    ) -> Result<bool, StoreError> {
        let sql = format!("INSERT INTO t VALUES ({}, {})", w.arg("a")?, w.arg(1_i64)?);
        assert!(w.end(conn, &sql, 1).await?);
        let sql = format!("INSERT INTO t VALUES ({}, {})", w.arg("b")?, w.arg(2_i64)?);
        assert!(w.end(conn, &sql, 1).await?);
        let sql = format!(
            "UPDATE t SET v = {} WHERE id = {}",
            w.arg(10_i64)?,
            w.arg("a")?
        );
        w.end(conn, &sql, update_rows).await
    }

    #[tokio::test]
    async fn sqlite_statements_wait_for_the_flush_and_number_arguments_across_them()
    -> Result<(), StoreError> {
        let mut conn = sqlite().await;
        let mut w = Writes::new(Backend::Sqlite);
        assert!(three(&mut w, &mut conn, 1).await?);
        assert!(values(&mut conn).await.is_empty(), "sent before the flush");
        assert!(w.flush(&mut conn).await.unwrap());
        assert_eq!(values(&mut conn).await, [("a".into(), 10), ("b".into(), 2)]);
        // Nothing pending: a second flush is a no-op.
        assert!(w.flush(&mut conn).await.unwrap());
        Ok(())
    }

    #[tokio::test]
    async fn a_statement_that_changes_other_rows_than_it_must_fails_the_batch()
    -> Result<(), StoreError> {
        let mut conn = sqlite().await;
        let mut w = Writes::new(Backend::Sqlite);
        // The update matches one row but says it must match none (a fence that holds would
        // say one): the batch reports the mismatch.
        assert!(three(&mut w, &mut conn, 0).await?);
        assert!(!w.flush(&mut conn).await?);
        Ok(())
    }

    #[tokio::test]
    async fn one_by_one_statements_are_sent_at_once() -> Result<(), StoreError> {
        // The PostgreSQL mode, on SQLite: each statement goes when it ends.
        let mut conn = sqlite().await;
        let mut w = Writes::new(Backend::Postgres);
        let sql = format!("INSERT INTO t VALUES ({}, {})", w.arg("a")?, w.arg(1_i64)?);
        assert!(w.end(&mut conn, &sql, 1).await?);
        assert_eq!(values(&mut conn).await, [("a".into(), 1)]);
        let sql = format!(
            "UPDATE t SET v = {} WHERE id = {}",
            w.arg(5_i64)?,
            w.arg("zz")?
        );
        assert!(!w.end(&mut conn, &sql, 1).await?, "no row matched");
        Ok(())
    }
}
