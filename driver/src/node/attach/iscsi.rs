//! The `iscsi` backend: the kernel's iSCSI initiator (open-iscsi's
//! `iscsiadm` and `iscsid`) logged in to this node's own target on a
//! loopback portal (`--iscsi-listen`). One session per volume; the disk is
//! found through sysfs (the session's target's LUN 0), not udev.
//!
//! Across a restart of this process the session stays: iscsid reconnects
//! when the target listens again, and holds the disk's I/O meanwhile for
//! the session's replacement timeout (120 s in Debian's iscsid.conf), so
//! [`Attach::resume`] finds the disk where it was.
//!
//! A volume staged with a CHAP secret (its record's `chap`) has the
//! target require it ([`Secrets::stage`]) from before the login to the
//! logout, and the session logs in with it (mutual CHAP too). A restarted
//! node gives the target the recorded secrets before the target takes
//! logins ([`stage_recorded_secrets`]), so iscsid's reconnect finds them.
//! iscsiadm takes the secret as an argument, so it shows in the process
//! list while iscsiadm runs, as with every driver that uses iscsiadm.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use std::sync::Arc;

use super::{Attach, Attached, Handle, Kind};
use crate::engine::VolumeId;
use crate::frontend::iscsi::TARGET_PREFIX;
use crate::frontend::iscsi::chap::Secrets;
use crate::frontend::{Export, Exports};
use crate::node::error::{Error, Result};
use crate::node::state::{ChapRecord, StagedRecord};

/// iscsiadm's exit codes this backend expects (open-iscsi's
/// `iscsi_err.h`): a session that already exists, and nothing found.
const SESSION_EXISTS: i32 = 15;
const NOTHING_FOUND: i32 = 21;

/// How long a login may take to show its disk.
const DISK_TIMEOUT: Duration = Duration::from_secs(30);

/// Attaches volumes through the kernel's iSCSI initiator.
#[derive(Debug)]
pub struct IscsiAttach {
    /// The node's own target; without one, this backend only removes
    /// attachments (of a start with `--iscsi-listen`).
    portal: Option<SocketAddr>,
    /// The exports the target serves: volumes of other nodes are added
    /// here before their login.
    exports: Exports,
    /// The target's CHAP secrets, where volumes' own are staged.
    chap: Arc<Secrets>,
    sysfs: PathBuf,
}

impl IscsiAttach {
    /// The node's default backend (`--attach iscsi`): needs its own
    /// target on loopback and iscsiadm, now.
    pub fn new(portal: SocketAddr, exports: Exports, chap: Arc<Secrets>) -> Result<Self> {
        let b = Self::for_volumes(Some(portal), exports, chap);
        b.prepare()?;
        // iscsiadm must be there: a session listing (none is fine).
        iscsiadm(&["-m", "session"], &[NOTHING_FOUND])?;
        Ok(b)
    }

    /// The backend of the volumes that ask for `frontend: iscsi` on a node
    /// whose default is another: always there, so that attachments made
    /// by an earlier start are served or removed; a stage without a
    /// loopback `portal` is refused by [`Attach::prepare`].
    pub fn for_volumes(portal: Option<SocketAddr>, exports: Exports, chap: Arc<Secrets>) -> Self {
        IscsiAttach {
            portal,
            exports,
            chap,
            sysfs: PathBuf::from("/sys"),
        }
    }

    fn portal(&self) -> Result<String> {
        match self.portal {
            Some(p) if p.ip().is_loopback() => Ok(p.to_string()),
            Some(p) => Err(Error::FailedPrecondition(format!(
                "iSCSI attaches through this node's own target: --iscsi-listen {p} is not a \
                 loopback address"
            ))),
            None => Err(Error::FailedPrecondition(
                "iSCSI attaches through this node's own target: --iscsi-listen 127.0.0.1:PORT"
                    .into(),
            )),
        }
    }

    /// Has the target require the record's secret for `iqn` (none: what
    /// the secrets file says).
    fn stage_secret(&self, iqn: &str, rec: &StagedRecord) -> Result<()> {
        match &rec.chap {
            Some(c) => self
                .chap
                .stage(iqn, c.secret().map_err(Error::InvalidArgument)?),
            None => self.chap.unstage(iqn),
        }
        Ok(())
    }

    fn login(&self, iqn: &str, chap: Option<&ChapRecord>) -> Result<()> {
        let portal = self.portal()?;
        let node = ["-m", "node", "-T", iqn, "-p", &portal];
        iscsiadm(&[&node[..], &["-o", "new"]].concat(), &[])?;
        // Set either way: a node record left by an earlier stage may hold
        // other settings. `manual`: the host never logs in by itself (at
        // boot) with a record a crash left behind.
        let mut settings = vec![
            ("node.startup", "manual"),
            ("node.session.auth.authmethod", "None"),
        ];
        if let Some(c) = chap {
            settings = vec![
                ("node.startup", "manual"),
                ("node.session.auth.authmethod", "CHAP"),
                ("node.session.auth.username", c.user.as_str()),
                ("node.session.auth.password", c.secret.as_str()),
            ];
            if let (Some(u), Some(s)) = (&c.target_user, &c.target_secret) {
                settings.push(("node.session.auth.username_in", u));
                settings.push(("node.session.auth.password_in", s));
            }
        }
        for (name, value) in settings {
            iscsiadm(
                &[&node[..], &["-o", "update", "-n", name, "-v", value]].concat(),
                &[],
            )?;
        }
        iscsiadm(
            &["-m", "node", "-T", iqn, "-p", &portal, "--login"],
            &[SESSION_EXISTS],
        )
        .map(drop)
    }

    /// Logs out of `iqn` and deletes its node record (with the secret
    /// it holds), on whatever portal: a target name is one volume's.
    fn logout(&self, iqn: &str) -> Result<()> {
        iscsiadm(&["-m", "node", "-T", iqn, "--logout"], &[NOTHING_FOUND])?;
        iscsiadm(&["-m", "node", "-T", iqn, "-o", "delete"], &[NOTHING_FOUND]).map(drop)
    }

    /// Waits for the disk of the session to `iqn`.
    fn wait_disk(&self, iqn: &str) -> Result<PathBuf> {
        let deadline = Instant::now() + DISK_TIMEOUT;
        loop {
            if let Some(d) = disk_of(&self.sysfs, iqn) {
                return Ok(d);
            }
            if Instant::now() >= deadline {
                return Err(Error::Unavailable(format!(
                    "the iSCSI session to {iqn} showed no disk within {DISK_TIMEOUT:?}"
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn attached(&self, iqn: String) -> Result<Attached> {
        let device = self.wait_disk(&iqn)?;
        Ok(Attached {
            device,
            handle: Handle::Iscsi { iqn },
        })
    }
}

fn iqn_of(vid: VolumeId) -> String {
    format!("{TARGET_PREFIX}{vid}")
}

/// Runs iscsiadm; exit codes in `ok` count as success.
fn iscsiadm(args: &[&str], ok: &[i32]) -> Result<String> {
    let out = Command::new("iscsiadm")
        .args(args)
        .output()
        .map_err(|e| Error::Tool {
            command: "iscsiadm".into(),
            status: "not started (is open-iscsi installed?)".into(),
            stderr: e.to_string(),
        })?;
    let code = out.status.code().unwrap_or(-1);
    if !out.status.success() && !ok.contains(&code) {
        return Err(Error::Tool {
            command: format!("iscsiadm {}", shown(args)),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// iscsiadm's arguments for a log line: a secret set with `-n
/// ...password... -v SECRET` is not shown.
fn shown(args: &[&str]) -> String {
    (0..args.len())
        .map(|i| match i.checked_sub(2).map(|n| (args[n], args[n + 1])) {
            Some((name, "-v")) if name.contains("password") => "<secret>",
            _ => args[i],
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The sessions under `sysfs`, as (session directory, target name).
fn sessions(sysfs: &Path) -> Vec<(PathBuf, String)> {
    let Ok(dir) = std::fs::read_dir(sysfs.join("class/iscsi_session")) else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|s| {
            let name = std::fs::read_to_string(s.path().join("targetname")).ok()?;
            Some((s.path(), name.trim().to_string()))
        })
        .collect()
}

/// The disk of LUN 0 of the session to `iqn`: under the session's
/// `device/target*/H:C:T:0/block/`.
fn disk_of(sysfs: &Path, iqn: &str) -> Option<PathBuf> {
    let (session, _) = sessions(sysfs).into_iter().find(|(_, n)| n == iqn)?;
    for target in std::fs::read_dir(session.join("device")).ok()?.flatten() {
        if !target.file_name().to_string_lossy().starts_with("target") {
            continue;
        }
        for lun in std::fs::read_dir(target.path()).ok()?.flatten() {
            if !lun.file_name().to_string_lossy().ends_with(":0") {
                continue;
            }
            let disk = std::fs::read_dir(lun.path().join("block"))
                .ok()?
                .flatten()
                .next()?;
            return Some(PathBuf::from("/dev").join(disk.file_name()));
        }
    }
    None
}

impl Attach for IscsiAttach {
    fn kind(&self) -> Kind {
        Kind::Iscsi
    }

    fn prepare(&self) -> Result<()> {
        self.portal().map(drop)
    }

    fn attach(&self, vid: VolumeId, export: Export, rec: &StagedRecord) -> Result<Attached> {
        let iqn = iqn_of(vid);
        self.stage_secret(&iqn, rec)?;
        if let Export::Remote(r) = export {
            self.exports.add_remote(r);
        }
        let attached = self
            .login(&iqn, rec.chap.as_ref())
            .and_then(|()| self.attached(iqn.clone()));
        if attached.is_err() {
            // Nothing is left half attached.
            if let Err(e) = self.detach(vid) {
                tracing::warn!(volume = %vid, error = %e, "logging out after a failed attach failed");
            }
        }
        attached
    }

    fn resume(&self, vid: VolumeId, export: Export, rec: &StagedRecord) -> Result<Attached> {
        let iqn = iqn_of(vid);
        self.stage_secret(&iqn, rec)?;
        if let Export::Remote(r) = export {
            self.exports.add_remote(r);
        }
        // The session outlived the process before this one (iscsid logs
        // in again once the target listens); log in if it did not.
        if disk_of(&self.sysfs, &iqn).is_none() {
            self.login(&iqn, rec.chap.as_ref())?;
        }
        self.attached(iqn)
    }

    fn resize(&self, attached: &Attached, size: u64) -> Result<()> {
        let Handle::Iscsi { iqn } = &attached.handle else {
            return Err(Error::InvalidArgument("not an iSCSI attachment".into()));
        };
        let disk = disk_of(&self.sysfs, iqn)
            .ok_or_else(|| Error::Unavailable(format!("no disk for the iSCSI session to {iqn}")))?;
        let name = disk
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let rescan = self.sysfs.join("block").join(&name).join("device/rescan");
        std::fs::write(&rescan, b"1").map_err(|source| Error::Io {
            op: "rescan",
            path: rescan.clone(),
            source,
        })?;
        // The new capacity shows once the rescan's READ CAPACITY returned.
        let sectors = self.sysfs.join("block").join(&name).join("size");
        let deadline = Instant::now() + DISK_TIMEOUT;
        loop {
            let now = std::fs::read_to_string(&sectors)
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .unwrap_or(0);
            if now * 512 == size {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Error::Unavailable(format!(
                    "{} shows {} bytes after a rescan, not {size}",
                    disk.display(),
                    now * 512
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn detach(&self, volume: VolumeId) -> Result<()> {
        let iqn = iqn_of(volume);
        self.logout(&iqn)?;
        self.chap.unstage(&iqn);
        self.exports.remove_remote(&volume.to_string());
        Ok(())
    }

    fn strays(&self, known: &[VolumeId]) -> Vec<VolumeId> {
        sessions(&self.sysfs)
            .into_iter()
            .filter_map(|(_, name)| name.strip_prefix(TARGET_PREFIX)?.parse::<VolumeId>().ok())
            .filter(|v| !known.contains(v))
            .collect()
    }
}

/// Gives the target the CHAP secrets of the iSCSI attachments `records`
/// describe, before it takes logins: iscsid's reconnect after a restart
/// must find them. A record whose secret is unusable is left to
/// [`Attach::resume`], which reports it.
pub fn stage_recorded_secrets(records: &[StagedRecord], chap: &Secrets) {
    for rec in records.iter().filter(|r| r.backend == Kind::Iscsi) {
        if let (Ok(vid), Some(Ok(secret))) = (
            rec.volume_id.parse::<VolumeId>(),
            rec.chap.as_ref().map(ChapRecord::secret),
        ) {
            chap.stage(&iqn_of(vid), secret);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The disk is found the way the kernel lays sysfs out for an iSCSI
    /// session, and only for its own target.
    #[test]
    fn secrets_in_iscsiadm_arguments_are_not_shown() {
        let args = [
            "-m",
            "node",
            "-o",
            "update",
            "-n",
            "node.session.auth.password_in",
            "-v",
            "s3cret",
        ];
        assert_eq!(
            shown(&args),
            "-m node -o update -n node.session.auth.password_in -v <secret>"
        );
        let user = ["-n", "node.session.auth.username", "-v", "alice"];
        assert_eq!(shown(&user), "-n node.session.auth.username -v alice");
    }

    #[test]
    fn the_disk_of_a_session_is_found_through_sysfs() {
        let root = tempfile::tempdir().unwrap();
        let sys = root.path();
        let session = sys.join("class/iscsi_session/session3");
        std::fs::create_dir_all(&session).unwrap();
        std::fs::write(session.join("targetname"), "iqn.2026-12.dev.strata:abc\n").unwrap();
        let lun = session.join("device/target4:0:0/4:0:0:0/block/sdc");
        std::fs::create_dir_all(&lun).unwrap();
        std::fs::create_dir_all(session.join("device/power")).unwrap();
        assert_eq!(
            disk_of(sys, "iqn.2026-12.dev.strata:abc"),
            Some(PathBuf::from("/dev/sdc"))
        );
        assert_eq!(disk_of(sys, "iqn.2026-12.dev.strata:other"), None);
        assert_eq!(
            sessions(sys),
            vec![(session, "iqn.2026-12.dev.strata:abc".to_string())]
        );
    }
}
