//! Moving data between layer files (at the same offset for jobs, at
//! another for copies by token): a pointer copy (FICLONERANGE: the
//! filesystem shares the extents, no data moves) where the filesystem can,
//! a byte copy (copy_file_range, then read/write) where it cannot. The
//! result is the same either way. Callers keep each call to a few MiB:
//! FICLONERANGE locks both files while it runs.

use std::sync::atomic::{AtomicBool, Ordering};

use super::super::io::{Fallocated, FileIo, Span};

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

/// Copies `span` from `src` to `dst`. Tries a pointer copy unless
/// `no_reflink` says the filesystem refused one before (then sets it when
/// it refuses now).
pub(crate) fn copy_range(
    src: &dyn FileIo,
    dst: &dyn FileIo,
    span: Span,
    no_reflink: &AtomicBool,
) -> std::io::Result<Method> {
    if span.len == 0 {
        return Ok(Method::Copy);
    }
    if !no_reflink.load(Ordering::Relaxed) {
        match dst.clone_range(src, span)? {
            Fallocated::Done => return Ok(Method::Reflink),
            // Not a filesystem that shares extents (or not between these
            // files): copy from now on.
            Fallocated::Unsupported => no_reflink.store(true, Ordering::Relaxed),
        }
    }
    byte_copy(src, dst, span)?;
    // Start writing the copy back now: a job must not pile up dirty pages
    // that would later make foreground writers wait for writeback.
    dst.start_writeback(span.to, span.len);
    Ok(Method::Copy)
}

/// Bytes per copy call: each call holds the destination's inode lock, which
/// a foreground write to the same file waits for.
const COPY_CALL: u64 = 32 << 10;

fn byte_copy(src: &dyn FileIo, dst: &dyn FileIo, span: Span) -> std::io::Result<()> {
    let mut done = 0u64;
    while done < span.len {
        let rest = span.skip(done);
        let call = Span {
            len: rest.len.min(COPY_CALL),
            ..rest
        };
        match dst.copy_range(src, call)? {
            Some(0) => {
                // Past the end of the source: the rest reads as zeros.
                return write_zeros(dst, rest.to, rest.len);
            }
            Some(n) => done += n,
            None => return read_write(src, dst, rest),
        }
    }
    Ok(())
}

fn read_write(src: &dyn FileIo, dst: &dyn FileIo, span: Span) -> std::io::Result<()> {
    let mut buf = vec![0u8; span.len.min(1 << 20) as usize];
    let mut done = 0u64;
    while done < span.len {
        let n = (span.len - done).min(buf.len() as u64) as usize;
        super::super::io::read_full(src, &mut buf[..n], span.from + done)?;
        dst.write_all_at(&buf[..n], span.to + done)?;
        done += n as u64;
    }
    Ok(())
}

fn write_zeros(dst: &dyn FileIo, offset: u64, len: u64) -> std::io::Result<()> {
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
    use crate::engine::io::{Fs, Open, RealFs, read_full};

    #[test]
    fn copies_the_same_bytes_either_way() {
        let dir = tempfile::tempdir().unwrap();
        let src = RealFs.open(&dir.path().join("a"), Open::Truncate).unwrap();
        let dst = RealFs.open(&dir.path().join("b"), Open::Truncate).unwrap();
        let data: Vec<u8> = (0..3 * 4096u32).map(|i| (i % 251) as u8).collect();
        src.write_all_at(&data, 4096).unwrap();
        dst.set_len(8 * 4096).unwrap();
        for no_reflink in [false, true] {
            let flag = AtomicBool::new(no_reflink);
            copy_range(&*src, &*dst, Span::at(4096, 3 * 4096), &flag).unwrap();
            let mut got = vec![0u8; data.len()];
            read_full(&*dst, &mut got, 4096).unwrap();
            assert_eq!(got, data);
        }
        // Past the source's end: zeros.
        let flag = AtomicBool::new(true);
        dst.write_all_at(&[9u8; 4096], 6 * 4096).unwrap();
        copy_range(&*src, &*dst, Span::at(6 * 4096, 4096), &flag).unwrap();
        let mut got = vec![1u8; 4096];
        read_full(&*dst, &mut got, 6 * 4096).unwrap();
        assert!(got.iter().all(|&b| b == 0));
    }
}
