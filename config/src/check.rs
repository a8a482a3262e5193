//! Mode diagnosis for `tandem check` and start-up: which serve mode a valid
//! configuration implies, and every variable it sets that this mode ignores,
//! each with its hint — derived from the scopes the variables declare, never
//! from lists kept here. (Conflicts are refused earlier, by
//! [`Config::from_vars`], with exit 2.)

use crate::certs::CertSource;
use crate::Config;

/// How tandem will serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServeMode {
    /// Plain HTTP only.
    Insecure,
    /// HTTPS with a generated self-signed certificate.
    Generate,
    /// HTTPS with a certificate downloaded from `SSL_INDIRECT_URL`.
    Indirect,
    /// HTTPS with certificate files on disk.
    Custom,
    /// HTTPS with short-lived leaves from the private CA.
    Ca,
    /// HTTPS with a certificate from an ACME server.
    Acme,
}

impl ServeMode {
    /// Its name, as `tandem check` prints it.
    pub fn name(self) -> &'static str {
        match self {
            ServeMode::Insecure => "insecure (plain HTTP only)",
            ServeMode::Generate => "generate (self-signed certificate)",
            ServeMode::Indirect => "indirect (downloaded certificate)",
            ServeMode::Custom => "custom (certificate files)",
            ServeMode::Ca => "ca (leaves from the private CA)",
            ServeMode::Acme => "acme (certificate from an ACME server, renewed by tandem)",
        }
    }
}

/// The serve mode `c` implies.
pub fn serve_mode(c: &Config) -> ServeMode {
    match (c.tls.enabled, &c.certs.source) {
        (false, _) => ServeMode::Insecure,
        (true, CertSource::Generate) => ServeMode::Generate,
        (true, CertSource::Indirect) => ServeMode::Indirect,
        (true, CertSource::Path(_)) => ServeMode::Custom,
        (true, CertSource::Ca) => ServeMode::Ca,
        (true, CertSource::Acme) => ServeMode::Acme,
    }
}

/// A variable that is set but has no effect in this configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ignored {
    /// The variable.
    pub var: &'static str,
    /// Why it has no effect, and what to do.
    pub hint: &'static str,
}

/// Every declared variable that `is_set` says is set and that `c` ignores, in declaration order.
pub fn ignored(c: &Config, is_set: &dyn Fn(&str) -> bool) -> Vec<Ignored> {
    crate::vars()
        .filter(|v| is_set(v.name))
        .filter_map(|v| (v.scope)(c).map(|hint| Ignored { var: v.name, hint }))
        .collect()
}

/// What an operator must know before serving with `c`, said at start-up and by
/// `tandem check`: that the default certificate source downloads a private key
/// shared with everyone else who downloads it, that client certificates
/// required on HTTPS protect nothing while the plain port serves everything,
/// that model control or system shared memory is open to the network, and
/// that a `WORKER_COMMAND` without a placeholder must read its port from `$PORT`.
pub fn cautions(c: &Config) -> Vec<String> {
    let mut out = Vec::new();
    if c.tls.enabled && c.certs.source == crate::certs::CertSource::Indirect {
        out.push(format!(
            "SSL_CERTIFICATE=INDIRECT (the default, kept for compatibility with Roboflow's start_server) downloads a \
             certificate and its private key from {url}: every server that downloads it holds the same key, so anyone \
             with it can impersonate this server or read its traffic; for a key of your own set SSL_CERTIFICATE=GENERATE \
             (self-signed), CA (tandem ca init), ACME (Let's Encrypt, with ACME_DOMAINS) or a path to your PEM certificate",
            url = crate::values::redact_url(&c.certs.indirect_url)
        ));
    }
    if c.tls.enabled
        && c.tls.client_auth == crate::tls::ClientAuth::Required
        && c.edge.http_mode == crate::edge::HttpMode::Full
        && !c.listen.host.is_loopback()
    {
        out.push(format!(
            "SSL_CLIENT_AUTH=required asks HTTPS clients for a certificate, but the plain HTTP port {port} on {host} \
             serves everything (inference, model control) to anyone who reaches it; set HTTP_MODE=health (health \
             checks only), redirect or off",
            port = c.listen.port,
            host = c.listen.host
        ));
    }
    let repository_open = !restricted(c, "model-repository");
    if c.engine.model_control_mode == crate::engine::ModelControlMode::Explicit
        && c.proxy.command.is_none()
        && repository_open
        && !c.listen.host.is_loopback()
    {
        out.push(format!(
            "MODEL_CONTROL_MODE=explicit lets anyone who reaches {host} load and unload models: restrict the \
             model-repository API to a header and secret, e.g. RESTRICTED_API='model-repository:x-admin-key=@/etc/tandem/admin.key'",
            host = c.listen.host
        ));
    }
    let shared_memory_open = !restricted(c, "shared-memory");
    if c.engine.system_shared_memory && c.proxy.command.is_none() && shared_memory_open && !c.listen.host.is_loopback()
    {
        out.push(format!(
            "SYSTEM_SHARED_MEMORY=true lets anyone who reaches {host} register any /dev/shm object tandem's user can \
             open, and read and write it through inference (other programs' shared memory included): restrict the \
             shared-memory API to a header and secret, e.g. RESTRICTED_API='shared-memory:x-shm-key=@/etc/tandem/shm.key', \
             or serve on HOST=127.0.0.1",
            host = c.listen.host
        ));
    }
    if c.edge.access.allow_mtls && c.edge.access.api_keys.is_some() && c.tls.client_auth == crate::tls::ClientAuth::Off
    {
        out.push(
            "API_KEYS_ALLOW_MTLS=true lets a client certificate stand in for an API key, but SSL_CLIENT_AUTH is off: \
             no client presents one; set SSL_CLIENT_AUTH=optional (and SSL_CLIENT_CA)"
                .to_string(),
        );
    }
    if let Some(argv) = &c.proxy.command {
        if !argv.iter().any(|a| a.contains("{port}") || a.contains("{socket}")) {
            out.push(
                "WORKER_COMMAND has no {port} or {socket}: each copy must listen on 127.0.0.1:$PORT (tandem sets PORT \
                 and HOST per copy, and probes there); if your server takes its port on the command line, put {port} \
                 where the port goes (e.g. --port {port}), or {socket} for a Unix socket"
                    .to_string(),
            );
        }
    }
    out
}

/// Whether `RESTRICTED_API` puts `category` behind a header and secret.
fn restricted(c: &Config, category: &str) -> bool {
    c.edge.restricted.iter().any(|r| r.categories.iter().any(|k| k == category))
}

/// Whether `var` is set to something other than blanks in the process environment.
pub fn set_in_env(var: &str) -> bool {
    std::env::var_os(var).is_some_and(|v| !v.to_string_lossy().trim().is_empty())
}

/// The `tandem check` report: serve mode, the effective configuration, the
/// ignored variables and those that look like tandem's but are not (`strangers`).
pub fn report(c: &Config, is_set: &dyn Fn(&str) -> bool, strangers: &[crate::unknown::Unknown]) -> String {
    let workers = match &c.proxy.command {
        Some(argv) => format!("{} copies of `{}` (WORKER_COMMAND)", c.process.num_workers, shell_words::join(argv)),
        None => format!("{} engine workers", c.process.num_workers),
    };
    let mut s = format!("serve mode: {}\nworkers: {workers}\n\neffective configuration:\n", serve_mode(c).name());
    if let Ok(serde_json::Value::Object(sections)) = serde_json::to_value(c).map(hide_secrets) {
        for (section, fields) in sections {
            match fields {
                serde_json::Value::Object(fields) => {
                    for (k, v) in fields {
                        s.push_str(&format!("  {section}.{k} = {}\n", plain(&v)));
                    }
                }
                other => s.push_str(&format!("  {section} = {}\n", plain(&other))),
            }
        }
    }
    let set: Vec<&str> = crate::vars().map(|v| v.name).filter(|n| is_set(n)).collect();
    s.push_str(&format!(
        "\nset in the environment: {}\n",
        if set.is_empty() { "(none)".into() } else { set.join(", ") }
    ));
    let notes = ignored(c, is_set);
    if notes.is_empty() {
        s.push_str("\nno variable is ignored\n");
    } else {
        s.push_str("\nignored:\n");
        for n in notes {
            s.push_str(&format!("  {}: {}\n", n.var, n.hint));
        }
    }
    for caution in cautions(c) {
        s.push_str(&format!("\ncaution: {caution}\n"));
    }
    if !strangers.is_empty() {
        let strict = if c.process.strict_config { "" } else { "; STRICT_CONFIG=true refuses to start with them" };
        s.push_str(&format!("\nnot tandem's (misspelt?){strict}:\n"));
        for u in strangers {
            s.push_str(&format!("  {u}\n"));
        }
    }
    s
}

/// A value as an operator writes it: durations as seconds, strings unquoted.
/// `v` with every secret given as a value replaced (`RESTRICTED_API`'s): a
/// report may be pasted anywhere.
fn hide_secrets(mut v: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match &mut v {
        Value::Object(o) => {
            for (k, item) in o.iter_mut() {
                if (k == "secret" || k == "health_key") && item.get("value").is_some() {
                    *item = Value::String("(hidden)".into());
                } else {
                    *item = hide_secrets(item.take());
                }
            }
        }
        Value::Array(items) => {
            for item in items.iter_mut() {
                *item = hide_secrets(item.take());
            }
        }
        _ => {}
    }
    v
}

fn plain(v: &serde_json::Value) -> String {
    use serde_json::Value;
    match v {
        Value::Object(o) if o.len() == 2 && o.contains_key("secs") && o.contains_key("nanos") => {
            let secs = o["secs"].as_u64().unwrap_or(0) as f64 + o["nanos"].as_u64().unwrap_or(0) as f64 / 1e9;
            format!("{secs}s")
        }
        // An enum variant with data (a path, a list of origins): the data as set.
        Value::Object(o)
            if o.len() == 1 && matches!(o.keys().next().map(String::as_str), Some("path" | "origins" | "only")) =>
        {
            o.values().next().map(plain).unwrap_or_default()
        }
        Value::Array(items) => items.iter().map(plain).collect::<Vec<_>>().join(","),
        Value::Object(o) => {
            let parts: Vec<String> = o.iter().map(|(k, v)| format!("{k}={}", plain(v))).collect();
            parts.join(", ")
        }
        Value::String(s) => s.clone(),
        Value::Null => "(unset)".into(),
        other => other.to_string(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly by design")]
mod tests {
    use super::*;

    fn config(pairs: &[(&str, &str)]) -> Config {
        let vars: Vec<(String, String)> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Config::from_vars(vars).expect("valid")
    }

    fn ignored_names(c: &Config, set: &[&str]) -> Vec<&'static str> {
        ignored(c, &|v| set.contains(&v)).into_iter().map(|n| n.var).collect()
    }

    #[test]
    fn the_shared_downloaded_key_is_a_caution_only_when_it_is_used() {
        let indirect = config(&[("ENABLE_SSL", "true")]);
        let said = cautions(&indirect);
        assert_eq!(said.len(), 1);
        assert!(said[0].contains("https://roboflow.host/certificate/") && said[0].contains("same key"), "{said:?}");
        assert!(said[0].contains("SSL_CERTIFICATE=GENERATE") && said[0].contains("ACME"), "{said:?}");
        assert!(report(&indirect, &|_| false, &[]).contains("caution: SSL_CERTIFICATE=INDIRECT"));
        let secret =
            config(&[("ENABLE_SSL", "true"), ("SSL_INDIRECT_URL", "https://robot:s3cret@h.example/c/?token=t0ken")]);
        let said = cautions(&secret).join(" ");
        assert!(
            said.contains("https://h.example/c/?redacted") && !said.contains("s3cret") && !said.contains("t0ken"),
            "{said}"
        );
        assert!(cautions(&config(&[])).is_empty(), "no HTTPS: no download");
        let no_port = config(&[("WORKER_COMMAND", "sh -c 'exec true'")]);
        assert!(cautions(&no_port).iter().any(|c| c.contains("no {port} or {socket}") && c.contains("$PORT")));
        for placed in ["sh -c 'exec x --port {port}'", "sh -c 'exec x --bind unix:{socket}'"] {
            assert!(cautions(&config(&[("WORKER_COMMAND", placed)])).is_empty(), "{placed}");
        }
        assert!(cautions(&config(&[("ENABLE_SSL", "true"), ("SSL_CERTIFICATE", "GENERATE")])).is_empty());
    }

    #[test]
    fn required_client_certificates_with_an_open_plain_port_are_a_caution() {
        let ca = std::env::temp_dir().join(format!("tandem-check-ca-{}.pem", std::process::id()));
        std::fs::write(&ca, "not parsed here").unwrap();
        let ca_path = ca.to_str().unwrap();
        let base = [("ENABLE_SSL", "true"), ("SSL_CERTIFICATE", "GENERATE"), ("SSL_CLIENT_CA", ca_path)];
        let open = config(&[&base[..], &[("HOST", "0.0.0.0")]].concat());
        let said = cautions(&open).join(" ");
        assert!(said.contains("SSL_CLIENT_AUTH=required") && said.contains("HTTP_MODE=health"), "{said}");
        for quiet in [
            [&base[..], &[("HOST", "0.0.0.0"), ("HTTP_MODE", "health")]].concat(),
            [&base[..], &[("HOST", "0.0.0.0"), ("HTTP_MODE", "off")]].concat(),
            [&base[..], &[("HOST", "127.0.0.1")]].concat(),
            [&base[..], &[("HOST", "0.0.0.0"), ("SSL_CLIENT_AUTH", "optional")]].concat(),
        ] {
            assert!(cautions(&config(&quiet)).is_empty(), "{quiet:?}");
        }
        let _ = std::fs::remove_file(&ca);
    }

    #[test]
    fn system_shared_memory_open_to_the_network_is_a_caution() {
        let said = |pairs: &[(&str, &str)]| cautions(&config(pairs)).join(" ");
        let open = said(&[("SYSTEM_SHARED_MEMORY", "true")]);
        assert!(
            open.contains("SYSTEM_SHARED_MEMORY=true lets anyone") && open.contains("RESTRICTED_API='shared-memory")
        );
        for quiet in [
            &[("SYSTEM_SHARED_MEMORY", "false")][..],
            &[("SYSTEM_SHARED_MEMORY", "true"), ("HOST", "127.0.0.1")],
            &[("SYSTEM_SHARED_MEMORY", "true"), ("RESTRICTED_API", "shared-memory:x-shm-key=zz9")],
        ] {
            assert!(!said(quiet).contains("SYSTEM_SHARED_MEMORY"), "{quiet:?}");
        }
    }

    #[test]
    fn restricted_api_secrets_never_reach_the_report_and_an_open_repository_is_a_caution() {
        let c = config(&[
            ("RESTRICTED_API", "model-repository,statistics:X-Admin-Key=hunter2-secret"),
            ("MODEL_CONTROL_MODE", "explicit"),
        ]);
        assert_eq!(c.edge.restricted[0].header, "x-admin-key");
        let text = report(&c, &|_| false, &[]);
        assert!(!text.contains("hunter2") && text.contains("(hidden)") && text.contains("x-admin-key"), "{text}");
        assert!(!text.contains("load and unload models"), "the repository is restricted: {text}");
        let open = config(&[("MODEL_CONTROL_MODE", "explicit")]);
        assert!(
            cautions(&open).iter().any(|c| c.contains("RESTRICTED_API='model-repository")),
            "{:?}",
            cautions(&open)
        );
        let local = config(&[("MODEL_CONTROL_MODE", "explicit"), ("HOST", "127.0.0.1")]);
        assert!(cautions(&local).is_empty());
        for bad in [
            "inference:x=",
            "nonsense:x-key=zz9",
            "inference:bad header=zz9",
            "inferencezz9",
            "inference:x=zz9;inference:y=zz9",
            ":x=zz9",
            "health:x=@/nonexistent/zz9",
        ] {
            let err = Config::from_vars([("RESTRICTED_API".to_string(), bad.to_string())]).expect_err(bad);
            assert_eq!(err.problems[0].var, "RESTRICTED_API");
            assert!(!err.to_string().contains("zz9") || bad.contains('@'), "the value is never echoed: {err}");
        }
    }

    #[test]
    fn variables_the_mode_does_not_use_are_named() {
        let c = config(&[("SSL_HSTS", "max-age=1"), ("REPOSITORY_POLL_SECS", "5")]);
        assert_eq!(serve_mode(&c), ServeMode::Insecure);
        assert_eq!(ignored_names(&c, &["SSL_HSTS", "REPOSITORY_POLL_SECS"]), ["SSL_HSTS", "REPOSITORY_POLL_SECS"]);

        let c = config(&[("ENABLE_SSL", "true"), ("SSL_CERTIFICATE", "GENERATE"), ("SSL_INDIRECT_URL", "https://x/")]);
        assert_eq!(serve_mode(&c), ServeMode::Generate);
        assert_eq!(ignored_names(&c, &["SSL_INDIRECT_URL"]), ["SSL_INDIRECT_URL"]);
        assert!(ignored(&c, &|_| false).is_empty());
        let text = report(&c, &|v| v == "SSL_INDIRECT_URL", &[]);
        assert!(text.contains("serve mode: generate") && text.contains("process.graceful_timeout = 30s"), "{text}");
        // Values as the user writes them, never Rust's spelling of them.
        for shown in [
            "certs.source = GENERATE",
            "certs.key_type = rsa2048",
            "acme.challenge = http-01",
            "tls.min_version = 1.2",
            "tls.client_auth = off",
            "engine.backend = auto",
            "engine.model_control_mode = none",
            "engine.model_load = *",
            "edge.cors = (none)",
            "process.log_format = text",
        ] {
            assert!(text.contains(shown), "{shown}: {text}");
        }
    }

    #[test]
    fn every_variable_is_ignored_without_https_exactly_when_it_is_about_https() {
        let c = config(&[]);
        let https_only = [
            "SSL_PORT",
            "SSL_CLIENT_CA",
            "SSL_CLIENT_AUTH",
            "SSL_MIN_VERSION",
            "SSL_HTTP3",
            "SSL_CERTIFICATE",
            "SSL_KEY",
            "SSL_KEY_TYPE",
            "SSL_INDIRECT_URL",
            "SSL_REFRESH_INTERVAL",
            "SSL_CERT_VALIDITY",
            "SSL_SAN",
            "ACME_DOMAINS",
            "ACME_EMAIL",
            "ACME_DIRECTORY",
            "ACME_STAGING",
            "ACME_CHALLENGE",
            "ACME_DNS_HOOK",
            "SSL_HSTS",
            "SSL_REDIRECT_HTTP",
            "SHM_SLOTS",
            "SHM_SLOT_BYTES",
            "SHM_WARM_BYTES",
        ];
        for v in crate::vars() {
            let hint = (v.scope)(&c);
            assert_eq!(hint == Some(crate::scope::NO_HTTPS), https_only.contains(&v.name), "{}: {hint:?}", v.name);
        }
    }

    #[test]
    fn acme_and_ca_variables_are_named_where_they_do_nothing() {
        // ACME_DOMAINS while generating, SSL_CERT_VALIDITY without the CA.
        let c = config(&[("ENABLE_SSL", "true"), ("SSL_CERTIFICATE", "GENERATE"), ("ACME_DOMAINS", "a.example.com")]);
        let notes = ignored(&c, &|v| v == "ACME_DOMAINS" || v == "SSL_CERT_VALIDITY");
        let vars: Vec<&str> = notes.iter().map(|n| n.var).collect();
        assert_eq!(vars, ["SSL_CERT_VALIDITY", "ACME_DOMAINS"]);
        assert!(notes[1].hint.contains("SSL_CERTIFICATE=ACME"), "{}", notes[1].hint);
        let c = config(&[
            ("ENABLE_SSL", "true"),
            ("SSL_CERTIFICATE", "ACME"),
            ("ACME_DOMAINS", "a.example.com"),
            ("ACME_DNS_HOOK", "x"),
        ]);
        assert_eq!(serve_mode(&c), ServeMode::Acme);
        assert_eq!(ignored_names(&c, &["ACME_DNS_HOOK"]), ["ACME_DNS_HOOK"], "the hook is only for dns-01");
        let c = config(&[("ENABLE_SSL", "true"), ("SSL_CERTIFICATE", "CA"), ("SSL_CERT_VALIDITY", "1d")]);
        assert_eq!(serve_mode(&c), ServeMode::Ca);
        assert!(ignored(&c, &|v| v == "SSL_CERT_VALIDITY").is_empty());
    }

    #[test]
    fn engine_settings_are_named_when_a_worker_command_replaces_the_engine() {
        let c = config(&[("WORKER_COMMAND", "sh -c 'exec true'"), ("ENGINE_THREADS", "2")]);
        assert_eq!(c.proxy.command.as_deref(), Some(&["sh".to_string(), "-c".into(), "exec true".into()][..]));
        let set = ["ENGINE_THREADS", "WORKER_READY_PATH"];
        assert_eq!(ignored_names(&c, &set), ["ENGINE_THREADS"]);
        assert!(report(&c, &|v| set.contains(&v), &[]).contains("workers: 1 copies of `sh -c 'exec true'`"));
        assert_eq!(ignored_names(&config(&[]), &set), ["WORKER_READY_PATH"]);
    }
}
