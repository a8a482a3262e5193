//! Finds ONNX Runtime once, at start-up: `ORT_DYLIB_PATH`, else the library
//! inside the `onnxruntime` Python package on this machine; then loads it in a
//! child process (`tandem engine-probe`) so that a broken library can never
//! take the supervisor down, and decides the engine settings every worker gets.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use tandem_config::engine::{BackendChoice, Device};
use tandem_config::Config;
use tandem_shared::{EngineSettings, OrtLibrary};

/// How long loading the library may take in the probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(60);

/// Why the engine cannot start as configured (exit 2).
#[derive(Debug, thiserror::Error)]
pub enum EngineConfigError {
    /// ONNX Runtime is required but not found.
    #[error("ENGINE_BACKEND=onnxruntime but no ONNX Runtime library was found (looked in {looked})\nhint: pip install onnxruntime, or set ORT_DYLIB_PATH to libonnxruntime.so")]
    NotFound {
        /// Where discovery looked.
        looked: String,
    },
    /// The library was found but does not load.
    #[error("cannot load ONNX Runtime from {path}: {reason}")]
    Unloadable {
        /// The library.
        path: PathBuf,
        /// The loader's message.
        reason: String,
    },
    /// CUDA was asked for but is not there.
    #[error("ENGINE_DEVICE=cuda but {0}\nhint: install onnxruntime-gpu with CUDA and cuDNN, or set ENGINE_DEVICE=cpu")]
    NoCuda(String),
}

/// Where the `onnxruntime` Python package may live: Python's own search path
/// (asked of `python3` and `python`), the active virtualenv, and the usual prefixes.
fn python_paths() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    for python in ["python3", "python"] {
        let out = Command::new(python)
            .args([
                "-S",
                "-c",
                "import site,sys; print('\\n'.join(sys.path + site.getsitepackages() + [site.getusersitepackages()]))",
            ])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output();
        if let Some(out) = out.ok().filter(|o| o.status.success()) {
            dirs.extend(String::from_utf8_lossy(&out.stdout).lines().filter(|l| !l.is_empty()).map(PathBuf::from));
        }
    }
    if let Ok(venv) = std::env::var("VIRTUAL_ENV") {
        dirs.extend(glob_dirs(&Path::new(&venv).join("lib"), "python3", "site-packages"));
    }
    for prefix in ["/usr/local/lib", "/usr/lib", "/opt/conda/lib"] {
        dirs.extend(glob_dirs(Path::new(prefix), "python3", "site-packages"));
        dirs.extend(glob_dirs(Path::new(prefix), "python3", "dist-packages"));
    }
    dirs.dedup();
    dirs
}

/// `<root>/<name starting with prefix>/<leaf>` for every such directory.
fn glob_dirs(root: &Path, prefix: &str, leaf: &str) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(root) else { return Vec::new() };
    let mut found: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .map(|e| e.path().join(leaf))
        .filter(|p| p.is_dir())
        .collect();
    found.sort();
    found
}

/// The ONNX Runtime library in `onnxruntime/capi/` below the first of `dirs` that has one.
pub fn find_in(dirs: &[PathBuf]) -> Option<PathBuf> {
    dirs.iter().find_map(|dir| {
        let capi = dir.join("onnxruntime").join("capi");
        let mut libs: Vec<PathBuf> = std::fs::read_dir(&capi)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("libonnxruntime.so")))
            .collect();
        // The versioned file (libonnxruntime.so.1.31.1) is the library itself; prefer it.
        libs.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
        libs.into_iter().next()
    })
}

/// Runs `tandem engine-probe PATH` and reads what it printed.
fn probe(exe: &Path, path: &Path) -> Result<OrtLibrary, String> {
    let mut child = Command::new(exe)
        .arg("engine-probe")
        .arg(path)
        .env_clear()
        .envs(tandem_shared::inherited_env())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start the probe: {e}"))?;
    let deadline = std::time::Instant::now() + PROBE_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if std::time::Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("loading took longer than {}s", PROBE_TIMEOUT.as_secs()));
            }
        }
    }
    let out = child.wait_with_output().map_err(|e| format!("cannot read the probe: {e}"))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let last = stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("no message");
        return Err(format!("{} ({})", last.trim().trim_start_matches("tandem: error: "), out.status));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| format!("the probe printed no library facts: {e}"))
}

/// Decides the engine settings: which backend, which library, which device.
/// Threads are filled in per worker at spawn time (they depend on the worker count).
pub fn resolve(config: &Config) -> Result<EngineSettings, EngineConfigError> {
    let mut settings = EngineSettings {
        backend: config.engine.backend,
        device: config.engine.device,
        // Decided per worker (worker_settings::for_worker): it depends on the worker count.
        threads: 0,
        strict_readiness: config.engine.strict_readiness,
        exit_on_model_error: config.engine.exit_on_model_error,
        ..EngineSettings::default()
    };
    if config.engine.backend == BackendChoice::Tract {
        settings.fallback_reason = Some("ENGINE_BACKEND=tract".into());
        return Ok(settings);
    }
    let explicit = config.engine.ort_dylib_path.is_some() || config.engine.backend == BackendChoice::OnnxRuntime;
    let path = match &config.engine.ort_dylib_path {
        Some(p) => p.clone(),
        None => {
            let dirs = python_paths();
            match find_in(&dirs) {
                Some(p) => p,
                None if explicit || config.engine.device == Device::Cuda => {
                    let looked: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
                    let looked = if looked.is_empty() { "no Python found".to_string() } else { looked.join(", ") };
                    if config.engine.device == Device::Cuda {
                        return Err(EngineConfigError::NoCuda(format!(
                            "no ONNX Runtime library was found (looked in {looked})"
                        )));
                    }
                    return Err(EngineConfigError::NotFound { looked });
                }
                None => {
                    settings.fallback_reason =
                        Some("no ONNX Runtime library found (pip install onnxruntime, or set ORT_DYLIB_PATH)".into());
                    return Ok(settings);
                }
            }
        }
    };
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/proc/self/exe"));
    match probe(&exe, &path) {
        Ok(lib) => {
            if config.engine.device == Device::Cuda && !lib.cuda {
                return Err(EngineConfigError::NoCuda(format!(
                    "the ONNX Runtime at {} (version {}) has no CUDA execution provider",
                    lib.path.display(),
                    lib.version
                )));
            }
            settings.onnxruntime = Some(lib);
            Ok(settings)
        }
        Err(reason) if explicit || config.engine.device == Device::Cuda => {
            Err(EngineConfigError::Unloadable { path, reason })
        }
        Err(reason) => {
            settings.fallback_reason = Some(format!("the ONNX Runtime at {} does not load: {reason}", path.display()));
            Ok(settings)
        }
    }
}

/// Logs which backend runs and why, loudly when it is the fallback.
pub fn announce(settings: &EngineSettings) {
    match (&settings.onnxruntime, &settings.fallback_reason) {
        (Some(lib), _) => tracing::info!(
            backend = "onnxruntime",
            version = %lib.version,
            library = %lib.path.display(),
            device = if settings.device == Device::Cuda { "cuda" } else { "cpu" },
            cuda_available = lib.cuda,
            "engine: ONNX Runtime"
        ),
        (None, Some(reason)) if settings.backend == BackendChoice::Tract => {
            tracing::info!(backend = "tract", reason = %reason, "engine: tract")
        }
        (None, reason) => tracing::warn!(
            backend = "tract",
            reason = reason.as_deref().unwrap_or("unknown"),
            "engine: ONNX Runtime is NOT available; models run on tract (pure Rust, slower, loads fewer models)\nhint: pip install onnxruntime, or set ORT_DYLIB_PATH"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_versioned_library_in_the_first_package() {
        let root = tempfile::tempdir().expect("tmp");
        let a = root.path().join("a");
        let b = root.path().join("b");
        for d in [&a, &b] {
            std::fs::create_dir_all(d.join("onnxruntime/capi")).expect("mkdir");
        }
        std::fs::write(b.join("onnxruntime/capi/libonnxruntime.so.1.31.1"), b"").expect("write");
        std::fs::write(b.join("onnxruntime/capi/libonnxruntime_providers_shared.so"), b"").expect("write");
        let found = find_in(&[root.path().join("missing"), a, b.clone()]).expect("found");
        assert_eq!(found, b.join("onnxruntime/capi/libonnxruntime.so.1.31.1"));
        assert_eq!(find_in(&[root.path().to_path_buf()]), None);
    }
}
