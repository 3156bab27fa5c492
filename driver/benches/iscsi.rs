//! Offload copy through the iSCSI target, measured in one run and printed
//! side by side; asserts only that every copy reads back as its source.
//!
//!     cargo bench -p strata --bench iscsi
//!
//! One volume of random data (`STRATA_BENCH_MIB`, default 1024) is copied
//! to a new volume of the same target three ways, each through one session
//! per volume on loopback:
//! - READ + WRITE: 1 MiB READ(16) from the source, WRITE(16) to the copy
//!   (what a host does without offload);
//! - EXTENDED COPY: block-to-block segments of 65 535 blocks, 64 per
//!   command;
//! - by token: POPULATE TOKEN of the whole source (1 GiB per token), WRITE
//!   USING TOKEN in 256 MiB pieces (the unit's optimal transfer count).
//!   The source's top holds the data, so POPULATE TOKEN freezes it and
//!   queues the fold of the frozen layer, which runs after the copy (a
//!   byte copy of the source on ext4; its start shows in "space added").
//!
//! each ended by SYNCHRONIZE CACHE on the copy, on XFS with reflink (the
//! offloaded copies share the source's extents) and on ext4 (the kernel
//! copies the bytes). The table gives the time, the rate, the ratio to
//! READ + WRITE and the space the copy added to the filesystem. Needs root
//! (loop images).

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::iscsi::{Initiator, naa_of};
use common::standalone::{Standalone, free_port};
use common::{LoopFs, Rng};
use strata::frontend::iscsi::TARGET_PREFIX;

const BLOCK: u64 = 4096;
const CHUNK_BLOCKS: u32 = 256;
const TOKEN_BLOCKS: u64 = 1 << 18;
const WRITE_BLOCKS: u64 = 1 << 16;
const SEGMENT_BLOCKS: u64 = 0xffff;

fn used(path: &Path) -> u64 {
    std::process::Command::new("sync").status().unwrap();
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: a plain C struct of integers, for statvfs to fill.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a struct that lives for the call.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    assert_eq!(rc, 0);
    (st.f_blocks - st.f_bfree) * st.f_frsize
}

fn session(port: u16, volume: &str) -> Initiator {
    let mut i = Initiator::connect(port);
    i.login(&format!("{TARGET_PREFIX}{volume}"));
    i
}

fn by_read_write(src: &mut Initiator, dst: &mut Initiator, blocks: u64) {
    for lba in (0..blocks).step_by(CHUNK_BLOCKS as usize) {
        let r = src.read16(lba, CHUNK_BLOCKS);
        assert_eq!(r.status, 0);
        assert_eq!(dst.write16(lba, &r.data, false).status, 0);
    }
}

fn by_token(src: &mut Initiator, dst: &mut Initiator, blocks: u64) {
    for (n, first) in (0..blocks).step_by(TOKEN_BLOCKS as usize).enumerate() {
        let len = (blocks - first).min(TOKEN_BLOCKS);
        let made = src.populate_token(n as u32, &[(first, len as u32)], 0);
        assert_eq!(made.status, 0, "{:?}", made.sense);
        let token = src.receive_token(n as u32).1.expect("a token");
        for at in (0..len).step_by(WRITE_BLOCKS as usize) {
            let k = (len - at).min(WRITE_BLOCKS);
            let w = dst.write_using_token(n as u32, &token, at, &[(first + at, k as u32)]);
            assert_eq!(w.status, 0, "{:?}", w.sense);
        }
    }
}

fn by_extended_copy(src_naa: &[u8], dst: &mut Initiator, blocks: u64) {
    let units = [src_naa.to_vec(), naa_of(dst)];
    let segments: Vec<(u16, u16, u16, u64, u64)> = (0..blocks)
        .step_by(SEGMENT_BLOCKS as usize)
        .map(|lba| (0, 1, (blocks - lba).min(SEGMENT_BLOCKS) as u16, lba, lba))
        .collect();
    for command in segments.chunks(64) {
        let c = dst.extended_copy(1, &units, command);
        assert_eq!(c.status, 0, "{:?}", c.sense);
    }
}

fn same(src: &mut Initiator, copy: &mut Initiator, blocks: u64) {
    for lba in (0..blocks).step_by(CHUNK_BLOCKS as usize) {
        assert!(
            src.read16(lba, CHUNK_BLOCKS).data == copy.read16(lba, CHUNK_BLOCKS).data,
            "the copy differs from its source at block {lba}"
        );
    }
}

fn main() {
    let mib: u64 = std::env::var("STRATA_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let blocks = mib * (1 << 20) / BLOCK;
    println!("copy of {mib} MiB between two volumes of one iSCSI target (loopback)\n");
    println!(
        "{:<12} {:<15} {:>9} {:>10} {:>8} {:>14}",
        "filesystem", "method", "seconds", "MB/s", "speedup", "space added"
    );
    for (fs, image) in [
        ("xfs-reflink", LoopFs::xfs_reflink(4 * mib + 2048)),
        ("ext4", LoopFs::ext4(4 * mib + 2048)),
    ] {
        let image = match image {
            Ok(i) => i,
            Err(e) => {
                println!("{fs:<12} skipped: {e}");
                continue;
            }
        };
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let s = Standalone::start_on(
            Some(&image.path().join("pool")),
            false,
            &["--iscsi-listen", &listen],
        );
        let size = format!("{mib}MiB");
        let src_id = s.create_volume("src", &size);
        let mut src = session(port, &src_id);
        let mut rng = Rng::new(7);
        let mut chunk = vec![0u8; (CHUNK_BLOCKS as u64 * BLOCK) as usize];
        for lba in (0..blocks).step_by(CHUNK_BLOCKS as usize) {
            rng.fill(&mut chunk);
            assert_eq!(src.write16(lba, &chunk, false).status, 0);
        }
        assert_eq!(src.sync_cache().status, 0);
        let src_naa = naa_of(&mut src);

        let mut baseline = Duration::ZERO;
        // The token's freeze of the source leaves a fold behind (a byte
        // copy on ext4, in the background): last, so it slows no other row.
        for method in ["READ + WRITE", "EXTENDED COPY", "token"] {
            let dst_id = s.create_volume(&method.replace(' ', "-").replace('+', ""), &size);
            let mut dst = session(port, &dst_id);
            let before = used(image.path());
            let started = Instant::now();
            match method {
                "READ + WRITE" => by_read_write(&mut src, &mut dst, blocks),
                "token" => by_token(&mut src, &mut dst, blocks),
                _ => by_extended_copy(&src_naa, &mut dst, blocks),
            }
            assert_eq!(dst.sync_cache().status, 0);
            let took = started.elapsed();
            let added = used(image.path()).saturating_sub(before);
            if baseline.is_zero() {
                baseline = took;
            }
            println!(
                "{fs:<12} {method:<15} {:>9.3} {:>10.0} {:>7.1}x {:>10} MiB",
                took.as_secs_f64(),
                (blocks * BLOCK) as f64 / 1e6 / took.as_secs_f64(),
                baseline.as_secs_f64() / took.as_secs_f64(),
                added >> 20
            );
            same(&mut src, &mut dst, blocks);
        }
    }
}
