//! AWD (attack with defence) games: every team gets a long-lived gamebox on one shared game
//! network, where the gameboxes reach each other by design (outbound traffic stays off). Each
//! round the platform rotates the flags: the game's flag command runs in every gamebox with a
//! fresh flag. A gamebox a team broke can be reset: recreated from its image, with the same
//! name, address and current flag.
//!
//! Gameboxes are ordinary Kisara containers launched through the same path as any other
//! (hardening, flags, exposure), with an instance record that ties them to their game and
//! team; they have no lifetime and count against no quota.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::http::StatusCode;
use kisara_api::{
    AwdGame, AwdGamebox, AwdRotateResponse, CreateAwdGameRequest, FlagInjection, InstanceFlag,
    LaunchRequest, Network,
};
use kisara_store::{AwdGameRecord, InstanceRecord};

use crate::api::containers::{launch_container, remove_everything, Launch};
use crate::error::{ApiError, ApiResult};
use crate::flags::{self, ExecFlag, Rendered};
use crate::instances::{Caller, Prepared};
use crate::{new_id, now, placement, AppState};

/// Label on the game network.
pub const GAME_LABEL: &str = "io.kisara.awd-game";
/// Most teams in one game.
pub const MAX_TEAMS: usize = 512;

/// A gamebox being launched: what the instance record and flags of its launch become.
#[derive(Debug)]
pub struct Gamebox {
    pub game_id: String,
    pub team: String,
    pub rendered: Rendered,
    pub ipv4_address: Option<String>,
}

impl Gamebox {
    /// Makes a launch's lifecycle that of a gamebox: no lifetime, the game's flags.
    pub fn shape(self, p: &mut Prepared) {
        p.record.awd_game = Some(self.game_id);
        p.record.awd_team = Some(self.team);
        p.record.expires_at = None;
        p.record.deadline_at = None;
        p.record.flags = self.rendered.flags.clone();
        p.rendered = self.rendered;
        p.ipv4_address = self.ipv4_address;
    }
}

fn module(game: &str) -> String {
    format!("awd:{game}")
}

fn network_name(game: &str) -> String {
    format!("awd-{game}")
}

fn box_name(game: &str, team: &str) -> String {
    format!("awd-{game}-{team}")
}

fn valid_part(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
}

fn validate(req: &CreateAwdGameRequest) -> ApiResult<()> {
    if !valid_part(&req.name, 40) {
        return Err(ApiError::bad_request(format!(
            "game name {:?} must be 1-40 letters, digits, '_', '.', '-', starting with a letter or digit",
            req.name
        )));
    }
    if req.teams.is_empty() || req.teams.len() > MAX_TEAMS {
        return Err(ApiError::bad_request(format!(
            "a game needs 1..={MAX_TEAMS} teams"
        )));
    }
    let mut seen = std::collections::BTreeSet::new();
    for team in &req.teams {
        if !valid_part(team, 60) {
            return Err(ApiError::bad_request(format!(
                "team name {team:?} must be 1-60 letters, digits, '_', '.', '-'"
            )));
        }
        if !seen.insert(team) {
            return Err(ApiError::bad_request(format!(
                "team {team:?} is listed twice"
            )));
        }
    }
    kisara_core::flags::validate(&req.flag)?;
    Ok(())
}

/// The launch request of one team's gamebox.
fn gamebox_request(req: &CreateAwdGameRequest, team: &str, node_id: &str) -> LaunchRequest {
    LaunchRequest {
        image: req.image.clone(),
        name: Some(box_name(&req.name, team)),
        cmd: req.cmd.clone(),
        env: req.env.clone(),
        ports: req.ports.clone(),
        network: Some(network_name(&req.name)),
        owner: Some(team.to_string()),
        module: Some(module(&req.name)),
        memory_mb: req.memory_mb,
        cpus: req.cpus,
        node: Some(node_id.to_string()),
        ..Default::default()
    }
}

fn spec_of(g: &AwdGameRecord) -> ApiResult<CreateAwdGameRequest> {
    serde_json::from_str(&g.spec)
        .map_err(|e| ApiError::internal(format!("AWD game {} has an unreadable spec: {e}", g.id)))
}

/// Creates the game network and one gamebox per team. On any failure nothing stays.
pub async fn create(
    st: &Arc<AppState>,
    req: CreateAwdGameRequest,
    caller: Caller,
) -> ApiResult<AwdGame> {
    validate(&req)?;
    kisara_core::policy::validate_image_reference(&req.image)?;
    if st.store.awd_game(&req.name).is_ok() {
        return Err(ApiError::conflict(format!(
            "an AWD game named {:?} exists",
            req.name
        )));
    }
    let node_id = placement::choose_network_node(st, req.node.as_deref(), &BTreeMap::new())?;
    let id = new_id();
    let labels = BTreeMap::from([(GAME_LABEL.to_string(), id.clone())]);
    let net = crate::api::networks::create_on_node(
        st,
        &node_id,
        &network_name(&req.name),
        None,
        false,
        false,
        None,
        labels,
    )
    .await?;
    let record = AwdGameRecord {
        id: id.clone(),
        name: req.name.clone(),
        node_id: node_id.clone(),
        network_id: net.id.clone(),
        spec: serde_json::to_string(&req).unwrap_or_default(),
        round: 0,
        created_at: now(),
    };
    if let Err(e) = st.store.insert_awd_game(&record) {
        crate::api::networks::destroy(st, &net).await;
        return Err(e.into());
    }
    // Gameboxes start in parallel, a few at a time.
    let shared = Arc::new(req.clone());
    let launches: Vec<_> = req
        .teams
        .iter()
        .cloned()
        .map(|team| {
            launch_gamebox(
                st.clone(),
                shared.clone(),
                team,
                id.clone(),
                node_id.clone(),
                caller,
            )
        })
        .collect();
    let results: Vec<ApiResult<_>> = futures::StreamExt::collect(futures::StreamExt::buffered(
        futures::stream::iter(launches),
        8,
    ))
    .await;
    if let Some(Err(e)) = results.into_iter().find(|r| r.is_err()) {
        let _ = remove(st, &record).await;
        return Err(ApiError {
            message: format!("AWD game {:?}: {}", req.name, e.message),
            ..e
        });
    }
    tracing::info!(game = %id, name = %req.name, teams = req.teams.len(), "AWD game created");
    view(st, &record, caller)
}

async fn launch_gamebox(
    st: Arc<AppState>,
    req: Arc<CreateAwdGameRequest>,
    team: String,
    game_id: String,
    node_id: String,
    caller: Caller,
) -> ApiResult<(StatusCode, axum::Json<kisara_api::Container>)> {
    let rendered = flags::render(
        &st,
        std::slice::from_ref(&req.flag),
        Some(&team),
        Some(&module(&req.name)),
        0,
    )?;
    let request = gamebox_request(&req, &team, &node_id);
    launch_container(
        st,
        request,
        Launch {
            caller,
            awd: Some(Gamebox {
                game_id,
                team,
                rendered,
                ipv4_address: None,
            }),
        },
    )
    .await
}

/// A game as answered: its gameboxes, and the current flags for admins.
pub fn view(st: &AppState, g: &AwdGameRecord, caller: Caller) -> ApiResult<AwdGame> {
    let spec = spec_of(g)?;
    let net: Option<Network> = st.store.get_network(&g.network_id).ok();
    let mut gameboxes = Vec::new();
    let mut current = BTreeMap::new();
    for rec in st.store.awd_gameboxes(&g.id)? {
        let team = rec.awd_team.clone().unwrap_or_default();
        if let Some(f) = rec.flags.first() {
            current.insert(team.clone(), f.value.clone());
        }
        let c = st.store.get_container(&rec.id).ok();
        gameboxes.push(AwdGamebox {
            team,
            container_id: rec.id.clone(),
            name: c.as_ref().map(|c| c.name.clone()).unwrap_or_default(),
            ip_address: c.as_ref().and_then(|c| c.ip_address.clone()),
            host_port: c.map(|c| c.host_port).unwrap_or_default(),
        });
    }
    Ok(AwdGame {
        id: g.id.clone(),
        name: g.name.clone(),
        image: spec.image,
        node_id: g.node_id.clone(),
        network: network_name(&g.name),
        subnet: net.map(|n| n.subnet).unwrap_or_default(),
        gameboxes,
        flags: caller.sees_flags().then_some(current),
        created_at: g.created_at,
    })
}

/// The exec flag of a game, which rotation and reset need.
fn exec_spec(spec: &CreateAwdGameRequest) -> Option<(&str, u64)> {
    match &spec.flag.inject {
        FlagInjection::Exec {
            command,
            timeout_secs,
        } => Some((command.as_str(), *timeout_secs)),
        _ => None,
    }
}

/// A fresh flag in every gamebox: the next round's. Teams whose command failed keep their
/// old flag and are listed in `errors`.
pub async fn rotate(st: &Arc<AppState>, g: &AwdGameRecord) -> ApiResult<AwdRotateResponse> {
    let spec = spec_of(g)?;
    let Some((command, timeout_secs)) = exec_spec(&spec) else {
        return Err(ApiError::conflict(format!(
            "AWD game {:?} injects its flag by env or file, set only at launch; rotation needs \
             an exec flag (\"inject\": {{\"exec\": {{\"command\": ...}}}})",
            g.name
        )));
    };
    let round = st.store.next_awd_round(&g.id)?;
    let boxes = st.store.awd_gameboxes(&g.id)?;
    let job = Arc::new((spec.clone(), command.to_string(), timeout_secs, round));
    let runs: Vec<_> = boxes
        .into_iter()
        .map(|rec| {
            let st = st.clone();
            let job = job.clone();
            async move {
                let (spec, command, timeout_secs, round) = &*job;
                let team = rec.awd_team.clone().unwrap_or_default();
                let r = rotate_one(&st, spec, &rec, &team, command, *timeout_secs, *round).await;
                (team, r)
            }
        })
        .collect();
    let results: Vec<(String, ApiResult<String>)> = futures::StreamExt::collect(
        futures::StreamExt::buffer_unordered(futures::stream::iter(runs), 16),
    )
    .await;
    let mut out = AwdRotateResponse {
        flags: BTreeMap::new(),
        errors: BTreeMap::new(),
    };
    for (team, r) in results {
        match r {
            Ok(flag) => {
                out.flags.insert(team, flag);
            }
            Err(e) => {
                out.errors.insert(team, e.message);
            }
        }
    }
    tracing::info!(game = %g.id, round, rotated = out.flags.len(), failed = out.errors.len(), "AWD flags rotated");
    Ok(out)
}

async fn rotate_one(
    st: &AppState,
    spec: &CreateAwdGameRequest,
    rec: &InstanceRecord,
    team: &str,
    command: &str,
    timeout_secs: u64,
    round: u64,
) -> ApiResult<String> {
    let c = st.store.get_container(&rec.id)?;
    let rendered = flags::render(
        st,
        std::slice::from_ref(&spec.flag),
        Some(team),
        Some(&module(&spec.name)),
        round,
    )?;
    let value = rendered
        .flags
        .first()
        .map(|f| f.value.clone())
        .ok_or_else(|| ApiError::internal("no flag rendered"))?;
    let e = ExecFlag {
        command: command.to_string(),
        timeout_secs,
        value: kisara_api::agent::Secret(value.clone()),
    };
    flags::exec(st, &c.node_id, &c.docker_id, &e).await?;
    st.store.set_instance_flags(&rec.id, &rendered.flags)?;
    Ok(value)
}

/// Recreates a team's gamebox from its image: same name, same address where it is free, the
/// current flag.
pub async fn reset(
    st: &Arc<AppState>,
    g: &AwdGameRecord,
    team: &str,
    caller: Caller,
) -> ApiResult<AwdGame> {
    let spec = spec_of(g)?;
    let rec = st
        .store
        .awd_gameboxes(&g.id)?
        .into_iter()
        .find(|r| r.awd_team.as_deref() == Some(team))
        .ok_or_else(|| {
            ApiError::not_found(format!("AWD game {:?} has no team {team:?}", g.name))
        })?;
    let old = st.store.get_container(&rec.id)?;
    let address = old.ip_address.clone();
    remove_everything(st, &old, true).await?;
    // The current flag again (a rotation's, or the launch's).
    let rendered = current_flags(&spec, &rec.flags);
    let launch = |ip: Option<String>| {
        launch_container(
            st.clone(),
            gamebox_request(&spec, team, &g.node_id),
            Launch {
                caller,
                awd: Some(Gamebox {
                    game_id: g.id.clone(),
                    team: team.to_string(),
                    rendered: rendered.clone(),
                    ipv4_address: ip,
                }),
            },
        )
    };
    let launched = match launch(address.clone()).await {
        Ok(v) => Ok(v),
        // The address was taken meanwhile: any address will do.
        Err(e) if address.is_some() && e.status != StatusCode::BAD_REQUEST => {
            tracing::info!(game = %g.id, %team, error = %e, "gamebox address not free; resetting on another");
            launch(None).await
        }
        Err(e) => Err(e),
    };
    launched.map(|_| ())?;
    tracing::info!(game = %g.id, %team, "AWD gamebox reset");
    view(st, g, caller)
}

/// The rendered form of the flags a gamebox holds now.
fn current_flags(spec: &CreateAwdGameRequest, flags_now: &[InstanceFlag]) -> Rendered {
    let mut r = Rendered {
        flags: flags_now.to_vec(),
        ..Default::default()
    };
    if let Some(f) = flags_now.first() {
        let value = kisara_api::agent::Secret(f.value.clone());
        match &spec.flag.inject {
            FlagInjection::Env { name } => r.env.push((name.clone(), value)),
            FlagInjection::File { path, mode } => r.files.push(kisara_api::agent::ContainerFile {
                path: path.clone(),
                mode: *mode,
                contents: value,
            }),
            FlagInjection::Exec {
                command,
                timeout_secs,
            } => r.execs.push(ExecFlag {
                command: command.clone(),
                timeout_secs: *timeout_secs,
                value,
            }),
        }
    }
    r
}

/// Removes every gamebox, the game network and the game.
pub async fn remove(st: &Arc<AppState>, g: &AwdGameRecord) -> ApiResult<()> {
    for rec in st.store.awd_gameboxes(&g.id)? {
        match st.store.get_container(&rec.id) {
            Ok(c) => remove_everything(st, &c, true).await?,
            Err(_) => st.store.delete_instance(&rec.id)?,
        }
    }
    if let Ok(net) = st.store.get_network(&g.network_id) {
        crate::api::networks::destroy(st, &net).await;
    }
    st.store.delete_awd_game(&g.id)?;
    tracing::info!(game = %g.id, name = %g.name, "AWD game removed");
    Ok(())
}
