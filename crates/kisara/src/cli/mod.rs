//! Client verbs of the `kisara` binary (`ps`, `run`, `exec`, `image pull`, ...).
//!
//! The CLI is one more client of the server: every verb goes through the `kisara-client` SDK,
//! never around it, so what the CLI can do a platform can do too. Handlers are short and live
//! one file per verb group; tables and formatting are in `output`.

pub mod awd;
pub mod containers;
pub mod events;
pub mod images;
pub mod networks;
pub mod nodes;
pub mod output;
pub mod services;

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use kisara_client::Client;

use output::Output;

/// Name of the file in the data directory where `kisara up` writes the admin token.
pub const TOKEN_FILE: &str = "admin.token";

/// Where and how to reach the server. Global: accepted before or after the verb.
#[derive(Clone, Args)]
pub struct ClientArgs {
    /// URL of the Kisara server.
    #[arg(
        long,
        env = "KISARA_URL",
        help_heading = "Connection",
        default_value = "http://127.0.0.1:7474",
        global = true
    )]
    pub url: String,

    /// Bearer token [default: the admin token in the data directory].
    #[arg(
        long,
        env = "KISARA_TOKEN",
        hide_env_values = true,
        global = true,
        help_heading = "Connection"
    )]
    pub token: Option<String>,

    /// Data directory of a local `kisara up`, where its admin token is read from
    /// [default: $XDG_DATA_HOME/kisara, else ~/.local/share/kisara].
    #[arg(
        long,
        env = "KISARA_DATA_DIR",
        global = true,
        help_heading = "Connection"
    )]
    pub data_dir: Option<PathBuf>,
    /// CA certificate (PEM) to trust for an https:// server, e.g. the ca.pem of `kisara cert`.
    #[arg(long, env = "KISARA_CA", global = true, help_heading = "Connection")]
    pub ca: Option<PathBuf>,

    /// Print machine-readable JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
}

impl std::fmt::Debug for ClientArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientArgs")
            .field("url", &self.url)
            .field("token", &self.token.as_ref().map(|_| "***"))
            .field("data_dir", &self.data_dir)
            .field("json", &self.json)
            .finish()
    }
}

impl ClientArgs {
    /// `--data-dir`, else [`default_data_dir`].
    pub fn data_dir(&self) -> PathBuf {
        self.data_dir.clone().unwrap_or_else(default_data_dir)
    }
}

/// The client verbs.
#[derive(Debug, Subcommand)]
pub enum ClientCommand {
    /// List containers.
    Ps(containers::PsArgs),
    /// Launch a container somewhere in the cluster.
    Run(containers::RunArgs),
    /// Stop and remove containers.
    Stop {
        /// Kisara id, name, or Docker id prefix.
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Remove containers.
    Rm(containers::RmArgs),
    /// Extend a container's or a service's lifetime.
    Renew(containers::RenewArgs),
    /// AWD games: a shared game network and a gamebox per team; rotate flags, reset boxes.
    #[command(subcommand)]
    Awd(awd::AwdCommand),
    /// Show a container as JSON.
    Inspect {
        /// Kisara id, name, or Docker id prefix.
        id: String,
    },
    /// Run a command in a container; exits with the command's exit code.
    Exec(containers::ExecArgs),
    /// Print a container's output.
    Logs(containers::LogsArgs),
    /// Images on the nodes.
    #[command(subcommand)]
    Image(images::ImageCommand),
    /// Networks.
    #[command(subcommand)]
    Network(networks::NetworkCommand),
    /// Multi-container services from a compose file or a Kisara ServiceConfig.
    #[command(subcommand)]
    Service(services::ServiceCommand),
    /// Follow the cluster's events until Ctrl-C (`--kind container.`, `--since ID`).
    Events(events::EventsArgs),
    /// Nodes of the cluster. `kisara node` itself is shared with the agent (`kisara node
    /// --server URL ...`), so main.rs parses it and hands the verbs back through this variant.
    #[command(skip)]
    Node(nodes::NodeCommand),
}

/// Runs one client verb and returns the process exit code. Errors from the server are printed
/// here as `error: <message> (<code>)` and give exit code 1; only local failures (an unreadable
/// token file, a closed stdout) come back as `Err`.
pub async fn run(args: ClientArgs, cmd: ClientCommand) -> anyhow::Result<i32> {
    let data_dir = args.data_dir();
    let token = resolve_token(args.token.clone(), &data_dir)?;
    let had_token = token.is_some();
    let mut builder = Client::builder(&args.url);
    if let Some(t) = token {
        builder = builder.token(t);
    }
    if let Some(ca) = &args.ca {
        let pem = std::fs::read(ca)
            .map_err(|e| anyhow::anyhow!("CA certificate {}: {e}", ca.display()))?;
        builder = builder.ca_pem(pem);
    }
    let client = match builder.build() {
        Ok(c) => c,
        Err(e) => {
            output::print_error(&e);
            return Ok(2);
        }
    };
    let out = Output { json: args.json };
    let result = match cmd {
        ClientCommand::Ps(a) => containers::ps(&client, &out, a).await,
        ClientCommand::Run(a) => containers::run(&client, &out, a).await,
        ClientCommand::Stop { ids } => containers::stop(&client, &out, &ids).await,
        ClientCommand::Rm(a) => containers::rm(&client, &out, a).await,
        ClientCommand::Renew(a) => containers::renew(&client, &out, a).await,
        ClientCommand::Awd(c) => awd::run(&client, &out, c).await,
        ClientCommand::Inspect { id } => containers::inspect(&client, &out, &id).await,
        ClientCommand::Exec(a) => containers::exec(&client, &out, a).await,
        ClientCommand::Logs(a) => containers::logs(&client, a).await,
        ClientCommand::Image(c) => images::run(&client, &out, c).await,
        ClientCommand::Network(c) => networks::run(&client, &out, c).await,
        ClientCommand::Service(c) => services::run(&client, &out, c).await,
        ClientCommand::Node(c) => nodes::run(&client, &out, c).await,
        ClientCommand::Events(a) => events::run(&client, &out, a).await,
    };
    match result {
        Ok(code) => Ok(code),
        Err(e) if is_broken_pipe(&e) => Ok(0),
        Err(e) => match e.downcast_ref::<kisara_client::Error>() {
            Some(api) => {
                output::print_error(api);
                if api.status() == Some(401) && !had_token {
                    eprintln!(
                        "hint: no token given (--token or KISARA_TOKEN) and none found at {}",
                        data_dir.join(TOKEN_FILE).display()
                    );
                }
                Ok(1)
            }
            None => Err(e),
        },
    }
}

/// Whether stdout was closed by its reader (`kisara ps | head`): not a failure of the verb.
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// The data directory of a local installation: `$KISARA_DATA_DIR`, else
/// `$XDG_DATA_HOME/kisara`, else `$HOME/.local/share/kisara`, else `/var/lib/kisara` (a service
/// without a home). `kisara up` writes there and the client verbs read the token from there.
pub fn default_data_dir() -> PathBuf {
    data_dir_from(|k| std::env::var_os(k))
}

fn data_dir_from(var: impl Fn(&str) -> Option<OsString>) -> PathBuf {
    let set = |k: &str| var(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(dir) = set("KISARA_DATA_DIR") {
        return dir;
    }
    // The XDG spec says a relative value is to be ignored.
    if let Some(xdg) = set("XDG_DATA_HOME").filter(|p| p.is_absolute()) {
        return xdg.join("kisara");
    }
    if let Some(home) = set("HOME") {
        return home.join(".local/share/kisara");
    }
    PathBuf::from("/var/lib/kisara")
}

/// The token to send: `explicit` (from `--token` / `KISARA_TOKEN`) if non-empty, else the
/// content of `<data_dir>/admin.token`, else none. Surrounding whitespace is dropped.
pub fn resolve_token(explicit: Option<String>, data_dir: &Path) -> anyhow::Result<Option<String>> {
    resolve_token_file(explicit, data_dir, TOKEN_FILE)
}

/// [`resolve_token`] with another token file of the data directory (e.g. `gateway.token`).
pub fn resolve_token_file(
    explicit: Option<String>,
    data_dir: &Path,
    file: &str,
) -> anyhow::Result<Option<String>> {
    if let Some(t) = explicit.as_deref().map(str::trim).filter(|t| !t.is_empty()) {
        return Ok(Some(t.to_string()));
    }
    let path = data_dir.join(file);
    match std::fs::read_to_string(&path) {
        Ok(s) => Ok(Some(s.trim().to_string()).filter(|t| !t.is_empty())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(anyhow::Error::new(e).context(format!(
            "cannot read the token file {} (pass --token or set KISARA_TOKEN instead)",
            path.display()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> {
        let map: HashMap<String, OsString> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn data_dir_precedence() {
        let all = [
            ("KISARA_DATA_DIR", "/srv/kisara"),
            ("XDG_DATA_HOME", "/x"),
            ("HOME", "/home/u"),
        ];
        assert_eq!(data_dir_from(env(&all)), PathBuf::from("/srv/kisara"));
        assert_eq!(data_dir_from(env(&all[1..])), PathBuf::from("/x/kisara"));
        assert_eq!(
            data_dir_from(env(&all[2..])),
            PathBuf::from("/home/u/.local/share/kisara")
        );
        assert_eq!(
            data_dir_from(env(&[
                ("KISARA_DATA_DIR", ""),
                ("XDG_DATA_HOME", "rel"),
                ("HOME", "/h")
            ])),
            PathBuf::from("/h/.local/share/kisara")
        );
        assert_eq!(data_dir_from(env(&[])), PathBuf::from("/var/lib/kisara"));
    }

    #[test]
    fn token_from_flag_wins_over_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(TOKEN_FILE), "from-file\n").unwrap();
        assert_eq!(
            resolve_token(Some(" flag ".into()), dir.path())
                .unwrap()
                .as_deref(),
            Some("flag")
        );
        assert_eq!(
            resolve_token(Some("  ".into()), dir.path())
                .unwrap()
                .as_deref(),
            Some("from-file")
        );
        assert_eq!(
            resolve_token(None, dir.path()).unwrap().as_deref(),
            Some("from-file")
        );
    }

    #[test]
    fn missing_or_empty_token_file_means_no_token() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(resolve_token(None, dir.path()).unwrap(), None);
        std::fs::write(dir.path().join(TOKEN_FILE), " \n").unwrap();
        assert_eq!(resolve_token(None, dir.path()).unwrap(), None);
    }

    #[test]
    fn unreadable_token_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        // A directory where the file should be cannot be read as a file.
        std::fs::create_dir(dir.path().join(TOKEN_FILE)).unwrap();
        let e = resolve_token(None, dir.path()).unwrap_err();
        assert!(format!("{e:#}").contains(TOKEN_FILE), "{e:#}");
    }

    #[derive(clap::Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        cmd: ClientCommand,
    }

    fn parse(args: &[&str]) -> Cli {
        use clap::Parser;
        Cli::try_parse_from(std::iter::once("kisara").chain(args.iter().copied()))
            .unwrap_or_else(|e| panic!("{args:?}: {e}"))
    }

    #[test]
    fn command_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn run_takes_options_before_the_image_and_the_command_after() {
        let cli = parse(&[
            "run",
            "-p",
            "80",
            "-e",
            "FLAG=x",
            "--json",
            "busybox",
            "sh",
            "-c",
            "nc -ll -p 80",
        ]);
        assert!(cli.client.json);
        let ClientCommand::Run(a) = cli.cmd else {
            panic!("{:?}", cli.cmd)
        };
        assert_eq!(a.image, "busybox");
        assert_eq!(a.cmd, ["sh", "-c", "nc -ll -p 80"]);
        assert_eq!(a.ports, ["80/tcp"]);
        assert_eq!(a.env, [("FLAG".to_string(), "x".to_string())]);
    }

    #[test]
    fn exec_command_follows_the_double_dash() {
        let cli = parse(&["exec", "web", "--timeout", "5", "--", "sh", "-c", "exit 3"]);
        let ClientCommand::Exec(a) = cli.cmd else {
            panic!("{:?}", cli.cmd)
        };
        assert_eq!(a.id, "web");
        assert_eq!(a.timeout, Some(5));
        assert_eq!(a.cmd, ["sh", "-c", "exit 3"]);
    }

    #[test]
    fn global_flags_go_anywhere() {
        let cli = parse(&["image", "ls", "--json", "--url", "http://h:1"]);
        assert!(cli.client.json);
        assert_eq!(cli.client.url, "http://h:1");
    }

    #[test]
    fn bad_values_are_refused_by_the_parser() {
        use clap::Parser;
        assert!(Cli::try_parse_from(["kisara", "run", "-p", "8080:80", "x"]).is_err());
        assert!(Cli::try_parse_from(["kisara", "run", "-e", "NOEQ", "x"]).is_err());
        assert!(Cli::try_parse_from(["kisara", "stop"]).is_err());
        let e = Cli::try_parse_from(["kisara", "run", "--expose", "tunnel", "x"]).unwrap_err();
        assert!(e.to_string().contains("expected host or gateway"), "{e}");
    }

    #[test]
    fn run_takes_the_exposure_mode_and_cap() {
        let cli = parse(&[
            "run",
            "--expose",
            "gateway",
            "--bandwidth-kbps",
            "800",
            "busybox",
        ]);
        let ClientCommand::Run(a) = cli.cmd else {
            panic!("{:?}", cli.cmd)
        };
        assert_eq!(a.exposure.expose, Some(kisara_api::ExposeMode::Gateway));
        assert_eq!(a.exposure.bandwidth_kbps, Some(800));
    }

    #[test]
    fn debug_masks_the_token() {
        let a = ClientArgs {
            url: "http://x".into(),
            token: Some("sekrit".into()),
            data_dir: None,
            ca: None,
            json: false,
        };
        assert!(!format!("{a:?}").contains("sekrit"));
    }
}
