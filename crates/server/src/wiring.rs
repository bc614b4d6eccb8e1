//! Which adapter serves each sibling port: the gRPC clients when an endpoint is configured,
//! the embedded stand-ins otherwise. Configuration chooses; no code changes.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use batch_clients::breaker::BreakerSettings;
use batch_clients::cache::{CacheSettings, CachedPreferences, CachedTemplates};
use batch_clients::grpc::{
    ChannelSettings, GrpcExecutor, GrpcPreferences, GrpcTemplates, WatchSettings,
};
use batch_clients::local::{FileTemplates, RenderingExecutor};
use batch_ports::{Clock, PreferenceSource, RequestExecutor, TemplateSource};
use batch_store::Store;

/// Where the sibling services are, when not embedded.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct SiblingArgs {
    /// The Request service (`http://host:port`); without it, requests are rendered locally.
    #[arg(long, env = "BATCH_REQUEST_ENDPOINT")]
    pub(crate) request_endpoint: Option<String>,
    /// The Template service; without it, templates come from the templates directory.
    #[arg(long, env = "BATCH_TEMPLATE_ENDPOINT")]
    pub(crate) template_endpoint: Option<String>,
    /// The Config service's preferences; without it, preferences come from the database.
    #[arg(long, env = "BATCH_PREFERENCE_ENDPOINT")]
    pub(crate) preference_endpoint: Option<String>,
    /// The deadline of each call to a sibling service, in milliseconds.
    #[arg(long, env = "BATCH_SIBLING_TIMEOUT_MS", default_value_t = 30_000)]
    pub(crate) sibling_timeout_ms: u64,
    /// How long the Request service's circuit breaker, once open (20 transient failures among
    /// the last 25 answers), rejects calls before one probe goes through, in milliseconds.
    #[arg(long, env = "BATCH_BREAKER_COOL_DOWN_MS", default_value_t = 30_000)]
    pub(crate) breaker_cool_down_ms: u64,
}

fn channel(endpoint: &str, args: &SiblingArgs) -> ChannelSettings {
    let mut settings = ChannelSettings::new(endpoint);
    settings.timeout = Duration::from_millis(args.sibling_timeout_ms.max(1));
    settings
}

fn cache_settings(prefix: &str) -> anyhow::Result<CacheSettings> {
    CacheSettings {
        ttl: Duration::from_secs(300),
        max_entries: 10_000,
    }
    .with_env(prefix, |name| std::env::var(name).ok())
    .map_err(|e| anyhow::anyhow!(e))
}

/// The template source: the Template service behind a cache that serves the last good
/// template during an outage (`BATCH_TEMPLATE_CACHE_TTL_SECS`), or the templates directory.
pub(crate) fn templates(
    args: &SiblingArgs,
    directory: &Path,
    clock: Arc<dyn Clock>,
) -> anyhow::Result<Arc<dyn TemplateSource>> {
    Ok(match &args.template_endpoint {
        Some(endpoint) => Arc::new(CachedTemplates::new(
            GrpcTemplates::new(&channel(endpoint, args)).context("--template-endpoint")?,
            cache_settings("BATCH_TEMPLATE_CACHE")?,
            clock,
        )),
        None => Arc::new(
            FileTemplates::load(directory)
                .with_context(|| format!("loading templates from {}", directory.display()))?,
        ),
    })
}

/// The request executor: the Request service with its circuit breaker, or local rendering.
pub(crate) fn executor(
    args: &SiblingArgs,
    templates: Arc<dyn TemplateSource>,
    clock: Arc<dyn Clock>,
) -> anyhow::Result<Arc<dyn RequestExecutor>> {
    Ok(match &args.request_endpoint {
        Some(endpoint) => Arc::new(
            GrpcExecutor::new(
                &channel(endpoint, args),
                BreakerSettings {
                    cool_down: Duration::from_millis(args.breaker_cool_down_ms.max(1)),
                    ..BreakerSettings::default()
                },
                clock,
            )
            .context("--request-endpoint")?,
        ),
        None => Arc::new(RenderingExecutor::new(templates)),
    })
}

/// The preference source: the Config service behind a cache that serves the last good page
/// during an outage (`BATCH_PREFERENCE_CACHE_TTL_SECS`), or `database`.
pub(crate) fn preferences(
    args: &SiblingArgs,
    database: Arc<dyn PreferenceSource>,
    clock: Arc<dyn Clock>,
) -> anyhow::Result<Arc<dyn PreferenceSource>> {
    Ok(match &args.preference_endpoint {
        Some(endpoint) => Arc::new(CachedPreferences::new(
            GrpcPreferences::new(
                &channel(endpoint, args),
                WatchSettings::default(),
                clock.clone(),
            )
            .context("--preference-endpoint")?,
            cache_settings("BATCH_PREFERENCE_CACHE")?,
            clock,
        )),
        None => database,
    })
}

/// Opens (and migrates) the database; the embedded default also gets the stand-in tables of
/// external data and, when empty, the sample data.
pub(crate) async fn open_store(
    database_url: &str,
    external_tables: Option<bool>,
    sample_data: &Path,
) -> anyhow::Result<Arc<Store>> {
    // The embedded default manages the stand-ins of external tables itself; elsewhere they
    // belong to other systems unless asked for.
    let external = external_tables.unwrap_or(database_url.starts_with("sqlite:"));
    let store =
        Arc::new(Store::open(database_url, external).await.with_context(|| {
            format!("opening the database {}", batch_store::redact(database_url))
        })?);
    if external
        && sample_data.is_dir()
        && let Some(loaded) = store
            .seed_sample_data(sample_data)
            .await
            .context("loading sample data")?
    {
        tracing::info!(?loaded, "sample data loaded into an empty database");
    }
    Ok(store)
}
