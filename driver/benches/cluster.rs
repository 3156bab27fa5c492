//! Volumes across nodes, on loopback (one figure in network namespaces):
//! two `strata node` processes and a controller, measured in one run and
//! printed side by side; asserts nothing.
//!
//!     cargo bench -p strata --bench cluster
//!
//! - Reads of a volume attached from another node (the data path) against
//!   the same volume attached on its own node: fio 4 KiB random reads at
//!   queue depth 32 and 1 MiB sequential reads at depth 8, on the block
//!   device each node stages (FUSE + loop on this host).
//! - A move of the volume, with its snapshot, to the other node (`strata
//!   volume move`, copy first, no rate limit): time, and bytes sent against
//!   the bytes their layers hold and against copying each whole.
//! - A restore of that snapshot for a pod on the first node (switch
//!   first): how long CreateVolume takes, and how long the fetch behind it.
//! - A drain of a node with a volume and two snapshots of it: bytes sent
//!   against the bytes their layers hold, and against copying each whole.
//! - Live moves back and forth under a 20 MB/s random writer: how long,
//!   the holds, what the writer got.
//! - A live move over a 100 Mbit/s link (nodes in network namespaces,
//!   `tc tbf`) under the same writer, which outruns the link: how long
//!   against the link's time for the data, bytes sent, the hold.
//!
//! Needs root (loop devices, FUSE) and fio. Sizes: `STRATA_BENCH_MIB`
//! (data written, default 512). `STRATA_BENCH_ONLY=reads` stops after the
//! reads (for work on the data path), `STRATA_BENCH_ONLY=copies` runs only
//! the copy-first move, the restore and the drain (for work on copies).
//! `STRATA_BENCH_CERTS=per-process` gives every process a certificate of
//! its own (what those checks cost), instead of one shared.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::cluster::{ControllerProc, NodeProc, gen_certs, gen_certs_per_process};
use common::csi::{self as c, Csi};
use csi_proto::cluster::v1::MoveVolumeRequest;
use csi_proto::cluster::v1::cluster_client::ClusterClient;
use csi_proto::csi::v1::controller_client::ControllerClient;
use csi_proto::csi::v1::volume_content_source::{SnapshotSource, Type};
use csi_proto::csi::v1::*;
use tonic::transport::Channel;

const MIB: u64 = 1 << 20;

fn topo(node: &str) -> Topology {
    Topology {
        segments: HashMap::from([("topology.strata.dev/node".to_string(), node.to_string())]),
    }
}

fn on(mut req: CreateVolumeRequest, node: &str) -> CreateVolumeRequest {
    req.accessibility_requirements = Some(TopologyRequirement {
        requisite: vec![topo(node)],
        preferred: vec![topo(node)],
    });
    req
}

async fn wait_registered(cc: &mut ControllerClient<Channel>, nodes: &[&str]) {
    for n in nodes {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let room = cc
                .get_capacity(GetCapacityRequest {
                    accessible_topology: Some(topo(n)),
                    ..Default::default()
                })
                .await
                .map(|r| r.into_inner().available_capacity)
                .unwrap_or(-1);
            if room > 0 {
                break;
            }
            assert!(Instant::now() < deadline, "node {n} never registered");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Publishes and stages `vol` on `node`; the block device.
async fn attach(
    cc: &mut ControllerClient<Channel>,
    node: &NodeProc,
    csi: &mut Csi,
    vol: &str,
) -> PathBuf {
    let ctx = cc
        .controller_publish_volume(ControllerPublishVolumeRequest {
            volume_id: vol.into(),
            node_id: node.id.clone(),
            volume_capability: Some(c::block_cap()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .publish_context;
    let staging = node.kubelet_dir().join(format!("staging/{vol}"));
    let target = node.kubelet_dir().join(format!("pods/{vol}/dev"));
    let mut stage = c::stage(vol, &staging, c::block_cap());
    stage.publish_context = ctx;
    csi.node.node_stage_volume(stage).await.unwrap();
    csi.node
        .node_publish_volume(c::publish(vol, &staging, &target, c::block_cap(), false))
        .await
        .unwrap();
    target
}

async fn detach(cc: &mut ControllerClient<Channel>, node: &NodeProc, csi: &mut Csi, vol: &str) {
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
    cc.controller_unpublish_volume(ControllerUnpublishVolumeRequest {
        volume_id: vol.into(),
        node_id: node.id.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
}

/// fio on `dev` (`extra`: more options), started.
fn fio_start(
    dev: &Path,
    rw: &str,
    bs: &str,
    depth: u32,
    seconds: u32,
    extra: &[&str],
) -> std::process::Child {
    Command::new("fio")
        .args([
            "--name=bench",
            "--ioengine=libaio",
            "--direct=1",
            "--output-format=json",
            "--time_based",
        ])
        .arg(format!("--filename={}", dev.display()))
        .arg(format!("--rw={rw}"))
        .arg(format!("--bs={bs}"))
        .arg(format!("--iodepth={depth}"))
        .arg(format!("--runtime={seconds}"))
        .args(extra)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("fio")
}

/// The first job of the JSON report of a fio run (`stopped`: with SIGINT,
/// after which fio exits with 128 and says so before its report).
fn fio_report(fio: std::process::Child, stopped: bool) -> serde_json::Value {
    let out = fio.wait_with_output().expect("fio");
    assert!(
        out.status.success() || stopped,
        "fio: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json = out.stdout.iter().position(|&b| b == b'{').unwrap_or(0);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout[json..]).expect("fio json");
    v["jobs"][0].clone()
}

/// fio on `dev` (`extra`: more options): its JSON report's first job.
fn fio_job(
    dev: &Path,
    rw: &str,
    bs: &str,
    depth: u32,
    seconds: u32,
    extra: &[&str],
) -> serde_json::Value {
    fio_report(fio_start(dev, rw, bs, depth, seconds, extra), false)
}

/// fio reads on `dev`: (IOPS, MB/s).
fn fio(dev: &Path, rw: &str, bs: &str, depth: u32, seconds: u32) -> (f64, f64) {
    let read = &fio_job(dev, rw, bs, depth, seconds, &[])["read"];
    (
        read["iops"].as_f64().unwrap_or(0.0),
        read["bw_bytes"].as_f64().unwrap_or(0.0) / 1e6,
    )
}

/// fio 4 KiB random writes (QD8) on `dev` at most at `rate` for at most
/// `seconds`, started.
fn fio_writer(dev: &Path, rate: &str, seconds: u32) -> std::process::Child {
    let rate = format!("--rate={rate}");
    fio_start(dev, "randwrite", "4k", 8, seconds, &[&rate])
}

/// What a [`fio_writer`] did, once it ends (`stop`: stopped now, with
/// SIGINT): (MB/s, completion latency p99 and max in ms).
fn fio_written(fio: std::process::Child, stop: bool) -> (f64, f64, f64) {
    if stop {
        // SAFETY: signalling a child this bench started and has not reaped.
        unsafe { libc::kill(fio.id() as i32, libc::SIGINT) };
    }
    let w = &fio_report(fio, stop)["write"];
    let ms = |x: &serde_json::Value| x.as_f64().unwrap_or(0.0) / 1e6;
    (
        w["bw_bytes"].as_f64().unwrap_or(0.0) / 1e6,
        ms(&w["clat_ns"]["percentile"]["99.000000"]),
        ms(&w["clat_ns"]["max"]),
    )
}

/// The hold durations (ms) the nodes' logs report, sorted.
fn holds_ms(nodes: &[&NodeProc]) -> Vec<f64> {
    let mut holds: Vec<f64> = nodes
        .iter()
        .flat_map(|n| {
            n.proc
                .log()
                .lines()
                .filter_map(|l| {
                    let at = l.find("hold_ms=")? + "hold_ms=".len();
                    let digits: String = l[at..].chars().take_while(char::is_ascii_digit).collect();
                    digits.parse::<f64>().ok()
                })
                .collect::<Vec<_>>()
        })
        .collect();
    holds.sort_by(f64::total_cmp);
    holds
}

/// The `p` quantile of sorted `v` (NaN if empty).
fn pct(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    if !common::is_root() || Command::new("fio").arg("--version").output().is_err() {
        eprintln!("bench cluster: needs root and fio; skipped");
        return;
    }
    let data_mib: u64 = std::env::var("STRATA_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(512);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(run(data_mib));
}

async fn run(data_mib: u64) {
    let root = tempfile::Builder::new()
        .prefix("strata-bench-cluster")
        .tempdir_in("/var/tmp")
        .unwrap();
    let tls = Certs::new(&root.path().join("tls"));
    // What the data path does, not the nodes' copy budgets (as the
    // controller's --move-rate 0 below).
    let unlimited = |id| {
        let mut n = NodeProc::start(root.path(), id, &tls.of(id));
        n.proc.kill9();
        n.proc.add_args(&["--node-job-rate", "1TiB"]);
        n.proc.spawn();
        n.wait_for_agent();
        n
    };
    let (n1, n2) = (unlimited("n1"), unlimited("n2"));
    let mut ctl =
        ControllerProc::start(root.path(), &[&n1.agent, &n2.agent], &tls.of("controller"));
    ctl.proc.kill9();
    ctl.proc.add_args(&["--move-rate", "0"]);
    ctl.proc.spawn();
    let mut cc = ControllerClient::new(c::channel(ctl.csi_socket()).await);
    let mut mc = ClusterClient::new(c::channel(ctl.csi_socket()).await);
    let mut csi1 = Csi::connect(&n1.csi_socket()).await;
    let mut csi2 = Csi::connect(&n2.csi_socket()).await;
    wait_registered(&mut cc, &["n1", "n2"]).await;

    // The volume: `data_mib` written on n1, a snapshot, then an eighth of
    // it overwritten (so its layers hold more than its data).
    let size = 2 * data_mib * MIB;
    let vol = cc
        .create_volume(on(
            c::create("bench-vol", size as i64, c::block_cap()),
            "n1",
        ))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let dev = attach(&mut cc, &n1, &mut csi1, &vol).await;
    let mut rng = common::Rng::new(1);
    let mut chunk = vec![0u8; (4 * MIB) as usize];
    for i in 0..data_mib / 4 {
        rng.fill(&mut chunk);
        common::write_at(&dev, i * 4 * MIB, &chunk).unwrap();
    }
    detach(&mut cc, &n1, &mut csi1, &vol).await;
    let snap = cc
        .create_snapshot(c::snapshot("bench-snap", &vol, false))
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap()
        .snapshot_id;
    let dev = attach(&mut cc, &n1, &mut csi1, &vol).await;
    for i in 0..data_mib / 32 {
        rng.fill(&mut chunk);
        common::write_at(&dev, i * 32 * MIB, &chunk).unwrap();
    }
    let layers_bytes = data_mib * MIB + (data_mib / 32) * 4 * MIB;

    println!(
        "strata cluster bench: {data_mib} MiB of data in a {} MiB volume, 2 nodes on loopback (FUSE + loop devices)",
        size / MIB
    );
    println!();

    // Reads: on its own node, then from the other node.
    let only = std::env::var("STRATA_BENCH_ONLY").unwrap_or_default();
    if only != "copies" {
        let secs = 10;
        let local_rand = fio(&dev, "randread", "4k", 32, secs);
        let local_seq = fio(&dev, "read", "1M", 8, secs);
        detach(&mut cc, &n1, &mut csi1, &vol).await;
        let dev = attach(&mut cc, &n2, &mut csi2, &vol).await;
        let remote_rand = fio(&dev, "randread", "4k", 32, secs);
        let remote_seq = fio(&dev, "read", "1M", 8, secs);
        detach(&mut cc, &n2, &mut csi2, &vol).await;
        print_reads(secs, local_rand, remote_rand, local_seq, remote_seq);
        if only == "reads" {
            return;
        }
    } else {
        detach(&mut cc, &n1, &mut csi1, &vol).await;
    }

    // The move to n2.
    let started = Instant::now();
    let moved = mc
        .move_volume(MoveVolumeRequest {
            volume_id: vol.clone(),
            node_id: "n2".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let move_secs = started.elapsed().as_secs_f64();

    // A restore of the snapshot (on n2 now, moved with the volume) for a
    // pod on n1.
    let started = Instant::now();
    let restored = cc
        .create_volume(on(
            c::create_from(
                "bench-restore",
                size as i64,
                c::block_cap(),
                Type::Snapshot(SnapshotSource { snapshot_id: snap }),
            ),
            "n1",
        ))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let answered = started.elapsed().as_secs_f64();
    let mut a2 = agent(&n2.agent, &tls.of("controller"));
    while a2
        .get_volume(csi_proto::agent::v1::GetVolumeRequest {
            volume_id: restored.clone(),
        })
        .await
        .is_ok()
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let fetched = started.elapsed().as_secs_f64();
    println!();
    // The snapshot holds the data written first; the volume, all of it.
    let sent = moved.copied_bytes
        + moved
            .moved_snapshots
            .iter()
            .map(|s| s.copied_bytes)
            .sum::<u64>();
    let whole = 2 * data_mib * MIB;
    println!(
        "move n1 -> n2 with its snapshot (copy first, {} snapshot(s) moved): {move_secs:.2} s, {:.0} MB/s; sent {:.1} MB ({:.1} MB the volume's changes since the snapshot) = {:.3}x the bytes their layers hold ({:.1} MB); each copied whole would be {:.1} MB ({:.2}x)",
        moved.moved_snapshots.len(),
        mb(sent) / move_secs,
        mb(sent),
        mb(moved.copied_bytes),
        sent as f64 / layers_bytes as f64,
        mb(layers_bytes),
        mb(whole),
        whole as f64 / layers_bytes as f64
    );
    println!(
        "restore on n2 for a pod on n1 (switch first): CreateVolume answered in {:.3} s; fetched behind in {fetched:.2} s ({:.0} MB/s)",
        answered,
        mb(data_mib * MIB) / fetched
    );
    drain_with_snapshots(data_mib / 2, root.path(), &tls).await;
    if only == "copies" {
        return;
    }

    // Live moves back and forth under a random writer on n2 (fio, 4 KiB,
    // QD8, at most 20 MB/s) for 30 s.
    let dev = attach(&mut cc, &n2, &mut csi2, &vol).await;
    let live_secs = 30;
    let writer = fio_writer(&dev, "20m", live_secs + 5);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut move_times = Vec::new();
    let until = Instant::now() + Duration::from_secs(live_secs.into());
    let mut to = "n1";
    while Instant::now() < until {
        let started = Instant::now();
        mc.move_volume(MoveVolumeRequest {
            volume_id: vol.clone(),
            node_id: to.into(),
        })
        .await
        .unwrap();
        move_times.push(started.elapsed().as_secs_f64());
        to = if to == "n1" { "n2" } else { "n1" };
    }
    let (write_mbs, write_p99_ms, write_max_ms) =
        tokio::task::spawn_blocking(move || fio_written(writer, false))
            .await
            .unwrap();
    let holds = holds_ms(&[&n1, &n2]);
    detach(&mut cc, &n2, &mut csi2, &vol).await;

    move_times.sort_by(f64::total_cmp);
    println!(
        "live moves under a 4 KiB random writer (fio, QD8, rate limit 20 MiB/s): {} moves in {live_secs} s, each {:.2} s (median), {:.2} s (longest); writes held on the source p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms; the writer got {write_mbs:.1} MB/s, completion latency p99 {write_p99_ms:.1} ms, max {write_max_ms:.0} ms",
        move_times.len(),
        pct(&move_times, 0.5),
        pct(&move_times, 1.0),
        pct(&holds, 0.5),
        pct(&holds, 0.99),
        pct(&holds, 1.0),
    );
    slow_link(data_mib / 2, root.path(), &tls).await;
}

/// The reads' table: (IOPS, MB/s) of each run.
fn print_reads(
    secs: u32,
    local_rand: (f64, f64),
    remote_rand: (f64, f64),
    local_seq: (f64, f64),
    remote_seq: (f64, f64),
) {
    println!("| reads ({secs} s each) | own node | other node (data path) | ratio |");
    println!("|---|---|---|---|");
    println!(
        "| 4 KiB random, QD32 | {:.0} IOPS | {:.0} IOPS | {:.2}x |",
        local_rand.0,
        remote_rand.0,
        remote_rand.0 / local_rand.0
    );
    println!(
        "| 1 MiB sequential, QD8 | {:.0} MB/s | {:.0} MB/s | {:.2}x |",
        local_seq.1,
        remote_seq.1,
        remote_seq.1 / local_seq.1
    );
    println!();
}

/// Bytes as MB.
fn mb(b: u64) -> f64 {
    b as f64 / 1e6
}

/// A drain of a node with a volume and two snapshots of it: `data_mib`
/// written, snapshot, an eighth overwritten, snapshot, another eighth
/// overwritten. Its layers hold the data and both eighths; a copy of each
/// whole would send the data three times.
async fn drain_with_snapshots(data_mib: u64, root: &Path, tls: &Certs) {
    let root = root.join("drain");
    let (n1, n2) = (
        NodeProc::start(&root, "n1", &tls.of("n1")),
        NodeProc::start(&root, "n2", &tls.of("n2")),
    );
    let mut ctl = ControllerProc::start(&root, &[&n1.agent, &n2.agent], &tls.of("controller"));
    ctl.proc.kill9();
    ctl.proc.add_args(&["--move-rate", "0"]);
    ctl.proc.spawn();
    let mut cc = ControllerClient::new(c::channel(ctl.csi_socket()).await);
    let mut mc = ClusterClient::new(c::channel(ctl.csi_socket()).await);
    let mut csi1 = Csi::connect(&n1.csi_socket()).await;
    wait_registered(&mut cc, &["n1", "n2"]).await;
    let size = 2 * data_mib * MIB;
    let vol = cc
        .create_volume(on(
            c::create("bench-drain", size as i64, c::block_cap()),
            "n1",
        ))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let mut rng = common::Rng::new(3);
    let mut chunk = vec![0u8; (4 * MIB) as usize];
    let eighth = data_mib / 8;
    for (i, (from, len)) in [(0, data_mib), (0, eighth), (data_mib / 2, eighth)]
        .into_iter()
        .enumerate()
    {
        let dev = attach(&mut cc, &n1, &mut csi1, &vol).await;
        for at in (from..from + len).step_by(4) {
            rng.fill(&mut chunk);
            common::write_at(&dev, at * MIB, &chunk).unwrap();
        }
        detach(&mut cc, &n1, &mut csi1, &vol).await;
        if i < 2 {
            cc.create_snapshot(c::snapshot(&format!("bench-drain-{i}"), &vol, false))
                .await
                .unwrap();
        }
    }
    let layers = (data_mib + 2 * eighth) * MIB;
    let started = Instant::now();
    let drained = mc
        .drain_node(csi_proto::cluster::v1::DrainNodeRequest {
            node_id: "n1".into(),
            undo: false,
        })
        .await
        .unwrap()
        .into_inner();
    let secs = started.elapsed().as_secs_f64();
    assert!(drained.stayed.is_empty(), "{drained:?}");
    let sent: u64 = drained.moved.iter().map(|m| m.copied_bytes).sum::<u64>()
        + drained
            .moved_snapshots
            .iter()
            .map(|m| m.copied_bytes)
            .sum::<u64>();
    println!(
        "drain of a node with a volume and 2 snapshots of it ({} moves): {secs:.2} s; sent {:.1} MB = {:.3}x the bytes their layers hold ({:.1} MB); each copied whole would be {:.1} MB ({:.2}x)",
        drained.moved.len() + drained.moved_snapshots.len(),
        mb(sent),
        sent as f64 / layers as f64,
        mb(layers),
        mb(3 * data_mib * MIB),
        (3 * data_mib * MIB) as f64 / layers as f64,
    );
}

/// A live move over a 100 Mbit/s link: two nodes and the controller in
/// their own network namespaces, the target's link limited with `tc tbf`,
/// and fio writing 4 KiB random blocks at up to 20 MB/s (more than the
/// link carries: the write allowance makes the copy converge) through the
/// volume's device on its own node while it moves away. Skipped where
/// network namespaces are not available.
async fn slow_link(data_mib: u64, root: &Path, tls: &Certs) {
    if let Err(why) = common::netns::available() {
        println!("live move over a 100 Mbit/s link: skipped ({why})");
        return;
    }
    let net = common::netns::Net::new(&["n1", "n2", "ctl"]);
    let root = root.join("slow-link");
    let n1 = NodeProc::start_on(&root, "n1", &tls.of("n1"), &net);
    let n2 = NodeProc::start_on(&root, "n2", &tls.of("n2"), &net);
    let ctl_tls = tls.of("controller");
    let mut ctl = ControllerProc::start_on(&root, &[&n1.agent, &n2.agent], &ctl_tls, &net, "ctl");
    ctl.proc.kill9();
    ctl.proc.add_args(&["--move-rate", "0"]);
    ctl.proc.spawn();
    let mut cc = ControllerClient::new(c::channel(ctl.csi_socket()).await);
    let mut mc = ClusterClient::new(c::channel(ctl.csi_socket()).await);
    let mut csi1 = Csi::connect(&n1.csi_socket()).await;
    wait_registered(&mut cc, &["n1", "n2"]).await;
    net.limit("n2", "100mbit");

    let size = 2 * data_mib * MIB;
    let vol = cc
        .create_volume(on(
            c::create("bench-slow", size as i64, c::block_cap()),
            "n1",
        ))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let dev = attach(&mut cc, &n1, &mut csi1, &vol).await;
    let mut rng = common::Rng::new(2);
    let mut chunk = vec![0u8; (4 * MIB) as usize];
    for i in 0..data_mib / 4 {
        rng.fill(&mut chunk);
        common::write_at(&dev, i * 4 * MIB, &chunk).unwrap();
    }
    // The writer runs exactly as long as the move.
    let writer = fio_writer(&dev, "20m", 900);
    let started = Instant::now();
    let moved = mc
        .move_volume(MoveVolumeRequest {
            volume_id: vol.clone(),
            node_id: "n2".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let secs = started.elapsed().as_secs_f64();
    let (write_mbs, write_p99_ms, write_max_ms) =
        tokio::task::spawn_blocking(move || fio_written(writer, true))
            .await
            .unwrap();
    let holds = holds_ms(&[&n1]);
    detach(&mut cc, &n1, &mut csi1, &vol).await;
    let link = 100e6 / 8.0;
    println!(
        "live move over a 100 Mbit/s link (tc tbf) under a 4 KiB random writer on the source (fio, QD8, at most 20 MiB/s): {:.0} MB of data moved in {secs:.1} s; the link alone needs {:.1} s for the data, framing aside ({:.2}x); sent {:.1} MB = {:.2}x the data (with what the writer wrote meanwhile); writes held {:.0} ms; the writer got {write_mbs:.1} MB/s during the move, completion latency p99 {write_p99_ms:.1} ms, max {write_max_ms:.0} ms",
        mb(data_mib * MIB),
        (data_mib * MIB) as f64 / link,
        secs / ((data_mib * MIB) as f64 / link),
        mb(moved.copied_bytes),
        moved.copied_bytes as f64 / (data_mib * MIB) as f64,
        pct(&holds, 1.0),
    );
}

/// The agent certificates: one shared, or one per process
/// (`STRATA_BENCH_CERTS=per-process`).
struct Certs {
    dir: PathBuf,
    per_process: bool,
}

impl Certs {
    fn new(dir: &Path) -> Certs {
        let per_process = match std::env::var("STRATA_BENCH_CERTS").as_deref() {
            Ok("per-process") => true,
            Ok("shared") | Err(_) => false,
            Ok(other) => panic!("STRATA_BENCH_CERTS={other}: shared or per-process"),
        };
        if per_process {
            gen_certs_per_process(dir, &["n1", "n2"]);
        } else {
            gen_certs(dir);
        }
        println!(
            "agent certificates: {}",
            if per_process {
                "one per process"
            } else {
                "one shared"
            }
        );
        Certs {
            dir: dir.to_path_buf(),
            per_process,
        }
    }

    /// The `--agent-tls` directory of `who` ("controller" or a node).
    fn of(&self, who: &str) -> PathBuf {
        match (self.per_process, who) {
            (false, _) => self.dir.clone(),
            (true, "controller") => self.dir.join("controller"),
            (true, node) => self.dir.join("nodes").join(node),
        }
    }
}

fn agent(address: &str, tls: &Path) -> csi_proto::agent::v1::agent_client::AgentClient<Channel> {
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
    csi_proto::agent::v1::agent_client::AgentClient::new(channel)
}
