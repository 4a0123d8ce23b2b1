use thiserror::Error;

/// Errors of the domain rules. Each variant is a class the API edge maps to one status:
/// `Invalid` → 400, `Forbidden` → 403, `Conflict` → 409, `Exhausted` → 409.
///
/// Messages name the offending input (a port, an entry, a key) but never a value that may be
/// secret, such as an environment value carrying a flag.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CoreError {
    /// The input is malformed or out of range.
    #[error("{0}")]
    Invalid(String),
    /// The input is well formed but the server configuration does not allow it.
    #[error("{0}")]
    Forbidden(String),
    /// The input collides with something that exists.
    #[error("{0}")]
    Conflict(String),
    /// A pool (subnets, ports, slots) has nothing left.
    #[error("{0}")]
    Exhausted(String),
}

impl CoreError {
    /// The stable error code of [`kisara_api::codes`] for this class.
    pub fn code(&self) -> &'static str {
        use kisara_api::codes;
        match self {
            CoreError::Invalid(_) => codes::BAD_REQUEST,
            CoreError::Forbidden(_) => codes::FORBIDDEN,
            CoreError::Conflict(_) => codes::CONFLICT,
            CoreError::Exhausted(_) => codes::POOL_EXHAUSTED,
        }
    }

    pub(crate) fn invalid(msg: impl Into<String>) -> Self {
        CoreError::Invalid(msg.into())
    }

    pub(crate) fn forbidden(msg: impl Into<String>) -> Self {
        CoreError::Forbidden(msg.into())
    }
}

pub type Result<T, E = CoreError> = std::result::Result<T, E>;
