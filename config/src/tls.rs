//! The HTTPS port's TLS: whether it is on, its port, client certificates,
//! the TLS floor and HSTS.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::scope::{always, https};
use crate::{values, Config, Reader};

crate::declare! {
    ENABLE_SSL {
        default: "False",
        doc: "also serve HTTPS (true/false/1/0/yes/no, any case)",
        accepted: values::BOOL,
        scope: always,
    }
    SSL_PORT {
        default: "PORT+1 (443 when PORT=80)",
        doc: "HTTPS port; an explicit value always wins",
        accepted: "a port number 0-65535",
        scope: https,
    }
    SSL_CLIENT_CA {
        default: "(none)",
        doc: "PEM bundle of the CAs whose client certificates the HTTPS port verifies (mTLS); reloaded when it changes",
        accepted: "the path of a readable PEM bundle of CA certificates",
        scope: client_ca_scope,
    }
    SSL_CLIENT_AUTH {
        default: "required with SSL_CLIENT_CA, else off",
        doc: "client certificates: off, optional (verified when presented) or required",
        accepted: "off, optional or required",
        scope: https,
    }
    SSL_HSTS {
        default: "(none)",
        doc: "Strict-Transport-Security value sent on HTTPS answers, e.g. max-age=31536000; includeSubDomains",
        accepted: "max-age=SECONDS, optionally with ; includeSubDomains and ; preload",
        scope: https,
    }
    SSL_MIN_VERSION {
        default: "1.2",
        doc: "oldest TLS version the HTTPS port accepts: 1.2 or 1.3",
        accepted: "1.2 or 1.3",
        scope: https,
    }
    SSL_HTTP3 {
        default: "False",
        doc: "also serve HTTP/3 (QUIC, TLS 1.3) on SSL_PORT over UDP, advertised by Alt-Svc on HTTPS answers",
        accepted: values::BOOL,
        scope: https,
    }
}

fn client_ca_scope(c: &Config) -> Option<&'static str> {
    https(c).or_else(|| {
        (c.tls.client_auth == ClientAuth::Off)
            .then_some("SSL_CLIENT_AUTH=off; set it to optional or required to verify clients")
    })
}

/// Whether the HTTPS port asks for client certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    /// Never.
    #[default]
    Off,
    /// Verified when presented; clients without one are served too.
    Optional,
    /// Every client must present one signed by `SSL_CLIENT_CA`.
    Required,
}

/// The oldest TLS version the HTTPS port accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum TlsVersion {
    /// TLS 1.2 and 1.3.
    #[default]
    #[serde(rename = "1.2")]
    Tls12,
    /// TLS 1.3 only.
    #[serde(rename = "1.3")]
    Tls13,
}

/// The TLS section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tls {
    /// Whether the HTTPS listener is on.
    pub enabled: bool,
    /// HTTPS port.
    pub port: u16,
    /// CAs that sign accepted client certificates.
    pub client_ca: Option<PathBuf>,
    /// Whether client certificates are asked for.
    pub client_auth: ClientAuth,
    /// Oldest TLS version accepted.
    pub min_version: TlsVersion,
    /// `Strict-Transport-Security` value for HTTPS answers.
    pub hsts: Option<String>,
    /// HTTP/3 on the HTTPS port's number over UDP (`SSL_HTTP3`).
    #[serde(default)]
    pub http3: bool,
}

/// Reads the TLS section; `http_port` gives `SSL_PORT`'s default.
pub fn parse(r: &mut Reader, http_port: u16) -> Tls {
    let enabled = r.get(&ENABLE_SSL, false, values::parse_bool);
    let default_port = match http_port {
        80 => Some(443),
        0 => Some(0),
        p => p.checked_add(1),
    };
    let port = match (r.value(&SSL_PORT).is_some(), default_port) {
        (true, _) => r.get(&SSL_PORT, 0, values::port),
        (false, Some(p)) => p,
        (false, None) => {
            if enabled {
                r.bad(&SSL_PORT, "", "an explicit port, because PORT+1 is past 65535");
            }
            0
        }
    };
    if enabled && port == http_port && http_port != 0 {
        r.bad(&SSL_PORT, &port.to_string(), format!("a port different from PORT ({http_port})"));
    }
    let client_ca = r.get(&SSL_CLIENT_CA, None, |v| values::readable_file(v).map(Some));
    let auth_default = if client_ca.is_some() { ClientAuth::Required } else { ClientAuth::Off };
    let client_auth = r.get(&SSL_CLIENT_AUTH, auth_default, |v| {
        values::one_of(
            v,
            &[
                ("off", ClientAuth::Off),
                ("none", ClientAuth::Off),
                ("optional", ClientAuth::Optional),
                ("required", ClientAuth::Required),
                ("require", ClientAuth::Required),
            ],
        )
    });
    if client_auth != ClientAuth::Off && client_ca.is_none() {
        if let Some(v) = r.value(&SSL_CLIENT_AUTH).map(String::from) {
            r.bad(&SSL_CLIENT_AUTH, &v, "off, unless SSL_CLIENT_CA names the CAs to verify against");
        }
    }
    if client_ca.is_some() && !enabled {
        let v = r.value(&SSL_CLIENT_CA).unwrap_or_default().to_string();
        r.bad(&SSL_CLIENT_CA, &v, "unset, unless ENABLE_SSL=true (client certificates need the HTTPS port)");
    }
    let min_version = r.get(&SSL_MIN_VERSION, TlsVersion::Tls12, |v| {
        match v.to_ascii_lowercase().trim_start_matches("tlsv").trim_start_matches("tls") {
            "1.2" => Some(TlsVersion::Tls12),
            "1.3" => Some(TlsVersion::Tls13),
            _ => None,
        }
    });
    let hsts = r.get(&SSL_HSTS, None, |v| values::valid_hsts(v).then(|| Some(v.to_string())));
    let http3 = r.get(&SSL_HTTP3, false, values::parse_bool);
    Tls { enabled, port, client_ca, client_auth, min_version, hsts, http3 }
}
