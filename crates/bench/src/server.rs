//! P4 and P6: measurements of the real `batch-server` binary on a private PostgreSQL cluster
//! against the fake Request service.
//!
//! * `memory` (P4): the server's peak resident set (`VmHWM`) after a small and after a large
//!   Individual run, each in a fresh server process, and the growth per item.
//! * `replicas` (P6): runs of several jobs, latency-bound, finished by one replica and by two
//!   replicas with the same per-replica concurrency; the ratio of their throughputs.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use batch_proto::batch::v1 as pb;
use batch_proto::batch::v1::batch_service_client::BatchServiceClient;
use batch_testkit::cluster::PrivateCluster;
use batch_testkit::siblings::{FakeRequestService, SiblingServer, Siblings};

/// The tenant, token and team every benchmark job uses.
const TENANT: &str = "bench";
const TOKEN: &str = "bench-token";

/// What `memory` runs.
#[derive(Debug, clap::Args)]
pub(crate) struct MemoryArgs {
    /// The `batch-server` binary.
    #[arg(long)]
    server: PathBuf,
    /// Items of the small run.
    #[arg(long, default_value_t = 10_000)]
    small: usize,
    /// Items of the large run.
    #[arg(long, default_value_t = 1_000_000)]
    large: usize,
}

/// What `replicas` runs.
#[derive(Debug, clap::Args)]
pub(crate) struct ReplicaArgs {
    /// The `batch-server` binary.
    #[arg(long)]
    server: PathBuf,
    /// Items in all, spread over `jobs` jobs.
    #[arg(long, default_value_t = 40_000)]
    items: usize,
    /// Jobs (one run each).
    #[arg(long, default_value_t = 8)]
    jobs: usize,
    /// The fake's latency per call, in milliseconds.
    #[arg(long, default_value_t = 20)]
    latency_ms: u64,
    /// Each job's concurrency.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
}

/// A running `batch-server`, killed on drop.
struct Replica {
    child: Child,
    url: String,
}

impl Replica {
    /// Starts `binary` on the database with the jobs file, and waits for its address.
    fn start(binary: &Path, database: &str, jobs: &Path, endpoint: &str) -> anyhow::Result<Self> {
        use std::io::{BufRead, BufReader};
        let mut child = Command::new(binary)
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--database-url",
                database,
            ])
            .arg("--jobs")
            .arg(jobs)
            .args(["--external-tables", "true", "--request-endpoint", endpoint])
            .args(["--slots", "1"])
            // Triggering a run prepares its items inside the call: a million take longer than
            // the default 30 s request timeout (see P4 in BENCHMARKS.md).
            .args(["--request-timeout-secs", "900"])
            .env("BATCH_TOKENS", format!("{TOKEN}={TENANT}"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let stdout = child.stdout.take().context("stdout")?;
        let (found, address) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if !sent && let Some(at) = line.find("batch-server listening on ") {
                    let addr = line[at + "batch-server listening on ".len()..]
                        .split_whitespace()
                        .next()
                        .unwrap_or_default()
                        .to_owned();
                    let _ = found.send(addr);
                    sent = true;
                }
            }
        });
        let addr = address
            .recv_timeout(Duration::from_secs(120))
            .context("the server never said where it listens")?;
        Ok(Replica {
            child,
            url: format!("http://{addr}"),
        })
    }

    /// Its peak resident set so far, in KiB.
    fn peak_kib(&self) -> anyhow::Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .context("no VmHWM")
    }

    /// A client with the bench token.
    async fn client(
        &self,
    ) -> anyhow::Result<
        BatchServiceClient<
            tonic::service::interceptor::InterceptedService<
                tonic::transport::Channel,
                impl tonic::service::Interceptor,
            >,
        >,
    > {
        let channel = tonic::transport::Endpoint::from_shared(self.url.clone())?
            .connect()
            .await?;
        let header: tonic::metadata::MetadataValue<_> = format!("Bearer {TOKEN}").parse()?;
        Ok(BatchServiceClient::with_interceptor(
            channel,
            move |mut request: tonic::Request<()>| {
                request
                    .metadata_mut()
                    .insert("authorization", header.clone());
                Ok(request)
            },
        ))
    }

    /// Triggers `job` and returns the run id.
    async fn trigger(&self, job: &str) -> anyhow::Result<String> {
        let run = self
            .client()
            .await?
            .trigger_job(pb::TriggerJobRequest {
                job_id: job.to_owned(),
                ..pb::TriggerJobRequest::default()
            })
            .await?
            .into_inner()
            .run
            .context("no run")?;
        Ok(run.run_id)
    }

    /// Waits until every run of `runs` has ended; fails when one did not succeed.
    async fn wait(&self, runs: &[String]) -> anyhow::Result<()> {
        let mut client = self.client().await?;
        for run in runs {
            loop {
                let current = client
                    .get_run(pb::GetRunRequest {
                        run_id: run.clone(),
                    })
                    .await?
                    .into_inner()
                    .run
                    .context("no run")?;
                match current.status.as_str() {
                    "queued" | "running" => tokio::time::sleep(Duration::from_millis(100)).await,
                    "succeeded" => break,
                    other => bail!("run {run} ended {other}"),
                }
            }
        }
        Ok(())
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A private cluster with `items` users of tenant `bench` in teams `t0…t{jobs-1}`, a jobs file
/// of one Individual job per team, and the fake Request service.
struct Setup {
    cluster: PrivateCluster,
    jobs: PathBuf,
    fake: Arc<FakeRequestService>,
    server: SiblingServer,
}

impl Setup {
    async fn new(
        items: usize,
        jobs: usize,
        concurrency: usize,
        latency: Duration,
    ) -> anyhow::Result<Setup> {
        let cluster = PrivateCluster::start()
            .map_err(|batch_testkit::Unavailable::Skip(why)| anyhow::anyhow!(why))?;
        let url = cluster.url("postgres");
        // The schema first: the server migrates, but the users must be there before.
        batch_store::Store::open(&url, true)
            .await
            .with_context(|| format!("migrating {url}"))?;
        crate::insert_users(
            &url,
            (0..items).map(|n| {
                format!(
                    "('{TENANT}', 'user{n:07}', TRUE, '{{\"team\": \"t{}\"}}')",
                    n % jobs
                )
            }),
        )
        .await?;
        let definitions: Vec<serde_json::Value> = (0..jobs)
            .map(|n| {
                serde_json::json!({
                    "id": format!("job{n}"), "tenant": TENANT, "type": "INDIVIDUAL_USERS",
                    "template": "digest",
                    "source": {"users": {"filter": {"team": format!("t{n}")}}},
                    "execution": {"concurrency": concurrency, "chunk_size": 500,
                        "timeout_ms": 30000},
                    "overlap": "allow_all",
                })
            })
            .collect();
        let dir = std::env::temp_dir().join(format!("batch-bench-jobs-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let jobs = dir.join("jobs.json");
        std::fs::write(
            &jobs,
            serde_json::to_vec_pretty(&serde_json::json!({ "jobs": definitions }))?,
        )?;
        let fake = Arc::new(FakeRequestService::default());
        fake.faults.set_latency(latency);
        let server = SiblingServer::start(
            &Siblings {
                requests: Some(fake.clone()),
                ..Siblings::default()
            },
            "127.0.0.1:0".parse()?,
        )
        .await;
        Ok(Setup {
            cluster,
            jobs,
            fake,
            server,
        })
    }

    fn start(&self, binary: &Path) -> anyhow::Result<Replica> {
        Replica::start(
            binary,
            &self.cluster.url("postgres"),
            &self.jobs,
            &self.server.url(),
        )
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        if let Some(dir) = self.jobs.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// P4: peak RSS of a fresh server after a run of `items` items, in KiB.
/// The server's peak RSS (KiB) after a run of `items` items, and how long triggering the run
/// (preparing its items) took.
async fn peak_after_run(binary: &Path, items: usize) -> anyhow::Result<(u64, Duration)> {
    let setup = Setup::new(items, 1, 64, Duration::ZERO).await?;
    let replica = setup.start(binary)?;
    let started = Instant::now();
    let run = replica.trigger("job0").await?;
    let trigger = started.elapsed();
    replica.wait(&[run]).await?;
    let calls = setup.fake.calls().len();
    if calls < items {
        bail!("only {calls} of {items} items were called");
    }
    Ok((replica.peak_kib()?, trigger))
}

/// Runs `memory` and prints its JSON line.
pub(crate) async fn memory(args: &MemoryArgs) -> anyhow::Result<()> {
    let (small, _) = peak_after_run(&args.server, args.small).await?;
    let (large, trigger) = peak_after_run(&args.server, args.large).await?;
    let growth = large.saturating_sub(small);
    let line = serde_json::json!({
        "large_trigger_s": trigger.as_secs_f64(),
        "small_items": args.small,
        "large_items": args.large,
        "small_peak_mib": small as f64 / 1024.0,
        "large_peak_mib": large as f64 / 1024.0,
        "growth_mib": growth as f64 / 1024.0,
        "bytes_per_item": (growth * 1024) as f64 / (args.large - args.small) as f64,
    });
    println!("{line}");
    Ok(())
}

/// The time `replicas` servers take to finish one run of every job.
async fn finish_all(args: &ReplicaArgs, replicas: usize) -> anyhow::Result<Duration> {
    let setup = Setup::new(
        args.items,
        args.jobs,
        args.concurrency,
        Duration::from_millis(args.latency_ms),
    )
    .await?;
    let servers: Vec<Replica> = (0..replicas)
        .map(|_| setup.start(&args.server))
        .collect::<anyhow::Result<_>>()?;
    let started = Instant::now();
    let mut runs = Vec::new();
    for n in 0..args.jobs {
        runs.push(servers[0].trigger(&format!("job{n}")).await?);
    }
    servers[0].wait(&runs).await?;
    Ok(started.elapsed())
}

/// Runs `replicas` and prints its JSON line.
pub(crate) async fn replicas(args: &ReplicaArgs) -> anyhow::Result<()> {
    let one = finish_all(args, 1).await?;
    let two = finish_all(args, 2).await?;
    let line = serde_json::json!({
        "items": args.items,
        "jobs": args.jobs,
        "latency_ms": args.latency_ms,
        "concurrency": args.concurrency,
        "one_replica_per_s": args.items as f64 / one.as_secs_f64(),
        "two_replicas_per_s": args.items as f64 / two.as_secs_f64(),
        "speedup": one.as_secs_f64() / two.as_secs_f64(),
    });
    println!("{line}");
    Ok(())
}
