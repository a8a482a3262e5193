//! The signals the supervisor acts on, as a channel of [`Signalled`] events:
//! the real ones come from the operating system ([`os`]), registered before
//! any child exists; anything else (a test, an embedding) can feed the same
//! channel, so the event loop never touches signal handling itself.

use anyhow::Context;
use nix::sys::signal::Signal;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

/// A signal the event loop acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signalled {
    /// SIGCHLD: a child may have exited.
    Child,
    /// SIGTERM or SIGINT: drain and stop (a second one kills).
    Stop,
    /// SIGHUP: re-check the certificate source.
    Hup,
    /// SIGTTIN: one more engine worker.
    AddWorker,
    /// SIGTTOU: one engine worker fewer.
    RemoveWorker,
    /// SIGUSR2: start the binary at our path as a new supervisor and hand over.
    Upgrade,
}

/// Registers the process's signal handlers now and forwards each signal as a
/// [`Signalled`] from a task on the current runtime.
pub fn os() -> anyhow::Result<mpsc::UnboundedReceiver<Signalled>> {
    let kinds = [
        (SignalKind::child(), Signalled::Child),
        (SignalKind::terminate(), Signalled::Stop),
        (SignalKind::interrupt(), Signalled::Stop),
        (SignalKind::hangup(), Signalled::Hup),
        (SignalKind::from_raw(Signal::SIGTTIN as i32), Signalled::AddWorker),
        (SignalKind::from_raw(Signal::SIGTTOU as i32), Signalled::RemoveWorker),
        (SignalKind::user_defined2(), Signalled::Upgrade),
    ];
    let (tx, rx) = mpsc::unbounded_channel();
    for (kind, what) in kinds {
        let mut stream = signal(kind).with_context(|| format!("cannot handle signal {}", kind.as_raw_value()))?;
        let tx = tx.clone();
        tokio::spawn(async move {
            while stream.recv().await.is_some() {
                if tx.send(what).is_err() {
                    return;
                }
            }
        });
    }
    Ok(rx)
}
