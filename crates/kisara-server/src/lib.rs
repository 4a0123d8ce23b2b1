//! The Kisara control plane: HTTP API, agent hub, scheduling and allocation
