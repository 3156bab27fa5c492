//! `strata controller`: the CSI Controller of a cluster. It holds no pool:
//! it keeps the cluster records, places new volumes on nodes, and changes
//! a node's volumes only through that node's agent (mutual TLS). A
//! heartbeat keeps the node records fresh and marks silent nodes stale.
//!
//! Only one controller may act at a time. With the embedded store that is
//! enforced by the store's file lock (a second controller on the same
//! records fails to start).
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
use crate::cluster::Cluster;
use crate::cluster::nodes::{Heartbeat, Nodes};
use crate::cluster::records::{EmbeddedRecords, Records};
use crate::csi::controller::{ClusterReady, ControllerService};
use crate::csi::identity::IdentityService;
use crate::csi::{InFlight, Started};
use crate::endpoint::Endpoint;
use crate::metrics::{self, Metrics};
use crate::standalone::StartError;

/// What `strata controller` was asked to do.
#[derive(Debug, Clone)]
pub struct Config {
    pub csi_endpoint: Endpoint,
    /// The embedded records store.
    pub records: PathBuf,
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
    if let Some(dir) = config.records.parent() {
        std::fs::create_dir_all(dir).map_err(|source| StartError::Listen {
            endpoint: dir.display().to_string(),
            source,
        })?;
    }
    let records: Arc<dyn Records> =
        Arc::new(EmbeddedRecords::open(&config.records).map_err(StartError::Records)?);
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
