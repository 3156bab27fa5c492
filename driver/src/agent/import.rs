//! The target's side of a move between nodes (`agent.proto`, Import): the
//! volume is made here and every data extent of the source's copy is read
//! over the data path ([`crate::peer::RemoteVolume`], with the move's
//! read-only grant) and written into it, then flushed. The copy runs in the
//! background; the controller polls the same call for its progress.
//!
//! The source's copy does not change during a move (it is published to no
//! node but this one, read-only), so copying again is always right: a copy
//! that was not seen to finish in this process (a restart, a failure) is
//! started over, on a fresh volume, so nothing a failed attempt wrote can
//! survive into the moved volume.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use csi_proto::agent::v1::{ImportReply, ImportRequest};
use tonic::Status;

use crate::engine::jobs::throttle::Bucket;
use crate::engine::{Error, VolumeId, VolumePolicy};
use crate::peer::{MAX_IO, MAX_MAP, Target};
use crate::rpc::{Core, Started, status};

/// The copies of this process.
#[derive(Debug, Default)]
pub struct Imports {
    copies: Mutex<HashMap<VolumeId, Copy>>,
}

#[derive(Debug)]
enum Copy {
    Running(Arc<AtomicU64>),
    Done(u64),
    Failed(Status),
}

impl Imports {
    /// Starts the copy `req` asks for unless it runs or finished; its
    /// progress. A failed copy's error is answered once, and the next call
    /// starts over.
    pub fn poll(
        self: &Arc<Self>,
        started: &Started,
        vid: VolumeId,
        req: ImportRequest,
    ) -> Result<ImportReply, Status> {
        let mut copies = self.copies.lock().expect("imports");
        let reply = |copied_bytes, done| ImportReply { copied_bytes, done };
        match copies.remove(&vid) {
            Some(Copy::Running(n)) => {
                let copied = n.load(Ordering::Relaxed);
                copies.insert(vid, Copy::Running(n));
                return Ok(reply(copied, false));
            }
            Some(Copy::Done(n)) => {
                copies.insert(vid, Copy::Done(n));
                return Ok(reply(n, true));
            }
            Some(Copy::Failed(s)) => return Err(s),
            None => {}
        }
        let progress = Arc::new(AtomicU64::new(0));
        copies.insert(vid, Copy::Running(Arc::clone(&progress)));
        let (imports, started) = (Arc::clone(self), started.clone());
        tokio::task::spawn_blocking(move || {
            let outcome = started
                .get()
                .and_then(|core| copy(core, vid, &req, &progress));
            let end = match outcome {
                Ok(n) => Copy::Done(n),
                Err(s) => {
                    tracing::warn!(volume = %vid, owner = %req.owner, error = %s.message(), "copying a moving volume failed");
                    Copy::Failed(s)
                }
            };
            imports.copies.lock().expect("imports").insert(vid, end);
        });
        Ok(reply(0, false))
    }

    /// Forgets a volume's copy (it was deleted).
    pub fn forget(&self, vid: VolumeId) {
        let mut copies = self.copies.lock().expect("imports");
        if !matches!(copies.get(&vid), Some(Copy::Running(_))) {
            copies.remove(&vid);
        }
    }

    /// Whether a copy into `vid` runs (the volume must not be deleted
    /// under it).
    pub fn running(&self, vid: VolumeId) -> bool {
        matches!(
            self.copies.lock().expect("imports").get(&vid),
            Some(Copy::Running(_))
        )
    }
}

/// Makes the volume afresh and copies the source's data into it; the bytes
/// copied.
fn copy(
    core: &Core,
    vid: VolumeId,
    req: &ImportRequest,
    copied: &AtomicU64,
) -> Result<u64, Status> {
    let create = req
        .volume
        .as_ref()
        .ok_or_else(|| Status::invalid_argument("the volume to import is required"))?;
    if create.source.is_some() {
        return Err(Status::invalid_argument(
            "an imported volume has no source on this node",
        ));
    }
    let node = core.node.as_ref().ok_or_else(|| {
        Status::failed_precondition("this process serves no node: it cannot copy volumes")
    })?;
    if node.is_staged_locally(vid) {
        return Err(Status::failed_precondition(format!(
            "volume {vid} is staged on this node: it is in use here, not a move's copy"
        )));
    }
    let peers = node.peers().map_err(status::node)?;
    let target = Target {
        volume_id: vid.to_string(),
        owner: req.owner.clone(),
        address: req.address.clone(),
        grant: req.grant.clone(),
    };
    let source = peers.open(&target, None).map_err(status::engine)?;
    let size = crate::frontend::RemoteDevice::size(source.as_ref());
    if size != create.size_bytes {
        return Err(Status::failed_precondition(format!(
            "volume {vid} is {size} bytes on node {}, not {} as its record says (expanded \
             during the move?)",
            req.owner, create.size_bytes
        )));
    }
    let pool = &core.pool;
    match pool.attachment(vid) {
        Ok(a) if !a.node.is_empty() => {
            return Err(Status::failed_precondition(format!(
                "volume {vid} is published to node {} from this node: it lives here, it is \
                 not a move's copy",
                a.node
            )));
        }
        Ok(_) | Err(Error::VolumeNotFound(_)) => {}
        Err(e) => return Err(status::engine(e)),
    }
    // Whatever an earlier attempt left is not trusted.
    match pool.delete_volume(vid) {
        Ok(()) | Err(Error::VolumeNotFound(_)) => {}
        Err(e) => return Err(status::engine(e)),
    }
    pool.create_volume_as(vid, size).map_err(status::engine)?;
    if create.max_chain_depth != 0 {
        let policy = VolumePolicy {
            max_chain_depth: create.max_chain_depth,
        };
        pool.set_policy(vid, policy).map_err(status::engine)?;
    }
    let volume = pool.volume(vid).map_err(status::engine)?;
    let bucket = (req.rate_bytes_per_second > 0).then(|| Bucket::new(req.rate_bytes_per_second));
    let mut buf = vec![0u8; MAX_IO];
    let mut window = 0;
    while window < size {
        let len = (size - window).min(MAX_MAP);
        for (offset, length) in source.map(window, len).map_err(status::engine)? {
            let end = offset + length;
            let mut at = offset;
            while at < end {
                let n = ((end - at) as usize).min(MAX_IO);
                if let Some(b) = &bucket {
                    b.take(n as u64);
                }
                crate::frontend::RemoteDevice::read(source.as_ref(), at, &mut buf[..n])
                    .map_err(status::engine)?;
                volume.write(at, &buf[..n], false).map_err(status::engine)?;
                copied.fetch_add(n as u64, Ordering::Relaxed);
                at += n as u64;
                crate::engine::jobs::failpoint::hit("agent::import::after_chunk");
            }
        }
        window += len;
    }
    volume.flush().map_err(status::engine)?;
    Ok(copied.load(Ordering::Relaxed))
}
