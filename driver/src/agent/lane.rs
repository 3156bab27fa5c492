//! The owner's side of the data lane (`peer.proto`, LaneRequest): reads
//! and writes of other nodes outside HTTP/2, and the agent port's TLS,
//! which tells lanes from gRPC connections by ALPN.
//!
//! Why a lane of its own: through the Peer RPCs a 4 KiB read crossed five
//! threads on each side (the caller, tonic's buffer and HTTP/2 connection
//! tasks, the service task, the blocking pool), and on a 2-core machine
//! those hand-offs, not the I/O, bounded what a node read from another
//! (the figures are in the README). A lane is one TLS connection served
//! by one thread that reads a request, runs it in the engine and answers
//! it, so a request wakes one thread on each side. No crate speaks a block
//! protocol with Strata's grants and fencing; the framing (a length and a
//! protobuf message) is the only part written here, the rest is rustls and
//! prost. Requests are admitted and executed by the Peer service's own
//! code ([`PeerService::on_volume_here`]), so grants, sessions, holds and
//! moves work exactly as they do for the RPCs.
//!
//! At shutdown, [`Lanes::close`] ends every lane before the pool closes.
//!
//! Bounds: at most [`MAX_LANES`] lanes at once, and [`MAX_LANES_PER_PEER`]
//! from one address, so one node (all share the cluster's certificate, so
//! a node is told from another by its address) cannot take the lanes of
//! the others (a client over either is told so in the hello and uses the
//! RPCs), a frame of at most
//! [`crate::peer::MAX_FRAME`] bytes (its buffer grows as its data
//! arrives, and must arrive within a minute once it began; an answer
//! must be taken within a minute too), [`IDLE`]
//! without a request ends a lane, and a TLS handshake
//! has [`HANDSHAKE`] to finish, [`MAX_HANDSHAKES`] at once (shared evenly
//! among the addresses that want them) and
//! [`MAX_HANDSHAKES_PER_PEER`] from one address. A frame too
//! large or that does not decode ends that connection with a log line,
//! nothing else.

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use csi_proto::peer::v1::lane_request::Op;
use csi_proto::peer::v1::{LaneReply, LaneRequest};
use prometheus_client::metrics::gauge::Gauge;
use prost::Message;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls;
use tokio_rustls::server::TlsStream;
use tonic::Status;

use super::peer::{PeerService, io_len, write_op};
use crate::metrics::Metrics;
use crate::peer::{
    LANE_ALPN, LANE_SLICE, LaneSocket, MOVED_HEADER, SESSION_HEADER, ends_lane, read_frame,
    write_data_frame, write_frame,
};
use crate::tls::Caller;

/// Lanes served at once (each a thread and up to two frames of memory).
pub const MAX_LANES: usize = 256;
/// Lanes served at once to one address.
pub const MAX_LANES_PER_PEER: usize = 64;
/// A lane without a request for this long is closed (its client dials
/// again when it needs one).
pub const IDLE: Duration = Duration::from_secs(300);
/// How long a TLS handshake may take.
pub const HANDSHAKE: Duration = Duration::from_secs(10);
/// TLS handshakes under way at once on the agent port; beyond, a
/// connection takes the place of one from an address with more under way,
/// or is closed at once.
pub const MAX_HANDSHAKES: usize = 128;
/// ... and from one address: one client without a certificate cannot take
/// them all, and a node that dials all its lanes at once (its owner back
/// after a restart) still gets them.
pub const MAX_HANDSHAKES_PER_PEER: usize = MAX_LANES_PER_PEER;

/// The TLS handshakes under way, by address (oldest first), each with
/// what ends it early.
#[derive(Default)]
struct Handshakes {
    by_peer: HashMap<IpAddr, VecDeque<(u64, Arc<tokio::sync::Notify>)>>,
    total: usize,
    next: u64,
}

/// A handshake's place among those under way, given back when it ends.
struct Handshaking {
    from: IpAddr,
    id: u64,
    /// Notified when a newcomer from an address with fewer handshakes
    /// under way took this one's place.
    evicted: Arc<tokio::sync::Notify>,
    of: Arc<Mutex<Handshakes>>,
}

impl Handshaking {
    /// A place for a handshake from `from`: none if that address has
    /// [`MAX_HANDSHAKES_PER_PEER`] under way. With [`MAX_HANDSHAKES`] under
    /// way, the oldest of the address with the most gives its place up if
    /// that address has at least two more than `from`, so a few addresses
    /// that connect and send nothing cannot keep the others out (they end
    /// up sharing the places evenly).
    fn begin(of: &Arc<Mutex<Handshakes>>, from: IpAddr) -> Option<Self> {
        let mut h = of.lock().expect("handshakes");
        let mine = h.by_peer.get(&from).map_or(0, VecDeque::len);
        if mine >= MAX_HANDSHAKES_PER_PEER {
            return None;
        }
        if h.total >= MAX_HANDSHAKES {
            let (most, n) = h
                .by_peer
                .iter()
                .map(|(a, q)| (*a, q.len()))
                .max_by_key(|(_, n)| *n)?;
            if n < mine + 2 {
                return None;
            }
            let queue = h.by_peer.get_mut(&most).expect("listed");
            let (_, oldest) = queue.pop_front().expect("not empty");
            if queue.is_empty() {
                h.by_peer.remove(&most);
            }
            h.total -= 1;
            oldest.notify_one();
        }
        let (id, evicted) = (h.next, Arc::new(tokio::sync::Notify::new()));
        h.next += 1;
        h.total += 1;
        h.by_peer
            .entry(from)
            .or_default()
            .push_back((id, Arc::clone(&evicted)));
        Some(Handshaking {
            from,
            id,
            evicted,
            of: Arc::clone(of),
        })
    }
}

impl Drop for Handshaking {
    fn drop(&mut self) {
        let mut h = self.of.lock().expect("handshakes");
        let Some(queue) = h.by_peer.get_mut(&self.from) else {
            return;
        };
        // Not there if it was evicted.
        if let Some(at) = queue.iter().position(|(id, _)| *id == self.id) {
            queue.remove(at);
            if queue.is_empty() {
                h.by_peer.remove(&self.from);
            }
            h.total -= 1;
        }
    }
}

/// gRPC connections (ALPN `h2`) open at once on the agent port from one
/// address (a node's controller channel and data path use one each;
/// short-lived clients such as the CLI come and go); beyond, a new one is
/// closed after its handshake. Each may have up to
/// `tls::SERVER_CONNECTION_WINDOW` of requests unread. No cap in all: a
/// few addresses holding every place would keep the controller out.
pub const MAX_RPC_CONNECTIONS_PER_PEER: usize = 32;

/// Places counted per address, each given back when dropped.
#[derive(Debug, Clone, Default)]
struct Places(Arc<Mutex<HashMap<IpAddr, usize>>>);

impl Places {
    /// A place for `from`, if it has fewer than `max`.
    fn take(&self, from: IpAddr, max: usize) -> Option<Place> {
        let mut by_peer = self.0.lock().expect("places");
        let mine = by_peer.entry(from).or_default();
        if *mine >= max {
            return None;
        }
        *mine += 1;
        Some(Place {
            of: self.clone(),
            from,
        })
    }
}

/// One place of [`Places`].
#[derive(Debug)]
struct Place {
    of: Places,
    from: IpAddr,
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut by_peer = self.of.0.lock().expect("places");
        if let Some(n) = by_peer.get_mut(&self.from) {
            *n -= 1;
            if *n == 0 {
                by_peer.remove(&self.from);
            }
        }
    }
}

/// A gRPC connection of the agent port, which holds its place among the
/// open ones until it closes.
#[derive(Debug)]
pub struct RpcConnection {
    tls: TlsStream<TcpStream>,
    _place: Place,
}

impl tokio::io::AsyncRead for RpcConnection {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.tls).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for RpcConnection {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.tls).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.tls).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.tls.is_write_vectored()
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.tls).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.tls).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for RpcConnection {
    type ConnectInfo = <TlsStream<TcpStream> as tonic::transport::server::Connected>::ConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.tls.connect_info()
    }
}

/// How long a request's frame may take to arrive once its first bytes
/// came, and an answer to be taken (give or take [`LANE_SLICE`]).
const FRAME_TIMEOUT: Duration = Duration::from_secs(60);

/// A stream whose reads and writes end at a deadline.
trait Timed: Read + Write {
    fn until(&mut self, deadline: std::time::Instant);
}

impl<T: Read + Write> Timed for LaneSocket<T> {
    fn until(&mut self, deadline: std::time::Instant) {
        LaneSocket::until(self, deadline);
    }
}

impl<T: Read + Write> Timed for rustls::StreamOwned<rustls::ServerConnection, LaneSocket<T>> {
    fn until(&mut self, deadline: std::time::Instant) {
        self.sock.until(deadline);
    }
}

/// Reads one request's frame: waiting for it to begin may take [`IDLE`];
/// once its first bytes came, the rest must come within [`FRAME_TIMEOUT`],
/// so a client that trickles a frame cannot keep the lane.
struct FrameReader<'a, S: Timed> {
    stream: &'a mut S,
    began: bool,
}

impl<'a, S: Timed> FrameReader<'a, S> {
    fn new(stream: &'a mut S) -> Self {
        stream.until(std::time::Instant::now() + IDLE);
        FrameReader {
            stream,
            began: false,
        }
    }
}

impl<S: Timed> Read for FrameReader<'_, S> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.stream.read(buf)?;
        if n > 0 && !self.began {
            self.began = true;
            self.stream.until(std::time::Instant::now() + FRAME_TIMEOUT);
        }
        Ok(n)
    }
}

/// The agent port's connections: each TLS handshake runs in a task of its
/// own; gRPC ones (ALPN `h2`, or none) come out of the stream for tonic
/// while their address has fewer than [`MAX_RPC_CONNECTIONS_PER_PEER`]
/// open, lanes go to `lanes`.
pub fn incoming(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    lanes: Lanes,
) -> impl tokio_stream::Stream<Item = std::io::Result<RpcConnection>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let handshakes = Arc::default();
    let rpcs = Places::default();
    tokio::spawn(async move {
        loop {
            // Until tonic stops taking connections (the server stopped).
            let accepted = tokio::select! {
                () = tx.closed() => return,
                a = listener.accept() => a,
            };
            let (tcp, from) = match accepted {
                Ok(c) => c,
                Err(e) => {
                    // Out of descriptors, most likely: later ones may work.
                    tracing::warn!(error = %e, "agent port: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            // Before a certificate is seen, a connection costs a task and
            // a descriptor for up to HANDSHAKE: a bounded number of them.
            let Some(mine) = Handshaking::begin(&handshakes, from.ip()) else {
                tracing::warn!(%from, "agent port: too many TLS handshakes under way (at most {MAX_HANDSHAKES_PER_PEER} from one address, {MAX_HANDSHAKES} in all); connection dropped");
                continue;
            };
            let (acceptor, tx, lanes, rpcs) =
                (acceptor.clone(), tx.clone(), lanes.clone(), rpcs.clone());
            tokio::spawn(async move {
                if let Err(e) = tcp.set_nodelay(true) {
                    tracing::debug!(%from, error = %e, "agent port: nodelay");
                }
                let handshake = tokio::select! {
                    h = tokio::time::timeout(HANDSHAKE, acceptor.accept(tcp)) => h,
                    () = mine.evicted.notified() => {
                        tracing::info!(%from, "agent port: TLS handshake ended for one from an address with fewer under way");
                        return;
                    }
                };
                drop(mine);
                let tls = match handshake {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        tracing::info!(%from, error = %e, "agent port: TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::info!(%from, "agent port: TLS handshake timed out");
                        return;
                    }
                };
                if tls.get_ref().1.alpn_protocol() == Some(LANE_ALPN) {
                    lanes.serve(tls);
                    return;
                }
                match rpcs.take(from.ip(), MAX_RPC_CONNECTIONS_PER_PEER) {
                    Some(place) => {
                        let _ = tx.send(Ok(RpcConnection { tls, _place: place })).await;
                    }
                    None => {
                        tracing::warn!(%from, "agent port: gRPC connection closed: {MAX_RPC_CONNECTIONS_PER_PEER} are open from this address");
                    }
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// The lanes of this node's Peer service.
#[derive(Debug, Clone)]
pub struct Lanes {
    service: PeerService,
    runtime: tokio::runtime::Handle,
    /// Lanes open (threads serving one); the `strata_peer_lanes` gauge.
    open: Gauge,
    /// Set by [`Lanes::close`]: requests are refused unexecuted.
    stopping: Arc<AtomicBool>,
    /// A handle of every open lane's socket, to end them at close.
    sockets: Arc<Mutex<HashMap<u64, std::net::TcpStream>>>,
    /// Lanes open per client address.
    peers: Arc<Mutex<HashMap<IpAddr, usize>>>,
    next: Arc<AtomicU64>,
    boot: String,
}

/// One lane's place among the open ones, given back however its thread
/// ends (a panic included).
struct Slot {
    lanes: Lanes,
    id: u64,
    peer: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.lanes.sockets.lock().expect("lanes").remove(&self.id);
        let mut peers = self.lanes.peers.lock().expect("lanes");
        if let Some(n) = peers.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                peers.remove(&self.peer);
            }
        }
        self.lanes.open.dec();
    }
}

impl Lanes {
    pub fn new(service: PeerService, runtime: tokio::runtime::Handle, metrics: &Metrics) -> Self {
        Lanes {
            service,
            runtime,
            open: metrics.peer_lanes(),
            stopping: Arc::default(),
            sockets: Arc::default(),
            peers: Arc::default(),
            next: Arc::default(),
            boot: crate::peer::boot_id(),
        }
    }

    /// Ends every lane, so no request reaches the engine after this
    /// returns (the pool closes next): requests not yet read are never
    /// executed and their clients retry with the next start. Waits for
    /// requests in the engine for at most `wait`.
    pub fn close(&self, wait: Duration) {
        self.stopping.store(true, Ordering::Release);
        for s in self.sockets.lock().expect("lanes").values() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        let deadline = std::time::Instant::now() + wait;
        while self.open.get() > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if self.open.get() > 0 {
            tracing::warn!(lanes = self.open.get(), "data lanes still running at close");
        }
    }

    /// Serves a lane on a thread of its own.
    fn serve(&self, tls: TlsStream<TcpStream>) {
        let (tcp, conn) = tls.into_inner();
        let caller = Caller::from_chain(conn.peer_certificates());
        let tcp = match tcp.into_std().and_then(|t| {
            t.set_nonblocking(false)?;
            t.set_read_timeout(Some(LANE_SLICE))?;
            t.set_write_timeout(Some(LANE_SLICE))?;
            Ok(t)
        }) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "data lane: socket");
                return;
            }
        };
        let Ok(from) = tcp.peer_addr() else {
            return;
        };
        let before = self.open.inc();
        let from_peer = {
            let mut peers = self.peers.lock().expect("lanes");
            let n = peers.entry(from.ip()).or_default();
            *n += 1;
            *n - 1
        };
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        if let Ok(handle) = tcp.try_clone() {
            self.sockets.lock().expect("lanes").insert(id, handle);
        }
        let slot = Slot {
            lanes: self.clone(),
            id,
            peer: from.ip(),
        };
        let full = if self.stopping.load(Ordering::Acquire) {
            Some("this node is stopping".to_string())
        } else if usize::try_from(before).is_ok_and(|n| n >= MAX_LANES) {
            Some(format!("{MAX_LANES} lanes are open; use the RPCs"))
        } else if from_peer >= MAX_LANES_PER_PEER {
            Some(format!(
                "{MAX_LANES_PER_PEER} lanes are open to {}; use the RPCs",
                from.ip()
            ))
        } else {
            None
        };
        // The hello (or the refusal) is taken within FRAME_TIMEOUT.
        let tcp = LaneSocket::new(tcp, std::time::Instant::now() + FRAME_TIMEOUT);
        let mut stream = rustls::StreamOwned::new(conn, tcp);
        let spawned = std::thread::Builder::new()
            .name("lane".into())
            .spawn(move || {
                if let Some(why) = full {
                    tracing::warn!(%from, "data lane refused: {why}");
                    let full = LaneReply {
                        code: tonic::Code::ResourceExhausted as i32,
                        message: why,
                        ..Default::default()
                    };
                    let _ = write_frame(&mut stream, &full, &mut Vec::new());
                } else {
                    slot.lanes.run(&mut stream, &from.to_string(), &caller);
                }
                drop(slot);
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "data lane: no thread");
        }
    }

    /// The hello, then requests until the client leaves or errs.
    fn run<S: Timed>(&self, stream: &mut S, from: &str, caller: &Caller) {
        let hello = LaneReply {
            boot: self.boot.clone(),
            ..Default::default()
        };
        // One buffer for every frame of the lane, both ways, and one for
        // the data of its reads.
        let (mut buf, mut data) = (Vec::new(), Vec::new());
        if write_frame(stream, &hello, &mut buf).is_err() {
            return;
        }
        loop {
            match read_frame(&mut FrameReader::new(stream), &mut buf) {
                Ok(true) => {}
                Ok(false) => return,
                Err(e) => {
                    if e.kind() == std::io::ErrorKind::InvalidData {
                        tracing::warn!(%from, error = %e, "data lane closed: a bad frame");
                    }
                    return;
                }
            }
            let req = match LaneRequest::decode(buf.as_slice()) {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(%from, error = %e, "data lane closed: a request that does not decode");
                    return;
                }
            };
            let answer = if self.stopping.load(Ordering::Acquire) {
                Answer::Reply(refusal(Status::unavailable(
                    "this node is stopping; not executed",
                )))
            } else {
                answer(|| self.execute(req, caller, &mut data))
            };
            // A caller or grant this node does not accept keeps no lane
            // (it could hold one with a request every IDLE otherwise).
            let unwelcome = matches!(&answer, Answer::Reply(r) if ends_lane(r.code));
            stream.until(std::time::Instant::now() + FRAME_TIMEOUT);
            let sent = match answer {
                Answer::Reply(reply) => write_frame(stream, &reply, &mut buf),
                Answer::Read(n) => {
                    write_data_frame(stream, &LaneReply::default(), &data[..n], &mut buf)
                }
            };
            if unwelcome {
                tracing::warn!(%from, "data lane closed: its caller or grant was refused");
                return;
            }
            if sent.is_err() {
                return;
            }
        }
    }

    /// Runs `req`; a read's data lands in `data` (grown to the largest
    /// read of the lane, so zeroed once).
    fn execute(
        &self,
        req: LaneRequest,
        caller: &Caller,
        data: &mut Vec<u8>,
    ) -> Result<Answer, Status> {
        let s = &self.service;
        match req.op {
            Some(Op::Read(r)) => {
                let n = io_len(r.length.into())?;
                if data.len() < n {
                    data.resize(n, 0);
                }
                let into = &mut data[..n];
                s.on_volume_here(&self.runtime, caller, r.grant.as_ref(), false, |v| {
                    v.read(r.offset, into)
                })?;
                s.count(r.grant.as_ref(), true, n);
                Ok(Answer::Read(n))
            }
            Some(Op::Write(w)) => {
                let len = w.data.len();
                let write = write_op(w.offset, w.data, w.fua)?;
                s.on_volume_here(&self.runtime, caller, w.grant.as_ref(), true, write)?;
                s.count(w.grant.as_ref(), false, len);
                Ok(Answer::Reply(LaneReply::default()))
            }
            None => Err(Status::invalid_argument(
                "a lane request without an operation",
            )),
        }
    }
}

/// A lane's answer to a request.
enum Answer {
    Reply(LaneReply),
    /// A read done: its data is the first `n` bytes of the lane's data
    /// buffer.
    Read(usize),
}

/// What `execute` answers; a panic fails the request as the RPC's would
/// (INTERNAL), not the lane, whose client would retry the request as lost
/// until its time runs out.
fn answer(execute: impl FnOnce() -> Result<Answer, Status>) -> Answer {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(execute))
        .unwrap_or_else(|_| {
            tracing::error!("data lane: a request panicked");
            Err(Status::internal("the owner failed this request (a panic)"))
        })
        .unwrap_or_else(|s| Answer::Reply(refusal(s)))
}

/// A refusal as the lane answers it: the status, and the headers the RPC
/// would carry.
fn refusal(s: Status) -> LaneReply {
    let header = |name| {
        s.metadata()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    LaneReply {
        code: s.code() as i32,
        message: s.message().to_string(),
        session: header(SESSION_HEADER).parse().unwrap_or(0),
        moved: header(MOVED_HEADER),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_that_panics_is_answered_internal() {
        let Answer::Reply(reply) = answer(|| panic!("a bug")) else {
            panic!("no reply");
        };
        assert_eq!(reply.code, tonic::Code::Internal as i32, "{reply:?}");
        assert!(matches!(answer(|| Ok(Answer::Read(7))), Answer::Read(7)));
    }

    /// A socket read that times out (as a lane's does every LANE_SLICE).
    struct Trickle(Vec<std::io::Result<Vec<u8>>>);

    impl Read for Trickle {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if self.0.is_empty() {
                return Ok(0);
            }
            let mut chunk = self.0.remove(0)?;
            let n = chunk.len().min(buf.len());
            buf[..n].copy_from_slice(&chunk[..n]);
            if n < chunk.len() {
                self.0.insert(0, Ok(chunk.split_off(n)));
            }
            Ok(n)
        }
    }

    impl Write for Trickle {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_lane_waits_idle_for_a_frame_but_not_for_a_frame_trickled_in() {
        let timeout = || Err(std::io::ErrorKind::WouldBlock.into());
        let frame = |body: &[u8]| {
            let mut f = (body.len() as u32).to_be_bytes().to_vec();
            f.extend_from_slice(body);
            f
        };
        let socket = |reads| LaneSocket::new(Trickle(reads), std::time::Instant::now());
        // Quiet before the frame and in its middle, within the deadlines:
        // waited for.
        let whole = frame(b"hello");
        let mut s = socket(vec![
            timeout(),
            Ok(whole[..3].to_vec()),
            timeout(),
            Ok(whole[3..].to_vec()),
        ]);
        let mut buf = Vec::new();
        assert!(read_frame(&mut FrameReader::new(&mut s), &mut buf).unwrap());
        assert_eq!(buf, b"hello");
        // Its first bytes came: the rest has FRAME_TIMEOUT, not IDLE.
        let mut s = socket(vec![Ok(whole[..3].to_vec())]);
        let mut r = FrameReader::new(&mut s);
        let mut head = [0u8; 3];
        r.read_exact(&mut head).unwrap();
        let left = r.stream.deadline() - std::time::Instant::now();
        assert!(
            left <= FRAME_TIMEOUT && left > FRAME_TIMEOUT / 2,
            "{left:?}"
        );
        // Past the deadline, even bytes that are there are not read.
        r.stream.until(std::time::Instant::now());
        r.stream.tcp.0.push(Ok(whole[3..].to_vec()));
        let e = r.read(&mut [0u8; 8]).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
    }

    #[test]
    fn one_address_takes_a_bounded_share_of_the_handshakes() {
        let of: Arc<Mutex<Handshakes>> = Arc::default();
        let [a, b]: [IpAddr; 2] = ["10.0.0.1", "10.0.0.2"].map(|a| a.parse().unwrap());
        let mut from_a: Vec<_> = (0..MAX_HANDSHAKES_PER_PEER)
            .map(|_| Handshaking::begin(&of, a).expect("under the cap"))
            .collect();
        assert!(Handshaking::begin(&of, a).is_none());
        let from_b = Handshaking::begin(&of, b).expect("another address");
        from_a.pop();
        assert!(Handshaking::begin(&of, a).is_some());
        drop((from_a, from_b));
        let h = of.lock().unwrap();
        assert!(h.by_peer.is_empty() && h.total == 0);
    }

    /// Two addresses that hold every place (connections that send
    /// nothing) do not keep a third out: its newcomers take the places of
    /// their oldest, until the three share them evenly.
    #[tokio::test]
    async fn addresses_that_hold_every_handshake_give_places_up_to_others() {
        let of: Arc<Mutex<Handshakes>> = Arc::default();
        let [a, b, c]: [IpAddr; 3] =
            ["10.0.0.1", "10.0.0.2", "10.0.0.3"].map(|a| a.parse().unwrap());
        const { assert!(MAX_HANDSHAKES <= 2 * MAX_HANDSHAKES_PER_PEER) };
        let mut held: Vec<_> = (0..MAX_HANDSHAKES)
            .map(|i| Handshaking::begin(&of, if i % 2 == 0 { a } else { b }).unwrap())
            .collect();
        // Each of a and b is at its share; a newcomer of theirs is closed.
        assert!(Handshaking::begin(&of, a).is_none());
        let mut from_c = Vec::new();
        while let Some(h) = Handshaking::begin(&of, c) {
            from_c.push(h);
        }
        let evicted = held
            .iter()
            .filter(|h| {
                let n = h.evicted.notified();
                futures_ready(n)
            })
            .count();
        assert_eq!(evicted, from_c.len());
        let counts = {
            let h = of.lock().unwrap();
            assert_eq!(h.total, MAX_HANDSHAKES);
            [a, b, c].map(|x| h.by_peer.get(&x).map_or(0, VecDeque::len))
        };
        let (min, max) = (*counts.iter().min().unwrap(), *counts.iter().max().unwrap());
        assert!(max - min <= 1, "{counts:?}");
        // The evicted ones' ends give back nothing twice.
        held.clear();
        assert_eq!(of.lock().unwrap().total, from_c.len());
        from_c.clear();
        let h = of.lock().unwrap();
        assert!(h.by_peer.is_empty() && h.total == 0);
    }

    /// Whether `f` is ready at its first poll.
    fn futures_ready(f: impl std::future::Future) -> bool {
        let mut f = std::pin::pin!(f);
        let waker = std::task::Waker::noop();
        f.as_mut()
            .poll(&mut std::task::Context::from_waker(waker))
            .is_ready()
    }

    #[test]
    fn a_refusal_keeps_the_headers_the_client_needs() {
        let mut s = Status::aborted("older session");
        s.metadata_mut()
            .insert(SESSION_HEADER, "42".parse().unwrap());
        let r = refusal(s);
        assert_eq!((r.code, r.session), (tonic::Code::Aborted as i32, 42));
        let mut s = Status::unavailable("moved");
        s.metadata_mut().insert(MOVED_HEADER, "n3".parse().unwrap());
        assert_eq!(refusal(s).moved, "n3");
    }
}
