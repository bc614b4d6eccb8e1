//! The BatchService end to end: the real binary on a fresh database, talked to only through
//! the generated client.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use batch_e2e::{Server, client};
use batch_proto::batch::v1 as pb;
use batch_testkit::siblings::{FakeRequestService, SiblingServer, Siblings};
use batch_testkit::{Backend, TestDatabase, Unavailable};
use tonic::Code;

async fn database(backend: Backend) -> Option<TestDatabase> {
    match TestDatabase::create(backend).await {
        Ok(db) => Some(db),
        Err(Unavailable::Skip(why)) => {
            eprintln!("skipped: {why}");
            None
        }
    }
}

fn struct_of(value: &serde_json::Value) -> prost_types::Struct {
    batch_proto::json::to_struct(value.as_object().unwrap())
}

fn status_of<T: std::fmt::Debug>(result: Result<T, tonic::Status>) -> tonic::Status {
    result.expect_err("the call fails")
}

/// Watches `run` to its end; returns the statuses and succeeded counts seen.
async fn watch_to_end(
    api: &mut batch_proto::batch::v1::batch_service_client::BatchServiceClient<
        tonic::service::interceptor::InterceptedService<
            tonic::transport::Channel,
            batch_e2e::Bearer,
        >,
    >,
    run: &str,
) -> Vec<(String, u64)> {
    let mut stream = api
        .watch_run(pb::WatchRunRequest {
            run_id: run.to_owned(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut seen = Vec::new();
    while let Some(message) = tokio::time::timeout(Duration::from_secs(60), stream.message())
        .await
        .expect("progress keeps coming")
        .unwrap()
    {
        let run = message.run.unwrap();
        seen.push((run.status, run.progress.unwrap().processed));
    }
    seen
}

async fn every_rpc(backend: Backend) {
    let Some(db) = database(backend).await else {
        return;
    };
    let extra: &[&str] = match backend {
        Backend::Postgres => &["--external-tables", "true"],
        Backend::Sqlite => &[],
    };
    let server = Server::start(&db.url, None, extra);
    let mut acme = client(&server, Some("acme-token-1")).await;
    let mut globex = client(&server, Some("globex-token-1")).await;

    // Jobs: each tenant sees its own.
    let jobs = acme
        .list_jobs(pb::ListJobsRequest {})
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert!(jobs.iter().all(|j| j.tenant_id == "acme"));
    assert!(jobs.iter().any(|j| j.job_id == "nightly-digest"));
    let theirs = globex
        .list_jobs(pb::ListJobsRequest {})
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert!(theirs.iter().all(|j| j.tenant_id == "globex") && !theirs.is_empty());
    let job = acme
        .get_job(pb::GetJobRequest {
            job_id: "nightly-digest".to_owned(),
        })
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap();
    assert_eq!(job.r#type, "INDIVIDUAL_USERS");
    assert!(
        job.schedule.contains("America/New_York"),
        "{}",
        job.schedule
    );
    let hidden = status_of(
        globex
            .get_job(pb::GetJobRequest {
                job_id: "nightly-digest".to_owned(),
            })
            .await,
    );
    assert_eq!(hidden.code(), Code::NotFound);

    // Trigger and watch: progress only grows, and the stream ends with the final status.
    let run = acme
        .trigger_job(pb::TriggerJobRequest {
            job_id: "nightly-digest".to_owned(),
            ..pb::TriggerJobRequest::default()
        })
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap();
    assert_eq!(run.trigger, "manual");
    let seen = watch_to_end(&mut acme, &run.run_id).await;
    assert_eq!(
        seen.last().unwrap(),
        &("succeeded".to_owned(), 5),
        "{seen:?}"
    );
    assert!(
        seen.windows(2).all(|w| w[0].1 <= w[1].1),
        "monotone: {seen:?}"
    );

    // The run and its context; another tenant's view is NOT_FOUND.
    let got = acme
        .get_run(pb::GetRunRequest {
            run_id: run.run_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.run.unwrap().status, "succeeded");
    let context = got.context.unwrap();
    assert!(context.fields.contains_key("progress"), "{context:?}");
    for code in [
        status_of(
            globex
                .get_run(pb::GetRunRequest {
                    run_id: run.run_id.clone(),
                })
                .await,
        )
        .code(),
        status_of(
            globex
                .list_run_items(pb::ListRunItemsRequest {
                    run_id: run.run_id.clone(),
                    ..pb::ListRunItemsRequest::default()
                })
                .await,
        )
        .code(),
        status_of(
            globex
                .cancel_run(pb::CancelRunRequest {
                    run_id: run.run_id.clone(),
                })
                .await,
        )
        .code(),
    ] {
        assert_eq!(code, Code::NotFound);
    }

    // Runs: listed newest first, filtered, paged.
    let listed = acme
        .list_runs(pb::ListRunsRequest {
            job_id: "nightly-digest".to_owned(),
            status: "succeeded".to_owned(),
            user_id: "u002".to_owned(),
            ..pb::ListRunsRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        listed
            .runs
            .iter()
            .map(|r| r.run_id.as_str())
            .collect::<Vec<_>>(),
        [run.run_id.as_str()]
    );
    assert_eq!(listed.runs[0].progress.as_ref().unwrap().succeeded, 5);
    assert!(
        globex
            .list_runs(pb::ListRunsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .runs
            .is_empty(),
        "another tenant's runs are not listed"
    );
    let no_failures = status_of(
        acme.retry_failed_items(pb::RetryFailedItemsRequest {
            run_id: run.run_id.clone(),
        })
        .await,
    );
    assert_eq!(no_failures.code(), Code::FailedPrecondition);
    assert!(
        no_failures.message().contains("no failed items"),
        "{}",
        no_failures.message()
    );

    // Items, two at a time.
    let mut token = String::new();
    let mut keys = Vec::new();
    loop {
        let page = acme
            .list_run_items(pb::ListRunItemsRequest {
                run_id: run.run_id.clone(),
                page_size: 2,
                page_token: token.clone(),
                ..pb::ListRunItemsRequest::default()
            })
            .await
            .unwrap()
            .into_inner();
        keys.extend(page.items.iter().map(|i| (i.key.clone(), i.status.clone())));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(keys.len(), 6, "five valid items and one invalid: {keys:?}");
    let succeeded = acme
        .list_run_items(pb::ListRunItemsRequest {
            run_id: run.run_id.clone(),
            status: "succeeded".to_owned(),
            user_id: "u003".to_owned(),
            ..pb::ListRunItemsRequest::default()
        })
        .await
        .unwrap()
        .into_inner()
        .items;
    assert_eq!(succeeded.len(), 1);
    assert!(succeeded[0].result.is_some());

    // References: the distribution user got one; globex sees none of acme's.
    let references = acme
        .list_user_references(pb::ListUserReferencesRequest {
            user_id: "ops-lead".to_owned(),
            ..pb::ListUserReferencesRequest::default()
        })
        .await
        .unwrap()
        .into_inner()
        .references;
    assert!(
        references.iter().any(|r| r.run_id == run.run_id),
        "{references:?}"
    );
    let foreign = status_of(
        globex
            .list_user_references(pb::ListUserReferencesRequest {
                user_id: "ops-lead".to_owned(),
                ..pb::ListUserReferencesRequest::default()
            })
            .await,
    );
    assert_eq!(foreign.code(), Code::NotFound, "{}", foreign.message());
    let without = acme
        .list_user_references(pb::ListUserReferencesRequest {
            user_id: "u010".to_owned(),
            ..pb::ListUserReferencesRequest::default()
        })
        .await
        .unwrap()
        .into_inner()
        .references;
    assert!(
        without.is_empty(),
        "a user of the tenant without references has an empty list"
    );

    // Pause, schedules, resume.
    let paused = acme
        .pause_job(pb::PauseJobRequest {
            job_id: "nightly-digest".to_owned(),
            note: "maintenance".to_owned(),
        })
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap();
    assert_eq!(paused.pause_note, "maintenance");
    let schedules = acme
        .get_schedules(pb::GetSchedulesRequest {
            job_id: "nightly-digest".to_owned(),
            ..pb::GetSchedulesRequest::default()
        })
        .await
        .unwrap()
        .into_inner()
        .schedules;
    assert_eq!(schedules.len(), 1);
    assert_eq!(schedules[0].pause_note, "maintenance");
    let resumed = acme
        .resume_job(pb::ResumeJobRequest {
            job_id: "nightly-digest".to_owned(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(resumed.was_paused);
    assert!(resumed.job.unwrap().pause_note.is_empty());
    let briefing = acme
        .get_schedules(pb::GetSchedulesRequest {
            feature_type: "briefing".to_owned(),
            ..pb::GetSchedulesRequest::default()
        })
        .await
        .unwrap()
        .into_inner()
        .schedules;
    assert!(
        !briefing.is_empty(),
        "preference groups of personal-briefing"
    );
    assert!(
        briefing
            .iter()
            .all(|s| s.job_id == "personal-briefing" && !s.group.is_empty())
    );
    let globex_view = globex
        .get_schedules(pb::GetSchedulesRequest {
            feature_type: "briefing".to_owned(),
            ..pb::GetSchedulesRequest::default()
        })
        .await
        .unwrap()
        .into_inner()
        .schedules;
    assert!(globex_view.is_empty());

    // Backfill three nights, twice: the second creates nothing.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let stamp = |secs: u64| prost_types::Timestamp {
        seconds: i64::try_from(secs).unwrap(),
        nanos: 0,
    };
    let range = pb::BackfillJobRequest {
        job_id: "nightly-digest".to_owned(),
        from: Some(stamp(now - 3 * 86_400)),
        to: Some(stamp(now - 60)),
    };
    let first = acme.backfill_job(range.clone()).await.unwrap().into_inner();
    assert_eq!(first.run_ids.len(), 3, "{first:?}");
    let mut paged = Vec::new();
    let mut token = String::new();
    loop {
        let page = acme
            .list_runs(pb::ListRunsRequest {
                job_id: "nightly-digest".to_owned(),
                page_size: 2,
                page_token: token.clone(),
                ..pb::ListRunsRequest::default()
            })
            .await
            .unwrap()
            .into_inner();
        paged.extend(page.runs.into_iter().map(|r| (r.run_id, r.trigger)));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(
        paged.len(),
        4,
        "one manual run and three backfills: {paged:?}"
    );
    assert_eq!(paged.iter().filter(|(_, t)| t == "backfill").count(), 3);
    let second = acme.backfill_job(range).await.unwrap().into_inner();
    assert!(second.run_ids.is_empty());
    assert_eq!(second.existed, 3);

    // Bad input names the field.
    let bad = status_of(
        acme.trigger_job(pb::TriggerJobRequest {
            job_id: "nightly-digest".to_owned(),
            user_ids: vec!["u001".to_owned(), "not a user id!".to_owned()],
            ..pb::TriggerJobRequest::default()
        })
        .await,
    );
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(bad.message().contains("user_ids[1]"), "{}", bad.message());
    let bad_range = status_of(
        acme.backfill_job(pb::BackfillJobRequest {
            job_id: "nightly-digest".to_owned(),
            from: Some(stamp(now - 60)),
            to: None,
        })
        .await,
    );
    assert_eq!(bad_range.code(), Code::InvalidArgument);
    assert!(
        bad_range.message().contains("to"),
        "{}",
        bad_range.message()
    );

    // Cancel: the run ends cancelled (or had already finished).
    let doomed = acme
        .trigger_job(pb::TriggerJobRequest {
            job_id: "product-descriptions".to_owned(),
            ..pb::TriggerJobRequest::default()
        })
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap();
    acme.cancel_run(pb::CancelRunRequest {
        run_id: doomed.run_id.clone(),
    })
    .await
    .unwrap();
    let seen = watch_to_end(&mut acme, &doomed.run_id).await;
    let last = &seen.last().unwrap().0;
    assert!(last == "cancelled" || last == "succeeded", "{seen:?}");

    // Jobs through the API: created, validated like the file, updated, deleted.
    let definition = |at: &str| {
        let value = serde_json::json!({
            "id": "api-digest", "type": "INDIVIDUAL_USERS", "template": "digest",
            "source": {"users": {"ids": ["u001", "u002"]}},
            "schedule": {"frequency": "daily", "at": at},
        });
        struct_of(&value)
    };
    let created = acme
        .create_job(pb::CreateJobRequest {
            definition: Some(definition("06:00")),
        })
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap();
    assert_eq!(
        (created.tenant_id.as_str(), created.origin.as_str()),
        ("acme", "api")
    );
    assert!(created.schedule.contains("06:00"), "{created:?}");
    assert_eq!(
        status_of(
            acme.create_job(pb::CreateJobRequest {
                definition: Some(definition("06:00"))
            })
            .await
        )
        .code(),
        Code::AlreadyExists
    );
    let bad = status_of(
        acme.create_job(pb::CreateJobRequest {
            definition: Some(definition("25:00")),
        })
        .await,
    );
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(bad.message().contains("schedule.at"), "{}", bad.message());
    let theirs = serde_json::json!({
        "id": "sneaky", "tenant": "globex", "type": "INDIVIDUAL_USERS", "template": "digest",
        "source": {"users": {"ids": ["u001"]}},
    });
    let foreign = status_of(
        acme.create_job(pb::CreateJobRequest {
            definition: Some(struct_of(&theirs)),
        })
        .await,
    );
    assert_eq!(foreign.code(), Code::InvalidArgument);
    assert!(
        foreign.message().starts_with("tenant"),
        "{}",
        foreign.message()
    );
    assert_eq!(
        status_of(
            globex
                .get_job(pb::GetJobRequest {
                    job_id: "api-digest".to_owned()
                })
                .await
        )
        .code(),
        Code::NotFound
    );
    let api_run = acme
        .trigger_job(pb::TriggerJobRequest {
            job_id: "api-digest".to_owned(),
            ..pb::TriggerJobRequest::default()
        })
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap();
    let seen = watch_to_end(&mut acme, &api_run.run_id).await;
    assert_eq!(
        seen.last().unwrap(),
        &("succeeded".to_owned(), 2),
        "{seen:?}"
    );
    let updated = acme
        .update_job(pb::UpdateJobRequest {
            job_id: "api-digest".to_owned(),
            definition: Some(definition("18:45")),
        })
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap();
    assert!(updated.schedule.contains("18:45"), "{updated:?}");
    let fires = acme
        .get_schedules(pb::GetSchedulesRequest {
            job_id: "api-digest".to_owned(),
            ..pb::GetSchedulesRequest::default()
        })
        .await
        .unwrap()
        .into_inner()
        .schedules;
    assert_eq!(fires.len(), 1);
    assert!(
        fires[0].schedule.contains("18:45"),
        "the scheduler follows the change: {fires:?}"
    );
    let mut file_definition = serde_json::json!({
        "id": "nightly-digest", "type": "INDIVIDUAL_USERS", "template": "digest",
        "source": {"users": {"ids": ["u001"]}},
    });
    let file_job = status_of(
        acme.update_job(pb::UpdateJobRequest {
            job_id: "nightly-digest".to_owned(),
            definition: Some(struct_of(&file_definition)),
        })
        .await,
    );
    assert_eq!(
        file_job.code(),
        Code::FailedPrecondition,
        "{}",
        file_job.message()
    );
    assert!(
        file_job.message().contains("jobs file"),
        "{}",
        file_job.message()
    );
    file_definition["id"] = serde_json::json!("other-id");
    let renamed = status_of(
        acme.update_job(pb::UpdateJobRequest {
            job_id: "nightly-digest".to_owned(),
            definition: Some(struct_of(&file_definition)),
        })
        .await,
    );
    assert_eq!(renamed.code(), Code::InvalidArgument);
    assert!(
        renamed.message().starts_with("id:"),
        "{}",
        renamed.message()
    );
    assert_eq!(
        status_of(
            acme.delete_job(pb::DeleteJobRequest {
                job_id: "nightly-digest".to_owned()
            })
            .await
        )
        .code(),
        Code::FailedPrecondition
    );
    acme.delete_job(pb::DeleteJobRequest {
        job_id: "api-digest".to_owned(),
    })
    .await
    .unwrap();
    assert_eq!(
        status_of(
            acme.get_job(pb::GetJobRequest {
                job_id: "api-digest".to_owned()
            })
            .await
        )
        .code(),
        Code::NotFound
    );

    // Without a token, or with a wrong one: UNAUTHENTICATED.
    let mut anonymous = client(&server, None).await;
    assert_eq!(
        status_of(anonymous.list_jobs(pb::ListJobsRequest {}).await).code(),
        Code::Unauthenticated
    );
    let mut forged = client(&server, Some("acme-token-2")).await;
    assert_eq!(
        status_of(forged.list_jobs(pb::ListJobsRequest {}).await).code(),
        Code::Unauthenticated
    );

    // Health, and reflection is on.
    let channel = tonic::transport::Channel::from_shared(server.url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let answer = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "agent.batch.v1.BatchService".to_owned(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        answer.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    let status = server.terminate();
    assert!(status.success(), "exit {status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_on_sqlite() {
    every_rpc(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_on_postgresql() {
    every_rpc(Backend::Postgres).await;
}

/// A jobs file with one slow-ish job: 39 valid users, two at a time.
fn slow_jobs(dir: &std::path::Path) -> std::path::PathBuf {
    let ids: Vec<String> = (1..=40).map(|n| format!("u{n:03}")).collect();
    let jobs = serde_json::json!({"jobs": [{
        "id": "slow-digest", "tenant": "acme", "type": "INDIVIDUAL_USERS", "template": "digest",
        "source": {"users": {"ids": ids}},
        "execution": {"concurrency": 2, "chunk_size": 2, "timeout_ms": 10000},
    }]});
    let path = dir.join("jobs.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&jobs).unwrap()).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_run_exits_0_and_a_restarted_server_finishes_the_run_without_repeating_items() {
    let requests = Arc::new(FakeRequestService::default());
    requests.faults.set_latency(Duration::from_millis(100));
    let fake = SiblingServer::start(
        &Siblings {
            requests: Some(requests.clone()),
            ..Siblings::default()
        },
        "127.0.0.1:0".parse().unwrap(),
    )
    .await;
    let db = database(Backend::Sqlite).await.unwrap();
    let dir = std::env::temp_dir().join(format!("batch-e2e-sigterm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let jobs = slow_jobs(&dir);
    let endpoint = fake.url();
    let args = [
        "--request-endpoint",
        endpoint.as_str(),
        "--max-watches-per-tenant",
        "1",
    ];
    let server = Server::start(&db.url, Some(&jobs), &args);
    let mut api = client(&server, Some("acme-token-1")).await;
    let run = api
        .trigger_job(pb::TriggerJobRequest {
            job_id: "slow-digest".to_owned(),
            ..pb::TriggerJobRequest::default()
        })
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap();
    // One watch per tenant on this server: a second one is refused until the first closes.
    let first_watch = api
        .watch_run(pb::WatchRunRequest {
            run_id: run.run_id.clone(),
        })
        .await
        .unwrap();
    let second = status_of(
        api.watch_run(pb::WatchRunRequest {
            run_id: run.run_id.clone(),
        })
        .await,
    );
    assert_eq!(second.code(), Code::ResourceExhausted);
    // Wait until the run is under way, then stop the server.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(Instant::now() < deadline, "the run never started");
        if requests.calls().len() >= 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // An open watch does not hold the shutdown up: it ends with UNAVAILABLE.
    let status = server.terminate();
    assert!(status.success(), "exit {status:?}");
    let mut first_watch = first_watch.into_inner();
    let ended = loop {
        match first_watch.message().await {
            Ok(Some(_)) => {}
            Ok(None) => break None,
            Err(status) => break Some(status.code()),
        }
    };
    assert!(
        matches!(
            ended,
            Some(Code::Unavailable | Code::Cancelled | Code::Unknown) | None
        ),
        "{ended:?}"
    );
    let before_restart = requests.calls().len();
    assert!(
        before_restart < 39,
        "the run was stopped mid-way: {before_restart} calls"
    );
    // A new server on the same database resumes the run at once (the lease was released).
    // Its calls time out after a second; the watch below lasts longer, as streams may.
    let mut restart_args = args.to_vec();
    restart_args.extend(["--request-timeout-secs", "1"]);
    let server = Server::start(&db.url, Some(&jobs), &restart_args);
    let resumed_at = Instant::now();
    let mut api = client(&server, Some("acme-token-1")).await;
    let seen = watch_to_end(&mut api, &run.run_id).await;
    assert_eq!(
        seen.last().unwrap(),
        &("succeeded".to_owned(), 39),
        "{seen:?}"
    );
    assert!(
        resumed_at.elapsed() > Duration::from_secs(1),
        "the watch outlived the call timeout"
    );
    let mut per_key: BTreeMap<String, usize> = BTreeMap::new();
    for call in requests.calls() {
        *per_key.entry(call.idempotency_key).or_default() += 1;
    }
    assert_eq!(per_key.len(), 39);
    let repeated: Vec<_> = per_key.iter().filter(|(_, n)| **n > 1).collect();
    assert!(repeated.is_empty(), "items executed twice: {repeated:?}");
    assert!(server.terminate().success());
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_follows_the_database_away_and_back() {
    use sea_orm::ConnectionTrait;
    let Some(db) = database(Backend::Postgres).await else {
        return;
    };
    let name = db.url.rsplit('/').next().unwrap().to_owned();
    let server = Server::start(&db.url, None, &["--external-tables", "true"]);
    let channel = tonic::transport::Channel::from_shared(server.url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let status =
        |health: &mut tonic_health::pb::health_client::HealthClient<tonic::transport::Channel>| {
            let mut health = health.clone();
            async move {
                health
                    .check(tonic_health::pb::HealthCheckRequest {
                        service: "agent.batch.v1.BatchService".to_owned(),
                    })
                    .await
                    .unwrap()
                    .into_inner()
                    .status
            }
        };
    let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
    let not_serving = tonic_health::pb::health_check_response::ServingStatus::NotServing as i32;
    assert_eq!(status(&mut health).await, serving);
    let admin = sea_orm::Database::connect(batch_testkit::postgres_admin_url())
        .await
        .unwrap();
    // The database goes away: no new connections, and the server's are cut.
    admin
        .execute_unprepared(&format!("ALTER DATABASE {name} ALLOW_CONNECTIONS false"))
        .await
        .unwrap();
    admin
        .execute_unprepared(&format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"
        ))
        .await
        .unwrap();
    let until = |want: i32| {
        let mut health = health.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if status(&mut health).await == want {
                    return;
                }
                assert!(Instant::now() < deadline, "health never became {want}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    until(not_serving).await;
    admin
        .execute_unprepared(&format!("ALTER DATABASE {name} ALLOW_CONNECTIONS true"))
        .await
        .unwrap();
    until(serving).await;
    assert!(server.terminate().success());
}

#[test]
fn a_broken_settings_file_is_named_and_exits_2() {
    let dir = std::env::temp_dir().join(format!("batch-e2e-settings-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("server.toml");
    std::fs::write(&file, "slots = 2\nlisten_address = \"0.0.0.0:1\"\n").unwrap();
    let output = std::process::Command::new(batch_e2e::binary())
        .args(["serve", "--config"])
        .arg(&file)
        .env_remove("BATCH_CONFIG")
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("server.toml") && stderr.contains("listen_address"),
        "{stderr}"
    );
}

#[test]
fn migrate_brings_a_fresh_database_up_to_date() {
    let dir = std::env::temp_dir().join(format!("batch-e2e-migrate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("sqlite://{}?mode=rwc", dir.join("fresh.db").display());
    let output = std::process::Command::new(batch_e2e::binary())
        .args(["migrate", "--database-url", &url])
        .env_remove("BATCH_DATABASE_URL")
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stdout).starts_with("migrated"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_otlp_collector_does_not_stop_the_service() {
    let db = database(Backend::Sqlite).await.unwrap();
    let server = Server::start(&db.url, None, &["--otlp-endpoint", "http://127.0.0.1:1"]);
    let mut acme = client(&server, Some("acme-token-1")).await;
    let run = acme
        .trigger_job(pb::TriggerJobRequest {
            job_id: "nightly-digest".to_owned(),
            ..pb::TriggerJobRequest::default()
        })
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap();
    let seen = watch_to_end(&mut acme, &run.run_id).await;
    assert_eq!(seen.last().unwrap().0, "succeeded");
    assert!(server.terminate().success());
}
