//! F2: the database goes away mid-run, three times — the app's connections are terminated,
//! then the server is restarted in immediate mode (a crash) and in fast mode — on a private
//! PostgreSQL cluster the scenario can stop without disturbing other tests. The server must
//! stay up, report NOT_SERVING while the database is down, reconnect by itself and complete
//! the run, redoing at most one chunk per fault.

use std::time::{Duration, Instant};

use batch_e2e::Server;
use batch_testkit::Unavailable;
use batch_testkit::cluster::{PrivateCluster, StopMode};
use sea_orm::{ConnectionTrait, Database};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use super::{
    CHUNK, check, finish, jobs_file, next, one_at_a_time, prepare, request_service, seed, tokens,
    trigger,
};

/// The server's health status for the batch service.
async fn health(server: &Server) -> Option<i32> {
    let channel = tonic::transport::Channel::from_shared(server.url.clone())
        .ok()?
        .connect()
        .await
        .ok()?;
    HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: "agent.batch.v1.BatchService".to_owned(),
        })
        .await
        .ok()
        .map(|answer| answer.into_inner().status)
}

/// Waits (with a deadline) until the server reports `want`.
async fn health_becomes(server: &Server, want: ServingStatus) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while health(server).await != Some(want as i32) {
        assert!(
            Instant::now() < deadline,
            "health never became {want:?}:\n{}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the fake has received `calls` calls.
async fn calls_reach(requests: &batch_testkit::siblings::FakeRequestService, calls: usize) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while requests.calls().len() < calls {
        assert!(
            Instant::now() < deadline,
            "the run stalled at {calls} calls"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// F2: PostgreSQL restarted (immediate and fast) mid-run, and the app's connections
/// terminated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f2_the_server_rides_out_a_database_restart() {
    let _serial = one_at_a_time().await;
    let cluster = match PrivateCluster::start() {
        Ok(cluster) => cluster,
        Err(Unavailable::Skip(why)) => {
            eprintln!("skipped: {why}");
            return;
        }
    };
    let items = 3_000;
    let url = cluster.url("postgres");
    prepare(&url, items).await;
    let initial = seed();
    let mut seed = initial;
    eprintln!("F2 seed {seed}");
    let (requests, fake) = request_service(Duration::from_millis(2)).await;
    let jobs = jobs_file("f2");
    let endpoint = fake.url();
    let tokens = tokens();
    let mut server = Server::start(
        &url,
        Some(&jobs),
        &[
            "--external-tables",
            "true",
            "--request-endpoint",
            endpoint.as_str(),
            "--run-lease-secs",
            "30",
            "--tokens",
            tokens.as_str(),
        ],
    );
    let run = trigger(&server).await;
    let mut recovery = Duration::ZERO;
    // When a fault came after the last item's call, resuming means recording: the run's end.
    let mut resumed_by_the_end = None;
    // Three faults at random points within successive fifths of the run.
    for (n, fault) in ["terminate", "immediate", "fast"].into_iter().enumerate() {
        let fifth = items / 5;
        let at = fifth * (n + 1) + usize::try_from(next(&mut seed) % (fifth as u64 / 2)).unwrap();
        calls_reach(&requests, at).await;
        match fault {
            "terminate" => {
                let admin = Database::connect(cluster.url("template1")).await.unwrap();
                admin
                    .execute_unprepared(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                         WHERE datname = 'postgres'",
                    )
                    .await
                    .unwrap();
                admin.close().await.unwrap();
            }
            mode => {
                cluster.stop(if mode == "fast" {
                    StopMode::Fast
                } else {
                    StopMode::Immediate
                });
                health_becomes(&server, ServingStatus::NotServing).await;
                // Down for a while: the heartbeats and claims fail meanwhile.
                tokio::time::sleep(Duration::from_secs(2)).await;
                assert!(
                    server.exited().is_none(),
                    "the server died with the database:\n{}",
                    server.log()
                );
                cluster.start_again();
                health_becomes(&server, ServingStatus::Serving).await;
            }
        }
        let back = Instant::now();
        let before = requests.calls().len();
        // Every item may have been called by now: the items claimed ahead go on while the
        // database is away, and a server that is back works through the rest of a short run
        // before the health poll sees it serving (CI saw all 3 000 called after the fast
        // restart, and waited in vain for one more call).
        if before >= items {
            eprintln!("F2 {fault} at {at} calls: every item was called by the time it was back");
            resumed_by_the_end = Some(back);
            continue;
        }
        calls_reach(&requests, before + 1).await;
        recovery = recovery.max(back.elapsed());
        eprintln!(
            "F2 {fault} at {at} calls: work resumed after {:.1} s",
            back.elapsed().as_secs_f64()
        );
    }
    if std::env::var_os("FAULTS_VERBOSE").is_some() {
        eprintln!("{}", server.log());
    }
    let last = finish(&server, &run).await;
    if let Some(back) = resumed_by_the_end {
        recovery = recovery.max(back.elapsed());
    }
    assert_eq!(last.status, "succeeded", "{last:?}\n{}", server.log());
    assert_eq!(last.progress.unwrap().succeeded, items as u64);
    let mut report = check("F2", &url, &run, &requests).await;
    report.seed = Some(initial);
    // At most the chunk in flight at each of the three faults.
    report.redelivered_bound = 3 * CHUNK;
    report.recovery_s = Some(recovery.as_secs_f64());
    report.holds();
    assert!(server.exited().is_none(), "{}", server.log());
    assert!(server.terminate().success());
    let _ = std::fs::remove_dir_all(jobs.parent().unwrap());
}
