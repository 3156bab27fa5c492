//! The iSCSI target (RFC 7143, error recovery level 0): every volume is a
//! target `iqn.2026-12.dev.strata:<volume-id>` with one LUN, every
//! snapshot one too (read-only), and SendTargets discovery lists them.
//!
//! ```text
//! accept (async) ─▶ a thread per connection (session.rs):
//!     login: pdu.rs ─▶ login.rs (keys), chap.rs ─▶ target lookup (Exports)
//!     full feature: PDU ─▶ scsi.rs (plan: reservations, the CDB; R2T/Data-Out; execute) ─▶ Data-In / Response
//!                                     ├─ copy.rs: offload copy (tokens, EXTENDED COPY), node-wide
//!                                     └─ reserve.rs: reservations of each unit, node-wide
//! ```
//!
//! Written by hand: the Rust crates on crates.io are initiators
//! (`iscsi-client-rs`) or configure a kernel target (`scst`); none serves
//! a target from user space. The digests use the `crc32c` crate.
//!
//! Not yet here: several connections per session, reservations that
//! survive a restart (APTPL).
//!
//! Bounds: at most `max_connections` connections; one that has not
//! logged in within `login_timeout`, or has sent no whole PDU for
//! `idle_timeout` after (initiators ping with NOP-Out every few seconds),
//! is closed by a watchdog, whatever it sends a byte at a time; what one
//! connection holds is bounded as `session.rs` says (about 7.5 MiB).

pub mod chap;
mod copy;
mod login;
pub mod pdu;
mod reserve;
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

/// The secret a login to `target` (None: discovery) needs: the target's
/// own; for a snapshot without one, its volume's (it holds the volume's
/// data); else the one for every target, if any.
pub(crate) fn secret_for(
    chap: &chap::Secrets,
    pool: &crate::engine::Pool,
    target: Option<&str>,
) -> Option<chap::Secret> {
    let Some(t) = target else {
        return chap.for_target(None);
    };
    chap.own(t)
        .or_else(|| {
            let id = t.to_ascii_lowercase();
            let id = id.strip_prefix(TARGET_PREFIX)?.parse().ok()?;
            let volume = pool.snapshot_info(id).ok()?.volume;
            chap.own(&format!("{TARGET_PREFIX}{volume}"))
        })
        .or_else(|| chap.for_target(None))
}

/// Limits of the target.
#[derive(Debug, Clone)]
pub struct IscsiConfig {
    /// A connection must complete its login within this time.
    pub login_timeout: Duration,
    /// After login, a connection that sends no whole PDU for this long is
    /// closed.
    pub idle_timeout: Duration,
    /// Connections served at once; more are closed at accept.
    pub max_connections: usize,
    /// CHAP secrets by target (none: every login takes AuthMethod None),
    /// shared with the node, which stages volumes' own secrets in them.
    pub chap: Arc<chap::Secrets>,
}

impl Default for IscsiConfig {
    fn default() -> Self {
        IscsiConfig {
            login_timeout: Duration::from_secs(15),
            idle_timeout: Duration::from_secs(60),
            max_connections: 64,
            chap: Arc::default(),
        }
    }
}

/// When a connection is closed unless it moves the time on: its login
/// deadline, then the idle deadline after its last whole PDU.
#[derive(Debug, Clone)]
pub struct Deadline {
    epoch: Instant,
    at_ms: Arc<AtomicU64>,
}

impl Deadline {
    fn new(epoch: Instant, within: Duration) -> Deadline {
        let d = Deadline {
            epoch,
            at_ms: Arc::default(),
        };
        d.extend(within);
        d
    }

    /// Moves the deadline to `by` from now.
    pub fn extend(&self, by: Duration) {
        let at = self.epoch.elapsed() + by;
        self.at_ms.store(at.as_millis() as u64, Ordering::Relaxed);
    }

    fn passed(&self) -> bool {
        self.epoch.elapsed().as_millis() as u64 > self.at_ms.load(Ordering::Relaxed)
    }
}

/// What every connection shares.
#[derive(Debug)]
pub struct Target {
    exports: Exports,
    metrics: Arc<Metrics>,
    copies: Arc<copy::CopyManager>,
    reservations: Arc<reserve::Reservations>,
    config: IscsiConfig,
    tsih: AtomicU16,
}

impl Target {
    /// Opens the unit of the target named `iqn` for a session of the
    /// initiator port (`initiator`, `isid`).
    fn open(&self, iqn: &str, initiator: &str, isid: [u8; 6]) -> Result<Option<scsi::Lun>> {
        let Some(id) = iqn.strip_prefix(TARGET_PREFIX) else {
            return Ok(None);
        };
        Ok(self.exports.open(id)?.map(|export| scsi::Lun {
            metrics: IoMetrics::new(&self.metrics, &export.name()),
            copies: copy::Nexus::new(Arc::clone(&self.copies), &self.metrics, &export.name()),
            port: reserve::Port::new(
                Arc::clone(&self.reservations),
                export.name(),
                initiator,
                isid,
            ),
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
    epoch: Instant,
    watching: std::sync::atomic::AtomicBool,
}

#[derive(Debug, Default)]
struct Live {
    closed: bool,
    sockets: HashMap<u64, (TcpStream, Deadline)>,
}

/// Takes a connection out of [`Live`] when its thread ends, however.
struct Registered {
    server: Arc<IscsiServer>,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.server
            .live
            .lock()
            .expect("live")
            .sockets
            .remove(&self.id);
    }
}

impl IscsiServer {
    /// A target serving `exports` (shared with the NBD server, so volumes
    /// of other nodes attached here are reachable too).
    pub fn new(exports: Exports, metrics: Arc<Metrics>, config: IscsiConfig) -> Arc<Self> {
        Arc::new(IscsiServer {
            connections: Arc::new(Semaphore::new(config.max_connections)),
            target: Arc::new(Target {
                copies: Arc::new(copy::CopyManager::new(
                    exports.pool().clone(),
                    Arc::clone(&config.chap),
                )),
                reservations: Arc::default(),
                exports,
                metrics,
                config,
                tsih: AtomicU16::new(1),
            }),
            live: Mutex::default(),
            next: AtomicU64::new(0),
            epoch: Instant::now(),
            watching: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Closes, once a second, the connections whose deadline passed.
    fn watch(self: &Arc<Self>) {
        if self.watching.swap(true, Ordering::Relaxed) {
            return;
        }
        let server = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let Some(server) = server.upgrade() else {
                    return;
                };
                let live = server.live.lock().expect("live");
                if live.closed {
                    return;
                }
                for (socket, deadline) in live.sockets.values() {
                    if deadline.passed() {
                        server.target.metrics.iscsi_protocol_error("timeout");
                        let _ = socket.shutdown(std::net::Shutdown::Both);
                    }
                }
            }
        });
    }

    /// Accepts connections until `shutdown` resolves.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: impl Future<Output = ()>) {
        self.watch();
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
            for (s, _) in live.sockets.values() {
                let _ = s.shutdown(std::net::Shutdown::Read);
            }
        }
        let deadline = Instant::now() + limit;
        while !self.live.lock().expect("live").sockets.is_empty() {
            if Instant::now() >= deadline {
                for (s, _) in self.live.lock().expect("live").sockets.values() {
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
        let deadline = Deadline::new(self.epoch, self.target.config.login_timeout);
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
            live.sockets.insert(id, (handle, deadline.clone()));
        }
        let registered = Registered {
            server: Arc::clone(self),
            id,
        };
        let spawned = std::thread::Builder::new()
            .name("iscsi-conn".into())
            .spawn(move || {
                let _permit = permit;
                let target = Arc::clone(&registered.server.target);
                let _registered = registered;
                let _counted = target.metrics.iscsi_connection();
                crate::frontend::mark_io_flusher();
                let peer = stream.peer_addr().ok();
                if let Err(e) = session::serve(&target, stream, &deadline) {
                    target.metrics.iscsi_protocol_error(e.kind());
                    tracing::info!(?peer, error = %e, "iSCSI connection closed");
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "no thread for an iSCSI connection");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Pool, PoolOptions};
    use std::io::{Read, Write};

    /// A snapshot's target needs its volume's staged secret (it holds
    /// the volume's data), unless it has its own; other targets need what
    /// the file says.
    #[test]
    fn a_snapshot_needs_the_secret_of_its_volume() {
        let dir = tempfile::tempdir().unwrap();
        let pool = Pool::open(dir.path(), PoolOptions::default()).unwrap();
        let (v, other) = (
            pool.create_volume(1 << 20).unwrap().id,
            pool.create_volume(1 << 20).unwrap().id,
        );
        let (s, s_other) = (
            pool.create_snapshot(v).unwrap().id,
            pool.create_snapshot(other).unwrap().id,
        );
        let iqn = |id: &dyn std::fmt::Display| format!("{TARGET_PREFIX}{id}");
        let chap = chap::Secrets::default();
        assert_eq!(secret_for(&chap, &pool, Some(&iqn(&s))), None);
        let secret = chap::Secret::new("u", "a-long-secret", None).unwrap();
        chap.stage(&iqn(&v), secret.clone());
        for t in [iqn(&v), iqn(&s), iqn(&s).to_uppercase()] {
            assert_eq!(
                secret_for(&chap, &pool, Some(&t)),
                Some(secret.clone()),
                "{t}"
            );
        }
        assert_eq!(secret_for(&chap, &pool, Some(&iqn(&s_other))), None);
        assert_eq!(secret_for(&chap, &pool, None), None);
        let own = chap::Secret::new("w", "another-long-secret", None).unwrap();
        chap.stage(&iqn(&s), own.clone());
        assert_eq!(secret_for(&chap, &pool, Some(&iqn(&s))), Some(own));
    }

    /// A target over an empty pool on a loopback port of its own.
    async fn serve(config: IscsiConfig) -> (tempfile::TempDir, std::net::SocketAddr) {
        let dir = tempfile::tempdir().unwrap();
        let pool = Pool::open(dir.path(), PoolOptions::default()).unwrap();
        let server = IscsiServer::new(Exports::new(pool), Metrics::new(), config);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(Arc::clone(&server).serve(listener, std::future::pending()));
        (dir, addr)
    }

    /// Clients that connect and never log in hold their slots only until
    /// the login timeout; one over the limit is closed at once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn idle_clients_are_closed_and_excess_ones_refused() {
        let (_dir, addr) = serve(IscsiConfig {
            login_timeout: Duration::from_secs(2),
            max_connections: 2,
            ..IscsiConfig::default()
        })
        .await;
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

    /// A login sent a byte at a time is cut at the login deadline, and a
    /// logged-in connection that goes quiet at the idle deadline.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn slow_logins_and_silent_sessions_are_closed() {
        let (_dir, addr) = serve(IscsiConfig {
            login_timeout: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(2),
            max_connections: 4,
            ..IscsiConfig::default()
        })
        .await;
        let (drip, quiet) = tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            // A login header, one byte every 300 ms: never whole in time.
            let mut login = pdu::Pdu::new(pdu::op::LOGIN);
            login.bhs[0] |= 0x40;
            let mut cut = None;
            for b in login.bhs {
                if s.write_all(&[b]).is_err() {
                    cut = Some(started.elapsed());
                    break;
                }
                std::thread::sleep(Duration::from_millis(300));
            }
            let drip = cut.unwrap_or(Duration::MAX);

            // A discovery login, then silence.
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            login.bhs[1] = 0x80 | (1 << 2) | 3;
            login.data = b"InitiatorName=iqn.x\0SessionType=Discovery\0".to_vec();
            login.write_to(&mut s, pdu::Digests::default()).unwrap();
            let answer = pdu::Pdu::read_from(&mut s, pdu::Digests::default(), 1 << 16).unwrap();
            assert_eq!(
                (answer.opcode(), answer.u16_at(36)),
                (pdu::op::LOGIN_RESPONSE, 0)
            );
            let started = Instant::now();
            let mut b = [0u8; 1];
            let closed = matches!(s.read(&mut b), Ok(0) | Err(_));
            (drip, closed.then(|| started.elapsed()))
        })
        .await
        .unwrap();
        assert!(
            drip >= Duration::from_millis(1500) && drip < Duration::from_secs(5),
            "a dripping login was cut after {drip:?}"
        );
        let quiet = quiet.expect("a silent session stayed open");
        assert!(
            quiet >= Duration::from_millis(1500) && quiet < Duration::from_secs(5),
            "a silent session was closed after {quiet:?}"
        );
    }
}
