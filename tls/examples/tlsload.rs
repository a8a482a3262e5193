//! A load generator for the HTTPS port over HTTP/1.1, HTTP/2 and HTTP/3 with
//! one client stack (rustls, hyper, quinn + h3) on one thread, so the three
//! protocols are measured the same way (scripts/bench-h3). Bounded in time;
//! prints one JSON line: requests, failures, requests/s, p50/p99/max in ms.
//!
//! tlsload --addr 127.0.0.1:9443 --ca ca.pem --proto h1|h2|h3 --concurrency 16
//!         --seconds 5 [--path /v2/...] [--body FILE] [--header k:v ...] [--new-connection]
//!         [--large-packets]   (HTTP/3: QUIC packets up to the server's own h3::MAX_UDP_PAYLOAD)

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "a benchmark tool: a broken set-up stops it loudly")]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

#[derive(Clone, Copy, PartialEq)]
enum Proto {
    H1,
    H2,
    H3,
}

#[derive(Clone)]
struct Args {
    addr: SocketAddr,
    proto: Proto,
    concurrency: usize,
    seconds: f64,
    path: String,
    body: Bytes,
    headers: Vec<(String, String)>,
    new_connection: bool,
    large_packets: bool,
    tls: Arc<rustls::ClientConfig>,
}

fn args() -> Args {
    let mut it = std::env::args().skip(1);
    let (mut addr, mut ca, mut proto, mut concurrency, mut seconds) = (None, None, Proto::H2, 1, 5.0);
    let (mut path, mut body, mut headers, mut new_connection) = ("/v2/health/ready".to_string(), None, vec![], false);
    let mut large_packets = false;
    while let Some(a) = it.next() {
        let mut v = || it.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--addr" => addr = Some(v().parse().expect("--addr host:port")),
            "--ca" => ca = Some(v()),
            "--proto" => {
                proto = match v().as_str() {
                    "h1" => Proto::H1,
                    "h2" => Proto::H2,
                    "h3" => Proto::H3,
                    p => panic!("--proto h1, h2 or h3, not {p}"),
                }
            }
            "--concurrency" => concurrency = v().parse().expect("--concurrency N"),
            "--seconds" => seconds = v().parse().expect("--seconds S"),
            "--path" => path = v(),
            "--body" => body = Some(Bytes::from(std::fs::read(v()).expect("--body FILE"))),
            "--header" => {
                let h = v();
                let (k, val) = h.split_once(':').expect("--header name:value");
                headers.push((k.trim().to_string(), val.trim().to_string()));
            }
            "--new-connection" => new_connection = true,
            "--large-packets" => large_packets = true,
            _ => panic!("unknown argument {a}"),
        }
    }
    let ca = std::fs::read(ca.expect("--ca FILE")).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&ca) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![match proto {
        Proto::H1 => b"http/1.1".to_vec(),
        Proto::H2 => b"h2".to_vec(),
        Proto::H3 => b"h3".to_vec(),
    }];
    Args {
        addr: addr.expect("--addr host:port"),
        proto,
        concurrency: concurrency.max(1),
        seconds,
        path,
        body: body.unwrap_or_default(),
        headers,
        new_connection,
        large_packets,
        tls: Arc::new(tls),
    }
}

/// What every client task records.
#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    failed: AtomicU64,
    latencies_us: Mutex<Vec<u32>>,
    first_error: Mutex<Option<String>>,
}

impl Tally {
    fn record(&self, began: Instant, result: anyhow::Result<u16>) {
        match result {
            Ok(200) => {
                self.ok.fetch_add(1, Ordering::Relaxed);
                let us = began.elapsed().as_micros().min(u32::MAX as u128) as u32;
                self.latencies_us.lock().unwrap().push(us);
            }
            Ok(status) => self.fail(format!("status {status}")),
            Err(e) => self.fail(format!("{e:#}")),
        }
    }

    fn fail(&self, why: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        self.first_error.lock().unwrap().get_or_insert(why);
    }
}

fn request(a: &Args) -> http::Request<Full<Bytes>> {
    let method = if a.body.is_empty() { http::Method::GET } else { http::Method::POST };
    let mut b = http::Request::builder().method(method).uri(format!("https://localhost:{}{}", a.addr.port(), a.path));
    if a.proto == Proto::H1 {
        b = b.header(http::header::HOST, format!("localhost:{}", a.addr.port()));
    }
    for (k, v) in &a.headers {
        b = b.header(k, v);
    }
    b.body(Full::new(a.body.clone())).unwrap()
}

async fn tls_stream(a: &Args) -> anyhow::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = tokio::net::TcpStream::connect(a.addr).await?;
    tcp.set_nodelay(true)?;
    let name = rustls::pki_types::ServerName::try_from("localhost")?;
    Ok(tokio_rustls::TlsConnector::from(a.tls.clone()).connect(name, tcp).await?)
}

/// A connection over TCP: HTTP/1.1 or HTTP/2 by `a.proto`.
enum Tcp {
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

async fn tcp_connect(a: &Args) -> anyhow::Result<Tcp> {
    let io = hyper_util::rt::TokioIo::new(tls_stream(a).await?);
    Ok(match a.proto {
        Proto::H1 => {
            let (send, conn) = hyper::client::conn::http1::handshake(io).await?;
            tokio::spawn(conn);
            Tcp::H1(send)
        }
        _ => {
            let (send, conn) = hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io).await?;
            tokio::spawn(conn);
            Tcp::H2(send)
        }
    })
}

async fn tcp_request(conn: &mut Tcp, a: &Args) -> anyhow::Result<u16> {
    let res = match conn {
        Tcp::H1(s) => {
            s.ready().await?;
            s.send_request(request(a)).await?
        }
        Tcp::H2(s) => s.send_request(request(a)).await?,
    };
    let status = res.status().as_u16();
    res.into_body().collect().await?;
    Ok(status)
}

type H3Send = h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>;

/// An HTTP/3 connection: requests go through the first, the second closes it.
async fn h3_connect(endpoint: &quinn::Endpoint, a: &Args) -> anyhow::Result<(H3Send, quinn::Connection)> {
    let conn = endpoint.connect(a.addr, "localhost")?.await?;
    let (mut driver, send) = h3::client::new(h3_quinn::Connection::new(conn.clone())).await?;
    tokio::spawn(async move {
        let _ = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
    });
    Ok((send, conn))
}

async fn h3_request(send: &mut H3Send, a: &Args) -> anyhow::Result<u16> {
    let (mut parts, body) = request(a).into_parts();
    let body = body.collect().await?.to_bytes();
    // As curl and browsers send an upload over HTTP/3 (hyper adds it over TCP).
    if !body.is_empty() {
        parts.headers.insert(http::header::CONTENT_LENGTH, body.len().into());
    }
    let mut stream = send.send_request(http::Request::from_parts(parts, ())).await?;
    if !body.is_empty() {
        stream.send_data(body).await?;
    }
    stream.finish().await?;
    let res = stream.recv_response().await?;
    while stream.recv_data().await?.is_some() {}
    Ok(res.status().as_u16())
}

async fn run(a: Args) -> serde_json::Value {
    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let endpoint = (a.proto == Proto::H3).then(|| {
        let socket = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        // Sized as the server sizes its own: the kernel's 208 KiB default drops datagrams at loopback speed.
        tandem_tls::h3::size_buffers(&socket);
        // With --large-packets, the server's own packet sizes (path MTU
        // discovery up to h3::MAX_UDP_PAYLOAD); else quinn's defaults, as
        // most clients send.
        let endpoint_config =
            if a.large_packets { tandem_tls::h3::endpoint_config() } else { quinn::EndpointConfig::default() };
        let mut e = quinn::Endpoint::new(endpoint_config, None, socket, Arc::new(quinn::TokioRuntime)).unwrap();
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(a.tls.clone()).unwrap();
        let mut client = quinn::ClientConfig::new(Arc::new(quic));
        if a.large_packets {
            let mut transport = quinn::TransportConfig::default();
            transport.mtu_discovery_config(Some(tandem_tls::h3::mtu_discovery()));
            client.transport_config(Arc::new(transport));
        }
        e.set_default_client_config(client);
        e
    });
    // Kept alive: HTTP/2 and HTTP/3 multiplex every stream on one connection; HTTP/1.1 needs one each.
    let shared_tcp = match (a.proto, a.new_connection) {
        (Proto::H2, false) => Some(tcp_connect(&a).await.expect("connect")),
        _ => None,
    };
    let (shared_h3, h3_conn) = match (&endpoint, a.new_connection) {
        (Some(e), false) => {
            let (send, conn) = h3_connect(e, &a).await.expect("connect");
            (Some(send), Some(conn))
        }
        _ => (None, None),
    };
    let began = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..a.concurrency {
        let (a, tally, stop, endpoint) = (a.clone(), tally.clone(), stop.clone(), endpoint.clone());
        let mut tcp = shared_tcp.as_ref().map(|t| match t {
            Tcp::H2(s) => Tcp::H2(s.clone()),
            Tcp::H1(_) => unreachable!("HTTP/1.1 connections are not shared"),
        });
        let mut h3 = shared_h3.clone();
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let t0 = Instant::now();
                let result = match (a.proto, a.new_connection) {
                    (Proto::H3, true) => match h3_connect(endpoint.as_ref().unwrap(), &a).await {
                        Ok((mut s, conn)) => {
                            let r = h3_request(&mut s, &a).await;
                            // Closed now, as a TCP client closes its socket (not left to the idle timeout).
                            conn.close(0u32.into(), b"");
                            r
                        }
                        Err(e) => Err(e),
                    },
                    (Proto::H3, false) => h3_request(h3.as_mut().unwrap(), &a).await,
                    (_, true) => match tcp_connect(&a).await {
                        Ok(mut c) => tcp_request(&mut c, &a).await,
                        Err(e) => Err(e),
                    },
                    (_, false) => {
                        if tcp.is_none() {
                            tcp = tcp_connect(&a).await.ok();
                        }
                        match tcp.as_mut() {
                            Some(c) => tcp_request(c, &a).await,
                            None => Err(anyhow::anyhow!("cannot connect")),
                        }
                    }
                };
                tally.record(t0, result);
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(a.seconds)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
    }
    let elapsed = began.elapsed().as_secs_f64();
    let mut lat = std::mem::take(&mut *tally.latencies_us.lock().unwrap());
    lat.sort_unstable();
    let q =
        |p: f64| lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1))).map(|&us| us as f64 / 1e3);
    let ok = tally.ok.load(Ordering::Relaxed);
    serde_json::json!({
        "requests": ok,
        "failed": tally.failed.load(Ordering::Relaxed),
        "first_error": *tally.first_error.lock().unwrap(),
        "rps": ok as f64 / elapsed,
        "p50_ms": q(0.5),
        "p99_ms": q(0.99),
        "max_ms": lat.last().map(|&us| us as f64 / 1e3),
        // The kept-alive QUIC connection's path: the MTU discovered, packets lost.
        "h3_path": h3_conn.map(|c| {
            let s = c.stats();
            serde_json::json!({"mtu": s.path.current_mtu, "lost_packets": s.path.lost_packets,
                               "sent_packets": s.path.sent_packets, "udp_rx_datagrams": s.udp_rx.datagrams})
        }),
    })
}

fn main() {
    let a = args();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let out = runtime.block_on(run(a));
    println!("{out}");
}
