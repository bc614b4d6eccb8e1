//! Dev-only helpers for agent-batch's tests. Nothing that ships depends on this crate (a tidy
//! test checks it).
//!
//! [`fakes`] holds stateful in-memory fakes of the ports; [`siblings`] fake sibling services as
//! real tonic servers; [`ManualClock`] is a clock tests move.
//!
//! [`TestDatabase`] creates a throwaway database for one test: a SQLite file in a fresh
//! temporary directory, or a fresh PostgreSQL database on the server named by
//! `BATCH_TEST_POSTGRES_URL` (default `postgres://postgres@127.0.0.1:5432/test`), dropped again
//! when the fixture is dropped.
#![forbid(unsafe_code)]

pub mod cluster;
pub mod fakes;
pub mod siblings;

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

/// A virtual clock: it moves when a test advances it, and when every sleeper waits. A sleep
/// lets other tasks run first; if its deadline is then the earliest of all pending sleeps, it
/// moves the clock to that deadline (like tokio's paused time, but on the `Clock` port). So
/// a ten-minute request and a heartbeat every twenty seconds interleave as they would in real
/// time, in no real time at all.
#[derive(Debug)]
pub struct ManualClock {
    state: std::sync::Mutex<ClockState>,
}

#[derive(Debug)]
struct ClockState {
    now: chrono::DateTime<chrono::Utc>,
    next_sleeper: u64,
    sleepers: std::collections::BTreeSet<(chrono::DateTime<chrono::Utc>, u64)>,
}

/// Yields a sleeper grants other tasks before it may move the clock.
const IDLE_YIELDS: usize = 32;

/// Yields after which a sleeper that is not the earliest moves the clock anyway (the earliest
/// one is stuck in a future nobody polls).
const STUCK_YIELDS: usize = 100_000;

impl ManualClock {
    /// A clock standing at `now`.
    pub fn new(now: chrono::DateTime<chrono::Utc>) -> Self {
        ManualClock {
            state: std::sync::Mutex::new(ClockState {
                now,
                next_sleeper: 0,
                sleepers: std::collections::BTreeSet::new(),
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, ClockState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: chrono::Duration) {
        self.state().now += by;
    }
}

/// Removes a sleeper from the clock when its sleep ends or is dropped.
struct Sleeper<'a> {
    clock: &'a ManualClock,
    key: (chrono::DateTime<chrono::Utc>, u64),
}

impl Drop for Sleeper<'_> {
    fn drop(&mut self) {
        self.clock.state().sleepers.remove(&self.key);
    }
}

#[async_trait::async_trait]
impl batch_ports::Clock for ManualClock {
    fn now(&self) -> chrono::DateTime<chrono::Utc> {
        self.state().now
    }

    /// Returns once the clock reaches `now + duration`, moving it there when this is the
    /// earliest pending sleep and other tasks had their turn.
    async fn sleep(&self, duration: std::time::Duration) {
        let key = {
            let mut state = self.state();
            let deadline =
                state.now + chrono::Duration::from_std(duration).unwrap_or(chrono::Duration::MAX);
            state.next_sleeper += 1;
            let key = (deadline, state.next_sleeper);
            state.sleepers.insert(key);
            key
        };
        let _sleeper = Sleeper { clock: self, key };
        let mut yields = 0;
        loop {
            tokio::task::yield_now().await;
            yields += 1;
            let mut state = self.state();
            if state.now >= key.0 {
                return;
            }
            let earliest = state.sleepers.first() == Some(&key);
            if (yields >= IDLE_YIELDS && earliest) || yields >= STUCK_YIELDS {
                state.now = key.0;
                return;
            }
        }
    }
}
