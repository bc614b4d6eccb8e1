//! `batch-bench`: the measurements of `cargo xtask bench`, each printed as one JSON line on
//! stdout for xtask to collect. Every figure is a ratio or a count taken within one process
//! run, so a noisy machine moves both sides of a comparison together.
//!
//! * `throughput` (P1, P2, P3): an Individual run of N users through the real processor with
//!   persistence (SQLite file or a private PostgreSQL cluster with `pg_stat_statements`)
//!   against the fake Request service (real tonic), compared with a bare tonic client loop
//!   that keeps the same number of calls in flight against the same fake, run before the
//!   processor and again after it; on PostgreSQL also the database statements per item.
//! * `memory` (P4) and `replicas` (P6): the real `batch-server` binary (see [`server`]).
//! * `scheduler` (P5): the scheduler's idle tick, grouping and burst costs (see [`scheduler`]).
#![forbid(unsafe_code)]

/// The allocator the server uses too (see `batch-server`), so the processor measured here
/// allocates as it does there.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use batch_app::Ports;
use batch_app::processor::{BatchProcessor, ProcessorSettings};
use batch_app::strategy::{Scope, Strategies};
use batch_clients::breaker::BreakerSettings;
use batch_clients::grpc::{ChannelSettings, GrpcExecutor};
use batch_clients::local::FileTemplates;
use batch_domain::config::parse_job;
use batch_domain::run::{RunStatus, Trigger};
use batch_domain::{TemplateId, TenantId};
use batch_ports::{Clock, ExecuteError, Request, RequestExecutor, SystemClock, TemplateSource};
use batch_proto::request::v1 as request;
use batch_proto::request::v1::request_service_client::RequestServiceClient;
use batch_store::Store;
use batch_testkit::cluster::PrivateCluster;
use batch_testkit::siblings::{FakeRequestService, SiblingServer, Siblings};
use clap::Parser;
use sea_orm::{ConnectionTrait, Database};

mod cpu;
mod scheduler;
mod server;

/// The command line.
#[derive(Debug, Parser)]
#[command(
    name = "batch-bench",
    about = "agent-batch benchmarks (run by cargo xtask bench)"
)]
enum Command {
    /// P1/P2/P3: the processor's throughput against a bare client loop.
    Throughput(ThroughputArgs),
    /// P4: the server's peak memory for a large run against a small one.
    Memory(server::MemoryArgs),
    /// P6: two server replicas against one.
    Replicas(server::ReplicaArgs),
    /// P5: the scheduler's idle tick, grouping and burst at scale.
    Scheduler(scheduler::SchedulerArgs),
}

/// What `throughput` runs.
#[derive(Debug, Clone, clap::Args)]
struct ThroughputArgs {
    /// `sqlite` or `postgres`.
    #[arg(long)]
    backend: String,
    /// Items (users) in the run.
    #[arg(long, default_value_t = 100_000)]
    items: usize,
    /// The fake Request service's latency per call, in milliseconds.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Calls in flight: the job's concurrency and the bare loop's.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Items per chunk.
    #[arg(long, default_value_t = 500)]
    chunk_size: usize,
    /// The templates directory.
    #[arg(long, default_value = "config/templates")]
    templates: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    match Command::parse() {
        Command::Throughput(args) => runtime.block_on(throughput(&args)),
        Command::Memory(args) => runtime.block_on(server::memory(&args)),
        Command::Replicas(args) => runtime.block_on(server::replicas(&args)),
        Command::Scheduler(args) => runtime.block_on(scheduler::scheduler(&args)),
    }
}

/// A database for the run: a SQLite file in a temporary directory or a private PostgreSQL
/// cluster (kept alive by the returned guard).
enum Backing {
    Sqlite(PathBuf),
    Postgres(PrivateCluster),
}

impl Backing {
    fn open(backend: &str) -> anyhow::Result<Backing> {
        Ok(match backend {
            "sqlite" => {
                let dir = std::env::temp_dir().join(format!("batch-bench-{}", std::process::id()));
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
                Backing::Sqlite(dir)
            }
            "postgres" => Backing::Postgres(
                PrivateCluster::start_with(
                    "-c shared_preload_libraries=pg_stat_statements \
                     -c pg_stat_statements.track_planning=on",
                )
                .map_err(|batch_testkit::Unavailable::Skip(why)| anyhow::anyhow!(why))?,
            ),
            other => bail!("unknown backend {other:?} (sqlite or postgres)"),
        })
    }

    fn url(&self) -> String {
        match self {
            Backing::Sqlite(dir) => format!("sqlite://{}/bench.db?mode=rwc", dir.display()),
            Backing::Postgres(cluster) => cluster.url("postgres"),
        }
    }
}

impl Drop for Backing {
    fn drop(&mut self) {
        if let Backing::Sqlite(dir) = self {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// The run id the bare loop's idempotency keys begin with, as the processor's begin with its
/// run's: a UUID no run is given (the processor's are version 7).
const BARE_RUN: &str = "00000000-0000-0000-0000-000000000000";

/// The calls a side made and the time they took at the client, from the call's start to its
/// answer: against the time the same calls spent at the fake, what the gRPC path added.
#[derive(Debug, Default)]
struct CallTimes {
    calls: AtomicU64,
    nanos: AtomicU64,
}

impl CallTimes {
    /// Counts one call that started at `started` and has just answered.
    fn add(&self, started: Instant) {
        let nanos = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// The mean call, in milliseconds.
    fn mean_ms(&self) -> f64 {
        let calls = self.calls.load(Ordering::Relaxed).max(1);
        self.nanos.load(Ordering::Relaxed) as f64 / calls as f64 / 1e6
    }
}

/// The processor's executor, timing each call at the client as the bare loop times its own.
struct Timed {
    inner: GrpcExecutor,
    times: Arc<CallTimes>,
}

#[async_trait::async_trait]
impl RequestExecutor for Timed {
    async fn execute(&self, request: Request) -> Result<serde_json::Value, ExecuteError> {
        let started = Instant::now();
        let answer = self.inner.execute(request).await;
        self.times.add(started);
        answer
    }
}

/// Runs `throughput` and prints its JSON line.
async fn throughput(args: &ThroughputArgs) -> anyhow::Result<()> {
    let fake = Arc::new(FakeRequestService::default());
    fake.faults
        .set_latency(Duration::from_millis(args.latency_ms));
    let server = SiblingServer::start(
        &Siblings {
            requests: Some(fake.clone()),
            ..Siblings::default()
        },
        "127.0.0.1:0".parse().context("address")?,
    )
    .await;
    let templates = Arc::new(
        FileTemplates::load(&args.templates)
            .with_context(|| format!("templates in {}", args.templates.display()))?,
    );
    let parameters = templates
        .template(
            &TenantId::parse("bench")?,
            &TemplateId::parse("digest")?,
            None,
        )
        .await
        .context("the bench job's template")?
        .parameter_defaults;
    let (bare_times, processor_times) = (
        Arc::new(CallTimes::default()),
        Arc::new(CallTimes::default()),
    );
    // The bare loop runs before the processor and again after it, and its rate is taken over
    // both: a machine whose speed drifts during the run then moves both sides alike.
    let bare_pass = || async {
        let cpu_before = cpu::this_process();
        let took = bare_loop(
            &server.url(),
            args.items,
            args.concurrency,
            &parameters,
            &bare_times,
        )
        .await?;
        anyhow::Ok((took, cpu::this_process() - cpu_before))
    };
    let (bare_before, bare_cpu_before) = bare_pass().await?;
    let backing = Backing::open(&args.backend)?;
    let url = backing.url();
    let store = Arc::new(
        Store::open(&url, true)
            .await
            .with_context(|| format!("opening {url}"))?,
    );
    add_users(&url, args.items).await?;
    if matches!(backing, Backing::Postgres(_)) {
        statements(&url, true).await?;
    }
    let database_cpu = || match &backing {
        Backing::Postgres(cluster) => cluster
            .postmaster_pid()
            .map_or(Duration::ZERO, cpu::process_tree),
        Backing::Sqlite(_) => Duration::ZERO,
    };
    let (own_before, database_before) = (cpu::this_process(), database_cpu());
    let timing = tokio::spawn(processor_run(
        args.clone(),
        server.url(),
        store,
        templates,
        processor_times.clone(),
    ))
    .await??;
    let own_cpu = cpu::this_process() - own_before;
    let db_cpu = database_cpu().saturating_sub(database_before);
    let (bare_after, bare_cpu_after) = bare_pass().await?;
    let (bare, bare_cpu) = (bare_before + bare_after, bare_cpu_before + bare_cpu_after);
    let bare_calls = 2 * args.items;
    let processed = timing.prepare + timing.execute;
    let per_item_us = |d: Duration| d.as_secs_f64() * 1e6 / args.items as f64;
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let (per_item, top) = match backing {
        Backing::Postgres(_) => (
            Some(statements(&url, false).await? as f64 / args.items as f64),
            top_statements(&url).await?,
        ),
        Backing::Sqlite(_) => (None, Vec::new()),
    };
    let ceiling =
        (args.latency_ms > 0).then(|| args.concurrency as f64 / (args.latency_ms as f64 / 1_000.0));
    // How full each side kept the fake: the time its calls spent in the fake, summed, over the
    // time the side ran (the mean number of calls in flight), and the mean call there.
    let ledger = fake.ledger();
    let in_fake = |bare_side: bool| {
        let (count, total) = ledger
            .iter()
            .filter(|e| (e.run == BARE_RUN) == bare_side)
            .filter_map(|e| e.ended?.duration_since(e.started).ok())
            .fold((0u32, Duration::ZERO), |(n, t), d| (n + 1, t + d));
        (total, total.checked_div(count).unwrap_or_default())
    };
    let (bare_in_fake, bare_call) = in_fake(true);
    let (processor_in_fake, processor_call) = in_fake(false);
    let line = serde_json::json!({
        "backend": args.backend,
        "items": args.items,
        "latency_ms": args.latency_ms,
        "concurrency": args.concurrency,
        "chunk_size": args.chunk_size,
        "processor_per_s": args.items as f64 / processed.as_secs_f64(),
        "bare_per_s": bare_calls as f64 / bare.as_secs_f64(),
        "bare_before_per_s": args.items as f64 / bare_before.as_secs_f64(),
        "bare_after_per_s": args.items as f64 / bare_after.as_secs_f64(),
        "littles_law_per_s": ceiling,
        "statements_per_item": per_item,
        "prepare_s": timing.prepare.as_secs_f64(),
        "execute_s": timing.execute.as_secs_f64(),
        "cores": cores,
        "bare_cpu_us_per_item": per_item_us(bare_cpu) / 2.0,
        "bare_cpu_busy": bare_cpu.as_secs_f64() / (bare.as_secs_f64() * cores as f64),
        "processor_cpu_us_per_item": per_item_us(own_cpu),
        "database_cpu_us_per_item": per_item_us(db_cpu),
        "processor_cpu_busy": (own_cpu + db_cpu).as_secs_f64()
            / (processed.as_secs_f64() * cores as f64),
        // The most the processor could make if it kept every core busy with the CPU it spent
        // per item (in this process and in PostgreSQL, which share the cores): an upper bound
        // that no scheduling can pass, whatever the round trip.
        "processor_cpu_ceiling_per_s": args.items as f64 * cores as f64
            / (own_cpu + db_cpu).as_secs_f64(),
        "bare_mean_in_flight": bare_in_fake.as_secs_f64() / bare.as_secs_f64(),
        "processor_mean_in_flight": processor_in_fake.as_secs_f64() / timing.execute.as_secs_f64(),
        "bare_mean_call_ms": bare_call.as_secs_f64() * 1e3,
        "processor_mean_call_ms": processor_call.as_secs_f64() * 1e3,
        "bare_client_call_ms": bare_times.mean_ms(),
        "processor_client_call_ms": processor_times.mean_ms(),
        "top_statements": top,
    });
    println!("{line}");
    server.stop().await;
    Ok(())
}

/// `items` calls to the fake with `concurrency` in flight, as `buffer_unordered` would keep
/// them: the physical limit of this machine's gRPC path. Returns how long they took. Each call
/// carries what the processor's call for the same user carries (an idempotency key of the
/// same form, the user's payload, the template's default `parameters`), so both sides pay the
/// same for encoding, decoding and the fake's answer; only what the processor adds around the
/// call is left to compare. (Until session 9 the bare calls were empty.)
async fn bare_loop(
    url: &str,
    items: usize,
    concurrency: usize,
    parameters: &serde_json::Map<String, serde_json::Value>,
    times: &Arc<CallTimes>,
) -> anyhow::Result<Duration> {
    let client = RequestServiceClient::new(
        tonic::transport::Endpoint::from_shared(url.to_owned())?
            .connect()
            .await
            .context("connecting the bare client")?,
    );
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    let parameters = Arc::new(batch_proto::json::to_struct(parameters));
    for _ in 0..concurrency {
        let client = client.clone();
        let next = next.clone();
        let parameters = parameters.clone();
        let times = times.clone();
        workers.spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= items {
                    return Ok::<(), tonic::Status>(());
                }
                let user = format!("user{n:07}");
                let started = Instant::now();
                let key = format!("{BARE_RUN}:{user}");
                client
                    .clone()
                    .execute(request::ExecuteRequest {
                        request_id: key.clone(),
                        tenant_id: "bench".to_owned(),
                        payload: Some(batch_proto::json::value_to_struct(
                            &serde_json::json!({ "user_id": user }),
                        )),
                        parameters: Some((*parameters).clone()),
                        user_id: user,
                        template_id: "digest".to_owned(),
                        idempotency_key: key,
                        ..request::ExecuteRequest::default()
                    })
                    .await?;
                times.add(started);
            }
        });
    }
    while let Some(done) = workers.join_next().await {
        done.context("a bare worker panicked")?
            .context("a bare call failed")?;
    }
    Ok(started.elapsed())
}

/// Adds `items` active users of tenant `bench` in team `load`.
async fn add_users(url: &str, items: usize) -> anyhow::Result<()> {
    insert_users(
        url,
        (0..items).map(|n| format!("('bench', 'user{n:07}', TRUE, '{{\"team\": \"load\"}}')")),
    )
    .await
}

/// Inserts users into `system_users`, a thousand rows per statement; each of `rows` is one
/// `(tenant, user_id, active, attributes)` tuple of SQL values.
pub(crate) async fn insert_users(
    url: &str,
    rows: impl IntoIterator<Item = String>,
) -> anyhow::Result<()> {
    let conn = Database::connect(url).await.context("connecting")?;
    let mut rows = rows.into_iter().peekable();
    while rows.peek().is_some() {
        let page: Vec<String> = rows.by_ref().take(1_000).collect();
        conn.execute_unprepared(&format!(
            "INSERT INTO system_users (tenant, user_id, active, attributes) VALUES {}",
            page.join(", ")
        ))
        .await
        .context("adding users")?;
    }
    // A users table that has served for a while has planner statistics; without them
    // PostgreSQL reads each page of users by sorting every matching user after its start
    // (21 ms instead of 0.4 ms per page of 1 000 at 100 000 users, measured with EXPLAIN).
    if conn.get_database_backend() == sea_orm::DbBackend::Postgres {
        conn.execute_unprepared("ANALYZE system_users")
            .await
            .context("analyzing the users")?;
    }
    conn.close().await.context("closing")?;
    Ok(())
}

/// Resets (`reset`) or reads the statements PostgreSQL executed for the database, less the
/// reading itself.
async fn statements(url: &str, reset: bool) -> anyhow::Result<u64> {
    let conn = Database::connect(url).await.context("connecting")?;
    if reset {
        conn.execute_unprepared("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            .await
            .context("pg_stat_statements")?;
        conn.execute_unprepared("SELECT pg_stat_statements_reset()")
            .await?;
        conn.close().await?;
        return Ok(0);
    }
    let row = conn
        .query_one_raw(sea_orm::Statement::from_string(
            conn.get_database_backend(),
            "SELECT COALESCE(SUM(calls), 0)::BIGINT AS calls FROM pg_stat_statements \
             WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) \
             AND query NOT LIKE '%pg_stat_statements%'",
        ))
        .await?
        .context("no answer")?;
    let calls: i64 = row.try_get("", "calls")?;
    conn.close().await?;
    Ok(u64::try_from(calls).unwrap_or(0))
}

/// How long a processor run took: preparing its items (reading the users, creating the run),
/// then executing them.
struct Timing {
    prepare: Duration,
    execute: Duration,
}

/// The statements that cost PostgreSQL the most time in the run, most first: where its CPU
/// per item goes.
async fn top_statements(url: &str) -> anyhow::Result<Vec<serde_json::Value>> {
    let conn = Database::connect(url).await.context("connecting")?;
    let rows = conn
        .query_all_raw(sea_orm::Statement::from_string(
            conn.get_database_backend(),
            "SELECT LEFT(regexp_replace(query, '\\s+', ' ', 'g'), 90) AS query, calls::BIGINT AS calls, \
             rows::BIGINT AS rows, total_exec_time::FLOAT8 AS total_ms, \
             total_plan_time::FLOAT8 AS plan_ms FROM pg_stat_statements \
             WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) \
             AND query NOT LIKE '%pg_stat_statements%' ORDER BY total_exec_time DESC LIMIT 6",
        ))
        .await?;
    conn.close().await?;
    rows.iter()
        .map(|row| {
            Ok(serde_json::json!({
                "query": row.try_get::<String>("", "query")?,
                "calls": row.try_get::<i64>("", "calls")?,
                "rows": row.try_get::<i64>("", "rows")?,
                "total_ms": row.try_get::<f64>("", "total_ms")?,
                "plan_ms": row.try_get::<f64>("", "plan_ms")?,
            }))
        })
        .collect()
}

/// Prepares and executes one run of the bench job; returns how long each took.
async fn processor_run(
    args: ThroughputArgs,
    endpoint: String,
    store: Arc<Store>,
    templates: Arc<FileTemplates>,
    times: Arc<CallTimes>,
) -> anyhow::Result<Timing> {
    let job = parse_job(serde_json::json!({
        "id": "bench", "tenant": "bench", "type": "INDIVIDUAL_USERS", "template": "digest",
        "source": {"users": {"filter": {"team": "load"}}},
        "execution": {"concurrency": args.concurrency, "chunk_size": args.chunk_size,
            "timeout_ms": 30000},
    }))
    .map_err(|p| anyhow::anyhow!("the bench job: {p}"))?;
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let executor = Arc::new(Timed {
        inner: GrpcExecutor::new(
            &ChannelSettings::new(endpoint),
            BreakerSettings::default(),
            clock.clone(),
        )?,
        times,
    });
    let ports = Ports {
        runs: store.clone(),
        contexts: store.clone(),
        users: store.clone(),
        categories: store.clone(),
        preferences: store,
        templates,
        executor,
        clock,
    };
    let processor = BatchProcessor::new(ports, Strategies::default(), ProcessorSettings::default());
    let started = Instant::now();
    let run = processor
        .start(&job, Trigger::Manual, None, &Scope::default(), None)
        .await?;
    let prepared = started.elapsed();
    let mut execution = processor
        .open(&job, &run.id)
        .await?
        .context("the run was taken")?;
    let status = execution.run_to_completion().await?;
    let took = started.elapsed();
    if status != RunStatus::Succeeded {
        bail!("the bench run ended {status}");
    }
    Ok(Timing {
        prepare: prepared,
        execute: took - prepared,
    })
}
