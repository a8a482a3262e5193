//! A model's configuration: Triton's `ModelConfig`, read from `config.pbtxt`
//! (protobuf text format) or its JSON twin `config.json`, with a real parser
//! generated from `proto/model_config.proto`. Misspelled fields are errors
//! naming file, line and field; fields tandem does not act on are listed so
//! the loader can log them once.

use std::path::{Path, PathBuf};

use miette::Diagnostic;
use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor, Value};

/// Types generated from `proto/model_config.proto` (Triton's `inference` package).
#[allow(missing_docs, clippy::all, reason = "generated code")]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/inference.rs"));
}

/// The encoded descriptor set of `model_config.proto`, written by `build.rs`.
pub(crate) const DESCRIPTORS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/model_config.bin"));

/// File names tandem reads a configuration from, in order of preference.
pub const CONFIG_FILES: [&str; 2] = ["config.pbtxt", "config.json"];

/// Fields tandem acts on, as dotted paths; every other field that is set is reported as ignored.
const ACTED_ON: &[&str] = &[
    "name",
    "platform",
    "backend",
    "version_policy",
    "max_batch_size",
    "input.name",
    "input.data_type",
    "input.dims",
    "input.reshape",
    "output.name",
    "output.data_type",
    "output.dims",
    "output.reshape",
    "output.label_filename",
    "instance_group.name",
    "instance_group.count",
    "instance_group.kind",
    "default_model_filename",
    "parameters",
    "dynamic_batching.preferred_batch_size",
    "dynamic_batching.max_queue_delay_microseconds",
];

/// `parameters` keys tandem acts on: ONNX Runtime thread counts, as Triton's
/// onnxruntime backend names them, and `max_inflight`, the inference requests
/// one engine worker runs for a version at once (past it, 429).
pub const ACTED_ON_PARAMETERS: &[&str] = &["intra_op_thread_count", "inter_op_thread_count", MAX_INFLIGHT];

/// The `parameters` key of the per-version concurrency cap.
pub const MAX_INFLIGHT: &str = "max_inflight";
/// Largest `max_inflight`.
const MAX_INFLIGHT_LIMIT: usize = 1 << 20;

/// Why a configuration file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file exists but cannot be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file does not parse as a `ModelConfig`.
    #[error("{path}:{line}:{column}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line of the problem.
        line: usize,
        /// 1-based column of the problem.
        column: usize,
        /// The parser's message (it names the field).
        message: String,
    },
    /// The file parses but a value is not allowed.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// A parsed configuration and what in it tandem ignores.
#[derive(Debug, Clone, Default)]
pub struct LoadedConfig {
    /// The configuration (all defaults when the model has no file).
    pub config: pb::ModelConfig,
    /// The file it came from.
    pub file: Option<PathBuf>,
    /// Fields that are set but that tandem does not act on (dotted paths).
    pub ignored: Vec<String>,
}

fn descriptor() -> MessageDescriptor {
    static DESCRIPTOR: std::sync::OnceLock<MessageDescriptor> = std::sync::OnceLock::new();
    DESCRIPTOR
        .get_or_init(|| {
            // The descriptor set is built from our own proto file at compile time; a
            // failure here is a build defect, caught by the unit tests.
            #[allow(clippy::expect_used, reason = "compile-time data, checked by tests")]
            let pool = DescriptorPool::decode(DESCRIPTORS).expect("model_config descriptor set decodes");
            #[allow(clippy::expect_used, reason = "compile-time data, checked by tests")]
            pool.get_message_by_name("inference.ModelConfig").expect("inference.ModelConfig is declared")
        })
        .clone()
}

/// Reads `<dir>/config.pbtxt` (else `config.json`); no file means all defaults.
pub fn read(dir: &Path) -> Result<LoadedConfig, ConfigError> {
    for name in CONFIG_FILES {
        let path = dir.join(name);
        match std::fs::metadata(&path) {
            Ok(m) if !m.is_file() => {
                return Err(ConfigError::Invalid { path, message: "is not a regular file".into() });
            }
            Ok(m) if m.len() > MAX_CONFIG_BYTES as u64 => return Err(too_large(path, m.len())),
            _ => {}
        }
        match std::fs::read_to_string(&path) {
            Ok(text) => return parse(&path, &text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => return Err(ConfigError::Read { path, source }),
        }
    }
    Ok(LoadedConfig::default())
}

/// A configuration of `len` bytes, more than [`MAX_CONFIG_BYTES`] (checked on
/// a file before it is read, and on a load request's text).
fn too_large(path: PathBuf, len: u64) -> ConfigError {
    ConfigError::Invalid { path, message: format!("holds {len} bytes; at most {MAX_CONFIG_BYTES} are read") }
}

/// Parses `text` as the file `path` (its extension picks text format or JSON).
pub fn parse(path: &Path, text: &str) -> Result<LoadedConfig, ConfigError> {
    if text.len() > MAX_CONFIG_BYTES {
        return Err(too_large(path.to_path_buf(), text.len() as u64));
    }
    let desc = descriptor();
    let message = if path.extension().is_some_and(|e| e == "json") {
        let options = prost_reflect::DeserializeOptions::new().deny_unknown_fields(true);
        let mut de = serde_json::Deserializer::from_str(text);
        DynamicMessage::deserialize_with_options(desc, &mut de, &options).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            line: e.line(),
            column: e.column(),
            message: e.to_string(),
        })?
    } else {
        let (explicit, inserted) = explicit_list_colons(text);
        DynamicMessage::parse_text_format(desc, &explicit).map_err(|e| {
            let offset = e.labels().and_then(|mut l| l.next()).map_or(0, |l| l.offset());
            let original = offset - inserted.iter().filter(|&&at| at < offset).count();
            let (line, column) = line_column(text, original);
            ConfigError::Parse { path: path.to_path_buf(), line, column, message: e.to_string() }
        })?
    };
    let config: pb::ModelConfig = message
        .transcode_to()
        .map_err(|e| ConfigError::Invalid { path: path.to_path_buf(), message: e.to_string() })?;
    let mut ignored = Vec::new();
    ignored_fields(&message, "", &mut ignored);
    for key in config.parameters.keys() {
        if !ACTED_ON_PARAMETERS.contains(&key.as_str()) {
            ignored.push(format!("parameters.{key}"));
        }
    }
    let loaded = LoadedConfig { config, file: Some(path.to_path_buf()), ignored };
    validate(path, &loaded.config)?;
    Ok(loaded)
}

/// Writes the optional colon between a field name and a `[` list of messages
/// (`input [ { ... } ]`, as every Triton configuration writes it), which the
/// text-format grammar allows but prost-reflect's parser requires. Strings and
/// `#` comments are copied untouched. Returns the text and the offsets (in the
/// new text) of the colons it inserted, so error positions map back.
fn explicit_list_colons(text: &str) -> (String, Vec<usize>) {
    let mut out = String::with_capacity(text.len() + 16);
    let mut inserted = Vec::new();
    let mut chars = text.chars().peekable();
    // Whether the last token was an identifier (a field name when a `[` follows).
    let mut after_ident = false;
    while let Some(c) = chars.next() {
        match c {
            '"' | '\'' => {
                out.push(c);
                while let Some(d) = chars.next() {
                    out.push(d);
                    if d == '\\' {
                        if let Some(e) = chars.next() {
                            out.push(e);
                        }
                    } else if d == c || d == '\n' {
                        break;
                    }
                }
                after_ident = false;
            }
            '#' => {
                out.push(c);
                for d in chars.by_ref() {
                    out.push(d);
                    if d == '\n' {
                        break;
                    }
                }
            }
            '[' if after_ident => {
                inserted.push(out.len());
                out.push(':');
                out.push(c);
                after_ident = false;
            }
            c if c.is_ascii_alphanumeric() || c == '_' => {
                out.push(c);
                while let Some(&d) = chars.peek().filter(|d| d.is_ascii_alphanumeric() || **d == '_' || **d == '.') {
                    out.push(d);
                    chars.next();
                }
                after_ident = c.is_ascii_alphabetic() || c == '_';
            }
            c if c.is_whitespace() => out.push(c),
            c => {
                out.push(c);
                after_ident = false;
            }
        }
    }
    (out, inserted)
}

/// 1-based line and column of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// Collects the set fields below `prefix` that [`ACTED_ON`] does not cover.
fn ignored_fields(message: &DynamicMessage, prefix: &str, out: &mut Vec<String>) {
    for (field, value) in message.fields() {
        let path = if prefix.is_empty() { field.name().to_string() } else { format!("{prefix}.{}", field.name()) };
        if ACTED_ON.contains(&path.as_str()) {
            continue;
        }
        let parent = format!("{path}.");
        if !ACTED_ON.iter().any(|a| a.starts_with(&parent)) {
            if !out.contains(&path) {
                out.push(path);
            }
            continue;
        }
        let children: Vec<&DynamicMessage> = match value {
            Value::Message(m) => vec![m],
            Value::List(items) => items.iter().filter_map(Value::as_message).collect(),
            _ => Vec::new(),
        };
        for child in children {
            ignored_fields(child, &path, out);
        }
    }
}

/// Largest configuration accepted, from a file or a load request (bytes).
/// A load request's override also travels to every engine worker and is
/// replayed to restarted ones, so it stays far below any framing limit.
pub const MAX_CONFIG_BYTES: usize = tandem_shared::process::control::MAX_MODEL_CONFIG_BYTES;

/// Bounds on the numbers of a configuration: a model asking for more is
/// unavailable with its reason, never a reason for a worker to run out of
/// threads or memory.
pub mod limits {
    /// Largest `max_batch_size`.
    pub const MAX_BATCH_SIZE: i32 = 1 << 16;
    /// Most inputs, and most outputs, a configuration lists.
    pub const TENSORS: usize = 4096;
    /// Most dimensions of one tensor.
    pub const RANK: usize = 64;
    /// Largest single dimension.
    pub const DIM: i64 = (1 << 31) - 1;
    /// Most sessions of one model (the sum of `instance_group` counts).
    pub const INSTANCES: i64 = 64;
    /// Most threads one session's pool may have (`intra_op_thread_count`, `inter_op_thread_count`).
    pub const THREADS: usize = 256;
    /// Most threads all sessions of one model may have together.
    pub const MODEL_THREADS: usize = 1024;
    /// Longest `max_queue_delay_microseconds` (one minute).
    pub const QUEUE_DELAY_US: u64 = 60_000_000;
    /// Most entries of a list of numbers (preferred batch sizes, versions) or of `parameters`.
    pub const LIST: usize = 1024;
    /// Longest name or file name.
    pub const NAME: usize = 1024;
}

/// Checks the values a parser cannot: ranges and choices.
fn validate(path: &Path, c: &pb::ModelConfig) -> Result<(), ConfigError> {
    use limits::*;
    let invalid = |message: String| Err(ConfigError::Invalid { path: path.to_path_buf(), message });
    if c.max_batch_size < 0 || c.max_batch_size > MAX_BATCH_SIZE {
        return invalid(format!(
            "max_batch_size is {}; it must be 0 (no batching) to {MAX_BATCH_SIZE}",
            c.max_batch_size
        ));
    }
    if c.input.len() > TENSORS || c.output.len() > TENSORS {
        return invalid(format!("at most {TENSORS} inputs and {TENSORS} outputs may be configured"));
    }
    let names = [("name", &c.name), ("default_model_filename", &c.default_model_filename)];
    let labels = c.output.iter().map(|o| ("output label_filename", &o.label_filename));
    let tensors =
        c.input.iter().map(|i| ("input name", &i.name)).chain(c.output.iter().map(|o| ("output name", &o.name)));
    if let Some((field, _)) = names.into_iter().chain(labels).chain(tensors).find(|(_, v)| v.len() > NAME) {
        return invalid(format!("{field} is longer than {NAME} bytes"));
    }
    if c.parameters.len() > LIST {
        return invalid(format!("at most {LIST} parameters may be given"));
    }
    let reshapes = c
        .input
        .iter()
        .filter_map(|i| i.reshape.as_ref().map(|r| (&i.name, &r.shape)))
        .chain(c.output.iter().filter_map(|o| o.reshape.as_ref().map(|r| (&o.name, &r.shape))));
    let shapes = c.input.iter().map(|i| (&i.name, &i.dims)).chain(c.output.iter().map(|o| (&o.name, &o.dims)));
    for (name, dims) in shapes.chain(reshapes) {
        if dims.len() > RANK {
            return invalid(format!("{name}: {} dimensions; at most {RANK}", dims.len()));
        }
        if let Some(d) = dims.iter().find(|&&d| d > DIM) {
            return invalid(format!("{name}: dimension {d} is larger than {DIM}"));
        }
    }
    if let Some(d) = c.dynamic_batching() {
        if d.preferred_batch_size.len() > LIST {
            return invalid(format!("dynamic_batching.preferred_batch_size lists more than {LIST} sizes"));
        }
        if d.max_queue_delay_microseconds > QUEUE_DELAY_US {
            return invalid(format!(
                "dynamic_batching.max_queue_delay_microseconds {} is more than {QUEUE_DELAY_US} (one minute)",
                d.max_queue_delay_microseconds
            ));
        }
        if let Some(n) =
            d.preferred_batch_size.iter().find(|&&n| n < 1 || (c.max_batch_size > 0 && n > c.max_batch_size))
        {
            return invalid(format!(
                "dynamic_batching.preferred_batch_size {n} must be 1-{} (max_batch_size)",
                c.max_batch_size
            ));
        }
    }
    let platform_ok = matches!(c.platform.as_str(), "" | "onnxruntime_onnx");
    if !platform_ok {
        return invalid(format!(
            "platform {:?} is not served by tandem; it serves ONNX models: platform \"onnxruntime_onnx\", or backend \"onnxruntime\" or \"tract\"",
            c.platform
        ));
    }
    if !matches!(c.backend.as_str(), "" | "onnxruntime" | "tract") {
        return invalid(format!(
            "backend {:?} is not served by tandem; it has the \"onnxruntime\" and \"tract\" backends",
            c.backend
        ));
    }
    for (kind, name, dims) in
        c.input.iter().map(|i| ("input", &i.name, &i.dims)).chain(c.output.iter().map(|o| ("output", &o.name, &o.dims)))
    {
        if name.is_empty() {
            return invalid(format!("an {kind} has no name"));
        }
        if let Some(d) = dims.iter().find(|&&d| d < -1) {
            return invalid(format!("{kind} {name}: dimension {d} is not allowed (-1 is any size)"));
        }
    }
    if let Some(pb::model_version_policy::PolicyChoice::Latest(l)) =
        c.version_policy.as_ref().and_then(|p| p.policy_choice.as_ref())
    {
        if l.num_versions == 0 || l.num_versions as usize > LIST {
            return invalid(format!("version_policy latest: num_versions must be 1-{LIST}"));
        }
    }
    if let Some(pb::model_version_policy::PolicyChoice::Specific(s)) =
        c.version_policy.as_ref().and_then(|p| p.policy_choice.as_ref())
    {
        if s.versions.len() > LIST {
            return invalid(format!("version_policy specific: at most {LIST} versions"));
        }
    }
    if let Some(g) = c.instance_group.iter().find(|g| g.count < 0) {
        return invalid(format!("instance_group count {} must be 1 or more", g.count));
    }
    let instances: i64 = c.instance_group.iter().map(|g| i64::from(g.count.max(1))).sum::<i64>().max(1);
    if c.instance_group.len() as i64 > INSTANCES || instances > INSTANCES {
        return invalid(format!("instance_group asks for {instances} instances; at most {INSTANCES} per model"));
    }
    if let Some(p) = c.parameters.get(MAX_INFLIGHT) {
        match p.string_value.trim().parse::<usize>() {
            Ok(n) if (1..=MAX_INFLIGHT_LIMIT).contains(&n) => {}
            _ => {
                return invalid(format!(
                    "parameters {MAX_INFLIGHT}: {:?} is not a request count from 1 to {MAX_INFLIGHT_LIMIT}",
                    p.string_value
                ))
            }
        }
    }
    for key in ACTED_ON_PARAMETERS.iter().filter(|k| **k != MAX_INFLIGHT) {
        if let Some(p) = c.parameters.get(*key) {
            match p.string_value.trim().parse::<usize>() {
                Ok(n) if n <= THREADS => {}
                Ok(n) => return invalid(format!("parameters {key}: {n} threads; at most {THREADS}")),
                Err(_) => return invalid(format!("parameters {key}: {:?} is not a thread count", p.string_value)),
            }
        }
    }
    let per_session = c.thread_parameter("intra_op_thread_count").max(1) + c.thread_parameter("inter_op_thread_count");
    if per_session * instances as usize > MODEL_THREADS {
        return invalid(format!(
            "{instances} instances of {per_session} threads each: more than {MODEL_THREADS} threads for one model"
        ));
    }
    Ok(())
}

impl pb::ModelConfig {
    /// The `dynamic_batching` section, when the scheduling choice is dynamic batching.
    pub fn dynamic_batching(&self) -> Option<&pb::ModelDynamicBatching> {
        match &self.scheduling_choice {
            Some(pb::model_config::SchedulingChoice::DynamicBatching(d)) => Some(d),
            _ => None,
        }
    }

    /// `max_inflight`, when given (checked at load).
    pub fn max_inflight(&self) -> Option<usize> {
        self.parameters.get(MAX_INFLIGHT).and_then(|p| p.string_value.trim().parse().ok())
    }

    /// A thread-count parameter (`intra_op_thread_count`, ...), 0 meaning "default".
    pub fn thread_parameter(&self, key: &str) -> usize {
        self.parameters.get(key).and_then(|p| p.string_value.trim().parse().ok()).unwrap_or(0)
    }
}

/// What a version is served with, as Triton answers `GET /v2/models/{m}/config`
/// (its auto-completed configuration): the configuration given, with what it
/// left out filled in from the model and the defaults tandem applies — name,
/// platform and backend, `max_batch_size`, every input and output with its
/// type and dimensions (without the batch dimension), the version policy, the
/// instance group and the default model file.
pub struct Served<'a> {
    /// The folder's name.
    pub name: &'a str,
    /// The backend that runs it.
    pub backend: &'a str,
    /// The batch size in force (auto-completed when the configuration has none).
    pub max_batch_size: usize,
    /// The inputs as clients send them.
    pub inputs: &'a [super::TensorMeta],
    /// The outputs as clients receive them.
    pub outputs: &'a [super::TensorMeta],
    /// Whether it runs on a GPU.
    pub gpu: bool,
}

/// The effective configuration of a version (see [`Served`]).
pub fn effective(given: &pb::ModelConfig, served: &Served<'_>) -> pb::ModelConfig {
    let mut c = given.clone();
    c.name = served.name.to_string();
    if c.platform.is_empty() {
        c.platform = "onnxruntime_onnx".into();
    }
    if c.backend.is_empty() {
        c.backend = served.backend.to_string();
    }
    c.max_batch_size = i32::try_from(served.max_batch_size).unwrap_or(i32::MAX);
    let skip = usize::from(served.max_batch_size > 0);
    let data_type =
        |m: &super::TensorMeta| pb::DataType::from_str_name(&m.datatype.triton_name()).map_or(0, |d| d as i32);
    let dims = |m: &super::TensorMeta| m.shape.iter().skip(skip).copied().collect::<Vec<i64>>();
    // Inputs and outputs are two message types with the same three fields to complete.
    macro_rules! complete {
        ($listed:expr, $served:expr, $message:ident) => {
            for m in $served {
                match $listed.iter_mut().find(|t| t.name == m.name) {
                    Some(t) => {
                        if t.data_type == pb::DataType::TypeInvalid as i32 {
                            t.data_type = data_type(m);
                        }
                        if t.dims.is_empty() {
                            t.dims = dims(m);
                        }
                    }
                    None => $listed.push(pb::$message {
                        name: m.name.clone(),
                        data_type: data_type(m),
                        dims: dims(m),
                        ..Default::default()
                    }),
                }
            }
        };
    }
    complete!(c.input, served.inputs, ModelInput);
    complete!(c.output, served.outputs, ModelOutput);
    if c.version_policy.is_none() {
        c.version_policy = Some(pb::ModelVersionPolicy {
            policy_choice: Some(pb::model_version_policy::PolicyChoice::Latest(pb::model_version_policy::Latest {
                num_versions: 1,
            })),
        });
    }
    let kind = if served.gpu { pb::model_instance_group::Kind::Gpu } else { pb::model_instance_group::Kind::Cpu };
    if c.instance_group.is_empty() {
        c.instance_group.push(pb::ModelInstanceGroup { count: 1, kind: kind as i32, ..Default::default() });
    }
    for (n, g) in c.instance_group.iter_mut().enumerate() {
        if g.name.is_empty() {
            g.name = format!("{}_{n}", served.name);
        }
        if g.kind == pb::model_instance_group::Kind::Auto as i32 {
            g.kind = kind as i32;
        }
        g.count = g.count.max(1);
    }
    if c.default_model_filename.is_empty() {
        c.default_model_filename = "model.onnx".into();
    }
    c
}

/// A configuration as JSON the way Triton writes it: protobuf's JSON mapping
/// with the proto's field names, every field (defaults too), enums by name and
/// 64-bit integers as numbers.
pub fn to_json(config: &pb::ModelConfig) -> serde_json::Value {
    let bytes = prost::Message::encode_to_vec(config);
    let Ok(message) = DynamicMessage::decode(descriptor(), bytes.as_slice()) else {
        return serde_json::Value::Null;
    };
    let options = prost_reflect::SerializeOptions::new()
        .use_proto_field_name(true)
        .stringify_64_bit_integers(false)
        .skip_default_fields(false);
    message.serialize_with_options(serde_json::value::Serializer, &options).unwrap_or(serde_json::Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pbtxt(text: &str) -> Result<LoadedConfig, ConfigError> {
        parse(Path::new("/repo/m/config.pbtxt"), text)
    }

    #[test]
    fn a_triton_config_parses_with_its_ignored_fields_listed() {
        let c = pbtxt(
            r#"
name: "resnet"
platform: "onnxruntime_onnx"
max_batch_size: 8
version_policy: { latest: { num_versions: 2 } }
input [
  { name: "x", data_type: TYPE_FP32, format: FORMAT_NCHW, dims: [ 3, -1, -1 ] }
]
output [
  { name: "y", data_type: TYPE_FP32, dims: [ 1000 ], label_filename: "labels.txt" }
]
instance_group [ { count: 2, kind: KIND_CPU } ]
dynamic_batching { preferred_batch_size: [ 4, 8 ] max_queue_delay_microseconds: 100 preserve_ordering: true }
parameters { key: "intra_op_thread_count" value: { string_value: "1" } }
parameters { key: "cudnn_conv_algo_search" value: { string_value: "0" } }
"#,
        )
        .expect("parses");
        assert_eq!(c.config.name, "resnet");
        assert_eq!(c.config.max_batch_size, 8);
        assert_eq!(c.config.input[0].dims, [3, -1, -1]);
        assert_eq!(c.config.input[0].data_type, pb::DataType::TypeFp32 as i32);
        assert_eq!(c.config.output[0].label_filename, "labels.txt");
        assert_eq!(c.config.instance_group[0].count, 2);
        assert_eq!(c.config.thread_parameter("intra_op_thread_count"), 1);
        assert_eq!(
            c.ignored,
            ["input.format", "dynamic_batching.preserve_ordering", "parameters.cudnn_conv_algo_search"]
        );
    }

    #[test]
    fn a_misspelled_field_names_file_line_and_field() {
        let err = pbtxt("name: \"m\"\nmax_batch_size: 4\ninput [ { name: \"x\" dimz: [1] } ]\n").expect_err("typo");
        let text = err.to_string();
        assert!(text.starts_with("/repo/m/config.pbtxt:3:"), "{text}");
        assert!(text.contains("dimz"), "{text}");
        let err = pbtxt("max_batch_sise: 4").expect_err("typo");
        assert!(err.to_string().contains(":1:1: field 'max_batch_sise' not found"), "{err}");
    }

    #[test]
    fn the_json_twin_parses_and_refuses_unknown_fields() {
        let path = Path::new("/repo/m/config.json");
        let c = parse(
            path,
            r#"{"name":"m","max_batch_size":4,"input":[{"name":"x","data_type":"TYPE_INT64","dims":["-1"]}]}"#,
        )
        .expect("json");
        assert_eq!(c.config.input[0].data_type, pb::DataType::TypeInt64 as i32);
        assert_eq!(c.config.input[0].dims, [-1]);
        let err = parse(path, "{\"name\":\"m\",\n\"labels\":[]}").expect_err("unknown");
        assert!(err.to_string().contains("config.json:2:"), "{err}");
        assert!(err.to_string().contains("labels"), "{err}");
    }

    #[test]
    fn values_are_checked() {
        for (text, want) in [
            ("max_batch_size: -1", "max_batch_size"),
            ("platform: \"tensorrt_plan\"", "tensorrt_plan"),
            ("backend: \"python\"", "python"),
            ("input [ { name: \"x\" dims: [ -2 ] } ]", "dimension -2"),
            ("version_policy { latest { num_versions: 0 } }", "num_versions"),
            ("parameters { key: \"intra_op_thread_count\" value { string_value: \"many\" } }", "thread count"),
            ("parameters { key: \"intra_op_thread_count\" value { string_value: \"100000\" } }", "at most 256"),
            ("parameters { key: \"max_inflight\" value { string_value: \"0\" } }", "request count from 1"),
            ("parameters { key: \"max_inflight\" value { string_value: \"lots\" } }", "request count from 1"),
            ("instance_group [ { count: 1000000 } ]", "at most 64 per model"),
            ("instance_group [ { count: 40 }, { count: 40 } ]", "80 instances"),
            (
                "instance_group [ { count: 64 } ] parameters { key: \"intra_op_thread_count\" value { string_value: \"64\" } }",
                "more than 1024 threads",
            ),
            ("max_batch_size: 2000000000", "max_batch_size"),
            ("input [ { name: \"x\" dims: [ 99999999999 ] } ]", "larger than"),
            ("dynamic_batching { max_queue_delay_microseconds: 999999999999 }", "one minute"),
            ("version_policy { latest { num_versions: 4000000000 } }", "num_versions"),
        ] {
            let err = pbtxt(text).expect_err(text);
            assert!(err.to_string().contains(want), "{want} not in {err}");
        }
    }

    #[test]
    fn no_file_is_all_defaults() {
        let dir = tempfile::tempdir().expect("tmp");
        let c = read(dir.path()).expect("defaults");
        assert!(c.file.is_none());
        assert_eq!(c.config.max_batch_size, 0);
    }

    #[test]
    fn lists_of_messages_need_no_colon() {
        let (text, at) = explicit_list_colons("input [ { name: \"a [b\" } ] # x [y\ndims: [1]\nf[");
        assert_eq!(text, "input :[ { name: \"a [b\" } ] # x [y\ndims: [1]\nf:[");
        assert_eq!(at, [6, text.len() - 2]);
        let c =
            pbtxt("input [ { name: \"x\" dims: [ 2 ] }, { name: \"y\" } ]\noutput [{ name: \"z\" }]").expect("lists");
        assert_eq!(c.config.input.len(), 2);
        assert_eq!(c.config.output[0].name, "z");
        // Positions after an inserted colon still point into the original text.
        let err = pbtxt("input [ { name: \"x\" }, { nme: \"y\" } ]").expect_err("typo");
        assert!(err.to_string().contains(":1:26:"), "{err}");
    }

    #[test]
    fn line_column_counts_from_one() {
        assert_eq!(line_column("ab\ncd", 0), (1, 1));
        assert_eq!(line_column("ab\ncd", 4), (2, 2));
    }
}
