//! F9: two tenants issue random sequences of every RPC, half of them with the other tenant's
//! job and run ids (and some with made-up ones). No response may carry a row of the other
//! tenant, and no call on the other tenant's ids may change anything: the checker counts
//! `cross_tenant_rows` (rows read plus writes accepted across tenants), which must be 0.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use batch_e2e::{Server, client};
use batch_proto::batch::v1 as pb;
use batch_testkit::{Backend, TestDatabase};
use tonic::Code;

use super::{Report, next, one_at_a_time, seed};

/// The tenants and their tokens (from `batch_e2e::TOKENS`).
const TENANTS: [(&str, &str); 2] = [("acme", "acme-token-1"), ("globex", "globex-token-1")];

type Api = batch_proto::batch::v1::batch_service_client::BatchServiceClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, batch_e2e::Bearer>,
>;

/// Every job and run as the operator sees them: id → tenant.
async fn owners(server: &Server) -> (BTreeMap<String, String>, BTreeMap<String, String>) {
    let mut api = client(server, Some("operator-token")).await;
    let jobs = api
        .list_jobs(pb::ListJobsRequest {})
        .await
        .unwrap()
        .into_inner()
        .jobs
        .into_iter()
        .map(|j| (j.job_id, j.tenant_id))
        .collect();
    let mut runs = BTreeMap::new();
    let mut page_token = String::new();
    loop {
        let page = api
            .list_runs(pb::ListRunsRequest {
                page_token: page_token.clone(),
                page_size: 500,
                ..pb::ListRunsRequest::default()
            })
            .await
            .unwrap()
            .into_inner();
        runs.extend(page.runs.into_iter().map(|r| (r.run_id, r.tenant_id)));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    (jobs, runs)
}

/// What one tenant's calls returned: the tenants of the rows it saw, and the writes it got
/// accepted on ids of the other tenant.
#[derive(Debug, Default)]
struct Seen {
    /// Job ids in responses.
    jobs: Vec<String>,
    /// Run ids in responses (runs, references, items' runs, watch events).
    runs: Vec<String>,
    /// Calls on the other tenant's ids that succeeded (each a crossing).
    accepted_across: Vec<String>,
}

/// One random call by `me` (index into [`TENANTS`]).
#[allow(clippy::too_many_lines)]
async fn call(
    api: &mut Api,
    seed: &mut u64,
    mine: &[String; 2],
    theirs: &[String; 2],
    seen: &mut Seen,
) {
    // Half the calls use the other tenant's ids, a tenth made-up ones.
    let pick = |seed: &mut u64, own: &str, other: &str| -> (String, bool) {
        match next(seed) % 10 {
            0 => (format!("guess-{}", next(seed) % 1_000), false),
            1..=5 => (other.to_owned(), true),
            _ => (own.to_owned(), false),
        }
    };
    let (job, job_across) = pick(seed, &mine[0], &theirs[0]);
    let (run, run_across) = pick(seed, &mine[1], &theirs[1]);
    let rpc = next(seed) % 16;
    let across = if matches!(rpc, 0 | 9 | 14 | 15) {
        false
    } else if rpc >= 9 {
        run_across
    } else {
        job_across
    };
    // Ok(true) = accepted, Ok(false) = refused with NOT_FOUND/PERMISSION_DENIED/other expected.
    let refused = |status: &tonic::Status| {
        assert!(
            matches!(
                status.code(),
                Code::NotFound
                    | Code::PermissionDenied
                    | Code::InvalidArgument
                    | Code::FailedPrecondition
                    | Code::AlreadyExists
            ),
            "unexpected answer to rpc {rpc}: {status:?}"
        );
        if across {
            assert!(
                !status.message().contains(&theirs[0]) || status.code() == Code::NotFound,
                "an error names the other tenant's data: {status:?}"
            );
        }
    };
    let accepted: bool = match rpc {
        0 => match api.list_jobs(pb::ListJobsRequest {}).await {
            Ok(r) => {
                seen.jobs
                    .extend(r.into_inner().jobs.into_iter().map(|j| j.job_id));
                false
            }
            Err(e) => panic!("ListJobs: {e:?}"),
        },
        1 => match api.get_job(pb::GetJobRequest { job_id: job }).await {
            Ok(r) => {
                seen.jobs.extend(r.into_inner().job.map(|j| j.job_id));
                true
            }
            Err(e) => {
                refused(&e);
                false
            }
        },
        2 => match api
            .pause_job(pb::PauseJobRequest {
                job_id: job,
                note: "guessing".to_owned(),
            })
            .await
        {
            Ok(r) => {
                seen.jobs.extend(r.into_inner().job.map(|j| j.job_id));
                true
            }
            Err(e) => {
                refused(&e);
                false
            }
        },
        3 => match api.resume_job(pb::ResumeJobRequest { job_id: job }).await {
            Ok(r) => {
                seen.jobs.extend(r.into_inner().job.map(|j| j.job_id));
                true
            }
            Err(e) => {
                refused(&e);
                false
            }
        },
        4 => match api
            .trigger_job(pb::TriggerJobRequest {
                job_id: job,
                ..pb::TriggerJobRequest::default()
            })
            .await
        {
            Ok(r) => {
                seen.runs.extend(r.into_inner().run.map(|r| r.run_id));
                true
            }
            Err(e) => {
                refused(&e);
                false
            }
        },
        5 => match api.delete_job(pb::DeleteJobRequest { job_id: job }).await {
            Ok(_) => true,
            Err(e) => {
                refused(&e);
                false
            }
        },
        6 => match api
            .update_job(pb::UpdateJobRequest {
                job_id: job.clone(),
                definition: Some(batch_proto::json::value_to_struct(&serde_json::json!({
                    "id": job, "tenant": "acme", "type": "INDIVIDUAL_USERS",
                    "template": "digest", "source": {"users": {"ids": ["u001"]}},
                }))),
            })
            .await
        {
            Ok(r) => {
                seen.jobs.extend(r.into_inner().job.map(|j| j.job_id));
                true
            }
            Err(e) => {
                refused(&e);
                false
            }
        },
        7 => match api
            .backfill_job(pb::BackfillJobRequest {
                job_id: job,
                from: Some(prost_types::Timestamp {
                    seconds: 1_800_000_000,
                    nanos: 0,
                }),
                to: Some(prost_types::Timestamp {
                    seconds: 1_800_000_120,
                    nanos: 0,
                }),
            })
            .await
        {
            Ok(r) => {
                seen.runs.extend(r.into_inner().run_ids);
                true
            }
            Err(e) => {
                refused(&e);
                false
            }
        },
        8 => match api
            .get_schedules(pb::GetSchedulesRequest {
                job_id: job,
                ..pb::GetSchedulesRequest::default()
            })
            .await
        {
            Ok(r) => {
                let fires = r.into_inner().schedules;
                let any = !fires.is_empty();
                seen.jobs.extend(fires.into_iter().map(|f| f.job_id));
                any
            }
            Err(e) => {
                refused(&e);
                false
            }
        },
        9 => match api
            .list_runs(pb::ListRunsRequest {
                job_id: if next(seed).is_multiple_of(2) {
                    job
                } else {
                    String::new()
                },
                page_size: 200,
                ..pb::ListRunsRequest::default()
            })
            .await
        {
            Ok(r) => {
                seen.runs
                    .extend(r.into_inner().runs.into_iter().map(|r| r.run_id));
                false
            }
            Err(e) => {
                refused(&e);
                false
            }
        },
        10 => match api.get_run(pb::GetRunRequest { run_id: run }).await {
            Ok(r) => {
                seen.runs.extend(r.into_inner().run.map(|r| r.run_id));
                true
            }
            Err(e) => {
                refused(&e);
                false
            }
        },
        11 => match api.cancel_run(pb::CancelRunRequest { run_id: run }).await {
            Ok(r) => {
                seen.runs.extend(r.into_inner().run.map(|r| r.run_id));
                true
            }
            Err(e) => {
                refused(&e);
                false
            }
        },
        12 => match api
            .retry_failed_items(pb::RetryFailedItemsRequest { run_id: run })
            .await
        {
            Ok(r) => {
                seen.runs.extend(r.into_inner().run.map(|r| r.run_id));
                true
            }
            Err(e) => {
                refused(&e);
                false
            }
        },
        13 => match api
            .list_run_items(pb::ListRunItemsRequest {
                run_id: run.clone(),
                page_size: 50,
                ..pb::ListRunItemsRequest::default()
            })
            .await
        {
            Ok(r) => {
                // The items belong to the run asked for.
                if !r.into_inner().items.is_empty() {
                    seen.runs.push(run);
                }
                true
            }
            Err(e) => {
                refused(&e);
                false
            }
        },
        14 => match api
            .list_user_references(pb::ListUserReferencesRequest {
                user_id: ["u001", "g001", "u002", "g002"][usize::try_from(next(seed) % 4).unwrap()]
                    .to_owned(),
                page_size: 100,
                ..pb::ListUserReferencesRequest::default()
            })
            .await
        {
            Ok(r) => {
                seen.runs
                    .extend(r.into_inner().references.into_iter().map(|r| r.run_id));
                false
            }
            Err(e) => {
                refused(&e);
                false
            }
        },
        _ => {
            let (run, across) = pick(seed, &mine[1], &theirs[1]);
            match api.watch_run(pb::WatchRunRequest { run_id: run }).await {
                Ok(stream) => {
                    let mut stream = stream.into_inner();
                    if let Ok(Ok(Some(first))) =
                        tokio::time::timeout(Duration::from_secs(2), stream.message()).await
                    {
                        seen.runs.extend(first.run.map(|r| r.run_id));
                    }
                    if across {
                        seen.accepted_across
                            .push(format!("WatchRun of {}", theirs[1]));
                    }
                    false
                }
                Err(e) => {
                    refused(&e);
                    false
                }
            }
        }
    };
    if accepted && across {
        seen.accepted_across
            .push(format!("rpc {rpc} on the other tenant's ids"));
    }
}

/// F9: two tenants, random RPC sequences, guessed ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f9_no_tenant_sees_or_touches_another_tenants_rows() {
    let _serial = one_at_a_time().await;
    let Ok(db) = TestDatabase::create(Backend::Sqlite).await else {
        return;
    };
    let server = Server::start(&db.url, None, &[]);
    let initial = seed();
    let mut seed = initial;
    eprintln!("F9 seed {initial}");
    // Each tenant's own ids: a job of the repository's jobs file and a run of it.
    let mut ids: Vec<[String; 2]> = Vec::new();
    for ((_, token), job) in TENANTS.iter().zip(["nightly-digest", "market-overview"]) {
        let run = client(&server, Some(token))
            .await
            .trigger_job(pb::TriggerJobRequest {
                job_id: job.to_owned(),
                ..pb::TriggerJobRequest::default()
            })
            .await
            .unwrap()
            .into_inner()
            .run
            .unwrap()
            .run_id;
        ids.push([job.to_owned(), run]);
    }
    let mut apis = Vec::new();
    for (_, token) in TENANTS {
        apis.push(client(&server, Some(token)).await);
    }
    let mut seen = [Seen::default(), Seen::default()];
    let calls = 400;
    for n in 0..calls {
        let me = n % 2;
        let (mine, theirs) = (ids[me].clone(), ids[1 - me].clone());
        call(&mut apis[me], &mut seed, &mine, &theirs, &mut seen[me]).await;
    }
    let (jobs, runs) = owners(&server).await;
    let mut report = Report::new("F9");
    report.seed = Some(initial);
    for (me, (tenant, _)) in TENANTS.iter().enumerate() {
        let foreign_jobs: BTreeSet<&String> = seen[me]
            .jobs
            .iter()
            .filter(|j| jobs.get(*j).is_some_and(|t| t != tenant))
            .collect();
        let foreign_runs: BTreeSet<&String> = seen[me]
            .runs
            .iter()
            .filter(|r| runs.get(*r).is_some_and(|t| t != tenant))
            .collect();
        eprintln!(
            "F9 {tenant}: saw {} job rows, {} run rows; foreign: {foreign_jobs:?} {foreign_runs:?}; accepted across: {:?}",
            seen[me].jobs.len(),
            seen[me].runs.len(),
            seen[me].accepted_across
        );
        report.cross_tenant_rows += seen[me]
            .jobs
            .iter()
            .filter(|j| jobs.get(*j).is_some_and(|t| t != tenant))
            .count()
            + seen[me]
                .runs
                .iter()
                .filter(|r| runs.get(*r).is_some_and(|t| t != tenant))
                .count()
            + seen[me].accepted_across.len();
        assert!(
            !seen[me].jobs.is_empty() && !seen[me].runs.is_empty(),
            "{tenant} never saw its own rows: the check would prove nothing"
        );
    }
    // The other tenant's data is as it was: both jobs still exist, under their tenants.
    for [job, _] in &ids {
        assert!(jobs.contains_key(job), "job {job} is gone");
    }
    report.holds();
    assert!(server.terminate().success());
}
