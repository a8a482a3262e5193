//! Triton's system shared-memory extension, the parts every process agrees
//! on: what a registered region is, the changes a client asks for, the
//! checks on names and keys, and how an object is opened (one name under
//! `/dev/shm`, a regular file, never through a link). The supervisor keeps the registry (so it
//! outlives any engine worker); each engine worker opens the regions it is
//! told of (`tandem_engine_worker::system_shm`).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use nix::fcntl::OFlag;
use serde::{Deserialize, Serialize};

/// Where POSIX shared-memory objects live on Linux.
pub const SHM_DIR: &str = "/dev/shm";

/// Most regions registered at once.
pub const MAX_REGIONS: usize = 256;

/// Longest region name and key, in bytes (a key is one file name under `/dev/shm`).
pub const MAX_NAME_BYTES: usize = 255;

/// A region a client registered: `byte_size` bytes from `offset` of the
/// POSIX shared-memory object `key`, called `name` in inference requests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Region {
    /// The name requests use.
    pub name: String,
    /// The object's POSIX name (`/input_data`), a file under `/dev/shm`.
    pub key: String,
    /// Where the region starts in the object.
    pub offset: u64,
    /// Its length.
    pub byte_size: u64,
}

/// Every registered region, numbered: each change gets the next number, so
/// a worker can say which state it has applied.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionSet {
    /// The number of the last change.
    pub generation: u64,
    /// The regions, in name order.
    pub regions: Vec<Region>,
}

/// What a client asks of the registry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Change {
    /// Add a region (its name must be free).
    Register(Region),
    /// Remove one region, or every region (`None`).
    Unregister {
        /// The region.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
}

/// Why a region name cannot be used.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME_BYTES || name.chars().any(char::is_control) {
        return Err(format!(
            "a shared-memory region name is 1-{MAX_NAME_BYTES} bytes of printable characters, not {name:?}"
        ));
    }
    Ok(())
}

/// The file name under `/dev/shm` that POSIX key `key` names: one leading
/// `/` allowed, then one path component (no other `/`, not `.` or `..`, no
/// control characters). Nothing else is ever opened.
pub fn key_file(key: &str) -> Result<&str, String> {
    let file = key.strip_prefix('/').unwrap_or(key);
    let ok = !file.is_empty()
        && file.len() <= MAX_NAME_BYTES
        && file != "."
        && file != ".."
        && !file.contains(['/', '\0'])
        && !file.chars().any(char::is_control);
    if !ok {
        return Err(format!(
            "shared-memory key {key:?} is not a POSIX shared-memory name: one name under /dev/shm \
             (\"/name\", at most {MAX_NAME_BYTES} bytes, no other '/', not . or ..)"
        ));
    }
    Ok(file)
}

/// Opens the object `key` names, read and write, as a regular file under `/dev/shm`.
pub fn open(key: &str) -> Result<File, String> {
    let name = key_file(key)?;
    let path = Path::new(SHM_DIR).join(name);
    // A device, a FIFO or a socket someone put there is never opened (opening
    // one can act); what is opened is checked to be what was looked at.
    let seen = match std::fs::symlink_metadata(&path) {
        Ok(m) if m.file_type().is_file() => Some(m),
        Ok(m) if m.file_type().is_symlink() => None,
        Ok(_) => return Err(format!("{} is not a shared-memory object (not a regular file)", path.display())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(format!("no shared-memory object {key:?} ({} does not exist)", path.display()))
        }
        Err(e) => return Err(format!("cannot inspect {}: {e}", path.display())),
    };
    let flags = OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_NOCTTY;
    let file =
        OpenOptions::new().read(true).write(true).custom_flags(flags.bits()).open(&path).map_err(|e| {
            match (e.kind(), e.raw_os_error()) {
                (io::ErrorKind::NotFound, _) => {
                    format!("no shared-memory object {key:?} ({} does not exist)", path.display())
                }
                (_, Some(code)) if code == nix::errno::Errno::ELOOP as i32 => {
                    format!("{} is a symbolic link; tandem opens only shared-memory objects themselves", path.display())
                }
                _ => format!("cannot open shared-memory object {key:?} ({}): {e}", path.display()),
            }
        })?;
    let meta = file.metadata().map_err(|e| format!("cannot inspect {}: {e}", path.display()))?;
    use std::os::unix::fs::MetadataExt;
    let same = seen.is_some_and(|s| (s.dev(), s.ino()) == (meta.dev(), meta.ino()));
    if !meta.file_type().is_file() || !same {
        return Err(format!("{} is not a shared-memory object (not a regular file)", path.display()));
    }
    Ok(file)
}

/// Where `[offset, offset + len)` of a region of `byte_size` bytes starting at
/// `base` in its object lies in the object, or why it does not fit.
pub fn span(region: &Region, offset: u64, len: u64) -> Result<u64, String> {
    match offset.checked_add(len) {
        Some(end) if end <= region.byte_size => region
            .offset
            .checked_add(offset)
            .ok_or_else(|| format!("shared-memory region {:?}: offset {offset} overflows", region.name)),
        _ => Err(format!(
            "shared-memory region {:?} holds {} bytes; {len} bytes at offset {offset} do not fit",
            region.name, region.byte_size
        )),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly by design")]
mod tests {
    use super::*;

    #[test]
    fn keys_name_one_file_under_dev_shm() {
        assert_eq!(key_file("/input_data"), Ok("input_data"));
        assert_eq!(key_file("output0"), Ok("output0"));
        for bad in ["", "/", "//x", "/../etc/passwd", "/a/b", "..", "/.", "/x\n", "/x\0y"] {
            assert!(key_file(bad).is_err(), "{bad:?} was accepted");
        }
        assert!(key_file(&format!("/{}", "k".repeat(256))).is_err());
        assert!(check_name("").is_err() && check_name("a\tb").is_err() && check_name("input 0").is_ok());
    }

    #[test]
    fn only_objects_under_dev_shm_open() {
        let name = format!("tandem-link-{}", std::process::id());
        let link = Path::new(SHM_DIR).join(&name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink("/etc/hostname", &link).expect("symlink");
        let _cleanup = Removed(link);
        assert!(open(&format!("/{name}")).unwrap_err().contains("symbolic link"));
        assert!(open("/../../etc/passwd").is_err());
        assert!(open("/nonexistent-tandem-object").unwrap_err().contains("does not exist"));
    }

    struct Removed(std::path::PathBuf);
    impl Drop for Removed {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    #[test]
    fn spans_stay_inside_the_region() {
        let r = Region { name: "r".into(), key: "/k".into(), offset: 100, byte_size: 64 };
        assert_eq!(span(&r, 0, 64), Ok(100));
        assert_eq!(span(&r, 60, 4), Ok(160));
        assert!(span(&r, 60, 5).is_err());
        assert!(span(&r, u64::MAX, 2).is_err());
        let far = Region { offset: u64::MAX, ..r };
        assert!(span(&far, 1, 1).is_err());
    }
}
