//! A cluster on loopback: two `strata node` processes and a
//! `strata controller` with the embedded store. CSI calls go to the
//! controller and reach the right node through its agent (mutual TLS):
//! placement by accessibility requirements and preference, snapshots,
//! restores and clones on the source's node, a restore its requirements
//! keep away from the source refused with RESOURCE_EXHAUSTED, a killed
//! node marked stale and back after a restart, a restarted controller
//! that still knows everything, and an agent that refuses
//! clients without the right certificate. Two controller replicas on one
//! records file: the follower forwards every call to the leader, takes
//! over when the leader is killed, and a leader stopped with SIGTERM
//! hands over at once.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::cluster::{ControllerProc, NodeProc, gen_certs, gen_certs_per_process};
use common::csi::{self as c, Csi};
use common::{read_at, write_at};
use csi_proto::agent::v1::NodeInfoRequest;
use csi_proto::agent::v1::agent_client::AgentClient;
use csi_proto::csi::v1::controller_client::ControllerClient;
use csi_proto::csi::v1::snapshot_metadata_client::SnapshotMetadataClient;
use csi_proto::csi::v1::volume_content_source::{SnapshotSource, Type, VolumeSource};
use csi_proto::csi::v1::*;
use strata::cluster::records::{EmbeddedRecords, Records};
use tonic::Code;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

const KEY: &str = "topology.strata.dev/node";

fn runnable() -> bool {
    common::require(common::is_root(), "needs root for loop devices and FUSE").is_ok()
        && common::require_tools(&["openssl", "losetup"]).is_ok()
}

fn topo(node: &str) -> Topology {
    Topology {
        segments: HashMap::from([(KEY.to_string(), node.to_string())]),
    }
}

/// A volume only its own node attaches (StorageClass `locality: node`).
fn pinned(mut req: CreateVolumeRequest) -> CreateVolumeRequest {
    req.parameters.insert("locality".into(), "node".into());
    req
}

/// The node of a volume pinned to its node.
fn node_of(v: &Volume) -> String {
    v.accessible_topology[0].segments[KEY].clone()
}

/// Waits until the controller reports room on every node of `nodes`.
async fn registered(cc: &mut ControllerClient<tonic::transport::Channel>, nodes: &[&str]) {
    for n in nodes {
        eventually(30, "nodes registered", async || capacity(cc, n).await > 0).await;
    }
}

fn with_requirements(
    mut req: CreateVolumeRequest,
    requisite: &[&str],
    preferred: &[&str],
) -> CreateVolumeRequest {
    req.accessibility_requirements = Some(TopologyRequirement {
        requisite: requisite.iter().map(|n| topo(n)).collect(),
        preferred: preferred.iter().map(|n| topo(n)).collect(),
    });
    req
}

/// A node's capacity as the controller reports it; -1 while the
/// controller answers UNAVAILABLE (starting, or no leader yet).
async fn capacity(c: &mut ControllerClient<tonic::transport::Channel>, node: &str) -> i64 {
    match c
        .get_capacity(GetCapacityRequest {
            accessible_topology: Some(topo(node)),
            ..Default::default()
        })
        .await
    {
        Ok(r) => r.into_inner().available_capacity,
        Err(e) if e.code() == Code::Unavailable => -1,
        Err(e) => panic!("GetCapacity: {e:?}"),
    }
}

/// CreateVolume that must succeed; the volume.
async fn created(
    c: &mut ControllerClient<tonic::transport::Channel>,
    req: CreateVolumeRequest,
) -> Volume {
    c.create_volume(req)
        .await
        .unwrap_or_else(|e| panic!("CreateVolume: {e:?}"))
        .into_inner()
        .volume
        .unwrap()
}

/// Waits until `f` holds, or panics after `secs` seconds.
async fn eventually<F: AsyncFnMut() -> bool>(secs: u64, what: &str, f: F) {
    eventually_or(secs, what, f, String::new).await
}

/// [`eventually`], with what `log` says in the panic (a process's log).
async fn eventually_or<F: AsyncFnMut() -> bool>(
    secs: u64,
    what: &str,
    mut f: F,
    log: impl Fn() -> String,
) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f().await {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Stages and publishes a raw block volume on a node; returns the device.
async fn attach(node: &NodeProc, csi: &mut Csi, vol: &str) -> std::path::PathBuf {
    attach_with(node, csi, vol, HashMap::new()).await
}

/// Stages and publishes a raw block volume with the context
/// ControllerPublishVolume answered.
async fn attach_with(
    node: &NodeProc,
    csi: &mut Csi,
    vol: &str,
    publish_context: HashMap<String, String>,
) -> std::path::PathBuf {
    let staging = node.kubelet_dir().join(format!("staging/{vol}"));
    let target = node.kubelet_dir().join(format!("pods/{vol}/dev"));
    let mut stage = c::stage(vol, &staging, c::block_cap());
    stage.publish_context = publish_context;
    csi.node.node_stage_volume(stage).await.unwrap();
    csi.node
        .node_publish_volume(c::publish(vol, &staging, &target, c::block_cap(), false))
        .await
        .unwrap();
    target
}

async fn unpublish(cc: &mut ControllerClient<tonic::transport::Channel>, vol: &str, node: &str) {
    cc.controller_unpublish_volume(ControllerUnpublishVolumeRequest {
        volume_id: vol.into(),
        node_id: node.into(),
        ..Default::default()
    })
    .await
    .unwrap();
}

async fn detach(node: &NodeProc, csi: &mut Csi, vol: &str) {
    let staging = node.kubelet_dir().join(format!("staging/{vol}"));
    let target = node.kubelet_dir().join(format!("pods/{vol}/dev"));
    csi.node
        .node_unpublish_volume(c::unpublish(vol, &target))
        .await
        .unwrap();
    csi.node
        .node_unstage_volume(c::unstage(vol, &staging))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_places_volumes_and_reaches_them_through_the_agents() {
    if !runnable() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let tls = root.path().join("tls");
    gen_certs(&tls);
    let n1 = NodeProc::start(root.path(), "n1", &tls);
    let mut n2 = NodeProc::start(root.path(), "n2", &tls);
    // A third "agent" that takes connections and never answers (a hung
    // node): the heartbeat must not wait for it before asking the others.
    let hung = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hung_at = hung.local_addr().unwrap().to_string();
    let mut ctl = ControllerProc::start(root.path(), &[&hung_at, &n1.agent, &n2.agent], &tls);
    let mut cc = ControllerClient::new(c::channel(ctl.csi_socket()).await);
    let mut csi1 = Csi::connect(&n1.csi_socket()).await;
    let mut csi2 = Csi::connect(&n2.csi_socket()).await;

    // Both nodes registered, with room.
    registered(&mut cc, &["n1", "n2"]).await;
    assert_eq!(capacity(&mut cc, "nowhere").await, 0);

    // Placement: requisite decides, then preference.
    let size = 16 << 20;
    let on2 = created(
        &mut cc,
        with_requirements(
            pinned(c::create("pvc-a", size, c::block_cap())),
            &["n2"],
            &[],
        ),
    )
    .await;
    assert_eq!(node_of(&on2), "n2");
    let pref1 = created(
        &mut cc,
        with_requirements(
            pinned(c::create("pvc-b", size, c::block_cap())),
            &["n1", "n2"],
            &["n1"],
        ),
    )
    .await;
    assert_eq!(node_of(&pref1), "n1");
    // The same request again: the same volume (idempotent through the records).
    let again = created(
        &mut cc,
        with_requirements(
            pinned(c::create("pvc-a", size, c::block_cap())),
            &["n2"],
            &[],
        ),
    )
    .await;
    assert_eq!(again.volume_id, on2.volume_id);
    let e = cc
        .create_volume(with_requirements(
            pinned(c::create("pvc-x", size, c::block_cap())),
            &["n9"],
            &[],
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    let e = cc
        .create_volume(pinned(c::create("pvc-huge", 1 << 60, c::block_cap())))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");

    // The volume lives on n2 only: n1 cannot stage it.
    let e = csi1
        .node
        .node_stage_volume(c::stage(
            &on2.volume_id,
            &n1.kubelet_dir().join("staging/x"),
            c::block_cap(),
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");

    // Data written on n2, snapshotted through the controller.
    let dev = attach(&n2, &mut csi2, &on2.volume_id).await;
    let mut data = vec![0u8; 256 << 10];
    common::Rng::new(11).fill(&mut data);
    write_at(&dev, 1 << 20, &data).unwrap();
    let snap = cc
        .create_snapshot(c::snapshot("snap-a", &on2.volume_id, false))
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert!(snap.ready_to_use);
    // Its allocated ranges, through the controller, from n2's presence
    // maps; a delta against a snapshot of another volume (on n1) is a
    // wrong request.
    let mut meta = SnapshotMetadataClient::new(c::channel(ctl.csi_socket()).await);
    let mut pages = meta
        .get_metadata_allocated(GetMetadataAllocatedRequest {
            snapshot_id: snap.snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut ranges = Vec::new();
    while let Some(p) = pages.message().await.unwrap() {
        assert_eq!(p.volume_capacity_bytes, size);
        ranges.extend(
            p.block_metadata
                .iter()
                .map(|r| (r.byte_offset, r.size_bytes)),
        );
    }
    assert_eq!(ranges, [(1 << 20, 256 << 10)]);
    let on1 = cc
        .create_snapshot(c::snapshot("snap-b", &pref1.volume_id, false))
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    let e = meta
        .get_metadata_delta(GetMetadataDeltaRequest {
            base_snapshot_id: on1.snapshot_id.clone(),
            target_snapshot_id: snap.snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    // A staged volume cannot be deleted: the agent's FAILED_PRECONDITION
    // reaches the CO unchanged.
    let e = cc
        .delete_volume(DeleteVolumeRequest {
            volume_id: on2.volume_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");

    // Restore and clone go to the source's node and carry the data.
    let from_snap = Type::Snapshot(SnapshotSource {
        snapshot_id: snap.snapshot_id.clone(),
    });
    let restored = created(
        &mut cc,
        pinned(c::create_from(
            "pvc-r",
            size,
            c::block_cap(),
            from_snap.clone(),
        )),
    )
    .await;
    assert_eq!(node_of(&restored), "n2");
    let clone = created(
        &mut cc,
        pinned(c::create_from(
            "pvc-c",
            size,
            c::block_cap(),
            Type::Volume(VolumeSource {
                volume_id: on2.volume_id.clone(),
            }),
        )),
    )
    .await;
    assert_eq!(node_of(&clone), "n2");
    for v in [&restored.volume_id, &clone.volume_id] {
        let d = attach(&n2, &mut csi2, v).await;
        assert!(read_at(&d, 1 << 20, data.len()) == data, "data of {v}");
        detach(&n2, &mut csi2, v).await;
    }
    // A restore whose requirements exclude the source's node: refused,
    // saying where the source is.
    let e = cc
        .create_volume(with_requirements(
            pinned(c::create_from(
                "pvc-r1",
                size,
                c::block_cap(),
                from_snap.clone(),
            )),
            &["n1"],
            &[],
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("n2"), "{}", e.message());

    // Listing comes from the records: every volume, each with its node.
    let list = cc
        .list_volumes(ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut nodes: Vec<String> = list
        .entries
        .iter()
        .map(|e| node_of(e.volume.as_ref().unwrap()))
        .collect();
    nodes.sort();
    assert_eq!(nodes, ["n1", "n2", "n2", "n2"]);
    let m = ctl.metrics();
    assert!(m.contains("strata_nodes{state=\"ready\"} 2"), "{m}");

    // n2 dies: it goes stale, gets no new volumes, and its volumes are
    // UNAVAILABLE (retryable) instead of lost.
    n2.proc.kill9();
    eventually(20, "n2 stale", async || capacity(&mut cc, "n2").await == 0).await;
    let e = cc
        .create_volume(with_requirements(
            pinned(c::create("pvc-d", size, c::block_cap())),
            &["n2"],
            &[],
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("stale"), "{}", e.message());
    let e = cc
        .controller_get_volume(ControllerGetVolumeRequest {
            volume_id: on2.volume_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(ctl.metrics().contains("strata_nodes{state=\"stale\"} 1"));
    // ListVolumes still lists n2's volumes, marked abnormal with the
    // reason; n1's are healthy.
    let listed = cc
        .list_volumes(ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    for e in &listed.entries {
        let v = e.volume.as_ref().unwrap();
        let condition = e
            .status
            .as_ref()
            .unwrap()
            .volume_condition
            .as_ref()
            .unwrap();
        match node_of(v).as_str() {
            "n2" => assert!(
                condition.abnormal && condition.message.contains("n2"),
                "{condition:?}"
            ),
            _ => assert!(!condition.abnormal, "{condition:?}"),
        }
    }
    assert!(
        listed
            .entries
            .iter()
            .any(|e| node_of(e.volume.as_ref().unwrap()) == "n2")
    );
    // Volumes on n1 are not affected.
    cc.controller_get_volume(ControllerGetVolumeRequest {
        volume_id: pref1.volume_id.clone(),
    })
    .await
    .unwrap();

    // n2 restarts: it serves its staged volume again and is ready.
    n2.proc.spawn();
    eventually(20, "n2 ready again", async || {
        capacity(&mut cc, "n2").await > 0
    })
    .await;
    let got = cc
        .controller_get_volume(ControllerGetVolumeRequest {
            volume_id: on2.volume_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let condition = got.status.unwrap().volume_condition.unwrap();
    assert!(!condition.abnormal, "{condition:?}");
    let mut csi2 = Csi::connect(&n2.csi_socket()).await;
    eventually(20, "n2 CSI ready", async || {
        csi2.identity
            .probe(ProbeRequest {})
            .await
            .is_ok_and(|p| p.into_inner().ready == Some(true))
    })
    .await;
    assert!(read_at(&dev, 1 << 20, data.len()) == data);
    detach(&n2, &mut csi2, &on2.volume_id).await;

    // The controller is killed and restarted: its records are intact, a
    // repeated create returns the same volume, and it reaches both nodes.
    ctl.proc.kill9();
    ctl.proc.spawn();
    let mut cc = ControllerClient::new(c::channel(ctl.csi_socket()).await);
    for n in ["n1", "n2"] {
        eventually(20, "nodes after restart", async || {
            capacity(&mut cc, n).await > 0
        })
        .await;
    }
    let again = created(
        &mut cc,
        with_requirements(
            pinned(c::create("pvc-a", size, c::block_cap())),
            &["n2"],
            &[],
        ),
    )
    .await;
    assert_eq!(again.volume_id, on2.volume_id);
    let listed = cc
        .list_volumes(ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.entries.len(), 4);

    // Everything deletes through the controller, on the right node.
    cc.delete_snapshot(DeleteSnapshotRequest {
        snapshot_id: snap.snapshot_id.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    for v in [&on2, &pref1, &restored, &clone] {
        cc.delete_volume(DeleteVolumeRequest {
            volume_id: v.volume_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let left = cc
        .list_volumes(ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(left.entries.is_empty(), "{left:?}");
}

fn read(dir: &Path, name: &str) -> Vec<u8> {
    std::fs::read(dir.join(name)).unwrap()
}

/// Calls NodeInfo on `address` with `tls` (or in plain text).
async fn node_info(address: &str, tls: Option<ClientTlsConfig>) -> Result<String, String> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut ep = Endpoint::from_shared(format!("{scheme}://{address}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5));
    if let Some(tls) = tls {
        ep = ep.tls_config(tls).map_err(|e| e.to_string())?;
    }
    let channel = ep.connect().await.map_err(|e| format!("connect: {e:?}"))?;
    AgentClient::new(channel)
        .node_info(NodeInfoRequest {})
        .await
        .map(|r| r.into_inner().node_id)
        .map_err(|e| format!("call: {e:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_refuses_clients_without_a_certificate_from_its_ca() {
    if !runnable() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let (good, rogue) = (root.path().join("tls"), root.path().join("rogue"));
    gen_certs(&good);
    gen_certs(&rogue);
    let node = NodeProc::start(root.path(), "n1", &good);
    let ca = || Certificate::from_pem(read(&good, "ca.crt"));
    let base = || {
        ClientTlsConfig::new()
            .ca_certificate(ca())
            .domain_name("strata-agent")
    };

    let ok = node_info(
        &node.agent,
        Some(base().identity(Identity::from_pem(
            read(&good, "tls.crt"),
            read(&good, "tls.key"),
        ))),
    )
    .await;
    assert_eq!(ok.as_deref(), Ok("n1"));
    // No client certificate.
    let e = node_info(&node.agent, Some(base())).await;
    assert!(e.is_err(), "a client without a certificate was served");
    // A certificate from another CA.
    let e = node_info(
        &node.agent,
        Some(base().identity(Identity::from_pem(
            read(&rogue, "tls.crt"),
            read(&rogue, "tls.key"),
        ))),
    )
    .await;
    assert!(e.is_err(), "a client with a foreign certificate was served");
    // Plain text.
    let e = node_info(&node.agent, None).await;
    assert!(e.is_err(), "a plain-text client was served");

    // A controller holding the rogue CA never registers the node.
    let ctl = ControllerProc::start(root.path(), &[&node.agent], &rogue);
    let mut cc = ControllerClient::new(c::channel(ctl.csi_socket()).await);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(capacity(&mut cc, "n1").await, 0);
    let e = cc
        .create_volume(c::create("pvc", 1 << 20, c::block_cap()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
}

fn volume_in(req: CreateVolumeRequest) -> CreateVolumeRequest {
    with_requirements(req, &["n1"], &[])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_forward_to_the_leader_and_one_takes_over_when_it_dies() {
    if !runnable() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let tls = root.path().join("tls");
    gen_certs(&tls);
    let n1 = NodeProc::start(root.path(), "n1", &tls);
    let records = root.path().join("records/records.redb");
    let mut a = ControllerProc::replica(root.path(), "ctl-a", &records, &[&n1.agent], &tls);
    eventually_or(20, "a leads", async || a.leading(), || a.proc.log()).await;
    let mut b = ControllerProc::replica(root.path(), "ctl-b", &records, &[&n1.agent], &tls);
    let mut cb = ControllerClient::new(c::channel(b.csi_socket()).await);

    // b follows: capabilities are its own, everything else is a's.
    let caps = cb
        .controller_get_capabilities(ControllerGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(!caps.capabilities.is_empty());
    eventually(20, "n1 seen through b", async || {
        capacity(&mut cb, "n1").await > 0
    })
    .await;
    assert!(!b.leading(), "{}\n{}", b.proc.log(), b.metrics());
    let x = created(
        &mut cb,
        volume_in(c::create("pvc-x", 16 << 20, c::block_cap())),
    )
    .await;
    let mut ca = ControllerClient::new(c::channel(a.csi_socket()).await);
    let listed = ca
        .list_volumes(ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.entries.len(), 1);
    assert_eq!(
        listed.entries[0].volume.as_ref().unwrap().volume_id,
        x.volume_id
    );
    // Errors come back from the leader unchanged.
    let e = cb
        .create_volume(volume_in(c::create("", 16 << 20, c::block_cap())))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    // SnapshotMetadata streams pass through the follower too.
    let snap = cb
        .create_snapshot(c::snapshot("snap-x", &x.volume_id, false))
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    let mut meta = SnapshotMetadataClient::new(c::channel(b.csi_socket()).await);
    let mut pages = meta
        .get_metadata_allocated(GetMetadataAllocatedRequest {
            snapshot_id: snap.snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let page = pages.message().await.unwrap().unwrap();
    assert_eq!(
        (page.volume_capacity_bytes, page.block_metadata.len()),
        (16 << 20, 0)
    );
    assert!(pages.message().await.unwrap().is_none());
    let e = meta
        .get_metadata_allocated(GetMetadataAllocatedRequest {
            snapshot_id: snap.snapshot_id.clone(),
            starting_offset: 16 << 20,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
    cb.delete_snapshot(DeleteSnapshotRequest {
        snapshot_id: snap.snapshot_id,
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(
        b.proc.log().contains("following 127.0.0.1:"),
        "{}",
        b.proc.log()
    );

    // The leader dies: b takes over with the same records.
    a.proc.kill9();
    eventually_or(20, "b leads", async || b.leading(), || b.proc.log()).await;
    eventually(20, "n1 seen by b as leader", async || {
        capacity(&mut cb, "n1").await > 0
    })
    .await;
    let again = created(
        &mut cb,
        volume_in(c::create("pvc-x", 16 << 20, c::block_cap())),
    )
    .await;
    assert_eq!(again.volume_id, x.volume_id);

    // a comes back and follows b.
    a.proc.spawn();
    let mut ca = ControllerClient::new(c::channel(a.csi_socket()).await);
    eventually(20, "a forwards to b", async || {
        capacity(&mut ca, "n1").await > 0
    })
    .await;
    assert!(!a.leading());
    let y = created(
        &mut ca,
        volume_in(c::create("pvc-y", 16 << 20, c::block_cap())),
    )
    .await;
    let listed = cb
        .list_volumes(ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.entries.len(), 2);
    for v in [&x, &y] {
        ca.delete_volume(DeleteVolumeRequest {
            volume_id: v.volume_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    assert!(
        cb.list_volumes(ListVolumesRequest::default())
            .await
            .unwrap()
            .into_inner()
            .entries
            .is_empty()
    );

    // A leader stopped with SIGTERM (a rolling update) hands over.
    assert!(b.proc.terminate().success(), "{}", b.proc.log());
    assert!(
        b.proc.log().contains("gave up the lead"),
        "{}",
        b.proc.log()
    );
    eventually_or(
        20,
        "a leads after b stopped",
        async || a.leading(),
        || a.proc.log(),
    )
    .await;
    assert!(capacity(&mut ca, "n1").await > 0);
    let z = created(
        &mut ca,
        volume_in(c::create("pvc-z", 16 << 20, c::block_cap())),
    )
    .await;

    // The records copy out (as on a move into Kubernetes), but only once
    // no controller holds them.
    let copy = root.path().join("copy.redb");
    let records_copy = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_strata"))
            .args(["records", "copy", "--from"])
            .arg(&records)
            .arg("--to")
            .arg(format!("embedded:{}", copy.display()))
            .output()
            .unwrap()
    };
    let busy = records_copy();
    assert!(!busy.status.success());
    let err = String::from_utf8_lossy(&busy.stderr);
    assert!(err.contains("stop the controller"), "{err}");
    assert!(a.proc.terminate().success());
    let out = records_copy();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("copied 1 volume and 0 snapshot record(s)"),
        "{said}"
    );
    let again = records_copy();
    let said = String::from_utf8_lossy(&again.stdout);
    assert!(
        said.contains("copied 0 volume and 0 snapshot record(s); 1 already there"),
        "{said}"
    );
    let copied = EmbeddedRecords::open(&copy).unwrap();
    assert_eq!(copied.volumes().unwrap()[0].volume_id, z.volume_id);
}

/// A data lane to the node at `address` (`peer.proto`, LaneRequest) with
/// the certificate in `tls`: the stream and the node's hello, or why the
/// hello never came.
fn lane(
    address: &str,
    tls: &Path,
) -> Result<
    (
        tokio_rustls::rustls::StreamOwned<
            tokio_rustls::rustls::ClientConnection,
            std::net::TcpStream,
        >,
        csi_proto::peer::v1::LaneReply,
    ),
    std::io::Error,
> {
    lane_from(address, tls, None)
}

/// [`lane`] from a source address of the client's choice (another
/// address of the loopback net stands for another node); call from a
/// blocking task of a runtime.
fn lane_from(
    address: &str,
    tls: &Path,
    from: Option<std::net::Ipv4Addr>,
) -> Result<
    (
        tokio_rustls::rustls::StreamOwned<
            tokio_rustls::rustls::ClientConnection,
            std::net::TcpStream,
        >,
        csi_proto::peer::v1::LaneReply,
    ),
    std::io::Error,
> {
    use prost::Message;
    let mut s = connect_from(address, tls, from, strata::peer::LANE_ALPN)?;
    let mut buf = Vec::new();
    if !strata::peer::read_frame(&mut s, &mut buf)? {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    let hello =
        csi_proto::peer::v1::LaneReply::decode(buf.as_slice()).map_err(std::io::Error::other)?;
    Ok((s, hello))
}

/// A TLS connection to the agent port at `address` with the cluster's
/// certificate, from loopback address `from`, for protocol `alpn`.
fn connect_from(
    address: &str,
    tls: &Path,
    from: Option<std::net::Ipv4Addr>,
    alpn: &[u8],
) -> std::io::Result<
    tokio_rustls::rustls::StreamOwned<tokio_rustls::rustls::ClientConnection, std::net::TcpStream>,
> {
    use strata::tls::TlsFiles;
    let config = TlsFiles::load(tls).unwrap().rustls_client(&[alpn]).unwrap();
    let tcp = match from {
        None => std::net::TcpStream::connect(address)?,
        Some(ip) => {
            let to = address.parse().map_err(std::io::Error::other)?;
            tokio::runtime::Handle::current()
                .block_on(async {
                    let s = tokio::net::TcpSocket::new_v4()?;
                    s.bind((ip, 0).into())?;
                    s.connect(to).await
                })?
                .into_std()?
        }
    };
    tcp.set_nonblocking(false)?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    let conn =
        tokio_rustls::rustls::ClientConnection::new(config, TlsFiles::server_name()).unwrap();
    Ok(tokio_rustls::rustls::StreamOwned::new(conn, tcp))
}

/// `req` on a lane: the answer, or `None` if the node closed it.
fn ask(
    s: &mut (impl std::io::Read + std::io::Write),
    req: &csi_proto::peer::v1::LaneRequest,
) -> Option<csi_proto::peer::v1::LaneReply> {
    use prost::Message;
    let mut buf = Vec::new();
    strata::peer::write_frame(s, req, &mut buf).ok()?;
    strata::peer::read_frame(s, &mut buf).ok()?.then_some(())?;
    Some(csi_proto::peer::v1::LaneReply::decode(buf.as_slice()).unwrap())
}

/// Whether the node closed the lane (rather than answering).
fn closed(s: &mut impl std::io::Read) -> bool {
    let mut b = [0u8; 1];
    match s.read(&mut b) {
        Ok(n) => n == 0,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_lane_refuses_bad_frames_and_bounds_its_lanes() {
    use csi_proto::peer::v1::{self as pb, lane_request::Op};
    use std::io::Write;
    if !runnable() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let (good, rogue) = (root.path().join("tls"), root.path().join("rogue"));
    gen_certs(&good);
    gen_certs(&rogue);
    let node = NodeProc::start(root.path(), "n1", &good);
    let (agent, tls) = (node.agent.clone(), good.clone());
    tokio::task::spawn_blocking(move || {
        let code = |r: &pb::LaneReply| Code::from(r.code);
        let read = |grant: Option<pb::Grant>, length: u32| pb::LaneRequest {
            op: Some(Op::Read(pb::ReadRequest {
                grant,
                offset: 0,
                length,
            })),
        };
        let (mut s, hello) = lane(&agent, &tls).unwrap();
        assert_eq!(code(&hello), Code::Ok, "{hello:?}");
        assert!(!hello.boot.is_empty());

        // A refusal of the caller or the grant answers and ends the lane
        // (a node without a grant keeps none); other refusals answer, and
        // the lane stays open.
        let r = ask(&mut s, &read(None, 4096)).unwrap();
        assert_eq!(code(&r), Code::Unauthenticated, "{r:?}");
        assert!(closed(&mut s), "a lane kept without a grant");
        let forged = pb::Grant {
            volume_id: "vol-1".into(),
            node_id: "n2".into(),
            epoch: 1,
            mac: vec![7; 32],
            ..Default::default()
        };
        let (mut s, _) = lane(&agent, &tls).unwrap();
        let r = ask(&mut s, &read(Some(forged.clone()), 4096)).unwrap();
        assert_eq!(code(&r), Code::PermissionDenied, "{r:?}");
        assert!(closed(&mut s), "a lane kept with a forged grant");
        let (mut s, _) = lane(&agent, &tls).unwrap();
        let r = ask(&mut s, &read(Some(forged), 2 << 20)).unwrap();
        assert_eq!(code(&r), Code::InvalidArgument, "{r:?}");
        let r = ask(&mut s, &pb::LaneRequest { op: None }).unwrap();
        assert_eq!(code(&r), Code::InvalidArgument, "{r:?}");

        // A frame above the limit, or one that does not decode, ends the
        // lane (not the node).
        s.write_all(&u32::MAX.to_be_bytes()).unwrap();
        s.flush().unwrap();
        assert!(closed(&mut s), "a 4 GiB frame was read");
        let (mut s, _) = lane(&agent, &tls).unwrap();
        s.write_all(&[0, 0, 0, 5, 0xff, 0xff, 0xff, 0xff, 0xff])
            .unwrap();
        s.flush().unwrap();
        assert!(closed(&mut s), "a frame that does not decode was answered");

        // No lane without a certificate from the cluster's CA (the
        // client trusts the node's).
        let mixed = rogue.parent().unwrap().join("mixed");
        std::fs::create_dir_all(&mixed).unwrap();
        std::fs::copy(tls.join("ca.crt"), mixed.join("ca.crt")).unwrap();
        for f in ["tls.crt", "tls.key"] {
            std::fs::copy(rogue.join(f), mixed.join(f)).unwrap();
        }
        assert!(
            lane(&agent, &mixed).is_err(),
            "a foreign certificate got a lane"
        );
        let mut roots = tokio_rustls::rustls::RootCertStore::empty();
        use tokio_rustls::rustls::pki_types::pem::PemObject;
        for c in tokio_rustls::rustls::pki_types::CertificateDer::pem_file_iter(tls.join("ca.crt"))
            .unwrap()
        {
            roots.add(c.unwrap()).unwrap();
        }
        let mut anonymous = tokio_rustls::rustls::ClientConfig::builder_with_provider(Arc::new(
            tokio_rustls::rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        anonymous.alpn_protocols = vec![strata::peer::LANE_ALPN.to_vec()];
        let tcp = std::net::TcpStream::connect(&agent).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let conn = tokio_rustls::rustls::ClientConnection::new(
            Arc::new(anonymous),
            strata::tls::TlsFiles::server_name(),
        )
        .unwrap();
        let mut s = tokio_rustls::rustls::StreamOwned::new(conn, tcp);
        let mut buf = Vec::new();
        assert!(
            !matches!(strata::peer::read_frame(&mut s, &mut buf), Ok(true)),
            "a client without a certificate got a lane"
        );

        // At most 64 lanes from one address (one node), 256 in all: the
        // next is told to use the RPCs, and a lane is free again once one
        // closes. Other loopback addresses stand for other nodes.
        use strata::agent::lane::{MAX_LANES, MAX_LANES_PER_PEER};
        let peer = |i: usize| Some(std::net::Ipv4Addr::new(127, 0, 0, 2 + i as u8));
        let open: Vec<_> = (0..MAX_LANES_PER_PEER)
            .map(|i| {
                let (s, hello) = lane_from(&agent, &tls, peer(0)).unwrap();
                assert_eq!(code(&hello), Code::Ok, "lane {i}: {hello:?}");
                s
            })
            .collect();
        let (_, hello) = lane_from(&agent, &tls, peer(0)).unwrap();
        assert_eq!(code(&hello), Code::ResourceExhausted, "{hello:?}");
        let mut others: Vec<_> = (MAX_LANES_PER_PEER..MAX_LANES)
            .map(|i| {
                let (s, hello) = lane_from(&agent, &tls, peer(i / MAX_LANES_PER_PEER)).unwrap();
                assert_eq!(code(&hello), Code::Ok, "lane {i}: {hello:?}");
                s
            })
            .collect();
        let (_, hello) = lane_from(&agent, &tls, peer(MAX_LANES / MAX_LANES_PER_PEER)).unwrap();
        assert_eq!(code(&hello), Code::ResourceExhausted, "{hello:?}");
        drop(open);
        let deadline = Instant::now() + Duration::from_secs(10);
        while code(&lane_from(&agent, &tls, peer(0)).unwrap().1) != Code::Ok {
            assert!(Instant::now() < deadline, "closed lanes were never freed");
            std::thread::sleep(Duration::from_millis(50));
        }
        others.clear();

        // At most 32 gRPC connections from one address: the next is
        // closed after its handshake, and a place is free again once one
        // closes.
        use strata::agent::lane::MAX_RPC_CONNECTIONS_PER_PEER;
        let h2 = || {
            let mut s = connect_from(&agent, &tls, peer(9), b"h2").unwrap();
            s.sock
                .set_read_timeout(Some(Duration::from_millis(500)))
                .unwrap();
            // The handshake, then whatever the server says first.
            let _ = s.flush();
            s
        };
        let mut open: Vec<_> = (0..MAX_RPC_CONNECTIONS_PER_PEER)
            .map(|i| {
                let mut s = h2();
                assert!(!closed(&mut s), "gRPC connection {i} closed");
                s
            })
            .collect();
        assert!(closed(&mut h2()), "a gRPC connection above the cap");
        open.pop();
        let deadline = Instant::now() + Duration::from_secs(10);
        while closed(&mut h2()) {
            assert!(
                Instant::now() < deadline,
                "a closed gRPC connection's place was never freed"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        drop(open);

        // A client of an owner without lanes (an older Strata answers
        // ALPN h2) goes to the RPCs.
        let config = strata::tls::TlsFiles::load(&tls).unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let server = config.rustls_server(&[b"h2"]).unwrap();
        std::thread::spawn(move || {
            for tcp in listener.incoming().flatten() {
                let conn =
                    tokio_rustls::rustls::ServerConnection::new(Arc::clone(&server)).unwrap();
                let mut s = tokio_rustls::rustls::StreamOwned::new(conn, tcp);
                let _ = s.flush();
                let _ = closed(&mut s);
            }
        });
        let lanes = strata::peer::lane::Lanes::new(
            Some(
                config
                    .rustls_client(&[strata::peer::LANE_ALPN, b"h2"])
                    .unwrap(),
            ),
            &address,
            strata::tls::SERVER_NAME,
            Duration::from_secs(5),
            Duration::from_secs(5),
        );
        assert!(
            lanes.call(&read(None, 4096), None).is_none(),
            "a lane to an owner without lanes"
        );
        // The owner with lanes answers through one.
        let lanes = strata::peer::lane::Lanes::new(
            Some(
                config
                    .rustls_client(&[strata::peer::LANE_ALPN, b"h2"])
                    .unwrap(),
            ),
            &agent,
            strata::tls::SERVER_NAME,
            Duration::from_secs(5),
            Duration::from_secs(5),
        );
        let e = lanes
            .call(&read(None, 4096), None)
            .expect("a lane")
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    })
    .await
    .unwrap();
    // The node serves on.
    let client = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(&good, "ca.crt")))
        .domain_name("strata-agent")
        .identity(Identity::from_pem(
            read(&good, "tls.crt"),
            read(&good, "tls.key"),
        ));
    assert_eq!(
        node_info(&node.agent, Some(client)).await.as_deref(),
        Ok("n1")
    );

    // A stopping node ends its lanes before its pool closes, without
    // waiting for their clients to leave.
    let mut node = node;
    let (mut s, _) = lane(&node.agent, &good).unwrap();
    let stopping = Instant::now();
    assert!(node.proc.terminate().success(), "{}", node.proc.log());
    assert!(
        stopping.elapsed() < Duration::from_secs(10),
        "a node with an idle lane took {:?} to stop",
        stopping.elapsed()
    );
    assert!(closed(&mut s), "a lane outlived its node");
}

/// A client of a node's peer data path, with the cluster's certificate.
async fn peer_client(
    address: &str,
    tls: &Path,
) -> csi_proto::peer::v1::peer_client::PeerClient<tonic::transport::Channel> {
    let files = strata::tls::TlsFiles::load(tls).unwrap();
    let channel = files
        .channel(
            "peer",
            address,
            strata::tls::Server::Any,
            Duration::from_secs(5),
            Duration::from_secs(10),
        )
        .unwrap();
    csi_proto::peer::v1::peer_client::PeerClient::new(channel)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_attaches_a_volume_another_node_holds() {
    use csi_proto::peer::v1 as pb;
    if !runnable() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    // A certificate per process (the other tests share one): a node's
    // reaches only what was published to it (checked below).
    let certs = root.path().join("tls");
    gen_certs_per_process(&certs, &["n1", "n2", "n3"]);
    let tls = |who: &str| match who {
        "controller" => certs.join("controller"),
        node => certs.join("nodes").join(node),
    };
    let mut n1 = NodeProc::start(root.path(), "n1", &tls("n1"));
    let mut n2 = NodeProc::start(root.path(), "n2", &tls("n2"));
    let ctl = ControllerProc::start(root.path(), &[&n1.agent, &n2.agent], &tls("controller"));
    let mut cc = ControllerClient::new(c::channel(ctl.csi_socket()).await);
    let mut csi1 = Csi::connect(&n1.csi_socket()).await;
    registered(&mut cc, &["n1", "n2"]).await;
    let size = 16 << 20;
    let vol = created(
        &mut cc,
        with_requirements(c::create("pvc-far", size, c::block_cap()), &["n2"], &[]),
    )
    .await;
    // Any node that attaches other nodes' volumes may attach it; nodes in
    // a cluster say they do.
    let info = csi1
        .node
        .node_get_info(NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        info.accessible_topology.unwrap().segments["topology.strata.dev/attach"],
        "anywhere"
    );
    assert_eq!(
        vol.accessible_topology,
        [Topology {
            segments: HashMap::from([(
                "topology.strata.dev/attach".to_string(),
                "anywhere".to_string()
            )]),
        }]
    );
    let id = vol.volume_id.clone();
    let publish = |node: &str| ControllerPublishVolumeRequest {
        volume_id: id.clone(),
        node_id: node.into(),
        volume_capability: Some(c::block_cap()),
        ..Default::default()
    };

    // Published to its own node: the context says so, nothing more.
    let own = cc.controller_publish_volume(publish("n2")).await.unwrap();
    assert_eq!(
        own.into_inner().publish_context,
        HashMap::from([("strata.dev/owner".to_string(), "n2".to_string())])
    );
    assert_eq!(
        cc.controller_publish_volume(publish("n9"))
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );

    // Published to n1: n1 stages it from n2 over the data path.
    let ctx = cc
        .controller_publish_volume(publish("n1"))
        .await
        .unwrap()
        .into_inner()
        .publish_context;
    assert_eq!(ctx["strata.dev/owner"], "n2");
    assert_eq!(ctx["strata.dev/address"], n2.agent);
    // The paths detach() unpublishes and unstages.
    let staging = n1.kubelet_dir().join(format!("staging/{id}"));
    let target = n1.kubelet_dir().join(format!("pods/{id}/dev"));
    let mut stage = c::stage(&id, &staging, c::block_cap());
    stage.publish_context = ctx.clone();
    csi1.node.node_stage_volume(stage.clone()).await.unwrap();
    csi1.node
        .node_publish_volume(c::publish(&id, &staging, &target, c::block_cap(), false))
        .await
        .unwrap();
    let mut data = vec![0u8; 4 << 20];
    common::Rng::new(7).fill(&mut data);
    write_at(&target, 1 << 20, &data).unwrap();
    assert!(read_at(&target, 1 << 20, 4 << 20) == data);

    // The owner is killed and comes back while n1 writes: the write waits
    // and completes, and what was flushed before is there.
    n2.proc.kill9();
    let writer = {
        let (target, data) = (target.clone(), data.clone());
        std::thread::spawn(move || write_at(&target, 8 << 20, &data[..1 << 20]))
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    n2.proc.spawn();
    n2.wait_for_agent();
    tokio::task::spawn_blocking(move || writer.join().unwrap())
        .await
        .unwrap()
        .expect("a write across the owner's restart completes");
    assert!(read_at(&target, 1 << 20, 4 << 20) == data);
    assert!(read_at(&target, 8 << 20, 1 << 20) == data[..1 << 20]);
    // Both sides count what crossed, per peer; n1 counts its retries.
    let sent = |m: &str, peer: &str, direction: &str| {
        common::standalone::metric_value(
            m,
            &format!("strata_peer_bytes_total{{peer=\"{peer}\",direction=\"{direction}\"}}"),
        )
        .unwrap_or(0.0)
    };
    let (m1, m2) = (n1.metrics(), n2.metrics());
    assert!(sent(&m1, "n2", "sent") >= (1 << 20) as f64, "{m1}");
    assert!(sent(&m1, "n2", "received") >= (4 << 20) as f64, "{m1}");
    // n2 restarted: it counts since, at least the reads just made.
    assert!(sent(&m2, "n1", "sent") >= (4 << 20) as f64, "{m2}");
    // Those reads and writes went on data lanes (they stay open, idle).
    assert!(
        common::standalone::metric_value(&m2, "strata_peer_lanes").unwrap_or(0.0) >= 1.0,
        "{m2}"
    );
    assert!(
        m1.contains("strata_remote_io_retries_total{peer=\"n2\""),
        "{m1}"
    );
    assert!(
        m1.contains("strata_remote_io_duration_seconds_count{peer=\"n2\",op=\"read\"}"),
        "{m1}"
    );

    // The data path checks every request.
    let mut peer = peer_client(&n2.agent, &tls("n1")).await;
    let mut grant = strata::peer::grant::decode(&id, &ctx["strata.dev/grant"]).unwrap();
    // A session of this attachment newer than n1's (whose next requests
    // are refused unexecuted, and go on in a newer one).
    grant.session = u64::MAX / 2;
    let read = |grant: Option<pb::Grant>, offset: u64, length: u32| pb::ReadRequest {
        grant,
        offset,
        length,
    };
    let got = peer
        .read(read(Some(grant.clone()), 1 << 20, 4096))
        .await
        .unwrap()
        .into_inner()
        .data;
    assert!(got == data[..4096], "the owner has n1's writes");
    for (req, want) in [
        (read(None, 0, 4096), Code::Unauthenticated),
        (
            read(
                Some(pb::Grant {
                    mac: vec![0; 32],
                    ..grant.clone()
                }),
                0,
                4096,
            ),
            Code::PermissionDenied,
        ),
        (
            read(
                Some(pb::Grant {
                    epoch: grant.epoch + 1,
                    ..grant.clone()
                }),
                0,
                4096,
            ),
            Code::PermissionDenied,
        ),
        (
            read(Some(grant.clone()), size as u64, 4096),
            Code::OutOfRange,
        ),
        (read(Some(grant.clone()), 0, 2 << 20), Code::InvalidArgument),
    ] {
        let e = peer.read(req).await.unwrap_err();
        assert_eq!(e.code(), want, "{e:?}");
    }
    // Another node's certificate: n1's grant is not its to use, on the
    // RPCs or a lane; it cannot make grants (as if it held the shared
    // key); and only the controller's certificate changes a node's
    // volumes or reaches the controller's peer port.
    let mut rogue = peer_client(&n2.agent, &tls("n3")).await;
    let n3_key =
        strata::peer::GrantKey::from_secret(&std::fs::read(tls("n3").join("tls.key")).unwrap());
    for g in [
        grant.clone(),
        n3_key.make(&id, "n3", grant.epoch, false).unwrap(),
        n3_key.make(&id, "n1", grant.epoch, false).unwrap(),
    ] {
        let e = rogue.read(read(Some(g), 0, 4096)).await.unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    }
    let lane_read = csi_proto::peer::v1::LaneRequest {
        op: Some(csi_proto::peer::v1::lane_request::Op::Read(read(
            Some(grant.clone()),
            0,
            4096,
        ))),
    };
    let (address, n1_tls, n3_tls) = (n2.agent.clone(), tls("n1"), tls("n3"));
    let codes = tokio::task::spawn_blocking(move || {
        [n1_tls, n3_tls].map(|t| {
            let (mut s, _) = lane(&address, &t).unwrap();
            ask(&mut s, &lane_read).unwrap().code
        })
    })
    .await
    .unwrap();
    assert_eq!(codes, [0, Code::PermissionDenied as i32]);
    let detach_req = || csi_proto::agent::v1::AttachRequest {
        volume_id: id.clone(),
        node_id: "n1".into(),
        ..Default::default()
    };
    for node in ["n1", "n2", "n3"] {
        let e = agent_client(&n2.agent, &tls(node))
            .await
            .detach(detach_req())
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{node}: {e:?}");
    }
    let peer_port = ctl.proc.args()[ctl
        .proc
        .args()
        .iter()
        .position(|a| a == "--peer-listen")
        .unwrap()
        + 1]
    .clone();
    let capabilities = async |who: &str| {
        let channel = strata::tls::TlsFiles::load(&tls(who))
            .unwrap()
            .channel(
                "controller",
                &peer_port,
                strata::tls::Server::Controller,
                Duration::from_secs(5),
                Duration::from_secs(10),
            )
            .unwrap();
        ControllerClient::new(channel)
            .controller_get_capabilities(ControllerGetCapabilitiesRequest {})
            .await
            .map(drop)
    };
    assert_eq!(
        capabilities("n1").await.unwrap_err().code(),
        Code::PermissionDenied
    );
    capabilities("controller").await.unwrap();
    // The grant still works where it should. A client checks the
    // server's certificate names the process it means to reach.
    peer.read(read(Some(grant.clone()), 0, 4096)).await.unwrap();
    let files = strata::tls::TlsFiles::load(&tls("n1")).unwrap();
    for (expect, works) in [("n2", true), ("n1", false), ("n3", false)] {
        let channel = files
            .channel(
                "peer",
                &n2.agent,
                strata::tls::Server::Node(expect),
                Duration::from_secs(5),
                Duration::from_secs(10),
            )
            .unwrap();
        let got = csi_proto::peer::v1::peer_client::PeerClient::new(channel)
            .read(read(Some(grant.clone()), 0, 4096))
            .await;
        assert_eq!(got.is_ok(), works, "n2's agent as {expect}: {got:?}");
    }

    // Unpublished and unstaged on n1 (not unstaged while published): staged
    // on n2, the data is there.
    let e = csi1
        .node
        .node_unstage_volume(c::unstage(&id, &staging))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    detach(&n1, &mut csi1, &id).await;
    unpublish(&mut cc, &id, "n1").await;
    let mut csi2 = Csi::connect(&n2.csi_socket()).await;
    let dev = attach(&n2, &mut csi2, &id).await;
    assert!(read_at(&dev, 1 << 20, 4 << 20) == data);
    detach(&n2, &mut csi2, &id).await;

    // A newer publish fences off the older grant.
    let newer = cc
        .controller_publish_volume(publish("n1"))
        .await
        .unwrap()
        .into_inner()
        .publish_context;
    let new_grant = strata::peer::grant::decode(&id, &newer["strata.dev/grant"]).unwrap();
    assert!(new_grant.epoch > grant.epoch);
    peer.open(pb::OpenRequest {
        grant: Some(new_grant),
    })
    .await
    .unwrap();
    let e = peer
        .read(read(Some(grant.clone()), 0, 4096))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    // Publishing to the same node again answers the same context.
    let same = cc
        .controller_publish_volume(publish("n1"))
        .await
        .unwrap()
        .into_inner()
        .publish_context;
    assert_eq!(same, newer);
    // The owner remembers across a restart: the older grant stays fenced
    // off; and unpublishing n1 fences off its grant too.
    n2.proc.kill9();
    n2.proc.spawn();
    n2.wait_for_agent();
    let mut peer = peer_client(&n2.agent, &tls("n1")).await;
    let e = peer.read(read(Some(grant), 0, 4096)).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let newer_grant = strata::peer::grant::decode(&id, &newer["strata.dev/grant"]).unwrap();
    peer.read(read(Some(newer_grant.clone()), 0, 4096))
        .await
        .unwrap();
    unpublish(&mut cc, &id, "n1").await;
    let e = peer
        .read(read(Some(newer_grant), 0, 4096))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");

    // A restore of a snapshot held by n2 before its pod's node is known
    // (any of n1, n2): made on n2, and n1 attaches it over the data path.
    // (A restore for a pod on a known other node moves there: see
    // `restores_for_a_pod_on_another_node_move_there_and_fetch_behind`.)
    let snap = cc
        .create_snapshot(c::snapshot("snap-far", &id, false))
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    let from_snap = Type::Snapshot(SnapshotSource {
        snapshot_id: snap.snapshot_id,
    });
    let restored = created(
        &mut cc,
        with_requirements(
            c::create_from("pvc-far-restored", size, c::block_cap(), from_snap),
            &["n1", "n2"],
            &[],
        ),
    )
    .await;
    let rid = restored.volume_id.clone();
    let ctx = cc
        .controller_publish_volume(ControllerPublishVolumeRequest {
            volume_id: rid.clone(),
            node_id: "n1".into(),
            volume_capability: Some(c::block_cap()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .publish_context;
    assert_eq!(ctx["strata.dev/owner"], "n2");
    let target = attach_with(&n1, &mut csi1, &rid, ctx).await;
    assert!(read_at(&target, 1 << 20, 4 << 20) == data);
    detach(&n1, &mut csi1, &rid).await;

    // Published read-only (another way than it is published to n1 now:
    // ALREADY_EXISTS until it is unpublished): n1 reads it through a
    // read-only device, and the owner refuses the grant's writes.
    let publish_ro = ControllerPublishVolumeRequest {
        volume_id: rid.clone(),
        node_id: "n1".into(),
        volume_capability: Some(c::block_cap()),
        readonly: true,
        ..Default::default()
    };
    let e = cc
        .controller_publish_volume(publish_ro.clone())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    unpublish(&mut cc, &rid, "n1").await;
    let ctx = cc
        .controller_publish_volume(publish_ro)
        .await
        .unwrap()
        .into_inner()
        .publish_context;
    let ro_grant = strata::peer::grant::decode(&rid, &ctx["strata.dev/grant"]).unwrap();
    assert!(ro_grant.read_only, "{ctx:?}");
    let target = attach_with(&n1, &mut csi1, &rid, ctx).await;
    assert!(read_at(&target, 1 << 20, 4 << 20) == data);
    let written = {
        let target = target.clone();
        tokio::task::spawn_blocking(move || {
            use std::os::unix::fs::FileExt;
            std::fs::OpenOptions::new()
                .write(true)
                .open(&target)
                .and_then(|f| f.write_all_at(&[1u8; 4096], 0).and_then(|()| f.sync_all()))
        })
        .await
        .unwrap()
    };
    assert!(written.is_err(), "wrote to a read-only publish");
    let e = peer
        .write(pb::WriteRequest {
            grant: Some(ro_grant),
            offset: 1 << 20,
            data: vec![1u8; 4096],
            fua: true,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(read_at(&target, 1 << 20, 4 << 20) == data);
    detach(&n1, &mut csi1, &rid).await;
    unpublish(&mut cc, &rid, "n1").await;

    // Pinned to its node (locality: node), it is published nowhere else.
    let local = created(
        &mut cc,
        pinned(with_requirements(
            c::create("pvc-local", size, c::block_cap()),
            &["n2"],
            &[],
        )),
    )
    .await;
    assert_eq!(node_of(&local), "n2");
    let e = cc
        .controller_publish_volume(ControllerPublishVolumeRequest {
            volume_id: local.volume_id.clone(),
            node_id: "n1".into(),
            volume_capability: Some(c::block_cap()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");

    // The owner's machine "reboots" (another boot ID) while it holds a
    // write of n1's that it answered and had not flushed, and n1's Strata
    // restarts too (a rolling upgrade): n1's next flush fails, since the
    // write may be gone; so does every later one.
    let ctx = cc
        .controller_publish_volume(ControllerPublishVolumeRequest {
            volume_id: rid.clone(),
            node_id: "n1".into(),
            volume_capability: Some(c::block_cap()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .publish_context;
    let target = attach_with(&n1, &mut csi1, &rid, ctx).await;
    common::write_direct(&target, 0, &[7u8; 4096]);
    n2.proc.kill9();
    n2.proc
        .env
        .push(("STRATA_TEST_BOOT_ID".into(), "another-boot".into()));
    n2.proc.spawn();
    n2.wait_for_agent();
    n1.proc.kill9();
    n1.proc.spawn();
    n1.wait_for_agent();
    let fsync = move || {
        std::fs::OpenOptions::new()
            .write(true)
            .open(&target)
            .and_then(|f| f.sync_all())
    };
    for _ in 0..2 {
        let f = fsync.clone();
        let flushed = tokio::task::spawn_blocking(f).await.unwrap();
        assert!(
            flushed.is_err(),
            "a flush after the owner lost writes succeeded"
        );
    }
    // Moved (live) to n1 itself, the volume is served from n1's pool now;
    // the writes that may be gone stay gone: flushes still fail.
    let moved = csi_proto::cluster::v1::cluster_client::ClusterClient::new(
        c::channel(ctl.csi_socket()).await,
    )
    .move_volume(csi_proto::cluster::v1::MoveVolumeRequest {
        volume_id: rid.clone(),
        node_id: "n1".into(),
    })
    .await
    .unwrap()
    .into_inner();
    assert_eq!(
        (moved.from_node.as_str(), moved.to_node.as_str()),
        ("n2", "n1")
    );
    let flushed = tokio::task::spawn_blocking(fsync.clone()).await.unwrap();
    assert!(
        flushed.is_err(),
        "a flush after the owner lost writes succeeded once the volume moved"
    );
    // ... also once n1's Strata restarted again, serving it from its pool.
    n1.proc.kill9();
    n1.proc.spawn();
    n1.wait_for_agent();
    csi1 = Csi::connect(&n1.csi_socket()).await;
    let flushed = tokio::task::spawn_blocking(fsync.clone()).await.unwrap();
    assert!(
        flushed.is_err(),
        "a flush after the owner lost writes succeeded once the volume moved and n1 restarted"
    );
    detach(&n1, &mut csi1, &rid).await;

    // The nodes come back at each other's agent address (both are the
    // controller's --node-agent seeds): each is recorded at its new one
    // once a connection that checks its certificate confirms who it is.
    let (a1, a2) = (n1.agent.clone(), n2.agent.clone());
    n1.proc.kill9();
    n2.proc.kill9();
    n1.proc.set_arg("--agent-listen", &a2);
    n2.proc.set_arg("--agent-listen", &a1);
    (n1.agent, n2.agent) = (a2, a1.clone());
    n1.proc.spawn();
    n2.proc.spawn();
    n1.wait_for_agent();
    n2.wait_for_agent();
    eventually(30, "n2 is reached at n1's old address", async || {
        cc.controller_publish_volume(publish("n1"))
            .await
            .is_ok_and(|r| r.into_inner().publish_context["strata.dev/address"] == a1)
    })
    .await;
    // n1's host is reinstalled as n3 at the same address: n3 is recorded
    // there, and n1, which no longer answers anywhere, goes stale.
    let a2 = n1.agent.clone();
    n1.proc.kill9();
    let mut n3 = NodeProc::start(root.path(), "n3", &tls("n3"));
    n3.proc.kill9();
    n3.proc.set_arg("--agent-listen", &a2);
    n3.agent = a2;
    n3.proc.spawn();
    n3.wait_for_agent();
    eventually(30, "n3 is recorded and n1 is stale", async || {
        capacity(&mut cc, "n3").await > 0 && capacity(&mut cc, "n1").await == 0
    })
    .await;
}

/// Three nodes and a controller, each in its own network namespace on one
/// bridge (n3 behind a 40 Mbit/s link): a volume held by n1 is attached by
/// n2 and n3 in turn, survives a partition of n3 under a writer, and is
/// restored for a pod on n3; the whole volume is compared with a model
/// after every step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_on_their_own_networks_attach_each_others_volumes() {
    if !runnable() || common::netns::available().is_err() {
        return;
    }
    let net = common::netns::Net::new(&["n1", "n2", "n3", "ctl"]);
    let root = tempfile::tempdir().unwrap();
    // A certificate per process, as in a_node_attaches_a_volume_another_node_holds.
    let certs = root.path().join("tls");
    gen_certs_per_process(&certs, &["n1", "n2", "n3"]);
    let nodes: Vec<NodeProc> = ["n1", "n2", "n3"]
        .iter()
        .map(|n| NodeProc::start_on(root.path(), n, &certs.join("nodes").join(n), &net))
        .collect();
    let agents: Vec<&str> = nodes.iter().map(|n| n.agent.as_str()).collect();
    let ctl =
        ControllerProc::start_on(root.path(), &agents, &certs.join("controller"), &net, "ctl");
    let mut cc = ControllerClient::new(c::channel(ctl.csi_socket()).await);
    let mut csi = Vec::new();
    for n in &nodes {
        csi.push(Csi::connect(&n.csi_socket()).await);
    }
    registered(&mut cc, &["n1", "n2", "n3"]).await;
    net.limit("n3", "40mbit");

    let size = 16usize << 20;
    let vol = created(
        &mut cc,
        with_requirements(
            c::create("pvc-net", size as i64, c::block_cap()),
            &["n1"],
            &["n1"],
        ),
    )
    .await;
    let id = vol.volume_id.clone();
    let mut model = vec![0u8; size];
    let mut rng = common::Rng::new(21);
    // Publishes to node `i` (0-based) and attaches there.
    async fn attach_on(
        cc: &mut ControllerClient<tonic::transport::Channel>,
        node: &NodeProc,
        csi: &mut Csi,
        id: &str,
    ) -> std::path::PathBuf {
        let ctx = cc
            .controller_publish_volume(ControllerPublishVolumeRequest {
                volume_id: id.into(),
                node_id: node.id.clone(),
                volume_capability: Some(c::block_cap()),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .publish_context;
        attach_with(node, csi, id, ctx).await
    }
    let write = |dev: &Path, model: &mut [u8], rng: &mut common::Rng, at: usize, len: usize| {
        rng.fill(&mut model[at..at + len]);
        write_at(dev, at as u64, &model[at..at + len]).unwrap();
    };
    let same = |dev: &Path, model: &[u8], what: &str| {
        assert!(
            read_at(dev, 0, model.len()) == model,
            "contents after {what}"
        );
    };

    // n1 writes to its own volume.
    let dev = attach_on(&mut cc, &nodes[0], &mut csi[0], &id).await;
    write(&dev, &mut model, &mut rng, 1 << 20, 2 << 20);
    same(&dev, &model, "n1's writes");
    detach(&nodes[0], &mut csi[0], &id).await;

    // n2 attaches it across the bridge, reads n1's data and writes.
    let dev = attach_on(&mut cc, &nodes[1], &mut csi[1], &id).await;
    same(&dev, &model, "n2 attached");
    write(&dev, &mut model, &mut rng, 6 << 20, 1 << 20);
    same(&dev, &model, "n2's writes");
    detach(&nodes[1], &mut csi[1], &id).await;

    // n3 behind its slow link: 4 MiB take at least 0.8 s at 40 Mbit/s
    // (the bytes crossed that link, not a shortcut).
    let dev = attach_on(&mut cc, &nodes[2], &mut csi[2], &id).await;
    let t = Instant::now();
    write(&dev, &mut model, &mut rng, 8 << 20, 4 << 20);
    let took = t.elapsed();
    eprintln!("n3 wrote 4 MiB over its 40 Mbit/s link in {took:?}");
    assert!(took >= Duration::from_millis(600), "4 MiB in {took:?}");
    same(&dev, &model, "n3's writes");

    // A partition while n3 writes: the write waits, and completes once the
    // link is back.
    let mut chunk = vec![0u8; 1 << 20];
    rng.fill(&mut chunk);
    net.link("n3", false);
    let writer = {
        let (dev, chunk) = (dev.clone(), chunk.clone());
        std::thread::spawn(move || write_at(&dev, 13 << 20, &chunk))
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        !writer.is_finished(),
        "a write completed during the partition"
    );
    net.link("n3", true);
    let t = Instant::now();
    tokio::task::spawn_blocking(move || writer.join().unwrap())
        .await
        .unwrap()
        .expect("the write completes after the partition");
    eprintln!(
        "the write completed {:?} after the link came back",
        t.elapsed()
    );
    model[13 << 20..14 << 20].copy_from_slice(&chunk);
    same(&dev, &model, "the partition");
    detach(&nodes[2], &mut csi[2], &id).await;

    // A restore for a pod on n3: made where the snapshot's layers are (n1)
    // and moved to n3 at once (switch first): n3 serves it, reading what it
    // has not fetched yet from n1 over the slow link while it fetches the
    // rest behind.
    let snap = cc
        .create_snapshot(c::snapshot("snap-net", &id, false))
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    let restored = created(
        &mut cc,
        with_requirements(
            c::create_from(
                "pvc-net-restored",
                size as i64,
                c::block_cap(),
                Type::Snapshot(SnapshotSource {
                    snapshot_id: snap.snapshot_id,
                }),
            ),
            &["n3"],
            &["n3"],
        ),
    )
    .await;
    let rid = restored.volume_id.clone();
    let ctx = cc
        .controller_publish_volume(ControllerPublishVolumeRequest {
            volume_id: rid.clone(),
            node_id: "n3".into(),
            volume_capability: Some(c::block_cap()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .publish_context;
    assert_eq!(ctx["strata.dev/owner"], "n3", "{ctx:?}");
    let dev = attach_with(&nodes[2], &mut csi[2], &rid, ctx).await;
    same(&dev, &model, "the restore");
    detach(&nodes[2], &mut csi[2], &rid).await;
}

/// The agent of a node, for looking at what it holds.
async fn agent_client(address: &str, tls: &Path) -> AgentClient<tonic::transport::Channel> {
    let files = strata::tls::TlsFiles::load(tls).unwrap();
    let channel = files
        .channel(
            "agent",
            address,
            strata::tls::Server::Any,
            Duration::from_secs(5),
            Duration::from_secs(10),
        )
        .unwrap();
    AgentClient::new(channel)
}

/// Whether the node at `agent` holds volume `id`.
async fn holds(agent: &str, tls: &Path, id: &str) -> bool {
    let r = agent_client(agent, tls)
        .await
        .get_volume(csi_proto::agent::v1::GetVolumeRequest {
            volume_id: id.into(),
        })
        .await;
    match r {
        Ok(_) => true,
        Err(e) if e.code() == Code::NotFound => false,
        Err(e) => panic!("GetVolume on {agent}: {e:?}"),
    }
}

/// Publishes a volume to `node` and stages it there; the device.
async fn publish_and_attach(
    cc: &mut ControllerClient<tonic::transport::Channel>,
    node: &NodeProc,
    csi: &mut Csi,
    vol: &str,
) -> std::path::PathBuf {
    let ctx = cc
        .controller_publish_volume(ControllerPublishVolumeRequest {
            volume_id: vol.into(),
            node_id: node.id.clone(),
            volume_capability: Some(c::block_cap()),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("publish {vol} to {}: {e:?}", node.id))
        .into_inner()
        .publish_context;
    attach_with(node, csi, vol, ctx).await
}

/// Unstages and unpublishes what [`publish_and_attach`] did.
async fn detach_and_unpublish(
    cc: &mut ControllerClient<tonic::transport::Channel>,
    node: &NodeProc,
    csi: &mut Csi,
    vol: &str,
) {
    detach(node, csi, vol).await;
    unpublish(cc, vol, &node.id).await;
}

/// The whole volume, read through a device on `node`, is `model`.
async fn contents_are(
    cc: &mut ControllerClient<tonic::transport::Channel>,
    node: &NodeProc,
    csi: &mut Csi,
    vol: &str,
    model: &[u8],
) {
    let dev = publish_and_attach(cc, node, csi, vol).await;
    let got = read_at(&dev, 0, model.len());
    detach_and_unpublish(cc, node, csi, vol).await;
    let first = got.iter().zip(model).position(|(a, b)| a != b);
    assert!(
        first.is_none(),
        "volume {vol} on {} differs from the model at byte {first:?}",
        node.id
    );
}

/// Writes random 4 KiB blocks through `dev` into `model` until `stop`;
/// how many. Every write is flushed (acknowledged durable) before the
/// next; a failed one fails the test (a restarted owner process loses
/// nothing, and the node attaching it waits for it rather than failing).
fn writer(
    dev: std::path::PathBuf,
    model: Arc<Mutex<Vec<u8>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    seed: u64,
) -> std::thread::JoinHandle<usize> {
    writer_counted(dev, model, stop, seed, Arc::default())
}

/// [`writer`], counting in `started` the writes it began: a write the
/// device answered may reach the model only later on a starved machine,
/// so "no write completed since" is checked on this count.
fn writer_counted(
    dev: std::path::PathBuf,
    model: Arc<Mutex<Vec<u8>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    seed: u64,
    started: Arc<std::sync::atomic::AtomicUsize>,
) -> std::thread::JoinHandle<usize> {
    std::thread::spawn(move || {
        let mut rng = common::Rng::new(seed);
        let mut n = 0;
        let blocks = model.lock().unwrap().len() / 4096;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let at = (rng.next() as usize % blocks) * 4096;
            let mut block = vec![0u8; 4096];
            rng.fill(&mut block);
            started.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            write_at(&dev, at as u64, &block)
                .unwrap_or_else(|e| panic!("write {n} at byte {at}: {e}"));
            model.lock().unwrap()[at..at + 4096].copy_from_slice(&block);
            n += 1;
        }
        n
    })
}

/// Stops `w` and waits for it: how many writes it made.
async fn stopped(w: std::thread::JoinHandle<usize>, stop: &std::sync::atomic::AtomicBool) -> usize {
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    tokio::task::spawn_blocking(move || w.join().unwrap())
        .await
        .unwrap()
}

/// Live moves of a volume a pod uses: a writer keeps writing (and
/// flushing) through the device on n1 while the volume moves from its own
/// node n1 to n2 (the device then reaches n2), from n2 to n3 (still
/// remote), and from n3 back to n1 (local again); the device never
/// returns an error, and after each move the whole device equals the
/// model of every acknowledged write, only the new owner holds the volume,
/// and the source held writes once for a short while. At the end, a stage
/// with the publish context from before every move reaches the volume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volumes_in_use_move_live_under_a_writer_and_their_attachment_follows() {
    live_moves(false).await;
}

/// [`volumes_in_use_move_live_under_a_writer_and_their_attachment_follows`],
/// then the controller killed at every step of a live move in turn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_move_is_finished_by_the_next_controller_after_a_crash_at_every_step() {
    live_moves(true).await;
}

async fn live_moves(crash_loop: bool) {
    use csi_proto::cluster::v1::MoveVolumeRequest;
    use csi_proto::cluster::v1::cluster_client::ClusterClient;
    if !runnable() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let tls = root.path().join("tls");
    gen_certs(&tls);
    let nodes = [
        NodeProc::start(root.path(), "n1", &tls),
        NodeProc::start(root.path(), "n2", &tls),
        NodeProc::start(root.path(), "n3", &tls),
    ];
    let agents: Vec<&str> = nodes.iter().map(|n| n.agent.as_str()).collect();
    let mut ctl = ControllerProc::start(root.path(), &agents, &tls);
    let mut cc = ControllerClient::new(c::channel(ctl.csi_socket()).await);
    let mut mc = ClusterClient::new(c::channel(ctl.csi_socket()).await);
    let mut csi1 = Csi::connect(&nodes[0].csi_socket()).await;
    registered(&mut cc, &["n1", "n2", "n3"]).await;

    let size = 16usize << 20;
    let vol = created(
        &mut cc,
        with_requirements(
            c::create("pvc-live", size as i64, c::block_cap()),
            &["n1"],
            &[],
        ),
    )
    .await;
    let id = vol.volume_id.clone();
    // The publish context from before any move: a later stage with it
    // must reach the volume where it is.
    let first_context = cc
        .controller_publish_volume(ControllerPublishVolumeRequest {
            volume_id: id.clone(),
            node_id: "n1".into(),
            volume_capability: Some(c::block_cap()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .publish_context;
    let dev = attach_with(&nodes[0], &mut csi1, &id, first_context.clone()).await;
    let model = Arc::new(Mutex::new(vec![0u8; size]));
    {
        // A base of data to copy first.
        let mut m = model.lock().unwrap();
        common::Rng::new(5).fill(&mut m[..8 << 20]);
        write_at(&dev, 0, &m[..8 << 20]).unwrap();
    }
    for (round, (from, to)) in [("n1", "n2"), ("n2", "n3"), ("n3", "n1")]
        .into_iter()
        .enumerate()
    {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let w = writer(
            dev.clone(),
            Arc::clone(&model),
            Arc::clone(&stop),
            round as u64,
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        let r = mc
            .move_volume(MoveVolumeRequest {
                volume_id: id.clone(),
                node_id: to.into(),
            })
            .await
            .unwrap_or_else(|e| panic!("move {from} -> {to}: {e:?}"))
            .into_inner();
        assert_eq!((r.from_node.as_str(), r.to_node.as_str()), (from, to));
        // Writes go on at the new owner.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let writes = stopped(w, &stop).await;
        assert!(
            writes > 0,
            "the writer wrote nothing around the move {from} -> {to}"
        );
        let got = read_at(&dev, 0, size);
        let first = got
            .iter()
            .zip(model.lock().unwrap().iter())
            .position(|(a, b)| a != b);
        assert!(
            first.is_none(),
            "after the move {from} -> {to} ({writes} writes), the device differs from the model at \
             byte {first:?}"
        );
        for n in &nodes {
            assert_eq!(
                holds(&n.agent, &tls, &id).await,
                n.id == to,
                "after the move {from} -> {to}: node {} holds the volume or not",
                n.id
            );
        }
        let held = common::standalone::metric_value(
            &nodes.iter().find(|n| n.id == from).unwrap().metrics(),
            "strata_volume_move_hold_seconds_count",
        );
        assert!(held >= Some(1.0), "{from} never held writes: {held:?}");
    }
    assert_eq!(
        common::standalone::metric_value(
            &ctl.metrics(),
            "strata_volume_moves_total{kind=\"live\",outcome=\"moved\"}"
        ),
        Some(3.0)
    );

    // The controller killed at every step of a live move (alternately
    // n1 -> n2 and back, the device on n1 written all along): its
    // successor finishes the move (a hold it left ends by its deadline; a
    // sealed copy's attachment waits for the follow), and the device
    // equals the model.
    let mut from = "n1";
    let failpoints = if crash_loop {
        strata::cluster::moves::FAILPOINTS.as_slice()
    } else {
        &[]
    };
    for &fp in failpoints {
        let to = if from == "n1" { "n2" } else { "n1" };
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let w = writer(dev.clone(), Arc::clone(&model), Arc::clone(&stop), 100);
        ctl.proc.kill9();
        ctl.proc.env = vec![("STRATA_FAILPOINT".into(), fp.into())];
        ctl.proc.spawn();
        registered(
            &mut ControllerClient::new(c::channel(ctl.csi_socket()).await),
            &["n1", "n2", "n3"],
        )
        .await;
        let e = ClusterClient::new(c::channel(ctl.csi_socket()).await)
            .move_volume(MoveVolumeRequest {
                volume_id: id.clone(),
                node_id: to.into(),
            })
            .await
            .unwrap_err();
        assert!(
            matches!(
                e.code(),
                Code::Unavailable | Code::Unknown | Code::Cancelled
            ),
            "{fp}: {e:?}"
        );
        ctl.proc.kill9();
        ctl.proc.env.clear();
        ctl.proc.spawn();
        cc = ControllerClient::new(c::channel(ctl.csi_socket()).await);
        registered(&mut cc, &["n1", "n2", "n3"]).await;
        mc = ClusterClient::new(c::channel(ctl.csi_socket()).await);
        let r = loop {
            match mc
                .move_volume(MoveVolumeRequest {
                    volume_id: id.clone(),
                    node_id: to.into(),
                })
                .await
            {
                Ok(r) => break r.into_inner(),
                Err(e) if e.code() == Code::Unavailable => {
                    tokio::time::sleep(Duration::from_millis(200)).await
                }
                Err(e) => panic!("{fp}: {e:?}\n{}", ctl.proc.log()),
            }
        };
        assert_eq!(r.to_node, to, "{fp}");
        let writes = stopped(w, &stop).await;
        assert!(writes > 0, "{fp}");
        let got = read_at(&dev, 0, size);
        let first = got
            .iter()
            .zip(model.lock().unwrap().iter())
            .position(|(a, b)| a != b);
        assert!(
            first.is_none(),
            "{fp}: after the move {from} -> {to}, the device differs from the model at byte \
             {first:?}"
        );
        for n in &nodes {
            assert_eq!(
                holds(&n.agent, &tls, &id).await,
                n.id == to,
                "{fp}: {}",
                n.id
            );
        }
        from = to;
    }

    // Unstaged and staged again on n1 with the context of its first
    // publish (the VolumeAttachment's, from before every move): served
    // from where the volume is now.
    let want = model.lock().unwrap().clone();
    detach(&nodes[0], &mut csi1, &id).await;
    let dev = attach_with(&nodes[0], &mut csi1, &id, first_context).await;
    assert!(
        read_at(&dev, 0, size) == want,
        "staged again with an old context"
    );
    write_at(&dev, 0, &want[..4096]).unwrap();
    detach_and_unpublish(&mut cc, &nodes[0], &mut csi1, &id).await;
    let mut csi2 = Csi::connect(&nodes[1].csi_socket()).await;
    contents_are(&mut cc, &nodes[1], &mut csi2, &id, &want).await;
}

/// A live move of a volume whose owner's machine "rebooted" (another boot
/// ID) while it held a write of the node using the volume, answered and
/// not flushed, and that node stayed idle (it never met the rebooted
/// owner before the switch): its next flush fails, since the write may be
/// gone, and so does every later one, also when the controller died
/// after the seal (the next one asks the source for the seal's boot). The
/// same move without a reboot flushes as before, and so does one whose
/// source reboots after its seal, with the controller dead after the
/// switch (the seal's boot comes from the record).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reboot_of_the_owner_before_a_live_move_fails_the_next_flush() {
    use csi_proto::cluster::v1::MoveVolumeRequest;
    use csi_proto::cluster::v1::cluster_client::ClusterClient;
    if !runnable() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let tls = root.path().join("tls");
    gen_certs(&tls);
    let mut nodes = [
        NodeProc::start(root.path(), "n1", &tls),
        NodeProc::start(root.path(), "n2", &tls),
        NodeProc::start(root.path(), "n3", &tls),
    ];
    let agents: Vec<&str> = nodes.iter().map(|n| n.agent.as_str()).collect();
    let mut ctl = ControllerProc::start(root.path(), &agents, &tls);
    let mut cc = ControllerClient::new(c::channel(ctl.csi_socket()).await);
    let mut csi1 = Csi::connect(&nodes[0].csi_socket()).await;
    registered(&mut cc, &["n1", "n2", "n3"]).await;
    let vol = created(
        &mut cc,
        with_requirements(
            c::create("pvc-reboot", 16 << 20, c::block_cap()),
            &["n2"],
            &[],
        ),
    )
    .await;
    let id = vol.volume_id.clone();
    let fsync = |dev: &Path| {
        let dev = dev.to_path_buf();
        tokio::task::spawn_blocking(move || {
            std::fs::OpenOptions::new()
                .write(true)
                .open(&dev)
                .and_then(|f| f.sync_all())
        })
    };
    // Moves the volume to `to`, the controller killed at failpoint `fp`
    // ("": none) and started again before `meanwhile`'s end; where from
    // (the volume's node when the controller that finished it was asked:
    // `to` if it finished the move at its start).
    async fn moved(
        ctl: &mut ControllerProc,
        id: &str,
        to: &str,
        fp: &str,
        meanwhile: impl Future<Output = ()>,
    ) -> String {
        let socket = ctl.csi_socket();
        let ask = async || {
            ClusterClient::new(c::channel(socket.clone()).await)
                .move_volume(MoveVolumeRequest {
                    volume_id: id.into(),
                    node_id: to.into(),
                })
                .await
        };
        if fp.is_empty() {
            meanwhile.await;
            return ask().await.unwrap().into_inner().from_node;
        }
        let leads = async || {
            let mut cc = ControllerClient::new(c::channel(socket.clone()).await);
            registered(&mut cc, &["n1", "n2", "n3"]).await;
        };
        ctl.proc.kill9();
        ctl.proc.env = vec![("STRATA_FAILPOINT".into(), fp.into())];
        ctl.proc.spawn();
        leads().await;
        let e = ask().await.unwrap_err();
        assert!(
            matches!(
                e.code(),
                Code::Unavailable | Code::Unknown | Code::Cancelled
            ),
            "{fp}: {e:?}"
        );
        assert!(ctl.proc.log().contains(&format!("failpoint {fp}")), "{fp}");
        meanwhile.await;
        ctl.proc.kill9();
        ctl.proc.env.clear();
        ctl.proc.spawn();
        leads().await;
        for _ in 0..300 {
            match ask().await {
                Ok(r) => {
                    assert_eq!(r.get_ref().to_node, to, "{fp}");
                    return r.into_inner().from_node;
                }
                Err(e) if e.code() == Code::Unavailable => {
                    tokio::time::sleep(Duration::from_millis(200)).await
                }
                Err(e) => panic!("{fp}: {e:?}"),
            }
        }
        panic!("{fp}: the move did not end");
    }
    let reboot = |n: &mut NodeProc, boot: &str| {
        n.proc.kill9();
        n.proc.env = vec![("STRATA_TEST_BOOT_ID".into(), boot.into())];
        n.proc.spawn();
        n.wait_for_agent();
    };
    // The flushes fail for that reason: n1 said so for the `times`th time.
    let lost_writes = async |dev: &Path, n1: &NodeProc, times: usize| {
        for _ in 0..2 {
            assert!(
                fsync(dev).await.unwrap().is_err(),
                "a flush after the owner lost writes before the move succeeded"
            );
        }
        assert_eq!(said_lost(n1), times);
    };

    // No reboot.
    let dev = publish_and_attach(&mut cc, &nodes[0], &mut csi1, &id).await;
    common::write_direct(&dev, 0, &[1u8; 4096]);
    assert_eq!(moved(&mut ctl, &id, "n3", "", async {}).await, "n2");
    fsync(&dev).await.unwrap().expect("a flush after a move");

    // n3 reboots before the move.
    common::write_direct(&dev, 4096, &[2u8; 4096]);
    reboot(&mut nodes[2], "boot-2");
    assert_eq!(moved(&mut ctl, &id, "n2", "", async {}).await, "n3");
    lost_writes(&dev, &nodes[0], 1).await;
    assert!(read_at(&dev, 0, 4096) == [1u8; 4096]);

    // Staged anew (nothing lost so far): n2 reboots before the move, and
    // the controller dies after the seal.
    detach_and_unpublish(&mut cc, &nodes[0], &mut csi1, &id).await;
    let dev = publish_and_attach(&mut cc, &nodes[0], &mut csi1, &id).await;
    common::write_direct(&dev, 8192, &[3u8; 4096]);
    reboot(&mut nodes[1], "boot-3");
    let from = moved(&mut ctl, &id, "n3", "cluster::move::sealed", async {}).await;
    assert!(from == "n2" || from == "n3", "{from}");
    lost_writes(&dev, &nodes[0], 2).await;

    // Staged anew: the controller dies after the switch, n3 reboots after
    // its seal, and a read of n1's meets its "moved" refusal; the next
    // controller tells n1 to follow.
    detach_and_unpublish(&mut cc, &nodes[0], &mut csi1, &id).await;
    let dev = publish_and_attach(&mut cc, &nodes[0], &mut csi1, &id).await;
    common::write_direct(&dev, 12288, &[4u8; 4096]);
    let read = {
        let dev = dev.clone();
        move || tokio::task::spawn_blocking(move || read_at(&dev, 12288, 4096))
    };
    let mut reading = None;
    let rebooted = async {
        reboot(&mut nodes[2], "boot-4");
        reading = Some(read());
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let from = moved(&mut ctl, &id, "n2", "cluster::move::switched", rebooted).await;
    assert!(from == "n3" || from == "n2", "{from}");
    assert!(reading.unwrap().await.unwrap() == [4u8; 4096]);
    fsync(&dev)
        .await
        .unwrap()
        .expect("a flush after a move whose source rebooted after its seal");
    assert_eq!(said_lost(&nodes[0]), 2);
}

/// How often node `n` said an owner rebooted with writes it had answered
/// and not flushed.
fn said_lost(n: &NodeProc) -> usize {
    let log = n.proc.log();
    log.matches("the owner rebooted while it held writes it had not flushed")
        .count()
}

/// A volume unpublished from the node that uses it while a live move
/// copies it (its pod deleted), then published to the move's target (the
/// pod rescheduled there): both answer at once rather than after the
/// copy, the move goes on to its end, the attachment made during the copy
/// follows the volume (to the target's own pool), and the volume equals
/// what was written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_unpublished_during_its_live_move_moves_on() {
    use csi_proto::cluster::v1::MoveVolumeRequest;
    use csi_proto::cluster::v1::cluster_client::ClusterClient;
    if !runnable() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let tls = root.path().join("tls");
    gen_certs(&tls);
    let nodes = [
        NodeProc::start(root.path(), "n1", &tls),
        NodeProc::start(root.path(), "n2", &tls),
        NodeProc::start(root.path(), "n3", &tls),
    ];
    let agents: Vec<&str> = nodes.iter().map(|n| n.agent.as_str()).collect();
    let mut ctl = ControllerProc::start(root.path(), &agents, &tls);
    ctl.proc.kill9();
    ctl.proc.add_args(&["--move-rate", "1MiB"]);
    ctl.proc.spawn();
    let mut cc = ControllerClient::new(c::channel(ctl.csi_socket()).await);
    let mut mc = ClusterClient::new(c::channel(ctl.csi_socket()).await);
    let mut csi1 = Csi::connect(&nodes[0].csi_socket()).await;
    registered(&mut cc, &["n1", "n2", "n3"]).await;
    let size = 16usize << 20;
    let vol = created(
        &mut cc,
        with_requirements(
            c::create("pvc-unpublished", size as i64, c::block_cap()),
            &["n2"],
            &[],
        ),
    )
    .await;
    let id = vol.volume_id.clone();
    let dev = publish_and_attach(&mut cc, &nodes[0], &mut csi1, &id).await;
    let mut model = vec![0u8; size];
    common::Rng::new(9).fill(&mut model);
    write_at(&dev, 0, &model).unwrap();

    // 16 MiB at 1 MiB/s: the copy takes seconds.
    let moving = tokio::spawn({
        let id = id.clone();
        async move {
            mc.move_volume(MoveVolumeRequest {
                volume_id: id,
                node_id: "n3".into(),
            })
            .await
        }
    });
    // The target makes the volume once the move is recorded live.
    eventually(30, "the live move copies", async || {
        holds(&nodes[2].agent, &tls, &id).await
    })
    .await;
    detach(&nodes[0], &mut csi1, &id).await;
    let asked = std::time::Instant::now();
    unpublish(&mut cc, &id, "n1").await;
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "the unpublish waited {:?} for the move",
        asked.elapsed()
    );
    let asked = std::time::Instant::now();
    let ctx = cc
        .controller_publish_volume(ControllerPublishVolumeRequest {
            volume_id: id.clone(),
            node_id: "n3".into(),
            volume_capability: Some(c::block_cap()),
            ..Default::default()
        })
        .await
        .expect("a publish during the copy")
        .into_inner()
        .publish_context;
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "the publish waited {:?} for the move",
        asked.elapsed()
    );
    assert_eq!(ctx["strata.dev/owner"], "n2");
    let mut csi3 = Csi::connect(&nodes[2].csi_socket()).await;
    let dev = attach_with(&nodes[2], &mut csi3, &id, ctx).await;
    model[..4096].fill(7);
    write_at(&dev, 0, &model[..4096]).unwrap();
    assert!(
        !moving.is_finished(),
        "the move was over before the publish"
    );
    let r = moving.await.unwrap().expect("the move").into_inner();
    assert_eq!((r.from_node.as_str(), r.to_node.as_str()), ("n2", "n3"));
    // The device reads n3's own pool now.
    model[4096..8192].fill(8);
    write_at(&dev, 4096, &model[4096..8192]).unwrap();
    assert!(read_at(&dev, 0, size) == model, "the device after the move");
    detach_and_unpublish(&mut cc, &nodes[2], &mut csi3, &id).await;
    assert!(!holds(&nodes[1].agent, &tls, &id).await, "n2 kept its copy");
    contents_are(&mut cc, &nodes[0], &mut csi1, &id, &model).await;
}

/// A live move whose source or target node is killed at each of its steps
/// in turn (the volume moving between n2 and n3, used through a device on
/// n1 under a writer): the killed node restarts, the next move call
/// finishes the move, exactly one node holds the volume, and the device
/// equals the model of every acknowledged write. A write whose flush
/// failed (the source restarted while it held that write unflushed, so it
/// may be lost: the device says so) is either there or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_move_survives_a_crash_of_its_source_or_target_at_every_step() {
    use csi_proto::cluster::v1::MoveVolumeRequest;
    use csi_proto::cluster::v1::cluster_client::ClusterClient;
    use strata::agent::{LIVE_MOVE_FAILPOINTS, MoveParty};
    if !runnable() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let tls = root.path().join("tls");
    gen_certs(&tls);
    let mut nodes = [
        NodeProc::start(root.path(), "n1", &tls),
        NodeProc::start(root.path(), "n2", &tls),
        NodeProc::start(root.path(), "n3", &tls),
    ];
    let agents: Vec<&str> = nodes.iter().map(|n| n.agent.as_str()).collect();
    let mut ctl = ControllerProc::start(root.path(), &agents, &tls);
    let mut cc = ControllerClient::new(c::channel(ctl.csi_socket()).await);
    let mc = ClusterClient::new(c::channel(ctl.csi_socket()).await);
    let mut csi1 = Csi::connect(&nodes[0].csi_socket()).await;
    registered(&mut cc, &["n1", "n2", "n3"]).await;

    let size = 16usize << 20;
    let id = created(
        &mut cc,
        with_requirements(
            c::create("pvc-live-crash", size as i64, c::block_cap()),
            &["n2"],
            &[],
        ),
    )
    .await
    .volume_id;
    let dev = publish_and_attach(&mut cc, &nodes[0], &mut csi1, &id).await;
    let model = Arc::new(Mutex::new(vec![0u8; size]));
    {
        let mut m = model.lock().unwrap();
        common::Rng::new(9).fill(&mut m[..8 << 20]);
        write_at(&dev, 0, &m[..8 << 20]).unwrap();
    }
    let mut from = 1;
    for (seed, &(party, fp)) in LIVE_MOVE_FAILPOINTS.iter().enumerate() {
        let to = if from == 1 { 2 } else { 1 };
        let victim = if party == MoveParty::Source { from } else { to };
        let (from_id, to_id) = (nodes[from].id.clone(), nodes[to].id.clone());
        let v = &mut nodes[victim];
        v.proc.kill9();
        v.proc.env = vec![("STRATA_FAILPOINT".into(), fp.into())];
        v.proc.spawn();
        v.wait_for_agent();
        registered(&mut cc, &["n1", "n2", "n3"]).await;

        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let w = writer(
            dev.clone(),
            Arc::clone(&model),
            Arc::clone(&stop),
            200 + seed as u64,
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        let first = tokio::spawn({
            let (mut mc, id, to_id) = (mc.clone(), id.clone(), to_id.clone());
            async move {
                mc.move_volume(MoveVolumeRequest {
                    volume_id: id,
                    node_id: to_id,
                })
                .await
            }
        });
        let v = &mut nodes[victim];
        // A hold waits for rounds small enough, up to 2 minutes.
        let died = tokio::task::block_in_place(|| v.proc.exits_within(Duration::from_secs(150)));
        assert!(
            died,
            "the move {from_id} -> {to_id} never reached {fp} on {}",
            v.id
        );
        assert!(v.proc.log().contains(&format!("failpoint {fp}")), "{fp}");
        v.proc.kill9();
        v.proc.env.clear();
        v.proc.spawn();
        v.wait_for_agent();
        // The call under way ends one way or the other; the next ones
        // finish the move.
        let _ = tokio::time::timeout(Duration::from_secs(150), first)
            .await
            .unwrap_or_else(|_| panic!("{fp}: the move under way never ended"));
        registered(&mut cc, &["n1", "n2", "n3"]).await;
        let mut mc = mc.clone();
        let deadline = Instant::now() + Duration::from_secs(150);
        let r = loop {
            match mc
                .move_volume(MoveVolumeRequest {
                    volume_id: id.clone(),
                    node_id: to_id.clone(),
                })
                .await
            {
                Ok(r) => break r.into_inner(),
                // Waiting for a node, or rolled back: the next call
                // moves it again.
                Err(e)
                    if matches!(
                        e.code(),
                        Code::Unavailable | Code::Aborted | Code::FailedPrecondition
                    ) && Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(200)).await
                }
                Err(e) => panic!("{fp}: {e:?}\n{}", ctl.proc.log()),
            }
        };
        assert_eq!(r.to_node, to_id, "{fp}");
        tokio::time::sleep(Duration::from_millis(200)).await;
        let writes = stopped(w, &stop).await;
        eprintln!("{fp} ({party:?}): moved {from_id} -> {to_id}, {writes} writes");
        assert!(writes > 0, "{fp}");
        matches_model(fp, &dev, &model);
        for n in &nodes {
            assert_eq!(
                holds(&n.agent, &tls, &id).await,
                n.id == to_id,
                "{fp}: after the move {from_id} -> {to_id}, {} holds the volume or not",
                n.id
            );
        }
        // Writes work again.
        write_at(&dev, 0, &model.lock().unwrap()[..4096]).unwrap_or_else(|e| panic!("{fp}: {e}"));
        from = to;
    }

    // The controller dies right after the switch, and the source restarts
    // before the attachment follows: the restarted source is still sealed
    // (it would refuse the held writes as moved), and the writes go to the
    // new owner once the next controller has the attachment follow.
    let to = if from == 1 { 2 } else { 1 };
    let to_id = nodes[to].id.clone();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let w = writer(dev.clone(), Arc::clone(&model), Arc::clone(&stop), 300);
    ctl.proc.kill9();
    ctl.proc.env = vec![("STRATA_FAILPOINT".into(), "cluster::move::switched".into())];
    ctl.proc.spawn();
    cc = ControllerClient::new(c::channel(ctl.csi_socket()).await);
    registered(&mut cc, &["n1", "n2", "n3"]).await;
    let e = ClusterClient::new(c::channel(ctl.csi_socket()).await)
        .move_volume(MoveVolumeRequest {
            volume_id: id.clone(),
            node_id: to_id.clone(),
        })
        .await
        .unwrap_err();
    assert!(
        ctl.proc.log().contains("failpoint cluster::move::switched"),
        "{e:?}"
    );
    let source = &mut nodes[from];
    source.proc.kill9();
    source.proc.spawn();
    source.wait_for_agent();
    let sealed = agent_client(&source.agent, &tls)
        .await
        .track(csi_proto::agent::v1::TrackRequest {
            volume_id: id.clone(),
            node_id: to_id.clone(),
            peek: true,
        })
        .await
        .unwrap()
        .into_inner()
        .sealed;
    assert!(sealed, "the restarted source forgot its seal");
    tokio::time::sleep(Duration::from_millis(500)).await;
    ctl.proc.kill9();
    ctl.proc.env.clear();
    ctl.proc.spawn();
    cc = ControllerClient::new(c::channel(ctl.csi_socket()).await);
    registered(&mut cc, &["n1", "n2", "n3"]).await;
    let mut mc = ClusterClient::new(c::channel(ctl.csi_socket()).await);
    loop {
        match mc
            .move_volume(MoveVolumeRequest {
                volume_id: id.clone(),
                node_id: to_id.clone(),
            })
            .await
        {
            Ok(_) => break,
            Err(e) if e.code() == Code::Unavailable => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(e) => panic!("{e:?}\n{}", ctl.proc.log()),
        }
    }
    assert!(stopped(w, &stop).await > 0);
    matches_model("switched, source restarted", &dev, &model);
    for n in &nodes {
        assert_eq!(holds(&n.agent, &tls, &id).await, n.id == to_id, "{}", n.id);
    }
    detach_and_unpublish(&mut cc, &nodes[0], &mut csi1, &id).await;
}

/// A partition (a node's link down) at the switch of a live move, the
/// volume moving between n2 and n3 and used through a device on n1 under a
/// writer, each node in its own network namespace. The controller dies at
/// the step (its failpoint), the link goes down, and its successor cannot
/// finish the move while the link is down:
/// - the source cut off after it sealed: the successor cannot learn that
///   it did, and neither it nor the target takes the volume's writes;
/// - the target cut off after the switch: the writes wait for it;
/// - the node using the volume cut off after the switch: its writes wait
///   for the link and the follow.
///
/// Once the link is back the move finishes, exactly one node holds the
/// volume, and the device equals the model of every acknowledged write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_at_the_switch_of_a_live_move_leaves_one_owner() {
    use csi_proto::cluster::v1::MoveVolumeRequest;
    use csi_proto::cluster::v1::cluster_client::ClusterClient;
    if !runnable() || common::netns::available().is_err() {
        return;
    }
    let net = Arc::new(common::netns::Net::new(&["n1", "n2", "n3", "ctl"]));
    let root = tempfile::tempdir().unwrap();
    let tls = root.path().join("tls");
    gen_certs(&tls);
    let nodes: Vec<NodeProc> = ["n1", "n2", "n3"]
        .iter()
        .map(|n| NodeProc::start_on(root.path(), n, &tls, &net))
        .collect();
    let agents: Vec<&str> = nodes.iter().map(|n| n.agent.as_str()).collect();
    let mut ctl = ControllerProc::start_on(root.path(), &agents, &tls, &net, "ctl");
    let mut cc = ControllerClient::new(c::channel(ctl.csi_socket()).await);
    let mut csi1 = Csi::connect(&nodes[0].csi_socket()).await;
    registered(&mut cc, &["n1", "n2", "n3"]).await;
    // Whether node `i` holds the volume, asked from the controller's
    // namespace.
    let holder = |i: usize, id: &str| {
        let (net, agent, tls, id) = (
            Arc::clone(&net),
            nodes[i].agent.clone(),
            tls.clone(),
            id.to_string(),
        );
        tokio::task::spawn_blocking(move || {
            net.run_in("ctl", move || {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap()
                    .block_on(holds(&agent, &tls, &id))
            })
        })
    };

    let size = 16usize << 20;
    let id = created(
        &mut cc,
        with_requirements(
            c::create("pvc-partition", size as i64, c::block_cap()),
            &["n2"],
            &[],
        ),
    )
    .await
    .volume_id;
    let dev = publish_and_attach(&mut cc, &nodes[0], &mut csi1, &id).await;
    let model = Arc::new(Mutex::new(vec![0u8; size]));
    {
        let mut m = model.lock().unwrap();
        common::Rng::new(31).fill(&mut m[..4 << 20]);
        write_at(&dev, 0, &m[..4 << 20]).unwrap();
    }
    let mut from = 1;
    for (seed, (step, cut)) in [
        ("cluster::move::sealed", "source"),
        ("cluster::move::switched", "target"),
        ("cluster::move::switched", "user"),
    ]
    .into_iter()
    .enumerate()
    {
        let to = if from == 1 { 2 } else { 1 };
        let (from_id, to_id) = (nodes[from].id.clone(), nodes[to].id.clone());
        let cut_id = match cut {
            "source" => from_id.clone(),
            "target" => to_id.clone(),
            _ => "n1".to_string(),
        };
        let what = format!("{cut} ({cut_id}) cut off at {step}, moving {from_id} -> {to_id}");
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let started = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let w = writer_counted(
            dev.clone(),
            Arc::clone(&model),
            Arc::clone(&stop),
            400 + seed as u64,
            Arc::clone(&started),
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        ctl.proc.kill9();
        ctl.proc.env = vec![("STRATA_FAILPOINT".into(), step.into())];
        ctl.proc.spawn();
        registered(
            &mut ControllerClient::new(c::channel(ctl.csi_socket()).await),
            &["n1", "n2", "n3"],
        )
        .await;
        let e = ClusterClient::new(c::channel(ctl.csi_socket()).await)
            .move_volume(MoveVolumeRequest {
                volume_id: id.clone(),
                node_id: to_id.clone(),
            })
            .await
            .unwrap_err();
        assert!(
            ctl.proc.log().contains(&format!("failpoint {step}")),
            "{what}: {e:?}"
        );
        net.link(&cut_id, false);
        let at_cut = started.load(std::sync::atomic::Ordering::SeqCst);
        ctl.proc.kill9();
        ctl.proc.env.clear();
        ctl.proc.spawn();
        cc = ControllerClient::new(c::channel(ctl.csi_socket()).await);
        let mut mc = ClusterClient::new(c::channel(ctl.csi_socket()).await);
        let during = tokio::spawn({
            let (mut mc, id, to_id) = (mc.clone(), id.clone(), to_id.clone());
            async move {
                mc.move_volume(MoveVolumeRequest {
                    volume_id: id,
                    node_id: to_id,
                })
                .await
            }
        });
        // Sealed, the move cannot be cancelled: a move back to the
        // source, asked during the partition, must not roll it back.
        let cancel = tokio::spawn({
            let (mut mc, id, from_id) = (mc.clone(), id.clone(), from_id.clone());
            async move {
                mc.move_volume(MoveVolumeRequest {
                    volume_id: id,
                    node_id: from_id,
                })
                .await
            }
        });
        tokio::time::sleep(Duration::from_secs(3)).await;
        // The write in flight at the cut may have been answered before
        // it (it then reaches the model late); the writer must not have
        // got past the one after it.
        let during_cut = started.load(std::sync::atomic::Ordering::SeqCst);
        assert!(
            during_cut <= at_cut + 1,
            "{what}: a write completed during the partition ({at_cut} begun at the cut, {during_cut} 3 s later)"
        );
        net.link(&cut_id, true);
        // The calls made during the partition end one way or the other;
        // the next ones finish the move.
        let _ = tokio::time::timeout(Duration::from_secs(150), during)
            .await
            .unwrap_or_else(|_| panic!("{what}: the move under way never ended"));
        let cancelled = tokio::time::timeout(Duration::from_secs(150), cancel)
            .await
            .unwrap_or_else(|_| panic!("{what}: the cancel never ended"))
            .unwrap();
        assert!(
            !cancelled
                .as_ref()
                .is_ok_and(|r| r.get_ref().to_node == from_id),
            "{what}: a sealed move was rolled back: {cancelled:?}"
        );
        let deadline = Instant::now() + Duration::from_secs(150);
        loop {
            match mc
                .move_volume(MoveVolumeRequest {
                    volume_id: id.clone(),
                    node_id: to_id.clone(),
                })
                .await
            {
                Ok(r) => {
                    assert_eq!(r.into_inner().to_node, to_id, "{what}");
                    break;
                }
                Err(e) if e.code() == Code::Unavailable && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await
                }
                Err(e) => panic!("{what}: {e:?}\n{}", ctl.proc.log()),
            }
        }
        // Writes go on once the link is back: one begun after the check
        // above completes (the writer begins the next).
        let deadline = Instant::now() + Duration::from_secs(60);
        while started.load(std::sync::atomic::Ordering::SeqCst) < during_cut + 2 {
            assert!(
                Instant::now() < deadline,
                "{what}: no write completed after the partition"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        stopped(w, &stop).await;
        matches_model(&what, &dev, &model);
        for (i, n) in nodes.iter().enumerate() {
            assert_eq!(
                holder(i, &id).await.unwrap(),
                i == to,
                "{what}: {} holds the volume or not",
                n.id
            );
        }
        from = to;
    }
    detach_and_unpublish(&mut cc, &nodes[0], &mut csi1, &id).await;
}

/// The device `dev` equals `model`.
fn matches_model(what: &str, dev: &Path, model: &Mutex<Vec<u8>>) {
    let m = model.lock().unwrap();
    let got = read_at(dev, 0, m.len());
    let differs = got.iter().zip(m.iter()).position(|(a, b)| a != b);
    assert!(
        differs.is_none(),
        "{what}: the device differs from the model at byte {differs:?}"
    );
}

/// `dataLocality: best-effort`: a volume its pod uses from another node
/// moves there by itself, live, under a writer, and the device equals the
/// model; a volume of a class without it stays where it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volumes_with_data_locality_move_to_the_node_that_uses_them() {
    if !runnable() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    // A certificate per process: the moves and the follow work with
    // them (`tls` is the controller's, for looking at what nodes hold).
    let certs = root.path().join("tls");
    gen_certs_per_process(&certs, &["n1", "n2"]);
    let tls = certs.join("controller");
    let n1 = NodeProc::start(root.path(), "n1", &certs.join("nodes/n1"));
    let n2 = NodeProc::start(root.path(), "n2", &certs.join("nodes/n2"));
    let mut ctl = ControllerProc::start(root.path(), &[&n1.agent, &n2.agent], &tls);
    ctl.proc.kill9();
    ctl.proc.add_args(&["--locality-delay-seconds", "1"]);
    ctl.proc.spawn();
    let mut cc = ControllerClient::new(c::channel(ctl.csi_socket()).await);
    let mut csi2 = Csi::connect(&n2.csi_socket()).await;
    registered(&mut cc, &["n1", "n2"]).await;
    let size = 8usize << 20;
    let make = |name: &str, locality: bool| {
        let mut req = with_requirements(c::create(name, size as i64, c::block_cap()), &["n1"], &[]);
        // What the provisioner's --extra-create-metadata adds: the claim,
        // which Events are about.
        req.parameters
            .insert("csi.storage.k8s.io/pvc/namespace".into(), "apps".into());
        req.parameters
            .insert("csi.storage.k8s.io/pvc/name".into(), name.into());
        if locality {
            req.parameters
                .insert("dataLocality".into(), "best-effort".into());
        }
        req
    };
    let bad = cc
        .create_volume({
            let mut r = make("pvc-contradiction", true);
            r.parameters.insert("locality".into(), "node".into());
            r
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument, "{bad:?}");
    let follows = created(&mut cc, make("pvc-follows", true)).await.volume_id;
    let stays = created(&mut cc, make("pvc-stays", false)).await.volume_id;
    let dev = publish_and_attach(&mut cc, &n2, &mut csi2, &follows).await;
    let other = publish_and_attach(&mut cc, &n2, &mut csi2, &stays).await;
    let model = Arc::new(Mutex::new(vec![0u8; size]));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let w = writer(dev.clone(), Arc::clone(&model), Arc::clone(&stop), 7);
    eventually_or(
        60,
        "the volume moves to the node that uses it",
        async || holds(&n2.agent, &tls, &follows).await && !holds(&n1.agent, &tls, &follows).await,
        || ctl.proc.log(),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let writes = stopped(w, &stop).await;
    assert!(writes > 0);
    assert!(
        read_at(&dev, 0, size) == *model.lock().unwrap(),
        "the device differs from the model"
    );
    write_at(&other, 0, &[1u8; 4096]).unwrap();
    assert!(holds(&n1.agent, &tls, &stays).await && !holds(&n2.agent, &tls, &stays).await);
    // Outside Kubernetes, the claim's Events are lines in the log.
    let log = ctl.proc.log();
    for reason in ["Placed", "Moving", "Moved"] {
        assert!(
            log.lines().any(|l| l.contains("claim=apps/pvc-follows")
                && l.contains(&format!("reason=\"{reason}\""))),
            "no {reason} event for the claim:\n{log}"
        );
    }
    assert!(
        log.lines()
            .any(|l| l.contains("reason=\"Moved\"") && l.contains("while in use")),
        "{log}"
    );
    assert!(!log.contains("claim=apps/pvc-stays reason=\"Mov"), "{log}");
    assert_eq!(
        common::standalone::metric_value(
            &ctl.metrics(),
            "strata_volume_moves_total{kind=\"live\",outcome=\"moved\"}"
        ),
        Some(1.0)
    );
    detach_and_unpublish(&mut cc, &n2, &mut csi2, &follows).await;
    detach_and_unpublish(&mut cc, &n2, &mut csi2, &stays).await;
}

/// Moves between nodes of volumes no pod uses: the data arrives whole (a
/// model of the volume is compared after every move), only data extents
/// cross, the source's copy is gone, and `strata volume move` says so. A
/// pinned volume does not move. The controller killed at
/// every step of a move, and the target killed in the middle of the
/// copy: the move finishes, by the next leader or the next call. A drain
/// moves what can move and says why the rest stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_volumes_move_between_nodes_across_crashes_at_every_step() {
    use csi_proto::cluster::v1::cluster_client::ClusterClient;
    use csi_proto::cluster::v1::{DrainNodeRequest, MoveVolumeRequest};
    if !runnable() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let tls = root.path().join("tls");
    gen_certs(&tls);
    let n1 = NodeProc::start(root.path(), "n1", &tls);
    let mut n2 = NodeProc::start(root.path(), "n2", &tls);
    let mut ctl = ControllerProc::start(root.path(), &[&n1.agent, &n2.agent], &tls);
    let mut cc = ControllerClient::new(c::channel(ctl.csi_socket()).await);
    let mut csi1 = Csi::connect(&n1.csi_socket()).await;
    let mut csi2 = Csi::connect(&n2.csi_socket()).await;
    registered(&mut cc, &["n1", "n2"]).await;

    // 16 MiB with 6 MiB of data in three runs, written through a device
    // on its own node n1.
    let size = 16 << 20;
    let vol = created(
        &mut cc,
        with_requirements(c::create("pvc-moving", size, c::block_cap()), &["n1"], &[]),
    )
    .await;
    let id = vol.volume_id.clone();
    let mut model = vec![0u8; size as usize];
    let mut rng = common::Rng::new(11);
    {
        let dev = publish_and_attach(&mut cc, &n1, &mut csi1, &id).await;
        for (at, len) in [
            (0usize, 1 << 20),
            (3 << 20, 4 << 20),
            ((15 << 20) + 4096, 1 << 20),
        ] {
            let len = len.min(size as usize - at);
            rng.fill(&mut model[at..at + len]);
            write_at(&dev, at as u64, &model[at..at + len]).unwrap();
        }
        detach_and_unpublish(&mut cc, &n1, &mut csi1, &id).await;
    }
    let written = (6 << 20) - 4096;

    // The move, with the CLI: only the data crossed.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_strata"))
        .args([
            "volume",
            "move",
            &id,
            "--to",
            "n2",
            "-o",
            "json",
            "--endpoint",
        ])
        .arg(format!("unix://{}", ctl.csi_socket().display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let moved: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(moved["from"], "n1", "{moved}");
    assert_eq!(moved["to"], "n2", "{moved}");
    assert_eq!(moved["copied_bytes"], written, "{moved}");
    assert!(
        !holds(&n1.agent, &tls, &id).await,
        "the source's copy stayed"
    );
    let m = ctl.metrics();
    for (metric, want) in [
        (
            "strata_volume_moves_total{kind=\"copy_first\",outcome=\"moved\"}",
            1.0,
        ),
        ("strata_volume_move_copied_bytes_total", written as f64),
    ] {
        assert_eq!(
            common::standalone::metric_value(&m, metric),
            Some(want),
            "{metric}\n{m}"
        );
    }
    contents_are(&mut cc, &n2, &mut csi2, &id, &model).await;
    // Read on n1, now remotely from n2.
    contents_are(&mut cc, &n1, &mut csi1, &id, &model).await;
    let m = n2.metrics();
    assert!(
        common::standalone::metric_value(
            &m,
            "strata_peer_bytes_total{peer=\"n1\",direction=\"received\"}"
        )
        .unwrap_or(0.0)
            >= written as f64,
        "{m}"
    );

    // Killed at every step of a move (alternately n2 → n1 and back), the
    // controller's successor finishes it; the contents are the model's.
    let mut from = "n2";
    for fp in strata::cluster::moves::FAILPOINTS {
        let to = if from == "n1" { "n2" } else { "n1" };
        ctl.proc.kill9();
        ctl.proc.env = vec![("STRATA_FAILPOINT".into(), fp.into())];
        ctl.proc.spawn();
        let mut mc = ClusterClient::new(c::channel(ctl.csi_socket()).await);
        let mut cc2 = ControllerClient::new(c::channel(ctl.csi_socket()).await);
        registered(&mut cc2, &["n1", "n2"]).await;
        let e = mc
            .move_volume(MoveVolumeRequest {
                volume_id: id.clone(),
                node_id: to.into(),
            })
            .await
            .unwrap_err();
        assert!(
            matches!(
                e.code(),
                Code::Unavailable | Code::Unknown | Code::Cancelled
            ),
            "{fp}: {e:?}"
        );
        ctl.proc.kill9();
        ctl.proc.env.clear();
        ctl.proc.spawn();
        cc = ControllerClient::new(c::channel(ctl.csi_socket()).await);
        registered(&mut cc, &["n1", "n2"]).await;
        let mut mc = ClusterClient::new(c::channel(ctl.csi_socket()).await);
        let r = loop {
            match mc
                .move_volume(MoveVolumeRequest {
                    volume_id: id.clone(),
                    node_id: to.into(),
                })
                .await
            {
                Ok(r) => break r.into_inner(),
                // The node the move waits for is not registered yet.
                Err(e) if e.code() == Code::Unavailable => {
                    tokio::time::sleep(Duration::from_millis(200)).await
                }
                Err(e) => panic!("{fp}: {e:?}\n{}", ctl.proc.log()),
            }
        };
        assert_eq!(r.to_node, to, "{fp}");
        let (src, dst) = if to == "n1" { (&n2, &n1) } else { (&n1, &n2) };
        assert!(holds(&dst.agent, &tls, &id).await, "{fp}");
        assert!(
            !holds(&src.agent, &tls, &id).await,
            "{fp}: the source kept its copy"
        );
        let (dcsi, ocsi) = if to == "n1" {
            (&mut csi1, &mut csi2)
        } else {
            (&mut csi2, &mut csi1)
        };
        contents_are(&mut cc, dst, dcsi, &id, &model).await;
        let other = if to == "n1" { &n2 } else { &n1 };
        contents_are(&mut cc, other, ocsi, &id, &model).await;
        from = to;
    }
    let mut mc = ClusterClient::new(c::channel(ctl.csi_socket()).await);

    // The target killed in the middle of the copy: the move fails, and
    // the next call finishes it.
    let to = if from == "n1" { "n2" } else { "n1" };
    assert_eq!(to, "n2", "the loop ends on n1");
    n2.proc.kill9();
    n2.proc.env = vec![(
        "STRATA_FAILPOINT".into(),
        "agent::import::after_chunk".into(),
    )];
    n2.proc.spawn();
    n2.wait_for_agent();
    eventually(30, "n2 ready again", async || {
        capacity(&mut cc, "n2").await > 0
    })
    .await;
    let e = mc
        .move_volume(MoveVolumeRequest {
            volume_id: id.clone(),
            node_id: "n2".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(
        n2.proc
            .log()
            .contains("failpoint agent::import::after_chunk")
    );
    n2.proc.kill9();
    n2.proc.env.clear();
    n2.proc.spawn();
    n2.wait_for_agent();
    csi2 = Csi::connect(&n2.csi_socket()).await;
    let r = loop {
        match mc
            .move_volume(MoveVolumeRequest {
                volume_id: id.clone(),
                node_id: "n2".into(),
            })
            .await
        {
            Ok(r) => break r.into_inner(),
            Err(e) if e.code() == Code::Unavailable => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(e) => panic!("{e:?}\n{}", ctl.proc.log()),
        }
    };
    assert_eq!((r.from_node.as_str(), r.to_node.as_str()), ("n1", "n2"));
    assert_eq!(r.copied_bytes, written);
    contents_are(&mut cc, &n2, &mut csi2, &id, &model).await;
    assert!(!holds(&n1.agent, &tls, &id).await);

    // A drain of n2: the idle volume moves, a published one moves live, a
    // pinned one stays, with why, and so does a snapshot.
    let busy = created(
        &mut cc,
        with_requirements(c::create("pvc-busy", size, c::block_cap()), &["n2"], &[]),
    )
    .await
    .volume_id;
    let dev = publish_and_attach(&mut cc, &n1, &mut csi1, &busy).await;
    let pinned_vol = created(
        &mut cc,
        pinned(with_requirements(
            c::create("pvc-pinned", size, c::block_cap()),
            &["n2"],
            &[],
        )),
    )
    .await
    .volume_id;
    let snap = cc
        .create_snapshot(c::snapshot("snap-on-drained", &pinned_vol, false))
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap()
        .snapshot_id;
    let drained = mc
        .drain_node(DrainNodeRequest {
            node_id: "n2".into(),
            undo: false,
        })
        .await
        .unwrap()
        .into_inner();
    let mut moved: Vec<&str> = drained.moved.iter().map(|m| m.volume_id.as_str()).collect();
    moved.sort_unstable();
    let mut want = [id.as_str(), busy.as_str()];
    want.sort_unstable();
    assert_eq!(moved, want, "{drained:?}");
    let why: HashMap<&str, &str> = drained
        .stayed
        .iter()
        .map(|s| {
            let id = if s.snapshot_id.is_empty() {
                &s.volume_id
            } else {
                &s.snapshot_id
            };
            (id.as_str(), s.why.as_str())
        })
        .collect();
    assert_eq!(why.len(), 1, "{why:?}");
    assert!(why[pinned_vol.as_str()].contains("pinned"), "{why:?}");
    // The snapshot moves though its volume stays (see
    // a_drain_moves_snapshots_sharing_their_layers_across_crashes_at_every_step).
    let snaps: Vec<_> = drained
        .moved_snapshots
        .iter()
        .map(|m| (m.snapshot_id.as_str(), m.to_node.as_str()))
        .collect();
    assert_eq!(snaps, [(snap.as_str(), "n1")], "{drained:?}");
    for v in [&id, &busy] {
        assert!(holds(&n1.agent, &tls, v).await && !holds(&n2.agent, &tls, v).await);
    }
    // The published one moved live to the node using it, and kept
    // working through it.
    write_at(&dev, 0, &[5u8; 4096]).unwrap();
    assert!(read_at(&dev, 0, 4096) == [5u8; 4096]);
    detach_and_unpublish(&mut cc, &n1, &mut csi1, &busy).await;
    contents_are(&mut cc, &n1, &mut csi1, &id, &model).await;

    // Draining, n2 takes no new volume, also after a controller restart;
    // undrained (with the CLI), it does again.
    ctl.proc.kill9();
    ctl.proc.spawn();
    cc = ControllerClient::new(c::channel(ctl.csi_socket()).await);
    registered(&mut cc, &["n1"]).await;
    let e = cc
        .create_volume(with_requirements(
            c::create("pvc-on-drained", size, c::block_cap()),
            &["n2"],
            &[],
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("n2 (draining"), "{e:?}");
    assert_eq!(
        capacity(&mut cc, "n2").await,
        0,
        "a draining node has no room"
    );
    let anywhere = created(
        &mut cc,
        c::create("pvc-not-on-drained", size, c::block_cap()),
    )
    .await;
    assert!(holds(&n1.agent, &tls, &anywhere.volume_id).await);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(["node", "undrain", "n2", "--endpoint"])
        .arg(format!("unix://{}", ctl.csi_socket().display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    registered(&mut cc, &["n2"]).await;
    created(
        &mut cc,
        with_requirements(
            c::create("pvc-on-drained", size, c::block_cap()),
            &["n2"],
            &[],
        ),
    )
    .await;
}

/// Whether the agent at `agent` has snapshot `id`.
async fn has_snapshot(agent: &str, tls: &Path, id: &str) -> bool {
    let r = agent_client(agent, tls)
        .await
        .get_snapshot(csi_proto::agent::v1::GetSnapshotRequest {
            snapshot_id: id.into(),
        })
        .await;
    match r {
        Ok(_) => true,
        Err(e) if e.code() == Code::NotFound => false,
        Err(e) => panic!("GetSnapshot on {agent}: {e:?}"),
    }
}

/// `strata node drain NODE -o json`, which must exit 0; its answer as the
/// Cluster service's.
fn drain_cli(ctl: &ControllerProc, node: &str) -> csi_proto::cluster::v1::DrainNodeReply {
    use csi_proto::cluster::v1::{DrainNodeReply, MoveVolumeReply, MovedSnapshot};
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(["node", "drain", node, "-o", "json", "--endpoint"])
        .arg(format!("unix://{}", ctl.csi_socket().display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let text = |v: &serde_json::Value, k: &str| v[k].as_str().unwrap().to_string();
    let list = |k: &str| j[k].as_array().unwrap().clone();
    assert!(
        list("stayed").is_empty() && list("snapshots_stayed").is_empty(),
        "{j}"
    );
    DrainNodeReply {
        moved: list("moved")
            .iter()
            .map(|m| MoveVolumeReply {
                volume_id: text(m, "volume"),
                from_node: text(m, "from"),
                to_node: text(m, "to"),
                copied_bytes: m["copied_bytes"].as_u64().unwrap(),
                ..Default::default()
            })
            .collect(),
        stayed: Vec::new(),
        moved_snapshots: list("snapshots_moved")
            .iter()
            .map(|m| MovedSnapshot {
                snapshot_id: text(m, "snapshot"),
                from_node: text(m, "from"),
                to_node: text(m, "to"),
                copied_bytes: m["copied_bytes"].as_u64().unwrap(),
                base_snapshot_id: text(m, "base"),
            })
            .collect(),
    }
}

/// `strata volume move VOL --to NODE -o json`, which must exit 0; its
/// answer.
fn move_cli(ctl: &ControllerProc, vol: &str, to: &str) -> serde_json::Value {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_strata"))
        .args([
            "volume",
            "move",
            vol,
            "--to",
            to,
            "-o",
            "json",
            "--endpoint",
        ])
        .arg(format!("unix://{}", ctl.csi_socket().display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A volume on n2 with three snapshots, each a few changes after the
/// last (new data, and zeros over data), and changes after the last.
/// Drains move the volume and its snapshots back and forth between n1 and
/// n2: the first snapshot sends its data, each later one only what
/// changed since the one before, the volume only what changed since the
/// last one, and all keep their history there (a delta between two of
/// them is what it was), also when a pod uses the volume (a live move).
/// Then the controller is killed at every step of a snapshot's move in
/// turn; its successor (and the next drain) finishes the moves. After
/// every drain each snapshot is on the target alone, restores there to
/// its model, and no carrier volume is left on either node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_moves_snapshots_sharing_their_layers_across_crashes_at_every_step() {
    use csi_proto::agent::v1::{ByteRange, SnapshotRangesRequest};
    use csi_proto::cluster::v1::DrainNodeRequest;
    use csi_proto::cluster::v1::cluster_client::ClusterClient;
    if !runnable() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let tls = root.path().join("tls");
    gen_certs(&tls);
    let n1 = NodeProc::start(root.path(), "n1", &tls);
    let n2 = NodeProc::start(root.path(), "n2", &tls);
    let mut ctl = ControllerProc::start(root.path(), &[&n1.agent, &n2.agent], &tls);
    let mut cc = ControllerClient::new(c::channel(ctl.csi_socket()).await);
    let mut csi1 = Csi::connect(&n1.csi_socket()).await;
    let mut csi2 = Csi::connect(&n2.csi_socket()).await;
    registered(&mut cc, &["n1", "n2"]).await;

    let size = 16usize << 20;
    let vol = created(
        &mut cc,
        with_requirements(
            c::create("pvc-snaps", size as i64, c::block_cap()),
            &["n2"],
            &[],
        ),
    )
    .await
    .volume_id;
    // (offset, length, zeros) per snapshot; changes far enough apart that
    // a copy reads none of the blocks between them.
    let rounds: [&[(usize, usize, bool)]; 3] = [
        &[(0, 4 << 20, false)],
        &[
            (1 << 20, 256 << 10, false),
            (3 << 20, 64 << 10, true),
            (8 << 20, 128 << 10, false),
        ],
        &[(2 << 20, 512 << 10, false), (12 << 20, 4096, false)],
    ];
    let mut rng = common::Rng::new(23);
    let mut model = vec![0u8; size];
    let (mut snaps, mut models) = (Vec::new(), Vec::new());
    let dev = publish_and_attach(&mut cc, &n2, &mut csi2, &vol).await;
    for (i, round) in rounds.iter().enumerate() {
        for &(at, len, zeros) in *round {
            if zeros {
                model[at..at + len].fill(0);
            } else {
                rng.fill(&mut model[at..at + len]);
            }
            write_at(&dev, at as u64, &model[at..at + len]).unwrap();
        }
        let s = cc
            .create_snapshot(c::snapshot(&format!("snap-{i}"), &vol, false))
            .await
            .unwrap()
            .into_inner()
            .snapshot
            .unwrap()
            .snapshot_id;
        snaps.push(s);
        models.push(model.clone());
    }
    // And the volume changes after the last one.
    let after = (5usize << 20, 64usize << 10);
    rng.fill(&mut model[after.0..after.0 + after.1]);
    write_at(&dev, after.0 as u64, &model[after.0..after.0 + after.1]).unwrap();
    detach_and_unpublish(&mut cc, &n2, &mut csi2, &vol).await;
    let changed = |i: usize| rounds[i].iter().map(|&(_, len, _)| len as u64).sum::<u64>();

    // Each snapshot is on `to` alone, with no carrier anywhere, and
    // restores there to its model; the volume is there too.
    let nodes = [&n1, &n2];
    async fn drain(
        mc: &mut ClusterClient<tonic::transport::Channel>,
        node: &str,
        undo: bool,
    ) -> csi_proto::cluster::v1::DrainNodeReply {
        loop {
            match mc
                .drain_node(DrainNodeRequest {
                    node_id: node.into(),
                    undo,
                })
                .await
            {
                Ok(r) => return r.into_inner(),
                // A node the drain needs is not registered yet.
                Err(e) if e.code() == Code::Unavailable => {
                    tokio::time::sleep(Duration::from_millis(200)).await
                }
                Err(e) => panic!("drain {node}: {e:?}"),
            }
        }
    }
    let mut from = "n2";
    let crashes = [None, None]
        .into_iter()
        .chain(strata::cluster::moves::SNAPSHOT_FAILPOINTS.map(Some));
    for (round, fp) in crashes.enumerate() {
        let to = if from == "n1" { "n2" } else { "n1" };
        if let Some(fp) = fp {
            ctl.proc.kill9();
            ctl.proc.env = vec![("STRATA_FAILPOINT".into(), fp.into())];
            ctl.proc.spawn();
            // `to` was drained last round: it has no room until undrained.
            let mut cc2 = ControllerClient::new(c::channel(ctl.csi_socket()).await);
            registered(&mut cc2, &[from]).await;
            let mut mc = ClusterClient::new(c::channel(ctl.csi_socket()).await);
            drain(&mut mc, to, true).await;
            registered(&mut cc2, &[to]).await;
            let e = mc
                .drain_node(DrainNodeRequest {
                    node_id: from.into(),
                    undo: false,
                })
                .await
                .unwrap_err();
            assert!(
                matches!(
                    e.code(),
                    Code::Unavailable | Code::Unknown | Code::Cancelled
                ),
                "{fp}: {e:?}"
            );
            assert!(ctl.proc.log().contains(&format!("failpoint {fp}")), "{fp}");
            ctl.proc.kill9();
            ctl.proc.env.clear();
            ctl.proc.spawn();
            // `from` is draining already.
            cc = ControllerClient::new(c::channel(ctl.csi_socket()).await);
            registered(&mut cc, &[to]).await;
            if fp == strata::cluster::moves::SNAPSHOT_FAILPOINTS[1] {
                // A drain of the target of the move cut short (or finished
                // meanwhile by the new leader): with both nodes draining,
                // no snapshot is said to have moved (to the node being
                // drained), each is on one node, and those on the target
                // stay, with why.
                let mut mc = ClusterClient::new(c::channel(ctl.csi_socket()).await);
                let d = drain(&mut mc, to, false).await;
                assert!(d.moved_snapshots.is_empty(), "{d:?}");
                let target = if to == "n1" { &n1 } else { &n2 };
                for s in &snaps {
                    let on = [
                        has_snapshot(&n1.agent, &tls, s).await,
                        has_snapshot(&n2.agent, &tls, s).await,
                    ];
                    assert!(on[0] != on[1], "snapshot {s} on n1, n2: {on:?}");
                    let stays = d.stayed.iter().any(|t| &t.snapshot_id == s);
                    assert_eq!(
                        has_snapshot(&target.agent, &tls, s).await,
                        stays,
                        "{s}: {d:?}"
                    );
                }
            }
        }
        let mut mc = ClusterClient::new(c::channel(ctl.csi_socket()).await);
        drain(&mut mc, to, true).await;
        registered(&mut cc, &[to]).await;
        // In the second round a pod on n1 uses the volume: it moves live.
        let dev = if round == 1 {
            Some(publish_and_attach(&mut cc, &n1, &mut csi1, &vol).await)
        } else {
            None
        };
        // The first round with the CLI (which exits 0: nothing stays).
        let d = if round == 0 {
            drain_cli(&ctl, from)
        } else {
            drain(&mut mc, from, false).await
        };
        assert!(d.stayed.is_empty(), "round {round}: {d:?}");
        if let Some(dev) = dev {
            assert_eq!(read_at(&dev, 0, size), model, "round {round}");
            rng.fill(&mut model[after.0..after.0 + 4096]);
            write_at(&dev, after.0 as u64, &model[after.0..after.0 + 4096]).unwrap();
            detach_and_unpublish(&mut cc, &n1, &mut csi1, &vol).await;
        }
        if fp.is_none() {
            // The first sends all of its data, each later one only what
            // changed since the one before, also when they move again.
            let got: Vec<_> = d
                .moved_snapshots
                .iter()
                .map(|m| {
                    (
                        m.snapshot_id.as_str(),
                        m.to_node.as_str(),
                        m.copied_bytes,
                        m.base_snapshot_id.as_str(),
                    )
                })
                .collect();
            let want: Vec<_> = (0..3)
                .map(|i| {
                    (
                        snaps[i].as_str(),
                        to,
                        changed(i),
                        if i == 0 { "" } else { snaps[i - 1].as_str() },
                    )
                })
                .collect();
            assert_eq!(got, want, "round {round}");
            // Their history is kept there: a delta is what it was.
            let target = if to == "n1" { &n1 } else { &n2 };
            let page = agent_client(&target.agent, &tls)
                .await
                .snapshot_ranges(SnapshotRangesRequest {
                    snapshot_id: snaps[2].clone(),
                    base_snapshot_id: snaps[1].clone(),
                    max_results: 100,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            let want: Vec<_> = rounds[2]
                .iter()
                .map(|&(offset, length, _)| ByteRange {
                    offset: offset as u64,
                    length: length as u64,
                })
                .collect();
            assert_eq!(page.ranges, want, "round {round}");
            // The volume went after them, sending only what changed since
            // the last one, and keeps that history too.
            let got: Vec<_> = d
                .moved
                .iter()
                .map(|m| (m.volume_id.as_str(), m.to_node.as_str(), m.copied_bytes))
                .collect();
            assert_eq!(got, [(vol.as_str(), to, after.1 as u64)], "round {round}");
            let page = agent_client(&target.agent, &tls)
                .await
                .snapshot_ranges(SnapshotRangesRequest {
                    volume_id: vol.clone(),
                    base_snapshot_id: snaps[2].clone(),
                    max_results: 100,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            let want = [ByteRange {
                offset: after.0 as u64,
                length: after.1 as u64,
            }];
            assert_eq!(page.ranges, want, "round {round}");
        }
        for (i, s) in snaps.iter().enumerate() {
            for n in nodes {
                assert_eq!(
                    has_snapshot(&n.agent, &tls, s).await,
                    n.id == to,
                    "round {round} ({fp:?}): snapshot {i} on {}",
                    n.id
                );
                let carrier = strata::cluster::moves::carrier(s.parse().unwrap()).to_string();
                assert!(
                    !holds(&n.agent, &tls, &carrier).await,
                    "round {round}: a carrier on {}",
                    n.id
                );
            }
            let restored = created(
                &mut cc,
                pinned(c::create_from(
                    &format!("restore-{round}-{i}"),
                    size as i64,
                    c::block_cap(),
                    Type::Snapshot(SnapshotSource {
                        snapshot_id: s.clone(),
                    }),
                )),
            )
            .await;
            assert_eq!(node_of(&restored), to, "round {round}");
            let (node, csi) = if to == "n1" {
                (&n1, &mut csi1)
            } else {
                (&n2, &mut csi2)
            };
            contents_are(&mut cc, node, csi, &restored.volume_id, &models[i]).await;
            cc.delete_volume(DeleteVolumeRequest {
                volume_id: restored.volume_id,
                ..Default::default()
            })
            .await
            .unwrap();
        }
        // As the records have them, wherever they are now.
        for s in &snaps {
            let got = cc
                .get_snapshot(GetSnapshotRequest {
                    snapshot_id: s.clone(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .snapshot
                .unwrap();
            assert_eq!(got.source_volume_id, vol, "round {round}");
        }
        let (node, csi) = if to == "n1" {
            (&n1, &mut csi1)
        } else {
            (&n2, &mut csi2)
        };
        assert!(holds(&node.agent, &tls, &vol).await, "round {round}");
        contents_are(&mut cc, node, csi, &vol, &model).await;
        from = to;
        if round == 1 {
            // Moved with `strata volume move` (there and back), the
            // volume takes its snapshots along the same way: each sends
            // only what changed since the one before, the volume only what
            // changed since the last, and a delta between a moved snapshot
            // and one taken now is what changed (here, after the rounds
            // without crashes: the leader's resume after a crash finishes
            // a snapshot's move, removing its source copy, so the next one
            // of that volume finds no base there and goes whole).
            let other = if from == "n1" { "n2" } else { "n1" };
            drain(&mut mc, other, true).await;
            registered(&mut cc, &[other]).await;
            for to in [other, from] {
                let j = move_cli(&ctl, &vol, to);
                let got: Vec<_> = j["snapshots_moved"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|m| {
                        (
                            m["snapshot"].as_str().unwrap().to_string(),
                            m["to"].as_str().unwrap().to_string(),
                            m["copied_bytes"].as_u64().unwrap(),
                            m["base"].as_str().unwrap().to_string(),
                        )
                    })
                    .collect();
                let want: Vec<_> = (0..3)
                    .map(|i| {
                        (
                            snaps[i].clone(),
                            to.to_string(),
                            changed(i),
                            if i == 0 {
                                String::new()
                            } else {
                                snaps[i - 1].clone()
                            },
                        )
                    })
                    .collect();
                assert_eq!(got, want, "{j}");
                assert_eq!(j["to"], to, "{j}");
                assert_eq!(j["copied_bytes"], after.1 as u64, "{j}");
                assert!(j["snapshots_stayed"].as_array().unwrap().is_empty(), "{j}");
                for (i, s) in snaps.iter().enumerate() {
                    for n in nodes {
                        assert_eq!(
                            has_snapshot(&n.agent, &tls, s).await,
                            n.id == to,
                            "moved to {to}: snapshot {i} on {}",
                            n.id
                        );
                    }
                }
            }
            let fresh = cc
                .create_snapshot(c::snapshot("snap-after", &vol, false))
                .await
                .unwrap()
                .into_inner()
                .snapshot
                .unwrap()
                .snapshot_id;
            let mut meta = SnapshotMetadataClient::new(c::channel(ctl.csi_socket()).await);
            let mut stream = meta
                .get_metadata_delta(GetMetadataDeltaRequest {
                    base_snapshot_id: snaps[2].clone(),
                    target_snapshot_id: fresh.clone(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            let mut blocks = Vec::new();
            while let Some(r) = stream.message().await.unwrap() {
                blocks.extend(
                    r.block_metadata
                        .iter()
                        .map(|b| (b.byte_offset, b.size_bytes)),
                );
            }
            let want = [(after.0 as i64, after.1 as i64)];
            assert_eq!(blocks, want);
            snaps.push(fresh);
            models.push(model.clone());
        }
    }
    // Deleted, they are gone from both nodes.
    for s in &snaps {
        cc.delete_snapshot(DeleteSnapshotRequest {
            snapshot_id: s.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
        for n in nodes {
            assert!(!has_snapshot(&n.agent, &tls, s).await, "{s} on {}", n.id);
        }
    }
    let m = ctl.metrics();
    assert!(
        common::standalone::metric_value(
            &m,
            "strata_volume_moves_total{kind=\"snapshot\",outcome=\"moved\"}"
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{m}"
    );
}

/// A snapshot's move cut short by a crash of the controller after the
/// copy, with its target down: deleting the snapshot waits for the target
/// (UNAVAILABLE), then rolls the move back and leaves nothing on either
/// node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_deleted_while_its_move_waits_for_the_target_leaves_nothing() {
    use csi_proto::cluster::v1::DrainNodeRequest;
    use csi_proto::cluster::v1::cluster_client::ClusterClient;
    if !runnable() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let tls = root.path().join("tls");
    gen_certs(&tls);
    let mut n1 = NodeProc::start(root.path(), "n1", &tls);
    let n2 = NodeProc::start(root.path(), "n2", &tls);
    let mut ctl = ControllerProc::start(root.path(), &[&n1.agent, &n2.agent], &tls);
    let mut cc = ControllerClient::new(c::channel(ctl.csi_socket()).await);
    registered(&mut cc, &["n1", "n2"]).await;
    let vol = created(
        &mut cc,
        pinned(with_requirements(
            c::create("pvc-gone", 16 << 20, c::block_cap()),
            &["n2"],
            &[],
        )),
    )
    .await
    .volume_id;
    let snap = cc
        .create_snapshot(c::snapshot("snap-gone", &vol, false))
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap()
        .snapshot_id;
    // After the target made its snapshot, before the switch.
    let fp = strata::cluster::moves::SNAPSHOT_FAILPOINTS[2];
    ctl.proc.kill9();
    ctl.proc.env = vec![("STRATA_FAILPOINT".into(), fp.into())];
    ctl.proc.spawn();
    registered(&mut cc, &["n1", "n2"]).await;
    let mut mc = ClusterClient::new(c::channel(ctl.csi_socket()).await);
    mc.drain_node(DrainNodeRequest {
        node_id: "n2".into(),
        undo: false,
    })
    .await
    .unwrap_err();
    assert!(ctl.proc.log().contains(&format!("failpoint {fp}")));
    // The target (n1) made the snapshot; it goes down before anyone
    // finishes the move.
    assert!(has_snapshot(&n1.agent, &tls, &snap).await);
    n1.proc.kill9();
    ctl.proc.kill9();
    ctl.proc.env.clear();
    ctl.proc.spawn();
    cc = ControllerClient::new(c::channel(ctl.csi_socket()).await);
    let delete = DeleteSnapshotRequest {
        snapshot_id: snap.clone(),
        ..Default::default()
    };
    let e = loop {
        match cc.delete_snapshot(delete.clone()).await {
            // The controller is starting, or not leading yet.
            Err(e) if e.message().contains("starting") || e.message().contains("leads yet") => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            r => break r.unwrap_err(),
        }
    };
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(
        has_snapshot(&n2.agent, &tls, &snap).await,
        "the source keeps it"
    );
    n1.proc.spawn();
    n1.wait_for_agent();
    eventually(60, "the delete goes through", async || {
        cc.delete_snapshot(delete.clone()).await.is_ok()
    })
    .await;
    let carrier = strata::cluster::moves::carrier(snap.parse().unwrap()).to_string();
    for n in [&n1, &n2] {
        assert!(!has_snapshot(&n.agent, &tls, &snap).await, "{}", n.id);
        assert!(!holds(&n.agent, &tls, &carrier).await, "{}", n.id);
    }
}

/// A move whose copy finished but whose controller died before the Seal;
/// a publish that passed the "not moving" check before the move was
/// recorded lands on the source after the copy (replacing the move's
/// attachment), a pod writes, and the volume is unpublished. The resumed
/// move attaches again under a new epoch: the target must not answer
/// `done` from the copy made under the old one, and the pod's
/// acknowledged write must be in the volume wherever it ends up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_move_does_not_trust_a_copy_made_under_an_older_attachment() {
    if !runnable() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let tls = root.path().join("tls");
    gen_certs(&tls);
    let n1 = NodeProc::start(root.path(), "n1", &tls);
    let n2 = NodeProc::start(root.path(), "n2", &tls);
    let mut ctl = ControllerProc::start(root.path(), &[&n1.agent, &n2.agent], &tls);
    let mut cc = ControllerClient::new(c::channel(ctl.csi_socket()).await);
    let mut csi1 = Csi::connect(&n1.csi_socket()).await;
    let mut csi2 = Csi::connect(&n2.csi_socket()).await;
    registered(&mut cc, &["n1", "n2"]).await;

    let size: u64 = 8 << 20;
    let id = cc
        .create_volume(with_requirements(
            c::create("pvc-stale-copy", size as i64, c::block_cap()),
            &["n1"],
            &[],
        ))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let mut model = vec![0u8; size as usize];
    common::Rng::new(5).fill(&mut model[..1 << 20]);
    let dev = publish_and_attach(&mut cc, &n1, &mut csi1, &id).await;
    write_at(&dev, 0, &model[..1 << 20]).unwrap();
    detach_and_unpublish(&mut cc, &n1, &mut csi1, &id).await;

    // The move's controller dies right after the copy, before the Seal.
    ctl.proc.kill9();
    ctl.proc.env = vec![("STRATA_FAILPOINT".into(), "cluster::move::copied".into())];
    ctl.proc.spawn();
    let mut cc = ControllerClient::new(c::channel(ctl.csi_socket()).await);
    registered(&mut cc, &["n1", "n2"]).await;
    let mut mc = csi_proto::cluster::v1::cluster_client::ClusterClient::new(
        c::channel(ctl.csi_socket()).await,
    );
    let e = mc
        .move_volume(csi_proto::cluster::v1::MoveVolumeRequest {
            volume_id: id.clone(),
            node_id: "n2".into(),
        })
        .await
        .unwrap_err();
    assert!(
        ctl.proc.log().contains("failpoint cluster::move::copied"),
        "{e:?}"
    );

    // The slipped-in publish to n1 (what ControllerPublishVolume sends to
    // the owner), a write, NodeUnstage, and ControllerUnpublish's Detach.
    let mut a1 = agent_client(&n1.agent, &tls).await;
    a1.attach(csi_proto::agent::v1::AttachRequest {
        volume_id: id.clone(),
        node_id: "n1".into(),
        ..Default::default()
    })
    .await
    .expect("the late publish's Attach");
    let dev = attach_with(&n1, &mut csi1, &id, HashMap::new()).await;
    common::Rng::new(6).fill(&mut model[4 << 20..5 << 20]);
    write_at(&dev, 4 << 20, &model[4 << 20..5 << 20]).unwrap();
    assert!(read_at(&dev, 4 << 20, 1 << 20) == model[4 << 20..5 << 20]);
    detach(&n1, &mut csi1, &id).await;
    a1.detach(csi_proto::agent::v1::AttachRequest {
        volume_id: id.clone(),
        node_id: "n1".into(),
        ..Default::default()
    })
    .await
    .unwrap();

    // The next leader finishes the move.
    ctl.proc.kill9();
    ctl.proc.env.clear();
    ctl.proc.spawn();
    let mut cc = ControllerClient::new(c::channel(ctl.csi_socket()).await);
    registered(&mut cc, &["n1", "n2"]).await;
    let mut mc = csi_proto::cluster::v1::cluster_client::ClusterClient::new(
        c::channel(ctl.csi_socket()).await,
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let r = loop {
        match mc
            .move_volume(csi_proto::cluster::v1::MoveVolumeRequest {
                volume_id: id.clone(),
                node_id: "n2".into(),
            })
            .await
        {
            Ok(r) => break Ok(r.into_inner()),
            Err(e) if e.code() == Code::Unavailable && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(e) => break Err(e),
        }
    };
    eprintln!("move after the restart: {r:?}");
    // Wherever the volume is now, it must hold the acknowledged write.
    let dev = publish_and_attach(&mut cc, &n2, &mut csi2, &id).await;
    let got = read_at(&dev, 0, size as usize);
    detach_and_unpublish(&mut cc, &n2, &mut csi2, &id).await;
    let first = got.iter().zip(&model).position(|(a, b)| a != b);
    assert!(
        first.is_none(),
        "the volume lost an acknowledged write: differs from the model at byte {first:?} \
         (move: {r:?})"
    );
}

/// A move's copy draws on the target node's budget for background copies
/// (`--node-job-rate`, which merges share), not only on the move's own
/// (`--move-rate`): 12 MiB copied at 4 MiB/s (the first second's worth
/// at once) take at least 2 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_draws_on_the_target_nodes_copy_budget() {
    if !runnable() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let tls = root.path().join("tls");
    gen_certs(&tls);
    let n1 = NodeProc::start(root.path(), "n1", &tls);
    let mut n2 = NodeProc::start(root.path(), "n2", &tls);
    n2.proc.kill9();
    n2.proc.add_args(&["--node-job-rate", "4MiB"]);
    n2.proc.spawn();
    n2.wait_for_agent();
    let ctl = ControllerProc::start(root.path(), &[&n1.agent, &n2.agent], &tls);
    let mut cc = ControllerClient::new(c::channel(ctl.csi_socket()).await);
    let mut mc = csi_proto::cluster::v1::cluster_client::ClusterClient::new(
        c::channel(ctl.csi_socket()).await,
    );
    let mut csi1 = Csi::connect(&n1.csi_socket()).await;
    let mut csi2 = Csi::connect(&n2.csi_socket()).await;
    registered(&mut cc, &["n1", "n2"]).await;

    let size: u64 = 16 << 20;
    let id = cc
        .create_volume(with_requirements(
            c::create("pvc-node-budget", size as i64, c::block_cap()),
            &["n1"],
            &[],
        ))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let mut model = vec![0u8; size as usize];
    common::Rng::new(8).fill(&mut model[..12 << 20]);
    let dev = publish_and_attach(&mut cc, &n1, &mut csi1, &id).await;
    write_at(&dev, 0, &model[..12 << 20]).unwrap();
    detach_and_unpublish(&mut cc, &n1, &mut csi1, &id).await;

    let started = Instant::now();
    let moved = mc
        .move_volume(csi_proto::cluster::v1::MoveVolumeRequest {
            volume_id: id.clone(),
            node_id: "n2".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let took = started.elapsed();
    assert_eq!(moved.copied_bytes, 12 << 20, "{moved:?}");
    assert!(
        took >= Duration::from_millis(1900),
        "12 MiB moved in {took:?} past a budget of 4 MiB/s"
    );
    let dev = publish_and_attach(&mut cc, &n2, &mut csi2, &id).await;
    let got = read_at(&dev, 0, size as usize);
    detach_and_unpublish(&mut cc, &n2, &mut csi2, &id).await;
    assert!(
        got == model,
        "the moved volume differs from what was written"
    );

    // A client that stops waiting (a 300 ms deadline here) does not stop
    // the move: its snapshot (8 MiB, 2 s at this budget) goes, then the
    // volume.
    let id = cc
        .create_volume(with_requirements(
            c::create("pvc-node-budget-2", size as i64, c::block_cap()),
            &["n1"],
            &[],
        ))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let dev = publish_and_attach(&mut cc, &n1, &mut csi1, &id).await;
    write_at(&dev, 0, &model[..8 << 20]).unwrap();
    detach_and_unpublish(&mut cc, &n1, &mut csi1, &id).await;
    let snap = cc
        .create_snapshot(c::snapshot("snap-node-budget", &id, false))
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap()
        .snapshot_id;
    let mut req = tonic::Request::new(csi_proto::cluster::v1::MoveVolumeRequest {
        volume_id: id.clone(),
        node_id: "n2".into(),
    });
    req.set_timeout(Duration::from_millis(300));
    let e = mc.move_volume(req).await.unwrap_err();
    assert!(
        matches!(e.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{e:?}"
    );
    eventually(30, "the volume and its snapshot reach n2", async || {
        has_snapshot(&n2.agent, &tls, &snap).await
            && !has_snapshot(&n1.agent, &tls, &snap).await
            && holds(&n2.agent, &tls, &id).await
            && !holds(&n1.agent, &tls, &id).await
    })
    .await;
}

/// A live move whose source sealed its copy, and whose target then died
/// for good before the switch: the move waits for the target (the
/// controller that sealed it died at that step, and its successor finds
/// the target stale), and the volume's writes wait with it. `strata node
/// forget` of the target rolls the move back: the target never took a
/// write, so the source undoes its seal and the node that uses the volume
/// is pointed at it again. Once for a volume used from another node (n1)
/// and once for one used on its own node (n2); the writers through both
/// devices never see an error, both equal their models, and a stage with
/// the publish context from before the move reaches the volume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sealed_live_move_into_a_node_gone_for_good_rolls_back_when_it_is_forgotten() {
    use csi_proto::cluster::v1::MoveVolumeRequest;
    use csi_proto::cluster::v1::cluster_client::ClusterClient;
    if !runnable() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let tls = root.path().join("tls");
    gen_certs(&tls);
    let mut nodes: Vec<NodeProc> = ["n1", "n2", "n3", "n4"]
        .iter()
        .map(|n| NodeProc::start(root.path(), n, &tls))
        .collect();
    let agents: Vec<&str> = nodes.iter().map(|n| n.agent.as_str()).collect();
    let mut ctl = ControllerProc::start(root.path(), &agents, &tls);
    let mut cc = ControllerClient::new(c::channel(ctl.csi_socket()).await);
    let mut csi1 = Csi::connect(&nodes[0].csi_socket()).await;
    let mut csi2 = Csi::connect(&nodes[1].csi_socket()).await;
    registered(&mut cc, &["n1", "n2", "n3", "n4"]).await;
    let endpoint = format!("unix://{}", ctl.csi_socket().display());

    // Volume a on n2 used from n1, volume b on n2 used on n2.
    let size = 8usize << 20;
    let mut vols = Vec::new();
    for (name, user) in [("pvc-sealed-a", 0), ("pvc-sealed-b", 1)] {
        let id = created(
            &mut cc,
            with_requirements(c::create(name, size as i64, c::block_cap()), &["n2"], &[]),
        )
        .await
        .volume_id;
        let ctx = cc
            .controller_publish_volume(ControllerPublishVolumeRequest {
                volume_id: id.clone(),
                node_id: nodes[user].id.clone(),
                volume_capability: Some(c::block_cap()),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .publish_context;
        let csi = if user == 0 { &mut csi1 } else { &mut csi2 };
        let dev = attach_with(&nodes[user], csi, &id, ctx.clone()).await;
        let model = Arc::new(Mutex::new(vec![0u8; size]));
        {
            let mut m = model.lock().unwrap();
            common::Rng::new(70 + user as u64).fill(&mut m[..1 << 20]);
            write_at(&dev, 0, &m[..1 << 20]).unwrap();
        }
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let w = writer(
            dev.clone(),
            Arc::clone(&model),
            Arc::clone(&stop),
            80 + user as u64,
        );
        vols.push((id, user, ctx, dev, model, stop, w));
    }

    // Each moves live to its target (a to n3, b to n4); the controller
    // dies once the source sealed; the target dies, and is stale by the
    // time a controller comes back.
    for (i, target) in [(0, 2), (1, 3)] {
        let id = vols[i].0.clone();
        ctl.proc.kill9();
        ctl.proc.env = vec![("STRATA_FAILPOINT".into(), "cluster::move::sealed".into())];
        ctl.proc.spawn();
        registered(
            &mut ControllerClient::new(c::channel(ctl.csi_socket()).await),
            &["n2"],
        )
        .await;
        let e = ClusterClient::new(c::channel(ctl.csi_socket()).await)
            .move_volume(MoveVolumeRequest {
                volume_id: id.clone(),
                node_id: nodes[target].id.clone(),
            })
            .await
            .unwrap_err();
        assert!(
            ctl.proc.log().contains("failpoint cluster::move::sealed"),
            "{id}: {e:?}\n{}",
            ctl.proc.log()
        );
        nodes[target].proc.kill9();
        // The controller's stale timeout is 3 s.
        tokio::time::sleep(Duration::from_secs(4)).await;
    }
    ctl.proc.env.clear();
    ctl.proc.spawn();
    cc = ControllerClient::new(c::channel(ctl.csi_socket()).await);
    let mut mc = ClusterClient::new(c::channel(ctl.csi_socket()).await);
    // Sealed, the moves wait for their targets: the volumes stay on n2,
    // and a cancel is refused.
    for (id, ..) in &vols {
        let deadline = Instant::now() + Duration::from_secs(30);
        let e = loop {
            let e = mc
                .move_volume(MoveVolumeRequest {
                    volume_id: id.clone(),
                    node_id: "n2".into(),
                })
                .await
                .unwrap_err();
            // The controller is still being elected leader.
            if e.code() != Code::Unavailable || Instant::now() > deadline {
                break e;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    }
    for target in ["n3", "n4"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_strata"))
            .args(["node", "forget", target, "--endpoint", &endpoint])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "forget {target}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for (id, ..) in &vols {
        eventually(30, "the moves are rolled back onto n2", async || {
            let v = mc
                .move_volume(MoveVolumeRequest {
                    volume_id: id.clone(),
                    node_id: "n2".into(),
                })
                .await;
            v.is_ok_and(|r| r.get_ref().to_node == "n2")
        })
        .await;
        assert!(holds(&nodes[1].agent, &tls, id).await, "{id} left n2");
    }
    // The writers went on (a failed write panics): more writes land now.
    for (id, user, ctx, dev, model, stop, w) in vols {
        let before = model.lock().unwrap().clone();
        eventually(30, "the writer writes again", async || {
            *model.lock().unwrap() != before
        })
        .await;
        stopped(w, &stop).await;
        matches_model(&id, &dev, &model);
        // A stage with the context from before the move, again while
        // staged (the attachment served stays) and anew, reaches the
        // volume where it is now.
        let csi = if user == 0 { &mut csi1 } else { &mut csi2 };
        let dev = attach_with(&nodes[user], csi, &id, ctx.clone()).await;
        write_at(&dev, 4096, &[9u8; 4096]).unwrap();
        model.lock().unwrap()[4096..8192].fill(9);
        detach(&nodes[user], csi, &id).await;
        let dev = attach_with(&nodes[user], csi, &id, ctx).await;
        matches_model(&id, &dev, &model);
        write_at(&dev, 0, &[7u8; 4096]).unwrap();
        detach_and_unpublish(&mut cc, &nodes[user], csi, &id).await;
    }
}

/// `strata node forget NODE`: refused while a volume or a snapshot is
/// there (named) and while the node answers; a drained node that died
/// after a snapshot's move switched away from it, before its copy there
/// was removed, blocks the snapshot's delete (UNAVAILABLE) until it is
/// forgotten; then the move finishes without it and the delete goes
/// through. A forgotten node that comes back registers as a new node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_gone_for_good_is_forgotten_and_what_waited_for_it_finishes() {
    use csi_proto::cluster::v1::cluster_client::ClusterClient;
    use csi_proto::cluster::v1::{DrainNodeRequest, ForgetNodeRequest};
    if !runnable() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let tls = root.path().join("tls");
    gen_certs(&tls);
    let n1 = NodeProc::start(root.path(), "n1", &tls);
    let mut n2 = NodeProc::start(root.path(), "n2", &tls);
    let mut ctl = ControllerProc::start(root.path(), &[&n1.agent, &n2.agent], &tls);
    let mut cc = ControllerClient::new(c::channel(ctl.csi_socket()).await);
    let mut csi1 = Csi::connect(&n1.csi_socket()).await;
    let mut csi2 = Csi::connect(&n2.csi_socket()).await;
    registered(&mut cc, &["n1", "n2"]).await;
    let endpoint = format!("unix://{}", ctl.csi_socket().display());
    let forget_with = |node: &str, flags: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_strata"))
            .args(["node", "forget", node])
            .args(flags)
            .args(["--endpoint", &endpoint])
            .output()
            .unwrap()
    };
    let forget = |node: &str| forget_with(node, &[]);

    // A snapshot of a volume that is deleted after it, and a volume.
    let size = 4usize << 20;
    let vol = created(
        &mut cc,
        with_requirements(
            c::create("pvc-f", size as i64, c::block_cap()),
            &["n2"],
            &[],
        ),
    )
    .await
    .volume_id;
    let mut model = vec![0u8; size];
    common::Rng::new(5).fill(&mut model[..1 << 20]);
    let dev = publish_and_attach(&mut cc, &n2, &mut csi2, &vol).await;
    write_at(&dev, 0, &model[..1 << 20]).unwrap();
    detach_and_unpublish(&mut cc, &n2, &mut csi2, &vol).await;
    let snap = cc
        .create_snapshot(c::snapshot("snap-f", &vol, false))
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap()
        .snapshot_id;
    cc.delete_volume(DeleteVolumeRequest {
        volume_id: vol.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    let other = created(
        &mut cc,
        pinned(with_requirements(
            c::create("pvc-g", 1 << 20, c::block_cap()),
            &["n2"],
            &[],
        )),
    )
    .await
    .volume_id;
    // Refused while n2 answers; once it does not, refused naming what is
    // there.
    let out = forget("n2");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("answers"), "{err}");
    n2.proc.kill9();
    eventually(
        30,
        "n2 is stale, and forget names what it holds",
        async || {
            let out = forget("n2");
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{err}");
            err.contains(&other) && err.contains(&snap)
        },
    )
    .await;
    n2.proc.spawn();
    n2.wait_for_agent();
    registered(&mut cc, &["n2"]).await;
    cc.delete_volume(DeleteVolumeRequest {
        volume_id: other,
        ..Default::default()
    })
    .await
    .unwrap();

    // A drain of n2 switches the snapshot to n1; the controller dies
    // before the copy on n2 is removed, and n2 dies for good.
    let fp = strata::cluster::moves::SNAPSHOT_FAILPOINTS[3];
    ctl.proc.kill9();
    ctl.proc.env = vec![("STRATA_FAILPOINT".into(), fp.into())];
    ctl.proc.spawn();
    registered(&mut cc, &["n1", "n2"]).await;
    let mut mc = ClusterClient::new(c::channel(ctl.csi_socket()).await);
    let drain = DrainNodeRequest {
        node_id: "n2".into(),
        undo: false,
    };
    eventually(30, "the drain reaches the failpoint", async || {
        mc.drain_node(drain.clone()).await.is_err()
            && ctl.proc.log().contains(&format!("failpoint {fp}"))
    })
    .await;
    n2.proc.kill9();
    ctl.proc.kill9();
    ctl.proc.env.clear();
    ctl.proc.spawn();
    cc = ControllerClient::new(c::channel(ctl.csi_socket()).await);
    let delete = DeleteSnapshotRequest {
        snapshot_id: snap.clone(),
        ..Default::default()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let e = loop {
        match cc.delete_snapshot(delete.clone()).await {
            // The controller is starting (or not leading yet), or its
            // resume holds the snapshot.
            Err(e)
                if e.message().contains("starting")
                    || e.message().contains("leads yet")
                    || e.message().contains("being moved or deleted") =>
            {
                assert!(std::time::Instant::now() < deadline, "{e:?}");
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            r => break r.unwrap_err(),
        }
    };
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("n2"), "{e:?}");

    // Forgotten once it is stale (3 s without an answer here).
    let mut mc = ClusterClient::new(c::channel(ctl.csi_socket()).await);
    let req = |node: &str| ForgetNodeRequest {
        node_id: node.into(),
        abandon_data: false,
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        match mc.forget_node(req("n2")).await {
            Ok(_) => break,
            Err(e)
                if (e.code() == Code::FailedPrecondition && e.message().contains("answers"))
                    || e.message().contains("starting")
                    || e.message().contains("leads yet") =>
            {
                assert!(std::time::Instant::now() < deadline, "{e:?}");
                tokio::time::sleep(Duration::from_millis(300)).await
            }
            Err(e) => panic!("forget n2: {e:?}"),
        }
    }
    let e = mc.forget_node(req("n2")).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let e = mc.forget_node(req("n1")).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("answers"), "{e:?}");
    // The leader finished the move without n2 (not the delete below); the
    // snapshot restores on n1.
    eventually(30, "the move finished", async || {
        ctl.proc.log().contains(
            "a moved snapshot's source copy is left on a node the controller no longer knows",
        )
    })
    .await;
    let restored = created(
        &mut cc,
        pinned(c::create_from(
            "restore-f",
            size as i64,
            c::block_cap(),
            Type::Snapshot(SnapshotSource {
                snapshot_id: snap.clone(),
            }),
        )),
    )
    .await;
    assert_eq!(node_of(&restored), "n1");
    contents_are(&mut cc, &n1, &mut csi1, &restored.volume_id, &model).await;
    cc.delete_volume(DeleteVolumeRequest {
        volume_id: restored.volume_id,
        ..Default::default()
    })
    .await
    .unwrap();
    eventually(30, "the delete goes through", async || {
        cc.delete_snapshot(delete.clone()).await.is_ok()
    })
    .await;
    let carrier = strata::cluster::moves::carrier(snap.parse().unwrap()).to_string();
    assert!(!has_snapshot(&n1.agent, &tls, &snap).await);
    assert!(!holds(&n1.agent, &tls, &carrier).await);

    // Back after all: a new node, not draining, with its leftover copy.
    n2.proc.spawn();
    n2.wait_for_agent();
    registered(&mut cc, &["n2"]).await;
    let placed = created(
        &mut cc,
        pinned(with_requirements(
            c::create("pvc-h", 4 << 20, c::block_cap()),
            &["n2"],
            &[],
        )),
    )
    .await;
    assert_eq!(node_of(&placed), "n2");
    assert!(has_snapshot(&n2.agent, &tls, &snap).await, "the garbage");

    // Dead for good with data on it: a volume, its snapshot, a restore of
    // that snapshot for a pod on n1 that still fetches from n2 (3 MiB at
    // 32 KiB/s), and a volume whose move to n1 was recorded (the
    // controller died there). Forget refuses, naming them all, until the
    // data is given up (`--abandon-data`); then every call on them but a
    // delete is FAILED_PRECONDITION, the move rolls back, and the deletes
    // go through.
    ctl.proc.kill9();
    ctl.proc.add_args(&["--move-rate", "32KiB"]);
    ctl.proc.spawn();
    cc = ControllerClient::new(c::channel(ctl.csi_socket()).await);
    registered(&mut cc, &["n1", "n2"]).await;
    let placed = placed.volume_id;
    let mut data = vec![0u8; 3 << 20];
    common::Rng::new(6).fill(&mut data);
    let dev = publish_and_attach(&mut cc, &n2, &mut csi2, &placed).await;
    write_at(&dev, 0, &data).unwrap();
    detach_and_unpublish(&mut cc, &n2, &mut csi2, &placed).await;
    let snap2 = cc
        .create_snapshot(c::snapshot("snap-h", &placed, false))
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap()
        .snapshot_id;
    let mut g = csi_proto::csi::v1::group_controller_client::GroupControllerClient::new(
        c::channel(ctl.csi_socket()).await,
    );
    let group_h = || CreateVolumeGroupSnapshotRequest {
        name: "vgs-h".into(),
        source_volume_ids: vec![placed.clone()],
        ..Default::default()
    };
    let member = g
        .create_volume_group_snapshot(group_h())
        .await
        .unwrap()
        .into_inner()
        .group_snapshot
        .unwrap()
        .snapshots[0]
        .snapshot_id
        .clone();
    let from_snap2 = |name: &str| {
        with_requirements(
            c::create_from(
                name,
                4 << 20,
                c::block_cap(),
                Type::Snapshot(SnapshotSource {
                    snapshot_id: snap2.clone(),
                }),
            ),
            &["n1"],
            &["n1"],
        )
    };
    let holed = created(&mut cc, from_snap2("restore-h")).await.volume_id;
    assert!(holds(&n1.agent, &tls, &holed).await);
    let mut req = with_requirements(c::create("pvc-j", 4 << 20, c::block_cap()), &["n2"], &[]);
    req.parameters
        .insert("csi.storage.k8s.io/pvc/namespace".into(), "apps".into());
    req.parameters
        .insert("csi.storage.k8s.io/pvc/name".into(), "mover".into());
    let mover = created(&mut cc, req).await.volume_id;
    let dev = publish_and_attach(&mut cc, &n2, &mut csi2, &mover).await;
    write_at(&dev, 0, &data).unwrap();
    detach_and_unpublish(&mut cc, &n2, &mut csi2, &mover).await;
    // Its copy to n1 takes 96 s (a client deadline does not stop it).
    let mut mc = ClusterClient::new(c::channel(ctl.csi_socket()).await);
    let to_n1 = csi_proto::cluster::v1::MoveVolumeRequest {
        volume_id: mover.clone(),
        node_id: "n1".into(),
    };
    let mut req = tonic::Request::new(to_n1.clone());
    req.set_timeout(Duration::from_millis(300));
    mc.move_volume(req).await.unwrap_err();
    // A snapshot on n1 (64 KiB) whose move to n2 switched, the controller
    // killed before the old copy on n1 went.
    let kvol = created(
        &mut cc,
        with_requirements(c::create("pvc-k", 1 << 20, c::block_cap()), &["n1"], &[]),
    )
    .await
    .volume_id;
    let dev = publish_and_attach(&mut cc, &n1, &mut csi1, &kvol).await;
    write_at(&dev, 0, &data[..64 << 10]).unwrap();
    detach_and_unpublish(&mut cc, &n1, &mut csi1, &kvol).await;
    let ksnap = cc
        .create_snapshot(c::snapshot("snap-k", &kvol, false))
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap()
        .snapshot_id;
    let fp = strata::cluster::moves::SNAPSHOT_FAILPOINTS[3];
    ctl.proc.kill9();
    ctl.proc.env = vec![("STRATA_FAILPOINT".into(), fp.into())];
    ctl.proc.spawn();
    let mut mc = ClusterClient::new(c::channel(ctl.csi_socket()).await);
    let k_to_n2 = csi_proto::cluster::v1::MoveVolumeRequest {
        volume_id: kvol.clone(),
        node_id: "n2".into(),
    };
    // The log goes on across restarts, and this failpoint killed an
    // earlier controller of this test already.
    let hits = || ctl.proc.log().matches(&format!("failpoint {fp}")).count();
    let before = hits();
    eventually(30, "the snapshot's move switches", async || {
        mc.move_volume(k_to_n2.clone()).await.is_err() && hits() > before
    })
    .await;
    n2.proc.kill9();
    ctl.proc.kill9();
    ctl.proc.env.clear();
    ctl.proc.spawn();
    cc = ControllerClient::new(c::channel(ctl.csi_socket()).await);
    let mut mc = ClusterClient::new(c::channel(ctl.csi_socket()).await);
    // The mover's copy stopped half-way; the snapshot's old copy stays
    // while n2 is not seen holding it.
    eventually(30, "the mover's copy is half-way on n1", async || {
        holds(&n1.agent, &tls, &mover).await
    })
    .await;
    assert!(has_snapshot(&n1.agent, &tls, &ksnap).await);
    eventually(30, "forget names what n2 holds", async || {
        let out = forget("n2");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{err}");
        [
            &placed,
            &snap2,
            &holed,
            &mover,
            &ksnap,
            &"--abandon-data".to_string(),
        ]
        .iter()
        .all(|s| err.contains(s.as_str()))
    })
    .await;
    let out = forget_with("n2", &["--abandon-data"]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.contains(&format!("lost volume {placed}")), "{said}");
    assert!(said.contains(&format!("lost volume {mover}")), "{said}");
    assert!(
        said.contains(&format!("snapshot {ksnap} had moved to node n2")),
        "{said}"
    );
    assert!(!said.contains(&format!("lost snapshot {ksnap}")), "{said}");
    // It is n1's again, with its data.
    let kept = created(
        &mut cc,
        pinned(c::create_from(
            "restore-k",
            1 << 20,
            c::block_cap(),
            Type::Snapshot(SnapshotSource {
                snapshot_id: ksnap.clone(),
            }),
        )),
    )
    .await;
    assert_eq!(node_of(&kept), "n1");
    let mut want = vec![0u8; 1 << 20];
    want[..64 << 10].copy_from_slice(&data[..64 << 10]);
    contents_are(&mut cc, &n1, &mut csi1, &kept.volume_id, &want).await;
    assert!(said.contains(&format!("lost snapshot {snap2}")), "{said}");
    assert!(said.contains(&format!("lost volume {holed}")), "{said}");
    let lost = |e: tonic::Status| {
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        assert!(e.message().contains("n2 was forgotten"), "{e:?}");
    };
    lost(
        cc.controller_publish_volume(ControllerPublishVolumeRequest {
            volume_id: placed.clone(),
            node_id: "n1".into(),
            volume_capability: Some(c::block_cap()),
            ..Default::default()
        })
        .await
        .unwrap_err(),
    );
    lost(cc.create_volume(from_snap2("restore-i")).await.unwrap_err());
    // The restore still fetching from n2 is lost too, though n1 answers.
    let e = cc
        .create_snapshot(c::snapshot("snap-holed", &holed, false))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("still fetching from node n2"), "{e:?}");
    let got = cc
        .controller_get_volume(ControllerGetVolumeRequest {
            volume_id: holed.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let condition = got.status.unwrap().volume_condition.unwrap();
    assert!(condition.abnormal, "{condition:?}");
    // Unpublishing a lost volume succeeds (nothing to detach).
    cc.controller_unpublish_volume(ControllerUnpublishVolumeRequest {
        volume_id: placed.clone(),
        node_id: "n1".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let list = cc
        .list_volumes(ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    let condition = list
        .entries
        .iter()
        .find(|e| e.volume.as_ref().unwrap().volume_id == placed)
        .and_then(|e| e.status.clone()?.volume_condition)
        .unwrap();
    assert!(
        condition.abnormal && condition.message.contains("n2 was forgotten"),
        "{condition:?}"
    );
    let listed = cc
        .list_snapshots(ListSnapshotsRequest {
            snapshot_id: snap2.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let entry = listed.entries[0].snapshot.as_ref().unwrap();
    assert!(!entry.ready_to_use, "{entry:?}");
    // A delete needs nothing from the forgotten node.
    cc.delete_volume(DeleteVolumeRequest {
        volume_id: holed.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(!holds(&n1.agent, &tls, &holed).await);

    // Lost for good: a node of that name back (here the same one, with
    // the data) does not bring them back; their deletes reach it.
    n2.proc.spawn();
    n2.wait_for_agent();
    registered(&mut cc, &["n2"]).await;
    lost(
        cc.controller_publish_volume(ControllerPublishVolumeRequest {
            volume_id: placed.clone(),
            node_id: "n2".into(),
            volume_capability: Some(c::block_cap()),
            ..Default::default()
        })
        .await
        .unwrap_err(),
    );
    lost(cc.create_volume(from_snap2("restore-j")).await.unwrap_err());
    // The move out of the forgotten node rolls back: deleting n1's copy
    // stops the copy at once (it would wait up to 120 s on a source that
    // does not answer, or, n2 back, read on at 32 KiB/s for 96 s); a new
    // one is refused.
    eventually(30, "the move out of n2 rolls back", async || {
        match mc.move_volume(to_n1.clone()).await {
            Err(e) => e.message().contains("n2 was forgotten"),
            Ok(r) => panic!("{r:?}"),
        }
    })
    .await;
    let log = ctl.proc.log();
    assert!(
        ["VolumeLost", "MoveRolledBack"].iter().all(|reason| {
            log.lines().any(|l| {
                l.contains("claim=apps/mover") && l.contains(&format!("reason=\"{reason}\""))
            })
        }),
        "{log}"
    );

    assert!(holds(&n2.agent, &tls, &placed).await);
    // Asked for again by its name (a sidecar that never got the answer):
    // a lost snapshot goes, but is not taken again from a lost volume; a
    // lost volume goes and a new one is made.
    lost(
        cc.create_snapshot(c::snapshot("snap-h", &placed, false))
            .await
            .unwrap_err(),
    );
    assert!(!has_snapshot(&n2.agent, &tls, &snap2).await);
    // A group with a lost member is cut again: its members go.
    let mut g = csi_proto::csi::v1::group_controller_client::GroupControllerClient::new(
        c::channel(ctl.csi_socket()).await,
    );
    assert!(has_snapshot(&n2.agent, &tls, &member).await);
    lost(g.create_volume_group_snapshot(group_h()).await.unwrap_err());
    assert!(!has_snapshot(&n2.agent, &tls, &member).await);
    let again = created(
        &mut cc,
        pinned(with_requirements(
            c::create("pvc-h", 4 << 20, c::block_cap()),
            &["n2"],
            &[],
        )),
    )
    .await
    .volume_id;
    assert_ne!(again, placed);
    assert!(!holds(&n2.agent, &tls, &placed).await);
    assert!(holds(&n2.agent, &tls, &again).await);
    cc.delete_snapshot(DeleteSnapshotRequest {
        snapshot_id: snap2.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    for id in [&placed, &mover, &again] {
        cc.delete_volume(DeleteVolumeRequest {
            volume_id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    assert!(!holds(&n2.agent, &tls, &placed).await);
    assert!(!has_snapshot(&n2.agent, &tls, &snap2).await);
    for id in [&holed, &mover] {
        assert!(!holds(&n1.agent, &tls, id).await, "{id}");
    }
    let list = cc
        .list_volumes(ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(
        list.entries
            .iter()
            .all(|e| ![&placed, &holed, &mover].contains(&&e.volume.as_ref().unwrap().volume_id)),
        "{list:?}"
    );
}

/// A move to a node that is down: a move back to the volume's own node
/// cancels it, and the pod can use the volume where all its data is, while
/// the rollback waits for the dead node to delete its copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_to_a_dead_node_does_not_block_the_volume_for_good() {
    if !runnable() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let tls = root.path().join("tls");
    gen_certs(&tls);
    let n1 = NodeProc::start(root.path(), "n1", &tls);
    let mut n2 = NodeProc::start(root.path(), "n2", &tls);
    let mut ctl = ControllerProc::start(root.path(), &[&n1.agent, &n2.agent], &tls);
    let mut cc = ControllerClient::new(c::channel(ctl.csi_socket()).await);
    let mut csi1 = Csi::connect(&n1.csi_socket()).await;
    registered(&mut cc, &["n1", "n2"]).await;
    let mut req = with_requirements(
        c::create("pvc-dead-target", 8 << 20, c::block_cap()),
        &["n1"],
        &[],
    );
    req.parameters
        .insert("csi.storage.k8s.io/pvc/namespace".into(), "apps".into());
    req.parameters
        .insert("csi.storage.k8s.io/pvc/name".into(), "data".into());
    let id = cc
        .create_volume(req)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;

    n2.proc.kill9();
    let mut mc = csi_proto::cluster::v1::cluster_client::ClusterClient::new(
        c::channel(ctl.csi_socket()).await,
    );
    let e = mc
        .move_volume(csi_proto::cluster::v1::MoveVolumeRequest {
            volume_id: id.clone(),
            node_id: "n2".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    let cancel = csi_proto::cluster::v1::MoveVolumeRequest {
        volume_id: id.clone(),
        node_id: "n1".into(),
    };
    let e = mc.move_volume(cancel.clone()).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("usable on node n1"), "{e:?}");
    // The pod wants the volume on n1, which holds all of it.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match cc
            .controller_publish_volume(ControllerPublishVolumeRequest {
                volume_id: id.clone(),
                node_id: "n1".into(),
                volume_capability: Some(c::block_cap()),
                ..Default::default()
            })
            .await
        {
            Ok(r) => {
                let dev = attach_with(&n1, &mut csi1, &id, r.into_inner().publish_context).await;
                assert!(read_at(&dev, 0, 4096) == [0u8; 4096]);
                detach(&n1, &mut csi1, &id).await;
                break;
            }
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "the volume stays unpublishable while the move's target is down: {e:?}"
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    unpublish(&mut cc, &id, "n1").await;
    // n2 back: the rollback ends, and n2 keeps no copy.
    n2.proc.spawn();
    n2.wait_for_agent();
    let r = mc.move_volume(cancel.clone()).await.unwrap().into_inner();
    assert_eq!((r.from_node.as_str(), r.to_node.as_str()), ("n1", "n1"));
    assert!(!holds(&n2.agent, &tls, &id).await);
    assert!(holds(&n1.agent, &tls, &id).await);
    // The claim's Events (the log's, outside Kubernetes) say so, once.
    let log = ctl.proc.log();
    let cancelled = log
        .lines()
        .filter(|l| l.contains("claim=apps/data") && l.contains("reason=\"MoveCancelled\""))
        .count();
    assert_eq!(cancelled, 1, "{log}");

    // A move into n2 (the controller dies once it is recorded), then n2
    // dies for good: once n2 is forgotten, the leader rolls the move back
    // without it (the volume is n1's alone).
    let fp = strata::cluster::moves::FAILPOINTS[0];
    ctl.proc.kill9();
    ctl.proc.env = vec![("STRATA_FAILPOINT".into(), fp.into())];
    ctl.proc.spawn();
    registered(&mut cc, &["n1", "n2"]).await;
    let mut mc = csi_proto::cluster::v1::cluster_client::ClusterClient::new(
        c::channel(ctl.csi_socket()).await,
    );
    let to_n2 = csi_proto::cluster::v1::MoveVolumeRequest {
        volume_id: id.clone(),
        node_id: "n2".into(),
    };
    eventually(30, "the move is recorded", async || {
        mc.move_volume(to_n2.clone()).await.is_err()
            && ctl.proc.log().contains(&format!("failpoint {fp}"))
    })
    .await;
    n2.proc.kill9();
    ctl.proc.kill9();
    ctl.proc.env.clear();
    ctl.proc.spawn();
    cc = ControllerClient::new(c::channel(ctl.csi_socket()).await);
    let mut mc = csi_proto::cluster::v1::cluster_client::ClusterClient::new(
        c::channel(ctl.csi_socket()).await,
    );
    eventually(30, "n2 is forgotten once stale", async || {
        mc.forget_node(csi_proto::cluster::v1::ForgetNodeRequest {
            node_id: "n2".into(),
            abandon_data: false,
        })
        .await
        .is_ok()
    })
    .await;
    // By the leader (forget resumes the moves; its own round comes 30 s
    // after it started): publishing waits for a move still copying.
    eventually(10, "the move is rolled back", async || {
        cc.controller_publish_volume(ControllerPublishVolumeRequest {
            volume_id: id.clone(),
            node_id: "n1".into(),
            volume_capability: Some(c::block_cap()),
            ..Default::default()
        })
        .await
        .is_ok()
    })
    .await;
    unpublish(&mut cc, &id, "n1").await;
    assert!(
        ctl.proc
            .log()
            .lines()
            .any(|l| l.contains("claim=apps/data") && l.contains("reason=\"MoveRolledBack\"")),
        "{}",
        ctl.proc.log()
    );
    let r = mc.move_volume(cancel).await.unwrap().into_inner();
    assert_eq!((r.from_node.as_str(), r.to_node.as_str()), ("n1", "n1"));
    assert!(holds(&n1.agent, &tls, &id).await);
}

/// A restore and a clone for a pod on another node than their source's
/// (switch first): CreateVolume answers once that node serves the volume;
/// it reads what it has not fetched yet from the source and fetches the
/// rest behind at `--move-rate`; snapshots wait until it is all there; a
/// restart of the fetching node resumes the fetch without losing a write;
/// then the source's copy goes, and the volume needs the source no more
/// (the source is killed and the contents are still the model's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restores_for_a_pod_on_another_node_move_there_and_fetch_behind() {
    if !runnable() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let tls = root.path().join("tls");
    gen_certs(&tls);
    let mut n1 = NodeProc::start(root.path(), "n1", &tls);
    let mut n2 = NodeProc::start(root.path(), "n2", &tls);
    let mut ctl = ControllerProc::start(root.path(), &[&n1.agent, &n2.agent], &tls);
    // 9 MiB of data at 256 KiB/s: the fetch lasts through the checks
    // below, which take about 9 s under the VM stage's emulation (at
    // 1 MiB/s the fetch once ended before its last check there). Reads
    // keep what they fetch, so the checks leave the 3 MiB at 12 MiB
    // unread until the restart (12 s of the fetch's budget).
    ctl.proc.kill9();
    ctl.proc.add_args(&["--move-rate", "256KiB"]);
    ctl.proc.spawn();
    let mut cc = ControllerClient::new(c::channel(ctl.csi_socket()).await);
    let mut csi1 = Csi::connect(&n1.csi_socket()).await;
    let mut csi2 = Csi::connect(&n2.csi_socket()).await;
    registered(&mut cc, &["n1", "n2"]).await;

    let size = 16 << 20;
    let src = created(
        &mut cc,
        with_requirements(c::create("pvc-src", size, c::block_cap()), &["n1"], &[]),
    )
    .await
    .volume_id;
    let mut model = vec![0u8; size as usize];
    let mut rng = common::Rng::new(21);
    {
        let dev = publish_and_attach(&mut cc, &n1, &mut csi1, &src).await;
        for at in [0usize, 6 << 20, 12 << 20] {
            rng.fill(&mut model[at..at + (3 << 20)]);
            write_at(&dev, at as u64, &model[at..at + (3 << 20)]).unwrap();
        }
        detach_and_unpublish(&mut cc, &n1, &mut csi1, &src).await;
    }
    let snap = cc
        .create_snapshot(c::snapshot("snap-src", &src, false))
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap()
        .snapshot_id;

    // The restore for a pod on n2 is n2's at once.
    let started = Instant::now();
    let rid = created(
        &mut cc,
        with_requirements(
            c::create_from(
                "pvc-restore-n2",
                size,
                c::block_cap(),
                Type::Snapshot(SnapshotSource {
                    snapshot_id: snap.clone(),
                }),
            ),
            &["n2"],
            &["n2"],
        ),
    )
    .await
    .volume_id;
    let answered = started.elapsed();
    assert!(holds(&n2.agent, &tls, &rid).await);
    let ctx = cc
        .controller_publish_volume(ControllerPublishVolumeRequest {
            volume_id: rid.clone(),
            node_id: "n2".into(),
            volume_capability: Some(c::block_cap()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .publish_context;
    assert_eq!(ctx["strata.dev/owner"], "n2", "{ctx:?}");
    let dev = attach_with(&n2, &mut csi2, &rid, ctx).await;
    // Read at once, while it fetches; written over, partly.
    let early = 12 << 20;
    assert!(read_at(&dev, 0, early) == model[..early]);
    // What n2 lacked was read from n1 and kept.
    let m = n2.metrics();
    for kind in ["read", "kept"] {
        let series =
            format!("strata_volume_fetched_bytes_total{{volume=\"{rid}\",kind=\"{kind}\"}}");
        assert!(
            common::standalone::metric_value(&m, &series).unwrap_or(0.0) > 0.0,
            "{series}\n{m}"
        );
    }
    rng.fill(&mut model[(6 << 20) + 512..(7 << 20) + 100]);
    write_at(
        &dev,
        (6 << 20) + 512,
        &model[(6 << 20) + 512..(7 << 20) + 100],
    )
    .unwrap();
    rng.fill(&mut model[15 << 20..16 << 20]);
    write_at(&dev, 15 << 20, &model[15 << 20..16 << 20]).unwrap();
    assert!(read_at(&dev, 0, early) == model[..early]);
    eprintln!("restore answered in {answered:?}; read and written while fetching");
    // No snapshot of it until it is all here.
    let e = cc
        .create_snapshot(c::snapshot("snap-restore", &rid, false))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("being copied"), "{e:?}");
    detach(&n2, &mut csi2, &rid).await;

    // n2 restarts in the middle of the fetch: the fetch resumes, nothing
    // written is lost.
    n2.proc.kill9();
    n2.proc.spawn();
    n2.wait_for_agent();
    csi2 = Csi::connect(&n2.csi_socket()).await;
    assert!(
        n2.proc.log().contains("resuming the fetch of a volume"),
        "{}",
        n2.proc.log()
    );
    let dev = attach_with(
        &n2,
        &mut csi2,
        &rid,
        HashMap::from([("strata.dev/owner".to_string(), "n2".to_string())]),
    )
    .await;
    assert!(read_at(&dev, 0, size as usize) == model);
    detach(&n2, &mut csi2, &rid).await;
    unpublish(&mut cc, &rid, "n2").await;

    // The fetch ends: the source's copy goes, the snapshot works, and the
    // volume no longer needs n1.
    eventually(60, "n1's copy of the restore removed", async || {
        !holds(&n1.agent, &tls, &rid).await
    })
    .await;
    eventually(30, "a snapshot of the fetched restore", async || {
        cc.create_snapshot(c::snapshot("snap-restore", &rid, false))
            .await
            .is_ok()
    })
    .await;
    n1.proc.kill9();
    contents_are(&mut cc, &n2, &mut csi2, &rid, &model).await;
    n1.proc.spawn();
    n1.wait_for_agent();
    registered(&mut cc, &["n1"]).await;

    // A clone of the source for a pod on n2 likewise; deleting it while
    // it fetches takes both copies.
    let cid = created(
        &mut cc,
        with_requirements(
            c::create_from(
                "pvc-clone-n2",
                size,
                c::block_cap(),
                Type::Volume(VolumeSource {
                    volume_id: src.clone(),
                }),
            ),
            &["n2"],
            &["n2"],
        ),
    )
    .await
    .volume_id;
    assert!(holds(&n2.agent, &tls, &cid).await);
    cc.delete_volume(DeleteVolumeRequest {
        volume_id: cid.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(!holds(&n2.agent, &tls, &cid).await);
    eventually(30, "the clone's source copy removed", async || {
        !holds(&n1.agent, &tls, &cid).await
    })
    .await;
}

/// A drain of n2 that begins while a move into n2 copies (a drain lists
/// the node's volumes when it begins, and that one is still n1's): the
/// move is rolled back before its switch, so the drain leaves nothing on
/// n2, and the volume is whole on n1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_rolls_back_a_move_into_the_node_that_copies_when_it_begins() {
    if !runnable() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let tls = root.path().join("tls");
    gen_certs(&tls);
    let n1 = NodeProc::start(root.path(), "n1", &tls);
    let n2 = NodeProc::start(root.path(), "n2", &tls);
    let mut ctl = ControllerProc::start(root.path(), &[&n1.agent, &n2.agent], &tls);
    // 16 MiB at 1 MiB/s: the copy lasts while the drain begins.
    ctl.proc.kill9();
    ctl.proc.add_args(&["--move-rate", "1MiB"]);
    ctl.proc.spawn();
    let mut cc = ControllerClient::new(c::channel(ctl.csi_socket()).await);
    let mut csi1 = Csi::connect(&n1.csi_socket()).await;
    registered(&mut cc, &["n1", "n2"]).await;
    let size = 16 << 20;
    let id = created(
        &mut cc,
        with_requirements(c::create("pvc-in", size, c::block_cap()), &["n1"], &[]),
    )
    .await
    .volume_id;
    let mut model = vec![0u8; size as usize];
    common::Rng::new(41).fill(&mut model);
    let dev = publish_and_attach(&mut cc, &n1, &mut csi1, &id).await;
    write_at(&dev, 0, &model).unwrap();
    detach_and_unpublish(&mut cc, &n1, &mut csi1, &id).await;

    use csi_proto::cluster::v1::{MoveVolumeRequest, cluster_client::ClusterClient};
    let mut mc = ClusterClient::new(c::channel(ctl.csi_socket()).await);
    let request = MoveVolumeRequest {
        volume_id: id.clone(),
        node_id: "n2".into(),
    };
    let mover = tokio::spawn(async move { mc.move_volume(request).await });
    eventually(30, "the copy into n2 began", async || {
        holds(&n2.agent, &tls, &id).await
    })
    .await;
    let drained = {
        let ctl = &ctl;
        tokio::task::block_in_place(|| drain_cli(ctl, "n2"))
    };
    assert!(drained.moved.is_empty(), "{drained:?}");
    // Rolled back by the time the drain answers.
    assert!(!holds(&n2.agent, &tls, &id).await, "n2 kept a copy");
    let e = mover.await.unwrap().unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("is draining"), "{e:?}");
    assert!(!holds(&n2.agent, &tls, &id).await, "n2 kept a copy");
    assert!(holds(&n1.agent, &tls, &id).await);
    contents_are(&mut cc, &n1, &mut csi1, &id, &model).await;
}

/// The controller dies after a restore for a pod on n2 made its fetching
/// volume there and before the seal, and the fetch ends before its
/// successor takes the move up again: the successor must not make the
/// volume anew (empty, with nothing left to fetch, then the source's copy
/// removed), so the restore keeps the snapshot's contents once n1's copy
/// is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_whose_fetch_ended_before_the_controller_came_back_keeps_its_data() {
    if !runnable() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let tls = root.path().join("tls");
    gen_certs(&tls);
    let n1 = NodeProc::start(root.path(), "n1", &tls);
    let n2 = NodeProc::start(root.path(), "n2", &tls);
    let mut ctl = ControllerProc::start(root.path(), &[&n1.agent, &n2.agent], &tls);
    let mut cc = ControllerClient::new(c::channel(ctl.csi_socket()).await);
    let mut csi1 = Csi::connect(&n1.csi_socket()).await;
    let mut csi2 = Csi::connect(&n2.csi_socket()).await;
    registered(&mut cc, &["n1", "n2"]).await;

    let size = 4 << 20;
    let src = created(
        &mut cc,
        with_requirements(c::create("pvc-src", size, c::block_cap()), &["n1"], &[]),
    )
    .await
    .volume_id;
    let mut model = vec![0u8; size as usize];
    common::Rng::new(31).fill(&mut model[1 << 20..3 << 20]);
    let dev = publish_and_attach(&mut cc, &n1, &mut csi1, &src).await;
    write_at(&dev, 1 << 20, &model[1 << 20..3 << 20]).unwrap();
    detach_and_unpublish(&mut cc, &n1, &mut csi1, &src).await;
    let snap = cc
        .create_snapshot(c::snapshot("snap-src", &src, false))
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap()
        .snapshot_id;

    ctl.proc.kill9();
    ctl.proc.env = vec![("STRATA_FAILPOINT".into(), "cluster::move::copied".into())];
    ctl.proc.spawn();
    let mut cc = ControllerClient::new(c::channel(ctl.csi_socket()).await);
    registered(&mut cc, &["n1", "n2"]).await;
    let restore = with_requirements(
        c::create_from(
            "pvc-restore-n2",
            size,
            c::block_cap(),
            Type::Snapshot(SnapshotSource {
                snapshot_id: snap.clone(),
            }),
        ),
        &["n2"],
        &["n2"],
    );
    let e = cc.create_volume(restore.clone()).await.unwrap_err();
    assert!(
        ctl.proc.log().contains("failpoint cluster::move::copied"),
        "{e:?}\n{}",
        ctl.proc.log()
    );
    // 2 MiB at the default rate: fetched before the successor asks.
    eventually_or(
        30,
        "n2's fetch ended",
        async || n2.proc.log().contains("the fetch of a volume ended"),
        || n2.proc.log(),
    )
    .await;
    ctl.proc.kill9();
    ctl.proc.env.clear();
    ctl.proc.spawn();
    let mut cc = ControllerClient::new(c::channel(ctl.csi_socket()).await);
    registered(&mut cc, &["n1", "n2"]).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let rid = loop {
        match cc.create_volume(restore.clone()).await {
            Ok(r) => break r.into_inner().volume.unwrap().volume_id,
            Err(e) if e.code() == Code::Unavailable && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(e) => panic!("CreateVolume again: {e:?}\n{}", ctl.proc.log()),
        }
    };
    eventually_or(
        60,
        "the restore on n2 alone",
        async || holds(&n2.agent, &tls, &rid).await && !holds(&n1.agent, &tls, &rid).await,
        || ctl.proc.log(),
    )
    .await;
    contents_are(&mut cc, &n2, &mut csi2, &rid, &model).await;
}

/// A fetch follows its source to a new address: while a restore for a pod
/// on n2 fetches from n1, n1 comes back on another port (a node whose pod
/// was made again) and the controller restarts knowing only the new one.
/// The controller's polls carry the new address, n2's reads and its
/// running fill go there, and the fetch ends with the model's contents.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_follows_its_source_to_a_new_address() {
    if !runnable() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let tls = root.path().join("tls");
    gen_certs(&tls);
    let mut n1 = NodeProc::start(root.path(), "n1", &tls);
    let n2 = NodeProc::start(root.path(), "n2", &tls);
    let start_ctl = |agents: &[&str]| {
        let mut ctl = ControllerProc::start(root.path(), agents, &tls);
        ctl.proc.kill9();
        ctl.proc.add_args(&["--move-rate", "1MiB"]);
        ctl.proc.spawn();
        ctl
    };
    let mut ctl = start_ctl(&[&n1.agent, &n2.agent]);
    let mut cc = ControllerClient::new(c::channel(ctl.csi_socket()).await);
    let mut csi1 = Csi::connect(&n1.csi_socket()).await;
    let mut csi2 = Csi::connect(&n2.csi_socket()).await;
    registered(&mut cc, &["n1", "n2"]).await;

    let size = 16 << 20;
    let src = created(
        &mut cc,
        with_requirements(c::create("pvc-src", size, c::block_cap()), &["n1"], &[]),
    )
    .await
    .volume_id;
    let mut model = vec![0u8; size as usize];
    common::Rng::new(31).fill(&mut model[..6 << 20]);
    let dev = publish_and_attach(&mut cc, &n1, &mut csi1, &src).await;
    write_at(&dev, 0, &model[..6 << 20]).unwrap();
    detach_and_unpublish(&mut cc, &n1, &mut csi1, &src).await;
    let snap = cc
        .create_snapshot(c::snapshot("snap-src", &src, false))
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap()
        .snapshot_id;
    let rid = created(
        &mut cc,
        with_requirements(
            c::create_from(
                "pvc-follow",
                size,
                c::block_cap(),
                Type::Snapshot(SnapshotSource { snapshot_id: snap }),
            ),
            &["n2"],
            &["n2"],
        ),
    )
    .await
    .volume_id;
    assert!(holds(&n2.agent, &tls, &rid).await);

    // n1 moves to another port; the controller knows only that one now.
    n1.move_agent();
    drop(ctl);
    ctl = start_ctl(&[&n1.agent, &n2.agent]);
    cc = ControllerClient::new(c::channel(ctl.csi_socket()).await);
    registered(&mut cc, &["n1", "n2"]).await;
    eventually_or(
        90,
        "the fetch ends and n1's copy of the restore goes",
        async || !holds(&n1.agent, &tls, &rid).await,
        || format!("{}\n{}", n2.proc.log(), ctl.proc.log()),
    )
    .await;
    assert!(
        n2.proc.log().contains("reaches its source anew"),
        "{}",
        n2.proc.log()
    );
    n1.proc.kill9();
    contents_are(&mut cc, &n2, &mut csi2, &rid, &model).await;
}

/// The 8-byte counter at the start of snapshot `snap`, read through a
/// volume restored from it on its own node (then deleted).
async fn counter_in(
    cc: &mut ControllerClient<tonic::transport::Channel>,
    node: &NodeProc,
    csi: &mut Csi,
    snap: &str,
) -> u64 {
    let mut req = pinned(c::create(&format!("read-{snap}"), 16 << 20, c::block_cap()));
    req.volume_content_source = Some(VolumeContentSource {
        r#type: Some(Type::Snapshot(SnapshotSource {
            snapshot_id: snap.into(),
        })),
    });
    let v = created(cc, req).await;
    assert_eq!(
        node_of(&v),
        node.id,
        "a restore stays on its snapshot's node"
    );
    let dev = attach(node, csi, &v.volume_id).await;
    let n = u64::from_le_bytes(read_at(&dev, 0, 4096)[..8].try_into().unwrap());
    detach(node, csi, &v.volume_id).await;
    cc.delete_volume(DeleteVolumeRequest {
        volume_id: v.volume_id,
        ..Default::default()
    })
    .await
    .unwrap();
    n
}

/// Group snapshots of volumes on two nodes: a writer writes volume A
/// through its device on n1 and then volume B through its device on n2
/// (each write flushed before the next); every group the controller cuts
/// holds a B no newer than its A and at most one write behind, and the
/// writer's longest write shows how long the cut held it. A node that
/// dies holding its members' writes fails the group, the other node's
/// hold is released at once, and after the restart the same call cuts the
/// group whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_snapshots_cut_volumes_on_two_nodes_at_one_instant() {
    use csi_proto::csi::v1::group_controller_client::GroupControllerClient;
    use std::sync::atomic::{AtomicBool, Ordering};
    if !runnable() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let tls = root.path().join("tls");
    gen_certs(&tls);
    let n1 = NodeProc::start(root.path(), "n1", &tls);
    let mut n2 = NodeProc::start(root.path(), "n2", &tls);
    let ctl = ControllerProc::start(root.path(), &[&n1.agent, &n2.agent], &tls);
    let mut cc = ControllerClient::new(c::channel(ctl.csi_socket()).await);
    let mut csi1 = Csi::connect(&n1.csi_socket()).await;
    let mut csi2 = Csi::connect(&n2.csi_socket()).await;
    registered(&mut cc, &["n1", "n2"]).await;
    let on = |name: &str, node: &str| {
        with_requirements(
            pinned(c::create(name, 16 << 20, c::block_cap())),
            &[node],
            &[],
        )
    };
    let a = created(&mut cc, on("pvc-ga", "n1")).await.volume_id;
    let b = created(&mut cc, on("pvc-gb", "n2")).await.volume_id;
    let dev_a = attach(&n1, &mut csi1, &a).await;
    let dev_b = attach(&n2, &mut csi2, &b).await;

    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let (mut n, mut longest) = (0u64, Duration::ZERO);
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let mut block = vec![0u8; 4096];
                block[..8].copy_from_slice(&n.to_le_bytes());
                for dev in [&dev_a, &dev_b] {
                    let t = Instant::now();
                    write_at(dev, 0, &block).unwrap();
                    longest = longest.max(t.elapsed());
                }
            }
            (n, longest)
        })
    };
    let mut g = GroupControllerClient::new(c::channel(ctl.csi_socket()).await);
    let group_req = |name: &str| CreateVolumeGroupSnapshotRequest {
        name: name.into(),
        source_volume_ids: vec![a.clone(), b.clone()],
        ..Default::default()
    };
    let mut groups = Vec::new();
    for round in 0..3 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let group = g
            .create_volume_group_snapshot(group_req(&format!("vgs-{round}")))
            .await
            .unwrap_or_else(|e| panic!("group {round}: {e:?}"))
            .into_inner()
            .group_snapshot
            .unwrap();
        assert!(group.ready_to_use);
        groups.push(group);
    }
    let (written, longest) = tokio::task::spawn_blocking(move || {
        stop.store(true, Ordering::Relaxed);
        writer.join().unwrap()
    })
    .await
    .unwrap();
    eprintln!("{written} writes to each volume; the longest took {longest:?}");
    assert!(
        longest < Duration::from_secs(2),
        "a write waited {longest:?}"
    );
    for (round, group) in groups.iter().enumerate() {
        let member = |v: &str| {
            let m = group
                .snapshots
                .iter()
                .find(|m| m.source_volume_id == v)
                .unwrap();
            assert_eq!(m.group_snapshot_id, group.group_snapshot_id);
            m.snapshot_id.clone()
        };
        let na = counter_in(&mut cc, &n1, &mut csi1, &member(&a)).await;
        let nb = counter_in(&mut cc, &n2, &mut csi2, &member(&b)).await;
        assert!(
            na >= 1 && (nb == na || nb + 1 == na),
            "group {round}: A (n1) holds write {na}, B (n2) holds write {nb}"
        );
    }
    detach(&n1, &mut csi1, &a).await;
    detach(&n2, &mut csi2, &b).await;

    // Two groups at once, each with a member on each node: both are cut,
    // neither waits out a deadline. (The controller cuts one group at a
    // time, since two at once could each take one node's hold and wait
    // for the other's; this does not force that interleaving, which is
    // rare on loopback.)
    let c_ = created(&mut cc, on("pvc-gc", "n1")).await.volume_id;
    let d = created(&mut cc, on("pvc-gd", "n2")).await.volume_id;
    let t = Instant::now();
    let (mut gx, mut gy) = (g.clone(), g.clone());
    let (g1, g2) = tokio::join!(
        gx.create_volume_group_snapshot(group_req("vgs-x")),
        gy.create_volume_group_snapshot(CreateVolumeGroupSnapshotRequest {
            name: "vgs-y".into(),
            source_volume_ids: vec![c_.clone(), d.clone()],
            ..Default::default()
        })
    );
    let both = t.elapsed();
    assert!(
        both < Duration::from_secs(2),
        "two groups at once took {both:?}"
    );
    for r in [g1, g2] {
        groups.push(r.unwrap().into_inner().group_snapshot.unwrap());
    }

    // n2 dies holding B's writes: the group fails, A's hold on n1 is
    // released (A takes writes at once), and after n2's restart the same
    // call cuts the group whole.
    n2.proc.kill9();
    n2.proc.env = vec![("STRATA_FAILPOINT".into(), "agent::hold_group::held".into())];
    n2.proc.spawn();
    n2.wait_for_agent();
    registered(&mut cc, &["n1", "n2"]).await;
    let dev_a = attach(&n1, &mut csi1, &a).await;
    let e = g
        .create_volume_group_snapshot(group_req("vgs-crash"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            e.code(),
            Code::Unavailable | Code::Unknown | Code::Cancelled | Code::Internal
        ),
        "{e:?}"
    );
    // n1's hold is released at once, not at its 3 s deadline.
    let failed = Instant::now();
    write_at(&dev_a, 0, &[7u8; 4096]).unwrap();
    assert!(
        failed.elapsed() < Duration::from_millis(1500),
        "A's write waited {:?} after the group failed",
        failed.elapsed()
    );
    detach(&n1, &mut csi1, &a).await;
    n2.proc.kill9();
    n2.proc.env.clear();
    n2.proc.spawn();
    n2.wait_for_agent();
    registered(&mut cc, &["n1", "n2"]).await;
    let group = g
        .create_volume_group_snapshot(group_req("vgs-crash"))
        .await
        .unwrap()
        .into_inner()
        .group_snapshot
        .unwrap();
    assert!(group.ready_to_use && group.snapshots.len() == 2);
    let na = counter_in(
        &mut cc,
        &n1,
        &mut csi1,
        &group
            .snapshots
            .iter()
            .find(|m| m.source_volume_id == a)
            .unwrap()
            .snapshot_id,
    )
    .await;
    assert_eq!(na, u64::from_le_bytes([7u8; 8]));
    groups.push(group);
    for group in &groups {
        g.delete_volume_group_snapshot(DeleteVolumeGroupSnapshotRequest {
            group_snapshot_id: group.group_snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let left = cc
        .list_snapshots(ListSnapshotsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert!(left.is_empty(), "{left:?}");
}
