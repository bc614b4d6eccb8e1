//! Logs, traces and metrics. Logs go to stderr (text, or JSON with `BATCH_LOG_FORMAT=json`);
//! with an OTLP endpoint, spans (RPCs, chunks, items) and metrics go to it over gRPC.
//!
//! The application crates know nothing of OpenTelemetry: they emit `tracing` events with the
//! target [`METRICS`] and a `metric` field, and [`MetricsLayer`] turns them into instruments —
//! items succeeded, failed and retried, run duration, schedules fired and dropped, downstream
//! latency, breaker openings, cache hits, misses and stale answers, and the queue depth.

use std::collections::HashMap;

use anyhow::Context;
use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Gauge, Histogram, Meter};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::Layer;
use tracing_subscriber::filter::{EnvFilter, Targets};
use tracing_subscriber::layer::{Context as LayerContext, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;

/// The target of metric events.
pub(crate) const METRICS: &str = "batch::metrics";

/// The providers to flush and shut down on exit.
pub(crate) struct Telemetry {
    tracer: Option<SdkTracerProvider>,
    meter: Option<SdkMeterProvider>,
}

impl Telemetry {
    /// Flushes and shuts the exporters down (off the async runtime's threads: the exporters
    /// block on it).
    pub(crate) async fn shutdown(self) {
        let _ = tokio::task::spawn_blocking(move || {
            if let Some(tracer) = self.tracer
                && let Err(e) = tracer.shutdown()
            {
                eprintln!("warning: shutting the trace exporter down: {e}");
            }
            if let Some(meter) = self.meter
                && let Err(e) = meter.shutdown()
            {
                eprintln!("warning: shutting the metric exporter down: {e}");
            }
        })
        .await;
    }
}

/// Sets up logging and, with `otlp` (`http://collector:4317`), trace and metric export.
///
/// # Errors
/// When the exporters cannot be built (a malformed endpoint).
pub(crate) fn init(otlp: Option<&str>) -> anyhow::Result<Telemetry> {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("warn,batch_app=info,batch_server=info,sqlx=warn"));
    let json = std::env::var("BATCH_LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json"));
    let logs = if json {
        tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_writer(std::io::stderr)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .boxed()
    }
    .with_filter(filter);
    let (tracer, meter) = match otlp {
        Some(endpoint) => {
            let spans = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint)
                .build()
                .with_context(|| format!("the OTLP span exporter for {endpoint}"))?;
            let metrics = opentelemetry_otlp::MetricExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint)
                .build()
                .with_context(|| format!("the OTLP metric exporter for {endpoint}"))?;
            let resource = opentelemetry_sdk::Resource::builder()
                .with_service_name("agent-batch")
                .build();
            (
                Some(
                    SdkTracerProvider::builder()
                        .with_batch_exporter(spans)
                        .with_resource(resource.clone())
                        .build(),
                ),
                Some(
                    SdkMeterProvider::builder()
                        .with_reader(PeriodicReader::builder(metrics).build())
                        .with_resource(resource)
                        .build(),
                ),
            )
        }
        None => (None, None),
    };
    let traces = tracer.as_ref().map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("agent-batch"))
            .with_filter(EnvFilter::new(
                "info,sqlx=warn,h2=warn,hyper=warn,tonic=warn,tower=warn",
            ))
    });
    let instruments = match &meter {
        Some(provider) => opentelemetry::metrics::MeterProvider::meter(provider, "agent-batch"),
        None => opentelemetry::global::meter("agent-batch"),
    };
    let metrics = MetricsLayer::new(&instruments)
        .with_filter(Targets::new().with_target(METRICS, Level::DEBUG));
    tracing_subscriber::registry()
        .with(logs)
        .with(traces)
        .with(metrics)
        .try_init()
        .context("installing the log subscriber")?;
    Ok(Telemetry { tracer, meter })
}

/// Turns metric events into OpenTelemetry instruments.
pub(crate) struct MetricsLayer {
    items: Counter<u64>,
    run_seconds: Histogram<f64>,
    schedules: Counter<u64>,
    downstream_ms: Histogram<f64>,
    breaker_opened: Counter<u64>,
    cache: Counter<u64>,
    queued: Gauge<u64>,
}

impl MetricsLayer {
    /// Instruments made from `meter`.
    pub(crate) fn new(meter: &Meter) -> Self {
        MetricsLayer {
            items: meter
                .u64_counter("batch.items")
                .with_description("item attempts by outcome: succeeded, failed, retried")
                .build(),
            run_seconds: meter
                .f64_histogram("batch.run.duration")
                .with_unit("s")
                .with_description("run duration from creation to end, by final status")
                .build(),
            schedules: meter
                .u64_counter("batch.schedules")
                .with_description(
                    "due schedule instants by what became of them: fired, dropped, paused",
                )
                .build(),
            downstream_ms: meter
                .f64_histogram("batch.downstream.latency")
                .with_unit("ms")
                .with_description("latency of calls to the Request service, by outcome")
                .build(),
            breaker_opened: meter
                .u64_counter("batch.breaker.opened")
                .with_description("times a circuit breaker opened")
                .build(),
            cache: meter
                .u64_counter("batch.cache")
                .with_description("cache lookups by cache and outcome: hit, miss, stale")
                .build(),
            queued: meter
                .u64_gauge("batch.queue.depth")
                .with_description("runs waiting to be claimed, across every replica")
                .build(),
        }
    }
}

/// The fields of one event.
#[derive(Default)]
struct Fields {
    numbers: HashMap<&'static str, f64>,
    texts: HashMap<&'static str, String>,
}

impl Visit for Fields {
    #[allow(clippy::cast_precision_loss)]
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.numbers.insert(field.name(), value as f64);
    }

    #[allow(clippy::cast_precision_loss)]
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.numbers.insert(field.name(), value as f64);
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.numbers.insert(field.name(), value);
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.texts.insert(field.name(), value.to_owned());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.texts.insert(field.name(), format!("{value:?}"));
    }
}

impl Fields {
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    fn count(&self, name: &str) -> u64 {
        self.numbers.get(name).map_or(0, |n| n.max(0.0) as u64)
    }

    fn text(&self, name: &str) -> String {
        self.texts.get(name).cloned().unwrap_or_default()
    }
}

impl<S: Subscriber> Layer<S> for MetricsLayer {
    fn on_event(&self, event: &Event<'_>, _: LayerContext<'_, S>) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        match fields.texts.get("metric").map(String::as_str) {
            Some("chunk") => {
                for outcome in ["succeeded", "failed", "retried"] {
                    let n = fields.count(outcome);
                    if n > 0 {
                        self.items.add(n, &[KeyValue::new("outcome", outcome)]);
                    }
                }
            }
            Some("run") => self.run_seconds.record(
                fields.numbers.get("seconds").copied().unwrap_or_default(),
                &[KeyValue::new("status", fields.text("status"))],
            ),
            Some("tick") => {
                for outcome in ["fired", "dropped", "paused"] {
                    let n = fields.count(outcome);
                    if n > 0 {
                        self.schedules.add(n, &[KeyValue::new("outcome", outcome)]);
                    }
                }
            }
            Some("request") => self.downstream_ms.record(
                fields
                    .numbers
                    .get("latency_ms")
                    .copied()
                    .unwrap_or_default(),
                &[KeyValue::new("outcome", fields.text("outcome"))],
            ),
            Some("breaker") => self.breaker_opened.add(1, &[]),
            Some("queue") => self.queued.record(fields.count("queued"), &[]),
            Some("cache") => self.cache.add(
                1,
                &[
                    KeyValue::new("cache", fields.text("cache")),
                    KeyValue::new("outcome", fields.text("outcome")),
                ],
            ),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::metrics::MeterProvider as _;
    use opentelemetry_sdk::metrics::InMemoryMetricExporter;
    use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData};

    #[test]
    fn metric_events_become_instruments() {
        let exporter = InMemoryMetricExporter::default();
        let provider = SdkMeterProvider::builder()
            .with_reader(PeriodicReader::builder(exporter.clone()).build())
            .build();
        let layer = MetricsLayer::new(&provider.meter("test"))
            .with_filter(Targets::new().with_target(METRICS, Level::DEBUG));
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, || {
            tracing::debug!(target: METRICS, metric = "chunk", succeeded = 3_u64, failed = 1_u64, retried = 2_u64);
            tracing::debug!(target: METRICS, metric = "chunk", succeeded = 4_u64, failed = 0_u64, retried = 0_u64);
            tracing::debug!(target: METRICS, metric = "run", seconds = 1.5_f64, status = "succeeded");
            tracing::debug!(target: METRICS, metric = "queue", queued = 5_u64);
            tracing::debug!(target: "elsewhere", metric = "chunk", succeeded = 100_u64);
        });
        provider.force_flush().unwrap_or_else(|e| panic!("{e}"));
        let exported = exporter
            .get_finished_metrics()
            .unwrap_or_else(|e| panic!("{e}"));
        let mut items: HashMap<String, u64> = HashMap::new();
        let mut runs = 0;
        let mut queued = None;
        for resource in &exported {
            for scope in resource.scope_metrics() {
                for metric in scope.metrics() {
                    match (metric.name(), metric.data()) {
                        ("batch.items", AggregatedMetrics::U64(MetricData::Sum(sum))) => {
                            for point in sum.data_points() {
                                let outcome = point
                                    .attributes()
                                    .find(|kv| kv.key.as_str() == "outcome")
                                    .map(|kv| kv.value.to_string())
                                    .unwrap_or_default();
                                items.insert(outcome, point.value());
                            }
                        }
                        (
                            "batch.run.duration",
                            AggregatedMetrics::F64(MetricData::Histogram(h)),
                        ) => {
                            runs += h.data_points().map(|p| p.count()).sum::<u64>();
                        }
                        ("batch.queue.depth", AggregatedMetrics::U64(MetricData::Gauge(g))) => {
                            queued = g.data_points().map(|p| p.value()).max();
                        }
                        _ => {}
                    }
                }
            }
        }
        assert_eq!(items.get("succeeded"), Some(&7));
        assert_eq!(items.get("failed"), Some(&1));
        assert_eq!(items.get("retried"), Some(&2));
        assert_eq!(runs, 1);
        assert_eq!(queued, Some(5));
    }
}
