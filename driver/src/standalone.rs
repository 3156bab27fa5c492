//! The processes that hold a pool: `strata standalone` and `strata node`.
//!
//! Both run the engine, NBD, the CSI Identity and Node services, the node
//! side (attaching volumes to this kernel), the admin API and metrics.
//! - Standalone adds the CSI Controller, with the embedded records store
//!   and this process as its only node: what runs on a fresh machine and
//!   what the local end-to-end tests use.
//! - Node adds the agent on a TCP port with mutual TLS instead: the
//!   controller (`crate::controller`) changes its volumes through it.
//!
//! SIGTERM (or SIGINT): stop accepting connections, flush every volume and
//! fold its journal, exit 0. Staged volumes stay attached (kernel mounts
//! outlive the plugin) and are served again by the next start.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use csi_proto::admin::v1::admin_server::AdminServer;
use csi_proto::agent::v1::agent_server::AgentServer;
use csi_proto::csi::v1::controller_server::ControllerServer;
use csi_proto::csi::v1::group_controller_server::GroupControllerServer;
use csi_proto::csi::v1::identity_server::IdentityServer;
use csi_proto::csi::v1::node_server::NodeServer;
use csi_proto::csi::v1::snapshot_metadata_server::SnapshotMetadataServer;
use tokio::sync::watch;

use crate::admin::AdminService;
use crate::agent::AgentService;
use crate::agent::peer::{Attachments, PeerService};
use crate::cluster::Cluster;
use crate::cluster::nodes::Nodes;
use crate::cluster::records::EmbeddedRecords;
use crate::csi::controller::{ClusterReady, ControllerService};
use crate::csi::identity::IdentityService;
use crate::csi::node::NodeService;
use crate::csi::{Core, InFlight, Started};
use crate::endpoint::Endpoint;
use crate::engine::{Pool, PoolOptions};
use crate::frontend::iscsi::{IscsiConfig, IscsiServer};
use crate::frontend::nbd::{self, NbdConfig, NbdServer};
use crate::metrics::{self, Metrics};
use crate::node::{Node, NodeConfig};
use crate::peer::{GrantKey, Peers};
use crate::tls::TlsFiles;
use csi_proto::peer::v1::peer_server::PeerServer;

/// Where standalone mode keeps its records, inside the pool directory.
pub const RECORDS_FILE: &str = "cluster.redb";

/// Which of the two processes this is.
#[derive(Debug, Clone)]
pub enum Role {
    /// Everything in one process, CSI Controller included.
    Standalone,
    /// A cluster node: the agent listens on `agent_listen` with mutual TLS.
    /// With `register`, the node keeps its StrataNode custom resource
    /// (agent at that address) up to date itself.
    Node {
        agent_listen: SocketAddr,
        tls: TlsFiles,
        register: Option<String>,
    },
}

/// What `strata standalone` or `strata node` was asked to do.
#[derive(Debug, Clone)]
pub struct Config {
    pub role: Role,
    pub pool: PathBuf,
    /// Limits of background merges and flattens.
    pub jobs: crate::engine::JobConfig,
    /// `PoolOptions::sync_log_bytes`.
    pub sync_log_bytes: u64,
    pub csi_endpoint: Endpoint,
    pub nbd_listen: Vec<Endpoint>,
    /// iSCSI target addresses (none: no target).
    pub iscsi_listen: Vec<std::net::SocketAddr>,
    /// The iSCSI target's CHAP secrets file.
    pub iscsi_chap_secrets: Option<PathBuf>,
    pub metrics_listen: SocketAddr,
    /// The node side: ID, state directory, attach backend.
    pub node: NodeConfig,
}

/// Why standalone mode could not start (or stop cleanly).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("opening the pool at {path}")]
    Pool {
        path: PathBuf,
        #[source]
        source: crate::engine::Error,
    },
    #[error("opening the records store")]
    Records(#[source] crate::cluster::records::RecordsError),
    #[error("starting the node side")]
    Node(#[source] crate::node::Error),
    #[error("listening on {endpoint}")]
    Listen {
        endpoint: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the CSI endpoint must be a unix socket (unix:///PATH), not {0}")]
    CsiNotUnix(String),
    #[error("flushing volumes at shutdown")]
    Flush(#[source] crate::engine::Error),
    #[error("internal error: {0}")]
    Internal(String),
    #[error("{0}")]
    Config(String),
}

fn listen_err(endpoint: impl ToString) -> impl FnOnce(std::io::Error) -> StartError {
    let endpoint = endpoint.to_string();
    move |source| StartError::Listen { endpoint, source }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StartError> + Send + 'static,
) -> Result<T, StartError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StartError::Internal(e.to_string()))?
}

/// Runs standalone mode until SIGTERM or SIGINT.
///
/// Start-up order: the CSI socket first (Probe answers "not ready"), then
/// the pool, NBD, metrics, and the node side, which serves every volume
/// staged before the restart again; only then is Probe ready. So kubelet
/// finds the socket at once and never sees a staged volume unserved while
/// Strata says it is ready.
pub async fn run(config: Config) -> Result<(), StartError> {
    if let Role::Node { tls, .. } = &config.role {
        tls.check_role(Some(&config.node.node_id))
            .map_err(|e| StartError::Internal(format!("agent TLS: {e}")))?;
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let mut sockets = Vec::new();

    // CSI, not ready yet.
    let Endpoint::Unix(csi_path) = &config.csi_endpoint else {
        return Err(StartError::CsiNotUnix(config.csi_endpoint.to_string()));
    };
    let csi_listener =
        crate::endpoint::bind_unix(csi_path).map_err(listen_err(&config.csi_endpoint))?;
    sockets.push(csi_path.clone());
    let started = Started::default();
    let inflight = InFlight::default();
    let node_id = config.node.node_id.clone();
    let metrics = Metrics::new();
    let standalone = matches!(config.role, Role::Standalone);
    let attachments = Arc::new(Attachments::default());
    let agent = AgentService::new(
        started.clone(),
        Arc::clone(&metrics),
        node_id.clone(),
        config.node.max_volumes,
        Arc::clone(&attachments),
    );
    let cluster = ClusterReady::default();
    let controller = standalone
        .then(|| ControllerServer::new(ControllerService::new(cluster.clone(), inflight.clone())));
    let metadata = standalone.then(|| {
        SnapshotMetadataServer::new(ControllerService::new(cluster.clone(), inflight.clone()))
    });
    let groups = standalone.then(|| {
        GroupControllerServer::new(ControllerService::new(cluster.clone(), inflight.clone()))
    });
    let csi = tonic::transport::Server::builder()
        .add_service(IdentityServer::new(IdentityService::new(
            started.clone(),
            standalone,
        )))
        .add_optional_service(controller)
        .add_optional_service(metadata)
        .add_optional_service(groups)
        .add_service(AdminServer::new(AdminService::new(started.clone())))
        .add_service(NodeServer::new(NodeService::new(
            started.clone(),
            node_id.clone(),
            config.node.max_volumes,
            matches!(config.role, Role::Node { .. }),
            inflight.clone(),
        )))
        .serve_with_incoming_shutdown(crate::rpc::unix::incoming(csi_listener), stopped());
    let csi = tokio::spawn(csi);

    let pool_path = config.pool.clone();
    let opts = PoolOptions {
        // In the node's state directory: a tmpfs under /run by default,
        // and gone at reboot, like the page cache the logs stand in for.
        unflushed_dir: Some(config.node.state_dir.join("unflushed")),
        jobs: config.jobs.clone(),
        sync_log_bytes: config.sync_log_bytes,
        ..PoolOptions::default()
    };
    let pool = blocking(move || {
        Pool::open(&pool_path, opts).map_err(|source| StartError::Pool {
            path: pool_path.clone(),
            source,
        })
    })
    .await?;
    metrics.watch_pool(pool.clone());
    pool.set_job_observer(Arc::clone(&metrics) as Arc<dyn crate::engine::JobObserver>);

    // NBD
    let nbd = NbdServer::new(pool.clone(), Arc::clone(&metrics), NbdConfig::default());
    for ep in &config.nbd_listen {
        match ep {
            Endpoint::Unix(p) => {
                let l = crate::endpoint::bind_unix(p).map_err(listen_err(ep))?;
                sockets.push(p.clone());
                tokio::spawn(Arc::clone(&nbd).serve(nbd::Listener::Unix(l), stopped()));
            }
            Endpoint::Tcp(a) => {
                if !a.ip().is_loopback() {
                    tracing::warn!(address = %a, "NBD on a non-loopback address: anyone who can reach it can read and write every volume");
                }
                let l = tokio::net::TcpListener::bind(a)
                    .await
                    .map_err(listen_err(ep))?;
                tokio::spawn(Arc::clone(&nbd).serve(nbd::Listener::Tcp(l), stopped()));
            }
        }
    }

    // iSCSI, over the same exports as NBD (remote volumes attached here too).
    let chap = match &config.iscsi_chap_secrets {
        Some(path) => crate::frontend::iscsi::chap::Secrets::load(path)
            .map_err(|e| StartError::Config(format!("--iscsi-chap-secrets {e}")))?,
        None => Default::default(),
    };
    let config_chap_all = chap.covers_all();
    // Volumes staged here with a secret of their own need it from the
    // first login on (iscsid logs in again as soon as the target listens).
    let chap = Arc::new(chap);
    Node::stage_recorded_secrets(&config.node.state_dir, &chap).map_err(StartError::Node)?;
    let iscsi = IscsiServer::new(
        nbd.exports().clone(),
        Arc::clone(&metrics),
        IscsiConfig {
            chap: Arc::clone(&chap),
            ..IscsiConfig::default()
        },
    );
    for a in &config.iscsi_listen {
        if !a.ip().is_loopback() && !config_chap_all {
            tracing::warn!(address = %a, "iSCSI on a non-loopback address: anyone who can reach it can read and write every volume without a CHAP secret");
        }
        let l = tokio::net::TcpListener::bind(a)
            .await
            .map_err(listen_err(a))?;
        tokio::spawn(Arc::clone(&iscsi).serve(l, stopped()));
    }

    // Metrics
    let listener = metrics::bind(config.metrics_listen)
        .await
        .map_err(listen_err(config.metrics_listen))?;
    tokio::spawn(metrics::serve(Arc::clone(&metrics), listener, stopped()));

    // The node side: serve staged volumes again before saying ready.
    let (node_pool, node_metrics, node_nbd, node_config) = (
        pool.clone(),
        Arc::clone(&metrics),
        Arc::clone(&nbd),
        config.node.clone(),
    );
    // Volumes of other nodes are reached with the cluster's TLS files.
    let peers = match &config.role {
        Role::Node { tls, .. } => Some(Peers::new(
            tls.clone(),
            tokio::runtime::Handle::current(),
            Arc::clone(&metrics),
        )),
        Role::Standalone => None,
    };
    let fetching = agent.clone();
    let node = blocking(move || {
        // Volumes still arriving from other nodes read from them again
        // before any staged volume is served.
        if let Some(peers) = &peers {
            fetching.connect_fetching(&node_pool, peers);
        }
        Node::start(node_pool, node_metrics, node_nbd, chap, peers, node_config)
            .map_err(StartError::Node)
    })
    .await?;
    let backend = node.backend();
    started.set(Core {
        pool: pool.clone(),
        node: Some(Arc::new(node)),
    });
    agent.resume_fetches();

    // The agent port's data lanes (a node), to end at shutdown.
    let mut lanes_of_port = None;
    match &config.role {
        Role::Standalone => {
            // The controller's records, and this process as its one node.
            let records: Arc<dyn crate::cluster::records::Records> = Arc::new(
                EmbeddedRecords::open(&config.pool.join(RECORDS_FILE))
                    .map_err(StartError::Records)?,
            );
            let nodes = Arc::new(Nodes::local(
                Arc::clone(&records),
                node_id.clone(),
                Arc::new(agent),
            ));
            nodes.beat().await;
            tokio::spawn(Arc::clone(&nodes).run());
            cluster.set(Arc::new(Cluster {
                records,
                nodes,
                events: None,
            }));
            tokio::spawn(crate::csi::group::sweep_forever(ControllerService::new(
                cluster.clone(),
                inflight.clone(),
            )));
        }
        Role::Node {
            agent_listen,
            tls,
            register,
        } => {
            if let Some(address) = register {
                register_in_kubernetes(address.clone(), agent.clone()).await?;
            }
            let listener = tokio::net::TcpListener::bind(agent_listen)
                .await
                .map_err(listen_err(agent_listen))?;
            let grants = GrantKey::from_tls(tls)
                .map_err(|e| StartError::Internal(format!("agent TLS: {e}")))?;
            let callers = tls.callers();
            let peer = PeerService::new(
                started.clone(),
                grants,
                callers.clone(),
                Arc::clone(&metrics),
                Arc::clone(&attachments),
            );
            let lanes = crate::agent::lane::Lanes::new(
                peer.clone(),
                tokio::runtime::Handle::current(),
                &metrics,
            );
            lanes_of_port = Some(lanes.clone());
            let port_tls = tls
                .rustls_server(&[crate::peer::LANE_ALPN, b"h2"])
                .map_err(|e| StartError::Internal(format!("agent TLS: {e}")))?;
            let server = tonic::transport::Server::builder()
                .initial_stream_window_size(crate::tls::SERVER_STREAM_WINDOW)
                .initial_connection_window_size(crate::tls::SERVER_CONNECTION_WINDOW)
                .max_frame_size(crate::tls::H2_MAX_FRAME)
                .max_concurrent_streams(crate::tls::SERVER_MAX_STREAMS)
                .http2_keepalive_interval(Some(crate::tls::SERVER_KEEPALIVE.0))
                .http2_keepalive_timeout(Some(crate::tls::SERVER_KEEPALIVE.1))
                .timeout(crate::tls::SERVER_RPC_TIMEOUT)
                // Only the controller changes this node's volumes.
                .add_service(AgentServer::with_interceptor(agent, move |req| {
                    callers.controller(&crate::tls::Caller::of(&req))?;
                    Ok(req)
                }))
                .add_service(
                    PeerServer::new(peer)
                        .max_decoding_message_size(crate::peer::MAX_FRAME)
                        .max_encoding_message_size(crate::peer::MAX_FRAME),
                )
                .serve_with_incoming_shutdown(
                    crate::agent::lane::incoming(listener, port_tls, lanes),
                    stopped(),
                );
            tokio::spawn(async move {
                if let Err(e) = server.await {
                    tracing::error!(error = %e, "agent server failed");
                }
            });
            eprintln!("strata node: agent on {agent_listen} (mutual TLS)");
        }
    }

    // Load every volume in the background, so I/O after a restart does not
    // wait for index builds.
    let warm = pool.clone();
    tokio::task::spawn_blocking(move || {
        if let Err(e) = warm.volume_stats() {
            tracing::warn!(error = %e, "loading volumes at start failed");
        }
    });

    tracing::info!(
        pool = %config.pool.display(),
        csi = %config.csi_endpoint,
        nbd = ?config.nbd_listen.iter().map(ToString::to_string).collect::<Vec<_>>(),
        iscsi = ?config.iscsi_listen,
        metrics = %config.metrics_listen,
        node = %node_id,
        attach = %backend,
        role = if standalone { "standalone" } else { "node" },
        "strata is ready"
    );
    let who = if standalone { "standalone" } else { "node" };
    eprintln!(
        "strata {who}: ready (CSI {}, metrics http://{}/metrics, volumes attach via {backend})",
        config.csi_endpoint, config.metrics_listen
    );

    wait_for_signal().await;
    // Attachments stay: the fd holder (FUSE) or the kernel (nbd) keeps
    // them, and the next start serves them again.
    eprintln!("strata {who}: stopping: flushing every volume");
    let _ = stop_tx.send(true);
    let _ = csi.await;
    // The kernel's nbd connections never end on their own: end them, so
    // no write arrives after the last flush (the kernel resends what was
    // not answered to the next start).
    nbd.close(Duration::from_secs(30)).await;
    iscsi.close(Duration::from_secs(30)).await;
    if let Some(lanes) = lanes_of_port {
        let _ = tokio::task::spawn_blocking(move || lanes.close(Duration::from_secs(30))).await;
    }
    let closing = pool.clone();
    blocking(move || closing.close().map_err(StartError::Flush)).await?;
    for s in sockets {
        let _ = std::fs::remove_file(s);
    }
    eprintln!("strata {who}: stopped cleanly");
    Ok(())
}

/// Keeps this node's StrataNode custom resource up to date.
#[cfg(feature = "kubernetes")]
async fn register_in_kubernetes(address: String, agent: AgentService) -> Result<(), StartError> {
    let client = kube::Client::try_default()
        .await
        .map_err(|e| StartError::Internal(format!("connecting to Kubernetes: {e}")))?;
    let records: Arc<dyn crate::cluster::records::Records> = Arc::new(
        crate::cluster::kube::KubeRecords::new(client, tokio::runtime::Handle::current()),
    );
    tokio::spawn(crate::cluster::nodes::register(
        records,
        Arc::new(agent),
        address,
    ));
    Ok(())
}

#[cfg(not(feature = "kubernetes"))]
async fn register_in_kubernetes(_: String, _: AgentService) -> Result<(), StartError> {
    Err(StartError::Internal(crate::cluster::NO_KUBERNETES.into()))
}

pub(crate) async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// This machine's host name (the default node ID).
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `buf.len()` bytes into `buf`.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "localhost".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}
