//! API errors: internal errors become HTTP status codes here, at the edge, and nowhere else.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use kisara_api::{codes, ErrorBody, ErrorDetail};

/// An error answered to an API client as `{"error":{"code","message"}}`.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: String,
    pub message: String,
}

pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code: code.to_string(),
            message: message.into(),
        }
    }
    pub fn bad_request(m: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, codes::BAD_REQUEST, m)
    }
    pub fn not_found(m: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, codes::NOT_FOUND, m)
    }
    pub fn conflict(m: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, codes::CONFLICT, m)
    }
    pub fn forbidden(m: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, codes::FORBIDDEN, m)
    }
    pub fn unauthorized(m: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, codes::UNAUTHORIZED, m)
    }
    pub fn exhausted(m: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, codes::POOL_EXHAUSTED, m)
    }
    /// 409: a lifecycle limit (quota, one per challenge, global cap, renewals) is hit.
    pub fn quota(m: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, codes::QUOTA_EXCEEDED, m)
    }
    pub fn no_node(m: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, codes::NO_NODE, m)
    }
    pub fn node_unavailable(m: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, codes::NODE_UNAVAILABLE, m)
    }
    pub fn internal(m: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, codes::INTERNAL, m)
    }

    /// Rebuilds an error an agent sent back, choosing the status from its code.
    pub fn from_body(body: ErrorBody) -> Self {
        let status = status_for_code(&body.error.code);
        ApiError {
            status,
            code: body.error.code,
            message: body.error.message,
        }
    }

    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                code: self.code.clone(),
                message: self.message.clone(),
            },
        }
    }
}

/// The status that goes with each stable error code.
pub fn status_for_code(code: &str) -> StatusCode {
    match code {
        codes::BAD_REQUEST => StatusCode::BAD_REQUEST,
        codes::UNAUTHORIZED => StatusCode::UNAUTHORIZED,
        codes::FORBIDDEN => StatusCode::FORBIDDEN,
        codes::NOT_FOUND => StatusCode::NOT_FOUND,
        codes::CONFLICT | codes::POOL_EXHAUSTED | codes::QUOTA_EXCEEDED | "subnet_overlap" => {
            StatusCode::CONFLICT
        }
        codes::NO_NODE | codes::NODE_UNAVAILABLE => StatusCode::SERVICE_UNAVAILABLE,
        codes::TIMEOUT => StatusCode::GATEWAY_TIMEOUT,
        codes::RUNTIME => StatusCode::BAD_GATEWAY,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.code)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::warn!(code = %self.code, message = %self.message, "request failed");
        }
        (self.status, Json(self.body())).into_response()
    }
}

impl From<kisara_core::CoreError> for ApiError {
    fn from(e: kisara_core::CoreError) -> Self {
        use kisara_core::CoreError as E;
        match e {
            E::Invalid(m) => ApiError::bad_request(m),
            E::Forbidden(m) => ApiError::forbidden(m),
            E::Conflict(m) => ApiError::conflict(m),
            E::Exhausted(m) => ApiError::exhausted(m),
            #[allow(unreachable_patterns)]
            other => ApiError::bad_request(other.to_string()),
        }
    }
}

impl From<kisara_store::StoreError> for ApiError {
    fn from(e: kisara_store::StoreError) -> Self {
        use kisara_store::StoreError as E;
        match e {
            E::NotFound(m) => ApiError::not_found(m),
            E::Conflict(m) => ApiError::conflict(m),
            E::Exhausted(m) => ApiError::exhausted(m),
            E::QuotaExceeded(m) => ApiError::quota(m),
            #[allow(unreachable_patterns)]
            other => ApiError::internal(format!("store: {other}")),
        }
    }
}
