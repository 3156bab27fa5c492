//! How a volume becomes a block device of this node's kernel. Two
//! backends behind one interface, [`Attach`]:
//!
//! - `nbd`: the kernel's nbd driver, configured over generic netlink with
//!   sockets already negotiated with our NBD server (the production path).
//!   A dead-connection timeout keeps the device waiting across a restart,
//!   and the restarted node hands it new sockets (`NBD_CMD_RECONFIGURE`).
//! - `fuse`: the volume served as a file through FUSE and attached with a
//!   loop device (nodes without the nbd module). The fd holder keeps the
//!   FUSE connection alive across a restart.
//!
//! - `iscsi`: the kernel's iSCSI initiator (open-iscsi) logged in to this
//!   node's own target on loopback: for every volume with `--attach
//!   iscsi` (never chosen by `auto`), or for the volumes whose StorageClass
//!   says `frontend: iscsi` on a node with a loopback `--iscsi-listen`.
//!   iscsid keeps the session across a restart.
//!
//! All attach with a 4096-byte logical sector size. [`choose`] picks the
//! node's default from the node flag and what the kernel offers.

mod fuse;
mod iscsi;
mod nbd;

pub use fuse::FuseAttach;
pub use iscsi::{IscsiAttach, stage_recorded_secrets};
pub use nbd::{DEAD_CONN_TIMEOUT_SECS, NbdAttach};

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::error::{Error, Result};
use super::state::StagedRecord;
use crate::engine::VolumeId;
use crate::frontend::Export;
use crate::frontend::fuse::FuseSession;
use crate::frontend::fuse::abi::Negotiated;

/// The logical sector size of every attached device.
pub const SECTOR_SIZE: u32 = 4096;

/// Which backend attached a volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Kind {
    Nbd,
    Fuse,
    Iscsi,
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Kind::Nbd => "nbd",
            Kind::Fuse => "fuse",
            Kind::Iscsi => "iscsi",
        })
    }
}

/// What the node was told to use (`--attach`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Choice {
    /// nbd if the kernel has the nbd driver, otherwise fuse.
    Auto,
    Nbd,
    Fuse,
    /// The kernel's iSCSI initiator, logged in to this node's own target
    /// (needs `--iscsi-listen` on loopback and iscsid running).
    Iscsi,
}

/// What this kernel offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    /// The generic netlink family ID of the nbd driver, if loaded.
    pub nbd_family: Option<u16>,
    /// `/dev/fuse` exists.
    pub fuse: bool,
    /// `/dev/loop-control` exists.
    pub loop_control: bool,
}

impl Probe {
    /// Looks at the running kernel.
    pub fn kernel() -> Probe {
        let nbd_family = super::netlink::Genl::open()
            .and_then(|mut g| g.family("nbd"))
            .unwrap_or_else(|e| {
                tracing::warn!(error = %e, "cannot ask the kernel for the nbd netlink family");
                None
            });
        Probe {
            nbd_family,
            fuse: std::path::Path::new("/dev/fuse").exists(),
            loop_control: std::path::Path::new("/dev/loop-control").exists(),
        }
    }
}

/// Picks the backend; the string says why, for the log.
pub fn choose(choice: Choice, probe: &Probe) -> Result<(Kind, String)> {
    let fuse_ok = probe.fuse && probe.loop_control;
    let fuse_missing = || {
        let mut missing = Vec::new();
        if !probe.fuse {
            missing.push("/dev/fuse");
        }
        if !probe.loop_control {
            missing.push("/dev/loop-control");
        }
        missing.join(" and ")
    };
    match (choice, probe.nbd_family) {
        (Choice::Iscsi, _) => Ok((
            Kind::Iscsi,
            "the kernel's iSCSI initiator, logged in to this node's own target (--attach iscsi)"
                .into(),
        )),
        (Choice::Nbd | Choice::Auto, Some(id)) => Ok((
            Kind::Nbd,
            format!("the kernel's nbd driver (netlink family {id})"),
        )),
        (Choice::Nbd, None) => Err(Error::Unavailable(
            "--attach nbd: the kernel has no nbd driver (generic netlink family \"nbd\" not \
             found; `modprobe nbd`, or use --attach fuse)"
                .into(),
        )),
        (Choice::Fuse | Choice::Auto, _) if fuse_ok => Ok((
            Kind::Fuse,
            if choice == Choice::Auto {
                "FUSE + loop device: the kernel has no nbd driver (generic netlink family \
                 \"nbd\" not found)"
                    .into()
            } else {
                "FUSE + loop device (--attach fuse)".into()
            },
        )),
        (Choice::Fuse, _) => Err(Error::Unavailable(format!(
            "--attach fuse: {} missing",
            fuse_missing()
        ))),
        (Choice::Auto, _) => Err(Error::Unavailable(format!(
            "no way to attach volumes: no nbd driver, and {} missing",
            fuse_missing()
        ))),
    }
}

/// A live attachment.
#[derive(Debug)]
pub struct Attached {
    /// The block device the volume is.
    pub device: PathBuf,
    pub handle: Handle,
}

/// What the backend keeps of a live attachment.
#[derive(Debug)]
pub enum Handle {
    Fuse {
        session: FuseSession,
        loop_index: u32,
        negotiated: Negotiated,
    },
    Nbd {
        index: u32,
        /// The backend identifier given at connect (the volume ID), which
        /// the kernel wants again in every reconfigure of the device.
        backend: String,
    },
    Iscsi {
        /// The target the session is logged in to.
        iqn: String,
    },
}

/// A way to attach volumes to this kernel.
pub trait Attach: Send + Sync + std::fmt::Debug {
    fn kind(&self) -> Kind;

    /// What an attach needs that may take a while (waiting for a helper
    /// process): called before the node takes its locks.
    fn prepare(&self) -> Result<()> {
        Ok(())
    }

    /// Makes `export` (volume `vid`, of this node or another) a block
    /// device, as its record (being made) says. On error nothing is left
    /// attached.
    fn attach(&self, vid: VolumeId, export: Export, rec: &StagedRecord) -> Result<Attached>;

    /// Serves an attachment made before this process started (from its
    /// record), or says why it cannot be saved.
    fn resume(&self, vid: VolumeId, export: Export, rec: &StagedRecord) -> Result<Attached>;

    /// Makes the kernel see the volume's new size.
    fn resize(&self, attached: &Attached, size: u64) -> Result<()>;

    /// Removes whatever of an attachment of `volume` exists (also a partial
    /// or broken one). Idempotent.
    fn detach(&self, volume: VolumeId) -> Result<()>;

    /// Why the attachments served again at this start may have failed I/O
    /// while nothing served them (the process before this one stopped too
    /// long ago), if they may have.
    fn missed(&self) -> Option<String> {
        None
    }

    /// Called once every recorded attachment is served again.
    fn serving(&self) -> Result<()> {
        Ok(())
    }

    /// Attachments this backend finds on the node for volumes not in
    /// `known`: leftovers of a crash between attaching and recording.
    fn strays(&self, _known: &[VolumeId]) -> Vec<VolumeId> {
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(nbd: Option<u16>, fuse: bool) -> Probe {
        Probe {
            nbd_family: nbd,
            fuse,
            loop_control: fuse,
        }
    }

    #[test]
    fn auto_prefers_the_kernel_nbd_driver_and_falls_back_to_fuse() {
        assert_eq!(
            choose(Choice::Auto, &probe(Some(30), true)).unwrap().0,
            Kind::Nbd
        );
        let (kind, why) = choose(Choice::Auto, &probe(None, true)).unwrap();
        assert_eq!(kind, Kind::Fuse);
        assert!(why.contains("no nbd driver"), "{why}");
        assert!(choose(Choice::Auto, &probe(None, false)).is_err());
        assert!(choose(Choice::Nbd, &probe(None, true)).is_err());
        assert_eq!(
            choose(Choice::Fuse, &probe(Some(30), true)).unwrap().0,
            Kind::Fuse
        );
        let e = choose(Choice::Fuse, &probe(Some(30), false)).unwrap_err();
        assert!(e.to_string().contains("/dev/fuse"), "{e}");
        // iSCSI only when asked, whatever the kernel offers.
        for p in [probe(Some(30), true), probe(None, false)] {
            assert_eq!(choose(Choice::Iscsi, &p).unwrap().0, Kind::Iscsi);
        }
    }

    /// The probe talks netlink to the running kernel for real; whatever it
    /// finds, the choice must follow from it (on the machines Strata is
    /// built on there is no nbd module, so this picks FUSE there).
    #[test]
    fn the_running_kernel_is_probed_and_the_choice_follows() {
        let p = Probe::kernel();
        match choose(Choice::Auto, &p) {
            Ok((Kind::Nbd, _)) => assert!(p.nbd_family.is_some()),
            Ok((Kind::Fuse, _)) => assert!(p.nbd_family.is_none() && p.fuse && p.loop_control),
            Err(_) => assert!(p.nbd_family.is_none() && !(p.fuse && p.loop_control)),
            Ok((Kind::Iscsi, why)) => panic!("auto chose iSCSI: {why}"),
        }
    }
}
