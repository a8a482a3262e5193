//! Per-client rate limits (`RATE_LIMIT`), one budget per client for the whole
//! server: every worker checks the same buckets in the counters region, so a
//! client held to 100/s is held to 100/s however many workers and ports it
//! spreads over. Each bucket runs GCRA (the generic cell rate algorithm, a
//! token bucket kept as one timestamp): one compare-and-swap per request, no
//! lock, no process of its own. Also here: which address a request counts
//! against behind a trusted proxy (`TRUSTED_PROXIES`, `X-Forwarded-For`).

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::HeaderMap;
use tandem_config::access::{Network, RateLimit};

use crate::stats::{self, LIMIT_BUCKETS};
use crate::sys::counters::Counters;

/// Buckets looked at for a client's own before it shares the overflow bucket.
const PROBES: usize = 8;
/// `X-Forwarded-For` entries looked at, from the right (a longer chain is a client talking).
const MAX_HOPS: usize = 32;

/// The rate limiter of one process, over the region every process shares.
#[derive(Debug)]
pub struct Limiter {
    region: Arc<Counters>,
    interval: u64,
    tolerance: u64,
}

/// A request over the limit: when the client may come back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limited {
    /// How long until the next request is admitted.
    pub wait: Duration,
}

impl Limited {
    /// Whole seconds for `Retry-After` (at least 1).
    pub fn retry_after(&self) -> u64 {
        (self.wait.as_secs() + u64::from(self.wait.subsec_nanos() > 0)).max(1)
    }
}

/// Nanoseconds on the system's monotonic clock, the same in every process.
fn now_ns() -> u64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
        Ok(t) => (t.tv_sec() as u64).saturating_mul(1_000_000_000).saturating_add(t.tv_nsec() as u64),
        Err(_) => 0,
    }
}

impl Limiter {
    /// A limiter at `rate` over `region`'s shared buckets.
    pub fn new(region: Arc<Counters>, rate: &RateLimit) -> Self {
        let interval = rate.interval_ns();
        Limiter { region, interval, tolerance: interval.saturating_mul(rate.burst.saturating_sub(1)) }
    }

    /// Admits one request of `client`, or says how long it must wait.
    pub fn admit(&self, client: &ClientKey) -> Result<(), Limited> {
        let (seed, table) = stats::limiter_area(&self.region);
        if table.len() < 2 * (LIMIT_BUCKETS + 1) {
            return Ok(());
        }
        let now = now_ns();
        let tat = &table[2 * self.bucket(client.hash(seed), now, table) + 1];
        let mut seen = tat.load(Ordering::Acquire);
        loop {
            let start = seen.max(now);
            if start - now > self.tolerance {
                return Err(Limited { wait: Duration::from_nanos(start - now - self.tolerance) });
            }
            match tat.compare_exchange_weak(seen, start + self.interval, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Ok(()),
                Err(now_there) => seen = now_there,
            }
        }
    }

    /// The bucket of `key`: its own, a free one it claims, an idle one it
    /// takes over (a client whose bucket is full again has nothing to lose),
    /// or, when the table is full of active clients, the overflow bucket
    /// they all share (so a flood of new addresses cannot escape the limit).
    fn bucket(&self, h: u64, now: u64, table: &[AtomicU64]) -> usize {
        let start = (h >> 1) as usize % LIMIT_BUCKETS;
        let slots = (0..PROBES).map(|p| (start + p) % LIMIT_BUCKETS);
        for i in slots.clone() {
            let owner = &table[2 * i];
            match owner.load(Ordering::Acquire) {
                x if x == h => return i,
                0 => match owner.compare_exchange(0, h, Ordering::AcqRel, Ordering::Acquire) {
                    Ok(_) => return i,
                    Err(x) if x == h => return i,
                    Err(_) => {}
                },
                _ => {}
            }
        }
        for i in slots {
            if table[2 * i + 1].load(Ordering::Acquire) <= now {
                let owner = &table[2 * i];
                let was = owner.load(Ordering::Acquire);
                if owner.compare_exchange(was, h, Ordering::AcqRel, Ordering::Acquire).is_ok() {
                    return i;
                }
            }
        }
        LIMIT_BUCKETS
    }
}

/// Who a request is counted against, as bytes for the limiter's hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientKey {
    /// An API key, by its name.
    Key(Arc<str>),
    /// A verified client certificate, by its SHA-256 fingerprint.
    Certificate(String),
    /// An address (an IPv6 address by its /64, the block one subscriber holds).
    Address(IpAddr),
}

impl ClientKey {
    /// The client for an address: IPv4 (IPv4-mapped IPv6 as IPv4) whole, IPv6 by its /64.
    pub fn address(ip: IpAddr) -> Self {
        match ip.to_canonical() {
            IpAddr::V6(v6) => ClientKey::Address(IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into())),
            v4 => ClientKey::Address(v4),
        }
    }

    /// The client's bucket hash, never 0: SipHash (the standard library's
    /// hasher, the same in every process of one binary) over the region's
    /// random seed, the kind and the client, so no client can choose a
    /// bucket another holds.
    pub fn hash(&self, seed: u64) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::hash::DefaultHasher::new();
        seed.hash(&mut h);
        match self {
            ClientKey::Key(name) => (b'k', name.as_bytes()).hash(&mut h),
            ClientKey::Certificate(fp) => (b'c', fp.as_bytes()).hash(&mut h),
            ClientKey::Address(IpAddr::V4(a)) => (b'4', a.octets()).hash(&mut h),
            ClientKey::Address(IpAddr::V6(a)) => (b'6', a.octets()).hash(&mut h),
        }
        h.finish() | 1
    }

    /// Which [`crate::stats::ACCESS_EVENTS`] counts this client's 429s.
    pub fn limited_event(&self) -> usize {
        use crate::stats::access_event::*;
        match self {
            ClientKey::Key(_) => RATE_LIMITED_KEY,
            ClientKey::Certificate(_) => RATE_LIMITED_CERTIFICATE,
            ClientKey::Address(_) => RATE_LIMITED_ADDRESS,
        }
    }

    /// What the 429 says the client is.
    pub fn describe(&self) -> &'static str {
        match self {
            ClientKey::Key(_) => "this API key",
            ClientKey::Certificate(_) => "this client certificate",
            ClientKey::Address(_) => "this address",
        }
    }
}

/// The address a request counts against: its peer, unless the peer is a
/// trusted proxy; then `X-Forwarded-For` read from the right (each trusted
/// proxy appends the address it got the request from), skipping trusted
/// proxies, to the first address that is not one. An entry that is not an
/// address ends the walk at the proxy that wrote it: a client can add what
/// it likes on the left, never on the right of what a trusted proxy wrote.
pub fn client_address(peer: IpAddr, headers: &HeaderMap, trusted: &[Network]) -> IpAddr {
    let is_trusted = |ip: IpAddr| trusted.iter().any(|n| n.contains(ip));
    if !is_trusted(peer) {
        return peer;
    }
    let mut client = peer;
    let values: Vec<&str> =
        headers.get_all("x-forwarded-for").iter().map(|v| v.to_str().unwrap_or("(not text)")).collect();
    let entries = values.iter().rev().flat_map(|v| v.rsplit(',')).take(MAX_HOPS);
    for entry in entries {
        let Some(ip) = forwarded_ip(entry.trim()) else { return client };
        client = ip;
        if !is_trusted(ip) {
            return ip;
        }
    }
    client
}

/// An `X-Forwarded-For` entry's address (`203.0.113.7`, `2001:db8::1`, and
/// the `ip:port` and `[v6]:port` forms some proxies write).
fn forwarded_ip(entry: &str) -> Option<IpAddr> {
    if let Ok(ip) = entry.parse::<IpAddr>() {
        return Some(ip);
    }
    entry.parse::<std::net::SocketAddr>().ok().map(|s| s.ip())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly by design")]
mod tests {
    use super::*;

    fn region() -> Arc<Counters> {
        let (r, _fd) = Counters::create(stats::region_words(2)).unwrap();
        stats::init_region(&r);
        r
    }

    fn rate(requests: u64, burst: u64) -> RateLimit {
        RateLimit { requests, per_seconds: 1, burst }
    }

    #[test]
    fn a_client_gets_its_burst_then_waits_and_another_is_unaffected() {
        let r = region();
        let l = Limiter::new(r.clone(), &rate(10, 3));
        let a = ClientKey::address("203.0.113.1".parse().unwrap());
        let b = ClientKey::Key("ci".into());
        for _ in 0..3 {
            assert!(l.admit(&a).is_ok());
        }
        let over = l.admit(&a).expect_err("over its burst");
        assert!(over.wait <= Duration::from_millis(100) && over.retry_after() == 1, "{over:?}");
        assert!(l.admit(&b).is_ok(), "another client has its own budget");
        // A second limiter (another process) over the same region sees the same budget.
        let other = Limiter::new(r, &rate(10, 3));
        assert!(other.admit(&a).is_err());
        std::thread::sleep(Duration::from_millis(110));
        assert!(other.admit(&a).is_ok(), "one interval later, one more");
        assert!(l.admit(&a).is_err());
    }

    #[test]
    fn the_rate_holds_under_threads() {
        let l = Arc::new(Limiter::new(region(), &rate(1000, 50)));
        let admitted = Arc::new(AtomicU64::new(0));
        let started = std::time::Instant::now();
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (l, admitted) = (l.clone(), admitted.clone());
                std::thread::spawn(move || {
                    let key = ClientKey::Key("one".into());
                    while started.elapsed() < Duration::from_millis(200) {
                        if l.admit(&key).is_ok() {
                            admitted.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let elapsed = started.elapsed().as_secs_f64();
        let most = 50.0 + 1000.0 * elapsed + 1.0;
        let n = admitted.load(Ordering::Relaxed) as f64;
        assert!(n <= most && n >= 100.0, "admitted {n} in {elapsed:.3}s (at most {most})");
    }

    #[test]
    fn a_full_table_shares_the_overflow_bucket() {
        let r = region();
        let l = Limiter::new(r, &rate(1, 1));
        // Far more clients than buckets, each using its one request.
        let mut refused = 0;
        for i in 0..(LIMIT_BUCKETS as u32 * 2) {
            let key = ClientKey::address(IpAddr::V4(i.into()));
            if l.admit(&key).is_err() {
                refused += 1;
            }
        }
        assert!(refused > 0, "clients past the table share one budget");
        assert!(refused < LIMIT_BUCKETS * 2 - LIMIT_BUCKETS / 2, "most clients found a bucket ({refused} refused)");
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let trusted = vec![Network::parse("10.0.0.0/8").unwrap()];
        let h = |v: &[&str]| {
            let mut m = HeaderMap::new();
            for x in v {
                m.append("x-forwarded-for", x.parse().unwrap());
            }
            m
        };
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let proxy = ip("10.0.0.5");
        // Untrusted peer: its own address, whatever it says.
        assert_eq!(client_address(ip("198.51.100.9"), &h(&["1.2.3.4"]), &trusted), ip("198.51.100.9"));
        // Trusted peer: the rightmost untrusted entry.
        assert_eq!(client_address(proxy, &h(&["1.2.3.4, 203.0.113.7"]), &trusted), ip("203.0.113.7"));
        assert_eq!(client_address(proxy, &h(&["1.2.3.4", "203.0.113.7, 10.1.1.1"]), &trusted), ip("203.0.113.7"));
        assert_eq!(client_address(proxy, &h(&["[2001:db8::1]:443"]), &trusted), ip("2001:db8::1"));
        // Garbage written by the client left of a proxy's entry changes nothing;
        // garbage in the proxy's own place ends at the proxy.
        assert_eq!(client_address(proxy, &h(&["nonsense, 203.0.113.7"]), &trusted), ip("203.0.113.7"));
        assert_eq!(client_address(proxy, &h(&["203.0.113.7, nonsense"]), &trusted), proxy);
        assert_eq!(client_address(proxy, &h(&[]), &trusted), proxy);
        // Nothing trusted: never read.
        assert_eq!(client_address(proxy, &h(&["1.2.3.4"]), &[]), proxy);
    }

    #[test]
    fn ipv6_clients_are_counted_by_their_64() {
        let a = ClientKey::address("2001:db8:1:2:aaaa::1".parse().unwrap());
        let b = ClientKey::address("2001:db8:1:2:bbbb::9".parse().unwrap());
        let c = ClientKey::address("2001:db8:1:3::1".parse().unwrap());
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(
            ClientKey::address("::ffff:192.0.2.1".parse().unwrap()),
            ClientKey::address("192.0.2.1".parse().unwrap())
        );
    }
}
