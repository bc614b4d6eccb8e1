//! Dev-only helpers for agent-batch's tests. Nothing that ships depends on this crate (a tidy
//! test checks it).
//!
//! [`fakes`] holds stateful in-memory fakes of the ports; [`ManualClock`] is a clock tests move.
//!
//! [`TestDatabase`] creates a throwaway database for one test: a SQLite file in a fresh
//! temporary directory, or a fresh PostgreSQL database on the server named by
//! `BATCH_TEST_POSTGRES_URL` (default `postgres://postgres@127.0.0.1:5432/test`), dropped again
//! when the fixture is dropped.
#![forbid(unsafe_code)]

pub mod fakes;

use std::path::PathBuf;
use std::time::Duration;

use sea_orm::{ConnectOptions, ConnectionTrait, Database};

/// The backends the store supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// A SQLite file.
    Sqlite,
    /// A PostgreSQL database.
    Postgres,
}

/// The PostgreSQL server tests use.
pub fn postgres_admin_url() -> String {
    std::env::var("BATCH_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// A database that exists for one test.
#[derive(Debug)]
pub struct TestDatabase {
    /// The URL to connect to it.
    pub url: String,
    /// The backend.
    pub backend: Backend,
    /// For SQLite: the directory holding the file, removed on drop.
    dir: Option<PathBuf>,
    /// For PostgreSQL: the database name, dropped on drop.
    name: Option<String>,
}

/// Why a test database could not be made.
#[derive(Debug)]
pub enum Unavailable {
    /// PostgreSQL is not answering and the run is not under CI: the test should skip.
    Skip(String),
}

impl TestDatabase {
    /// Creates a fresh database. For PostgreSQL outside CI, an unreachable server returns
    /// `Err(Unavailable::Skip)`; under CI (`CI` set) it panics, because CI requires PostgreSQL.
    ///
    /// # Errors
    /// [`Unavailable::Skip`] as described.
    ///
    /// # Panics
    /// When a database cannot be created for any other reason.
    pub async fn create(backend: Backend) -> Result<TestDatabase, Unavailable> {
        let id = uuid::Uuid::now_v7().simple().to_string();
        match backend {
            Backend::Sqlite => {
                let dir = std::env::temp_dir().join(format!("batch-test-{id}"));
                std::fs::create_dir_all(&dir).expect("temporary directory is writable");
                let url = format!("sqlite://{}/batch.db?mode=rwc", dir.display());
                Ok(TestDatabase {
                    url,
                    backend,
                    dir: Some(dir),
                    name: None,
                })
            }
            Backend::Postgres => {
                let admin = postgres_admin_url();
                let mut options = ConnectOptions::new(admin.clone());
                options
                    .sqlx_logging(false)
                    .max_connections(1)
                    .connect_timeout(Duration::from_secs(5));
                let conn = match Database::connect(options).await {
                    Ok(conn) => conn,
                    Err(e) if std::env::var_os("CI").is_none() => {
                        return Err(Unavailable::Skip(format!(
                            "PostgreSQL at {admin} is not answering: {e}"
                        )));
                    }
                    Err(e) => panic!("CI requires PostgreSQL at {admin}: {e}"),
                };
                let name = format!("batch_test_{id}");
                conn.execute_unprepared(&format!("CREATE DATABASE {name}"))
                    .await
                    .expect("test database can be created");
                let _ = conn.close().await;
                let base = admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b);
                Ok(TestDatabase {
                    url: format!("{base}/{name}"),
                    backend,
                    dir: None,
                    name: Some(name),
                })
            }
        }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
        if let Some(name) = self.name.take() {
            // Drop may run inside a runtime; a thread with its own runtime can block safely.
            let admin = postgres_admin_url();
            let _ = std::thread::spawn(move || {
                let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                else {
                    return;
                };
                runtime.block_on(async move {
                    let mut options = ConnectOptions::new(admin);
                    options.sqlx_logging(false).max_connections(1);
                    if let Ok(conn) = Database::connect(options).await {
                        let _ = conn
                            .execute_unprepared(&format!(
                                "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                            ))
                            .await;
                    }
                });
            })
            .join();
        }
    }
}

/// A clock that only moves when told to: tests drive time step by step.
#[derive(Debug)]
pub struct ManualClock {
    now: std::sync::Mutex<chrono::DateTime<chrono::Utc>>,
}

impl ManualClock {
    /// A clock standing at `now`.
    pub fn new(now: chrono::DateTime<chrono::Utc>) -> Self {
        ManualClock {
            now: std::sync::Mutex::new(now),
        }
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: chrono::Duration) {
        let mut now = self
            .now
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *now += by;
    }
}

#[async_trait::async_trait]
impl batch_ports::Clock for ManualClock {
    fn now(&self) -> chrono::DateTime<chrono::Utc> {
        *self
            .now
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Moves the clock on by `duration` at once, then lets other tasks run.
    async fn sleep(&self, duration: std::time::Duration) {
        self.advance(chrono::Duration::from_std(duration).unwrap_or(chrono::Duration::MAX));
        tokio::task::yield_now().await;
    }
}
