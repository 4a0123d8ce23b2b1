//! Bundle calls: the server's bundle store and loading bundle images into nodes.

use futures::stream::{BoxStream, StreamExt};
use kisara_api::{BundleImagesRequest, BundleLoadProgress, BundleSummary, ListResponse};
use reqwest::Method;

use crate::{ndjson, Client, Error, Result};

/// A stream of bundle image load progress lines.
pub type BundleLoadStream = BoxStream<'static, Result<BundleLoadProgress>>;

impl Client {
    pub async fn list_bundles(&self) -> Result<ListResponse<BundleSummary>> {
        self.json(self.req(Method::GET, &["v1", "bundles"])?).await
    }

    /// A bundle's manifest as the server has it.
    pub async fn bundle(&self, name: &str) -> Result<serde_json::Value> {
        self.json(self.req(Method::GET, &["v1", "bundles", name])?)
            .await
    }

    /// Uploads a saved bundle archive (plain or zstd). The body is streamed; the call has no
    /// overall timeout, since the server answers only once the archive is stored and verified.
    pub async fn upload_bundle(&self, body: reqwest::Body) -> Result<ListResponse<BundleSummary>> {
        let resp = self
            .req(Method::POST, &["v1", "bundles"])?
            .header("content-type", "application/octet-stream")
            .body(body)
            .send()
            .await
            .map_err(Error::from_reqwest)?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(Error::from_reqwest)?;
        if !status.is_success() {
            return Err(Error::from_response(status.as_u16(), &bytes));
        }
        serde_json::from_slice(&bytes).map_err(Error::Decode)
    }

    /// Loads a bundle's images into one node's engine (or every connected node's), as a stream
    /// of progress lines; each node ends with `done` or `error`.
    pub async fn load_bundle_images(
        &self,
        name: &str,
        req: &BundleImagesRequest,
    ) -> Result<BundleLoadStream> {
        let builder = self
            .req(Method::POST, &["v1", "bundles", name, "images"])?
            .json(req);
        let resp = self.send_streaming(builder).await?;
        Ok(ndjson::decode_stream(resp.bytes_stream().boxed()))
    }
}
