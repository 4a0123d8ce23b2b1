//! Multi-container service calls.

use std::time::Duration;

use kisara_api::{ListResponse, RenewRequest, Service, ServiceFilter, ServiceRequest};
use reqwest::Method;

use crate::{Client, Error, Result};

/// The server waits up to this long for health by default (see
/// [`ServiceRequest::health_timeout_secs`]).
const DEFAULT_HEALTH_SECS: u64 = 120;
/// Beyond the health wait: image-less launches, networks, and the answer itself.
const LAUNCH_MARGIN: Duration = Duration::from_secs(150);

impl Client {
    /// Launches a service (a compose file or a Kisara `ServiceConfig`) and returns it once
    /// every container runs, healthy where it has a healthcheck. The HTTP timeout is the
    /// request's health timeout plus a margin, not the client's.
    pub async fn launch_service(&self, req: &ServiceRequest) -> Result<Service> {
        let health = Duration::from_secs(req.health_timeout_secs.unwrap_or(DEFAULT_HEALTH_SECS));
        let resp = self
            .req(Method::POST, &["v1", "services"])?
            .json(req)
            .timeout(health + LAUNCH_MARGIN)
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

    pub async fn list_services(&self, filter: &ServiceFilter) -> Result<ListResponse<Service>> {
        self.json(self.req(Method::GET, &["v1", "services"])?.query(filter))
            .await
    }

    /// One service by id (or by name when unique).
    pub async fn service(&self, id: &str) -> Result<Service> {
        if id.is_empty() {
            return Err(Error::InvalidUrl("empty id".into()));
        }
        self.json(self.req(Method::GET, &["v1", "services", id])?)
            .await
    }

    /// Extends a service's lifetime by `secs` (`None`: the server's renewal step). A refused
    /// renewal (limit, deadline) is a 409 with code `quota_exceeded`.
    pub async fn renew_service(&self, id: &str, secs: Option<u64>) -> Result<Service> {
        if id.is_empty() {
            return Err(Error::InvalidUrl("empty id".into()));
        }
        self.json(
            self.req(Method::POST, &["v1", "services", id, "renew"])?
                .json(&RenewRequest { secs }),
        )
        .await
    }

    /// Stops a service: every container and network made for it is removed.
    pub async fn remove_service(&self, id: &str) -> Result<()> {
        if id.is_empty() {
            return Err(Error::InvalidUrl("empty id".into()));
        }
        self.empty(self.req(Method::DELETE, &["v1", "services", id])?)
            .await
    }
}
