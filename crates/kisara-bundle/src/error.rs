//! What can go wrong with a bundle. The binary adds context; the server maps variants to codes.

use std::path::PathBuf;

/// An error of the bundle library.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// A Kisarafile that cannot be read as one; names the file and the line.
    #[error("{}:{line}: {message}", file.display())]
    Kisarafile {
        file: PathBuf,
        line: usize,
        message: String,
    },
    /// A `RUN` step that exited non-zero.
    #[error("{}:{line}: RUN {command:?} failed: {message}", file.display())]
    RunFailed {
        file: PathBuf,
        line: usize,
        command: String,
        message: String,
    },
    /// An app file (compose file or Kisara service spec) that cannot be used.
    #[error("app {app} ({path}): {message}")]
    App {
        app: String,
        path: String,
        message: String,
    },
    /// An image the build needs that neither the engine has nor a registry gave.
    #[error("image {reference} cannot be had: {message}")]
    ImageUnavailable { reference: String, message: String },
    #[error("bundle {0} not found")]
    NotFound(String),
    #[error("invalid bundle name {name:?}: {why}")]
    InvalidName { name: String, why: String },
    /// A bundle archive or store entry that fails its checks (missing, short, or tampered).
    #[error("corrupt bundle: {0}")]
    Corrupt(String),
    #[error("invalid input: {0}")]
    Invalid(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error("container engine: {0}")]
    Runtime(#[from] kisara_runtime::RuntimeError),
    #[error("registry {reference}: {message}")]
    Registry { reference: String, message: String },
}

pub type Result<T, E = BundleError> = std::result::Result<T, E>;

/// Adds what was being done to an I/O error.
pub(crate) trait IoContext<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for std::result::Result<T, std::io::Error> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| BundleError::Io {
            context: context(),
            source,
        })
    }
}
