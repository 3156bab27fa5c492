//! CSI conformance of the whole lifecycle over the standalone's unix
//! socket, with a real gRPC client and the real node side: volumes are
//! attached to this kernel (FUSE + loop here; the kernel nbd driver where
//! it exists), filesystems made, mounted and bind mounted, data written
//! and read back through them, snapshots restored, volumes grown online,
//! and the plugin restarted with volumes staged. Needs root (mounts, loop
//! devices, FUSE); skips loudly outside CI without it.

mod common;

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::csi::{self as c, Csi};
use common::standalone::Standalone;
use csi_proto::csi::v1::volume_capability::{AccessMode, access_mode::Mode};
use csi_proto::csi::v1::volume_content_source::{SnapshotSource, Type, VolumeSource};
use csi_proto::csi::v1::volume_usage::Unit;
use csi_proto::csi::v1::*;
use tonic::Code;

fn runnable() -> bool {
    common::require(
        common::is_root(),
        "needs root for mounts, loop devices and FUSE",
    )
    .is_ok()
        && common::require_tools(&["mkfs.ext4", "mkfs.xfs", "blkid", "resize2fs", "xfs_growfs"])
            .is_ok()
}

/// A standalone and a client to it.
async fn start() -> (Standalone, Csi) {
    let s = Standalone::start();
    let csi = Csi::connect(&s.csi_socket()).await;
    (s, csi)
}

/// Kubelet-like paths for volume `n` of a test.
fn paths(s: &Standalone, n: &str) -> (PathBuf, PathBuf) {
    let k = s.kubelet_dir();
    (
        k.join("plugins/csi.strata.dev").join(n).join("globalmount"),
        k.join("pods").join(n).join("volumes/mount"),
    )
}

async fn new_volume(csi: &mut Csi, name: &str, bytes: i64, cap: VolumeCapability) -> String {
    csi.controller
        .create_volume(c::create(name, bytes, cap))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id
}

async fn stage_and_publish(
    csi: &mut Csi,
    vol: &str,
    staging: &Path,
    target: &Path,
    cap: &VolumeCapability,
) {
    csi.node
        .node_stage_volume(c::stage(vol, staging, cap.clone()))
        .await
        .unwrap();
    csi.node
        .node_publish_volume(c::publish(vol, staging, target, cap.clone(), false))
        .await
        .unwrap();
}

async fn unpublish_and_unstage(csi: &mut Csi, vol: &str, staging: &Path, target: &Path) {
    csi.node
        .node_unpublish_volume(c::unpublish(vol, target))
        .await
        .unwrap();
    csi.node
        .node_unstage_volume(c::unstage(vol, staging))
        .await
        .unwrap();
}

fn is_mounted(path: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(path.to_str().unwrap()))
}

fn write_file(path: &Path, len: usize, seed: u64) -> Vec<u8> {
    let mut data = vec![0u8; len];
    common::Rng::new(seed).fill(&mut data);
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(&data).unwrap();
    f.sync_all().unwrap();
    data
}

fn stats_total(resp: &NodeGetVolumeStatsResponse, unit: Unit) -> i64 {
    resp.usage
        .iter()
        .find(|u| u.unit == unit as i32)
        .unwrap_or_else(|| panic!("no {unit:?} usage in {resp:?}"))
        .total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mount_lifecycle_many_times_keeps_data_and_is_idempotent() {
    if !runnable() {
        return;
    }
    let (s, mut csi) = start().await;
    let cap = c::mount_cap("ext4");
    let vol = new_volume(&mut csi, "pvc-life", 64 << 20, cap.clone()).await;
    let (staging, target) = paths(&s, "life");
    let mut expected: Vec<(PathBuf, Vec<u8>)> = Vec::new();
    for round in 0..4u64 {
        stage_and_publish(&mut csi, &vol, &staging, &target, &cap).await;
        // Idempotent: both again are successes.
        csi.node
            .node_stage_volume(c::stage(&vol, &staging, cap.clone()))
            .await
            .unwrap();
        csi.node
            .node_publish_volume(c::publish(&vol, &staging, &target, cap.clone(), false))
            .await
            .unwrap();
        assert!(is_mounted(&staging) && is_mounted(&target));
        for (name, data) in &expected {
            let got = std::fs::read(target.join(name.file_name().unwrap())).unwrap();
            assert!(got == *data, "round {round}: {} changed", name.display());
        }
        let name = target.join(format!("file-{round}"));
        let data = write_file(&name, 3 << 20, round + 1);
        expected.push((name, data));
        let st = csi
            .node
            .node_get_volume_stats(c::stats(&vol, &target))
            .await
            .unwrap()
            .into_inner();
        assert!(!st.volume_condition.as_ref().unwrap().abnormal, "{st:?}");
        assert!(stats_total(&st, Unit::Bytes) > 50 << 20, "{st:?}");
        assert!(stats_total(&st, Unit::Inodes) > 0, "{st:?}");
        unpublish_and_unstage(&mut csi, &vol, &staging, &target).await;
        assert!(!is_mounted(&staging) && !is_mounted(&target));
        assert!(!target.exists(), "the target path is removed");
        // Idempotent: both again are successes.
        unpublish_and_unstage(&mut csi, &vol, &staging, &target).await;
    }
    csi.controller
        .delete_volume(DeleteVolumeRequest {
            volume_id: vol,
            ..Default::default()
        })
        .await
        .unwrap();
    let leftovers = std::fs::read_dir(s.state_dir().join("staged"))
        .unwrap()
        .count();
    assert_eq!(leftovers, 0, "no staged records remain");
}
