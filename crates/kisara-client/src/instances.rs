//! Instance lifecycle and AWD calls: renew a container, create/inspect/rotate/reset/delete
//! AWD games. (Destroying a container is [`Client::stop`] or [`Client::remove`].)

use kisara_api::{
    AwdGame, AwdResetRequest, AwdRotateResponse, Container, CreateAwdGameRequest, ListResponse,
    RenewRequest,
};
use reqwest::Method;

use crate::{Client, Error, Result};

fn id(s: &str) -> Result<&str> {
    if s.is_empty() {
        Err(Error::InvalidUrl("empty id".into()))
    } else {
        Ok(s)
    }
}

impl Client {
    /// Extends a container's lifetime by `secs` (`None`: the server's renewal step). A
    /// refused renewal (limit, deadline) is a 409 with code `quota_exceeded`.
    pub async fn renew(&self, container: &str, secs: Option<u64>) -> Result<Container> {
        let path = ["v1", "containers", id(container)?, "renew"];
        self.json(self.req(Method::POST, &path)?.json(&RenewRequest { secs }))
            .await
    }

    /// Creates an AWD game: a shared game network and one gamebox per team.
    pub async fn create_awd_game(&self, req: &CreateAwdGameRequest) -> Result<AwdGame> {
        self.json(self.req(Method::POST, &["v1", "awd", "games"])?.json(req))
            .await
    }

    pub async fn awd_games(&self) -> Result<ListResponse<AwdGame>> {
        self.json(self.req(Method::GET, &["v1", "awd", "games"])?)
            .await
    }

    /// One game by id or name (with the current flags, for admin tokens).
    pub async fn awd_game(&self, game: &str) -> Result<AwdGame> {
        self.json(self.req(Method::GET, &["v1", "awd", "games", id(game)?])?)
            .await
    }

    /// Puts a fresh flag into every gamebox; answers the new flag per team.
    pub async fn rotate_awd_flags(&self, game: &str) -> Result<AwdRotateResponse> {
        let path = ["v1", "awd", "games", id(game)?, "rotate"];
        self.json(self.req(Method::POST, &path)?).await
    }

    /// Recreates a team's gamebox from its image.
    pub async fn reset_awd_gamebox(&self, game: &str, team: &str) -> Result<AwdGame> {
        let path = ["v1", "awd", "games", id(game)?, "reset"];
        let body = AwdResetRequest {
            team: team.to_string(),
        };
        self.json(self.req(Method::POST, &path)?.json(&body)).await
    }

    /// Removes a game with its gameboxes and network.
    pub async fn delete_awd_game(&self, game: &str) -> Result<()> {
        self.empty(self.req(Method::DELETE, &["v1", "awd", "games", id(game)?])?)
            .await
    }
}
