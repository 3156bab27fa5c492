//! StorageClass and VolumeSnapshotClass parameters, and sizes.

use std::collections::{BTreeMap, HashMap};

use csi_proto::csi::v1::VolumeCapability;
use csi_proto::csi::v1::volume_capability::AccessType;
use tonic::Status;

use crate::engine::BLOCK_SIZE;
use crate::node::attach::Kind;
use crate::node::state::ChapRecord;

/// Filesystems Strata can put on a volume.
pub(crate) const FS_TYPES: [&str; 2] = ["ext4", "xfs"];

/// The filesystem of a mount volume that names none.
pub(crate) const DEFAULT_FS_TYPE: &str = "ext4";

/// Prefix of the keys the CSI sidecars add (e.g. with
/// `--extra-create-metadata`); they are accepted and ignored here.
const SIDECAR_PREFIX: &str = "csi.storage.k8s.io/";

/// Validated StorageClass parameters.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct VolumeParams {
    pub fs_type: Option<String>,
    /// Chain depth past which the volume is merged (`maxChainDepth`).
    pub max_chain_depth: Option<u32>,
    /// Flatten a volume made from a snapshot or a volume in the background
    /// (`flattenClones`), so it never pins its source's layers.
    pub flatten_clones: bool,
    /// `locality: node`: only the volume's own node attaches it (the
    /// default, `anywhere`, lets every node attach it over the data path).
    pub node_local: bool,
    /// `dataLocality: best-effort`: the volume moves live to the node that
    /// has attached it from another node for a while.
    pub follow_pod: bool,
}

fn boolean(key: &str, v: &str) -> Result<bool, Status> {
    match v {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(Status::invalid_argument(format!(
            "parameter {key}={v:?}: use \"true\" or \"false\""
        ))),
    }
}

/// Parses CreateVolume parameters; unknown keys are INVALID_ARGUMENT.
pub(crate) fn volume_params(params: &HashMap<String, String>) -> Result<VolumeParams, Status> {
    let mut out = VolumeParams::default();
    for (k, v) in params {
        match k.as_str() {
            "fsType" | "csi.storage.k8s.io/fstype" => {
                if !FS_TYPES.contains(&v.as_str()) {
                    return Err(Status::invalid_argument(format!(
                        "parameter fsType={v:?} is not supported; use one of {FS_TYPES:?}"
                    )));
                }
                out.fs_type = Some(v.clone());
            }
            "maxChainDepth" => match v.parse::<u32>() {
                Ok(d) if (2..=4096).contains(&d) => out.max_chain_depth = Some(d),
                _ => {
                    return Err(Status::invalid_argument(format!(
                        "parameter maxChainDepth={v:?}: a whole number from 2 to 4096"
                    )));
                }
            },
            "flattenClones" => out.flatten_clones = boolean(k, v)?,
            "locality" => {
                out.node_local = match v.as_str() {
                    "anywhere" => false,
                    "node" => true,
                    _ => {
                        return Err(Status::invalid_argument(format!(
                            "parameter locality={v:?}: use \"anywhere\" (any node attaches the \
                             volume) or \"node\" (only the node that holds it)"
                        )));
                    }
                }
            }
            "dataLocality" => {
                out.follow_pod = match v.as_str() {
                    "disabled" => false,
                    "best-effort" => true,
                    _ => {
                        return Err(Status::invalid_argument(format!(
                            "parameter dataLocality={v:?}: use \"disabled\" or \"best-effort\" \
                             (the volume moves to the node that attaches it)"
                        )));
                    }
                }
            }
            "frontend" => {
                frontend(Some(v))?;
            }
            k if k.starts_with(SIDECAR_PREFIX) => {}
            k => {
                return Err(Status::invalid_argument(format!(
                    "unknown parameter {k:?}; Strata accepts fsType, frontend, maxChainDepth, flattenClones, locality and dataLocality"
                )));
            }
        }
    }
    if out.follow_pod && out.node_local {
        return Err(Status::invalid_argument(
            "parameters locality=node and dataLocality=best-effort contradict each other: a \
             volume only its own node attaches never moves",
        ));
    }
    Ok(out)
}

/// The parameters that define a volume (for comparing repeated creates):
/// everything but the sidecars' per-request metadata.
pub(crate) fn defining(params: &HashMap<String, String>) -> BTreeMap<String, String> {
    params
        .iter()
        .filter(|(k, _)| !k.starts_with(SIDECAR_PREFIX))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// The backend a volume's `frontend` parameter (in its volume context)
/// asks for: `nbd` (also unset) is the node's default (the kernel's nbd
/// driver, or FUSE + loop where it has none), `iscsi` the kernel's iSCSI
/// initiator logged in to the node's own target.
pub(crate) fn frontend(value: Option<&String>) -> Result<Option<Kind>, Status> {
    match value.map(String::as_str) {
        None | Some("nbd") => Ok(None),
        Some("iscsi") => Ok(Some(Kind::Iscsi)),
        Some(v) => Err(Status::invalid_argument(format!(
            "parameter frontend={v:?}: use \"nbd\" (the node's default attach) or \"iscsi\""
        ))),
    }
}

/// The keys of a node-stage Secret with a volume's CHAP secret: those of
/// Kubernetes' iSCSI volumes (`_in`: mutual CHAP, what the target answers
/// with).
const CHAP_KEYS: [&str; 4] = [
    "node.session.auth.username",
    "node.session.auth.password",
    "node.session.auth.username_in",
    "node.session.auth.password_in",
];

/// A volume's CHAP secret from NodeStageVolume's secrets (none given:
/// none). Errors name keys, never values.
pub(crate) fn chap_secret(secrets: &HashMap<String, String>) -> Result<Option<ChapRecord>, Status> {
    if secrets.is_empty() {
        return Ok(None);
    }
    if let Some(k) = secrets.keys().find(|k| !CHAP_KEYS.contains(&k.as_str())) {
        return Err(Status::invalid_argument(format!(
            "node-stage secret key {k:?} is not known; Strata takes {CHAP_KEYS:?}"
        )));
    }
    let get = |i: usize| secrets.get(CHAP_KEYS[i]).cloned();
    let (Some(user), Some(secret)) = (get(0), get(1)) else {
        return Err(Status::invalid_argument(format!(
            "the node-stage secret needs both {} and {}",
            CHAP_KEYS[0], CHAP_KEYS[1]
        )));
    };
    let rec = ChapRecord {
        user,
        secret,
        target_user: get(2),
        target_secret: get(3),
    };
    rec.secret()
        .map_err(|e| Status::invalid_argument(format!("node-stage secret: {e}")))?;
    Ok(Some(rec))
}

/// The mutable parameters (VolumeAttributesClass, or CreateVolume's
/// `mutable_parameters`): a volume's I/O limits. Values are whole numbers,
/// bytes with an optional Ki/Mi/Gi (or KiB/MiB/GiB) unit; "0" removes a
/// limit.
pub(crate) const LIMIT_KEYS: [&str; 4] = [
    "readIOPS",
    "writeIOPS",
    "readBytesPerSecond",
    "writeBytesPerSecond",
];

/// `limits` with the mutable parameters in `params` applied; unknown keys
/// and bad values are INVALID_ARGUMENT.
pub(crate) fn limits(
    params: &HashMap<String, String>,
    mut limits: crate::engine::Limits,
) -> Result<crate::engine::Limits, Status> {
    for (k, v) in params {
        let bad =
            |why: &str| Status::invalid_argument(format!("mutable parameter {k}={v:?}: {why}"));
        let (digits, unit) = v.split_at(v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len()));
        let scale: u64 = match unit {
            "" => 1,
            "Ki" | "KiB" => 1 << 10,
            "Mi" | "MiB" => 1 << 20,
            "Gi" | "GiB" => 1 << 30,
            _ => return Err(bad("a whole number, with Ki, Mi or Gi for bytes")),
        };
        let n = digits
            .parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(scale))
            .ok_or_else(|| bad("a whole number, with Ki, Mi or Gi for bytes"))?;
        if scale != 1 && k.ends_with("IOPS") {
            return Err(bad("operations take no unit"));
        }
        match k.as_str() {
            "readIOPS" => limits.read_iops = n,
            "writeIOPS" => limits.write_iops = n,
            "readBytesPerSecond" => limits.read_bytes_per_sec = n,
            "writeBytesPerSecond" => limits.write_bytes_per_sec = n,
            _ => {
                return Err(Status::invalid_argument(format!(
                    "unknown mutable parameter {k:?}; Strata accepts {LIMIT_KEYS:?}"
                )));
            }
        }
    }
    limits
        .check()
        .map_err(|why| Status::invalid_argument(format!("mutable parameters: {why}")))?;
    Ok(limits)
}

/// Validated VolumeSnapshotClass parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct SnapshotParams {
    /// Freeze the mounted filesystem around the snapshot.
    pub freeze: bool,
}

/// Parses CreateSnapshot parameters; unknown keys are INVALID_ARGUMENT.
pub(crate) fn snapshot_params(params: &HashMap<String, String>) -> Result<SnapshotParams, Status> {
    let mut out = SnapshotParams::default();
    for (k, v) in params {
        match k.as_str() {
            "freezeFilesystem" => out.freeze = boolean(k, v)?,
            k if k.starts_with(SIDECAR_PREFIX) => {}
            k => {
                return Err(Status::invalid_argument(format!(
                    "unknown snapshot parameter {k:?}; Strata accepts freezeFilesystem"
                )));
            }
        }
    }
    Ok(out)
}

/// Checks a group snapshot's parameters: only the sidecar's own. A group
/// is crash-consistent; filesystems are not frozen for it.
pub(crate) fn group_snapshot_params(params: &HashMap<String, String>) -> Result<(), Status> {
    match params.keys().find(|k| !k.starts_with(SIDECAR_PREFIX)) {
        None => Ok(()),
        Some(k) if k == "freezeFilesystem" => Err(Status::invalid_argument(
            "freezeFilesystem is not supported for group snapshots: a group is cut \
             crash-consistent across its volumes, with no filesystem frozen",
        )),
        Some(k) => Err(Status::invalid_argument(format!(
            "unknown group snapshot parameter {k:?}; Strata accepts none"
        ))),
    }
}

/// The filesystem a volume will carry: the StorageClass's `fsType`, else
/// the first mount capability's fs_type, else ext4 if it is to be mounted
/// at all; `None` for a volume used only as a raw block device.
pub(crate) fn fs_type(params: &VolumeParams, caps: &[VolumeCapability]) -> Option<String> {
    if let Some(fs) = &params.fs_type {
        return Some(fs.clone());
    }
    let mounts: Vec<&str> = caps
        .iter()
        .filter_map(|c| match &c.access_type {
            Some(AccessType::Mount(m)) => Some(m.fs_type.as_str()),
            _ => None,
        })
        .collect();
    let named = mounts.iter().find(|f| !f.is_empty());
    match (named, mounts.is_empty()) {
        (Some(f), _) => Some(f.to_string()),
        (None, false) => Some(DEFAULT_FS_TYPE.to_string()),
        (None, true) => None,
    }
}

/// The size to create for a capacity range: `required` rounded up to whole
/// 4 KiB blocks (or `default` when nothing is required), and, if that
/// exceeds `limit`, the largest whole-block size within the limit that still
/// meets `required`. Sizes that are already whole blocks are honoured
/// exactly.
pub(crate) fn size_for(required: i64, limit: i64, default: u64) -> Result<u64, Status> {
    if required < 0 || limit < 0 {
        return Err(Status::invalid_argument(
            "capacity_range values must not be negative",
        ));
    }
    let (required, limit) = (required as u64, limit as u64);
    if limit != 0 && required > limit {
        return Err(Status::invalid_argument(format!(
            "capacity_range: required_bytes {required} is larger than limit_bytes {limit}"
        )));
    }
    let round_up = |b: u64| b.max(1).div_ceil(BLOCK_SIZE) * BLOCK_SIZE;
    let size = round_up(if required > 0 { required } else { default });
    if limit == 0 || size <= limit {
        return Ok(size);
    }
    let within = limit / BLOCK_SIZE * BLOCK_SIZE;
    if within >= required.max(BLOCK_SIZE) {
        return Ok(within);
    }
    Err(Status::out_of_range(format!(
        "no whole number of 4096-byte blocks fits between required_bytes {required} and limit_bytes {limit}"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_round_up_to_blocks_within_the_limit() {
        assert_eq!(size_for(4096, 0, 1 << 30).unwrap(), 4096);
        assert_eq!(size_for(1, 0, 1 << 30).unwrap(), 4096);
        assert_eq!(size_for(5000, 8192, 1 << 30).unwrap(), 8192);
        assert_eq!(size_for(0, 0, 1 << 30).unwrap(), 1 << 30);
        assert_eq!(size_for(0, 1 << 20, 1 << 30).unwrap(), 1 << 20);
        assert_eq!(
            size_for(5000, 6000, 1 << 30).unwrap_err().code(),
            tonic::Code::OutOfRange
        );
        assert_eq!(
            size_for(10, 5, 1 << 30).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        assert_eq!(
            size_for(-1, 0, 1 << 30).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }

    #[test]
    fn unknown_parameters_are_refused_and_sidecar_keys_ignored() {
        let mut p = HashMap::new();
        p.insert("csi.storage.k8s.io/pvc/name".to_string(), "x".to_string());
        p.insert("fsType".to_string(), "xfs".to_string());
        assert_eq!(volume_params(&p).unwrap().fs_type.as_deref(), Some("xfs"));
        p.insert("replicas".to_string(), "3".to_string());
        assert_eq!(
            volume_params(&p).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        assert_eq!(defining(&p).len(), 2);
        let q = |k: &str, v: &str| HashMap::from([(k.to_string(), v.to_string())]);
        assert_eq!(
            volume_params(&q("maxChainDepth", "8"))
                .unwrap()
                .max_chain_depth,
            Some(8)
        );
        assert!(
            volume_params(&q("flattenClones", "true"))
                .unwrap()
                .flatten_clones
        );
        assert!(volume_params(&q("locality", "node")).unwrap().node_local);
        assert!(
            volume_params(&q("dataLocality", "best-effort"))
                .unwrap()
                .follow_pod
        );
        assert!(
            !volume_params(&q("dataLocality", "disabled"))
                .unwrap()
                .follow_pod
        );
        assert!(
            !volume_params(&q("locality", "anywhere"))
                .unwrap()
                .node_local
        );
        assert!(!volume_params(&HashMap::new()).unwrap().node_local);
        for bad in [
            q("maxChainDepth", "1"),
            q("maxChainDepth", "x"),
            q("flattenClones", "yes"),
            q("locality", "zone"),
            q("dataLocality", "strict"),
            q("frontend", "nvme"),
        ] {
            assert_eq!(
                volume_params(&bad).unwrap_err().code(),
                tonic::Code::InvalidArgument
            );
        }
    }

    #[test]
    fn frontends_and_chap_secrets_are_checked_and_secrets_never_echoed() {
        let s = |v: &str| Some(v.to_string());
        assert!(volume_params(&HashMap::from([("frontend".into(), "iscsi".into())])).is_ok());
        assert_eq!(frontend(s("iscsi").as_ref()).unwrap(), Some(Kind::Iscsi));
        assert_eq!(frontend(s("nbd").as_ref()).unwrap(), None);
        assert_eq!(frontend(None).unwrap(), None);
        assert!(frontend(s("fuse").as_ref()).is_err());

        let secrets = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert_eq!(chap_secret(&HashMap::new()).unwrap(), None);
        let one = chap_secret(&secrets(&[
            ("node.session.auth.username", "alice"),
            ("node.session.auth.password", "secret-of-alice"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!((one.user.as_str(), one.target_user), ("alice", None));
        let mutual = chap_secret(&secrets(&[
            ("node.session.auth.username", "alice"),
            ("node.session.auth.password", "secret-of-alice"),
            ("node.session.auth.username_in", "strata"),
            ("node.session.auth.password_in", "secret-of-target"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(mutual.target_user.as_deref(), Some("strata"));
        for bad in [
            // too short, half a pair, half a mutual pair, a key of nobody
            secrets(&[
                ("node.session.auth.username", "alice"),
                ("node.session.auth.password", "short-pw"),
            ]),
            secrets(&[("node.session.auth.password", "secret-of-alice")]),
            secrets(&[
                ("node.session.auth.username", "alice"),
                ("node.session.auth.password", "secret-of-alice"),
                ("node.session.auth.password_in", "secret-of-target"),
            ]),
            secrets(&[
                ("node.session.auth.username", "alice"),
                ("node.session.auth.password", "secret-of-alice"),
                ("password", "secret-of-nobody"),
            ]),
        ] {
            let e = chap_secret(&bad).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
            assert!(!e.message().contains("secret-of"), "{}", e.message());
            assert!(!e.message().contains("short-pw"), "{}", e.message());
        }
    }

    #[test]
    fn mutable_parameters_are_limits_with_units_and_bounds() {
        let p = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let base = crate::engine::Limits {
            read_iops: 7,
            ..Default::default()
        };
        let l = limits(
            &p(&[("writeIOPS", "500"), ("writeBytesPerSecond", "100Mi")]),
            base,
        )
        .unwrap();
        assert_eq!(
            (l.read_iops, l.write_iops, l.write_bytes_per_sec),
            (7, 500, 100 << 20)
        );
        assert_eq!(limits(&p(&[("readIOPS", "0")]), base).unwrap().read_iops, 0);
        assert_eq!(
            limits(&p(&[("readBytesPerSecond", "2GiB")]), base)
                .unwrap()
                .read_bytes_per_sec,
            2 << 30
        );
        for bad in [
            p(&[("iops", "5")]),
            p(&[("readIOPS", "-1")]),
            p(&[("readIOPS", "5Mi")]),
            p(&[("readIOPS", "")]),
            p(&[("writeBytesPerSecond", "1000")]),
            p(&[("writeBytesPerSecond", "99999999999999999999")]),
            p(&[("writeBytesPerSecond", "10Ti")]),
        ] {
            assert_eq!(
                limits(&bad, base).unwrap_err().code(),
                tonic::Code::InvalidArgument,
                "{bad:?}"
            );
        }
    }

    #[test]
    fn snapshot_parameters_know_freeze_filesystem_only() {
        let p = |k: &str, v: &str| HashMap::from([(k.to_string(), v.to_string())]);
        assert!(
            snapshot_params(&p("freezeFilesystem", "true"))
                .unwrap()
                .freeze
        );
        assert!(
            !snapshot_params(&p("freezeFilesystem", "false"))
                .unwrap()
                .freeze
        );
        assert!(!snapshot_params(&HashMap::new()).unwrap().freeze);
        for bad in [p("freezeFilesystem", "yes"), p("consistency", "crash")] {
            assert_eq!(
                snapshot_params(&bad).unwrap_err().code(),
                tonic::Code::InvalidArgument
            );
        }
    }
}
