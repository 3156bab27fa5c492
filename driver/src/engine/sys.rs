//! Thin wrappers over the few Linux calls the standard library lacks:
//! hole punching, zero-range allocation and the open-file limit. Each
//! returns `io::Result` and owns its `unsafe`.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// What `fallocate` could do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fallocated {
    /// The filesystem did it.
    Done,
    /// The filesystem does not support this mode.
    Unsupported,
}

fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<Fallocated> {
    let (Ok(off), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    };
    // SAFETY: fallocate only reads its integer arguments; the fd is valid for
    // the lifetime of `file`.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), mode, off, len) };
    if rc == 0 {
        return Ok(Fallocated::Done);
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => Ok(Fallocated::Unsupported),
        _ => Err(err),
    }
}

/// Deallocates `offset..offset+len` of `file` (reads return zeros), keeping
/// the file size.
pub(crate) fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<Fallocated> {
    fallocate(
        file,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        offset,
        len,
    )
}

/// Makes `offset..offset+len` of `file` read as zeros while keeping (or
/// allocating) its blocks.
pub(crate) fn zero_range(file: &File, offset: u64, len: u64) -> io::Result<Fallocated> {
    fallocate(
        file,
        libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
        offset,
        len,
    )
}

/// Raises the soft open-file limit to the hard limit and returns the new
/// soft limit.
pub(crate) fn raise_nofile_limit() -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass and nothing else.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit only reads the struct we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim = raised;
        }
    }
    Ok(lim.rlim_cur)
}

/// Total and free bytes of the filesystem holding `path` (free as seen by
/// this process: root may use the blocks reserved for root).
pub(crate) fn fs_space(path: &std::path::Path) -> io::Result<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: an all-zero statvfs is a valid value of this plain C struct.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a valid out pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let unit = st.f_frsize as u64;
    let free = if root { st.f_bfree } else { st.f_bavail } as u64;
    Ok((st.f_blocks as u64 * unit, free * unit))
}
