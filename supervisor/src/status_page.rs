//! `GET /status` on `METRICS_PORT`: the whole server at a glance as one HTML
//! page (HAProxy's statistics page in spirit), rendered from the same
//! statistics region as `/metrics`; no script, no outside resource, every
//! name from the repository or the network escaped.

use std::fmt::Write as _;

use axum::http::header;
use axum::response::{IntoResponse, Response};
use tandem_shared::stats::{
    ModelCounter, ModelTotals, Snapshot, DURATION_BOUNDS, RESTART_CAUSES, RING_EVENTS, TLS_ALPN, TLS_FAILURES,
    TLS_PROTOCOLS,
};
use tandem_shared::sys::counters::Counters;
use tandem_shared::sys::shm::Region;

/// Seconds between the page's own reloads.
const REFRESH_SECONDS: u32 = 5;

/// What the page may load: its own inline style, nothing else.
const CSP: &str =
    "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The `/status` response: the page, never cached, under a policy that runs nothing.
pub fn response(counters: &Counters, ring: Option<&Region>, cert_status: Option<&std::path::Path>) -> Response {
    let snap = Snapshot::read(counters);
    let ring = ring.map(tandem_engine_worker::metrics::ring_busy);
    let source = cert_status.map(|p| tandem_engine_worker::metrics::cert_source(p).unwrap_or_else(|| "unknown".into()));
    let page = render(&snap, ring, source.as_deref(), tandem_shared::certs::status::unix_now());
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        page,
    )
        .into_response()
}

/// Text made safe for HTML content and attribute values.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c if c.is_control() => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
}

/// A page of tables, written row by row.
struct Page {
    out: String,
}

impl Page {
    fn section(&mut self, title: &str, note: &str) {
        let _ = write!(self.out, "<h2>{}</h2>", esc(title));
        if !note.is_empty() {
            let _ = write!(self.out, "<p class=\"note\">{}</p>", esc(note));
        }
    }

    /// A table; `numeric` columns are right-aligned. Cells are already escaped HTML.
    fn table(&mut self, id: &str, head: &[&str], numeric_from: usize, rows: &[Vec<String>]) {
        let _ = write!(self.out, "<table id=\"{id}\"><thead><tr>");
        for (i, h) in head.iter().enumerate() {
            let class = if i >= numeric_from { " class=\"n\"" } else { "" };
            let _ = write!(self.out, "<th{class}>{}</th>", esc(h));
        }
        self.out.push_str("</tr></thead><tbody>");
        if rows.is_empty() {
            let _ = write!(self.out, "<tr><td colspan=\"{}\" class=\"none\">none yet</td></tr>", head.len());
        }
        for row in rows {
            self.out.push_str("<tr>");
            for (i, cell) in row.iter().enumerate() {
                let class = if i >= numeric_from { " class=\"n\"" } else { "" };
                let _ = write!(self.out, "<td{class}>{cell}</td>");
            }
            self.out.push_str("</tr>");
        }
        self.out.push_str("</tbody></table>");
    }
}

fn ms(ns: u64, count: u64) -> String {
    if count == 0 {
        return "-".into();
    }
    format!("{:.2}", ns as f64 / count as f64 / 1e6)
}

fn mib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / (1 << 20) as f64)
}

/// The bucket bound under which a `q` share of the histogram's requests finished.
fn quantile(buckets: &[u64], q: f64) -> String {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return "-".into();
    }
    let mut seen = 0u64;
    for (i, n) in buckets.iter().enumerate() {
        seen += n;
        if seen as f64 >= q * total as f64 {
            return match DURATION_BOUNDS.get(i) {
                Some(b) => format!("≤ {}", b * 1e3),
                None => format!("&gt; {}", DURATION_BOUNDS[DURATION_BOUNDS.len() - 1] * 1e3),
            };
        }
    }
    "-".into()
}

fn ago(now: i64, then_ms: u64) -> String {
    if then_ms == 0 {
        return "never".into();
    }
    let s = (now - (then_ms / 1000) as i64).max(0);
    match s {
        0..120 => format!("{s} s ago"),
        120..7200 => format!("{} min ago", s / 60),
        _ => format!("{} h ago", s / 3600),
    }
}

fn model_row(name: &str, version: u64, t: &ModelTotals, now: i64) -> Vec<String> {
    use ModelCounter::*;
    let requests = t.get(SuccessCount) + t.get(FailCount);
    let batch = if t.get(ExecutionCount) == 0 {
        "-".to_string()
    } else {
        format!("{:.2}", t.get(InferenceCount) as f64 / t.get(ExecutionCount) as f64)
    };
    vec![
        esc(name),
        version.to_string(),
        t.get(SuccessCount).to_string(),
        t.get(FailCount).to_string(),
        t.get(InferenceCount).to_string(),
        batch,
        ms(t.get(QueueNs), requests),
        ms(t.get(InputNs) + t.get(InferNs) + t.get(OutputNs), requests),
        quantile(&t.buckets, 0.5),
        quantile(&t.buckets, 0.99),
        ago(now, t.get(LastInferenceMs)),
    ]
}

/// The page for `snap` at Unix time `now`; `ring` is (busy, total) slots, `cert_source` the certificate mode.
pub fn render(snap: &Snapshot, ring: Option<(u32, u32)>, cert_source: Option<&str>, now: i64) -> String {
    let mut p = Page { out: String::with_capacity(32 << 10) };
    let _ = write!(
        p.out,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"{REFRESH_SECONDS}\">\
         <meta name=\"viewport\" content=\"width=device-width\">\
         <title>tandem status</title><style>{STYLE}</style></head><body>\
         <h1>tandem {} <span class=\"note\">status at {} (refreshes every {REFRESH_SECONDS} s; numbers since start; \
         <a href=\"/metrics\">/metrics</a>)</span></h1>",
        esc(tandem_shared::VERSION),
        esc(&crate::certs::rfc3339(now)),
    );

    // At a glance.
    let total: u64 = snap.requests.iter().map(|r| r.count).sum();
    let class = |lo: u16| snap.requests.iter().filter(|r| r.status / 100 == lo).map(|r| r.count).sum::<u64>();
    let engines = snap.processes.iter().filter(|q| q.role == tandem_shared::stats::ProcessRole::Engine).count();
    let restarts: u64 = snap.restarts.iter().flatten().sum();
    let mut cards = vec![
        ("requests", total.to_string(), ""),
        ("2xx", class(2).to_string(), "ok"),
        ("4xx", class(4).to_string(), if class(4) > 0 { "warn" } else { "" }),
        ("5xx", class(5).to_string(), if class(5) > 0 { "bad" } else { "ok" }),
        ("engine workers", engines.to_string(), if engines > 0 { "ok" } else { "bad" }),
        ("worker restarts", restarts.to_string(), if restarts > 0 { "warn" } else { "ok" }),
    ];
    if let Some((busy, slots)) = ring {
        cards.push(("ring slots busy", format!("{busy} / {slots}"), if busy == slots { "warn" } else { "" }));
    }
    if let Some(not_after) = snap.cert_not_after {
        let days = (not_after as i64 - now) as f64 / 86400.0;
        let class = if days < 1.0 {
            "bad"
        } else if days < 7.0 {
            "warn"
        } else {
            "ok"
        };
        cards.push(("certificate days left", format!("{days:.1}"), class));
    }
    p.out.push_str("<div class=\"cards\">");
    for (label, value, class) in &cards {
        let _ = write!(
            p.out,
            "<div class=\"card {class}\"><div class=\"v\">{}</div><div class=\"l\">{}</div></div>",
            esc(value),
            esc(label)
        );
    }
    p.out.push_str("</div>");

    // Models.
    p.section(
        "Models",
        "Per model version, summed over every engine worker. Times in ms; p50/p99 are histogram bucket bounds. \
         Readiness is on PORT's /v2/health/ready and /metrics.",
    );
    let rows: Vec<Vec<String>> = snap.models.iter().map(|((name, v), t)| model_row(name, *v, t, now)).collect();
    p.table(
        "models",
        &[
            "model",
            "version",
            "ok",
            "failed",
            "inferences",
            "batch",
            "queue ms",
            "compute ms",
            "p50 ms",
            "p99 ms",
            "last",
        ],
        1,
        &rows,
    );

    // Requests.
    p.section("Requests", "Answers by listener, route, method and status.");
    let mut requests = snap.requests.clone();
    requests.sort_by_key(|r| std::cmp::Reverse(r.count));
    let rows: Vec<Vec<String>> = requests
        .iter()
        .map(|r| {
            let code = if r.status == 0 { "other".to_string() } else { r.status.to_string() };
            let class = match r.status / 100 {
                5 => "bad",
                4 => "warn",
                _ => "",
            };
            vec![
                esc(r.listener),
                esc(tandem_shared::stats::protocol(r.route)),
                esc(r.route),
                esc(r.method),
                format!("<span class=\"{class}\">{}</span>", esc(&code)),
                r.count.to_string(),
            ]
        })
        .collect();
    p.table("requests", &["listener", "protocol", "route", "method", "code", "count"], 5, &rows);
    let rows: Vec<Vec<String>> = snap
        .durations
        .iter()
        .map(|d| {
            let n: u64 = d.buckets.iter().sum();
            vec![
                esc(d.listener),
                esc(d.route),
                n.to_string(),
                ms(d.sum_ns, n),
                quantile(&d.buckets, 0.5),
                quantile(&d.buckets, 0.99),
            ]
        })
        .collect();
    p.table("latency", &["listener", "route", "answers", "mean ms", "p50 ms", "p99 ms"], 2, &rows);

    // Processes.
    p.section("Processes", "Live processes; engine worker slots keep their counts across restarts.");
    let rows: Vec<Vec<String>> = snap
        .processes
        .iter()
        .map(|q| {
            vec![esc(q.role.label()), q.pid.to_string(), q.worker_id.to_string(), mib(q.rss_bytes), q.fds.to_string()]
        })
        .collect();
    p.table("processes", &["role", "pid", "worker", "resident MiB", "open fds"], 1, &rows);
    let rows: Vec<Vec<String>> = snap
        .slots
        .iter()
        .map(|s| {
            vec![
                s.slot.to_string(),
                s.answered[0].to_string(),
                s.answered[1].to_string(),
                s.connections.map_or("-".into(), |c| c.to_string()),
            ]
        })
        .collect();
    p.table("slots", &["engine slot", "answered http", "answered https", "connections"], 1, &rows);
    let roles = ["engine-worker", "https-worker"];
    let rows: Vec<Vec<String>> = roles
        .iter()
        .enumerate()
        .flat_map(|(r, role)| {
            RESTART_CAUSES.iter().enumerate().map(move |(c, cause)| (r, c, role, cause)).collect::<Vec<_>>()
        })
        .map(|(r, c, role, cause)| vec![esc(role), esc(cause), snap.restarts[r][c].to_string()])
        .collect();
    p.table("restarts", &["role", "cause", "restarts"], 2, &rows);

    // TLS, certificate and ring.
    if let Some(source) = cert_source {
        p.section("TLS", "Handshakes, certificate and the shared-memory ring of the HTTPS worker.");
        let mut rows = vec![
            vec!["certificate source".into(), esc(source)],
            vec![
                "certificate expires".into(),
                snap.cert_not_after.map_or("unknown".into(), |t| esc(&crate::certs::rfc3339(t as i64))),
            ],
            vec!["reloads ok".into(), snap.tls_reloads[0].to_string()],
            vec!["reloads refused".into(), snap.tls_reloads[1].to_string()],
            vec!["source checks".into(), snap.cert_checks[0].to_string()],
            vec!["source errors".into(), snap.cert_checks[1].to_string()],
            vec!["certificates published".into(), snap.cert_checks[2].to_string()],
        ];
        for (i, proto) in TLS_PROTOCOLS.iter().enumerate() {
            for (a, alpn) in TLS_ALPN.iter().enumerate() {
                if snap.tls_handshakes[i][a] > 0 {
                    rows.push(vec![
                        format!("handshakes {} {}", esc(proto), esc(alpn)),
                        snap.tls_handshakes[i][a].to_string(),
                    ]);
                }
            }
        }
        for (i, reason) in TLS_FAILURES.iter().enumerate() {
            if snap.tls_failures[i] > 0 {
                rows.push(vec![format!("handshake failures: {}", esc(reason)), snap.tls_failures[i].to_string()]);
            }
        }
        if let Some((busy, slots)) = ring {
            rows.push(vec!["ring slots busy".into(), format!("{busy} / {slots}")]);
        }
        for (i, event) in RING_EVENTS.iter().enumerate() {
            rows.push(vec![format!("ring: {}", esc(event)), snap.ring[i].to_string()]);
        }
        p.table("tls", &["", "value"], 1, &rows);
    }

    // Access control.
    use tandem_shared::stats::access_event as ev;
    p.section("Access control", "Requests refused by API keys (401), rate limits and model concurrency caps (429).");
    let mut rows = vec![
        vec!["401 no API key".into(), snap.access[ev::MISSING_KEY].to_string()],
        vec!["401 invalid API key".into(), snap.access[ev::INVALID_KEY].to_string()],
        vec!["429 rate limit by key".into(), snap.access[ev::RATE_LIMITED_KEY].to_string()],
        vec!["429 rate limit by certificate".into(), snap.access[ev::RATE_LIMITED_CERTIFICATE].to_string()],
        vec!["429 rate limit by address".into(), snap.access[ev::RATE_LIMITED_ADDRESS].to_string()],
        vec!["429 model busy".into(), snap.access[ev::MODEL_BUSY].to_string()],
    ];
    for (name, counts) in &snap.clients {
        let answered: u64 = counts[..4].iter().sum();
        rows.push(vec![format!("client {}", esc(name)), answered.to_string()]);
    }
    p.table("access", &["", "count"], 1, &rows);
    p.out.push_str("</body></html>\n");
    p.out
}

const STYLE: &str = "body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#1d2330;background:#fafbfc}\
h1{font-size:20px;margin:0 0 .8em}h2{font-size:16px;margin:1.4em 0 .3em}\
.note{font-size:12px;color:#5b6475;font-weight:normal;margin:.2em 0 .5em}\
table{border-collapse:collapse;margin:.4em 1.5em .6em 0;display:inline-table;vertical-align:top;background:#fff}\
th,td{border:1px solid #d8dde6;padding:3px 8px;text-align:left}th{background:#eef1f6;font-weight:600}\
.n{text-align:right;font-variant-numeric:tabular-nums}.none{color:#8a93a3;font-style:italic}\
.cards{display:flex;flex-wrap:wrap;gap:10px}.card{border:1px solid #d8dde6;border-radius:6px;padding:8px 14px;min-width:110px;background:#fff}\
.card .v{font-size:22px;font-weight:600;font-variant-numeric:tabular-nums}.card .l{font-size:12px;color:#5b6475}\
.ok{border-color:#6cbf84}.card.ok .v{color:#23824a}.warn{color:#a86400}.card.warn{border-color:#e0a040}\
.bad{color:#c0262d}.card.bad{border-color:#e0656b}a{color:#2457c5}";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_from_the_repository_and_network_are_escaped() {
        let mut snap = Snapshot::default();
        let hostile = "<img src=x onerror=alert(1)>\"'&";
        snap.models.insert((hostile.to_string(), 1), ModelTotals::default());
        snap.clients.insert("</td><script>alert(2)</script>".into(), [1, 0, 0, 0, 0]);
        let page = render(&snap, Some((1, 4)), Some("<b>GENERATE"), 1_800_000_000);
        assert!(!page.contains("<img") && !page.contains("<script") && !page.contains("<b>"), "{page}");
        assert!(page.contains("&lt;img src=x onerror=alert(1)&gt;&quot;&#39;&amp;"), "{page}");
        assert!(page.contains("&lt;/td&gt;&lt;script&gt;"), "{page}");
    }

    #[test]
    fn quantiles_are_the_bucket_bounds() {
        let mut buckets = [0u64; DURATION_BOUNDS.len() + 1];
        buckets[0] = 98; // ≤ 0.5 ms
        buckets[4] = 2; // ≤ 10 ms
        assert_eq!(quantile(&buckets, 0.5), "≤ 0.5");
        assert_eq!(quantile(&buckets, 0.99), "≤ 10");
        assert_eq!(quantile(&[0; 3], 0.5), "-");
        buckets[DURATION_BOUNDS.len()] = 1000;
        assert_eq!(quantile(&buckets, 0.99), "&gt; 10000");
    }
}
