//! Test harness: start the real `tandem` binary on free ports, wait for it,
//! talk to it, and explain failures with the command, environment and stderr.

#![allow(dead_code, reason = "each test binary uses a different subset of the harness")]
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly by design")]

use std::collections::BTreeMap;
use std::fs;
use std::net::TcpListener;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;

pub mod docker;
pub mod load;
pub mod pki;

/// The binary under test, built by cargo for this test run.
pub const TANDEM: &str = env!("CARGO_BIN_EXE_tandem");

/// How long start-up may take before a test gives up.
pub const START_DEADLINE: Duration = Duration::from_secs(60);

/// Ports tests hand out: below the kernel's ephemeral range (32768 and up by
/// default), so an outgoing connection of another test can never be given the
/// same port between the check here and tandem's bind.
const TEST_PORTS: std::ops::Range<u16> = 20_000..32_000;

/// A port nobody listens on right now (TCP and UDP, as HTTP/3 uses both).
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let span = u32::from(TEST_PORTS.end - TEST_PORTS.start);
    if NEXT.load(Ordering::Relaxed) == u32::MAX {
        // Test binaries run one after another, but a start that differs per
        // process keeps a leftover listener of an earlier one out of the way.
        let seed = std::process::id().wrapping_mul(7919)
            ^ std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
        let _ = NEXT.compare_exchange(u32::MAX, seed % span, Ordering::Relaxed, Ordering::Relaxed);
    }
    for _ in 0..span {
        let port = TEST_PORTS.start + (NEXT.fetch_add(1, Ordering::Relaxed) % span) as u16;
        // The wildcard address conflicts with a listener on any address,
        // so this also keeps clear of tests that serve on HOST=0.0.0.0.
        let tcp = TcpListener::bind(("0.0.0.0", port));
        let udp = std::net::UdpSocket::bind(("0.0.0.0", port));
        if tcp.is_ok() && udp.is_ok() {
            return port;
        }
    }
    panic!("no free port in {TEST_PORTS:?}");
}

/// Two distinct free ports.
pub fn free_ports() -> (u16, u16) {
    (free_port(), free_port())
}

/// Polls `f` until it returns `Some`, or panics with `what` and `explain()` after `deadline`.
pub fn wait_for<T>(
    deadline: Duration,
    what: &str,
    explain: impl Fn() -> String,
    mut f: impl FnMut() -> Option<T>,
) -> T {
    let end = Instant::now() + deadline;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > end {
            panic!("timed out after {deadline:?} waiting for {what}\n{}", explain());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A running (or finished) tandem supervisor.
pub struct Tandem {
    pub child: Child,
    pub env: BTreeMap<String, String>,
    pub http_port: u16,
    pub https_port: u16,
    pub dir: tempfile::TempDir,
    stderr_path: PathBuf,
    status: Option<ExitStatus>,
    program: Vec<String>,
}

/// Builder for a tandem process.
pub struct TandemBuilder {
    env: BTreeMap<String, String>,
    /// Variables whose values are raw bytes (not UTF-8).
    raw_env: Vec<(String, Vec<u8>)>,
    wrapper: Vec<String>,
    /// Another tandem binary to run (a copy elsewhere); the one cargo built by default.
    binary: Option<String>,
    /// Arguments to tandem itself (a subcommand such as `run -- ...`).
    args: Vec<String>,
    dir: tempfile::TempDir,
}

impl TandemBuilder {
    /// Defaults: free ports on 127.0.0.1, a private cache dir, GENERATE certificates.
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (http, https) = free_ports();
        let mut env = BTreeMap::new();
        env.insert("HOST".into(), "127.0.0.1".into());
        env.insert("PORT".into(), http.to_string());
        env.insert("SSL_PORT".into(), https.to_string());
        env.insert("MODEL_CACHE_DIR".into(), dir.path().join("cache").display().to_string());
        env.insert("SSL_CERTIFICATE".into(), "GENERATE".into());
        env.insert("GRACEFUL_TIMEOUT".into(), "10s".into());
        // TEST_LOG_LEVEL=debug shows a failing test's servers in more detail.
        env.insert("LOG_LEVEL".into(), std::env::var("TEST_LOG_LEVEL").unwrap_or_else(|_| "info".into()));
        TandemBuilder { env, raw_env: Vec::new(), wrapper: Vec::new(), binary: None, args: Vec::new(), dir }
    }

    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.insert(k.into(), v.into());
        self
    }

    /// Sets a variable to raw bytes (e.g. a value that is not UTF-8).
    pub fn env_bytes(mut self, k: &str, v: &[u8]) -> Self {
        self.env.remove(k);
        self.raw_env.push((k.to_string(), v.to_vec()));
        self
    }

    /// The variables set so far.
    pub fn env_keys(&self) -> Vec<String> {
        self.env.keys().cloned().collect()
    }

    /// The value a variable will have.
    pub fn env_value(&self, k: &str) -> Option<&str> {
        self.env.get(k).map(String::as_str)
    }

    pub fn unset(mut self, k: &str) -> Self {
        self.env.remove(k);
        self
    }

    pub fn ssl(self) -> Self {
        self.env("ENABLE_SSL", "true")
    }

    /// Passes `args` to tandem (e.g. `run -- CMD ...`).
    pub fn args(mut self, args: &[String]) -> Self {
        self.args = args.to_vec();
        self
    }

    /// Runs tandem under another program (e.g. `unshare --pid --fork`).
    pub fn wrapped(mut self, argv: &[&str]) -> Self {
        self.wrapper = argv.iter().map(|s| s.to_string()).collect();
        self
    }

    /// Runs a copy of tandem at `path` (made here) instead of the one cargo built.
    pub fn copied_binary(mut self) -> Self {
        let bin = self.dir.path().join("bin");
        fs::create_dir_all(&bin).unwrap();
        let path = bin.join("tandem");
        fs::copy(TANDEM, &path).unwrap();
        self.binary = Some(path.to_string_lossy().into_owned());
        self
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Starts the process without waiting for readiness.
    pub fn spawn(self) -> Tandem {
        let stderr_path = self.dir.path().join("stderr.log");
        let stderr = fs::File::create(&stderr_path).unwrap();
        let mut program = self.wrapper.clone();
        program.push(self.binary.clone().unwrap_or_else(|| TANDEM.to_string()));
        program.extend(self.args.iter().cloned());
        let mut cmd = Command::new(&program[0]);
        cmd.args(&program[1..])
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(&self.env)
            .envs(self.raw_env.iter().map(|(k, v)| (k, std::ffi::OsStr::from_bytes(v))))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .process_group(0);
        // A binary copied by this test process can be briefly "busy" (ETXTBSY):
        // another test thread's fork may still hold the copy's write descriptor
        // until that child execs. Try again for a moment.
        let mut tries = 0;
        let child = loop {
            match cmd.spawn() {
                Err(e) if e.raw_os_error() == Some(nix::libc::ETXTBSY) && tries < 50 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
                other => break other.unwrap_or_else(|e| panic!("cannot start {program:?}: {e}")),
            }
        };
        let port = |k: &str| self.env.get(k).and_then(|p| p.parse().ok()).unwrap_or(0);
        Tandem {
            child,
            http_port: port("PORT"),
            https_port: port("SSL_PORT"),
            env: self.env,
            dir: self.dir,
            stderr_path,
            status: None,
            program,
        }
    }

    /// Starts tandem and waits until every listener answers.
    pub fn start(self) -> Tandem {
        let ssl = self.env.get("ENABLE_SSL").is_some_and(|v| v == "true");
        let mut t = self.spawn();
        t.wait_ready(ssl);
        t
    }

    /// Starts tandem and waits until HTTP answers `/v2/health/live` (readiness may be false).
    pub fn start_live(self) -> Tandem {
        let t = self.spawn();
        let http = Tandem::http_client();
        let url = t.http_url("/v2/health/live");
        wait_for(
            START_DEADLINE,
            "HTTP liveness",
            || t.explain(),
            || http.get(&url).send().ok().filter(|r| r.status().is_success()).map(|_| ()),
        );
        t
    }
}

impl Tandem {
    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Everything needed to understand a failure.
    pub fn explain(&self) -> String {
        let env: Vec<String> = self.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        format!(
            "--- command: {} {}\n--- status: {:?}\n--- stderr:\n{}",
            env.join(" "),
            self.program.join(" "),
            self.status,
            self.stderr()
        )
    }

    pub fn http_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.http_port)
    }

    pub fn https_url(&self, host: &str, path: &str) -> String {
        format!("https://{host}:{}{path}", self.https_port)
    }

    pub fn cert_dir(&self) -> PathBuf {
        PathBuf::from(&self.env["MODEL_CACHE_DIR"]).join("ssl_certificates")
    }

    /// The certificate chain tandem serves, as PEM (the trust root for a self-signed one).
    pub fn served_chain_pem(&self) -> String {
        let live = fs::read_to_string(self.cert_dir().join("live.pem")).unwrap();
        let start = live.find("-----BEGIN CERTIFICATE-----").unwrap();
        live[start..].to_string()
    }

    /// A client trusting only `ca_pem`.
    pub fn https_client(ca_pem: &str) -> reqwest::blocking::Client {
        Self::https_client_within(ca_pem, Duration::from_secs(10))
    }

    /// [`Tandem::https_client`] giving each request `timeout`.
    pub fn https_client_within(ca_pem: &str, timeout: Duration) -> reqwest::blocking::Client {
        install_provider();
        reqwest::blocking::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap())
            .tls_info(true)
            .timeout(timeout)
            .build()
            .unwrap()
    }

    pub fn http_client() -> reqwest::blocking::Client {
        install_provider();
        reqwest::blocking::Client::builder().timeout(Duration::from_secs(10)).build().unwrap()
    }

    /// Waits until HTTP (unless `HTTP_MODE=off`) and HTTPS answer `/v2/health/ready` with 200.
    pub fn wait_ready(&mut self, ssl: bool) {
        let http = Self::http_client();
        let url = self.http_url("/v2/health/ready");
        let explain = || self.explain();
        // A supervisor that exited (a port taken, a bad setting) never gets
        // ready: say so at once instead of after the whole deadline.
        let gone = || {
            if self.has_exited() {
                panic!("tandem exited before it was ready\n{}", self.explain());
            }
        };
        if self.env.get("HTTP_MODE").is_none_or(|m| m != "off") {
            wait_for(START_DEADLINE, "HTTP readiness", explain, || {
                gone();
                http.get(&url).send().ok().filter(|r| r.status().is_success()).map(|_| ())
            });
        }
        if ssl {
            let url = self.https_url("127.0.0.1", "/v2/health/ready");
            wait_for(START_DEADLINE, "HTTPS readiness", explain, || {
                gone();
                let chain = fs::read_to_string(self.cert_dir().join("live.pem")).ok()?;
                let client = Self::https_client(&chain[chain.find("-----BEGIN CERTIFICATE-----")?..]);
                client.get(&url).send().ok().filter(|r| r.status().is_success()).map(|_| ())
            });
        }
        // The supervisor's own word that every worker has started: a port
        // answers as soon as one worker does, and a test that killed another
        // before the supervisor had heard it was ready met start-up's
        // fail-fast rule (the whole server exits) instead of a restart.
        if self.env.get("LOG_LEVEL").is_none_or(|l| ["info", "debug", "trace"].contains(&l.as_str())) {
            wait_for(START_DEADLINE, "the supervisor's announcement", explain, || {
                gone();
                let log = self.stderr();
                (log.contains("serving HTTP") || log.contains("no plain HTTP port")).then_some(())
            });
        }
    }

    /// Whether the supervisor has exited (a zombie not yet reaped counts), without reaping it.
    pub fn has_exited(&self) -> bool {
        let stat = fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        // The state follows the command name, which is in parentheses.
        stat.rsplit_once(')').is_none_or(|(_, rest)| rest.trim_start().starts_with(['Z', 'X']))
    }

    /// Waits until `text` has appeared `count` times in tandem's stderr.
    pub fn wait_for_log(&self, deadline: Duration, text: &str, count: usize) {
        wait_for(
            deadline,
            &format!("{count} x {text:?} in the log"),
            || self.explain(),
            || (self.stderr().matches(text).count() >= count).then_some(()),
        );
    }

    /// Sends a signal to the supervisor.
    pub fn signal(&self, sig: Signal) {
        kill(self.pid(), sig).unwrap();
    }

    /// Waits for the supervisor to exit.
    pub fn wait_exit(&mut self, deadline: Duration) -> ExitStatus {
        let end = Instant::now() + deadline;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                self.status = Some(s);
                return s;
            }
            if Instant::now() > end {
                panic!("tandem did not exit within {deadline:?}\n{}", self.explain());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Direct children of `pid` with their command lines.
    pub fn children_of(pid: Pid) -> Vec<(Pid, String)> {
        let path = format!("/proc/{pid}/task/{pid}/children");
        let list = fs::read_to_string(path).unwrap_or_default();
        list.split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
            .map(|p| {
                let cmd = fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
                let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ").trim().to_string();
                (Pid::from_raw(p), cmd)
            })
            .collect()
    }

    /// Waits until the supervisor has `count` workers of `role` again and
    /// `victim` is not among them; returns their pids.
    pub fn wait_replaced(&self, deadline: Duration, role: &str, victim: Pid, count: usize) -> Vec<Pid> {
        wait_for(
            deadline,
            &format!("a replacement for {role} {victim}"),
            || self.explain(),
            || {
                let now = self.workers(role);
                (now.len() == count && !now.contains(&victim)).then_some(now)
            },
        )
    }

    /// Pids of the supervisor's workers with the given role.
    pub fn workers(&self, role: &str) -> Vec<Pid> {
        Self::children_of(self.pid())
            .into_iter()
            .filter(|(_, c)| c == &format!("tandem {role}"))
            .map(|(p, _)| p)
            .collect()
    }
}

impl Drop for Tandem {
    fn drop(&mut self) {
        // The whole process group: supervisor and every worker.
        let _ = killpg(self.pid(), Signal::SIGKILL);
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("{}", self.explain());
        }
    }
}

/// A `digits` inference request (Open Inference Protocol JSON), every pixel `pixel`.
pub fn digits_body(pixel: u32) -> String {
    format!(
        r#"{{"inputs":[{{"name":"pixels","shape":[1,64],"datatype":"FP32","data":[{}]}}]}}"#,
        vec![pixel.to_string(); 64].join(",")
    )
}

/// `bytes` gzip-compressed.
pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut z = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut z, bytes).unwrap();
    z.finish().unwrap()
}

/// Installs the process-wide rustls crypto provider once.
pub fn install_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// Whether a process is gone (or a zombie nobody reaped).
pub fn process_state(pid: Pid) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    after.trim_start().chars().next()
}

/// SHA-256 fingerprint of the leaf certificate a response was served with.
pub fn served_fingerprint(resp: &reqwest::blocking::Response) -> String {
    let info = resp.extensions().get::<reqwest::tls::TlsInfo>().expect("tls_info enabled");
    let der = info.peer_certificate().expect("peer certificate");
    tandem_shared::certs::primitives::inspect(&der.to_vec().into(), "served").unwrap().fingerprint
}

/// A repository in `dir` holding only the benchmark model `name` (scripts/make_bench_models.py).
pub fn bench_model_repository(dir: &Path, name: &str) -> PathBuf {
    let models = dir.join("bench");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/make_bench_models.py");
    let made = Command::new("python3").arg(script).arg("--out").arg(&models).output().unwrap();
    assert!(made.status.success(), "make_bench_models.py: {}", String::from_utf8_lossy(&made.stderr));
    let repo = dir.join("repo");
    fs::create_dir_all(&repo).unwrap();
    std::os::unix::fs::symlink(models.join(name), repo.join(name)).unwrap();
    repo
}

/// A copy of the built-in digits model in `repo` named `name`, with `extra`
/// appended to its configuration (e.g. a `dynamic_batching` section).
pub fn copy_digits(repo: &Path, name: &str, extra: &str) {
    let from = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/digits");
    fs::create_dir_all(repo.join(name).join("1")).unwrap();
    fs::copy(from.join("1/model.onnx"), repo.join(name).join("1/model.onnx")).unwrap();
    fs::copy(from.join("labels.txt"), repo.join(name).join("labels.txt")).unwrap();
    let config = fs::read_to_string(from.join("config.pbtxt"))
        .unwrap()
        .replace("name: \"digits\"", &format!("name: \"{name}\""));
    fs::write(repo.join(name).join("config.pbtxt"), config + extra).unwrap();
}

/// A model `name` in `repo` that cannot load (its ONNX file is not one).
pub fn broken_model(repo: &Path, name: &str) {
    fs::create_dir_all(repo.join(name).join("1")).unwrap();
    fs::write(repo.join(name).join("1/model.onnx"), b"not an onnx model").unwrap();
}

/// Copies digits' configuration as model `name` in `repo` (plus `extra`)
/// over a model with digits' interface whose every inference takes about
/// `seconds` here (tests/python/make_slow_model.py): for requests that must
/// stay in flight for a while.
pub fn copy_slow(repo: &Path, name: &str, seconds: f64, extra: &str) {
    make_slow(repo, name, seconds, extra, &[]);
}

/// As [`copy_slow`], a model whose rows cost the same run alone or stacked
/// (elementwise work, no weights to share): dynamic batching saves nothing on it.
pub fn copy_slow_linear(repo: &Path, name: &str, seconds: f64, extra: &str) {
    make_slow(repo, name, seconds, extra, &["--linear"]);
}

fn make_slow(repo: &Path, name: &str, seconds: f64, extra: &str, args: &[&str]) {
    copy_digits(repo, name, extra);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/make_slow_model.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(repo.join(name).join("1/model.onnx"))
        .arg(seconds.to_string())
        .args(args)
        .output()
        .expect("python3 runs (scripts/test installs onnx and onnxruntime)");
    assert!(out.status.success(), "make_slow_model.py failed:\n{}", String::from_utf8_lossy(&out.stderr));
}

/// Runs `tests/python/<script> URL [--ca CA]` (HTTPS when `ca` is given) and
/// returns its stdout; fails the test, with the server's story, when it fails.
pub fn python_client(t: &Tandem, script: &str, url: &str, ca: Option<&Path>) -> String {
    let mut cmd = python_script(script);
    cmd.arg(url);
    if let Some(ca) = ca {
        cmd.arg("--ca").arg(ca);
    }
    python_output(t, cmd)
}

/// Writes the engine tests' model repository into `out` (scripts/make_test_models.py).
pub fn make_test_models(out: &Path) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/make_test_models.py");
    let made = Command::new("python3").arg(&script).arg("--out").arg(out).output().unwrap();
    assert!(
        made.status.success(),
        "make_test_models.py failed (scripts/test installs its packages):\n{}",
        String::from_utf8_lossy(&made.stderr)
    );
}

/// `python3 tests/python/<script>`, for the caller to add arguments to.
pub fn python_script(script: &str) -> Command {
    let mut cmd = Command::new("python3");
    cmd.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python").join(script));
    cmd
}

/// tests/python/h3_client.py against `t`'s HTTPS port with `args`, trusting `ca`.
pub fn h3_command(t: &Tandem, args: &[&str], ca: &Path) -> Command {
    let mut cmd = python_script("h3_client.py");
    cmd.arg("127.0.0.1").arg(t.https_port.to_string()).args(args).arg("--ca").arg(ca);
    cmd
}

/// Runs [`h3_command`]: one JSON value per line of its answer.
pub fn h3(t: &Tandem, args: &[&str], ca: &Path) -> Vec<serde_json::Value> {
    python_output(t, h3_command(t, args, ca)).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// Runs a [`python_script`] command and returns its stdout; fails the test,
/// with the server's story, when it fails.
pub fn python_output(t: &Tandem, mut cmd: Command) -> String {
    let out = cmd.output().expect("python3 runs (scripts/test installs the pinned clients)");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "failed: {cmd:?}\n{stdout}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        t.explain()
    );
    stdout
}

/// A raw TLS connection, for tests that write bytes no client library would.
pub type Tls = rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>;

/// A TLS connection to `port` trusting `ca_pem`, offering `alpn`.
pub fn tls(port: u16, ca_pem: &str, alpn: &[u8]) -> Tls {
    use rustls::pki_types::pem::PemObject;
    use std::io::Write;
    install_provider();
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name).unwrap();
    let tcp = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut stream = rustls::StreamOwned::new(conn, tcp);
    stream.flush().unwrap();
    while stream.conn.is_handshaking() {
        stream.conn.complete_io(&mut stream.sock).unwrap();
    }
    stream
}
