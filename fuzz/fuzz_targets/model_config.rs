//! Fuzzes the model-configuration parser that reads both `config.pbtxt` /
//! `config.json` files and the JSON override of a load request: any text is
//! parsed or refused with an error, never a panic, and what parses keeps
//! within the bounds a worker can carry (instances, threads, batch, dims).

#![no_main]

use libfuzzer_sys::fuzz_target;
use tandem_engine_worker::engine::config::{self, limits};

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else { return };
    let Ok(text) = std::str::from_utf8(rest) else { return };
    let path = if pick & 1 == 0 { "m/config.pbtxt" } else { "load request config.json" };
    let Ok(loaded) = config::parse(std::path::Path::new(path), text) else { return };
    let c = &loaded.config;
    assert!(text.len() <= config::MAX_CONFIG_BYTES);
    assert!((0..=limits::MAX_BATCH_SIZE).contains(&c.max_batch_size));
    let instances: i64 = c.instance_group.iter().map(|g| i64::from(g.count.max(1))).sum();
    assert!(instances <= limits::INSTANCES, "{instances} instances");
    for key in config::ACTED_ON_PARAMETERS {
        assert!(c.thread_parameter(key) <= limits::THREADS);
    }
    for dims in c.input.iter().map(|i| &i.dims).chain(c.output.iter().map(|o| &o.dims)) {
        assert!(dims.len() <= limits::RANK && dims.iter().all(|&d| (-1..=limits::DIM).contains(&d)));
    }
});
