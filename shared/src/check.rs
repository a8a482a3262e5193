//! Mode diagnosis for `tandem check` and start-up: which serve mode a valid
//! configuration implies, and every variable it sets that this mode ignores,
//! each with a hint. (Conflicts are refused earlier, by `Config::from_env`,
//! with exit 2.)

use crate::config::{BackendChoice, CertSource, ClientAuth, Config, ModelControlMode, ENV_VARS};

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
    match (&c.enable_ssl, &c.ssl_certificate) {
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
    pub hint: String,
}

/// Every variable of [`ENV_VARS`] that `is_set` says is set and that `c` ignores.
pub fn ignored(c: &Config, is_set: &dyn Fn(&str) -> bool) -> Vec<Ignored> {
    let mode = serve_mode(c);
    let mut out = Vec::new();
    let mut note = |var: &'static str, hint: &str| {
        if is_set(var) {
            out.push(Ignored { var, hint: hint.to_string() });
        }
    };
    if mode == ServeMode::Insecure {
        for var in [
            "SSL_PORT",
            "SSL_CERTIFICATE",
            "SSL_KEY",
            "SSL_KEY_TYPE",
            "SSL_INDIRECT_URL",
            "SSL_REFRESH_INTERVAL",
            "SSL_CERT_VALIDITY",
            "SSL_SAN",
            "SSL_MIN_VERSION",
            "SSL_HSTS",
            "ACME_DOMAINS",
            "ACME_EMAIL",
            "ACME_DIRECTORY",
            "ACME_STAGING",
            "ACME_CHALLENGE",
            "ACME_DNS_HOOK",
            "SHM_SLOTS",
            "SHM_SLOT_BYTES",
        ] {
            note(var, "ENABLE_SSL is false, so there is no HTTPS port; set ENABLE_SSL=true to use it");
        }
    } else {
        if mode != ServeMode::Custom {
            note("SSL_KEY", "SSL_CERTIFICATE is not a certificate file; SSL_KEY only goes with one");
        }
        if mode != ServeMode::Indirect {
            note("SSL_INDIRECT_URL", "SSL_CERTIFICATE is not INDIRECT");
        }
        if mode != ServeMode::Acme {
            for var in
                ["ACME_DOMAINS", "ACME_EMAIL", "ACME_DIRECTORY", "ACME_STAGING", "ACME_CHALLENGE", "ACME_DNS_HOOK"]
            {
                note(
                    var,
                    "SSL_CERTIFICATE is not ACME; set SSL_CERTIFICATE=ACME to get a certificate from an ACME server",
                );
            }
        } else if c.acme.challenge != crate::config::AcmeChallenge::Dns01 {
            note("ACME_DNS_HOOK", "ACME_CHALLENGE is not dns-01; the hook is only run for dns-01");
        }
        if mode != ServeMode::Ca {
            note(
                "SSL_CERT_VALIDITY",
                "SSL_CERTIFICATE is not CA; SSL_CERT_VALIDITY is the lifetime of the private CA's leaves",
            );
        }
        if mode == ServeMode::Custom {
            note("SSL_KEY_TYPE", "the certificate comes from files; SSL_KEY_TYPE is for generated ones");
            note("SSL_SAN", "the certificate comes from files; SSL_SAN is for generated ones");
        }
        if c.ssl_client_auth == ClientAuth::Off {
            note("SSL_CLIENT_CA", "SSL_CLIENT_AUTH=off; set it to optional or required to verify clients");
        }
    }
    if c.worker_command.is_some() {
        for var in [
            "MODEL_REPOSITORY",
            "ORT_DYLIB_PATH",
            "ENGINE_BACKEND",
            "ENGINE_DEVICE",
            "ENGINE_THREADS",
            "STRICT_READINESS",
            "EXIT_ON_MODEL_ERROR",
            "MODEL_CONTROL_MODE",
            "REPOSITORY_POLL_SECS",
            "SHM_SLOTS",
            "SHM_SLOT_BYTES",
        ] {
            note(var, "WORKER_COMMAND runs your server instead of tandem's engine; engine settings do nothing");
        }
        return out;
    }
    for var in ["WORKER_READY_PATH", "WORKER_START_TIMEOUT"] {
        note(var, "WORKER_COMMAND is not set; this is for the copies of your own server");
    }
    if c.model_control_mode != ModelControlMode::Poll {
        note("REPOSITORY_POLL_SECS", "MODEL_CONTROL_MODE is not poll");
    }
    if c.engine_backend == BackendChoice::Tract {
        note("ORT_DYLIB_PATH", "ENGINE_BACKEND=tract never loads ONNX Runtime");
    }
    out
}

/// Whether `var` is set to something other than blanks in the process environment.
pub fn set_in_env(var: &str) -> bool {
    std::env::var_os(var).is_some_and(|v| !v.to_string_lossy().trim().is_empty())
}

/// The `tandem check` report: serve mode, the effective configuration and the ignored variables.
pub fn report(c: &Config, is_set: &dyn Fn(&str) -> bool) -> String {
    let workers = match &c.worker_command {
        Some(argv) => format!("{} copies of `{}` (WORKER_COMMAND)", c.num_workers, shell_words::join(argv)),
        None => format!("{} engine workers", c.num_workers),
    };
    let mut s = format!("serve mode: {}\nworkers: {workers}\n\neffective configuration:\n", serve_mode(c).name());
    if let Ok(serde_json::Value::Object(fields)) = serde_json::to_value(c) {
        for (k, v) in fields {
            s.push_str(&format!("  {k} = {}\n", plain(&v)));
        }
    }
    let set: Vec<&str> = ENV_VARS.iter().map(|v| v.name).filter(|n| is_set(n)).collect();
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
    s
}

/// A value as an operator writes it: durations as seconds, strings unquoted.
fn plain(v: &serde_json::Value) -> String {
    use serde_json::Value;
    match v {
        Value::Object(o) if o.len() == 2 && o.contains_key("secs") && o.contains_key("nanos") => {
            let secs = o["secs"].as_u64().unwrap_or(0) as f64 + o["nanos"].as_u64().unwrap_or(0) as f64 / 1e9;
            format!("{secs}s")
        }
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
mod tests {
    use super::*;

    fn config(pairs: &[(&str, &str)]) -> Config {
        let vars: Vec<(String, String)> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Config::from_vars(vars).expect("valid")
    }

    #[test]
    fn variables_the_mode_does_not_use_are_named() {
        let c = config(&[("SSL_HSTS", "max-age=1"), ("REPOSITORY_POLL_SECS", "5")]);
        assert_eq!(serve_mode(&c), ServeMode::Insecure);
        let set = |v: &str| v == "SSL_HSTS" || v == "REPOSITORY_POLL_SECS";
        let vars: Vec<&str> = ignored(&c, &set).into_iter().map(|n| n.var).collect();
        assert_eq!(vars, ["SSL_HSTS", "REPOSITORY_POLL_SECS"]);

        let c = config(&[("ENABLE_SSL", "true"), ("SSL_CERTIFICATE", "GENERATE"), ("SSL_INDIRECT_URL", "https://x/")]);
        assert_eq!(serve_mode(&c), ServeMode::Generate);
        let vars: Vec<&str> = ignored(&c, &|v| v == "SSL_INDIRECT_URL").into_iter().map(|n| n.var).collect();
        assert_eq!(vars, ["SSL_INDIRECT_URL"]);
        assert!(ignored(&c, &|_| false).is_empty());
        let text = report(&c, &|v| v == "SSL_INDIRECT_URL");
        assert!(text.contains("serve mode: generate") && text.contains("graceful_timeout = 30s"), "{text}");
    }

    #[test]
    fn acme_and_ca_variables_are_named_where_they_do_nothing() {
        // ACME_DOMAINS while generating, SSL_CERT_VALIDITY without the CA.
        let c = config(&[("ENABLE_SSL", "true"), ("SSL_CERTIFICATE", "GENERATE"), ("ACME_DOMAINS", "a.example.com")]);
        let set = |v: &str| v == "ACME_DOMAINS" || v == "SSL_CERT_VALIDITY";
        let notes = ignored(&c, &set);
        let vars: Vec<&str> = notes.iter().map(|n| n.var).collect();
        assert_eq!(vars, ["ACME_DOMAINS", "SSL_CERT_VALIDITY"]);
        assert!(notes[0].hint.contains("SSL_CERTIFICATE=ACME"), "{}", notes[0].hint);
        let c = config(&[
            ("ENABLE_SSL", "true"),
            ("SSL_CERTIFICATE", "ACME"),
            ("ACME_DOMAINS", "a.example.com"),
            ("ACME_DNS_HOOK", "x"),
        ]);
        assert_eq!(serve_mode(&c), ServeMode::Acme);
        let vars: Vec<&str> = ignored(&c, &|v| v == "ACME_DNS_HOOK").into_iter().map(|n| n.var).collect();
        assert_eq!(vars, ["ACME_DNS_HOOK"], "the hook is only for dns-01");
        let c = config(&[("ENABLE_SSL", "true"), ("SSL_CERTIFICATE", "CA"), ("SSL_CERT_VALIDITY", "1d")]);
        assert_eq!(serve_mode(&c), ServeMode::Ca);
        assert!(ignored(&c, &|v| v == "SSL_CERT_VALIDITY").is_empty());
    }

    #[test]
    fn engine_settings_are_named_when_a_worker_command_replaces_the_engine() {
        let c = config(&[("WORKER_COMMAND", "sh -c 'exec true'"), ("ENGINE_THREADS", "2")]);
        assert_eq!(c.worker_command.as_deref(), Some(&["sh".to_string(), "-c".into(), "exec true".into()][..]));
        let set = |v: &str| v == "ENGINE_THREADS" || v == "WORKER_READY_PATH";
        let vars: Vec<&str> = ignored(&c, &set).into_iter().map(|n| n.var).collect();
        assert_eq!(vars, ["ENGINE_THREADS"]);
        assert!(report(&c, &set).contains("workers: 1 copies of `sh -c 'exec true'`"));
        let c = config(&[]);
        let vars: Vec<&str> = ignored(&c, &set).into_iter().map(|n| n.var).collect();
        assert_eq!(vars, ["WORKER_READY_PATH"]);
    }
}
