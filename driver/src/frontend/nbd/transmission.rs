//! The transmission phase: a reader that parses and validates requests and
//! runs each on the blocking pool, and a writer that sends replies in
//! completion order (NBD matches replies to requests by cookie).
//!
//! A request that fails validation is answered with the protocol's error
//! and the connection goes on (a write's payload is read and dropped first,
//! so the stream stays in sync); only a bad request magic, a write payload
//! too large to skip, or a closed socket end the connection. On
//! `NBD_CMD_DISC` (or EOF) the reader stops and the connection closes once
//! every request in flight has been answered.

use std::sync::Arc;
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Semaphore, mpsc};

use super::handshake::Session;
use super::protocol::*;
use crate::engine::{Error, ErrorKind, ZeroFlags};
use crate::frontend::Export;
use crate::metrics::{Metrics, OpMetrics};

/// One reply, ready to send: a header and (for reads) the data after it.
#[derive(Debug)]
struct Reply {
    head: Vec<u8>,
    data: Vec<u8>,
}

/// Per-operation metric handles of the export.
#[derive(Debug)]
struct Ops {
    read: OpMetrics,
    write: OpMetrics,
    flush: OpMetrics,
    trim: OpMetrics,
    zero: OpMetrics,
    status: OpMetrics,
}

#[derive(Debug)]
struct Conn {
    export: Export,
    name: String,
    structured: bool,
    metrics: Arc<Metrics>,
    ops: Ops,
}

/// The NBD error for an engine error.
fn errno(e: &Error) -> u32 {
    match e.kind() {
        ErrorKind::NoSpace | ErrorKind::LimitReached => ENOSPC,
        ErrorKind::ReadOnly => EPERM,
        ErrorKind::OutOfRange | ErrorKind::InvalidArgument => EINVAL,
        // The volume was deleted under the connection, or the disk failed.
        _ => EIO,
    }
}

impl Conn {
    fn ok(&self, cookie: u64) -> Reply {
        let head = if self.structured {
            structured_header(REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0).to_vec()
        } else {
            simple_reply(cookie, 0).to_vec()
        };
        Reply {
            head,
            data: Vec::new(),
        }
    }

    fn error(&self, cookie: u64, error: u32, message: &str) -> Reply {
        let head = if self.structured {
            structured_error(cookie, error, message)
        } else {
            simple_reply(cookie, error).to_vec()
        };
        Reply {
            head,
            data: Vec::new(),
        }
    }

    /// Runs one validated command (on the blocking pool).
    fn execute(&self, cookie: u64, cmd: Command, payload: Vec<u8>) -> Reply {
        let start = Instant::now();
        let (op, name, bytes, result) = match cmd {
            Command::Read { offset, length } => {
                let mut data = vec![0u8; length as usize];
                match self.export.read(offset, &mut data) {
                    Ok(()) => {
                        self.ops.read.observe(u64::from(length), start.elapsed());
                        return self.read_reply(cookie, offset, data);
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
                self.export.write(offset, &payload, fua),
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
                    r.and_then(|()| if fua { self.export.flush() } else { Ok(()) }),
                )
            }
            Command::WriteZeroes {
                offset,
                length,
                fua,
                no_hole,
            } => {
                let r = self
                    .export
                    .write_zeroes(offset, u64::from(length), ZeroFlags { no_hole });
                (
                    &self.ops.zero,
                    "write_zeroes",
                    length,
                    r.and_then(|()| if fua { self.export.flush() } else { Ok(()) }),
                )
            }
            Command::BlockStatus {
                offset,
                length,
                one,
            } => match self.export.block_status(offset, u64::from(length)) {
                Ok(extents) => {
                    self.ops.status.observe(u64::from(length), start.elapsed());
                    let mut descriptors: Vec<(u32, u32)> = extents
                        .iter()
                        .map(|e| {
                            (
                                e.len as u32,
                                if e.zero { STATE_HOLE | STATE_ZERO } else { 0 },
                            )
                        })
                        .collect();
                    if one {
                        descriptors.truncate(1);
                    }
                    return Reply {
                        head: structured_block_status(cookie, &descriptors),
                        data: Vec::new(),
                    };
                }
                Err(e) => (&self.ops.status, "block_status", 0, Err(e)),
            },
            Command::Disconnect => unreachable!("handled by the reader"),
        };
        match result {
            Ok(()) => {
                op.observe(u64::from(bytes), start.elapsed());
                self.ok(cookie)
            }
            Err(e) => {
                self.metrics.error(&self.name, name, e.metric_label());
                tracing::debug!(export = %self.name, op = name, error = %e, "NBD request failed");
                self.error(cookie, errno(&e), &e.to_string())
            }
        }
    }

    fn read_reply(&self, cookie: u64, offset: u64, data: Vec<u8>) -> Reply {
        if !self.structured {
            return Reply {
                head: simple_reply(cookie, 0).to_vec(),
                data,
            };
        }
        if data.is_empty() {
            return self.ok(cookie);
        }
        let mut head = structured_header(
            REPLY_FLAG_DONE,
            REPLY_TYPE_OFFSET_DATA,
            cookie,
            8 + data.len() as u32,
        )
        .to_vec();
        head.extend_from_slice(&offset.to_be_bytes());
        Reply { head, data }
    }
}

/// Serves requests until the client disconnects.
pub(super) async fn serve<R, W>(
    mut rd: R,
    wr: W,
    session: Session,
    metrics: Arc<Metrics>,
    max_inflight: u32,
) -> std::io::Result<()>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let name = session.export.name();
    let ops = Ops {
        read: metrics.op(&name, "read"),
        write: metrics.op(&name, "write"),
        flush: metrics.op(&name, "flush"),
        trim: metrics.op(&name, "trim"),
        zero: metrics.op(&name, "write_zeroes"),
        status: metrics.op(&name, "block_status"),
    };
    let limits = ExportLimits {
        size: session.export.size(),
        read_only: session.export.read_only(),
        structured: session.structured,
        allocation_context: session.allocation,
    };
    let conn = Arc::new(Conn {
        export: session.export,
        name,
        structured: session.structured,
        metrics: Arc::clone(&metrics),
        ops,
    });
    let (tx, rx) = mpsc::channel::<Reply>(1024);
    let writer = tokio::spawn(write_replies(wr, rx));
    let budget = Arc::new(Semaphore::new(max_inflight as usize));
    let result = read_requests(&mut rd, &conn, &tx, &budget, max_inflight, limits).await;
    drop(tx);
    // The writer ends once every in-flight request has sent its reply.
    let written = writer.await.unwrap_or(Ok(()));
    result.and(written)
}

async fn read_requests<R: AsyncRead + Unpin>(
    rd: &mut R,
    conn: &Arc<Conn>,
    tx: &mpsc::Sender<Reply>,
    budget: &Arc<Semaphore>,
    max_inflight: u32,
    mut limits: ExportLimits,
) -> std::io::Result<()> {
    loop {
        let mut header = [0u8; REQUEST_LEN];
        match rd.read_exact(&mut header).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let Ok(req) = parse_request(&header) else {
            conn.metrics.nbd_protocol_error("bad_request_magic");
            return Ok(());
        };
        // A volume can grow while connected; serve its current size.
        limits.size = conn.export.size();
        let cmd = match validate(&req, &limits) {
            Ok(Command::Disconnect) => return Ok(()),
            Ok(cmd) => cmd,
            Err(rejected) => {
                conn.metrics.nbd_protocol_error(rejected.why);
                if req.kind == CMD_WRITE {
                    if req.length > MAX_DISCARDED_PAYLOAD {
                        return Ok(());
                    }
                    let mut skip = (&mut *rd).take(u64::from(req.length));
                    tokio::io::copy(&mut skip, &mut tokio::io::sink()).await?;
                }
                let _ = tx
                    .send(conn.error(req.cookie, rejected.error, rejected.why))
                    .await;
                continue;
            }
        };
        // Payload bytes this request holds while in flight; a request never
        // asks for more than the whole budget, so it cannot wait forever.
        let cost = match cmd {
            Command::Read { length, .. } | Command::Write { length, .. } => length.max(4096),
            _ => 4096,
        }
        .min(max_inflight);
        let permit = Arc::clone(budget)
            .acquire_many_owned(cost)
            .await
            .map_err(|_| std::io::Error::other("in-flight budget closed"))?;
        let payload = match cmd {
            Command::Write { length, .. } => {
                let mut data = vec![0u8; length as usize];
                rd.read_exact(&mut data).await?;
                data
            }
            _ => Vec::new(),
        };
        let (conn, tx) = (Arc::clone(conn), tx.clone());
        tokio::spawn(async move {
            let cookie = req.cookie;
            let job = Arc::clone(&conn);
            let reply = tokio::task::spawn_blocking(move || job.execute(cookie, cmd, payload))
                .await
                .unwrap_or_else(|_| conn.error(cookie, EIO, "internal error"));
            drop(permit);
            let _ = tx.send(reply).await;
        });
    }
}

async fn write_replies<W: AsyncWrite + Unpin>(
    mut wr: W,
    mut rx: mpsc::Receiver<Reply>,
) -> std::io::Result<()> {
    while let Some(reply) = rx.recv().await {
        wr.write_all(&reply.head).await?;
        wr.write_all(&reply.data).await?;
        // Batch replies that are already waiting; flush when none is.
        while let Ok(reply) = rx.try_recv() {
            wr.write_all(&reply.head).await?;
            wr.write_all(&reply.data).await?;
        }
        wr.flush().await?;
    }
    wr.flush().await
}
