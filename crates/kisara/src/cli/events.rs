//! `kisara events`: follow the cluster's events until Ctrl-C.

use clap::Args;
use futures::StreamExt;
use kisara_client::{Client, Event, EventQuery};

use super::output::{self, Output};

#[derive(Debug, Args)]
pub struct EventsArgs {
    /// Only these kinds (repeatable or comma-separated); `container.` matches a prefix.
    /// `node.heartbeat` must be named to be shown.
    #[arg(long = "kind", value_name = "KIND")]
    pub kinds: Vec<String>,
    /// Only events of this node (id or name).
    #[arg(long)]
    pub node: Option<String>,
    /// Only events of this owner.
    #[arg(long)]
    pub owner: Option<String>,
    /// First replay the stored events after this id.
    #[arg(long, value_name = "ID")]
    pub since: Option<u64>,
}

/// One event as a line: time, id, kind, then what it is about.
pub fn format_event(e: &Event) -> String {
    let mut line = format!(
        "{} {:>6} {:<18}",
        rfc3339_ms(e.time),
        if e.id == 0 {
            "-".to_string()
        } else {
            e.id.to_string()
        },
        e.kind
    );
    let fields = [
        ("node", e.node_id.as_deref()),
        ("container", e.container_id.as_deref()),
        ("owner", e.owner.as_deref()),
        ("module", e.module.as_deref()),
    ];
    for (k, v) in fields {
        if let Some(v) = v {
            line.push_str(&format!(" {k}={v}"));
        }
    }
    if let Some(obj) = e.data.as_object() {
        for key in ["name", "image", "exit_code", "host_port"] {
            match obj.get(key) {
                Some(serde_json::Value::String(s)) if !s.is_empty() => {
                    line.push_str(&format!(" {key}={s}"))
                }
                Some(v @ serde_json::Value::Number(_)) => line.push_str(&format!(" {key}={v}")),
                _ => {}
            }
        }
    }
    line
}

/// Unix milliseconds as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub fn rfc3339_ms(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let millis = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

pub async fn run(client: &Client, out: &Output, a: EventsArgs) -> anyhow::Result<i32> {
    let kinds: Vec<String> = a
        .kinds
        .iter()
        .flat_map(|k| k.split(','))
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .map(str::to_string)
        .collect();
    let query = EventQuery {
        kinds: (!kinds.is_empty()).then(|| kinds.join(",")),
        node: a.node,
        owner: a.owner,
        since: a.since,
    };
    let mut stream = client.events(&query).await?;
    loop {
        let next = tokio::select! {
            n = stream.next() => n,
            _ = tokio::signal::ctrl_c() => return Ok(0),
        };
        match next {
            Some(Ok(e)) => {
                if out.json {
                    output::line(&serde_json::to_string(&e)?)?;
                } else {
                    output::line(&format_event(&e))?;
                }
            }
            Some(Err(e)) => return Err(e.into()),
            None => return Ok(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_utc_rfc3339() {
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(rfc3339_ms(1_700_000_000_000), "2023-11-14T22:13:20.000Z");
    }

    #[test]
    fn lines_name_what_the_event_is_about() {
        let e = Event {
            id: 42,
            kind: "container.die".into(),
            time: 0,
            node_id: Some("n1".into()),
            container_id: Some("c1".into()),
            owner: Some("team1".into()),
            module: None,
            data: serde_json::json!({"name": "kisara-c1", "exit_code": 3}),
        };
        let line = format_event(&e);
        assert!(line.contains("    42 container.die"), "{line}");
        assert!(
            line.ends_with("node=n1 container=c1 owner=team1 name=kisara-c1 exit_code=3"),
            "{line}"
        );
    }
}
