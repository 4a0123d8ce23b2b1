//! Kisara's embedded SQLite store: nodes, containers, networks, tokens and allocations
