//! F3 and F5: a flaky, then dead, then slow and unreachable Request service.
//!
//! * F3: UNAVAILABLE on 30 % of calls, then on every call for 10 s: every item succeeds, calls
//!   per item stay close to 1/(1-p), the breaker opens during the burst and the call rate never
//!   exceeds the job's limit.
//! * F5: every call stalls 2 s, then the service refuses connections (`FAULTS_F5_SECS`, default
//!   20 s; the figure is 60 s): calls in flight never exceed the job's concurrency, the
//!   server's memory stays flat, leases keep being renewed (nothing is redone), and the run
//!   completes once the service is back, without a restart.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use batch_e2e::Server;
use batch_testkit::Backend;
use batch_testkit::siblings::{FakeRequestService, SiblingServer, Siblings};
use tonic::Code;

use super::{
    check, database, env_number, failed_items, finish, one_at_a_time, request_service, tokens,
    trigger,
};

/// A jobs file with the one job `load` of tenant `fault` over `items` users, with these
/// execution limits and attempts.
fn jobs_file(name: &str, execution: &serde_json::Value, attempts: u32) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("batch-faults-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let jobs = serde_json::json!({"jobs": [{
        "id": "load", "tenant": "fault", "type": "INDIVIDUAL_USERS", "template": "digest",
        "source": {"users": {"filter": {"team": "load"}}},
        "execution": execution,
        "retry": {"max_attempts": attempts, "initial_backoff_ms": 10, "max_backoff_ms": 200},
        "overlap": "allow_all",
    }]});
    let path = dir.join("jobs.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&jobs).unwrap()).unwrap();
    path
}

/// Polls `done` every 10 ms until it holds, failing after `limit`.
async fn until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Successful calls so far.
fn successes(requests: &FakeRequestService) -> usize {
    requests
        .ledger()
        .iter()
        .filter(|c| c.ended.is_some() && c.code.is_none())
        .count()
}

/// The most calls that started within any one second.
fn peak_calls_per_second(starts: &mut [SystemTime]) -> usize {
    starts.sort_unstable();
    let mut peak = 0;
    let mut first = 0;
    for last in 0..starts.len() {
        while starts[last]
            .duration_since(starts[first])
            .unwrap_or_default()
            >= Duration::from_secs(1)
        {
            first += 1;
        }
        peak = peak.max(last - first + 1);
    }
    peak
}

/// The resident set size of process `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// F3: 30 % UNAVAILABLE, then 100 % for 10 s, then 30 % again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f3_a_flaky_then_dead_downstream_is_retried_within_limits() {
    let _serial = one_at_a_time().await;
    const ITEMS: usize = 2_000;
    const CONCURRENCY: usize = 16;
    const RATE: usize = 100;
    const BURST: Duration = Duration::from_secs(10);
    const COOL_DOWN: Duration = Duration::from_secs(2);
    let Some(db) = database(Backend::Postgres, ITEMS).await else {
        return;
    };
    let (requests, fake) = request_service(Duration::from_millis(5)).await;
    requests.faults.fail(30, Code::Unavailable);
    let jobs = jobs_file(
        "f3",
        &serde_json::json!({"concurrency": CONCURRENCY, "chunk_size": 100,
            "timeout_ms": 10000, "rate_limit_per_sec": RATE}),
        // 30 % failures: 0.3^12 ≈ 5e-7 per item of failing every attempt.
        12,
    );
    let endpoint = fake.url();
    let tokens = tokens();
    let cool_down = COOL_DOWN.as_millis().to_string();
    let server = Server::start(
        &db.url,
        Some(&jobs),
        &[
            "--external-tables",
            "true",
            "--request-endpoint",
            endpoint.as_str(),
            "--breaker-cool-down-ms",
            cool_down.as_str(),
            "--tokens",
            tokens.as_str(),
        ],
    );
    let run = trigger(&server).await;
    until("a third of the items", Duration::from_secs(120), || {
        successes(&requests) >= ITEMS / 3
    })
    .await;
    requests.faults.fail(100, Code::Unavailable);
    let burst_start = SystemTime::now();
    tokio::time::sleep(BURST).await;
    requests.faults.fail(30, Code::Unavailable);
    let burst_end = SystemTime::now();
    let back = Instant::now();
    let before = successes(&requests);
    until("a success after the burst", Duration::from_secs(60), || {
        successes(&requests) > before
    })
    .await;
    let recovery = back.elapsed();
    let last = finish(&server, &run).await;
    assert_eq!(last.status, "succeeded", "{last:?}");
    assert_eq!(last.progress.unwrap().succeeded, ITEMS as u64);
    let ledger = requests.ledger();
    let in_burst = |at: SystemTime| at >= burst_start && at < burst_end;
    let burst_calls = ledger.iter().filter(|c| in_burst(c.started)).count();
    let (outside, outside_ok) = ledger
        .iter()
        .filter(|c| !in_burst(c.started))
        .fold((0, 0), |(all, ok), c| {
            (all + 1, ok + usize::from(c.code.is_none()))
        });
    let calls_per_item = outside as f64 / outside_ok as f64;
    let mut starts: Vec<SystemTime> = ledger.iter().map(|c| c.started).collect();
    let peak = peak_calls_per_second(&mut starts);
    eprintln!(
        "F3 calls={} per item outside the burst={calls_per_item:.3} (1/(1-p)={:.3}) \
         burst calls={burst_calls} peak calls/s={peak} (limit {RATE}) recovery={:.1}s",
        ledger.len(),
        1.0 / 0.7,
        recovery.as_secs_f64()
    );
    assert!(
        (calls_per_item - 1.0 / 0.7).abs() < 0.1,
        "calls per item {calls_per_item:.3}, expected about 1.429"
    );
    assert!(
        server.log().contains("circuit opened"),
        "the breaker never opened"
    );
    // Before it opens: the window's failures (20 of 25) plus the calls already in flight; then
    // one probe per cool-down.
    let probes = usize::try_from(BURST.as_millis() / COOL_DOWN.as_millis()).unwrap() + 1;
    let burst_bound = 20 + CONCURRENCY + probes;
    assert!(
        burst_calls <= burst_bound,
        "{burst_calls} calls during the burst, bound {burst_bound}"
    );
    assert!(
        peak <= RATE + RATE / 20 + 2,
        "{peak} calls in one second, limit {RATE}/s"
    );
    let mut report = check("F3", &db.url, &run, &requests).await;
    report.recovery_s = Some(recovery.as_secs_f64());
    report.holds();
    assert!(server.terminate().success());
    drop(fake);
    let _ = std::fs::remove_dir_all(jobs.parent().unwrap());
}

/// F5: calls stall 2 s, then the service refuses connections, then comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f5_a_stalling_then_unreachable_downstream_is_waited_out() {
    let _serial = one_at_a_time().await;
    const ITEMS: usize = 600;
    const CONCURRENCY: usize = 16;
    let refusal = Duration::from_secs(env_number("FAULTS_F5_SECS", 20));
    let Some(db) = database(Backend::Postgres, ITEMS).await else {
        return;
    };
    let requests = Arc::new(FakeRequestService::default());
    let siblings = Siblings {
        requests: Some(requests.clone()),
        ..Siblings::default()
    };
    let fake = SiblingServer::start(&siblings, "127.0.0.1:0".parse().unwrap()).await;
    let addr = fake.addr;
    let jobs = jobs_file(
        "f5",
        &serde_json::json!({"concurrency": CONCURRENCY, "chunk_size": 50, "timeout_ms": 10000}),
        5,
    );
    let endpoint = fake.url();
    let tokens = tokens();
    let mut server = Server::start(
        &db.url,
        Some(&jobs),
        &[
            "--external-tables",
            "true",
            "--request-endpoint",
            endpoint.as_str(),
            // A chunk of 50 stalled calls takes about 7 s: only renewals keep a 3 s lease.
            "--run-lease-secs",
            "3",
            "--breaker-cool-down-ms",
            "1000",
            "--tokens",
            tokens.as_str(),
        ],
    );
    let run = trigger(&server).await;
    until("the first calls", Duration::from_secs(60), || {
        requests.calls().len() >= 50
    })
    .await;
    // Stall: every call takes 2 s.
    requests.faults.set_latency(Duration::from_secs(2));
    requests.reset_in_flight();
    until("stalled calls", Duration::from_secs(60), || {
        requests
            .ledger()
            .iter()
            .filter(|c| {
                c.ended
                    .and_then(|e| e.duration_since(c.started).ok())
                    .is_some_and(|d| d >= Duration::from_secs(2))
            })
            .count()
            >= 100
    })
    .await;
    // Refuse connections.
    fake.stop().await;
    let rss_before = rss_kib(server.pid());
    let refused = Instant::now();
    let mut rss_peak = rss_before;
    while refused.elapsed() < refusal {
        rss_peak = rss_peak.max(rss_kib(server.pid()));
        assert!(server.exited().is_none(), "{}", server.log());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    requests.faults.heal();
    let fake = SiblingServer::start(&siblings, addr).await;
    let back = Instant::now();
    let last = finish(&server, &run).await;
    let recovery = back.elapsed();
    assert_eq!(
        last.status,
        "succeeded",
        "{last:?}\nfailed items:\n{}\n{}",
        failed_items(&db.url, &run).await,
        server.log()
    );
    let growth_mib = rss_peak.saturating_sub(rss_before) as f64 / 1024.0;
    eprintln!(
        "F5 in flight peak={} (concurrency {CONCURRENCY}) rss before={} KiB peak during refusal={} KiB (+{growth_mib:.1} MiB) recovery={:.1}s",
        requests.max_in_flight(),
        rss_before,
        rss_peak,
        recovery.as_secs_f64()
    );
    assert!(
        requests.max_in_flight() <= CONCURRENCY,
        "{} calls in flight, concurrency {CONCURRENCY}",
        requests.max_in_flight()
    );
    assert!(
        growth_mib < 16.0,
        "memory grew {growth_mib:.1} MiB while the service was unreachable"
    );
    assert!(
        !server.log().contains("lease lost"),
        "a lease was lost: a false rescue\n{}",
        server.log()
    );
    let mut report = check("F5", &db.url, &run, &requests).await;
    report.recovery_s = Some(recovery.as_secs_f64());
    report.holds();
    assert!(server.terminate().success());
    drop(fake);
    let _ = std::fs::remove_dir_all(jobs.parent().unwrap());
}
