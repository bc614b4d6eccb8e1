//! The caching and fallback decorators, driven with a manual clock over stateful fakes.

use std::sync::Arc;
use std::time::Duration;

use batch_clients::cache::{CacheSettings, CachedCategories};
use batch_domain::TenantId;
use batch_domain::config::CategorySelection;
use batch_ports::{CategoryItem, CategoryRepository, SourceError};
use batch_testkit::ManualClock;
use batch_testkit::fakes::FakeCategories;
use chrono::{DateTime, Utc};
use serde_json::json;

fn t0() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2027-03-14T07:00:00Z")
        .expect("instant")
        .to_utc()
}

fn selection() -> CategorySelection {
    CategorySelection {
        name: "products".to_owned(),
        filters: Vec::new(),
        limit: None,
    }
}

fn item(key: &str) -> CategoryItem {
    CategoryItem {
        category: "products".to_owned(),
        key: key.to_owned(),
        attributes: json!({}),
        user_refs: Vec::new(),
    }
}

#[tokio::test]
async fn fresh_pages_are_served_from_the_cache_and_stale_ones_when_the_source_is_down() {
    let fake = Arc::new(FakeCategories::default());
    fake.insert("acme", "products", vec![item("a"), item("b")]);
    let clock = Arc::new(ManualClock::new(t0()));
    let settings = CacheSettings {
        ttl: Duration::from_secs(60),
        max_entries: 100,
    };
    let cached = CachedCategories::new(fake.clone(), settings, clock.clone());
    let acme = TenantId::parse("acme").expect("tenant");

    let first = cached
        .items(&acme, &selection(), None, 10)
        .await
        .expect("page");
    assert_eq!((first.items.len(), first.stale_since), (2, None));
    cached
        .items(&acme, &selection(), None, 10)
        .await
        .expect("page");
    assert_eq!(fake.calls(), 1, "the second call was a hit");

    // Past the TTL the source is asked again.
    clock.advance(chrono::Duration::seconds(61));
    fake.insert("acme", "products", vec![item("a"), item("b"), item("c")]);
    let refreshed = cached
        .items(&acme, &selection(), None, 10)
        .await
        .expect("page");
    assert_eq!((refreshed.items.len(), fake.calls()), (3, 2));
    let fetched_at = clock_now(&clock);

    // Source down after the TTL: the last good page, marked stale since it was fetched.
    clock.advance(chrono::Duration::seconds(61));
    fake.set_unavailable(true);
    let stale = cached
        .items(&acme, &selection(), None, 10)
        .await
        .expect("stale page");
    assert_eq!(stale.items.len(), 3);
    assert_eq!(stale.stale_since, Some(fetched_at));
    // Nothing cached for another key: the outage shows.
    let other = cached.items(&acme, &selection(), Some("a"), 10).await;
    assert!(
        matches!(other, Err(SourceError::Unavailable(_))),
        "{other:?}"
    );

    // Recovery replaces the stale copy.
    fake.set_unavailable(false);
    let back = cached
        .items(&acme, &selection(), None, 10)
        .await
        .expect("page");
    assert_eq!(back.stale_since, None);
    let stats = cached.stats();
    assert_eq!((stats.hits(), stats.stale()), (1, 1));
    assert_eq!(stats.misses(), 5);
}

#[tokio::test]
async fn not_found_is_never_hidden_by_the_fallback() {
    let fake = Arc::new(FakeCategories::default());
    let clock = Arc::new(ManualClock::new(t0()));
    let settings = CacheSettings {
        ttl: Duration::from_secs(60),
        max_entries: 10,
    };
    let cached = CachedCategories::new(fake, settings, clock);
    let result = cached
        .items(
            &TenantId::parse("acme").expect("tenant"),
            &selection(),
            None,
            10,
        )
        .await;
    assert!(
        matches!(result, Err(SourceError::NotFound(_))),
        "{result:?}"
    );
}

fn clock_now(clock: &ManualClock) -> DateTime<Utc> {
    batch_ports::Clock::now(clock)
}

#[tokio::test]
async fn preference_pages_fall_back_but_changes_always_reach_the_source() {
    use batch_clients::cache::CachedPreferences;
    use batch_domain::preference::Preference;
    use batch_domain::{FeatureType, UserId};
    use batch_ports::PreferenceSource;
    use batch_testkit::fakes::FakePreferences;

    let fake = Arc::new(FakePreferences::default());
    let feature = FeatureType::parse("digest").expect("feature");
    let acme = TenantId::parse("acme").expect("tenant");
    fake.upsert(Preference {
        tenant: acme.clone(),
        user: UserId::parse("u1").expect("user"),
        feature_type: feature.clone(),
        frequency: None,
        time_of_day: None,
        time_zone: None,
        weekday: None,
        day_of_month: None,
        template_override: None,
        parameters: serde_json::Map::new(),
        enabled: true,
        version: 1,
    });
    let clock = Arc::new(ManualClock::new(t0()));
    let settings = CacheSettings {
        ttl: Duration::from_secs(30),
        max_entries: 10,
    };
    let cached = CachedPreferences::new(fake.clone(), settings, clock.clone());
    assert_eq!(
        cached
            .list(&acme, &feature, None, 100)
            .await
            .expect("page")
            .preferences
            .len(),
        1
    );
    cached
        .changes_since(&acme, &feature, 0)
        .await
        .expect("changes");
    cached
        .changes_since(&acme, &feature, 0)
        .await
        .expect("changes");
    assert_eq!(fake.calls(), 3, "one listing, two uncached change reads");
    clock.advance(chrono::Duration::seconds(31));
    fake.set_unavailable(true);
    let stale = cached
        .list(&acme, &feature, None, 100)
        .await
        .expect("stale page");
    assert_eq!(stale.stale_since, Some(t0()));
    assert!(cached.changes_since(&acme, &feature, 0).await.is_err());
}
