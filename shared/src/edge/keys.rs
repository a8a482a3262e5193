//! API keys (`API_KEYS_FILE`): which key a request carries (`Authorization:
//! Bearer`, or `x-api-key` as some SDKs send it), whether the file's hashes
//! hold it, and the key's name for the access log, the metrics and the rate
//! limit. The file holds SHA-256 hashes, never keys, and is re-read when it
//! changes ([`super::watched`]).

use std::collections::HashMap;
use std::sync::Arc;

use http::header::{self, HeaderMap, HeaderValue};
use http::StatusCode;

use super::front::{error, Answer};
use super::watched::Watched;

/// Longest key looked at; a longer one is refused before it is hashed.
pub const MAX_KEY_BYTES: usize = 512;
/// The name of a key its line does not name.
pub const UNNAMED: &str = "unnamed";
/// The request header that carries an authenticated key's name over the ring
/// (and to `WORKER_COMMAND` copies). Only the front door sets it; every
/// incoming header of this name is removed.
pub const KEY_NAME_HEADER: &str = "x-tandem-api-key-name";

/// The keys of one version of the file, by hash.
#[derive(Debug, Default)]
pub struct KeySet {
    by_hash: HashMap<[u8; 32], Arc<str>>,
}

impl KeySet {
    /// The name of `key`, when the file admits it.
    fn name_of(&self, key: &[u8]) -> Option<&Arc<str>> {
        self.by_hash.get(&crate::certs::primitives::sha256(key))
    }

    fn read(path: &std::path::Path) -> Result<KeySet, String> {
        let lines = tandem_config::access::read_key_file(path)?;
        let by_hash = lines.into_iter().map(|l| (l.sha256, Arc::from(l.name.as_deref().unwrap_or(UNNAMED)))).collect();
        Ok(KeySet { by_hash })
    }
}

/// A request's key, as it was sent.
#[derive(Debug, PartialEq, Eq)]
pub enum Presented<'a> {
    /// None at all.
    None,
    /// This key.
    Key(&'a [u8]),
    /// Something that cannot be a key (why, for the 401).
    Malformed(&'static str),
}

/// The key a request carries. `Authorization` counts when its scheme is
/// `Bearer` (any case); another scheme is left for whatever is behind tandem.
/// Two values of one header, or two different keys, are refused rather than
/// guessed between.
pub fn presented(headers: &HeaderMap) -> Presented<'_> {
    let mut bearer = None;
    let mut auths = headers.get_all(header::AUTHORIZATION).iter();
    if let Some(v) = auths.next() {
        if auths.next().is_some() {
            return Presented::Malformed("more than one Authorization header");
        }
        let v = v.as_bytes();
        let scheme_end = v.iter().position(|&b| b == b' ').unwrap_or(v.len());
        if v[..scheme_end].eq_ignore_ascii_case(b"bearer") {
            bearer = Some(v[scheme_end..].trim_ascii());
        }
    }
    let mut apis = headers.get_all("x-api-key").iter();
    let api = match apis.next() {
        Some(v) if apis.next().is_none() => Some(v.as_bytes().trim_ascii()),
        Some(_) => return Presented::Malformed("more than one x-api-key header"),
        None => None,
    };
    let key = match (bearer, api) {
        (Some(a), Some(b)) if a != b => {
            return Presented::Malformed("Authorization and x-api-key carry different keys")
        }
        (Some(k), _) | (None, Some(k)) => k,
        (None, None) => return Presented::None,
    };
    if key.is_empty() {
        return Presented::Malformed("the key is empty");
    }
    if key.len() > MAX_KEY_BYTES || !key.iter().all(|b| b.is_ascii_graphic()) {
        return Presented::Malformed("that is not an API key");
    }
    Presented::Key(key)
}

/// Who a request proved to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// The holder of the key with this name.
    Key(Arc<str>),
    /// A verified client certificate standing in for a key (`API_KEYS_ALLOW_MTLS`).
    Certificate,
}

/// The API keys of one worker (shared by its listeners).
#[derive(Debug)]
pub struct ApiKeys {
    file: Watched<KeySet>,
    allow_mtls: bool,
}

impl ApiKeys {
    /// Reads `path` (checked at start-up; if it has become unusable since, every
    /// key is refused until it is fixed).
    pub fn new(path: std::path::PathBuf, allow_mtls: bool) -> Self {
        ApiKeys { file: Watched::new(path, "API_KEYS_FILE", KeySet::read), allow_mtls }
    }

    /// Who the request is, or the answer that refuses it: 401 with
    /// `WWW-Authenticate: Bearer` (RFC 6750) for a missing or wrong key,
    /// counted into `stats`; `has_certificate` says a client certificate was verified.
    pub fn check(
        &self,
        headers: &HeaderMap,
        has_certificate: bool,
        stats: Option<&crate::stats::Stats>,
    ) -> Result<Caller, Box<Answer>> {
        let count = |event: usize| {
            if let Some(s) = stats {
                s.access(event);
            }
        };
        let key = match presented(headers) {
            Presented::Key(k) => k,
            Presented::None if self.allow_mtls && has_certificate => return Ok(Caller::Certificate),
            Presented::None => {
                count(crate::stats::access_event::MISSING_KEY);
                let hint = if self.allow_mtls { ", or a client certificate" } else { "" };
                return Err(Box::new(unauthorized(
                    &format!("this API needs a key: send Authorization: Bearer <key> or x-api-key: <key>{hint}"),
                    None,
                )));
            }
            Presented::Malformed(why) => {
                count(crate::stats::access_event::INVALID_KEY);
                return Err(Box::new(unauthorized(why, Some("invalid_request"))));
            }
        };
        let Some(keys) = self.file.current() else {
            return Err(Box::new(error(
                StatusCode::SERVICE_UNAVAILABLE,
                "the server cannot read its API key file; its log says why",
            )));
        };
        match keys.name_of(key) {
            Some(name) => Ok(Caller::Key(name.clone())),
            None => {
                count(crate::stats::access_event::INVALID_KEY);
                Err(Box::new(unauthorized("the API key is not valid", Some("invalid_token"))))
            }
        }
    }

    /// The name of the good key `headers` carry, if any: an open path (a
    /// health check) still knows who asks, and refuses nobody.
    pub fn identify(&self, headers: &HeaderMap) -> Option<Arc<str>> {
        let Presented::Key(key) = presented(headers) else { return None };
        self.file.current()?.name_of(key).cloned()
    }
}

/// A 401 saying what to send; `code` is RFC 6750's error code, when the request had a try.
fn unauthorized(message: &str, code: Option<&str>) -> Answer {
    let mut res = error(StatusCode::UNAUTHORIZED, message);
    let challenge = match code {
        Some(code) => format!("Bearer error=\"{code}\""),
        None => "Bearer".to_string(),
    };
    if let Ok(v) = HeaderValue::from_str(&challenge) {
        res.headers_mut().insert(header::WWW_AUTHENTICATE, v);
    }
    res
}

/// A new random key: `tdm_` and 43 URL-safe base64 characters (256 bits).
pub fn new_key() -> Result<String, aws_lc_rs::error::Unspecified> {
    use base64::Engine as _;
    let mut bytes = [0u8; 32];
    aws_lc_rs::rand::fill(&mut bytes)?;
    Ok(format!("tdm_{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)))
}

/// The `API_KEYS_FILE` line for `key` named `name`.
pub fn key_line(key: &str, name: &str) -> String {
    format!("sha256:{} {name}", crate::certs::primitives::hex(&crate::certs::primitives::sha256(key.as_bytes())))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly by design")]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(http::header::HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn a_key_is_read_from_either_header_in_any_spelling() {
        for pairs in [
            vec![("authorization", "Bearer k1")],
            vec![("Authorization", "bearer   k1 ")],
            vec![("AUTHORIZATION", "BEARER k1")],
            vec![("x-api-key", "k1")],
            vec![("X-Api-Key", " k1")],
            vec![("authorization", "Bearer k1"), ("x-api-key", "k1")],
            vec![("authorization", "Basic dXNlcjpwdw=="), ("x-api-key", "k1")],
        ] {
            assert_eq!(presented(&headers(&pairs)), Presented::Key(b"k1"), "{pairs:?}");
        }
        assert_eq!(presented(&headers(&[])), Presented::None);
        assert_eq!(presented(&headers(&[("authorization", "Basic dXNlcjpwdw==")])), Presented::None);
        for pairs in [
            vec![("authorization", "Bearer a"), ("authorization", "Bearer a")],
            vec![("x-api-key", "a"), ("x-api-key", "b")],
            vec![("authorization", "Bearer a"), ("x-api-key", "b")],
            vec![("authorization", "Bearer")],
            vec![("authorization", "Bearer a b")],
            vec![("x-api-key", &"k".repeat(MAX_KEY_BYTES + 1))],
        ] {
            assert!(matches!(presented(&headers(&pairs)), Presented::Malformed(_)), "{pairs:?}");
        }
    }

    #[test]
    fn keys_are_checked_against_the_file_and_a_revoked_one_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        let (k1, k2) = (new_key().unwrap(), new_key().unwrap());
        assert!(k1.len() == 47 && k1.starts_with("tdm_") && k1 != k2);
        std::fs::write(&path, format!("{}\n{}\n", key_line(&k1, "ci"), key_line(&k2, "web"))).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let keys = ApiKeys::new(path.clone(), false);
        let check = |h: &[(&str, &str)]| keys.check(&headers(h), false, None);
        assert_eq!(check(&[("authorization", &format!("Bearer {k1}"))]).unwrap(), Caller::Key("ci".into()));
        assert_eq!(check(&[("x-api-key", &k2)]).unwrap(), Caller::Key("web".into()));
        let wrong = check(&[("x-api-key", "tdm_nope")]).unwrap_err();
        assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(wrong.headers()[header::WWW_AUTHENTICATE], "Bearer error=\"invalid_token\"");
        let missing = check(&[]).unwrap_err();
        assert_eq!(missing.headers()[header::WWW_AUTHENTICATE], "Bearer");
        // A certificate stands in for a key only when allowed.
        assert!(check(&[]).is_err() && keys.check(&headers(&[]), true, None).is_err());
        let mtls = ApiKeys::new(path.clone(), true);
        assert_eq!(mtls.check(&headers(&[]), true, None).unwrap(), Caller::Certificate);
        // Revoked by editing the file.
        std::fs::write(&path, format!("{}\n", key_line(&k2, "web"))).unwrap();
        std::thread::sleep(super::super::watched::RECHECK + std::time::Duration::from_millis(50));
        assert!(check(&[("x-api-key", &k1)]).is_err());
        assert!(check(&[("x-api-key", &k2)]).is_ok());
    }
}
