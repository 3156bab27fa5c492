//! Moving data between layer files: a pointer copy (FICLONERANGE: the
//! filesystem shares the extents, no data moves) where the filesystem can,
//! a byte copy (copy_file_range, then read/write) where it cannot. The
//! result is the same either way. Callers keep each call to a few MiB:
//! FICLONERANGE locks both files while it runs.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};

/// How a range was moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Reflink,
    Copy,
}

impl Method {
    pub fn label(self) -> &'static str {
        match self {
            Method::Reflink => "reflink",
            Method::Copy => "copy",
        }
    }
}

/// `FICLONERANGE` = `_IOW(0x94, 13, struct file_clone_range)`.
const FICLONERANGE: libc::c_ulong = 0x4020_940d;

#[repr(C)]
struct FileCloneRange {
    src_fd: i64,
    src_offset: u64,
    src_length: u64,
    dest_offset: u64,
}

/// Copies `len` bytes at `offset` from `src` to the same offset of `dst`.
/// Tries a pointer copy unless `no_reflink` says the filesystem refused one
/// before (then sets it when it refuses now).
pub(crate) fn copy_range(
    src: &File,
    dst: &File,
    offset: u64,
    len: u64,
    no_reflink: &AtomicBool,
) -> std::io::Result<Method> {
    if len == 0 {
        return Ok(Method::Copy);
    }
    if !no_reflink.load(Ordering::Relaxed) {
        let arg = FileCloneRange {
            src_fd: i64::from(src.as_raw_fd()),
            src_offset: offset,
            src_length: len,
            dest_offset: offset,
        };
        // SAFETY: FICLONERANGE reads one `struct file_clone_range` (repr(C),
        // same layout) that lives for the call.
        let rc = unsafe { libc::ioctl(dst.as_raw_fd(), FICLONERANGE, &arg) };
        if rc == 0 {
            warm_if_cached(src, dst, offset, len);
            return Ok(Method::Reflink);
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            // Not a filesystem that shares extents (or not between these
            // files): copy from now on.
            Some(libc::EOPNOTSUPP | libc::EXDEV | libc::EINVAL | libc::ENOTTY | libc::ENOSYS) => {
                no_reflink.store(true, Ordering::Relaxed);
            }
            _ => return Err(e),
        }
    }
    byte_copy(src, dst, offset, len)?;
    // Start writing the copy back now: a job must not pile up dirty pages
    // that would later make foreground writers wait for writeback.
    // SAFETY: sync_file_range on an open descriptor with plain integers.
    unsafe {
        libc::sync_file_range(
            dst.as_raw_fd(),
            offset as i64,
            len as i64,
            libc::SYNC_FILE_RANGE_WRITE,
        )
    };
    Ok(Method::Copy)
}

/// Bytes per copy call: each call holds the destination's inode lock, which
/// a foreground write to the same file waits for.
const COPY_CALL: u64 = 32 << 10;

/// Extents shared by a pointer copy do not share the page cache: reads of
/// the destination would go to the disk even where the source was cached.
/// If the range's first page is cached in the source (a read that may not
/// wait succeeds), ask for the destination's range to be read ahead, so a
/// merge does not turn a hot range cold.
fn warm_if_cached(src: &File, dst: &File, offset: u64, len: u64) {
    let mut page = [0u8; 4096];
    let iov = libc::iovec {
        iov_base: page.as_mut_ptr().cast(),
        iov_len: page.len(),
    };
    // SAFETY: one iovec over a local buffer; RWF_NOWAIT fails instead of
    // waiting for I/O. posix_fadvise takes plain integers.
    unsafe {
        if libc::preadv2(src.as_raw_fd(), &iov, 1, offset as i64, libc::RWF_NOWAIT) > 0 {
            libc::posix_fadvise(
                dst.as_raw_fd(),
                offset as i64,
                len as i64,
                libc::POSIX_FADV_WILLNEED,
            );
        }
    }
}

fn byte_copy(src: &File, dst: &File, offset: u64, len: u64) -> std::io::Result<()> {
    let mut done = 0u64;
    while done < len {
        let mut off_in = (offset + done) as i64;
        let mut off_out = off_in;
        // SAFETY: both descriptors are open; the offsets are locals the
        // call updates.
        let n = unsafe {
            libc::copy_file_range(
                src.as_raw_fd(),
                &mut off_in,
                dst.as_raw_fd(),
                &mut off_out,
                (len - done).min(COPY_CALL) as usize,
                0,
            )
        };
        if n > 0 {
            done += n as u64;
            continue;
        }
        if n == 0 {
            // Past the end of the source: the rest reads as zeros.
            return write_zeros(dst, offset + done, len - done);
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EXDEV | libc::ENOSYS | libc::EOPNOTSUPP | libc::EINVAL) => {
                return read_write(src, dst, offset + done, len - done);
            }
            _ => return Err(e),
        }
    }
    Ok(())
}

fn read_write(src: &File, dst: &File, offset: u64, len: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; len.min(1 << 20) as usize];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        let mut got = 0;
        while got < n {
            match src.read_at(&mut buf[got..n], offset + done + got as u64)? {
                0 => {
                    buf[got..n].fill(0);
                    got = n;
                }
                k => got += k,
            }
        }
        dst.write_all_at(&buf[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

fn write_zeros(dst: &File, offset: u64, len: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let zeros = vec![0u8; len.min(1 << 20) as usize];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(zeros.len() as u64) as usize;
        dst.write_all_at(&zeros[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn copies_the_same_bytes_either_way() {
        let dir = tempfile::tempdir().unwrap();
        let src = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("a"))
            .unwrap();
        let dst = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("b"))
            .unwrap();
        let data: Vec<u8> = (0..3 * 4096u32).map(|i| (i % 251) as u8).collect();
        src.write_all_at(&data, 4096).unwrap();
        dst.set_len(8 * 4096).unwrap();
        for no_reflink in [false, true] {
            let flag = AtomicBool::new(no_reflink);
            copy_range(&src, &dst, 4096, 3 * 4096, &flag).unwrap();
            let mut got = vec![0u8; data.len()];
            dst.read_exact_at(&mut got, 4096).unwrap();
            assert_eq!(got, data);
        }
        // Past the source's end: zeros.
        let flag = AtomicBool::new(true);
        dst.write_all_at(&[9u8; 4096], 6 * 4096).unwrap();
        copy_range(&src, &dst, 6 * 4096, 4096, &flag).unwrap();
        let mut got = vec![1u8; 4096];
        dst.read_exact_at(&mut got, 6 * 4096).unwrap();
        assert!(got.iter().all(|&b| b == 0));
    }
}
