//! Restricted API categories (`RESTRICTED_API`, Triton's
//! `--http-restricted-api`): which category a request is in, and whether it
//! carries the header and secret that category needs. The front door asks
//! here on every request path (plain HTTP, HTTPS, the proxy), so the ring and
//! the copies only ever see requests that passed.

use http::header::HeaderName;
use http::{Request, StatusCode};
use tandem_config::edge::{Restriction, Secret};

use super::front::{error, Answer};
use crate::certs::primitives::sha256 as digest;

/// The category of a request to `path`, as Triton groups its HTTP API (and
/// tandem's `/` and `/metrics`); `None` for a path no category holds.
pub fn category(path: &str) -> Option<&'static str> {
    // A trailing `/` is the same route to many servers.
    let path = match path.trim_end_matches('/') {
        "" => "/",
        p => p,
    };
    match path {
        "/" => return Some("status"),
        "/metrics" => return Some("metrics"),
        "/v2" | "/v2/" => return Some("metadata"),
        "/v2/logging" => return Some("logging"),
        "/v2/models/stats" => return Some("statistics"),
        _ => {}
    }
    if let Some(method) = path.strip_prefix(GRPC_SERVICE) {
        return grpc_category(method);
    }
    if path.starts_with(GRPC_HEALTH) {
        return Some("health");
    }
    if GRPC_REFLECTION.iter().any(|p| path.starts_with(p)) {
        // The services' own description, as `/v2` describes the server.
        return Some("metadata");
    }
    let first = |prefix: &str| path.strip_prefix(prefix).is_some_and(|r| r.is_empty() || r.starts_with('/'));
    if first("/v2/health") {
        return Some("health");
    }
    if first("/v2/repository") {
        return Some("model-repository");
    }
    if first("/v2/systemsharedmemory") || first("/v2/cudasharedmemory") {
        return Some("shared-memory");
    }
    if first("/v2/trace") {
        return Some("trace");
    }
    let rest = path.strip_prefix("/v2/models/")?;
    let segs: Vec<&str> = rest.split('/').collect();
    let tail: &[&str] = match segs.as_slice() {
        [_, "versions", _, tail @ ..] => tail,
        [_, tail @ ..] => tail,
        [] => return None,
    };
    Some(match tail {
        [] | [""] => "metadata",
        ["ready"] => "health",
        ["config"] => "model-config",
        ["infer"] | ["generate"] | ["generate_stream"] => "inference",
        ["stats"] => "statistics",
        ["trace", "setting"] => "trace",
        _ => return None,
    })
}

/// The gRPC face's calls: `/inference.GRPCInferenceService/{Method}`.
pub const GRPC_SERVICE: &str = "/inference.GRPCInferenceService/";
/// gRPC's standard health service: `/grpc.health.v1.Health/{Method}`.
pub const GRPC_HEALTH: &str = "/grpc.health.v1.Health/";
/// gRPC server reflection, v1 and the v1alpha older tools ask for.
pub const GRPC_REFLECTION: [&str; 2] =
    ["/grpc.reflection.v1.ServerReflection/", "/grpc.reflection.v1alpha.ServerReflection/"];

/// The category of a gRPC call, as Triton's `--grpc-restricted-protocol` groups them.
fn grpc_category(method: &str) -> Option<&'static str> {
    Some(match method {
        "ServerLive" | "ServerReady" | "ModelReady" => "health",
        "ServerMetadata" | "ModelMetadata" => "metadata",
        "ModelInfer" | "ModelStreamInfer" => "inference",
        "ModelConfig" => "model-config",
        "ModelStatistics" => "statistics",
        "RepositoryIndex" | "RepositoryModelLoad" | "RepositoryModelUnload" => "model-repository",
        "TraceSetting" => "trace",
        "LogSettings" => "logging",
        m if m.starts_with("SystemSharedMemory") || m.starts_with("CudaSharedMemory") => "shared-memory",
        _ => return None,
    })
}

/// Whether `path` could be read differently by another server (dot
/// segments, empty segments, backslashes, once percent-decoded): with
/// restrictions on, such a path is refused rather than classified (and the
/// plain port never counts it as a health check).
pub(crate) fn ambiguous(decoded: &str) -> bool {
    let Some(rest) = decoded.strip_prefix('/') else { return true };
    // An empty segment is `//` somewhere (a trailing `/` is not one).
    rest.contains('\\') || decoded.contains("//") || rest.split('/').any(|s| s == "." || s == "..")
}

/// `path` with `%XX` escapes decoded (invalid ones kept as they are); the
/// path itself, not a copy, when it has none (the usual case).
fn percent_decoded(path: &str) -> std::borrow::Cow<'_, str> {
    if !path.contains('%') {
        return std::borrow::Cow::Borrowed(path);
    }
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1).copied().and_then(hex), bytes.get(i + 2).copied().and_then(hex)) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    std::borrow::Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

#[derive(Debug)]
enum SecretNow {
    Value([u8; 32]),
    File(super::watched::Watched<[u8; 32]>),
}

#[derive(Debug)]
struct Rule {
    categories: Vec<String>,
    header: HeaderName,
    secret: SecretNow,
}

/// The restrictions of one worker's front door.
#[derive(Debug, Default)]
pub struct Restricted {
    rules: Vec<Rule>,
}

impl Restricted {
    /// From the configured groups (header names and files were checked at start-up).
    pub fn new(groups: &[Restriction]) -> Self {
        let rules = groups
            .iter()
            .filter_map(|g| {
                let header = HeaderName::from_bytes(g.header.as_bytes()).ok()?;
                let secret = match &g.secret {
                    Secret::Value(v) => SecretNow::Value(digest(v.as_bytes())),
                    Secret::File(path) => {
                        SecretNow::File(super::watched::Watched::new(path.clone(), "RESTRICTED_API secret file", |p| {
                            tandem_config::edge::read_secret_file(p).map(|s| digest(s.as_bytes()))
                        }))
                    }
                };
                Some(Rule { categories: g.categories.clone(), header, secret })
            })
            .collect();
        Restricted { rules }
    }

    /// Whether anything is restricted.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// `None` lets the request through; else the answer that refuses it: 403
    /// naming the category and the header (never the value it needs), or 400
    /// for a path that another server could read as another category.
    pub fn check<B>(&self, req: &Request<B>) -> Option<Answer> {
        if self.rules.is_empty() {
            return None;
        }
        match classify(req.uri().path()) {
            Ok((_, category)) => self.check_category(req, category),
            Err(refused) => Some(*refused),
        }
    }

    /// [`Restricted::check`] for a request whose path [`classify`] put in `category`.
    pub fn check_category<B>(&self, req: &Request<B>, category: Option<&'static str>) -> Option<Answer> {
        let category = category?;
        let rule = self.rules.iter().find(|r| r.categories.iter().any(|c| c == category))?;
        let wanted = match &rule.secret {
            SecretNow::Value(d) => Some(*d),
            SecretNow::File(f) => f.current().map(|d| *d),
        };
        // Every value the header has is tried; each comparison takes the same time.
        let sent = req.headers().get_all(&rule.header).iter().any(|v| {
            wanted.is_some_and(|w| aws_lc_rs::constant_time::verify_slices_are_equal(&digest(v.as_bytes()), &w).is_ok())
        });
        if sent {
            return None;
        }
        Some(error(
            StatusCode::FORBIDDEN,
            &format!("the {category} API is restricted: send the {} header with its value", rule.header),
        ))
    }
}

/// A path decoded and put in its category, or the 400 for a path another
/// server could read as another category (dot segments, empty segments,
/// backslashes): access rules apply to what a path means, not how it is spelt.
pub fn classify(path: &str) -> Result<(std::borrow::Cow<'_, str>, Option<&'static str>), Box<Answer>> {
    let path = percent_decoded(path);
    if ambiguous(&path) {
        return Err(Box::new(error(
            StatusCode::BAD_REQUEST,
            "the path has dot segments, empty segments or backslashes; send it in its plain form",
        )));
    }
    let category = category(&path);
    Ok((path, category))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly by design")]
mod tests {
    use super::*;

    #[test]
    fn every_route_is_in_triton_s_category() {
        for (path, want) in [
            ("/", Some("status")),
            ("/metrics", Some("metrics")),
            ("/v2", Some("metadata")),
            ("/v2/health/live", Some("health")),
            ("/v2/health/ready", Some("health")),
            ("/v2/models/m/ready", Some("health")),
            ("/v2/models/m/versions/2/ready", Some("health")),
            ("/v2/models/m", Some("metadata")),
            ("/v2/models/m/versions/2", Some("metadata")),
            ("/v2/models/m/config", Some("model-config")),
            ("/v2/models/m/infer", Some("inference")),
            ("/v2/models/m/versions/2/infer", Some("inference")),
            ("/v2/models/m/generate", Some("inference")),
            ("/v2/models/stats", Some("statistics")),
            ("/v2/models/m/stats", Some("statistics")),
            ("/v2/repository/index", Some("model-repository")),
            ("/v2/repository/models/m/load", Some("model-repository")),
            ("/v2/systemsharedmemory/status", Some("shared-memory")),
            ("/v2/cudasharedmemory/region/x/register", Some("shared-memory")),
            ("/v2/trace/setting", Some("trace")),
            ("/v2/models/m/trace/setting", Some("trace")),
            ("/v2/logging", Some("logging")),
            ("/inference.GRPCInferenceService/ModelInfer", Some("inference")),
            ("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", Some("metadata")),
            ("/inference.GRPCInferenceService/ModelStreamInfer", Some("inference")),
            ("/inference.GRPCInferenceService/RepositoryModelUnload", Some("model-repository")),
            ("/inference.GRPCInferenceService/ModelReady", Some("health")),
            ("/inference.GRPCInferenceService/SystemSharedMemoryRegister", Some("shared-memory")),
            ("/inference.GRPCInferenceService/ModelStatistics", Some("statistics")),
            ("/inference.GRPCInferenceService/ModelConfig", Some("model-config")),
            ("/inference.GRPCInferenceService/LogSettings", Some("logging")),
            ("/grpc.health.v1.Health/Check", Some("health")),
            ("/inference.GRPCInferenceService/Other", None),
            ("/v2/repositoryx", None),
            ("/other", None),
        ] {
            assert_eq!(category(path), want, "{path}");
        }
    }

    fn req(path: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder().uri(path);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    fn restricted(secret: Secret) -> Restricted {
        Restricted::new(&[Restriction {
            categories: vec!["model-repository".into(), "statistics".into()],
            header: "x-admin-key".into(),
            secret,
        }])
    }

    #[test]
    fn a_restricted_category_needs_its_header_and_value_and_the_rest_is_open() {
        let r = restricted(Secret::Value("s3cret".into()));
        let refused = r.check(&req("/v2/repository/index", &[])).expect("refused");
        assert_eq!(refused.status(), StatusCode::FORBIDDEN);
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let bytes = runtime.block_on(http_body_util::BodyExt::collect(refused.into_body())).unwrap().to_bytes();
        let body = String::from_utf8_lossy(&bytes);
        assert!(
            body.contains("model-repository") && body.contains("x-admin-key") && !body.contains("s3cret"),
            "{body}"
        );
        for bad in ["s3cre", "s3cret ", "S3CRET", "", &"x".repeat(100_000)] {
            assert!(r.check(&req("/v2/models/m/stats", &[("x-admin-key", bad)])).is_some(), "{bad:.20}");
        }
        assert!(r.check(&req("/v2/repository/index", &[("X-Admin-Key", "s3cret")])).is_none());
        assert!(r.check(&req("/v2/repository/index", &[("x-admin-key", "no"), ("x-admin-key", "s3cret")])).is_none());
        assert!(r.check(&req("/v2/models/m/infer", &[])).is_none(), "inference is open");
        assert!(r.check(&req("/v2/repository/%69ndex", &[])).is_some(), "escapes are decoded first");
        for odd in ["/v2/models/m/../../repository/index", "/v2//repository/index", "/v2/models/m/%2e%2e/x"] {
            assert_eq!(r.check(&req(odd, &[])).expect(odd).status(), StatusCode::BAD_REQUEST, "{odd}");
        }
        assert!(Restricted::default().check(&req("/v2/repository/index", &[])).is_none());
    }

    /// How a server that normalises paths would read `path`: escapes decoded,
    /// `.` dropped, `..` taking the segment before it away, empty segments gone.
    fn normalised(path: &str) -> String {
        let decoded = percent_decoded(path).replace('\\', "/");
        let mut out: Vec<&str> = Vec::new();
        for seg in decoded.split('/') {
            match seg {
                "" | "." => {}
                ".." => {
                    out.pop();
                }
                s => out.push(s),
            }
        }
        format!("/{}", out.join("/"))
    }

    #[test]
    fn no_spelling_of_a_path_slips_past_its_category() {
        // Paths made of the pieces a bypass would use, from a fixed seed (xorshift).
        let pieces = [
            "/",
            "/",
            "v2",
            "repository",
            "index",
            "models",
            "m",
            "stats",
            "infer",
            "health",
            "ready",
            ".",
            "..",
            "%2e",
            "%2E%2e",
            "%2f",
            "%2F",
            "%5c",
            "\\",
            "%",
            "%zz",
            "versions",
            "1",
            "metrics",
            "",
        ];
        let r = restricted(Secret::Value("k".into()));
        let both = Restricted::new(&[Restriction {
            categories: vec!["status".into(), "metrics".into()],
            header: "x-k".into(),
            secret: Secret::Value("k".into()),
        }]);
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut checked = 0;
        for _ in 0..200_000 {
            let n = 1 + next() % 9;
            let mut path = String::from("/");
            for _ in 0..n {
                path.push_str(pieces[(next() % pieces.len() as u64) as usize]);
            }
            let Ok(uri) = path.parse::<http::Uri>() else { continue };
            let req = Request::builder().uri(uri).body(()).unwrap();
            let Some(seen) = category(&normalised(req.uri().path())) else { continue };
            checked += 1;
            for (rules, restricted) in [(&r, ["model-repository", "statistics"]), (&both, ["status", "metrics"])] {
                if restricted.contains(&seen) {
                    assert!(rules.check(&req).is_some(), "{path} reads as {seen} and got through");
                }
            }
        }
        assert!(checked > 10_000, "too few paths landed in a category: {checked}");
    }

    #[test]
    fn a_secret_file_is_reread_when_it_changes_and_a_bad_one_keeps_the_last() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("key");
        std::fs::write(&file, "one\n").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let r = restricted(Secret::File(file.clone()));
        let with = |v: &str| r.check(&req("/v2/repository/index", &[("x-admin-key", v)])).is_none();
        assert!(with("one") && !with("two"));
        std::fs::write(&file, "two-and-longer\n").unwrap();
        std::thread::sleep(super::super::watched::RECHECK + std::time::Duration::from_millis(50));
        assert!(with("two-and-longer") && !with("one"));
        // Readable by others: refused, the last good value stays.
        std::fs::write(&file, "three\n").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::thread::sleep(super::super::watched::RECHECK + std::time::Duration::from_millis(50));
        assert!(with("two-and-longer") && !with("three"));
    }
}
