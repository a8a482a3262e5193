//! Who may call the API and how often: API keys (`API_KEYS_FILE`), per-client
//! rate limits (`RATE_LIMIT`) and the proxies whose `X-Forwarded-For` is
//! believed (`TRUSTED_PROXIES`). The front door enforces them on every
//! request path (`shared::edge::keys`, `shared::edge::limit`).

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::scope::always;
use crate::{values, Reader};

crate::declare! {
    API_KEYS_FILE {
        default: "(none: no key needed)",
        doc: "a file of API keys, one `sha256:<hex> name` line per key (hashes, not keys; `tandem apikey new NAME` makes one); every request but health checks must then send `Authorization: Bearer <key>` or `x-api-key: <key>`, else 401; re-read when it changes (a broken file keeps the last good keys)",
        accepted: "the path of a regular file only its owner can read (chmod 600), of `sha256:<64 hex digits> [name]` lines (# comments)",
        scope: always,
    }
    API_KEYS_PROTECT_HEALTH {
        default: "false",
        doc: "health checks (/v2/health/*, model readiness) need a key too; `tandem health` then sends HEALTH_API_KEY",
        accepted: values::BOOL,
        scope: keys,
    }
    API_KEYS_ALLOW_MTLS {
        default: "false",
        doc: "a verified client certificate (SSL_CLIENT_AUTH) stands in for an API key",
        accepted: values::BOOL,
        scope: keys,
    }
    HEALTH_API_KEY {
        default: "(none)",
        doc: "the API key `tandem health` sends (with API_KEYS_PROTECT_HEALTH=true): the key, or @/path/to/file",
        accepted: "a key, or @ and a file only its owner can read",
        scope: protected_health,
    }
    RATE_LIMIT {
        default: "(none: no limit)",
        doc: "requests each client may make, for the whole server (every worker shares one budget per client): `100/s` or `6000/m`, with an optional `burst=N` (default: one second's worth); over it, 429 with Retry-After; the client is its API key's name, else its client certificate, else its address (an IPv6 /64)",
        accepted: "a rate N/s, N/m or N/h (N from 1 to 1000000), optionally `,burst=N` (1 to 1000000), such as 100/s,burst=200",
        scope: always,
    }
    TRUSTED_PROXIES {
        default: "(none)",
        doc: "addresses or networks of proxies in front of tandem (10.0.0.0/8,::1); a request from one of them is counted against the client its X-Forwarded-For names",
        accepted: "comma-separated IP addresses or CIDR networks, such as 10.0.0.0/8,192.0.2.7,fd00::/8",
        scope: rate_limited,
    }
}

/// Acts with `API_KEYS_FILE`.
fn keys(c: &crate::Config) -> Option<&'static str> {
    c.edge.access.api_keys.is_none().then_some("API_KEYS_FILE is not set; set it to require API keys")
}

/// Acts with `API_KEYS_PROTECT_HEALTH=true`.
fn protected_health(c: &crate::Config) -> Option<&'static str> {
    keys(c).or_else(|| {
        (!c.edge.access.protect_health).then_some("API_KEYS_PROTECT_HEALTH is false: health checks need no key")
    })
}

/// Acts with `RATE_LIMIT`.
fn rate_limited(c: &crate::Config) -> Option<&'static str> {
    c.edge
        .access
        .rate_limit
        .is_none()
        .then_some("RATE_LIMIT is not set; the forwarded address is read only to rate-limit")
}

/// The access section.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Access {
    /// `API_KEYS_FILE`.
    pub api_keys: Option<PathBuf>,
    /// Health checks need a key too.
    pub protect_health: bool,
    /// A verified client certificate counts as a key.
    pub allow_mtls: bool,
    /// `RATE_LIMIT`.
    pub rate_limit: Option<RateLimit>,
    /// `TRUSTED_PROXIES`.
    pub trusted_proxies: Vec<Network>,
    /// `HEALTH_API_KEY`: what `tandem health` sends.
    pub health_key: Option<crate::edge::Secret>,
}

/// A per-client rate: one request every `interval_ns`, `burst` at once
/// (written and read as the setting spells it: `100/s,burst=200`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct RateLimit {
    /// Requests per `per_seconds`, as configured.
    pub requests: u64,
    /// 1, 60 or 3600.
    pub per_seconds: u64,
    /// Requests a client may make at once after a pause.
    pub burst: u64,
}

impl RateLimit {
    /// Nanoseconds between two requests at the steady rate.
    pub fn interval_ns(&self) -> u64 {
        (self.per_seconds * 1_000_000_000 / self.requests).max(1)
    }

    /// As the setting spells it.
    pub fn text(&self) -> String {
        let unit = match self.per_seconds {
            1 => "s",
            60 => "m",
            _ => "h",
        };
        format!("{}/{unit},burst={}", self.requests, self.burst)
    }
}

impl From<RateLimit> for String {
    fn from(r: RateLimit) -> String {
        r.text()
    }
}

impl TryFrom<String> for RateLimit {
    type Error = String;
    fn try_from(v: String) -> Result<Self, String> {
        rate(&v).ok_or_else(|| format!("not a rate: {v}"))
    }
}

/// An address or a network (CIDR), host bits cleared (written and read as
/// `10.0.0.0/8`; an address alone is its own network, `/32` or `/128`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct Network(ipnet::IpNet);

impl Network {
    /// Whether `ip` is in this network (an IPv4-mapped IPv6 address counts as its IPv4 address).
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.contains(&ip.to_canonical())
    }

    /// The network's address (host bits zero).
    pub fn addr(&self) -> IpAddr {
        self.0.network()
    }

    /// `10.0.0.0/8`, `192.0.2.7` or `fd00::/8`; an IPv4-mapped IPv6
    /// address or network (`::ffff:10.0.0.0/104`) is its IPv4 one, since
    /// clients' addresses are compared in that form.
    pub fn parse(v: &str) -> Option<Network> {
        let net = match v.split_once('/') {
            Some(_) => v.parse::<ipnet::IpNet>().ok()?,
            None => ipnet::IpNet::from(v.parse::<IpAddr>().ok()?),
        };
        let net = match net {
            ipnet::IpNet::V6(n) => match n.addr().to_ipv4_mapped() {
                Some(v4) => ipnet::IpNet::V4(ipnet::Ipv4Net::new(v4, n.prefix_len().checked_sub(96)?).ok()?),
                None => net,
            },
            v4 => v4,
        };
        Some(Network(net.trunc()))
    }
}

impl From<Network> for String {
    fn from(n: Network) -> String {
        n.0.to_string()
    }
}

impl TryFrom<String> for Network {
    type Error = String;
    fn try_from(v: String) -> Result<Self, String> {
        Network::parse(&v).ok_or_else(|| format!("not an address or network: {v}"))
    }
}

/// One line of an API key file: the key's SHA-256 and its name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyLine {
    /// SHA-256 of the key as clients send it.
    pub sha256: [u8; 32],
    /// The key's name (the access log's and the metrics' `client`); `None` unnamed.
    pub name: Option<String>,
}

/// Longest key name (it is a metrics label and a log field).
pub const MAX_KEY_NAME: usize = 64;
/// Largest key file read.
const MAX_KEY_FILE: u64 = 1 << 20;

/// Whether `name` may name a key: 1 to 64 of `A-Z a-z 0-9 . _ - @ :`.
pub fn is_key_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_KEY_NAME
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "._-@:".contains(c))
}

/// The keys in an API key file's text, or why it cannot be used. No message
/// repeats a line: an operator who pasted a key instead of its hash must not
/// find it in the log.
pub fn parse_key_file(text: &str) -> Result<Vec<KeyLine>, String> {
    let mut out: Vec<KeyLine> = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let n = n + 1;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        // A word starting with # starts a comment.
        let mut words = line.split_whitespace().take_while(|w| !w.starts_with('#'));
        let hash = words.next().unwrap_or_default();
        let Some(hex) = hash.strip_prefix("sha256:") else {
            return Err(format!(
                "line {n} does not start with sha256: (the file holds keys' hashes, never keys; `tandem apikey new NAME` prints the line to add)"
            ));
        };
        let sha256 = hex_digest(hex).ok_or(format!("line {n}: sha256: must be followed by 64 hex digits"))?;
        let name = words.next().map(String::from);
        if name.as_deref().is_some_and(|n| !is_key_name(n)) {
            return Err(format!("line {n}: a key's name is 1 to {MAX_KEY_NAME} of A-Z a-z 0-9 . _ - @ :"));
        }
        if words.next().is_some() {
            return Err(format!("line {n} has more than a hash and a name"));
        }
        if out.iter().any(|k| k.sha256 == sha256) {
            return Err(format!("line {n} repeats the hash of an earlier line"));
        }
        out.push(KeyLine { sha256, name });
    }
    Ok(out)
}

fn hex_digest(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 || !hex.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// The keys in the file at `path`, read with the rules of every secret file
/// (regular, only its owner can read it), or why not.
pub fn read_key_file(path: &Path) -> Result<Vec<KeyLine>, String> {
    let text = crate::edge::read_private_file(path, MAX_KEY_FILE)?;
    parse_key_file(&text).map_err(|why| format!("{}: {why}", path.display()))
}

fn rate(v: &str) -> Option<RateLimit> {
    let mut parts = v.split(',').map(str::trim);
    let (n, unit) = parts.next()?.split_once('/')?;
    let requests = values::range(n.trim(), 1u64, 1_000_000)?;
    let per_seconds = match unit.trim().to_ascii_lowercase().as_str() {
        "s" | "sec" | "second" => 1,
        "m" | "min" | "minute" => 60,
        "h" | "hour" => 3600,
        _ => return None,
    };
    let mut burst = None;
    for p in parts {
        let (k, v) = p.split_once('=')?;
        if !k.trim().eq_ignore_ascii_case("burst") || burst.is_some() {
            return None;
        }
        burst = Some(values::range(v.trim(), 1u64, 1_000_000)?);
    }
    // One second's worth by default (at least one request).
    let burst = burst.unwrap_or_else(|| requests.div_ceil(per_seconds).max(1));
    Some(RateLimit { requests, per_seconds, burst })
}

/// Reads the access section.
pub fn parse(r: &mut Reader) -> Access {
    let api_keys = r.get(&API_KEYS_FILE, None, |v| Some(Some(PathBuf::from(v))));
    if let Some(path) = &api_keys {
        if let Err(why) = read_key_file(path) {
            r.bad(&API_KEYS_FILE, &path.display().to_string(), format!("{}; {why}", API_KEYS_FILE.accepted));
        }
    }
    let protect_health = r.get(&API_KEYS_PROTECT_HEALTH, false, values::parse_bool);
    let allow_mtls = r.get(&API_KEYS_ALLOW_MTLS, false, values::parse_bool);
    let health_key = match r.value(&HEALTH_API_KEY).map(|v| v.trim().to_string()) {
        None => None,
        Some(v) => match v.strip_prefix('@') {
            Some(path) => match crate::edge::read_secret_file(Path::new(path)) {
                Ok(_) => Some(crate::edge::Secret::File(PathBuf::from(path))),
                Err(why) => {
                    r.bad(
                        &HEALTH_API_KEY,
                        "(not shown: it may hold a key)",
                        format!("{}; {why}", HEALTH_API_KEY.accepted),
                    );
                    None
                }
            },
            None => Some(crate::edge::Secret::Value(v)),
        },
    };
    let rate_limit = r.get(&RATE_LIMIT, None, |v| rate(v).map(Some));
    let trusted_proxies = r.get(&TRUSTED_PROXIES, Vec::new(), |v| {
        let list: Option<Vec<Network>> = values::list(v).iter().map(|n| Network::parse(n)).collect();
        list.filter(|l| !l.is_empty())
    });
    Access { api_keys, protect_health, allow_mtls, rate_limit, trusted_proxies, health_key }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly by design")]
mod tests {
    use super::*;

    #[test]
    fn rates_read_as_operators_write_them() {
        assert_eq!(rate("100/s"), Some(RateLimit { requests: 100, per_seconds: 1, burst: 100 }));
        assert_eq!(rate("100/s, burst=200"), Some(RateLimit { requests: 100, per_seconds: 1, burst: 200 }));
        assert_eq!(rate("6000/m"), Some(RateLimit { requests: 6000, per_seconds: 60, burst: 100 }));
        assert_eq!(rate("10/h"), Some(RateLimit { requests: 10, per_seconds: 3600, burst: 1 }));
        assert_eq!(rate("100/s").unwrap().interval_ns(), 10_000_000);
        assert_eq!(rate("7/s,burst=3").unwrap().text(), "7/s,burst=3");
        for bad in
            ["", "100", "0/s", "100/d", "100/s,burst=0", "100/s,burst=x", "100/s,rate=3", "1/s,burst=1,burst=2", "-1/s"]
        {
            assert_eq!(rate(bad), None, "{bad}");
        }
    }

    #[test]
    fn rates_and_networks_travel_as_they_are_written() {
        let r = rate("100/s,burst=200").unwrap();
        assert_eq!(serde_json::to_value(r).unwrap(), "100/s,burst=200");
        assert_eq!(serde_json::from_value::<RateLimit>("100/s,burst=200".into()).unwrap(), r);
        let n = Network::parse("fd00::1/8").unwrap();
        assert_eq!(serde_json::to_value(n).unwrap(), "fd00::/8");
        assert_eq!(serde_json::from_value::<Network>("fd00::/8".into()).unwrap(), n);
    }

    #[test]
    fn networks_hold_their_addresses() {
        let n = Network::parse("10.1.2.3/8").unwrap();
        assert_eq!(n.addr(), "10.0.0.0".parse::<IpAddr>().unwrap());
        assert!(n.contains("10.200.0.1".parse().unwrap()) && !n.contains("11.0.0.1".parse().unwrap()));
        assert!(n.contains("::ffff:10.0.0.9".parse().unwrap()), "an IPv4-mapped address is its IPv4 address");
        let one = Network::parse("::1").unwrap();
        assert_eq!(String::from(Network::parse("192.0.2.7").unwrap()), "192.0.2.7/32");
        assert!(Network::parse("::ffff:192.0.2.7").unwrap().contains("192.0.2.7".parse().unwrap()));
        let mapped = Network::parse("::ffff:10.0.0.0/104").unwrap();
        assert_eq!(String::from(mapped), "10.0.0.0/8");
        assert!(mapped.contains("10.1.2.3".parse().unwrap()) && mapped.contains("::ffff:10.1.2.3".parse().unwrap()));
        assert_eq!(Network::parse("::ffff:10.0.0.0/95"), None, "wider than the mapped range");
        assert!(one.contains("::1".parse().unwrap()) && !one.contains("::2".parse().unwrap()));
        assert!(Network::parse("0.0.0.0/0").unwrap().contains("203.0.113.9".parse().unwrap()));
        for bad in ["10.0.0.0/33", "x", "10.0.0.0/", "::/129", "10.0.0.1/-1"] {
            assert_eq!(Network::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn key_files_hold_hashes_and_names_and_never_echo_a_line() {
        let h = "a".repeat(64);
        let keys = parse_key_file(&format!("# comment\n\nsha256:{h} ci-runner\nsha256:{} # unnamed\n", "B".repeat(64)))
            .unwrap();
        assert_eq!(keys.len(), 2);
        assert_eq!(keys[0].name.as_deref(), Some("ci-runner"));
        assert_eq!(keys[0].sha256, [0xaa; 32]);
        assert_eq!(keys[1].name, None);
        let pasted = "tdm_SECRETSECRETSECRET";
        for bad in [
            pasted.to_string(),
            format!("sha256:{} x", "a".repeat(63)),
            format!("sha256:{h} bad/name"),
            format!("sha256:{h} a b"),
            format!("sha256:{h} a\nsha256:{h} b"),
            format!("sha256:{} x", "g".repeat(64)),
        ] {
            let why = parse_key_file(&bad).expect_err(&bad);
            assert!(!why.contains("SECRET") && !why.contains("aaaa"), "{why}");
        }
    }
}
