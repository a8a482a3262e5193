//! systemd integration, without systemd as PID 1: `systemd-socket-activate`
//! holds the ports and passes them (LISTEN_FDS, LISTEN_FDNAMES), a datagram
//! socket made by the test stands in for the service manager's NOTIFY_SOCKET.
//! tandem must serve on the passed sockets (binding itself would fail: the
//! ports are taken) and say READY=1, WATCHDOG=1, RELOADING=1 + READY=1 around
//! a certificate reload, and STOPPING=1 on drain.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly by design")]

mod common;

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;

/// Reads notifications until one contains `want` (returns everything read), or panics after `within`.
fn until(sock: &UnixDatagram, want: &str, within: Duration, t: &Tandem) -> String {
    let deadline = Instant::now() + within;
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        if let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).to_string();
            seen.push_str(&msg);
            seen.push('\n');
            if msg.contains(want) {
                return seen;
            }
        }
    }
    panic!("no {want:?} within {within:?}; got:\n{seen}\n{}", t.explain());
}

#[test]
fn socket_activated_and_notifying_as_a_type_notify_service() {
    let have = std::process::Command::new("sh").args(["-c", "command -v systemd-socket-activate"]).status().unwrap();
    assert!(have.success(), "systemd-socket-activate is not installed (package systemd)");
    let b = TandemBuilder::new().ssl().env("NUM_WORKERS", "2").env("WATCHDOG_USEC", "1000000");
    let sock_path = b.dir().join("notify.sock");
    let notify = UnixDatagram::bind(&sock_path).unwrap();
    notify.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let b = b.env("NOTIFY_SOCKET", sock_path.to_str().unwrap());
    let (http, https) = (b.env_value("PORT").unwrap().to_string(), b.env_value("SSL_PORT").unwrap().to_string());
    let mut argv: Vec<String> = vec![
        "systemd-socket-activate".into(),
        "-l".into(),
        format!("127.0.0.1:{http}"),
        "-l".into(),
        format!("127.0.0.1:{https}"),
        "--fdname=http:https".into(),
    ];
    // systemd-socket-activate passes on only the variables named with -E.
    for k in b.env_keys().into_iter().chain(["PATH".to_string()]) {
        argv.push("-E".into());
        argv.push(k);
    }
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let mut t = b.wrapped(&argv).spawn();
    // systemd-socket-activate starts tandem on the first connection, which waits in the passed socket's queue.
    let first = wait_for(
        Duration::from_secs(10),
        "the activating socket",
        || t.explain(),
        || std::net::TcpStream::connect(format!("127.0.0.1:{http}")).ok(),
    );
    let seen = until(&notify, "READY=1", START_DEADLINE, &t);
    // The connection made before tandem ran is served.
    {
        use std::io::{Read, Write};
        let mut first = first;
        first.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        first.write_all(b"GET /v2/health/live HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").unwrap();
        let mut answer = String::new();
        let _ = first.read_to_string(&mut answer);
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
    assert!(seen.contains("STATUS=serving"), "{seen}");
    t.wait_ready(true);
    assert!(t.stderr().contains("using a listener passed by systemd"), "{}", t.explain());
    until(&notify, "WATCHDOG=1", Duration::from_secs(3), &t);
    // A certificate reload: RELOADING=1 (with the monotonic time), then READY=1.
    t.signal(Signal::SIGHUP);
    let seen = until(&notify, "RELOADING=1", Duration::from_secs(10), &t);
    assert!(seen.contains("MONOTONIC_USEC="), "{seen}");
    until(&notify, "READY=1", Duration::from_secs(10), &t);
    // Drain.
    t.signal(Signal::SIGTERM);
    until(&notify, "STOPPING=1", Duration::from_secs(10), &t);
    let status = t.wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "{}", t.explain());
}
