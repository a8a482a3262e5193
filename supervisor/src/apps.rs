//! `WORKER_COMMAND`: starting the copies of the operator's server, relaying
//! their output into tandem's log, and probing their readiness and health.
//! The event loop (`supervise/`) decides what to do with what it learns here.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tandem_shared::process::control::BackendAddr;
use tokio::sync::mpsc;

/// Lines of a copy's output kept for the report when it fails to start.
const TAIL_LINES: usize = 20;
/// A longer output line is cut here (a copy cannot flood the log with one line).
const MAX_LINE: usize = 16 << 10;
/// How long one probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// Between probes while a copy runs and answers (sooner when the proxy
/// worker reports that it could not reach it): a copy's own access log gets
/// one probe line per ten seconds, not one a second.
const PROBE_EVERY: Duration = Duration::from_secs(10);
/// A copy that has not answered its first probe by then: the log says where
/// tandem probes and what the copy printed.
const SLOW_START_HINT: Duration = Duration::from_secs(5);
/// Failed probes in a row that take a running copy out of rotation.
const UNHEALTHY_AFTER: u32 = 2;

/// Variables a copy never sees: tandem's certificate paths, keys, URLs and
/// ACME account settings, and the descriptors and sockets meant for tandem.
const HIDDEN_PREFIXES: &[&str] = &["SSL_", "ACME_", "LISTEN_", "NOTIFY_SOCKET", "WATCHDOG_", "TANDEM_"];
/// And these, by name (an app's own `WORKER_*` variables pass).
const HIDDEN_NAMES: &[&str] = &["WORKER_COMMAND", "WORKER_READY_PATH", "WORKER_START_TIMEOUT"];

fn hidden(name: &str) -> bool {
    HIDDEN_PREFIXES.iter().any(|p| name.starts_with(p)) || HIDDEN_NAMES.contains(&name)
}

/// What a copy's prober thread needs.
struct Prober {
    id: u64,
    worker: usize,
    addr: BackendAddr,
    stop: Arc<AtomicBool>,
    woken: std::sync::mpsc::Receiver<()>,
    tail: Arc<Mutex<VecDeque<String>>>,
}

/// What a probe found, sent to the event loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// The ready path answered 2xx/3xx for the first time.
    Ready,
    /// A running copy stopped answering (why).
    Unhealthy(String),
    /// It answers again.
    Recovered,
}

/// The operator's command and where its copies listen.
#[derive(Debug)]
pub struct Apps {
    argv: Vec<String>,
    ready_path: String,
    /// Private (0700) directory of the `{socket}` paths, removed at exit.
    socket_dir: PathBuf,
    /// Whether the command listens on `{socket}` (else on `{port}`).
    unix: bool,
    health: mpsc::UnboundedSender<(u64, Health)>,
}

/// One running copy.
#[derive(Debug)]
pub struct Running {
    /// Where it listens.
    pub addr: BackendAddr,
    /// Its last output lines.
    pub tail: Arc<Mutex<VecDeque<String>>>,
    /// Output streams still being relayed.
    open_streams: Arc<AtomicUsize>,
    /// Stops its prober.
    probe_stop: Arc<AtomicBool>,
    /// Wakes its prober for a probe now.
    probe_wake: std::sync::mpsc::SyncSender<()>,
    /// It was ready once (so an exit is a crash, not a failed start).
    pub was_ready: bool,
    /// It answers its probe.
    pub healthy: bool,
    /// Killed by us because it did not become ready in time.
    pub start_timed_out: bool,
    /// With SIGTTOU: when SIGTERM was sent to its group (after its requests finished).
    pub terminated_at: Option<Instant>,
    /// When the proxy was told it drains (it gets SIGTERM at the latest GRACEFUL_TIMEOUT later).
    pub draining_since: Option<Instant>,
}

impl Running {
    /// Waits briefly for the last output of a copy that exited to be relayed.
    pub fn settle(&self) {
        let deadline = Instant::now() + Duration::from_millis(500);
        while self.open_streams.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The kept output, one line each, for an error message.
    pub fn tail_text(&self) -> String {
        tail_text(&self.tail)
    }

    /// Has its prober look now (the proxy could not reach it).
    pub fn probe_now(&self) {
        // A wake already pending is enough.
        let _ = self.probe_wake.try_send(());
    }
}

/// The kept output, one line each (`(it wrote nothing)` when there is none).
fn tail_text(tail: &Mutex<VecDeque<String>>) -> String {
    let tail = tail.lock().unwrap_or_else(|p| p.into_inner());
    if tail.is_empty() {
        return "(it wrote nothing)".into();
    }
    tail.iter().map(|l| format!("\n  | {l}")).collect()
}

impl Drop for Running {
    fn drop(&mut self) {
        self.probe_stop.store(true, Ordering::SeqCst);
        if let BackendAddr::Unix(p) = &self.addr {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl Apps {
    /// Prepares to run `argv`; probe results arrive on `health`.
    pub fn new(
        argv: Vec<String>,
        ready_path: String,
        health: mpsc::UnboundedSender<(u64, Health)>,
    ) -> anyhow::Result<Self> {
        let unix = argv.iter().any(|a| a.contains("{socket}"));
        let socket_dir = std::env::temp_dir().join(format!("tandem-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&socket_dir);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&socket_dir)
            .with_context(|| format!("cannot create the private socket directory {}", socket_dir.display()))?;
        Ok(Apps { argv, ready_path, socket_dir, unix, health })
    }

    /// The command line as the operator wrote it, for logs.
    pub fn command_line(&self) -> String {
        shell_words::join(&self.argv)
    }

    /// Starts copy number `worker` (1-based) as worker id `id`, in a process
    /// group of its own, its output relayed into the log.
    pub fn spawn(&self, worker: usize, id: u64) -> anyhow::Result<(Pid, Running)> {
        let port = free_port().context("cannot find a free loopback port for the copy")?;
        let socket = self.socket_dir.join(format!("worker-{worker}.sock"));
        let _ = std::fs::remove_file(&socket);
        let fill = |a: &str| {
            a.replace("{port}", &port.to_string())
                .replace("{socket}", &socket.to_string_lossy())
                .replace("{worker}", &worker.to_string())
        };
        let argv: Vec<String> = self.argv.iter().map(|a| fill(a)).collect();
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .env_clear()
            .envs(copy_env())
            // An app that reads PORT (the usual convention) finds its own, not tandem's.
            .env("PORT", port.to_string())
            .env("HOST", Ipv4Addr::LOCALHOST.to_string())
            .env("TANDEM_WORKER_PORT", port.to_string())
            .env("TANDEM_WORKER_SOCKET", &socket)
            .env("TANDEM_WORKER_ID", worker.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own group: the drain signals the copy and everything it started.
            .process_group(0);
        tandem_shared::sys::die_with_parent(&mut cmd, Signal::SIGTERM);
        let mut child = cmd.spawn().with_context(|| format!("cannot start {}", argv[0]))?;
        let pid = Pid::from_raw(child.id() as i32);
        let tail = Arc::new(Mutex::new(VecDeque::with_capacity(TAIL_LINES)));
        let open_streams = Arc::new(AtomicUsize::new(0));
        if let Some(out) = child.stdout.take() {
            relay(out, worker, "stdout", tail.clone(), open_streams.clone());
        }
        if let Some(err) = child.stderr.take() {
            relay(err, worker, "stderr", tail.clone(), open_streams.clone());
        }
        // Reaped by the loop's waitpid(-1), never through this handle.
        drop(child);
        let addr = if self.unix {
            BackendAddr::Unix(socket)
        } else {
            BackendAddr::Tcp(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
        };
        let probe_stop = Arc::new(AtomicBool::new(false));
        let (probe_wake, woken) = std::sync::mpsc::sync_channel(1);
        let prober = Prober { id, worker, addr: addr.clone(), stop: probe_stop.clone(), woken, tail: tail.clone() };
        self.watch(prober);
        let running = Running {
            addr,
            tail,
            open_streams,
            probe_stop,
            probe_wake,
            was_ready: false,
            healthy: false,
            start_timed_out: false,
            terminated_at: None,
            draining_since: None,
        };
        Ok((pid, running))
    }

    /// Probes the copy from a thread of its own until stopped: quickly until
    /// it is ready (after [`SLOW_START_HINT`] the log says where and what the
    /// copy printed), then every [`PROBE_EVERY`] or when woken, reporting only
    /// the changes.
    fn watch(&self, p: Prober) {
        let (path, tx) = (self.ready_path.clone(), self.health.clone());
        let Prober { id, worker, addr, stop, woken, tail } = p;
        let spawned = std::thread::Builder::new().name(format!("probe-{id}")).spawn(move || {
            let mut wait = Duration::from_millis(50);
            let (started, mut hinted) = (Instant::now(), false);
            while !stop.load(Ordering::SeqCst) {
                match probe(&addr, &path) {
                    Ok(_) => {
                        if tx.send((id, Health::Ready)).is_err() {
                            return;
                        }
                        break;
                    }
                    Err(why) if !hinted && started.elapsed() >= SLOW_START_HINT => {
                        hinted = true;
                        tracing::warn!(
                            worker,
                            "worker command copy {worker} has not answered GET {path} at {addr} for {} s ({why}); \
                             tandem set PORT and HOST for it to listen there (or put {{port}} or {{socket}} in \
                             WORKER_COMMAND); its output so far:{}",
                            SLOW_START_HINT.as_secs(),
                            tail_text(&tail)
                        );
                    }
                    Err(_) => {}
                }
                std::thread::sleep(wait);
                wait = (wait * 2).min(Duration::from_millis(500));
            }
            let (mut failures, mut healthy) = (0u32, true);
            while !stop.load(Ordering::SeqCst) {
                // A failed probe is repeated at once: a hung copy leaves rotation a
                // second or two after it is first found out.
                if failures == 0 {
                    match woken.recv_timeout(PROBE_EVERY) {
                        Ok(()) | Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
                    }
                }
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                let report = match probe(&addr, &path) {
                    Ok(_) => {
                        failures = 0;
                        (!healthy).then_some(Health::Recovered)
                    }
                    Err(why) => {
                        failures += 1;
                        (healthy && failures >= UNHEALTHY_AFTER).then_some(Health::Unhealthy(why))
                    }
                };
                if let Some(h) = report {
                    healthy = h == Health::Recovered;
                    if tx.send((id, h)).is_err() {
                        return;
                    }
                }
            }
        });
        if let Err(e) = spawned {
            tracing::error!(worker_id = id, error = %e, "cannot start the probe thread");
        }
    }
}

impl Drop for Apps {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.socket_dir);
    }
}

/// Signals copy `pid`'s whole process group (the copy and what it started).
pub fn signal_group(pid: Pid, sig: Signal) {
    let _ = kill(Pid::from_raw(-pid.as_raw()), sig);
}

/// The supervisor's environment minus what is tandem's alone ([`HIDDEN_PREFIXES`]).
fn copy_env() -> Vec<(std::ffi::OsString, std::ffi::OsString)> {
    std::env::vars_os().filter(|(k, _)| !k.to_str().is_some_and(hidden)).collect()
}

/// A loopback port free right now (the copy binds it a moment later).
fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?.local_addr()?.port())
}

/// Relays one output stream of copy `worker` into the log, a line at a time,
/// keeping the last lines in `tail`.
fn relay(
    stream: impl Read + Send + 'static,
    worker: usize,
    name: &'static str,
    tail: Arc<Mutex<VecDeque<String>>>,
    open: Arc<AtomicUsize>,
) {
    open.fetch_add(1, Ordering::SeqCst);
    let spawned = std::thread::Builder::new().name(format!("{name}-{worker}")).spawn(move || {
        let mut reader = BufReader::new(stream);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.by_ref().take(MAX_LINE as u64).read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => {
                    open.fetch_sub(1, Ordering::SeqCst);
                    return;
                }
                Ok(_) => {}
            }
            let line = String::from_utf8_lossy(&buf);
            let line = line.trim_end_matches(['\n', '\r']);
            tracing::info!(target: "tandem::worker_output", worker, stream = name, "{line}");
            let mut t = tail.lock().unwrap_or_else(|p| p.into_inner());
            if t.len() == TAIL_LINES {
                t.pop_front();
            }
            t.push_back(line.to_string());
        }
    });
    if let Err(e) = spawned {
        tracing::error!(worker, error = %e, "cannot relay the copy's output");
    }
}

/// One `GET path` to the copy; Ok with the status when it is 2xx or 3xx.
pub fn probe(addr: &BackendAddr, path: &str) -> Result<u16, String> {
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nUser-Agent: tandem-probe\r\nConnection: close\r\n\r\n");
    let head = match addr {
        BackendAddr::Tcp(a) => {
            let s = TcpStream::connect_timeout(a, PROBE_TIMEOUT).map_err(|e| format!("cannot connect to {a}: {e}"))?;
            exchange(s, &request)
        }
        BackendAddr::Unix(p) => exchange(connect_unix(p)?, &request),
    }?;
    let status = parse_status(&head).ok_or_else(|| format!("not an HTTP answer: {head:?}"))?;
    if (200..400).contains(&status) {
        Ok(status)
    } else {
        Err(format!("{path} answered {status}"))
    }
}

fn connect_unix(p: &Path) -> Result<UnixStream, String> {
    UnixStream::connect(p).map_err(|e| format!("cannot connect to {}: {e}", p.display()))
}

/// Writes the request and reads the status line, all within [`PROBE_TIMEOUT`].
fn exchange<S: Read + Write + Timeouts>(mut s: S, request: &str) -> Result<String, String> {
    s.timeouts(PROBE_TIMEOUT).map_err(|e| e.to_string())?;
    s.write_all(request.as_bytes()).map_err(|e| format!("cannot send the probe: {e}"))?;
    let mut line = String::new();
    BufReader::new(s.take(4096)).read_line(&mut line).map_err(|e| match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            format!("no answer within {} s", PROBE_TIMEOUT.as_secs())
        }
        _ => format!("cannot read the answer: {e}"),
    })?;
    Ok(line)
}

/// Read and write timeouts on a blocking stream.
trait Timeouts {
    fn timeouts(&self, t: Duration) -> std::io::Result<()>;
}

impl Timeouts for TcpStream {
    fn timeouts(&self, t: Duration) -> std::io::Result<()> {
        self.set_read_timeout(Some(t))?;
        self.set_write_timeout(Some(t))
    }
}

impl Timeouts for UnixStream {
    fn timeouts(&self, t: Duration) -> std::io::Result<()> {
        self.set_read_timeout(Some(t))?;
        self.set_write_timeout(Some(t))
    }
}

/// The status of an `HTTP/1.x NNN reason` line.
fn parse_status(line: &str) -> Option<u16> {
    let mut parts = line.split_ascii_whitespace();
    parts.next().filter(|v| v.starts_with("HTTP/"))?;
    parts.next()?.parse().ok().filter(|s| (100..600).contains(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines_are_read_and_junk_is_not() {
        assert_eq!(parse_status("HTTP/1.1 200 OK\r\n"), Some(200));
        assert_eq!(parse_status("HTTP/1.0 307 Temporary Redirect"), Some(307));
        assert_eq!(parse_status("SSH-2.0-OpenSSH"), None);
        assert_eq!(parse_status("HTTP/1.1 abc"), None);
        assert_eq!(parse_status(""), None);
    }

    #[test]
    fn a_probe_reads_a_real_answer_and_refuses_errors() {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = BackendAddr::Tcp(l.local_addr().expect("addr"));
        let server = std::thread::spawn(move || {
            for status in ["200 OK", "503 Service Unavailable"] {
                let (mut s, _) = l.accept().expect("accept");
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).expect("read");
                assert!(buf.starts_with(b"GET /health HTTP/1.1\r\n"));
                write!(s, "HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n").expect("write");
            }
        });
        assert_eq!(probe(&addr, "/health"), Ok(200));
        assert_eq!(probe(&addr, "/health"), Err("/health answered 503".into()));
        server.join().expect("server");
        assert!(probe(&addr, "/health").is_err_and(|e| e.starts_with("cannot connect")));
    }

    #[test]
    fn tandem_s_own_settings_never_reach_a_copy() {
        for name in
            ["SSL_KEY", "SSL_CERTIFICATE", "ACME_EMAIL", "TANDEM_WORKER_SETTINGS", "LISTEN_FDS", "WORKER_COMMAND"]
        {
            assert!(hidden(name), "{name}");
        }
        for name in ["PATH", "HOME", "MODEL_CACHE_DIR", "CUDA_VISIBLE_DEVICES", "PYTHONPATH", "WORKER_CONCURRENCY"] {
            assert!(!hidden(name), "{name}");
        }
    }
}
