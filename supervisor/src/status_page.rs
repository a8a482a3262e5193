//! `GET /status` on `METRICS_PORT`: the whole server at a glance as one HTML
//! page (HAProxy's statistics page in spirit), rendered from the same
//! statistics region as `/metrics`, with charts of the last minutes drawn
//! from samples this port keeps; no script, no outside resource, every name
//! from the repository or the network escaped.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::header;
use axum::response::{IntoResponse, Response};
use tandem_shared::certs::status::CertStatus;
use tandem_shared::stats::{
    unix_ms, ModelCounter, ModelState, ModelTotals, ProcessRole, Snapshot, DURATION_BOUNDS, RESTART_CAUSES,
    RING_EVENTS, TLS_ALPN, TLS_FAILURES, TLS_PROTOCOLS,
};
use tandem_shared::sys::counters::Counters;
use tandem_shared::sys::shm::Region;

/// Seconds between the page's own reloads.
const REFRESH_SECONDS: u32 = 5;

/// What the page may load: its own inline style, nothing else.
const CSP: &str =
    "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// How often the port samples the counters for the charts, and how many samples it keeps (10 minutes).
const SAMPLE_EVERY: Duration = Duration::from_secs(2);
const SAMPLES: usize = 300;

/// One look at the counters, for the charts and rates.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    /// Unix milliseconds.
    at_ms: u64,
    /// Answers so far: 1xx-3xx, 4xx, 5xx.
    answers: [u64; 3],
    /// Inference requests so far (ok and failed) and their nanoseconds, over every model.
    inferences: u64,
    inference_ns: u64,
    /// Inference requests so far per model.
    per_model: BTreeMap<String, u64>,
    /// Ring slots busy now.
    ring_busy: u32,
    /// Resident memory of every process now.
    rss: u64,
}

impl Sample {
    fn of(snap: &Snapshot, ring_busy: Option<(u32, u32)>, at_ms: u64) -> Sample {
        let mut answers = [0u64; 3];
        for r in &snap.requests {
            answers[match r.status / 100 {
                4 => 1,
                5 => 2,
                _ => 0,
            }] += r.count;
        }
        let mut s = Sample { at_ms, answers, ring_busy: ring_busy.map_or(0, |r| r.0), ..Sample::default() };
        for ((name, _), t) in &snap.models {
            use ModelCounter::*;
            let n = t.get(SuccessCount) + t.get(FailCount);
            s.inferences += n;
            s.inference_ns += t.get(SuccessNs) + t.get(FailNs);
            *s.per_model.entry(name.clone()).or_default() += n;
        }
        s.rss = snap.processes.iter().map(|p| p.rss_bytes).sum();
        s
    }
}

/// The samples of the last minutes, oldest first.
#[derive(Debug, Default)]
pub struct History {
    samples: Mutex<VecDeque<Sample>>,
}

impl History {
    fn push(&self, s: Sample) {
        let mut q = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        if q.len() == SAMPLES {
            q.pop_front();
        }
        q.push_back(s);
    }

    fn all(&self) -> Vec<Sample> {
        self.samples.lock().unwrap_or_else(|p| p.into_inner()).iter().cloned().collect()
    }
}

/// Samples the counters every [`SAMPLE_EVERY`] on the current runtime, into the returned history.
pub fn spawn_sampler(counters: Arc<Counters>, ring: Option<Arc<Region>>) -> Arc<History> {
    let history = Arc::new(History::default());
    let keep = history.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(SAMPLE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let snap = Snapshot::read(&counters);
            let busy = ring.as_deref().map(tandem_engine_worker::metrics::ring_busy);
            keep.push(Sample::of(&snap, busy, unix_ms()));
        }
    });
    history
}

/// The `/status` response: the page, never cached, under a policy that runs nothing.
pub fn response(
    counters: &Counters,
    ring: Option<&Region>,
    cert_status: Option<&std::path::Path>,
    history: &History,
) -> Response {
    let snap = Snapshot::read(counters);
    let ring = ring.map(tandem_engine_worker::metrics::ring_busy);
    let cert = cert_status.and_then(CertStatus::read);
    let mut samples = history.all();
    // The page's own look is the newest point.
    samples.push(Sample::of(&snap, ring, unix_ms()));
    let tls = cert_status.map(|_| cert.as_ref());
    let page = render(&snap, ring, tls, &samples, tandem_shared::certs::status::unix_now());
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

/// How long ago `then_ms` (Unix milliseconds; 0 is "never") was, at Unix time `now`.
fn ago(now: i64, then_ms: u64) -> String {
    since(now, then_ms).map_or_else(|| "never".into(), |d| format!("{d} ago"))
}

/// The time from `then_ms` (Unix milliseconds; 0 is unknown) to Unix time
/// `now`, in the largest unit that reads well: s, min, h, then d.
fn since(now: i64, then_ms: u64) -> Option<String> {
    if then_ms == 0 {
        return None;
    }
    let s = (now - (then_ms / 1000) as i64).max(0);
    Some(match s {
        0..120 => format!("{s} s"),
        120..7200 => format!("{} min", s / 60),
        7200..172_800 => format!("{} h", s / 3600),
        _ => format!("{} d", s / 86400),
    })
}

/// A model version's counts, from "ok" on.
fn model_row(t: &ModelTotals, now: i64) -> Vec<String> {
    use ModelCounter::*;
    let requests = t.get(SuccessCount) + t.get(FailCount);
    let batch = if t.get(ExecutionCount) == 0 {
        "-".to_string()
    } else {
        format!("{:.2}", t.get(InferenceCount) as f64 / t.get(ExecutionCount) as f64)
    };
    vec![
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

/// Points of a chart: (unix ms, value).
type Points = Vec<(u64, f64)>;

/// Inline SVG of one or more series over the samples' times (no script):
/// each series is (label, CSS class, points).
fn chart(title: &str, unit: &str, series: &[(&str, &str, Points)]) -> String {
    const W: f64 = 360.0;
    const H: f64 = 90.0;
    let points = series.iter().flat_map(|(_, _, p)| p.iter());
    let (t0, t1) = points.clone().fold((u64::MAX, 0), |(lo, hi), (t, _)| (lo.min(*t), hi.max(*t)));
    let peak = points.map(|(_, v)| *v).fold(0.0f64, f64::max);
    let top = if peak > 0.0 { peak * 1.1 } else { 1.0 };
    let span = t1.saturating_sub(t0).max(1) as f64;
    let mut svg = format!(
        "<figure class=\"chart\"><figcaption>{} <span class=\"note\">max {} {}</span></figcaption>\
         <svg viewBox=\"0 0 {W} {H}\" width=\"{W}\" height=\"{H}\" role=\"img\" aria-label=\"{}\">\
         <rect x=\"0\" y=\"0\" width=\"{W}\" height=\"{H}\" class=\"plot\"/>",
        esc(title),
        esc(&format_value(peak)),
        esc(unit),
        esc(title)
    );
    for (_, class, pts) in series {
        if pts.is_empty() {
            continue;
        }
        let path: Vec<String> =
            pts.iter().map(|(t, v)| format!("{:.1},{:.1}", (t - t0) as f64 / span * W, H - v / top * H)).collect();
        let _ = write!(svg, "<polyline class=\"{class}\" points=\"{}\"/>", path.join(" "));
    }
    svg.push_str("</svg><div class=\"legend\">");
    for (label, class, pts) in series {
        let last = pts.last().map_or("-".to_string(), |(_, v)| format_value(*v));
        let _ = write!(svg, "<span class=\"key {class}\">{} {}</span>", esc(label), esc(&last));
    }
    let minutes = span / 60_000.0;
    let _ = write!(svg, "<span class=\"note\">last {minutes:.1} min</span></div></figure>");
    svg
}

fn format_value(v: f64) -> String {
    if v >= 100.0 || v == v.trunc() {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// Per-second rates of `f` between consecutive samples, at the later one's time.
fn rates(samples: &[Sample], f: impl Fn(&Sample) -> u64) -> Points {
    samples
        .windows(2)
        .filter(|w| w[1].at_ms > w[0].at_ms)
        .map(|w| (w[1].at_ms, f(&w[1]).saturating_sub(f(&w[0])) as f64 * 1000.0 / (w[1].at_ms - w[0].at_ms) as f64))
        .collect()
}

/// Requests per second of model `name` over about the last 10 s of samples.
fn model_rate(samples: &[Sample], name: &str) -> Option<f64> {
    let last = samples.last()?;
    let first = samples.iter().rev().find(|s| last.at_ms - s.at_ms >= 10_000).or(samples.first())?;
    let dt = last.at_ms.checked_sub(first.at_ms).filter(|&d| d > 0)? as f64 / 1000.0;
    let n = |s: &Sample| s.per_model.get(name).copied().unwrap_or(0);
    Some(n(last).saturating_sub(n(first)) as f64 / dt)
}

/// How long since `started_ms` ("-" when unknown).
fn uptime(now: i64, started_ms: u64) -> String {
    since(now, started_ms).unwrap_or_else(|| "-".into())
}

/// The page for `snap` at Unix time `now`: `ring` is (busy, total) slots,
/// `tls` is `Some` when HTTPS is on (with the certificate status when it
/// could be read), `samples` the history for the charts, oldest first.
pub fn render(
    snap: &Snapshot,
    ring: Option<(u32, u32)>,
    tls: Option<Option<&CertStatus>>,
    samples: &[Sample],
    now: i64,
) -> String {
    let mut p = Page { out: String::with_capacity(32 << 10) };
    let _ = write!(
        p.out,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"{REFRESH_SECONDS}\">\
         <meta name=\"viewport\" content=\"width=device-width\">\
         <title>tandem status</title><style>{STYLE}</style></head><body>\
         <h1>tandem {} <span class=\"note\">status at {} (refreshes every {REFRESH_SECONDS} s; counts since start; \
         <a href=\"/metrics\">/metrics</a>)</span></h1>",
        esc(tandem_shared::VERSION),
        esc(&crate::certs::rfc3339(now)),
    );

    // At a glance.
    let total: u64 = snap.requests.iter().map(|r| r.count).sum();
    let class = |lo: u16| snap.requests.iter().filter(|r| r.status / 100 == lo).map(|r| r.count).sum::<u64>();
    let engines = snap.processes.iter().filter(|q| q.role == ProcessRole::Engine).count();
    let restarts: u64 = snap.restarts.iter().flatten().sum();
    let (ready, ready_class) = match snap.ready {
        Some(true) => ("ready", "ok"),
        Some(false) => ("not ready", "bad"),
        None => ("starting", "warn"),
    };
    let mut cards = vec![
        ("server", ready.to_string(), ready_class),
        ("requests", total.to_string(), ""),
        ("in flight", snap.in_flight.to_string(), ""),
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

    // The last minutes.
    p.out.push_str("<div class=\"charts\">");
    p.out.push_str(&chart(
        "Answers per second",
        "/s",
        &[
            ("ok", "s-ok", rates(samples, |s| s.answers[0])),
            ("4xx", "s-warn", rates(samples, |s| s.answers[1])),
            ("5xx", "s-bad", rates(samples, |s| s.answers[2])),
        ],
    ));
    let latency: Points = samples
        .windows(2)
        .filter(|w| w[1].inferences > w[0].inferences)
        .map(|w| {
            let ns = w[1].inference_ns.saturating_sub(w[0].inference_ns) as f64;
            (w[1].at_ms, ns / (w[1].inferences - w[0].inferences) as f64 / 1e6)
        })
        .collect();
    p.out.push_str(&chart("Inference latency (mean)", "ms", &[("mean ms", "s-a", latency)]));
    if ring.is_some() {
        let busy: Points = samples.iter().map(|s| (s.at_ms, f64::from(s.ring_busy))).collect();
        p.out.push_str(&chart("Ring slots busy", "slots", &[("busy", "s-a", busy)]));
    }
    let rss: Points = samples.iter().map(|s| (s.at_ms, s.rss as f64 / (1 << 20) as f64)).collect();
    p.out.push_str(&chart("Resident memory, every process", "MiB", &[("MiB", "s-a", rss)]));
    p.out.push_str("</div>");

    // Models: every model the engines know, with the versions that have served.
    p.section(
        "Models",
        "State as the engine workers report it; counts per version, summed over every engine worker; rate over \
         the last 10 s. Times in ms; p50/p99 are histogram bucket bounds.",
    );
    let mut names: Vec<&String> = snap.model_states.keys().chain(snap.models.keys().map(|(n, _)| n)).collect();
    names.sort();
    names.dedup();
    let mut rows = Vec::new();
    for name in names {
        let state = snap.model_states.get(name).map_or("-", |s| s.label());
        let state_class = match snap.model_states.get(name) {
            Some(ModelState::Ready) => "ok",
            Some(ModelState::Unavailable) => "bad",
            _ => "",
        };
        let state = format!("<span class=\"{state_class}\">{}</span>", esc(state));
        let rate = model_rate(samples, name).map_or("-".into(), |r| format!("{r:.1}"));
        let versions: Vec<(&u64, &ModelTotals)> =
            snap.models.iter().filter(|((n, _), _)| n == name).map(|((_, v), t)| (v, t)).collect();
        if versions.is_empty() {
            let mut row = vec![esc(name), state.clone(), "-".into(), rate.clone()];
            row.extend(std::iter::repeat_n("-".to_string(), 9));
            rows.push(row);
        }
        for (v, t) in versions {
            let mut row = vec![esc(name), state.clone(), v.to_string(), rate.clone()];
            row.extend(model_row(t, now));
            rows.push(row);
        }
    }
    p.table(
        "models",
        &[
            "model",
            "state",
            "version",
            "req/s",
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
        2,
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
                esc(r.protocol),
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
                esc(d.protocol),
                esc(d.route),
                n.to_string(),
                ms(d.sum_ns, n),
                quantile(&d.buckets, 0.5),
                quantile(&d.buckets, 0.99),
            ]
        })
        .collect();
    p.table("latency", &["listener", "protocol", "route", "answers", "mean ms", "p50 ms", "p99 ms"], 3, &rows);

    // Processes.
    p.section("Processes", "Live processes; engine worker slots keep their counts across restarts.");
    let rows: Vec<Vec<String>> = snap
        .processes
        .iter()
        .map(|q| {
            vec![
                esc(q.role.label()),
                q.pid.to_string(),
                q.worker_id.to_string(),
                uptime(now, q.started_ms),
                mib(q.rss_bytes),
                q.fds.to_string(),
            ]
        })
        .collect();
    p.table("processes", &["role", "pid", "worker", "up", "resident MiB", "open fds"], 1, &rows);
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
    if let Some(cert) = tls {
        p.section("TLS", "The served certificate, handshakes, and the shared-memory ring of the HTTPS worker.");
        let when = |t: i64| esc(&crate::certs::rfc3339(t));
        let mut rows = match cert {
            Some(c) => vec![
                vec!["certificate source".into(), format!("{} {}", esc(&c.mode), esc(&c.source))],
                vec!["names".into(), esc(&c.info.sans.join(", "))],
                vec!["subject".into(), esc(&c.info.subject)],
                vec!["issuer".into(), esc(&c.info.issuer)],
                vec!["key".into(), esc(&c.info.key_algorithm)],
                vec!["fingerprint (SHA-256)".into(), format!("<code>{}</code>", esc(&c.info.fingerprint))],
                vec!["valid".into(), format!("{} to {}", when(c.info.not_before), when(c.info.not_after))],
                vec!["source checked".into(), format!("{} (next {})", when(c.checked_at), when(c.next_check_at))],
            ],
            None => vec![vec!["certificate".into(), "status not readable yet".into()]],
        };
        if let Some(c) = cert {
            if c.degraded {
                rows.push(vec!["degraded".into(), "<span class=\"bad\">a generated stand-in is served</span>".into()]);
            }
            if let Some(e) = &c.last_error {
                rows.push(vec!["last source error".into(), format!("<span class=\"bad\">{}</span>", esc(e))]);
            }
        }
        rows.extend([
            vec!["last reload".into(), snap.tls_last_reload.map_or("none since start".into(), |t| when(t as i64))],
            vec!["reloads ok".into(), snap.tls_reloads[0].to_string()],
            vec!["reloads refused".into(), snap.tls_reloads[1].to_string()],
            vec!["source checks".into(), snap.cert_checks[0].to_string()],
            vec!["source errors".into(), snap.cert_checks[1].to_string()],
            vec!["certificates published".into(), snap.cert_checks[2].to_string()],
        ]);
        p.table("certificate", &["certificate", ""], 2, &rows);
        let mut rows = Vec::new();
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
        p.table("tls", &["", "count"], 1, &rows);
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
.bad{color:#c0262d}.card.bad{border-color:#e0656b}a{color:#2457c5}span.ok{color:#23824a}\
.charts{display:flex;flex-wrap:wrap;gap:14px;margin-top:1em}.chart{margin:0;background:#fff;border:1px solid #d8dde6;border-radius:6px;padding:6px 8px}\
.chart figcaption{font-size:13px;font-weight:600}.plot{fill:#fbfcfe;stroke:#e3e7ee}\
polyline{fill:none;stroke-width:1.6}.s-ok{stroke:#23824a;color:#23824a}.s-warn{stroke:#d08a00;color:#a86400}\
.s-bad{stroke:#c0262d;color:#c0262d}.s-a{stroke:#2457c5;color:#2457c5}.legend{font-size:12px}.key{margin-right:10px}\
.key::before{content:\"\u{25a0} \"}code{font-size:12px}";

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly by design")]
mod tests {
    use super::*;

    #[test]
    fn durations_read_in_the_largest_unit_that_reads_well() {
        let now = 1_000_000;
        let at = |s: i64| ((now - s) * 1000) as u64;
        assert_eq!(ago(now, 0), "never");
        assert_eq!(uptime(now, 0), "-");
        assert_eq!(ago(now, at(5)), "5 s ago");
        assert_eq!(ago(now, at(600)), "10 min ago");
        assert_eq!(uptime(now, at(3 * 3600)), "3 h");
        assert_eq!(ago(now, at(3 * 86400)), "3 d ago");
        // A clock that went back reads as now, never as a negative time.
        assert_eq!(uptime(now, at(-30)), "0 s");
    }

    fn cert(mode: &str, sans: &[&str]) -> CertStatus {
        CertStatus {
            mode: mode.into(),
            source: "/etc/tls/<x>".into(),
            info: tandem_shared::certs::status::CertInfo {
                fingerprint: "ab".into(),
                subject: "CN=<i>".into(),
                issuer: "CN=ca".into(),
                sans: sans.iter().map(|s| s.to_string()).collect(),
                not_before: 1_700_000_000,
                not_after: 1_900_000_000,
                key_algorithm: "EC-256".into(),
            },
            degraded: false,
            last_error: Some("<script>x</script>".into()),
            checked_at: 1_800_000_000,
            next_check_at: 1_800_086_400,
        }
    }

    #[test]
    fn names_from_the_repository_and_network_are_escaped() {
        let mut snap = Snapshot::default();
        let hostile = "<img src=x onerror=alert(1)>\"'&";
        snap.models.insert((hostile.to_string(), 1), ModelTotals::default());
        snap.model_states.insert(hostile.to_string(), ModelState::Ready);
        snap.model_states.insert("<svg onload=alert(3)>".into(), ModelState::Unavailable);
        snap.clients.insert("</td><script>alert(2)</script>".into(), [1, 0, 0, 0, 0]);
        let c = cert("<b>GENERATE", &["DNS:<a>.example"]);
        let page = render(&snap, Some((1, 4)), Some(Some(&c)), &[], 1_800_000_000);
        for raw in ["<img", "<script", "<b>", "<a>", "<i>", "<svg onload", "<x>"] {
            assert!(!page.contains(raw), "{raw} reached the page:\n{page}");
        }
        assert!(page.contains("&lt;img src=x onerror=alert(1)&gt;&quot;&#39;&amp;"), "{page}");
        assert!(page.contains("&lt;/td&gt;&lt;script&gt;"), "{page}");
        assert!(page.contains("DNS:&lt;a&gt;.example"), "{page}");
    }

    #[test]
    fn charts_and_rates_come_from_the_samples() {
        let mut snap = Snapshot::default();
        snap.model_states.insert("digits".into(), ModelState::Ready);
        snap.model_states.insert("broken".into(), ModelState::Unavailable);
        let at = |ms: u64, n: u64| Sample {
            at_ms: ms,
            answers: [n, 0, 0],
            inferences: n,
            inference_ns: n * 2_000_000,
            per_model: [("digits".to_string(), n)].into(),
            ..Sample::default()
        };
        // 50 requests a second for 20 s.
        let samples: Vec<Sample> = (0..11).map(|i| at(1_800_000_000_000 + i * 2000, i * 100)).collect();
        assert_eq!(model_rate(&samples, "digits"), Some(50.0));
        assert_eq!(model_rate(&samples, "broken"), Some(0.0));
        let page = render(&snap, None, None, &samples, 1_800_000_020);
        assert_eq!(page.matches("<polyline").count(), 5, "3 answer classes, the latency and the memory: {page}");
        assert!(page.contains("ok 50"), "the last answer rate: {page}");
        assert!(page.contains("mean ms 2"), "2 ms per inference: {page}");
        // Both models are listed with their state, the unavailable one without counts.
        let row = |m: &str| page.split("<tr>").find(|r| r.contains(&format!("<td>{m}</td>"))).unwrap().to_string();
        assert!(row("digits").contains("ready") && row("digits").contains("<td class=\"n\">50.0</td>"), "{page}");
        assert!(row("broken").contains("unavailable"), "{page}");
        assert!(!page.contains("Ring slots busy"), "no ring without HTTPS");
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
