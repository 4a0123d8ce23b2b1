//! Pure domain logic of Kisara: config, port specs, subnet pools, container policy, scheduling
