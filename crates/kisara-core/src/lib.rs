//! Pure domain logic of Kisara: config, port specs, subnet pools, container policy.
//!
//! Nothing in here touches Docker, the network or the clock: every function takes plain data
//! and returns plain data (the only I/O is [`config::Config::load`], which reads one file), so
//! the rules that protect operators are table- and property-tested without a Docker host.
//! The server turns a [`CoreError`] into an HTTP status at its edge.

pub mod compose;
pub mod config;
pub mod error;
pub mod exposure;
pub mod flags;
pub mod ids;
pub mod instances;
pub mod policy;
pub mod pool;
pub mod ports;
pub mod scheduler;
pub mod service_config;
pub mod service_plan;

pub use error::{CoreError, Result};
