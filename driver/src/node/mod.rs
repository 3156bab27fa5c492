//! The node side: volumes of this node's pool made into block devices of
//! its kernel, filesystems made and mounted on them, and bind mounts into
//! pods. No gRPC here; `csi/node.rs` is the thin CSI face of [`Node`].
//!
//! ```text
//! stage:    record(Attaching) ─▶ attach/ (nbd | fuse+loop) ─▶ /dev/X
//!           ─▶ [mount mode] blkid ─▶ mkfs if blank ─▶ mount at staging path ─▶ record(Staged)
//! publish:  bind mount staging path (or the device node) at the target path [ro]
//! expand:   kernel device size (attach/) ─▶ resize2fs | xfs_growfs
//! restart:  for each record: fd holder / nbd reconfigure ─▶ serve again; broken ones are
//!           reported abnormal and rebuilt at the next stage
//! ```
//!
//! - `attach/`: the kernel attach backends and how one is chosen: the
//!   node's default, and iSCSI for volumes that ask for it.
//! - `holder.rs`: the process that keeps FUSE connections across restarts.
//! - `state.rs`: the on-disk records of what is staged.
//! - `mount.rs`, `loopdev.rs`, `netlink.rs`: the Linux interfaces used.

pub mod attach;
pub mod error;
pub mod holder;
pub mod loopdev;
pub mod mount;
pub mod netlink;
pub mod served;
pub mod state;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

pub use error::{Error, Result};

use attach::{Attach, Attached, FuseAttach, Handle, IscsiAttach, Kind, NbdAttach};
use error::io;
use state::{Access, Phase, StagedRecord, StateDir};

use crate::engine::{Pool, VolumeId};
use crate::frontend::iscsi::chap::Secrets;
use crate::frontend::nbd::NbdServer;
use crate::frontend::{Export, RemoteDevice};
use crate::metrics::Metrics;
use crate::peer::{Peers, RemoteVolume, Target};
use served::{Served, Source};

/// How this node runs.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub node_id: String,
    /// Records, FUSE mountpoints and the fd holder's socket. Should not
    /// survive a reboot (like the attachments it describes).
    pub state_dir: PathBuf,
    pub attach: attach::Choice,
    /// Volumes this node accepts (NodeGetInfo's max_volumes_per_node).
    pub max_volumes: u32,
    /// Where the FUSE fd holder comes from.
    pub holder: HolderStart,
    /// How long the kernel keeps an nbd device whose server went away.
    pub nbd_dead_timeout: std::time::Duration,
    /// This node's own iSCSI target (loopback), for `--attach iscsi` and
    /// volumes with `frontend: iscsi`.
    pub iscsi_portal: Option<std::net::SocketAddr>,
}

/// Where the FUSE fd holder comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HolderStart {
    /// Start `<exe> fuse-holder` (the `strata` binary) in its own process
    /// group when none answers: a holder that outlives this process, but
    /// not its container.
    Spawn(PathBuf),
    /// Another process runs it and keeps it running (the chart's
    /// fuse-holder DaemonSet, so that replacing the node plugin's pod does
    /// not end the connections): wait for it to answer, never start one.
    External,
}

/// Whether a staged volume is healthy, for NodeGetVolumeStats and
/// ControllerGetVolume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    pub abnormal: bool,
    pub message: String,
}

impl Condition {
    fn healthy() -> Self {
        Condition {
            abnormal: false,
            message: "healthy".into(),
        }
    }
    fn abnormal(message: impl Into<String>) -> Self {
        Condition {
            abnormal: true,
            message: message.into(),
        }
    }
}

/// A NodeStageVolume, validated.
#[derive(Debug, Clone)]
pub struct Stage {
    pub volume: VolumeId,
    pub staging_path: PathBuf,
    pub access: Access,
    pub read_only: bool,
    /// Another node holds the volume (the publish context said so).
    pub remote: Option<Target>,
    /// The backend the volume asks for (`frontend: iscsi`); `None`: the
    /// node's default.
    pub frontend: Option<Kind>,
    /// The CHAP secret its target needs (iSCSI only).
    pub chap: Option<state::ChapRecord>,
}

/// A NodePublishVolume, validated.
#[derive(Debug, Clone)]
pub struct Publish {
    pub volume: VolumeId,
    pub staging_path: PathBuf,
    pub target_path: PathBuf,
    pub block: bool,
    pub read_only: bool,
    /// SINGLE_NODE_SINGLE_WRITER: no other writable publish may exist.
    pub single_writer: bool,
}

/// What NodeGetVolumeStats reports.
#[derive(Debug, Clone)]
pub struct Usage {
    /// A mounted filesystem's usage, or `None` for a raw block volume.
    pub filesystem: Option<mount::FsUsage>,
    /// The device's size.
    pub device_bytes: u64,
    pub condition: Condition,
}

/// A staged volume: its record and, unless broken, its live attachment.
#[derive(Debug)]
struct Entry {
    rec: StagedRecord,
    live: std::result::Result<Attached, String>,
    /// What its frontend serves (this node's volume or the owner's);
    /// `None` if it could not be served again after a restart.
    served: Option<Arc<Served>>,
}

impl Entry {
    /// The owner's volume, when another node holds it.
    fn remote(&self) -> Option<Arc<RemoteVolume>> {
        self.served.as_ref()?.remote()
    }

    /// Whether this node's own copy is what is staged.
    fn local(&self) -> bool {
        self.rec.remote.is_none()
    }
}

/// The node: what is staged here, and how to stage more.
#[derive(Debug)]
pub struct Node {
    pool: Pool,
    /// How to reach other nodes' volumes (cluster mode only).
    peers: Option<Peers>,
    config: NodeConfig,
    /// The default backend first, then (if the default is another) iSCSI
    /// for volumes that ask for it.
    backends: Vec<Box<dyn Attach>>,
    state: StateDir,
    staged: Mutex<HashMap<VolumeId, Entry>>,
    /// Held while a followed record is changed: a stage's removal of one
    /// it read never takes away one a follow wrote meanwhile.
    followed_files: Mutex<()>,
}

/// A live move re-pointed a staged volume from the owners `from` (the
/// last one most recently) to `to` (`None`: this node); kept after unstage, so a later stage with the
/// publish context from before the move reaches the volume where it is.
#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct Followed {
    from: Vec<String>,
    to: Option<Target>,
}

/// Mount options Kubernetes may pass that are not ours to honour.
const REFUSED_OPTIONS: [&str; 5] = ["bind", "rbind", "remount", "move", "loop"];

/// Splits mount options into mount(2) flags and filesystem data.
fn mount_options(
    options: &[String],
    read_only: bool,
    fs_type: &str,
) -> Result<(libc::c_ulong, String)> {
    let mut flags = 0;
    let mut data: Vec<&str> = Vec::new();
    for opt in options.iter().flat_map(|o| o.split(',')).map(str::trim) {
        flags |= match opt {
            "" | "defaults" | "rw" => 0,
            "ro" => libc::MS_RDONLY,
            "noatime" => libc::MS_NOATIME,
            "nodiratime" => libc::MS_NODIRATIME,
            "relatime" => libc::MS_RELATIME,
            "strictatime" => libc::MS_STRICTATIME,
            "lazytime" => libc::MS_LAZYTIME,
            "nosuid" => libc::MS_NOSUID,
            "nodev" => libc::MS_NODEV,
            "noexec" => libc::MS_NOEXEC,
            "sync" => libc::MS_SYNCHRONOUS,
            "dirsync" => libc::MS_DIRSYNC,
            o if REFUSED_OPTIONS.contains(&o) => {
                return Err(Error::InvalidArgument(format!(
                    "mount option {o:?} is not allowed"
                )));
            }
            o => {
                data.push(o);
                0
            }
        };
    }
    if read_only {
        flags |= libc::MS_RDONLY;
    }
    // Restores and clones carry their source's XFS UUID; XFS refuses a
    // second mount of one UUID unless told otherwise.
    if fs_type == "xfs" && !data.contains(&"nouuid") {
        data.push("nouuid");
    }
    Ok((flags, data.join(",")))
}

impl Node {
    /// Opens the node's state and serves again every volume staged before
    /// this process started. `nbd` is the NBD server the kernel nbd
    /// backend connects to.
    /// `iscsi_chap` are the secrets of this node's target, where volumes
    /// staged with a secret of their own put it.
    pub fn start(
        pool: Pool,
        metrics: Arc<Metrics>,
        nbd: Arc<NbdServer>,
        iscsi_chap: Arc<Secrets>,
        peers: Option<Peers>,
        config: NodeConfig,
    ) -> Result<Node> {
        std::fs::create_dir_all(&config.state_dir).map_err(io("create", &config.state_dir))?;
        protect_from_oom_killer();
        let (kind, why) = attach::choose(config.attach, &attach::Probe::kernel())?;
        tracing::info!(backend = %kind, why, "attaching volumes");
        let exports = nbd.exports().clone();
        let backend: Box<dyn Attach> = match kind {
            Kind::Fuse => Box::new(FuseAttach::new(
                &config.state_dir,
                config.holder.clone(),
                metrics,
            )?),
            Kind::Nbd => Box::new(NbdAttach::new(
                nbd,
                attach::Probe::kernel()
                    .nbd_family
                    .ok_or_else(|| Error::Unavailable("the nbd driver went away".into()))?,
                config.nbd_dead_timeout.as_secs().max(1),
                &config.state_dir,
            )?),
            Kind::Iscsi => Box::new(IscsiAttach::new(
                config.iscsi_portal.ok_or_else(|| {
                    Error::InvalidArgument(
                        "--attach iscsi needs the node's own target: --iscsi-listen 127.0.0.1:PORT"
                            .into(),
                    )
                })?,
                exports.clone(),
                Arc::clone(&iscsi_chap),
            )?),
        };
        let mut backends = vec![backend];
        if kind != Kind::Iscsi {
            backends.push(Box::new(IscsiAttach::for_volumes(
                config.iscsi_portal,
                exports,
                iscsi_chap,
            )));
        }
        let node = Node {
            state: StateDir::open(&config.state_dir)?,
            pool,
            peers,
            config,
            backends,
            staged: Mutex::new(HashMap::new()),
            followed_files: Mutex::new(()),
        };
        node.recover()?;
        for b in &node.backends {
            b.serving()?;
        }
        Ok(node)
    }

    /// Gives the target `chap` the CHAP secrets of the iSCSI attachments
    /// recorded in `state_dir`, before it takes logins (see
    /// [`attach::stage_recorded_secrets`]).
    pub fn stage_recorded_secrets(state_dir: &Path, chap: &Secrets) -> Result<()> {
        let records = StateDir::open(state_dir)?.load_all()?;
        attach::stage_recorded_secrets(&records, chap);
        Ok(())
    }

    /// Which backend attaches volumes here by default.
    pub fn backend(&self) -> Kind {
        self.backends[0].kind()
    }

    /// The backend of `kind` (FUSE and nbd are there only as the default).
    fn backend_of(&self, kind: Kind) -> Result<&dyn Attach> {
        self.backends
            .iter()
            .find(|b| b.kind() == kind)
            .map(AsRef::as_ref)
            .ok_or_else(|| {
                Error::FailedPrecondition(format!(
                    "the volume was attached with {kind}, which this node does not use now \
                     (--attach)"
                ))
            })
    }

    fn recover(&self) -> Result<()> {
        let records = self.state.load_all()?;
        let mut known = Vec::new();
        for mut rec in records {
            let Ok(vid) = rec.volume_id.parse::<VolumeId>() else {
                tracing::warn!(record = ?rec, "ignoring a record of an unknown volume ID");
                continue;
            };
            known.push(vid);
            if rec.phase == Phase::Attaching || self.backend_of(rec.backend).is_err() {
                // Interrupted before it was staged (or made by another
                // backend): roll back; kubelet will stage it again.
                tracing::info!(volume = %vid, "rolling back a stage that did not finish");
                self.teardown(vid, &rec)?;
                continue;
            }
            let mut live = self.resume(vid, &rec);
            if live.is_ok() && rec.broken.is_none() {
                rec.broken = self.backend_of(rec.backend)?.missed();
                if rec.broken.is_some() {
                    self.state.save(&rec)?;
                }
            }
            // Served again, but what was lost stays reported.
            if let (Ok(_), Some(why)) = (&live, &rec.broken) {
                live = Err(why.clone());
            }
            if let Err(why) = &live {
                tracing::error!(volume = %vid, %why, "a staged volume could not be served again");
            } else {
                tracing::info!(volume = %vid, staging = %rec.staging_path.display(), "serving a staged volume again");
            }
            let served = live.as_ref().ok().map(|(_, s)| s.clone());
            let live = live.map(|(a, _)| a);
            self.staged
                .lock()
                .expect("staged")
                .insert(vid, Entry { rec, live, served });
        }
        // Strays of the default backend only: the iSCSI sessions of a node
        // that uses iSCSI for some volumes may be anyone's.
        let default = &self.backends[0];
        for stray in default.strays(&known) {
            tracing::info!(volume = %stray, "removing an attachment nobody recorded");
            default.detach(stray)?;
        }
        Ok(())
    }

    /// Serves a recorded attachment again and makes sure its filesystem is
    /// mounted where the record says.
    #[allow(clippy::type_complexity)]
    fn resume(
        &self,
        vid: VolumeId,
        rec: &StagedRecord,
    ) -> std::result::Result<(Attached, Arc<Served>), String> {
        let source = match &rec.remote {
            // The owner may be away now: the recorded size serves it, and
            // its I/O waits for the owner.
            Some(r) => Source::Remote(
                self.peers()
                    .and_then(|p| {
                        let v = p.open(&r.target, Some(r.size_bytes))?;
                        v.keep_in(self.durability_path(vid), true, false)?;
                        Ok(v)
                    })
                    .map_err(|e| crate::engine::error::chain(&e))?,
            ),
            None => Source::Local(
                self.pool
                    .volume(vid)
                    .map_err(|e| format!("volume {vid} cannot be opened: {e}"))?,
            ),
        };
        let local = matches!(source, Source::Local(_));
        let served = Served::new(vid, source);
        if local && RemoteVolume::recorded_lost(&self.durability_path(vid)) {
            served.lose();
        }
        let attached = self
            .backend_of(rec.backend)
            .and_then(|b| b.resume(vid, Export::Remote(served.clone()), rec))
            .map_err(|e| crate::engine::error::chain(&e))?;
        if matches!(rec.access, Access::Mount { .. })
            && mount::mount_at(&rec.staging_path).ok().flatten().is_none()
        {
            self.mount_staging(&attached.device, rec).map_err(|e| {
                format!(
                    "remounting at {}: {}",
                    rec.staging_path.display(),
                    crate::engine::error::chain(&e)
                )
            })?;
        }
        Ok((attached, served))
    }

    /// Mounts the filesystem on `device` at the record's staging path, as
    /// the record says (type, options, read-only).
    fn mount_staging(&self, device: &Path, rec: &StagedRecord) -> Result<()> {
        let Access::Mount {
            fs_type,
            mount_flags,
        } = &rec.access
        else {
            return Ok(());
        };
        let staging = &rec.staging_path;
        let (flags, data) = mount_options(mount_flags, rec.read_only, fs_type)?;
        std::fs::create_dir_all(staging).map_err(io("create", staging))?;
        let dev = device
            .to_str()
            .ok_or_else(|| Error::InvalidArgument("device path".into()))?;
        mount::mount(dev, staging, fs_type, flags, &data).map_err(io("mount", staging))
    }

    /// Unmounts the staging path (if ours is mounted there), detaches and
    /// forgets the record.
    fn teardown(&self, vid: VolumeId, rec: &StagedRecord) -> Result<()> {
        if let Some(m) = mount::mount_at(&rec.staging_path)?
            && rec
                .device
                .as_ref()
                .is_some_and(|d| Path::new(&m.source) == d)
        {
            mount::unmount_patiently(&rec.staging_path)?;
        }
        match self.backend_of(rec.backend) {
            Ok(b) => b.detach(vid)?,
            Err(e) => {
                tracing::warn!(volume = %vid, error = %e, "an attachment of another backend is left as it is")
            }
        }
        self.state.remove(&rec.volume_id)
    }

    /// How this node reaches volumes of others.
    pub(crate) fn peers(&self) -> Result<&Peers> {
        self.peers.as_ref().ok_or_else(|| {
            Error::FailedPrecondition(
                "this node cannot reach other nodes' volumes (standalone, or no --agent-tls)"
                    .into(),
            )
        })
    }

    /// Where the client of a volume another node holds keeps what it
    /// knows of that owner's boots (`RemoteVolume::keep_in`).
    fn durability_path(&self, vid: VolumeId) -> PathBuf {
        self.config.state_dir.join(format!("durability-{vid}"))
    }

    fn followed_path(&self, vid: VolumeId) -> PathBuf {
        self.config.state_dir.join(format!("followed-{vid}.json"))
    }

    fn save_followed(&self, vid: VolumeId, f: &Followed) -> Result<()> {
        let path = self.followed_path(vid);
        let bytes = serde_json::to_vec(f).map_err(|e| Error::InvalidArgument(e.to_string()))?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, bytes).map_err(io("write", &tmp))?;
        std::fs::rename(&tmp, &path).map_err(io("rename", &path))
    }

    /// Where a stage that names `asked` (the publish context's owner;
    /// `None`: this node) should go instead: the owner `vid` was followed
    /// to, if it was followed away from that owner (the context is older
    /// than the move). A stage naming another owner is a newer publish:
    /// the record of the follow goes.
    fn load_followed(&self, vid: VolumeId) -> Option<Followed> {
        serde_json::from_slice(&std::fs::read(self.followed_path(vid)).ok()?).ok()
    }

    fn followed(&self, vid: VolumeId, asked: Option<&Target>) -> Option<Option<Target>> {
        let f = self.load_followed(vid)?;
        let asked_owner = asked.map_or(self.config.node_id.as_str(), |t| t.owner.as_str());
        // The owner asked for still serves the volume (it moved back since,
        // and this is a newer publish): no redirect.
        let serves = match asked {
            None => self
                .pool
                .attachment(vid)
                .is_ok_and(|a| !(a.moved && a.live)),
            Some(t) => self.peers().is_ok_and(|p| p.open(t, None).is_ok()),
        };
        if serves {
            self.forget_followed(vid, &f);
            return None;
        }
        // Followed away from the owner asked for, or to it again under a
        // later attachment (a live move rolled back, its seal undone).
        let later_there = asked
            .zip(f.to.as_ref())
            .is_some_and(|(a, to)| to.owner == a.owner && older_grant(a, to));
        if later_there || f.from.iter().any(|n| n == asked_owner) {
            tracing::info!(volume = %vid, published = asked_owner, owner = %f.to.as_ref().map_or(self.config.node_id.as_str(), |t| t.owner.as_str()), "a stage names the owner the volume moved away from: staged from its new owner");
            return Some(f.to);
        }
        self.forget_followed(vid, &f);
        None
    }

    /// Removes the followed record `f` of `vid`, unless a follow changed it
    /// since it was read.
    fn forget_followed(&self, vid: VolumeId, f: &Followed) {
        let _files = self.followed_files.lock().expect("followed files");
        if self.load_followed(vid).as_ref() == Some(f) {
            let _ = std::fs::remove_file(self.followed_path(vid));
        }
    }

    /// Stages a volume; staging it again the same way is a success.
    pub fn stage(&self, req: &Stage) -> Result<()> {
        let vid = req.volume;
        let kind = req.frontend.unwrap_or_else(|| self.backend());
        if req.chap.is_some() && kind != Kind::Iscsi {
            return Err(Error::InvalidArgument(format!(
                "volume {vid} has a CHAP secret, but attaches with {kind}: CHAP is for frontend iscsi"
            )));
        }
        if self.stage_again(req)? {
            return Ok(());
        }
        let followed = self.followed(vid, req.remote.as_ref());
        let req = &Stage {
            remote: followed.unwrap_or_else(|| req.remote.clone()),
            ..req.clone()
        };
        // Not staged (or broken): the owner is asked outside the lock.
        let source = match &req.remote {
            Some(t) => Source::Remote(self.peers()?.open(t, None)?),
            None => Source::Local(self.pool.volume(vid)?),
        };
        let kind = req.frontend.unwrap_or_else(|| self.backend());
        let backend = self.backend_of(kind)?;
        let served = Served::new(vid, source);
        let remote = served.remote();
        backend.prepare()?;
        let mut staged = self.staged.lock().expect("staged");
        // Followed away from the owner opened above meanwhile (a live move
        // switched, and its follow found nothing staged here; it records
        // the follow before it looks): the retry stages from the new owner.
        if let Some(t) = &req.remote
            && self
                .load_followed(vid)
                .is_some_and(|f| f.from.contains(&t.owner))
        {
            return Err(Error::Unavailable(format!(
                "volume {vid} moved away from node {} while it was staged here: retry",
                t.owner
            )));
        }
        if remote.is_none() {
            // A move copies or copied the volume away (see `unstaged`).
            let a = self.pool.attachment(vid)?;
            if a.for_move || a.moved {
                return Err(Error::FailedPrecondition(format!(
                    "volume {vid} {} node {}: it cannot be staged here",
                    if a.moved { "moved to" } else { "is moving to" },
                    a.node
                )));
            }
        }
        if let Some(entry) = staged.get(&vid) {
            if entry.rec.staging_path != req.staging_path {
                return Err(Error::FailedPrecondition(format!(
                    "volume {vid} is staged at {} already",
                    entry.rec.staging_path.display()
                )));
            }
            if entry.rec.access != req.access
                || entry.rec.read_only != req.read_only
                || entry.rec.backend != kind
                || entry.rec.chap != req.chap
            {
                return Err(Error::AlreadyExists(format!(
                    "volume {vid} is staged at {} as {:?} over {}{}{}, not as asked",
                    req.staging_path.display(),
                    entry.rec.access,
                    entry.rec.backend,
                    if entry.rec.read_only {
                        " (read-only)"
                    } else {
                        ""
                    },
                    match &entry.rec.chap {
                        Some(_) if entry.rec.chap != req.chap => " with another CHAP secret",
                        Some(_) => " with a CHAP secret",
                        None if req.chap.is_some() => " without a CHAP secret",
                        None => "",
                    }
                )));
            }
            if entry.live.is_ok() {
                return Ok(());
            }
            // Broken: rebuild it from scratch.
            let entry = staged.remove(&vid).expect("present");
            self.teardown(vid, &entry.rec)?;
        }
        if staged.len() >= self.config.max_volumes as usize {
            return Err(Error::Unavailable(format!(
                "node {} has {} volumes staged, its maximum",
                self.config.node_id,
                staged.len()
            )));
        }
        let mut rec = StagedRecord {
            volume_id: vid.to_string(),
            phase: Phase::Attaching,
            backend: kind,
            device: None,
            staging_path: req.staging_path.clone(),
            access: req.access.clone(),
            read_only: req.read_only,
            fuse: None,
            writers: Vec::new(),
            broken: None,
            remote: remote.as_ref().map(|v| state::RemoteRecord {
                target: v.target(),
                size_bytes: v.size(),
            }),
            chap: req.chap.clone(),
        };
        // Anew, once nothing else is staged as this volume (whose client
        // may be recording there).
        if let Some(v) = &remote {
            v.keep_in(self.durability_path(vid), false, false)?;
        }
        self.state.save(&rec)?;
        let attached = match self.stage_attached(vid, Export::Remote(served.clone()), &mut rec) {
            Ok(a) => a,
            Err(e) => {
                if let Err(cleanup) = self.teardown(vid, &rec) {
                    tracing::warn!(volume = %vid, error = %cleanup, "cleaning up a failed stage");
                }
                return Err(e);
            }
        };
        staged.insert(
            vid,
            Entry {
                rec,
                live: Ok(attached),
                served: Some(served),
            },
        );
        Ok(())
    }

    /// A stage of a volume staged and served here already: success, and a
    /// newer publish of a remote volume (a new grant or owner address) is
    /// taken over in place, without asking the owner. `false`: not staged
    /// and live (the caller stages it, or reports the mismatch).
    fn stage_again(&self, req: &Stage) -> Result<bool> {
        let mut staged = self.staged.lock().expect("staged");
        let Some(entry) = staged.get_mut(&req.volume) else {
            return Ok(false);
        };
        let same_way = entry.rec.staging_path == req.staging_path
            && entry.rec.access == req.access
            && entry.rec.read_only == req.read_only
            && entry.rec.backend == req.frontend.unwrap_or(self.backend())
            && entry.rec.chap == req.chap;
        if !same_way || entry.live.is_err() {
            return Ok(false);
        }
        match (entry.remote(), &req.remote) {
            (None, None) => Ok(true),
            (Some(v), Some(t)) if v.target().owner == t.owner => {
                if older_grant(t, &v.target()) {
                    tracing::info!(volume = %req.volume, owner = %t.owner, "a stage names an older attachment than the one served (a rolled-back move attached it again): the served one stays");
                } else if v.target() != *t {
                    v.retarget(t)?;
                    if let Some(r) = entry.rec.remote.as_mut() {
                        r.target = t.clone();
                    }
                    self.state.save(&entry.rec)?;
                    tracing::info!(volume = %req.volume, owner = %t.owner, "a newer publish of a staged remote volume: its grant is used from now on");
                }
                Ok(true)
            }
            // Another owner than the one served: the volume moved since
            // this publish (only a move's Follow changes owners), and the
            // staged volume follows it already.
            (served, asked) => {
                tracing::info!(
                    volume = %req.volume,
                    serving = %served.map_or_else(|| self.config.node_id.clone(), |v| v.target().owner),
                    published = %asked.as_ref().map_or_else(|| self.config.node_id.clone(), |t| t.owner.clone()),
                    "a stage names the owner of an older publish: the volume moved since, and is served from its owner now"
                );
                Ok(true)
            }
        }
    }

    /// A live move changed the owner of `vid` (see `agent.proto`,
    /// Follow): if it is staged here, its frontend is served from the new
    /// owner (`None`: this node) from now on, also after a restart.
    /// `sealed_boot`: the boot `previous` sealed the move under ("": not
    /// known). Whether it is staged here.
    pub fn follow(
        &self,
        vid: VolumeId,
        owner: Option<Target>,
        previous: &str,
        sealed_boot: &str,
    ) -> Result<bool> {
        let owner_id =
            |t: Option<&Target>| t.map_or_else(|| self.config.node_id.clone(), |t| t.owner.clone());
        let read_staged = || {
            let staged = self.staged.lock().expect("staged");
            staged.get(&vid).map(|e| {
                (
                    e.rec.remote.as_ref().map(|r| r.target.clone()),
                    e.served.as_ref().map(|s| s.remote().map(|r| r.target())),
                )
            })
        };
        let staged_from = read_staged();
        // Every owner it was followed away from (a context may be older
        // than several moves), for a later stage.
        let files = self.followed_files.lock().expect("followed files");
        let mut earlier = self.load_followed(vid).map(|f| f.from).unwrap_or_default();
        let new_owner = owner_id(owner.as_ref());
        let mut away = vec![previous.to_string()];
        if let Some((rec, _)) = &staged_from {
            away.push(owner_id(rec.as_ref()));
        }
        earlier.retain(|n| *n != new_owner && !away.contains(n));
        earlier.extend(
            away.into_iter()
                .filter(|n| *n != new_owner && !n.is_empty()),
        );
        earlier.dedup();
        self.save_followed(
            vid,
            &Followed {
                from: earlier,
                to: owner.clone(),
            },
        )?;
        drop(files);
        // Staged meanwhile (from `previous`, before the record above was
        // there for the stage to see): followed here too.
        let Some((recorded, served)) = staged_from.or_else(read_staged) else {
            return Ok(false);
        };
        // Followed already (a repeated call): the record and the source
        // served both say so; the client, with what it knows of the
        // owner's durability, stays.
        if recorded == owner && served.as_ref().is_none_or(|s| *s == owner) {
            // Its calls that met a seal undone since (a rolled-back move)
            // try again now.
            if let Some(s) = self
                .staged
                .lock()
                .expect("staged")
                .get(&vid)
                .and_then(|e| e.served.as_ref())
            {
                s.wake();
            }
            return Ok(true);
        }
        // The client it is served through now.
        let old = self
            .staged
            .lock()
            .expect("staged")
            .get(&vid)
            .and_then(|e| e.served.as_ref()?.remote());
        // Writes the previous owner answered and then lost to a reboot
        // before its seal are lost: that client records it, and
        // `Served::follow` passes it on.
        if let Some(old) = &old
            && !sealed_boot.is_empty()
            && old.target().owner == previous
        {
            old.sealed_under(sealed_boot)?;
        }
        // Opened outside the lock (it asks the owner for the size). The
        // same owner under a new grant (a move rolled back) keeps the
        // client, and with it what it knows of the owner's boots: writes
        // answered before an owner reboot still fail the next flush.
        let same_owner =
            old.filter(|r| owner.as_ref().is_some_and(|t| r.target().owner == t.owner));
        // (Retargeted once the record says so.)
        let source = match (&owner, same_owner) {
            (Some(_), Some(r)) => Source::Remote(r),
            (Some(t), None) => Source::Remote(self.peers()?.open(t, None)?),
            (None, _) => Source::Local(self.pool.volume(vid)?),
        };
        let mut staged = self.staged.lock().expect("staged");
        let Some(entry) = staged.get_mut(&vid) else {
            return Ok(false);
        };
        // Another owner's client records there from now on (writes lost
        // before stay lost), before the staging record names that owner: a
        // restart in between must not give the new owner's client the old
        // one's unflushed boot. The old one's stops (it only meets "moved"
        // since the seal). Followed to this node, the old one's record
        // stays, for `resume`.
        if let Source::Remote(v) = &source {
            let served = entry.served.as_ref();
            let old = served.and_then(|s| s.remote());
            if old.as_ref().is_none_or(|o| !Arc::ptr_eq(o, v)) {
                // (Not served again since a restart: the record says.)
                let path = self.durability_path(vid);
                let lost = match served {
                    Some(s) => s.lost() || old.as_ref().is_some_and(|o| o.lost_writes()),
                    None => RemoteVolume::recorded_lost(&path),
                };
                v.keep_in(path, false, lost)?;
                if let Some(old) = old {
                    old.forget_file();
                }
            }
        }
        let mut rec = entry.rec.clone();
        rec.remote = match (&source, &owner) {
            (Source::Remote(v), Some(t)) => Some(state::RemoteRecord {
                target: t.clone(),
                size_bytes: v.size(),
            }),
            _ => None,
        };
        self.state.save(&rec)?;
        entry.rec = rec;
        if let (Source::Remote(v), Some(t)) = (&source, &owner)
            && v.target() != *t
        {
            v.retarget(t)?;
        }
        match &entry.served {
            Some(served) => served.follow(source),
            None => {
                tracing::warn!(volume = %vid, "a volume that could not be served again follows its new owner in its record only")
            }
        }
        tracing::info!(volume = %vid, owner = %new_owner, "a staged volume follows its owner");
        Ok(true)
    }

    fn stage_attached(
        &self,
        vid: VolumeId,
        export: Export,
        rec: &mut StagedRecord,
    ) -> Result<Attached> {
        let size = export.size();
        let attached = self.backend_of(rec.backend)?.attach(vid, export, rec)?;
        rec.device = Some(attached.device.clone());
        if let Handle::Fuse { negotiated, .. } = &attached.handle {
            rec.fuse = Some(*negotiated);
        }
        self.state.save(rec)?;
        if let Access::Mount { fs_type, .. } = &rec.access {
            match mount::probe(&attached.device)? {
                mount::Content::Blank => {
                    let min = mount::min_size(fs_type).ok_or_else(|| {
                        Error::InvalidArgument(format!("Strata cannot make a {fs_type} filesystem"))
                    })?;
                    if size < min {
                        return Err(Error::OutOfRange(format!(
                            "{fs_type} needs a volume of at least {min} bytes; this one is {size}"
                        )));
                    }
                    if rec.read_only {
                        return Err(Error::FailedPrecondition(format!(
                            "volume {} is blank and staged read-only: there is no {fs_type} filesystem to mount",
                            rec.volume_id
                        )));
                    }
                    mount::mkfs(fs_type, &attached.device)?;
                }
                mount::Content::Filesystem(found) if found == *fs_type => {
                    // Grown since it was last mounted, without the means to
                    // grow it online: grow it now, before mounting.
                    if fs_type == "ext4"
                        && !rec.read_only
                        && !mount::has_capability(mount::CAP_SYS_RESOURCE)
                    {
                        mount::grow_ext4_offline(&attached.device, size)?;
                    }
                }
                mount::Content::Filesystem(found) => {
                    return Err(Error::FailedPrecondition(format!(
                        "volume {} holds a {found} filesystem, not {fs_type}",
                        rec.volume_id
                    )));
                }
                mount::Content::Other(what) => {
                    return Err(Error::FailedPrecondition(format!(
                        "volume {} holds {what}, not a filesystem; refusing to format it",
                        rec.volume_id
                    )));
                }
            }
            self.mount_staging(&attached.device, rec)?;
            // A volume grown while unstaged: fill the device (a no-op when
            // it already does). Not fatal: the filesystem is usable as is.
            let online = fs_type == "xfs" || mount::has_capability(mount::CAP_SYS_RESOURCE);
            if online
                && !rec.read_only
                && let Err(e) = mount::grow(fs_type, &attached.device, &rec.staging_path)
            {
                tracing::warn!(volume = %rec.volume_id, error = %e, "growing the filesystem at stage failed");
            }
        }
        rec.phase = Phase::Staged;
        self.state.save(rec)?;
        Ok(attached)
    }

    /// Unstages a volume; a volume not staged (at that path) is a success.
    pub fn unstage(&self, vid: VolumeId, staging_path: &Path) -> Result<()> {
        let mut staged = self.staged.lock().expect("staged");
        let Some(entry) = staged.get(&vid) else {
            return Ok(());
        };
        if entry.rec.staging_path != staging_path {
            tracing::warn!(volume = %vid, asked = %staging_path.display(), staged = %entry.rec.staging_path.display(), "unstage of a path the volume is not staged at: nothing to do");
            return Ok(());
        }
        let busy: Vec<PathBuf> = (self.publishes(&entry.rec)?.into_iter())
            .map(|m| m.mount_point)
            .collect();
        if !busy.is_empty() {
            return Err(Error::FailedPrecondition(format!(
                "volume {vid} is still published at {busy:?}; unpublish it first"
            )));
        }
        let entry = staged.remove(&vid).expect("present");
        self.teardown(vid, &entry.rec)
            .inspect(|()| {
                let path = self.durability_path(vid);
                if let Err(e) = std::fs::remove_file(&path)
                    && e.kind() != std::io::ErrorKind::NotFound
                {
                    tracing::warn!(path = %path.display(), error = %e, "removing an unstaged volume's durability record");
                }
            })
            .inspect_err(|_| {
            // Keep knowing about it, so a retry finds it.
            staged.insert(
                vid,
                Entry {
                    rec: entry.rec.clone(),
                    live: Err("unstage failed half way".into()),
                    served: entry.served.clone(),
                },
            );
        })
    }

    /// Mount points (other than the staging path) that show this volume:
    /// bind mounts of its filesystem, or of its device node.
    fn publishes(&self, rec: &StagedRecord) -> Result<Vec<mount::MountEntry>> {
        let mounts = mount::mounts()?;
        let shows_volume: Box<dyn Fn(&mount::MountEntry) -> bool> = match &rec.access {
            Access::Mount { .. } => {
                let Some(fs) = mounts
                    .iter()
                    .rev()
                    .find(|m| m.mount_point == rec.staging_path)
                else {
                    return Ok(Vec::new());
                };
                let dev = fs.dev;
                Box::new(move |m| m.dev == dev)
            }
            Access::Block => {
                let Some(device) = rec.device.clone() else {
                    return Ok(Vec::new());
                };
                // Only device filesystems hold device nodes; never stat
                // anything else here (a hung FUSE mount would block).
                Box::new(move |m| {
                    matches!(m.fs_type.as_str(), "devtmpfs" | "tmpfs")
                        && shows_device(&m.mount_point, &device)
                })
            }
        };
        Ok(mounts
            .into_iter()
            .filter(|m| m.mount_point != rec.staging_path && shows_volume(m))
            .collect())
    }

    /// Publishes a staged volume at `target_path`.
    pub fn publish(&self, req: &Publish) -> Result<()> {
        let mut staged = self.staged.lock().expect("staged");
        let entry = staged.get(&req.volume).ok_or_else(|| {
            Error::FailedPrecondition(format!(
                "volume {} is not staged on this node; NodeStageVolume first",
                req.volume
            ))
        })?;
        self.mount_publish(entry, req)?;
        // Kept, for SINGLE_NODE_SINGLE_WRITER: the writable publishes that
        // NodePublishVolume made (kubelet's own bind mounts are not).
        let entry = staged.get_mut(&req.volume).expect("just found");
        if !req.read_only && !entry.rec.writers.contains(&req.target_path) {
            let mut rec = entry.rec.clone();
            rec.writers.push(req.target_path.clone());
            self.state.save(&rec)?;
            entry.rec = rec;
        }
        Ok(())
    }

    /// The checks and mounts of [`Node::publish`].
    fn mount_publish(&self, entry: &Entry, req: &Publish) -> Result<()> {
        if entry.rec.staging_path != req.staging_path {
            return Err(Error::FailedPrecondition(format!(
                "volume {} is staged at {}, not {}",
                req.volume,
                entry.rec.staging_path.display(),
                req.staging_path.display()
            )));
        }
        let attached = entry
            .live
            .as_ref()
            .map_err(|why| Error::FailedPrecondition(why.clone()))?;
        let staged_block = entry.rec.access == Access::Block;
        if staged_block != req.block {
            return Err(Error::InvalidArgument(format!(
                "volume {} was staged as a {} volume",
                req.volume,
                if staged_block { "block" } else { "filesystem" }
            )));
        }
        if req.single_writer && !req.read_only {
            let mut others = entry.rec.writers.iter().filter(|w| **w != req.target_path);
            let still = others.find(|w| matches!(mount::mount_at(w), Ok(Some(_))));
            if let Some(other) = still {
                return Err(Error::FailedPrecondition(format!(
                    "volume {} is SINGLE_NODE_SINGLE_WRITER and already published writable at {}",
                    req.volume,
                    other.display()
                )));
            }
        }
        if req.block {
            if let Some(parent) = req.target_path.parent() {
                std::fs::create_dir_all(parent).map_err(io("create", parent))?;
            }
            if !req.target_path.exists() {
                std::fs::File::create(&req.target_path).map_err(io("create", &req.target_path))?;
            }
        } else {
            std::fs::create_dir_all(&req.target_path).map_err(io("create", &req.target_path))?;
        }
        if let Some(m) = mount::mount_at(&req.target_path)? {
            let same = if req.block {
                shows_device(&req.target_path, &attached.device)
            } else {
                mount::mount_at(&req.staging_path)?.is_some_and(|s| s.dev == m.dev)
            };
            if same && m.read_only() == req.read_only {
                return Ok(());
            }
            return Err(Error::AlreadyExists(format!(
                "{} is already a mount of something else (or with other options)",
                req.target_path.display()
            )));
        }
        if !req.block {
            return mount::bind(&req.staging_path, &req.target_path, req.read_only)
                .map_err(io("bind mount", &req.target_path));
        }
        if !req.read_only {
            return mount::bind(&attached.device, &req.target_path, false)
                .map_err(io("bind mount", &req.target_path));
        }
        // A read-only mount does not stop writes to a device node, so a
        // read-only raw block publish gets a read-only device of its own: a
        // loop device over the staged one.
        let lo = loopdev::attach(&attached.device, attach::SECTOR_SIZE, true)?;
        let ro = loopdev::device_path(lo.index);
        mount::bind(&ro, &req.target_path, true).map_err(|e| {
            let _ = loopdev::detach(lo.index);
            io("bind mount", &req.target_path)(e)
        })
    }

    /// Unpublishes `target_path` of `volume`: unmounts it and removes it. A
    /// path that is not mounted (or does not exist) is a success.
    pub fn unpublish(&self, volume: Option<VolumeId>, target_path: &Path) -> Result<()> {
        self.unmount_publish(target_path)?;
        let mut staged = self.staged.lock().expect("staged");
        if let Some(entry) = volume.and_then(|v| staged.get_mut(&v))
            && entry.rec.writers.iter().any(|w| w == target_path)
        {
            let mut rec = entry.rec.clone();
            rec.writers.retain(|w| w != target_path);
            self.state.save(&rec)?;
            entry.rec = rec;
        }
        Ok(())
    }

    fn unmount_publish(&self, target_path: &Path) -> Result<()> {
        // A read-only block publish has a loop device of its own.
        let ro_loop = mount::mount_at(target_path)?.and(read_only_loop(target_path));
        while mount::mount_at(target_path)?.is_some() {
            mount::unmount_patiently(target_path)?;
        }
        if let Some(index) = ro_loop {
            loopdev::detach(index)?;
        }
        match std::fs::symlink_metadata(target_path) {
            Ok(m) if m.is_dir() => std::fs::remove_dir(target_path),
            Ok(_) => std::fs::remove_file(target_path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
        .map_err(io("remove", target_path))
    }

    /// Usage and condition of a volume at `path` (its staging or a target
    /// path).
    pub fn usage(&self, vid: VolumeId, path: &Path) -> Result<Usage> {
        let size = self.size_of(vid)?;
        if !path.exists() {
            return Err(Error::NotFound(format!(
                "{} does not exist",
                path.display()
            )));
        }
        let condition = self.condition(vid).unwrap_or_else(|| {
            Condition::abnormal(format!("volume {vid} is not staged on this node"))
        });
        let mounted = mount::mount_at(path)?;
        let condition = match (&mounted, condition.abnormal) {
            (None, false) => {
                Condition::abnormal(format!("nothing is mounted at {}", path.display()))
            }
            _ => condition,
        };
        let filesystem = if path.is_dir() && mounted.is_some() {
            Some(mount::statvfs(path)?)
        } else {
            None
        };
        let device_bytes = if mount::is_block_device(path) {
            mount::device_size(path).unwrap_or(size)
        } else {
            size
        };
        Ok(Usage {
            filesystem,
            device_bytes,
            condition,
        })
    }

    /// The volume's size: of this pool's, or as last seen from its owner.
    fn size_of(&self, vid: VolumeId) -> Result<u64> {
        match self.remote_of(vid) {
            Some(v) => Ok(v.size()),
            None => Ok(self.pool.volume_info(vid)?.size_bytes),
        }
    }

    /// The owner's volume, if `vid` is staged here from another node.
    fn remote_of(&self, vid: VolumeId) -> Option<Arc<RemoteVolume>> {
        let staged = self.staged.lock().expect("staged");
        staged.get(&vid)?.remote()
    }

    /// The condition of a volume staged here, `None` if it is not staged.
    pub fn condition(&self, vid: VolumeId) -> Option<Condition> {
        let staged = self.staged.lock().expect("staged");
        let entry = staged.get(&vid)?;
        if let Ok(Some(lost)) = self.pool.volume_fault(vid) {
            return Some(Condition::abnormal(lost));
        }
        Some(match &entry.live {
            Ok(_) => Condition::healthy(),
            Err(why) => Condition::abnormal(why.clone()),
        })
    }

    /// Whether this node's own copy of `vid` is staged here, so it must not
    /// be deleted (not a volume of another node of the same ID, reached
    /// over the data path).
    pub fn is_staged_locally(&self, vid: VolumeId) -> bool {
        self.staged
            .lock()
            .expect("staged")
            .get(&vid)
            .is_some_and(Entry::local)
    }

    /// Runs `f` while `vid` is not staged here, and cannot be until `f`
    /// returns (a move's attachment and seal: a stage checks the
    /// attachment under the same lock).
    pub fn unstaged<T>(
        &self,
        vid: VolumeId,
        f: impl FnOnce() -> crate::engine::Result<T>,
    ) -> Result<T> {
        let staged = self.staged.lock().expect("staged");
        if staged.get(&vid).is_some_and(Entry::local) {
            return Err(Error::FailedPrecondition(format!(
                "volume {vid} is staged on node {}: it is in use here",
                self.config.node_id
            )));
        }
        Ok(f()?)
    }

    /// Makes the kernel device (and the filesystem on it) as large as the
    /// volume now is; returns that size.
    pub fn expand(&self, vid: VolumeId, required: u64) -> Result<u64> {
        let remote = self.remote_of(vid);
        let size = match &remote {
            // The owner grew it: ask for the new size.
            Some(v) => v.refresh_size()?,
            None => self.pool.volume_info(vid)?.size_bytes,
        };
        if required > size {
            return Err(Error::OutOfRange(format!(
                "volume {vid} is {size} bytes; expand it (ControllerExpandVolume) to {required} first"
            )));
        }
        let mut staged = self.staged.lock().expect("staged");
        let entry = staged.get_mut(&vid).ok_or_else(|| {
            Error::FailedPrecondition(format!("volume {vid} is not staged on this node"))
        })?;
        if let Some(r) = entry.rec.remote.as_mut()
            && r.size_bytes != size
        {
            r.size_bytes = size;
            self.state.save(&entry.rec)?;
        }
        let attached = entry
            .live
            .as_ref()
            .map_err(|why| Error::FailedPrecondition(why.clone()))?;
        self.backend_of(entry.rec.backend)?.resize(attached, size)?;
        if let Access::Mount { fs_type, .. } = &entry.rec.access {
            mount::grow(fs_type, &attached.device, &entry.rec.staging_path)?;
        }
        Ok(size)
    }

    /// Freezes the filesystem of a volume staged here (for a consistent
    /// snapshot); `None` if there is nothing to freeze (not staged, or a
    /// raw block volume).
    pub fn freeze(&self, vid: VolumeId) -> Result<Option<mount::Frozen>> {
        let staged = self.staged.lock().expect("staged");
        let Some(entry) = staged.get(&vid) else {
            return Ok(None);
        };
        if entry.rec.access == Access::Block {
            return Ok(None);
        }
        if let Err(why) = &entry.live {
            return Err(Error::FailedPrecondition(why.clone()));
        }
        mount::freeze(&entry.rec.staging_path).map(Some)
    }
}

/// The OOM score this process asks for: killing the process that serves
/// mounted volumes would turn a memory shortage into stuck I/O on every
/// one of them (just above -1000, which would exempt it entirely).
const OOM_SCORE_ADJ: i32 = -998;

/// Lowers this process's OOM score. Needs CAP_SYS_RESOURCE; without it the
/// score stays and a warning says so.
fn protect_from_oom_killer() {
    let path = "/proc/self/oom_score_adj";
    if let Err(e) = std::fs::write(path, OOM_SCORE_ADJ.to_string()) {
        tracing::warn!(error = %e, "cannot lower the OOM score to {OOM_SCORE_ADJ} (needs CAP_SYS_RESOURCE): under memory pressure the kernel may kill the process serving mounted volumes");
    }
}

/// Whether the device node at `node` is `device`, or a (read-only
/// publish) loop device over it.
fn shows_device(node: &Path, device: &Path) -> bool {
    let Some(n) = device_numbers(node) else {
        return false;
    };
    device_numbers(device) == Some(n)
        || n.0 == LOOP_MAJOR && loop_backing(n).as_deref() == Some(device)
}

/// The loop device index of the node at `target` if it is a read-only
/// publish loop (a loop over another device, not over a file).
fn read_only_loop(target: &Path) -> Option<u32> {
    let n = device_numbers(target)?;
    if n.0 != LOOP_MAJOR || !loop_backing(n)?.starts_with("/dev/") {
        return None;
    }
    let link = std::fs::read_link(format!("/sys/dev/block/{}:{}", n.0, n.1)).ok()?;
    link.file_name()?
        .to_str()?
        .strip_prefix("loop")?
        .parse()
        .ok()
}

const LOOP_MAJOR: u32 = 7;

fn loop_backing(n: (u32, u32)) -> Option<PathBuf> {
    std::fs::read_to_string(format!("/sys/dev/block/{}:{}/loop/backing_file", n.0, n.1))
        .ok()
        .map(|s| PathBuf::from(s.trim_end()))
}

/// major:minor of a device node.
fn device_numbers(device: &Path) -> Option<(u32, u32)> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let m = std::fs::metadata(device).ok()?;
    m.file_type()
        .is_block_device()
        .then(|| (libc::major(m.rdev()), libc::minor(m.rdev())))
}

/// Whether `a` names an earlier attachment on the same owner than `b`
/// (a lower epoch in its grant): an older publish context.
fn older_grant(a: &Target, b: &Target) -> bool {
    let epoch = |t: &Target| crate::peer::grant::decode(&t.volume_id, &t.grant).map(|g| g.epoch);
    a.owner == b.owner && matches!((epoch(a), epoch(b)), (Some(x), Some(y)) if x < y)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_options_become_flags_and_data() {
        let (flags, data) =
            mount_options(&["noatime,discard".into(), "ro".into()], false, "ext4").unwrap();
        assert_eq!(flags, libc::MS_NOATIME | libc::MS_RDONLY);
        assert_eq!(data, "discard");
        let (flags, data) = mount_options(&[], true, "xfs").unwrap();
        assert_eq!(flags, libc::MS_RDONLY);
        assert_eq!(data, "nouuid", "XFS clones share their source's UUID");
        assert!(mount_options(&["remount".into()], false, "ext4").is_err());
    }
}
