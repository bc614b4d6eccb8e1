//! Fake sibling services as real tonic servers on 127.0.0.1: the Request, Template and Config
//! (preference) services. They record every call, can add latency, fail a given share of calls
//! with a given code, stall, refuse connections (stop them; start them again on the same
//! address), and answer calls nobody expected with an error: services not started answer
//! `UNIMPLEMENTED`, and a request for a template the fake was not told to expect answers
//! `FAILED_PRECONDITION`.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use batch_proto::config::v1 as config;
use batch_proto::config::v1::preference_service_server::{
    PreferenceService, PreferenceServiceServer,
};
use batch_proto::request::v1 as request;
use batch_proto::request::v1::request_service_server::{RequestService, RequestServiceServer};
use batch_proto::template::v1 as template;
use batch_proto::template::v1::template_service_server::{TemplateService, TemplateServiceServer};
use tokio::sync::{Notify, oneshot};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Code, Request, Response, Status};

/// Turns true when the server instance stops: stalls and open streams end.
type Halted = tokio::sync::watch::Receiver<bool>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn fnv(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// How a fake answers: shared by every fake service.
#[derive(Debug, Default)]
pub struct Faults {
    fail_percent: AtomicU8,
    fail_code: Mutex<Option<Code>>,
    latency: Mutex<Duration>,
    stall: AtomicBool,
}

impl Faults {
    /// Fails `percent` (0–100) of calls with `code`, chosen by a hash of the call's key and
    /// attempt, so a run is reproducible.
    pub fn fail(&self, percent: u8, code: Code) {
        *lock(&self.fail_code) = Some(code);
        self.fail_percent.store(percent.min(100), Ordering::SeqCst);
    }

    /// Answers every call normally again.
    pub fn heal(&self) {
        self.fail_percent.store(0, Ordering::SeqCst);
        self.stall.store(false, Ordering::SeqCst);
        *lock(&self.latency) = Duration::ZERO;
    }

    /// Waits this long before answering.
    pub fn set_latency(&self, latency: Duration) {
        *lock(&self.latency) = latency;
    }

    /// Never answers (until healed).
    pub fn stall(&self) {
        self.stall.store(true, Ordering::SeqCst);
    }

    /// Applies latency, stalls and injected failures to one call identified by `key`; a
    /// server that is stopping ends stalls.
    async fn apply(&self, key: &str, halted: &Halted) -> Result<(), Status> {
        let latency = *lock(&self.latency);
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        while self.stall.load(Ordering::SeqCst) && !*halted.borrow() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if *halted.borrow() {
            return Err(Status::unavailable("the fake server is stopping"));
        }
        let percent = u64::from(self.fail_percent.load(Ordering::SeqCst));
        if percent > 0 && fnv(key) % 100 < percent {
            let code = lock(&self.fail_code).unwrap_or(Code::Unavailable);
            return Err(Status::new(code, format!("injected {code:?}")));
        }
        Ok(())
    }
}

/// One call the fake Request service received: what the fault checker reads.
#[derive(Debug, Clone, PartialEq)]
pub struct LedgerEntry {
    /// The request as it arrived.
    pub request: request::ExecuteRequest,
    /// The run and the item: the idempotency key split at its first `:`.
    pub run: String,
    /// See `run`.
    pub item: String,
    /// This key's attempt as the fake counts them (1 for the first call with the key).
    pub attempt: u32,
    /// When it arrived (wall clock).
    pub started: std::time::SystemTime,
    /// When the fake answered it; `None` while in flight (or when the handler panicked or the
    /// caller went away first).
    pub ended: Option<std::time::SystemTime>,
    /// The answer: `None` for success, else the status code.
    pub code: Option<Code>,
}

/// The fake Request service: echoes each request as its result.
#[derive(Debug, Default)]
pub struct FakeRequestService {
    /// Its faults.
    pub faults: Faults,
    calls: Mutex<Vec<LedgerEntry>>,
    in_flight: std::sync::atomic::AtomicUsize,
    max_in_flight: std::sync::atomic::AtomicUsize,
    poison: Mutex<HashSet<String>>,
    panics: Mutex<HashSet<String>>,
    attempts: Mutex<HashMap<String, u32>>,
    expected_templates: Mutex<Option<HashSet<String>>>,
}

impl FakeRequestService {
    /// Every call so far, in order.
    pub fn calls(&self) -> Vec<request::ExecuteRequest> {
        lock(&self.calls)
            .iter()
            .map(|e| e.request.clone())
            .collect()
    }

    /// Every call so far with when it arrived, when it was answered and how: the ledger the
    /// fault checker reads.
    pub fn ledger(&self) -> Vec<LedgerEntry> {
        lock(&self.calls).clone()
    }

    /// The most calls that were in flight at once since the last [`Self::reset_in_flight`].
    pub fn max_in_flight(&self) -> usize {
        self.max_in_flight.load(Ordering::SeqCst)
    }

    /// Starts counting [`Self::max_in_flight`] afresh from the calls in flight now.
    pub fn reset_in_flight(&self) {
        self.max_in_flight
            .store(self.in_flight.load(Ordering::SeqCst), Ordering::SeqCst);
    }

    /// Records the answer of ledger entry `index`.
    fn answered(&self, index: usize, code: Option<Code>) {
        if let Some(entry) = lock(&self.calls).get_mut(index) {
            entry.ended = Some(std::time::SystemTime::now());
            entry.code = code;
        }
    }

    /// Panics in the handler for these items (the part of the idempotency key after the run
    /// id), as a buggy service would.
    pub fn panic_on<'a>(&self, items: impl IntoIterator<Item = &'a str>) {
        lock(&self.panics).extend(items.into_iter().map(str::to_owned));
    }

    /// Answers `INVALID_ARGUMENT` (permanent) for these items (the part of the idempotency
    /// key after the run id).
    pub fn poison<'a>(&self, items: impl IntoIterator<Item = &'a str>) {
        lock(&self.poison).extend(items.into_iter().map(str::to_owned));
    }

    /// Answers `FAILED_PRECONDITION` for templates other than these.
    pub fn expect_templates<'a>(&self, templates: impl IntoIterator<Item = &'a str>) {
        *lock(&self.expected_templates) = Some(templates.into_iter().map(str::to_owned).collect());
    }
}

#[derive(Debug, Clone)]
struct RequestHandler(Arc<FakeRequestService>, Halted);

#[tonic::async_trait]
impl RequestService for RequestHandler {
    async fn execute(
        &self,
        call: Request<request::ExecuteRequest>,
    ) -> Result<Response<request::ExecuteResponse>, Status> {
        let message = call.into_inner();
        let attempt = {
            let mut attempts = lock(&self.0.attempts);
            let attempt = attempts.entry(message.idempotency_key.clone()).or_insert(0);
            *attempt += 1;
            *attempt
        };
        let (run, item) = message
            .idempotency_key
            .split_once(':')
            .unwrap_or((message.idempotency_key.as_str(), ""));
        let index = {
            let mut calls = lock(&self.0.calls);
            calls.push(LedgerEntry {
                request: message.clone(),
                run: run.to_owned(),
                item: item.to_owned(),
                attempt,
                started: std::time::SystemTime::now(),
                ended: None,
                code: None,
            });
            calls.len() - 1
        };
        let now = self.0.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.0.max_in_flight.fetch_max(now, Ordering::SeqCst);
        let answer = self.answer(&message, attempt).await;
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.0
            .answered(index, answer.as_ref().err().map(Status::code));
        answer
    }
}

impl RequestHandler {
    async fn answer(
        &self,
        message: &request::ExecuteRequest,
        attempt: u32,
    ) -> Result<Response<request::ExecuteResponse>, Status> {
        if let Some((_, item)) = message.idempotency_key.split_once(':') {
            if lock(&self.0.poison).contains(item) {
                return Err(Status::invalid_argument(format!("{item} is poison")));
            }
            if lock(&self.0.panics).contains(item) {
                self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
                panic!("the fake request service panics on {item}");
            }
        }
        if let Some(expected) = lock(&self.0.expected_templates).as_ref()
            && !expected.contains(&message.template_id)
        {
            return Err(Status::failed_precondition(format!(
                "unexpected call for template {:?}",
                message.template_id
            )));
        }
        self.0
            .faults
            .apply(&format!("{}#{attempt}", message.idempotency_key), &self.1)
            .await?;
        let mut result = prost_types::Struct::default();
        let text = |s: &str| prost_types::Value {
            kind: Some(prost_types::value::Kind::StringValue(s.to_owned())),
        };
        result
            .fields
            .insert("template".to_owned(), text(&message.template_id));
        result
            .fields
            .insert("user".to_owned(), text(&message.user_id));
        if let Some(payload) = message.payload.clone() {
            result.fields.insert(
                "payload".to_owned(),
                prost_types::Value {
                    kind: Some(prost_types::value::Kind::StructValue(payload)),
                },
            );
        }
        Ok(Response::new(request::ExecuteResponse {
            result: Some(result),
            status: request::ExecuteStatus::Succeeded as i32,
            message: String::new(),
        }))
    }
}

/// The fake Template service.
#[derive(Debug, Default)]
pub struct FakeTemplateService {
    /// Its faults.
    pub faults: Faults,
    templates: Mutex<HashMap<(String, String), template::Template>>,
    calls: Mutex<Vec<template::GetTemplateRequest>>,
}

impl FakeTemplateService {
    /// Serves `body` as version `version` of template `id` of `tenant`.
    pub fn insert(&self, tenant: &str, id: &str, version: u32, body: &str) {
        lock(&self.templates).insert(
            (tenant.to_owned(), id.to_owned()),
            template::Template {
                template_id: id.to_owned(),
                version,
                body: body.to_owned(),
                parameter_defaults: None,
            },
        );
    }

    /// Every call so far.
    pub fn calls(&self) -> Vec<template::GetTemplateRequest> {
        lock(&self.calls).clone()
    }
}

#[derive(Debug, Clone)]
struct TemplateHandler(Arc<FakeTemplateService>, Halted);

#[tonic::async_trait]
impl TemplateService for TemplateHandler {
    async fn get_template(
        &self,
        call: Request<template::GetTemplateRequest>,
    ) -> Result<Response<template::GetTemplateResponse>, Status> {
        let message = call.into_inner();
        lock(&self.0.calls).push(message.clone());
        let calls = lock(&self.0.calls).len();
        self.0
            .faults
            .apply(&format!("{}#{calls}", message.template_id), &self.1)
            .await?;
        let found = lock(&self.0.templates)
            .get(&(message.tenant_id.clone(), message.template_id.clone()))
            .cloned();
        match found {
            Some(template) => Ok(Response::new(template::GetTemplateResponse {
                template: Some(template),
            })),
            None => Err(Status::not_found(format!(
                "tenant {:?} has no template {:?}",
                message.tenant_id, message.template_id
            ))),
        }
    }
}

/// The fake Config service's preferences: a change log whose positions are the watermarks
/// (the first change is watermark 1).
#[derive(Debug, Default)]
pub struct FakePreferenceService {
    /// Its faults.
    pub faults: Faults,
    log: Mutex<Vec<config::Preference>>,
    appended: Notify,
    watches: std::sync::atomic::AtomicUsize,
}

impl FakePreferenceService {
    /// Records a change (the preference as it is after it).
    pub fn upsert(&self, preference: config::Preference) {
        lock(&self.log).push(preference);
        self.appended.notify_waiters();
    }

    /// Watches opened so far (reconnects included).
    pub fn watches(&self) -> usize {
        self.watches.load(Ordering::SeqCst)
    }

    /// The latest preference per user of `tenant` and `feature`, ordered by user.
    fn current(&self, tenant: &str, feature: &str) -> Vec<config::Preference> {
        let mut latest: std::collections::BTreeMap<String, config::Preference> =
            std::collections::BTreeMap::new();
        for p in lock(&self.log)
            .iter()
            .filter(|p| p.tenant_id == tenant && p.feature_type == feature)
        {
            latest.insert(p.user_id.clone(), p.clone());
        }
        latest.into_values().collect()
    }
}

#[derive(Debug, Clone)]
struct PreferenceHandler(Arc<FakePreferenceService>, Halted);

#[tonic::async_trait]
impl PreferenceService for PreferenceHandler {
    async fn list_preferences(
        &self,
        call: Request<config::ListPreferencesRequest>,
    ) -> Result<Response<config::ListPreferencesResponse>, Status> {
        let message = call.into_inner();
        self.0.faults.apply(&message.page_token, &self.1).await?;
        let watermark = u64::try_from(lock(&self.0.log).len()).unwrap_or(u64::MAX);
        let size = usize::try_from(message.page_size)
            .unwrap_or(100)
            .clamp(1, 1_000);
        let page: Vec<config::Preference> = self
            .0
            .current(&message.tenant_id, &message.feature_type)
            .into_iter()
            .filter(|p| message.page_token.is_empty() || p.user_id > message.page_token)
            .take(size)
            .collect();
        let next_page_token = if page.len() == size {
            page.last().map(|p| p.user_id.clone()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(config::ListPreferencesResponse {
            preferences: page,
            next_page_token,
            watermark,
        }))
    }

    type WatchPreferenceChangesStream =
        ReceiverStream<Result<config::WatchPreferenceChangesResponse, Status>>;

    async fn watch_preference_changes(
        &self,
        call: Request<config::WatchPreferenceChangesRequest>,
    ) -> Result<Response<Self::WatchPreferenceChangesStream>, Status> {
        let message = call.into_inner();
        self.0.faults.apply("watch", &self.1).await?;
        self.0.watches.fetch_add(1, Ordering::SeqCst);
        let (sender, receiver) = tokio::sync::mpsc::channel(64);
        let service = self.0.clone();
        let mut halted = self.1.clone();
        tokio::spawn(async move {
            let mut next = usize::try_from(message.after_watermark).unwrap_or(usize::MAX);
            loop {
                let appended = service.appended.notified();
                let pending: Vec<(usize, config::Preference)> = lock(&service.log)
                    .iter()
                    .enumerate()
                    .skip(next)
                    .map(|(i, p)| (i, p.clone()))
                    .collect();
                for (i, preference) in pending {
                    next = i + 1;
                    if preference.tenant_id != message.tenant_id
                        || preference.feature_type != message.feature_type
                    {
                        continue;
                    }
                    let change = config::WatchPreferenceChangesResponse {
                        preference: Some(preference),
                        watermark: u64::try_from(next).unwrap_or(u64::MAX),
                    };
                    if sender.send(Ok(change)).await.is_err() {
                        return;
                    }
                }
                tokio::select! {
                    () = appended => {}
                    () = sender.closed() => return,
                    _ = halted.wait_for(|h| *h) => return,
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(receiver)))
    }
}

/// A running fake server; stopping it (or dropping it) closes its port.
#[derive(Debug)]
pub struct SiblingServer {
    /// Where it listens.
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    halt: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

/// Which fakes a server serves; services left out answer `UNIMPLEMENTED`.
#[derive(Debug, Clone, Default)]
pub struct Siblings {
    /// The Request service.
    pub requests: Option<Arc<FakeRequestService>>,
    /// The Template service.
    pub templates: Option<Arc<FakeTemplateService>>,
    /// The Config service's preferences.
    pub preferences: Option<Arc<FakePreferenceService>>,
}

impl SiblingServer {
    /// Serves `siblings` on `addr` (port 0 for any free port).
    ///
    /// # Panics
    /// When the address cannot be bound.
    pub async fn start(siblings: &Siblings, addr: SocketAddr) -> SiblingServer {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .unwrap_or_else(|e| panic!("binding a fake sibling server to {addr}: {e}"));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("reading the fake server's address: {e}"));
        let (stop, stopped) = oneshot::channel::<()>();
        let (halt, halted) = tokio::sync::watch::channel(false);
        let router = tonic::transport::Server::builder()
            .add_optional_service(
                siblings
                    .requests
                    .clone()
                    .map(|s| RequestServiceServer::new(RequestHandler(s, halted.clone()))),
            )
            .add_optional_service(
                siblings
                    .templates
                    .clone()
                    .map(|s| TemplateServiceServer::new(TemplateHandler(s, halted.clone()))),
            )
            .add_optional_service(
                siblings
                    .preferences
                    .clone()
                    .map(|s| PreferenceServiceServer::new(PreferenceHandler(s, halted.clone()))),
            );
        let task = tokio::spawn(async move {
            let _ = router
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                    let _ = stopped.await;
                })
                .await;
        });
        SiblingServer {
            addr,
            stop: Some(stop),
            halt,
            task,
        }
    }

    /// `http://addr`, for clients.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops serving: the port closes, open streams and stalled calls end, and connections
    /// are shut down (HTTP/2 GOAWAY), so clients see the service gone.
    ///
    /// # Panics
    /// When the server does not shut down within ten seconds.
    pub async fn stop(mut self) {
        self.halt.send_replace(true);
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if tokio::time::timeout(Duration::from_secs(10), &mut self.task)
            .await
            .is_err()
        {
            panic!("the fake server at {} did not shut down", self.addr);
        }
    }
}

impl Drop for SiblingServer {
    fn drop(&mut self) {
        self.halt.send_replace(true);
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
