//! `tandem health [--live]`: probes the local server the environment
//! describes (readiness, or liveness with `--live`) over HTTP and, with
//! `ENABLE_SSL`, over HTTPS pinned to the certificate tandem publishes; exit 0
//! healthy, 1 not. For Docker's `HEALTHCHECK`, Kubernetes exec probes and scripts.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::ExitCode;
use std::time::Duration;

use tandem_config::edge::HttpMode;
use tandem_config::tls::ClientAuth;
use tandem_config::Config;
use tandem_shared::certs::cache::Layout;
use tandem_shared::certs::primitives::Bundle;

/// How long each probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Where a listener bound to `host` answers locally.
fn local(host: IpAddr, port: u16) -> SocketAddr {
    let ip = match host {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        other => other,
    };
    SocketAddr::new(ip, port)
}

fn fingerprint(der: &[u8]) -> Option<String> {
    tandem_shared::certs::primitives::inspect(
        &rustls_pki_types::CertificateDer::from(der.to_vec()),
        "the served certificate",
    )
    .ok()
    .map(|i| i.fingerprint)
}

/// Why a request failed, with every cause (reqwest's own text is only "error
/// sending request"), and where to look when nothing listens there.
fn failure(url: &str, e: reqwest::Error) -> String {
    let (connect, timeout) = (e.is_connect(), e.is_timeout());
    let e = e.without_url();
    let mut why = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(cause) = source {
        let text = cause.to_string();
        if !why.contains(&text) {
            why.push_str(": ");
            why.push_str(&text);
        }
        source = cause.source();
    }
    let mut out = format!("{url}: {why}");
    if connect {
        out.push_str(
            "\nhint: this probe finds the server from its own environment (HOST, PORT, ENABLE_SSL, SSL_PORT, \
             HTTP_MODE); run it with the server's environment (docker exec, or the same EnvironmentFile), and check \
             that tandem is running",
        );
    } else if timeout {
        out.push_str(&format!(
            "\nhint: no answer within {} s; the server may be overloaded or stopped",
            PROBE_TIMEOUT.as_secs()
        ));
    }
    out
}

/// One probe: the status, and over HTTPS the served certificate's fingerprint.
async fn probe(client: &reqwest::Client, url: &str) -> Result<(u16, Option<String>), String> {
    let r = client.get(url).send().await.map_err(|e| failure(url, e))?;
    let fingerprint =
        r.extensions().get::<reqwest::tls::TlsInfo>().and_then(|i| i.peer_certificate()).and_then(fingerprint);
    Ok((r.status().as_u16(), fingerprint))
}

/// The headers health checks need: the one `RESTRICTED_API` asks of the
/// health category, and `HEALTH_API_KEY` when `API_KEYS_PROTECT_HEALTH` is on.
fn health_headers(config: &Config) -> reqwest::header::HeaderMap {
    use tandem_config::edge::Secret;
    let read = |secret: &Secret| match secret {
        Secret::Value(v) => Some(v.clone()),
        Secret::File(path) => tandem_config::edge::read_secret_file(path).ok(),
    };
    let mut headers = reqwest::header::HeaderMap::new();
    let access = &config.edge.access;
    if access.protect_health && access.api_keys.is_some() {
        let bearer = access.health_key.as_ref().and_then(read).map(|k| format!("Bearer {k}"));
        if let Some(v) = bearer.and_then(|v| reqwest::header::HeaderValue::from_str(&v).ok()) {
            headers.insert(reqwest::header::AUTHORIZATION, v);
        }
    }
    let Some(rule) = config.edge.restricted.iter().find(|r| r.categories.iter().any(|c| c == "health")) else {
        return headers;
    };
    let name = reqwest::header::HeaderName::from_bytes(rule.header.as_bytes()).ok();
    let value = read(&rule.secret).and_then(|v| reqwest::header::HeaderValue::from_str(&v).ok());
    if let (Some(name), Some(value)) = (name, value) {
        headers.insert(name, value);
    }
    headers
}

/// `tandem health`.
pub fn command(args: &[String]) -> ExitCode {
    let live = match args {
        [] => false,
        [flag] if flag == "--live" => true,
        _ => {
            eprintln!("tandem: error: usage: tandem health [--live]");
            return ExitCode::from(2);
        }
    };
    let config = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tandem: error: {e}");
            return ExitCode::from(2);
        }
    };
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
        eprintln!("tandem: error: cannot start a runtime");
        return ExitCode::from(1);
    };
    match runtime.block_on(check(&config, live)) {
        Ok(summary) => {
            println!("healthy: {summary}");
            ExitCode::SUCCESS
        }
        Err(why) => {
            eprintln!("tandem: unhealthy: {why}");
            ExitCode::from(1)
        }
    }
}

async fn check(config: &Config, live: bool) -> Result<String, String> {
    // With WORKER_COMMAND the copies' own ready path, through tandem: ready when it
    // answers 2xx/3xx, live when tandem answers at all.
    let proxied = config.proxy.command.is_some();
    let path = match (proxied, live) {
        (true, _) => config.proxy.ready_path.as_str(),
        (false, true) => "/v2/health/live",
        (false, false) => "/v2/health/ready",
    };
    let healthy = |status: u16| match (proxied, live) {
        (true, true) => true,
        (true, false) => (200..400).contains(&status),
        (false, _) => status == 200,
    };
    // With the health category restricted, the probe carries its header, as
    // it reads the same environment as the server.
    let headers = health_headers(config);
    let plain = reqwest::Client::builder()
        .timeout(PROBE_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .default_headers(headers.clone())
        .build()
        .map_err(|e| e.to_string())?;
    let plain_port = config.edge.http_mode != HttpMode::Off;
    let mut summary = Vec::new();
    if plain_port {
        let http = local(config.listen.host, config.listen.port);
        let (status, _) = probe(&plain, &format!("http://{http}{path}")).await?;
        if !healthy(status) {
            return Err(format!("http://{http}{path} answered {status}"));
        }
        summary.push(format!("http {status}"));
    }
    if !config.tls.enabled {
        return Ok(summary.join(", "));
    }
    if config.tls.client_auth == ClientAuth::Required {
        if !plain_port {
            return Err(
                "nothing this probe can reach: HTTP_MODE=off and SSL_CLIENT_AUTH=required (the probe has no \
                 client certificate)\nhint: HTTP_MODE=health answers health checks on the plain port and nothing else"
                    .into(),
            );
        }
        summary.push("https not probed (SSL_CLIENT_AUTH=required and the probe has no client certificate)".into());
        return Ok(summary.join(", "));
    }
    // Pinned to what tandem publishes, so any certificate source (self-signed, private CA,
    // ACME, files) is checked the same way, whatever names it carries.
    let published = Bundle::load(&Layout::of(&config.process.cert_dir()).live()).ok().map(|b| b.info.fingerprint);
    let pinned = reqwest::Client::builder()
        .timeout(PROBE_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .default_headers(headers)
        .danger_accept_invalid_certs(true)
        .tls_info(true)
        .build()
        .map_err(|e| e.to_string())?;
    let https = local(config.listen.host, config.tls.port);
    let (status, served) = probe(&pinned, &format!("https://{https}{path}")).await?;
    if !healthy(status) {
        return Err(format!("https://{https}{path} answered {status}"));
    }
    match (&published, &served) {
        (Some(p), Some(s)) if p != s => {
            return Err(format!("the HTTPS port serves certificate {s}, not the published {p}"));
        }
        (Some(p), _) => summary.push(format!("https {status} (certificate {})", &p[..16.min(p.len())])),
        (None, _) => summary.push(format!("https {status} (published certificate not readable here)")),
    }
    Ok(summary.join(", "))
}
