//! The iSCSI target (RFC 7143, error recovery level 0): every volume is a
//! target `iqn.2026-12.dev.strata:<volume-id>` with one LUN, every
//! snapshot one too (read-only), and SendTargets discovery lists them.
//!
//! ```text
//! accept (async) ─▶ a thread per connection (session.rs):
//!     login: pdu.rs ─▶ login.rs (keys) ─▶ target lookup (Exports)
//!     full feature: PDU ─▶ scsi.rs (plan: check the CDB; R2T/Data-Out; execute) ─▶ Data-In / Response
//! ```
//!
//! Written by hand: the Rust crates on crates.io are initiators
//! (`iscsi-client-rs`) or configure a kernel target (`scst`); none serves
//! a target from user space. The digests use the `crc32c` crate.
//!
//! Not yet here (issue 17): CHAP, several connections per session,
//! PERSISTENT RESERVE, EXTENDED COPY and the token pair, NodeStageVolume
//! over iSCSI.
//!
//! Bounds: at most `max_connections` connections; one that has not
//! logged in within `login_timeout` is closed; what one connection holds
//! is bounded as `session.rs` says (about 6.4 MiB at most).

mod login;
pub mod pdu;
mod scsi;
mod session;

use std::collections::HashMap;
use std::net::TcpStream;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::engine::Result;
use crate::frontend::{Exports, IoMetrics};
use crate::metrics::Metrics;

/// What every target name starts with; the rest is the export's ID.
pub const TARGET_PREFIX: &str = "iqn.2026-12.dev.strata:";

/// Limits of the target.
#[derive(Debug, Clone)]
pub struct IscsiConfig {
    /// A connection must complete its login within this time.
    pub login_timeout: Duration,
    /// Connections served at once; more are closed at accept.
    pub max_connections: usize,
}

impl Default for IscsiConfig {
    fn default() -> Self {
        IscsiConfig {
            login_timeout: Duration::from_secs(15),
            max_connections: 64,
        }
    }
}

/// What every connection shares.
#[derive(Debug)]
pub struct Target {
    exports: Exports,
    metrics: Arc<Metrics>,
    config: IscsiConfig,
    tsih: AtomicU16,
}

impl Target {
    /// Opens the unit of the target named `iqn`.
    fn open(&self, iqn: &str) -> Result<Option<scsi::Lun>> {
        let Some(id) = iqn.strip_prefix(TARGET_PREFIX) else {
            return Ok(None);
        };
        Ok(self.exports.open(id)?.map(|export| scsi::Lun {
            metrics: IoMetrics::new(&self.metrics, &export.name()),
            export,
            target: iqn.to_string(),
        }))
    }

    /// A new session's identifying handle (never 0).
    fn new_tsih(&self) -> u16 {
        loop {
            let t = self.tsih.fetch_add(1, Ordering::Relaxed);
            if t != 0 {
                return t;
            }
        }
    }
}

/// The iSCSI target of one node.
#[derive(Debug)]
pub struct IscsiServer {
    target: Arc<Target>,
    connections: Arc<Semaphore>,
    live: Mutex<Live>,
    next: AtomicU64,
}

#[derive(Debug, Default)]
struct Live {
    closed: bool,
    sockets: HashMap<u64, TcpStream>,
}

impl IscsiServer {
    /// A target serving `exports` (shared with the NBD server, so volumes
    /// of other nodes attached here are reachable too).
    pub fn new(exports: Exports, metrics: Arc<Metrics>, config: IscsiConfig) -> Arc<Self> {
        Arc::new(IscsiServer {
            connections: Arc::new(Semaphore::new(config.max_connections)),
            target: Arc::new(Target {
                exports,
                metrics,
                config,
                tsih: AtomicU16::new(1),
            }),
            live: Mutex::default(),
            next: AtomicU64::new(0),
        })
    }

    /// Accepts connections until `shutdown` resolves.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        tracing::debug!(%peer, "iSCSI connection");
                        self.accepted(stream);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "accepting an iSCSI connection failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        }
    }

    /// Ends every connection: no PDU is read any more, and each closes
    /// once its current command is answered. Waits up to `limit`, then
    /// cuts what is left. Call before closing the pool.
    pub async fn close(&self, limit: Duration) {
        {
            let mut live = self.live.lock().expect("live");
            live.closed = true;
            for s in live.sockets.values() {
                let _ = s.shutdown(std::net::Shutdown::Read);
            }
        }
        let deadline = Instant::now() + limit;
        while !self.live.lock().expect("live").sockets.is_empty() {
            if Instant::now() >= deadline {
                for s in self.live.lock().expect("live").sockets.values() {
                    let _ = s.shutdown(std::net::Shutdown::Both);
                }
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn accepted(self: &Arc<Self>, stream: tokio::net::TcpStream) {
        let metrics = &self.target.metrics;
        let Ok(permit) = Arc::clone(&self.connections).try_acquire_owned() else {
            tracing::warn!(
                limit = self.target.config.max_connections,
                "iSCSI connection refused: too many connections"
            );
            metrics.iscsi_protocol_error("too_many_connections");
            return;
        };
        let stream = match stream.into_std().and_then(|s| {
            s.set_nonblocking(false)?;
            s.set_nodelay(true)?;
            s.set_write_timeout(Some(session::WRITE_TIMEOUT))?;
            Ok(s)
        }) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "iSCSI connection could not be set up");
                return;
            }
        };
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        {
            let mut live = self.live.lock().expect("live");
            let handle = match stream.try_clone() {
                Ok(h) => h,
                Err(e) => {
                    tracing::warn!(error = %e, "iSCSI connection could not be set up");
                    return;
                }
            };
            if live.closed {
                return;
            }
            live.sockets.insert(id, handle);
        }
        let server = Arc::clone(self);
        let spawned = std::thread::Builder::new()
            .name("iscsi-conn".into())
            .spawn(move || {
                let _permit = permit;
                let _counted = server.target.metrics.iscsi_connection();
                crate::frontend::mark_io_flusher();
                let peer = stream.peer_addr().ok();
                if let Err(e) = session::serve(&server.target, stream) {
                    server.target.metrics.iscsi_protocol_error(e.kind());
                    tracing::info!(?peer, error = %e, "iSCSI connection closed");
                }
                server.live.lock().expect("live").sockets.remove(&id);
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "no thread for an iSCSI connection");
            self.live.lock().expect("live").sockets.remove(&id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Pool, PoolOptions};
    use std::io::Read;

    /// Clients that connect and never log in hold their slots only until
    /// the login timeout; one over the limit is closed at once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn idle_clients_are_closed_and_excess_ones_refused() {
        let dir = tempfile::tempdir().unwrap();
        let pool = Pool::open(dir.path(), PoolOptions::default()).unwrap();
        let config = IscsiConfig {
            login_timeout: Duration::from_secs(2),
            max_connections: 2,
        };
        let server = IscsiServer::new(Exports::new(pool), Metrics::new(), config);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(Arc::clone(&server).serve(listener, std::future::pending()));
        let outcome = tokio::task::spawn_blocking(move || {
            let connect = || {
                let s = std::net::TcpStream::connect(addr).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                s
            };
            let (mut a, mut b) = (connect(), connect());
            std::thread::sleep(Duration::from_millis(200));
            let mut third = connect();
            let started = Instant::now();
            let mut buf = [0u8; 48];
            let third_closed = matches!(third.read(&mut buf), Ok(0) | Err(_))
                && started.elapsed() < Duration::from_secs(1);
            // The idle two are closed after about the login timeout.
            let idle_closed = [&mut a, &mut b]
                .into_iter()
                .all(|s| matches!(s.read(&mut buf), Ok(0) | Err(_)));
            let waited = started.elapsed();
            (third_closed, idle_closed, waited)
        })
        .await
        .unwrap();
        assert!(outcome.0, "a connection over the limit was served");
        assert!(outcome.1, "idle connections were not closed");
        assert!(
            outcome.2 >= Duration::from_millis(1500) && outcome.2 < Duration::from_secs(6),
            "closed after {:?}",
            outcome.2
        );
    }
}
