//! Where tandem listens: the bind address, the HTTP port and the supervisor's metrics port.

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
    METRICS_PORT {
        default: "unset (off)",
        doc: "also serve /metrics on this port, from the supervisor (0-65535)",
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
    /// The supervisor's own `/metrics` port, when set.
    pub metrics_port: Option<u16>,
}

/// Reads the listen section.
pub fn parse(r: &mut Reader) -> Listen {
    let host =
        r.get(&HOST, IpAddr::from([0, 0, 0, 0]), |v| v.trim_start_matches('[').trim_end_matches(']').parse().ok());
    let port = r.get(&PORT, 9001, values::port);
    let metrics_port = r.get(&METRICS_PORT, None, |v| values::port(v).map(Some));
    Listen { host, port, metrics_port }
}
