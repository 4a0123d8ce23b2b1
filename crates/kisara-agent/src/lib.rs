//! The Kisara node agent: dials the server and serves its requests against the local runtime
