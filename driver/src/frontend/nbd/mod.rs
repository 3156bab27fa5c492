//! The NBD server: fixed newstyle negotiation, simple and structured
//! replies, `base:allocation` block status, TRIM, WRITE_ZEROES, FLUSH, FUA
//! and multiple connections per export.
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
}

impl Default for NbdConfig {
    fn default() -> Self {
        NbdConfig {
            handshake_timeout: Duration::from_secs(30),
            max_connections: 128,
            workers_per_connection: 32,
            max_inflight_bytes: 64 << 20,
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
        Arc::new(NbdServer {
            exports: Exports::new(pool),
            metrics,
            config,
            connections,
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
        self.spawn_connection(tokio::net::UnixStream::from_std(ours)?);
        Ok(theirs)
    }

    fn spawn_connection<S: Accepted>(self: &Arc<Self>, stream: S) {
        let Ok(permit) = Arc::clone(&self.connections).try_acquire_owned() else {
            tracing::warn!(
                limit = self.config.max_connections,
                "NBD connection refused: too many connections"
            );
            self.metrics.nbd_protocol_error("too_many_connections");
            return;
        };
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
            Listener::Unix(l) => server.spawn_connection(l.accept().await?.0),
            Listener::Tcp(l) => {
                let (stream, peer) = l.accept().await?;
                let _ = stream.set_nodelay(true);
                tracing::debug!(%peer, "NBD connection");
                server.spawn_connection(stream);
            }
        }
        Ok(())
    }
}
