//! The CSI Identity and Controller services over the standalone's unix
//! socket, with a real gRPC client: required fields, idempotency by name,
//! error codes, clones, expansion and pagination.

mod common;

use std::collections::HashMap;

use common::standalone::Standalone;
use csi_proto::csi::v1::controller_client::ControllerClient;
use csi_proto::csi::v1::identity_client::IdentityClient;
use csi_proto::csi::v1::volume_capability::{AccessMode, access_mode::Mode};
use csi_proto::csi::v1::volume_content_source::{SnapshotSource, Type, VolumeSource};
use csi_proto::csi::v1::*;
use tonic::Code;
use tonic::transport::Channel;

async fn channel(s: &Standalone) -> Channel {
    common::csi::channel(s.csi_socket()).await
}

/// Most of these volumes are tiny: raw block, so no filesystem minimum
/// applies.
fn create(name: &str, bytes: i64) -> CreateVolumeRequest {
    common::csi::create(name, bytes, common::csi::block_cap())
}

/// Where `scripts/install-deps` unpacks grpcio from PyPI (a grpc C-core
/// client; Debian's python3-grpcio predates the authority it sends).
const GRPCIO: &str = "/usr/local/lib/strata-test/python";

/// A Python client on grpc C-core sends the percent-encoded socket path as
/// `:authority` (`tmp%2F...%2Fcsi.sock`), which h2 alone resets with
/// PROTOCOL_ERROR. Three calls on one channel: the later ones name the
/// client's HPACK table entries from the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_core_clients_are_served_on_the_unix_socket() {
    let have = std::path::Path::new(GRPCIO).join("grpc").exists();
    if common::require(
        have,
        &format!("grpcio is not unpacked at {GRPCIO} (scripts/install-deps)"),
    )
    .is_err()
    {
        return;
    }
    let s = Standalone::start();
    let script = r#"
import grpc, sys
for target in ("unix://" + sys.argv[1], "unix:" + sys.argv[1]):
    channel = grpc.insecure_channel(target)
    for method in ("/csi.v1.Identity/GetPluginInfo", "/csi.v1.Identity/Probe",
                   "/csi.v1.Controller/ControllerGetCapabilities"):
        call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        reply = call(b"", timeout=10)
        print(method, reply.hex())
"#;
    let out = std::process::Command::new("/usr/bin/python3")
        .env("PYTHONPATH", GRPCIO)
        .args(["-c", script])
        .arg(s.csi_socket())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.lines().count(), 6, "{stdout}");
    let name: String = b"csi.strata.dev"
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert!(stdout.lines().next().unwrap().contains(&name), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_reports_name_capabilities_and_readiness() {
    let s = Standalone::start();
    let mut id = IdentityClient::new(channel(&s).await);
    let info = id
        .get_plugin_info(GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, "csi.strata.dev");
    assert!(!info.vendor_version.is_empty());
    let probe = id.probe(ProbeRequest {}).await.unwrap().into_inner();
    assert_eq!(probe.ready, Some(true));
    let caps = id
        .get_plugin_capabilities(GetPluginCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(caps.capabilities.len(), 5, "{caps:?}");
    // What the external-snapshot-metadata sidecar waits for at start.
    use csi_proto::csi::v1::plugin_capability::{Service, Type as Cap, service};
    assert!(caps.capabilities.iter().any(|c| c.r#type
        == Some(Cap::Service(Service {
            r#type: service::Type::SnapshotMetadataService as i32
        }))));
    // What the csi-snapshotter checks before it handles group snapshots.
    assert!(caps.capabilities.iter().any(|c| c.r#type
        == Some(Cap::Service(Service {
            r#type: service::Type::GroupControllerService as i32
        }))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_volume_is_idempotent_by_name_and_checks_its_arguments() {
    let s = Standalone::start();
    let mut c = ControllerClient::new(channel(&s).await);
    let a = c
        .create_volume(create("pvc-a", 10 << 20))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(
        a.capacity_bytes,
        10 << 20,
        "whole blocks are honoured exactly"
    );
    assert_eq!(
        a.accessible_topology[0].segments["topology.strata.dev/node"],
        "test-node"
    );
    let again = c
        .create_volume(create("pvc-a", 10 << 20))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(again.volume_id, a.volume_id);
    let other = c
        .create_volume(create("pvc-a", 20 << 20))
        .await
        .unwrap_err();
    assert_eq!(other.code(), Code::AlreadyExists);
    let odd = c
        .create_volume(create("pvc-odd", 10_000))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(
        odd.capacity_bytes, 12_288,
        "rounded up to whole 4 KiB blocks"
    );

    let mut no_name = create("", 4096);
    no_name.name.clear();
    assert_eq!(
        c.create_volume(no_name).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let mut no_caps = create("pvc-b", 4096);
    no_caps.volume_capabilities.clear();
    assert_eq!(
        c.create_volume(no_caps).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let mut bad_param = create("pvc-c", 4096);
    bad_param.parameters = HashMap::from([("replicas".to_string(), "3".to_string())]);
    assert_eq!(
        c.create_volume(bad_param).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let mut bad_range = create("pvc-d", 8192);
    bad_range.capacity_range = Some(CapacityRange {
        required_bytes: 8192,
        limit_bytes: 4096,
    });
    assert_eq!(
        c.create_volume(bad_range).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let mut multi = create("pvc-e", 4096);
    multi.volume_capabilities[0].access_mode = Some(AccessMode {
        mode: Mode::MultiNodeMultiWriter as i32,
    });
    assert_eq!(
        c.create_volume(multi).await.unwrap_err().code(),
        Code::InvalidArgument
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_clones_expansion_and_deletes_follow_the_spec() {
    let s = Standalone::start();
    let mut c = ControllerClient::new(channel(&s).await);
    let vol = c
        .create_volume(create("src", 8 << 20))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let snap_req = |name: &str, src: &str| CreateSnapshotRequest {
        source_volume_id: src.into(),
        name: name.into(),
        ..Default::default()
    };
    let snap = c
        .create_snapshot(snap_req("snap-1", &vol.volume_id))
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert!(snap.ready_to_use && snap.size_bytes == 8 << 20);
    let again = c
        .create_snapshot(snap_req("snap-1", &vol.volume_id))
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert_eq!(again.snapshot_id, snap.snapshot_id);
    let other = c
        .create_volume(create("other", 4 << 20))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let clash = c
        .create_snapshot(snap_req("snap-1", &other.volume_id))
        .await
        .unwrap_err();
    assert_eq!(clash.code(), Code::AlreadyExists);
    let missing = c
        .create_snapshot(snap_req("snap-2", "00000000-0000-4000-8000-000000000000"))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);

    // Restore, bigger than the snapshot; and a clone of the volume.
    let mut restore = create("restore", 16 << 20);
    restore.volume_content_source = Some(VolumeContentSource {
        r#type: Some(Type::Snapshot(SnapshotSource {
            snapshot_id: snap.snapshot_id.clone(),
        })),
    });
    let restored = c
        .create_volume(restore.clone())
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(restored.capacity_bytes, 16 << 20);
    assert!(restored.content_source.is_some());
    let mut clone = create("clone", 0);
    clone.capacity_range = None;
    clone.volume_content_source = Some(VolumeContentSource {
        r#type: Some(Type::Volume(VolumeSource {
            volume_id: vol.volume_id.clone(),
        })),
    });
    let cloned = c
        .create_volume(clone.clone())
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(
        cloned.capacity_bytes,
        8 << 20,
        "a clone defaults to its source's size"
    );
    let mut unknown = create("ghost", 0);
    unknown.volume_content_source = Some(VolumeContentSource {
        r#type: Some(Type::Snapshot(SnapshotSource {
            snapshot_id: "not-a-snapshot".into(),
        })),
    });
    assert_eq!(
        c.create_volume(unknown).await.unwrap_err().code(),
        Code::NotFound
    );

    // Expansion.
    let grown = c
        .controller_expand_volume(ControllerExpandVolumeRequest {
            volume_id: vol.volume_id.clone(),
            capacity_range: Some(CapacityRange {
                required_bytes: 12 << 20,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(grown.capacity_bytes, 12 << 20);
    assert!(grown.node_expansion_required);

    // Deleting the source first works; deleting twice works.
    for _ in 0..2 {
        c.delete_volume(DeleteVolumeRequest {
            volume_id: vol.volume_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
        c.delete_snapshot(DeleteSnapshotRequest {
            snapshot_id: snap.snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let got = c
        .controller_get_volume(ControllerGetVolumeRequest {
            volume_id: restored.volume_id.clone(),
        })
        .await;
    assert!(got.is_ok(), "the restore outlives its source");
    // A retry of a create whose answer was lost gets that answer, its
    // source gone (and the clone's grown before) or not.
    for (req, made) in [(restore, &restored), (clone, &cloned)] {
        let again = c.create_volume(req).await.unwrap().into_inner().volume;
        assert_eq!(again.as_ref(), Some(made));
    }
    assert_eq!(
        c.delete_volume(DeleteVolumeRequest::default())
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_volumes_paginates_and_refuses_foreign_tokens() {
    let s = Standalone::start();
    let mut c = ControllerClient::new(channel(&s).await);
    for i in 0..5 {
        c.create_volume(create(&format!("v{i}"), 4096))
            .await
            .unwrap();
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = c
            .list_volumes(ListVolumesRequest {
                max_entries: 2,
                starting_token: token,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.entries.len() <= 2);
        // VOLUME_CONDITION is advertised, so every entry carries one.
        for e in &page.entries {
            let condition = e.status.as_ref().and_then(|s| s.volume_condition.as_ref());
            let condition = condition.unwrap_or_else(|| panic!("no volume_condition: {e:?}"));
            assert!(!condition.abnormal, "{e:?}");
            assert!(!condition.message.is_empty(), "{e:?}");
        }
        seen.extend(
            page.entries
                .into_iter()
                .map(|e| e.volume.unwrap().volume_id),
        );
        if page.next_token.is_empty() {
            break;
        }
        token = page.next_token;
    }
    assert_eq!(seen.len(), 5);
    let mut sorted = seen.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), 5, "no entry twice");
    let bad = c
        .list_volumes(ListVolumesRequest {
            max_entries: 2,
            starting_token: "garbage".into(),
        })
        .await;
    assert_eq!(bad.unwrap_err().code(), Code::Aborted);
}

/// Merges through the CLI and the admin API: what deleting a snapshot
/// frees, the fold it starts, a requested merge, `strata jobs`, and the
/// metrics that show them; the data stays the same throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merges_through_the_cli_admin_api_and_metrics() {
    use std::os::unix::net::UnixStream;
    use strata::frontend::nbd::client::Client;
    let s = Standalone::start();
    let v = s.create_volume("merged", "8MiB");
    let nbd = || Client::connect(UnixStream::connect(s.nbd_socket()).unwrap(), &v).unwrap();
    let mut c = nbd();
    let mut want = vec![0u8; 8 << 20];
    for (round, fill) in [(0u64, 1u8), (1, 2), (2, 3)] {
        // Round 1 and 2 overwrite part of what round 0 wrote.
        let off = round * (1 << 20);
        let data = vec![fill; 4 << 20];
        c.write(off, &data).unwrap();
        want[off as usize..off as usize + data.len()].copy_from_slice(&data);
        c.flush().unwrap();
        if round < 2 {
            s.snapshot(&format!("snap-{round}"), &v);
        }
    }
    let snaps = s.cli_json(&["snapshot", "list"]);
    let oldest = snaps
        .as_array()
        .unwrap()
        .iter()
        .min_by_key(|x| x["created"].as_str().unwrap().to_string())
        .unwrap()
        .clone();
    assert!(oldest["frees_bytes"].as_u64().unwrap() > 0, "{snaps}");
    let out = s.cli(&["snapshot", "delete", oldest["id"].as_str().unwrap()]);
    assert!(out.status.success());
    // The fold it starts, then a merge down to one layer, waited for.
    let merged = s.cli_json(&["volume", "merge", &v, "--max-depth", "1", "--wait"]);
    assert_eq!(merged[0]["state"], "done", "{merged}");
    let jobs = s.cli_json(&["jobs"]);
    let kinds: Vec<&str> = jobs
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["kind"].as_str().unwrap())
        .collect();
    assert!(
        kinds.contains(&"fold") && kinds.contains(&"merge"),
        "{jobs}"
    );
    let metrics = s.metrics();
    assert!(
        metrics.contains(&format!("strata_volume_chain_depth{{volume=\"{v}\"}} 1")),
        "{metrics}"
    );
    assert!(metrics.contains("strata_jobs{kind=\"merge\",state=\"done\"} 1"));
    assert!(metrics.contains("strata_job_bytes_total{kind="));
    assert!(metrics.contains("strata_job_hold_seconds_bucket"));
    let mut got = vec![0u8; 8 << 20];
    nbd().read(0, &mut got).unwrap();
    assert!(got == want, "the data survived the merges");
    let missing = s.cli(&["volume", "merge", "00000000-0000-4000-8000-000000000000"]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("not found"));
}

/// Every message of a GetMetadataAllocated or GetMetadataDelta stream:
/// (type, capacity, ranges) per message.
async fn metadata_pages<R, F>(
    mut stream: tonic::Streaming<R>,
    parts: F,
) -> Vec<(i32, i64, Vec<(i64, i64)>)>
where
    F: Fn(R) -> (i32, i64, Vec<BlockMetadata>),
{
    let mut out = Vec::new();
    while let Some(m) = stream.message().await.unwrap() {
        let (t, c, ranges) = parts(m);
        out.push((
            t,
            c,
            ranges
                .into_iter()
                .map(|r| (r.byte_offset, r.size_bytes))
                .collect(),
        ));
    }
    out
}

/// The SnapshotMetadata service over the socket: a snapshot's allocated
/// ranges and the ranges changed between two snapshots, as extents
/// (VARIABLE_LENGTH), paged by max_results, from a starting offset; and
/// the spec's errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_metadata_streams_allocated_and_changed_ranges() {
    use csi_proto::csi::v1::snapshot_metadata_client::SnapshotMetadataClient;
    use std::os::unix::net::UnixStream;
    use strata::frontend::nbd::client::Client;
    const B: i64 = 4096;
    let s = Standalone::start();
    let v = s.create_volume("tracked", "64MiB");
    let other = s.create_volume("other", "4MiB");
    let mut c = Client::connect(UnixStream::connect(s.nbd_socket()).unwrap(), &v).unwrap();
    c.write(0, &[1u8; 2 * 4096]).unwrap();
    c.write(100 * 4096, &[2u8; 4096]).unwrap();
    c.flush().unwrap();
    let s1 = s.snapshot("s1", &v);
    c.write(5 * 4096, &[3u8; 3 * 4096]).unwrap();
    c.write(4096, &[4u8; 4096]).unwrap();
    c.flush().unwrap();
    let s2 = s.snapshot("s2", &v);
    let s_other = s.snapshot("s-other", &other);

    let mut m = SnapshotMetadataClient::new(channel(&s).await);
    let allocated =
        |snapshot_id: &str, starting_offset: i64, max_results: i32| GetMetadataAllocatedRequest {
            snapshot_id: snapshot_id.into(),
            starting_offset,
            max_results,
            ..Default::default()
        };
    let delta = |base: &str, target: &str, starting_offset: i64, max_results: i32| {
        GetMetadataDeltaRequest {
            base_snapshot_id: base.into(),
            target_snapshot_id: target.into(),
            starting_offset,
            max_results,
            ..Default::default()
        }
    };
    let a_parts = |r: GetMetadataAllocatedResponse| {
        (
            r.block_metadata_type,
            r.volume_capacity_bytes,
            r.block_metadata,
        )
    };
    let d_parts = |r: GetMetadataDeltaResponse| {
        (
            r.block_metadata_type,
            r.volume_capacity_bytes,
            r.block_metadata,
        )
    };
    let variable = BlockMetadataType::VariableLength as i32;
    let cap = 64 << 20;

    let pages = metadata_pages(
        m.get_metadata_allocated(allocated(&s1, 0, 0))
            .await
            .unwrap()
            .into_inner(),
        a_parts,
    )
    .await;
    assert_eq!(pages, [(variable, cap, vec![(0, 2 * B), (100 * B, B)])]);
    // One range a message; from an offset inside the first range.
    let pages = metadata_pages(
        m.get_metadata_allocated(allocated(&s2, B + 7, 1))
            .await
            .unwrap()
            .into_inner(),
        a_parts,
    )
    .await;
    assert_eq!(
        pages,
        [
            (variable, cap, vec![(B, B)]),
            (variable, cap, vec![(5 * B, 3 * B)]),
            (variable, cap, vec![(100 * B, B)]),
        ]
    );
    let pages = metadata_pages(
        m.get_metadata_delta(delta(&s1, &s2, 0, 0))
            .await
            .unwrap()
            .into_inner(),
        d_parts,
    )
    .await;
    assert_eq!(pages, [(variable, cap, vec![(B, B), (5 * B, 3 * B)])]);
    let pages = metadata_pages(
        m.get_metadata_delta(delta(&s2, &s2, 0, 0))
            .await
            .unwrap()
            .into_inner(),
        d_parts,
    )
    .await;
    assert_eq!(pages, [(variable, cap, vec![])]);

    let unknown = "00000000000000000000000000000001";
    for (req, code) in [
        (allocated("", 0, 0), Code::InvalidArgument),
        (allocated("not-a-snapshot", 0, 0), Code::NotFound),
        (allocated(unknown, 0, 0), Code::NotFound),
        (allocated(&s1, -1, 0), Code::InvalidArgument),
        (allocated(&s1, 0, -5), Code::InvalidArgument),
        (allocated(&s1, cap, 0), Code::OutOfRange),
    ] {
        let e = m.get_metadata_allocated(req.clone()).await.unwrap_err();
        assert_eq!(e.code(), code, "{req:?}: {e:?}");
    }
    // The CLI's diff: the same ranges, and their bytes.
    let diff = s.cli_json(&["snapshot", "diff", &s1, &s2]);
    assert_eq!(diff["changed_bytes"], 4 * B, "{diff}");
    assert_eq!(diff["ranges"][1]["offset"], 5 * B, "{diff}");
    let out = s.cli(&["snapshot", "diff", &s2, &s1]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is not an older snapshot"),
        "{out:?}"
    );
    for (req, code) in [
        (delta("", &s2, 0, 0), Code::InvalidArgument),
        (delta(unknown, &s2, 0, 0), Code::NotFound),
        // The base newer than the target; snapshots of two volumes.
        (delta(&s2, &s1, 0, 0), Code::InvalidArgument),
        (delta(&s_other, &s2, 0, 0), Code::InvalidArgument),
        (delta(&s1, &s2, cap, 0), Code::OutOfRange),
    ] {
        let e = m.get_metadata_delta(req.clone()).await.unwrap_err();
        assert_eq!(e.code(), code, "{req:?}: {e:?}");
    }
}

/// Per-volume I/O limits through the real services: set at CreateVolume
/// (`mutable_parameters`), enforced on NBD I/O, changed by
/// ControllerModifyVolume while a client is connected, kept across a
/// kill -9, shown in metrics; bad parameters are INVALID_ARGUMENT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn io_limits_are_set_enforced_changed_in_use_and_kept() {
    use std::os::unix::net::UnixStream;
    use std::time::{Duration, Instant};
    use strata::frontend::nbd::client::Client;
    let mut s = Standalone::start();
    let mut cc = ControllerClient::new(channel(&s).await);
    let caps = cc
        .controller_get_capabilities(ControllerGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    let modify_cap = ControllerServiceCapability {
        r#type: Some(controller_service_capability::Type::Rpc(
            controller_service_capability::Rpc {
                r#type: controller_service_capability::rpc::Type::ModifyVolume as i32,
            },
        )),
    };
    assert!(caps.capabilities.contains(&modify_cap), "{caps:?}");
    let mutable = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let mut req = create("limited", 16 << 20);
    req.mutable_parameters = mutable(&[("writeIOPS", "50")]);
    let v = cc
        .create_volume(req)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let mut bad = create("bad-limits", 16 << 20);
    bad.mutable_parameters = mutable(&[("writeIOPS", "fast")]);
    assert_eq!(
        cc.create_volume(bad).await.unwrap_err().code(),
        Code::InvalidArgument
    );

    let connect =
        |s: &Standalone| Client::connect(UnixStream::connect(s.nbd_socket()).unwrap(), &v).unwrap();
    let mut c = connect(&s);
    let timed = |c: &mut Client<UnixStream>, n: usize, write: bool| {
        let started = Instant::now();
        let mut buf = vec![7u8; 4096];
        for i in 0..n {
            if write {
                c.write(i as u64 * 4096, &buf).unwrap();
            } else {
                c.read(i as u64 * 4096, &mut buf).unwrap();
            }
        }
        started.elapsed()
    };
    // 40 writes at 50 IOPS: about 0.7 s after the burst.
    let took = timed(&mut c, 40, true);
    assert!(took >= Duration::from_millis(500), "{took:?}");
    let series = |kind: &str| {
        format!("strata_volume_throttled_seconds_total{{volume=\"{v}\",kind=\"{kind}\"}}")
    };
    let m = s.metrics();
    assert!(
        common::standalone::metric_value(&m, &series("write")).unwrap() > 0.3,
        "{m}"
    );
    assert!(
        m.contains(&format!(
            "strata_volume_limit{{volume=\"{v}\",kind=\"write_iops\"}} 50"
        )),
        "{m}"
    );

    // Changed while the client is connected: reads 100 IOPS, and writes,
    // which the new parameters do not name, unlimited.
    let modify = |pairs: &[(&str, &str)], id: &str| ControllerModifyVolumeRequest {
        volume_id: id.into(),
        mutable_parameters: mutable(pairs),
        ..Default::default()
    };
    cc.controller_modify_volume(modify(&[("readIOPS", "100")], &v))
        .await
        .unwrap();
    let took = timed(&mut c, 40, true);
    assert!(took < Duration::from_millis(400), "{took:?}");
    let took = timed(&mut c, 60, false);
    assert!(took >= Duration::from_millis(400), "{took:?}");

    // Kept across a kill -9: the reads are still limited.
    drop(c);
    s.kill9();
    s.spawn();
    let mut c = connect(&s);
    let took = timed(&mut c, 60, false);
    assert!(
        took >= Duration::from_millis(400),
        "after the restart: {took:?}"
    );
    let mut cc = ControllerClient::new(channel(&s).await);
    for (req, code) in [
        (modify(&[("iops", "5")], &v), Code::InvalidArgument),
        (modify(&[], &v), Code::InvalidArgument),
        (
            modify(&[("readBytesPerSecond", "10")], &v),
            Code::InvalidArgument,
        ),
        (modify(&[("readIOPS", "5")], ""), Code::InvalidArgument),
        (
            modify(&[("readIOPS", "5")], "00000000-0000-0000-0000-000000000001"),
            Code::NotFound,
        ),
    ] {
        let e = cc.controller_modify_volume(req.clone()).await.unwrap_err();
        assert_eq!(e.code(), code, "{req:?}: {e:?}");
    }
}

/// Reads the 8-byte counter at the start of an export (a volume or a
/// snapshot) over NBD.
fn counter_of(s: &Standalone, export: &str) -> u64 {
    use std::os::unix::net::UnixStream;
    use strata::frontend::nbd::client::Client;
    let mut c = Client::connect(UnixStream::connect(s.nbd_socket()).unwrap(), export).unwrap();
    let mut buf = [0u8; 8];
    c.read(0, &mut buf).unwrap();
    u64::from_le_bytes(buf)
}

/// Group snapshots through the GroupController service: under a writer
/// that writes volume A and then volume B (each after the last write was
/// acknowledged), every group holds a B no newer than its A and at most
/// one write behind; the writer's longest wait is the hold. Idempotent by
/// name; the spec's errors; a member restores on its own; a delete takes
/// every member; and a group cut short by a crash (after the hold, and
/// after the cut) is cut again whole by the next call, leaving nothing
/// behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_snapshots_cut_every_member_at_one_instant() {
    use csi_proto::csi::v1::group_controller_client::GroupControllerClient;
    use std::os::unix::net::UnixStream;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};
    use strata::frontend::nbd::client::Client;
    let mut s = Standalone::start();
    let a = s.create_volume("group-a", "16MiB");
    let b = s.create_volume("group-b", "16MiB");
    let lone = s.create_volume("lone", "4MiB");
    let lone_snap = s.snapshot("lone-snap", &lone);

    let caps = GroupControllerClient::new(channel(&s).await)
        .group_controller_get_capabilities(GroupControllerGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(caps.capabilities.len(), 1, "{caps:?}");

    let stop = Arc::new(AtomicBool::new(false));
    let longest = Arc::new(Mutex::new(Duration::ZERO));
    let writer = {
        let (socket, a, b) = (s.nbd_socket(), a.clone(), b.clone());
        let (stop, longest) = (Arc::clone(&stop), Arc::clone(&longest));
        std::thread::spawn(move || {
            let mut ca = Client::connect(UnixStream::connect(&socket).unwrap(), &a).unwrap();
            let mut cb = Client::connect(UnixStream::connect(&socket).unwrap(), &b).unwrap();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                for c in [&mut ca, &mut cb] {
                    let t = Instant::now();
                    c.write(0, &n.to_le_bytes()).unwrap();
                    let mut l = longest.lock().unwrap();
                    *l = (*l).max(t.elapsed());
                }
            }
            n
        })
    };
    let mut g = GroupControllerClient::new(channel(&s).await);
    let group_req = |name: &str, volumes: &[&String]| CreateVolumeGroupSnapshotRequest {
        name: name.into(),
        source_volume_ids: volumes.iter().map(|v| v.to_string()).collect(),
        ..Default::default()
    };
    let mut groups = Vec::new();
    for round in 0..8 {
        std::thread::sleep(Duration::from_millis(30));
        let group = g
            .create_volume_group_snapshot(group_req(&format!("vgs-{round}"), &[&b, &a]))
            .await
            .unwrap()
            .into_inner()
            .group_snapshot
            .unwrap();
        assert!(group.ready_to_use);
        assert!(group.creation_time.is_some());
        assert_eq!(group.snapshots.len(), 2);
        let member = |v: &str| {
            let m = group
                .snapshots
                .iter()
                .find(|m| m.source_volume_id == v)
                .unwrap();
            assert_eq!(m.group_snapshot_id, group.group_snapshot_id);
            assert!(m.ready_to_use && m.size_bytes == 16 << 20);
            m.snapshot_id.clone()
        };
        let (na, nb) = (counter_of(&s, &member(&a)), counter_of(&s, &member(&b)));
        assert!(
            na >= 1 && (nb == na || nb + 1 == na),
            "group {round}: A holds write {na}, B holds write {nb}"
        );
        groups.push(group);
    }
    stop.store(true, Ordering::Relaxed);
    let written = writer.join().unwrap();
    let longest = *longest.lock().unwrap();
    eprintln!("{written} writes to each volume; the longest write took {longest:?}");
    assert!(
        longest < Duration::from_secs(1),
        "a write waited {longest:?}"
    );

    let metrics = s.metrics();
    assert!(
        metrics.contains("strata_group_snapshot_hold_seconds_count 8"),
        "{metrics}"
    );

    // Idempotent by name; another set of volumes under that name is not.
    let first = &groups[0];
    let again = g
        .create_volume_group_snapshot(group_req("vgs-0", &[&a, &b]))
        .await
        .unwrap()
        .into_inner()
        .group_snapshot
        .unwrap();
    assert_eq!(again.group_snapshot_id, first.group_snapshot_id);
    let e = g
        .create_volume_group_snapshot(group_req("vgs-0", &[&a]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    // Arguments.
    for (req, code) in [
        (group_req("", &[&a]), Code::InvalidArgument),
        (group_req("x", &[]), Code::InvalidArgument),
        (group_req("x", &[&a, &a]), Code::InvalidArgument),
        (
            group_req(
                "x",
                &[&a, &"1c0ffee0-0000-4000-8000-000000000000".to_string()],
            ),
            Code::NotFound,
        ),
        (
            CreateVolumeGroupSnapshotRequest {
                parameters: HashMap::from([("freezeFilesystem".into(), "true".into())]),
                ..group_req("x", &[&a])
            },
            Code::InvalidArgument,
        ),
    ] {
        let e = g.create_volume_group_snapshot(req).await.unwrap_err();
        assert_eq!(e.code(), code, "{e:?}");
    }
    assert!(
        g.get_volume_group_snapshot(GetVolumeGroupSnapshotRequest {
            group_snapshot_id: "x".into(),
            ..Default::default()
        })
        .await
        .is_err_and(|e| e.code() == Code::NotFound)
    );
    let ids = |grp: &VolumeGroupSnapshot| -> Vec<String> {
        let mut ids: Vec<String> = grp
            .snapshots
            .iter()
            .map(|m| m.snapshot_id.clone())
            .collect();
        ids.sort();
        ids
    };
    let got = g
        .get_volume_group_snapshot(GetVolumeGroupSnapshotRequest {
            group_snapshot_id: first.group_snapshot_id.clone(),
            snapshot_ids: ids(first),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .group_snapshot
        .unwrap();
    assert_eq!(ids(&got), ids(first));
    let mut foreign = ids(first);
    foreign.push(lone_snap.clone());
    let e = g
        .get_volume_group_snapshot(GetVolumeGroupSnapshotRequest {
            group_snapshot_id: first.group_snapshot_id.clone(),
            snapshot_ids: foreign.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    // A member is a snapshot of its own: listed, and restored.
    let mut c = ControllerClient::new(channel(&s).await);
    let member_a = first
        .snapshots
        .iter()
        .find(|m| m.source_volume_id == a)
        .unwrap();
    let listed = c
        .list_snapshots(ListSnapshotsRequest {
            snapshot_id: member_a.snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        listed.entries[0]
            .snapshot
            .as_ref()
            .unwrap()
            .group_snapshot_id,
        first.group_snapshot_id
    );
    let restored = c
        .create_volume(CreateVolumeRequest {
            volume_content_source: Some(VolumeContentSource {
                r#type: Some(Type::Snapshot(SnapshotSource {
                    snapshot_id: member_a.snapshot_id.clone(),
                })),
            }),
            ..create("from-member", 16 << 20)
        })
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(
        counter_of(&s, &restored.volume_id),
        counter_of(&s, &member_a.snapshot_id)
    );

    // Deleted whole; a second delete is fine; a list naming a snapshot
    // outside the group is refused.
    let e = g
        .delete_volume_group_snapshot(DeleteVolumeGroupSnapshotRequest {
            group_snapshot_id: first.group_snapshot_id.clone(),
            snapshot_ids: foreign,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    for grp in &groups {
        for _ in 0..2 {
            g.delete_volume_group_snapshot(DeleteVolumeGroupSnapshotRequest {
                group_snapshot_id: grp.group_snapshot_id.clone(),
                snapshot_ids: ids(grp),
                ..Default::default()
            })
            .await
            .unwrap();
        }
    }
    let left = |c: &mut ControllerClient<Channel>| {
        let mut c = c.clone();
        async move {
            let mut ids: Vec<String> = c
                .list_snapshots(ListSnapshotsRequest::default())
                .await
                .unwrap()
                .into_inner()
                .entries
                .into_iter()
                .map(|e| e.snapshot.unwrap().snapshot_id)
                .collect();
            ids.sort();
            ids
        }
    };
    assert_eq!(left(&mut c).await, std::slice::from_ref(&lone_snap));

    // A crash after the hold, and one after the cut: the next call cuts
    // the group again, and nothing of the half-made one is left.
    for fp in ["agent::hold_group::held", "csi::group::cut"] {
        s.kill9();
        s.set_failpoint(Some(fp));
        s.spawn();
        let e = GroupControllerClient::new(channel(&s).await)
            .create_volume_group_snapshot(group_req("after-crash", &[&a, &b]))
            .await
            .unwrap_err();
        assert!(
            matches!(
                e.code(),
                Code::Unavailable | Code::Unknown | Code::Cancelled
            ),
            "{fp}: {e:?}"
        );
        s.kill9();
        s.set_failpoint(None);
        s.spawn();
        let mut g = GroupControllerClient::new(channel(&s).await);
        let group = g
            .create_volume_group_snapshot(group_req("after-crash", &[&a, &b]))
            .await
            .unwrap()
            .into_inner()
            .group_snapshot
            .unwrap();
        assert!(group.ready_to_use, "{fp}");
        let mut c = ControllerClient::new(channel(&s).await);
        let mut want = ids(&group);
        want.push(lone_snap.clone());
        want.sort();
        assert_eq!(left(&mut c).await, want, "{fp}");
        // Writes go on after the restart.
        let mut ca = Client::connect(UnixStream::connect(s.nbd_socket()).unwrap(), &a).unwrap();
        ca.write(0, &[9u8; 8]).unwrap();
        g.delete_volume_group_snapshot(DeleteVolumeGroupSnapshotRequest {
            group_snapshot_id: group.group_snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    // The engine holds no snapshot the records do not.
    assert!(s.terminate().success());
    let pool = strata::engine::Pool::open(&s.pool(), Default::default()).unwrap();
    let kept: Vec<String> = pool
        .list_snapshots()
        .unwrap()
        .iter()
        .map(|i| i.id.to_string())
        .collect();
    assert_eq!(kept, [lone_snap]);
}

/// A group left half made that no call comes back for (its create died,
/// and the VolumeGroupSnapshot was deleted meanwhile) is deleted once it
/// is old: its member already cut on the node, and its records. A young
/// one is left to the create that may still be running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_left_half_made_are_swept() {
    use strata::cluster::records::{
        EmbeddedRecords, GroupRef, RecordState, Records, SnapshotRecord,
    };
    let mut s = Standalone::start();
    let v = s.create_volume("swept", "4MiB");
    assert!(s.terminate().success());
    // As a create leaves it when it dies after the cut: a member cut on
    // the node, recorded as Creating. One old, one young.
    let pool = strata::engine::Pool::open(&s.pool(), Default::default()).unwrap();
    let old_snap = pool
        .create_snapshot(v.parse().unwrap())
        .unwrap()
        .id
        .to_string();
    let young_snap = pool
        .create_snapshot(v.parse().unwrap())
        .unwrap()
        .id
        .to_string();
    drop(pool);
    let records = EmbeddedRecords::open(&s.pool().join(strata::standalone::RECORDS_FILE)).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    for (name, id, age) in [("old", &old_snap, 3600), ("young", &young_snap, 5)] {
        records
            .put_snapshot(&SnapshotRecord {
                name: format!("{name}/{v}"),
                snapshot_id: id.clone(),
                source_volume_id: v.clone(),
                size_bytes: 0,
                node: "test-node".into(),
                state: RecordState::Creating,
                created_unix_ns: now - age * 1_000_000_000,
                group: Some(GroupRef {
                    id: format!("group-{name}"),
                    name: name.into(),
                }),
                moving: None,
                lost_with: None,
            })
            .unwrap();
    }
    drop(records);
    s.spawn();
    let gone = |id: &str| {
        std::os::unix::net::UnixStream::connect(s.nbd_socket())
            .map(|c| strata::frontend::nbd::client::Client::connect(c, id).is_err())
            .unwrap()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !gone(&old_snap) {
        assert!(
            std::time::Instant::now() < deadline,
            "the old half-made group is still there"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(!gone(&young_snap));
    assert!(s.terminate().success());
    let records = EmbeddedRecords::open(&s.pool().join(strata::standalone::RECORDS_FILE)).unwrap();
    assert!(records.snapshot(&old_snap).unwrap().is_none());
    assert!(records.snapshot(&young_snap).unwrap().is_some());
}
