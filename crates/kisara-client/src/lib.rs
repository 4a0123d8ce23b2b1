//! Typed async SDK for the Kisara HTTP API
