//! Who may pass the front door and how often: the API key a request carries
//! ([`super::keys`]), then the caller's rate limit ([`super::limit`]). Health
//! checks pass without a key (unless `API_KEYS_PROTECT_HEALTH`) and are never
//! rate-limited: an orchestrator's probe must not be turned away.

use std::sync::Arc;

use http::header::{self, HeaderValue};
use http::{Request, StatusCode};
use tandem_config::access::{Access, Network};

use super::front::{error, Answer};
use super::keys::{ApiKeys, Caller};
use super::limit::{client_address, ClientKey, Limiter};
use super::serve::{ClientIdentity, Peer};
use crate::stats::Stats;

/// The name of the API key a request proved it holds (a request extension,
/// set by the front door for the access log, the metrics and the request path).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyName(pub Arc<str>);

/// One worker's access control.
#[derive(Debug)]
pub struct Gate {
    keys: Option<ApiKeys>,
    protect_health: bool,
    limiter: Option<(Limiter, String)>,
    trusted: Vec<Network>,
    stats: Stats,
}

/// Whether `path` (in `category`) is one of the health checks: `/v2/health/live`,
/// `/v2/health/ready` or a model's readiness; not anything else under `/v2/health/`.
pub(crate) fn is_health_check(path: &str, category: Option<&str>) -> bool {
    let path = path.trim_end_matches('/');
    category == Some("health")
        && (!path.starts_with("/v2/health") || matches!(path, "/v2/health/live" | "/v2/health/ready"))
}

impl Gate {
    /// The gate `access` asks for, counting into `stats`; `None` when it asks for nothing.
    pub fn new(access: &Access, stats: &Stats) -> Option<Gate> {
        if access.api_keys.is_none() && access.rate_limit.is_none() {
            return None;
        }
        Some(Gate {
            keys: access.api_keys.clone().map(|p| ApiKeys::new(p, access.allow_mtls)),
            protect_health: access.protect_health,
            limiter: access.rate_limit.map(|r| (Limiter::new(stats.shared_region(), &r), r.text())),
            trusted: access.trusted_proxies.clone(),
            stats: stats.clone(),
        })
    }

    /// `None` lets `req` through, with its key's [`KeyName`] in its
    /// extensions; else the answer that refuses it: 401 without a good key,
    /// 429 over the rate limit. `health` says it is a health check.
    pub fn admit<B>(&self, req: &mut Request<B>, health: bool) -> Option<Answer> {
        let certificate = req.extensions().get::<Arc<ClientIdentity>>().cloned();
        let caller = match &self.keys {
            Some(keys) if !health || self.protect_health => {
                match keys.check(req.headers(), certificate.is_some(), Some(&self.stats)) {
                    Ok(caller) => Some(caller),
                    Err(refused) => return Some(*refused),
                }
            }
            Some(keys) => keys.identify(req.headers()).map(Caller::Key),
            None => None,
        };
        let name = match &caller {
            Some(Caller::Key(name)) => {
                req.extensions_mut().insert(KeyName(name.clone()));
                Some(name.clone())
            }
            _ => None,
        };
        let (limiter, rate) = self.limiter.as_ref().filter(|_| !health)?;
        let client = match (name, certificate) {
            (Some(name), _) => ClientKey::Key(name),
            (None, Some(cert)) => ClientKey::Certificate(cert.fingerprint.clone()),
            (None, None) => {
                let peer = req.extensions().get::<Peer>()?.0.ip();
                ClientKey::address(client_address(peer, req.headers(), &self.trusted))
            }
        };
        let limited = limiter.admit(&client).err()?;
        self.stats.access(client.limited_event());
        if let ClientKey::Key(name) = &client {
            self.stats.client_limited(name);
        }
        let after = limited.retry_after();
        let mut res = error(
            StatusCode::TOO_MANY_REQUESTS,
            &format!("{} is over its rate limit (RATE_LIMIT={rate}); retry in {after} s", client.describe()),
        );
        res.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(after));
        Some(res)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_health_checks_are_health_checks() {
        for p in [
            "/v2/health/live",
            "/v2/health/ready",
            "/v2/models/m/ready",
            "/v2/models/m/versions/1/ready",
            "/inference.GRPCInferenceService/ServerReady",
            "/grpc.health.v1.Health/Check",
        ] {
            assert!(is_health_check(p, super::super::restricted::category(p)), "{p}");
        }
        for p in [
            "/v2/health/debug",
            "/v2/health",
            "/v2/models/m/infer",
            "/metrics",
            "/inference.GRPCInferenceService/ModelInfer",
        ] {
            assert!(!is_health_check(p, super::super::restricted::category(p)), "{p}");
        }
    }
}
