//! `batch-server serve`: the service. Opens and migrates the database, loads the jobs file,
//! runs the scheduler and the processors, serves `agent.batch.v1.BatchService` with health and
//! reflection, and on SIGTERM or SIGINT stops claiming work, lets in-flight chunks finish and
//! releases their leases within the grace period, then exits 0.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use batch_app::Ports;
use batch_app::catalog::JobCatalog;
use batch_app::processor::{BatchProcessor, ProcessorSettings};
use batch_app::scheduler::BatchScheduler;
use batch_app::strategy::Strategies;
use batch_domain::config::parse_jobs_file;
use batch_ports::jobs::JobStore;
use batch_ports::runs::RunStore;
use batch_ports::{Clock, SystemClock};
use batch_proto::batch::v1::batch_service_server::BatchServiceServer;
use tokio_stream::wrappers::TcpListenerStream;

use crate::api::Api;
use crate::auth::Tokens;
use crate::jobs;
use crate::wiring::{self, SiblingArgs};

/// What `serve` needs to know.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct ServeArgs {
    /// The settings file (default `config/server.toml` when it exists); flags and environment
    /// variables win over it.
    #[arg(long, env = "BATCH_CONFIG")]
    pub(crate) config: Option<PathBuf>,
    /// The address to listen on (port 0 for any free port; the address is printed).
    #[arg(long, env = "BATCH_LISTEN_ADDR", default_value = "127.0.0.1:50051")]
    pub(crate) listen: SocketAddr,
    /// The jobs file.
    #[arg(long, env = "BATCH_JOBS_FILE", default_value = "config/jobs.json")]
    pub(crate) jobs: PathBuf,
    /// The database (created and migrated if needed).
    #[arg(
        long,
        env = "BATCH_DATABASE_URL",
        default_value = "sqlite://data/batch.db?mode=rwc",
        hide_env_values = true
    )]
    pub(crate) database_url: String,
    /// The directory of execution templates (when no template endpoint is given).
    #[arg(long, env = "BATCH_TEMPLATES_DIR", default_value = "config/templates")]
    pub(crate) templates: PathBuf,
    /// Sample data loaded into an empty embedded database.
    #[arg(
        long,
        env = "BATCH_SAMPLE_DATA_DIR",
        default_value = "config/sample-data"
    )]
    pub(crate) sample_data: PathBuf,
    /// Create and use the stand-in tables of users, categories and preferences (default:
    /// yes for SQLite, no for PostgreSQL).
    #[arg(long, env = "BATCH_EXTERNAL_TABLES")]
    pub(crate) external_tables: Option<bool>,
    /// Where the sibling services are.
    #[command(flatten)]
    pub(crate) siblings: SiblingArgs,
    /// Bearer tokens: `token=tenant,…` (`token=*` for an operator). Without any, every caller
    /// is an operator and the server listens on loopback only.
    #[arg(long, env = "BATCH_TOKENS", hide_env_values = true)]
    pub(crate) tokens: Option<String>,
    /// The server's certificate chain (PEM): with `--tls-key`, the API is served over TLS.
    #[arg(long, env = "BATCH_TLS_CERT", requires = "tls_key")]
    pub(crate) tls_cert: Option<PathBuf>,
    /// The server's private key (PEM).
    #[arg(long, env = "BATCH_TLS_KEY", requires = "tls_cert")]
    pub(crate) tls_key: Option<PathBuf>,
    /// A CA (PEM) whose client certificates are required (mutual TLS); callers are then known
    /// by a bearer token or by `cert-sha256:<hash>=tenant` entries of the token table.
    #[arg(long, env = "BATCH_TLS_CLIENT_CA", requires = "tls_cert")]
    pub(crate) tls_client_ca: Option<PathBuf>,
    /// Runs executed at once by this process.
    #[arg(long, env = "BATCH_RUN_SLOTS", default_value_t = 4)]
    pub(crate) slots: usize,
    /// How long a run's lease lasts without renewal (renewed every third of it while the run
    /// works): how soon another replica resumes the runs of a process that died.
    #[arg(long, env = "BATCH_RUN_LEASE_SECS", default_value_t = 60)]
    pub(crate) run_lease_secs: u64,
    /// Runs running at once across every replica; unlimited when absent.
    #[arg(long, env = "BATCH_MAX_RUNNING_RUNS")]
    pub(crate) max_running_runs: Option<usize>,
    /// How long a shutdown waits for in-flight chunks before leaving.
    #[arg(long, env = "BATCH_SHUTDOWN_GRACE_SECS", default_value_t = 30)]
    pub(crate) shutdown_grace_secs: u64,
    /// How long one call may take before it fails with DEADLINE_EXCEEDED (a WatchRun stream
    /// only has to start within it), in seconds.
    #[arg(long, env = "BATCH_REQUEST_TIMEOUT_SECS", default_value_t = 30)]
    pub(crate) request_timeout_secs: u64,
    /// An OpenTelemetry collector (`http://host:4317`): spans and metrics go there over OTLP.
    #[arg(long, env = "BATCH_OTLP_ENDPOINT")]
    pub(crate) otlp_endpoint: Option<String>,
    /// The most WatchRun streams one tenant may hold open at once.
    #[arg(long, env = "BATCH_MAX_WATCHES_PER_TENANT", default_value_t = 64)]
    pub(crate) max_watches_per_tenant: usize,
    /// Serve gRPC server reflection.
    #[arg(long, env = "BATCH_REFLECTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub(crate) reflection: bool,
    /// The longest wait between two scheduler ticks (also the most a preference change or a
    /// pause waits to apply), in milliseconds.
    #[arg(long, env = "BATCH_TICK_MS", default_value_t = 1_000)]
    pub(crate) tick_ms: u64,
}

/// Wakes the processor's idle slots whenever a process on the same PostgreSQL database (this
/// one or another replica) queues a run, so it starts at once rather than at the slots' next
/// look, a tick later. On SQLite there is no one else to hear: the processor wakes its own
/// slots. A lost connection is opened again a tick later; meanwhile the slots look every tick.
async fn wake_on_queued_runs(
    store: Arc<batch_store::Store>,
    processor: Arc<BatchProcessor>,
    tick: Duration,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) {
    while !*stopped.borrow() {
        let listening = tokio::select! {
            listening = store.listen_for_queued_runs() => listening,
            _ = stopped.changed() => return,
        };
        match listening {
            Ok(None) => return,
            Ok(Some(mut queued)) => loop {
                tokio::select! {
                    next = queued.next() => match next {
                        Ok(_) => processor.wake_idle_slots(),
                        Err(e) => {
                            tracing::debug!(error = %e, "listening for queued runs stopped");
                            break;
                        }
                    },
                    _ = stopped.changed() => return,
                }
            },
            Err(e) => tracing::debug!(error = %e, "listening for queued runs failed"),
        }
        tokio::select! {
            () = tokio::time::sleep(tick) => {}
            _ = stopped.changed() => {}
        }
    }
}

/// Waits for SIGTERM or SIGINT.
async fn termination() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops the server");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Runs the service until a termination signal.
pub(crate) async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let tokens = Tokens::parse(args.tokens.as_deref().unwrap_or_default())
        .map_err(|e| anyhow::anyhow!("BATCH_TOKENS: {e}"))?;
    if tokens.is_empty() {
        if !args.listen.ip().is_loopback() {
            bail!(
                "refusing to listen on {} without tokens: set BATCH_TOKENS (token=tenant,…) or listen on a loopback address",
                args.listen
            );
        }
        tracing::warn!(
            "no tokens configured: every caller is an operator; listening on loopback only"
        );
    }
    let text = std::fs::read_to_string(&args.jobs)
        .with_context(|| format!("reading jobs file {}", args.jobs.display()))?;
    let file =
        parse_jobs_file(&text).map_err(|p| anyhow::anyhow!("{}: {p}", args.jobs.display()))?;
    let store =
        wiring::open_store(&args.database_url, args.external_tables, &args.sample_data).await?;
    // One process per SQLite file: a second server refuses to start, saying why.
    store
        .claim_exclusive()
        .context("taking the database for this server")?;
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let templates = wiring::templates(&args.siblings, &args.templates, clock.clone())?;
    let ports = Ports {
        runs: store.clone(),
        contexts: store.clone(),
        users: store.clone(),
        categories: store.clone(),
        preferences: wiring::preferences(&args.siblings, store.clone(), clock.clone())?,
        executor: wiring::executor(&args.siblings, templates.clone(), clock.clone())?,
        templates,
        clock: clock.clone(),
    };
    let processor = Arc::new(BatchProcessor::new(
        ports,
        Strategies::default(),
        ProcessorSettings {
            max_running_runs: args.max_running_runs,
            run_lease: Duration::from_secs(args.run_lease_secs.max(1)),
            ..ProcessorSettings::default()
        },
    ));
    // The file's jobs go into the job table; the catalog holds what the table holds.
    let (definitions, defaults) = jobs::file_definitions(&text, &file)?;
    store
        .sync_file_jobs(&definitions)
        .await
        .context("writing the jobs file into the job table")?;
    let defaults = Arc::new(defaults);
    let catalog = Arc::new(JobCatalog::default());
    jobs::reload(store.as_ref(), &catalog, &defaults)
        .await
        .context("loading the job table")?;
    let scheduler = Arc::new(BatchScheduler::with_catalog(
        processor.clone(),
        store.clone(),
        catalog.clone(),
    ));

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<BatchServiceServer<Api>>().await;
    let reflection = if args.reflection {
        Some(
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(batch_proto::FILE_DESCRIPTOR_SET)
                .build_v1()
                .context("building the reflection service")?,
        )
    } else {
        None
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let addr = listener
        .local_addr()
        .context("reading the listening address")?;
    // Tests and scripts read the address from this line.
    println!("batch-server listening on {addr}");
    tracing::info!(%addr, jobs = catalog.jobs().len(), "serving");

    let (stop, stopped) = tokio::sync::watch::channel(false);
    let tick = Duration::from_millis(args.tick_ms.max(10));
    let scheduling = {
        let scheduler = scheduler.clone();
        let stopped = stopped.clone();
        tokio::spawn(async move { scheduler.run_until_stopped(tick, stopped).await })
    };
    let following = tokio::spawn(jobs::follow(
        store.clone(),
        catalog.clone(),
        defaults.clone(),
        clock.clone(),
        tick,
        stopped.clone(),
    ));
    let working = tokio::spawn(processor.clone().work_until_stopped(
        catalog.clone(),
        args.slots,
        tick,
        stopped.clone(),
    ));
    let hearing = tokio::spawn(wake_on_queued_runs(
        store.clone(),
        processor.clone(),
        tick,
        stopped.clone(),
    ));
    let watching_health = {
        let store = store.clone();
        let health = health.clone();
        let mut stopped = stopped.clone();
        let clock = clock.clone();
        tokio::spawn(async move {
            let mut serving = true;
            while !*stopped.borrow() {
                let up = store.ping().await.is_ok();
                if up && let Ok(queued) = store.queued_runs().await {
                    tracing::debug!(target: "batch::metrics", metric = "queue", queued);
                }
                if up != serving {
                    serving = up;
                    if up {
                        tracing::info!("database reachable again: serving");
                        health.set_serving::<BatchServiceServer<Api>>().await;
                    } else {
                        tracing::warn!("database unreachable: not serving");
                        health.set_not_serving::<BatchServiceServer<Api>>().await;
                    }
                }
                tokio::select! {
                    () = clock.sleep(Duration::from_millis(500)) => {}
                    _ = stopped.changed() => {}
                }
            }
        })
    };

    let api = Api {
        jobs: catalog,
        defaults,
        scheduler,
        processor,
        store,
        clock,
        watches: Arc::default(),
        max_watches: args.max_watches_per_tenant,
        stopped: stopped.clone(),
    };
    let service = tonic::service::interceptor::InterceptedService::new(
        BatchServiceServer::new(api)
            .max_decoding_message_size(4 * 1024 * 1024)
            .max_encoding_message_size(16 * 1024 * 1024),
        move |request| tokens.check(request),
    );
    let shutdown = {
        let stop = stop.clone();
        async move {
            termination().await;
            tracing::info!("termination signal: stopping");
            stop.send_replace(true);
        }
    };
    if args.tls_cert.is_some() != args.tls_key.is_some()
        || (args.tls_client_ca.is_some() && args.tls_cert.is_none())
    {
        bail!("TLS needs both tls_cert and tls_key (and tls_client_ca needs them too)");
    }
    let mut builder = tonic::transport::Server::builder();
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        let read = |path: &PathBuf| {
            std::fs::read(path).with_context(|| format!("reading {}", path.display()))
        };
        let mut tls = tonic::transport::ServerTlsConfig::new().identity(
            tonic::transport::Identity::from_pem(read(cert)?, read(key)?),
        );
        if let Some(ca) = &args.tls_client_ca {
            tls = tls.client_ca_root(tonic::transport::Certificate::from_pem(read(ca)?));
        }
        builder = builder
            .tls_config(tls)
            .context("configuring TLS from --tls-cert and --tls-key")?;
    }
    builder
        .trace_fn(|request| tracing::info_span!("rpc", path = %request.uri().path()))
        .timeout(Duration::from_secs(args.request_timeout_secs.max(1)))
        .concurrency_limit_per_connection(256)
        .max_concurrent_streams(Some(128))
        .add_service(health_service)
        .add_optional_service(reflection)
        .add_service(service)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await
        .context("serving gRPC")?;
    stop.send_replace(true);
    let grace = Duration::from_secs(args.shutdown_grace_secs);
    let finished = tokio::time::timeout(grace, async {
        let _ = scheduling.await;
        let _ = following.await;
        let _ = working.await;
        let _ = hearing.await;
        let _ = watching_health.await;
    })
    .await;
    if finished.is_err() {
        tracing::warn!(
            ?grace,
            "in-flight work did not finish within the grace period; its leases expire and another process resumes it"
        );
    }
    tracing::info!("stopped");
    Ok(())
}
