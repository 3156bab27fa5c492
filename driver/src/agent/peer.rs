//! The owner's side of the data path between nodes (`crate::peer`): the
//! `strata.peer.v1.Peer` service on the agent port, and the attachments
//! the agent's Attach and Detach calls set ([`Attachments`]).
//!
//! Each request is checked before it touches the engine: a grant made by
//! the controller for this volume, naming the node and epoch of the
//! volume's current attachment (recorded durably in the pool, so a
//! restart of this node forgets nothing: an attachment replaced or ended
//! is refused with PERMISSION_DENIED for good), and a length of at most
//! `peer::MAX_IO`.
//!
//! Requests of one attachment are ordered by session as `peer.proto`
//! describes: the first request of a newer session waits until every
//! admitted request of older ones has left the engine ([`Admitted`] is
//! held until the engine call returns, even when the client has gone),
//! and a later request of an older session is refused unexecuted. A new
//! attachment waits the same way for the requests of the one it replaces.
//!
//! Every answer carries this machine's boot ID (`peer::BOOT_HEADER`): a
//! client whose owner rebooted since its last flush knows that writes it
//! had acknowledged may be gone (they lived in the page cache and the
//! state tmpfs), and fails its next flush.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use csi_proto::peer::v1::peer_server::Peer;
use csi_proto::peer::v1::*;
use tonic::{Request, Response, Status};

use crate::engine::{Attachment, VolumeId, ZeroFlags};
use crate::metrics::Metrics;
use crate::peer::{BOOT_HEADER, GrantKey, MAX_IO, MAX_MAP, MOVED_HEADER, SESSION_HEADER};
use crate::rpc::{Core, Started, status};
use crate::tls::{Caller, Callers};

/// The attachments of this node's volumes, and their requests in the
/// engine; shared by the Peer service and the agent.
#[derive(Debug, Default)]
pub struct Attachments {
    fences: Mutex<HashMap<VolumeId, Fence>>,
    /// Serialises Attach and Detach (rare; each writes the catalog).
    changes: tokio::sync::Mutex<()>,
}

/// A volume's attachment as this process knows it.
#[derive(Debug, Default)]
struct Fence {
    attachment: Attachment,
    /// The newest session of the attachment.
    session: u64,
    /// Admitted under the newest session, not finished.
    current: usize,
    /// Admitted under older sessions or attachments, not finished.
    older: usize,
    /// A live move's target and the epoch of its grant (see
    /// [`Attachments::track`]); in memory only.
    mover: Option<(String, u64)>,
}

/// What Attach and Detach ask for.
#[derive(Debug, Clone, Copy)]
enum Change<'a> {
    Attach {
        node: &'a str,
        read_only: bool,
    },
    /// A read-only attachment for a move's copy, only while no other node
    /// has the volume.
    AttachForMove {
        node: &'a str,
    },
    /// "": whichever node has it; with `for_move`, only a move's
    /// attachment.
    Detach {
        node: &'a str,
        for_move: bool,
    },
    /// The rollback of a live move sealed for `node`, a target the
    /// controller forgot, the volume attached again to `reattach` (see
    /// `agent.proto`, AttachRequest.unseal).
    Unseal {
        node: &'a str,
        reattach: &'a str,
        read_only: bool,
    },
    /// The end of a move's copy (see `agent.proto`, Seal).
    Seal {
        node: &'a str,
        epoch: u64,
    },
}

/// One admitted request; dropping it (when the engine call returned)
/// lets a newer session in.
struct Admitted {
    attachments: Arc<Attachments>,
    vid: VolumeId,
    /// `None` for a live move's reads (not ordered with the attachment's).
    key: Option<(u64, u64)>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let Some(key) = self.key else { return };
        let mut fences = self.attachments.fences.lock().expect("fences");
        if let Some(f) = fences.get_mut(&self.vid) {
            if (f.attachment.epoch, f.session) == key {
                f.current -= 1;
            } else {
                f.older -= 1;
            }
        }
    }
}

/// How often a request of a newer session looks whether the older ones
/// have drained (rare: only after a client gave up on a request, or a
/// new attachment).
const DRAIN_POLL: Duration = Duration::from_millis(5);

/// How long Attach waits for the previous attachment's requests.
const DRAIN_LIMIT: Duration = Duration::from_secs(30);

/// Sessions above this are refused: a client that reached it could not
/// start a newer one.
const MAX_SESSION: u64 = u64::MAX / 2;

async fn blocking<T: Send + 'static>(
    started: &Started,
    f: impl FnOnce(&Core) -> crate::engine::Result<T> + Send + 'static,
) -> Result<T, Status> {
    let started = started.clone();
    tokio::task::spawn_blocking(move || f(started.get()?).map_err(status::engine))
        .await
        .map_err(status::join)?
}

impl Attachments {
    /// Makes sure the volume's attachment is loaded from the pool.
    async fn load(self: &Arc<Self>, started: &Started, vid: VolumeId) -> Result<(), Status> {
        if self.fences.lock().expect("fences").contains_key(&vid) {
            return Ok(());
        }
        let attachment = blocking(started, move |core| core.pool.attachment(vid)).await?;
        self.fences
            .lock()
            .expect("fences")
            .entry(vid)
            .or_insert(Fence {
                attachment,
                ..Fence::default()
            });
        Ok(())
    }

    /// Holds off every Attach, Detach and Seal while the guard lives (an
    /// expansion, which a move must not miss).
    pub async fn steady(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.changes.lock().await
    }

    /// Forgets what this process knew of a volume's attachment (the volume
    /// was deleted; a volume of the same ID made later, by a move back to
    /// this node, starts afresh). Not while an Attach, Detach or Seal
    /// runs: those count on the fence they loaded.
    pub async fn forget(&self, vid: VolumeId) {
        let _one = self.changes.lock().await;
        let mut fences = self.fences.lock().expect("fences");
        if fences.get(&vid).is_some_and(|f| f.current + f.older == 0) {
            fences.remove(&vid);
        }
    }

    /// Waits until no request of an older session or attachment is in the
    /// engine, up to `limit`.
    async fn drained(&self, vid: VolumeId, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            let older = self
                .fences
                .lock()
                .expect("fences")
                .get(&vid)
                .map_or(0, |f| f.older);
            if older == 0 {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(DRAIN_POLL).await;
        }
    }

    /// Publishes `vid` to `node`, read-only or not (see `agent.proto`,
    /// Attach); its epoch.
    pub async fn attach(
        self: &Arc<Self>,
        started: &Started,
        vid: VolumeId,
        node: &str,
        read_only: bool,
    ) -> Result<u64, Status> {
        self.change(started, vid, Change::Attach { node, read_only })
            .await
    }

    /// Attaches `vid` to `node` read-only for a move's copy (see
    /// `agent.proto`, Attach with `for_move`); its epoch.
    pub async fn attach_for_move(
        self: &Arc<Self>,
        started: &Started,
        vid: VolumeId,
        node: &str,
    ) -> Result<u64, Status> {
        self.change(started, vid, Change::AttachForMove { node })
            .await
    }

    /// Marks `vid` moved to `node` if the move's attachment (`epoch`) is
    /// still current (see `agent.proto`, Seal).
    pub async fn seal(
        self: &Arc<Self>,
        started: &Started,
        vid: VolumeId,
        node: &str,
        epoch: u64,
    ) -> Result<u64, Status> {
        self.change(started, vid, Change::Seal { node, epoch })
            .await
    }

    /// The live move of `vid` under way in this process, if any.
    pub fn mover(&self, vid: VolumeId) -> Option<(String, u64)> {
        self.fences.lock().expect("fences").get(&vid)?.mover.clone()
    }

    /// Starts (or finds) a live move of `vid` to `node` (see `agent.proto`,
    /// Track): the move's epoch and the volume's attachment now.
    pub async fn track(
        self: &Arc<Self>,
        started: &Started,
        vid: VolumeId,
        node: &str,
        peek: bool,
    ) -> Result<(u64, Attachment), Status> {
        let _one = self.changes.lock().await;
        self.load(started, vid).await?;
        let (now, mover) = {
            let fences = self.fences.lock().expect("fences");
            let f = &fences[&vid];
            (f.attachment.clone(), f.mover.clone())
        };
        if now.moved && now.live {
            if now.node == node {
                return Ok((0, now));
            }
            return Err(Status::failed_precondition(format!(
                "volume {vid} moved to node {}: this node no longer serves it",
                now.node
            )));
        }
        // Copied (or sealed) for a move of the unused volume: the caller
        // sees `for_move`.
        if now.for_move || peek {
            return Ok((0, now));
        }
        match mover {
            Some((n, epoch)) if n == node => return Ok((epoch, now)),
            Some((n, _)) => {
                return Err(Status::failed_precondition(format!(
                    "volume {vid} is moving to node {n}"
                )));
            }
            None => {}
        }
        let (lost, vol) = blocking(started, move |core| {
            Ok((core.pool.volume_fault(vid)?, core.pool.volume(vid)?))
        })
        .await?;
        if let Some(why) = lost {
            return Err(Status::failed_precondition(format!(
                "volume {vid} lost data ({why}): acknowledge it (strata volume \
                 acknowledge-loss) before moving it"
            )));
        }
        if vol.fetching() {
            return Err(Status::failed_precondition(format!(
                "volume {vid} is still being fetched from another node"
            )));
        }
        // Far above any attachment's epoch: a move's grant is never taken
        // for an attachment's.
        let epoch = (1 << 62) | (crate::engine::pool::now_ns() >> 2);
        vol.track_changes();
        self.fences
            .lock()
            .expect("fences")
            .get_mut(&vid)
            .expect("loaded")
            .mover = Some((node.to_string(), epoch));
        tracing::info!(volume = %vid, to = node, "a live move began: changes are recorded");
        Ok((epoch, now))
    }

    /// Holds the writes of `vid` for the live move (`node`, `epoch`) until
    /// its seal, or `deadline` (see `agent.proto`, Hold).
    pub async fn hold(
        self: &Arc<Self>,
        started: &Started,
        vid: VolumeId,
        node: &str,
        epoch: u64,
        deadline: Duration,
    ) -> Result<(), Status> {
        self.load(started, vid).await?;
        if self.mover(vid) != Some((node.to_string(), epoch)) {
            return Err(Status::failed_precondition(format!(
                "volume {vid} is not moving live to node {node} under epoch {epoch}"
            )));
        }
        // Not under `changes`: a long drain holds up no other volume.
        let held = blocking(started, move |core| {
            Ok(core.pool.volume(vid)?.hold_writes(deadline))
        })
        .await?;
        if !held {
            return Err(Status::failed_precondition(format!(
                "volume {vid}: the writes in flight did not finish within the hold's deadline \
                 ({} ms)",
                deadline.as_millis()
            )));
        }
        Ok(())
    }

    /// The seal of the live move (`node`, `epoch`) while its hold lasts
    /// (see `agent.proto`, Seal): how long the hold lasted (`None`: it was
    /// sealed before), and the boot ID kept with the seal.
    pub async fn seal_live(
        self: &Arc<Self>,
        started: &Started,
        vid: VolumeId,
        node: &str,
        epoch: u64,
    ) -> Result<(Option<Duration>, String), Status> {
        let _one = self.changes.lock().await;
        self.load(started, vid).await?;
        let now = self.fences.lock().expect("fences")[&vid].attachment.clone();
        if now.moved && now.live && now.node == node {
            return Ok((None, now.sealed_boot));
        }
        if self.mover(vid) != Some((node.to_string(), epoch)) {
            return Err(Status::failed_precondition(format!(
                "volume {vid} is not moving live to node {node} under epoch {epoch}"
            )));
        }
        let sealed = Attachment {
            node: node.to_string(),
            epoch: now.epoch + 1,
            read_only: true,
            for_move: true,
            moved: true,
            live: true,
            repointed: false,
            sealed_boot: crate::peer::boot_id(),
        };
        let (durable, to) = (sealed.clone(), node.to_string());
        let held = blocking(started, move |core| {
            // A copy must not make a volume that lost data look whole.
            if let Some(why) = core.pool.volume_fault(vid)? {
                return Ok(Err(format!(
                    "volume {vid} lost data during the move ({why})"
                )));
            }
            let vol = core.pool.volume(vid)?;
            Ok(vol
                .retire_held(&to, || core.pool.set_attachment(vid, &durable))?
                .map_err(|why| format!("volume {vid} is not sealed: {why}; the move copies on")))
        })
        .await?
        .map_err(Status::failed_precondition)?;
        let mut fences = self.fences.lock().expect("fences");
        let f = fences.get_mut(&vid).expect("loaded");
        f.session = 0;
        f.older += std::mem::take(&mut f.current);
        let boot = sealed.sealed_boot.clone();
        f.attachment = sealed;
        f.mover = None;
        tracing::info!(volume = %vid, to = node, hold_ms = held.as_millis() as u64, "a live move sealed this copy: the volume is the target's");
        Ok((Some(held), boot))
    }

    /// Ends the attachment of `node`, if it has it ("": whichever node);
    /// with `for_move`, only if it is a move's.
    pub async fn detach(
        self: &Arc<Self>,
        started: &Started,
        vid: VolumeId,
        node: &str,
        for_move: bool,
    ) -> Result<u64, Status> {
        self.change(started, vid, Change::Detach { node, for_move })
            .await
    }

    /// Undoes the seal of a live move to `node` (its target, forgotten
    /// by the controller before the move switched): the volume is this
    /// node's again, attached to `reattach` ("": none). Nothing to do if
    /// it is not sealed for `node`.
    pub async fn unseal(
        self: &Arc<Self>,
        started: &Started,
        vid: VolumeId,
        node: &str,
        reattach: &str,
        read_only: bool,
    ) -> Result<u64, Status> {
        let change = Change::Unseal {
            node,
            reattach,
            read_only,
        };
        self.change(started, vid, change).await
    }

    async fn change(
        self: &Arc<Self>,
        started: &Started,
        vid: VolumeId,
        change: Change<'_>,
    ) -> Result<u64, Status> {
        let _one = self.changes.lock().await;
        self.load(started, vid).await?;
        // A rollback ends a live move (in memory: its grant, change record
        // and hold).
        if let Change::Detach {
            node,
            for_move: true,
        } = change
        {
            let ended = {
                let mut fences = self.fences.lock().expect("fences");
                let f = fences.get_mut(&vid).expect("loaded");
                let ends = f.mover.as_ref().is_some_and(|(n, _)| n == node);
                if ends {
                    f.mover = None;
                }
                ends
            };
            if ended {
                blocking(started, move |core| {
                    let vol = core.pool.volume(vid)?;
                    vol.release_writes();
                    vol.untrack_changes();
                    Ok(())
                })
                .await?;
                tracing::info!(volume = %vid, to = node, "a live move was rolled back");
            }
        }
        let now = self.fences.lock().expect("fences")[&vid].attachment.clone();
        // A copy must not make a volume that lost data look whole.
        if matches!(change, Change::AttachForMove { .. }) && now.node.is_empty() {
            let lost = blocking(started, move |core| core.pool.volume_fault(vid)).await?;
            if let Some(why) = lost {
                return Err(Status::failed_precondition(format!(
                    "volume {vid} lost data ({why}): acknowledge it (strata volume \
                     acknowledge-loss) before moving it"
                )));
            }
        }
        let next = match change {
            // A moved volume keeps its last attachment for good.
            Change::AttachForMove { node } if now.moved && now.node == node => None,
            Change::Seal { node, epoch } if now.moved && now.node == node && now.epoch == epoch => {
                None
            }
            Change::Unseal {
                node,
                reattach,
                read_only,
            } if now.moved && now.live && now.node == node => {
                tracing::warn!(volume = %vid, to = node, attached = reattach, "a live move's seal is undone: its target was forgotten before the switch; this copy is the volume again");
                Some(Attachment {
                    node: reattach.to_string(),
                    epoch: now.epoch + 1,
                    read_only: read_only && !reattach.is_empty(),
                    repointed: !reattach.is_empty(),
                    ..Attachment::default()
                })
            }
            Change::Unseal { .. } => None,
            // Rolling back a move before its switch: the target's copy never
            // served a write, so this copy is the volume again.
            // A live move's seal is final: the target may hold writes.
            Change::Detach { for_move: true, .. } if now.moved && now.live => {
                return Err(Status::failed_precondition(format!(
                    "volume {vid} moved live to node {}: the move goes on, it is not rolled \
                     back",
                    now.node
                )));
            }
            Change::Detach {
                node,
                for_move: true,
            } if now.moved && now.node == node => Some(Attachment {
                node: String::new(),
                epoch: now.epoch + 1,
                ..Attachment::default()
            }),
            Change::Detach { .. } if now.moved => None,
            Change::Attach { .. } | Change::AttachForMove { .. } | Change::Seal { .. }
                if now.moved =>
            {
                return Err(Status::failed_precondition(format!(
                    "volume {vid} moved to node {}: this node no longer serves it",
                    now.node
                )));
            }
            Change::Attach { node, read_only } if now.node == node && !now.for_move => {
                if now.read_only != read_only {
                    return Err(Status::already_exists(format!(
                        "volume {vid} is published to node {node} {} already",
                        if now.read_only {
                            "read-only"
                        } else {
                            "read-write"
                        }
                    )));
                }
                None
            }
            Change::Attach { node, read_only } => Some(Attachment {
                node: node.to_string(),
                epoch: now.epoch + 1,
                read_only,
                ..Attachment::default()
            }),
            Change::AttachForMove { node } if now.node == node && now.for_move => None,
            Change::AttachForMove { node } if now.node.is_empty() => Some(Attachment {
                node: node.to_string(),
                epoch: now.epoch + 1,
                read_only: true,
                for_move: true,
                ..Attachment::default()
            }),
            Change::AttachForMove { .. } => {
                return Err(Status::failed_precondition(format!(
                    "volume {vid} is published to node {}: a pod uses it, and only volumes \
                     no node has published move",
                    now.node
                )));
            }
            Change::Seal { node, epoch }
                if now.for_move && now.node == node && now.epoch == epoch =>
            {
                Some(Attachment {
                    moved: true,
                    repointed: false,
                    ..now.clone()
                })
            }
            Change::Seal { node, epoch } => {
                return Err(Status::failed_precondition(format!(
                    "volume {vid} was published to node {:?} (epoch {}) after the move to node \
                     {node} (epoch {epoch}) began: the copy may be stale",
                    now.node, now.epoch
                )));
            }
            // An unpublish never ends a move's attachment, nor a rollback a
            // publish.
            Change::Detach { node, for_move }
                if now.node.is_empty()
                    || (!node.is_empty() && now.node != node)
                    || for_move != now.for_move =>
            {
                None
            }
            Change::Detach { .. } => Some(Attachment {
                node: String::new(),
                epoch: now.epoch + 1,
                ..Attachment::default()
            }),
        };
        if let Some(next) = next {
            let durable = next.clone();
            // A move's attachment and seal need the volume unused here.
            let exclusive = matches!(change, Change::AttachForMove { .. } | Change::Seal { .. });
            let started = started.clone();
            tokio::task::spawn_blocking(move || {
                let core: &Core = started.get()?;
                let put = || core.pool.set_attachment(vid, &durable);
                match &core.node {
                    Some(node) if exclusive => node.unstaged(vid, put).map_err(status::node),
                    _ => put().map_err(status::engine),
                }
            })
            .await
            .map_err(status::join)??;
            let mut fences = self.fences.lock().expect("fences");
            let f = fences.get_mut(&vid).expect("loaded");
            // Sealing keeps the epoch, and with it the move's requests.
            if f.attachment.epoch != next.epoch {
                f.session = 0;
                f.older += std::mem::take(&mut f.current);
            }
            f.attachment = next;
        }
        // Also when unchanged: a retried call answers only once the
        // previous attachment's requests are done.
        if !self.drained(vid, DRAIN_LIMIT).await {
            return Err(Status::unavailable(format!(
                "volume {vid}: requests of its previous attachment are still running after {} s",
                DRAIN_LIMIT.as_secs()
            )));
        }
        Ok(self.fences.lock().expect("fences")[&vid].attachment.epoch)
    }
}

/// The Peer service of this node.
#[derive(Debug, Clone)]
pub struct PeerService {
    started: Started,
    key: GrantKey,
    callers: Callers,
    metrics: Arc<Metrics>,
    attachments: Arc<Attachments>,
    boot: tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
}

impl PeerService {
    pub fn new(
        started: Started,
        key: GrantKey,
        callers: Callers,
        metrics: Arc<Metrics>,
        attachments: Arc<Attachments>,
    ) -> Self {
        let boot = crate::peer::boot_id()
            .parse()
            .unwrap_or_else(|_| tonic::metadata::MetadataValue::from_static("unknown"));
        PeerService {
            started,
            key,
            callers,
            metrics,
            attachments,
            boot,
        }
    }

    /// An answer, with this machine's boot ID.
    fn reply<T>(&self, msg: T) -> Response<T> {
        let mut r = Response::new(msg);
        r.metadata_mut().insert(BOOT_HEADER, self.boot.clone());
        r
    }

    /// Checks the grant (and that `caller` is the node it names) against
    /// the volume's attachment (and that a request that `writes` has a
    /// read-write one), and waits until the request may run.
    async fn admit(
        &self,
        caller: &Caller,
        grant: Option<&Grant>,
        writes: bool,
    ) -> Result<Admitted, Status> {
        let g = grant.ok_or_else(|| Status::unauthenticated("the request carries no grant"))?;
        // The caller first: a name check costs less than a signature's.
        self.callers.node(caller, &g.node_id)?;
        self.key
            .check(Some(g), &g.volume_id)
            .map_err(status::grant)?;
        let vid: VolumeId = g
            .volume_id
            .parse()
            .map_err(|_| Status::invalid_argument(format!("volume {:?}", g.volume_id)))?;
        if g.session > MAX_SESSION {
            return Err(Status::invalid_argument(format!(
                "session {} is above {MAX_SESSION}",
                g.session
            )));
        }
        loop {
            self.attachments.load(&self.started, vid).await?;
            {
                let mut fences = self.attachments.fences.lock().expect("fences");
                // Forgotten meanwhile (a delete, or a move's new copy of
                // the volume): loaded again, or NOT_FOUND.
                let Some(f) = fences.get_mut(&vid) else {
                    continue;
                };
                if f.mover.as_ref() == Some(&(g.node_id.clone(), g.epoch)) && g.read_only {
                    if writes {
                        return Err(Status::failed_precondition(format!(
                            "volume {vid}: a move's grant only reads; not executed"
                        )));
                    }
                    return Ok(Admitted {
                        attachments: Arc::clone(&self.attachments),
                        vid,
                        key: None,
                    });
                }
                let a = &f.attachment;
                if a.moved && a.live {
                    return Err(moved(vid, &a.node));
                }
                // Attached again by an undone seal: this node's older
                // grants wait (as moved) for it to follow with the new one.
                if a.repointed && a.node == g.node_id && g.epoch < a.epoch {
                    let mut s = Status::unavailable(format!(
                        "volume {vid}: a move was rolled back and node {} attached again under \
                         epoch {}; not executed (the attachment follows it)",
                        a.node, a.epoch
                    ));
                    s.metadata_mut().insert(
                        MOVED_HEADER,
                        tonic::metadata::MetadataValue::from_static("here"),
                    );
                    return Err(s);
                }
                if a.node != g.node_id || a.epoch != g.epoch {
                    return Err(Status::permission_denied(format!(
                        "volume {vid} is not published to node {} under epoch {} (its \
                         attachment: {}, epoch {}): this attachment is fenced off",
                        g.node_id,
                        g.epoch,
                        if a.node.is_empty() { "none" } else { &a.node },
                        a.epoch
                    )));
                }
                if a.read_only != g.read_only {
                    return Err(Status::permission_denied(format!(
                        "volume {vid} is published to node {} {} under epoch {}; the grant \
                         says otherwise",
                        g.node_id,
                        if a.read_only {
                            "read-only"
                        } else {
                            "read-write"
                        },
                        a.epoch
                    )));
                }
                if writes && g.read_only {
                    return Err(Status::failed_precondition(format!(
                        "volume {vid} is published to node {} read-only; not executed",
                        g.node_id
                    )));
                }
                // The node attached again by an undone seal uses its new
                // grant: it followed (in memory only: after a restart, its
                // next request clears it again).
                f.attachment.repointed = false;
                if g.session < f.session {
                    let mut s = Status::aborted(format!(
                        "session {} of this attachment was replaced by session {}; not executed",
                        g.session, f.session
                    ));
                    s.metadata_mut().insert(
                        SESSION_HEADER,
                        f.session.to_string().parse().expect("ascii"),
                    );
                    return Err(s);
                }
                if g.session > f.session {
                    f.session = g.session;
                    f.older += std::mem::take(&mut f.current);
                }
                if f.older == 0 {
                    f.current += 1;
                    return Ok(Admitted {
                        attachments: Arc::clone(&self.attachments),
                        vid,
                        key: Some((g.epoch, g.session)),
                    });
                }
            }
            tokio::time::sleep(DRAIN_POLL).await;
        }
    }

    /// Runs engine work for the volume on the blocking pool (work that
    /// `writes` needs a read-write grant).
    async fn on_volume<T: Send + 'static>(
        &self,
        caller: &Caller,
        grant: Option<&Grant>,
        writes: bool,
        f: impl FnOnce(&crate::engine::Volume) -> crate::engine::Result<T> + Send + 'static,
    ) -> Result<T, Status> {
        let admitted = self.admit(caller, grant, writes).await?;
        let started = self.started.clone();
        tokio::task::spawn_blocking(move || execute(&started, admitted, f))
            .await
            .map_err(status::join)?
    }

    /// [`Self::on_volume`] on the calling thread, which may block (a data
    /// lane's, `super::lane`): the request is admitted on `runtime`. Unlike
    /// an RPC's, a lane's wait is not cancelled when its client leaves, so
    /// a request of a newer session waits for the older ones for at most
    /// [`DRAIN_LIMIT`], then is answered UNAVAILABLE, unexecuted (its client
    /// retries), and the lane is free again.
    pub(crate) fn on_volume_here<T>(
        &self,
        runtime: &tokio::runtime::Handle,
        caller: &Caller,
        grant: Option<&Grant>,
        writes: bool,
        f: impl FnOnce(&crate::engine::Volume) -> crate::engine::Result<T>,
    ) -> Result<T, Status> {
        let admit =
            async { tokio::time::timeout(DRAIN_LIMIT, self.admit(caller, grant, writes)).await };
        let admitted = runtime.block_on(admit).map_err(|_| {
            Status::unavailable(format!(
                "the volume's earlier requests did not end within {} s; not executed",
                DRAIN_LIMIT.as_secs()
            ))
        })??;
        execute(&self.started, admitted, f)
    }

    /// Counts volume data sent to or received from `peer`.
    pub(crate) fn count(&self, grant: Option<&Grant>, sent: bool, bytes: usize) {
        let peer = grant.map_or("", |g| g.node_id.as_str());
        self.metrics.peer_bytes(peer, sent, bytes as u64);
    }
}

/// Engine work for an admitted request.
fn execute<T>(
    started: &Started,
    admitted: Admitted,
    f: impl FnOnce(&crate::engine::Volume) -> crate::engine::Result<T>,
) -> Result<T, Status> {
    let core: &Core = started.get()?;
    let v = core.pool.volume(admitted.vid).map_err(status::engine)?;
    // A live move's reads are the node's work, not the volume's user's:
    // not charged to its I/O limits.
    let run = || f(&v);
    let r = if admitted.key.is_none() {
        crate::engine::qos::exempt(run)
    } else {
        run()
    };
    // Held by a live move's hold, then refused by its seal.
    let r = r.map_err(|e| match e {
        crate::engine::Error::Moved { volume, node } => moved(volume, &node),
        e => status::engine(e),
    });
    drop(admitted);
    r
}

/// A read of `len` bytes at `offset` (the RPC's and a data lane's).
pub(crate) fn read_op(
    offset: u64,
    len: u32,
) -> Result<impl FnOnce(&crate::engine::Volume) -> crate::engine::Result<Vec<u8>>, Status> {
    let len = io_len(u64::from(len))?;
    Ok(move |v: &crate::engine::Volume| {
        let mut buf = vec![0u8; len];
        v.read(offset, &mut buf)?;
        Ok(buf)
    })
}

/// A write of `data` at `offset` (the RPC's and a data lane's).
pub(crate) fn write_op(
    offset: u64,
    data: Vec<u8>,
    fua: bool,
) -> Result<impl FnOnce(&crate::engine::Volume) -> crate::engine::Result<()>, Status> {
    io_len(data.len() as u64)?;
    Ok(move |v: &crate::engine::Volume| v.write(offset, &data, fua))
}

/// The refusal of a request for a volume that moved away live, naming
/// its new owner (`peer.proto`).
fn moved(vid: VolumeId, node: &str) -> Status {
    let mut s = Status::unavailable(format!(
        "volume {vid} moved to node {node}; not executed (the attachment follows it)"
    ));
    if let Ok(v) = node.parse() {
        s.metadata_mut().insert(MOVED_HEADER, v);
    }
    s
}

pub(crate) fn io_len(len: u64) -> Result<usize, Status> {
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
        let caller = Caller::of(&req);
        let req = req.into_inner();
        let size = self
            .on_volume(&caller, req.grant.as_ref(), false, |v| Ok(v.size()))
            .await?;
        Ok(self.reply(OpenReply { size_bytes: size }))
    }

    async fn read(&self, req: Request<ReadRequest>) -> Result<Response<ReadReply>, Status> {
        let caller = Caller::of(&req);
        let req = req.into_inner();
        let read = read_op(req.offset, req.length)?;
        let data = self
            .on_volume(&caller, req.grant.as_ref(), false, read)
            .await?;
        self.count(req.grant.as_ref(), true, data.len());
        Ok(self.reply(ReadReply { data }))
    }

    async fn write(&self, req: Request<WriteRequest>) -> Result<Response<Done>, Status> {
        let caller = Caller::of(&req);
        let req = req.into_inner();
        let len = req.data.len();
        let write = write_op(req.offset, req.data, req.fua)?;
        self.on_volume(&caller, req.grant.as_ref(), true, write)
            .await?;
        self.count(req.grant.as_ref(), false, len);
        Ok(self.reply(Done {}))
    }

    async fn flush(&self, req: Request<FlushRequest>) -> Result<Response<Done>, Status> {
        let caller = Caller::of(&req);
        let req = req.into_inner();
        self.on_volume(&caller, req.grant.as_ref(), false, |v| v.flush())
            .await?;
        Ok(self.reply(Done {}))
    }

    async fn trim(&self, req: Request<RangeRequest>) -> Result<Response<Done>, Status> {
        let caller = Caller::of(&req);
        let req = req.into_inner();
        self.on_volume(&caller, req.grant.as_ref(), true, move |v| {
            v.trim(req.offset, req.length)
        })
        .await?;
        Ok(self.reply(Done {}))
    }

    async fn zero(&self, req: Request<ZeroRequest>) -> Result<Response<Done>, Status> {
        let caller = Caller::of(&req);
        let req = req.into_inner();
        let flags = ZeroFlags {
            no_hole: !req.may_trim,
            fast: req.fast,
        };
        self.on_volume(&caller, req.grant.as_ref(), true, move |v| {
            v.write_zeroes(req.offset, req.length, flags)
        })
        .await?;
        Ok(self.reply(Done {}))
    }

    async fn map(&self, req: Request<RangeRequest>) -> Result<Response<MapReply>, Status> {
        let caller = Caller::of(&req);
        let req = req.into_inner();
        if req.length > MAX_MAP {
            return Err(Status::invalid_argument(format!(
                "a map of {} bytes; at most {MAX_MAP}",
                req.length
            )));
        }
        let data = self
            .on_volume(&caller, req.grant.as_ref(), false, move |v| {
                let mut at = req.offset;
                let mut data = Vec::new();
                for e in v.block_status(req.offset, req.length)? {
                    if !e.zero {
                        data.push(Extent {
                            offset: at,
                            length: e.len,
                        });
                    }
                    at += e.len;
                }
                Ok(data)
            })
            .await?;
        Ok(self.reply(MapReply { data }))
    }

    async fn changes(
        &self,
        req: Request<ChangesRequest>,
    ) -> Result<Response<ChangesReply>, Status> {
        let caller = Caller::of(&req);
        let req = req.into_inner();
        let grant = req
            .grant
            .ok_or_else(|| Status::unauthenticated("the request carries no grant"))?;
        // Whether the volume moves, and where, only to the node the
        // grant (checked again when admitted) names.
        self.callers.node(&caller, &grant.node_id)?;
        self.key
            .check(Some(&grant), &grant.volume_id)
            .map_err(status::grant)?;
        let vid: VolumeId = grant
            .volume_id
            .parse()
            .map_err(|_| Status::invalid_argument(format!("volume {:?}", grant.volume_id)))?;
        let mover = self.attachments.mover(vid);
        if mover != Some((grant.node_id.clone(), grant.epoch)) {
            return Err(Status::permission_denied(format!(
                "volume {vid} is not moving live to node {} under epoch {}",
                grant.node_id, grant.epoch
            )));
        }
        let (max, confirmed) = ((req.max as usize).clamp(1, MAX_CHANGES), req.confirmed);
        let taken = self
            .on_volume(&caller, Some(&grant), false, move |v| {
                Ok(v.take_changes(confirmed, max))
            })
            .await?;
        let Some((batch, ranges)) = taken else {
            return Err(Status::failed_precondition(format!(
                "volume {vid} does not record its changes (this node restarted?)"
            )));
        };
        crate::engine::jobs::failpoint::hit("agent::changes::taken");
        let data = ranges
            .into_iter()
            .map(|(offset, length)| Extent { offset, length })
            .collect();
        Ok(self.reply(ChangesReply { batch, data }))
    }
}

/// Ranges one Changes answer carries at most.
const MAX_CHANGES: usize = 1 << 16;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Pool, PoolOptions};

    fn started(dir: &std::path::Path) -> (Started, VolumeId) {
        let pool = Pool::open(dir, PoolOptions::default()).unwrap();
        let vid = pool.create_volume(1 << 20).unwrap().id;
        let started = Started::default();
        started.set(Core { pool, node: None });
        (started, vid)
    }

    fn service(started: &Started) -> PeerService {
        PeerService::new(
            started.clone(),
            GrantKey::from_secret(b"test"),
            Callers::default(),
            crate::metrics::Metrics::new(),
            Arc::new(Attachments::default()),
        )
    }

    fn grant(vid: VolumeId, node: &str, epoch: u64, session: u64) -> Grant {
        let mut g = GrantKey::from_secret(b"test")
            .make(&vid.to_string(), node, epoch, false)
            .unwrap();
        g.session = session;
        g
    }

    /// Only the node the volume is published to, under its epoch, gets in;
    /// publishing elsewhere, to the owner itself, or unpublishing fences it
    /// off, also for a process that loads the attachment anew from the
    /// pool; publishing to the same node again keeps its epoch.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_the_current_attachment_gets_in_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let (st, vid) = started(dir.path());
        let s = service(&st);
        let denied = |r: Result<Admitted, Status>| r.map(drop).unwrap_err().code();
        // Published nowhere yet.
        assert_eq!(
            denied(
                s.admit(&Caller::default(), Some(&grant(vid, "n1", 0, 0)), false)
                    .await
            ),
            tonic::Code::PermissionDenied
        );
        let e1 = s.attachments.attach(&st, vid, "n1", false).await.unwrap();
        assert_eq!(
            s.attachments.attach(&st, vid, "n1", false).await.unwrap(),
            e1
        );
        s.admit(&Caller::default(), Some(&grant(vid, "n1", e1, 0)), false)
            .await
            .map(drop)
            .unwrap();
        // Another node's grant, or a forged epoch, never.
        for (node, epoch) in [("n2", e1), ("n1", e1 + 1)] {
            assert_eq!(
                denied(
                    s.admit(&Caller::default(), Some(&grant(vid, node, epoch, 0)), false)
                        .await
                ),
                tonic::Code::PermissionDenied
            );
        }
        // Published to n2: n1 is fenced off, also after a restart.
        let e2 = s.attachments.attach(&st, vid, "n2", false).await.unwrap();
        assert!(e2 > e1);
        let again = service(&st);
        assert_eq!(
            denied(
                again
                    .admit(&Caller::default(), Some(&grant(vid, "n1", e1, 0)), false)
                    .await
            ),
            tonic::Code::PermissionDenied
        );
        again
            .admit(&Caller::default(), Some(&grant(vid, "n2", e2, 0)), false)
            .await
            .map(drop)
            .unwrap();
        // Unpublishing another node changes nothing; unpublishing n2 ends
        // it; so does publishing to the owner itself.
        again
            .attachments
            .detach(&st, vid, "n9", false)
            .await
            .unwrap();
        again
            .admit(&Caller::default(), Some(&grant(vid, "n2", e2, 0)), false)
            .await
            .map(drop)
            .unwrap();
        again
            .attachments
            .detach(&st, vid, "n2", false)
            .await
            .unwrap();
        assert_eq!(
            denied(
                again
                    .admit(&Caller::default(), Some(&grant(vid, "n2", e2, 0)), false)
                    .await
            ),
            tonic::Code::PermissionDenied
        );
        let e3 = again
            .attachments
            .attach(&st, vid, "n2", false)
            .await
            .unwrap();
        again
            .attachments
            .attach(&st, vid, "owner", false)
            .await
            .unwrap();
        assert_eq!(
            denied(
                again
                    .admit(&Caller::default(), Some(&grant(vid, "n2", e3, 0)), false)
                    .await
            ),
            tonic::Code::PermissionDenied
        );
        // A bad MAC never gets in; nor a session past the limit.
        let e4 = again
            .attachments
            .attach(&st, vid, "n3", false)
            .await
            .unwrap();
        let mut forged = grant(vid, "n3", e4, 0);
        forged.mac[0] ^= 1;
        assert_eq!(
            denied(again.admit(&Caller::default(), Some(&forged), false).await),
            tonic::Code::PermissionDenied
        );
        assert_eq!(
            denied(
                again
                    .admit(
                        &Caller::default(),
                        Some(&grant(vid, "n3", e4, u64::MAX)),
                        false
                    )
                    .await
            ),
            tonic::Code::InvalidArgument
        );
    }

    /// A live move's seal undone (its target forgotten before the
    /// switch): only a seal for that target is; the volume is attached to
    /// the node that used it again under a new epoch, whose older grants
    /// are answered as moved (they wait) until its new grant is used, and
    /// the volume serves again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_undone_seal_attaches_the_user_again_and_its_older_grants_wait() {
        let dir = tempfile::tempdir().unwrap();
        let (st, vid) = started(dir.path());
        let s = service(&st);
        let e1 = s.attachments.attach(&st, vid, "n1", false).await.unwrap();
        // Sealed for n3 by a live move (as a restarted process finds it).
        let pool = &st.get().unwrap().pool;
        let sealed = Attachment {
            node: "n3".into(),
            epoch: e1 + 1,
            read_only: true,
            for_move: true,
            moved: true,
            live: true,
            ..Attachment::default()
        };
        let v = pool.volume(vid).unwrap();
        pool.set_attachment(vid, &sealed).unwrap();
        assert!(matches!(
            v.write(0, &[5u8; 4096], false),
            Err(crate::engine::Error::Moved { .. })
        ));
        let s = service(&st);
        let moved = |r: Result<Admitted, Status>| {
            let e = r.map(drop).unwrap_err();
            (e.code(), e.metadata().get(MOVED_HEADER).is_some())
        };
        let waits = (tonic::Code::Unavailable, true);
        assert_eq!(
            moved(
                s.admit(&Caller::default(), Some(&grant(vid, "n1", e1, 0)), false)
                    .await
            ),
            waits
        );
        // For another target: nothing changes.
        s.attachments
            .unseal(&st, vid, "n4", "n1", false)
            .await
            .unwrap();
        assert_eq!(pool.attachment(vid).unwrap(), sealed);
        let e2 = s
            .attachments
            .unseal(&st, vid, "n3", "n1", false)
            .await
            .unwrap();
        assert!(e2 > e1 + 1);
        let now = pool.attachment(vid).unwrap();
        assert!(now.node == "n1" && now.repointed && !now.moved, "{now:?}");
        // Again: the same.
        assert_eq!(
            s.attachments
                .unseal(&st, vid, "n3", "n1", false)
                .await
                .unwrap(),
            e2
        );
        // n1's old grant waits, another node's is fenced off, the new one
        // gets in, and then n1 counts as followed.
        assert_eq!(
            moved(
                s.admit(&Caller::default(), Some(&grant(vid, "n1", e1, 0)), false)
                    .await
            ),
            waits
        );
        assert_eq!(
            moved(
                s.admit(&Caller::default(), Some(&grant(vid, "n2", e1, 0)), false)
                    .await
            ),
            (tonic::Code::PermissionDenied, false)
        );
        let (_, before) = s.attachments.track(&st, vid, "n3", true).await.unwrap();
        assert!(before.repointed);
        s.admit(&Caller::default(), Some(&grant(vid, "n1", e2, 1)), true)
            .await
            .map(drop)
            .unwrap();
        let (_, after) = s.attachments.track(&st, vid, "n3", true).await.unwrap();
        assert!(!after.repointed && after.node == "n1", "{after:?}");
        v.write(0, &[5u8; 4096], false).unwrap();
    }

    /// A move's attachment: only while no node has the volume, read-only,
    /// replaced by any publish (and then its seal fails); sealed, the
    /// volume is never attached again, also after a restart, but the
    /// move's reads go on; a retried attach or seal answers the same.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_move_attaches_only_an_idle_volume_and_its_seal_keeps_everyone_out() {
        let dir = tempfile::tempdir().unwrap();
        let (st, vid) = started(dir.path());
        let s = service(&st);
        let a = &s.attachments;
        let code = |r: Result<u64, Status>| r.unwrap_err().code();
        // Published to n1: no move.
        let e1 = a.attach(&st, vid, "n1", false).await.unwrap();
        assert_eq!(
            code(a.attach_for_move(&st, vid, "n2").await),
            tonic::Code::FailedPrecondition
        );
        a.detach(&st, vid, "n1", false).await.unwrap();
        // A volume that lost data moves only once that is acknowledged.
        let pool = &st.get().unwrap().pool;
        pool.shared()
            .record_fault(vid, crate::engine::catalog::FaultKind::DataLost, "a test")
            .unwrap();
        let e = a.attach_for_move(&st, vid, "n2").await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
        assert!(e.message().contains("acknowledge"), "{e:?}");
        pool.acknowledge_loss(vid).unwrap();
        let m = a.attach_for_move(&st, vid, "n2").await.unwrap();
        assert!(m > e1);
        assert_eq!(a.attach_for_move(&st, vid, "n2").await.unwrap(), m);
        let ro = |node: &str, epoch| {
            let mut g = GrantKey::from_secret(b"test")
                .make(&vid.to_string(), node, epoch, true)
                .unwrap();
            g.session = 1;
            g
        };
        s.admit(&Caller::default(), Some(&ro("n2", m)), false)
            .await
            .map(drop)
            .unwrap();
        assert_eq!(
            s.admit(&Caller::default(), Some(&grant(vid, "n2", m, 1)), true)
                .await
                .map(drop)
                .unwrap_err()
                .code(),
            tonic::Code::PermissionDenied,
            "a read-write grant for a move's attachment"
        );
        // A publish slips in: it replaces the move's attachment, whose
        // seal then fails; so does a seal of another epoch or node.
        let e2 = a.attach(&st, vid, "n3", false).await.unwrap();
        assert_eq!(
            code(a.seal(&st, vid, "n2", m).await),
            tonic::Code::FailedPrecondition
        );
        a.detach(&st, vid, "n3", false).await.unwrap();
        // A publish to the move's target is not the move's attachment.
        let e3 = a.attach(&st, vid, "n2", true).await.unwrap();
        assert!(e3 > e2);
        // Rolling a move back never ends a publish.
        assert_eq!(a.detach(&st, vid, "n2", true).await.unwrap(), e3);
        assert_eq!(st.get().unwrap().pool.attachment(vid).unwrap().node, "n2");
        assert_eq!(
            code(a.attach_for_move(&st, vid, "n2").await),
            tonic::Code::FailedPrecondition
        );
        a.detach(&st, vid, "n2", false).await.unwrap();
        let m2 = a.attach_for_move(&st, vid, "n2").await.unwrap();
        for (node, epoch) in [("n2", m), ("n3", m2)] {
            assert_eq!(
                code(a.seal(&st, vid, node, epoch).await),
                tonic::Code::FailedPrecondition
            );
        }
        assert_eq!(a.seal(&st, vid, "n2", m2).await.unwrap(), m2);
        assert_eq!(a.seal(&st, vid, "n2", m2).await.unwrap(), m2);
        // Sealed: reads of the move go on; nobody attaches, also after a
        // restart; unpublishing changes nothing.
        let again = service(&st);
        again
            .admit(&Caller::default(), Some(&ro("n2", m2)), false)
            .await
            .map(drop)
            .unwrap();
        let b = &again.attachments;
        for node in ["n1", "n2"] {
            for read_only in [false, true] {
                assert_eq!(
                    code(b.attach(&st, vid, node, read_only).await),
                    tonic::Code::FailedPrecondition
                );
            }
        }
        assert_eq!(
            code(b.attach_for_move(&st, vid, "n3").await),
            tonic::Code::FailedPrecondition
        );
        assert_eq!(b.attach_for_move(&st, vid, "n2").await.unwrap(), m2);
        // An unpublish never ends it; a rollback (before the switch) makes
        // this copy the volume again.
        b.detach(&st, vid, "", false).await.unwrap();
        b.detach(&st, vid, "n2", false).await.unwrap();
        assert!(st.get().unwrap().pool.attachment(vid).unwrap().moved);
        let back = b.detach(&st, vid, "n2", true).await.unwrap();
        assert!(back > m2);
        let a = st.get().unwrap().pool.attachment(vid).unwrap();
        assert!(!a.moved && !a.for_move && a.node.is_empty(), "{a:?}");
        b.attach(&st, vid, "n1", false).await.unwrap();
        // Deleted and made again here (moved back): a fresh start.
        st.get().unwrap().pool.delete_volume(vid).unwrap();
        b.forget(vid).await;
        st.get()
            .unwrap()
            .pool
            .create_volume_as(vid, 1 << 20)
            .unwrap();
        assert_eq!(b.attach(&st, vid, "n1", false).await.unwrap(), 1);
    }

    /// A request retried in a new session runs only after the first
    /// attempt has left the engine, and a late first attempt is refused
    /// unexecuted; a new attachment waits for the old one's requests.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_newer_session_waits_for_the_older_and_refuses_its_late_requests() {
        let dir = tempfile::tempdir().unwrap();
        let (st, vid) = started(dir.path());
        let s = service(&st);
        let e = s.attachments.attach(&st, vid, "n1", false).await.unwrap();
        let first = s
            .admit(&Caller::default(), Some(&grant(vid, "n1", e, 1)), false)
            .await
            .unwrap();
        let also_first = s
            .admit(&Caller::default(), Some(&grant(vid, "n1", e, 1)), false)
            .await
            .unwrap();
        let retry = {
            let (s, g) = (s.clone(), grant(vid, "n1", e, 2));
            tokio::spawn(
                async move { s.admit(&Caller::default(), Some(&g), false).await.map(drop) },
            )
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!retry.is_finished(), "ran beside the older session");
        let late = s
            .admit(&Caller::default(), Some(&grant(vid, "n1", e, 1)), false)
            .await
            .map(drop)
            .unwrap_err();
        assert_eq!(late.code(), tonic::Code::Aborted);
        assert_eq!(late.metadata().get(SESSION_HEADER).unwrap(), "2");
        drop(first);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!retry.is_finished(), "ran before every older request left");
        drop(also_first);
        retry.await.unwrap().unwrap();

        // Publishing to n2 answers once n1's request in the engine is done.
        let running = s
            .admit(&Caller::default(), Some(&grant(vid, "n1", e, 2)), false)
            .await
            .unwrap();
        let publish = {
            let (s, st) = (s.clone(), st.clone());
            tokio::spawn(async move { s.attachments.attach(&st, vid, "n2", false).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!publish.is_finished(), "published while n1's request ran");
        drop(running);
        assert!(publish.await.unwrap().unwrap() > e);
    }

    /// A read-only attachment reads and flushes; its writes, trims and
    /// zeroes are refused unexecuted, a read-write grant of its epoch is
    /// not taken, and publishing the node again the other way is
    /// ALREADY_EXISTS until it is unpublished; all of it from the record
    /// after a restart too.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_read_only_attachment_reads_and_never_writes() {
        let dir = tempfile::tempdir().unwrap();
        let (st, vid) = started(dir.path());
        let s = service(&st);
        let core = st.get().unwrap();
        core.pool
            .volume(vid)
            .unwrap()
            .write(0, &[7u8; 4096], true)
            .unwrap();
        let e = s.attachments.attach(&st, vid, "n1", true).await.unwrap();
        assert_eq!(
            s.attachments
                .attach(&st, vid, "n1", false)
                .await
                .unwrap_err()
                .code(),
            tonic::Code::AlreadyExists
        );
        let again = service(&st);
        assert_eq!(
            again
                .attachments
                .attach(&st, vid, "n1", true)
                .await
                .unwrap(),
            e
        );
        let ro = GrantKey::from_secret(b"test")
            .make(&vid.to_string(), "n1", e, true)
            .unwrap();
        let rw = grant(vid, "n1", e, 0);
        let read = again
            .read(Request::new(ReadRequest {
                grant: Some(ro.clone()),
                offset: 0,
                length: 4096,
            }))
            .await
            .unwrap();
        assert_eq!(read.into_inner().data, vec![7u8; 4096]);
        again
            .flush(Request::new(FlushRequest {
                grant: Some(ro.clone()),
            }))
            .await
            .unwrap();
        let code = |r: Result<Response<Done>, Status>| r.unwrap_err().code();
        let write = |g: &Grant| WriteRequest {
            grant: Some(g.clone()),
            offset: 0,
            data: vec![1u8; 4096],
            fua: true,
        };
        let range = RangeRequest {
            grant: Some(ro.clone()),
            offset: 0,
            length: 4096,
        };
        let zero = ZeroRequest {
            grant: Some(ro.clone()),
            offset: 0,
            length: 4096,
            may_trim: true,
            fast: false,
        };
        assert_eq!(
            code(again.write(Request::new(write(&ro))).await),
            tonic::Code::FailedPrecondition
        );
        assert_eq!(
            code(again.trim(Request::new(range)).await),
            tonic::Code::FailedPrecondition
        );
        assert_eq!(
            code(again.zero(Request::new(zero)).await),
            tonic::Code::FailedPrecondition
        );
        // A read-write grant of the same node and epoch is not the
        // controller's word for this attachment.
        assert_eq!(
            code(again.write(Request::new(write(&rw))).await),
            tonic::Code::PermissionDenied
        );
        let mut buf = vec![0u8; 4096];
        core.pool.volume(vid).unwrap().read(0, &mut buf).unwrap();
        assert_eq!(buf, vec![7u8; 4096], "a refused request wrote");
        // Unpublished, then published read-write: writes go in.
        again
            .attachments
            .detach(&st, vid, "n1", false)
            .await
            .unwrap();
        let e2 = again
            .attachments
            .attach(&st, vid, "n1", false)
            .await
            .unwrap();
        again
            .write(Request::new(write(&grant(vid, "n1", e2, 0))))
            .await
            .unwrap();
    }
}
