//! Caching and fallback decorators for the category, preference and template ports.
//!
//! A cached value is fresh for its TTL (measured with the [`Clock`] port, so tests control
//! it). Past that, the source is asked again; when the source is unavailable, the last good
//! value is served instead, with `stale_since` set to when it was fetched, so callers can say
//! so. Entries are bounded in number (moka evicts the least useful).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use batch_domain::TemplateId;
use batch_domain::config::CategorySelection;
use batch_domain::preference::Preference;
use batch_domain::{FeatureType, TenantId};
use batch_ports::{
    CategoryRepository, Clock, ItemPage, PreferencePage, PreferenceSource, SourceError, Template,
    TemplateSource,
};
use chrono::{DateTime, Utc};

/// How long values stay fresh and how many are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheSettings {
    /// Freshness of a value.
    pub ttl: Duration,
    /// Most values kept (fresh or kept for fallback).
    pub max_entries: u64,
}

impl CacheSettings {
    /// These settings with `{prefix}_TTL_SECS` and `{prefix}_MAX_ENTRIES` from `env` applied
    /// (for example `BATCH_CATEGORY_CACHE_TTL_SECS`).
    ///
    /// # Errors
    /// A message naming the variable whose value is not a whole number.
    pub fn with_env(
        self,
        prefix: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<CacheSettings, String> {
        let read = |name: String| -> Result<Option<u64>, String> {
            env(&name)
                .map(|v| {
                    v.trim()
                        .parse::<u64>()
                        .map_err(|_| format!("{name}={v:?} is not a whole number"))
                })
                .transpose()
        };
        Ok(CacheSettings {
            ttl: read(format!("{prefix}_TTL_SECS"))?.map_or(self.ttl, Duration::from_secs),
            max_entries: read(format!("{prefix}_MAX_ENTRIES"))?.unwrap_or(self.max_entries),
        })
    }
}

/// What a cache did, for the cache hit rate metric.
#[derive(Debug, Default)]
pub struct CacheStats {
    hits: AtomicU64,
    misses: AtomicU64,
    stale: AtomicU64,
}

impl CacheStats {
    /// Answers served fresh from the cache.
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    /// Answers fetched from the source.
    pub fn misses(&self) -> u64 {
        self.misses.load(Ordering::Relaxed)
    }

    /// Answers served stale because the source was unavailable.
    pub fn stale(&self) -> u64 {
        self.stale.load(Ordering::Relaxed)
    }
}

/// The shared machinery: values with the instant they were fetched.
struct Layer<V> {
    name: &'static str,
    entries: moka::future::Cache<String, (V, DateTime<Utc>)>,
    ttl: chrono::Duration,
    clock: Arc<dyn Clock>,
    stats: Arc<CacheStats>,
}

impl<V: Clone + Send + Sync + 'static> Layer<V> {
    fn new(name: &'static str, settings: CacheSettings, clock: Arc<dyn Clock>) -> Self {
        Layer {
            name,
            entries: moka::future::Cache::new(settings.max_entries),
            ttl: chrono::Duration::from_std(settings.ttl).unwrap_or(chrono::Duration::MAX),
            clock,
            stats: Arc::default(),
        }
    }

    /// The value for `key`: fresh from the cache, else fetched, else (source unavailable) the
    /// last good value with the instant it was fetched.
    async fn get<F>(&self, key: String, fetch: F) -> Result<(V, Option<DateTime<Utc>>), SourceError>
    where
        F: Future<Output = Result<V, SourceError>>,
    {
        let now = self.clock.now();
        let cached = self.entries.get(&key).await;
        if let Some((value, fetched)) = &cached
            && now - *fetched < self.ttl
        {
            self.stats.hits.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(target: "batch::metrics", metric = "cache", cache = self.name, outcome = "hit");
            return Ok((value.clone(), None));
        }
        self.stats.misses.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(target: "batch::metrics", metric = "cache", cache = self.name, outcome = "miss");
        match fetch.await {
            Ok(value) => {
                self.entries.insert(key, (value.clone(), now)).await;
                Ok((value, None))
            }
            Err(SourceError::Unavailable(why)) => match cached {
                Some((value, fetched)) => {
                    self.stats.stale.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(target: "batch::metrics", metric = "cache", cache = self.name, outcome = "stale");
                    Ok((value, Some(fetched)))
                }
                None => Err(SourceError::Unavailable(why)),
            },
            Err(other) => Err(other),
        }
    }
}

/// A [`CategoryRepository`] that caches pages and falls back to the last good page.
pub struct CachedCategories<R> {
    inner: R,
    layer: Layer<ItemPage>,
}

impl<R> CachedCategories<R> {
    /// Wraps `inner`.
    pub fn new(inner: R, settings: CacheSettings, clock: Arc<dyn Clock>) -> Self {
        CachedCategories {
            inner,
            layer: Layer::new("categories", settings, clock),
        }
    }

    /// Hits, misses and stale answers so far.
    pub fn stats(&self) -> Arc<CacheStats> {
        self.layer.stats.clone()
    }
}

#[async_trait]
impl<R: CategoryRepository> CategoryRepository for CachedCategories<R> {
    async fn items(
        &self,
        tenant: &TenantId,
        selection: &CategorySelection,
        after: Option<&str>,
        page_size: usize,
    ) -> Result<ItemPage, SourceError> {
        let key = format!("{tenant}\u{1f}{selection:?}\u{1f}{after:?}\u{1f}{page_size}");
        let (mut page, stale) = self
            .layer
            .get(key, self.inner.items(tenant, selection, after, page_size))
            .await?;
        page.stale_since = page.stale_since.or(stale);
        Ok(page)
    }
}

/// A [`PreferenceSource`] that caches listed pages and falls back to the last good page.
/// Changes since a watermark always go to the source: they are how callers notice updates.
pub struct CachedPreferences<P> {
    inner: P,
    layer: Layer<PreferencePage>,
}

impl<P> CachedPreferences<P> {
    /// Wraps `inner`.
    pub fn new(inner: P, settings: CacheSettings, clock: Arc<dyn Clock>) -> Self {
        CachedPreferences {
            inner,
            layer: Layer::new("preferences", settings, clock),
        }
    }

    /// Hits, misses and stale answers so far.
    pub fn stats(&self) -> Arc<CacheStats> {
        self.layer.stats.clone()
    }
}

#[async_trait]
impl<P: PreferenceSource> PreferenceSource for CachedPreferences<P> {
    async fn list(
        &self,
        tenant: &TenantId,
        feature: &FeatureType,
        page_token: Option<&str>,
        page_size: usize,
    ) -> Result<PreferencePage, SourceError> {
        let key = format!("{tenant}\u{1f}{feature}\u{1f}{page_token:?}\u{1f}{page_size}");
        let (mut page, stale) = self
            .layer
            .get(key, self.inner.list(tenant, feature, page_token, page_size))
            .await?;
        page.stale_since = page.stale_since.or(stale);
        Ok(page)
    }

    async fn changes_since(
        &self,
        tenant: &TenantId,
        feature: &FeatureType,
        watermark: u64,
    ) -> Result<(Vec<Preference>, u64), SourceError> {
        self.inner.changes_since(tenant, feature, watermark).await
    }
}

/// A [`TemplateSource`] that caches templates for the TTL and serves the last good template
/// while the source is unavailable (logged; a template has no `stale_since` to carry it).
pub struct CachedTemplates<T> {
    inner: T,
    layer: Layer<Template>,
}

impl<T> CachedTemplates<T> {
    /// Wraps `inner`.
    pub fn new(inner: T, settings: CacheSettings, clock: Arc<dyn Clock>) -> Self {
        CachedTemplates {
            inner,
            layer: Layer::new("templates", settings, clock),
        }
    }

    /// Hits, misses and stale answers so far.
    pub fn stats(&self) -> Arc<CacheStats> {
        self.layer.stats.clone()
    }
}

#[async_trait]
impl<T: TemplateSource> TemplateSource for CachedTemplates<T> {
    async fn template(
        &self,
        tenant: &TenantId,
        id: &TemplateId,
        version: Option<u32>,
    ) -> Result<Template, SourceError> {
        let key = format!("{tenant}\u{0}{id}\u{0}{}", version.unwrap_or(0));
        let (template, stale) = self
            .layer
            .get(key, self.inner.template(tenant, id, version))
            .await?;
        if let Some(fetched) = stale {
            tracing::warn!(%tenant, template = %id, %fetched, "template source unavailable; serving the last good template");
        }
        Ok(template)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_take_the_environment_over_configuration() {
        let base = CacheSettings {
            ttl: Duration::from_secs(60),
            max_entries: 100,
        };
        let env = |name: &str| match name {
            "BATCH_CATEGORY_CACHE_TTL_SECS" => Some("5".to_owned()),
            "BATCH_PREFERENCE_CACHE_MAX_ENTRIES" => Some("ten".to_owned()),
            _ => None,
        };
        let categories = base.with_env("BATCH_CATEGORY_CACHE", env).unwrap();
        assert_eq!(
            categories,
            CacheSettings {
                ttl: Duration::from_secs(5),
                max_entries: 100
            }
        );
        let err = base.with_env("BATCH_PREFERENCE_CACHE", env).unwrap_err();
        assert!(err.contains("BATCH_PREFERENCE_CACHE_MAX_ENTRIES"), "{err}");
    }
}
