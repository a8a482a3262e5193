//! In-process engine benchmark: inferences/s and p50/p99 latency of a model
//! from the repository, without HTTP. Used by `scripts/bench-engine`.
//!
//! Usage: bench_engine [REPOSITORY] [MODEL] [SECONDS_PER_CASE] [tract|onnxruntime] [THREADS]
//! (onnxruntime reads the library from `ORT_DYLIB_PATH`).

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "a benchmark fails loudly")]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tandem_config::engine::BackendChoice;
use tandem_engine_worker::engine::tensor::{DataType, Tensor, TensorData};
use tandem_engine_worker::engine::{Engine, VersionState};
use tandem_shared::EngineSettings;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let repo = args.first().map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models"), PathBuf::from);
    let model = args.get(1).map_or("digits", String::as_str);
    let secs: f64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(3.0);
    let backend = args.get(3).map_or("tract", String::as_str);
    let threads: usize = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(1);
    let mut settings = EngineSettings { threads, backend: BackendChoice::Tract, ..EngineSettings::default() };
    if backend == "onnxruntime" {
        let path = std::env::var("ORT_DYLIB_PATH").expect("ORT_DYLIB_PATH names the ONNX Runtime library");
        let lib = tandem_engine_worker::engine::onnx_runtime::probe(std::path::Path::new(&path)).expect("load ORT");
        settings.onnxruntime = Some(lib);
        settings.backend = BackendChoice::OnnxRuntime;
    }
    let engine = Engine::load(&repo, &settings, 1, &Default::default()).expect("load repository");
    let models = engine.models();
    let Some(VersionState::Ready(v)) = models.get(model).and_then(|m| m.version(None)) else {
        panic!("{model} is not ready: {:?}", models.get(model).and_then(|m| m.reason()));
    };
    let input = &v.inputs[0];
    assert_eq!(input.datatype, DataType::FP32, "the benchmark feeds FP32");
    println!("| model | backend | batch | inferences/s | rows/s | p50 µs | p99 µs |");
    println!("|---|---|---|---|---|---|---|");
    for batch in [1usize, 8, 64] {
        if v.max_batch_size > 0 && batch > v.max_batch_size {
            continue;
        }
        let shape: Vec<usize> = input
            .shape
            .iter()
            .enumerate()
            .map(|(i, &d)| if i == 0 && d == -1 { batch } else { d.max(1) as usize })
            .collect();
        let count: usize = shape.iter().product();
        let x = Tensor::new(shape, TensorData::F32(vec![4.0; count])).expect("tensor");
        let mut lat = Vec::new();
        let end = Instant::now() + Duration::from_secs_f64(secs);
        let started = Instant::now();
        while Instant::now() < end {
            let t = Instant::now();
            v.run(vec![x.clone()], &[0]).expect("run");
            lat.push(t.elapsed());
        }
        let total = started.elapsed().as_secs_f64();
        lat.sort();
        let p = |q: f64| lat[((lat.len() as f64 * q) as usize).min(lat.len() - 1)].as_micros();
        let ips = lat.len() as f64 / total;
        println!("| {model} | {backend} | {batch} | {ips:.0} | {:.0} | {} | {} |", ips * batch as f64, p(0.5), p(0.99));
        eprintln!("batch {batch}: {} inferences in {total:.1}s", lat.len());
    }
}
