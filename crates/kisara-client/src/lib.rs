//! Typed async SDK for the Kisara HTTP API.
//!
//! Kisara is a cluster-level Docker: a server drives the Docker Engines of its nodes. This crate
//! is how a program (a CTF platform, a script, the `kisara` CLI itself) talks to that server. It
//! depends on the wire types in [`kisara_api`] and on nothing else of Kisara.
//!
//! Every call has a timeout (30 s unless [`ClientBuilder::timeout`] says otherwise); the
//! streaming calls ([`Client::logs`], [`Client::pull_image`]) apply it to the response head only,
//! so a followed log or a long pull is not cut off. A non-2xx answer becomes [`Error::Api`] with
//! the server's error code.
//!
//! ```no_run
//! use kisara_client::{Client, ExecRequest, LaunchRequest};
//!
//! # async fn demo() -> Result<(), kisara_client::Error> {
//! let client = Client::new("http://127.0.0.1:7474", Some("my-token".into()))?;
//!
//! // A challenge instance for team 42, port 80 published to the players.
//! let container = client
//!     .launch(&LaunchRequest {
//!         image: "web-challenge:latest".into(),
//!         owner: Some("42".into()),
//!         module: Some("web1".into()),
//!         ports: vec!["80/tcp".into()],
//!         ..Default::default()
//!     })
//!     .await?;
//! println!("team 42 connects to {}", container.host_port);
//!
//! // Plant the flag.
//! let result = client
//!     .exec(
//!         &container.id,
//!         &ExecRequest {
//!             cmd: vec!["sh".into(), "-c".into(), "echo flag{x} > /flag".into()],
//!             timeout_secs: Some(10),
//!             ..Default::default()
//!         },
//!     )
//!     .await?;
//! assert_eq!(result.exit_code, Some(0));
//!
//! client.stop(&container.id).await?; // stops and removes
//! # Ok(())
//! # }
//! ```

mod bundles;
mod client;
mod error;
mod events;
mod instances;
mod ndjson;
mod services;

pub use bundles::BundleLoadStream;
pub use client::{ByteStream, Client, ClientBuilder, PullStream, DEFAULT_TIMEOUT};
pub use error::Error;
pub use events::{EventStream, HookHandle, Hooks};

/// The wire types, re-exported so that users need not depend on `kisara-api` themselves.
pub use kisara_api::{
    codes, container::*, events::kinds, image::*, instance::*, labels, network::*, node::*,
    service::*, CreateWebhookRequest, DeliveryAttempt, DeliveryState, ErrorBody, ErrorDetail,
    Event, EventQuery, Health, ListResponse, NodeError, Webhook, WebhookDelivery,
};

pub type Result<T, E = Error> = std::result::Result<T, E>;
