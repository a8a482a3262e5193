//! The repository API's handlers (`POST /v2/repository/models/{m}/load` and
//! `/unload`): they read the request and hand the change to
//! [`crate::model_control::ModelControl`], which carries it to the supervisor.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use tandem_config::engine::ModelControlMode;
use tandem_shared::process::control::{ModelChange, MAX_MODEL_CONFIG_BYTES};

use crate::infer::ApiError;
use crate::state::{error, read_body, AppState};

fn refused(mode: ModelControlMode) -> Option<ApiError> {
    (mode != ModelControlMode::Explicit).then(|| {
        ApiError::bad(format!(
            "model load and unload need MODEL_CONTROL_MODE=explicit (it is {})",
            match mode {
                ModelControlMode::None => "none",
                ModelControlMode::Poll => "poll: the repository is watched instead",
                ModelControlMode::Explicit => "explicit",
            }
        ))
    })
}

/// Carries a load or unload to the supervisor and waits for its outcome:
/// what both faces of the protocol do once they have read the request.
pub(crate) async fn change(state: &AppState, change: ModelChange) -> Result<(), ApiError> {
    let mc = state.model_control();
    if let Some(e) = refused(mc.mode) {
        return Err(e);
    }
    if let ModelChange::Unload { model } = &change {
        if !state.engine().models().contains_key(model) {
            return Err(ApiError::bad(format!("unknown model {model:?}")));
        }
    }
    mc.request(change).await
}

/// The configuration override of a load request (Triton's `parameters.config`,
/// a JSON string), or the status and reason it is refused with.
fn config_of(body: &[u8]) -> Result<Option<String>, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| ApiError::bad(format!("the load request is not JSON: {e}")))?;
    let Some(params) = v.get("parameters") else { return Ok(None) };
    let params = params.as_object().ok_or_else(|| ApiError::bad("\"parameters\" must be an object"))?;
    config_param(params)
}

/// The configuration override among a load request's parameters (`config`,
/// a JSON string); model files sent in the request (`file:...`) are refused.
pub(crate) fn config_param(params: &serde_json::Map<String, serde_json::Value>) -> Result<Option<String>, ApiError> {
    if let Some(k) = params.keys().find(|k| k.starts_with("file:")) {
        return Err(ApiError::bad(format!(
            "{:?}: loading model files sent in the request is not supported; place them in the repository",
            k.escape_debug().to_string()
        )));
    }
    match params.get("config") {
        None => Ok(None),
        Some(serde_json::Value::String(s)) if s.len() > MAX_MODEL_CONFIG_BYTES => Err(ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            message: format!(
                "\"parameters.config\" holds {} bytes; a configuration may hold at most {MAX_MODEL_CONFIG_BYTES}",
                s.len()
            ),
        }),
        Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(ApiError::bad("\"parameters.config\" must be a string holding the JSON model configuration")),
    }
}

/// `POST /v2/repository/models/{m}/load`.
pub(crate) async fn load(
    State(state): State<AppState>,
    Path(model): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    if let Some(e) = refused(state.model_control().mode) {
        return e.into_response();
    }
    let (body, _share) = match read_body(&headers, body, state.max_request_bytes(), state.budget()).await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let config = match config_of(&body) {
        Ok(c) => c,
        Err(e) => return error(e.status, e.message),
    };
    answer(change(&state, ModelChange::Load { model, config }).await)
}

/// `POST /v2/repository/models/{m}/unload`.
pub(crate) async fn unload(State(state): State<AppState>, Path(model): Path<String>) -> Response {
    answer(change(&state, ModelChange::Unload { model }).await)
}

fn answer(result: Result<(), ApiError>) -> Response {
    match result {
        Ok(()) => Json(json!({})).into_response(),
        Err(e) => error(e.status, e.message),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly by design")]
mod tests {
    use super::*;

    #[test]
    fn load_requests_carry_a_config_string_or_nothing() {
        assert_eq!(config_of(b"").unwrap(), None);
        assert_eq!(config_of(br#"{}"#).unwrap(), None);
        assert_eq!(
            config_of(br#"{"parameters":{"config":"{\"max_batch_size\":4}"}}"#).unwrap().unwrap(),
            r#"{"max_batch_size":4}"#
        );
        assert!(config_of(br#"{"parameters":{"config":{"a":1}}}"#).is_err());
        assert!(config_of(br#"{"parameters":{"file:1/model.onnx":"AAAA"}}"#)
            .unwrap_err()
            .message
            .contains("not supported"));
        assert!(config_of(b"nope").is_err());
        let big = serde_json::json!({"parameters": {"config": "x".repeat(MAX_MODEL_CONFIG_BYTES + 1)}}).to_string();
        assert_eq!(config_of(big.as_bytes()).unwrap_err().status, StatusCode::PAYLOAD_TOO_LARGE);
    }
}
