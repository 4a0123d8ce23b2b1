//! The data path of Kisara's port exposure: relays, meters, token buckets, UDP sessions,
//! datagram framing and the tunnel's HTTP upgrade.
//!
//! Rathole's design: the control channel (the agent's WebSocket) only asks for a data
//! connection; each visitor gets a fresh connection of its own that carries raw bytes, so a
//! slow visitor never holds up another, and the copy loop is the same whether the far end is a
//! container socket or a tunnel.

pub mod bucket;
pub mod frame;
pub mod relay;
pub mod udp;
pub mod upgrade;

pub use bucket::Bucket;
pub use relay::{relay, Direction, Meter};

/// Errors of the tunnel's handshake.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("the server refused the tunnel: {0}")]
    Refused(String),
    #[error("malformed answer from the server: {0}")]
    Protocol(String),
}
