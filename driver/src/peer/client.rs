//! [`RemoteVolume`]: a volume of another node, as this node's frontends
//! call it (blocking calls from their worker threads, each run on the
//! node's tokio runtime).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use csi_proto::peer::v1 as pb;
use csi_proto::peer::v1::peer_client::PeerClient;
use serde::{Deserialize, Serialize};
use tonic::transport::Channel;
use tonic::{Code, Status};

use super::lane::Lanes;
use super::{BOOT_HEADER, LANE_ALPN, MAX_IO, MOVED_HEADER, RETRY_FOR, SESSION_HEADER, grant};
use crate::engine::{Error, Result, ZeroFlags};
use crate::frontend::RemoteDevice;
use crate::metrics::Metrics;
use crate::tls::{Server, TlsFiles};
use csi_proto::peer::v1::lane_request::Op;

/// How long one attempt may take (a flush on a busy disk included).
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// An owner's address and node ID.
type OwnerKey = (String, String);

/// Where a remote volume is and the grant to use it: what the controller's
/// ControllerPublishVolume answered, kept in the staging record so a
/// restarted node reaches the owner again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Target {
    pub volume_id: String,
    /// The owner's node ID.
    pub owner: String,
    /// The owner's agent address (`host:port`).
    pub address: String,
    /// The grant, as [`grant::encode`] writes it.
    pub grant: String,
}

impl Target {
    /// Whether the grant is read-only (a malformed one is refused when
    /// the volume is opened).
    pub fn read_only(&self) -> bool {
        grant::decode(&self.volume_id, &self.grant).is_some_and(|g| g.read_only)
    }
}

/// What this node needs to reach other nodes.
#[derive(Debug, Clone)]
pub struct Peers {
    tls: TlsFiles,
    /// For data lanes (`None` if the files do not make one).
    lanes: Option<Arc<tokio_rustls::rustls::ClientConfig>>,
    /// The way to each owner (by address and node), shared by the
    /// volumes this node uses there: the owner counts lanes and gRPC
    /// connections per node.
    owners: Arc<Mutex<HashMap<OwnerKey, Weak<Owner>>>>,
    runtime: tokio::runtime::Handle,
    metrics: Arc<Metrics>,
}

impl Peers {
    /// `runtime` runs the calls (the frontends' threads wait for them).
    pub fn new(tls: TlsFiles, runtime: tokio::runtime::Handle, metrics: Arc<Metrics>) -> Self {
        let lanes = tls
            .rustls_client(&[LANE_ALPN, b"h2"])
            .inspect_err(|e| tracing::warn!(error = %e, "no data lanes: every remote I/O goes through the RPCs"))
            .ok();
        Peers {
            tls,
            lanes,
            owners: Arc::default(),
            runtime,
            metrics,
        }
    }

    /// The volume `target` names. With `size`, no call is made (a restart
    /// serving an attachment again while the owner may be away); without,
    /// the owner is asked, which also checks the grant.
    pub fn open(&self, target: &Target, size: Option<u64>) -> Result<Arc<RemoteVolume>> {
        self.open_until(target, size, None)
    }

    /// [`Self::open`], for a caller that may give up: once `stop` is set,
    /// every call of the volume (its opening too) fails at its next
    /// attempt instead of retrying while the owner is away.
    pub fn open_until(
        &self,
        target: &Target,
        size: Option<u64>,
        stop: Option<Arc<AtomicBool>>,
    ) -> Result<Arc<RemoteVolume>> {
        let v = Arc::new(RemoteVolume {
            stop,
            link: Mutex::new(self.link(target)?),
            peers: self.clone(),
            size: AtomicU64::new(size.unwrap_or(0)),
            // Newer than any session of this node's earlier processes
            // (whose requests the owner drains before this one's).
            session: AtomicU64::new(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64),
            ),
            durability: Mutex::default(),
        });
        if size.is_none() {
            v.refresh_size()?;
        }
        Ok(v)
    }

    fn link(&self, target: &Target) -> Result<Link> {
        let grant = grant::decode(&target.volume_id, &target.grant).ok_or_else(|| {
            remote_error(
                target,
                "decode the grant",
                Status::invalid_argument("the publish context's grant is malformed"),
            )
        })?;
        let owner = self
            .owner(&target.address, &target.owner)
            .map_err(|s| remote_error(target, "connect", s))?;
        // The volumes take the owner's channels in turn.
        let client =
            owner.clients[owner.next.fetch_add(1, Ordering::Relaxed) % RPC_CHANNELS].clone();
        Ok(Link {
            target: target.clone(),
            grant,
            owner,
            client,
        })
    }

    /// The way to node `owner` at `address`: [`RPC_CHANNELS`] gRPC
    /// channels (HTTP/2 connections, however many of its volumes this node
    /// uses there) and its lanes.
    fn owner(&self, address: &str, owner: &str) -> std::result::Result<Arc<Owner>, Status> {
        let key = (address.to_string(), owner.to_string());
        let mut owners = self.owners.lock().expect("owners");
        if let Some(o) = owners.get(&key).and_then(Weak::upgrade) {
            return Ok(o);
        }
        owners.retain(|_, o| o.strong_count() > 0);
        let clients = (0..RPC_CHANNELS)
            .map(|_| {
                let channel = self.tls.channel(
                    "peer",
                    address,
                    Server::Node(owner),
                    CONNECT_TIMEOUT,
                    CALL_TIMEOUT,
                )?;
                Ok(PeerClient::new(channel)
                    .max_decoding_message_size(super::MAX_FRAME)
                    .max_encoding_message_size(super::MAX_FRAME))
            })
            .collect::<std::result::Result<_, Status>>()?;
        let o = Arc::new(Owner {
            clients,
            next: AtomicUsize::new(0),
            lanes: Lanes::new(
                self.lanes.clone(),
                address,
                &self.tls.server_name_of(Server::Node(owner)),
                CONNECT_TIMEOUT,
                CALL_TIMEOUT,
            ),
        });
        owners.insert(key, Arc::downgrade(&o));
        Ok(o)
    }
}

/// gRPC channels to one owner, shared by the volumes this node uses
/// there (each volume takes one): a few, so one volume's requests (up to
/// 128 open on a connection) hold up only the volumes that share its
/// channel, and well below the owner's cap per address
/// (`agent::lane::MAX_RPC_CONNECTIONS_PER_PEER`).
const RPC_CHANNELS: usize = 4;

/// The way to one owner: its Peer RPCs and its data lanes.
#[derive(Debug)]
struct Owner {
    clients: Vec<PeerClient<Channel>>,
    /// The channel the next volume opened there takes.
    next: AtomicUsize,
    lanes: Lanes,
}

/// Where a remote volume's requests go, and with which grant.
#[derive(Debug, Clone)]
struct Link {
    target: Target,
    grant: pb::Grant,
    owner: Arc<Owner>,
    client: PeerClient<Channel>,
}

/// What a flush must know about the owner's restarts.
#[derive(Debug, Default)]
struct Durability {
    /// The owner boot under which writes not yet flushed were answered.
    unflushed_on: Option<String>,
    /// Writes answered so far: a flush covers those answered before it was
    /// sent, not one answered while it was on its way.
    writes: u64,
    /// The owner rebooted while it held writes it had answered and not
    /// flushed: they may be gone, and every flush fails from then on.
    lost: bool,
    /// Where the two above outlive this process ([`RemoteVolume::keep_in`]),
    /// and whether the last write there failed (it is tried again).
    file: Option<(std::fs::File, PathBuf)>,
    unsaved: bool,
}

/// The size of a durability file: one record, written in place whole.
const DURABILITY_RECORD: usize = 128;

impl Durability {
    /// `lost` and `unflushed_on` as one fixed-size record: `lost BOOT`,
    /// `kept BOOT` or `kept -`, padded with spaces (a boot ID is the
    /// owner kernel's, 36 characters; a longer one is cut, so a restart
    /// may take it for another, and fail a flush, never pass one).
    fn record(&self) -> Vec<u8> {
        let boot: String = match self.unflushed_on.as_deref() {
            None => "-".into(),
            // (An owner that could not read its boot ID answers "".)
            Some("") => "~".into(),
            Some(b) => (b.chars())
                .filter(|c| c.is_ascii_graphic())
                .take(DURABILITY_RECORD - 8)
                .collect(),
        };
        let state = if self.lost { "lost" } else { "kept" };
        let mut rec = format!("{state} {boot}").into_bytes();
        rec.resize(DURABILITY_RECORD, b' ');
        rec
    }

    /// What a record says: (lost, unflushed_on); `None` if it is not one.
    fn parse(rec: &[u8]) -> Option<(bool, Option<String>)> {
        let text = std::str::from_utf8(rec).ok()?;
        let mut words = text.split_whitespace();
        let lost = match words.next()? {
            "lost" => true,
            "kept" => false,
            _ => return None,
        };
        let boot = match words.next()? {
            "-" => None,
            "~" => Some(String::new()),
            b => Some(b.to_string()),
        };
        Some((lost, boot))
    }

    /// Writes the record, if there is a file.
    fn save(&mut self) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        let Some((file, _)) = &self.file else {
            return Ok(());
        };
        let written = file.write_all_at(&self.record(), 0);
        self.unsaved = written.is_err();
        written
    }

    /// Notes a request's answer under the owner's `boot`; false for a
    /// flush after a loss (it must fail).
    fn answered(&mut self, effect: Effect, boot: Option<&str>, writes_sent: u64) -> bool {
        if let (Some(boot), Some(before)) = (boot, &self.unflushed_on)
            && boot != before
        {
            self.lost = true;
        }
        match effect {
            Effect::None => {}
            Effect::Unflushed => {
                self.writes += 1;
                if self.unflushed_on.is_none() {
                    self.unflushed_on = boot.map(str::to_string);
                }
            }
            Effect::Flush if self.lost => return false,
            // Writes answered after it was sent stay unflushed (under the
            // boot recorded: a reboot since is caught above).
            Effect::Flush if self.writes == writes_sent => self.unflushed_on = None,
            Effect::Flush => {}
        }
        true
    }
}

/// What a request does to the durability of earlier writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Effect {
    None,
    /// A write that is durable only after the next flush.
    Unflushed,
    Flush,
}

/// Volume data a request carries, for the per-peer byte counts.
#[derive(Debug, Clone, Copy)]
enum Payload {
    None,
    Sent(u64),
    Received(u64),
}

/// A volume held by another node.
#[derive(Debug)]
pub struct RemoteVolume {
    link: Mutex<Link>,
    peers: Peers,
    size: AtomicU64,
    /// The session requests are sent in (`peer.proto`): a new one before
    /// a request whose outcome is unknown is sent again.
    session: AtomicU64,
    durability: Mutex<Durability>,
    /// Set: the caller gave up (see [`Peers::open_until`]).
    stop: Option<Arc<AtomicBool>>,
}

/// Whether a failed call may succeed later: the owner is away (restart,
/// network) rather than saying no. Whether the owner executed it is not
/// known.
fn transient(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown
    )
}

/// Whether the owner refused the request before running any of it.
fn unexecuted(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::InvalidArgument
            | Code::OutOfRange
            | Code::PermissionDenied
            | Code::Unauthenticated
            | Code::NotFound
            | Code::FailedPrecondition
    )
}

/// A refusal or failure of the owner as an engine error, with the engine
/// kind the frontends map (NBD errors, FUSE errnos).
fn remote_error(t: &Target, op: &'static str, s: Status) -> Error {
    let kind = match s.code() {
        Code::InvalidArgument | Code::OutOfRange => std::io::ErrorKind::InvalidInput,
        Code::PermissionDenied | Code::Unauthenticated => std::io::ErrorKind::PermissionDenied,
        Code::NotFound => std::io::ErrorKind::NotFound,
        Code::ResourceExhausted => std::io::ErrorKind::StorageFull,
        Code::FailedPrecondition => std::io::ErrorKind::ReadOnlyFilesystem,
        Code::Unimplemented => std::io::ErrorKind::Unsupported,
        _ => std::io::ErrorKind::Other,
    };
    let source = std::io::Error::new(kind, format!("{:?}: {}", s.code(), s.message()));
    match s.code() {
        Code::ResourceExhausted => Error::NoSpace { op, source },
        Code::FailedPrecondition => Error::ReadOnly(format!(
            "volume {} on node {} ({})",
            t.volume_id,
            t.owner,
            s.message()
        )),
        _ => Error::Io {
            op,
            path: PathBuf::from(format!(
                "volume {} on node {} ({})",
                t.volume_id, t.owner, t.address
            )),
            source,
        },
    }
}

impl RemoteVolume {
    /// Whether the owner rebooted while it held writes answered and not
    /// flushed (every flush fails from then on).
    pub fn lost_writes(&self) -> bool {
        self.durability.lock().expect("durability").lost
    }

    /// Keeps what this client knows of the owner's boots for the flushes
    /// in `path` (on the node's state directory), so that a restart of
    /// this process between an owner's reboot and the next flush does not
    /// let that flush pass over the writes the reboot lost. `resume`: the
    /// file of an earlier process is read first (a missing one says
    /// nothing was unflushed); else it starts anew, lost if `lost`.
    pub fn keep_in(&self, path: PathBuf, resume: bool, lost: bool) -> Result<()> {
        use std::io::Read;
        use std::os::unix::fs::OpenOptionsExt;
        let io = |op: &'static str| {
            let path = path.clone();
            move |source| Error::Io { op, path, source }
        };
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(io("open"))?;
        let mut d = self.durability.lock().expect("durability");
        if resume {
            let mut rec = Vec::new();
            file.read_to_end(&mut rec).map_err(io("read"))?;
            match Durability::parse(&rec) {
                Some((was_lost, unflushed_on)) => {
                    d.lost |= was_lost;
                    d.unflushed_on = d.unflushed_on.take().or(unflushed_on);
                }
                None if rec.is_empty() => {}
                // Unflushed under a boot no owner has: the next flush
                // fails rather than passes.
                None => {
                    tracing::warn!(path = %path.display(), "a durability record that does not parse: writes taken as lost at the owner's next answer");
                    d.unflushed_on = Some("unreadable-record".into());
                }
            }
        } else {
            d.lost = lost;
        }
        file.set_len(DURABILITY_RECORD as u64).map_err(io("size"))?;
        d.file = Some((file, path.clone()));
        d.save().map_err(io("write"))
    }

    /// Stops recording to the file (the volume follows another owner,
    /// whose client records there from now on).
    pub fn forget_file(&self) {
        self.durability.lock().expect("durability").file = None;
    }

    /// Writes that may be lost (an earlier owner's): every flush fails
    /// from now on, also after a restart of this process.
    pub fn set_lost(&self) -> Result<()> {
        let mut d = self.durability.lock().expect("durability");
        d.lost = true;
        d.save().map_err(|source| Error::Io {
            op: "record lost writes",
            path: d.file.as_ref().map(|(_, p)| p.clone()).unwrap_or_default(),
            source,
        })
    }

    /// Whether the durability record at `path` says writes were lost
    /// (a volume served from this node's own pool since reads it).
    pub fn recorded_lost(path: &std::path::Path) -> bool {
        std::fs::read(path).is_ok_and(|r| Durability::parse(&r).is_some_and(|(lost, _)| lost))
    }

    fn link(&self) -> Link {
        self.link.lock().expect("link").clone()
    }

    /// Runs `attempt` until it is answered, retrying while the owner is
    /// away, up to [`RETRY_FOR`]. A retry of an attempt whose outcome is
    /// unknown goes out in a new session, so the owner finishes or drops
    /// that attempt before it runs the retry. An attempt answers with the
    /// owner's boot ID.
    fn call<T>(
        &self,
        op: &'static str,
        effect: Effect,
        payload: Payload,
        attempt: impl Fn(&Link, pb::Grant) -> std::result::Result<(T, Option<String>), Status>,
    ) -> Result<T> {
        let start = Instant::now();
        let deadline = start + RETRY_FOR;
        let mut pause = Duration::from_millis(50);
        let mut aborted = 0u32;
        let metrics = &self.peers.metrics;
        loop {
            let link = self.link();
            if self
                .stop
                .as_ref()
                .is_some_and(|s| s.load(Ordering::Acquire))
            {
                let why = Status::aborted("its reader stopped (the copy it served ends)");
                return Err(remote_error(&link.target, op, why));
            }
            let owner = &link.target.owner;
            let session = self.session.load(Ordering::Acquire);
            let writes = self.durability.lock().expect("durability").writes;
            let grant = pb::Grant {
                session,
                ..link.grant.clone()
            };
            match attempt(&link, grant) {
                Ok((r, boot)) => {
                    metrics.remote_io(owner, op, start.elapsed());
                    match payload {
                        Payload::None => {}
                        Payload::Sent(n) => metrics.peer_bytes(owner, true, n),
                        Payload::Received(n) => metrics.peer_bytes(owner, false, n),
                    }
                    self.answered(&link.target, op, effect, boot.as_deref(), writes)?;
                    return Ok(r);
                }
                // Refused unexecuted: a newer session of this attachment
                // exists (another thread started one, or another process
                // of this node did); continue after it.
                Err(s) if s.code() == Code::Aborted && Instant::now() < deadline => {
                    let newest = s
                        .metadata()
                        .get(SESSION_HEADER)
                        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                        .unwrap_or(session);
                    self.session
                        .fetch_max(newest.max(session).saturating_add(1), Ordering::AcqRel);
                    // Once is a newer session; again at once is an owner
                    // that refuses every session: not asked in a loop.
                    aborted += 1;
                    if aborted > 1 {
                        std::thread::sleep(pause);
                        pause = (pause * 2).min(Duration::from_secs(2));
                    }
                }
                // Moved away live: the caller waits for its attachment to
                // follow (`node::served`), not for this owner. (Its boot
                // now says nothing of the writes: its seal made them
                // durable, and a reboot since loses none; the seal's boot
                // comes with the follow, `Self::sealed_under`.)
                Err(s) if s.metadata().get(MOVED_HEADER).is_some() => {
                    return Err(Error::Moved {
                        volume: link.target.volume_id.parse().map_err(|_| {
                            remote_error(&link.target, op, Status::internal("volume ID"))
                        })?,
                        node: s
                            .metadata()
                            .get(MOVED_HEADER)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_string(),
                    });
                }
                Err(s) if transient(&s) && Instant::now() + pause * 3 / 2 < deadline => {
                    tracing::debug!(volume = %link.target.volume_id, %owner, status = %s, "remote I/O retried");
                    metrics.remote_retry(owner, op);
                    self.session
                        .fetch_max(session.saturating_add(1), Ordering::AcqRel);
                    // Up to half as long again, at random: the clients
                    // of an owner that restarted do not all come back at
                    // the same instant.
                    let jitter = (uuid::Uuid::new_v4().as_u128() % 1000) as u32;
                    std::thread::sleep(pause + pause * jitter / 2000);
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
                Err(s) => {
                    // Unless the owner said it ran nothing, the attempt
                    // may still run there (a connection that broke is
                    // not always UNAVAILABLE): what comes next must not
                    // be ordered with it.
                    if !unexecuted(&s) {
                        self.session
                            .fetch_max(session.saturating_add(1), Ordering::AcqRel);
                    }
                    return Err(remote_error(&link.target, op, s));
                }
            }
        }
    }

    /// [`Self::call`] with an RPC, run on the runtime.
    fn rpc<T, F, Fut>(
        &self,
        op: &'static str,
        effect: Effect,
        payload: Payload,
        call: F,
    ) -> Result<T>
    where
        F: Fn(PeerClient<Channel>, pb::Grant) -> Fut,
        Fut: Future<Output = std::result::Result<tonic::Response<T>, Status>>,
    {
        self.call(op, effect, payload, |link, grant| {
            let r = self
                .peers
                .runtime
                .block_on(call(link.client.clone(), grant))?;
            Ok(answer(r))
        })
    }

    /// One attempt of a read or write: on a data lane, or through its RPC
    /// when the owner has none for this node. A read's data lands in
    /// `into` (DATA_LOSS if it is not `into`'s size), not in the answer.
    fn lane_or_rpc(
        &self,
        link: &Link,
        op: Op,
        mut into: Option<&mut [u8]>,
    ) -> std::result::Result<(pb::LaneReply, Option<String>), Status> {
        let at = match &op {
            Op::Read(r) => r.offset,
            Op::Write(w) => w.offset,
        };
        let req = pb::LaneRequest { op: Some(op) };
        if let Some(r) = link.owner.lanes.call(&req, into.as_deref_mut()) {
            return r.map(|(reply, boot)| (reply, Some(boot)));
        }
        let r = self
            .peers
            .runtime
            .block_on(by_rpc(link.client.clone(), req))?;
        let (mut reply, boot) = answer(r);
        if let Some(into) = into {
            let data = std::mem::take(&mut reply.data);
            if data.len() != into.len() {
                return Err(super::short_read(into.len(), data.len(), at));
            }
            into.copy_from_slice(&data);
        }
        Ok((reply, boot))
    }

    /// Keeps track of the owner's boots for the flushes (see
    /// [`Durability`]); a flush after a loss fails. `writes_sent`: the
    /// writes answered when the request was sent.
    fn answered(
        &self,
        t: &Target,
        op: &'static str,
        effect: Effect,
        boot: Option<&str>,
        writes_sent: u64,
    ) -> Result<()> {
        let mut d = self.durability.lock().expect("durability");
        let was = (d.lost, d.unflushed_on.clone());
        let flushed = d.answered(effect, boot, writes_sent);
        if d.lost && !was.0 {
            tracing::error!(volume = %t.volume_id, owner = %t.owner, "the owner rebooted while it held writes it had not flushed: they may be lost; every flush fails from now on");
        }
        // Recorded before the write or flush is answered: a restart of
        // this process must still fail the next flush after a loss.
        if (d.unsaved || (d.lost, &d.unflushed_on) != (was.0, &was.1))
            && let Err(e) = d.save()
        {
            let path = d.file.as_ref().map(|(_, p)| p.display().to_string());
            let why = format!(
                "recording what the owner holds unflushed in {}: {e}",
                path.unwrap_or_default()
            );
            tracing::warn!(volume = %t.volume_id, error = %why, "the volume's durability could not be recorded; its writes and flushes fail until it is");
            if effect != Effect::None {
                return Err(remote_error(t, op, Status::internal(why)));
            }
        }
        if !flushed {
            return Err(remote_error(
                t,
                op,
                Status::data_loss(
                    "the owner rebooted while it held acknowledged writes it had not \
                     flushed; they may be lost",
                ),
            ));
        }
        Ok(())
    }

    /// The owner sealed the volume for a live move under `boot` (every
    /// write it answered before is durable on the target, unless it
    /// rebooted after answering one and before the seal): writes answered
    /// under another boot and not flushed may be lost.
    pub fn sealed_under(&self, boot: &str) -> Result<()> {
        let writes = self.durability.lock().expect("durability").writes;
        self.answered(&self.target(), "follow", Effect::None, Some(boot), writes)
    }

    /// Asks the owner for the volume's size (after an expansion).
    pub fn refresh_size(&self) -> Result<u64> {
        let r = self.rpc(
            "open",
            Effect::None,
            Payload::None,
            |mut c, grant| async move { c.open(pb::OpenRequest { grant: Some(grant) }).await },
        )?;
        self.size.store(r.size_bytes, Ordering::Relaxed);
        Ok(r.size_bytes)
    }

    pub fn target(&self) -> Target {
        self.link().target
    }

    /// The data extents of `offset..offset + len` (`len` at most
    /// [`super::MAX_MAP`]), as (offset, length) pairs in order; the rest
    /// reads as zeros.
    pub fn map(&self, offset: u64, len: u64) -> Result<Vec<(u64, u64)>> {
        let r = self.rpc(
            "map",
            Effect::None,
            Payload::None,
            |mut c, grant| async move {
                c.map(pb::RangeRequest {
                    grant: Some(grant),
                    offset,
                    length: len,
                })
                .await
            },
        )?;
        let end = offset.saturating_add(len);
        let mut at = offset;
        let mut data = Vec::with_capacity(r.data.len());
        for e in r.data {
            // Never trust the owner to stay inside the range it was asked.
            if e.offset < at || e.length == 0 || e.offset.saturating_add(e.length) > end {
                return Err(remote_error(
                    &self.link().target,
                    "map",
                    Status::data_loss(format!(
                        "extent {}+{} is outside {offset}+{len} or out of order",
                        e.offset, e.length
                    )),
                ));
            }
            at = e.offset + e.length;
            data.push((e.offset, e.length));
        }
        Ok(data)
    }

    /// A live move's target: the next batch of ranges of the volume
    /// changed (at most `max`), after batch `confirmed` (see `peer.proto`,
    /// Changes): its number and the (offset, length) pairs in order.
    pub fn changes(&self, confirmed: u64, max: u32) -> Result<(u64, Vec<(u64, u64)>)> {
        let r = self.rpc(
            "changes",
            Effect::None,
            Payload::None,
            |mut c, grant| async move {
                c.changes(pb::ChangesRequest {
                    grant: Some(grant),
                    max,
                    confirmed,
                })
                .await
            },
        )?;
        let size = self.size();
        let mut at = 0;
        let mut out = Vec::with_capacity(r.data.len());
        for e in r.data {
            if e.offset < at || e.length == 0 || e.offset.saturating_add(e.length) > size {
                return Err(remote_error(
                    &self.link().target,
                    "changes",
                    Status::data_loss(format!(
                        "changed range {}+{} is outside the volume or out of order",
                        e.offset, e.length
                    )),
                ));
            }
            at = e.offset + e.length;
            out.push((e.offset, e.length));
        }
        Ok((r.batch, out))
    }

    /// Goes on with a newer publish of the same volume (a new grant, or
    /// a new address of the owner).
    pub fn retarget(&self, target: &Target) -> Result<()> {
        let link = self.peers.link(target)?;
        *self.link.lock().expect("link") = link;
        Ok(())
    }
}

/// An RPC's answer and the owner's boot ID it carries.
fn answer<T>(r: tonic::Response<T>) -> (T, Option<String>) {
    let boot = r.metadata().get(BOOT_HEADER).and_then(|v| v.to_str().ok());
    let boot = boot.map(str::to_string);
    (r.into_inner(), boot)
}

/// A lane's request through its RPC, answered as the lane would.
async fn by_rpc(
    mut c: PeerClient<Channel>,
    req: pb::LaneRequest,
) -> std::result::Result<tonic::Response<pb::LaneReply>, Status> {
    match req.op {
        Some(Op::Read(r)) => c.read(r).await.map(|r| {
            r.map(|r| pb::LaneReply {
                data: r.data,
                ..Default::default()
            })
        }),
        Some(Op::Write(w)) => c
            .write(w)
            .await
            .map(|r| r.map(|_| pb::LaneReply::default())),
        None => Err(Status::invalid_argument("a request without an operation")),
    }
}

/// A fetching volume's blocks not yet copied are read from its source.
impl crate::engine::Backing for RemoteVolume {
    fn size(&self) -> u64 {
        RemoteDevice::size(self)
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        RemoteDevice::read(self, offset, buf)
    }
}

impl RemoteDevice for RemoteVolume {
    fn name(&self) -> String {
        self.link().target.volume_id
    }

    fn read_only(&self) -> bool {
        self.link.lock().expect("link").grant.read_only
    }

    fn size(&self) -> u64 {
        self.size.load(Ordering::Relaxed)
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let len = (buf.len() - done).min(MAX_IO);
            let at = offset + done as u64;
            let payload = Payload::Received(len as u64);
            let into = std::cell::RefCell::new(&mut buf[done..done + len]);
            self.call("read", Effect::None, payload, |link, grant| {
                let req = pb::ReadRequest {
                    grant: Some(grant),
                    offset: at,
                    length: len as u32,
                };
                let mut into = into.borrow_mut();
                self.lane_or_rpc(link, Op::Read(req), Some(&mut into))
                    .map(|(_, boot)| ((), boot))
            })?;
            done += len;
        }
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        for (i, chunk) in data.chunks(MAX_IO).enumerate() {
            let at = offset + (i * MAX_IO) as u64;
            let effect = if fua { Effect::None } else { Effect::Unflushed };
            let payload = Payload::Sent(chunk.len() as u64);
            self.call("write", effect, payload, |link, grant| {
                let req = pb::WriteRequest {
                    grant: Some(grant),
                    offset: at,
                    data: chunk.to_vec(),
                    fua,
                };
                self.lane_or_rpc(link, Op::Write(req), None)
                    .map(|(_, boot)| ((), boot))
            })?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        self.rpc(
            "flush",
            Effect::Flush,
            Payload::None,
            |mut c, grant| async move { c.flush(pb::FlushRequest { grant: Some(grant) }).await },
        )
        .map(drop)
    }

    fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.rpc(
            "trim",
            Effect::Unflushed,
            Payload::None,
            |mut c, grant| async move {
                c.trim(pb::RangeRequest {
                    grant: Some(grant),
                    offset,
                    length: len,
                })
                .await
            },
        )
        .map(drop)
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        let done = self.rpc(
            "write zeroes",
            Effect::Unflushed,
            Payload::None,
            |mut c, grant| async move {
                c.zero(pb::ZeroRequest {
                    grant: Some(grant),
                    offset,
                    length: len,
                    may_trim: !flags.no_hole,
                    fast: flags.fast,
                })
                .await
            },
        );
        match done {
            // The owner would have written zeroes as data.
            Err(Error::Io { source, .. })
                if flags.fast && source.kind() == std::io::ErrorKind::Unsupported =>
            {
                Err(Error::SlowZero { offset, len })
            }
            other => other.map(drop),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{DURABILITY_RECORD, Durability, Effect};

    /// A flush covers the writes answered before it was sent: one answered
    /// while it was on its way stays unflushed, and the owner's reboot
    /// before the next flush fails that flush.
    #[test]
    fn a_flush_does_not_cover_a_write_answered_while_it_was_on_its_way() {
        let mut d = Durability::default();
        assert!(d.answered(Effect::Unflushed, Some("b1"), 0));
        let sent = d.writes;
        assert!(d.answered(Effect::Unflushed, Some("b1"), sent));
        assert!(d.answered(Effect::Flush, Some("b1"), sent));
        assert_eq!(d.unflushed_on.as_deref(), Some("b1"));
        // The owner rebooted: the second write may be gone.
        assert!(d.answered(Effect::None, Some("b2"), d.writes));
        assert!(!d.answered(Effect::Flush, Some("b2"), d.writes));
        // Sent after the write was answered, a flush covers it.
        let mut d = Durability::default();
        assert!(d.answered(Effect::Unflushed, Some("b1"), 0));
        assert!(d.answered(Effect::Flush, Some("b1"), d.writes));
        assert_eq!(d.unflushed_on, None);
        assert!(d.answered(Effect::Flush, Some("b2"), d.writes));
        assert!(!d.lost);
    }

    /// What a restarted node reads back is what was written (a boot ID
    /// too long for the record is cut, and then differs: a flush fails,
    /// never passes); a record that cannot be written (the state
    /// directory full) is marked to be written again.
    #[test]
    fn a_durability_record_reads_back_and_a_failed_write_is_retried() {
        let d = Durability {
            unflushed_on: Some("b1".into()),
            lost: true,
            ..Default::default()
        };
        assert_eq!(d.record().len(), DURABILITY_RECORD);
        assert_eq!(
            Durability::parse(&d.record()),
            Some((true, Some("b1".into())))
        );
        let d = Durability::default();
        assert_eq!(Durability::parse(&d.record()), Some((false, None)));
        let long = Durability {
            unflushed_on: Some("x".repeat(500)),
            ..Default::default()
        };
        let (_, boot) = Durability::parse(&long.record()).unwrap();
        assert_eq!(boot.map(|b| b.len()), Some(DURABILITY_RECORD - 8));
        assert_eq!(Durability::parse(b"garbage"), None);
        let empty = Durability {
            unflushed_on: Some(String::new()),
            ..Default::default()
        };
        assert_eq!(
            Durability::parse(&empty.record()),
            Some((false, Some(String::new())))
        );

        let full = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap();
        let mut d = Durability {
            file: Some((full, "/dev/full".into())),
            ..Default::default()
        };
        let e = d.save().unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
        assert!(d.unsaved);
    }
}
