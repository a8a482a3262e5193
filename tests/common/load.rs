//! A steady load for tests that change a running tandem (an upgrade, a model
//! load): clients posting digits inferences in a loop, each on its own
//! thread, every failure kept with what sent it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{digits_body, Tandem};

/// Clients posting in a loop until [`Load::finish`].
pub struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<Mutex<Vec<String>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    /// Starts one thread per `(kind, client, url)`, each posting a digits
    /// inference and counting a 2xx as answered, anything else as failed.
    pub fn start(clients: Vec<(&'static str, reqwest::blocking::Client, String)>) -> Load {
        let mut load = Load { stop: Arc::default(), ok: Arc::default(), failed: Arc::default(), threads: Vec::new() };
        for (kind, client, url) in clients {
            let ok = load.ok.clone();
            load.also(move || {
                let sent = std::time::SystemTime::now();
                match client.post(&url).body(digits_body(1)).send() {
                    Ok(r) if r.status().is_success() => {
                        ok.fetch_add(1, Ordering::Relaxed);
                        Ok(())
                    }
                    Ok(r) => Err(format!("{kind} {url}: {} {}", r.status(), r.text().unwrap_or_default())),
                    Err(e) => Err(format!("{kind} {url} (sent {sent:?}): {e:?}")),
                }
            });
        }
        load
    }

    /// One more thread running `step` in a loop until stopped; an `Err` is a failure.
    pub fn also(&mut self, step: impl Fn() -> Result<(), String> + Send + 'static) {
        let (stop, failed) = (self.stop.clone(), self.failed.clone());
        self.threads.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if let Err(e) = step() {
                    failed.lock().unwrap().push(e);
                }
            }
        }));
    }

    /// Stops, and fails the test on any failure or on fewer than `at_least` answered.
    pub fn finish(self, t: &Tandem, at_least: u64) {
        self.stop.store(true, Ordering::Relaxed);
        for th in self.threads {
            th.join().unwrap();
        }
        let (ok, failed) = (self.ok.load(Ordering::Relaxed), self.failed.lock().unwrap().clone());
        assert!(
            failed.is_empty(),
            "{} requests failed ({ok} answered): {:?}\n{}",
            failed.len(),
            &failed[..failed.len().min(5)],
            t.explain()
        );
        assert!(ok >= at_least, "only {ok} requests answered");
    }

    /// Lets the load run `linger` more, then [`Load::finish`].
    pub fn finish_after(self, linger: Duration, t: &Tandem, at_least: u64) {
        std::thread::sleep(linger);
        self.finish(t, at_least);
    }
}
