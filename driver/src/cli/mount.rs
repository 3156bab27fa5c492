//! `strata volume mount|unmount`: a volume on this machine, the way
//! kubelet does it (NodeStageVolume into a staging directory, then
//! NodePublishVolume at the path asked), for people and scripts.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use csi_proto::csi::v1::volume_capability::{
    AccessMode, AccessType, BlockVolume, MountVolume, access_mode::Mode,
};
use csi_proto::csi::v1::*;

use super::client::{node, status_message};
use crate::endpoint::Endpoint;

/// Options of `strata volume mount`.
#[derive(Debug, Clone)]
pub struct Mount {
    pub id: String,
    pub target: PathBuf,
    /// `None`: a raw block device node at `target`.
    pub fs_type: Option<String>,
    pub read_only: bool,
    pub staging_dir: PathBuf,
}

fn absolute(p: &Path) -> Result<PathBuf, String> {
    std::path::absolute(p).map_err(|e| format!("{}: {e}", p.display()))
}

fn capability(fs_type: Option<&str>, read_only: bool) -> VolumeCapability {
    VolumeCapability {
        access_type: Some(match fs_type {
            Some(fs) => AccessType::Mount(MountVolume {
                fs_type: fs.to_string(),
                ..Default::default()
            }),
            None => AccessType::Block(BlockVolume {}),
        }),
        access_mode: Some(AccessMode {
            mode: if read_only {
                Mode::SingleNodeReaderOnly
            } else {
                Mode::SingleNodeWriter
            } as i32,
        }),
    }
}

fn path_string(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

pub async fn mount(endpoint: &Endpoint, m: Mount) -> ExitCode {
    let run = async {
        let mut client = node(endpoint).await?;
        let target = absolute(&m.target)?;
        let staging = absolute(&m.staging_dir)?.join(&m.id);
        let cap = capability(m.fs_type.as_deref(), m.read_only);
        client
            .node_stage_volume(NodeStageVolumeRequest {
                volume_id: m.id.clone(),
                staging_target_path: path_string(&staging),
                volume_capability: Some(cap.clone()),
                ..Default::default()
            })
            .await
            .map_err(|s| format!("staging: {}", status_message(&s)))?;
        client
            .node_publish_volume(NodePublishVolumeRequest {
                volume_id: m.id.clone(),
                staging_target_path: path_string(&staging),
                target_path: path_string(&target),
                volume_capability: Some(cap),
                readonly: m.read_only,
                ..Default::default()
            })
            .await
            .map_err(|s| format!("publishing: {}", status_message(&s)))?;
        Ok::<_, String>(target)
    };
    match run.await {
        Ok(target) => {
            let what = m
                .fs_type
                .map_or("block device".to_string(), |fs| format!("{fs} filesystem"));
            println!(
                "volume {} is mounted at {} ({what})",
                m.id,
                target.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("strata: {e}");
            ExitCode::FAILURE
        }
    }
}

pub async fn unmount(
    endpoint: &Endpoint,
    id: String,
    target: PathBuf,
    staging_dir: PathBuf,
) -> ExitCode {
    let run = async {
        let mut client = node(endpoint).await?;
        let target = absolute(&target)?;
        let staging = absolute(&staging_dir)?.join(&id);
        client
            .node_unpublish_volume(NodeUnpublishVolumeRequest {
                volume_id: id.clone(),
                target_path: path_string(&target),
            })
            .await
            .map_err(|s| format!("unpublishing: {}", status_message(&s)))?;
        client
            .node_unstage_volume(NodeUnstageVolumeRequest {
                volume_id: id.clone(),
                staging_target_path: path_string(&staging),
            })
            .await
            .map_err(|s| format!("unstaging: {}", status_message(&s)))?;
        Ok::<_, String>(())
    };
    match run.await {
        Ok(()) => {
            println!("volume {id} is unmounted and detached");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("strata: {e}");
            ExitCode::FAILURE
        }
    }
}

/// NodeExpandVolume for a volume mounted at `path` (after the controller
/// grew it): the kernel device and the filesystem follow.
pub async fn expand_on_node(
    endpoint: &Endpoint,
    id: &str,
    path: &Path,
    size: u64,
) -> Result<i64, String> {
    let mut client = node(endpoint).await?;
    let path = absolute(path)?;
    client
        .node_expand_volume(NodeExpandVolumeRequest {
            volume_id: id.to_string(),
            volume_path: path_string(&path),
            capacity_range: Some(CapacityRange {
                required_bytes: size as i64,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().capacity_bytes)
        .map_err(|s| {
            format!(
                "growing the filesystem at {}: {}",
                path.display(),
                status_message(&s)
            )
        })
}
