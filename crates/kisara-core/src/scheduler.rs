//! The scheduler: which node a new container (or network) goes to.
//!
//! A pure function of a snapshot of the nodes and a request, like Nomad's: [`place`] filters
//! the nodes (ready, not cordoned or draining, the request's node or labels, room left in
//! slots, memory and cpu) and ranks the rest, preferring nodes known to hold the image, then by
//! score: every bounded resource becomes the fraction of it in use *after* the placement, and a
//! node's load is the largest of those fractions (all in one unit, parts per million). Spread
//! takes the least loaded node, binpack the most loaded one that fits. Ties go to the node with
//! fewer containers (spread) or more (binpack), then to the smallest name and id, so the same
//! input always gives the same answer.
//!
//! Nothing here reads a clock or a lock: the server keeps the snapshot (its allocation ledger),
//! asks for a plan, re-checks it with [`fits`] against the latest state and commits it.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::sync::Arc;

pub use kisara_api::PlacementStrategy as Strategy;

/// Resources in the scheduler's integer units: memory in MiB, cpu in millicores.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Resources {
    pub memory_mb: u64,
    pub cpu_milli: u64,
}

impl Resources {
    /// From a request's MiB and cores (cores rounded to the millicore).
    pub fn new(memory_mb: u64, cpus: f64) -> Resources {
        let cpu_milli = if cpus.is_finite() && cpus > 0.0 {
            (cpus * 1000.0).round() as u64
        } else {
            0
        };
        Resources {
            memory_mb,
            cpu_milli,
        }
    }
}

/// Why a node is not ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    Ready,
    Unreachable,
    Down,
}

/// A node as the scheduler sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeSnapshot {
    pub id: String,
    pub name: String,
    pub readiness: Readiness,
    pub cordoned: bool,
    pub draining: bool,
    /// Effective labels (the agent's, with the operator's changes).
    pub labels: BTreeMap<String, String>,
    /// Most containers; 0 = unlimited.
    pub max_containers: u32,
    /// What may be reserved in total; a zero field means "not bounded" (unknown).
    pub capacity: Resources,
    /// Containers placed here.
    pub containers: u32,
    /// What those containers reserved.
    pub reserved: Resources,
    /// Image ids and tags the node last reported; `None` when it has not reported yet.
    pub images: Option<Arc<HashSet<String>>>,
    /// The node's position among all nodes ordered by (name, id), when the caller keeps one
    /// (0 for every node otherwise). Ties go to the smaller rank, then to the smaller name and
    /// id: a rank consistent with that order changes no answer, and spares comparing names
    /// when most nodes tie (spread over an idle cluster).
    pub rank: u32,
}

impl NodeSnapshot {
    /// A ready, empty node with no limits; for tests and builders.
    pub fn new(id: impl Into<String>, name: impl Into<String>) -> NodeSnapshot {
        NodeSnapshot {
            id: id.into(),
            name: name.into(),
            readiness: Readiness::Ready,
            cordoned: false,
            draining: false,
            labels: BTreeMap::new(),
            max_containers: 0,
            capacity: Resources::default(),
            containers: 0,
            reserved: Resources::default(),
            images: None,
            rank: 0,
        }
    }

    /// Whether the node reported `image` (a reference as written in a request, or an id).
    pub fn image_presence(&self, image: &str) -> ImagePresence {
        self.presence_of(image, &with_default_tag(image))
    }

    /// [`image_presence`](Self::image_presence) with the tagged form computed by the caller.
    fn presence_of(&self, image: &str, tagged: &str) -> ImagePresence {
        match &self.images {
            None => ImagePresence::Unknown,
            Some(set) if set.contains(image) || set.contains(tagged) => ImagePresence::Present,
            Some(_) => ImagePresence::Absent,
        }
    }

    /// Adds a placement to the snapshot (what the server's ledger does on commit).
    pub fn reserve(&mut self, res: Resources) {
        self.containers = self.containers.saturating_add(1);
        self.reserved.memory_mb = self.reserved.memory_mb.saturating_add(res.memory_mb);
        self.reserved.cpu_milli = self.reserved.cpu_milli.saturating_add(res.cpu_milli);
    }

    /// Takes a placement back (removal, or a launch that failed).
    pub fn release(&mut self, res: Resources) {
        self.containers = self.containers.saturating_sub(1);
        self.reserved.memory_mb = self.reserved.memory_mb.saturating_sub(res.memory_mb);
        self.reserved.cpu_milli = self.reserved.cpu_milli.saturating_sub(res.cpu_milli);
    }
}

/// Whether a node holds an image, as far as the server knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ImagePresence {
    Absent,
    Unknown,
    Present,
}

/// `busybox` → `busybox:latest`; references with a tag or digest are kept.
pub fn with_default_tag(image: &str) -> String {
    let last = image.rsplit('/').next().unwrap_or(image);
    if image.contains('@') || last.contains(':') || image.starts_with("sha256:") {
        image.to_string()
    } else {
        format!("{image}:latest")
    }
}

/// What is to be placed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PlacementRequest {
    /// A node id or name the caller insists on; every filter still applies to it.
    pub node: Option<String>,
    /// Labels the node must carry.
    pub node_selector: BTreeMap<String, String>,
    pub resources: Resources,
    /// Takes a container slot (false for a network of its own).
    pub takes_slot: bool,
    /// Image the container runs, for the image-presence preference.
    pub image: Option<String>,
}

/// The scheduler's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// Index into the snapshot slice.
    pub index: usize,
    pub node_id: String,
}

/// Why a node was filtered out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    NotReady(Readiness),
    Cordoned,
    Draining,
    NotSelected,
    LabelMismatch(String),
    Full { max_containers: u32 },
    Memory { wanted: u64, free: u64 },
    Cpu { wanted: u64, free: u64 },
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rejection::NotReady(Readiness::Unreachable) => f.write_str("unreachable"),
            Rejection::NotReady(_) => f.write_str("down"),
            Rejection::Cordoned => f.write_str("cordoned"),
            Rejection::Draining => f.write_str("draining"),
            Rejection::NotSelected => f.write_str("not the node asked for"),
            Rejection::LabelMismatch(l) => write!(f, "label {l} does not match"),
            Rejection::Full { max_containers } => {
                write!(f, "full ({max_containers} of {max_containers} containers)")
            }
            Rejection::Memory { wanted, free } => {
                write!(
                    f,
                    "not enough memory ({wanted} MiB wanted, {free} MiB free)"
                )
            }
            Rejection::Cpu { wanted, free } => write!(
                f,
                "not enough cpu ({} wanted, {} free)",
                cores(*wanted),
                cores(*free)
            ),
        }
    }
}

fn cores(milli: u64) -> String {
    format!("{}.{:03}", milli / 1000, milli % 1000)
        .trim_end_matches('0')
        .trim_end_matches('.')
        .to_string()
}

/// No node can take the request; every node with its reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoPlacement {
    /// `(node name, why)`, in snapshot order.
    pub reasons: Vec<(String, Rejection)>,
    /// The request named a node that is not in the snapshot.
    pub unknown_node: Option<String>,
}

impl NoPlacement {
    /// Whether the only reason is that the one node asked for is not ready.
    pub fn named_node_not_ready(&self) -> bool {
        let relevant: Vec<_> = self
            .reasons
            .iter()
            .filter(|(_, r)| *r != Rejection::NotSelected)
            .collect();
        relevant.len() == 1 && matches!(relevant[0].1, Rejection::NotReady(_))
    }
}

impl fmt::Display for NoPlacement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(n) = &self.unknown_node {
            return write!(f, "unknown node {n:?}");
        }
        let relevant: Vec<String> = self
            .reasons
            .iter()
            .filter(|(_, r)| *r != Rejection::NotSelected)
            .map(|(n, r)| format!("{n}: {r}"))
            .collect();
        if relevant.is_empty() {
            return f.write_str("no node has joined the cluster");
        }
        write!(f, "no node can take it: {}", relevant.join("; "))
    }
}

impl std::error::Error for NoPlacement {}

/// Whether `node` can take `req` now; the reason when not. The server calls this again on the
/// latest state before it commits a plan.
pub fn fits(node: &NodeSnapshot, req: &PlacementRequest) -> Result<(), Rejection> {
    if let Some(want) = &req.node {
        if *want != node.id && *want != node.name {
            return Err(Rejection::NotSelected);
        }
    }
    if node.readiness != Readiness::Ready {
        return Err(Rejection::NotReady(node.readiness));
    }
    if node.draining {
        return Err(Rejection::Draining);
    }
    if node.cordoned {
        return Err(Rejection::Cordoned);
    }
    for (k, v) in &req.node_selector {
        if node.labels.get(k) != Some(v) {
            return Err(Rejection::LabelMismatch(format!("{k}={v}")));
        }
    }
    if req.takes_slot && node.max_containers > 0 && node.containers >= node.max_containers {
        return Err(Rejection::Full {
            max_containers: node.max_containers,
        });
    }
    let free = |cap: u64, used: u64| cap.saturating_sub(used);
    if node.capacity.memory_mb > 0 {
        let f = free(node.capacity.memory_mb, node.reserved.memory_mb);
        if req.resources.memory_mb > f {
            return Err(Rejection::Memory {
                wanted: req.resources.memory_mb,
                free: f,
            });
        }
    }
    if node.capacity.cpu_milli > 0 {
        let f = free(node.capacity.cpu_milli, node.reserved.cpu_milli);
        if req.resources.cpu_milli > f {
            return Err(Rejection::Cpu {
                wanted: req.resources.cpu_milli,
                free: f,
            });
        }
    }
    Ok(())
}

const PPM: u64 = 1_000_000;

fn fraction_ppm(used: u64, cap: u64) -> u64 {
    // u128: capacities up to u64::MAX must not overflow the multiplication.
    ((used as u128 * PPM as u128) / cap.max(1) as u128).min(PPM as u128) as u64
}

/// A node's load after the placement: the largest fraction in use among its bounded resources
/// (slots, memory, cpu), in parts per million; 0 when nothing is bounded.
pub fn load_after(node: &NodeSnapshot, req: &PlacementRequest) -> u64 {
    let mut load = 0;
    if req.takes_slot && node.max_containers > 0 {
        load = load.max(fraction_ppm(
            node.containers as u64 + 1,
            node.max_containers as u64,
        ));
    }
    if node.capacity.memory_mb > 0 {
        load = load.max(fraction_ppm(
            node.reserved.memory_mb + req.resources.memory_mb,
            node.capacity.memory_mb,
        ));
    }
    if node.capacity.cpu_milli > 0 {
        load = load.max(fraction_ppm(
            node.reserved.cpu_milli + req.resources.cpu_milli,
            node.capacity.cpu_milli,
        ));
    }
    load
}

/// Picks the node for `req`, or says for every node why it cannot. O(nodes); deterministic.
pub fn place(
    nodes: &[NodeSnapshot],
    req: &PlacementRequest,
    strategy: Strategy,
) -> Result<Placement, NoPlacement> {
    let index = place_by(nodes.len(), |i| &nodes[i], req, strategy)?;
    Ok(Placement {
        index,
        node_id: nodes[index].id.clone(),
    })
}

/// [`place`] over `len` snapshots reached through `node(i)`, for callers that keep their
/// snapshots inside larger records and should not copy them per placement. Returns the index.
pub fn place_by<'a>(
    len: usize,
    node: impl Fn(usize) -> &'a NodeSnapshot,
    req: &PlacementRequest,
    strategy: Strategy,
) -> Result<usize, NoPlacement> {
    if let Some(want) = &req.node {
        if !(0..len)
            .map(&node)
            .any(|n| n.id == *want || n.name == *want)
        {
            return Err(NoPlacement {
                reasons: Vec::new(),
                unknown_node: Some(want.clone()),
            });
        }
    }
    // The best so far: (image presence, load key, container key, name, id) compared so that
    // "greater is better" and ties fall to the smallest name and id.
    type Key<'a> = (
        ImagePresence,
        u64,
        u64,
        std::cmp::Reverse<u32>,
        std::cmp::Reverse<(&'a str, &'a str)>,
    );
    let mut best: Option<(Key<'_>, usize)> = None;
    let mut reasons = Vec::new();
    // Normalized once, not once per node.
    let image = req
        .image
        .as_ref()
        .map(|i| (i.as_str(), with_default_tag(i)));
    // Nodes that reported the same images share one set (the server's ledger interns them):
    // the answer for the last set seen is reused, so a thousand alike nodes cost one lookup.
    let mut memo: Option<(*const HashSet<String>, ImagePresence)> = None;
    for i in 0..len {
        let n = node(i);
        if let Err(r) = fits(n, req) {
            reasons.push((n.name.clone(), r));
            continue;
        }
        let presence = match (&image, &n.images) {
            (Some((img, tagged)), Some(set)) => match memo {
                Some((p, presence)) if std::ptr::eq(p, Arc::as_ptr(set)) => presence,
                _ => {
                    let presence = n.presence_of(img, tagged);
                    memo = Some((Arc::as_ptr(set), presence));
                    presence
                }
            },
            (Some(_), None) | (None, _) => ImagePresence::Unknown,
        };
        let load = load_after(n, req);
        let count = n.containers as u64;
        let (load_key, count_key) = match strategy {
            Strategy::Spread => (PPM - load.min(PPM), u64::MAX - count),
            Strategy::Binpack => (load, count),
        };
        let key = (
            presence,
            load_key,
            count_key,
            std::cmp::Reverse(n.rank),
            std::cmp::Reverse((n.name.as_str(), n.id.as_str())),
        );
        if best.as_ref().is_none_or(|(b, _)| key > *b) {
            best = Some((key, i));
        }
    }
    match best {
        Some((_, index)) => Ok(index),
        None => Err(NoPlacement {
            reasons,
            unknown_node: None,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::Strategy;
    use super::*;
    use proptest::prelude::{any, prop, prop_assert, prop_assert_eq, proptest};
    use proptest::strategy::Strategy as _;

    fn node(name: &str) -> NodeSnapshot {
        NodeSnapshot::new(format!("id-{name}"), name)
    }

    fn sized(name: &str, max: u32, mem: u64, cpu: u64) -> NodeSnapshot {
        let mut n = node(name);
        n.max_containers = max;
        n.capacity = Resources {
            memory_mb: mem,
            cpu_milli: cpu,
        };
        n
    }

    #[test]
    fn shared_image_sets_are_answered_per_set() {
        // Nodes sharing one set, and nodes with sets of their own, in every order: the node
        // holding the image wins wherever it stands.
        let shared = Arc::new(HashSet::from(["db:latest".to_string()]));
        let with = Arc::new(HashSet::from(["web:latest".to_string()]));
        for pos in 0..4 {
            let nodes: Vec<NodeSnapshot> = (0..4)
                .map(|i| {
                    let mut n = node(&format!("n{i}"));
                    n.images = Some(if i == pos {
                        with.clone()
                    } else {
                        shared.clone()
                    });
                    n
                })
                .collect();
            let mut r = req(1, 1);
            r.image = Some("web".into());
            let got = place_by(nodes.len(), |i| &nodes[i], &r, Strategy::Spread).unwrap();
            assert_eq!(got, pos);
            // And the other way round: only the shared set holds it; the first such wins.
            r.image = Some("db".into());
            let got = place_by(nodes.len(), |i| &nodes[i], &r, Strategy::Spread).unwrap();
            assert_eq!(got, usize::from(pos == 0));
        }
    }

    fn req(mem: u64, cpu: u64) -> PlacementRequest {
        PlacementRequest {
            resources: Resources {
                memory_mb: mem,
                cpu_milli: cpu,
            },
            takes_slot: true,
            ..Default::default()
        }
    }

    fn pick(nodes: &[NodeSnapshot], r: &PlacementRequest, s: Strategy) -> String {
        match place(nodes, r, s) {
            Ok(p) => nodes[p.index].name.clone(),
            Err(e) => format!("ERR {e}"),
        }
    }

    #[test]
    fn table() {
        let busy = {
            let mut n = sized("busy", 10, 1000, 4000);
            n.containers = 5;
            n.reserved = Resources {
                memory_mb: 500,
                cpu_milli: 2000,
            };
            n
        };
        let idle = sized("idle", 10, 1000, 4000);
        let mut cordoned = sized("cordoned", 10, 1000, 4000);
        cordoned.cordoned = true;
        let mut draining = sized("draining", 10, 1000, 4000);
        draining.draining = true;
        let mut down = sized("down", 10, 1000, 4000);
        down.readiness = Readiness::Down;
        let mut full = sized("full", 2, 1000, 4000);
        full.containers = 2;
        let mut zone_a = sized("zone-a", 10, 1000, 4000);
        zone_a.labels.insert("zone".into(), "a".into());
        let mut with_image = busy.clone();
        with_image.name = "has-image".into();
        with_image.images = Some(Arc::new(HashSet::from(["web:latest".to_string()])));
        let mut without_image = idle.clone();
        without_image.name = "no-image".into();
        without_image.images = Some(Arc::new(HashSet::new()));

        let selector = |k: &str, v: &str| {
            let mut r = req(100, 100);
            r.node_selector.insert(k.into(), v.into());
            r
        };
        let named = |n: &str| {
            let mut r = req(100, 100);
            r.node = Some(n.into());
            r
        };
        let image = |i: &str| {
            let mut r = req(100, 100);
            r.image = Some(i.into());
            r
        };
        let cases: Vec<(&str, Vec<NodeSnapshot>, PlacementRequest, Strategy, &str)> = vec![
            ("spread takes the idle node", vec![busy.clone(), idle.clone()], req(100, 100), Strategy::Spread, "idle"),
            ("binpack takes the busy node", vec![busy.clone(), idle.clone()], req(100, 100), Strategy::Binpack, "busy"),
            ("cordoned, draining, down and full are skipped", vec![cordoned.clone(), draining.clone(), down.clone(), full.clone(), busy.clone()], req(100, 100), Strategy::Spread, "busy"),
            ("ties go to the smallest name", vec![sized("b", 10, 0, 0), sized("a", 10, 0, 0)], req(1, 1), Strategy::Spread, "a"),
            ("unbounded nodes spread by count", vec![{ let mut n = node("a"); n.containers = 3; n }, { let mut n = node("b"); n.containers = 2; n }], req(1, 1), Strategy::Spread, "b"),
            ("memory filter", vec![busy.clone()], req(600, 100), Strategy::Spread, "ERR no node can take it: busy: not enough memory (600 MiB wanted, 500 MiB free)"),
            ("cpu filter", vec![busy.clone()], req(100, 2500), Strategy::Spread, "ERR no node can take it: busy: not enough cpu (2.5 wanted, 2 free)"),
            ("selector matches", vec![idle.clone(), zone_a.clone()], selector("zone", "a"), Strategy::Spread, "zone-a"),
            ("selector matches nothing", vec![idle.clone()], selector("zone", "b"), Strategy::Spread, "ERR no node can take it: idle: label zone=b does not match"),
            ("named node wins over a better one", vec![idle.clone(), busy.clone()], named("busy"), Strategy::Spread, "busy"),
            ("named by id", vec![idle.clone(), busy.clone()], named("id-busy"), Strategy::Spread, "busy"),
            ("named node that is full", vec![idle.clone(), full.clone()], named("full"), Strategy::Spread, "ERR no node can take it: full: full (2 of 2 containers)"),
            ("unknown named node", vec![idle.clone()], named("nope"), Strategy::Spread, "ERR unknown node \"nope\""),
            ("no nodes", vec![], req(1, 1), Strategy::Spread, "ERR no node has joined the cluster"),
            ("image presence beats load", vec![without_image.clone(), with_image.clone()], image("web"), Strategy::Spread, "has-image"),
            ("unknown presence beats absence", vec![without_image.clone(), busy.clone()], image("web"), Strategy::Spread, "busy"),
            ("every reason is listed", vec![cordoned.clone(), down.clone(), full.clone()], req(1, 1), Strategy::Spread, "ERR no node can take it: cordoned: cordoned; down: down; full: full (2 of 2 containers)"),
        ];
        for (what, nodes, r, s, want) in cases {
            assert_eq!(pick(&nodes, &r, s), want, "{what}");
        }
    }

    #[test]
    fn networks_take_no_slot() {
        let full = {
            let mut n = sized("full", 1, 0, 0);
            n.containers = 1;
            n
        };
        let mut r = req(0, 0);
        r.takes_slot = false;
        assert_eq!(pick(&[full], &r, Strategy::Spread), "full");
    }

    #[test]
    fn named_node_not_ready_is_told_apart() {
        let mut down = node("down");
        down.readiness = Readiness::Unreachable;
        let mut r = req(1, 1);
        r.node = Some("down".into());
        let e = place(&[node("up"), down], &r, Strategy::Spread).unwrap_err();
        assert!(e.named_node_not_ready());
        assert_eq!(e.to_string(), "no node can take it: down: unreachable");
    }

    #[test]
    fn default_tags() {
        assert_eq!(with_default_tag("busybox"), "busybox:latest");
        assert_eq!(
            with_default_tag("reg:5000/busybox"),
            "reg:5000/busybox:latest"
        );
        assert_eq!(with_default_tag("busybox:1"), "busybox:1");
        assert_eq!(with_default_tag("b@sha256:00"), "b@sha256:00");
    }

    fn arb_node(i: usize) -> impl proptest::strategy::Strategy<Value = NodeSnapshot> {
        (
            0u32..6,
            0u64..4,
            0u64..4,
            prop::bool::weighted(0.1),
            prop::bool::weighted(0.1),
        )
            .prop_map(move |(max, mem, cpu, cordoned, down)| {
                let mut n = sized(&format!("n{i}"), max, mem * 256, cpu * 1000);
                n.cordoned = cordoned;
                if down {
                    n.readiness = Readiness::Unreachable;
                }
                n
            })
    }

    fn arb_nodes() -> impl proptest::strategy::Strategy<Value = Vec<NodeSnapshot>> {
        (1usize..8).prop_flat_map(|k| (0..k).map(arb_node).collect::<Vec<_>>())
    }

    fn arb_req() -> impl proptest::strategy::Strategy<Value = PlacementRequest> {
        (0u64..300, 0u64..1500, prop::option::of(0usize..8)).prop_map(|(mem, cpu, named)| {
            let mut r = req(mem, cpu);
            r.node = named.map(|i| format!("n{i}"));
            r
        })
    }

    proptest! {
        /// Placing a sequence of requests and committing each plan never takes a node past
        /// any of its limits, never picks a full, cordoned or unready node, and a refusal
        /// means that no node fits.
        #[test]
        fn never_over_commits(mut nodes in arb_nodes(), reqs in prop::collection::vec(arb_req(), 1..40),
                              binpack in any::<bool>()) {
            let s = if binpack { Strategy::Binpack } else { Strategy::Spread };
            for r in &reqs {
                match place(&nodes, r, s) {
                    Ok(p) => {
                        let n = &mut nodes[p.index];
                        prop_assert!(fits(n, r).is_ok());
                        prop_assert!(n.readiness == Readiness::Ready && !n.cordoned);
                        prop_assert!(n.max_containers == 0 || n.containers < n.max_containers);
                        n.reserve(r.resources);
                        if n.max_containers > 0 { prop_assert!(n.containers <= n.max_containers); }
                        if n.capacity.memory_mb > 0 { prop_assert!(n.reserved.memory_mb <= n.capacity.memory_mb); }
                        if n.capacity.cpu_milli > 0 { prop_assert!(n.reserved.cpu_milli <= n.capacity.cpu_milli); }
                    }
                    Err(e) => {
                        if e.unknown_node.is_none() {
                            prop_assert!(nodes.iter().all(|n| fits(n, r).is_err()));
                            prop_assert_eq!(e.reasons.len(), nodes.len());
                        }
                    }
                }
            }
        }

        /// Ranks consistent with the (name, id) order change no answer: they only spare the
        /// scheduler comparing names.
        #[test]
        fn ranks_change_no_answer(nodes in arb_nodes(), r in arb_req(), binpack in any::<bool>()) {
            let s = if binpack { Strategy::Binpack } else { Strategy::Spread };
            let plain = place(&nodes, &r, s).map(|p| p.node_id);
            let mut ranked = nodes.clone();
            let mut order: Vec<usize> = (0..ranked.len()).collect();
            order.sort_by(|&a, &b| (&nodes[a].name, &nodes[a].id).cmp(&(&nodes[b].name, &nodes[b].id)));
            for (rank, i) in order.into_iter().enumerate() {
                ranked[i].rank = rank as u32;
            }
            prop_assert_eq!(plain.ok(), place(&ranked, &r, s).map(|p| p.node_id).ok());
        }

        /// Same input, same answer; and the answer does not depend on the order of the nodes.
        #[test]
        fn deterministic(nodes in arb_nodes(), r in arb_req(), binpack in any::<bool>()) {
            let s = if binpack { Strategy::Binpack } else { Strategy::Spread };
            let a = place(&nodes, &r, s).map(|p| p.node_id);
            let b = place(&nodes, &r, s).map(|p| p.node_id);
            prop_assert_eq!(&a, &b);
            let mut rev = nodes.clone();
            rev.reverse();
            let c = place(&rev, &r, s).map(|p| p.node_id);
            prop_assert_eq!(a.ok(), c.ok());
        }

        /// Spread over equal nodes keeps them within one container of each other.
        #[test]
        fn spread_is_even(k in 1usize..12, launches in 0usize..100) {
            let mut nodes: Vec<NodeSnapshot> = (0..k).map(|i| sized(&format!("n{i}"), 0, 4096, 4000)).collect();
            let r = req(10, 10);
            for _ in 0..launches {
                let p = place(&nodes, &r, Strategy::Spread).unwrap();
                nodes[p.index].reserve(r.resources);
            }
            let max = nodes.iter().map(|n| n.containers).max().unwrap_or(0);
            let min = nodes.iter().map(|n| n.containers).min().unwrap_or(0);
            prop_assert!(max - min <= 1, "{min}..{max}");
        }
    }
}
