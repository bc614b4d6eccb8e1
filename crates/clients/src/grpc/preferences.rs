//! The Config service's preferences: paged listing, and a change feed kept by a background
//! watch that reconnects with backoff and resumes from the last watermark it saw, so a restart
//! of the service loses no change.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use batch_domain::preference::Preference;
use batch_domain::{FeatureType, TenantId};
use batch_ports::{Clock, PreferencePage, PreferenceSource, SourceError};
use batch_proto::config::v1 as pb;
use batch_proto::config::v1::preference_service_client::PreferenceServiceClient;
use tonic::transport::Channel;

use super::convert::preference;
use super::{BadEndpoint, ChannelSettings, channel, source_error, with_deadline};

/// How the change watch behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WatchSettings {
    /// The first wait before reconnecting a broken watch; doubled after every failure.
    pub initial_backoff: Duration,
    /// The longest wait between reconnects.
    pub max_backoff: Duration,
    /// Preferences per page when listing.
    pub page_size: u32,
}

impl Default for WatchSettings {
    fn default() -> Self {
        WatchSettings {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
            page_size: 1_000,
        }
    }
}

/// Changes received by one watch and not yet handed out.
#[derive(Debug, Default)]
struct Feed {
    /// Received changes with their watermarks, oldest first.
    changes: VecDeque<(u64, Preference)>,
    /// Changes at or below this watermark were handed out and dropped.
    handed_out: u64,
    /// The highest watermark received.
    high: u64,
}

type FeedKey = (TenantId, FeatureType);

/// A running watch: its feed and the task that fills it.
type Watch = (Arc<Mutex<Feed>>, tokio::task::AbortHandle);

/// Reads preferences from the Config service. `changes_since(…, 0)` lists every preference
/// and starts a watch for the tenant and feature type from the listing's watermark; later calls
/// hand out what the watch received since. Wrap it in [`crate::cache::CachedPreferences`]
/// to cache listings and serve the last good one while the service is down.
pub struct GrpcPreferences {
    client: PreferenceServiceClient<Channel>,
    timeout: Duration,
    settings: WatchSettings,
    clock: Arc<dyn Clock>,
    feeds: Mutex<HashMap<FeedKey, Watch>>,
}

impl std::fmt::Debug for GrpcPreferences {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcPreferences")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Drop for GrpcPreferences {
    fn drop(&mut self) {
        for (_, (_, task)) in lock(&self.feeds).drain() {
            task.abort();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The preferences of a page that parse; the others are logged and left out (their users fall
/// back to the job's defaults) rather than failing everyone's.
fn parse_all<'a>(messages: impl IntoIterator<Item = &'a pb::Preference>) -> Vec<Preference> {
    messages
        .into_iter()
        .filter_map(|m| match preference(m) {
            Ok(p) => Some(p),
            Err(e) => {
                tracing::warn!(error = %e, "preference from the config service left out");
                None
            }
        })
        .collect()
}

impl GrpcPreferences {
    /// A client of the service at `settings.endpoint`; watches wait on `clock` between
    /// reconnects.
    ///
    /// # Errors
    /// [`BadEndpoint`] for an endpoint that is not an address.
    pub fn new(
        settings: &ChannelSettings,
        watch: WatchSettings,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, BadEndpoint> {
        Ok(GrpcPreferences {
            client: PreferenceServiceClient::new(channel(settings)?),
            timeout: settings.timeout,
            settings: watch,
            clock,
            feeds: Mutex::new(HashMap::new()),
        })
    }

    async fn page(
        &self,
        tenant: &TenantId,
        feature: &FeatureType,
        page_token: Option<&str>,
        page_size: u32,
    ) -> Result<pb::ListPreferencesResponse, SourceError> {
        let message = pb::ListPreferencesRequest {
            tenant_id: tenant.to_string(),
            feature_type: feature.to_string(),
            page_token: page_token.unwrap_or_default().to_owned(),
            page_size,
        };
        Ok(self
            .client
            .clone()
            .list_preferences(with_deadline(message, self.timeout))
            .await
            .map_err(|status| source_error("config service", &status))?
            .into_inner())
    }

    /// Every preference of `tenant` for `feature`, and the watermark the listing began at.
    async fn list_all(
        &self,
        tenant: &TenantId,
        feature: &FeatureType,
    ) -> Result<(Vec<Preference>, u64), SourceError> {
        let mut all = Vec::new();
        let mut token: Option<String> = None;
        let mut watermark = None;
        loop {
            let page = self
                .page(tenant, feature, token.as_deref(), self.settings.page_size)
                .await?;
            watermark.get_or_insert(page.watermark);
            all.extend(parse_all(&page.preferences));
            if page.next_page_token.is_empty() {
                break;
            }
            token = Some(page.next_page_token);
        }
        Ok((all, watermark.unwrap_or(0)))
    }

    /// The feed of `key`, started from `from` if it is not running yet.
    fn feed(&self, key: &FeedKey, from: u64) -> Arc<Mutex<Feed>> {
        let mut feeds = lock(&self.feeds);
        if let Some((feed, _)) = feeds.get(key) {
            return feed.clone();
        }
        let feed = Arc::new(Mutex::new(Feed {
            changes: VecDeque::new(),
            handed_out: from,
            high: from,
        }));
        let task = tokio::spawn(watch(
            self.client.clone(),
            key.clone(),
            feed.clone(),
            self.settings,
            self.clock.clone(),
        ));
        feeds.insert(key.clone(), (feed.clone(), task.abort_handle()));
        feed
    }
}

/// Keeps one watch open: reads changes into `feed`, and after any failure reconnects with
/// exponential backoff from the highest watermark received.
async fn watch(
    mut client: PreferenceServiceClient<Channel>,
    (tenant, feature): FeedKey,
    feed: Arc<Mutex<Feed>>,
    settings: WatchSettings,
    clock: Arc<dyn Clock>,
) {
    let mut backoff = settings.initial_backoff;
    loop {
        let after = lock(&feed).high;
        let request = pb::WatchPreferenceChangesRequest {
            tenant_id: tenant.to_string(),
            feature_type: feature.to_string(),
            after_watermark: after,
        };
        match client.watch_preference_changes(request).await {
            Ok(stream) => {
                let mut stream = stream.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(change)) => {
                            backoff = settings.initial_backoff;
                            let parsed = change.preference.as_ref().map(preference);
                            let mut feed = lock(&feed);
                            if change.watermark <= feed.high {
                                continue;
                            }
                            feed.high = change.watermark;
                            match parsed {
                                Some(Ok(p)) => feed.changes.push_back((change.watermark, p)),
                                Some(Err(e)) => {
                                    tracing::warn!(error = %e, "preference change left out");
                                }
                                None => {
                                    tracing::warn!(
                                        watermark = change.watermark,
                                        "empty preference change"
                                    );
                                }
                            }
                        }
                        Ok(None) => {
                            tracing::warn!(%tenant, %feature, "preference watch ended; reconnecting");
                            break;
                        }
                        Err(status) => {
                            tracing::warn!(%tenant, %feature, error = %status, "preference watch broke; reconnecting");
                            break;
                        }
                    }
                }
            }
            Err(status) => {
                tracing::warn!(%tenant, %feature, error = %status, ?backoff, "preference watch cannot connect");
            }
        }
        clock.sleep(backoff).await;
        backoff = (backoff * 2).min(settings.max_backoff);
    }
}

#[async_trait]
impl PreferenceSource for GrpcPreferences {
    async fn list(
        &self,
        tenant: &TenantId,
        feature: &FeatureType,
        page_token: Option<&str>,
        page_size: usize,
    ) -> Result<PreferencePage, SourceError> {
        let page = self
            .page(
                tenant,
                feature,
                page_token,
                u32::try_from(page_size).unwrap_or(u32::MAX),
            )
            .await?;
        Ok(PreferencePage {
            preferences: parse_all(&page.preferences),
            next_page: (!page.next_page_token.is_empty()).then_some(page.next_page_token),
            stale_since: None,
        })
    }

    /// With `watermark` 0 (or one older than what the watch still holds): every current
    /// preference, listed page by page, and the listing's watermark. Otherwise the changes the
    /// watch received after `watermark`, and the highest watermark received.
    async fn changes_since(
        &self,
        tenant: &TenantId,
        feature: &FeatureType,
        watermark: u64,
    ) -> Result<(Vec<Preference>, u64), SourceError> {
        let key = (tenant.clone(), feature.clone());
        let running = lock(&self.feeds).get(&key).map(|(feed, _)| feed.clone());
        let feed = match running {
            Some(feed) if watermark > 0 && watermark >= lock(&feed).handed_out => feed,
            _ => {
                let (all, listed_at) = self.list_all(tenant, feature).await?;
                self.feed(&key, listed_at);
                return Ok((all, listed_at));
            }
        };
        let mut feed = lock(&feed);
        while feed.changes.front().is_some_and(|(w, _)| *w <= watermark) {
            feed.changes.pop_front();
        }
        feed.handed_out = feed.handed_out.max(watermark);
        let changes = feed.changes.iter().map(|(_, p)| p.clone()).collect();
        Ok((changes, feed.high.max(watermark)))
    }
}
