//! The only module with `unsafe`: adopting file descriptors handed down by the
//! supervisor, listening backlogs, the C allocator's thresholds, the
//! shared-memory ring ([`shm`]) and the statistics region ([`counters`]).
//!
//! Workers receive their listener (LISTEN_FDS convention, from fd 3) and their
//! control socket at fixed descriptor numbers. Taking ownership of a raw
//! descriptor is `unsafe` because nothing else may own or close it.

#![allow(unsafe_code, reason = "inherited descriptors, mallopt and shared memory; every block says why it is sound")]

pub mod counters;
pub mod shm;

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use nix::fcntl::{fcntl, FcntlArg, FdFlag};

/// First descriptor of the LISTEN_FDS convention.
pub const LISTEN_FDS_START: RawFd = 3;

/// Takes ownership of an inherited descriptor, after checking it is open, and
/// marks it close-on-exec so it does not leak into anything the worker runs.
///
/// Call at most once per descriptor number, early in the worker's `main`.
pub fn adopt_fd(fd: RawFd) -> io::Result<OwnedFd> {
    debug_assert!(fd >= LISTEN_FDS_START, "descriptor {fd} is one of stdin/stdout/stderr");
    if fd < LISTEN_FDS_START {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("descriptor {fd} is reserved for stdio")));
    }
    if std::fs::symlink_metadata(format!("/proc/self/fd/{fd}")).is_err() {
        return Err(io::Error::new(io::ErrorKind::NotFound, format!("descriptor {fd} was not inherited")));
    }
    // SAFETY: /proc says the descriptor is open, and nothing closes it while
    // this borrow lives (we are its only user, early in the worker's start).
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    fcntl(borrowed, FcntlArg::F_GETFD).map_err(io::Error::from)?;
    fcntl(borrowed, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).map_err(io::Error::from)?;
    // SAFETY: the descriptor is open (checked above) and was handed to this
    // process by the supervisor for this purpose only; nothing else in the
    // worker refers to this number, so the returned OwnedFd is its sole owner.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A duplicate of `fd` at the lowest free number at or above `min`, closed on
/// exec: a descriptor out of the way of the low numbers children are given.
pub fn dup_above(fd: std::os::fd::BorrowedFd<'_>, min: RawFd) -> io::Result<OwnedFd> {
    let new = fcntl(fd, FcntlArg::F_DUPFD_CLOEXEC(min)).map_err(io::Error::from)?;
    // SAFETY: fcntl(F_DUPFD_CLOEXEC) just returned this new descriptor; no
    // one else knows its number, so the OwnedFd is its sole owner.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// [`dup_above`], but kept open across exec: for handing a descriptor to the
/// program this process is about to become.
pub fn dup_inheritable_above(fd: std::os::fd::BorrowedFd<'_>, min: RawFd) -> io::Result<OwnedFd> {
    let new = fcntl(fd, FcntlArg::F_DUPFD(min)).map_err(io::Error::from)?;
    // SAFETY: fcntl(F_DUPFD) just returned this new descriptor; no one else
    // knows its number, so the OwnedFd is its sole owner.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// Connections the kernel queues for a listener before it refuses new ones
/// (capped by `net.core.somaxconn`). Rust's standard library listens with 128,
/// which a burst of new connections overflows (the client then waits a second
/// to resend its SYN); nginx uses 511, Go the system's maximum.
pub const LISTEN_BACKLOG: i32 = 4096;

/// Gives a listening socket the supervisor bound a deeper accept queue
/// ([`LISTEN_BACKLOG`]); a second listen(2) on a listening socket changes only that.
pub fn deepen_backlog(listener: &std::net::TcpListener) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: listen(2) takes a descriptor borrowed from a live TcpListener and an integer.
    if unsafe { libc::listen(listener.as_raw_fd(), LISTEN_BACKLOG) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Keeps large buffers (request bodies, tensors: up to 32 MiB each) in the heap
/// instead of mapping and unmapping them per request. By default glibc maps
/// big allocations and returns them on free, so every request paid page faults
/// on fresh memory for its body and tensors: 22 ms of a 10 MB detector request
/// became 16.5 ms with this. Up to `keep` bytes of freed memory stay with the
/// process for the next requests, as an inference server's pools do; past
/// that, [`give_back_freed_memory`] returns it to the kernel, so what the
/// allocator keeps is bounded like what requests hold (the worker's
/// `MAX_INFLIGHT_BYTES`). A no-op with other C libraries.
pub fn keep_large_allocations(keep: u64) {
    #[cfg(target_env = "gnu")]
    {
        KEEP_FREED.store(keep.max(1), std::sync::atomic::Ordering::Relaxed);
        // 32 MiB is glibc's largest mmap threshold on 64-bit; the heap's top
        // is trimmed past the keep (at most 256 MiB).
        let trim = keep.clamp(1 << 20, 256 << 20) as libc::c_int;
        // SAFETY: mallopt only changes allocator parameters; it is called once at
        // start-up before the worker's threads exist, and takes plain integers.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, trim);
        }
    }
    #[cfg(not(target_env = "gnu"))]
    let _ = keep;
}

/// Freed memory the allocator may keep ([`keep_large_allocations`]); 0 when not set.
static KEEP_FREED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Whether this process bounds the freed memory it keeps: only then has
/// [`give_back_freed_memory`] anything to do (not in the proxy worker, nor
/// with another C library).
pub fn bounds_freed_memory() -> bool {
    cfg!(target_env = "gnu") && KEEP_FREED.load(std::sync::atomic::Ordering::Relaxed) != 0
}

/// When the allocator holds more freed memory than [`keep_large_allocations`]
/// allows, gives its free pages back to the kernel (every arena's, the middle
/// of its heaps too) and returns how much it held. Takes the arenas' locks
/// for a moment and, when it trims, costs the next large request its page
/// faults: call it after a large body is given back, off the serving threads.
pub fn give_back_freed_memory() -> Option<u64> {
    #[cfg(target_env = "gnu")]
    {
        let keep = KEEP_FREED.load(std::sync::atomic::Ordering::Relaxed);
        if keep == 0 {
            return None;
        }
        // SAFETY: mallinfo2 takes no arguments and reads the allocator's
        // statistics under the allocator's own locks.
        let free = unsafe { libc::mallinfo2() }.fordblks as u64;
        if free <= keep {
            return None;
        }
        // SAFETY: malloc_trim takes a plain integer and releases only free
        // pages, under the allocator's own locks; no live allocation moves.
        unsafe { libc::malloc_trim(0) };
        Some(free)
    }
    #[cfg(not(target_env = "gnu"))]
    None
}

/// Makes a command's process receive `signal` when the thread that spawned it
/// (the supervisor's) dies, so a `WORKER_COMMAND` copy never outlives a
/// supervisor that was killed outright. Runs between fork and exec.
pub fn die_with_parent(cmd: &mut std::process::Command, signal: nix::sys::signal::Signal) {
    use std::os::unix::process::CommandExt;
    let parent = nix::unistd::getpid();
    // SAFETY: the closure runs in the forked child before exec; it only calls
    // prctl(2) and getppid(2), which are async-signal-safe, allocates nothing
    // and touches no lock. Checking the parent closes the race where the
    // supervisor died between fork and prctl.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(signal).map_err(io::Error::from)?;
            if nix::unistd::getppid() != parent {
                return Err(io::Error::other("the supervisor exited while the worker started"));
            }
            Ok(())
        });
    }
}

/// The version ONNX Runtime's library at `path` reports of itself
/// (`OrtGetApiBase()->GetVersionString()`, e.g. `1.31.1`), whatever its file
/// is named; `None` when it is not an ONNX Runtime library.
pub fn ort_version(path: &std::path::Path) -> Option<String> {
    /// The first members of ONNX Runtime's `OrtApiBase` (a stable C ABI since 1.0).
    #[repr(C)]
    struct OrtApiBase {
        get_api: unsafe extern "C" fn(u32) -> *const std::ffi::c_void,
        get_version_string: unsafe extern "C" fn() -> *const std::ffi::c_char,
    }
    // SAFETY: loading runs the library's initialisers; the caller names a file
    // it is about to load anyway (the engine probe, which runs in a child
    // process so that a broken library cannot take the supervisor down).
    let lib = unsafe { libloading::Library::new(path) }.ok()?;
    // SAFETY: `OrtGetApiBase` is declared by ONNX Runtime's C API as
    // `const OrtApiBase* ORT_API_CALL OrtGetApiBase(void)`: no argument, a pointer back.
    let get_base = unsafe { lib.get::<unsafe extern "C" fn() -> *const OrtApiBase>(b"OrtGetApiBase\0") }.ok()?;
    // SAFETY: the function takes nothing and returns a pointer to a static
    // table that lives as long as the library, which `lib` keeps loaded here.
    let base = unsafe { get_base() };
    if base.is_null() {
        return None;
    }
    // SAFETY: `base` is non-null and points at the library's static
    // `OrtApiBase`, whose second member is `GetVersionString`, returning a
    // static NUL-terminated string.
    let text = unsafe { std::ffi::CStr::from_ptr(((*base).get_version_string)()) };
    let version = text.to_str().ok()?.trim().to_string();
    (!version.is_empty()).then_some(version)
}
