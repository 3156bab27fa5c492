//! `strata controller`: the CSI Controller of a cluster. It holds no pool:
//! it keeps the cluster records, places new volumes on nodes, and changes
//! a node's volumes only through that node's agent (mutual TLS). A
//! heartbeat keeps the node records fresh and marks silent nodes stale.
//!
//! Records live in the embedded store (a redb file; outside Kubernetes)
//! or as custom resources (`--store kubernetes`). Several replicas may
//! run; one acts. The election is a lock file beside the embedded store,
//! or a Lease in Kubernetes (`cluster/election.rs`). Every replica binds
//! its CSI socket at once and answers Identity and capabilities, so its
//! sidecars and livenessprobe start; until it leads, it forwards the
//! other Controller calls to the leader's peer port (`csi/replica.rs`),
//! because the sidecars elect their own leaders and may sit in any
//! replica. The leader opens the records only once it leads. A Lease
//! holder that cannot renew in time exits before another can take over.
//!
//! SIGTERM (or SIGINT): stop accepting CSI calls and exit 0; there is
//! nothing to flush.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use csi_proto::cluster::v1::cluster_server::ClusterServer;
use csi_proto::csi::v1::controller_server::ControllerServer;
use csi_proto::csi::v1::group_controller_server::GroupControllerServer;
use csi_proto::csi::v1::identity_server::IdentityServer;
use csi_proto::csi::v1::snapshot_metadata_server::SnapshotMetadataServer;
use tokio::sync::watch;

use crate::cluster::election::{Election, FileLock, Round};
use crate::cluster::moves::Moves;
use crate::cluster::nodes::{Heartbeat, Nodes};
use crate::cluster::records::{EmbeddedRecords, Records};
use crate::cluster::{Cluster, Events, LogEvents};
use crate::csi::controller::{ClusterReady, ControllerService, MovesReady};
use crate::csi::identity::IdentityService;
use crate::csi::moves::ClusterService;
use crate::csi::replica::Replica;
use crate::csi::{InFlight, Started};
use crate::endpoint::Endpoint;
use crate::metrics::{self, Metrics};
use crate::standalone::StartError;
use crate::tls::TlsFiles;

/// Where the controller keeps its records.
#[derive(Debug, Clone)]
pub enum Store {
    /// A redb file.
    Embedded(PathBuf),
    /// Strata's custom resources, with leader election by the Lease
    /// `lease_name` in `lease_namespace`.
    Kubernetes {
        lease_namespace: String,
        lease_name: String,
        identity: String,
    },
}

/// How long a leader may go without renewing its Lease.
/// How often the leader looks for volumes to move to the node using them.
const LOCALITY_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

#[cfg(feature = "kubernetes")]
const LEASE_DURATION: std::time::Duration = std::time::Duration::from_secs(15);

/// What `strata controller` was asked to do.
#[derive(Debug, Clone)]
pub struct Config {
    pub csi_endpoint: Endpoint,
    pub store: Store,
    /// Agent addresses (`host:port`) to ask before any node record names
    /// them.
    pub node_agents: Vec<String>,
    pub tls: TlsFiles,
    pub overcommit: f64,
    /// Bytes per second a move between nodes copies (0: no limit).
    pub move_rate: u64,
    /// How long a volume of a `dataLocality: best-effort` class is used
    /// from another node before it moves there.
    pub locality_delay: std::time::Duration,
    pub heartbeat: Heartbeat,
    pub metrics_listen: SocketAddr,
    /// Where the leader takes the calls other replicas forward (mutual
    /// TLS with `tls`).
    pub peer_listen: SocketAddr,
    /// The address other replicas reach `peer_listen` at (`host:port`).
    pub advertise: Option<String>,
}

/// Runs the controller until SIGTERM or SIGINT.
pub async fn run(config: Config) -> Result<(), StartError> {
    // A controller that cannot make grants would fail every publish to a
    // node that does not hold the volume: say so at start.
    config
        .tls
        .check_role(None)
        .map_err(|e| StartError::Internal(format!("agent TLS: {e}")))?;
    crate::peer::grant::issue(&config.tls, "probe", "probe", 0, false)
        .map_err(|e| StartError::Internal(format!("agent TLS: {e}")))?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let Endpoint::Unix(csi_path) = &config.csi_endpoint else {
        return Err(StartError::CsiNotUnix(config.csi_endpoint.to_string()));
    };
    let advertise = config.advertise.as_deref().map(bracket_ipv6).or_else(|| {
        (!config.peer_listen.ip().is_unspecified()).then(|| config.peer_listen.to_string())
    });
    if advertise.is_none() {
        tracing::warn!(
            "no --advertise-address: other replicas cannot forward calls to this one when it leads"
        );
    }
    let (backend, election) = connect(&config.store, advertise.clone()).await?;
    let election = Arc::new(election);

    let cluster = ClusterReady::default();
    let moves_ready = MovesReady::default();
    let replica = Replica::new(
        ControllerService::new(cluster.clone(), InFlight::default())
            .with_moves(moves_ready.clone()),
        config.tls.clone(),
    );
    let moves = ClusterService::new(replica.clone(), moves_ready.clone());
    // Identity's Probe: a controller has no engine to open, so it is
    // ready (alive) from the start, leader or not.
    let csi_listener =
        crate::endpoint::bind_unix(csi_path).map_err(|source| StartError::Listen {
            endpoint: config.csi_endpoint.to_string(),
            source,
        })?;
    let csi = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(IdentityServer::new(
                IdentityService::new(Started::default(), true).always_ready(),
            ))
            .add_service(ControllerServer::new(replica.clone()))
            .add_service(SnapshotMetadataServer::new(replica.clone()))
            .add_service(GroupControllerServer::new(replica.clone()))
            .add_service(ClusterServer::new(moves.clone()))
            .serve_with_incoming_shutdown(crate::rpc::unix::incoming(csi_listener), stopped()),
    );
    // The peer port serves the same routing service: only a leader
    // answers forwarded calls.
    let peer_listener = tokio::net::TcpListener::bind(config.peer_listen)
        .await
        .map_err(|source| StartError::Listen {
            endpoint: config.peer_listen.to_string(),
            source,
        })?;
    // Only another controller (a replica) forwards calls here.
    let callers = config.tls.callers();
    let peer = tonic::transport::Server::builder()
        .tls_config(config.tls.server())
        .map_err(|e| StartError::Internal(format!("controller peer TLS: {e}")))?
        .layer(tonic::service::InterceptorLayer::new(
            move |req: tonic::Request<()>| {
                callers.controller(&crate::tls::Caller::of(&req))?;
                Ok(req)
            },
        ))
        .add_service(ControllerServer::new(replica.clone()))
        .add_service(SnapshotMetadataServer::new(replica.clone()))
        .add_service(GroupControllerServer::new(replica.clone()))
        .add_service(ClusterServer::new(moves.clone()))
        .serve_with_incoming_shutdown(crate::rpc::tcp_incoming(peer_listener), stopped());
    tokio::spawn(async move {
        if let Err(e) = peer.await {
            tracing::error!(error = %e, "controller peer server failed");
        }
    });

    let metrics = Metrics::new();
    let leader = replica.clone();
    metrics.watch_leading(move || leader.is_leading());
    let listener = metrics::bind(config.metrics_listen)
        .await
        .map_err(|source| StartError::Listen {
            endpoint: config.metrics_listen.to_string(),
            source,
        })?;
    tokio::spawn(metrics::serve(metrics.clone(), listener, stopped()));

    let signal = crate::standalone::wait_for_signal();
    tokio::pin!(signal);
    eprintln!(
        "strata controller: serving CSI on {}, peers on {} (advertised as {}); electing",
        config.csi_endpoint,
        config.peer_listen,
        advertise.as_deref().unwrap_or("nothing")
    );
    let mut following = None;
    loop {
        match election.round().await {
            Ok(Round::Leading) => break,
            Ok(Round::Following(leader)) => {
                if following.as_ref() != Some(&leader) {
                    eprintln!(
                        "strata controller: following {}",
                        leader.as_deref().unwrap_or("a leader without an address")
                    );
                    following = Some(leader.clone());
                }
                replica.follow(leader.as_deref());
            }
            Err(e) => tracing::warn!(error = %crate::engine::error::chain(&e), "leader election"),
        }
        tokio::select! {
            _ = &mut signal => return shut_down(stop_tx, csi, csi_path, None).await,
            _ = tokio::time::sleep(election.retry()) => {}
        }
    }

    // Renewals start at once: opening the records and the first heartbeat
    // (which may wait for unreachable agents) must not let the Lease lapse.
    if let Some(every) = election.renew_every() {
        tokio::spawn(keep_leading(Arc::clone(&election), every));
    }
    let (records, events) = open_records(backend).await?;
    let nodes = Arc::new(Nodes::remote(
        Arc::clone(&records),
        config.tls.clone(),
        config.node_agents.clone(),
        config.overcommit,
        config.heartbeat.clone(),
    ));
    let open = Arc::new(Cluster {
        records,
        nodes: Arc::clone(&nodes),
        events,
    });
    cluster.set(Arc::clone(&open));
    let known = Arc::clone(&nodes);
    metrics.watch_nodes(move || {
        let list = known.list().unwrap_or_default();
        list.iter()
            .map(|n| crate::metrics::NodeGauge {
                node: n.node_id.clone(),
                ready: n.state == crate::cluster::records::NodeState::Ready,
                room: known.room(n),
            })
            .collect()
    });
    nodes.beat().await;
    tokio::spawn(Arc::clone(&nodes).run());
    let mover = Moves::new(open, Arc::clone(&metrics), config.move_rate);
    let _ = moves_ready.set(Arc::clone(&mover));
    replica.lead();
    tokio::spawn(crate::csi::group::sweep_forever(replica.local().clone()));
    // Moves a previous leader left half done, and rollbacks that wait for
    // a node that was away: now, then every half minute.
    let follower = Arc::clone(&mover);
    tokio::spawn(async move {
        loop {
            mover.resume().await;
            tokio::time::sleep(std::time::Duration::from_secs(30)).await;
        }
    });
    // dataLocality: volumes follow the node that uses them.
    let after = config.locality_delay;
    tokio::spawn(async move {
        let mut seen = std::collections::HashMap::new();
        loop {
            tokio::time::sleep(LOCALITY_EVERY.min(after)).await;
            follower.follow_pods(after, &mut seen).await;
        }
    });
    eprintln!(
        "strata controller: leading; ready ({} node agent(s) known, metrics http://{}/metrics)",
        nodes.list().map(|n| n.len()).unwrap_or(0),
        config.metrics_listen
    );
    signal.await;
    shut_down(stop_tx, csi, csi_path, Some(&election)).await
}

/// Stops serving (calls in progress finish), then gives up the lead.
async fn shut_down(
    stop: watch::Sender<bool>,
    csi: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    csi_path: &std::path::Path,
    leading: Option<&Election>,
) -> Result<(), StartError> {
    let _ = stop.send(true);
    let _ = csi.await;
    let _ = std::fs::remove_file(csi_path);
    if let Some(election) = leading {
        match election.release().await {
            Ok(()) => eprintln!("strata controller: gave up the lead"),
            Err(e) => {
                tracing::warn!(error = %crate::engine::error::chain(&e), "giving up the lead")
            }
        }
    }
    eprintln!("strata controller: stopped");
    Ok(())
}

/// `host:port` with an IPv6 host in brackets, as a URL needs it (a pod IP
/// from the downward API comes without them).
fn bracket_ipv6(address: &str) -> String {
    match address.rsplit_once(':') {
        Some((host, port)) if host.parse::<std::net::Ipv6Addr>().is_ok() => {
            format!("[{host}]:{port}")
        }
        _ => address.to_string(),
    }
}

/// A store whose election has not been won yet.
enum Backend {
    Embedded(PathBuf),
    #[cfg(feature = "kubernetes")]
    Kubernetes {
        client: kube::Client,
        identity: String,
    },
}

/// Connects to the store and sets up its election.
async fn connect(
    store: &Store,
    advertise: Option<String>,
) -> Result<(Backend, Election), StartError> {
    match store {
        Store::Embedded(path) => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(|source| StartError::Listen {
                    endpoint: dir.display().to_string(),
                    source,
                })?;
            }
            let election = Election::File(FileLock::beside(path, advertise));
            Ok((Backend::Embedded(path.clone()), election))
        }
        #[cfg(feature = "kubernetes")]
        Store::Kubernetes {
            lease_namespace,
            lease_name,
            identity,
        } => {
            let client = kube::Client::try_default()
                .await
                .map_err(|e| StartError::Internal(format!("connecting to Kubernetes: {e}")))?;
            let lease = crate::cluster::kube::lease::LeaderLease::new(
                client.clone(),
                lease_namespace,
                lease_name,
                identity,
                advertise,
                LEASE_DURATION,
            );
            let backend = Backend::Kubernetes {
                client,
                identity: identity.clone(),
            };
            Ok((backend, Election::Lease(Box::new(lease))))
        }
        #[cfg(not(feature = "kubernetes"))]
        Store::Kubernetes { .. } => Err(StartError::Internal(crate::cluster::NO_KUBERNETES.into())),
    }
}

/// Opens the records and the Events sink (Kubernetes Events, or the log)
/// once this process leads.
async fn open_records(
    backend: Backend,
) -> Result<(Arc<dyn Records>, Option<Arc<dyn Events>>), StartError> {
    match backend {
        Backend::Embedded(path) => {
            // The previous leader may still be exiting with the store open.
            let wait = Duration::from_secs(30);
            let records =
                tokio::task::spawn_blocking(move || EmbeddedRecords::open_waiting(&path, wait))
                    .await
                    .map_err(|e| StartError::Internal(e.to_string()))?
                    .map_err(StartError::Records)?;
            Ok((Arc::new(records), Some(Arc::new(LogEvents))))
        }
        #[cfg(feature = "kubernetes")]
        Backend::Kubernetes { client, identity } => {
            use crate::cluster::kube::KubeRecords;
            use crate::cluster::kube::events::KubeEvents;
            let events = KubeEvents::new(client.clone(), identity);
            let records = KubeRecords::new(client, tokio::runtime::Handle::current());
            Ok((Arc::new(records), Some(Arc::new(events))))
        }
    }
}

/// Renews the lead every `every`; exits the process if another replica
/// took it or it could not be renewed for three periods (a Lease's
/// duration), so that two controllers never act at once.
async fn keep_leading(election: Arc<Election>, every: Duration) {
    use std::time::Instant;
    let mut renewed = Instant::now();
    loop {
        tokio::time::sleep(every).await;
        match election.round().await {
            Ok(Round::Leading) => renewed = Instant::now(),
            Ok(Round::Following(_)) => {
                eprintln!("strata controller: another controller leads now; exiting");
                std::process::exit(1);
            }
            Err(e) => {
                tracing::warn!(error = %crate::engine::error::chain(&e), "renewing the lead");
                if renewed.elapsed() >= every * 3 {
                    eprintln!("strata controller: could not renew the lead in time; exiting");
                    std::process::exit(1);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::bracket_ipv6;

    #[test]
    fn ipv6_advertise_addresses_get_brackets() {
        assert_eq!(bracket_ipv6("10.1.2.3:9812"), "10.1.2.3:9812");
        assert_eq!(bracket_ipv6("fd00::1:9812"), "[fd00::1]:9812");
        assert_eq!(bracket_ipv6("[fd00::1]:9812"), "[fd00::1]:9812");
        assert_eq!(bracket_ipv6("ctl.example:9812"), "ctl.example:9812");
    }
}
