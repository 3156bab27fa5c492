//! The CSI Controller service of one `strata controller` replica.
//!
//! The CSI sidecars (provisioner, snapshotter, resizer) elect their leaders
//! each on its own Lease, so their calls may reach any replica. The
//! replica that leads Strata's election serves them itself; the others
//! forward each call, unchanged, to the leader's controller port (mutual
//! TLS, the agents' certificates) and pass its answer back. Capabilities
//! are answered locally, so sidecars start before anyone leads.
//!
//! A forwarded call carries [`FORWARDED`]; a replica that gets one without
//! leading (it lost the lead meanwhile) answers UNAVAILABLE instead of
//! forwarding again, so a call never goes round in circles.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use csi_proto::csi::v1::controller_client::ControllerClient;
use csi_proto::csi::v1::controller_server::Controller;
use csi_proto::csi::v1::group_controller_client::GroupControllerClient;
use csi_proto::csi::v1::group_controller_server::GroupController;
use csi_proto::csi::v1::snapshot_metadata_client::SnapshotMetadataClient;
use csi_proto::csi::v1::snapshot_metadata_server::SnapshotMetadata;
use csi_proto::csi::v1::*;
use tonic::metadata::MetadataMap;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use super::controller::ControllerService;
use super::metadata::Pages;
use crate::agent::client::{CALL_TIMEOUT, CONNECT_TIMEOUT};
use crate::tls::TlsFiles;

/// Metadata key marking a call forwarded by another replica.
pub const FORWARDED: &str = "x-strata-forwarded";

#[derive(Debug, Clone)]
enum Role {
    /// No leader known yet.
    Waiting,
    Following {
        leader: String,
        channel: Channel,
    },
    Leading,
}

/// Where a call goes.
pub(crate) enum Route {
    Here,
    /// To the leader, on this channel.
    Leader(Channel),
}

/// The Controller service of a replica: local when leading, else
/// forwarded to the leader.
#[derive(Debug, Clone)]
pub struct Replica {
    local: ControllerService,
    tls: TlsFiles,
    role: Arc<RwLock<Role>>,
}

impl Replica {
    /// A replica that neither leads nor knows a leader yet.
    pub fn new(local: ControllerService, tls: TlsFiles) -> Self {
        Replica {
            local,
            tls,
            role: Arc::new(RwLock::new(Role::Waiting)),
        }
    }

    /// This replica leads from now on.
    pub fn lead(&self) {
        *self.role.write().unwrap_or_else(|e| e.into_inner()) = Role::Leading;
    }

    /// The service that answers here when this replica leads.
    pub fn local(&self) -> &ControllerService {
        &self.local
    }

    pub fn is_leading(&self) -> bool {
        matches!(
            *self.role.read().unwrap_or_else(|e| e.into_inner()),
            Role::Leading
        )
    }

    /// Another replica leads, at `leader` (its controller address) if
    /// known. Keeps the connection when the leader is the same.
    pub fn follow(&self, leader: Option<&str>) {
        let mut role = self.role.write().unwrap_or_else(|e| e.into_inner());
        let Some(address) = leader else {
            *role = Role::Waiting;
            return;
        };
        if let Role::Following { leader, .. } = &*role
            && leader == address
        {
            return;
        }
        *role = match self.tls.channel(
            "controller",
            address,
            crate::tls::Server::Controller,
            CONNECT_TIMEOUT,
            CALL_TIMEOUT,
        ) {
            Ok(channel) => Role::Following {
                leader: address.to_string(),
                channel,
            },
            Err(e) => {
                tracing::warn!(leader = address, error = %e.message(), "cannot reach the leader");
                Role::Waiting
            }
        };
    }

    /// Where a call with `metadata` goes: here when leading, else to the
    /// leader (UNAVAILABLE when none is known, or for a call forwarded
    /// already).
    pub(crate) fn route(&self, metadata: &MetadataMap) -> Result<Route, Status> {
        match &*self.role.read().unwrap_or_else(|e| e.into_inner()) {
            Role::Leading => Ok(Route::Here),
            _ if metadata.contains_key(FORWARDED) => Err(Status::unavailable(
                "this Strata controller no longer leads; retry",
            )),
            Role::Following { channel, .. } => Ok(Route::Leader(channel.clone())),
            Role::Waiting => Err(Status::unavailable(
                "no Strata controller leads yet (leader election in progress); retry",
            )),
        }
    }
}

/// Sends `req` on to the leader, marked as forwarded, with the caller's
/// timeout (`grpc-timeout`, counted again from here).
pub(crate) fn onward<T>(req: Request<T>) -> Request<T> {
    let timeout = req
        .metadata()
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout);
    let mut fwd = Request::new(req.into_inner());
    fwd.metadata_mut()
        .insert(FORWARDED, tonic::metadata::MetadataValue::from_static("1"));
    if let Some(t) = timeout {
        fwd.set_timeout(t);
    }
    fwd
}

/// A `grpc-timeout` header value (`<digits><unit>`).
fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

macro_rules! routed {
    ($($name:ident($req:ty) -> $reply:ty;)*) => {
        #[tonic::async_trait]
        impl Controller for Replica {
            async fn controller_get_capabilities(
                &self,
                req: Request<ControllerGetCapabilitiesRequest>,
            ) -> Result<Response<ControllerGetCapabilitiesResponse>, Status> {
                self.local.controller_get_capabilities(req).await
            }
            $(
                async fn $name(&self, req: Request<$req>) -> Result<Response<$reply>, Status> {
                    match self.route(req.metadata())? {
                        Route::Here => self.local.$name(req).await,
                        Route::Leader(channel) => {
                            ControllerClient::new(channel).$name(onward(req)).await
                        }
                    }
                }
            )*
        }
    };
}

routed! {
    create_volume(CreateVolumeRequest) -> CreateVolumeResponse;
    delete_volume(DeleteVolumeRequest) -> DeleteVolumeResponse;
    controller_publish_volume(ControllerPublishVolumeRequest) -> ControllerPublishVolumeResponse;
    controller_unpublish_volume(ControllerUnpublishVolumeRequest) -> ControllerUnpublishVolumeResponse;
    validate_volume_capabilities(ValidateVolumeCapabilitiesRequest) -> ValidateVolumeCapabilitiesResponse;
    list_volumes(ListVolumesRequest) -> ListVolumesResponse;
    get_capacity(GetCapacityRequest) -> GetCapacityResponse;
    create_snapshot(CreateSnapshotRequest) -> CreateSnapshotResponse;
    delete_snapshot(DeleteSnapshotRequest) -> DeleteSnapshotResponse;
    list_snapshots(ListSnapshotsRequest) -> ListSnapshotsResponse;
    controller_expand_volume(ControllerExpandVolumeRequest) -> ControllerExpandVolumeResponse;
    controller_get_volume(ControllerGetVolumeRequest) -> ControllerGetVolumeResponse;
    controller_modify_volume(ControllerModifyVolumeRequest) -> ControllerModifyVolumeResponse;
    get_snapshot(GetSnapshotRequest) -> GetSnapshotResponse;
}

/// GroupController, routed like the Controller (the leader's records
/// hold the groups).
#[tonic::async_trait]
impl GroupController for Replica {
    async fn group_controller_get_capabilities(
        &self,
        req: Request<GroupControllerGetCapabilitiesRequest>,
    ) -> Result<Response<GroupControllerGetCapabilitiesResponse>, Status> {
        self.local.group_controller_get_capabilities(req).await
    }

    async fn create_volume_group_snapshot(
        &self,
        req: Request<CreateVolumeGroupSnapshotRequest>,
    ) -> Result<Response<CreateVolumeGroupSnapshotResponse>, Status> {
        match self.route(req.metadata())? {
            Route::Here => self.local.create_volume_group_snapshot(req).await,
            Route::Leader(channel) => {
                GroupControllerClient::new(channel)
                    .create_volume_group_snapshot(onward(req))
                    .await
            }
        }
    }

    async fn get_volume_group_snapshot(
        &self,
        req: Request<GetVolumeGroupSnapshotRequest>,
    ) -> Result<Response<GetVolumeGroupSnapshotResponse>, Status> {
        match self.route(req.metadata())? {
            Route::Here => self.local.get_volume_group_snapshot(req).await,
            Route::Leader(channel) => {
                GroupControllerClient::new(channel)
                    .get_volume_group_snapshot(onward(req))
                    .await
            }
        }
    }

    async fn delete_volume_group_snapshot(
        &self,
        req: Request<DeleteVolumeGroupSnapshotRequest>,
    ) -> Result<Response<DeleteVolumeGroupSnapshotResponse>, Status> {
        match self.route(req.metadata())? {
            Route::Here => self.local.delete_volume_group_snapshot(req).await,
            Route::Leader(channel) => {
                GroupControllerClient::new(channel)
                    .delete_volume_group_snapshot(onward(req))
                    .await
            }
        }
    }
}

/// SnapshotMetadata, routed like the Controller: the leader's records
/// say which node holds a snapshot, so a follower passes the stream on.
#[tonic::async_trait]
impl SnapshotMetadata for Replica {
    type GetMetadataAllocatedStream = Pages<GetMetadataAllocatedResponse>;
    type GetMetadataDeltaStream = Pages<GetMetadataDeltaResponse>;

    async fn get_metadata_allocated(
        &self,
        req: Request<GetMetadataAllocatedRequest>,
    ) -> Result<Response<Self::GetMetadataAllocatedStream>, Status> {
        match self.route(req.metadata())? {
            Route::Here => self.local.get_metadata_allocated(req).await,
            Route::Leader(channel) => {
                let pages = SnapshotMetadataClient::new(channel)
                    .get_metadata_allocated(onward(req))
                    .await?;
                Ok(Response::new(Box::pin(pages.into_inner())))
            }
        }
    }

    async fn get_metadata_delta(
        &self,
        req: Request<GetMetadataDeltaRequest>,
    ) -> Result<Response<Self::GetMetadataDeltaStream>, Status> {
        match self.route(req.metadata())? {
            Route::Here => self.local.get_metadata_delta(req).await,
            Route::Leader(channel) => {
                let pages = SnapshotMetadataClient::new(channel)
                    .get_metadata_delta(onward(req))
                    .await?;
                Ok(Response::new(Box::pin(pages.into_inner())))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse() {
        assert_eq!(parse_grpc_timeout("30S"), Some(Duration::from_secs(30)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse_grpc_timeout(""), None);
        assert_eq!(parse_grpc_timeout("S"), None);
        assert_eq!(parse_grpc_timeout("10x"), None);
    }
}
