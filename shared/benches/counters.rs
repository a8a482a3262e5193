//! What the whole-server statistics cost one inference request: the work the
//! engine's middleware and infer handler add for them (route lookup, the
//! clock reads of the per-stage timings, the request counter and histogram,
//! the model counters), measured alone so it can be set against the CPU one
//! request costs end to end (`scripts/bench-view`, counters section).

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs, reason = "a benchmark fails loudly")]

use std::hint::black_box;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion};
use tandem_shared::stats::{self, ProcessRole, Stats, Timings};
use tandem_shared::sys::counters::Counters;

fn counters(c: &mut Criterion) {
    let (region, _fd) = Counters::create(stats::region_words(stats::blocks_for(4))).unwrap();
    let s = Stats::attach(region, 2, ProcessRole::Engine, 1);
    let model = s.model("digits", 1).unwrap();
    c.bench_function("statistics of one inference request", |b| {
        b.iter(|| {
            // The clock reads: request start, handler start, decode, queue, run, encode (+ elapsed).
            let started = Instant::now();
            let route = stats::route_index(black_box("/v2/models/digits/infer"));
            let t0 = Instant::now();
            let decoding = Instant::now();
            let queued = Instant::now();
            let running = Instant::now();
            let encoding = Instant::now();
            let t = Timings {
                queue: decoding.duration_since(t0) + queued.elapsed(),
                input: decoding.elapsed(),
                infer: running.elapsed(),
                output: encoding.elapsed(),
            };
            model.success(1, Some(1), t, t0.elapsed());
            s.request(tandem_shared::stats::Listener::Https, route, black_box("POST"), 200, started.elapsed());
        })
    });
}

criterion_group!(benches, counters);
criterion_main!(benches);
