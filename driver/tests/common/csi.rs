//! CSI clients over a standalone's unix socket, and request builders.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use csi_proto::csi::v1::controller_client::ControllerClient;
use csi_proto::csi::v1::identity_client::IdentityClient;
use csi_proto::csi::v1::node_client::NodeClient;
use csi_proto::csi::v1::volume_capability::{
    AccessMode, AccessType, BlockVolume, MountVolume, access_mode::Mode,
};
use csi_proto::csi::v1::*;
use tonic::transport::Channel;

/// A gRPC channel to a unix socket. A server that was just (re)started
/// may not listen yet (a killed one leaves its socket file behind): the
/// connection is retried for up to 20 s.
pub async fn channel(path: PathBuf) -> Channel {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let socket = path.clone();
        let connected = tonic::transport::Endpoint::from_static("http://[::]:50051")
            .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                let path = socket.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                        tokio::net::UnixStream::connect(path).await?,
                    ))
                }
            }))
            .await;
        match connected {
            Ok(channel) => return channel,
            Err(_) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            Err(e) => panic!("cannot connect to {}: {e:?}", path.display()),
        }
    }
}

/// The three CSI services of one endpoint.
pub struct Csi {
    pub identity: IdentityClient<Channel>,
    pub controller: ControllerClient<Channel>,
    pub node: NodeClient<Channel>,
}

impl Csi {
    pub async fn connect(socket: &Path) -> Csi {
        let ch = channel(socket.to_path_buf()).await;
        Csi {
            identity: IdentityClient::new(ch.clone()),
            controller: ControllerClient::new(ch.clone()),
            node: NodeClient::new(ch),
        }
    }
}

fn mode(m: Mode) -> Option<AccessMode> {
    Some(AccessMode { mode: m as i32 })
}

pub fn mount_cap(fs_type: &str) -> VolumeCapability {
    VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: fs_type.into(),
            ..Default::default()
        })),
        access_mode: mode(Mode::SingleNodeWriter),
    }
}

pub fn block_cap() -> VolumeCapability {
    VolumeCapability {
        access_type: Some(AccessType::Block(BlockVolume {})),
        access_mode: mode(Mode::SingleNodeWriter),
    }
}

/// A CreateVolume of `bytes` for `cap`.
pub fn create(name: &str, bytes: i64, cap: VolumeCapability) -> CreateVolumeRequest {
    CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![cap],
        ..Default::default()
    }
}

/// The same, restored from a snapshot or cloned from a volume.
pub fn create_from(
    name: &str,
    bytes: i64,
    cap: VolumeCapability,
    source: volume_content_source::Type,
) -> CreateVolumeRequest {
    CreateVolumeRequest {
        volume_content_source: Some(VolumeContentSource {
            r#type: Some(source),
        }),
        ..create(name, bytes, cap)
    }
}

pub fn stage(volume: &str, staging: &Path, cap: VolumeCapability) -> NodeStageVolumeRequest {
    NodeStageVolumeRequest {
        volume_id: volume.into(),
        staging_target_path: staging.to_string_lossy().into_owned(),
        volume_capability: Some(cap),
        ..Default::default()
    }
}

pub fn unstage(volume: &str, staging: &Path) -> NodeUnstageVolumeRequest {
    NodeUnstageVolumeRequest {
        volume_id: volume.into(),
        staging_target_path: staging.to_string_lossy().into_owned(),
    }
}

pub fn publish(
    volume: &str,
    staging: &Path,
    target: &Path,
    cap: VolumeCapability,
    readonly: bool,
) -> NodePublishVolumeRequest {
    NodePublishVolumeRequest {
        volume_id: volume.into(),
        staging_target_path: staging.to_string_lossy().into_owned(),
        target_path: target.to_string_lossy().into_owned(),
        volume_capability: Some(cap),
        readonly,
        ..Default::default()
    }
}

pub fn unpublish(volume: &str, target: &Path) -> NodeUnpublishVolumeRequest {
    NodeUnpublishVolumeRequest {
        volume_id: volume.into(),
        target_path: target.to_string_lossy().into_owned(),
    }
}

pub fn stats(volume: &str, path: &Path) -> NodeGetVolumeStatsRequest {
    NodeGetVolumeStatsRequest {
        volume_id: volume.into(),
        volume_path: path.to_string_lossy().into_owned(),
        staging_target_path: String::new(),
    }
}

pub fn snapshot(name: &str, volume: &str, freeze: bool) -> CreateSnapshotRequest {
    CreateSnapshotRequest {
        source_volume_id: volume.into(),
        name: name.into(),
        parameters: if freeze {
            HashMap::from([("freezeFilesystem".to_string(), "true".to_string())])
        } else {
            HashMap::new()
        },
        ..Default::default()
    }
}
