//! The owner's side of the data path between nodes (`crate::peer`): the
//! `strata.peer.v1.Peer` service on the agent port. Each request is
//! checked before it touches the engine: a grant made by the controller
//! for this volume, an epoch no older than the newest this process has
//! seen for the volume (an attachment replaced by a newer one is refused
//! with PERMISSION_DENIED), and a length of at most `peer::MAX_IO`.
//!
//! Requests are ordered by (epoch, session) as `peer.proto` describes: the
//! first request of a newer pair waits until every admitted request of the
//! older ones has left the engine ([`Admitted`] is held until the engine
//! call returns, even when the client has gone), and a later request of an
//! older pair is refused unexecuted.
//!
//! The fence lives in memory: after a restart of the owner, the first
//! grant used sets it again (no request of the old process can still run).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use csi_proto::peer::v1::peer_server::Peer;
use csi_proto::peer::v1::*;
use tonic::{Request, Response, Status};

use crate::engine::{VolumeId, ZeroFlags};
use crate::metrics::Metrics;
use crate::peer::{GrantKey, MAX_IO, SESSION_HEADER};
use crate::rpc::{Core, Started, status};

/// The Peer service of this node.
#[derive(Debug, Clone)]
pub struct PeerService {
    started: Started,
    key: GrantKey,
    metrics: Arc<Metrics>,
    fence: Arc<Mutex<HashMap<VolumeId, Fence>>>,
}

/// The newest (epoch, session) used for a volume, and its requests in
/// the engine.
#[derive(Debug, Default)]
struct Fence {
    newest: (u64, u64),
    /// Admitted under `newest`, not finished.
    current: usize,
    /// Admitted under older pairs, not finished.
    older: usize,
}

/// One admitted request; dropping it (when the engine call returned)
/// lets a newer session in.
struct Admitted {
    fence: Arc<Mutex<HashMap<VolumeId, Fence>>>,
    vid: VolumeId,
    key: (u64, u64),
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut fences = self.fence.lock().expect("fence");
        if let Some(f) = fences.get_mut(&self.vid) {
            if f.newest == self.key {
                f.current -= 1;
            } else {
                f.older -= 1;
            }
        }
    }
}

/// How often a request of a newer session looks whether the older ones
/// have drained (rare: only after a client gave up on a request).
const DRAIN_POLL: Duration = Duration::from_millis(5);

impl PeerService {
    pub fn new(started: Started, key: GrantKey, metrics: Arc<Metrics>) -> Self {
        PeerService {
            started,
            key,
            metrics,
            fence: Arc::default(),
        }
    }

    /// Checks the grant and the fence, and waits until the request may
    /// run.
    async fn admit(&self, grant: Option<&Grant>) -> Result<Admitted, Status> {
        let g = grant.ok_or_else(|| Status::unauthenticated("the request carries no grant"))?;
        self.key
            .check(Some(g), &g.volume_id)
            .map_err(|e| Status::permission_denied(e.to_string()))?;
        let vid: VolumeId = g
            .volume_id
            .parse()
            .map_err(|_| Status::invalid_argument(format!("volume {:?}", g.volume_id)))?;
        let key = (g.epoch, g.session);
        loop {
            {
                let mut fences = self.fence.lock().expect("fence");
                let f = fences.entry(vid).or_insert_with(|| Fence {
                    newest: key,
                    ..Fence::default()
                });
                if key.0 < f.newest.0 {
                    return Err(Status::permission_denied(format!(
                        "volume {vid} was published to a node again since this attachment's \
                         grant (epoch {} < {}): this attachment is fenced off",
                        key.0, f.newest.0
                    )));
                }
                if key < f.newest {
                    let mut s = Status::aborted(format!(
                        "session {} of this attachment was replaced by session {}; not executed",
                        key.1, f.newest.1
                    ));
                    s.metadata_mut().insert(
                        SESSION_HEADER,
                        f.newest.1.to_string().parse().expect("ascii"),
                    );
                    return Err(s);
                }
                if key > f.newest {
                    f.newest = key;
                    f.older += std::mem::take(&mut f.current);
                }
                if f.older == 0 {
                    f.current += 1;
                    return Ok(Admitted {
                        fence: Arc::clone(&self.fence),
                        vid,
                        key,
                    });
                }
            }
            tokio::time::sleep(DRAIN_POLL).await;
        }
    }

    /// Runs engine work for the volume on the blocking pool.
    async fn on_volume<T: Send + 'static>(
        &self,
        grant: Option<&Grant>,
        f: impl FnOnce(&crate::engine::Volume) -> crate::engine::Result<T> + Send + 'static,
    ) -> Result<T, Status> {
        let admitted = self.admit(grant).await?;
        let started = self.started.clone();
        tokio::task::spawn_blocking(move || {
            let core: &Core = started.get()?;
            let v = core.pool.volume(admitted.vid).map_err(status::engine)?;
            let r = f(&v).map_err(status::engine);
            drop(admitted);
            r
        })
        .await
        .map_err(status::join)?
    }
}

fn io_len(len: u64) -> Result<usize, Status> {
    if len > MAX_IO as u64 {
        return Err(Status::invalid_argument(format!(
            "{len} bytes in one request; at most {MAX_IO}"
        )));
    }
    Ok(len as usize)
}

#[tonic::async_trait]
impl Peer for PeerService {
    async fn open(&self, req: Request<OpenRequest>) -> Result<Response<OpenReply>, Status> {
        let req = req.into_inner();
        let size = self.on_volume(req.grant.as_ref(), |v| Ok(v.size())).await?;
        Ok(Response::new(OpenReply { size_bytes: size }))
    }

    async fn read(&self, req: Request<ReadRequest>) -> Result<Response<ReadReply>, Status> {
        let req = req.into_inner();
        let len = io_len(u64::from(req.length))?;
        let peer = req.grant.as_ref().map(|g| g.node_id.clone());
        let data = self
            .on_volume(req.grant.as_ref(), move |v| {
                let mut buf = vec![0u8; len];
                v.read(req.offset, &mut buf)?;
                Ok(buf)
            })
            .await?;
        self.metrics
            .peer_bytes(&peer.unwrap_or_default(), true, data.len() as u64);
        Ok(Response::new(ReadReply { data }))
    }

    async fn write(&self, req: Request<WriteRequest>) -> Result<Response<Done>, Status> {
        let req = req.into_inner();
        let len = io_len(req.data.len() as u64)?;
        let grant = req.grant.clone();
        self.on_volume(grant.as_ref(), move |v| {
            v.write(req.offset, &req.data, req.fua)
        })
        .await?;
        let peer = grant.map(|g| g.node_id).unwrap_or_default();
        self.metrics.peer_bytes(&peer, false, len as u64);
        Ok(Response::new(Done {}))
    }

    async fn flush(&self, req: Request<FlushRequest>) -> Result<Response<Done>, Status> {
        let req = req.into_inner();
        self.on_volume(req.grant.as_ref(), |v| v.flush()).await?;
        Ok(Response::new(Done {}))
    }

    async fn trim(&self, req: Request<RangeRequest>) -> Result<Response<Done>, Status> {
        let req = req.into_inner();
        self.on_volume(req.grant.as_ref(), move |v| v.trim(req.offset, req.length))
            .await?;
        Ok(Response::new(Done {}))
    }

    async fn zero(&self, req: Request<ZeroRequest>) -> Result<Response<Done>, Status> {
        let req = req.into_inner();
        let flags = ZeroFlags {
            no_hole: !req.may_trim,
        };
        self.on_volume(req.grant.as_ref(), move |v| {
            v.write_zeroes(req.offset, req.length, flags)
        })
        .await?;
        Ok(Response::new(Done {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service() -> (PeerService, Grant) {
        let key = GrantKey::from_secret(b"test");
        let vid = VolumeId::new_random().to_string();
        let grant = key.make(&vid, "n1", 10);
        let s = PeerService::new(Started::default(), key, crate::metrics::Metrics::new());
        (s, grant)
    }

    fn at(g: &Grant, epoch: u64, session: u64) -> Grant {
        let mut g = GrantKey::from_secret(b"test").make(&g.volume_id, &g.node_id, epoch);
        g.session = session;
        g
    }

    /// A request retried in a new session runs only after the first
    /// attempt has left the engine, and a late first attempt is refused
    /// unexecuted; an older epoch is fenced off.
    #[tokio::test]
    async fn a_newer_session_waits_for_the_older_and_refuses_its_late_requests() {
        let (s, g) = service();
        let first = s.admit(Some(&at(&g, 10, 1))).await.unwrap();
        let also_first = s.admit(Some(&at(&g, 10, 1))).await.unwrap();
        let retry = {
            let (s, g) = (s.clone(), at(&g, 10, 2));
            tokio::spawn(async move { s.admit(Some(&g)).await.map(drop) })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!retry.is_finished(), "ran beside the older session");
        let late = s.admit(Some(&at(&g, 10, 1))).await.map(drop).unwrap_err();
        assert_eq!(late.code(), tonic::Code::Aborted);
        assert_eq!(late.metadata().get(SESSION_HEADER).unwrap(), "2");
        drop(first);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!retry.is_finished(), "ran before every older request left");
        drop(also_first);
        retry.await.unwrap().unwrap();
        // Another node's newer grant fences this attachment off.
        s.admit(Some(&at(&g, 11, 0))).await.map(drop).unwrap();
        let fenced = s.admit(Some(&at(&g, 10, 9))).await.map(drop).unwrap_err();
        assert_eq!(fenced.code(), tonic::Code::PermissionDenied);
        // A bad MAC never gets in.
        let mut forged = at(&g, 12, 0);
        forged.mac[0] ^= 1;
        let e = s.admit(Some(&forged)).await.map(drop).unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
    }
}
