//! Filesystems and mounts on the node: mount and unmount (syscalls),
//! `/proc/self/mountinfo`, what a device holds (blkid), mkfs, online grow,
//! freeze/thaw, and usage (statvfs). External tools are called only where
//! Linux offers no syscall (mkfs, resize2fs, xfs_growfs, blkid).

use std::ffi::{CString, OsStr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::error::{Error, Result, io};

/// Filesystems Strata can create on a volume, with the smallest device
/// each can be made on (xfsprogs refuses below 300 MiB; mke2fs with 4 KiB
/// blocks needs a few hundred KiB, and 1 MiB keeps a margin).
pub const FILESYSTEMS: [(&str, u64); 2] = [("ext4", 1 << 20), ("xfs", 300 << 20)];

/// The smallest volume a filesystem can be made on, or `None` if Strata
/// does not make that filesystem.
pub fn min_size(fs_type: &str) -> Option<u64> {
    FILESYSTEMS
        .iter()
        .find(|(name, _)| *name == fs_type)
        .map(|(_, min)| *min)
}

fn cstr(s: &OsStr) -> std::io::Result<CString> {
    CString::new(s.as_bytes()).map_err(|_| std::io::ErrorKind::InvalidInput.into())
}

/// mount(2).
pub fn mount(
    source: &str,
    target: &Path,
    fs_type: &str,
    flags: libc::c_ulong,
    data: &str,
) -> std::io::Result<()> {
    let (src, tgt) = (cstr(OsStr::new(source))?, cstr(target.as_os_str())?);
    let (fst, dat) = (cstr(OsStr::new(fs_type))?, cstr(OsStr::new(data))?);
    // SAFETY: every pointer is a valid NUL-terminated string that outlives
    // the call.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            tgt.as_ptr(),
            fst.as_ptr(),
            flags,
            dat.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Bind-mounts `source` on `target`; read-only needs a second, remounting
/// step (Linux ignores MS_RDONLY on the first bind).
pub fn bind(source: &Path, target: &Path, read_only: bool) -> std::io::Result<()> {
    let src = source.to_str().ok_or(std::io::ErrorKind::InvalidInput)?;
    mount(src, target, "", libc::MS_BIND, "")?;
    if read_only {
        let flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY;
        if let Err(e) = mount("", target, "", flags, "") {
            let _ = unmount(target, true);
            return Err(e);
        }
    }
    Ok(())
}

/// Unmounts `target` (lazily: detached now, released when unused).
/// `Ok(false)` if nothing was mounted there.
pub fn unmount(target: &Path, lazy: bool) -> std::io::Result<bool> {
    let tgt = cstr(target.as_os_str())?;
    let flags = if lazy { libc::MNT_DETACH } else { 0 };
    // SAFETY: a valid NUL-terminated path.
    let rc = unsafe { libc::umount2(tgt.as_ptr(), flags) };
    if rc == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EINVAL | libc::ENOENT) => Ok(false),
        _ => Err(e),
    }
}

/// Unmounts `target`, retrying briefly while it is busy (a loop device or
/// a closing file may hold it for a moment), then lazily.
pub fn unmount_patiently(target: &Path) -> Result<()> {
    for _ in 0..50 {
        match unmount(target, false) {
            Ok(_) => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => return Err(io("unmount", target)(e)),
        }
    }
    tracing::warn!(path = %target.display(), "still busy; unmounting lazily");
    unmount(target, true)
        .map(drop)
        .map_err(io("unmount", target))
}

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// major:minor of the mounted filesystem's device.
    pub dev: (u32, u32),
    /// The path inside that filesystem that is mounted (`/` for a whole
    /// filesystem, the bound path for a bind mount).
    pub root: PathBuf,
    pub mount_point: PathBuf,
    /// Per-mount options (`rw`, `ro`, `nosuid`...).
    pub options: String,
    pub fs_type: String,
    pub source: String,
}

impl MountEntry {
    pub fn read_only(&self) -> bool {
        self.options.split(',').any(|o| o == "ro")
    }
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(s: &str) -> PathBuf {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 4 <= b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    PathBuf::from(OsStr::from_bytes(&out))
}

/// Parses mountinfo text; malformed lines are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let l: Vec<&str> = left.split(' ').collect();
            let r: Vec<&str> = right.split(' ').collect();
            if l.len() < 6 || r.len() < 2 {
                return None;
            }
            let (maj, min) = l[2].split_once(':')?;
            Some(MountEntry {
                dev: (maj.parse().ok()?, min.parse().ok()?),
                root: unescape(l[3]),
                mount_point: unescape(l[4]),
                options: l[5].to_string(),
                fs_type: r[0].to_string(),
                source: unescape(r[1]).to_string_lossy().into_owned(),
            })
        })
        .collect()
}

/// Every mount this process sees.
pub fn mounts() -> Result<Vec<MountEntry>> {
    let path = "/proc/self/mountinfo";
    let text = std::fs::read_to_string(path).map_err(io("read", path))?;
    Ok(parse_mountinfo(&text))
}

/// The topmost mount exactly at `path`, if any.
pub fn mount_at(path: &Path) -> Result<Option<MountEntry>> {
    Ok(mounts()?.into_iter().rev().find(|m| m.mount_point == path))
}

/// Runs a tool; its stderr becomes the error.
pub fn run(cmd: &str, args: &[&OsStr]) -> Result<String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| Error::Tool {
            command: cmd.to_string(),
            status: "not started".into(),
            stderr: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(Error::Tool {
            command: format!(
                "{cmd} {}",
                args.iter()
                    .map(|a| a.to_string_lossy())
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// What a device holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    /// No signature blkid knows: safe to format.
    Blank,
    /// A filesystem of this type.
    Filesystem(String),
    /// Something else (a partition table, LVM, RAID member...).
    Other(String),
}

/// Asks blkid (low-level probing, no cache) what `device` holds.
pub fn probe(device: &Path) -> Result<Content> {
    let out = Command::new("blkid")
        .args([OsStr::new("-p"), OsStr::new("-o"), OsStr::new("export")])
        .arg(device)
        .output()
        .map_err(|e| Error::Tool {
            command: "blkid".into(),
            status: "not started".into(),
            stderr: e.to_string(),
        })?;
    match out.status.code() {
        Some(0) => {}
        // blkid: "the specified token was not found", i.e. nothing there.
        Some(2) => return Ok(Content::Blank),
        _ => {
            return Err(Error::Tool {
                command: format!("blkid -p {}", device.display()),
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let value = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .map(str::to_string)
    };
    Ok(match (value("TYPE"), value("PTTYPE"), value("USAGE")) {
        (Some(t), _, Some(u)) if u == "filesystem" => Content::Filesystem(t),
        (Some(t), _, _) => Content::Other(t),
        (None, Some(pt), _) => Content::Other(format!("a {pt} partition table")),
        (None, None, _) => Content::Blank,
    })
}

/// Makes a filesystem on a blank device (no discard: a new volume reads
/// as zeros already).
pub fn mkfs(fs_type: &str, device: &Path) -> Result<()> {
    let dev = device.as_os_str();
    match fs_type {
        "ext4" => run(
            "mkfs.ext4",
            &[
                OsStr::new("-q"),
                OsStr::new("-F"),
                OsStr::new("-E"),
                OsStr::new("nodiscard"),
                dev,
            ],
        ),
        "xfs" => run(
            "mkfs.xfs",
            &[OsStr::new("-q"), OsStr::new("-f"), OsStr::new("-K"), dev],
        ),
        other => Err(Error::InvalidArgument(format!(
            "Strata cannot make a {other:?} filesystem"
        ))),
    }
    .map(drop)
}

/// `CAP_SYS_RESOURCE`: ext4's online resize (and `PR_SET_IO_FLUSHER`)
/// need it.
pub const CAP_SYS_RESOURCE: u32 = 24;

/// Whether this process has capability `cap` in its effective set.
pub fn has_capability(cap: u32) -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let hex = s
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))?
                .trim()
                .to_string();
            u64::from_str_radix(&hex, 16).ok()
        })
        .is_some_and(|caps| caps & (1 << cap) != 0)
}

/// Whether the ext2/3/4 filesystem on `device` already fills its
/// `device_bytes` (no whole filesystem block is left past its end). Reads
/// the superblock (`dumpe2fs -h`), which works mounted or not.
fn ext4_fills(device: &Path, device_bytes: u64) -> Result<bool> {
    let header = run("dumpe2fs", &[OsStr::new("-h"), device.as_os_str()])?;
    let field = |name: &str| {
        header
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    let (Some(count), Some(block)) = (field("Block count:"), field("Block size:")) else {
        return Err(Error::Tool {
            command: format!("dumpe2fs -h {}", device.display()),
            status: "unreadable output".into(),
            stderr: "no block count or block size".into(),
        });
    };
    Ok((count + 1) * block > device_bytes)
}

/// Grows a mounted filesystem to fill its (grown) device; nothing to do
/// (success) where it already does.
pub fn grow(fs_type: &str, device: &Path, mount_point: &Path) -> Result<()> {
    let ext = matches!(fs_type, "ext4" | "ext3" | "ext2");
    if ext && ext4_fills(device, device_size(device)?)? {
        return Ok(());
    }
    match fs_type {
        "ext4" | "ext3" | "ext2" if !has_capability(CAP_SYS_RESOURCE) => {
            Err(Error::FailedPrecondition(format!(
                "growing the mounted {fs_type} filesystem on {} needs CAP_SYS_RESOURCE, which \
                 this process lacks; give the node plugin that capability. The volume itself \
                 has grown: its filesystem grows at its next stage (offline)",
                device.display()
            )))
        }
        "ext4" | "ext3" | "ext2" => run("resize2fs", &[device.as_os_str()]),
        "xfs" => run("xfs_growfs", &[OsStr::new("-d"), mount_point.as_os_str()]),
        other => Err(Error::FailedPrecondition(format!(
            "cannot grow a {other} filesystem online"
        ))),
    }
    .map(drop)
}

/// Grows an unmounted ext4 filesystem to fill its device, if it does not:
/// the path for a volume grown while this process could not grow it
/// online (no CAP_SYS_RESOURCE). Checks it first, as resize2fs demands.
pub fn grow_ext4_offline(device: &Path, device_bytes: u64) -> Result<()> {
    let dev = device.as_os_str();
    if ext4_fills(device, device_bytes)? {
        return Ok(());
    }
    let fsck = Command::new("e2fsck")
        .args([OsStr::new("-f"), OsStr::new("-p"), dev])
        .output()
        .map_err(|e| Error::Tool {
            command: "e2fsck".into(),
            status: "not started".into(),
            stderr: e.to_string(),
        })?;
    // 0: clean; 1: errors fixed. Anything else needs a person.
    if !matches!(fsck.status.code(), Some(0 | 1)) {
        return Err(Error::Tool {
            command: format!("e2fsck -f -p {}", device.display()),
            status: fsck.status.to_string(),
            stderr: String::from_utf8_lossy(&fsck.stdout).trim().to_string(),
        });
    }
    run("resize2fs", &[dev]).map(drop)
}

const FIFREEZE: libc::c_ulong = 0xC004_5877;
const FITHAW: libc::c_ulong = 0xC004_5878;
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

/// A frozen filesystem, thawed when dropped (on every path, errors
/// included).
#[derive(Debug)]
pub struct Frozen {
    dir: OwnedFd,
    path: PathBuf,
}

/// Freezes the filesystem mounted at `mount_point` (FIFREEZE): writes are
/// flushed and new ones wait until the returned guard is dropped.
pub fn freeze(mount_point: &Path) -> Result<Frozen> {
    let dir = std::fs::File::open(mount_point).map_err(io("open", mount_point))?;
    let dir = OwnedFd::from(dir);
    // SAFETY: FIFREEZE takes no argument besides an int we pass as 0; the
    // descriptor is valid.
    let rc = unsafe { libc::ioctl(dir.as_raw_fd(), FIFREEZE, 0) };
    if rc != 0 {
        return Err(io("freeze", mount_point)(std::io::Error::last_os_error()));
    }
    Ok(Frozen {
        dir,
        path: mount_point.to_path_buf(),
    })
}

impl Drop for Frozen {
    fn drop(&mut self) {
        // SAFETY: as in `freeze`.
        let rc = unsafe { libc::ioctl(self.dir.as_raw_fd(), FITHAW, 0) };
        if rc != 0 {
            tracing::error!(path = %self.path.display(), error = %std::io::Error::last_os_error(), "thawing a filesystem failed");
        }
    }
}

/// Usage of a mounted filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsUsage {
    pub total_bytes: u64,
    pub available_bytes: u64,
    pub used_bytes: u64,
    pub total_inodes: u64,
    pub free_inodes: u64,
}

pub fn statvfs(path: &Path) -> Result<FsUsage> {
    let p = cstr(path.as_os_str()).map_err(io("statvfs", path))?;
    // SAFETY: an all-zero statvfs is a valid value to be overwritten.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid path and a pointer to a statvfs we own.
    if unsafe { libc::statvfs(p.as_ptr(), &mut st) } != 0 {
        return Err(io("statvfs", path)(std::io::Error::last_os_error()));
    }
    let frsize = st.f_frsize;
    Ok(FsUsage {
        total_bytes: st.f_blocks * frsize,
        available_bytes: st.f_bavail * frsize,
        used_bytes: (st.f_blocks - st.f_bfree) * frsize,
        total_inodes: st.f_files,
        free_inodes: st.f_ffree,
    })
}

/// Size of a block device in bytes.
pub fn device_size(device: &Path) -> Result<u64> {
    let f = std::fs::File::open(device).map_err(io("open", device))?;
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), BLKGETSIZE64, &mut size) };
    if rc != 0 {
        return Err(io("read the size of", device)(
            std::io::Error::last_os_error(),
        ));
    }
    Ok(size)
}

/// Whether `path` is a block device node.
pub fn is_block_device(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_parse_with_escapes_and_optional_fields() {
        let text = "\
36 35 98:0 /mnt1 /mnt/parent rw,noatime master:1 - ext3 /dev/root rw,errors=continue
37 36 7:3 / /var/lib/kubelet/pods/a\\040b/volumes ro,nosuid shared:5 master:2 - xfs /dev/loop3 rw,nouuid
garbage line
40 1 0:50 / /run/strata/fuse/x rw,nosuid,nodev - fuse.strata strata rw,user_id=0";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 3);
        assert_eq!(m[0].dev, (98, 0));
        assert_eq!(m[0].root, PathBuf::from("/mnt1"));
        assert_eq!(
            m[1].mount_point,
            PathBuf::from("/var/lib/kubelet/pods/a b/volumes")
        );
        assert!(m[1].read_only());
        assert_eq!(m[1].fs_type, "xfs");
        assert_eq!(m[1].source, "/dev/loop3");
        assert_eq!(m[2].fs_type, "fuse.strata");
        assert!(!m[2].read_only());
    }

    #[test]
    fn minimum_sizes_are_known_for_the_filesystems_strata_makes() {
        assert_eq!(min_size("xfs"), Some(300 << 20));
        assert_eq!(min_size("ext4"), Some(1 << 20));
        assert_eq!(min_size("btrfs"), None);
    }
}
