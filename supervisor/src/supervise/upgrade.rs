//! Binary upgrade without a refused connection (`SIGUSR2`, `tandem upgrade`):
//! the running supervisor starts the binary now at its path as a new
//! supervisor, handing it every listening socket (systemd's `LISTEN_FDS`
//! convention, named) and a pipe; the new one validates its configuration,
//! starts its own workers on the same sockets and, once they are all ready,
//! says so on the pipe; only then does the old one drain and exit. A new
//! binary that fails (bad configuration, a crash, workers that never get
//! ready) closes the pipe without a word and the old one keeps serving.
//!
//! As PID 1 (a container) the supervisor cannot hand over to a child and
//! exit, so it becomes the new binary in place: it has the new binary check
//! the configuration first (`tandem check`), then execs it with the
//! listeners and its workers' control channels kept open; the new
//! supervisor starts its own workers and, once they serve, drains the ones
//! it inherited (the HTTPS worker first, as on a stop).
//!
//! `tandem upgrade` finds the supervisor by its pid file in the cache
//! (`tandem.pid`), signals it and waits for the outcome recorded there
//! (`upgrade.json`).

use std::io::Write as _;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::Context;
use command_fds::{CommandFdExt, FdMapping};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tandem_shared::stats::unix_ms;
use tokio::io::AsyncReadExt as _;
use tokio::sync::oneshot;

use super::Listeners;

/// The variable naming the descriptor a new supervisor reports readiness on.
pub const FD_VAR: &str = "TANDEM_UPGRADE_FD";
/// The variable listing the workers an upgrade in place leaves to the new
/// binary: `pid:front:fd` (`front` 1 for the HTTPS worker), comma-separated.
pub const WORKERS_VAR: &str = "TANDEM_UPGRADE_WORKERS";
/// The supervisor's pid, in the cache directory, while it serves.
const PID_FILE: &str = "tandem.pid";
/// The last upgrade's outcome, in the cache directory.
const STATUS_FILE: &str = "upgrade.json";
/// How long `tandem upgrade` waits for the outcome.
const WAIT: Duration = Duration::from_secs(300);

/// A new supervisor started from the binary at our path, not yet ready.
#[derive(Debug)]
pub struct Pending {
    /// Its pid (our child until we exit).
    pub pid: Pid,
    /// Its word: its pid once every worker is ready, or why it never will be.
    pub outcome: oneshot::Receiver<Result<u32, String>>,
}

/// What the last upgrade came to (`upgrade.json`).
#[derive(Debug, Serialize, Deserialize)]
pub struct Status {
    /// The supervisor that was asked.
    pub from: u32,
    /// The new supervisor, when it is ready and serving.
    pub to: Option<u32>,
    /// Why not, when it failed.
    pub reason: Option<String>,
    /// When it was decided (Unix milliseconds).
    pub at_ms: u64,
}

/// Starts `exe` (with our own arguments and environment) as a new supervisor
/// holding `listeners` and a pipe to tell us when it serves.
pub fn start(exe: &Path, listeners: &Listeners) -> anyhow::Result<Pending> {
    let mut fds = Vec::new();
    let mut names = Vec::new();
    for (name, l) in listeners.named() {
        let fd: OwnedFd = l.try_clone_to_owned().context("cannot duplicate a listener for the new supervisor")?;
        fds.push(FdMapping { parent_fd: fd, child_fd: 3 + names.len() as i32 });
        names.push(name);
    }
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("cannot make the upgrade pipe")?;
    let pipe_fd = 3 + names.len() as i32;
    fds.push(FdMapping { parent_fd: write, child_fd: pipe_fd });
    let mut cmd = Command::new(exe);
    cmd.args(std::env::args_os().skip(1))
        .env("LISTEN_FDS", names.len().to_string())
        .env("LISTEN_FDNAMES", names.join(":"))
        .env_remove("LISTEN_PID")
        // systemd's watchdog names the old main pid; the new one pings once it is main.
        .env_remove("WATCHDOG_PID")
        .env(FD_VAR, pipe_fd.to_string())
        .stdin(Stdio::null())
        .fd_mappings(fds)
        .context("descriptor mapping collision")?;
    let child = cmd.spawn().with_context(|| format!("cannot start {}", exe.display()))?;
    let pid = Pid::from_raw(child.id() as i32);
    // Reaped by the supervisor's waitpid(-1), never through this handle.
    drop(child);
    drop(cmd);
    let (tx, outcome) = oneshot::channel();
    let mut pipe = tokio::net::unix::pipe::Receiver::from_owned_fd(read).context("cannot watch the upgrade pipe")?;
    tokio::spawn(async move {
        let mut said = String::new();
        let _ = pipe.read_to_string(&mut said).await;
        let result = match said.trim().strip_prefix("ready ").and_then(|p| p.parse::<u32>().ok()) {
            Some(new) => Ok(new),
            None => Err("the new supervisor stopped before its workers were ready (its log above says why)".into()),
        };
        let _ = tx.send(result);
    });
    Ok(Pending { pid, outcome })
}

/// The pipe to the supervisor that started us, when this one is an upgrade.
static TO_OLD: Mutex<Option<std::fs::File>> = Mutex::new(None);

/// A worker of the binary this one replaced in place, left to drain.
#[derive(Debug)]
pub struct OldWorker {
    /// Its pid (our child: we are the same process).
    pub pid: Pid,
    /// The HTTPS worker (drained before the engines, which answer its ring).
    pub front: bool,
    /// Our end of its control channel, held open until it is gone.
    _control: OwnedFd,
    /// When it was told to drain.
    pub termed: Option<Instant>,
    /// It was killed for not draining in time.
    pub killed: bool,
}

impl OldWorker {
    /// Tells it to drain (once).
    pub fn term(&mut self) {
        if self.termed.is_none() {
            self.termed = Some(Instant::now());
            let _ = nix::sys::signal::kill(self.pid, nix::sys::signal::Signal::SIGTERM);
        }
    }
}

/// The workers an upgrade in place left us, until the supervisor takes them.
static OLD_WORKERS: Mutex<Vec<OldWorker>> = Mutex::new(Vec::new());

/// Takes what an upgrade handed this process (early, before any child is
/// started; children never see it): the pipe to the old supervisor, or the
/// old binary's workers after an upgrade in place.
pub fn adopt() -> anyhow::Result<()> {
    if let Some(v) = std::env::var_os(FD_VAR) {
        std::env::remove_var(FD_VAR);
        let fd: i32 = v.to_str().and_then(|s| s.parse().ok()).with_context(|| format!("{FD_VAR}: not a descriptor"))?;
        let fd = tandem_shared::sys::adopt_fd(fd).with_context(|| format!("{FD_VAR}: descriptor {fd}"))?;
        *TO_OLD.lock().unwrap_or_else(|p| p.into_inner()) = Some(std::fs::File::from(fd));
    }
    if let Some(v) = std::env::var_os(WORKERS_VAR) {
        std::env::remove_var(WORKERS_VAR);
        let v = v.to_str().with_context(|| format!("{WORKERS_VAR}: not text"))?.to_string();
        let mut old = Vec::new();
        for item in v.split(',').filter(|i| !i.is_empty()) {
            let parts: Vec<&str> = item.split(':').collect();
            let [pid, front, fd] = parts[..] else { anyhow::bail!("{WORKERS_VAR}: {item:?} is not pid:front:fd") };
            let (Ok(pid), Ok(fd)) = (pid.parse::<i32>(), fd.parse::<i32>()) else {
                anyhow::bail!("{WORKERS_VAR}: {item:?} is not pid:front:fd");
            };
            let control =
                tandem_shared::sys::adopt_fd(fd).with_context(|| format!("{WORKERS_VAR}: descriptor {fd}"))?;
            old.push(OldWorker {
                pid: Pid::from_raw(pid),
                front: front == "1",
                _control: control,
                termed: None,
                killed: false,
            });
        }
        *OLD_WORKERS.lock().unwrap_or_else(|p| p.into_inner()) = old;
    }
    Ok(())
}

/// The previous binary's workers, for the supervisor to drain once its own serve.
pub fn take_old_workers() -> Vec<OldWorker> {
    std::mem::take(&mut *OLD_WORKERS.lock().unwrap_or_else(|p| p.into_inner()))
}

/// Becomes the binary at `exe` in place (PID 1): returns only when it could
/// not (the configuration or binary failed its check, or exec failed), with why.
/// `workers` are the live workers: (pid, front, our end of their control channel).
pub fn exec_in_place(exe: &Path, listeners: &Listeners, workers: &[(Pid, bool, &OwnedFd)]) -> anyhow::Error {
    match prepare_and_exec(exe, listeners, workers) {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

fn prepare_and_exec(
    exe: &Path,
    listeners: &Listeners,
    workers: &[(Pid, bool, &OwnedFd)],
) -> anyhow::Result<std::convert::Infallible> {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    use std::os::unix::ffi::OsStrExt as _;
    // The new binary must accept this configuration before this process stops being the old one.
    let check = Command::new(exe)
        .arg("check")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {} check", exe.display()))?;
    if !check.status.success() {
        let said = String::from_utf8_lossy(&check.stderr);
        anyhow::bail!("the new binary refused the configuration ({}): {}", check.status, said.trim());
    }
    // The listeners, side by side from descriptor 200 on (LISTEN_FDS_FIRST_FD).
    let mut kept: Vec<OwnedFd> = Vec::new();
    let mut names = Vec::new();
    const FIRST: i32 = 200;
    for (name, l) in listeners.named() {
        let want = FIRST + names.len() as i32;
        let fd = tandem_shared::sys::dup_inheritable_above(l, want)?;
        anyhow::ensure!(fd.as_raw_fd() == want, "descriptor {want} is taken; cannot line the listeners up");
        kept.push(fd);
        names.push(name);
    }
    let mut handed = Vec::new();
    for (pid, front, control) in workers {
        let fd = tandem_shared::sys::dup_inheritable_above(control.as_fd(), FIRST + 64)?;
        handed.push(format!("{}:{}:{}", pid.as_raw(), u8::from(*front), fd.as_raw_fd()));
        kept.push(fd);
    }
    let mut env: Vec<std::ffi::CString> = std::env::vars_os()
        .filter(|(k, _)| {
            !matches!(k.to_str(), Some("LISTEN_FDS" | "LISTEN_PID" | "LISTEN_FDNAMES" | "LISTEN_FDS_FIRST_FD"))
        })
        .filter(|(k, _)| k != WORKERS_VAR && k != FD_VAR)
        .filter_map(|(k, v)| {
            let mut kv = k.as_bytes().to_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            std::ffi::CString::new(kv).ok()
        })
        .collect();
    for (k, v) in [
        ("LISTEN_FDS", names.len().to_string()),
        ("LISTEN_FDS_FIRST_FD", FIRST.to_string()),
        ("LISTEN_FDNAMES", names.join(":")),
        ("LISTEN_PID", std::process::id().to_string()),
        (WORKERS_VAR, handed.join(",")),
    ] {
        env.push(std::ffi::CString::new(format!("{k}={v}"))?);
    }
    let path = std::ffi::CString::new(exe.as_os_str().as_bytes())?;
    let args: Vec<std::ffi::CString> =
        std::env::args_os().filter_map(|a| std::ffi::CString::new(a.as_bytes()).ok()).collect();
    tracing::info!(binary = %exe.display(), workers = workers.len(), "SIGUSR2 as PID 1: becoming the new binary in place");
    let err = nix::unistd::execve(&path, &args, &env).unwrap_err();
    drop(kept);
    Err(anyhow::Error::new(err).context(format!("cannot exec {}", exe.display())))
}

/// Tells the supervisor that started us (if one did) that we serve now.
pub fn tell_ready() {
    if let Some(mut pipe) = TO_OLD.lock().unwrap_or_else(|p| p.into_inner()).take() {
        if let Err(e) = writeln!(pipe, "ready {}", std::process::id()) {
            tracing::error!(error = %e, "cannot tell the previous supervisor that this one serves");
        }
    }
}

/// Writes `contents` to `dir/name` whole (a temporary file renamed over it), 0600.
fn write_file(dir: &Path, name: &str, contents: &[u8]) -> std::io::Result<()> {
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    let tmp = dir.join(format!(".{name}.{}", std::process::id()));
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
    f.write_all(contents)?;
    drop(f);
    std::fs::rename(&tmp, dir.join(name))
}

/// Records this supervisor's pid, now that it serves (`tandem upgrade` reads it).
pub fn write_pid(cache: &Path) {
    if let Err(e) = write_file(cache, PID_FILE, format!("{}\n", std::process::id()).as_bytes()) {
        tracing::warn!(error = %e, "cannot write the pid file; `tandem upgrade` will not find this supervisor");
    }
}

/// Removes the pid file when it names this supervisor (after an upgrade it names the new one).
pub fn remove_pid(cache: &Path) {
    let path = cache.join(PID_FILE);
    if read_pid(&path) == Some(std::process::id()) {
        let _ = std::fs::remove_file(path);
    }
}

fn read_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Records the outcome of an upgrade this supervisor was asked for.
pub fn record(cache: &Path, result: &Result<u32, String>) {
    let status = Status {
        from: std::process::id(),
        to: result.as_ref().ok().copied(),
        reason: result.as_ref().err().cloned(),
        at_ms: unix_ms(),
    };
    let json = serde_json::to_vec_pretty(&status).unwrap_or_default();
    if let Err(e) = write_file(cache, STATUS_FILE, &json) {
        tracing::warn!(error = %e, "cannot record the upgrade's outcome");
    }
}

/// `tandem upgrade`: signals the running supervisor (its pid file in
/// `MODEL_CACHE_DIR`) and waits for the outcome: exit 0 when the new binary
/// serves, 1 when it failed and the old one still does, 2 on bad usage.
pub fn command(args: &[String]) -> ExitCode {
    if !args.is_empty() {
        eprintln!("tandem: error: usage: tandem upgrade (with the environment the server runs with)");
        return ExitCode::from(crate::EXIT_CONFIG);
    }
    let config = match tandem_config::Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tandem: error: {e}");
            return ExitCode::from(crate::EXIT_CONFIG);
        }
    };
    match upgrade(&config.process.cache_dir) {
        Ok(status) => {
            println!("upgraded: supervisor {} -> {}", status.from, status.to.unwrap_or_default());
            ExitCode::from(crate::EXIT_OK)
        }
        Err(e) => {
            eprintln!("tandem: upgrade failed: {e:#}");
            ExitCode::from(crate::EXIT_RUNTIME)
        }
    }
}

fn upgrade(cache: &Path) -> anyhow::Result<Status> {
    let pid_file: PathBuf = cache.join(PID_FILE);
    let pid = read_pid(&pid_file).with_context(|| {
        format!(
            "no running tandem found ({} is missing): is it serving, with this MODEL_CACHE_DIR?",
            pid_file.display()
        )
    })?;
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    anyhow::ensure!(comm.trim() == "tandem", "{} names pid {pid}, which is not a running tandem", pid_file.display());
    let asked = unix_ms();
    nix::sys::signal::kill(Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGUSR2)
        .with_context(|| format!("cannot signal tandem (pid {pid})"))?;
    eprintln!("tandem: asked supervisor {pid} to upgrade; waiting for the new one to serve");
    let end = Instant::now() + WAIT;
    while Instant::now() < end {
        let status =
            std::fs::read(cache.join(STATUS_FILE)).ok().and_then(|b| serde_json::from_slice::<Status>(&b).ok());
        if let Some(s) = status.filter(|s| s.from == pid && s.at_ms >= asked) {
            return match (&s.to, &s.reason) {
                (Some(_), _) => Ok(s),
                (None, reason) => {
                    anyhow::bail!("{}; supervisor {pid} keeps serving", reason.as_deref().unwrap_or("unknown"))
                }
            };
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    anyhow::bail!("no outcome within {} s; see the server's log", WAIT.as_secs())
}
