//! The `agent.batch.v1.BatchService` handlers. They only translate: proto in, application and
//! store calls, proto out. The caller's tenant scopes everything; another tenant's ids answer
//! `NOT_FOUND` exactly like missing ones.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use batch_app::catalog::JobCatalog;
use batch_app::processor::BatchProcessor;
use batch_app::scheduler::{BatchScheduler, FireFilter};
use batch_app::strategy::Scope;
use batch_domain::config::Job;
use batch_domain::run::{ItemStatus, RunId, RunStatus};
use batch_domain::{FeatureType, JobId, Priority, TemplateId, TenantId, UserId};
use batch_ports::contexts::{ContextStore, ReferenceCursor};
use batch_ports::jobs::{JobDefinition, JobStore};
use batch_ports::runs::{RunCursor, RunFilter, RunRecord, RunStore, StoreError};
use batch_ports::schedules::ScheduleStore;
use batch_ports::{Clock, UserRepository};
use batch_proto::batch::v1 as pb;
use batch_proto::batch::v1::batch_service_server::BatchService;
use batch_store::Store;
use chrono::{DateTime, Utc};
use serde_json::Value;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::auth::Caller;

/// The most items or references one page holds.
const MAX_PAGE: usize = 1_000;

/// What the handlers work with.
pub(crate) struct Api {
    pub(crate) jobs: Arc<JobCatalog>,
    /// The jobs file's `defaults`, applied to every stored definition.
    pub(crate) defaults: Arc<Value>,
    pub(crate) scheduler: Arc<BatchScheduler>,
    pub(crate) processor: Arc<BatchProcessor>,
    pub(crate) store: Arc<Store>,
    pub(crate) clock: Arc<dyn Clock>,
    /// Open WatchRun streams per caller (tenant, or `*` for operators).
    pub(crate) watches: Arc<Mutex<HashMap<String, usize>>>,
    /// The most WatchRun streams one caller may hold open.
    pub(crate) max_watches: usize,
    /// Turns true when the server stops: open WatchRun streams end, so they do not hold the
    /// graceful shutdown up.
    pub(crate) stopped: tokio::sync::watch::Receiver<bool>,
}

/// Counts one open WatchRun stream of a caller while it lives.
struct WatchSlot {
    watches: Arc<Mutex<HashMap<String, usize>>>,
    caller: String,
}

impl Drop for WatchSlot {
    fn drop(&mut self) {
        let mut watches = self
            .watches
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(open) = watches.get_mut(&self.caller) {
            *open = open.saturating_sub(1);
        }
    }
}

fn caller<T>(request: &Request<T>) -> Result<Caller, Status> {
    request
        .extensions()
        .get::<Caller>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("no caller identity"))
}

fn store_status(error: StoreError) -> Status {
    match error {
        StoreError::NotFound(what) => Status::not_found(what),
        StoreError::Unavailable(why) => Status::unavailable(format!("database unavailable: {why}")),
        StoreError::AlreadyExists(what) => Status::already_exists(what),
        StoreError::LeaseLost(why) => Status::aborted(why),
        StoreError::Unsupported(why) => Status::failed_precondition(why),
        StoreError::Unexpected(why) => {
            tracing::error!(error = %why, "store failure");
            Status::internal("internal error; see the server log")
        }
    }
}

fn app_status(error: batch_app::Error) -> Status {
    match error {
        batch_app::Error::Store(e) => store_status(e),
        batch_app::Error::Source(batch_ports::SourceError::Unavailable(why)) => {
            Status::unavailable(why)
        }
        batch_app::Error::Source(batch_ports::SourceError::NotFound(why)) => {
            Status::failed_precondition(why)
        }
        batch_app::Error::Source(e) => {
            tracing::error!(error = %e, "source failure");
            Status::internal("internal error; see the server log")
        }
        batch_app::Error::Job(why) => Status::invalid_argument(why),
    }
}

fn timestamp(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: i32::try_from(t.timestamp_subsec_nanos()).unwrap_or(0),
    }
}

fn instant(field: &str, t: Option<&prost_types::Timestamp>) -> Result<DateTime<Utc>, Status> {
    let t = t.ok_or_else(|| Status::invalid_argument(format!("{field} is required")))?;
    DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).unwrap_or(0))
        .ok_or_else(|| Status::invalid_argument(format!("{field} is not a valid instant")))
}

fn parse<'a, T, E: std::fmt::Display>(
    field: &str,
    value: &'a str,
    parse: impl FnOnce(&'a str) -> Result<T, E>,
) -> Result<T, Status> {
    parse(value).map_err(|e| Status::invalid_argument(format!("{field}: {e}")))
}

fn page_size(requested: u32) -> usize {
    match usize::try_from(requested).unwrap_or(MAX_PAGE) {
        0 => 100,
        n => n.min(MAX_PAGE),
    }
}

/// A JSON object as a `Struct`; `None` for anything else.
fn to_struct(value: &Value) -> Option<prost_types::Struct> {
    value.as_object().map(batch_proto::json::to_struct)
}

/// An opaque page token over a position.
fn encode_token(position: &str) -> String {
    position.bytes().map(|b| format!("{b:02x}")).collect()
}

fn decode_token(token: &str) -> Result<String, Status> {
    let bad = || Status::invalid_argument("page_token is not a token this server gave out");
    if !token.len().is_multiple_of(2) {
        return Err(bad());
    }
    let bytes: Result<Vec<u8>, _> = (0..token.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(token.get(i..i + 2).unwrap_or("zz"), 16))
        .collect();
    String::from_utf8(bytes.map_err(|_| bad())?).map_err(|_| bad())
}

/// A keyset cursor (creation instant and run) as an opaque token.
fn encode_cursor(at: DateTime<Utc>, run: &RunId) -> String {
    encode_token(&format!("{} {run}", at.timestamp_millis()))
}

fn decode_cursor(token: &str) -> Result<(DateTime<Utc>, RunId), Status> {
    let bad = || Status::invalid_argument("page_token is not a token this server gave out");
    let text = decode_token(token)?;
    let (ms, run) = text.split_once(' ').ok_or_else(bad)?;
    Ok((
        ms.parse::<i64>()
            .ok()
            .and_then(DateTime::from_timestamp_millis)
            .ok_or_else(bad)?,
        RunId::parse(run).map_err(|_| bad())?,
    ))
}

impl Api {
    fn job(&self, caller: &Caller, id: &str) -> Result<Job, Status> {
        let id = parse("job_id", id, JobId::parse)?;
        self.jobs
            .jobs()
            .get(&id)
            .filter(|job| caller.sees(&job.tenant))
            .cloned()
            .ok_or_else(|| Status::not_found(format!("no job {id}")))
    }

    /// The stored definitions, by job.
    async fn definitions(&self) -> Result<HashMap<JobId, JobDefinition>, Status> {
        Ok(self
            .store
            .job_definitions()
            .await
            .map_err(store_status)?
            .0
            .into_iter()
            .map(|d| (d.id.clone(), d))
            .collect())
    }

    async fn job_message(&self, job: &Job) -> Result<pb::Job, Status> {
        let definitions = self.definitions().await?;
        let pauses = self.store.paused_jobs().await.map_err(store_status)?;
        Ok(job_message(job, &definitions, &pauses))
    }

    /// Reloads the catalog after a change made here, so the answer (and this replica) see it
    /// at once; other replicas follow the catalog version.
    async fn reload(&self) -> Result<(), Status> {
        crate::jobs::reload(self.store.as_ref(), &self.jobs, &self.defaults)
            .await
            .map_err(store_status)
    }
}

fn job_message(
    job: &Job,
    definitions: &HashMap<JobId, JobDefinition>,
    pauses: &[batch_ports::schedules::Pause],
) -> pb::Job {
    let pause = pauses.iter().find(|p| p.job == job.id).cloned();
    let stored = definitions.get(&job.id);
    {
        pb::Job {
            job_id: job.id.to_string(),
            tenant_id: job.tenant.to_string(),
            r#type: job.batch_type.to_string(),
            enabled: job.enabled,
            pause_note: pause.map(|p| p.note).unwrap_or_default(),
            schedule: job
                .schedule
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
            feature_type: job
                .dynamic
                .as_ref()
                .map(|d| d.feature_type.to_string())
                .unwrap_or_default(),
            priority: u32::from(job.priority.value()),
            description: job.description.clone().unwrap_or_default(),
            definition: stored.and_then(|d| to_struct(&d.definition)),
            origin: stored
                .map(|d| d.origin.as_str().to_owned())
                .unwrap_or_default(),
        }
    }
}

impl Api {
    /// The run `id` if the caller may see it.
    async fn run(&self, caller: &Caller, id: &str) -> Result<RunRecord, Status> {
        let id = parse("run_id", id, RunId::parse)?;
        let tenants: BTreeSet<TenantId> = match caller {
            Caller::Tenant(tenant) => [tenant.clone()].into(),
            Caller::Operator => self
                .jobs
                .jobs()
                .values()
                .map(|j| j.tenant.clone())
                .collect(),
        };
        for tenant in tenants {
            match self.store.run(&tenant, &id).await {
                Ok(run) => return Ok(run),
                Err(StoreError::NotFound(_)) => {}
                Err(e) => return Err(store_status(e)),
            }
        }
        Err(Status::not_found(format!("no run {id}")))
    }

    async fn run_message(&self, run: &RunRecord) -> Result<pb::Run, Status> {
        let counts = self.store.counts(&run.id).await.map_err(store_status)?;
        let progress = batch_app::context::progress(&counts);
        Ok(pb::Run {
            run_id: run.id.to_string(),
            job_id: run.job.to_string(),
            tenant_id: run.tenant.to_string(),
            status: run.status.to_string(),
            trigger: run.trigger.to_string(),
            scheduled_for: run.scheduled_for.map(timestamp),
            group: run.group.clone(),
            priority: u32::from(run.priority.value()),
            created_at: Some(timestamp(run.created_at)),
            started_at: run.started_at.map(timestamp),
            finished_at: run.finished_at.map(timestamp),
            progress: Some(pb::Progress {
                processed: progress.processed,
                succeeded: progress.succeeded,
                failed: progress.failed,
                total: progress.total,
                percentage: progress.percentage,
            }),
        })
    }
}

#[tonic::async_trait]
impl BatchService for Api {
    async fn list_jobs(
        &self,
        request: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        let caller = caller(&request)?;
        let all = self.jobs.jobs();
        let mut visible: Vec<&Job> = all.values().filter(|j| caller.sees(&j.tenant)).collect();
        visible.sort_by(|a, b| a.id.cmp(&b.id));
        let definitions = self.definitions().await?;
        let pauses = self.store.paused_jobs().await.map_err(store_status)?;
        let jobs = visible
            .into_iter()
            .map(|job| job_message(job, &definitions, &pauses))
            .collect();
        Ok(Response::new(pb::ListJobsResponse { jobs }))
    }

    async fn get_job(
        &self,
        request: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::GetJobResponse>, Status> {
        let caller = caller(&request)?;
        let job = self.job(&caller, &request.get_ref().job_id)?;
        Ok(Response::new(pb::GetJobResponse {
            job: Some(self.job_message(&job).await?),
        }))
    }

    async fn create_job(
        &self,
        request: Request<pb::CreateJobRequest>,
    ) -> Result<Response<pb::CreateJobResponse>, Status> {
        let caller = caller(&request)?;
        let definition = request
            .get_ref()
            .definition
            .as_ref()
            .map(batch_proto::json::from_struct)
            .ok_or_else(|| Status::invalid_argument("definition is required"))?;
        let tenant = match &caller {
            Caller::Tenant(tenant) => Some(tenant),
            Caller::Operator => None,
        };
        let stored = crate::jobs::checked(definition, tenant, None, &self.defaults)
            .map_err(Status::invalid_argument)?;
        self.store.create_job(&stored).await.map_err(store_status)?;
        self.reload().await?;
        let job = self.job(&caller, stored.id.as_str())?;
        Ok(Response::new(pb::CreateJobResponse {
            job: Some(self.job_message(&job).await?),
        }))
    }

    async fn update_job(
        &self,
        request: Request<pb::UpdateJobRequest>,
    ) -> Result<Response<pb::UpdateJobResponse>, Status> {
        let caller = caller(&request)?;
        let message = request.get_ref();
        let existing = self.job(&caller, &message.job_id)?;
        let definition = message
            .definition
            .as_ref()
            .map(batch_proto::json::from_struct)
            .ok_or_else(|| Status::invalid_argument("definition is required"))?;
        let stored = crate::jobs::checked(
            definition,
            Some(&existing.tenant),
            Some(&existing.id),
            &self.defaults,
        )
        .map_err(Status::invalid_argument)?;
        match self.store.update_job(&stored).await {
            Ok(()) => {}
            Err(StoreError::NotFound(_)) => {
                return Err(Status::failed_precondition(format!(
                    "job {} comes from the jobs file; change it there",
                    existing.id
                )));
            }
            Err(e) => return Err(store_status(e)),
        }
        self.reload().await?;
        let job = self.job(&caller, existing.id.as_str())?;
        Ok(Response::new(pb::UpdateJobResponse {
            job: Some(self.job_message(&job).await?),
        }))
    }

    async fn delete_job(
        &self,
        request: Request<pb::DeleteJobRequest>,
    ) -> Result<Response<pb::DeleteJobResponse>, Status> {
        let caller = caller(&request)?;
        let job = self.job(&caller, &request.get_ref().job_id)?;
        if !self
            .store
            .delete_job(&job.tenant, &job.id)
            .await
            .map_err(store_status)?
        {
            return Err(Status::failed_precondition(format!(
                "job {} comes from the jobs file; remove it there",
                job.id
            )));
        }
        self.reload().await?;
        Ok(Response::new(pb::DeleteJobResponse {}))
    }

    async fn pause_job(
        &self,
        request: Request<pb::PauseJobRequest>,
    ) -> Result<Response<pb::PauseJobResponse>, Status> {
        let caller = caller(&request)?;
        let job = self.job(&caller, &request.get_ref().job_id)?;
        self.scheduler
            .pause(&job.id, &request.get_ref().note, self.clock.now())
            .await
            .map_err(app_status)?;
        Ok(Response::new(pb::PauseJobResponse {
            job: Some(self.job_message(&job).await?),
        }))
    }

    async fn resume_job(
        &self,
        request: Request<pb::ResumeJobRequest>,
    ) -> Result<Response<pb::ResumeJobResponse>, Status> {
        let caller = caller(&request)?;
        let job = self.job(&caller, &request.get_ref().job_id)?;
        let was_paused = self.scheduler.resume(&job.id).await.map_err(app_status)?;
        Ok(Response::new(pb::ResumeJobResponse {
            job: Some(self.job_message(&job).await?),
            was_paused,
        }))
    }

    async fn trigger_job(
        &self,
        request: Request<pb::TriggerJobRequest>,
    ) -> Result<Response<pb::TriggerJobResponse>, Status> {
        let caller = caller(&request)?;
        let message = request.get_ref();
        let job = self.job(&caller, &message.job_id)?;
        let users = if message.user_ids.is_empty() {
            None
        } else {
            let mut users = HashSet::new();
            for (n, user) in message.user_ids.iter().enumerate() {
                users.insert(parse(&format!("user_ids[{n}]"), user, UserId::parse)?);
            }
            Some(users)
        };
        let scope = Scope {
            users,
            template: (!message.template_id.is_empty())
                .then(|| parse("template_id", &message.template_id, TemplateId::parse))
                .transpose()?,
            parameters: message
                .parameters
                .as_ref()
                .map(batch_proto::json::from_struct)
                .unwrap_or_default(),
            priority: message
                .priority
                .map(|p| {
                    parse("priority", &p.to_string(), |t: &str| {
                        Priority::new(t.parse::<u64>().unwrap_or(u64::MAX))
                    })
                })
                .transpose()?,
        };
        let run = self
            .scheduler
            .trigger(&job.id, &scope)
            .await
            .map_err(app_status)?;
        Ok(Response::new(pb::TriggerJobResponse {
            run: Some(self.run_message(&run).await?),
        }))
    }

    async fn backfill_job(
        &self,
        request: Request<pb::BackfillJobRequest>,
    ) -> Result<Response<pb::BackfillJobResponse>, Status> {
        let caller = caller(&request)?;
        let message = request.get_ref();
        let job = self.job(&caller, &message.job_id)?;
        let from = instant("from", message.from.as_ref())?;
        let to = instant("to", message.to.as_ref())?;
        let done = self
            .scheduler
            .backfill(&job.id, from, to, self.clock.now())
            .await
            .map_err(app_status)?;
        Ok(Response::new(pb::BackfillJobResponse {
            run_ids: done.created.iter().map(ToString::to_string).collect(),
            existed: u32::try_from(done.existed).unwrap_or(u32::MAX),
        }))
    }

    async fn list_runs(
        &self,
        request: Request<pb::ListRunsRequest>,
    ) -> Result<Response<pb::ListRunsResponse>, Status> {
        let caller = caller(&request)?;
        let message = request.get_ref();
        let mut jobs: Option<Vec<JobId>> = None;
        if !message.job_id.is_empty() {
            jobs = Some(vec![self.job(&caller, &message.job_id)?.id.clone()]);
        }
        if !message.feature_type.is_empty() {
            let feature = parse("feature_type", &message.feature_type, FeatureType::parse)?;
            let of_feature: Vec<JobId> = self
                .jobs
                .jobs()
                .values()
                .filter(|j| {
                    j.dynamic
                        .as_ref()
                        .is_some_and(|d| d.feature_type == feature)
                })
                .map(|j| j.id.clone())
                .filter(|id| jobs.as_ref().is_none_or(|only| only.contains(id)))
                .collect();
            jobs = Some(of_feature);
        }
        let filter = RunFilter {
            tenant: match &caller {
                Caller::Tenant(tenant) => Some(tenant.clone()),
                Caller::Operator => None,
            },
            jobs,
            status: (!message.status.is_empty())
                .then(|| parse("status", &message.status, |s: &str| s.parse::<RunStatus>()))
                .transpose()?,
            user: (!message.user_id.is_empty())
                .then(|| parse("user_id", &message.user_id, UserId::parse))
                .transpose()?,
            created_from: message
                .created_from
                .as_ref()
                .map(|t| instant("created_from", Some(t)))
                .transpose()?,
            created_until: message
                .created_until
                .as_ref()
                .map(|t| instant("created_until", Some(t)))
                .transpose()?,
        };
        let cursor = (!message.page_token.is_empty())
            .then(|| -> Result<RunCursor, Status> {
                let (at, run) = decode_cursor(&message.page_token)?;
                Ok(RunCursor {
                    created_at: at,
                    run,
                })
            })
            .transpose()?;
        let size = page_size(message.page_size);
        let page = self
            .store
            .list_runs(&filter, cursor.as_ref(), size)
            .await
            .map_err(store_status)?;
        let next_page_token = if page.len() == size {
            page.last()
                .map(|r| encode_cursor(r.created_at, &r.id))
                .unwrap_or_default()
        } else {
            String::new()
        };
        let mut runs = Vec::with_capacity(page.len());
        for run in &page {
            runs.push(self.run_message(run).await?);
        }
        Ok(Response::new(pb::ListRunsResponse {
            runs,
            next_page_token,
        }))
    }

    async fn retry_failed_items(
        &self,
        request: Request<pb::RetryFailedItemsRequest>,
    ) -> Result<Response<pb::RetryFailedItemsResponse>, Status> {
        let caller = caller(&request)?;
        let run = self.run(&caller, &request.get_ref().run_id).await?;
        let job = self.jobs.jobs().get(&run.job).cloned().ok_or_else(|| {
            Status::failed_precondition(format!("job {} is no longer configured", run.job))
        })?;
        let retry = self
            .processor
            .retry_failed(&job, &run)
            .await
            .map_err(|e| match e {
                batch_app::Error::Job(why) => Status::failed_precondition(why),
                other => app_status(other),
            })?;
        Ok(Response::new(pb::RetryFailedItemsResponse {
            run: Some(self.run_message(&retry).await?),
        }))
    }

    async fn get_run(
        &self,
        request: Request<pb::GetRunRequest>,
    ) -> Result<Response<pb::GetRunResponse>, Status> {
        let caller = caller(&request)?;
        let run = self.run(&caller, &request.get_ref().run_id).await?;
        let context = self
            .store
            .context(&run.tenant, &run.id)
            .await
            .map_err(store_status)?;
        let context = serde_json::to_value(&context)
            .map_err(|e| Status::internal(format!("encoding the context: {e}")))?;
        Ok(Response::new(pb::GetRunResponse {
            run: Some(self.run_message(&run).await?),
            context: to_struct(&context),
        }))
    }

    async fn cancel_run(
        &self,
        request: Request<pb::CancelRunRequest>,
    ) -> Result<Response<pb::CancelRunResponse>, Status> {
        let caller = caller(&request)?;
        let run = self.run(&caller, &request.get_ref().run_id).await?;
        self.store
            .request_cancel(&run.id)
            .await
            .map_err(store_status)?;
        self.processor.cancel(&run.id);
        let run = self.run(&caller, run.id.as_str()).await?;
        Ok(Response::new(pb::CancelRunResponse {
            run: Some(self.run_message(&run).await?),
        }))
    }

    type WatchRunStream = ReceiverStream<Result<pb::WatchRunResponse, Status>>;

    async fn watch_run(
        &self,
        request: Request<pb::WatchRunRequest>,
    ) -> Result<Response<Self::WatchRunStream>, Status> {
        let caller = caller(&request)?;
        let run = self.run(&caller, &request.get_ref().run_id).await?;
        let key = match &caller {
            Caller::Tenant(tenant) => tenant.to_string(),
            Caller::Operator => "*".to_owned(),
        };
        let slot = {
            let mut watches = self
                .watches
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let open = watches.entry(key.clone()).or_default();
            if *open >= self.max_watches {
                return Err(Status::resource_exhausted(format!(
                    "{} WatchRun streams are open for this caller already; close one first",
                    self.max_watches
                )));
            }
            *open += 1;
            WatchSlot {
                watches: self.watches.clone(),
                caller: key,
            }
        };
        let (sender, receiver) = tokio::sync::mpsc::channel(16);
        let store = self.store.clone();
        let clock = self.clock.clone();
        let mut events = self.processor.subscribe(&run.id);
        let api = Api {
            jobs: self.jobs.clone(),
            defaults: self.defaults.clone(),
            scheduler: self.scheduler.clone(),
            processor: self.processor.clone(),
            store,
            clock,
            watches: self.watches.clone(),
            max_watches: self.max_watches,
            stopped: self.stopped.clone(),
        };
        let mut stopped = self.stopped.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let mut last: Option<pb::Run> = None;
            loop {
                let current = match api.store.run(&run.tenant, &run.id).await {
                    Ok(current) => current,
                    Err(e) => {
                        let _ = sender.send(Err(store_status(e))).await;
                        return;
                    }
                };
                let message = match api.run_message(&current).await {
                    Ok(message) => message,
                    Err(status) => {
                        let _ = sender.send(Err(status)).await;
                        return;
                    }
                };
                if last.as_ref() != Some(&message) {
                    last = Some(message.clone());
                    if sender
                        .send(Ok(pb::WatchRunResponse { run: Some(message) }))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                if current.status.is_terminal() {
                    return;
                }
                // Progress of a run executed here arrives at once; a run executed by another
                // replica is polled.
                tokio::select! {
                    _ = events.changed() => {}
                    () = api.clock.sleep(Duration::from_millis(250)) => {}
                    () = sender.closed() => return,
                    changed = stopped.changed() => {
                        let stopping = changed.is_err() || *stopped.borrow();
                        if stopping {
                            let _ = sender
                                .send(Err(Status::unavailable(
                                    "the server is shutting down; watch the run again on another server",
                                )))
                                .await;
                            return;
                        }
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(receiver)))
    }

    async fn list_run_items(
        &self,
        request: Request<pb::ListRunItemsRequest>,
    ) -> Result<Response<pb::ListRunItemsResponse>, Status> {
        let caller = caller(&request)?;
        let message = request.get_ref();
        let run = self.run(&caller, &message.run_id).await?;
        let status = (!message.status.is_empty())
            .then(|| parse("status", &message.status, |s: &str| s.parse::<ItemStatus>()))
            .transpose()?;
        let user = (!message.user_id.is_empty())
            .then(|| parse("user_id", &message.user_id, UserId::parse))
            .transpose()?;
        let after = (!message.page_token.is_empty())
            .then(|| {
                decode_token(&message.page_token)?
                    .parse::<i64>()
                    .map_err(|_| {
                        Status::invalid_argument("page_token is not a token this server gave out")
                    })
            })
            .transpose()?;
        let size = page_size(message.page_size);
        let page = self
            .store
            .list_items(&run.tenant, &run.id, status, after, size)
            .await
            .map_err(store_status)?;
        let next_page_token = if page.len() == size {
            page.last()
                .map(|i| encode_token(&i.seq.to_string()))
                .unwrap_or_default()
        } else {
            String::new()
        };
        let items = page
            .into_iter()
            .filter(|i| user.as_ref().is_none_or(|u| i.user.as_ref() == Some(u)))
            .map(|i| pb::RunItem {
                seq: i.seq,
                key: i.key,
                user_id: i.user.map(|u| u.to_string()).unwrap_or_default(),
                status: i.status.to_string(),
                attempts: i.attempts,
                last_error: i.last_error.unwrap_or_default(),
                result: i.result.as_ref().and_then(to_struct),
            })
            .collect();
        Ok(Response::new(pb::ListRunItemsResponse {
            items,
            next_page_token,
        }))
    }

    async fn list_user_references(
        &self,
        request: Request<pb::ListUserReferencesRequest>,
    ) -> Result<Response<pb::ListUserReferencesResponse>, Status> {
        let caller = caller(&request)?;
        let message = request.get_ref();
        let user = parse("user_id", &message.user_id, UserId::parse)?;
        let tenant = match &caller {
            Caller::Tenant(tenant) => tenant.clone(),
            Caller::Operator => {
                return Err(Status::failed_precondition(
                    "references belong to a tenant: call with a tenant's token",
                ));
            }
        };
        let cursor = (!message.page_token.is_empty())
            .then(|| -> Result<ReferenceCursor, Status> {
                let (created_at, run) = decode_cursor(&message.page_token)?;
                Ok(ReferenceCursor { created_at, run })
            })
            .transpose()?;
        let size = page_size(message.page_size);
        let page = self
            .store
            .references(&tenant, &user, cursor.as_ref(), size)
            .await
            .map_err(store_status)?;
        if page.is_empty() && cursor.is_none() {
            // No references: a user the tenant does not have is NOT_FOUND, like another
            // tenant's user. (When the users cannot be checked, an empty list it is.)
            match self
                .store
                .validate_users(&tenant, std::slice::from_ref(&user))
                .await
            {
                Ok(checked) if checked.valid.is_empty() => {
                    return Err(Status::not_found(format!("no user {user}")));
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "could not check the user of a reference listing")
                }
            }
        }
        let next_page_token = if page.len() == size {
            page.last()
                .map(|r| encode_cursor(r.created_at, &r.run))
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListUserReferencesResponse {
            references: page
                .into_iter()
                .map(|r| pb::BatchReference {
                    run_id: r.run.to_string(),
                    job_id: r.job.to_string(),
                    user_id: r.user.to_string(),
                    created_at: Some(timestamp(r.created_at)),
                })
                .collect(),
            next_page_token,
        }))
    }

    async fn get_schedules(
        &self,
        request: Request<pb::GetSchedulesRequest>,
    ) -> Result<Response<pb::GetSchedulesResponse>, Status> {
        let caller = caller(&request)?;
        let message = request.get_ref();
        let filter = FireFilter {
            job: (!message.job_id.is_empty())
                .then(|| parse("job_id", &message.job_id, JobId::parse))
                .transpose()?,
            tenant: match &caller {
                Caller::Tenant(tenant) => Some(tenant.clone()),
                Caller::Operator => None,
            },
            feature_type: (!message.feature_type.is_empty())
                .then(|| parse("feature_type", &message.feature_type, FeatureType::parse))
                .transpose()?,
            user: (!message.user_id.is_empty())
                .then(|| parse("user_id", &message.user_id, UserId::parse))
                .transpose()?,
        };
        let fires = self
            .scheduler
            .next_fires(self.clock.now(), &filter)
            .await
            .map_err(app_status)?;
        Ok(Response::new(pb::GetSchedulesResponse {
            schedules: fires
                .into_iter()
                .map(|f| pb::ScheduleFire {
                    job_id: f.job.to_string(),
                    group: f.group,
                    schedule: f.schedule,
                    users: u32::try_from(f.users).unwrap_or(u32::MAX),
                    nominal: Some(timestamp(f.nominal)),
                    fire_at: Some(timestamp(f.fire_at)),
                    pause_note: f.paused.unwrap_or_default(),
                    feature_type: f.feature_type.map(|t| t.to_string()).unwrap_or_default(),
                })
                .collect(),
        }))
    }
}
