//! The Triton model repository on disk: one folder per model, numeric version
//! folders below it, a version policy choosing which of them to load. Every
//! folder that cannot be served is reported by name, never skipped silently.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::config::{self, pb, ConfigError, LoadedConfig};

/// One model folder as found on disk.
#[derive(Debug)]
pub struct ModelDir {
    /// Model name (the folder name).
    pub name: String,
    /// The folder.
    pub dir: PathBuf,
    /// Its configuration, or why it cannot be used.
    pub config: Result<LoadedConfig, FolderError>,
}

/// A version chosen by the policy: its model file, or why it cannot be loaded.
pub type Chosen = BTreeMap<u64, Result<PathBuf, VersionError>>;

/// Why a model folder cannot be served at all.
#[derive(Debug, thiserror::Error)]
pub enum FolderError {
    /// Its configuration cannot be read or is not valid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The configuration names another model than its folder.
    #[error("{file}: names the model {named:?} but its folder is {folder:?}")]
    NameMismatch {
        /// The configuration file (or the folder, for a load request's configuration).
        file: PathBuf,
        /// The name it gives.
        named: String,
        /// The folder's name.
        folder: String,
    },
    /// The folder cannot be listed.
    #[error("cannot list {dir}: {source}")]
    Unlisted {
        /// The folder.
        dir: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The folder has no numeric version folder.
    #[error("{dir} has no version folder (expected {dir}/<version number>/{file})")]
    NoVersions {
        /// The folder.
        dir: PathBuf,
        /// The model file name expected in a version folder, escaped.
        file: String,
    },
}

/// Why one version chosen by the policy has no model file to load.
#[derive(Debug, thiserror::Error)]
pub enum VersionError {
    /// The policy lists a version that has no folder.
    #[error("version {version} is listed in version_policy but {dir}/{version} does not exist")]
    Missing {
        /// The version.
        version: u64,
        /// The model folder.
        dir: PathBuf,
    },
    /// The model file the configuration names cannot be used.
    #[error("{dir}: {source}")]
    File {
        /// The version folder.
        dir: PathBuf,
        /// Why.
        source: FileError,
    },
}

/// Lists the model folders of `repository`, sorted by name (hidden entries skipped).
pub fn scan(repository: &Path) -> std::io::Result<Vec<ModelDir>> {
    let mut dirs: Vec<PathBuf> =
        std::fs::read_dir(repository)?.filter_map(Result::ok).map(|e| e.path()).filter(|p| p.is_dir()).collect();
    dirs.sort();
    Ok(dirs.into_iter().filter_map(|dir| model_dir(dir, None)).collect())
}

/// The names of the model folders in `repository` now (hidden ones left out);
/// empty when it cannot be read.
pub fn folder_names(repository: &Path) -> std::collections::BTreeSet<String> {
    let Ok(entries) = std::fs::read_dir(repository) else { return Default::default() };
    entries
        .filter_map(Result::ok)
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| !n.starts_with('.'))
        .collect()
}

/// The folder of model `name` in `repository`, read with `config` (a JSON
/// `ModelConfig`, as Triton's load request carries it) in place of its files
/// when given. `None` when there is no such folder or the name is not a plain folder name.
pub fn find(repository: &Path, name: &str, config: Option<&str>) -> Option<ModelDir> {
    let plain = !name.is_empty() && !name.starts_with('.') && !name.contains(['/', '\\', '\0']);
    let dir = repository.join(name);
    (plain && dir.is_dir()).then(|| model_dir(dir, config)).flatten()
}

fn model_dir(dir: PathBuf, override_config: Option<&str>) -> Option<ModelDir> {
    let name = dir.file_name()?.to_str()?.to_string();
    if name.starts_with('.') {
        return None;
    }
    let read = match override_config {
        Some(text) => config::parse(Path::new("load request config.json"), text),
        None => config::read(&dir),
    };
    let config = read.map_err(FolderError::from).and_then(|c| {
        if !c.config.name.is_empty() && c.config.name != name {
            return Err(FolderError::NameMismatch {
                file: c.file.clone().unwrap_or_else(|| dir.clone()),
                named: c.config.name.clone(),
                folder: name.clone(),
            });
        }
        Ok(c)
    });
    Some(ModelDir { name, dir, config })
}

/// The versions `config`'s policy selects in `dir`, each with its model file or the reason it has none.
/// An error means the model has no version folder at all. Model files are
/// confined to their version folder ([`confined_file`]).
pub fn versions(dir: &Path, config: &pb::ModelConfig) -> Result<Chosen, FolderError> {
    let mut found: BTreeMap<u64, PathBuf> = BTreeMap::new();
    let listing = std::fs::read_dir(dir).map_err(|source| FolderError::Unlisted { dir: dir.to_path_buf(), source })?;
    for entry in listing.flatten() {
        let path = entry.path();
        let number = path.file_name().and_then(|n| n.to_str()).and_then(|n| n.parse::<u64>().ok());
        if let (Some(n), true) = (number, path.is_dir()) {
            found.insert(n, path);
        }
    }
    let file_name = model_filename(config);
    if found.is_empty() {
        return Err(FolderError::NoVersions { dir: dir.to_path_buf(), file: file_name.escape_debug().to_string() });
    }
    use pb::model_version_policy::PolicyChoice;
    let wanted: Vec<u64> = match config.version_policy.as_ref().and_then(|p| p.policy_choice.as_ref()) {
        Some(PolicyChoice::All(_)) => found.keys().copied().collect(),
        Some(PolicyChoice::Specific(s)) => s.versions.iter().filter_map(|&v| u64::try_from(v).ok()).collect(),
        Some(PolicyChoice::Latest(l)) => found.keys().rev().take(l.num_versions.max(1) as usize).copied().collect(),
        None => found.keys().next_back().copied().into_iter().collect(),
    };
    Ok(wanted
        .into_iter()
        .map(|v| {
            let chosen = match found.get(&v) {
                None => Err(VersionError::Missing { version: v, dir: dir.to_path_buf() }),
                Some(vdir) => confined_file(vdir, "default_model_filename", file_name, "version folder")
                    .map_err(|source| VersionError::File { dir: vdir.clone(), source }),
            };
            (v, chosen)
        })
        .collect())
}

/// The model file name in each version folder (`default_model_filename`, else `model.onnx`).
pub fn model_filename(config: &pb::ModelConfig) -> &str {
    if config.default_model_filename.is_empty() {
        "model.onnx"
    } else {
        &config.default_model_filename
    }
}

/// Why a file a configuration names cannot be used. The words never say
/// whether something exists outside the model's folder.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// Absolute, `..`, a symlink leading out, not a regular file: all the same answer.
    #[error("{field} {value:?} must name a regular file inside the model's {within} (a relative path, no \"..\", no symlink leading out)")]
    Outside {
        /// The configuration field.
        field: &'static str,
        /// Its value, escaped.
        value: String,
        /// "folder" or "version folder".
        within: &'static str,
    },
    /// The model's folder itself cannot be resolved.
    #[error("cannot resolve the model's {within}: {reason}")]
    Root {
        /// "folder" or "version folder".
        within: &'static str,
        /// What the system said.
        reason: std::io::Error,
    },
    /// A plain name the folder does not hold.
    #[error("{field}: the model's {within} has no {name}")]
    Missing {
        /// The configuration field.
        field: &'static str,
        /// The folder.
        within: &'static str,
        /// The name, escaped.
        name: String,
    },
    /// The file cannot be opened or read.
    #[error("{field}: cannot {doing} {path}: {reason}")]
    Io {
        /// The configuration field.
        field: &'static str,
        /// "open" or "read".
        doing: &'static str,
        /// The file.
        path: std::path::PathBuf,
        /// What the system said.
        reason: std::io::Error,
    },
    /// What was opened is not a regular file.
    #[error("{field}: {path} is not a regular file")]
    NotRegular {
        /// The configuration field.
        field: &'static str,
        /// The file.
        path: std::path::PathBuf,
    },
    /// The file is over its limit.
    #[error("{field}: the file holds {size} bytes; at most {limit} are allowed")]
    TooLarge {
        /// The configuration field.
        field: &'static str,
        /// Its size ("more than" the limit when it grew while read).
        size: String,
        /// The limit.
        limit: u64,
    },
}

/// The regular file `value` (a configuration's `field`) names inside `root`,
/// symlinks resolved. A configuration, whether from the model's files or from
/// a load request, never reaches outside its model's folder: absolute paths,
/// `..`, a symlink leading out, a device, a FIFO or a directory are all refused
/// with the same words, so the answer says nothing about what exists outside.
pub fn confined_file(
    root: &Path,
    field: &'static str,
    value: &str,
    within: &'static str,
) -> Result<PathBuf, FileError> {
    let refused = || FileError::Outside { field, value: value.escape_debug().to_string(), within };
    let relative = Path::new(value);
    let plain = !value.is_empty()
        && !value.contains('\0')
        && relative.components().all(|c| matches!(c, std::path::Component::Normal(_) | std::path::Component::CurDir));
    if !plain {
        return Err(refused());
    }
    let base = root.canonicalize().map_err(|reason| FileError::Root { within, reason })?;
    // A plain name missing from the folder itself is said so: that tells only
    // what the folder holds (a longer path could pass a symlink leading out).
    let single = relative.components().filter(|c| matches!(c, std::path::Component::Normal(_))).count() == 1;
    if single && std::fs::symlink_metadata(base.join(relative)).is_err() {
        return Err(FileError::Missing { field, within, name: value.escape_debug().to_string() });
    }
    let file = base.join(relative).canonicalize().map_err(|_| refused())?;
    let regular = std::fs::metadata(&file).is_ok_and(|m| m.is_file());
    if !file.starts_with(&base) || !regular {
        return Err(refused());
    }
    Ok(file)
}

/// Reads a confined regular file of at most `limit` bytes (opened without
/// following a final symlink and without blocking, so a file swapped for a
/// FIFO after [`confined_file`] cannot wedge the loader).
pub fn read_bounded(path: &Path, field: &'static str, limit: u64) -> Result<Vec<u8>, FileError> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|reason| FileError::Io { field, doing: "open", path: path.to_path_buf(), reason })?;
    let meta =
        file.metadata().map_err(|reason| FileError::Io { field, doing: "read", path: path.to_path_buf(), reason })?;
    if !meta.is_file() {
        return Err(FileError::NotRegular { field, path: path.to_path_buf() });
    }
    if meta.len() > limit {
        return Err(FileError::TooLarge { field, size: meta.len().to_string(), limit });
    }
    let mut out = Vec::with_capacity(meta.len() as usize);
    file.take(limit + 1).read_to_end(&mut out).map_err(|reason| FileError::Io {
        field,
        doing: "read",
        path: path.to_path_buf(),
        reason,
    })?;
    if out.len() as u64 > limit {
        return Err(FileError::TooLarge { field, size: format!("more than {limit}"), limit });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(dirs: &[&str], files: &[&str]) -> tempfile::TempDir {
        let root = tempfile::tempdir().expect("tmp");
        for d in dirs {
            std::fs::create_dir_all(root.path().join(d)).expect("mkdir");
        }
        for f in files {
            std::fs::write(root.path().join(f), b"x").expect("write");
        }
        root
    }

    fn policy(text: &str) -> pb::ModelConfig {
        config::parse(Path::new("config.pbtxt"), text).expect("config").config
    }

    #[test]
    fn latest_one_is_the_default_and_numbers_sort_numerically() {
        let root = layout(&["1", "2", "10", "notes"], &["1/model.onnx", "2/model.onnx", "10/model.onnx"]);
        let chosen = versions(root.path(), &pb::ModelConfig::default()).expect("versions");
        assert_eq!(chosen.keys().copied().collect::<Vec<_>>(), [10]);
    }

    #[test]
    fn policies_choose_and_report_what_is_missing() {
        let root = layout(&["1", "2", "3"], &["1/model.onnx", "3/model.onnx"]);
        let all = versions(root.path(), &policy("version_policy { all {} }")).expect("all");
        assert!(all[&1].is_ok() && all[&3].is_ok());
        let no_file = all[&2].as_ref().expect_err("no file");
        assert!(matches!(no_file, VersionError::File { .. }) && no_file.to_string().contains("has no model.onnx"));
        let latest = versions(root.path(), &policy("version_policy { latest { num_versions: 2 } }")).expect("l");
        assert_eq!(latest.keys().copied().collect::<Vec<_>>(), [2, 3]);
        let specific = versions(root.path(), &policy("version_policy { specific { versions: [1, 7] } }")).expect("s");
        assert!(specific[&1].is_ok());
        let missing = specific[&7].as_ref().expect_err("missing");
        assert!(matches!(missing, VersionError::Missing { version: 7, .. }), "{missing}");
        assert!(missing.to_string().contains("does not exist"));
        let renamed = versions(root.path(), &policy("default_model_filename: \"net.onnx\"")).expect("renamed");
        assert!(renamed[&3].as_ref().expect_err("no net.onnx").to_string().contains("has no net.onnx"));
    }

    #[test]
    fn configured_files_stay_inside_their_folder() {
        let outside = tempfile::tempdir().expect("tmp");
        std::fs::write(outside.path().join("secret.pem"), b"key").expect("write");
        let root = layout(&["m/1", "m/sub"], &["m/labels.txt", "m/sub/l.txt", "m/1/model.onnx"]);
        let m = root.path().join("m");
        std::os::unix::fs::symlink(outside.path().join("secret.pem"), m.join("link.txt")).expect("symlink");
        std::os::unix::fs::symlink(m.join("labels.txt"), m.join("inner.txt")).expect("symlink");
        nix::unistd::mkfifo(&m.join("fifo"), nix::sys::stat::Mode::S_IRWXU).expect("fifo");
        assert!(confined_file(&m, "label_filename", "labels.txt", "folder").is_ok());
        assert!(confined_file(&m, "label_filename", "./sub/l.txt", "folder").is_ok());
        assert!(confined_file(&m, "label_filename", "inner.txt", "folder").is_ok(), "a symlink that stays inside");
        let secret = outside.path().join("secret.pem");
        let escapes = [
            secret.to_str().expect("utf-8"),
            "../m/labels.txt",
            "sub/../../m/labels.txt",
            "link.txt",
            "fifo",
            "sub",
            "",
            "/dev/zero",
            "sub/missing.txt",
            "a\0b",
        ];
        let mut words = std::collections::BTreeSet::new();
        for value in escapes {
            let err = confined_file(&m, "label_filename", value, "folder").expect_err(value);
            assert!(matches!(err, FileError::Outside { .. }), "{value}: {err}");
            let err = err.to_string();
            assert!(err.starts_with("label_filename "), "{err}");
            assert!(!err.contains(outside.path().to_str().expect("utf-8")) || value.starts_with('/'), "{err}");
            words.insert(err.replacen(&format!("{:?}", value.escape_debug().to_string()), "V", 1));
        }
        assert_eq!(words.len(), 1, "every refusal reads the same: {words:?}");
        let missing = confined_file(&m, "label_filename", "missing.txt", "folder").expect_err("missing");
        assert_eq!(missing.to_string(), "label_filename: the model's folder has no missing.txt");
        let big = m.join("labels.txt");
        std::fs::write(&big, vec![b'a'; 100]).expect("write");
        assert_eq!(read_bounded(&big, "label_filename", 100).expect("fits").len(), 100);
        let err = read_bounded(&big, "label_filename", 99).expect_err("too big");
        assert!(
            matches!(err, FileError::TooLarge { limit: 99, .. }) && err.to_string().contains("at most 99"),
            "{err}"
        );
        assert!(read_bounded(&m.join("fifo"), "label_filename", 99).is_err(), "a FIFO neither blocks nor reads");
        let c = policy("default_model_filename: \"../m/1/model.onnx\"");
        let chosen = versions(&m, &c).expect("versions");
        let escape = chosen[&1].as_ref().expect_err("escape");
        assert!(matches!(escape, VersionError::File { source: FileError::Outside { .. }, .. }), "{escape}");
    }

    #[test]
    fn a_model_without_version_folders_is_reported() {
        let root = layout(&["v1"], &[]);
        let err = versions(root.path(), &pb::ModelConfig::default()).expect_err("none");
        assert!(matches!(err, FolderError::NoVersions { .. }), "{err}");
        assert!(err.to_string().contains("has no version folder"), "{err}");
    }

    #[test]
    fn scan_checks_the_configured_name() {
        let root = layout(&["good/1", "bad/1", ".hidden"], &[]);
        std::fs::write(root.path().join("bad/config.pbtxt"), "name: \"other\"").expect("write");
        let dirs = scan(root.path()).expect("scan");
        let names: Vec<_> = dirs.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["bad", "good"]);
        let mismatch = dirs[0].config.as_ref().expect_err("mismatch");
        assert!(matches!(mismatch, FolderError::NameMismatch { named, .. } if named == "other"), "{mismatch}");
        assert!(dirs[1].config.is_ok());
    }
}
