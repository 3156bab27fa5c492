//! Loop devices through their ioctls (`<linux/loop.h>`): attach a file with
//! a 4096-byte logical sector size and direct I/O in one `LOOP_CONFIGURE`,
//! grow (`LOOP_SET_CAPACITY`), detach, and find which file backs a device.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use super::error::{Error, Result, io};

const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
const LOOP_SET_CAPACITY: libc::c_ulong = 0x4C07;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;

const LO_FLAGS_READ_ONLY: u32 = 1;
const LO_FLAGS_DIRECT_IO: u32 = 16;

/// `struct loop_info64`.
#[repr(C)]
struct LoopInfo64 {
    device: u64,
    inode: u64,
    rdevice: u64,
    offset: u64,
    sizelimit: u64,
    number: u32,
    encrypt_type: u32,
    encrypt_key_size: u32,
    flags: u32,
    file_name: [u8; 64],
    crypt_name: [u8; 64],
    encrypt_key: [u8; 32],
    init: [u64; 2],
}

/// `struct loop_config`.
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

/// The device node of loop device `index`.
pub fn device_path(index: u32) -> PathBuf {
    PathBuf::from(format!("/dev/loop{index}"))
}

/// A configured loop device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attached {
    pub index: u32,
    /// Whether the kernel accepted direct I/O (no second page cache).
    pub direct_io: bool,
}

fn ioctl(file: &File, request: libc::c_ulong, arg: libc::c_ulong) -> std::io::Result<libc::c_int> {
    // SAFETY: the requests used here take an integer argument (or none).
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), request, arg) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(rc)
}

/// Attaches `backing` to a free loop device with a `block_size` logical
/// sector size, direct I/O and, with `read_only`, no writes.
pub fn attach(backing: &Path, block_size: u32, read_only: bool) -> Result<Attached> {
    let control = File::options()
        .read(true)
        .write(true)
        .open("/dev/loop-control")
        .map_err(io("open", "/dev/loop-control"))?;
    let file = File::options()
        .read(true)
        .write(!read_only)
        .open(backing)
        .map_err(io("open", backing))?;
    let mut name = [0u8; 64];
    let bytes = backing.as_os_str().as_encoded_bytes();
    let n = bytes.len().min(63);
    name[..n].copy_from_slice(&bytes[..n]);
    // Another process may take the free device between GET_FREE and
    // CONFIGURE: then it is busy and we ask again.
    for _ in 0..32 {
        let index = ioctl(&control, LOOP_CTL_GET_FREE, 0)
            .map_err(io("find a free loop device", "/dev/loop-control"))?
            as u32;
        let path = device_path(index);
        ensure_node(&path, index)?;
        let dev = File::options()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io("open", &path))?;
        let config = LoopConfig {
            fd: file.as_raw_fd() as u32,
            block_size,
            info: LoopInfo64 {
                device: 0,
                inode: 0,
                rdevice: 0,
                offset: 0,
                sizelimit: 0,
                number: 0,
                encrypt_type: 0,
                encrypt_key_size: 0,
                flags: LO_FLAGS_DIRECT_IO | if read_only { LO_FLAGS_READ_ONLY } else { 0 },
                file_name: name,
                crypt_name: [0; 64],
                encrypt_key: [0; 32],
                init: [0; 2],
            },
            reserved: [0; 8],
        };
        // SAFETY: LOOP_CONFIGURE reads one `struct loop_config`, which
        // `config` is (repr(C), same layout), alive for the call.
        let rc = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CONFIGURE, &config) };
        if rc == 0 {
            return Ok(Attached {
                index,
                direct_io: direct_io(index),
            });
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EBUSY) {
            return Err(io("configure", &path)(e));
        }
    }
    Err(Error::Unavailable(
        "no free loop device after 32 attempts".into(),
    ))
}

/// Makes the device node `path` for loop device `index` if it is missing.
/// LOOP_CTL_GET_FREE may create a device the kernel names but `path`'s
/// `/dev` lacks: a container's `/dev` (a kind node's, say) is a copy made
/// at its start, and nothing adds nodes to it later. The numbers come from
/// sysfs (`/sys/block/loopN/dev`), which knows the minor even with
/// partitions per loop device.
pub fn ensure_node(path: &Path, index: u32) -> Result<()> {
    if path.exists() {
        return Ok(());
    }
    let numbers = std::fs::read_to_string(format!("/sys/block/loop{index}/dev"))
        .ok()
        .and_then(|s| {
            let (major, minor) = s.trim().split_once(':')?;
            Some((major.parse::<u32>().ok()?, minor.parse::<u32>().ok()?))
        })
        .unwrap_or((7, index));
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| Error::InvalidArgument(format!("{} has a NUL byte", path.display())))?;
    // SAFETY: a valid NUL-terminated path; mknod reads nothing else.
    let rc = unsafe {
        libc::mknod(
            c.as_ptr(),
            libc::S_IFBLK | 0o660,
            libc::makedev(numbers.0, numbers.1),
        )
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        // Made meanwhile by udev or another attach: fine.
        if e.kind() != std::io::ErrorKind::AlreadyExists {
            return Err(io("create the device node", path)(e));
        }
    }
    Ok(())
}

fn sysfs(index: u32, attr: &str) -> Option<String> {
    std::fs::read_to_string(format!("/sys/block/loop{index}/loop/{attr}"))
        .ok()
        .map(|s| s.trim_end_matches('\n').to_string())
}

/// Whether loop device `index` does direct I/O to its file.
pub fn direct_io(index: u32) -> bool {
    sysfs(index, "dio").is_some_and(|v| v == "1")
}

/// The file behind loop device `index`, if it is attached.
pub fn backing_file(index: u32) -> Option<PathBuf> {
    sysfs(index, "backing_file").map(PathBuf::from)
}

/// Loop devices whose backing file is `file`.
pub fn find(file: &Path) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| {
            let name = e.ok()?.file_name();
            let index: u32 = name.to_str()?.strip_prefix("loop")?.parse().ok()?;
            (backing_file(index)? == file).then_some(index)
        })
        .collect()
}

/// Makes loop device `index` re-read its file's size.
pub fn set_capacity(index: u32) -> Result<()> {
    let path = device_path(index);
    let dev = File::open(&path).map_err(io("open", &path))?;
    ioctl(&dev, LOOP_SET_CAPACITY, 0).map_err(io("grow", &path))?;
    Ok(())
}

/// Detaches loop device `index`; a device with nothing attached is fine.
/// If something still has it open, the kernel detaches it when the last
/// user closes it.
pub fn detach(index: u32) -> Result<()> {
    let path = device_path(index);
    let dev = match File::open(&path) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io("open", &path)(e)),
    };
    match ioctl(&dev, LOOP_CLR_FD, 0) {
        Ok(_) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => Ok(()),
        Err(e) => Err(io("detach", &path)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn structs_have_the_kernel_layout() {
        assert_eq!(std::mem::size_of::<LoopInfo64>(), 232);
        assert_eq!(std::mem::size_of::<LoopConfig>(), 304);
    }
}
