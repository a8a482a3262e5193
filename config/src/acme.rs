//! The ACME account, names and challenge (`SSL_CERTIFICATE=ACME`).

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::certs::CertSource;
use crate::scope::https;
use crate::{values, Config, Reader};

/// Let's Encrypt's production directory.
pub const LETS_ENCRYPT: &str = "https://acme-v02.api.letsencrypt.org/directory";
/// Let's Encrypt's staging directory.
pub const LETS_ENCRYPT_STAGING: &str = "https://acme-staging-v02.api.letsencrypt.org/directory";

crate::declare! {
    ACME_DOMAINS {
        default: "(none)",
        doc: "with SSL_CERTIFICATE=ACME: the DNS names to get a certificate for, comma-separated (*.name needs dns-01)",
        accepted: "comma-separated DNS names (e.g. api.example.com,*.example.com)",
        scope: acme,
    }
    ACME_EMAIL {
        default: "(none)",
        doc: "contact address for the ACME account (expiry notices)",
        accepted: "an email address (name@domain)",
        scope: acme,
    }
    ACME_DIRECTORY {
        default: "Let's Encrypt production",
        doc: "the ACME server's directory URL (https); default Let's Encrypt production",
        accepted: "the https URL of an ACME directory",
        scope: acme,
    }
    ACME_STAGING {
        default: "False",
        doc: "use Let's Encrypt's staging directory (untrusted certificates, generous limits)",
        accepted: values::BOOL,
        scope: acme,
    }
    ACME_CHALLENGE {
        default: "http-01",
        doc: "how domains are proven: http-01 (on PORT), tls-alpn-01 (on SSL_PORT) or dns-01 (ACME_DNS_HOOK)",
        accepted: "http-01, tls-alpn-01 or dns-01",
        scope: acme,
    }
    ACME_DNS_HOOK {
        default: "(none)",
        doc: "dns-01: a command run as `HOOK set|clear NAME VALUE` that sets / removes the TXT record",
        accepted: "a command",
        scope: |c| acme(c).or_else(|| (c.acme.challenge != AcmeChallenge::Dns01).then_some("ACME_CHALLENGE is not dns-01; the hook is only run for dns-01")),
    }
}

fn acme(c: &Config) -> Option<&'static str> {
    https(c).or_else(|| {
        (c.certs.source != CertSource::Acme)
            .then_some("SSL_CERTIFICATE is not ACME; set SSL_CERTIFICATE=ACME to get a certificate from an ACME server")
    })
}

/// How an ACME server is shown that we control a domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum AcmeChallenge {
    /// A file under `/.well-known/acme-challenge/` on the HTTP port.
    #[default]
    #[serde(rename = "http-01")]
    Http01,
    /// A special certificate answered on the HTTPS port for ALPN `acme-tls/1`.
    #[serde(rename = "tls-alpn-01")]
    TlsAlpn01,
    /// A TXT record, set and removed by `ACME_DNS_HOOK`.
    #[serde(rename = "dns-01")]
    Dns01,
}

/// The ACME section.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Acme {
    /// The directory URL.
    pub directory: String,
    /// The account's contact address.
    pub email: Option<String>,
    /// The names to certify.
    pub domains: Vec<String>,
    /// How they are proven.
    pub challenge: AcmeChallenge,
    /// dns-01's hook command.
    pub dns_hook: Option<String>,
}

/// Reads the ACME section; with `required` (ACME is the source of an HTTPS
/// port), the domains and, for dns-01, the hook must be there.
pub fn parse(r: &mut Reader, required: bool) -> Acme {
    let domains = r.get(&ACME_DOMAINS, Vec::new(), |v| {
        let names: Vec<String> = values::list(v)
            .into_iter()
            .map(|n| n.trim_end_matches('.').to_ascii_lowercase())
            .filter(|n| !n.is_empty())
            .collect();
        (!names.is_empty()
            && names.iter().all(|n| n.contains('.') && n.parse::<IpAddr>().is_err() && values::is_dns_name(n)))
        .then_some(names)
    });
    let email = r.get(&ACME_EMAIL, None, |v| {
        let ok = v.split_once('@').is_some_and(|(u, d)| !u.is_empty() && d.contains('.'))
            && !v.chars().any(|ch| ch.is_whitespace() || ch == ',');
        ok.then(|| Some(v.to_string()))
    });
    let staging = r.get(&ACME_STAGING, false, values::parse_bool);
    let directory = r.get(&ACME_DIRECTORY, None, |v| {
        let ok = v.starts_with("https://") && v.len() > "https://".len() && !v.contains(char::is_whitespace);
        ok.then(|| Some(v.to_string()))
    });
    if staging && directory.is_some() {
        r.bad(
            &ACME_STAGING,
            "true",
            "false when ACME_DIRECTORY is set (staging means Let's Encrypt's staging directory; set one or the other)",
        );
    }
    let directory = directory.unwrap_or_else(|| if staging { LETS_ENCRYPT_STAGING } else { LETS_ENCRYPT }.to_string());
    let challenge = r.get(&ACME_CHALLENGE, AcmeChallenge::Http01, |v| {
        values::one_of(
            v,
            &[
                ("http-01", AcmeChallenge::Http01),
                ("http01", AcmeChallenge::Http01),
                ("http", AcmeChallenge::Http01),
                ("tls-alpn-01", AcmeChallenge::TlsAlpn01),
                ("tlsalpn01", AcmeChallenge::TlsAlpn01),
                ("tls-alpn", AcmeChallenge::TlsAlpn01),
                ("dns-01", AcmeChallenge::Dns01),
                ("dns01", AcmeChallenge::Dns01),
                ("dns", AcmeChallenge::Dns01),
            ],
        )
    });
    let dns_hook = r.get(&ACME_DNS_HOOK, None, |v| Some(Some(v.to_string())));
    if required {
        if domains.is_empty() && r.value(&ACME_DOMAINS).is_none() {
            r.bad(
                &ACME_DOMAINS,
                "",
                "the DNS names to certify, because SSL_CERTIFICATE=ACME (e.g. ACME_DOMAINS=api.example.com)",
            );
        }
        if challenge == AcmeChallenge::Dns01 && dns_hook.is_none() {
            r.bad(&ACME_DNS_HOOK, "", "a command that sets and clears TXT records, because ACME_CHALLENGE=dns-01");
        }
        if challenge != AcmeChallenge::Dns01 {
            if let Some(w) = domains.iter().find(|d| d.starts_with("*.")) {
                let v = r.value(&ACME_CHALLENGE).unwrap_or("http-01").to_string();
                r.bad(
                    &ACME_CHALLENGE,
                    &v,
                    format!("dns-01, because ACME_DOMAINS has the wildcard {w} (only dns-01 proves wildcards)"),
                );
            }
        }
    }
    Acme { directory, email, domains, challenge, dns_hook }
}
