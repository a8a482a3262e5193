//! The statistics region: one memfd of 64-bit atomic words that every process
//! of a tandem maps. Only the mapping and its view as `&[AtomicU64]` are
//! unsafe; what each word means is `crate::stats`'s business.

use std::io;
use std::os::fd::OwnedFd;
use std::ptr::NonNull;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use nix::sys::memfd::{memfd_create, MFdFlags};
use nix::sys::mman::munmap;

/// A mapped region of `words` shared atomic counters, zero when created.
#[derive(Debug)]
pub struct Counters {
    base: NonNull<u8>,
    words: usize,
}

// SAFETY: the region is shared memory accessed only as `AtomicU64`s, which are
// safe to use from any thread (and any process).
unsafe impl Send for Counters {}
// SAFETY: as above: `&Counters` hands out only `&[AtomicU64]`.
unsafe impl Sync for Counters {}

impl Drop for Counters {
    fn drop(&mut self) {
        // SAFETY: `base` and the length come from our own successful mmap, and
        // every `&[AtomicU64]` borrowed from `self` ended before the drop.
        let _ = unsafe { munmap(self.base.cast(), self.words * 8) };
    }
}

fn bytes(words: usize) -> io::Result<usize> {
    words
        .checked_mul(8)
        .filter(|&b| b > 0)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "statistics region size out of range"))
}

impl Counters {
    /// Creates the region in a new memfd (close-on-exec; handed to workers at a fixed fd).
    /// Pages are allocated only when first written.
    pub fn create(words: usize) -> io::Result<(Arc<Counters>, OwnedFd)> {
        let len = bytes(words)?;
        let fd = memfd_create("tandem-stats", MFdFlags::MFD_CLOEXEC).map_err(io::Error::from)?;
        nix::unistd::ftruncate(&fd, len as i64).map_err(io::Error::from)?;
        let base = super::shm::map(&fd, len)?;
        Ok((Arc::new(Counters { base, words }), fd))
    }

    /// Maps a region created by the supervisor, checking its size.
    pub fn open(fd: &OwnedFd, words: usize) -> io::Result<Arc<Counters>> {
        let len = bytes(words)?;
        let actual = nix::sys::stat::fstat(fd).map_err(io::Error::from)?.st_size;
        if actual != len as i64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("statistics region is {actual} bytes, expected {len}"),
            ));
        }
        Ok(Arc::new(Counters { base: super::shm::map(fd, len)?, words }))
    }

    /// Every word of the region.
    pub fn words(&self) -> &[AtomicU64] {
        // SAFETY: the mapping is `words * 8` bytes, page-aligned (so 8-byte
        // aligned), lives as long as `self`, and is only ever accessed as
        // atomics (by every process that maps it), so viewing it as a slice of
        // `AtomicU64` creates no data race. Zero is a valid `AtomicU64`.
        unsafe { std::slice::from_raw_parts(self.base.as_ptr().cast::<AtomicU64>(), self.words) }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly by design")]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn a_second_mapping_sees_the_same_words() {
        let (a, fd) = Counters::create(1000).unwrap();
        let b = Counters::open(&fd, 1000).unwrap();
        a.words()[999].fetch_add(7, Ordering::Relaxed);
        assert_eq!(b.words()[999].load(Ordering::Relaxed), 7);
        assert!(Counters::open(&fd, 999).is_err(), "a size mismatch is refused");
    }
}
