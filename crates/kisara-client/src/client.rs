use std::time::Duration;

use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt, TryStreamExt};
use kisara_api::{
    Container, ContainerFilter, CreateNetworkRequest, ExecRequest, ExecResult, Health, ImageQuery,
    ImageSummary, LaunchRequest, ListResponse, LogsQuery, Network, NetworkFilter, Node,
    PullProgress, PullRequest, RemoveQuery,
};
use kisara_api::{DrainReport, NodeLabelsRequest};
use reqwest::{Method, RequestBuilder, Response, Url};
use serde::de::DeserializeOwned;

use crate::{ndjson, Error, Result};

/// Timeout of every call unless [`ClientBuilder::timeout`] says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// What the server allows an exec to run when the request names no timeout.
const EXEC_DEFAULT_SECS: u64 = 30;
/// The server's ceiling on an exec's timeout.
const EXEC_MAX_SECS: u64 = 600;
/// Time granted beyond an exec's own timeout for the server to give up and answer.
const EXEC_MARGIN: Duration = Duration::from_secs(10);

/// A stream of raw bytes, as `logs` answers.
pub type ByteStream = BoxStream<'static, Result<Bytes>>;
/// A stream of pull progress lines.
pub type PullStream = BoxStream<'static, Result<PullProgress>>;

/// A bearer token. Its `Debug` never shows the secret.
#[derive(Clone)]
struct Token(String);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(***)")
    }
}

/// A handle on one Kisara server. Cheap to clone; clones share a connection pool.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base: Url,
    token: Option<Token>,
    /// `Bearer <token>`, made once (and marked sensitive, so `Debug` hides it) rather than
    /// formatted and validated again on every call. `None` with a token that cannot be a
    /// header value: those calls fail when sent, as they always did.
    auth: Option<reqwest::header::HeaderValue>,
    timeout: Duration,
}

/// Builds a [`Client`] with non-default settings.
#[derive(Debug)]
pub struct ClientBuilder {
    base_url: String,
    token: Option<Token>,
    timeout: Duration,
    ca_pem: Option<Vec<u8>>,
}

impl ClientBuilder {
    /// The bearer token sent on every call but `/healthz`.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(Token(token.into()));
        self
    }

    /// The timeout of every call. Streaming calls (`logs`, `pull_image`) apply it to the
    /// response head only: their bodies may run as long as the server keeps sending.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// For an `https://` server: trust only certificates signed by this CA (PEM), e.g. the
    /// `ca.pem` that `kisara cert` wrote.
    pub fn ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.ca_pem = Some(pem.into());
        self
    }

    pub fn build(self) -> Result<Client> {
        let base = Url::parse(&self.base_url)
            .map_err(|e| Error::InvalidUrl(format!("{}: {e}", self.base_url)))?;
        if !matches!(base.scheme(), "http" | "https") || base.cannot_be_a_base() {
            return Err(Error::InvalidUrl(format!(
                "{}: expected an http:// or https:// URL",
                self.base_url
            )));
        }
        let mut http = reqwest::Client::builder()
            .user_agent(concat!("kisara-client/", env!("CARGO_PKG_VERSION")));
        if let Some(pem) = &self.ca_pem {
            let certs = reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| Error::InvalidUrl(format!("CA certificate: {e}")))?;
            if certs.is_empty() {
                return Err(Error::InvalidUrl(
                    "CA certificate: no certificate in it".into(),
                ));
            }
            http = http.tls_certs_only(certs);
        }
        let http = http.build().map_err(Error::Transport)?;
        let auth = self.token.as_ref().and_then(|Token(t)| {
            let mut v = reqwest::header::HeaderValue::try_from(format!("Bearer {t}")).ok()?;
            v.set_sensitive(true);
            Some(v)
        });
        Ok(Client {
            http,
            base,
            token: self.token,
            auth,
            timeout: self.timeout,
        })
    }
}

impl Client {
    /// A client for the server at `base_url` (e.g. `http://127.0.0.1:7474`), with the default
    /// timeout.
    pub fn new(base_url: &str, token: Option<String>) -> Result<Client> {
        let mut b = Client::builder(base_url);
        if let Some(t) = token {
            b = b.token(t);
        }
        b.build()
    }

    pub fn builder(base_url: &str) -> ClientBuilder {
        ClientBuilder {
            base_url: base_url.to_string(),
            token: None,
            timeout: DEFAULT_TIMEOUT,
            ca_pem: None,
        }
    }

    /// The server's base URL.
    pub fn base_url(&self) -> &Url {
        &self.base
    }

    // --- health and metadata -------------------------------------------------------------

    /// `GET /healthz` (no token needed).
    pub async fn health(&self) -> Result<Health> {
        let req = self.http.get(self.url(&["healthz"])?);
        self.json(req).await
    }

    /// `GET /v1/openapi.json`: the server's OpenAPI document.
    pub async fn openapi(&self) -> Result<serde_json::Value> {
        self.json(self.req(Method::GET, &["v1", "openapi.json"])?)
            .await
    }

    // --- containers ----------------------------------------------------------------------

    /// Launches one container and returns it once it runs.
    pub async fn launch(&self, req: &LaunchRequest) -> Result<Container> {
        self.json(self.req(Method::POST, &["v1", "containers"])?.json(req))
            .await
    }

    pub async fn list_containers(
        &self,
        filter: &ContainerFilter,
    ) -> Result<ListResponse<Container>> {
        self.json(self.req(Method::GET, &["v1", "containers"])?.query(filter))
            .await
    }

    /// One container by Kisara id, name, or Docker id prefix.
    pub async fn container(&self, id: &str) -> Result<Container> {
        self.json(self.req(Method::GET, &["v1", "containers", nonempty(id)?])?)
            .await
    }

    /// Stops **and removes** a container (Kisara's semantics of stop).
    pub async fn stop(&self, id: &str) -> Result<()> {
        let path = ["v1", "containers", nonempty(id)?, "stop"];
        self.empty(self.req(Method::POST, &path)?).await
    }

    pub async fn remove(&self, id: &str, force: bool) -> Result<()> {
        let query = RemoveQuery {
            force: force.then_some(true),
        };
        let req = self.req(Method::DELETE, &["v1", "containers", nonempty(id)?])?;
        self.empty(req.query(&query)).await
    }

    /// Runs a command in a container and waits for it. The HTTP timeout is the exec's own
    /// timeout (`timeout_secs`, else the server's default) plus a margin, not the client's.
    pub async fn exec(&self, id: &str, req: &ExecRequest) -> Result<ExecResult> {
        let secs = req
            .timeout_secs
            .unwrap_or(EXEC_DEFAULT_SECS)
            .min(EXEC_MAX_SECS);
        let path = ["v1", "containers", nonempty(id)?, "exec"];
        let builder = self.req(Method::POST, &path)?.json(req);
        let resp = self
            .send(builder, Duration::from_secs(secs) + EXEC_MARGIN)
            .await?;
        decode(resp).await
    }

    /// A container's output. With `follow` the stream goes on until the container stops or the
    /// stream is dropped; `tail` limits it to the last lines.
    pub async fn logs(&self, id: &str, tail: Option<u64>, follow: bool) -> Result<ByteStream> {
        let query = LogsQuery {
            tail,
            follow: follow.then_some(true),
        };
        let path = ["v1", "containers", nonempty(id)?, "logs"];
        let resp = self
            .send_streaming(self.req(Method::GET, &path)?.query(&query))
            .await?;
        Ok(resp.bytes_stream().map_err(Error::from_reqwest).boxed())
    }

    // --- images --------------------------------------------------------------------------

    pub async fn list_images(&self, node: Option<&str>) -> Result<ListResponse<ImageSummary>> {
        let query = ImageQuery {
            node: node.map(str::to_string),
            force: None,
        };
        self.json(self.req(Method::GET, &["v1", "images"])?.query(&query))
            .await
    }

    /// Pulls an image on one node or on every ready node, as a stream of progress lines. The
    /// last line has status `done`, or `error` with [`PullProgress::error`] set; a stream that
    /// ends without either was cut off.
    pub async fn pull_image(&self, req: &PullRequest) -> Result<PullStream> {
        let builder = self.req(Method::POST, &["v1", "images", "pull"])?.json(req);
        let resp = self.send_streaming(builder).await?;
        Ok(ndjson::decode_stream(resp.bytes_stream().boxed()))
    }

    /// Removes an image. `reference` may hold `/`, `:` and `@` (`registry:5000/ns/app:1.0`).
    pub async fn remove_image(
        &self,
        reference: &str,
        node: Option<&str>,
        force: bool,
    ) -> Result<()> {
        let mut path = vec!["v1", "images"];
        path.extend(nonempty(reference)?.split('/'));
        let query = ImageQuery {
            node: node.map(str::to_string),
            force: force.then_some(true),
        };
        self.empty(self.req(Method::DELETE, &path)?.query(&query))
            .await
    }

    // --- networks ------------------------------------------------------------------------

    pub async fn create_network(&self, req: &CreateNetworkRequest) -> Result<Network> {
        self.json(self.req(Method::POST, &["v1", "networks"])?.json(req))
            .await
    }

    pub async fn list_networks(&self, node: Option<&str>) -> Result<ListResponse<Network>> {
        self.list_networks_filtered(&NetworkFilter {
            node: node.map(str::to_string),
            all: None,
        })
        .await
    }

    /// Networks with every filter (`all` includes the warm pool's unclaimed spares).
    pub async fn list_networks_filtered(
        &self,
        filter: &NetworkFilter,
    ) -> Result<ListResponse<Network>> {
        self.json(self.req(Method::GET, &["v1", "networks"])?.query(filter))
            .await
    }

    pub async fn network(&self, id: &str) -> Result<Network> {
        self.json(self.req(Method::GET, &["v1", "networks", nonempty(id)?])?)
            .await
    }

    pub async fn remove_network(&self, id: &str) -> Result<()> {
        self.empty(self.req(Method::DELETE, &["v1", "networks", nonempty(id)?])?)
            .await
    }

    // --- gateway -------------------------------------------------------------------------

    /// The gateway role's public ports (what a standalone `kisara gateway` listens on).
    pub async fn gateway_ports(&self) -> Result<Vec<kisara_api::GatewayPort>> {
        self.json(self.req(Method::GET, &["v1", "gateway", "ports"])?)
            .await
    }

    // --- nodes ---------------------------------------------------------------------------

    pub async fn list_nodes(&self) -> Result<ListResponse<Node>> {
        self.json(self.req(Method::GET, &["v1", "nodes"])?).await
    }

    pub async fn node(&self, id: &str) -> Result<Node> {
        self.json(self.req(Method::GET, &["v1", "nodes", nonempty(id)?])?)
            .await
    }

    /// Stops the scheduler placing anything new on the node.
    pub async fn cordon_node(&self, id: &str) -> Result<Node> {
        self.json(self.req(Method::POST, &["v1", "nodes", nonempty(id)?, "cordon"])?)
            .await
    }

    /// Lets the scheduler use the node again (clears cordon and drain).
    pub async fn uncordon_node(&self, id: &str) -> Result<Node> {
        self.json(self.req(Method::POST, &["v1", "nodes", nonempty(id)?, "uncordon"])?)
            .await
    }

    /// Cordons the node and lists the containers still on it (they are not moved).
    pub async fn drain_node(&self, id: &str) -> Result<DrainReport> {
        self.json(self.req(Method::POST, &["v1", "nodes", nonempty(id)?, "drain"])?)
            .await
    }

    /// Merges labels into the node's; a `None` value deletes the key.
    pub async fn label_node(
        &self,
        id: &str,
        labels: std::collections::BTreeMap<String, Option<String>>,
    ) -> Result<Node> {
        let body = NodeLabelsRequest { labels };
        self.json(
            self.req(Method::PUT, &["v1", "nodes", nonempty(id)?, "labels"])?
                .json(&body),
        )
        .await
    }

    // --- plumbing ------------------------------------------------------------------------

    /// The base URL with `segments` appended, each percent-encoded on its own.
    fn url(&self, segments: &[&str]) -> Result<Url> {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .map_err(|()| Error::InvalidUrl(self.base.to_string()))?
            .pop_if_empty()
            .extend(segments);
        Ok(url)
    }

    /// A request carrying the bearer token.
    pub(crate) fn req(&self, method: Method, segments: &[&str]) -> Result<RequestBuilder> {
        let builder = self.http.request(method, self.url(segments)?);
        Ok(match (&self.auth, &self.token) {
            (Some(v), _) => builder.header(reqwest::header::AUTHORIZATION, v.clone()),
            (None, Some(Token(t))) => builder.bearer_auth(t),
            (None, None) => builder,
        })
    }

    /// Sends with a timeout over the whole exchange, head and body, and turns a non-2xx answer
    /// into an error.
    async fn send(&self, builder: RequestBuilder, timeout: Duration) -> Result<Response> {
        let resp = builder
            .timeout(timeout)
            .send()
            .await
            .map_err(Error::from_reqwest)?;
        check(resp).await
    }

    /// Sends with the timeout over the response head only; the body may take as long as the
    /// server streams it. Error bodies are read under the timeout too.
    pub(crate) async fn send_streaming(&self, builder: RequestBuilder) -> Result<Response> {
        let resp = tokio::time::timeout(self.timeout, builder.send())
            .await
            .map_err(|_| Error::Timeout)?
            .map_err(Error::from_reqwest)?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        tokio::time::timeout(self.timeout, check(resp))
            .await
            .map_err(|_| Error::Timeout)?
    }

    pub(crate) async fn json<T: DeserializeOwned>(&self, builder: RequestBuilder) -> Result<T> {
        decode(self.send(builder, self.timeout).await?).await
    }

    pub(crate) async fn empty(&self, builder: RequestBuilder) -> Result<()> {
        self.send(builder, self.timeout).await.map(drop)
    }
}

async fn check(resp: Response) -> Result<Response> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let body = resp.bytes().await.map_err(Error::from_reqwest)?;
    Err(Error::from_response(status.as_u16(), &body))
}

async fn decode<T: DeserializeOwned>(resp: Response) -> Result<T> {
    let body = resp.bytes().await.map_err(Error::from_reqwest)?;
    serde_json::from_slice(&body).map_err(Error::Decode)
}

/// An empty id would address the collection instead of one object.
fn nonempty(id: &str) -> Result<&str> {
    if id.is_empty() {
        Err(Error::InvalidUrl("empty id".into()))
    } else {
        Ok(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_token() {
        let c = Client::new("http://127.0.0.1:7474", Some("s3cr3t-token".into())).unwrap();
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("s3cr3t"), "{dbg}");
        assert!(dbg.contains("Token(***)"), "{dbg}");
    }

    #[test]
    fn every_call_carries_the_bearer_token() {
        let c = Client::new("http://127.0.0.1:7474", Some("s3cr3t-token".into())).unwrap();
        for _ in 0..2 {
            let req = c
                .req(Method::GET, &["v1", "nodes"])
                .unwrap()
                .build()
                .unwrap();
            let auth = req.headers().get(reqwest::header::AUTHORIZATION).unwrap();
            assert_eq!(auth.to_str().unwrap(), "Bearer s3cr3t-token");
            assert!(auth.is_sensitive());
        }
        let anonymous = Client::new("http://127.0.0.1:7474", None).unwrap();
        let req = anonymous.req(Method::GET, &["v1", "nodes"]).unwrap();
        assert!(req
            .build()
            .unwrap()
            .headers()
            .get(reqwest::header::AUTHORIZATION)
            .is_none());
    }

    #[test]
    fn rejects_unusable_base_urls() {
        for bad in ["not a url", "ftp://host/", "mailto:x@y", ""] {
            assert!(
                matches!(Client::new(bad, None), Err(Error::InvalidUrl(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn urls_keep_a_base_path_and_encode_each_segment() {
        let c = Client::new("http://h:1/prefix/", None).unwrap();
        assert_eq!(
            c.url(&["v1", "containers", "a b"]).unwrap().as_str(),
            "http://h:1/prefix/v1/containers/a%20b"
        );
        let c = Client::new("http://h:1", None).unwrap();
        let mut path = vec!["v1", "images"];
        path.extend("reg:5000/ns/app:1.0".split('/'));
        assert_eq!(
            c.url(&path).unwrap().as_str(),
            "http://h:1/v1/images/reg:5000/ns/app:1.0"
        );
        assert_eq!(
            c.url(&["v1", "containers", "../x?y#z"]).unwrap().as_str(),
            "http://h:1/v1/containers/..%2Fx%3Fy%23z"
        );
    }

    #[tokio::test]
    async fn empty_ids_are_refused_before_sending() {
        let c = Client::new("http://127.0.0.1:9", None).unwrap();
        assert!(matches!(c.container("").await, Err(Error::InvalidUrl(_))));
        assert!(matches!(
            c.remove_image("", None, false).await,
            Err(Error::InvalidUrl(_))
        ));
    }
}
