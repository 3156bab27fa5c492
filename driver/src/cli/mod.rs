//! The `strata` command line: argument parsing and the human-facing output
//! of each subcommand. Subcommands call the library; nothing here is needed
//! by the servers.

mod client;
mod jobs;
mod mount;
mod moves;
mod output;
mod pool;
mod records;
pub mod size;
mod volume;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::endpoint::Endpoint;
use output::Format;

use crate::cluster::nodes::Heartbeat;
use crate::controller::Store;
use crate::standalone::Role;
use crate::tls::TlsFiles;

/// Strata: layered block volumes for Kubernetes.
#[derive(Debug, Parser)]
#[command(name = "strata", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run engine, NBD, CSI (Identity, Controller, Node) and metrics in one process.
    Standalone(StandaloneArgs),
    /// Run a cluster node: engine, NBD, CSI Identity and Node, metrics, and
    /// the agent the controller drives (TCP, mutual TLS).
    Node(NodeArgs),
    /// Run the cluster's CSI Controller: records, placement, and the
    /// nodes' agents (mutual TLS).
    Controller(ControllerArgs),
    /// Create, list, grow and delete volumes (through a running Strata's CSI endpoint).
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// Create, list and delete snapshots (through a running Strata's CSI endpoint).
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Background jobs (merges, flattens): running, queued, and recently
    /// finished, with progress, rate and why a job waits.
    Jobs {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Print the CustomResourceDefinitions of Strata's records (YAML).
    Crdgen,
    /// Inspect and maintain a pool directory (offline).
    #[command(subcommand)]
    Pool(PoolCommand),
    /// The controller's records, offline (the controller stopped).
    #[command(subcommand)]
    Records(RecordsCommand),
    /// Keep FUSE connections alive across restarts of the node: started
    /// by Strata itself, or beside it (`--fuse-holder external`; the
    /// chart's fuse-holder DaemonSet).
    FuseHolder {
        #[arg(long)]
        socket: PathBuf,
        /// Exit after holding nothing for this many seconds (0: never).
        #[arg(long, default_value_t = 30)]
        idle_seconds: u64,
    },
}

#[derive(Debug, Args)]
struct StandaloneArgs {
    /// Pool directory (created if missing).
    #[arg(long, default_value = "/var/lib/strata")]
    pool: PathBuf,
    /// CSI endpoint (unix socket).
    #[arg(long, default_value = "unix:///run/strata/csi.sock")]
    csi_endpoint: Endpoint,
    /// NBD listen address; repeat for several. TCP only when asked (use a
    /// loopback address: NBD has no authentication).
    #[arg(long, default_value = "unix:///run/strata/nbd.sock")]
    nbd_listen: Vec<Endpoint>,
    /// iSCSI target listen address (host:port); repeat for several. Off
    /// unless given. Use a loopback address unless every target needs CHAP
    /// (--iscsi-chap-secrets with a `*` line).
    #[arg(long)]
    iscsi_listen: Vec<SocketAddr>,
    /// CHAP secrets of the iSCSI target: lines of `TARGET-IQN|* USER
    /// SECRET [TARGET-USER TARGET-SECRET]` (the last two for mutual CHAP).
    /// A target with a line requires CHAP.
    #[arg(long)]
    iscsi_chap_secrets: Option<PathBuf>,
    /// Address of the Prometheus /metrics endpoint.
    #[arg(long, default_value = "127.0.0.1:9808")]
    metrics_listen: SocketAddr,
    /// Node ID reported to CSI (default: the host name).
    #[arg(long)]
    node_id: Option<String>,
    /// Where the node keeps what it has staged, its FUSE mountpoints and
    /// the fd holder's socket. Should not survive a reboot.
    #[arg(long, default_value = "/run/strata")]
    state_dir: PathBuf,
    /// How volumes reach this kernel: the nbd driver, FUSE + a loop
    /// device, or auto (nbd when the kernel has it).
    #[arg(long, value_enum, default_value = "auto")]
    attach: crate::node::attach::Choice,
    /// Most volumes staged on this node at once.
    #[arg(long, default_value_t = 256)]
    max_volumes: u32,
    /// Where the FUSE fd holder (which keeps FUSE attachments alive
    /// across restarts) comes from: spawn one when none answers, or wait
    /// for an external one (in Kubernetes, its own DaemonSet, so that a
    /// rollout of the node plugin keeps the mounts).
    #[arg(long, value_enum, default_value = "spawn")]
    fuse_holder: HolderArg,
    /// Seconds the kernel holds the I/O of an nbd device whose server went
    /// away (waiting for a restarted Strata) before it fails that I/O with
    /// EIO (1 to 604800, a week).
    #[arg(long, default_value_t = crate::node::attach::DEAD_CONN_TIMEOUT_SECS,
          value_parser = clap::value_parser!(u64).range(1..=604_800))]
    nbd_dead_timeout: u64,
    /// Background jobs (merges, flattens) running at once; more wait.
    #[arg(long, default_value_t = 2)]
    jobs_max_running: usize,
    /// Bytes per second one job may copy (e.g. 128MiB; a reflinked byte
    /// counts 1/32).
    #[arg(long, value_parser = size::parse, default_value = "128MiB")]
    job_rate: u64,
    /// Bytes per second all jobs together may copy, and copies of volumes
    /// from other nodes (moves, fetches) with them.
    #[arg(long, value_parser = size::parse, default_value = "256MiB")]
    node_job_rate: u64,
    /// Chain depth past which a volume is merged, unless its StorageClass
    /// says otherwise (maxChainDepth).
    #[arg(long, default_value_t = 32)]
    max_chain_depth: u32,
    /// A flush of at most this much data written since the previous one
    /// writes the data into the volume's journal with it: one durable
    /// write instead of two (0: flushes always sync the layer files; at
    /// most 16MiB, each volume keeps that much in memory between flushes).
    #[arg(long, value_parser = sync_log, default_value = "256KiB")]
    sync_log: u64,
}

/// `--sync-log`: a size up to 16 MiB.
fn sync_log(s: &str) -> Result<u64, String> {
    let n = size::parse(s)?;
    if n > 16 << 20 {
        return Err("at most 16MiB (every volume keeps that much in memory)".into());
    }
    Ok(n)
}

/// `--fuse-holder`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum HolderArg {
    Spawn,
    External,
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
struct NodeArgs {
    /// What to do with a node of a running cluster (through the
    /// controller's endpoint); without one, run this node.
    #[command(subcommand)]
    action: Option<NodeCommand>,
    #[command(flatten)]
    node: StandaloneArgs,
    /// Address the agent listens on (the controller connects here).
    #[arg(long, default_value = "0.0.0.0:9809")]
    agent_listen: SocketAddr,
    /// Directory with ca.crt, tls.crt and tls.key for the agent's mutual
    /// TLS (a Kubernetes TLS Secret with its CA, mounted).
    #[arg(long, default_value = "/etc/strata/tls")]
    agent_tls: PathBuf,
    /// Register this node as a StrataNode custom resource, with the agent
    /// at this address (host:port, e.g. the pod IP), and report to it
    /// every 10 s. Without it the controller must be told the address.
    #[arg(long)]
    register_kubernetes: Option<String>,
}

#[derive(Debug, Args)]
struct ControllerArgs {
    /// CSI endpoint (unix socket) for the CSI sidecars.
    #[arg(long, default_value = "unix:///run/strata/controller.sock")]
    csi_endpoint: Endpoint,
    /// Where records live: a redb file (embedded) or Strata's custom
    /// resources (kubernetes, with leader election by a Lease).
    #[arg(long, value_enum, default_value = "embedded")]
    store: StoreKind,
    /// The embedded records store (a redb file).
    #[arg(long, default_value = "/var/lib/strata-controller/records.redb")]
    records: PathBuf,
    /// Namespace of the leader-election Lease (kubernetes store).
    #[arg(long, env = "POD_NAMESPACE", default_value = "kube-system")]
    lease_namespace: String,
    /// Name of the leader-election Lease.
    #[arg(long, default_value = "strata-controller")]
    lease_name: String,
    /// A node's agent address (host:port) to register; repeat for each
    /// node. Nodes stay registered in the records once they have answered.
    #[arg(long)]
    node_agent: Vec<String>,
    /// Directory with ca.crt, tls.crt and tls.key (client certificate) for
    /// the agents' mutual TLS.
    #[arg(long, default_value = "/etc/strata/tls")]
    agent_tls: PathBuf,
    /// Thin provisioning: a node takes volumes until their sizes add up to
    /// its capacity times this ratio.
    #[arg(long, default_value_t = 1.0)]
    overcommit: f64,
    /// Bytes per second one move between nodes copies (0: no limit).
    #[arg(long, value_parser = size::parse, default_value = "100MiB")]
    move_rate: u64,
    /// Seconds a volume of a `dataLocality: best-effort` StorageClass is
    /// used from another node before it moves there (live).
    #[arg(long, default_value_t = 60)]
    locality_delay_seconds: u64,
    /// Seconds between heartbeats to each node.
    #[arg(long, default_value_t = 10)]
    heartbeat_seconds: u64,
    /// Seconds without an answer after which a node is stale.
    #[arg(long, default_value_t = 30)]
    stale_seconds: u64,
    /// Address of the Prometheus /metrics endpoint.
    #[arg(long, default_value = "127.0.0.1:9810")]
    metrics_listen: SocketAddr,
    /// Where the leading replica takes the CSI calls that the other
    /// replicas forward (mutual TLS with --agent-tls).
    #[arg(long, default_value = "127.0.0.1:9812")]
    peer_listen: SocketAddr,
    /// host:port at which other replicas reach --peer-listen (default: the
    /// --peer-listen address, unless it is 0.0.0.0).
    #[arg(long)]
    advertise_address: Option<String>,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum StoreKind {
    Embedded,
    Kubernetes,
}

#[derive(Debug, Args)]
struct ClientArgs {
    /// CSI endpoint of the running Strata.
    #[arg(
        long,
        global = true,
        env = "STRATA_CSI_ENDPOINT",
        default_value = "unix:///run/strata/csi.sock"
    )]
    endpoint: Endpoint,
    /// Output format.
    #[arg(long, short, global = true, value_enum, default_value = "table")]
    output: Format,
}

#[derive(Debug, Subcommand)]
enum NodeCommand {
    /// Stop placing new volumes on NODE, and move every volume of it to
    /// other nodes (one at a time, each to the node with the most room;
    /// live if a pod uses it); list the volumes and snapshots that stay,
    /// with why (exit 1 if any).
    Drain {
        node: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// End the drain of NODE: new volumes may be placed on it again.
    Undrain {
        node: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Forget NODE, gone for good (its node plugin stopped, no volume or
    /// snapshot left on it, or their data given up with --abandon-data):
    /// moves that still wait to clean up there finish without it.
    Forget {
        node: String,
        /// Also when volumes or snapshots are still there, or volumes
        /// still fetch from it: their data is given up (lost; delete them).
        #[arg(long)]
        abandon_data: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Debug, Subcommand)]
enum VolumeCommand {
    /// Create a volume (empty, or from a snapshot or a volume).
    Create {
        /// Name (for idempotency: creating the same name twice returns the same volume).
        name: String,
        /// Size, e.g. 10GiB (default: 1GiB, or the source's size).
        #[arg(long, value_parser = size::parse)]
        size: Option<u64>,
        /// Clone this snapshot.
        #[arg(long, conflicts_with = "from_volume")]
        from_snapshot: Option<String>,
        /// Clone this volume (as it is now).
        #[arg(long)]
        from_volume: Option<String>,
        /// Filesystem the volume is meant for (ext4 or xfs).
        #[arg(long)]
        fs_type: Option<String>,
        /// A raw block volume.
        #[arg(long, conflicts_with = "fs_type")]
        block: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List volumes.
    List {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Delete a volume (its snapshots and clones stay).
    Delete {
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Grow a volume; with --path, also the filesystem mounted there.
    Expand {
        id: String,
        /// New size, e.g. 20GiB.
        #[arg(long, value_parser = size::parse)]
        size: u64,
        /// Where the volume is mounted (by `strata volume mount`): grow its
        /// device and filesystem online too.
        #[arg(long)]
        path: Option<PathBuf>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Attach a volume to this machine and mount it (as kubelet would:
    /// NodeStageVolume, then NodePublishVolume). Makes the filesystem on a
    /// blank volume.
    Mount {
        id: String,
        /// Directory to mount it at (a file, with --block).
        target: PathBuf,
        /// Filesystem (ext4 or xfs).
        #[arg(long, default_value = "ext4", conflicts_with = "block")]
        fs_type: String,
        /// Publish the raw block device node at TARGET instead.
        #[arg(long)]
        block: bool,
        #[arg(long)]
        read_only: bool,
        /// Where staging directories go (one per volume).
        #[arg(long, default_value = "/run/strata/staging")]
        staging_dir: PathBuf,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Shorten a volume's chain in the background: fold the layers nothing
    /// needs on their own (deleted snapshots'), then, while the chain is
    /// deeper than --max-depth, move layers into the top.
    Merge {
        id: String,
        /// Depth to shorten to (0: the volume's policy, StorageClass
        /// maxChainDepth).
        #[arg(long, default_value_t = 0)]
        max_depth: u32,
        /// Wait for the job to finish.
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// After a failed write-back lost data of a volume (it then refuses
    /// writes and flushes): say you have looked at it, and it takes writes
    /// again. What the failure lost stays lost.
    AcknowledgeLoss {
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Make a volume independent of every layer under its top (a clone of
    /// its source, a volume of its snapshots), in the background.
    Flatten {
        id: String,
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Move a volume to another node, its snapshots on its node first
    /// (cluster mode, through the controller's endpoint; live if a pod
    /// uses it); waits until it is there.
    Move {
        id: String,
        /// The node to move it to (default: the one with the most room).
        #[arg(long)]
        to: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Unmount a volume mounted by `strata volume mount` and detach it.
    Unmount {
        id: String,
        target: PathBuf,
        #[arg(long, default_value = "/run/strata/staging")]
        staging_dir: PathBuf,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Debug, Subcommand)]
enum SnapshotCommand {
    /// Snapshot a volume.
    Create {
        /// Name (for idempotency).
        name: String,
        /// The volume to snapshot.
        #[arg(long)]
        volume: String,
        /// Freeze the volume's mounted filesystem around the snapshot, so
        /// it is consistent without the application's help.
        #[arg(long)]
        freeze_filesystem: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List snapshots.
    List {
        /// Only snapshots of this volume.
        #[arg(long)]
        volume: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Delete a snapshot (clones made from it stay).
    Delete {
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// The ranges of TARGET that changed since BASE, an older snapshot of
    /// the same volume (what an incremental backup reads), and their bytes.
    Diff {
        base: String,
        target: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Debug, Subcommand)]
enum PoolCommand {
    /// Verify a pool: catalog against itself and against the files.
    ///
    /// Exits 0 if the pool is clean, 1 if problems were found, 2 if the
    /// pool could not be checked (for example, it is in use).
    Check {
        /// The pool directory (e.g. /var/lib/strata).
        dir: PathBuf,
        /// Remove orphans (files and metadata nothing refers to). Never
        /// touches anything a volume or snapshot uses.
        #[arg(long)]
        repair: bool,
    },
}

#[derive(Debug, Subcommand)]
enum RecordsCommand {
    /// Copy volume and snapshot records from an embedded store (a redb
    /// file) into Strata's custom resources (`--to kubernetes`, with the
    /// kubeconfig or in-cluster credentials) or into another redb file.
    /// Runs again safely; a name that means another ID at the destination
    /// stops it before anything is written. Nodes register again by
    /// themselves.
    Copy {
        /// The embedded store to read.
        #[arg(long)]
        from: PathBuf,
        /// `kubernetes` or `embedded:PATH`.
        #[arg(long)]
        to: records::Destination,
    },
}

/// The configuration of a process that holds a pool.
fn plugin_config(a: StandaloneArgs, role: Role) -> Result<crate::standalone::Config, ExitCode> {
    let holder = match a.fuse_holder {
        HolderArg::External => crate::node::HolderStart::External,
        HolderArg::Spawn => {
            crate::node::HolderStart::Spawn(std::env::current_exe().map_err(|e| {
                eprintln!("strata: cannot find its own binary: {e}");
                ExitCode::FAILURE
            })?)
        }
    };
    let jobs = crate::engine::JobConfig {
        max_running: a.jobs_max_running.max(1),
        job_bytes_per_sec: a.job_rate,
        node_bytes_per_sec: a.node_job_rate,
        default_max_chain_depth: a.max_chain_depth.max(1),
        ..Default::default()
    };
    Ok(crate::standalone::Config {
        role,
        jobs,
        sync_log_bytes: a.sync_log,
        pool: a.pool,
        csi_endpoint: a.csi_endpoint,
        nbd_listen: a.nbd_listen,
        iscsi_listen: a.iscsi_listen.clone(),
        iscsi_chap_secrets: a.iscsi_chap_secrets,
        metrics_listen: a.metrics_listen,
        node: crate::node::NodeConfig {
            node_id: a.node_id.unwrap_or_else(crate::standalone::hostname),
            state_dir: a.state_dir,
            attach: a.attach,
            max_volumes: a.max_volumes,
            holder,
            nbd_dead_timeout: std::time::Duration::from_secs(a.nbd_dead_timeout),
            iscsi_portal: a
                .iscsi_listen
                .iter()
                .copied()
                .find(|l| l.ip().is_loopback()),
        },
    })
}

#[cfg(feature = "kubernetes")]
fn crdgen() -> ExitCode {
    print!("{}", crate::cluster::kube::crd::crds_yaml());
    ExitCode::SUCCESS
}

#[cfg(not(feature = "kubernetes"))]
fn crdgen() -> ExitCode {
    eprintln!("strata crdgen: {}", crate::cluster::NO_KUBERNETES);
    ExitCode::FAILURE
}

/// The exit code of a server process, its error printed.
fn finish(who: &str, result: Result<(), crate::standalone::StartError>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("strata {who}: {}", crate::engine::error::chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// Ends the process at SIGTERM or SIGINT: the fd holder runs as PID 1 of
/// its container, where the default action of both is to do nothing.
fn exit_on_sigterm() {
    extern "C" fn exit_now(_: libc::c_int) {
        // SAFETY: _exit is async-signal-safe.
        unsafe { libc::_exit(0) };
    }
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: installing a handler that only calls _exit.
        unsafe { libc::signal(sig, exit_now as *const () as libc::sighandler_t) };
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

impl Cli {
    /// Runs the command and returns the process exit code.
    pub fn run(self) -> ExitCode {
        match self.command {
            Command::Pool(PoolCommand::Check { dir, repair }) => pool::check(&dir, repair),
            Command::Records(RecordsCommand::Copy { from, to }) => records::copy(&from, to),
            Command::Crdgen => crdgen(),
            Command::FuseHolder {
                socket,
                idle_seconds,
            } => {
                exit_on_sigterm();
                let idle = (idle_seconds > 0).then(|| std::time::Duration::from_secs(idle_seconds));
                match crate::node::holder::run(&socket, idle) {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        eprintln!("strata fuse-holder: {}", crate::engine::error::chain(&e));
                        ExitCode::FAILURE
                    }
                }
            }
            Command::Standalone(a) => {
                let config = match plugin_config(a, Role::Standalone) {
                    Ok(c) => c,
                    Err(code) => return code,
                };
                finish(
                    "standalone",
                    runtime().block_on(crate::standalone::run(config)),
                )
            }
            Command::Node(NodeArgs {
                action: Some(NodeCommand::Drain { node, client }),
                ..
            }) => runtime().block_on(moves::drain(&client.endpoint, client.output, node)),
            Command::Node(NodeArgs {
                action: Some(NodeCommand::Undrain { node, client }),
                ..
            }) => runtime().block_on(moves::undrain(&client.endpoint, node)),
            Command::Node(NodeArgs {
                action:
                    Some(NodeCommand::Forget {
                        node,
                        abandon_data,
                        client,
                    }),
                ..
            }) => runtime().block_on(moves::forget(&client.endpoint, node, abandon_data)),
            Command::Node(a) => {
                let tls = match TlsFiles::load(&a.agent_tls) {
                    Ok(t) => t,
                    Err(e) => {
                        eprintln!(
                            "strata node: agent TLS: {}",
                            crate::engine::error::chain(&e)
                        );
                        return ExitCode::FAILURE;
                    }
                };
                let role = Role::Node {
                    agent_listen: a.agent_listen,
                    tls,
                    register: a.register_kubernetes,
                };
                let config = match plugin_config(a.node, role) {
                    Ok(c) => c,
                    Err(code) => return code,
                };
                finish("node", runtime().block_on(crate::standalone::run(config)))
            }
            Command::Controller(a) => {
                let tls = match TlsFiles::load(&a.agent_tls) {
                    Ok(t) => t,
                    Err(e) => {
                        eprintln!(
                            "strata controller: agent TLS: {}",
                            crate::engine::error::chain(&e)
                        );
                        return ExitCode::FAILURE;
                    }
                };
                if !(a.overcommit.is_finite() && a.overcommit > 0.0) {
                    eprintln!("strata controller: --overcommit must be a positive number");
                    return ExitCode::from(2);
                }
                let config = crate::controller::Config {
                    csi_endpoint: a.csi_endpoint,
                    store: match a.store {
                        StoreKind::Embedded => Store::Embedded(a.records),
                        StoreKind::Kubernetes => Store::Kubernetes {
                            lease_namespace: a.lease_namespace,
                            lease_name: a.lease_name,
                            identity: crate::standalone::hostname(),
                        },
                    },
                    node_agents: a.node_agent,
                    tls,
                    overcommit: a.overcommit,
                    move_rate: a.move_rate,
                    locality_delay: std::time::Duration::from_secs(a.locality_delay_seconds.max(1)),
                    heartbeat: Heartbeat {
                        interval: std::time::Duration::from_secs(a.heartbeat_seconds.max(1)),
                        stale_after: std::time::Duration::from_secs(a.stale_seconds.max(1)),
                    },
                    metrics_listen: a.metrics_listen,
                    peer_listen: a.peer_listen,
                    advertise: a.advertise_address,
                };
                finish(
                    "controller",
                    runtime().block_on(crate::controller::run(config)),
                )
            }
            Command::Volume(cmd) => runtime().block_on(async move {
                match cmd {
                    VolumeCommand::Create {
                        name,
                        size,
                        from_snapshot,
                        from_volume,
                        fs_type,
                        block,
                        client,
                    } => {
                        let args = volume::CreateVolume {
                            name,
                            size,
                            from_snapshot,
                            from_volume,
                            fs_type,
                            block,
                        };
                        volume::create(&client.endpoint, client.output, args).await
                    }
                    VolumeCommand::List { client } => {
                        volume::list(&client.endpoint, client.output).await
                    }
                    VolumeCommand::Delete { id, client } => {
                        volume::delete(&client.endpoint, id).await
                    }
                    VolumeCommand::Expand {
                        id,
                        size,
                        path,
                        client,
                    } => volume::expand(&client.endpoint, client.output, id, size, path).await,
                    VolumeCommand::Mount {
                        id,
                        target,
                        fs_type,
                        block,
                        read_only,
                        staging_dir,
                        client,
                    } => {
                        let m = mount::Mount {
                            id,
                            target,
                            fs_type: (!block).then_some(fs_type),
                            read_only,
                            staging_dir,
                        };
                        mount::mount(&client.endpoint, m).await
                    }
                    VolumeCommand::Merge {
                        id,
                        max_depth,
                        wait,
                        client,
                    } => {
                        let what = jobs::Start::Merge { max_depth };
                        jobs::start(&client.endpoint, client.output, id, what, wait).await
                    }
                    VolumeCommand::AcknowledgeLoss { id, client } => {
                        volume::acknowledge_loss(&client.endpoint, id).await
                    }
                    VolumeCommand::Flatten { id, wait, client } => {
                        let what = jobs::Start::Flatten;
                        jobs::start(&client.endpoint, client.output, id, what, wait).await
                    }
                    VolumeCommand::Move { id, to, client } => {
                        moves::move_to(&client.endpoint, client.output, id, to).await
                    }
                    VolumeCommand::Unmount {
                        id,
                        target,
                        staging_dir,
                        client,
                    } => mount::unmount(&client.endpoint, id, target, staging_dir).await,
                }
            }),
            Command::Jobs { client } => {
                runtime().block_on(jobs::list(&client.endpoint, client.output))
            }
            Command::Snapshot(cmd) => runtime().block_on(async move {
                match cmd {
                    SnapshotCommand::Create {
                        name,
                        volume,
                        freeze_filesystem,
                        client,
                    } => {
                        volume::snapshot_create(
                            &client.endpoint,
                            client.output,
                            name,
                            volume,
                            freeze_filesystem,
                        )
                        .await
                    }
                    SnapshotCommand::List { volume, client } => {
                        volume::snapshot_list(&client.endpoint, client.output, volume).await
                    }
                    SnapshotCommand::Delete { id, client } => {
                        volume::snapshot_delete(&client.endpoint, id).await
                    }
                    SnapshotCommand::Diff {
                        base,
                        target,
                        client,
                    } => volume::snapshot_diff(&client.endpoint, client.output, base, target).await,
                }
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sync_log_takes_sizes_up_to_16_mib() {
        assert_eq!(sync_log("0"), Ok(0));
        assert_eq!(sync_log("256KiB"), Ok(256 << 10));
        assert_eq!(sync_log("16MiB"), Ok(16 << 20));
        assert!(sync_log("17MiB").unwrap_err().contains("at most 16MiB"));
        assert!(sync_log("lots").is_err());
    }
}
