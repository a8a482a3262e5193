//! The listening sockets the supervisor binds (or systemd passes) and holds
//! for the life of the service, so that a worker restart never closes a port.

use std::net::{SocketAddr, TcpListener};

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
        Ok(Listeners { http, https, grpc, metrics })
    }

    fn from_passed(config: &Config, passed: Vec<(crate::systemd::Which, TcpListener)>) -> anyhow::Result<Self> {
        use crate::systemd::Which;
        let (mut http, mut https, mut grpc, mut metrics) = (None, None, None, None);
        for (which, l) in passed {
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
        Ok(Listeners {
            http,
            https: https.filter(|_| config.tls.enabled),
            grpc: grpc.filter(|_| config.listen.grpc_port.is_some()),
            metrics,
        })
    }

    /// Every listener held, with the name systemd's `LISTEN_FDNAMES` gives it
    /// (what [`crate::systemd::passed_listeners`] reads back), in that order.
    pub(super) fn named(&self) -> impl Iterator<Item = (&'static str, &TcpListener)> {
        [("http", &self.http), ("https", &self.https), ("metrics", &self.metrics), ("grpc", &self.grpc)]
            .into_iter()
            .filter_map(|(name, l)| Some((name, l.as_ref()?)))
    }

    /// The plain listener's address, when there is one.
    pub(super) fn http_addr(&self) -> anyhow::Result<Option<SocketAddr>> {
        self.http.as_ref().map(Self::addr).transpose()
    }

    pub(super) fn addr(l: &TcpListener) -> anyhow::Result<SocketAddr> {
        l.local_addr().context("cannot read the listener's address")
    }
}
