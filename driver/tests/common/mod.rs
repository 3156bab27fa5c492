//! Shared test support: a seeded random generator, and scratch directories
//! on the filesystems the suites must pass on (the default one, and XFS with
//! reflink on a loop image). Tests that need root skip with a loud message
//! outside CI; under `CI=true` a missing privilege or tool fails the test.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// xorshift64*: small, fast, reproducible from its seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.max(1))
    }

    /// Seed from `STRATA_TEST_SEED`, or from the clock (printed so a
    /// failure can be replayed).
    pub fn from_env(what: &str) -> Self {
        let seed = std::env::var("STRATA_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            });
        eprintln!("{what}: seed {seed} (replay with STRATA_TEST_SEED={seed})");
        Rng::new(seed)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// Whether we run under CI, where skipping is failing.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Returns `Err(reason)` if the test cannot run here; under CI that is a
/// panic instead.
pub fn require(ok: bool, reason: &str) -> Result<(), String> {
    if ok {
        return Ok(());
    }
    if in_ci() {
        panic!("CI=true but this test cannot run: {reason}");
    }
    eprintln!("\n*** SKIPPED: {reason} (this test runs for real under CI=true) ***\n");
    Err(reason.to_string())
}

fn run(cmd: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A filesystem image mounted on a loop device, unmounted on drop.
pub struct LoopFs {
    _dir: tempfile::TempDir,
    mount: PathBuf,
}

impl LoopFs {
    /// Makes a `size_mib` filesystem with `mkfs` (e.g. `["mkfs.xfs", "-q",
    /// "-m", "reflink=1"]`) and mounts it.
    pub fn new(mkfs: &[&str], size_mib: u64) -> Result<LoopFs, String> {
        require(is_root(), "needs root to mount a loop filesystem")?;
        require(have(mkfs[0]), &format!("{} is not installed", mkfs[0]))?;
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let img = dir.path().join("fs.img");
        let f = std::fs::File::create(&img).map_err(|e| e.to_string())?;
        f.set_len(size_mib << 20).map_err(|e| e.to_string())?;
        drop(f);
        let mut args: Vec<&str> = mkfs[1..].to_vec();
        let img_s = img.to_str().unwrap().to_string();
        args.push(&img_s);
        let made = run(mkfs[0], &args);
        if let Err(e) = made {
            require(false, &e)?;
        }
        let mount = dir.path().join("mnt");
        std::fs::create_dir(&mount).map_err(|e| e.to_string())?;
        let mounted = run("mount", &["-o", "loop", &img_s, mount.to_str().unwrap()]);
        if let Err(e) = mounted {
            require(false, &e)?;
        }
        Ok(LoopFs { _dir: dir, mount })
    }

    pub fn xfs_reflink(size_mib: u64) -> Result<LoopFs, String> {
        LoopFs::new(&["mkfs.xfs", "-q", "-f", "-m", "reflink=1"], size_mib)
    }

    pub fn ext4(size_mib: u64) -> Result<LoopFs, String> {
        LoopFs::new(&["mkfs.ext4", "-q", "-F"], size_mib)
    }

    pub fn path(&self) -> &Path {
        &self.mount
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let m = self.mount.to_str().unwrap();
        if run("umount", &[m]).is_err() {
            let _ = run("umount", &["-l", m]);
        }
    }
}

/// A scratch directory on some filesystem.
pub enum Scratch {
    Temp(tempfile::TempDir),
    Loop(LoopFs, PathBuf),
}

impl Scratch {
    pub fn path(&self) -> &Path {
        match self {
            Scratch::Temp(t) => t.path(),
            Scratch::Loop(_, p) => p,
        }
    }
}

/// Scratch directories on every filesystem the engine suites cover: the
/// default (ext4 here) and XFS with reflink=1 on a loop image.
pub fn filesystems() -> Vec<(&'static str, Scratch)> {
    let mut out = vec![("default", Scratch::Temp(tempfile::tempdir().unwrap()))];
    if let Ok(fs) = LoopFs::xfs_reflink(1024) {
        let dir = fs.path().join("pool");
        out.push(("xfs-reflink", Scratch::Loop(fs, dir)));
    }
    out
}

/// Steps for a randomised suite: `default` unless `STRATA_SOAK_STEPS` asks
/// for more.
pub fn steps(default: u64) -> u64 {
    std::env::var("STRATA_SOAK_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

pub mod cluster;
pub mod csi;
pub mod iscsi;
pub mod netns;
pub mod standalone;

/// Whether `tool` is on PATH.
pub fn have_tool(tool: &str) -> bool {
    have(tool)
}

/// Requires every tool (skips loudly outside CI, fails under CI).
pub fn require_tools(tools: &[&str]) -> Result<(), String> {
    for t in tools {
        require(
            have(t),
            &format!("{t} is not installed (scripts/install-deps installs it)"),
        )?;
    }
    Ok(())
}

/// Runs a command, returning stdout; panics with its stderr on failure.
pub fn run_ok(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Writes `data` at `offset` of a file or device and syncs it.
pub fn write_at(path: &Path, offset: u64, data: &[u8]) -> std::io::Result<()> {
    use std::io::{Seek, Write};
    let mut f = std::fs::OpenOptions::new().write(true).open(path)?;
    f.seek(std::io::SeekFrom::Start(offset))?;
    f.write_all(data)?;
    f.sync_all()
}

/// Writes `data` (whole 4 KiB blocks) at `offset` with O_DIRECT and no
/// flush: it reaches the device, which need not have made it durable.
pub fn write_direct(path: &Path, offset: u64, data: &[u8]) {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let f = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .unwrap();
    let mut raw = vec![0u8; data.len() + 4096];
    let skip = raw.as_ptr().align_offset(4096);
    raw[skip..skip + data.len()].copy_from_slice(data);
    f.write_all_at(&raw[skip..skip + data.len()], offset)
        .unwrap();
}

/// Reads `len` bytes at `offset` with O_DIRECT (past any page cache).
pub fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::io::{Read, Seek};
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .unwrap();
    f.seek(std::io::SeekFrom::Start(offset)).unwrap();
    // O_DIRECT wants an aligned buffer: over-allocate and align by hand.
    let mut raw = vec![0u8; len + 4096];
    let skip = raw.as_ptr().align_offset(4096);
    f.read_exact(&mut raw[skip..skip + len]).unwrap();
    raw[skip..skip + len].to_vec()
}
