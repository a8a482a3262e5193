//! Control channel messages between the supervisor and a worker.
//!
//! Each worker holds one end of a Unix socketpair. Messages are one JSON
//! object per line. Signals trigger actions; this channel acknowledges them.

use std::io::{self, Write};
use std::os::unix::net::UnixStream;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// A message from a worker to the supervisor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum WorkerEvent {
    /// The worker's listener and engine are up.
    Ready {
        /// Listener address the worker serves.
        addr: String,
        /// Fingerprint of the certificate served, for the HTTPS worker.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        fingerprint: Option<String>,
    },
    /// The worker has stopped accepting and is draining in-flight requests.
    Draining,
    /// A certificate reload succeeded.
    Reloaded {
        /// SHA-256 fingerprint of the certificate now served.
        fingerprint: String,
    },
    /// A certificate reload was refused; the old certificate keeps serving.
    ReloadFailed {
        /// Why.
        reason: String,
    },
}

/// The worker's end of the control channel.
#[derive(Debug)]
pub struct ControlClient {
    stream: Mutex<UnixStream>,
}

impl ControlClient {
    /// Wraps the worker's end of the socketpair.
    pub fn new(stream: UnixStream) -> Self {
        ControlClient { stream: Mutex::new(stream) }
    }

    /// Sends one event; a write error means the supervisor is gone.
    pub fn send(&self, event: &WorkerEvent) -> io::Result<()> {
        let mut line = serde_json::to_vec(event).map_err(io::Error::other)?;
        line.push(b'\n');
        let mut s = self.stream.lock().unwrap_or_else(|p| p.into_inner());
        s.write_all(&line)
    }

    /// Resolves when the supervisor's end of the channel closes: the supervisor
    /// is gone (killed), not merely asking this worker to stop. Reading a
    /// duplicate of the socket never disturbs `send`.
    pub async fn closed(&self) {
        let dup = self.stream.lock().unwrap_or_else(|p| p.into_inner()).try_clone();
        let stream = match dup.and_then(|d| d.set_nonblocking(true).map(|()| d)) {
            Ok(d) => tokio::net::UnixStream::from_std(d),
            Err(e) => Err(e),
        };
        let Ok(stream) = stream else { return std::future::pending().await };
        let mut buf = [0u8; 256];
        loop {
            if stream.readable().await.is_err() {
                return;
            }
            match stream.try_read(&mut buf) {
                Ok(0) => return,
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(_) => return,
            }
        }
    }
}

/// Parses one line received from a worker.
pub fn parse_event(line: &str) -> Result<WorkerEvent, serde_json::Error> {
    serde_json::from_str(line)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};

    #[test]
    fn events_cross_a_socketpair() {
        let (a, b) = UnixStream::pair().expect("pair");
        let client = ControlClient::new(a);
        let sent = WorkerEvent::Reloaded { fingerprint: "ab".into() };
        client.send(&sent).expect("send");
        let mut line = String::new();
        BufReader::new(b).read_line(&mut line).expect("read");
        assert_eq!(parse_event(line.trim()).expect("parse"), sent);
        assert!(line.contains("\"event\":\"reloaded\""), "{line}");
    }
}
