//! `strata controller`: the CSI Controller of a cluster. It holds no pool:
//! it keeps the cluster records, places new volumes on nodes, and changes
//! a node's volumes only through that node's agent (mutual TLS). A
//! heartbeat keeps the node records fresh and marks silent nodes stale.
//!
//! Records live in the embedded store (a redb file; outside Kubernetes)
//! or as custom resources (`--store kubernetes`). Only one controller may
//! act at a time: with the embedded store the file lock enforces it (a
//! second controller on the same file fails to start); in Kubernetes a
//! Lease does, and the CSI socket is bound only once this process holds
//! it, so the sidecars of the other replicas wait. A leader that cannot
//! renew its Lease in time exits before another can take over.
//!
//! SIGTERM (or SIGINT): stop accepting CSI calls and exit 0; there is
//! nothing to flush.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use csi_proto::csi::v1::controller_server::ControllerServer;
use csi_proto::csi::v1::identity_server::IdentityServer;
use tokio::sync::watch;

use crate::agent::tls::TlsFiles;
use crate::cluster::nodes::{Heartbeat, Nodes};
use crate::cluster::records::{EmbeddedRecords, Records};
use crate::cluster::{Cluster, Events};
use crate::csi::controller::{ClusterReady, ControllerService};
use crate::csi::identity::IdentityService;
use crate::csi::{InFlight, Started};
use crate::endpoint::Endpoint;
use crate::metrics::{self, Metrics};
use crate::standalone::StartError;

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
    pub heartbeat: Heartbeat,
    pub metrics_listen: SocketAddr,
}

/// Runs the controller until SIGTERM or SIGINT.
pub async fn run(config: Config) -> Result<(), StartError> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let Endpoint::Unix(csi_path) = &config.csi_endpoint else {
        return Err(StartError::CsiNotUnix(config.csi_endpoint.to_string()));
    };
    let (records, events) = open_store(&config.store).await?;
    let nodes = Arc::new(Nodes::remote(
        Arc::clone(&records),
        config.tls.clone(),
        config.node_agents.clone(),
        config.overcommit,
        config.heartbeat.clone(),
    ));
    let cluster = ClusterReady::default();
    cluster.set(Arc::new(Cluster {
        records,
        nodes: Arc::clone(&nodes),
        events,
    }));
    // Identity's Probe and capabilities: the controller has no engine, so
    // it is ready as soon as its records are open.
    let csi_listener =
        crate::endpoint::bind_unix(csi_path).map_err(|source| StartError::Listen {
            endpoint: config.csi_endpoint.to_string(),
            source,
        })?;
    let mut rx = stop_rx.clone();
    let csi = tonic::transport::Server::builder()
        .add_service(IdentityServer::new(
            IdentityService::new(Started::default(), true).always_ready(),
        ))
        .add_service(ControllerServer::new(ControllerService::new(
            cluster,
            InFlight::default(),
        )))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::UnixListenerStream::new(csi_listener),
            async move {
                let _ = rx.wait_for(|s| *s).await;
            },
        );
    let csi = tokio::spawn(csi);

    let metrics = Metrics::new();
    metrics.watch_nodes(Arc::clone(&nodes));
    let listener = metrics::bind(config.metrics_listen)
        .await
        .map_err(|source| StartError::Listen {
            endpoint: config.metrics_listen.to_string(),
            source,
        })?;
    let mut rx = stop_rx.clone();
    tokio::spawn(metrics::serve(metrics, listener, async move {
        let _ = rx.wait_for(|s| *s).await;
    }));

    nodes.beat().await;
    tokio::spawn(Arc::clone(&nodes).run());
    eprintln!(
        "strata controller: ready (CSI {}, {} node agent(s) known, metrics http://{}/metrics)",
        config.csi_endpoint,
        nodes.list().map(|n| n.len()).unwrap_or(0),
        config.metrics_listen
    );
    crate::standalone::wait_for_signal().await;
    let _ = stop_tx.send(true);
    let _ = csi.await;
    let _ = std::fs::remove_file(csi_path);
    eprintln!("strata controller: stopped");
    Ok(())
}

/// Opens the records (and, in Kubernetes, the Events sink); in
/// Kubernetes, first waits to be the leader.
async fn open_store(
    store: &Store,
) -> Result<(Arc<dyn Records>, Option<Arc<dyn Events>>), StartError> {
    match store {
        Store::Embedded(path) => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(|source| StartError::Listen {
                    endpoint: dir.display().to_string(),
                    source,
                })?;
            }
            let records = EmbeddedRecords::open(path).map_err(StartError::Records)?;
            Ok((Arc::new(records), None))
        }
        Store::Kubernetes {
            lease_namespace,
            lease_name,
            identity,
        } => open_kubernetes(lease_namespace, lease_name, identity).await,
    }
}

/// Waits to lead (the Lease), then opens the custom-resource records and
/// the Events sink.
#[cfg(feature = "kubernetes")]
async fn open_kubernetes(
    lease_namespace: &str,
    lease_name: &str,
    identity: &str,
) -> Result<(Arc<dyn Records>, Option<Arc<dyn Events>>), StartError> {
    use crate::cluster::kube::KubeRecords;
    use crate::cluster::kube::events::KubeEvents;
    use crate::cluster::kube::lease::LeaderLease;
    let client = kube::Client::try_default()
        .await
        .map_err(|e| StartError::Internal(format!("connecting to Kubernetes: {e}")))?;
    let lease = LeaderLease::new(
        client.clone(),
        lease_namespace,
        lease_name,
        identity,
        LEASE_DURATION,
    );
    eprintln!("strata controller: waiting for the Lease {lease_namespace}/{lease_name}");
    loop {
        match lease.try_acquire().await {
            Ok(true) => break,
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(error = %crate::cli::error_chain(&e), "leader election")
            }
        }
        tokio::time::sleep(LEASE_DURATION / 5).await;
    }
    eprintln!("strata controller: leader as {identity}");
    tokio::spawn(keep_leading(lease));
    let events = KubeEvents::new(client.clone(), identity.to_string());
    let records = KubeRecords::new(client, tokio::runtime::Handle::current());
    Ok((Arc::new(records), Some(Arc::new(events))))
}

#[cfg(not(feature = "kubernetes"))]
async fn open_kubernetes(
    _: &str,
    _: &str,
    _: &str,
) -> Result<(Arc<dyn Records>, Option<Arc<dyn Events>>), StartError> {
    Err(StartError::Internal(crate::cluster::NO_KUBERNETES.into()))
}

#[cfg(feature = "kubernetes")]
/// Renews the Lease at a third of its duration; exits the process if it
/// was lost or could not be renewed for a whole duration, so that two
/// controllers never act at once.
async fn keep_leading(lease: crate::cluster::kube::lease::LeaderLease) {
    use std::time::Instant;
    let mut renewed = Instant::now();
    loop {
        tokio::time::sleep(lease.duration() / 3).await;
        match lease.try_acquire().await {
            Ok(true) => renewed = Instant::now(),
            Ok(false) => {
                eprintln!("strata controller: another controller holds the Lease now; exiting");
                std::process::exit(1);
            }
            Err(e) => {
                tracing::warn!(error = %crate::cli::error_chain(&e), "renewing the Lease");
                if renewed.elapsed() >= lease.duration() {
                    eprintln!("strata controller: could not renew the Lease in time; exiting");
                    std::process::exit(1);
                }
            }
        }
    }
}
