//! A file the front door reads on the request path and re-reads when it
//! changes (a `RESTRICTED_API` secret file, `API_KEYS_FILE`): looked at
//! again at most once a [`RECHECK`], by one thread while the others go on with
//! the value they have; a file that became unusable keeps the last good value
//! and says why in the log.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwapOption;

/// How often the file is looked at again (a change takes effect within this).
pub const RECHECK: Duration = Duration::from_secs(1);

/// What says a file changed: modification and change times, length, inode.
type Stamp = (SystemTime, i64, u64, u64);

fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.ctime_nsec() + m.ctime() * 1_000_000_000, m.len(), m.ino()))
}

/// A value read from a file, kept current.
pub struct Watched<T> {
    path: PathBuf,
    /// What the file is, for the log (`API_KEYS_FILE`).
    what: &'static str,
    read: fn(&Path) -> Result<T, String>,
    value: ArcSwapOption<T>,
    born: Instant,
    /// Milliseconds after `born` when the file is next looked at.
    next_check: AtomicU64,
    /// The stamp of the file last read (held by the one thread re-reading).
    last: Mutex<Option<Stamp>>,
}

impl<T> std::fmt::Debug for Watched<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watched").field("path", &self.path).field("what", &self.what).finish_non_exhaustive()
    }
}

impl<T> Watched<T> {
    /// Reads `path` with `read` now; when that fails the value is `None`
    /// (and the failure logged) until the file becomes usable.
    pub fn new(path: PathBuf, what: &'static str, read: fn(&Path) -> Result<T, String>) -> Self {
        let w = Watched {
            path,
            what,
            read,
            value: ArcSwapOption::empty(),
            born: Instant::now(),
            next_check: AtomicU64::new(0),
            last: Mutex::new(None),
        };
        w.current();
        w
    }

    /// The value now, re-reading the file first when it is time to look and it changed.
    pub fn current(&self) -> Option<Arc<T>> {
        let now = self.born.elapsed().as_millis() as u64;
        if now >= self.next_check.load(Ordering::Relaxed) {
            // One thread looks; the others carry on with the value they have.
            if let Ok(mut last) = self.last.try_lock() {
                self.next_check.store(now + RECHECK.as_millis() as u64, Ordering::Relaxed);
                self.reread(&mut last);
            }
        }
        self.value.load_full()
    }

    fn reread(&self, last: &mut Option<Stamp>) {
        let now = stamp(&self.path);
        if now.is_some() && now == *last {
            return;
        }
        let first = last.is_none() && self.value.load().is_none();
        *last = now;
        match (self.read)(&self.path) {
            Ok(v) => {
                if !first {
                    tracing::info!(file = %self.path.display(), "{} changed; the new one applies", self.what);
                }
                self.value.store(Some(Arc::new(v)));
            }
            Err(why) if self.value.load().is_some() => {
                tracing::warn!(file = %self.path.display(), %why, "{} refused; the previous one stays", self.what)
            }
            Err(why) => tracing::error!(
                file = %self.path.display(),
                %why,
                "{} cannot be used and there is no earlier one; what needs it is refused until it is fixed",
                self.what
            ),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly by design")]
mod tests {
    use super::*;

    fn read(path: &Path) -> Result<String, String> {
        let s = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
        if s.starts_with("bad") {
            return Err("bad".into());
        }
        Ok(s)
    }

    #[test]
    fn a_changed_file_applies_and_a_broken_one_keeps_the_last_good_value() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, "one").unwrap();
        let w = Watched::new(path.clone(), "test file", read);
        assert_eq!(w.current().as_deref().map(String::as_str), Some("one"));
        std::fs::write(&path, "two!").unwrap();
        // Not looked at again before RECHECK has passed.
        assert_eq!(w.current().as_deref().map(String::as_str), Some("one"));
        w.next_check.store(0, Ordering::Relaxed);
        assert_eq!(w.current().as_deref().map(String::as_str), Some("two!"));
        std::fs::write(&path, "bad!!").unwrap();
        w.next_check.store(0, Ordering::Relaxed);
        assert_eq!(w.current().as_deref().map(String::as_str), Some("two!"));
        std::fs::remove_file(&path).unwrap();
        w.next_check.store(0, Ordering::Relaxed);
        assert_eq!(w.current().as_deref().map(String::as_str), Some("two!"));
        let missing = Watched::new(dir.path().join("none"), "test file", read);
        assert!(missing.current().is_none());
    }
}
