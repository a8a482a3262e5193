//! The listening sockets the supervisor binds (or systemd passes) and holds
//! for the life of the service, so that a worker restart never closes a port.

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::fd::{AsFd, BorrowedFd};

use anyhow::Context;
use tandem_config::Config;

/// Whether the plain HTTP port is open (every `HTTP_MODE` but `off`).
fn plain_wanted(config: &Config) -> bool {
    config.edge.http_mode != tandem_config::edge::HttpMode::Off
}

/// Listeners bound by the supervisor, held for the life of the service so
/// that a worker restart never closes a port.
#[derive(Debug)]
pub struct Listeners {
    /// Plain HTTP, unless `HTTP_MODE=off`.
    pub http: Option<TcpListener>,
    /// HTTPS, when enabled.
    pub https: Option<TcpListener>,
    /// The gRPC-only port (`GRPC_PORT`), when set: the engine workers serve it.
    pub grpc: Option<TcpListener>,
    /// The supervisor's own `/metrics` port (`METRICS_PORT`), when set.
    pub metrics: Option<TcpListener>,
    /// HTTP/3 (`SSL_HTTP3`): the UDP socket on the HTTPS port's number.
    pub h3: Option<UdpSocket>,
}

/// Binds the UDP socket HTTP/3 is served on: the HTTPS listener's own port
/// (`SSL_PORT=0` picks one for TCP; UDP takes the same number).
fn bind_h3(config: &Config, https: &TcpListener) -> anyhow::Result<UdpSocket> {
    let addr = SocketAddr::new(config.listen.host, Listeners::addr(https)?.port());
    UdpSocket::bind(addr).with_context(|| {
        format!("cannot bind the HTTP/3 socket on UDP {addr}\nhint: another process may hold the UDP port; choose another SSL_PORT or unset SSL_HTTP3")
    })
}

impl Listeners {
    /// Binds every listener; a taken port is one error naming the address.
    /// Listeners systemd passed (socket activation) are used as they are.
    pub fn bind(config: &Config) -> anyhow::Result<Self> {
        if let Some(passed) = crate::systemd::passed_listeners(config)? {
            return Self::from_passed(config, passed);
        }
        let bind = |port: u16, what: &str| {
            let addr = SocketAddr::new(config.listen.host, port);
            let l = TcpListener::bind(addr).with_context(|| {
                format!("cannot bind the {what} listener on {addr}\nhint: another process may hold the port; choose another with {}", match what { "HTTP" => "PORT", "HTTPS" => "SSL_PORT", "gRPC" => "GRPC_PORT", _ => "METRICS_PORT" })
            })?;
            if let Err(e) = tandem_shared::sys::deepen_backlog(&l) {
                tracing::warn!(%addr, error = %e, "cannot deepen the listener's backlog; new connections beyond 128 queued are dropped");
            }
            Ok::<_, anyhow::Error>(l)
        };
        let http = plain_wanted(config).then(|| bind(config.listen.port, "HTTP")).transpose()?;
        let https = if config.tls.enabled { Some(bind(config.tls.port, "HTTPS")?) } else { None };
        let grpc = config.listen.grpc_port.map(|p| bind(p, "gRPC")).transpose()?;
        let metrics = config.listen.metrics_port.map(|p| bind(p, "metrics")).transpose()?;
        let h3 = match &https {
            Some(l) if config.tls.http3 => Some(bind_h3(config, l)?),
            _ => None,
        };
        Ok(Listeners { http, https, grpc, metrics, h3 })
    }

    fn from_passed(config: &Config, passed: crate::systemd::Passed) -> anyhow::Result<Self> {
        use crate::systemd::Which;
        let (mut http, mut https, mut grpc, mut metrics) = (None, None, None, None);
        for (which, l) in passed.tcp {
            tracing::info!(listener = ?which, addr = %Self::addr(&l)?, "using a listener passed by systemd");
            match which {
                Which::Http => http = Some(l),
                Which::Https => https = Some(l),
                Which::Grpc => grpc = Some(l),
                Which::Metrics => metrics = Some(l),
            }
        }
        let http = match (http, plain_wanted(config)) {
            (Some(l), true) => Some(l),
            (None, true) => anyhow::bail!("systemd passed no HTTP listener (name it FileDescriptorName=http)"),
            (Some(l), false) => {
                tracing::warn!(addr = %Self::addr(&l)?, "systemd passed an HTTP listener but HTTP_MODE=off: it is closed");
                None
            }
            (None, false) => None,
        };
        if config.tls.enabled && https.is_none() {
            anyhow::bail!("ENABLE_SSL=true but systemd passed no HTTPS listener\nhint: add a ListenStream for SSL_PORT named https");
        }
        if config.listen.grpc_port.is_some() && grpc.is_none() {
            anyhow::bail!("GRPC_PORT is set but systemd passed no gRPC listener\nhint: add a ListenStream named grpc, or unset GRPC_PORT");
        }
        if config.listen.metrics_port.is_some() && metrics.is_none() {
            anyhow::bail!("METRICS_PORT is set but systemd passed no metrics listener\nhint: add a ListenStream named metrics, or unset METRICS_PORT");
        }
        let https = https.filter(|_| config.tls.enabled);
        let h3 = match (&https, passed.h3) {
            (Some(_), Some(udp)) if config.tls.http3 => {
                tracing::info!(addr = %udp.local_addr().context("cannot read the passed HTTP/3 socket's address")?, "using the HTTP/3 socket passed by systemd");
                Some(udp)
            }
            // Not passed (a unit with only ListenStream=): bound here, held like the rest.
            (Some(l), None) if config.tls.http3 => Some(bind_h3(config, l)?),
            _ => None,
        };
        Ok(Listeners { http, https, grpc: grpc.filter(|_| config.listen.grpc_port.is_some()), metrics, h3 })
    }

    /// Every listener held, with the name systemd's `LISTEN_FDNAMES` gives it
    /// (what [`crate::systemd::passed_listeners`] reads back), in that order.
    pub(super) fn named(&self) -> impl Iterator<Item = (&'static str, BorrowedFd<'_>)> {
        let tcp = [("http", &self.http), ("https", &self.https), ("metrics", &self.metrics), ("grpc", &self.grpc)];
        tcp.into_iter()
            .filter_map(|(name, l)| Some((name, l.as_ref()?.as_fd())))
            .chain(self.h3.as_ref().map(|u| (crate::systemd::H3_NAME, u.as_fd())))
    }

    /// The plain listener's address, when there is one.
    pub(super) fn http_addr(&self) -> anyhow::Result<Option<SocketAddr>> {
        self.http.as_ref().map(Self::addr).transpose()
    }

    pub(super) fn addr(l: &TcpListener) -> anyhow::Result<SocketAddr> {
        l.local_addr().context("cannot read the listener's address")
    }
}
