use kisara_api::{codes, ErrorBody};

/// Everything a call to the Kisara API can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The server answered with a non-2xx status. `code` is the stable machine-readable code of
    /// [`kisara_api::ErrorBody`]; for an answer that was not such a body (a proxy's HTML page, a
    /// plain-text panic) it is derived from the status and `message` holds the body's text.
    #[error("{message} ({code}, HTTP {status})")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
    /// The request could not be sent or the answer could not be read.
    #[error("cannot reach the Kisara server: {0}")]
    Transport(#[source] reqwest::Error),
    /// No answer within the client's timeout (for streaming calls: no response head in time).
    #[error("the Kisara server did not answer in time")]
    Timeout,
    /// A 2xx answer whose body is not what the API promises.
    #[error("cannot decode the server's answer: {0}")]
    Decode(#[source] serde_json::Error),
    /// The base URL, or a URL built from it and an id, is not usable.
    #[error("invalid URL: {0}")]
    InvalidUrl(String),
}

impl Error {
    /// The HTTP status of an [`Error::Api`].
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::Api { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The API error code (`not_found`, `pool_exhausted`, ...) of an [`Error::Api`].
    pub fn code(&self) -> Option<&str> {
        match self {
            Error::Api { code, .. } => Some(code),
            _ => None,
        }
    }

    /// Whether the server said the object does not exist.
    pub fn is_not_found(&self) -> bool {
        self.code() == Some(codes::NOT_FOUND)
    }

    pub(crate) fn from_reqwest(e: reqwest::Error) -> Error {
        if e.is_timeout() {
            Error::Timeout
        } else {
            Error::Transport(e)
        }
    }

    /// Builds the error for a non-2xx answer from its status and body.
    pub(crate) fn from_response(status: u16, body: &[u8]) -> Error {
        if let Ok(ErrorBody { error }) = serde_json::from_slice::<ErrorBody>(body) {
            return Error::Api {
                status,
                code: error.code,
                message: error.message,
            };
        }
        let text = String::from_utf8_lossy(body);
        let text = text.trim();
        let message = if text.is_empty() {
            format!("HTTP {status} with an empty body")
        } else {
            truncate(text, MAX_MESSAGE).to_string()
        };
        Error::Api {
            status,
            code: code_for_status(status),
            message,
        }
    }
}

/// Longest message kept from a body that is not an [`ErrorBody`] (an HTML page can be long).
const MAX_MESSAGE: usize = 512;

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The code the server would have used for this status, so callers can match on `code()`
/// whether or not the body was an [`ErrorBody`].
fn code_for_status(status: u16) -> String {
    match status {
        400 => codes::BAD_REQUEST.into(),
        401 => codes::UNAUTHORIZED.into(),
        403 => codes::FORBIDDEN.into(),
        404 => codes::NOT_FOUND.into(),
        409 => codes::CONFLICT.into(),
        504 => codes::TIMEOUT.into(),
        500 => codes::INTERNAL.into(),
        s => format!("http_{s}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_error_body() {
        let e = Error::from_response(
            409,
            br#"{"error":{"code":"pool_exhausted","message":"no free subnet in 10.200.0.0/16"}}"#,
        );
        assert_eq!(e.status(), Some(409));
        assert_eq!(e.code(), Some("pool_exhausted"));
        match &e {
            Error::Api { message, .. } => assert_eq!(message, "no free subnet in 10.200.0.0/16"),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            e.to_string(),
            "no free subnet in 10.200.0.0/16 (pool_exhausted, HTTP 409)"
        );
    }

    #[test]
    fn non_json_body_keeps_status_and_text() {
        let e = Error::from_response(502, b"  Bad Gateway\n");
        assert_eq!(e.status(), Some(502));
        assert_eq!(e.code(), Some("http_502"));
        assert!(e.to_string().starts_with("Bad Gateway ("), "{e}");

        let e = Error::from_response(404, b"<html>nope</html>");
        assert!(e.is_not_found());
        assert!(e.to_string().contains("<html>nope</html>"));
    }

    #[test]
    fn json_that_is_not_an_error_body_is_kept_as_text() {
        let e = Error::from_response(400, br#"{"detail":"x"}"#);
        assert_eq!(e.code(), Some("bad_request"));
        assert!(e.to_string().contains(r#"{"detail":"x"}"#));
    }

    #[test]
    fn empty_body_says_so() {
        let e = Error::from_response(401, b"");
        assert_eq!(e.code(), Some("unauthorized"));
        assert!(e.to_string().contains("empty body"), "{e}");
    }

    #[test]
    fn long_bodies_are_truncated_on_a_char_boundary() {
        let body = "é".repeat(MAX_MESSAGE);
        let e = Error::from_response(500, body.as_bytes());
        match e {
            Error::Api { message, .. } => assert!(message.len() <= MAX_MESSAGE),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn other_variants_have_no_status_or_code() {
        assert_eq!(Error::Timeout.status(), None);
        assert_eq!(Error::Timeout.code(), None);
        assert_eq!(Error::InvalidUrl("x".into()).code(), None);
    }
}
