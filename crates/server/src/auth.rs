//! Who is calling: bearer tokens mapped to tenants. The tenant of every call comes from the
//! caller's token, never from the request body.

use std::sync::Arc;

use batch_domain::TenantId;
use tonic::{Request, Status};

/// The authenticated caller, put into each request's extensions by [`Tokens::check`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Caller {
    /// A tenant's service or user: sees that tenant only.
    Tenant(TenantId),
    /// An operator: sees every tenant (`*` in the token table, or the unauthenticated embedded
    /// default on loopback).
    Operator,
}

impl Caller {
    /// Whether the caller may see data of `tenant`.
    pub(crate) fn sees(&self, tenant: &TenantId) -> bool {
        match self {
            Caller::Tenant(own) => own == tenant,
            Caller::Operator => true,
        }
    }
}

/// A known credential: a bearer token as given, or only its SHA-256 (`sha256:<64 hex digits>`
/// in the table, so the configuration need not hold the secret itself), or the SHA-256 of a
/// client certificate (`cert-sha256:<64 hex digits>`) presented over mutual TLS.
#[derive(Debug, Clone)]
enum Secret {
    Plain(Vec<u8>),
    Sha256([u8; 32]),
    Certificate([u8; 32]),
}

/// The token table: `token=tenant` pairs (`token=*` for operators; `sha256:<hex>=tenant` for a
/// token given by its hash).
#[derive(Debug, Clone, Default)]
pub(crate) struct Tokens {
    entries: Arc<Vec<(Secret, Caller)>>,
}

fn sha256_hex(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

impl Tokens {
    /// Parses `token=tenant,token=tenant,…` (whitespace around entries is ignored).
    ///
    /// # Errors
    /// A message naming the entry that is not `token=tenant` or whose tenant is not an id; the
    /// token itself is never repeated in it.
    pub(crate) fn parse(text: &str) -> Result<Tokens, String> {
        let mut entries = Vec::new();
        for (n, entry) in text
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .enumerate()
        {
            let Some((token, tenant)) = entry.split_once('=') else {
                return Err(format!("token entry {} is not token=tenant", n + 1));
            };
            let (token, tenant) = (token.trim(), tenant.trim());
            let hash = |hex: &str| {
                sha256_hex(hex)
                    .ok_or_else(|| format!("token entry {}: the hash needs 64 hex digits", n + 1))
            };
            let secret = if let Some(hex) = token.strip_prefix("cert-sha256:") {
                Secret::Certificate(hash(hex)?)
            } else if let Some(hex) = token.strip_prefix("sha256:") {
                Secret::Sha256(hash(hex)?)
            } else {
                match token {
                    token if token.len() < 8 => {
                        return Err(format!(
                            "token entry {} is shorter than 8 characters",
                            n + 1
                        ));
                    }
                    token => Secret::Plain(token.as_bytes().to_vec()),
                }
            };
            let caller = if tenant == "*" {
                Caller::Operator
            } else {
                Caller::Tenant(
                    TenantId::parse(tenant)
                        .map_err(|e| format!("token entry {}: tenant: {e}", n + 1))?,
                )
            };
            entries.push((secret, caller));
        }
        Ok(Tokens {
            entries: Arc::new(entries),
        })
    }

    /// Whether no token is configured (the embedded default).
    pub(crate) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The caller presenting `token`, comparing in constant time against every entry.
    fn caller(&self, token: &[u8]) -> Option<Caller> {
        use sha2::Digest;
        let digest: [u8; 32] = sha2::Sha256::digest(token).into();
        let mut found = None;
        for (known, caller) in self.entries.iter() {
            let matches = match known {
                Secret::Plain(known) => constant_time_eq::constant_time_eq(known, token),
                Secret::Sha256(known) => constant_time_eq::constant_time_eq_32(known, &digest),
                Secret::Certificate(_) => false,
            };
            if matches && found.is_none() {
                found = Some(caller.clone());
            }
        }
        found
    }

    /// The caller whose client certificate (DER) is `certificate`.
    fn certified(&self, certificate: &[u8]) -> Option<Caller> {
        use sha2::Digest;
        let digest: [u8; 32] = sha2::Sha256::digest(certificate).into();
        self.entries.iter().find_map(|(known, caller)| match known {
            Secret::Certificate(known) if constant_time_eq::constant_time_eq_32(known, &digest) => {
                Some(caller.clone())
            }
            _ => None,
        })
    }

    /// The interceptor: with credentials configured, a call without a known bearer token (or,
    /// over mutual TLS, a known client certificate) is `UNAUTHENTICATED`; without any, every
    /// caller is an operator.
    pub(crate) fn check(&self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let certified = request
            .peer_certs()
            .and_then(|chain| chain.first().and_then(|leaf| self.certified(leaf.as_ref())));
        let caller = if self.is_empty() {
            Caller::Operator
        } else if request.metadata().get("authorization").is_none()
            && let Some(caller) = certified
        {
            caller
        } else {
            let header = request
                .metadata()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| Status::unauthenticated("a bearer token is required"))?;
            let token = header
                .strip_prefix("Bearer ")
                .or_else(|| header.strip_prefix("bearer "))
                .ok_or_else(|| {
                    Status::unauthenticated("the authorization is not a bearer token")
                })?;
            self.caller(token.trim().as_bytes())
                .ok_or_else(|| Status::unauthenticated("unknown bearer token"))?
        };
        request.extensions_mut().insert(caller);
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_map_to_tenants_and_bad_entries_are_named_without_the_token() {
        let tokens = Tokens::parse(" secret-acme=acme, root-token=* ,").unwrap_or_default();
        assert_eq!(
            tokens.caller(b"secret-acme"),
            Some(Caller::Tenant(
                TenantId::parse("acme").unwrap_or_else(|_| unreachable!())
            ))
        );
        assert_eq!(tokens.caller(b"root-token"), Some(Caller::Operator));
        assert_eq!(tokens.caller(b"secret-acm"), None);
        // sha256("hashed-token-1")
        let hashed = Tokens::parse(
            "sha256:b994b24ad665aa12e2de126ec0de71a49b933e8792fef3a93a09434c438befad=globex",
        )
        .unwrap_or_default();
        assert_eq!(
            hashed.caller(b"hashed-token-1"),
            Some(Caller::Tenant(
                TenantId::parse("globex").unwrap_or_else(|_| unreachable!())
            ))
        );
        assert_eq!(hashed.caller(b"hashed-token-2"), None);
        assert!(Tokens::parse("sha256:abcd=globex").is_err());
        let error = Tokens::parse("tiny=acme").unwrap_err();
        assert!(
            error.contains("entry 1") && !error.contains("tiny"),
            "{error}"
        );
        let error = Tokens::parse("long-enough-token").unwrap_err();
        assert!(!error.contains("long-enough"), "{error}");
    }
}
