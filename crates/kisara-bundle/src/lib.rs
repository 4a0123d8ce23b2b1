//! Cluster images (bundles).
