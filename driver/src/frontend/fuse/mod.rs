//! The FUSE frontend: a volume served as one file, `disk`, in a FUSE
//! filesystem of its own, so that a loop device can turn it into a block
//! device on nodes without the kernel nbd driver.
//!
//! ```text
//! (node)   open /dev/fuse, mount -t fuse.strata <dir>   (fd=N, default_permissions)
//! serve(): N worker threads on that fd, each:
//!            read one request ─▶ engine I/O (Export) ─▶ write its reply
//! ```
//!
//! The connection is the open `/dev/fuse` file, not this process: while any
//! process holds a descriptor of it (the node's fd holder does), the mount
//! stays alive and the kernel queues requests. A restarted server gets the
//! descriptor back, calls [`serve`] with the [`Negotiated`] parameters of
//! the first INIT, and sends `FUSE_NOTIFY_RESEND` so that requests its
//! predecessor read but never answered are delivered again.
//!
//! Every worker reads into a buffer of `max_write` plus headers, allocated
//! once: the I/O path allocates nothing that grows with load. The buffer's
//! pages are made present and writable before the first read: the kernel
//! fails a request with EIO when copying it into the reader's buffer fails,
//! and a page fault there fails when the reader is being killed (a kill -9
//! of a fresh server under a writer did exactly that to a loop device on
//! Linux 6.12). Workers are
//! marked `PR_SET_IO_FLUSHER`, because the kernel may be waiting on them to
//! complete writeback while it reclaims memory.

pub mod abi;

use std::io::IoSlice;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, UNIX_EPOCH};

use abi::{Attr, Body, InHeader, Negotiated, Out};

use super::{Export, IoMetrics};
use crate::engine::{Error, ErrorKind, ZeroFlags};
use crate::metrics::Metrics;

/// The name of the one file in a Strata FUSE mount.
pub const FILE_NAME: &str = "disk";

/// How long the kernel may cache names and attributes. Sizes change only
/// through [`FuseSession::size_changed`], which invalidates them.
const ATTR_VALID_SECS: u64 = 3600;

/// Limits of one FUSE connection.
#[derive(Debug, Clone, Copy)]
pub struct FuseConfig {
    /// Worker threads: requests served at once.
    pub workers: usize,
    /// Largest READ and WRITE payload (a multiple of 4 KiB).
    pub max_write: u32,
}

impl Default for FuseConfig {
    fn default() -> Self {
        FuseConfig {
            workers: 8,
            max_write: 256 << 10,
        }
    }
}

/// The engine error as an errno for the kernel.
fn errno(e: &Error) -> i32 {
    match e.kind() {
        ErrorKind::NoSpace | ErrorKind::LimitReached => libc::ENOSPC,
        ErrorKind::ReadOnly => libc::EROFS,
        ErrorKind::OutOfRange | ErrorKind::InvalidArgument => libc::EINVAL,
        ErrorKind::NotSupported => libc::EOPNOTSUPP,
        _ => libc::EIO,
    }
}

/// What a handler answers.
enum Reply {
    /// Nothing (FORGET, INTERRUPT).
    None,
    Error(i32),
    Body(Out),
    /// The first `n` bytes of the worker's data buffer.
    Data(usize),
}

impl From<Out> for Reply {
    fn from(o: Out) -> Self {
        Reply::Body(o)
    }
}

type Handled = Result<Reply, i32>;

struct Conn {
    fd: OwnedFd,
    export: Export,
    name: String,
    config: FuseConfig,
    metrics: Arc<Metrics>,
    ops: IoMetrics,
    negotiated: Mutex<Option<Negotiated>>,
    initialized: Condvar,
    mtime: u64,
}

/// A served FUSE connection. Dropping it does not stop the workers: they
/// run until the filesystem is unmounted (or the process exits), because
/// the kernel may need them for writeback at any time.
#[derive(Clone)]
pub struct FuseSession {
    conn: Arc<Conn>,
}

impl std::fmt::Debug for FuseSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FuseSession")
            .field("export", &self.conn.name)
            .field("fd", &self.conn.fd.as_raw_fd())
            .finish()
    }
}

/// Starts serving `export` on the connection `fd`. `resumed` is `None` for
/// a fresh mount (the kernel's INIT comes first) and the parameters of the
/// first INIT when taking over a connection after a restart; then pending
/// requests of the predecessor are asked for again.
pub fn serve(
    fd: OwnedFd,
    export: Export,
    metrics: Arc<Metrics>,
    config: FuseConfig,
    resumed: Option<Negotiated>,
) -> std::io::Result<FuseSession> {
    let name = export.name();
    let conn = Arc::new(Conn {
        ops: IoMetrics::new(&metrics, &name),
        fd,
        export,
        name,
        config: FuseConfig {
            max_write: resumed.map_or(config.max_write, |n| n.max_write),
            ..config
        },
        metrics,
        negotiated: Mutex::new(resumed),
        initialized: Condvar::new(),
        mtime: std::time::SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    });
    for i in 0..config.workers.max(1) {
        let conn = Arc::clone(&conn);
        std::thread::Builder::new()
            .name(format!("fuse-{i}"))
            .spawn(move || conn.work())?;
    }
    let session = FuseSession { conn };
    if resumed.is_some_and(|n| n.resend) {
        session.notify(abi::NOTIFY_RESEND, &[])?;
    }
    Ok(session)
}

impl FuseSession {
    /// Waits until the kernel's INIT has been answered.
    pub fn wait_initialized(&self, timeout: Duration) -> std::io::Result<Negotiated> {
        let deadline = Instant::now() + timeout;
        let mut n = self.conn.negotiated.lock().expect("negotiated");
        loop {
            if let Some(n) = *n {
                return Ok(n);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the kernel did not initialise the FUSE connection",
                ));
            }
            n = self
                .conn
                .initialized
                .wait_timeout(n, left)
                .expect("negotiated")
                .0;
        }
    }

    /// A duplicate of the connection's descriptor (for the fd holder).
    pub fn dup_fd(&self) -> std::io::Result<OwnedFd> {
        self.conn.fd.try_clone()
    }

    /// Tells the kernel the volume's size changed: its cached attributes
    /// of the file are dropped, so the next stat sees the new size.
    pub fn size_changed(&self) -> std::io::Result<()> {
        self.notify(abi::NOTIFY_INVAL_INODE, &abi::inval_inode(abi::FILE_ID).0)
    }

    fn notify(&self, code: i32, body: &[u8]) -> std::io::Result<()> {
        let head = abi::out_header(0, code, body.len());
        write_all_v(self.conn.fd.as_raw_fd(), &head, body)
    }
}

/// Writes one message (a reply must be one write).
fn write_all_v(fd: RawFd, head: &[u8], body: &[u8]) -> std::io::Result<()> {
    let iov = [IoSlice::new(head), IoSlice::new(body)];
    // SAFETY: `iov` holds two valid slices that outlive the call; IoSlice
    // is ABI-compatible with `struct iovec`.
    let n = unsafe { libc::writev(fd, iov.as_ptr().cast(), 2) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if n as usize != head.len() + body.len() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::WriteZero,
            "short write to /dev/fuse",
        ));
    }
    Ok(())
}

/// Makes every page of `buf` present and writable (a store to each page,
/// which the compiler may not leave out as it may a store of the zero a
/// fresh allocation already holds).
fn prefault(buf: &mut [u8]) {
    // Every page the buffer touches: one store per 4 KiB step, and the
    // last byte (the buffer need not start on a page boundary).
    let last = buf.len().checked_sub(1);
    for i in (0..buf.len()).step_by(4096).chain(last) {
        // SAFETY: `i` is in bounds of `buf`, which is exclusively borrowed.
        unsafe { std::ptr::write_volatile(buf.as_mut_ptr().add(i), 0) };
    }
}

impl Conn {
    fn work(&self) {
        super::mark_io_flusher();
        let max_write = self.config.max_write as usize;
        // The kernel refuses reads into buffers smaller than a full WRITE
        // request (payload plus headers), and never less than 8 KiB.
        let mut req = vec![0u8; max_write + 8192];
        prefault(&mut req);
        let mut data = vec![0u8; max_write];
        let fd = self.fd.as_raw_fd();
        loop {
            // SAFETY: `req` is a valid writable buffer of the given length.
            let n = unsafe { libc::read(fd, req.as_mut_ptr().cast(), req.len()) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                match e.raw_os_error() {
                    // Interrupted, or the request was aborted before we got it.
                    Some(libc::EINTR | libc::EAGAIN | libc::ENOENT) => continue,
                    // Unmounted or aborted: the connection is over.
                    Some(libc::ENODEV) => return,
                    _ => {
                        tracing::error!(export = %self.name, error = %e, "reading /dev/fuse failed; worker stops");
                        return;
                    }
                }
            }
            let msg = &req[..n as usize];
            let Ok(h) = InHeader::parse(msg) else {
                tracing::warn!(export = %self.name, len = n, "short FUSE request ignored");
                continue;
            };
            if h.unique & abi::UNIQUE_RESEND != 0 {
                tracing::info!(export = %self.name, opcode = h.opcode, "serving a request the previous server read but never answered");
            }
            let body = &msg[abi::IN_HEADER_LEN.min(msg.len())..];
            let reply = match self.handle(&h, body, &mut data) {
                Ok(r) => r,
                Err(errno) => Reply::Error(errno),
            };
            let sent = match reply {
                Reply::None => continue,
                Reply::Error(errno) => write_all_v(fd, &abi::out_header(h.unique, -errno, 0), &[]),
                Reply::Body(out) => {
                    write_all_v(fd, &abi::out_header(h.unique, 0, out.0.len()), &out.0)
                }
                Reply::Data(len) => {
                    write_all_v(fd, &abi::out_header(h.unique, 0, len), &data[..len])
                }
            };
            match sent {
                Ok(()) => {}
                // The request was interrupted meanwhile: nobody waits for it.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENODEV) => return,
                Err(e) => {
                    tracing::warn!(export = %self.name, opcode = h.opcode, error = %e, "FUSE reply failed")
                }
            }
        }
    }

    fn file_attr(&self) -> Attr {
        let size = self.export.size();
        Attr {
            ino: abi::FILE_ID,
            size,
            blocks: size.div_ceil(512),
            mode: libc::S_IFREG
                | if self.export.read_only() {
                    0o400
                } else {
                    0o600
                },
            nlink: 1,
            mtime: self.mtime,
        }
    }

    fn attr(&self, nodeid: u64) -> Result<Attr, i32> {
        match nodeid {
            abi::ROOT_ID => Ok(Attr {
                ino: abi::ROOT_ID,
                size: 4096,
                blocks: 8,
                mode: libc::S_IFDIR | 0o755,
                nlink: 2,
                mtime: self.mtime,
            }),
            abi::FILE_ID => Ok(self.file_attr()),
            _ => Err(libc::ENOENT),
        }
    }

    fn file(&self, nodeid: u64) -> Result<(), i32> {
        match nodeid {
            abi::FILE_ID => Ok(()),
            abi::ROOT_ID => Err(libc::EISDIR),
            _ => Err(libc::ENOENT),
        }
    }

    /// Runs one timed engine operation and counts it.
    fn timed(
        &self,
        op: &crate::metrics::OpMetrics,
        label: &'static str,
        bytes: u64,
        f: impl FnOnce() -> crate::engine::Result<()>,
    ) -> Result<(), i32> {
        let start = Instant::now();
        match f() {
            Ok(()) => {
                op.observe(bytes, start.elapsed());
                Ok(())
            }
            Err(e) => {
                self.metrics.error(&self.name, label, e.metric_label());
                tracing::debug!(export = %self.name, op = label, error = %e, "FUSE request failed");
                Err(errno(&e))
            }
        }
    }

    fn handle(&self, h: &InHeader, body: &[u8], data: &mut [u8]) -> Handled {
        let b = Body(body);
        let short = |_| libc::EINVAL;
        match h.opcode {
            abi::INIT => {
                let (out, negotiated) =
                    abi::init_reply(body, self.config.max_write).map_err(|why| {
                        tracing::error!(export = %self.name, %why, "FUSE INIT refused");
                        libc::EPROTO
                    })?;
                *self.negotiated.lock().expect("negotiated") = Some(negotiated);
                self.initialized.notify_all();
                Ok(out.into())
            }
            abi::LOOKUP => {
                let name = b.name(0).map_err(short)?;
                if h.nodeid != abi::ROOT_ID || name != FILE_NAME.as_bytes() {
                    return Err(libc::ENOENT);
                }
                Ok(abi::entry_out(&self.file_attr(), ATTR_VALID_SECS).into())
            }
            abi::GETATTR => Ok(abi::attr_out(&self.attr(h.nodeid)?, ATTR_VALID_SECS).into()),
            abi::SETATTR => {
                let attr = self.attr(h.nodeid)?;
                let valid = b.u32(0).map_err(short)?;
                if valid & (abi::FATTR_MODE | abi::FATTR_UID | abi::FATTR_GID) != 0 {
                    return Err(libc::EPERM);
                }
                // The size changes only through the volume (CSI expand);
                // a truncate would destroy data.
                if valid & abi::FATTR_SIZE != 0 && b.u64(16).map_err(short)? != attr.size {
                    return Err(libc::EPERM);
                }
                Ok(abi::attr_out(&attr, ATTR_VALID_SECS).into())
            }
            abi::OPEN => {
                self.file(h.nodeid)?;
                let flags = b.u32(0).map_err(short)? as i32;
                if self.export.read_only() && flags & libc::O_ACCMODE != libc::O_RDONLY {
                    return Err(libc::EROFS);
                }
                // No page cache: the loop device above caches, or nothing.
                Ok(abi::open_out(abi::FOPEN_DIRECT_IO).into())
            }
            abi::OPENDIR => match h.nodeid {
                abi::ROOT_ID => Ok(abi::open_out(0).into()),
                _ => Err(libc::ENOTDIR),
            },
            abi::READ => {
                self.file(h.nodeid)?;
                let offset = b.u64(8).map_err(short)?;
                let want = (b.u32(16).map_err(short)? as usize).min(data.len());
                let size = self.export.size();
                let len = size.saturating_sub(offset).min(want as u64) as usize;
                let buf = &mut data[..len];
                self.timed(&self.ops.read, "read", len as u64, || {
                    self.export.read(offset, buf)
                })?;
                Ok(Reply::Data(len))
            }
            abi::WRITE => {
                self.file(h.nodeid)?;
                let offset = b.u64(8).map_err(short)?;
                let len = b.u32(16).map_err(short)?;
                let payload = body.get(40..40 + len as usize).ok_or(libc::EINVAL)?;
                if offset.saturating_add(u64::from(len)) > self.export.size() {
                    return Err(libc::EFBIG);
                }
                self.timed(&self.ops.write, "write", u64::from(len), || {
                    self.export.write(offset, payload, false)
                })?;
                Ok(abi::write_out(len).into())
            }
            abi::FSYNC | abi::FSYNCDIR | abi::FLUSH | abi::SYNCFS => {
                self.timed(&self.ops.flush, "flush", 0, || self.export.flush())?;
                Ok(Out::default().into())
            }
            abi::FALLOCATE => {
                self.file(h.nodeid)?;
                let offset = b.u64(8).map_err(short)?;
                let len = b.u64(16).map_err(short)?;
                let mode = b.u32(24).map_err(short)?;
                let end = offset.checked_add(len).ok_or(libc::EINVAL)?;
                if end > self.export.size() {
                    // The file cannot grow except through the volume.
                    return Err(libc::EOPNOTSUPP);
                }
                match mode & !abi::FALLOC_KEEP_SIZE {
                    // Thin volumes need no preallocation.
                    0 => {}
                    abi::FALLOC_PUNCH_HOLE if mode & abi::FALLOC_KEEP_SIZE != 0 => {
                        self.timed(&self.ops.trim, "trim", len, || {
                            self.export.write_zeroes(offset, len, ZeroFlags::default())
                        })?;
                    }
                    abi::FALLOC_ZERO_RANGE => {
                        self.timed(&self.ops.zero, "write_zeroes", len, || {
                            self.export.write_zeroes(
                                offset,
                                len,
                                ZeroFlags {
                                    no_hole: true,
                                    fast: false,
                                },
                            )
                        })?;
                    }
                    _ => return Err(libc::EOPNOTSUPP),
                }
                Ok(Out::default().into())
            }
            abi::READDIR => {
                if h.nodeid != abi::ROOT_ID {
                    return Err(libc::ENOTDIR);
                }
                let from = b.u64(8).map_err(short)?;
                let size = b.u32(16).map_err(short)? as usize;
                let entries: [(u64, &[u8], u32); 3] = [
                    (abi::ROOT_ID, b".", libc::DT_DIR as u32),
                    (abi::ROOT_ID, b"..", libc::DT_DIR as u32),
                    (abi::FILE_ID, FILE_NAME.as_bytes(), libc::DT_REG as u32),
                ];
                let mut out = Out::default();
                for (i, (ino, name, dtype)) in entries.iter().enumerate().skip(from as usize) {
                    let before = out.0.len();
                    abi::dirent(&mut out, *ino, i as u64 + 1, name, *dtype);
                    if out.0.len() > size {
                        out.0.truncate(before);
                        break;
                    }
                }
                Ok(out.into())
            }
            abi::STATFS => {
                let blocks = self.export.size() / 4096;
                Ok(abi::statfs_out(blocks, 0, 1).into())
            }
            abi::RELEASE | abi::RELEASEDIR | abi::ACCESS | abi::DESTROY => {
                Ok(Out::default().into())
            }
            abi::FORGET | abi::BATCH_FORGET | abi::INTERRUPT => Ok(Reply::None),
            _ => Err(libc::ENOSYS),
        }
    }
}
