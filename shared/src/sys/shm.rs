//! The shared-memory request ring between the HTTPS worker (producer) and the
//! engine workers (consumers). Every `unsafe` block of it is here.
//!
//! Layout of the memfd region:
//!
//! ```text
//! [0, 4096)            Header: magic, version, geometry, wake counters
//! [4096, 4096+64*S)    one 64-byte SlotMeta per slot (state word, lengths)
//! [data, ...)          per slot: request half (slot_bytes), response half (slot_bytes)
//! ```
//!
//! Each slot's 32-bit state word is both its state and a futex:
//! `FREE → WRITING → SUBMITTED → CLAIMED|worker → DONE | FAILED → FREE`.
//! Whoever moved a slot into a state owns the slot's buffers while it stays
//! there; every transition is a compare-and-swap, so many producer tasks and
//! many consumer processes can race safely.

use std::io;
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::memfd::{memfd_create, MFdFlags};
use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};

const MAGIC: u64 = 0x544e_444d_5348_4d31; // "TNDMSHM1"
/// Layout version of the region; bump on any change.
pub const LAYOUT_VERSION: u32 = 4;
const HEADER_BYTES: usize = 4096;
/// Bytes of each slot half that stay resident; pages beyond are kept for the
/// next request within the region's warm budget, else given back after use.
pub const RESIDENT_BYTES: usize = 1 << 20;
const PAGE: usize = 4096;
const META_BYTES: usize = 64;

/// Slot is free.
pub const FREE: u32 = 0;
/// The producer is writing the request.
pub const WRITING: u32 = 1;
/// The request waits for an engine worker.
pub const SUBMITTED: u32 = 2;
/// The response is ready.
pub const DONE: u32 = 3;
/// The engine worker died holding the slot; the request is intact.
pub const FAILED: u32 = 4;
/// High bit: claimed; the low 31 bits are the claimer's worker id.
pub const CLAIMED: u32 = 0x8000_0000;

/// The claimed-state word for `worker_id` (ids are folded into 31 bits).
pub fn claimed_by(worker_id: u64) -> u32 {
    CLAIMED | (worker_id as u32 & !CLAIMED)
}

#[repr(C)]
struct Header {
    magic: u64,
    version: u32,
    slots: u32,
    slot_bytes: u64,
    /// Bumped on every submit; engine workers sleep on it.
    work_seq: AtomicU32,
    engine_sleepers: AtomicU32,
    /// Bumped on every completion; the HTTPS worker sleeps on it.
    done_seq: AtomicU32,
    https_sleepers: AtomicU32,
    /// HTTPS serving threads watching `done_seq` themselves
    /// ([`Region::watch_done`]): completions do not wake the sleeper meanwhile.
    https_watchers: AtomicU32,
    /// Engine workers with a claimer watching `work_seq` itself, one bit per
    /// worker id (mod 64; [`Region::watch_for_work`]): submits do not wake a
    /// sleeping claimer meanwhile. A bit is per worker, not a count, so the
    /// supervisor can clear the bit of a worker that died mid-watch.
    engine_watching: AtomicU64,
    /// Pages past [`RESIDENT_BYTES`] slots may keep between requests, all
    /// slots together (`SHM_WARM_BYTES`), and how much they keep now.
    warm_budget: u64,
    warm_bytes: AtomicU64,
}

#[repr(C, align(64))]
struct SlotMeta {
    state: AtomicU32,
    _pad: u32,
    request_len: AtomicU64,
    response_len: AtomicU64,
    /// Per half: bytes past [`RESIDENT_BYTES`] kept resident (counted in
    /// `Header::warm_bytes`). Changed only by whoever owns the slot.
    warm: [AtomicU64; 2],
}

const _: () = assert!(std::mem::size_of::<Header>() <= HEADER_BYTES);
const _: () = assert!(std::mem::size_of::<SlotMeta>() == META_BYTES);

/// A mapped region.
#[derive(Debug)]
pub struct Region {
    base: NonNull<u8>,
    len: usize,
    slots: u32,
    slot_bytes: usize,
    data_offset: usize,
}

// SAFETY: the region is plain shared memory. Header and metadata fields that
// change after creation are atomics; slot buffers are only touched through the
// guards below, which exist only while their holder owns the slot's state.
unsafe impl Send for Region {}
// SAFETY: as above; `&Region` exposes no unsynchronised mutation.
unsafe impl Sync for Region {}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: `base`/`len` come from our own successful mmap, and no guard
        // outlives the region (guards hold an `Arc<Region>`).
        let _ = unsafe { munmap(self.base.cast(), self.len) };
    }
}

fn geometry(slots: u32, slot_bytes: usize) -> io::Result<(usize, usize)> {
    let overflow = || io::Error::new(io::ErrorKind::InvalidInput, "shared-memory region too large");
    let meta = (slots as usize).checked_mul(META_BYTES).ok_or_else(overflow)?;
    let data_offset = (HEADER_BYTES + meta).next_multiple_of(4096);
    let data = (slots as usize).checked_mul(slot_bytes).and_then(|d| d.checked_mul(2)).ok_or_else(overflow)?;
    Ok((data_offset, data_offset.checked_add(data).ok_or_else(overflow)?))
}

pub(super) fn map(fd: &OwnedFd, len: usize) -> io::Result<NonNull<u8>> {
    let size = NonZeroUsize::new(len).ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "empty region"))?;
    // SAFETY: a fresh shared mapping of our own memfd: no existing Rust object
    // aliases it, and it stays mapped until `Region::drop`.
    let ptr =
        unsafe { mmap(None, size, ProtFlags::PROT_READ | ProtFlags::PROT_WRITE, MapFlags::MAP_SHARED, fd.as_fd(), 0) }
            .map_err(io::Error::from)?;
    Ok(ptr.cast())
}

impl Region {
    /// Creates the region in a new memfd (not `/dev/shm`, which Docker keeps small).
    /// Slot halves keep up to `warm_budget` bytes past [`RESIDENT_BYTES`], all
    /// together, so back-to-back large requests do not fault their pages in
    /// again each time.
    pub fn create(slots: u32, slot_bytes: usize, warm_budget: u64) -> io::Result<(Arc<Region>, OwnedFd)> {
        let (data_offset, len) = geometry(slots, slot_bytes)?;
        // Close-on-exec here; command-fds dup2s it to a fixed fd in each worker.
        let fd = memfd_create("tandem-shm", MFdFlags::MFD_CLOEXEC).map_err(io::Error::from)?;
        nix::unistd::ftruncate(&fd, len as i64).map_err(io::Error::from)?;
        let base = map(&fd, len)?;
        let region = Region { base, len, slots, slot_bytes, data_offset };
        // SAFETY: the mapping is fresh, zero-filled, at least HEADER_BYTES long
        // and page-aligned; nobody else has it yet, so writing the plain
        // fields is not a data race.
        unsafe {
            let h = region.base.as_ptr().cast::<Header>();
            (*h).version = LAYOUT_VERSION;
            (*h).slots = slots;
            (*h).slot_bytes = slot_bytes as u64;
            (*h).warm_budget = warm_budget;
            (*h).magic = MAGIC;
        }
        Ok((Arc::new(region), fd))
    }

    /// Maps a region created by the supervisor and checks it matches.
    pub fn open(fd: &OwnedFd, slots: u32, slot_bytes: usize) -> io::Result<Arc<Region>> {
        let (data_offset, len) = geometry(slots, slot_bytes)?;
        let actual = nix::sys::stat::fstat(fd).map_err(io::Error::from)?.st_size;
        if actual != len as i64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("shared memory is {actual} bytes, expected {len}"),
            ));
        }
        let region = Region { base: map(fd, len)?, len, slots, slot_bytes, data_offset };
        let h = region.header();
        if h.magic != MAGIC || h.version != LAYOUT_VERSION || h.slots != slots || h.slot_bytes != slot_bytes as u64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "shared memory has another layout version or geometry",
            ));
        }
        Ok(Arc::new(region))
    }

    fn header(&self) -> &Header {
        // SAFETY: the region starts with a Header (page-aligned, initialised
        // by `create` before any other process could map it).
        unsafe { &*self.base.as_ptr().cast::<Header>() }
    }

    fn meta(&self, slot: u32) -> &SlotMeta {
        debug_assert!(slot < self.slots, "slot {slot} out of range ({} slots)", self.slots);
        let slot = slot.min(self.slots.saturating_sub(1));
        // SAFETY: slot < slots, so the SlotMeta lies inside the metadata area,
        // which is 64-byte aligned (HEADER_BYTES is) and zero-initialised.
        unsafe { &*self.base.as_ptr().add(HEADER_BYTES + slot as usize * META_BYTES).cast::<SlotMeta>() }
    }

    /// The number of slots.
    pub fn slots(&self) -> u32 {
        self.slots
    }

    /// Bytes per request or response.
    pub fn slot_bytes(&self) -> usize {
        self.slot_bytes
    }

    /// A slot's state word.
    pub fn state(&self, slot: u32) -> u32 {
        self.meta(slot).state.load(Ordering::Acquire)
    }

    fn cas(&self, slot: u32, from: u32, to: u32) -> bool {
        self.meta(slot).state.compare_exchange(from, to, Ordering::AcqRel, Ordering::Acquire).is_ok()
    }

    /// Raw pointer to half `half` (0 request, 1 response) of a slot.
    fn buffer(&self, slot: u32, half: usize) -> *mut u8 {
        let offset = self.data_offset + (slot as usize * 2 + half) * self.slot_bytes;
        debug_assert!(offset + self.slot_bytes <= self.len, "slot buffer past the region");
        // SAFETY: offset + slot_bytes <= len by construction of the geometry.
        unsafe { self.base.as_ptr().add(offset) }
    }

    /// Reserves a free slot for a new request of `len` bytes, starting the
    /// search at `hint`. A large request prefers a slot whose pages are still
    /// resident from an earlier one as large.
    pub fn reserve(self: &Arc<Self>, hint: u32, len: usize) -> Option<RequestWriter> {
        let order = || (0..self.slots).map(|i| (hint.wrapping_add(i)) % self.slots);
        let need = past_resident(len) as u64;
        let warm =
            || order().find(|&s| self.meta(s).warm[0].load(Ordering::Relaxed) >= need && self.cas(s, FREE, WRITING));
        let slot = if need > 0 { warm() } else { None };
        slot.or_else(|| order().find(|&s| self.cas(s, FREE, WRITING)))
            .map(|slot| RequestWriter { region: self.clone(), slot })
    }

    /// Claims the next submitted request for `worker_id`.
    pub fn claim(self: &Arc<Self>, worker_id: u64, hint: u32) -> Option<Claim> {
        let me = claimed_by(worker_id);
        (0..self.slots)
            .map(|i| (hint.wrapping_add(i)) % self.slots)
            .find(|&s| self.state(s) == SUBMITTED && self.cas(s, SUBMITTED, me))
            .map(|slot| Claim { region: self.clone(), slot })
    }

    /// Copies the response of a DONE slot out and frees the slot.
    pub fn take_response(&self, slot: u32) -> Option<Vec<u8>> {
        if self.state(slot) != DONE {
            return None;
        }
        let len = (self.meta(slot).response_len.load(Ordering::Acquire) as usize).min(self.slot_bytes);
        let mut out = vec![0u8; len];
        // SAFETY: the slot is DONE: the engine worker finished writing `len`
        // bytes (published by the Release store of DONE, observed above with
        // Acquire) and only this process frees it, so nobody writes it now.
        unsafe { std::ptr::copy_nonoverlapping(self.buffer(slot, 1), out.as_mut_ptr(), len) };
        let request_len = self.meta(slot).request_len.load(Ordering::Acquire) as usize;
        self.settle(slot, 0, Some(request_len));
        self.settle(slot, 1, Some(len));
        self.meta(slot).state.store(FREE, Ordering::Release);
        Some(out)
    }

    /// After a request or response of `used` bytes in a half (None: unknown,
    /// an engine died writing it), keeps its pages past [`RESIDENT_BYTES`]
    /// for the next large request while the warm budget allows, else gives
    /// them back, so slots as large as `MAX_REQUEST_BYTES` cost memory beyond
    /// the budget only while such a request is in flight. Call while owning the slot.
    fn settle(&self, slot: u32, half: usize, used: Option<usize>) {
        let warm = &self.meta(slot).warm[half];
        let kept = warm.load(Ordering::Relaxed);
        let Some(used) = used else {
            return self.shrink(slot, half, self.slot_bytes, kept);
        };
        let grow = (past_resident(used.min(self.slot_bytes)) as u64).saturating_sub(kept);
        let h = self.header();
        if grow == 0
            || h.warm_bytes
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
                    w.checked_add(grow).filter(|&t| t <= h.warm_budget)
                })
                .is_ok()
        {
            warm.store(kept + grow, Ordering::Relaxed);
        } else {
            self.shrink(slot, half, used, kept);
        }
    }

    /// Gives back the pages of a half past [`RESIDENT_BYTES`] (it held
    /// `used` bytes, and `kept` were counted as warm). Call while owning the slot.
    fn shrink(&self, slot: u32, half: usize, used: usize, kept: u64) {
        if kept > 0 {
            self.meta(slot).warm[half].store(0, Ordering::Relaxed);
            let _ = self
                .header()
                .warm_bytes
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| Some(w.saturating_sub(kept)));
        }
        let used = used.max(RESIDENT_BYTES + kept as usize).min(self.slot_bytes);
        if used <= RESIDENT_BYTES {
            return;
        }
        let start = self.data_offset + (slot as usize * 2 + half) * self.slot_bytes;
        let from = (start + RESIDENT_BYTES).next_multiple_of(PAGE);
        let to = (start + used).next_multiple_of(PAGE).min(start + self.slot_bytes) / PAGE * PAGE;
        if to <= from {
            return;
        }
        // SAFETY: [from, to) is page-aligned and inside this slot's half (checked
        // against the geometry above), which the caller owns (the slot is DONE and
        // only this process frees it), so no one reads or writes those pages now.
        // MADV_REMOVE frees the memfd's backing pages; the next touch sees zeros,
        // and every reader only reads the lengths a writer wrote first.
        let ptr = unsafe { self.base.add(from) };
        if let Err(e) =
            unsafe { nix::sys::mman::madvise(ptr.cast(), to - from, nix::sys::mman::MmapAdvise::MADV_REMOVE) }
        {
            tracing::debug!(slot, error = %e, "could not give back a large slot's pages");
        }
    }

    /// Puts a FAILED slot back in the queue (its request is intact).
    pub fn resubmit(&self, slot: u32) -> bool {
        let ok = self.cas(slot, FAILED, SUBMITTED);
        if ok {
            self.wake_engines();
        }
        ok
    }

    /// Takes back a request no engine claimed yet (SUBMITTED → FAILED) and wakes
    /// its waiter; false if an engine has it (or it moved on).
    pub fn withdraw(&self, slot: u32) -> bool {
        let ok = self.cas(slot, SUBMITTED, FAILED);
        if ok {
            self.bump_done();
        }
        ok
    }

    /// Frees a slot in `state` (a request given up); false if it moved on.
    pub fn release(&self, slot: u32, state: u32) -> bool {
        // Owned (WRITING) while its pages are settled: no engine takes it meanwhile.
        if state != WRITING && !self.cas(slot, state, WRITING) {
            return false;
        }
        // What each half holds: a request being written or a response an
        // engine died writing may have touched any page (None).
        let m = self.meta(slot);
        let request = (state != WRITING).then(|| m.request_len.load(Ordering::Acquire) as usize);
        let response = match state {
            DONE => Some(m.response_len.load(Ordering::Acquire) as usize),
            FAILED => None,
            _ => Some(0),
        };
        self.settle(slot, 0, request);
        self.settle(slot, 1, response);
        self.cas(slot, WRITING, FREE)
    }

    /// Bytes past [`RESIDENT_BYTES`] the slots keep resident now, all together.
    pub fn warm_bytes(&self) -> u64 {
        self.header().warm_bytes.load(Ordering::Acquire)
    }

    /// Fails every slot claimed by `worker_id` (it died) and forgets its
    /// watch; returns how many slots.
    pub fn fail_claims(&self, worker_id: u64) -> usize {
        // Left set, it would keep every submit from waking a claimer.
        self.header().engine_watching.fetch_and(!(1u64 << (worker_id % 64)), Ordering::SeqCst);
        let me = claimed_by(worker_id);
        let failed = (0..self.slots).filter(|&s| self.cas(s, me, FAILED)).count();
        if failed > 0 {
            self.bump_done();
        }
        failed
    }

    /// Frees every slot left by a previous HTTPS worker that nobody will
    /// collect; claimed slots are freed later, when their response arrives.
    pub fn reset_orphans(&self) -> usize {
        (0..self.slots)
            .filter(|&s| [WRITING, SUBMITTED, DONE, FAILED].into_iter().any(|st| self.release(s, st)))
            .count()
    }

    /// The submit counter engine workers wait on.
    pub fn work_seq(&self) -> u32 {
        self.header().work_seq.load(Ordering::SeqCst)
    }

    /// The completion counter the HTTPS worker waits on.
    pub fn done_seq(&self) -> u32 {
        self.header().done_seq.load(Ordering::SeqCst)
    }

    fn wake_engines(&self) {
        let h = self.header();
        h.work_seq.fetch_add(1, Ordering::SeqCst);
        // A watching claimer sees the bump, or (if it stopped first) finds the
        // slot on its next claim; it wakes a sleeper for a second request
        // that came while it watched ([`Region::wake_for_rest`]).
        if h.engine_watching.load(Ordering::SeqCst) == 0 && h.engine_sleepers.load(Ordering::SeqCst) > 0 {
            futex_wake(&h.work_seq, 1);
        }
    }

    /// After a watch that ended in work: wakes a sleeping claimer for each
    /// request waiting beyond the one this claimer takes (submits skipped the
    /// wake-up while it watched).
    pub fn wake_for_rest(&self) {
        let h = self.header();
        let waiting = (0..self.slots).filter(|&s| self.state(s) == SUBMITTED).count();
        if waiting > 1 && h.engine_sleepers.load(Ordering::SeqCst) > 0 {
            futex_wake(&h.work_seq, i32::try_from(waiting - 1).unwrap_or(i32::MAX));
        }
    }

    fn bump_done(&self) {
        let h = self.header();
        h.done_seq.fetch_add(1, Ordering::SeqCst);
        // A watcher sees the bump, or (if it stops first) sees it on leaving:
        // `DoneWatch::drop` and this are the two sides of one SeqCst pairing.
        if h.https_watchers.load(Ordering::SeqCst) == 0 && h.https_sleepers.load(Ordering::SeqCst) > 0 {
            futex_wake(&h.done_seq, i32::MAX);
        }
    }

    /// Marks a thread that watches `done_seq` itself, so completions skip
    /// waking the thread asleep in [`Region::wait_for_done`]. After the guard
    /// drops, the watcher must look at `done_seq` once more and deliver what
    /// changed: a completion that skipped the wake-up is visible by then.
    pub fn watch_done(&self) -> DoneWatch<'_> {
        self.header().https_watchers.fetch_add(1, Ordering::SeqCst);
        DoneWatch(self)
    }

    /// Watches for a completion after `seen` for up to `limit`, yielding the
    /// core meanwhile, while completions skip waking the thread asleep in
    /// [`Region::wait_for_done`]; true if one came. The counter is read once
    /// more after the watch ends, so a completion that skipped its wake-up is
    /// never missed.
    pub fn watch_for_done(&self, seen: u32, limit: Duration) -> bool {
        {
            let _watch = self.watch_done();
            yield_until_changed(&self.header().done_seq, seen, limit);
        }
        self.done_seq() != seen
    }

    /// Watches for a request submitted after `seen` for up to `limit`,
    /// yielding the core meanwhile, as engine worker `worker_id`'s one
    /// watcher; true if one came. Producers skip waking a sleeping claimer
    /// while it watches; the caller claims before it sleeps, and after work
    /// came calls [`Region::wake_for_rest`].
    pub fn watch_for_work(&self, worker_id: u64, seen: u32, limit: Duration) -> bool {
        let bit = 1u64 << (worker_id % 64);
        let h = self.header();
        h.engine_watching.fetch_or(bit, Ordering::SeqCst);
        yield_until_changed(&h.work_seq, seen, limit);
        h.engine_watching.fetch_and(!bit, Ordering::SeqCst);
        self.work_seq() != seen
    }

    /// Forgets the watches of an HTTPS worker that died mid-watch (call when
    /// the next one starts): left counted, they would keep every completion
    /// from waking the new worker's completion thread.
    pub fn reset_watchers(&self) {
        self.header().https_watchers.store(0, Ordering::SeqCst);
    }

    /// Sleeps until a request is submitted after `seen` was read, or `timeout`.
    pub fn wait_for_work(&self, seen: u32, timeout: Duration) {
        let h = self.header();
        sleep_on(&h.work_seq, &h.engine_sleepers, seen, timeout);
    }

    /// Sleeps until a slot completes after `seen` was read, or `timeout`.
    pub fn wait_for_done(&self, seen: u32, timeout: Duration) {
        let h = self.header();
        sleep_on(&h.done_seq, &h.https_sleepers, seen, timeout);
    }
}

/// A thread watching completions itself, from [`Region::watch_done`].
#[derive(Debug)]
pub struct DoneWatch<'a>(&'a Region);

impl Drop for DoneWatch<'_> {
    fn drop(&mut self) {
        // Never below zero (a reset may have come in between): a wrapped
        // count would stop every wake-up.
        let _ = self.0.header().https_watchers.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
    }
}

/// The producer's hold on a WRITING slot.
#[derive(Debug)]
pub struct RequestWriter {
    region: Arc<Region>,
    slot: u32,
}

impl RequestWriter {
    /// The slot number.
    pub fn slot(&self) -> u32 {
        self.slot
    }

    /// The request buffer, exclusively ours while the slot is WRITING.
    pub fn buf(&mut self) -> &mut [u8] {
        debug_assert_eq!(self.region.state(self.slot), WRITING, "writer without a WRITING slot");
        // SAFETY: we moved the slot FREE → WRITING with a CAS; no other party
        // touches a WRITING slot's buffers, and `&mut self` makes this borrow unique.
        unsafe { std::slice::from_raw_parts_mut(self.region.buffer(self.slot, 0), self.region.slot_bytes) }
    }

    /// Publishes `len` bytes as the request and wakes one engine worker.
    pub fn submit(self, len: usize) -> u32 {
        let m = self.region.meta(self.slot);
        m.request_len.store(len.min(self.region.slot_bytes) as u64, Ordering::Relaxed);
        m.state.store(SUBMITTED, Ordering::Release);
        self.region.wake_engines();
        let slot = self.slot;
        std::mem::forget(self);
        slot
    }
}

impl Drop for RequestWriter {
    fn drop(&mut self) {
        // Abandoned before submit (encoding failed): give the slot back.
        self.region.release(self.slot, WRITING);
    }
}

/// An engine worker's hold on a CLAIMED slot.
#[derive(Debug)]
pub struct Claim {
    region: Arc<Region>,
    slot: u32,
}

impl Claim {
    /// The slot number.
    pub fn slot(&self) -> u32 {
        self.slot
    }

    /// The request bytes.
    pub fn request(&self) -> &[u8] {
        let len =
            (self.region.meta(self.slot).request_len.load(Ordering::Relaxed) as usize).min(self.region.slot_bytes);
        // SAFETY: the slot is CLAIMED by us (CAS from SUBMITTED, whose Release
        // store published the request). The producer does not write a
        // submitted request, so reading it is race-free.
        unsafe { std::slice::from_raw_parts(self.region.buffer(self.slot, 0), len) }
    }

    /// The response buffer, exclusively ours while the slot is CLAIMED.
    pub fn response_buf(&mut self) -> &mut [u8] {
        // SAFETY: only the claimer writes the response half of a CLAIMED slot;
        // `&mut self` makes this borrow unique.
        unsafe { std::slice::from_raw_parts_mut(self.region.buffer(self.slot, 1), self.region.slot_bytes) }
    }

    /// Publishes `len` bytes as the response and wakes the HTTPS worker. If
    /// the supervisor already failed the slot (we were presumed dead), nothing changes.
    pub fn finish(self, len: usize) {
        let m = self.region.meta(self.slot);
        m.response_len.store(len.min(self.region.slot_bytes) as u64, Ordering::Relaxed);
        let mine = m.state.load(Ordering::Acquire);
        if mine & CLAIMED != 0 && self.region.cas(self.slot, mine, DONE) {
            self.region.bump_done();
        }
    }
}

/// Sleeps on `seq` while it still equals `seen`, registered in `sleepers` so wakers know to wake.
fn sleep_on(seq: &AtomicU32, sleepers: &AtomicU32, seen: u32, timeout: Duration) {
    sleepers.fetch_add(1, Ordering::SeqCst);
    if seq.load(Ordering::SeqCst) == seen {
        futex_wait(seq, seen, timeout);
    }
    sleepers.fetch_sub(1, Ordering::SeqCst);
}

fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs().min(i64::MAX as u64) as libc::time_t,
        tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
    };
    // SAFETY: FUTEX_WAIT (shared, not PRIVATE: the word lives in memory shared
    // between processes) reads the u32 at a valid, aligned address inside our
    // mapping, and `ts` outlives the call. Spurious returns are fine: callers
    // re-check their condition.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
            0usize,
            0u32,
        );
    }
}

/// Yields the core until `word` moves from `seen` or `limit` passes.
fn yield_until_changed(word: &AtomicU32, seen: u32, limit: Duration) {
    let until = Instant::now() + limit;
    while word.load(Ordering::SeqCst) == seen && Instant::now() < until {
        std::thread::yield_now();
    }
}

/// Page-rounded bytes of `len` past [`RESIDENT_BYTES`].
fn past_resident(len: usize) -> usize {
    len.next_multiple_of(PAGE).saturating_sub(RESIDENT_BYTES)
}

fn futex_wake(word: &AtomicU32, n: i32) {
    // SAFETY: FUTEX_WAKE only uses the address as a key; it is valid and aligned.
    unsafe {
        libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, n, 0usize, 0usize, 0u32);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly by design")]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::sync::Mutex;
    use std::time::Instant;

    #[test]
    fn one_round_trip_and_states() {
        let (r, fd) = Region::create(4, 1024, 0).expect("create");
        let other = Region::open(&fd, 4, 1024).expect("open");
        let mut w = r.reserve(0, 0).expect("free slot");
        w.buf()[..5].copy_from_slice(b"hello");
        let slot = w.submit(5);
        assert_eq!(other.state(slot), SUBMITTED);
        let mut c = other.claim(7, 0).expect("claim");
        assert_eq!(c.request(), b"hello");
        assert_eq!(r.state(slot), claimed_by(7));
        c.response_buf()[..3].copy_from_slice(b"bye");
        c.finish(3);
        assert_eq!(r.take_response(slot).expect("done"), b"bye");
        assert_eq!(r.state(slot), FREE);
        assert!(Region::open(&fd, 5, 1024).is_err(), "geometry mismatch must be refused");
    }

    #[test]
    fn a_large_round_trip_gives_its_pages_back() {
        let slot_bytes = 8 << 20;
        let (r, fd) = Region::create(2, slot_bytes, 0).expect("create");
        let allocated = || nix::sys::stat::fstat(&fd).expect("fstat").st_blocks as usize * 512;
        let mut w = r.reserve(0, 0).expect("slot");
        w.buf()[..6 << 20].fill(7);
        let slot = w.submit(6 << 20);
        let mut c = r.claim(1, 0).expect("claim");
        assert!(c.request().iter().all(|&b| b == 7));
        c.response_buf()[..5 << 20].fill(9);
        c.finish(5 << 20);
        assert!(allocated() >= 11 << 20, "both halves were touched: {}", allocated());
        let response = r.take_response(slot).expect("done");
        assert_eq!(response.len(), 5 << 20);
        assert!(response.iter().all(|&b| b == 9));
        assert!(allocated() <= 3 << 20, "pages past RESIDENT_BYTES were kept: {}", allocated());
        // The slot still works, and what it carries next is intact.
        let mut w = r.reserve(slot, 0).expect("slot");
        w.buf()[..3 << 20].fill(5);
        let slot = w.submit(3 << 20);
        let c = r.claim(1, slot).expect("claim");
        assert!(c.request()[..3 << 20].iter().all(|&b| b == 5));
    }

    #[test]
    fn large_requests_reuse_warm_slots_within_the_budget() {
        let slot_bytes = 8 << 20;
        let (r, fd) = Region::create(4, slot_bytes, 6 << 20).expect("create");
        let allocated = || nix::sys::stat::fstat(&fd).expect("fstat").st_blocks as usize * 512;
        let round_trip = |hint: u32, len: usize| {
            let mut w = r.reserve(hint, len).expect("slot");
            w.buf()[..len].fill(3);
            let slot = w.submit(len);
            let mut c = r.claim(1, slot).expect("claim");
            assert!(c.request().iter().all(|&b| b == 3), "the request arrives intact");
            c.response_buf()[..10].fill(4);
            c.finish(10);
            assert_eq!(r.take_response(slot).expect("done"), [4; 10]);
            slot
        };
        // 5 MiB: 4 MiB past the first is kept (within the 6 MiB budget).
        let warm = round_trip(0, 5 << 20);
        assert_eq!(r.warm_bytes(), 4 << 20);
        // The next large request, hinted elsewhere, takes the warm slot: nothing more is kept or faulted.
        assert_eq!(round_trip(warm + 1, 5 << 20), warm, "a large request prefers the warm slot");
        assert_eq!(r.warm_bytes(), 4 << 20);
        // A small one does not need it and takes the hinted slot.
        assert_eq!(round_trip(warm + 1, 100), warm + 1);
        // Two large ones at once: the second slot would pass the budget, so its pages go back.
        let mut a = r.reserve(0, 5 << 20).expect("a");
        assert_eq!(a.slot(), warm);
        let mut b = r.reserve(0, 5 << 20).expect("b");
        a.buf()[..5 << 20].fill(1);
        b.buf()[..5 << 20].fill(1);
        let (sa, sb) = (a.submit(5 << 20), b.submit(5 << 20));
        for s in [sa, sb] {
            r.claim(1, s).expect("claim").finish(0);
            r.take_response(s).expect("done");
        }
        assert_eq!(r.warm_bytes(), 4 << 20, "the budget holds");
        assert!(
            allocated() <= (4 << 20) + 4 * (1 << 20) + (64 << 10),
            "only the warm slot keeps pages: {}",
            allocated()
        );
        // An engine died writing a large response: its request stays warm,
        // and the response half, whose extent is unknown, gives its pages back.
        let mut w = r.reserve(0, 5 << 20).expect("slot");
        assert_eq!(w.slot(), warm);
        w.buf()[..5 << 20].fill(2);
        let s = w.submit(5 << 20);
        let mut dying = r.claim(9, s).expect("claim");
        dying.response_buf()[..6 << 20].fill(8);
        assert_eq!(r.fail_claims(9), 1);
        assert!(r.release(s, FAILED));
        assert_eq!(r.warm_bytes(), 4 << 20);
        assert!(
            allocated() <= (4 << 20) + 4 * (1 << 20) + (64 << 10),
            "the failed response's pages were kept: {}",
            allocated()
        );
    }

    /// One request through the ring, answered: `done_seq` is bumped once.
    fn answer_one(r: &Arc<Region>) {
        let slot = r.reserve(0, 0).expect("slot").submit(0);
        r.claim(1, slot).expect("claim").finish(0);
        r.take_response(slot).expect("done");
    }

    #[test]
    fn a_watch_keeps_completions_from_waking_the_sleeper_and_shows_them_after() {
        let (r, _fd) = Region::create(4, 64, 0).expect("create");
        let woke = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            let seen = r.done_seq();
            s.spawn(|| {
                r.wait_for_done(r.done_seq(), Duration::from_secs(5));
                woke.store(true, Ordering::SeqCst);
            });
            while r.header().https_sleepers.load(Ordering::SeqCst) == 0 {
                std::thread::yield_now();
            }
            // Registered; give it time to be inside FUTEX_WAIT.
            std::thread::sleep(Duration::from_millis(50));
            let watch = r.watch_done();
            answer_one(&r);
            std::thread::sleep(Duration::from_millis(300));
            assert!(!woke.load(Ordering::SeqCst), "a completion during a watch woke the sleeper");
            drop(watch);
            assert_ne!(r.done_seq(), seen, "the completion is visible once the watch ends");
            // Without a watch, the next completion wakes it.
            answer_one(&r);
            let deadline = Instant::now() + Duration::from_secs(4);
            while !woke.load(Ordering::SeqCst) {
                assert!(Instant::now() < deadline, "the sleeper was not woken");
                std::thread::yield_now();
            }
        });
    }

    #[test]
    fn a_claimer_watching_keeps_submits_from_waking_sleepers_and_the_rest_wakes_them() {
        let (r, _fd) = Region::create(4, 64, 0).expect("create");
        let woke = AtomicU32::new(0);
        std::thread::scope(|s| {
            for _ in 0..2 {
                s.spawn(|| {
                    r.wait_for_work(r.work_seq(), Duration::from_secs(5));
                    woke.fetch_add(1, Ordering::SeqCst);
                });
            }
            while r.header().engine_sleepers.load(Ordering::SeqCst) < 2 {
                std::thread::yield_now();
            }
            // Registered; give them time to be inside FUTEX_WAIT.
            std::thread::sleep(Duration::from_millis(50));
            // Engine 7 watches while three requests come: nobody is woken.
            let seen = r.work_seq();
            let rr = &r;
            let watcher = s.spawn(move || rr.watch_for_work(7, seen, Duration::from_secs(2)));
            while r.header().engine_watching.load(Ordering::SeqCst) == 0 {
                std::thread::yield_now();
            }
            for _ in 0..3 {
                r.reserve(0, 0).expect("slot").submit(0);
            }
            assert!(watcher.join().unwrap(), "the watcher saw the submits");
            std::thread::sleep(Duration::from_millis(300));
            assert_eq!(woke.load(Ordering::SeqCst), 0, "a submit during a watch woke a sleeper");
            // The watcher wakes a sleeper for each request past the one it takes.
            r.wake_for_rest();
            r.claim(7, 0).expect("claim");
            let deadline = Instant::now() + Duration::from_secs(4);
            while woke.load(Ordering::SeqCst) < 2 {
                assert!(Instant::now() < deadline, "the sleepers were not woken for the rest");
                std::thread::yield_now();
            }
        });
        // A worker that died mid-watch leaves no bit behind to silence submits.
        r.header().engine_watching.fetch_or(1 << 9, Ordering::SeqCst);
        r.fail_claims(9);
        assert_eq!(r.header().engine_watching.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_dead_watcher_is_forgotten_and_the_count_never_wraps() {
        let (r, _fd) = Region::create(2, 64, 0).expect("create");
        std::mem::forget(r.watch_done());
        r.reset_watchers();
        drop(r.watch_done());
        let late = r.watch_done();
        r.reset_watchers();
        drop(late);
        assert_eq!(r.header().https_watchers.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn full_queue_and_dropped_writer() {
        let (r, _fd) = Region::create(2, 64, 0).expect("create");
        let a = r.reserve(0, 0).expect("a");
        let _b = r.reserve(0, 0).expect("b");
        assert!(r.reserve(0, 0).is_none(), "queue is full");
        drop(a);
        assert!(r.reserve(0, 0).is_some(), "a dropped writer frees its slot");
    }

    #[test]
    fn dead_worker_claims_fail_and_resubmit() {
        let (r, _fd) = Region::create(4, 64, 0).expect("create");
        let slot = r.reserve(0, 0).expect("w").submit(0);
        let c = r.claim(3, 0).expect("claim");
        assert_eq!(r.fail_claims(2), 0);
        assert_eq!(r.fail_claims(3), 1);
        assert_eq!(r.state(slot), FAILED);
        c.finish(0); // a late finish from the "dead" worker changes nothing
        assert_eq!(r.state(slot), FAILED);
        assert!(r.resubmit(slot));
        assert!(r.claim(4, 0).is_some());
    }

    /// Producers and consumers in threads: every request is answered exactly once.
    #[test]
    fn concurrent_producers_and_consumers() {
        let (r, _fd) = Region::create(8, 256, 0).expect("create");
        let total = 4 * 500u32;
        let answered = Arc::new(Mutex::new(HashSet::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        std::thread::scope(|s| {
            for worker in 0..3u64 {
                let (r, stop) = (r.clone(), stop.clone());
                s.spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let seen = r.work_seq();
                        match r.claim(worker + 1, worker as u32) {
                            Some(mut c) => {
                                let req = c.request().to_vec();
                                let n = req.len();
                                c.response_buf()[..n].copy_from_slice(&req);
                                c.finish(n);
                            }
                            None => r.wait_for_work(seen, Duration::from_millis(20)),
                        }
                    }
                });
            }
            let producers: Vec<_> = (0..4u32)
                .map(|p| {
                    let (r, answered) = (r.clone(), answered.clone());
                    s.spawn(move || {
                        for i in 0..500u32 {
                            let id = p * 1000 + i;
                            let deadline = Instant::now() + Duration::from_secs(10);
                            let slot = loop {
                                if let Some(mut w) = r.reserve(id, 0) {
                                    w.buf()[..4].copy_from_slice(&id.to_le_bytes());
                                    break w.submit(4);
                                }
                                assert!(Instant::now() < deadline, "no free slot for 10 s");
                                std::thread::yield_now();
                            };
                            loop {
                                let seen = r.done_seq();
                                if let Some(resp) = r.take_response(slot) {
                                    assert_eq!(resp, id.to_le_bytes(), "answer belongs to another request");
                                    assert!(answered.lock().expect("lock").insert(id), "answered twice");
                                    break;
                                }
                                assert!(Instant::now() < deadline, "request {id} never answered");
                                r.wait_for_done(seen, Duration::from_millis(20));
                            }
                        }
                    })
                })
                .collect();
            for p in producers {
                p.join().expect("producer");
            }
            stop.store(true, Ordering::Relaxed);
        });
        assert_eq!(answered.lock().expect("lock").len() as u32, total);
    }
}
