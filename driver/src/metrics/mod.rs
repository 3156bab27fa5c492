//! Prometheus metrics: the registry, the metric families the frontends
//! update on the I/O path, a collector that reads pool and volume gauges at
//! scrape time, and the `/metrics` HTTP endpoint.
//!
//! Names follow Prometheus conventions: `strata_` prefix, base units
//! (seconds, bytes), `_total` for counters.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::engine::{JobKind, JobState, Method, Pool};

/// The operations counted per volume.
pub const OPS: [&str; 7] = [
    "read",
    "write",
    "flush",
    "trim",
    "write_zeroes",
    "block_status",
    "cache",
];

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VolumeOp {
    volume: String,
    op: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VolumeOpError {
    volume: String,
    op: &'static str,
    error: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Kind {
    kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindMethod {
    kind: &'static str,
    method: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerDirection {
    peer: String,
    direction: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MoveOutcome {
    kind: &'static str,
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerOp {
    peer: String,
    op: &'static str,
}

type HistogramFamily<S> = Family<S, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 10 µs to ~20 s.
    Histogram::new(exponential_buckets(10e-6, 4.0, 12))
}

/// Every metric Strata exports, shared by the servers of one process.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pool: Arc<OnceLock<Pool>>,
    nodes: Arc<OnceLock<NodesFn>>,
    leading: Arc<OnceLock<Leading>>,
    ops: Family<VolumeOp, Counter>,
    bytes: Family<VolumeOp, Counter>,
    latency: HistogramFamily<VolumeOp>,
    errors: Family<VolumeOpError, Counter>,
    nbd_connections: Gauge,
    peer_lanes: Gauge,
    nbd_connections_total: Counter,
    nbd_protocol_errors: Family<Kind, Counter>,
    iscsi_connections: Gauge,
    iscsi_protocol_errors: Family<Kind, Counter>,
    job_bytes: Family<KindMethod, Counter>,
    job_hold: HistogramFamily<Kind>,
    job_throttle: Family<Kind, Counter<f64, std::sync::atomic::AtomicU64>>,
    peer_bytes: Family<PeerDirection, Counter>,
    remote_latency: HistogramFamily<PeerOp>,
    remote_retries: Family<PeerOp, Counter>,
    moves: Family<MoveOutcome, Counter>,
    move_bytes: Counter,
    move_hold: Histogram,
    group_hold: Histogram,
}

/// Per-operation handles for one volume, resolved once per connection so
/// the I/O path never builds label sets.
#[derive(Debug, Clone)]
pub struct OpMetrics {
    ops: Counter,
    bytes: Counter,
    latency: Histogram,
}

impl OpMetrics {
    /// Records one completed operation of `bytes` bytes.
    pub fn observe(&self, bytes: u64, elapsed: Duration) {
        self.ops.inc();
        self.bytes.inc_by(bytes);
        self.latency.observe(elapsed.as_secs_f64());
    }
}

impl Metrics {
    /// A registry with every Strata metric. Pool and volume gauges appear
    /// once [`Metrics::watch_pool`] names the pool to read at each scrape.
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("strata");
        let ops = Family::<VolumeOp, Counter>::default();
        let bytes = Family::<VolumeOp, Counter>::default();
        let latency = HistogramFamily::<VolumeOp>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        let errors = Family::<VolumeOpError, Counter>::default();
        let nbd_connections = Gauge::default();
        let peer_lanes = Gauge::default();
        registry.register(
            "peer_lanes",
            "Data lanes other nodes hold open to this node (agent/lane.rs)",
            peer_lanes.clone(),
        );
        let nbd_connections_total = Counter::default();
        let nbd_protocol_errors = Family::<Kind, Counter>::default();
        registry.register(
            "volume_ops",
            "Completed volume operations, by volume and operation",
            ops.clone(),
        );
        registry.register_with_unit(
            "volume",
            "Bytes moved by volume operations, by volume and operation",
            prometheus_client::registry::Unit::Bytes,
            bytes.clone(),
        );
        registry.register_with_unit(
            "volume_op_duration",
            "Latency of volume operations, by volume and operation",
            prometheus_client::registry::Unit::Seconds,
            latency.clone(),
        );
        registry.register(
            "volume_errors",
            "Failed volume operations, by volume, operation and error",
            errors.clone(),
        );
        registry.register(
            "nbd_connections",
            "Open NBD connections",
            nbd_connections.clone(),
        );
        registry.register(
            "nbd_connections_accepted",
            "NBD connections accepted",
            nbd_connections_total.clone(),
        );
        registry.register(
            "nbd_protocol_errors",
            "NBD requests or negotiations refused as invalid, by kind",
            nbd_protocol_errors.clone(),
        );
        let iscsi_connections = Gauge::default();
        let iscsi_protocol_errors = Family::<Kind, Counter>::default();
        registry.register(
            "iscsi_connections",
            "Open iSCSI connections (in login or full feature phase)",
            iscsi_connections.clone(),
        );
        registry.register(
            "iscsi_protocol_errors",
            "iSCSI PDUs or logins refused as invalid, by kind",
            iscsi_protocol_errors.clone(),
        );
        let job_bytes = Family::<KindMethod, Counter>::default();
        let job_hold =
            HistogramFamily::<Kind>::new_with_constructor(latency_histogram as fn() -> Histogram);
        let job_throttle = Family::<Kind, Counter<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register_with_unit(
            "job",
            "Bytes background jobs moved, by kind and method (reflink: shared extents, copy: bytes copied)",
            prometheus_client::registry::Unit::Bytes,
            job_bytes.clone(),
        );
        registry.register_with_unit(
            "job_hold",
            "How long a job step held a range of a volume, or a switch held a volume",
            prometheus_client::registry::Unit::Seconds,
            job_hold.clone(),
        );
        registry.register_with_unit(
            "job_throttle_wait",
            "Time jobs waited for their byte budget, by kind",
            prometheus_client::registry::Unit::Seconds,
            job_throttle.clone(),
        );
        let peer_bytes = Family::<PeerDirection, Counter>::default();
        let remote_latency =
            HistogramFamily::<PeerOp>::new_with_constructor(latency_histogram as fn() -> Histogram);
        let remote_retries = Family::<PeerOp, Counter>::default();
        registry.register_with_unit(
            "peer",
            "Volume data exchanged with other nodes over the data path, by peer node and \
             direction (sent or received)",
            prometheus_client::registry::Unit::Bytes,
            peer_bytes.clone(),
        );
        registry.register_with_unit(
            "remote_io_duration",
            "Latency of I/O to volumes other nodes hold, retries included, by owner node and \
             operation",
            prometheus_client::registry::Unit::Seconds,
            remote_latency.clone(),
        );
        registry.register(
            "remote_io_retries",
            "Remote I/O attempts retried while the owner was away, by owner node and operation",
            remote_retries.clone(),
        );
        let moves = Family::<MoveOutcome, Counter>::default();
        let move_bytes = Counter::default();
        registry.register(
            "volume_moves",
            "Moves of volumes between nodes that ended, by kind (copy_first: strata volume \
             move and drains of unused volumes; live: of volumes in use; switch_first: \
             restores and clones for a pod on another node) and outcome (moved, rolled_back)",
            moves.clone(),
        );
        registry.register_with_unit(
            "volume_move_copied",
            "Volume data the moves that ended copied between nodes",
            prometheus_client::registry::Unit::Bytes,
            move_bytes.clone(),
        );
        let move_hold = Histogram::new(exponential_buckets(0.001, 2.0, 14));
        registry.register_with_unit(
            "volume_move_hold",
            "How long a live move held a volume's writes on its source for the last delta \
             (from the hold to the seal, or to the hold's deadline)",
            prometheus_client::registry::Unit::Seconds,
            move_hold.clone(),
        );
        let group_hold = Histogram::new(exponential_buckets(0.0001, 2.0, 16));
        registry.register_with_unit(
            "group_snapshot_hold",
            "How long a group snapshot's cut held the writes of this node's members \
             (from the moment the writes in flight had finished to the end of the cut)",
            prometheus_client::registry::Unit::Seconds,
            group_hold.clone(),
        );
        let pool = Arc::new(OnceLock::new());
        registry.register_collector(Box::new(PoolCollector {
            pool: Arc::clone(&pool),
        }));
        let nodes = Arc::new(OnceLock::new());
        let leading = Arc::new(OnceLock::new());
        registry.register_collector(Box::new(ControllerCollector {
            nodes: Arc::clone(&nodes),
            leading: Arc::clone(&leading),
        }));
        Arc::new(Metrics {
            pool,
            nodes,
            leading,
            registry,
            ops,
            bytes,
            latency,
            errors,
            nbd_connections,
            peer_lanes,
            nbd_connections_total,
            nbd_protocol_errors,
            iscsi_connections,
            iscsi_protocol_errors,
            job_bytes,
            job_hold,
            job_throttle,
            peer_bytes,
            remote_latency,
            remote_retries,
            moves,
            move_bytes,
            move_hold,
            group_hold,
        })
    }

    /// Records how long a live move held a volume's writes.
    pub fn move_hold(&self, held: Duration) {
        self.move_hold.observe(held.as_secs_f64());
    }

    /// Records how long a group snapshot's cut held its members' writes.
    pub fn group_hold(&self, held: Duration) {
        self.group_hold.observe(held.as_secs_f64());
    }

    /// Counts a move between nodes that ended, by kind (`copy_first`,
    /// `switch_first`, `live`).
    pub fn volume_moved(&self, kind: &'static str, moved: bool, copied: u64) {
        self.moves
            .get_or_create(&MoveOutcome {
                kind,
                outcome: if moved { "moved" } else { "rolled_back" },
            })
            .inc();
        self.move_bytes.inc_by(copied);
    }

    /// The gauge of data lanes open to this node (their count, kept by
    /// `agent::lane`).
    pub fn peer_lanes(&self) -> Gauge {
        self.peer_lanes.clone()
    }

    /// Counts volume data sent to or received from another node.
    pub fn peer_bytes(&self, peer: &str, sent: bool, bytes: u64) {
        let direction = if sent { "sent" } else { "received" };
        self.peer_bytes
            .get_or_create(&PeerDirection {
                peer: peer.to_string(),
                direction,
            })
            .inc_by(bytes);
    }

    /// Records one completed I/O to a volume `owner` holds.
    pub fn remote_io(&self, owner: &str, op: &'static str, elapsed: Duration) {
        self.remote_latency
            .get_or_create(&PeerOp {
                peer: owner.to_string(),
                op,
            })
            .observe(elapsed.as_secs_f64());
    }

    /// Counts one retried attempt of an I/O to a volume `owner` holds.
    pub fn remote_retry(&self, owner: &str, op: &'static str) {
        self.remote_retries
            .get_or_create(&PeerOp {
                peer: owner.to_string(),
                op,
            })
            .inc();
    }

    /// Reads `pool`'s gauges at every scrape from now on.
    pub fn watch_pool(&self, pool: Pool) {
        let _ = self.pool.set(pool);
    }

    /// Reports the nodes the controller knows (`strata_nodes{state}`,
    /// `strata_node_room_bytes{node}`) at each scrape, as `nodes` lists
    /// them then.
    pub fn watch_nodes(&self, nodes: impl Fn() -> Vec<NodeGauge> + Send + Sync + 'static) {
        let _ = self.nodes.set(NodesFn(Box::new(nodes)));
    }

    /// Reports whether this controller replica leads
    /// (`strata_controller_leading`, 1 or 0) at each scrape, as `leading`
    /// answers then.
    pub fn watch_leading(&self, leading: impl Fn() -> bool + Send + Sync + 'static) {
        let _ = self.leading.set(Leading(Box::new(leading)));
    }

    /// Handles for one operation on one volume.
    pub fn op(&self, volume: &str, op: &'static str) -> OpMetrics {
        let labels = VolumeOp {
            volume: volume.to_string(),
            op,
        };
        OpMetrics {
            ops: self.ops.get_or_create(&labels).clone(),
            bytes: self.bytes.get_or_create(&labels).clone(),
            latency: self.latency.get_or_create(&labels).clone(),
        }
    }

    /// Counts a failed volume operation.
    pub fn error(&self, volume: &str, op: &'static str, error: &'static str) {
        self.errors
            .get_or_create(&VolumeOpError {
                volume: volume.to_string(),
                op,
                error,
            })
            .inc();
    }

    /// Drops every I/O series of a deleted volume or snapshot export
    /// (labelled `volume` with the export's ID).
    pub fn forget_export(&self, volume: &str) {
        let volume = volume.to_string();
        for op in OPS {
            let labels = VolumeOp {
                volume: volume.clone(),
                op,
            };
            self.ops.remove(&labels);
            self.bytes.remove(&labels);
            self.latency.remove(&labels);
        }
    }

    /// A connection opened; the returned guard counts it until dropped.
    pub fn nbd_connection(self: &Arc<Self>) -> ConnectionGuard {
        self.nbd_connections.inc();
        self.nbd_connections_total.inc();
        ConnectionGuard(self.nbd_connections.clone())
    }

    /// An iSCSI connection opened; the guard counts it until dropped.
    pub fn iscsi_connection(&self) -> ConnectionGuard {
        self.iscsi_connections.inc();
        ConnectionGuard(self.iscsi_connections.clone())
    }

    /// Counts an iSCSI PDU or login refused as invalid.
    pub fn iscsi_protocol_error(&self, kind: &'static str) {
        self.iscsi_protocol_errors
            .get_or_create(&Kind { kind })
            .inc();
    }

    /// Counts an NBD request or negotiation step refused as invalid.
    pub fn nbd_protocol_error(&self, kind: &'static str) {
        self.nbd_protocol_errors.get_or_create(&Kind { kind }).inc();
    }

    /// The registry in the Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "encoding metrics failed");
        }
        out
    }
}

impl crate::engine::JobObserver for Metrics {
    fn bytes(&self, kind: JobKind, method: Method, bytes: u64) {
        self.job_bytes
            .get_or_create(&KindMethod {
                kind: kind.label(),
                method: method.label(),
            })
            .inc_by(bytes);
    }

    fn hold(&self, kind: JobKind, seconds: f64) {
        self.job_hold
            .get_or_create(&Kind { kind: kind.label() })
            .observe(seconds);
    }

    fn throttled(&self, kind: JobKind, seconds: f64) {
        self.job_throttle
            .get_or_create(&Kind { kind: kind.label() })
            .inc_by(seconds);
    }
}

/// Counts one open connection (NBD or iSCSI) in its gauge.
#[derive(Debug)]
pub struct ConnectionGuard(Gauge);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Reads the pool's gauges at scrape time.
#[derive(Debug)]
struct PoolCollector {
    pool: Arc<OnceLock<Pool>>,
}

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&prometheus_client::registry::Unit>,
    value: i64,
) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(value);
    let metric = encoder.encode_descriptor(name, help, unit, g.metric_type())?;
    g.encode(metric)
}

/// One node, as the controller's metrics show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeGauge {
    pub node: String,
    /// Answering its heartbeat (else stale).
    pub ready: bool,
    /// Bytes of new volumes it can still take.
    pub room: u64,
}

/// Lists the nodes at a scrape.
struct NodesFn(Box<dyn Fn() -> Vec<NodeGauge> + Send + Sync>);

impl std::fmt::Debug for NodesFn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NodesFn")
    }
}

#[derive(Debug)]
struct ControllerCollector {
    nodes: Arc<OnceLock<NodesFn>>,
    leading: Arc<OnceLock<Leading>>,
}

/// Answers whether this controller replica leads.
struct Leading(Box<dyn Fn() -> bool + Send + Sync>);

impl std::fmt::Debug for Leading {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Leading")
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeLabel {
    node: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

impl Collector for ControllerCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if let Some(leading) = self.leading.get() {
            let g = ConstGauge::new(i64::from((leading.0)()));
            let metric = encoder.encode_descriptor(
                "controller_leading",
                "Whether this controller replica leads and acts (1) or forwards calls to the leader (0)",
                None,
                g.metric_type(),
            )?;
            g.encode(metric)?;
        }
        let Some(nodes) = self.nodes.get() else {
            return Ok(());
        };
        let list = (nodes.0)();
        let kind = ConstGauge::new(0i64).metric_type();
        let mut metric = encoder.encode_descriptor(
            "nodes",
            "Nodes the controller knows, by state (stale: not answering its heartbeat)",
            None,
            kind,
        )?;
        for (ready, label) in [(true, "ready"), (false, "stale")] {
            let n = list.iter().filter(|n| n.ready == ready).count() as i64;
            ConstGauge::new(n).encode(metric.encode_family(&StateLabel { state: label })?)?;
        }
        let mut metric = encoder.encode_descriptor(
            "node_room",
            "Bytes of new volumes a node can still take (thin: capacity times the overcommit ratio, less what is provisioned)",
            Some(&prometheus_client::registry::Unit::Bytes),
            kind,
        )?;
        for n in &list {
            let labels = NodeLabel {
                node: n.node.clone(),
            };
            ConstGauge::new(n.room as i64).encode(metric.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VolumeLabel {
    volume: String,
}

impl Collector for PoolCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use prometheus_client::registry::Unit;
        let Some(pool) = self.pool.get() else {
            return Ok(());
        };
        let bytes = Some(&Unit::Bytes);
        match pool.space() {
            Ok(space) => {
                let used = space.capacity_bytes.saturating_sub(space.free_bytes);
                gauge(
                    &mut encoder,
                    "pool_capacity",
                    "Size of the pool's filesystem",
                    bytes,
                    space.capacity_bytes as i64,
                )?;
                gauge(
                    &mut encoder,
                    "pool_free",
                    "Free space of the pool's filesystem",
                    bytes,
                    space.free_bytes as i64,
                )?;
                gauge(
                    &mut encoder,
                    "pool_used",
                    "Used space of the pool's filesystem",
                    bytes,
                    used as i64,
                )?;
                gauge(
                    &mut encoder,
                    "pool_reserved",
                    "Free space kept for metadata; data writes fail below it",
                    bytes,
                    space.reserved_bytes as i64,
                )?;
            }
            Err(e) => tracing::warn!(error = %e, "pool space unavailable for metrics"),
        }
        match pool.jobs() {
            Ok(jobs) => encode_jobs(&mut encoder, &jobs)?,
            Err(e) => tracing::warn!(error = %e, "jobs unavailable for metrics"),
        }
        match pool.faults() {
            Ok(lost) => gauge(
                &mut encoder,
                "volumes_lost_data",
                "Volumes whose data a failed write-back lost; they refuse writes until \
                 `strata volume acknowledge-loss`",
                None,
                lost.len() as i64,
            )?,
            Err(e) => tracing::warn!(error = %e, "volume faults unavailable for metrics"),
        }
        let stats = match pool.volume_stats() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "volume stats unavailable for metrics");
                return Ok(());
            }
        };
        gauge(
            &mut encoder,
            "pool_volumes",
            "Volumes in the pool",
            None,
            stats.len() as i64,
        )?;
        type Family<'a> = (
            &'a str,
            &'a str,
            Option<&'a Unit>,
            fn(&crate::engine::VolumeStats) -> i64,
        );
        let families: [Family; 3] = [
            ("volume_logical", "Logical size of the volume", bytes, |s| {
                s.size_bytes as i64
            }),
            (
                "volume_allocated",
                "Bytes of the volume backed by data in some layer",
                bytes,
                |s| s.allocated_bytes as i64,
            ),
            (
                "volume_chain_depth",
                "Layers in the volume's chain, top included",
                None,
                |s| s.chain_depth as i64,
            ),
        ];
        for (name, help, unit, value) in families {
            let mut metric =
                encoder.encode_descriptor(name, help, unit, ConstGauge::new(0i64).metric_type())?;
            for s in &stats {
                let labels = VolumeLabel {
                    volume: s.id.to_string(),
                };
                ConstGauge::new(value(s)).encode(metric.encode_family(&labels)?)?;
            }
        }
        let mut metric = encoder.encode_descriptor(
            "volume_flushes",
            "Flushes that made writes durable since the volume was loaded, by how: \
             logged (the data in the journal, one fdatasync) or synced (the layer \
             files fdatasynced first)",
            None,
            ConstCounter::new(0u64).metric_type(),
        )?;
        for s in &stats {
            for (kind, n) in [("logged", s.flushes_logged), ("synced", s.flushes_synced)] {
                let labels = VolumeKind {
                    volume: s.id.to_string(),
                    kind,
                };
                ConstCounter::new(n).encode(metric.encode_family(&labels)?)?;
            }
        }
        let mut metric = encoder.encode_descriptor(
            "volume_fetched",
            "Bytes a volume fetching its contents from another node (a restore or clone \
             for a pod there) got from it since it was loaded, by kind: read (by reads, and \
             partial writes, of blocks it lacked), kept (of what reads got, the whole blocks \
             it still lacked, now here; holes as zeros) and copied (by the background copy); \
             only volumes that fetched",
            Some(&Unit::Bytes),
            ConstCounter::new(0u64).metric_type(),
        )?;
        for s in &stats {
            let f = s.fetched;
            if f == Default::default() {
                continue;
            }
            for (kind, n) in [("read", f.read), ("kept", f.kept), ("copied", f.copied)] {
                let labels = VolumeKind {
                    volume: s.id.to_string(),
                    kind,
                };
                ConstCounter::new(n).encode(metric.encode_family(&labels)?)?;
            }
        }
        let mut metric = encoder.encode_descriptor(
            "volume_throttled",
            "Time reads and writes waited for the volume's I/O limits since it was loaded",
            Some(&Unit::Seconds),
            ConstCounter::new(0f64).metric_type(),
        )?;
        for s in &stats {
            for (kind, d) in [("read", s.throttled[0]), ("write", s.throttled[1])] {
                let labels = VolumeKind {
                    volume: s.id.to_string(),
                    kind,
                };
                ConstCounter::new(d.as_secs_f64()).encode(metric.encode_family(&labels)?)?;
            }
        }
        let mut metric = encoder.encode_descriptor(
            "volume_limit",
            "The volume's I/O limits (mutable parameters), by kind; absent: no limit",
            None,
            ConstGauge::new(0i64).metric_type(),
        )?;
        for s in &stats {
            let l = &s.limits;
            for (kind, n) in [
                ("read_iops", l.read_iops),
                ("write_iops", l.write_iops),
                ("read_bytes_per_second", l.read_bytes_per_sec),
                ("write_bytes_per_second", l.write_bytes_per_sec),
            ] {
                if n == 0 {
                    continue;
                }
                let labels = VolumeKind {
                    volume: s.id.to_string(),
                    kind,
                };
                ConstGauge::new(i64::try_from(n).unwrap_or(i64::MAX))
                    .encode(metric.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VolumeKind {
    volume: String,
    kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindState {
    kind: &'static str,
    state: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobLabels {
    job: String,
    kind: &'static str,
    target: String,
}

/// `strata_jobs{kind,state}` and, for running jobs, their progress.
fn encode_jobs(
    encoder: &mut DescriptorEncoder,
    jobs: &[crate::engine::JobInfo],
) -> Result<(), std::fmt::Error> {
    let kinds = [JobKind::Merge, JobKind::Flatten, JobKind::Fold];
    let states = [
        JobState::Queued,
        JobState::Running,
        JobState::Done,
        JobState::Failed,
    ];
    let mut m = encoder.encode_descriptor(
        "jobs",
        "Background jobs the pool keeps, by kind and state",
        None,
        ConstGauge::new(0i64).metric_type(),
    )?;
    for kind in kinds {
        for state in states {
            let n = jobs
                .iter()
                .filter(|j| j.kind == kind && j.state == state)
                .count();
            ConstGauge::new(n as i64).encode(m.encode_family(&KindState {
                kind: kind.label(),
                state: state.label(),
            })?)?;
        }
    }
    let mut m = encoder.encode_descriptor(
        "job_progress_ratio",
        "Share of a running job's current work that is done (0 to 1)",
        None,
        ConstGauge::new(0f64).metric_type(),
    )?;
    for j in jobs.iter().filter(|j| j.state == JobState::Running) {
        let ratio = if j.total_bytes == 0 {
            0.0
        } else {
            j.done_bytes as f64 / j.total_bytes as f64
        };
        let target = j
            .volume
            .map(|v| v.to_string())
            .or_else(|| j.layer.map(|l| l.to_string()))
            .unwrap_or_default();
        ConstGauge::new(ratio).encode(m.encode_family(&JobLabels {
            job: j.id.to_string(),
            kind: j.kind.label(),
            target,
        })?)?;
    }
    Ok(())
}

/// Serves `GET /metrics` on `addr` until `shutdown` resolves.
pub async fn serve(
    metrics: Arc<Metrics>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::routing::get;
    let app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let metrics = Arc::clone(&metrics);
            async move {
                let body = tokio::task::spawn_blocking(move || metrics.encode())
                    .await
                    .unwrap_or_default();
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    body,
                )
            }
        }),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// Binds the metrics listener.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}
