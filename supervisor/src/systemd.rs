//! systemd integration: listeners passed by socket activation (`LISTEN_FDS`,
//! `LISTEN_FDNAMES`) and state changes told to the service manager
//! (`sd_notify`: READY, RELOADING, STOPPING, WATCHDOG) through `NOTIFY_SOCKET`.
//! Both are inert when systemd did not set them.

use std::net::{TcpListener, UdpSocket};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr as UnixAddr, UnixDatagram};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::Context;
use tandem_config::Config;

/// Which listener a passed socket is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    /// `PORT`.
    Http,
    /// `SSL_PORT`.
    Https,
    /// `METRICS_PORT`.
    Metrics,
    /// `GRPC_PORT`.
    Grpc,
}

/// The `LISTEN_FDNAMES` name of the HTTP/3 (UDP) socket.
pub const H3_NAME: &str = "h3";

/// The sockets systemd (or an upgrading tandem) passed.
#[derive(Debug, Default)]
pub struct Passed {
    /// The TCP listeners and which each is.
    pub tcp: Vec<(Which, TcpListener)>,
    /// The UDP socket for HTTP/3, when one was passed.
    pub h3: Option<UdpSocket>,
}

/// The listeners systemd passed (`LISTEN_FDS` for this process), each
/// assigned by its name in `LISTEN_FDNAMES` (`http`, `https`, `metrics`, `grpc`), else
/// by its port, else by order (HTTP first); a UDP socket (named `h3`, or any
/// datagram socket) is HTTP/3's. `None` when nothing was passed.
pub fn passed_listeners(config: &Config) -> anyhow::Result<Option<Passed>> {
    let names: Vec<String> =
        std::env::var("LISTEN_FDNAMES").unwrap_or_default().split(':').map(str::to_ascii_lowercase).collect();
    let mut fds = listenfd::ListenFd::from_env();
    if fds.len() == 0 {
        return Ok(None);
    }
    let mut out: Vec<(Which, TcpListener)> = Vec::new();
    let mut h3 = None;
    for i in 0..fds.len() {
        let l = match fds.take_tcp_listener(i) {
            Ok(l) => l,
            Err(not_tcp) => match fds.take_udp_socket(i) {
                Ok(Some(udp)) if h3.is_none() => {
                    h3 = Some(udp);
                    continue;
                }
                Ok(Some(_)) => anyhow::bail!("LISTEN_FDS passed two UDP sockets; tandem serves HTTP/3 on one"),
                _ => {
                    return Err(not_tcp).with_context(|| {
                        format!("LISTEN_FDS: descriptor {} is neither a TCP listening socket nor a UDP socket", 3 + i)
                    })
                }
            },
        }
        .with_context(|| format!("LISTEN_FDS: descriptor {} was already taken", 3 + i))?;
        let port = l.local_addr().context("cannot read a passed listener's address")?.port();
        let by_name = match names.get(i).map(String::as_str) {
            Some("http") => Some(Which::Http),
            Some("https") => Some(Which::Https),
            Some("metrics") => Some(Which::Metrics),
            Some("grpc") => Some(Which::Grpc),
            _ => None,
        };
        let by_port = if port == config.listen.port {
            Some(Which::Http)
        } else if config.tls.enabled && port == config.tls.port {
            Some(Which::Https)
        } else if config.listen.metrics_port == Some(port) {
            Some(Which::Metrics)
        } else if config.listen.grpc_port == Some(port) {
            Some(Which::Grpc)
        } else {
            None
        };
        let by_order = [Which::Http, Which::Https, Which::Metrics].get(i).copied();
        let which =
            by_name.or(by_port).or(by_order).context("LISTEN_FDS passed more sockets than tandem listens on")?;
        if out.iter().any(|(w, _)| *w == which) {
            anyhow::bail!("LISTEN_FDS passed two sockets for the {which:?} listener\nhint: name them with FileDescriptorName=http / https / metrics / grpc");
        }
        // Its blocking mode is left as it is: O_NONBLOCK belongs to the open
        // socket, shared with every process that holds it (on an upgrade, the
        // previous supervisor's workers, which accept on it non-blocking: made
        // blocking here, their accept would block a serving thread until the
        // next connection). The workers set it non-blocking themselves.
        out.push((which, l));
    }
    // The workers get their listener from the supervisor, never these variables.
    for var in ["LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"] {
        std::env::remove_var(var);
    }
    Ok(Some(Passed { tcp: out, h3 }))
}

/// The service manager's notification socket, when there is one.
struct Notifier {
    socket: UnixDatagram,
    addr: UnixAddr,
}

fn notifier() -> Option<&'static Notifier> {
    static N: OnceLock<Option<Notifier>> = OnceLock::new();
    N.get_or_init(|| {
        let path = std::env::var("NOTIFY_SOCKET").ok().filter(|p| !p.is_empty())?;
        let addr = match path.strip_prefix('@') {
            Some(name) => UnixAddr::from_abstract_name(name.as_bytes()).ok()?,
            None => UnixAddr::from_pathname(&path).ok()?,
        };
        let socket = UnixDatagram::unbound().ok()?;
        Some(Notifier { socket, addr })
    })
    .as_ref()
}

/// Tells the service manager `state` (e.g. `READY=1`); nothing without `NOTIFY_SOCKET`.
pub fn notify(state: &str) {
    if let Some(n) = notifier() {
        if let Err(e) = n.socket.send_to_addr(state.as_bytes(), &n.addr) {
            tracing::debug!(error = %e, state, "cannot notify the service manager");
        }
    }
}

/// `RELOADING=1` with the monotonic time systemd asks for.
pub fn reloading() {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1000)
        .unwrap_or(0);
    notify(&format!("RELOADING=1\nMONOTONIC_USEC={now}"));
}

/// Sends `WATCHDOG=1` at half the interval systemd set (`WatchdogSec`), from
/// the supervisor's own loop: if the loop stops, so do the pings.
#[derive(Debug)]
pub struct Watchdog {
    every: Option<Duration>,
    last: Instant,
}

impl Watchdog {
    /// From `WATCHDOG_USEC` (and `WATCHDOG_PID`, when set, naming this process).
    pub fn from_env() -> Watchdog {
        let pid_ok = std::env::var("WATCHDOG_PID").map_or(true, |p| p.trim() == std::process::id().to_string());
        let every = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .filter(|&us| us > 0 && pid_ok)
            .map(|us| Duration::from_micros(us) / 2);
        Watchdog { every, last: Instant::now() }
    }

    /// Pings when half the interval has passed since the last ping.
    pub fn ping_if_due(&mut self) {
        if let Some(every) = self.every {
            if self.last.elapsed() >= every {
                notify("WATCHDOG=1");
                self.last = Instant::now();
            }
        }
    }
}
