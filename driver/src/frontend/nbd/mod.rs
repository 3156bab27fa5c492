//! The NBD server: fixed newstyle negotiation, simple and structured
//! replies, `base:allocation` and `qemu:allocation-depth` block status,
//! TRIM, WRITE_ZEROES, FLUSH, FUA, CACHE and multiple connections per
//! export.
//!
//! ```text
//! accept ─▶ handshake.rs (async; options GO/INFO/LIST/STRUCTURED_REPLY/META_CONTEXT/ABORT)
//!        ─▶ transmission.rs: N worker threads, each:
//!              lock reader: request ─▶ validate (protocol.rs) ─▶ engine I/O ─▶ lock writer: reply
//! ```
//!
//! Exports are volumes (read-write, by volume ID) and snapshots (read-only,
//! by snapshot ID). `CAN_MULTI_CONN` is advertised because a flush on any
//! connection makes every write acknowledged on any connection to the same
//! volume durable (flushes are per volume, not per connection).
//!
//! It listens on a unix socket (mode 0600) and, only when configured, on
//! TCP. Negotiation runs on the async runtime; once an export is chosen,
//! the socket goes to a few blocking worker threads (`transmission.rs`)
//! that run requests concurrently (up to 64 MiB of payload in flight) and
//! answer each as it completes.
//!
//! What outside clients can take is bounded whatever they do: at most
//! `max_connections` connections, each closed if it has not chosen an
//! export within `handshake_timeout`; a request's payload counts against
//! its connection's budget and a budget all outside connections share
//! until its reply has left, so a client that never reads its replies
//! stalls only itself. The node's own attachments (`connect_local`) have
//! their own connection slots and no shared budget: no outside client can
//! lock them out. Memory, at most: the shared budget, plus per connection
//! 256 KiB of read buffer and what its idle workers keep
//! (`workers_per_connection` × 2 × 128 KiB), plus 64 KiB per negotiating
//! connection; with the defaults, 512 MiB + 128 × 8.3 MiB ≈ 1.6 GiB for
//! outside clients.

pub mod client;
mod handshake;
pub mod protocol;
mod transmission;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;

use crate::engine::Pool;
use crate::frontend::Exports;
use crate::metrics::Metrics;

/// Limits of the server.
#[derive(Debug, Clone)]
pub struct NbdConfig {
    /// Negotiation must finish within this time.
    pub handshake_timeout: Duration,
    /// Connections served at once; more are closed at accept.
    pub max_connections: usize,
    /// Worker threads per connection: requests of one connection that run
    /// at once. 32 matches the queue depth of the kernel nbd client and of
    /// typical benchmarks; fewer starve flush group commit (measured).
    pub workers_per_connection: usize,
    /// Payload bytes a connection may have in flight.
    pub max_inflight_bytes: u32,
    /// Payload bytes all outside clients' connections may have in flight
    /// together (the node's own attachments are not counted).
    pub max_shared_inflight_bytes: u64,
    /// Connections of the node's own attachments (`connect_local`),
    /// beside `max_connections`.
    pub max_local_connections: usize,
}

impl Default for NbdConfig {
    fn default() -> Self {
        NbdConfig {
            handshake_timeout: Duration::from_secs(10),
            max_connections: 128,
            workers_per_connection: 32,
            max_inflight_bytes: 64 << 20,
            max_shared_inflight_bytes: 512 << 20,
            // One per attachment (kernel nbd uses one connection per
            // device); more than a node stages.
            max_local_connections: 1024,
        }
    }
}

/// The NBD server of one pool.
#[derive(Debug)]
pub struct NbdServer {
    exports: Exports,
    metrics: Arc<Metrics>,
    config: NbdConfig,
    connections: Arc<Semaphore>,
    local_connections: Arc<Semaphore>,
    shared: Arc<transmission::Budget>,
    live: Mutex<Live>,
    next: AtomicU64,
}

/// Connections in transmission, by number, with a handle to shut each
/// down at close.
#[derive(Default)]
struct Live {
    closed: bool,
    sockets: HashMap<u64, Box<dyn transmission::Socket>>,
}

impl std::fmt::Debug for Live {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Live")
            .field("closed", &self.closed)
            .field("connections", &self.sockets.len())
            .finish()
    }
}

/// An accepted socket that can be handed to blocking worker threads.
trait Accepted: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    fn into_blocking(self) -> std::io::Result<Box<dyn transmission::Socket>>;
}

impl Accepted for tokio::net::UnixStream {
    fn into_blocking(self) -> std::io::Result<Box<dyn transmission::Socket>> {
        let s = self.into_std()?;
        s.set_nonblocking(false)?;
        Ok(Box::new(s))
    }
}

impl Accepted for tokio::net::TcpStream {
    fn into_blocking(self) -> std::io::Result<Box<dyn transmission::Socket>> {
        let s = self.into_std()?;
        s.set_nonblocking(false)?;
        Ok(Box::new(s))
    }
}

impl NbdServer {
    pub fn new(pool: Pool, metrics: Arc<Metrics>, config: NbdConfig) -> Arc<Self> {
        let connections = Arc::new(Semaphore::new(config.max_connections));
        let local_connections = Arc::new(Semaphore::new(config.max_local_connections));
        let shared = Arc::new(transmission::Budget::new(config.max_shared_inflight_bytes));
        Arc::new(NbdServer {
            exports: Exports::new(pool),
            metrics,
            config,
            connections,
            local_connections,
            shared,
            live: Mutex::new(Live::default()),
            next: AtomicU64::new(0),
        })
    }

    /// What the server serves; remote volumes attached here are added to it.
    pub fn exports(&self) -> &Exports {
        &self.exports
    }

    /// Ends every connection in transmission: no request is read any more,
    /// the requests already read are answered, and then the connection
    /// closes; no connection starts after this. Waits up to `limit` for
    /// that, then cuts what is left (those requests go unanswered). The
    /// kernel's nbd driver takes an ended connection as a dead one: it
    /// holds its requests until the next start reconnects, and resends
    /// what was never answered. Call before closing the pool, so no write
    /// arrives after the last flush.
    pub async fn close(&self, limit: Duration) {
        {
            let mut live = self.live.lock().expect("live");
            live.closed = true;
            for socket in live.sockets.values() {
                socket.shutdown_how(std::net::Shutdown::Read);
            }
        }
        let deadline = Instant::now() + limit;
        while !self.live.lock().expect("live").sockets.is_empty() {
            if Instant::now() >= deadline {
                let live = self.live.lock().expect("live");
                tracing::warn!(
                    connections = live.sockets.len(),
                    "NBD requests still running at close; their replies are dropped"
                );
                for socket in live.sockets.values() {
                    socket.shutdown_both();
                }
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Accepts connections until `shutdown` resolves.
    pub async fn serve(self: Arc<Self>, listener: Listener, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                accepted = listener.accept(&self) => {
                    if let Err(e) = accepted {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "accepting an NBD connection failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        }
    }

    /// A connection to this server that needs no listener: one end of a
    /// socket pair is served as if accepted, the other is returned (still
    /// to be negotiated), e.g. for the kernel's nbd driver. Call from
    /// within the runtime.
    pub fn connect_local(self: &Arc<Self>) -> std::io::Result<std::os::unix::net::UnixStream> {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
        ours.set_nonblocking(true)?;
        let permit = Arc::clone(&self.local_connections)
            .try_acquire_owned()
            .map_err(|_| {
                std::io::Error::other(format!(
                    "{} local NBD connections are open, the most there can be",
                    self.config.max_local_connections
                ))
            })?;
        self.spawn_connection(tokio::net::UnixStream::from_std(ours)?, permit, None);
        Ok(theirs)
    }

    /// Serves an outside client's connection, if a slot is free.
    fn accepted<S: Accepted>(self: &Arc<Self>, stream: S) {
        let Ok(permit) = Arc::clone(&self.connections).try_acquire_owned() else {
            tracing::warn!(
                limit = self.config.max_connections,
                "NBD connection refused: too many connections"
            );
            self.metrics.nbd_protocol_error("too_many_connections");
            return;
        };
        self.spawn_connection(stream, permit, Some(Arc::clone(&self.shared)));
    }

    fn spawn_connection<S: Accepted>(
        self: &Arc<Self>,
        stream: S,
        permit: tokio::sync::OwnedSemaphorePermit,
        shared: Option<Arc<transmission::Budget>>,
    ) {
        let server = Arc::clone(self);
        tokio::spawn(async move {
            let counted = server.metrics.nbd_connection();
            let mut rd = tokio::io::BufReader::with_capacity(64 << 10, stream);
            let negotiated = tokio::time::timeout(
                server.config.handshake_timeout,
                handshake::negotiate(&mut rd, &server.exports, &server.metrics),
            )
            .await;
            let session = match negotiated {
                Ok(Ok(Some(session))) => session,
                Ok(Ok(None)) => return,
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "NBD negotiation ended with an error");
                    return;
                }
                Err(_) => {
                    server.metrics.nbd_protocol_error("handshake_timeout");
                    return;
                }
            };
            // Requests the client already sent are in the reader's buffer.
            let already_read = rd.buffer().to_vec();
            let socket = match rd.into_inner().into_blocking() {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "NBD connection could not be handed to workers");
                    return;
                }
            };
            let id = server.next.fetch_add(1, Ordering::Relaxed);
            {
                let mut live = server.live.lock().expect("live");
                if live.closed {
                    return;
                }
                match socket.try_clone_socket() {
                    Ok(handle) => live.sockets.insert(id, handle),
                    Err(e) => {
                        tracing::warn!(error = %e, "NBD connection could not be handed to workers");
                        return;
                    }
                };
            }
            let (metrics, config) = (Arc::clone(&server.metrics), server.config.clone());
            let ending = Arc::clone(&server);
            let served = tokio::task::spawn_blocking(move || {
                let _permit = permit;
                let _counted = counted;
                let served = transmission::serve(
                    socket,
                    already_read,
                    session,
                    metrics,
                    config.workers_per_connection,
                    config.max_inflight_bytes,
                    shared,
                );
                ending.live.lock().expect("live").sockets.remove(&id);
                served
            })
            .await;
            if let Ok(Err(e)) = served {
                tracing::debug!(error = %e, "NBD connection ended with an error");
            }
        });
    }
}

/// Where the server accepts connections.
#[derive(Debug)]
pub enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

impl Listener {
    /// Accepts one connection and starts serving it.
    async fn accept(&self, server: &Arc<NbdServer>) -> std::io::Result<()> {
        match self {
            Listener::Unix(l) => server.accepted(l.accept().await?.0),
            Listener::Tcp(l) => {
                let (stream, peer) = l.accept().await?;
                let _ = stream.set_nodelay(true);
                tracing::debug!(%peer, "NBD connection");
                server.accepted(stream);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::PoolOptions;
    use std::io::Read;

    /// Outside clients that connect and never negotiate fill their slots
    /// only: a further one is closed at once, the node's own attachment
    /// still connects, and the idle ones are closed after the handshake
    /// timeout, which frees their slots.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn idle_clients_cannot_lock_out_the_nodes_own_attachments() {
        let dir = tempfile::tempdir().unwrap();
        let pool = Pool::open(dir.path(), PoolOptions::default()).unwrap();
        let vid = pool.create_volume(1 << 20).unwrap().id;
        let config = NbdConfig {
            handshake_timeout: Duration::from_secs(3),
            max_connections: 2,
            ..NbdConfig::default()
        };
        let server = NbdServer::new(pool, Metrics::new(), config);
        let path = dir.path().join("nbd.sock");
        let listener = UnixListener::bind(&path).unwrap();
        tokio::spawn(Arc::clone(&server).serve(Listener::Unix(listener), std::future::pending()));
        let connect = move || {
            let s = std::os::unix::net::UnixStream::connect(&path).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s
        };
        // EOF (or a reset) before any greeting byte.
        let closed = |mut s: std::os::unix::net::UnixStream| {
            let mut b = [0u8; 18];
            let n = s.read(&mut b).unwrap_or(0);
            n == 0
        };
        let greeted = |mut s: std::os::unix::net::UnixStream| {
            let mut b = [0u8; 18];
            s.read_exact(&mut b).is_ok()
        };
        let (c1, c2) = tokio::task::spawn_blocking({
            let connect = connect.clone();
            move || (connect(), connect())
        })
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let third = tokio::task::spawn_blocking({
            let connect = connect.clone();
            move || closed(connect())
        });
        assert!(third.await.unwrap(), "a third outside client was served");
        // The node's own attachment negotiates and does I/O.
        let own = server.connect_local().unwrap();
        let export = vid.to_string();
        tokio::task::spawn_blocking(move || {
            own.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut c = client::Client::connect(own, &export).unwrap();
            c.write(0, &[1u8; 4096]).unwrap();
            let mut back = [0u8; 4096];
            c.read(0, &mut back).unwrap();
            assert_eq!(back, [1u8; 4096]);
        })
        .await
        .unwrap();
        // The idle two are closed after the timeout; a new client is served.
        let freed = tokio::task::spawn_blocking(move || {
            let idle_closed = [c1, c2].into_iter().all(|mut s| {
                let mut b = [0u8; 64];
                // The greeting, then EOF.
                let _ = s.read(&mut b);
                matches!(s.read(&mut b), Ok(0) | Err(_))
            });
            std::thread::sleep(Duration::from_millis(100));
            (idle_closed, greeted(connect()))
        })
        .await
        .unwrap();
        assert_eq!(freed, (true, true));
    }
}
