//! Docker for the container tests (the image, the Debian package): run a
//! command and insist it succeeds, a container removed on drop, and whether a
//! Docker Engine answers here at all (the tests skip, saying so, without one).

use std::process::{Command, Output};

/// Runs `cmd`; a failure panics with its output.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// What a command printed, trimmed.
pub fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// Whether a Docker Engine answers `docker info`.
pub fn docker_available() -> bool {
    Command::new("docker").args(["info", "--format", "{{.ServerVersion}}"]).output().is_ok_and(|o| o.status.success())
}

/// A container, by name, removed on drop.
pub struct Container(pub String);

impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new("docker").args(["rm", "-f", &self.0]).output();
    }
}

impl Container {
    /// Runs `script` with `sh -c` in the container; its output, trimmed.
    pub fn exec(&self, script: &str) -> String {
        text(&run(Command::new("docker").args(["exec", &self.0, "sh", "-c", script])))
    }

    /// The host port published for the container's TCP port `inner`.
    pub fn port(&self, inner: u16) -> u16 {
        let out = text(&run(Command::new("docker").args(["port", &self.0, &format!("{inner}/tcp")])));
        out.lines().next().and_then(|l| l.rsplit(':').next()).and_then(|p| p.parse().ok()).unwrap()
    }
}
