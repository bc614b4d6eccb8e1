//! sea-orm adapters of agent-batch's ports, over SQLite (the embedded default, one process) and
//! PostgreSQL (production, many replicas, with PostgreSQL itself as the coordinator).
//!
//! [`Store::connect`] opens a database by URL and [`Store::migrate`] brings its schema up to
//! date. The set-based statements (chunk inserts, chunk outcome updates, lease claims with
//! `FOR UPDATE SKIP LOCKED`) are written as SQL that both backends accept, with the locking clause
//! added for PostgreSQL only; the same contract tests run them on both.
#![forbid(unsafe_code)]

use std::fs::File;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use batch_migration::{ExternalMigrator, Migrator, MigratorTrait};
use batch_ports::runs::StoreError;
use sea_orm::sqlx::postgres::PgListener;
use sea_orm::sqlx::sqlite::{SqliteJournalMode, SqliteSynchronous};
use sea_orm::{ConnectOptions, Database, DatabaseConnection, DbBackend, Statement, Value};

mod categories;
mod contexts;
mod convert;
mod jobs;
mod preferences;
mod sample;
mod schedules;

pub use sample::SampleCounts;
mod runs;
mod users;

pub use convert::db_error;

/// A database holding the service's state, implementing the store ports.
#[derive(Debug)]
pub struct Store {
    db: DatabaseConnection,
    /// The SQLite database file, when the backend is a file-backed SQLite database.
    sqlite_file: Option<PathBuf>,
    /// Held while this process claims work from a SQLite file: SQLite mode is single-process.
    process_lock: Mutex<Option<File>>,
    /// Runs that may be drafted inside an open transaction at once (see
    /// [`STREAMED_DRAFTS`]).
    streamed_drafts: std::sync::Arc<tokio::sync::Semaphore>,
}

/// How many runs may be drafted inside an open transaction at once, each holding one pooled
/// connection while its strategy reads the sources through others. Beyond that a draft keeps
/// its pages in memory until commit: with every connection held by a draft, the sources could
/// not be read at all.
pub const STREAMED_DRAFTS: usize = 4;

/// The file of a `sqlite:` URL, or `None` for in-memory databases and other backends.
fn sqlite_file(url: &str) -> Option<PathBuf> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next().unwrap_or_default();
    if path.is_empty() || path.starts_with(":memory:") || url.contains("mode=memory") {
        return None;
    }
    Some(PathBuf::from(path))
}

/// A PostgreSQL connection listening for queued runs ([`Store::listen_for_queued_runs`]). It
/// holds one of the pool's connections while it lives.
pub struct QueuedRuns {
    listener: PgListener,
}

impl std::fmt::Debug for QueuedRuns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueuedRuns").finish_non_exhaustive()
    }
}

impl QueuedRuns {
    /// Waits for the next announcement of a queued run and returns its id. A connection lost
    /// meanwhile is opened again at the next call; announcements made while it was down are
    /// lost, which only delays those runs to the slots' next look.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the connection was lost or cannot be opened again.
    pub async fn next(&mut self) -> Result<String, StoreError> {
        self.listener
            .recv()
            .await
            .map(|notification| notification.payload().to_owned())
            .map_err(|e| StoreError::Unavailable(format!("listening for queued runs: {e}")))
    }
}

impl Store {
    /// Opens the database at `url` (`sqlite://data/batch.db?mode=rwc`, `sqlite::memory:`,
    /// `postgres://user@host/db`). A SQLite file's directory is created when missing.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the database cannot be opened or reached, naming the
    /// URL without its password.
    pub async fn connect(url: &str) -> Result<Store, StoreError> {
        let sqlite_file = sqlite_file(url);
        if let Some(dir) = sqlite_file.as_ref().and_then(|f| f.parent())
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir)
                .map_err(|e| StoreError::Unavailable(format!("creating {}: {e}", dir.display())))?;
        }
        let mut options = ConnectOptions::new(url.to_owned());
        options
            .sqlx_logging(false)
            .connect_timeout(Duration::from_secs(5))
            .acquire_timeout(Duration::from_secs(5));
        if url.starts_with("sqlite:") {
            // One connection: SQLite has one writer anyway, and in-memory databases exist per
            // connection.
            options.max_connections(1).min_connections(1);
            // A write-ahead log: a commit appends to one file and syncs it once, where the
            // default rollback journal writes and syncs the journal and the database and then
            // deletes the journal. Synchronous FULL keeps every commit durable across a power
            // loss, as before. (In-memory databases keep their own journal.)
            options.map_sqlx_sqlite_opts(|sqlite| {
                sqlite
                    .journal_mode(SqliteJournalMode::Wal)
                    .synchronous(SqliteSynchronous::Full)
            });
        } else {
            options.max_connections(16);
        }
        let db = Database::connect(options)
            .await
            .map_err(|e| StoreError::Unavailable(format!("connecting to {}: {e}", redact(url))))?;
        Ok(Store::from_connection(db, sqlite_file))
    }

    /// Opens the database at `url` and applies pending migrations: the service's own, and with
    /// `external` also the stand-in tables of other systems (the embedded default). This is how
    /// `sqlite://data/batch.db?mode=rwc` is created and migrated on first use.
    ///
    /// # Errors
    /// As [`Store::connect`] and [`Store::migrate`].
    pub async fn open(url: &str, external: bool) -> Result<Store, StoreError> {
        let store = Store::connect(url).await?;
        store.migrate().await?;
        if external {
            store.migrate_external().await?;
        }
        Ok(store)
    }

    /// Wraps an open connection (tests use this to observe statements).
    pub fn from_connection(db: DatabaseConnection, sqlite_file: Option<PathBuf>) -> Store {
        Store {
            db,
            sqlite_file,
            process_lock: Mutex::new(None),
            streamed_drafts: std::sync::Arc::new(tokio::sync::Semaphore::new(STREAMED_DRAFTS)),
        }
    }

    /// Applies the service's pending migrations.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the database cannot be reached; [`StoreError::Unexpected`]
    /// when a migration fails.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        Migrator::up(&self.db, None).await.map_err(db_error)
    }

    /// Creates the tables other systems own in production (users, categories, preferences):
    /// for the embedded default and for tests.
    ///
    /// # Errors
    /// As [`Store::migrate`].
    pub async fn migrate_external(&self) -> Result<(), StoreError> {
        ExternalMigrator::up(&self.db, None).await.map_err(db_error)
    }

    /// Whether the database answers.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when it does not.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.db.ping().await.map_err(db_error)
    }

    /// The backend of the connection.
    pub fn backend(&self) -> DbBackend {
        self.db.get_database_backend()
    }

    /// The underlying connection, for fixtures that load data.
    pub fn connection(&self) -> &DatabaseConnection {
        &self.db
    }

    /// Announcements, from every process on the same PostgreSQL database, that a run was
    /// queued: a server wakes its idle slots with them, so a run another replica created (or
    /// released as it stopped) starts at once rather than at the slots' next look. `None` on
    /// SQLite, where one process does all the work and knows its own runs.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the listening connection cannot be opened.
    pub async fn listen_for_queued_runs(&self) -> Result<Option<QueuedRuns>, StoreError> {
        if self.backend() != DbBackend::Postgres {
            return Ok(None);
        }
        let mut listener = PgListener::connect_with(self.db.get_postgres_connection_pool())
            .await
            .map_err(|e| StoreError::Unavailable(format!("listening for queued runs: {e}")))?;
        listener
            .listen(runs::QUEUED_CHANNEL)
            .await
            .map_err(|e| StoreError::Unavailable(format!("listening for queued runs: {e}")))?;
        Ok(Some(QueuedRuns { listener }))
    }

    /// Takes the right to claim work now rather than at the first claim: a server calls it at
    /// start, so a second server on one SQLite file refuses to start instead of idling. A no-op
    /// on PostgreSQL.
    ///
    /// # Errors
    /// [`StoreError::Unsupported`] when another process works on the SQLite file.
    pub fn claim_exclusive(&self) -> Result<(), StoreError> {
        self.ensure_single_process()
    }

    /// Makes sure this process may claim work. On a SQLite file it takes an exclusive lock on
    /// `<file>.lock` the first time and keeps it; a second process gets a clear error. The
    /// operating system releases the lock when the process dies.
    fn ensure_single_process(&self) -> Result<(), StoreError> {
        let Some(file) = &self.sqlite_file else {
            return Ok(());
        };
        let mut held = self
            .process_lock
            .lock()
            .map_err(|_| StoreError::Unexpected("process lock poisoned".to_owned()))?;
        if held.is_some() {
            return Ok(());
        }
        let lock_path = PathBuf::from(format!("{}.lock", file.display()));
        let lock_file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| {
                StoreError::Unavailable(format!("opening {}: {e}", lock_path.display()))
            })?;
        match lock_file.try_lock() {
            Ok(()) => {
                *held = Some(lock_file);
                Ok(())
            }
            Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::Unsupported(format!(
                "another process is already working on the SQLite database {}; SQLite mode is \
                 single-process: stop the other process, or use PostgreSQL to run several replicas",
                file.display()
            ))),
            Err(std::fs::TryLockError::Error(e)) => Err(StoreError::Unavailable(format!(
                "locking {}: {e}",
                lock_path.display()
            ))),
        }
    }

    /// A statement for this backend.
    fn statement(&self, sql: &str, values: Vec<Value>) -> Statement {
        statement(self.backend(), sql, values)
    }
}

/// `sql`, written with numbered parameters (`$1`, `$2`, …), and its `values` as a statement
/// for `backend`. On SQLite the numbered parameters become anonymous ones (`?`) with the values
/// in the order they appear (repeated where a number is): sqlx asks SQLite for the name of
/// every parameter it binds, and SQLite finds a numbered parameter's name by a linear scan, so
/// binding a statement cost the square of its parameters (7 % of the samples of the P1
/// benchmark on SQLite, session 9, at 512 parameters per statement). Anonymous parameters
/// have no name to look up.
fn statement(backend: DbBackend, sql: &str, values: Vec<Value>) -> Statement {
    match backend {
        DbBackend::Sqlite => match anonymous_parameters(sql, values) {
            Ok((sql, values)) => Statement::from_sql_and_values(backend, sql, values),
            Err(values) => Statement::from_sql_and_values(backend, sql, values),
        },
        _ => Statement::from_sql_and_values(backend, sql, values),
    }
}

/// `sql` with each `$N` outside quotes replaced by `?`, and `values` reordered to match: the
/// value of a number used once is moved, of a number used again cloned. `Err` gives `values`
/// back when `sql` names a parameter that has no value (sqlx then reports it), has a quote
/// left open, or has no parameter at all.
fn anonymous_parameters(sql: &str, values: Vec<Value>) -> Result<(String, Vec<Value>), Vec<Value>> {
    let bytes = sql.as_bytes();
    let mut out = String::with_capacity(sql.len());
    let mut order = Vec::with_capacity(values.len());
    let mut quote: Option<u8> = None;
    let mut copied = 0;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match quote {
            Some(q) if b == q => quote = None,
            Some(_) => {}
            None if b == b'\'' || b == b'"' => quote = Some(b),
            None if b == b'$' && bytes.get(i + 1).is_some_and(u8::is_ascii_digit) => {
                let end = (i + 1..bytes.len())
                    .find(|&j| !bytes[j].is_ascii_digit())
                    .unwrap_or(bytes.len());
                let Some(n) = sql[i + 1..end]
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=values.len()).contains(n))
                else {
                    return Err(values);
                };
                out.push_str(&sql[copied..i]);
                out.push('?');
                order.push(n - 1);
                copied = end;
                i = end;
                continue;
            }
            None => {}
        }
        i += 1;
    }
    // An unbalanced quote would leave the numbers after it as they are, among `?`s.
    if order.is_empty() || quote.is_some() {
        return Err(values);
    }
    out.push_str(&sql[copied..]);
    let mut uses = vec![0usize; values.len()];
    for &n in &order {
        uses[n] += 1;
    }
    let mut slots: Vec<Option<Value>> = values.into_iter().map(Some).collect();
    let mut reordered = Vec::with_capacity(order.len());
    for n in order {
        uses[n] -= 1;
        let value = if uses[n] == 0 {
            slots[n].take()
        } else {
            slots[n].clone()
        };
        // Each number's value is taken only at its last use, so it is still there.
        reordered.extend(value);
    }
    Ok((out, reordered))
}

/// `url` with any password replaced, for messages and logs.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let credentials = &url[scheme + 3..at];
            match credentials.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_files_are_found_in_urls() {
        let check = |url: &str, expected: Option<&str>| {
            assert_eq!(sqlite_file(url), expected.map(PathBuf::from), "{url}");
        };
        check("sqlite://data/batch.db?mode=rwc", Some("data/batch.db"));
        check("sqlite:///tmp/x.db", Some("/tmp/x.db"));
        check("sqlite::memory:", None);
        check("sqlite://file.db?mode=memory", None);
        check("postgres://postgres@127.0.0.1/test", None);
    }

    #[test]
    fn numbered_parameters_become_anonymous_ones_in_order_of_use() {
        // $4 names no value: the statement is left as it is, for sqlx to refuse.
        let refused = anonymous_parameters("SELECT $1, $4", vec![Value::from(1i64)]);
        assert_eq!(refused, Err(vec![Value::from(1i64)]));
        let values = vec![Value::from(1i64), Value::from("two"), Value::from(3i64)];
        let (sql, values) = anonymous_parameters(
            "SELECT '$1', \"$2\" FROM t WHERE a = $2 AND b = $1 AND c IN ($3, $2)",
            values,
        )
        .expect("every parameter has a value");
        assert_eq!(
            sql,
            "SELECT '$1', \"$2\" FROM t WHERE a = ? AND b = ? AND c IN (?, ?)"
        );
        assert_eq!(
            values,
            vec![
                Value::from("two"),
                Value::from(1i64),
                Value::from(3i64),
                Value::from("two")
            ]
        );
        assert!(anonymous_parameters("SELECT 1", vec![]).is_err());
        assert!(anonymous_parameters("SELECT $1, 'open", vec![Value::from(1i64)]).is_err());
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact("sqlite://data/batch.db"), "sqlite://data/batch.db");
    }
}
