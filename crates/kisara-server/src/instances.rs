//! The instance lifecycle, shared by every launch path (containers and services): admission
//! under the quotas, lifetimes and renewals, flags shown only to callers allowed to see them,
//! and the expiry loop that removes what outlived its lifetime.
//!
//! A launch path calls [`prepare`] before it makes anything (bad TTLs and flag specs are 400s
//! then), [`admit_container`] (or `Store::admit_instance` with its own rows) in place of its
//! intent-row insert, [`crate::flags::apply`] on each container config, and
//! [`crate::flags::run_execs`] once the containers run. Answers go through [`decorate`].
//!
//! Expiry lives in the store, so it survives restarts of the server and of the agents: the
//! loop runs every [`EXPIRY_TICK`] and retries what it could not remove (a node away) on the
//! next tick. `instance.expired` fires once per instance (a fact key), after its removal.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use futures::StreamExt;
use kisara_api::events::kinds;
use kisara_api::{Container, ContainerState, LaunchRequest};
use kisara_core::instances::{AdmissionLimits, RenewRefusal};
use kisara_store::{InstanceRecord, KIND_CONTAINER, KIND_SERVICE};

use crate::error::{ApiError, ApiResult};
use crate::flags::{self, Rendered};
use crate::{now, AppState};

/// How often expiry is checked: an instance is gone within a couple of seconds of expiring.
pub const EXPIRY_TICK: Duration = Duration::from_millis(500);
/// Instances removed in parallel by one tick.
const EXPIRY_PARALLELISM: usize = 16;

/// Who is calling. Flags are shown to admins only; a request without this mark (a future
/// non-admin token, or a route outside the token check) is treated as not admin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    Admin,
    Other,
}

impl Caller {
    pub fn sees_flags(self) -> bool {
        self == Caller::Admin
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(parts
            .extensions
            .get::<Caller>()
            .copied()
            .unwrap_or(Caller::Other))
    }
}

/// A launch's lifecycle, settled before anything is made.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub record: InstanceRecord,
    pub rendered: Rendered,
    /// A fixed address on the container's network (an AWD gamebox being reset).
    pub ipv4_address: Option<String>,
}

/// Validates the request's TTL and flags and renders the flags, for instance `id`.
pub fn prepare(st: &AppState, req: &LaunchRequest, id: &str, kind: &str) -> ApiResult<Prepared> {
    let specs = flags::specs(req)?;
    let rendered = flags::render(st, &specs, req.owner.as_deref(), req.module.as_deref(), 0)?;
    let record = record(
        st,
        id,
        kind,
        req.ttl_secs,
        req.owner.as_deref(),
        req.module.as_deref(),
        rendered.flags.clone(),
    )?;
    Ok(Prepared {
        record,
        rendered,
        ipv4_address: None,
    })
}

/// An instance's record for a launch starting now: its lifetime from `ttl_secs` (400 when
/// the server's limits refuse it) and the flags it was given.
pub fn record(
    st: &AppState,
    id: &str,
    kind: &str,
    ttl_secs: Option<u64>,
    owner: Option<&str>,
    module: Option<&str>,
    flags: Vec<kisara_api::InstanceFlag>,
) -> ApiResult<InstanceRecord> {
    let t = now();
    let lifetime = st.settings.instances.lifetime(ttl_secs, t)?;
    Ok(InstanceRecord {
        id: id.to_string(),
        kind: kind.to_string(),
        owner: owner.map(str::to_string),
        module: module.map(str::to_string),
        created_at: t,
        expires_at: lifetime.expires_at,
        deadline_at: lifetime.deadline_at,
        renewals: 0,
        flags,
        awd_game: None,
        awd_team: None,
    })
}

/// The admission limits of the server's configuration.
pub fn limits(st: &AppState) -> AdmissionLimits {
    st.settings.instances.limits
}

/// Writes a container's intent row and its instance record in one transaction, under the
/// admission limits (none for AWD gameboxes). 409 `quota_exceeded` names the limit hit.
pub fn admit_container(
    st: &AppState,
    c: &Container,
    memory_mb: u64,
    cpu_milli: u64,
    record: &InstanceRecord,
) -> ApiResult<()> {
    let limits = if record.awd_game.is_some() {
        AdmissionLimits::default()
    } else {
        limits(st)
    };
    st.store
        .admit_container(c, memory_mb, cpu_milli, record, &limits)?;
    Ok(())
}

/// [`admit_container`] that also attaches `idempotency_key` (409 when another container has
/// it) and, when `spare` is set, claims a spare network of the container's node for it, all in
/// the one transaction. Returns the spare claimed (none may be ready).
pub fn admit_container_with(
    st: &AppState,
    c: &Container,
    reserved: (u64, u64),
    record: &InstanceRecord,
    idempotency_key: Option<&str>,
    spare: bool,
) -> ApiResult<Option<kisara_api::Network>> {
    let limits = if record.awd_game.is_some() {
        AdmissionLimits::default()
    } else {
        limits(st)
    };
    let spare = spare.then_some(kisara_api::labels::SPARE);
    Ok(st
        .store
        .admit_container_with(c, reserved, record, &limits, idempotency_key, spare)?)
}

/// Fills a container's lifecycle fields from its record; flags only for admins.
pub fn decorate(c: &mut Container, rec: Option<&InstanceRecord>, caller: Caller) {
    match rec {
        Some(rec) => {
            c.expires_at = rec.expires_at;
            c.renewals = rec.renewals;
            c.flags = caller.sees_flags().then(|| rec.flags.clone());
        }
        None => c.flags = None,
    }
}

/// [`decorate`] for one container, reading its record.
pub fn decorate_one(st: &AppState, c: &mut Container, caller: Caller) {
    let rec = st.store.instance(&c.id).ok().flatten();
    decorate(c, rec.as_ref(), caller);
}

/// [`decorate`] for a list, reading every record once.
pub fn decorate_all(st: &AppState, cs: &mut [Container], caller: Caller) {
    let recs: std::collections::HashMap<String, InstanceRecord> = st
        .store
        .list_instances()
        .unwrap_or_default()
        .into_iter()
        .map(|r| (r.id.clone(), r))
        .collect();
    for c in cs {
        decorate(c, recs.get(&c.id), caller);
    }
}

/// Renews an instance by `secs` (default: the server's `renew_secs`). 409 `quota_exceeded`
/// when it may not be renewed, naming why.
pub fn renew(st: &AppState, id: &str, secs: Option<u64>) -> ApiResult<InstanceRecord> {
    let settings = st.settings.instances;
    let t = now();
    match st.store.renew_instance(id, |rec| {
        settings.renew(rec.expires_at, rec.deadline_at, rec.renewals, secs, t)
    })? {
        Ok(rec) => {
            tracing::info!(instance = %id, expires_at = ?rec.expires_at, renewals = rec.renewals, "instance renewed");
            Ok(rec)
        }
        Err(why @ RenewRefusal::BadExtension(_)) => Err(ApiError::bad_request(format!(
            "instance {id} cannot be renewed: {why}"
        ))),
        Err(why @ RenewRefusal::NoLifetime) => Err(ApiError::conflict(format!(
            "instance {id} cannot be renewed: {why}"
        ))),
        Err(why) => Err(ApiError::quota(format!(
            "instance {id} cannot be renewed: {why}"
        ))),
    }
}

/// Removes an instance and everything made for it.
pub async fn destroy(st: &Arc<AppState>, rec: &InstanceRecord) -> ApiResult<()> {
    match rec.kind.as_str() {
        KIND_CONTAINER => match st.store.get_container(&rec.id) {
            Ok(c) => crate::api::containers::remove_everything(st, &c, true).await,
            // The container went another way; the record is all that is left.
            Err(kisara_store::StoreError::NotFound(_)) => {
                st.store.delete_instance(&rec.id)?;
                Ok(())
            }
            Err(e) => Err(e.into()),
        },
        KIND_SERVICE => match st.store.get_service(&rec.id) {
            Ok(s) if s.id != rec.id => {
                // A name lookup found another service: this one is gone.
                st.store.delete_instance(&rec.id)?;
                Ok(())
            }
            Ok(s) if s.state == kisara_store::SERVICE_LAUNCHING => Err(ApiError::conflict(
                format!("service {} is still being launched", s.id),
            )),
            Ok(s) => crate::api::services::take_down(st, &s).await,
            Err(kisara_store::StoreError::NotFound(_)) => {
                st.store.delete_instance(&rec.id)?;
                Ok(())
            }
            Err(e) => Err(e.into()),
        },
        other => Err(ApiError::internal(format!("unknown instance kind {other}"))),
    }
}

/// Removes one expired instance and fires `instance.expired` (once).
async fn expire(st: &Arc<AppState>, rec: InstanceRecord) {
    let mut node_id = None;
    if rec.kind == KIND_CONTAINER {
        if let Ok(c) = st.store.get_container(&rec.id) {
            // A launch still in flight is settled first; try again on the next tick.
            if c.state == ContainerState::Launching {
                return;
            }
            node_id = Some(c.node_id);
        }
    }
    if rec.kind == KIND_SERVICE {
        if let Ok(s) = st.store.get_service(&rec.id) {
            // A launch still in flight settles first (it answers, or removes everything).
            if s.id == rec.id && s.state == kisara_store::SERVICE_LAUNCHING {
                return;
            }
            node_id = Some(s.node_id);
        }
    }
    match destroy(st, &rec).await {
        Ok(()) => {
            let late_ms = (crate::events::now_ms() - rec.expires_at.unwrap_or(0) * 1000).max(0);
            fire_expired(st, &rec, node_id, late_ms);
            tracing::info!(instance = %rec.id, owner = ?rec.owner, module = ?rec.module, "instance expired and removed");
        }
        Err(e) => {
            tracing::warn!(instance = %rec.id, error = %e, "cannot remove an expired instance yet; retrying");
        }
    }
}

/// `instance.expired`, once per instance and expiry.
fn fire_expired(st: &AppState, rec: &InstanceRecord, node_id: Option<String>, late_ms: i64) {
    let event = kisara_api::Event {
        id: 0,
        kind: kinds::INSTANCE_EXPIRED.to_string(),
        time: crate::events::now_ms(),
        node_id,
        container_id: (rec.kind == KIND_CONTAINER).then(|| rec.id.clone()),
        owner: rec.owner.clone(),
        module: rec.module.clone(),
        data: serde_json::json!({
            "instance": rec.id,
            "kind": rec.kind,
            "expires_at": rec.expires_at,
            "renewals": rec.renewals,
            "removed_late_ms": late_ms,
        }),
    };
    let fact = format!(
        "{}:{}:{}",
        kinds::INSTANCE_EXPIRED,
        rec.id,
        rec.expires_at.unwrap_or(0)
    );
    st.events.emit(event, Some(&fact));
}

/// One pass: removes every instance expired by now.
pub async fn expire_due(st: &Arc<AppState>) -> usize {
    let due = match st.store.expired_instances(now(), 1000) {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read expired instances");
            return 0;
        }
    };
    let n = due.len();
    futures::stream::iter(due)
        .for_each_concurrent(EXPIRY_PARALLELISM, |rec| expire(st, rec))
        .await;
    n
}

/// Runs expiry until the server shuts down.
pub async fn expiry_loop(st: Arc<AppState>) {
    let mut tick = tokio::time::interval(EXPIRY_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = st.shutdown.cancelled() => return,
        }
        expire_due(&st).await;
    }
}
