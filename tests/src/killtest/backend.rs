//! The OMA's database in a kill-test run or a soak: a SQLite file in the OMA's temporary
//! directory (the default), or a database of its own on a PostgreSQL server, created for the
//! run and dropped after it, so that no run sees another's jobs.
//!
//! The database is made and dropped with `psql` (Debian's `postgresql` package, which
//! `cargo xtask test` installs for the store tests, brings it). An OMA in a network namespace
//! cannot reach the server's loopback address, so it is given the server's Unix socket
//! instead: a socket is a file, and files are not in the network namespace.

use std::process::Command;

use crate::oma::OmaConfig;

/// Which store the OMA runs on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// A SQLite file in the OMA's directory.
    Sqlite,
    /// A fresh database per run on the server at `admin_url` (a `postgres://` URL whose
    /// user may create and drop databases).
    Postgres {
        /// Where to create each run's database.
        admin_url: String,
    },
}

impl Backend {
    /// `sqlite` or `postgres`, for logs and reports.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Sqlite => "sqlite",
            Self::Postgres { .. } => "postgres",
        }
    }

    /// A database for one run: none for SQLite (the OMA makes its file), a fresh one on the
    /// server for PostgreSQL.
    pub fn fresh(&self) -> Result<Option<FreshDatabase>, String> {
        match self {
            Self::Sqlite => Ok(None),
            Self::Postgres { admin_url } => FreshDatabase::create(admin_url).map(Some),
        }
    }
}

/// A database created on a PostgreSQL server for one run; dropped (with whatever connections
/// are left) when this value is.
#[derive(Debug)]
pub struct FreshDatabase {
    admin_url: String,
    name: String,
    /// Its URL over TCP, as the server's admin URL reaches it.
    tcp_url: String,
    /// Its URL over the server's Unix socket, when the server has one.
    socket_url: Option<String>,
}

impl FreshDatabase {
    /// Creates `kt_<pid>_<random>` on the server at `admin_url`.
    pub fn create(admin_url: &str) -> Result<Self, String> {
        let name = format!("kt_{}_{:08x}", std::process::id(), rand::random::<u32>());
        psql(admin_url, &format!("CREATE DATABASE {name}"))?;
        let tcp_url = with_database(admin_url, &name)?;
        let socket_dir = psql(admin_url, "SHOW unix_socket_directories")?;
        // The first directory, if any; sqlx takes a `host` that starts with `/` as one.
        let socket_url = socket_dir
            .split(',')
            .map(str::trim)
            .find(|d| d.starts_with('/'))
            .map(|dir| {
                let sep = if tcp_url.contains('?') { '&' } else { '?' };
                format!("{tcp_url}{sep}host={dir}")
            });
        Ok(Self {
            admin_url: admin_url.to_owned(),
            name,
            tcp_url,
            socket_url,
        })
    }

    /// The URL an OMA gives as `--database`: over TCP, or over the Unix socket when it runs
    /// in a network namespace of its own.
    pub fn url(&self, in_netns: bool) -> Result<String, String> {
        if !in_netns {
            return Ok(self.tcp_url.clone());
        }
        self.socket_url.clone().ok_or_else(|| {
            format!(
                "the PostgreSQL server of {} has no Unix socket, which an OMA in a network \
                 namespace needs; start it with unix_socket_directories set",
                self.name
            )
        })
    }
}

impl Drop for FreshDatabase {
    fn drop(&mut self) {
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        if let Err(e) = psql(&self.admin_url, &sql) {
            eprintln!(
                "kill-test: could not drop database {} ({e}); drop it by hand",
                self.name
            );
        }
    }
}

/// `OmaConfig` for a run: its database set from `database` (`None` keeps SQLite).
pub fn oma_config(database: Option<&FreshDatabase>, in_netns: bool) -> Result<OmaConfig, String> {
    Ok(OmaConfig {
        database: database.map(|d| d.url(in_netns)).transpose()?,
        ..OmaConfig::default()
    })
}

/// `admin_url` with its database name replaced by `name` (query parameters kept).
fn with_database(admin_url: &str, name: &str) -> Result<String, String> {
    let (base, query) = match admin_url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (admin_url, None),
    };
    let authority_start = base
        .find("://")
        .map(|i| i + 3)
        .ok_or_else(|| format!("{admin_url:?} is not a postgres:// URL"))?;
    let server = match base[authority_start..].find('/') {
        Some(slash) => &base[..authority_start + slash],
        None => base,
    };
    Ok(match query {
        Some(q) => format!("{server}/{name}?{q}"),
        None => format!("{server}/{name}"),
    })
}

/// Runs one statement with `psql` and returns its unaligned output.
fn psql(url: &str, sql: &str) -> Result<String, String> {
    let out = Command::new("psql")
        .args([
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            url,
            "-c",
            sql,
        ])
        .output()
        .map_err(|e| {
            format!("running psql ({e}); install it with apt-get install postgresql-client")
        })?;
    if !out.status.success() {
        return Err(format!(
            "psql {sql:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::with_database;

    #[test]
    fn the_database_name_is_replaced_and_the_rest_kept() {
        assert_eq!(
            with_database("postgres://postgres@127.0.0.1:55432/postgres", "kt_1").unwrap(),
            "postgres://postgres@127.0.0.1:55432/kt_1"
        );
        assert_eq!(
            with_database("postgres://u:p@h/db?sslmode=disable", "kt_2").unwrap(),
            "postgres://u:p@h/kt_2?sslmode=disable"
        );
        assert_eq!(
            with_database("postgresql://h:5432", "kt_3").unwrap(),
            "postgresql://h:5432/kt_3"
        );
        assert!(with_database("not a url", "x").is_err());
    }
}
