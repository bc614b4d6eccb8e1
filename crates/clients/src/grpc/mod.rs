//! Clients of the sibling services over gRPC: the Request service ([`GrpcExecutor`]), the
//! Template service ([`GrpcTemplates`]) and the Config service's preferences
//! ([`GrpcPreferences`]). Each holds one shared HTTP/2 channel with keepalive, sets a deadline
//! on every call (sent as `grpc-timeout`, so the callee knows it too) and maps status codes to
//! retryable or permanent failures with [`failure_kind`].

mod convert;
mod preferences;
mod request;
mod template;

use std::time::Duration;

use batch_domain::retry::FailureKind;
use batch_ports::SourceError;
use tonic::transport::{Channel, Endpoint};

pub use preferences::{GrpcPreferences, WatchSettings};
pub use request::GrpcExecutor;
pub use template::GrpcTemplates;

/// How a client reaches its service.
#[derive(Debug, Clone)]
pub struct ChannelSettings {
    /// The service's address, `http://host:port`.
    pub endpoint: String,
    /// The deadline of each call.
    pub timeout: Duration,
    /// How long connecting may take.
    pub connect_timeout: Duration,
    /// HTTP/2 keepalive ping interval, so dead connections are noticed between calls.
    pub keepalive: Duration,
}

impl ChannelSettings {
    /// Settings for `endpoint` with the defaults: 30 s calls, 5 s to connect, a ping every
    /// 30 s.
    pub fn new(endpoint: impl Into<String>) -> Self {
        ChannelSettings {
            endpoint: endpoint.into(),
            timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            keepalive: Duration::from_secs(30),
        }
    }
}

/// The endpoint is not a valid address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{endpoint:?} is not a valid gRPC endpoint (http://host:port): {reason}")]
pub struct BadEndpoint {
    /// The endpoint as given.
    pub endpoint: String,
    /// Why it is not valid.
    pub reason: String,
}

/// One lazily connected channel: building it never fails for a service that is down (calls
/// fail, and reconnect, instead).
///
/// # Errors
/// [`BadEndpoint`] when the endpoint is not an `http://` or `https://` address.
pub fn channel(settings: &ChannelSettings) -> Result<Channel, BadEndpoint> {
    let bad = |reason: String| BadEndpoint {
        endpoint: settings.endpoint.clone(),
        reason,
    };
    if !(settings.endpoint.starts_with("http://") || settings.endpoint.starts_with("https://")) {
        return Err(bad("the scheme must be http or https".to_owned()));
    }
    let endpoint = Endpoint::from_shared(settings.endpoint.clone())
        .map_err(|e| bad(e.to_string()))?
        .connect_timeout(settings.connect_timeout)
        .http2_keep_alive_interval(settings.keepalive)
        .keep_alive_timeout(settings.keepalive)
        .keep_alive_while_idle(true)
        .tcp_nodelay(true);
    Ok(endpoint.connect_lazy())
}

/// Whether a call that ended with `code` may succeed when tried again: the service was
/// unavailable, overloaded, too slow, or the call was aborted or cut (transport errors arrive
/// as `UNKNOWN` or `CANCELLED`). Everything else — bad arguments, missing or forbidden things,
/// failed preconditions, `INTERNAL` bugs — fails the same way again.
pub fn failure_kind(code: tonic::Code) -> FailureKind {
    use tonic::Code;
    match code {
        Code::Unavailable
        | Code::DeadlineExceeded
        | Code::ResourceExhausted
        | Code::Aborted
        | Code::Cancelled
        | Code::Unknown => FailureKind::Retryable,
        Code::Ok
        | Code::InvalidArgument
        | Code::NotFound
        | Code::AlreadyExists
        | Code::PermissionDenied
        | Code::FailedPrecondition
        | Code::OutOfRange
        | Code::Unimplemented
        | Code::Internal
        | Code::DataLoss
        | Code::Unauthenticated => FailureKind::Permanent,
    }
}

/// A failed call to a source, as the ports say it.
fn source_error(service: &str, status: &tonic::Status) -> SourceError {
    let message = format!("{service}: {} ({:?})", status.message(), status.code());
    match (status.code(), failure_kind(status.code())) {
        (tonic::Code::NotFound, _) => SourceError::NotFound(message),
        (_, FailureKind::Retryable | FailureKind::NotAttempted { .. }) => {
            SourceError::Unavailable(message)
        }
        (_, FailureKind::Permanent) => SourceError::Unexpected(message),
    }
}

/// A request with the call deadline set (tonic sends it as `grpc-timeout`).
fn with_deadline<T>(message: T, timeout: Duration) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(timeout);
    request
}
