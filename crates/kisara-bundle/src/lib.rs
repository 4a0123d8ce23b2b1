//! Cluster images ("bundles"): a whole multi-container application with every image it
//! needs, in one file, for delivery to sites without a registry.
//!
//! - [`kisarafile`]: the build recipe (`FROM`, `APP`, `IMAGE`, `RUN`, ...), pure.
//! - [`apps`]: compose files and Kisara service specs, read for their images and services.
//! - [`store`]: the local bundle store, itself an OCI image layout (`index.json`,
//!   `blobs/sha256/`), where every blob is kept once by digest; save, load, tag, remove.
//! - [`dockersave`]: turns the engine's `docker save` archive (legacy or OCI) into blobs, and
//!   [`store::Store::images_tar`] turns blobs back into a `docker load`-able stream.
//! - [`build`]: runs a Kisarafile against a container runtime.
//! - [`registry`]: push and pull bundles to and from an OCI registry.

pub mod apps;
pub mod build;
pub mod digest;
pub mod dockersave;
pub mod error;
pub mod kisarafile;
pub mod manifest;
pub mod oci;
pub mod registry;
pub mod store;

pub use digest::Digest;
pub use error::{BundleError, Result};
pub use manifest::{BundleManifest, ImageEntry};
pub use store::{BundleName, Store};
