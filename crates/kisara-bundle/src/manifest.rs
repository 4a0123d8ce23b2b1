//! The bundle manifest: the config blob of a bundle's top OCI manifest.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::apps::AppKind;
use crate::digest::Digest;
use crate::oci::Descriptor;

/// What a bundle is: its name, apps, launch plan, environment and every image with digests.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BundleManifest {
    pub name: String,
    pub version: String,
    /// Unix seconds.
    pub created: i64,
    /// The bundle this one was built `FROM`, if any.
    #[serde(default)]
    pub from: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub apps: Vec<AppEntry>,
    /// Apps `bundle up` launches, in order (empty: every app in `apps` order).
    #[serde(default)]
    pub launch: Vec<String>,
    /// Commands run on the operator's machine once the apps are up.
    #[serde(default)]
    pub cmd: Vec<Vec<String>>,
    #[serde(default)]
    pub images: Vec<ImageEntry>,
    /// The work tree (app files and what COPY and RUN made), a tar blob.
    #[serde(default)]
    pub files: Option<Descriptor>,
}

impl BundleManifest {
    /// The apps to launch, in order.
    pub fn launch_plan(&self) -> Vec<&AppEntry> {
        if self.launch.is_empty() {
            self.apps.iter().collect()
        } else {
            self.launch
                .iter()
                .filter_map(|n| self.apps.iter().find(|a| &a.name == n))
                .collect()
        }
    }

    /// Total size of the distinct image layers and configs.
    pub fn images_size(&self) -> u64 {
        let mut seen = std::collections::HashSet::new();
        self.images
            .iter()
            .flat_map(|i| std::iter::once(&i.config).chain(&i.layers))
            .filter(|d| seen.insert(d.digest.clone()))
            .map(|d| d.size)
            .sum()
    }
}

/// An app of the bundle: its file inside the work tree.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AppEntry {
    pub name: String,
    pub path: String,
    pub kind: AppKind,
    /// The images it uses.
    #[serde(default)]
    pub images: Vec<String>,
}

/// A container image carried by the bundle.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageEntry {
    /// The reference it is loaded under (`repo:tag`).
    pub reference: String,
    /// The OCI image manifest blob.
    pub manifest: Digest,
    /// The image config (its digest is the engine's image id).
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

impl ImageEntry {
    /// The engine's image id.
    pub fn id(&self) -> &Digest {
        &self.config.digest
    }
}
