//! [`RemoteVolume`]: a volume of another node, as this node's frontends
//! call it (blocking calls from their worker threads, each run on the
//! node's tokio runtime).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use csi_proto::peer::v1 as pb;
use csi_proto::peer::v1::peer_client::PeerClient;
use serde::{Deserialize, Serialize};
use tonic::transport::Channel;
use tonic::{Code, Status};

use super::{MAX_IO, RETRY_FOR, SESSION_HEADER, grant};
use crate::engine::{Error, Result, ZeroFlags};
use crate::frontend::RemoteDevice;
use crate::metrics::Metrics;
use crate::tls::TlsFiles;

/// How long one attempt may take (a flush on a busy disk included).
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Messages up to one request's data, and room for the rest.
const MAX_MESSAGE: usize = MAX_IO + (64 << 10);

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

/// What this node needs to reach other nodes.
#[derive(Debug, Clone)]
pub struct Peers {
    tls: TlsFiles,
    runtime: tokio::runtime::Handle,
    metrics: Arc<Metrics>,
}

impl Peers {
    /// `runtime` runs the calls (the frontends' threads wait for them).
    pub fn new(tls: TlsFiles, runtime: tokio::runtime::Handle, metrics: Arc<Metrics>) -> Self {
        Peers {
            tls,
            runtime,
            metrics,
        }
    }

    /// The volume `target` names. With `size`, no call is made (a restart
    /// serving an attachment again while the owner may be away); without,
    /// the owner is asked, which also checks the grant.
    pub fn open(&self, target: &Target, size: Option<u64>) -> Result<Arc<RemoteVolume>> {
        let grant = grant::decode(&target.volume_id, &target.grant).ok_or_else(|| {
            remote_error(
                target,
                "decode the grant",
                Status::invalid_argument("the publish context's grant is malformed"),
            )
        })?;
        let channel = self
            .tls
            .channel("peer", &target.address, CONNECT_TIMEOUT, CALL_TIMEOUT)
            .map_err(|s| remote_error(target, "connect", s))?;
        let client = PeerClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        let v = Arc::new(RemoteVolume {
            target: target.clone(),
            grant,
            client,
            runtime: self.runtime.clone(),
            metrics: Arc::clone(&self.metrics),
            size: AtomicU64::new(size.unwrap_or(0)),
            // Newer than any session of this node's earlier processes
            // (whose requests the owner drains before this one's).
            session: AtomicU64::new(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64),
            ),
        });
        if size.is_none() {
            v.refresh_size()?;
        }
        Ok(v)
    }
}

/// A volume held by another node.
#[derive(Debug)]
pub struct RemoteVolume {
    target: Target,
    grant: pb::Grant,
    client: PeerClient<Channel>,
    runtime: tokio::runtime::Handle,
    metrics: Arc<Metrics>,
    size: AtomicU64,
    /// The session requests are sent in (`peer.proto`): a new one before
    /// a request whose outcome is unknown is sent again.
    session: AtomicU64,
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

/// A refusal or failure of the owner as an engine error, with the engine
/// kind the frontends map (NBD errors, FUSE errnos).
fn remote_error(t: &Target, op: &'static str, s: Status) -> Error {
    let kind = match s.code() {
        Code::InvalidArgument | Code::OutOfRange => std::io::ErrorKind::InvalidInput,
        Code::PermissionDenied | Code::Unauthenticated => std::io::ErrorKind::PermissionDenied,
        Code::NotFound => std::io::ErrorKind::NotFound,
        Code::ResourceExhausted => std::io::ErrorKind::StorageFull,
        Code::FailedPrecondition => std::io::ErrorKind::ReadOnlyFilesystem,
        _ => std::io::ErrorKind::Other,
    };
    let source = std::io::Error::new(kind, format!("{:?}: {}", s.code(), s.message()));
    match s.code() {
        Code::ResourceExhausted => Error::NoSpace { op, source },
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
    /// Runs `call` on the runtime, retrying while the owner is away, up
    /// to [`RETRY_FOR`]. A retry of an attempt whose outcome is unknown
    /// goes out in a new session, so the owner finishes or drops that
    /// attempt before it runs the retry.
    fn call<T, F, Fut>(&self, op: &'static str, call: F) -> Result<T>
    where
        F: Fn(PeerClient<Channel>, pb::Grant) -> Fut,
        Fut: Future<Output = std::result::Result<tonic::Response<T>, Status>>,
    {
        let start = Instant::now();
        let deadline = start + RETRY_FOR;
        let mut pause = Duration::from_millis(50);
        loop {
            let session = self.session.load(Ordering::Acquire);
            let grant = pb::Grant {
                session,
                ..self.grant.clone()
            };
            match self.runtime.block_on(call(self.client.clone(), grant)) {
                Ok(r) => {
                    self.metrics
                        .remote_io(&self.target.owner, op, start.elapsed());
                    return Ok(r.into_inner());
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
                }
                Err(s) if transient(&s) && Instant::now() + pause < deadline => {
                    tracing::debug!(volume = %self.target.volume_id, owner = %self.target.owner, status = %s, "remote I/O retried");
                    self.metrics.remote_retry(&self.target.owner, op);
                    self.session
                        .fetch_max(session.saturating_add(1), Ordering::AcqRel);
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
                Err(s) => return Err(remote_error(&self.target, op, s)),
            }
        }
    }

    /// Asks the owner for the volume's size (after an expansion).
    pub fn refresh_size(&self) -> Result<u64> {
        let r = self.call("open", |mut c, grant| async move {
            c.open(pb::OpenRequest { grant: Some(grant) }).await
        })?;
        self.size.store(r.size_bytes, Ordering::Relaxed);
        Ok(r.size_bytes)
    }

    pub fn target(&self) -> &Target {
        &self.target
    }
}

impl RemoteDevice for RemoteVolume {
    fn name(&self) -> String {
        self.target.volume_id.clone()
    }

    fn size(&self) -> u64 {
        self.size.load(Ordering::Relaxed)
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let len = (buf.len() - done).min(MAX_IO);
            let at = offset + done as u64;
            let r = self.call("read", |mut c, grant| async move {
                c.read(pb::ReadRequest {
                    grant: Some(grant),
                    offset: at,
                    length: len as u32,
                })
                .await
            })?;
            if r.data.len() != len {
                return Err(remote_error(
                    &self.target,
                    "read",
                    Status::data_loss(format!(
                        "asked for {len} bytes at {at}, got {}",
                        r.data.len()
                    )),
                ));
            }
            buf[done..done + len].copy_from_slice(&r.data);
            self.metrics
                .peer_bytes(&self.target.owner, false, len as u64);
            done += len;
        }
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        for (i, chunk) in data.chunks(MAX_IO).enumerate() {
            let at = offset + (i * MAX_IO) as u64;
            self.call("write", |mut c, grant| {
                let data = chunk.to_vec();
                async move {
                    c.write(pb::WriteRequest {
                        grant: Some(grant),
                        offset: at,
                        data,
                        fua,
                    })
                    .await
                }
            })?;
            self.metrics
                .peer_bytes(&self.target.owner, true, chunk.len() as u64);
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        self.call("flush", |mut c, grant| async move {
            c.flush(pb::FlushRequest { grant: Some(grant) }).await
        })
        .map(drop)
    }

    fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.call("trim", |mut c, grant| async move {
            c.trim(pb::RangeRequest {
                grant: Some(grant),
                offset,
                length: len,
            })
            .await
        })
        .map(drop)
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.call("write zeroes", |mut c, grant| async move {
            c.zero(pb::ZeroRequest {
                grant: Some(grant),
                offset,
                length: len,
                may_trim: !flags.no_hole,
            })
            .await
        })
        .map(drop)
    }
}
