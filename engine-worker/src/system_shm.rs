//! Triton's system shared-memory extension in an engine worker
//! (`SYSTEM_SHARED_MEMORY`): the regions the supervisor says are registered,
//! each opened by name under `/dev/shm` only (one file name, never through a
//! symbolic link, regular files only), read and written with `pread` and
//! `pwrite` and never mapped (a client that shrinks its object cannot kill the
//! worker with SIGBUS), every access bounds-checked against the region and
//! the object's size at that moment; and the handlers of both faces.
//!
//! A change the supervisor sends is applied under a write lock that every
//! read and write takes shared, so once this worker has said it applied a
//! set, no region missing from it is touched again.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, RwLock};

use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;
use tandem_shared::process::control::{ControlClient, WorkerEvent};
use tandem_shared::system_shm::{open, span, Change, Region, RegionSet};

use crate::infer::{ApiError, SharedMemory, SHARED_MEMORY_OFF};
use crate::model_control::Asks;
use crate::state::{error, read_body, AppState};

/// Largest register request body (a key, two numbers).
const MAX_REGISTER_BYTES: usize = 4 << 10;

/// A registered region and its object, or why it could not be opened here.
#[derive(Debug)]
struct Opened {
    region: Region,
    file: Result<File, String>,
}

/// The regions registered now, as this worker applied them.
#[derive(Debug, Default)]
struct Applied {
    generation: u64,
    regions: BTreeMap<String, Opened>,
}

/// This worker's view of the registry.
#[derive(Debug)]
pub struct SystemShm {
    control: Arc<ControlClient>,
    /// Registrations this worker asked the supervisor for.
    pub(crate) asks: Asks,
    applied: RwLock<Applied>,
}

/// The object's size now.
fn size_of(file: &File) -> Result<u64, String> {
    file.metadata().map(|m| m.len()).map_err(|e| format!("cannot inspect the region's object: {e}"))
}

/// Opens `region`'s object and checks that the region lies inside it.
fn open_region(region: &Region) -> Result<File, String> {
    let file = open(&region.key)?;
    let have = size_of(&file)?;
    if region.offset.checked_add(region.byte_size).is_none_or(|end| end > have) {
        return Err(format!(
            "shared-memory object {:?} holds {have} bytes; a region of {} bytes at offset {} does not fit",
            region.key, region.byte_size, region.offset
        ));
    }
    Ok(file)
}

impl SystemShm {
    /// The registry a worker starts with (the supervisor's, at its spawn).
    pub fn new(set: RegionSet, control: Arc<ControlClient>) -> Arc<SystemShm> {
        let shm = Arc::new(SystemShm { control, asks: Asks::default(), applied: RwLock::new(Applied::default()) });
        shm.install(set);
        shm
    }

    /// Replaces the registry by `set`: regions left out are closed, regions
    /// unchanged keep their object, new ones are opened.
    fn install(&self, set: RegionSet) {
        let mut applied = self.applied.write().unwrap_or_else(|p| p.into_inner());
        let mut old = std::mem::take(&mut applied.regions);
        for region in set.regions {
            let opened = match old.remove(&region.name) {
                Some(o) if o.region == region && o.file.is_ok() => o,
                _ => {
                    let file = open_region(&region);
                    if let Err(e) = &file {
                        tracing::warn!(region = %region.name, reason = %e, "a registered shared-memory region cannot be opened here");
                    }
                    Opened { region, file }
                }
            };
            applied.regions.insert(opened.region.name.clone(), opened);
        }
        applied.generation = set.generation;
    }

    /// The supervisor's new registry: installed, then acknowledged.
    pub(crate) fn apply(&self, set: RegionSet, control: &ControlClient) {
        let generation = set.generation;
        self.install(set);
        let _ = control.send(&WorkerEvent::SharedMemoryApplied { generation });
    }

    /// The regions registered, or just `name` (an error when it is not).
    fn status(&self, name: Option<&str>) -> Result<Vec<Region>, ApiError> {
        let applied = self.applied.read().unwrap_or_else(|p| p.into_inner());
        match name {
            None => Ok(applied.regions.values().map(|o| o.region.clone()).collect()),
            Some(n) => applied
                .regions
                .get(n)
                .map(|o| vec![o.region.clone()])
                .ok_or_else(|| ApiError::bad(format!("no shared-memory region {n:?} is registered"))),
        }
    }

    /// Runs `f` on `region`'s entry under the shared lock.
    fn with<T>(&self, region: &str, f: impl FnOnce(&Region, &File) -> Result<T, String>) -> Result<T, String> {
        let applied = self.applied.read().unwrap_or_else(|p| p.into_inner());
        let opened =
            applied.regions.get(region).ok_or_else(|| format!("no shared-memory region {region:?} is registered"))?;
        let file = opened.file.as_ref().map_err(|e| format!("shared-memory region {region:?}: {e}"))?;
        f(&opened.region, file)
    }
}

impl SharedMemory for SystemShm {
    fn read(&self, region: &str, offset: u64, len: u64) -> Result<Vec<u8>, String> {
        self.with(region, |r, file| {
            let at = span(r, offset, len)?;
            let len = usize::try_from(len).map_err(|_| format!("{len} bytes do not fit in memory"))?;
            let mut buf = vec![0u8; len];
            file.read_exact_at(&mut buf, at).map_err(|e| match e.kind() {
                io::ErrorKind::UnexpectedEof => {
                    format!(
                        "shared-memory region {region:?}: its object is now shorter than the region (it was shrunk)"
                    )
                }
                _ => format!("shared-memory region {region:?}: cannot read: {e}"),
            })?;
            Ok(buf)
        })
    }

    fn write(&self, region: &str, offset: u64, bytes: &[u8]) -> Result<(), String> {
        self.with(region, |r, file| {
            let at = span(r, offset, bytes.len() as u64)?;
            // Never past the object's end: a write there would grow it.
            if at + bytes.len() as u64 > size_of(file)? {
                return Err(format!(
                    "shared-memory region {region:?}: its object is now shorter than the region (it was shrunk)"
                ));
            }
            file.write_all_at(bytes, at).map_err(|e| format!("shared-memory region {region:?}: cannot write: {e}"))
        })
    }
}

/// The registry, or the error that says the extension is off.
fn registry(state: &AppState) -> Result<&SystemShm, ApiError> {
    state.system_shm().ok_or_else(|| ApiError::bad(SHARED_MEMORY_OFF))
}

/// Registers `region` on every engine worker: checked and opened here first,
/// so a client learns at once what is wrong with it.
pub(crate) async fn register(state: &AppState, region: Region) -> Result<(), ApiError> {
    let shm = registry(state)?;
    tandem_shared::system_shm::check_name(&region.name).map_err(ApiError::bad)?;
    open_region(&region).map_err(ApiError::bad)?;
    let change = Change::Register(region);
    shm.asks.ask(&shm.control, |request| WorkerEvent::SharedMemoryRequested { request, change }).await
}

/// Unregisters `name` (every region when `None`) on every engine worker.
pub(crate) async fn unregister(state: &AppState, name: Option<String>) -> Result<(), ApiError> {
    let Some(shm) = state.system_shm() else {
        // Nothing can be registered: there is nothing to remove.
        return Ok(());
    };
    let change = Change::Unregister { name };
    shm.asks.ask(&shm.control, |request| WorkerEvent::SharedMemoryRequested { request, change }).await
}

/// The regions registered (just `name`'s when given); none while the extension is off.
pub(crate) fn status(state: &AppState, name: Option<&str>) -> Result<Vec<Region>, ApiError> {
    match (state.system_shm(), name) {
        (Some(shm), name) => shm.status(name),
        (None, None) => Ok(Vec::new()),
        (None, Some(_)) => Err(ApiError::bad(SHARED_MEMORY_OFF)),
    }
}

/// Why CUDA shared memory cannot be registered.
pub(crate) const NO_CUDA_SHARED_MEMORY: &str =
    "tandem does not implement CUDA shared memory; pass tensors in the body or in system shared memory";

/// `GET /v2/systemsharedmemory/status`.
pub async fn http_status_all(State(state): State<AppState>) -> Response {
    answer_status(status(&state, None))
}

/// `GET /v2/systemsharedmemory/region/{name}/status`.
pub async fn http_status(State(state): State<AppState>, UrlPath(name): UrlPath<String>) -> Response {
    answer_status(status(&state, Some(&name)))
}

fn answer_status(regions: Result<Vec<Region>, ApiError>) -> Response {
    match regions {
        Ok(list) => Json(
            list.into_iter()
                .map(|r| json!({ "name": r.name, "key": r.key, "offset": r.offset, "byte_size": r.byte_size }))
                .collect::<Vec<_>>(),
        )
        .into_response(),
        Err(e) => e.into_response(),
    }
}

/// A register request's body, as Triton's HTTP face takes it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegisterBody {
    key: String,
    #[serde(default)]
    offset: u64,
    byte_size: u64,
}

/// `POST /v2/systemsharedmemory/region/{name}/register`.
pub async fn http_register(
    State(state): State<AppState>,
    UrlPath(name): UrlPath<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let run = async {
        let (bytes, _share) = read_body(&headers, body, MAX_REGISTER_BYTES, state.budget()).await?;
        let b: RegisterBody = serde_json::from_slice(&bytes).map_err(|e| {
            ApiError::bad(format!("a register request is {{\"key\": \"/name\", \"byte_size\": N, \"offset\": N}}: {e}"))
        })?;
        register(&state, Region { name, key: b.key, offset: b.offset, byte_size: b.byte_size }).await
    };
    done(run.await)
}

/// `POST /v2/systemsharedmemory/unregister`.
pub async fn http_unregister_all(State(state): State<AppState>) -> Response {
    done(unregister(&state, None).await)
}

/// `POST /v2/systemsharedmemory/region/{name}/unregister`.
pub async fn http_unregister(State(state): State<AppState>, UrlPath(name): UrlPath<String>) -> Response {
    done(unregister(&state, Some(name)).await)
}

fn done(result: Result<(), ApiError>) -> Response {
    match result {
        Ok(()) => StatusCode::OK.into_response(),
        Err(e) => e.into_response(),
    }
}

/// `GET /v2/cudasharedmemory/status` (and a region's): none is ever registered.
pub async fn http_cuda_status(name: Option<UrlPath<String>>) -> Response {
    match name {
        None => Json(Vec::<serde_json::Value>::new()).into_response(),
        Some(UrlPath(n)) => error(StatusCode::BAD_REQUEST, format!("no CUDA shared-memory region {n:?} is registered")),
    }
}

/// `POST /v2/cudasharedmemory/region/{name}/register`.
pub async fn http_cuda_register() -> Response {
    error(StatusCode::BAD_REQUEST, NO_CUDA_SHARED_MEMORY)
}

/// `POST /v2/cudasharedmemory[/region/{name}]/unregister`: nothing to remove.
pub async fn http_cuda_unregister() -> Response {
    StatusCode::OK.into_response()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly by design")]
mod tests {
    use super::*;
    use std::path::Path;
    use tandem_shared::system_shm::SHM_DIR;

    struct Object(std::path::PathBuf);
    impl Drop for Object {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    fn object(name: &str, len: usize) -> Object {
        let path = Path::new(SHM_DIR).join(name);
        std::fs::write(&path, vec![7u8; len]).expect("write /dev/shm");
        Object(path)
    }

    /// A registry of `regions` (and the supervisor's end of its channel, kept open).
    fn shm(regions: Vec<Region>) -> (Arc<SystemShm>, std::os::unix::net::UnixStream) {
        let (a, b) = std::os::unix::net::UnixStream::pair().expect("pair");
        (SystemShm::new(RegionSet { generation: 1, regions }, Arc::new(ControlClient::new(a))), b)
    }

    #[test]
    fn reads_and_writes_stay_inside_the_region_and_its_object() {
        let name = format!("tandem-test-{}", std::process::id());
        let obj = object(&name, 100);
        let r = Region { name: "r".into(), key: format!("/{name}"), offset: 10, byte_size: 80 };
        let (s, _supervisor) = shm(vec![r]);
        assert_eq!(s.read("r", 0, 80).expect("read"), vec![7u8; 80]);
        s.write("r", 78, &[1, 2]).expect("write");
        assert_eq!(s.read("r", 76, 4).expect("read"), vec![7, 7, 1, 2]);
        assert!(s.read("r", 79, 2).unwrap_err().contains("do not fit"));
        assert!(s.write("r", 80, &[1]).unwrap_err().contains("do not fit"));
        assert!(s.read("nope", 0, 1).unwrap_err().contains("is registered"));
        // The owner shrinks its object: an error, never a signal, and no write grows it back.
        std::fs::OpenOptions::new().write(true).open(&obj.0).unwrap().set_len(20).unwrap();
        assert!(s.read("r", 0, 80).unwrap_err().contains("shorter"));
        assert!(s.write("r", 60, &[1]).unwrap_err().contains("shorter"));
        assert_eq!(std::fs::metadata(&obj.0).unwrap().len(), 20);
        // Unregistered: never touched again.
        s.install(RegionSet { generation: 2, regions: vec![] });
        assert!(s.read("r", 0, 1).unwrap_err().contains("is registered"));
    }
}
