//! The FUSE + loop backend.
//!
//! ```text
//! attach:  mkdir <state>/fuse/<vol> ─▶ mount fuse.strata there (fd F) ─▶ serve F (INIT)
//!          ─▶ fd holder keeps a dup of F ─▶ loop device over <dir>/disk (4096 B sectors, direct I/O)
//! restart: fd holder hands F back ─▶ serve F again ─▶ FUSE_NOTIFY_RESEND (unanswered requests)
//! detach:  loop detach ─▶ unmount <dir> (the workers see ENODEV) ─▶ holder drops F ─▶ rmdir
//! ```

use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use super::{Attach, Attached, Handle, Kind, SECTOR_SIZE};
use crate::engine::VolumeId;
use crate::frontend::Export;
use crate::frontend::fuse::{self, FILE_NAME, FuseConfig};
use crate::metrics::Metrics;
use crate::node::error::{Error, Result, io};
use crate::node::holder::Holder;
use crate::node::state::StagedRecord;
use crate::node::{HolderStart, loopdev, mount};

/// Attaches volumes as FUSE files with loop devices over them.
#[derive(Debug)]
pub struct FuseAttach {
    /// `<state>/fuse`: one mountpoint per attached volume.
    dir: PathBuf,
    holder: Holder,
    start: HolderStart,
    /// A holder answered once: from then on an attach does not wait for
    /// one (a missing holder is an error at once, not a 30 s stall).
    holder_seen: AtomicBool,
    /// A duplicate of every connection this process serves, by volume, to
    /// hand to a holder that starts anew (a holder pod replaced, or one
    /// that came up beside an older one).
    served: Arc<Mutex<HashMap<String, OwnedFd>>>,
    holder_log: PathBuf,
    metrics: Arc<Metrics>,
    config: FuseConfig,
}

impl FuseAttach {
    pub fn new(state_dir: &Path, start: HolderStart, metrics: Arc<Metrics>) -> Result<Self> {
        let dir = state_dir.join("fuse");
        std::fs::create_dir_all(&dir).map_err(io("create", &dir))?;
        let holder = Holder::new(state_dir.join("fuse-holder.sock"));
        let served = Arc::new(Mutex::new(HashMap::new()));
        watch_holder(holder.clone(), Arc::downgrade(&served));
        Ok(FuseAttach {
            dir,
            holder,
            start,
            holder_seen: AtomicBool::new(false),
            served,
            holder_log: state_dir.join("fuse-holder.log"),
            metrics,
            config: FuseConfig::default(),
        })
    }

    fn mountpoint(&self, volume: VolumeId) -> PathBuf {
        self.dir.join(volume.to_string())
    }

    fn attach_mounted(&self, vid: VolumeId, export: Export, dir: &Path) -> Result<Attached> {
        let vid = vid.to_string();
        let read_only = export.read_only();
        let fd = mount_fuse(dir, &self.config).map_err(io("mount FUSE at", dir))?;
        let session = fuse::serve(fd, export, Arc::clone(&self.metrics), self.config, None)
            .map_err(io("serve FUSE at", dir))?;
        let negotiated = session
            .wait_initialized(Duration::from_secs(10))
            .map_err(io("initialise FUSE at", dir))?;
        let dup = session
            .dup_fd()
            .map_err(io("duplicate the FUSE fd of", dir))?;
        self.holder.put(&vid, dup.as_raw_fd())?;
        self.served.lock().expect("served").insert(vid.clone(), dup);
        let file = dir.join(FILE_NAME);
        let lo = loopdev::attach(&file, SECTOR_SIZE, read_only)?;
        if !lo.direct_io {
            tracing::warn!(volume = %vid, "loop device without direct I/O: its data is cached twice");
        }
        Ok(Attached {
            device: loopdev::device_path(lo.index),
            handle: Handle::Fuse {
                session,
                loop_index: lo.index,
                negotiated,
            },
        })
    }
}

impl FuseAttach {
    /// Makes sure a holder answers: started here, or (the first time, and
    /// when `wait`) waited for.
    fn ensure_holder(&self, wait: bool) -> Result<u32> {
        let pid = match &self.start {
            HolderStart::Spawn(exe) => self.holder.ensure_running(exe, &self.holder_log),
            HolderStart::External if wait && !self.holder_seen.load(Ordering::Acquire) => {
                self.holder.wait(EXTERNAL_HOLDER_WAIT)
            }
            HolderStart::External => self.holder.wait(Duration::ZERO),
        }?;
        self.holder_seen.store(true, Ordering::Release);
        Ok(pid)
    }
}

/// Every few seconds, a thread asks which holder answers; when it changes
/// (a new holder), it gets a duplicate of every connection served here, so
/// a holder that restarted no longer holds nothing. Ends with the backend.
fn watch_holder(holder: Holder, served: Weak<Mutex<HashMap<String, OwnedFd>>>) {
    let spawned = std::thread::Builder::new()
        .name("strata-fd-holder-watch".into())
        .spawn(move || {
            let mut known = holder.instance();
            loop {
                std::thread::sleep(HOLDER_WATCH);
                let Some(served) = served.upgrade() else {
                    return;
                };
                let now = holder.instance();
                if now.is_some() && now != known {
                    let served = served.lock().expect("served");
                    tracing::info!(instance = ?now, volumes = served.len(), "a new FUSE fd holder: handing it every connection");
                    let all = served
                        .iter()
                        .all(|(vid, fd)| match holder.put(vid, fd.as_raw_fd()) {
                            Ok(()) => true,
                            Err(e) => {
                                tracing::warn!(volume = vid, error = %e, "handing a connection to the fd holder");
                                false
                            }
                        });
                    if !all {
                        continue;
                    }
                }
                known = now;
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the fd holder watch");
    }
}

/// How often the holder's pid is checked.
const HOLDER_WATCH: Duration = Duration::from_secs(5);

/// How long a node waits for an external fd holder to answer.
const EXTERNAL_HOLDER_WAIT: Duration = Duration::from_secs(30);

impl Attach for FuseAttach {
    fn kind(&self) -> Kind {
        Kind::Fuse
    }

    fn prepare(&self) -> Result<()> {
        self.ensure_holder(true).map(drop)
    }

    fn attach(&self, vid: VolumeId, export: Export, _rec: &StagedRecord) -> Result<Attached> {
        self.ensure_holder(false)?;
        let dir = self.mountpoint(vid);
        if mount::mount_at(&dir)?.is_some() {
            // A leftover of an attach that never got recorded.
            self.detach(vid)?;
        }
        std::fs::create_dir_all(&dir).map_err(io("create", &dir))?;
        self.attach_mounted(vid, export, &dir).inspect_err(|_| {
            if let Err(e) = self.detach(vid) {
                tracing::warn!(volume = %vid, error = %e, "cleaning up a failed attach");
            }
        })
    }

    fn resume(&self, vid: VolumeId, export: Export, rec: &StagedRecord) -> Result<Attached> {
        let dir = self.mountpoint(vid);
        let lost = |why: &str| {
            Error::Unavailable(format!(
                "the FUSE connection of volume {vid} is lost ({why}); its device returns I/O \
                 errors. Unpublish and unstage it (restart the pod) to attach it again"
            ))
        };
        let negotiated = rec
            .fuse
            .ok_or_else(|| lost("no FUSE parameters recorded"))?;
        // An external holder may still be starting (its pod and ours
        // scheduled together): the first resume waits for it, once.
        if self.start == HolderStart::External {
            let _ = self.ensure_holder(true);
        }
        let fd = match self.holder.get(&vid.to_string()) {
            Ok(Some(fd)) => fd,
            Ok(None) => return Err(lost("the fd holder no longer has it")),
            Err(_) => return Err(lost("the fd holder is not running")),
        };
        let dup = fd
            .try_clone()
            .map_err(io("duplicate the FUSE fd of", &dir))?;
        let session = fuse::serve(
            fd,
            export,
            Arc::clone(&self.metrics),
            self.config,
            Some(negotiated),
        )
        .map_err(io("serve FUSE at", &dir))?;
        self.served
            .lock()
            .expect("served")
            .insert(vid.to_string(), dup);
        let file = dir.join(FILE_NAME);
        let loop_index = rec
            .device
            .as_ref()
            .and_then(|d| d.to_str()?.strip_prefix("/dev/loop")?.parse().ok())
            .filter(|i| loopdev::backing_file(*i).as_deref() == Some(file.as_path()))
            .ok_or_else(|| lost("its loop device is gone"))?;
        Ok(Attached {
            device: loopdev::device_path(loop_index),
            handle: Handle::Fuse {
                session,
                loop_index,
                negotiated,
            },
        })
    }

    fn resize(&self, attached: &Attached, _size: u64) -> Result<()> {
        let Handle::Fuse {
            session,
            loop_index,
            ..
        } = &attached.handle
        else {
            return Err(Error::InvalidArgument("not a FUSE attachment".into()));
        };
        let file = loopdev::backing_file(*loop_index).ok_or_else(|| {
            Error::Unavailable(format!("loop device {loop_index} is not attached"))
        })?;
        session
            .size_changed()
            .map_err(io("invalidate the size of", &file))?;
        // A stat refreshes the kernel's idea of the file's size, which is
        // what the loop device reads.
        std::fs::metadata(&file).map_err(io("stat", &file))?;
        loopdev::set_capacity(*loop_index)
    }

    /// Strata FUSE mounts under our directory that no record names.
    fn strays(&self, known: &[VolumeId]) -> Vec<VolumeId> {
        let Ok(mounts) = mount::mounts() else {
            return Vec::new();
        };
        mounts
            .iter()
            .filter(|m| m.fs_type == "fuse.strata" && m.mount_point.parent() == Some(&self.dir))
            .filter_map(|m| m.mount_point.file_name()?.to_str()?.parse().ok())
            .filter(|v| !known.contains(v))
            .collect()
    }

    fn detach(&self, volume: VolumeId) -> Result<()> {
        let dir = self.mountpoint(volume);
        for index in loopdev::find(&dir.join(FILE_NAME)) {
            loopdev::detach(index)?;
        }
        if mount::mount_at(&dir)?.is_some() {
            mount::unmount_patiently(&dir)?;
        }
        self.served
            .lock()
            .expect("served")
            .remove(&volume.to_string());
        if self.holder.ping().is_some() {
            self.holder.drop_fd(&volume.to_string())?;
        }
        match std::fs::remove_dir(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io("remove", &dir)(e)),
        }
    }
}

/// Mounts an empty Strata FUSE filesystem at `mountpoint` and returns the
/// `/dev/fuse` descriptor that serves it. Needs CAP_SYS_ADMIN.
fn mount_fuse(mountpoint: &Path, config: &FuseConfig) -> std::io::Result<OwnedFd> {
    let dev = c"/dev/fuse";
    // SAFETY: a valid NUL-terminated path and flags; the result is checked.
    let raw = unsafe { libc::open(dev.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `raw` is a descriptor we just opened and own.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let options = format!(
        "fd={raw},rootmode=40000,user_id=0,group_id=0,default_permissions,allow_other,max_read={}",
        config.max_write
    );
    mount::mount(
        "strata",
        mountpoint,
        "fuse.strata",
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        &options,
    )?;
    Ok(fd)
}
