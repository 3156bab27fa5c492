//! The owner's side of the data path between nodes (`crate::peer`): the
//! `strata.peer.v1.Peer` service on the agent port. Each request is
//! checked before it touches the engine: a grant made by the controller
//! for this volume, an epoch no older than the newest this process has
//! seen for the volume (an attachment replaced by a newer one is refused
//! with PERMISSION_DENIED), and a length of at most `peer::MAX_IO`.
//!
//! The fence lives in memory: after a restart of the owner, the first
//! grant used sets it again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use csi_proto::peer::v1::peer_server::Peer;
use csi_proto::peer::v1::*;
use tonic::{Request, Response, Status};

use crate::engine::{VolumeId, ZeroFlags};
use crate::metrics::Metrics;
use crate::peer::{GrantKey, MAX_IO};
use crate::rpc::{Core, Started, status};

/// The Peer service of this node.
#[derive(Debug, Clone)]
pub struct PeerService {
    started: Started,
    key: GrantKey,
    metrics: Arc<Metrics>,
    /// The newest epoch used per volume.
    fence: Arc<Mutex<HashMap<VolumeId, u64>>>,
}

impl PeerService {
    pub fn new(started: Started, key: GrantKey, metrics: Arc<Metrics>) -> Self {
        PeerService {
            started,
            key,
            metrics,
            fence: Arc::default(),
        }
    }

    /// Checks the grant and the fence; the volume it names.
    fn admit(&self, grant: Option<&Grant>) -> Result<VolumeId, Status> {
        let g = grant.ok_or_else(|| Status::unauthenticated("the request carries no grant"))?;
        self.key
            .check(Some(g), &g.volume_id)
            .map_err(|e| Status::permission_denied(e.to_string()))?;
        let vid: VolumeId = g
            .volume_id
            .parse()
            .map_err(|_| Status::invalid_argument(format!("volume {:?}", g.volume_id)))?;
        let mut fence = self.fence.lock().expect("fence");
        let newest = fence.entry(vid).or_insert(g.epoch);
        if g.epoch < *newest {
            return Err(Status::permission_denied(format!(
                "volume {vid} was published to a node again since this attachment's grant \
                 (epoch {} < {}): this attachment is fenced off",
                g.epoch, newest
            )));
        }
        *newest = g.epoch;
        Ok(vid)
    }

    /// Runs engine work for the volume on the blocking pool.
    async fn on_volume<T: Send + 'static>(
        &self,
        grant: Option<&Grant>,
        f: impl FnOnce(&crate::engine::Volume) -> crate::engine::Result<T> + Send + 'static,
    ) -> Result<T, Status> {
        let vid = self.admit(grant)?;
        let started = self.started.clone();
        tokio::task::spawn_blocking(move || {
            let core: &Core = started.get()?;
            let v = core.pool.volume(vid).map_err(status::engine)?;
            f(&v).map_err(status::engine)
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
