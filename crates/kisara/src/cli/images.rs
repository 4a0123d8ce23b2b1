//! `image ls | pull | rm`.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::time::Duration;

use clap::Subcommand;
use futures::StreamExt;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use kisara_client::{Client, PullProgress, PullRequest};

use super::containers::each_id;
use super::output::{self, Output};

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// List the images on the nodes.
    #[command(visible_alias = "list")]
    Ls {
        /// Only this node (id or name).
        #[arg(long)]
        node: Option<String>,
    },
    /// Pull an image onto one node, or onto every ready node.
    Pull {
        /// Image reference, e.g. `busybox:latest`.
        image: String,
        /// Only this node (id or name).
        #[arg(long)]
        node: Option<String>,
    },
    /// Remove images.
    #[command(visible_alias = "remove")]
    Rm {
        /// Remove even when containers use the image.
        #[arg(short, long)]
        force: bool,
        /// Only on this node (id or name); every node otherwise.
        #[arg(long)]
        node: Option<String>,
        /// Image references or ids.
        #[arg(required = true)]
        references: Vec<String>,
    },
}

pub async fn run(client: &Client, out: &Output, cmd: ImageCommand) -> anyhow::Result<i32> {
    match cmd {
        ImageCommand::Ls { node } => ls(client, out, node.as_deref()).await,
        ImageCommand::Pull { image, node } => pull(client, out, image, node).await,
        ImageCommand::Rm {
            force,
            node,
            references,
        } => {
            let node = node.as_deref();
            each_id(out, &references, async |r| {
                client.remove_image(r, node, force).await
            })
            .await
        }
    }
}

async fn ls(client: &Client, out: &Output, node: Option<&str>) -> anyhow::Result<i32> {
    let list = client.list_images(node).await?;
    output::warn_node_errors(&list.node_errors);
    if out.json {
        out.print_json(&list)?;
        return Ok(0);
    }
    let now = output::now();
    let mut t = output::table(&["ID", "TAGS", "SIZE", "CREATED", "NODE"]);
    for i in &list.items {
        let tags = if i.tags.is_empty() {
            "<none>".to_string()
        } else {
            i.tags.join(", ")
        };
        t.add_row(vec![
            output::short_id(&i.id).to_string(),
            tags,
            output::human_bytes(i.size.max(0) as u64),
            output::ago(i.created, now),
            output::short_id(&i.node_id).to_string(),
        ]);
    }
    output::print_table(&t)?;
    Ok(0)
}

async fn pull(
    client: &Client,
    out: &Output,
    image: String,
    node: Option<String>,
) -> anyhow::Result<i32> {
    let req = PullRequest {
        image: image.clone(),
        node,
        nodes: Vec::new(),
    };
    let mut stream = client.pull_image(&req).await?;
    let mut view = if out.json {
        View::Json
    } else if std::io::stderr().is_terminal() {
        View::Bars(BarsView::default())
    } else {
        View::Plain(PlainView::default())
    };
    let mut outcome = PullOutcome::default();
    while let Some(item) = stream.next().await {
        let p = match item {
            Ok(p) => p,
            Err(e) => {
                view.finish();
                return Err(e.into());
            }
        };
        outcome.record(&p);
        view.show(&p)?;
    }
    view.finish();
    match outcome.result(&image) {
        Ok(()) => Ok(0),
        Err(message) => {
            eprintln!("error: {message}");
            Ok(1)
        }
    }
}

/// What a pull came to, from its progress lines: failed if any node reported `error`, cut off
/// if the last line is not `done`.
#[derive(Debug, Default)]
struct PullOutcome {
    failures: Vec<(String, String)>,
    last_status: Option<String>,
}

impl PullOutcome {
    fn record(&mut self, p: &PullProgress) {
        if p.status == "error" {
            let message = p.error.clone().unwrap_or_else(|| "unknown error".into());
            self.failures.push((p.node_id.clone(), message));
        }
        self.last_status = Some(p.status.clone());
    }

    fn result(&self, image: &str) -> Result<(), String> {
        if !self.failures.is_empty() {
            let each: Vec<String> = self
                .failures
                .iter()
                .map(|(node, msg)| format!("on node {node}: {msg}"))
                .collect();
            return Err(format!("pull of {image} failed {}", each.join("; ")));
        }
        if self.last_status.as_deref() != Some("done") {
            return Err(format!(
                "pull of {image} ended without a result (the stream was cut off)"
            ));
        }
        Ok(())
    }
}

enum View {
    /// Each progress line as one JSON line on stdout.
    Json,
    /// One line per change of a layer's status, for logs and pipes.
    Plain(PlainView),
    /// A bar per layer on stderr, for a terminal.
    Bars(BarsView),
}

impl View {
    fn show(&mut self, p: &PullProgress) -> anyhow::Result<()> {
        match self {
            View::Json => output::line(&serde_json::to_string(p)?)?,
            View::Plain(v) => {
                if let Some(line) = v.line(p) {
                    output::line(&line)?;
                }
            }
            View::Bars(v) => v.show(p),
        }
        Ok(())
    }

    fn finish(&mut self) {
        if let View::Bars(v) = self {
            v.finish();
        }
    }
}

/// `node: layer: status[: error]`.
fn describe(p: &PullProgress) -> String {
    let mut s = output::short_id(&p.node_id).to_string();
    if let Some(layer) = &p.layer {
        s.push_str(": ");
        s.push_str(output::short_id(layer));
    }
    s.push_str(": ");
    s.push_str(&p.status);
    if let Some(e) = &p.error {
        s.push_str(": ");
        s.push_str(e);
    }
    s
}

/// Drops the byte-by-byte `Downloading` repeats: prints a line only when the status of a
/// (node, layer) changes.
#[derive(Debug, Default)]
struct PlainView {
    last: HashMap<(String, Option<String>), String>,
}

impl PlainView {
    fn line(&mut self, p: &PullProgress) -> Option<String> {
        let key = (p.node_id.clone(), p.layer.clone());
        if self.last.get(&key) == Some(&p.status) && p.error.is_none() {
            return None;
        }
        self.last.insert(key, p.status.clone());
        Some(describe(p))
    }
}

#[derive(Default)]
struct BarsView {
    multi: MultiProgress,
    bars: HashMap<(String, String), ProgressBar>,
}

impl BarsView {
    fn show(&mut self, p: &PullProgress) {
        let Some(layer) = &p.layer else {
            // Lines about the image as a whole (`Digest: ...`, `done`) go above the bars.
            let _ = self.multi.println(describe(p));
            return;
        };
        let key = (p.node_id.clone(), layer.clone());
        let bar = self.bars.entry(key).or_insert_with(|| {
            let bar = self.multi.add(
                ProgressBar::new_spinner()
                    .with_style(spinner_style())
                    .with_prefix(format!(
                        "{} {}",
                        output::short_id(&p.node_id),
                        output::short_id(layer)
                    )),
            );
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        });
        if bar.is_finished() {
            return;
        }
        if let Some(total) = p.total.filter(|t| *t > 0) {
            if bar.length() != Some(total) {
                bar.set_style(bar_style());
                bar.set_length(total);
            }
        }
        if let Some(current) = p.current {
            bar.set_position(current);
        }
        match p.status.as_str() {
            "Pull complete" | "Already exists" => bar.finish_with_message(p.status.clone()),
            _ => bar.set_message(p.status.clone()),
        }
    }

    fn finish(&mut self) {
        for bar in self.bars.values() {
            if !bar.is_finished() {
                bar.abandon();
            }
        }
    }
}

fn spinner_style() -> ProgressStyle {
    ProgressStyle::with_template("{prefix} {spinner} {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_spinner())
}

fn bar_style() -> ProgressStyle {
    ProgressStyle::with_template("{prefix} {msg:16} [{bar:30}] {bytes}/{total_bytes}")
        .map(|s| s.progress_chars("=> "))
        .unwrap_or_else(|_| ProgressStyle::default_bar())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(node: &str, layer: Option<&str>, status: &str) -> PullProgress {
        PullProgress {
            node_id: node.into(),
            status: status.into(),
            layer: layer.map(Into::into),
            ..Default::default()
        }
    }

    #[test]
    fn outcome_done() {
        let mut o = PullOutcome::default();
        o.record(&line("n1", Some("l1"), "Downloading"));
        o.record(&line("n1", None, "done"));
        assert_eq!(o.result("busybox"), Ok(()));
    }

    #[test]
    fn outcome_error_names_node_and_message() {
        let mut o = PullOutcome::default();
        o.record(&PullProgress {
            error: Some("manifest unknown".into()),
            ..line("n2", None, "error")
        });
        o.record(&line("n1", None, "done"));
        let e = o.result("nope:1").unwrap_err();
        assert!(e.contains("n2") && e.contains("manifest unknown"), "{e}");
    }

    #[test]
    fn outcome_cut_off() {
        let mut o = PullOutcome::default();
        assert!(o.result("x").is_err());
        o.record(&line("n1", Some("l1"), "Downloading"));
        assert!(o.result("x").unwrap_err().contains("cut off"));
    }

    #[test]
    fn plain_view_prints_status_changes_only() {
        let mut v = PlainView::default();
        let mut d = line("n1", Some("abc"), "Downloading");
        d.current = Some(1);
        assert_eq!(v.line(&d).as_deref(), Some("n1: abc: Downloading"));
        d.current = Some(2);
        assert_eq!(v.line(&d), None);
        // Another node's same layer is its own line.
        assert!(v.line(&line("n2", Some("abc"), "Downloading")).is_some());
        assert_eq!(
            v.line(&line("n1", Some("abc"), "Pull complete")).as_deref(),
            Some("n1: abc: Pull complete")
        );
        assert_eq!(
            v.line(&line("n1", None, "done")).as_deref(),
            Some("n1: done")
        );
    }
}
