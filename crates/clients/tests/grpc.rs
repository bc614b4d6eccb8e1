//! The gRPC clients against fake sibling services running as real tonic servers.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use batch_clients::breaker::{BreakerSettings, BreakerState};
use batch_clients::cache::{CacheSettings, CachedTemplates};
use batch_clients::grpc::{
    ChannelSettings, GrpcExecutor, GrpcPreferences, GrpcTemplates, WatchSettings, failure_kind,
};
use batch_domain::retry::FailureKind;
use batch_domain::{FeatureType, TemplateId, TenantId, UserId};
use batch_ports::{
    Clock, PreferenceSource, Request, RequestExecutor, SourceError, SystemClock, TemplateSource,
};
use batch_proto::config::v1 as config;
use batch_testkit::ManualClock;
use batch_testkit::siblings::{
    FakePreferenceService, FakeRequestService, FakeTemplateService, SiblingServer, Siblings,
};
use chrono::{DateTime, Utc};
use serde_json::json;
use tonic::Code;

fn any_port() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn t0() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2027-03-14T07:00:00Z")
        .unwrap()
        .to_utc()
}

fn request(key: &str) -> Request {
    Request {
        idempotency_key: key.to_owned(),
        tenant: TenantId::parse("acme").unwrap(),
        user: Some(UserId::parse("alice").unwrap()),
        template: TemplateId::parse("digest").unwrap(),
        template_version: None,
        payload: json!({"user_id": "alice", "n": 3}),
        parameters: json!({"tone": "warm"}).as_object().unwrap().clone(),
        timeout: None,
    }
}

async fn request_server() -> (Arc<FakeRequestService>, SiblingServer) {
    let fake = Arc::new(FakeRequestService::default());
    let server = SiblingServer::start(
        &Siblings {
            requests: Some(fake.clone()),
            ..Siblings::default()
        },
        any_port(),
    )
    .await;
    (fake, server)
}

fn executor(url: &str, breaker: BreakerSettings, clock: Arc<dyn Clock>) -> GrpcExecutor {
    let mut settings = ChannelSettings::new(url);
    settings.timeout = Duration::from_secs(5);
    GrpcExecutor::new(&settings, breaker, clock).unwrap()
}

const NEVER_OPENS: BreakerSettings = BreakerSettings {
    failure_threshold: u32::MAX,
    window: 1,
    cool_down: Duration::from_secs(1),
};

#[tokio::test]
async fn a_request_carries_everything_and_its_result_comes_back() {
    let (fake, server) = request_server().await;
    let executor = executor(&server.url(), NEVER_OPENS, Arc::new(SystemClock));
    let result = executor.execute(request("run-1:alice")).await.unwrap();
    assert_eq!(result["template"], "digest");
    assert_eq!(result["payload"], json!({"user_id": "alice", "n": 3}));
    let calls = fake.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].idempotency_key, "run-1:alice");
    assert_eq!(calls[0].tenant_id, "acme");
    assert_eq!(calls[0].user_id, "alice");
    assert!(
        calls[0]
            .parameters
            .as_ref()
            .unwrap()
            .fields
            .contains_key("tone")
    );
}

#[tokio::test]
async fn every_status_code_maps_to_retryable_or_permanent() {
    let (fake, server) = request_server().await;
    let executor = executor(&server.url(), NEVER_OPENS, Arc::new(SystemClock));
    let expected = [
        (Code::Cancelled, FailureKind::Retryable),
        (Code::Unknown, FailureKind::Retryable),
        (Code::InvalidArgument, FailureKind::Permanent),
        (Code::DeadlineExceeded, FailureKind::Retryable),
        (Code::NotFound, FailureKind::Permanent),
        (Code::AlreadyExists, FailureKind::Permanent),
        (Code::PermissionDenied, FailureKind::Permanent),
        (Code::ResourceExhausted, FailureKind::Retryable),
        (Code::FailedPrecondition, FailureKind::Permanent),
        (Code::Aborted, FailureKind::Retryable),
        (Code::OutOfRange, FailureKind::Permanent),
        (Code::Unimplemented, FailureKind::Permanent),
        (Code::Internal, FailureKind::Permanent),
        (Code::Unavailable, FailureKind::Retryable),
        (Code::DataLoss, FailureKind::Permanent),
        (Code::Unauthenticated, FailureKind::Permanent),
    ];
    for (n, (code, kind)) in expected.into_iter().enumerate() {
        fake.faults.fail(100, code);
        let error = executor
            .execute(request(&format!("run-1:u{n}")))
            .await
            .unwrap_err();
        assert_eq!(error.kind, kind, "{code:?}: {}", error.message);
        assert!(
            error.message.contains(&format!("{code:?}")),
            "{}",
            error.message
        );
        assert_eq!(failure_kind(code), kind);
    }
    fake.faults.heal();
    assert!(executor.execute(request("run-1:ok")).await.is_ok());
}

#[tokio::test]
async fn the_breaker_opens_under_a_failure_burst_and_closes_after_recovery() {
    let (fake, server) = request_server().await;
    let clock = Arc::new(ManualClock::new(t0()));
    let executor = executor(
        &server.url(),
        BreakerSettings {
            failure_threshold: 5,
            window: 5,
            cool_down: Duration::from_secs(30),
        },
        clock.clone(),
    );
    fake.faults.fail(100, Code::Unavailable);
    for n in 0..20 {
        let error = executor
            .execute(request(&format!("run-1:u{n}")))
            .await
            .unwrap_err();
        if n < 5 {
            assert_eq!(error.kind, FailureKind::Retryable, "{}", error.message);
        } else {
            assert!(
                matches!(error.kind, FailureKind::NotAttempted { retry_in } if retry_in <= Duration::from_secs(30)),
                "a rejected call is not an attempt: {:?}",
                error.kind
            );
        }
    }
    assert_eq!(
        fake.calls().len(),
        5,
        "calls stop reaching the service once the breaker opens"
    );
    assert!(matches!(executor.breaker().state(), BreakerState::Open(_)));
    fake.faults.heal();
    clock.advance(chrono::Duration::seconds(29));
    assert!(executor.execute(request("run-1:early")).await.is_err());
    assert_eq!(fake.calls().len(), 5, "still cooling down");
    clock.advance(chrono::Duration::seconds(1));
    executor.execute(request("run-1:probe")).await.unwrap();
    assert_eq!(executor.breaker().state(), BreakerState::Closed(0));
    for n in 0..3 {
        executor
            .execute(request(&format!("run-1:after{n}")))
            .await
            .unwrap();
    }
    assert_eq!(
        fake.calls().len(),
        9,
        "the probe and every call after it reach the service"
    );
}

#[tokio::test]
async fn a_stalled_call_ends_at_the_callers_deadline_and_a_refused_connection_is_retryable() {
    let (fake, server) = request_server().await;
    fake.faults.stall();
    let mut settings = ChannelSettings::new(server.url());
    settings.timeout = Duration::from_secs(30);
    let executor = GrpcExecutor::new(&settings, NEVER_OPENS, Arc::new(SystemClock)).unwrap();
    let started = Instant::now();
    // The caller (the job's item timeout) waits 200 ms: that is the call's deadline.
    let slow = Request {
        timeout: Some(Duration::from_millis(200)),
        ..request("run-1:slow")
    };
    let error = executor.execute(slow).await.unwrap_err();
    assert_eq!(error.kind, FailureKind::Retryable);
    assert!(
        error.message.contains("DeadlineExceeded") || error.message.contains("Cancelled"),
        "{}",
        error.message
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the deadline cut the call"
    );
    fake.faults.heal();
    let addr = server.addr;
    server.stop().await;
    let refused = GrpcExecutor::new(
        &ChannelSettings::new(format!("http://{addr}")),
        NEVER_OPENS,
        Arc::new(SystemClock),
    )
    .unwrap();
    let error = refused.execute(request("run-1:down")).await.unwrap_err();
    // Retried later, without costing the item an attempt: the service never saw it.
    assert!(
        matches!(error.kind, FailureKind::NotAttempted { .. }),
        "{}",
        error.message
    );
    assert!(
        GrpcExecutor::new(
            &ChannelSettings::new("localhost:1"),
            NEVER_OPENS,
            Arc::new(SystemClock)
        )
        .is_err()
    );
}

#[tokio::test]
async fn the_template_cache_serves_the_last_good_template_during_an_outage() {
    let fake = Arc::new(FakeTemplateService::default());
    fake.insert("acme", "digest", 3, "Hello {{ user_id }}");
    let server = SiblingServer::start(
        &Siblings {
            templates: Some(fake.clone()),
            ..Siblings::default()
        },
        any_port(),
    )
    .await;
    let clock = Arc::new(ManualClock::new(t0()));
    let templates = CachedTemplates::new(
        GrpcTemplates::new(&ChannelSettings::new(server.url())).unwrap(),
        CacheSettings {
            ttl: Duration::from_secs(60),
            max_entries: 100,
        },
        clock.clone(),
    );
    let acme = TenantId::parse("acme").unwrap();
    let digest = TemplateId::parse("digest").unwrap();
    let first = templates.template(&acme, &digest, None).await.unwrap();
    assert_eq!(
        (first.version, first.body.as_str()),
        (3, "Hello {{ user_id }}")
    );
    templates.template(&acme, &digest, None).await.unwrap();
    assert_eq!(fake.calls().len(), 1, "the second read is cached");
    let missing = templates
        .template(&acme, &TemplateId::parse("nope").unwrap(), None)
        .await;
    assert!(
        matches!(missing, Err(SourceError::NotFound(_))),
        "{missing:?}"
    );
    server.stop().await;
    clock.advance(chrono::Duration::seconds(61));
    let during_outage = templates.template(&acme, &digest, None).await.unwrap();
    assert_eq!(during_outage, first);
    assert_eq!(templates.stats().stale(), 1);
    let never_seen = templates
        .template(&acme, &TemplateId::parse("other").unwrap(), None)
        .await;
    assert!(
        matches!(never_seen, Err(SourceError::Unavailable(_))),
        "{never_seen:?}"
    );
}

fn preference(user: &str, at: &str) -> config::Preference {
    config::Preference {
        tenant_id: "acme".to_owned(),
        user_id: user.to_owned(),
        feature_type: "briefing".to_owned(),
        frequency: config::Frequency::Daily as i32,
        time_of_day: at.to_owned(),
        time_zone: "Europe/Berlin".to_owned(),
        enabled: true,
        version: 1,
        ..config::Preference::default()
    }
}

async fn preference_server(fake: &Arc<FakePreferenceService>, addr: SocketAddr) -> SiblingServer {
    SiblingServer::start(
        &Siblings {
            preferences: Some(fake.clone()),
            ..Siblings::default()
        },
        addr,
    )
    .await
}

/// Reads changes after `watermark` until `want` changes came, or fails after a deadline.
async fn changes_until(
    source: &GrpcPreferences,
    mut watermark: u64,
    want: usize,
) -> (Vec<(String, String)>, u64) {
    let acme = TenantId::parse("acme").unwrap();
    let feature = FeatureType::parse("briefing").unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    while seen.len() < want {
        assert!(Instant::now() < deadline, "only {seen:?} arrived");
        let (changes, next) = source
            .changes_since(&acme, &feature, watermark)
            .await
            .unwrap();
        seen.extend(
            changes
                .into_iter()
                .map(|p| (p.user.to_string(), p.time_of_day.unwrap().to_string())),
        );
        watermark = next;
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    (seen, watermark)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_preference_watch_survives_a_restart_of_the_service_and_loses_no_change() {
    let fake = Arc::new(FakePreferenceService::default());
    for (user, at) in [("alice", "07:00"), ("bob", "08:00"), ("carol", "09:00")] {
        fake.upsert(preference(user, at));
    }
    let server = preference_server(&fake, any_port()).await;
    let addr = server.addr;
    let source = GrpcPreferences::new(
        &ChannelSettings::new(server.url()),
        WatchSettings {
            initial_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(200),
            page_size: 2,
        },
        Arc::new(SystemClock),
    )
    .unwrap();
    let acme = TenantId::parse("acme").unwrap();
    let feature = FeatureType::parse("briefing").unwrap();
    let (all, watermark) = source.changes_since(&acme, &feature, 0).await.unwrap();
    let users: Vec<String> = all.iter().map(|p| p.user.to_string()).collect();
    assert_eq!(users, ["alice", "bob", "carol"], "listed over two pages");
    assert_eq!(watermark, 3);
    fake.upsert(preference("alice", "07:30"));
    let (seen, watermark) = changes_until(&source, watermark, 1).await;
    assert_eq!(seen, [("alice".to_owned(), "07:30".to_owned())]);
    // The service goes away; a change lands meanwhile; it comes back on the same address.
    server.stop().await;
    fake.upsert(preference("bob", "08:30"));
    let server = preference_server(&fake, addr).await;
    fake.upsert(preference("dave", "10:00"));
    let (seen, watermark) = changes_until(&source, watermark, 2).await;
    assert_eq!(
        seen,
        [
            ("bob".to_owned(), "08:30".to_owned()),
            ("dave".to_owned(), "10:00".to_owned())
        ],
        "each change once, in order"
    );
    assert_eq!(watermark, 6);
    assert!(fake.watches() >= 2, "the watch reconnected");
    let (nothing, _) = source
        .changes_since(&acme, &feature, watermark)
        .await
        .unwrap();
    assert!(nothing.is_empty());
    drop(server);
}

#[tokio::test]
async fn preferences_are_listed_page_by_page_and_an_outage_is_unavailable() {
    let fake = Arc::new(FakePreferenceService::default());
    for n in 0..5 {
        fake.upsert(preference(&format!("user{n}"), "07:00"));
    }
    let server = preference_server(&fake, any_port()).await;
    let source = GrpcPreferences::new(
        &ChannelSettings::new(server.url()),
        WatchSettings::default(),
        Arc::new(SystemClock),
    )
    .unwrap();
    let acme = TenantId::parse("acme").unwrap();
    let feature = FeatureType::parse("briefing").unwrap();
    let mut token = None;
    let mut pages = Vec::new();
    loop {
        let page = source
            .list(&acme, &feature, token.as_deref(), 2)
            .await
            .unwrap();
        pages.push(page.preferences.len());
        token = page.next_page;
        if token.is_none() {
            break;
        }
    }
    assert_eq!(pages, [2, 2, 1]);
    server.stop().await;
    let down = source.list(&acme, &feature, None, 2).await;
    assert!(matches!(down, Err(SourceError::Unavailable(_))), "{down:?}");
}

/// F5's regression: a refused connection never reached the service, so it costs the item no
/// attempt (during a long outage the breaker's probes used up the attempts of the items they
/// happened to carry); the breaker still counts it.
#[tokio::test]
async fn a_refused_connection_is_not_an_attempt() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let refused = executor(&url, NEVER_OPENS, Arc::new(SystemClock));
    let error = refused.execute(request("run-1:alice")).await.unwrap_err();
    assert!(
        matches!(error.kind, FailureKind::NotAttempted { .. }),
        "{error:?}"
    );
    // A service that answers UNAVAILABLE itself was reached: that is an attempt.
    let (fake, server) = request_server().await;
    fake.faults.fail(100, tonic::Code::Unavailable);
    let reached = executor(&server.url(), NEVER_OPENS, Arc::new(SystemClock));
    let error = reached.execute(request("run-1:bob")).await.unwrap_err();
    assert_eq!(error.kind, FailureKind::Retryable, "{error:?}");
}
