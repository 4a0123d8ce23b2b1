//! `kisara awd ...`: AWD games (a shared game network and a gamebox per team).

use clap::{Args, Subcommand};
use kisara_api::{AwdGame, CreateAwdGameRequest, FlagInjection, FlagSpec};
use kisara_client::Client;

use super::containers::{parse_key_value, parse_port};
use super::output::{self, Output};

#[derive(Debug, Subcommand)]
pub enum AwdCommand {
    /// Create a game: `kisara awd create ctf1 IMAGE --team t1 --team t2 --flag-command 'echo $flag > /flag'`.
    Create(CreateArgs),
    /// List games.
    Ls,
    /// Show a game (with the current flag per team).
    Inspect { game: String },
    /// Put a fresh flag into every gamebox; prints the new flag per team.
    Rotate { game: String },
    /// Recreate a team's gamebox from its image.
    Reset { game: String, team: String },
    /// Remove a game with its gameboxes and network.
    Rm { game: String },
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    pub name: String,
    pub image: String,
    /// A team (repeat, or comma-separate).
    #[arg(long = "team", required = true, value_delimiter = ',')]
    pub teams: Vec<String>,
    /// Flag template (`flag{[uuid]}`, `flag{[team_hash]}`).
    #[arg(long, default_value = "flag{[uuid]}")]
    pub flag: String,
    /// Shell command that installs the flag, finding it in `$flag` (needed for rotation).
    #[arg(long)]
    pub flag_command: String,
    /// Publish a port on every gamebox.
    #[arg(short, long = "port", value_parser = parse_port)]
    pub ports: Vec<String>,
    #[arg(short, long = "env", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub env: Vec<(String, String)>,
    #[arg(long)]
    pub node: Option<String>,
    /// Command of every gamebox (after `--`).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub cmd: Vec<String>,
}

pub async fn run(client: &Client, out: &Output, cmd: AwdCommand) -> anyhow::Result<i32> {
    match cmd {
        AwdCommand::Create(a) => {
            let req = CreateAwdGameRequest {
                name: a.name,
                image: a.image,
                teams: a.teams,
                flag: FlagSpec {
                    template: a.flag,
                    inject: FlagInjection::Exec {
                        command: a.flag_command,
                        timeout_secs: 10,
                    },
                },
                ports: a.ports,
                cmd: (!a.cmd.is_empty()).then_some(a.cmd),
                env: a.env.into_iter().collect(),
                node: a.node,
                memory_mb: None,
                cpus: None,
            };
            let g = client.create_awd_game(&req).await?;
            show(out, &g)
        }
        AwdCommand::Ls => {
            let games = client.awd_games().await?;
            if out.json {
                out.print_json(&games)?;
                return Ok(0);
            }
            let mut t = output::table(&["ID", "NAME", "IMAGE", "NETWORK", "TEAMS"]);
            for g in &games.items {
                t.add_row(vec![
                    g.id.clone(),
                    g.name.clone(),
                    g.image.clone(),
                    format!("{} {}", g.network, g.subnet),
                    g.gameboxes.len().to_string(),
                ]);
            }
            output::print_table(&t)?;
            Ok(0)
        }
        AwdCommand::Inspect { game } => show(out, &client.awd_game(&game).await?),
        AwdCommand::Rotate { game } => {
            let r = client.rotate_awd_flags(&game).await?;
            if out.json {
                out.print_json(&r)?;
            } else {
                for (team, flag) in &r.flags {
                    output::line(&format!("{team}\t{flag}"))?;
                }
                for (team, why) in &r.errors {
                    eprintln!("{team}: rotation failed: {why}");
                }
            }
            Ok(if r.errors.is_empty() { 0 } else { 1 })
        }
        AwdCommand::Reset { game, team } => {
            show(out, &client.reset_awd_gamebox(&game, &team).await?)
        }
        AwdCommand::Rm { game } => {
            client.delete_awd_game(&game).await?;
            Ok(0)
        }
    }
}

fn show(out: &Output, g: &AwdGame) -> anyhow::Result<i32> {
    if out.json {
        out.print_json(g)?;
        return Ok(0);
    }
    output::line(&format!(
        "{} ({}) on {}, network {} {}",
        g.name, g.id, g.node_id, g.network, g.subnet
    ))?;
    let mut t = output::table(&["TEAM", "CONTAINER", "IP", "PORTS"]);
    for b in &g.gameboxes {
        t.add_row(vec![
            b.team.clone(),
            b.container_id.clone(),
            b.ip_address.clone().unwrap_or_else(|| "-".into()),
            b.host_port.clone(),
        ]);
    }
    output::print_table(&t)?;
    Ok(0)
}
