//! The transmission phase: a few worker threads per connection, each of
//! which takes the next request off the socket (under the reader lock),
//! runs it against the engine, and writes its own reply (under the writer
//! lock). A request costs no thread handoff, replies go out in completion
//! order (NBD matches them by cookie), and as many requests run at once as
//! there are workers.
//!
//! A request that fails validation is answered with the protocol's error
//! and the connection goes on (a write's payload is read and dropped first,
//! so the stream stays in sync); only a bad request magic, a write payload
//! too large to skip, or a closed socket end the connection. On
//! `NBD_CMD_DISC` (or EOF) no further request is read, and the connection
//! closes once every request in flight has been answered.

use std::io::{BufRead, BufReader, IoSlice, Read, Write};
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use super::handshake::Session;
use super::protocol::*;
use crate::engine::{Error, ErrorKind, ZeroFlags};
use crate::frontend::{Export, IoMetrics};
use crate::metrics::Metrics;

/// A blocking socket (unix or TCP) the workers share.
pub(super) trait Socket: Read + Write + Send + Sync + 'static {
    fn try_clone_socket(&self) -> std::io::Result<Box<dyn Socket>>;
    fn shutdown_how(&self, how: Shutdown);
    fn shutdown_both(&self) {
        self.shutdown_how(Shutdown::Both);
    }
}

impl Socket for std::os::unix::net::UnixStream {
    fn try_clone_socket(&self) -> std::io::Result<Box<dyn Socket>> {
        Ok(Box::new(self.try_clone()?))
    }
    fn shutdown_how(&self, how: Shutdown) {
        let _ = self.shutdown(how);
    }
}

impl Socket for std::net::TcpStream {
    fn try_clone_socket(&self) -> std::io::Result<Box<dyn Socket>> {
        Ok(Box::new(self.try_clone()?))
    }
    fn shutdown_how(&self, how: Shutdown) {
        let _ = self.shutdown(how);
    }
}

/// One reply: a header, followed (for reads) by the first `data_len` bytes
/// of the worker's data buffer.
#[derive(Debug)]
struct Reply {
    head: Vec<u8>,
    data_len: usize,
}

/// A worker's reusable buffers: a 4 KiB or 1 MiB request costs no
/// allocation and no zeroing once the worker has served one like it.
#[derive(Debug, Default)]
struct Scratch {
    payload: Vec<u8>,
    data: Vec<u8>,
}

/// Buffers larger than this are dropped after use rather than kept: what
/// an idle worker may hold is at most twice this, outside the budgets.
pub(super) const RETAINED: usize = 128 << 10;

/// The first `len` bytes of `v`, growing it if needed (only new bytes are
/// zeroed; every byte handed out is overwritten before it is read).
fn sized(v: &mut Vec<u8>, len: usize) -> &mut [u8] {
    if v.len() < len {
        v.resize(len, 0);
    }
    &mut v[..len]
}

fn trim_retained(v: &mut Vec<u8>) {
    if v.len() > RETAINED {
        *v = Vec::new();
    }
}

/// Payload bytes that may be held at once: by the workers of one
/// connection, or by every outside client's connections together. A
/// request holds its share from when it is read until its reply has left
/// (a read's data waits in memory while the client does not read).
#[derive(Debug)]
pub(super) struct Budget {
    free: Mutex<u64>,
    released: Condvar,
    total: u64,
}

impl Budget {
    pub(super) fn new(total: u64) -> Self {
        Budget {
            free: Mutex::new(total),
            released: Condvar::new(),
            total,
        }
    }

    fn take(&self, bytes: u64) -> u64 {
        let bytes = bytes.min(self.total);
        let mut free = self.free.lock().expect("budget");
        while *free < bytes {
            free = self.released.wait(free).expect("budget");
        }
        *free -= bytes;
        bytes
    }

    fn give(&self, bytes: u64) {
        *self.free.lock().expect("budget") += bytes;
        self.released.notify_all();
    }
}

/// What one request holds of its connection's budget and of the shared
/// one (outside clients only).
#[derive(Debug, Clone, Copy, Default)]
struct Held {
    own: u64,
    shared: u64,
}

struct Conn {
    export: Export,
    name: String,
    structured: bool,
    contexts: Contexts,
    metrics: Arc<Metrics>,
    ops: IoMetrics,
    reader: Mutex<BufReader<Box<dyn Socket>>>,
    writer: Mutex<Box<dyn Socket>>,
    closed: AtomicBool,
    budget: Budget,
    /// Shared by every connection of outside clients; `None` for the
    /// node's own attachments.
    shared: Option<Arc<Budget>>,
}

/// The NBD error for an engine error.
fn errno(e: &Error) -> u32 {
    match e.kind() {
        ErrorKind::NoSpace | ErrorKind::LimitReached => ENOSPC,
        ErrorKind::ReadOnly => EPERM,
        ErrorKind::OutOfRange | ErrorKind::InvalidArgument => EINVAL,
        ErrorKind::NotSupported => ENOTSUP,
        // The volume was deleted under the connection, or the disk failed.
        _ => EIO,
    }
}

/// What the reader hands a worker.
enum Next {
    /// A request to run (a write's payload is in the worker's scratch) and
    /// the budget it holds.
    Run(Request, Command, Held),
    Refuse(Request, Rejected),
    Stop,
}

impl Conn {
    fn ok(&self, cookie: u64) -> Reply {
        let head = if self.structured {
            structured_header(REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0).to_vec()
        } else {
            simple_reply(cookie, 0).to_vec()
        };
        Reply { head, data_len: 0 }
    }

    fn error(&self, cookie: u64, error: u32, message: &str) -> Reply {
        let head = if self.structured {
            structured_error(cookie, error, message)
        } else {
            simple_reply(cookie, error).to_vec()
        };
        Reply { head, data_len: 0 }
    }

    /// The reply to BLOCK_STATUS: a chunk for each selected context (one
    /// extent each with REQ_ONE), the last one marked done.
    fn block_status(
        &self,
        cookie: u64,
        offset: u64,
        length: u32,
        one: bool,
    ) -> crate::engine::Result<Vec<u8>> {
        let len = u64::from(length);
        let mut chunks: Vec<(u32, Vec<(u32, u32)>)> = Vec::new();
        if self.contexts.allocation {
            let extents = self.export.block_status(offset, len)?;
            let flags = |zero| if zero { STATE_HOLE | STATE_ZERO } else { 0 };
            let d = extents.iter().map(|e| (e.len as u32, flags(e.zero)));
            chunks.push((BASE_ALLOCATION_ID, d.collect()));
        }
        if self.contexts.depth {
            let extents = self.export.allocation_depth(offset, len)?;
            let d = extents.iter().map(|e| (e.len as u32, e.depth));
            chunks.push((ALLOCATION_DEPTH_ID, d.collect()));
        }
        if let Some(base) = self.contexts.dirty {
            // Clean between the changed runs, up to the end of the range
            // (as far as the export reaches).
            let end = (offset + len).min(self.export.size());
            let mut d = Vec::new();
            let mut at = offset;
            for (o, l) in self.export.changed_since(base, offset, end - offset)? {
                if o > at {
                    d.push(((o - at) as u32, 0));
                }
                d.push((l as u32, STATE_DIRTY));
                at = o + l;
            }
            if end > at {
                d.push(((end - at) as u32, 0));
            }
            chunks.push((DIRTY_BITMAP_ID, d));
        }
        let last = chunks.len().saturating_sub(1);
        let mut head = Vec::new();
        for (i, (id, mut descriptors)) in chunks.into_iter().enumerate() {
            if one {
                descriptors.truncate(1);
            }
            head.extend(structured_block_status(cookie, id, &descriptors, i == last));
        }
        Ok(head)
    }

    fn limits(&self) -> ExportLimits {
        ExportLimits {
            // A volume can grow while connected; serve its current size.
            size: self.export.size(),
            read_only: self.export.read_only(),
            structured: self.structured,
            meta_context: self.contexts.any(),
        }
    }

    /// Waits for room for a payload of `length` bytes.
    fn take(&self, length: u32) -> Held {
        let bytes = u64::from(length.max(4096));
        let own = self.budget.take(bytes);
        let shared = self.shared.as_ref().map_or(0, |s| s.take(bytes));
        Held { own, shared }
    }

    fn give(&self, held: Held) {
        if held.own > 0 {
            self.budget.give(held.own);
        }
        if let Some(s) = self.shared.as_ref().filter(|_| held.shared > 0) {
            s.give(held.shared);
        }
    }

    /// Takes the next request off the socket (holding the reader lock).
    fn next(&self, scratch: &mut Scratch) -> std::io::Result<Next> {
        let mut rd = self.reader.lock().expect("reader");
        if self.closed.load(Ordering::Acquire) {
            return Ok(Next::Stop);
        }
        let mut header = [0u8; REQUEST_LEN];
        match rd.read_exact(&mut header) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(Next::Stop),
            Err(e) => return Err(e),
        }
        let Ok(req) = parse_request(&header) else {
            self.metrics.nbd_protocol_error("bad_request_magic");
            return Ok(Next::Stop);
        };
        match validate(&req, &self.limits()) {
            Ok(Command::Disconnect) => Ok(Next::Stop),
            Ok(cmd @ Command::Write { length, .. }) => {
                let held = self.take(length);
                if let Err(e) = rd.read_exact(sized(&mut scratch.payload, length as usize)) {
                    self.give(held);
                    return Err(e);
                }
                Ok(Next::Run(req, cmd, held))
            }
            Ok(cmd @ Command::Read { length, .. }) => {
                let held = self.take(length);
                Ok(Next::Run(req, cmd, held))
            }
            Ok(cmd) => Ok(Next::Run(req, cmd, Held::default())),
            Err(rejected) => {
                self.metrics.nbd_protocol_error(rejected.why);
                if req.kind == CMD_WRITE {
                    if req.length > MAX_DISCARDED_PAYLOAD {
                        return Ok(Next::Stop);
                    }
                    skip(&mut *rd, u64::from(req.length))?;
                }
                Ok(Next::Refuse(req, rejected))
            }
        }
    }

    /// Runs one validated command.
    fn execute(&self, cookie: u64, cmd: Command, scratch: &mut Scratch) -> Reply {
        let start = Instant::now();
        let (op, name, bytes, result) = match cmd {
            Command::Read { offset, length } => {
                match self
                    .export
                    .read(offset, sized(&mut scratch.data, length as usize))
                {
                    Ok(()) => {
                        self.ops.read.observe(u64::from(length), start.elapsed());
                        return self.read_reply(cookie, offset, length as usize);
                    }
                    Err(e) => (&self.ops.read, "read", 0, Err(e)),
                }
            }
            Command::Write {
                offset,
                length,
                fua,
            } => (
                &self.ops.write,
                "write",
                length,
                self.export
                    .write(offset, &scratch.payload[..length as usize], fua),
            ),
            Command::Flush => (&self.ops.flush, "flush", 0, self.export.flush()),
            Command::Trim {
                offset,
                length,
                fua,
            } => {
                let r = self.export.trim(offset, u64::from(length));
                (
                    &self.ops.trim,
                    "trim",
                    length,
                    r.and_then(|()| self.flush_if(fua)),
                )
            }
            Command::WriteZeroes {
                offset,
                length,
                fua,
                no_hole,
                fast,
            } => {
                let r = self.export.write_zeroes(
                    offset,
                    u64::from(length),
                    ZeroFlags { no_hole, fast },
                );
                (
                    &self.ops.zero,
                    "write_zeroes",
                    length,
                    r.and_then(|()| self.flush_if(fua)),
                )
            }
            Command::BlockStatus {
                offset,
                length,
                one,
            } => match self.block_status(cookie, offset, length, one) {
                Ok(head) => {
                    self.ops.status.observe(u64::from(length), start.elapsed());
                    return Reply { head, data_len: 0 };
                }
                Err(e) => (&self.ops.status, "block_status", 0, Err(e)),
            },
            Command::Cache { offset, length } => {
                // Reading the range brings its resolving layers' blocks
                // into the page cache; the data goes nowhere.
                let mut r = Ok(());
                let mut at = offset;
                let end = offset + u64::from(length);
                while at < end && r.is_ok() {
                    let n = (end - at).min(RETAINED as u64) as usize;
                    r = self.export.read(at, sized(&mut scratch.data, n));
                    at += n as u64;
                }
                (&self.ops.cache, "cache", length, r)
            }
            Command::Disconnect => return self.ok(cookie),
        };
        match result {
            Ok(()) => {
                op.observe(u64::from(bytes), start.elapsed());
                self.ok(cookie)
            }
            Err(e) => {
                self.metrics.error(&self.name, name, e.metric_label());
                tracing::debug!(export = %self.name, op = name, error = %crate::engine::error::chain(&e), "NBD request failed");
                self.error(cookie, errno(&e), &e.to_string())
            }
        }
    }

    fn flush_if(&self, fua: bool) -> crate::engine::Result<()> {
        if fua { self.export.flush() } else { Ok(()) }
    }

    fn read_reply(&self, cookie: u64, offset: u64, len: usize) -> Reply {
        if !self.structured {
            return Reply {
                head: simple_reply(cookie, 0).to_vec(),
                data_len: len,
            };
        }
        if len == 0 {
            return self.ok(cookie);
        }
        let mut head = structured_header(
            REPLY_FLAG_DONE,
            REPLY_TYPE_OFFSET_DATA,
            cookie,
            8 + len as u32,
        )
        .to_vec();
        head.extend_from_slice(&offset.to_be_bytes());
        Reply {
            head,
            data_len: len,
        }
    }

    fn send(&self, reply: &Reply, data: &[u8]) -> std::io::Result<()> {
        let mut w = self.writer.lock().expect("writer");
        let mut bufs = [
            IoSlice::new(&reply.head),
            IoSlice::new(&data[..reply.data_len]),
        ];
        let mut bufs: &mut [IoSlice<'_>] = &mut bufs;
        while !bufs.is_empty() {
            match w.write_vectored(bufs) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => IoSlice::advance_slices(&mut bufs, n),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// One worker: read, run, reply, until the connection ends.
    fn work(&self) {
        // The kernel's nbd client may be among the clients.
        crate::frontend::mark_io_flusher();
        let mut scratch = Scratch::default();
        loop {
            let next = match self.next(&mut scratch) {
                Ok(n) => n,
                Err(e) => {
                    tracing::debug!(export = %self.name, error = %e, "NBD connection read failed");
                    Next::Stop
                }
            };
            let reply = match next {
                Next::Stop => {
                    self.closed.store(true, Ordering::Release);
                    return;
                }
                Next::Refuse(req, rejected) => (
                    self.error(req.cookie, rejected.error, rejected.why),
                    Held::default(),
                ),
                Next::Run(req, cmd, held) => (self.execute(req.cookie, cmd, &mut scratch), held),
            };
            let (reply, held) = reply;
            let sent = self.send(&reply, &scratch.data);
            // Only now: a client that does not read its replies keeps
            // them, and the budget, until it does.
            self.give(held);
            trim_retained(&mut scratch.payload);
            trim_retained(&mut scratch.data);
            if let Err(e) = sent {
                tracing::debug!(export = %self.name, error = %e, "NBD reply failed; closing");
                self.closed.store(true, Ordering::Release);
                self.writer.lock().expect("writer").shutdown_both();
                return;
            }
        }
    }
}

fn skip<R: BufRead>(rd: &mut R, mut n: u64) -> std::io::Result<()> {
    while n > 0 {
        let available = rd.fill_buf()?;
        if available.is_empty() {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let take = (available.len() as u64).min(n) as usize;
        rd.consume(take);
        n -= take as u64;
    }
    Ok(())
}

/// Serves a connection with `workers` threads; returns when the client
/// has disconnected and every request in flight has been answered.
pub(super) fn serve(
    socket: Box<dyn Socket>,
    already_read: Vec<u8>,
    session: Session,
    metrics: Arc<Metrics>,
    workers: usize,
    max_inflight: u32,
    shared: Option<Arc<Budget>>,
) -> std::io::Result<()> {
    let name = session.export.name();
    let ops = IoMetrics::new(&metrics, &name);
    let writer = socket.try_clone_socket()?;
    // Requests the client sent right after the handshake, already buffered
    // by it, come first.
    let reader: Box<dyn Socket> = Box::new(Prefixed {
        prefix: std::io::Cursor::new(already_read),
        inner: socket,
    });
    let conn = Arc::new(Conn {
        export: session.export,
        name,
        structured: session.structured,
        contexts: session.contexts,
        metrics,
        ops,
        reader: Mutex::new(BufReader::with_capacity(256 << 10, reader)),
        writer: Mutex::new(writer),
        closed: AtomicBool::new(false),
        budget: Budget::new(u64::from(max_inflight)),
        shared,
    });
    std::thread::scope(|scope| {
        for i in 0..workers.max(1) {
            let conn = Arc::clone(&conn);
            std::thread::Builder::new()
                .name(format!("nbd-worker-{i}"))
                .spawn_scoped(scope, move || conn.work())
                .map(drop)?;
        }
        Ok(())
    })
}

/// A socket whose first bytes come from a buffer.
struct Prefixed {
    prefix: std::io::Cursor<Vec<u8>>,
    inner: Box<dyn Socket>,
}

impl Read for Prefixed {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if (self.prefix.position() as usize) < self.prefix.get_ref().len() {
            return self.prefix.read(buf);
        }
        self.inner.read(buf)
    }
}

impl Write for Prefixed {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.inner.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl Socket for Prefixed {
    fn try_clone_socket(&self) -> std::io::Result<Box<dyn Socket>> {
        self.inner.try_clone_socket()
    }
    fn shutdown_how(&self, how: Shutdown) {
        self.inner.shutdown_how(how);
    }
}
