//! Finds ONNX Runtime once, at start-up: `ORT_DYLIB_PATH`, else the library
//! inside the `onnxruntime` Python package, by rule (the active environment,
//! the project's `.venv`, the interpreter on `PATH`, system prefixes); then loads it in a
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

/// How one rule lists its folders, when it is tried.
type Folders = Box<dyn FnOnce() -> Vec<PathBuf>>;

/// The folders where the `onnxruntime` Python package may live, by rule, in
/// the order they are tried: the active environment (`VIRTUAL_ENV`, then
/// `CONDA_PREFIX`: a user's `onnxruntime-gpu` there wins over the system's),
/// the project's own `.venv` (the one the README's first command makes, found
/// from a binary in any cargo target directory or one `cargo install` made),
/// the interpreter on `PATH`, then the usual system prefixes. Each rule's
/// folders are listed only when it is tried (asking the interpreter starts
/// two Python processes), so a rule that finds the library ends the search.
fn rules(env: &dyn Fn(&str) -> Option<String>) -> impl Iterator<Item = (&'static str, Vec<PathBuf>)> {
    let site = |prefix: &Path| glob_dirs(&prefix.join("lib"), "python3", "site-packages");
    let mut rules: Vec<(&'static str, Folders)> = Vec::new();
    for var in ["VIRTUAL_ENV", "CONDA_PREFIX"] {
        if let Some(prefix) = env(var).filter(|p| !p.trim().is_empty()) {
            rules.push((var, Box::new(move || site(Path::new(&prefix)))));
        }
    }
    let exe = std::env::current_exe().ok();
    let project = exe.as_deref().and_then(|exe| project_of(exe).or_else(|| built_from(exe, env)));
    if let Some(project) = project {
        rules.push(("the project's .venv", Box::new(move || site(&project.join(".venv")))));
    }
    let path = env("PATH");
    rules.push((
        "python3 on PATH",
        Box::new(move || {
            // A virtualenv's python3 run with -S reports its base's folders, not the
            // virtualenv's own: look in the environment it belongs to first.
            let mut dirs: Vec<PathBuf> = first_interpreter(path.as_deref())
                .and_then(|bin| bin.parent().filter(|env| env.join("pyvenv.cfg").is_file()).map(site))
                .unwrap_or_default();
            dirs.extend(interpreter_paths());
            dirs
        }),
    ));
    rules.push((
        "system prefixes",
        Box::new(|| {
            let mut system = Vec::new();
            for prefix in ["/usr/local/lib", "/usr/lib", "/opt/conda/lib"] {
                system.extend(glob_dirs(Path::new(prefix), "python3", "site-packages"));
                system.extend(glob_dirs(Path::new(prefix), "python3", "dist-packages"));
            }
            system
        }),
    ));
    rules.into_iter().map(|(rule, folders)| (rule, folders()))
}

/// The source tree a binary was built in (`<project>/target/release/tandem`,
/// as `cargo run --release` makes it): the nearest of its first few parent
/// folders holding both a `Cargo.toml` and a `.venv`. An installed binary has none.
fn project_of(exe: &Path) -> Option<PathBuf> {
    exe.ancestors().skip(1).take(4).find(|dir| is_project_with_venv(dir)).map(Path::to_path_buf)
}

/// The folder on `path` holding the first `python3` (else `python`), as
/// `PATH` names it (a virtualenv's `bin`, not where its symbolic link points).
fn first_interpreter(path: Option<&str>) -> Option<PathBuf> {
    let dirs: Vec<PathBuf> = std::env::split_paths(path?).collect();
    ["python3", "python"].iter().find_map(|name| dirs.iter().find(|d| d.join(name).is_file()).cloned())
}

/// A binary cargo made where the source tree cannot be seen from it: in a
/// target directory elsewhere (`CARGO_TARGET_DIR`; cargo marks its root with
/// `CACHEDIR.TAG`) or put in `$CARGO_HOME/bin` (`~/.cargo/bin`) by `cargo
/// install --path .`. The source tree it was built from, when that still has
/// its `.venv`; `None` for any other binary (a copy, a package).
fn built_from(exe: &Path, env: &dyn Fn(&str) -> Option<String>) -> Option<PathBuf> {
    let dir = exe.parent()?;
    let in_target = dir.parent().is_some_and(|target| target.join("CACHEDIR.TAG").is_file());
    let cargo_home = env("CARGO_HOME")
        .filter(|h| !h.trim().is_empty())
        .map(PathBuf::from)
        .or_else(|| env("HOME").map(|h| Path::new(&h).join(".cargo")));
    let installed = cargo_home.is_some_and(|home| {
        let bin = home.join("bin");
        bin.canonicalize().unwrap_or(bin) == dir
    });
    (in_target || installed).then_some(())?;
    let tree = Path::new(env!("CARGO_MANIFEST_DIR")).parent()?;
    is_project_with_venv(tree).then(|| tree.to_path_buf())
}

/// A source tree (a `Cargo.toml`) with the project's own `.venv` beside it.
fn is_project_with_venv(dir: &Path) -> bool {
    dir.join("Cargo.toml").is_file() && dir.join(".venv").is_dir()
}

/// Python's own search path, asked of `python3` and `python` on `PATH`
/// (`-S`: no `site` hooks run on tandem's behalf).
fn interpreter_paths() -> Vec<PathBuf> {
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
    dirs.dedup();
    dirs
}

/// The library and the rule that found it, trying `rules` in order; else every folder looked in.
fn discover(
    rules: impl IntoIterator<Item = (&'static str, Vec<PathBuf>)>,
) -> Result<(PathBuf, &'static str), Vec<PathBuf>> {
    let mut looked = Vec::new();
    for (rule, dirs) in rules {
        if let Some(lib) = find_in(&dirs) {
            return Ok((lib, rule));
        }
        looked.extend(dirs);
    }
    Err(looked)
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
    let (path, found_by) = match &config.engine.ort_dylib_path {
        Some(p) => (p.clone(), "ORT_DYLIB_PATH"),
        None => match discover(rules(&|var| std::env::var(var).ok())) {
            Ok(found) => found,
            Err(dirs) if explicit || config.engine.device == Device::Cuda => {
                let looked: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
                let looked = if looked.is_empty() { "no Python found".to_string() } else { looked.join(", ") };
                if config.engine.device == Device::Cuda {
                    return Err(EngineConfigError::NoCuda(format!(
                        "no ONNX Runtime library was found (looked in {looked})"
                    )));
                }
                return Err(EngineConfigError::NotFound { looked });
            }
            Err(_) => {
                settings.fallback_reason =
                    Some("no ONNX Runtime library found (pip install onnxruntime, or set ORT_DYLIB_PATH)".into());
                return Ok(settings);
            }
        },
    };
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/proc/self/exe"));
    match probe(&exe, &path) {
        Ok(mut lib) => {
            lib.found_by = found_by.to_string();
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
            found_by = %lib.found_by,
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

    #[test]
    fn a_binary_in_its_source_trees_target_finds_the_projects_venv_and_an_installed_one_none() {
        let root = tempfile::tempdir().expect("tmp");
        let project = root.path().join("tandem");
        std::fs::create_dir_all(project.join("target/release")).expect("mkdir");
        std::fs::create_dir_all(project.join(".venv")).expect("mkdir");
        std::fs::write(project.join("Cargo.toml"), b"").expect("write");
        assert_eq!(project_of(&project.join("target/release/tandem")), Some(project.clone()));
        assert_eq!(project_of(&root.path().join("usr/local/bin/tandem")), None);
        std::fs::remove_dir(project.join(".venv")).expect("rmdir");
        assert_eq!(project_of(&project.join("target/release/tandem")), None, "no .venv: nothing to search");
    }

    #[test]
    fn the_active_environment_wins_over_the_interpreter_and_the_rule_is_named() {
        let root = tempfile::tempdir().expect("tmp");
        let venv = root.path().join("venv");
        let site = venv.join("lib/python3.12/site-packages");
        std::fs::create_dir_all(site.join("onnxruntime/capi")).expect("mkdir");
        std::fs::write(site.join("onnxruntime/capi/libonnxruntime.so.1.31.1"), b"").expect("write");
        let venv_text = venv.to_string_lossy().into_owned();
        let env = |var: &str| (var == "VIRTUAL_ENV").then(|| venv_text.clone());
        let found: Vec<_> = rules(&env).collect();
        let names: Vec<&str> = found.iter().map(|(rule, _)| *rule).collect();
        assert_eq!(names[0], "VIRTUAL_ENV");
        assert_eq!(&names[names.len() - 2..], ["python3 on PATH", "system prefixes"]);
        let (lib, rule) = discover(found).expect("found");
        assert_eq!((lib, rule), (site.join("onnxruntime/capi/libonnxruntime.so.1.31.1"), "VIRTUAL_ENV"));
        // Later rules are tried only when earlier ones have nothing.
        let empty = vec![("VIRTUAL_ENV", vec![root.path().join("none")]), ("system prefixes", vec![site.clone()])];
        assert_eq!(discover(empty).expect("found").1, "system prefixes");
        let nothing = vec![("VIRTUAL_ENV", vec![root.path().join("none")])];
        assert_eq!(discover(nothing).expect_err("none"), [root.path().join("none")]);
    }

    #[test]
    fn a_binary_in_a_cargo_target_dir_elsewhere_is_traced_to_its_source_tree_and_a_copy_is_not() {
        let root = tempfile::tempdir().expect("tmp");
        let target = root.path().join("target");
        std::fs::create_dir_all(target.join("release")).expect("mkdir");
        let exe = target.join("release/tandem");
        let tree = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tree").to_path_buf();
        let expected = tree.join(".venv").is_dir().then_some(tree);
        let no_env = |_: &str| None;
        assert_eq!(built_from(&exe, &no_env), None, "no CACHEDIR.TAG: not cargo's");
        std::fs::write(target.join("CACHEDIR.TAG"), b"Signature: 8a477f597d28d172789f06886806bc55").expect("tag");
        assert_eq!(built_from(&exe, &no_env), expected);
        // What cargo install leaves in $CARGO_HOME/bin.
        let home = root.path().join("cargo-home");
        std::fs::create_dir_all(home.join("bin")).expect("mkdir");
        let home_text = home.to_string_lossy().into_owned();
        let env = |var: &str| (var == "CARGO_HOME").then(|| home_text.clone());
        assert_eq!(built_from(&home.join("bin/tandem"), &env), expected);
        assert_eq!(built_from(&root.path().join("copy/tandem"), &env), None, "a copy elsewhere");
    }

    #[test]
    fn a_virtualenv_first_on_path_is_searched_as_itself_not_as_its_base() {
        let root = tempfile::tempdir().expect("tmp");
        let venv = root.path().join("env");
        let site = venv.join("lib/python3.11/site-packages");
        std::fs::create_dir_all(site.join("onnxruntime/capi")).expect("mkdir");
        std::fs::create_dir_all(venv.join("bin")).expect("mkdir");
        std::fs::write(site.join("onnxruntime/capi/libonnxruntime.so.1.31.1"), b"").expect("write");
        std::fs::write(venv.join("pyvenv.cfg"), b"home = /usr/bin\n").expect("write");
        std::fs::write(venv.join("bin/python3"), b"").expect("write");
        let path = format!("{}:/usr/bin", venv.join("bin").display());
        assert_eq!(first_interpreter(Some(&path)), Some(venv.join("bin")));
        let env = |var: &str| (var == "PATH").then(|| path.clone());
        let (lib, rule) = discover(rules(&env).filter(|(r, _)| *r == "python3 on PATH")).expect("found");
        assert_eq!((lib, rule), (site.join("onnxruntime/capi/libonnxruntime.so.1.31.1"), "python3 on PATH"));
    }
}
