//! What this node has staged, on disk: one small JSON record per volume in
//! `<state-dir>/staged/<volume>.json`, replaced atomically (write, fsync,
//! rename, fsync the directory). The records are what a restarted node
//! reattaches from. They belong in a directory that does not survive a
//! reboot (the default is under `/run`), exactly like the kernel state
//! (loop devices, mounts) they describe. A record may hold a volume's CHAP
//! secret, so records are readable by their owner only.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::attach::Kind;
use super::error::{Error, Result, io};
use crate::frontend::fuse::abi::Negotiated;

/// How far a stage got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Phase {
    /// Recorded before attaching; a restart finds this and rolls back.
    Attaching,
    /// Attached (and, for filesystems, mounted at the staging path).
    Staged,
}

/// How the volume is used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "type")]
pub enum Access {
    /// Raw block: the device node is what gets published.
    Block,
    /// A filesystem mounted at the staging path.
    Mount {
        fs_type: String,
        mount_flags: Vec<String>,
    },
}

/// One staged volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StagedRecord {
    pub volume_id: String,
    pub phase: Phase,
    pub backend: Kind,
    /// The block device (`/dev/loopN`, `/dev/nbdN`), once attached.
    pub device: Option<PathBuf>,
    pub staging_path: PathBuf,
    pub access: Access,
    /// Mounted read-only (a reader-only access mode).
    pub read_only: bool,
    /// What the FUSE connection negotiated (FUSE backend only).
    pub fuse: Option<Negotiated>,
    /// Where NodePublishVolume published it (writable ones, for
    /// SINGLE_NODE_SINGLE_WRITER: mounts kubelet makes of a publish, like
    /// its block-device map, are not publishes).
    #[serde(default)]
    pub writers: Vec<PathBuf>,
    /// Why the attachment may have lost I/O (served again, but reported
    /// abnormal until it is unstaged).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broken: Option<String>,
    /// Held by another node: where, and with which grant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote: Option<RemoteRecord>,
    /// The CHAP secret the volume's target needs while it is staged
    /// (`frontend: iscsi` with a node-stage Secret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chap: Option<ChapRecord>,
}

/// A volume's CHAP secret, from its node-stage Secret: what the node's
/// initiator logs in with, and (mutual CHAP) what the target answers with.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChapRecord {
    pub user: String,
    pub secret: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_secret: Option<String>,
}

impl std::fmt::Debug for ChapRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChapRecord")
            .field("user", &self.user)
            .field("mutual", &self.target_user.is_some())
            .finish_non_exhaustive()
    }
}

impl ChapRecord {
    /// The secret as the target checks it; too short a secret is refused.
    pub fn secret(&self) -> std::result::Result<crate::frontend::iscsi::chap::Secret, String> {
        let target = match (&self.target_user, &self.target_secret) {
            (Some(u), Some(s)) => Some((u.as_str(), s.as_str())),
            (None, None) => None,
            _ => return Err("mutual CHAP needs both the target's user and secret".into()),
        };
        crate::frontend::iscsi::chap::Secret::new(&self.user, &self.secret, target)
    }
}

/// A volume staged here that another node holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RemoteRecord {
    pub target: crate::peer::Target,
    /// Its size when last seen (a restart serves it without asking).
    pub size_bytes: u64,
}

/// The records directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    pub fn open(state_dir: &Path) -> Result<StateDir> {
        let dir = state_dir.join("staged");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io("create", &dir))?;
        // Also a directory an older version made.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            .map_err(io("chmod", &dir))?;
        Ok(StateDir { dir })
    }

    fn path(&self, volume: &str) -> PathBuf {
        self.dir.join(format!("{volume}.json"))
    }

    /// Every record, in name order; unreadable ones are errors, because
    /// skipping them would forget a staged volume.
    pub fn load_all(&self) -> Result<Vec<StagedRecord>> {
        let mut names: Vec<PathBuf> = std::fs::read_dir(&self.dir)
            .map_err(io("list", &self.dir))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        names.sort();
        names
            .into_iter()
            .map(|p| {
                let text = std::fs::read(&p).map_err(io("read", &p))?;
                serde_json::from_slice(&text).map_err(|e| Error::State {
                    path: p.clone(),
                    why: e.to_string(),
                })
            })
            .collect()
    }

    pub fn save(&self, rec: &StagedRecord) -> Result<()> {
        let path = self.path(&rec.volume_id);
        let tmp = path.with_extension("json.tmp");
        let body = serde_json::to_vec_pretty(rec).map_err(|e| Error::State {
            path: path.clone(),
            why: e.to_string(),
        })?;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io("create", &tmp))?;
        // Also a leftover an older version made.
        f.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(io("chmod", &tmp))?;
        f.write_all(&body).map_err(io("write", &tmp))?;
        f.sync_all().map_err(io("sync", &tmp))?;
        std::fs::rename(&tmp, &path).map_err(io("rename", &path))?;
        self.sync_dir()
    }

    pub fn remove(&self, volume: &str) -> Result<()> {
        let path = self.path(volume);
        match std::fs::remove_file(&path) {
            Ok(()) => self.sync_dir(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io("remove", &path)(e)),
        }
    }

    fn sync_dir(&self) -> Result<()> {
        std::fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io("sync", &self.dir))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_removal_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        let rec = StagedRecord {
            volume_id: "v1".into(),
            phase: Phase::Staged,
            backend: Kind::Fuse,
            device: Some("/dev/loop3".into()),
            staging_path: "/var/lib/kubelet/x/globalmount".into(),
            access: Access::Mount {
                fs_type: "xfs".into(),
                mount_flags: vec!["noatime".into()],
            },
            read_only: false,
            fuse: Some(Negotiated {
                minor: 40,
                max_write: 256 << 10,
                resend: true,
            }),
            writers: vec!["/var/lib/kubelet/pods/p/volumes/x".into()],
            broken: Some("nothing served it".into()),
            remote: None,
            chap: Some(ChapRecord {
                user: "u".into(),
                secret: "a-long-enough-secret".into(),
                target_user: None,
                target_secret: None,
            }),
        };
        state.save(&rec).unwrap();
        let mut other = rec.clone();
        other.volume_id = "v0".into();
        other.access = Access::Block;
        state.save(&other).unwrap();
        assert_eq!(state.load_all().unwrap(), vec![other, rec.clone()]);
        // The record holds a secret: its owner alone reads it.
        let mode = std::fs::metadata(dir.path().join("staged/v1.json")).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o077,
            0
        );
        assert!(
            !format!("{rec:?}").contains("a-long-enough"),
            "a secret in Debug"
        );
        state.remove("v1").unwrap();
        state.remove("v1").unwrap();
        assert_eq!(state.load_all().unwrap().len(), 1);
        std::fs::write(dir.path().join("staged/bad.json"), b"{").unwrap();
        assert!(state.load_all().is_err(), "a corrupt record is not skipped");
    }
}
