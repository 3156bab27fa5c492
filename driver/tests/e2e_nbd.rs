//! End to end with the clients storage people use: `strata standalone`
//! served over NBD to nbdinfo, nbdcopy, libnbd's Python bindings (the
//! engine behind nbdsh), qemu-img, and a real filesystem through nbdfuse
//! and a loop device. Tools come from scripts/install-deps; without them
//! (or without root, for mounts) the tests skip loudly, and fail under CI.

mod common;

use std::process::Command;

use common::standalone::{Standalone, assert_ok, nbdsh, write_random};
use common::{require, require_tools, run_ok};

const MIB: usize = 1 << 20;

#[test]
fn nbdinfo_lists_exports_and_maps_allocation() {
    if require_tools(&["nbdinfo", "nbdcopy"]).is_err() {
        return;
    }
    let s = Standalone::start();
    let vol = s.create_volume("info", "32MiB");
    let data = s.dir.path().join("data");
    write_random(&data, 8 * MIB, 1);
    run_ok("nbdcopy", &[data.to_str().unwrap(), &s.uri(&vol)]);
    let snap = s.snapshot("info-snap", &vol);

    let list = run_ok(
        "nbdinfo",
        &[
            "--list",
            &format!("nbd+unix://?socket={}", s.nbd_socket().display()),
        ],
    );
    assert!(list.contains(&vol) && list.contains(&snap), "{list}");
    let info = run_ok("nbdinfo", &[&s.uri(&vol)]);
    assert!(
        info.contains("export-size: 33554432") && info.contains("base:allocation"),
        "{info}"
    );
    assert!(
        info.contains("can_multi_conn: true") && info.contains("block_size_preferred: 4096"),
        "{info}"
    );
    let snap_info = run_ok("nbdinfo", &[&s.uri(&snap)]);
    assert!(snap_info.contains("is_read_only: true"), "{snap_info}");

    // 8 MiB of data, then a hole.
    let map = run_ok("nbdinfo", &["--map", &s.uri(&vol)]);
    let lines: Vec<Vec<&str>> = map
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(lines[0][..3], ["0", "8388608", "0"], "{map}");
    assert_eq!(lines[1][..3], ["8388608", "25165824", "3"], "{map}");
    // Trim 1 MiB in the middle of the data: it becomes a hole.
    let out = nbdsh(&format!(
        "import nbd\nh = nbd.NBD()\nh.connect_uri({:?})\nh.trim({MIB}, {})\nh.flush()\n",
        s.uri(&vol),
        2 * MIB
    ));
    assert_ok(&out, "trim");
    let map = run_ok("nbdinfo", &["--map", &s.uri(&vol)]);
    assert!(
        map.contains(&format!("{}     {}    3", 2 * MIB, MIB))
            || map.contains("2097152     1048576    3"),
        "{map}"
    );
    // The snapshot still maps its 8 MiB as data.
    let map = run_ok("nbdinfo", &["--map", &s.uri(&snap)]);
    assert!(
        map.lines().next().unwrap().contains("8388608    0"),
        "{map}"
    );

    // qemu:allocation-depth: the layer each extent resolves to, as for a
    // qcow2 chain (1: the top, 2: the snapshot's layer under it, 0: none).
    let depth = |uri: &str| -> Vec<(usize, usize, u32)> {
        let map = run_ok("nbdinfo", &["--map=qemu:allocation-depth", uri]);
        map.lines()
            .map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (
                    f[0].parse().unwrap(),
                    f[1].parse().unwrap(),
                    f[2].parse().unwrap(),
                )
            })
            .collect()
    };
    assert_eq!(
        depth(&s.uri(&vol)),
        [
            (0, 2 * MIB, 2),
            (2 * MIB, MIB, 1),
            (3 * MIB, 5 * MIB, 2),
            (8 * MIB, 24 * MIB, 0)
        ]
    );
    assert_eq!(
        depth(&s.uri(&snap)),
        [(0, 8 * MIB, 1), (8 * MIB, 24 * MIB, 0)]
    );

    // qemu:dirty-bitmap:<snapshot>: what changed since that snapshot (the
    // trimmed MiB), on the volume and on a later snapshot of it, as an
    // incremental backup reads it (1: dirty).
    let later = s.snapshot("info-later", &vol);
    for uri in [s.uri(&vol), s.uri(&later)] {
        let map = run_ok(
            "nbdinfo",
            &[&format!("--map=qemu:dirty-bitmap:{snap}"), &uri],
        );
        let extents: Vec<(usize, usize, u32)> = map
            .lines()
            .map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (
                    f[0].parse().unwrap(),
                    f[1].parse().unwrap(),
                    f[2].parse().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            extents,
            [(0, 2 * MIB, 0), (2 * MIB, MIB, 1), (3 * MIB, 29 * MIB, 0)],
            "{uri}: {map}"
        );
    }
    // Only against an older snapshot of the same volume: a newer one, or
    // an unknown name, is not a context the server offers.
    for base in [later.clone(), "nonsense".to_string()] {
        let out = std::process::Command::new("nbdinfo")
            .args([&format!("--map=qemu:dirty-bitmap:{base}"), &s.uri(&snap)])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{base}: {out:?}");
    }

    // Metrics saw all of it.
    let m = s.metrics();
    for want in [
        format!("strata_volume_ops_total{{volume=\"{vol}\",op=\"write\"}}"),
        format!("strata_volume_bytes_total{{volume=\"{vol}\",op=\"write\"}} 8388608"),
        format!(
            "strata_volume_op_duration_seconds_bucket{{le=\"0.00001\",volume=\"{vol}\",op=\"trim\"}}"
        ),
        format!("strata_volume_chain_depth{{volume=\"{vol}\"}} 3"),
        format!("strata_volume_logical_bytes{{volume=\"{vol}\"}} 33554432"),
        format!("strata_volume_allocated_bytes{{volume=\"{vol}\"}} 7340032"),
        format!("strata_volume_flushes_total{{volume=\"{vol}\",kind=\"logged\"}} "),
        format!("strata_volume_flushes_total{{volume=\"{vol}\",kind=\"synced\"}} "),
        "strata_pool_capacity_bytes ".to_string(),
        "strata_pool_free_bytes ".to_string(),
        "strata_nbd_connections ".to_string(),
    ] {
        assert!(m.contains(&want), "metrics lack {want}:\n{m}");
    }
}

#[test]
fn nbd_over_loopback_tcp_when_asked() {
    if require_tools(&["nbdinfo", "nbdcopy"]).is_err() {
        return;
    }
    let s = Standalone::start_with_tcp(true);
    let port = s.nbd_tcp_port.unwrap();
    let vol = s.create_volume("tcp", "8MiB");
    let src = s.dir.path().join("src");
    let back = s.dir.path().join("back");
    let data = write_random(&src, 8 * MIB, 7);
    let uri = format!("nbd://127.0.0.1:{port}/{vol}");
    run_ok("nbdcopy", &[src.to_str().unwrap(), &uri]);
    // Written over TCP, read back over the unix socket.
    run_ok("nbdcopy", &[&s.uri(&vol), back.to_str().unwrap()]);
    assert!(std::fs::read(&back).unwrap() == data);
    let info = run_ok("nbdinfo", &[&uri]);
    assert!(info.contains("export-size: 8388608"), "{info}");
}

#[test]
fn nbdcopy_round_trips_random_data_over_several_connections() {
    if require_tools(&["nbdcopy"]).is_err() {
        return;
    }
    let s = Standalone::start();
    let vol = s.create_volume("copy", "64MiB");
    let src = s.dir.path().join("src");
    let back = s.dir.path().join("back");
    let data = write_random(&src, 64 * MIB, 2);
    run_ok(
        "nbdcopy",
        &[
            "--connections=4",
            "--requests=32",
            src.to_str().unwrap(),
            &s.uri(&vol),
        ],
    );
    run_ok(
        "nbdcopy",
        &["--connections=4", &s.uri(&vol), back.to_str().unwrap()],
    );
    assert!(
        std::fs::read(&back).unwrap() == data,
        "data differs after a round trip"
    );
}

#[test]
fn libnbd_client_covers_fua_flush_trim_zero_block_status_and_errors() {
    if require_tools(&["nbdinfo"]).is_err()
        || require(
            std::path::Path::new("/usr/bin/python3").exists(),
            "no /usr/bin/python3",
        )
        .is_err()
    {
        return;
    }
    let s = Standalone::start();
    let vol = s.create_volume("sh", "16MiB");
    let snap = s.snapshot("sh-snap", &vol);
    let script = format!(
        r#"
import errno, nbd
def expect_error(code, f, *a):
    try:
        f(*a)
    except nbd.Error as e:
        assert e.errno == code, (e.errno, e.string)
        return
    raise AssertionError("expected " + code)

h = nbd.NBD()
h.add_meta_context("base:allocation")
h.connect_uri({vol:?})
assert h.can_fua() and h.can_flush() and h.can_trim() and h.can_zero() and h.can_fast_zero()
assert h.can_cache()
assert h.can_multi_conn() and h.can_meta_context("base:allocation")
h.pwrite(b"A" * 65536, 0, nbd.CMD_FLAG_FUA)
h.pwrite(b"B" * 1000, 70000)
h.flush()
assert h.pread(65536, 0) == b"A" * 65536
assert h.pread(1000, 70000) == b"B" * 1000
assert h.pread(10, 69995) == b"\0" * 5 + b"B" * 5
h.zero(8192, 4096)
assert h.pread(8192, 4096) == b"\0" * 8192
h.zero(4096, 16384, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FUA)
h.zero(4096, 32768, nbd.CMD_FLAG_FAST_ZERO)
# A fast zero that would write zeroes as data (a partial block) is refused.
expect_error("ENOTSUP", h.zero, 100, 4096 + 8, nbd.CMD_FLAG_FAST_ZERO)
h.cache(65536, 0)
h.trim(4096, 40960)
assert h.pread(4096, 40960) == b"\0" * 4096
ext = []
h.block_status(65536, 0, lambda ctx, off, e, err: ext.extend(e))
# data, zero(8192 at 4096..12288), data, ..., with hole|zero flags = 3
assert ext[0:2] == [4096, 0], ext
assert ext[2:4] == [8192, 3], ext
one = []
h.block_status(65536, 0, lambda ctx, off, e, err: one.extend(e), nbd.CMD_FLAG_REQ_ONE)
assert len(one) == 2, one

# Strict mode off: let the server judge bad requests.
h.set_strict_mode(0)
size = h.get_size()
expect_error("EINVAL", h.pread, 4096, size)
expect_error("ENOSPC", h.pwrite, b"x" * 4096, size - 100)
expect_error("EINVAL", h.block_status, 4096, size, lambda *a: 0)
expect_error("EINVAL", h.trim, 8192, size - 4096)
expect_error("EINVAL", h.cache, 4096, size)
# The connection survives every refused request.
assert h.pread(4, 0) == b"AAAA"
h.shutdown()

# Both contexts: a chunk each, in one reply (one extent each with REQ_ONE).
d = nbd.NBD()
d.add_meta_context("base:allocation")
d.add_meta_context("qemu:allocation-depth")
d.connect_uri({vol:?})
assert d.can_meta_context("qemu:allocation-depth")
seen = {{}}
d.block_status(65536, 0, lambda ctx, off, e, err: seen.setdefault(ctx, []).extend(e))
assert sorted(seen) == ["base:allocation", "qemu:allocation-depth"], seen
# Data in the top layer, then zeroes discarded down to nothing.
assert seen["qemu:allocation-depth"][:4] == [4096, 1, 8192, 0], seen
assert seen["base:allocation"][:4] == [4096, 0, 8192, 3], seen
seen = {{}}
d.block_status(65536, 0, lambda ctx, off, e, err: seen.setdefault(ctx, []).extend(e), nbd.CMD_FLAG_REQ_ONE)
assert [len(e) for e in seen.values()] == [2, 2], seen
d.shutdown()

r = nbd.NBD()
r.connect_uri({snap:?})
assert r.is_read_only()
r.set_strict_mode(0)
expect_error("EPERM", r.pwrite, b"x" * 4096, 0)
expect_error("EPERM", r.trim, 4096, 0)
assert r.pread(4096, 0) == b"\0" * 4096

bad = nbd.NBD()
try:
    bad.connect_uri({unknown:?})
    raise AssertionError("unknown export accepted")
except nbd.Error:
    pass
print("ok")
"#,
        vol = s.uri(&vol),
        snap = s.uri(&snap),
        unknown = s.uri("no-such-export"),
    );
    let out = assert_ok(&nbdsh(&script), "libnbd script");
    assert!(out.contains("ok"));
}

#[test]
fn qemu_img_reads_writes_and_compares_exports() {
    if require_tools(&["qemu-img"]).is_err() {
        return;
    }
    let s = Standalone::start();
    let vol = s.create_volume("qemu", "32MiB");
    let raw = s.dir.path().join("in.raw");
    write_random(&raw, 32 * MIB, 3);
    let info = run_ok("qemu-img", &["info", "--output=json", &s.uri(&vol)]);
    assert!(info.contains("\"virtual-size\": 33554432"), "{info}");
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-O",
            "raw",
            raw.to_str().unwrap(),
            &s.uri(&vol),
        ],
    );
    run_ok(
        "qemu-img",
        &["compare", raw.to_str().unwrap(), &s.uri(&vol)],
    );
    let snap = s.snapshot("qemu-snap", &vol);
    let qcow = s.dir.path().join("out.qcow2");
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-O",
            "qcow2",
            &s.uri(&snap),
            qcow.to_str().unwrap(),
        ],
    );
    run_ok(
        "qemu-img",
        &["compare", qcow.to_str().unwrap(), raw.to_str().unwrap()],
    );
}

#[test]
fn snapshot_export_keeps_snapshot_time_data_even_after_deletion() {
    if require_tools(&["nbdcopy"]).is_err() {
        return;
    }
    let s = Standalone::start();
    let vol = s.create_volume("snapdata", "16MiB");
    let a = s.dir.path().join("a");
    let b = s.dir.path().join("b");
    let data_a = write_random(&a, 16 * MIB, 4);
    write_random(&b, 16 * MIB, 5);
    run_ok("nbdcopy", &[a.to_str().unwrap(), &s.uri(&vol)]);
    let snap = s.snapshot("t0", &vol);
    // An open reader of the snapshot, then new data and the snapshot's deletion.
    let script = format!(
        r#"
import nbd, subprocess, sys
r = nbd.NBD()
r.connect_uri({snap:?})
subprocess.run(["nbdcopy", {b:?}, {vol:?}], check=True, stdout=subprocess.DEVNULL)
subprocess.run([{strata:?}, "snapshot", "delete", {snap_id:?}], check=True, stdout=subprocess.DEVNULL)
data = bytearray()
for off in range(0, {len}, 1 << 20):
    data += r.pread(1 << 20, off)
sys.stdout.buffer.write(bytes(data))
"#,
        snap = s.uri(&snap),
        b = b.to_str().unwrap(),
        vol = s.uri(&vol),
        strata = env!("CARGO_BIN_EXE_strata"),
        snap_id = snap,
        len = 16 * MIB,
    );
    let out = Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(&script)
        .env(
            "STRATA_CSI_ENDPOINT",
            format!("unix://{}", s.csi_socket().display()),
        )
        .output()
        .unwrap();
    assert_ok(&out, "reading a deleted snapshot through an open export");
    assert!(
        out.stdout == data_a,
        "the open snapshot export returned other data"
    );
    // The snapshot is gone for new clients.
    let info = Command::new("nbdinfo").arg(s.uri(&snap)).output().unwrap();
    assert!(!info.status.success());
}

#[test]
fn kill9_in_the_middle_of_writes_keeps_flushed_data() {
    if require(
        std::path::Path::new("/usr/bin/python3").exists(),
        "no /usr/bin/python3",
    )
    .is_err()
    {
        return;
    }
    let mut s = Standalone::start();
    let vol = s.create_volume("crash", "64MiB");
    // A writer that reports each completed flush; blocks hold their index.
    let script = format!(
        r#"
import nbd, sys
h = nbd.NBD()
h.connect_uri({vol:?})
n = 0
while True:
    for i in range(16):
        blk = n * 16 + i
        h.pwrite(blk.to_bytes(8, "little") * 512, (blk % 16384) * 4096)
    h.flush()
    n += 1
    print(n, flush=True)
"#,
        vol = s.uri(&vol)
    );
    let mut writer = Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(&script)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = writer.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .last()
    });
    std::thread::sleep(std::time::Duration::from_millis(1500));
    s.kill9();
    let _ = writer.wait();
    let flushed: u64 = reader
        .join()
        .unwrap()
        .expect("some flushes completed")
        .trim()
        .parse()
        .unwrap();
    assert!(flushed > 10, "only {flushed} flushes before the kill");
    s.spawn();
    let check = format!(
        r#"
import nbd
h = nbd.NBD()
h.connect_uri({vol:?})
flushed = {flushed}
for blk in range(min(flushed * 16, 16384)):
    # The newest flushed write to this block (blocks wrap every 16384).
    newest = blk
    while newest + 16384 < flushed * 16:
        newest += 16384
    got = h.pread(4096, blk * 4096)
    want = newest.to_bytes(8, "little") * 512
    if got != want:
        later = int.from_bytes(got[:8], "little")
        # A later, unflushed write to the same block may have landed.
        assert later > newest and later % 16384 == blk and got == later.to_bytes(8, "little") * 512, (blk, newest)
print("checked", min(flushed * 16, 16384), "blocks")
"#,
        vol = s.uri(&vol)
    );
    let out = assert_ok(&nbdsh(&check), "verifying flushed data after kill -9");
    assert!(out.contains("checked"));
}

#[test]
fn sigterm_flushes_and_exits_zero() {
    if require(
        std::path::Path::new("/usr/bin/python3").exists(),
        "no /usr/bin/python3",
    )
    .is_err()
    {
        return;
    }
    let mut s = Standalone::start();
    let vol = s.create_volume("term", "8MiB");
    let out = nbdsh(&format!(
        "import nbd\nh = nbd.NBD()\nh.connect_uri({:?})\nh.pwrite(b'Z' * 4096, 0)\n",
        s.uri(&vol)
    ));
    assert_ok(&out, "unflushed write");
    let status = s.terminate();
    assert!(status.success(), "exit status {status}\n{}", s.log());
    assert!(s.log().contains("stopped cleanly"));
    s.spawn();
    let out = nbdsh(&format!(
        "import nbd\nh = nbd.NBD()\nh.connect_uri({:?})\nassert h.pread(4096, 0) == b'Z' * 4096\n",
        s.uri(&vol)
    ));
    assert_ok(&out, "data written before SIGTERM");
}

#[test]
fn filesystems_on_nbdfuse_and_a_loop_device_survive_fsck() {
    if require_tools(&["nbdfuse", "fusermount3", "losetup", "mkfs.ext4", "mkfs.xfs"]).is_err()
        || require(common::is_root(), "needs root for loop devices and mounts").is_err()
    {
        return;
    }
    let s = Standalone::start();
    for (fs, mkfs, fsck) in [
        ("ext4", vec!["mkfs.ext4", "-q"], vec!["fsck.ext4", "-n"]),
        ("xfs", vec!["mkfs.xfs", "-q"], vec!["xfs_repair", "-n"]),
    ] {
        let vol = s.create_volume(&format!("fs-{fs}"), "320MiB");
        let attached = Attached::new(&s, &vol, fs);
        let mut args: Vec<&str> = mkfs[1..].to_vec();
        args.push(&attached.loopdev);
        run_ok(mkfs[0], &args);
        let mnt = s.dir.path().join(format!("mnt-{fs}"));
        std::fs::create_dir_all(&mnt).unwrap();
        run_ok("mount", &[&attached.loopdev, mnt.to_str().unwrap()]);
        let payload = write_random(&mnt.join("file.bin"), 8 * MIB, 6);
        std::fs::write(mnt.join("note.txt"), "written through strata\n").unwrap();
        run_ok("sync", &[]);
        run_ok("umount", &[mnt.to_str().unwrap()]);
        let mut args: Vec<&str> = fsck[1..].to_vec();
        args.push(&attached.loopdev);
        run_ok(fsck[0], &args);
        // Remount and read back.
        run_ok("mount", &[&attached.loopdev, mnt.to_str().unwrap()]);
        assert!(std::fs::read(mnt.join("file.bin")).unwrap() == payload);
        run_ok("umount", &[mnt.to_str().unwrap()]);
    }
}

/// A volume attached as a block device: nbdfuse exposes the export as a
/// file, losetup turns the file into /dev/loopN (4096-byte sectors, direct
/// I/O so data is not cached twice). Detached on drop.
struct Attached {
    fuse_dir: std::path::PathBuf,
    loopdev: String,
    nbdfuse: std::process::Child,
}

impl Attached {
    fn new(s: &Standalone, vol: &str, tag: &str) -> Attached {
        let fuse_dir = s.dir.path().join(format!("fuse-{tag}"));
        std::fs::create_dir_all(&fuse_dir).unwrap();
        let file = fuse_dir.join("disk");
        // nbdfuse serves in the foreground until unmounted.
        let nbdfuse = Command::new("nbdfuse")
            .arg(&file)
            .arg(s.uri(vol))
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !file.exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "nbdfuse did not expose {}",
                file.display()
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let loopdev = run_ok(
            "losetup",
            &[
                "-f",
                "--show",
                "--sector-size",
                "4096",
                "--direct-io=on",
                file.to_str().unwrap(),
            ],
        )
        .trim()
        .to_string();
        Attached {
            fuse_dir,
            loopdev,
            nbdfuse,
        }
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.loopdev]).status();
        let _ = Command::new("fusermount3")
            .arg("-u")
            .arg(&self.fuse_dir)
            .status();
        let _ = self.nbdfuse.wait();
    }
}
