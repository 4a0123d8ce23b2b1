use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The body of every non-2xx answer: `{"error":{"code":"...","message":"..."}}`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct ErrorDetail {
    /// A stable machine-readable code, e.g. `bad_request`, `not_found`, `pool_exhausted`.
    pub code: String,
    /// A human-readable message naming what was wrong.
    pub message: String,
}

impl ErrorBody {
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        ErrorBody {
            error: ErrorDetail {
                code: code.into(),
                message: message.into(),
            },
        }
    }
}

/// Stable error codes. The HTTP status is chosen from the code at the API edge.
pub mod codes {
    pub const BAD_REQUEST: &str = "bad_request";
    pub const UNAUTHORIZED: &str = "unauthorized";
    pub const FORBIDDEN: &str = "forbidden";
    pub const NOT_FOUND: &str = "not_found";
    pub const CONFLICT: &str = "conflict";
    pub const POOL_EXHAUSTED: &str = "pool_exhausted";
    /// A lifecycle limit is hit: per-owner quota, one per challenge, global cap, renewals.
    pub const QUOTA_EXCEEDED: &str = "quota_exceeded";
    pub const NO_NODE: &str = "no_node_available";
    pub const NODE_UNAVAILABLE: &str = "node_unavailable";
    pub const RUNTIME: &str = "runtime_error";
    pub const TIMEOUT: &str = "timeout";
    pub const INTERNAL: &str = "internal";
}
