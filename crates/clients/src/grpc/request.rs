//! The Request service's client: the [`RequestExecutor`] of production.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use batch_domain::retry::FailureKind;
use batch_ports::{Clock, ExecuteError, Request, RequestExecutor};
use batch_proto::request::v1 as pb;
use batch_proto::request::v1::request_service_client::RequestServiceClient;
use serde_json::Value;
use tonic::transport::Channel;

use super::{BadEndpoint, ChannelSettings, channel, failure_kind, with_deadline};
use crate::breaker::{BreakerSettings, CircuitBreaker};
use batch_proto::json::{from_struct, to_struct, value_to_struct};

/// Executes requests on the Request service: every call carries the item's idempotency key
/// and a deadline; transient failures are reported retryable (the processor retries them with
/// backoff and the same key) and open the circuit breaker when they keep coming.
#[derive(Debug)]
pub struct GrpcExecutor {
    client: RequestServiceClient<Channel>,
    timeout: Duration,
    breaker: CircuitBreaker,
}

impl GrpcExecutor {
    /// A client of the service at `settings.endpoint`, with its own breaker.
    ///
    /// # Errors
    /// [`BadEndpoint`] for an endpoint that is not an address.
    pub fn new(
        settings: &ChannelSettings,
        breaker: BreakerSettings,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, BadEndpoint> {
        Ok(GrpcExecutor {
            client: RequestServiceClient::new(channel(settings)?),
            timeout: settings.timeout,
            breaker: CircuitBreaker::new(breaker, clock),
        })
    }

    /// The breaker guarding the service.
    pub fn breaker(&self) -> &CircuitBreaker {
        &self.breaker
    }
}

#[async_trait]
impl RequestExecutor for GrpcExecutor {
    async fn execute(&self, request: Request) -> Result<Value, ExecuteError> {
        if let Err(open) = self.breaker.admit() {
            // Not made: the item waits for the breaker without losing an attempt.
            let retry_in = (open.until - self.breaker.now())
                .to_std()
                .unwrap_or_default()
                .max(std::time::Duration::from_millis(100));
            return Err(ExecuteError {
                kind: FailureKind::NotAttempted { retry_in },
                message: format!("request service: {open}"),
            });
        }
        // The caller's deadline, within the configured one, travels with the call.
        let timeout = request
            .timeout
            .map_or(self.timeout, |caller| caller.min(self.timeout));
        let message = pb::ExecuteRequest {
            request_id: request.idempotency_key.clone(),
            tenant_id: request.tenant.to_string(),
            user_id: request
                .user
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
            template_id: request.template.to_string(),
            template_version: request.template_version.unwrap_or(0),
            payload: Some(value_to_struct(&request.payload)),
            parameters: Some(to_struct(&request.parameters)),
            idempotency_key: request.idempotency_key,
        };
        let started = std::time::Instant::now();
        let answer = self
            .client
            .clone()
            .execute(with_deadline(message, timeout))
            .await;
        tracing::debug!(
            target: "batch::metrics",
            metric = "request",
            latency_ms = started.elapsed().as_secs_f64() * 1_000.0,
            outcome = match &answer {
                Ok(_) => "ok",
                Err(status) if classify(status) != FailureKind::Permanent => "retryable",
                Err(_) => "permanent",
            },
        );
        match answer {
            Ok(response) => {
                self.breaker.record(false);
                let response = response.into_inner();
                match pb::ExecuteStatus::try_from(response.status) {
                    Ok(pb::ExecuteStatus::Succeeded) => Ok(Value::Object(
                        response
                            .result
                            .as_ref()
                            .map(from_struct)
                            .unwrap_or_default(),
                    )),
                    _ => Err(ExecuteError {
                        kind: FailureKind::Permanent,
                        message: format!(
                            "request service: execution failed: {}",
                            if response.message.is_empty() {
                                "no reason given"
                            } else {
                                &response.message
                            }
                        ),
                    }),
                }
            }
            Err(status) => {
                let kind = classify(&status);
                self.breaker.record(kind != FailureKind::Permanent);
                Err(ExecuteError {
                    kind,
                    message: format!("request service: {:?}: {}", status.code(), status.message()),
                })
            }
        }
    }
}

/// What a failed call means for its item.
///
/// * The connection was refused: the service never saw the request, so it costs the item no
///   attempt (a long outage would otherwise use up the attempts of the items that happen to be
///   the breaker's probes).
/// * The status was made on this side from a transport failure (an HTTP/2 stream reset or a
///   connection error while the service shut down): tonic maps some of these to codes that are
///   permanent when the service sends them (`INTERNAL` for a reset with `NO_ERROR` or
///   `INTERNAL_ERROR` and no gRPC status, `PERMISSION_DENIED` for `INADEQUATE_SECURITY`). The
///   service gave no verdict, so the call is retried. tonic keeps the transport error as the
///   status's source; a status the service sent (trailers or a trailers-only answer) has none.
///   A response body cut off mid-message is tonic's source-less `INTERNAL` "Unexpected EOF
///   decoding stream." and stays permanent: it cannot be told apart from the service's own
///   `INTERNAL` by anything but its text.
/// * Otherwise the code decides ([`failure_kind`]).
fn classify(status: &tonic::Status) -> FailureKind {
    if never_sent(status) {
        return FailureKind::NotAttempted {
            retry_in: std::time::Duration::from_millis(200),
        };
    }
    match failure_kind(status.code()) {
        FailureKind::Permanent if std::error::Error::source(status).is_some() => {
            FailureKind::Retryable
        }
        kind => kind,
    }
}

/// Whether `status` says the call never reached the service: the connection to it was refused.
/// Any other failure (reset, timeout, an answer) may come after the service started on it.
fn never_sent(status: &tonic::Status) -> bool {
    if status.code() != tonic::Code::Unavailable {
        return false;
    }
    let mut source = std::error::Error::source(status);
    while let Some(error) = source {
        if let Some(io) = error.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::ConnectionRefused
        {
            return true;
        }
        source = error.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A status as tonic makes it on the client from a transport error.
    fn transport(code: tonic::Code, error: std::io::Error) -> tonic::Status {
        let mut status = tonic::Status::new(code, format!("transport error: {error}"));
        status.set_source(std::sync::Arc::new(error));
        status
    }

    #[test]
    fn a_refused_connection_costs_no_attempt() {
        let refused = transport(
            tonic::Code::Unavailable,
            std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
        );
        assert!(matches!(
            classify(&refused),
            FailureKind::NotAttempted { .. }
        ));
    }

    #[test]
    fn a_transport_failure_is_retried_whatever_code_tonic_gave_it() {
        // As tonic's `from_h2_error` and `try_from_error` make them: the code, with the
        // transport error kept as the source.
        for (code, kind) in [
            (tonic::Code::Internal, std::io::ErrorKind::BrokenPipe),
            (tonic::Code::PermissionDenied, std::io::ErrorKind::Other),
            (
                tonic::Code::Unavailable,
                std::io::ErrorKind::ConnectionReset,
            ),
        ] {
            assert_eq!(
                classify(&transport(code, std::io::Error::from(kind))),
                FailureKind::Retryable,
                "{code:?} from {kind:?}"
            );
        }
    }

    #[test]
    fn the_services_own_verdict_stands() {
        assert_eq!(
            classify(&tonic::Status::internal("the template failed")),
            FailureKind::Permanent
        );
        assert_eq!(
            classify(&tonic::Status::invalid_argument("no such user")),
            FailureKind::Permanent
        );
        assert_eq!(
            classify(&tonic::Status::unavailable("overloaded")),
            FailureKind::Retryable
        );
    }
}
