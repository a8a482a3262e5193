//! Round trip of a request through the shared-memory ring, against a Unix
//! socket and loopback TCP (the transport under HTTP), for 4 KiB and 4 MiB
//! bodies. Each transport echoes the body back from another thread, so every
//! round trip moves the body twice, as a request and its response do.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs, reason = "a benchmark fails loudly")]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tandem_shared::sys::shm::Region;

const SIZES: [usize; 2] = [4 << 10, 4 << 20];

/// Echoes length-prefixed messages on a stream until it closes.
fn echo<S: Read + Write>(mut s: S) {
    let mut buf = vec![0u8; 8 << 20];
    loop {
        let mut len = [0u8; 8];
        if s.read_exact(&mut len).is_err() {
            return;
        }
        let n = u64::from_le_bytes(len) as usize;
        s.read_exact(&mut buf[..n]).unwrap();
        s.write_all(&len).unwrap();
        s.write_all(&buf[..n]).unwrap();
    }
}

fn round_trip<S: Read + Write>(s: &mut S, body: &[u8], back: &mut [u8]) {
    s.write_all(&(body.len() as u64).to_le_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut len = [0u8; 8];
    s.read_exact(&mut len).unwrap();
    s.read_exact(&mut back[..body.len()]).unwrap();
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("round_trip");
    group.measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1)).sample_size(30);

    // Shared memory: a consumer thread claims, copies request to response, finishes.
    let (region, _fd) = Region::create(4, 8 << 20, 64 << 20).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let consumer = {
        let (region, stop) = (region.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let seen = region.work_seq();
                match region.claim(1, 0) {
                    Some(mut claim) => {
                        let req = claim.request().to_vec();
                        claim.response_buf()[..req.len()].copy_from_slice(&req);
                        claim.finish(req.len());
                    }
                    None => region.wait_for_work(seen, Duration::from_millis(50)),
                }
            }
        })
    };
    let (unix_a, unix_b) = UnixStream::pair().unwrap();
    std::thread::spawn(move || echo(unix_b));
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        s.set_nodelay(true).unwrap();
        echo(s)
    });
    let mut tcp = TcpStream::connect(addr).unwrap();
    tcp.set_nodelay(true).unwrap();
    let mut unix = unix_a;

    for size in SIZES {
        let body = vec![7u8; size];
        let mut back = vec![0u8; size];
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::new("shm", size), &body, |b, body| {
            b.iter(|| {
                let mut w = region.reserve(0, body.len()).unwrap();
                w.buf()[..body.len()].copy_from_slice(body);
                let slot = w.submit(body.len());
                loop {
                    let seen = region.done_seq();
                    if let Some(resp) = region.take_response(slot) {
                        assert_eq!(resp.len(), body.len());
                        break;
                    }
                    region.wait_for_done(seen, Duration::from_millis(50));
                }
            })
        });
        group.bench_with_input(BenchmarkId::new("unix_socket", size), &body, |b, body| {
            b.iter(|| round_trip(&mut unix, body, &mut back))
        });
        group.bench_with_input(BenchmarkId::new("loopback_tcp", size), &body, |b, body| {
            b.iter(|| round_trip(&mut tcp, body, &mut back))
        });
    }
    group.finish();
    stop.store(true, Ordering::Relaxed);
    consumer.join().unwrap();
}

criterion_group!(benches, bench);
criterion_main!(benches);
