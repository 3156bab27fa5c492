//! CSI control-plane latency, end to end through gRPC against a running
//! `strata standalone`: prints a table, asserts nothing.
//!
//!     cargo bench -p strata --bench csi
//!
//! 200 each of CreateVolume, CreateSnapshot (after a 4 KiB write, so each
//! snapshot has something to flush) and CreateVolume from a snapshot; then
//! CreateSnapshot of a volume with 64 MiB written and of one with 4 GiB
//! written (written over NBD), beside this disk's fdatasync latency, the
//! floor any durable snapshot pays. The pool lives in `$STRATA_BENCH_DIR`
//! (default: under /var/tmp, on the machine's disk).

#[path = "../tests/common/csi.rs"]
#[allow(dead_code)]
mod csi;

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use csi_proto::csi::v1::volume_content_source::{SnapshotSource, Type};
use strata::frontend::nbd::client::Client;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const N: usize = 200;

struct Server {
    child: Child,
    dir: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        // SAFETY: kill(2) with a pid we own.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

fn start(dir: &Path) -> Server {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(env!("CARGO_BIN_EXE_strata"))
        .arg("standalone")
        .arg("--pool")
        .arg(dir.join("pool"))
        .arg("--csi-endpoint")
        .arg(format!("unix://{}", dir.join("csi.sock").display()))
        .arg("--nbd-listen")
        .arg(format!("unix://{}", dir.join("nbd.sock").display()))
        .arg("--metrics-listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--node-id")
        .arg("bench")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Server {
        child,
        dir: dir.to_path_buf(),
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

struct Row {
    what: String,
    times: Vec<Duration>,
}

impl Row {
    fn p50(&self) -> Duration {
        percentile(&self.times, 0.5)
    }
}

fn row(what: &str, mut times: Vec<Duration>) -> Row {
    times.sort();
    Row {
        what: what.into(),
        times,
    }
}

fn fsync_latency(dir: &Path) -> Vec<Duration> {
    use std::os::unix::fs::FileExt;
    let path = dir.join("fsync-probe");
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(MIB).unwrap();
    let mut times = Vec::new();
    for i in 0..N as u64 {
        f.write_all_at(&[i as u8; 4096], (i % 16) * 4096).unwrap();
        let t = Instant::now();
        f.sync_data().unwrap();
        times.push(t.elapsed());
    }
    std::fs::remove_file(path).unwrap();
    times
}

fn nbd(server: &Server, volume: &str) -> Client<UnixStream> {
    let s = UnixStream::connect(server.dir.join("nbd.sock")).unwrap();
    Client::connect(s, volume).unwrap()
}

/// Writes `bytes` of incompressible data at the start of `volume` in 1 MiB
/// requests, then flushes.
fn fill(server: &Server, volume: &str, bytes: u64) {
    let mut c = nbd(server, volume);
    let mut buf = vec![0u8; MIB as usize];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for off in (0..bytes).step_by(MIB as usize) {
        for w in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        c.write(off, &buf).unwrap();
    }
    c.flush().unwrap();
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let base = std::env::var("STRATA_BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into());
    let tmp = tempfile::Builder::new()
        .prefix("strata-bench-csi-")
        .tempdir_in(base)
        .unwrap();
    let server = start(tmp.path());
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut c = loop {
        if tmp.path().join("csi.sock").exists() {
            let mut c = csi::Csi::connect(&tmp.path().join("csi.sock")).await;
            if c.identity
                .probe(csi_proto::csi::v1::ProbeRequest {})
                .await
                .is_ok_and(|r| r.into_inner().ready == Some(true))
            {
                break c;
            }
        }
        assert!(Instant::now() < deadline, "strata standalone did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let block = csi::block_cap;
    let mut rows = vec![row(
        "fdatasync of 4 KiB (this disk)",
        fsync_latency(tmp.path()),
    )];

    let mut times = Vec::new();
    for i in 0..N {
        let t = Instant::now();
        c.controller
            .create_volume(csi::create(&format!("vol-{i}"), GIB as i64, block()))
            .await
            .unwrap();
        times.push(t.elapsed());
    }
    rows.push(row("CreateVolume (1 GiB, empty)", times));

    let src = c
        .controller
        .create_volume(csi::create("snap-src", GIB as i64, block()))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let mut writer = nbd(&server, &src);
    let mut times = Vec::new();
    let mut snaps = Vec::new();
    for i in 0..N {
        writer.write((i as u64) * 4096, &[i as u8; 4096]).unwrap();
        let t = Instant::now();
        let s = c
            .controller
            .create_snapshot(csi::snapshot(&format!("snap-{i}"), &src, false))
            .await
            .unwrap();
        times.push(t.elapsed());
        snaps.push(s.into_inner().snapshot.unwrap().snapshot_id);
    }
    rows.push(row("CreateSnapshot (after a 4 KiB write)", times));

    let mut times = Vec::new();
    for (i, snap) in snaps.iter().enumerate() {
        let t = Instant::now();
        c.controller
            .create_volume(csi::create_from(
                &format!("restore-{i}"),
                GIB as i64,
                block(),
                Type::Snapshot(SnapshotSource {
                    snapshot_id: snap.clone(),
                }),
            ))
            .await
            .unwrap();
        times.push(t.elapsed());
    }
    rows.push(row("CreateVolume from a snapshot", times));

    for (label, written) in [("64 MiB", 64 * MIB), ("4 GiB", 4 * GIB)] {
        let vol = c
            .controller
            .create_volume(csi::create(
                &format!("big-{label}"),
                (8 * GIB) as i64,
                block(),
            ))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap()
            .volume_id;
        let filled = Instant::now();
        fill(&server, &vol, written);
        eprintln!(
            "wrote {label} over NBD in {:.1} s",
            filled.elapsed().as_secs_f64()
        );
        let mut w = nbd(&server, &vol);
        let mut times = Vec::new();
        for i in 0..50u64 {
            w.write(i * 4096, &[1u8; 4096]).unwrap();
            let t = Instant::now();
            c.controller
                .create_snapshot(csi::snapshot(&format!("{label}-{i}"), &vol, false))
                .await
                .unwrap();
            times.push(t.elapsed());
        }
        rows.push(row(
            &format!("CreateSnapshot, {label} written (8 GiB volume)"),
            times,
        ));
    }

    println!("\nCSI latency through gRPC, strata standalone ({N} operations unless noted)\n");
    println!("{:<48} {:>6} {:>11} {:>11}", "operation", "n", "p50", "p99");
    for r in &rows {
        println!(
            "{:<48} {:>6} {:>11} {:>11}",
            r.what,
            r.times.len(),
            ms(r.p50()),
            ms(percentile(&r.times, 0.99))
        );
    }
    let small = rows[rows.len() - 2].p50().as_secs_f64();
    let big = rows[rows.len() - 1].p50().as_secs_f64();
    println!(
        "\nCreateSnapshot p50, 4 GiB written vs 64 MiB written: {:.2}x (target: size-independent)",
        big / small
    );
    println!(
        "CreateSnapshot p50 with 4 GiB written: {} (target: under 20 ms)",
        ms(rows[rows.len() - 1].p50())
    );
}
