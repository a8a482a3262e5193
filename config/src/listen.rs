//! Where tandem listens: the bind address, the HTTP port, the optional
//! gRPC-only port and the supervisor's metrics port.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::scope::always;
use crate::{values, Reader};

crate::declare! {
    HOST {
        default: "0.0.0.0",
        doc: "bind address (an IP address) for both listeners",
        accepted: "an IP address such as 0.0.0.0, 127.0.0.1 or ::",
        scope: always,
    }
    PORT {
        default: "9001",
        doc: "HTTP port (0-65535; 0 picks a free port)",
        accepted: "a port number 0-65535",
        scope: always,
    }
    GRPC_PORT {
        default: "unset (off)",
        doc: "also serve the gRPC face alone, in plain HTTP/2, on this port (Triton's 8001), beside PORT and SSL_PORT which serve it already (0-65535)",
        accepted: "a port number 0-65535",
        scope: |c| c.proxy.command.is_some().then_some("WORKER_COMMAND: the copies serve what they serve; tandem's gRPC face is not in front of them"),
    }
    METRICS_PORT {
        default: "unset (off)",
        doc: "also serve /metrics and the /status page on this port, from the supervisor (0-65535)",
        accepted: "a port number 0-65535",
        scope: always,
    }
}

/// The listen section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listen {
    /// Bind address for every listener.
    pub host: IpAddr,
    /// HTTP port.
    pub port: u16,
    /// The gRPC-only port (`GRPC_PORT`), when set.
    pub grpc_port: Option<u16>,
    /// The supervisor's own `/metrics` port, when set.
    pub metrics_port: Option<u16>,
}

/// Reads the listen section.
pub fn parse(r: &mut Reader) -> Listen {
    let host =
        r.get(&HOST, IpAddr::from([0, 0, 0, 0]), |v| v.trim_start_matches('[').trim_end_matches(']').parse().ok());
    let port = r.get(&PORT, 9001, values::port);
    let metrics_port = r.get(&METRICS_PORT, None, |v| values::port(v).map(Some));
    let grpc_port = r.get(&GRPC_PORT, None, |v| values::port(v).map(Some));
    Listen { host, port, grpc_port, metrics_port }
}
