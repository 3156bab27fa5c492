//! [`RemoteAgent`]: the [`Agent`] trait over the network, for the
//! controller. Connections are made lazily and re-made after a failure by
//! tonic; a node that cannot be reached gives UNAVAILABLE, which the CSI
//! sidecars retry.

use std::time::Duration;

use csi_proto::agent::v1::agent_client::AgentClient;
use csi_proto::agent::v1::agent_server::Agent;
use csi_proto::agent::v1::*;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::tls::{Server, TlsFiles};

/// How long a connection attempt may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one call may take (a snapshot waits for a flush, a create
/// from a snapshot for an index copy; both are far below this).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// A node's agent, reached at `https://ADDRESS:PORT` with mutual TLS.
#[derive(Debug, Clone)]
pub struct RemoteAgent {
    client: AgentClient<Channel>,
}

impl RemoteAgent {
    /// A client for the agent of `server` at `address` (`host:port`). No
    /// connection is made until the first call.
    pub fn new(address: &str, server: Server, tls: &TlsFiles) -> Result<Self, Status> {
        let channel = tls.channel("agent", address, server, CONNECT_TIMEOUT, CALL_TIMEOUT)?;
        Ok(RemoteAgent {
            client: AgentClient::new(channel),
        })
    }
}

/// Forwards each call of the [`Agent`] trait to the remote agent.
macro_rules! forward {
    ($($name:ident($req:ty) -> $reply:ty;)*) => {
        #[tonic::async_trait]
        impl Agent for RemoteAgent {
            $(
                async fn $name(&self, req: Request<$req>) -> Result<Response<$reply>, Status> {
                    self.client.clone().$name(req.into_inner()).await
                }
            )*
        }
    };
}

forward! {
    node_info(NodeInfoRequest) -> NodeInfoReply;
    create_volume(CreateVolumeRequest) -> VolumeReply;
    delete_volume(DeleteVolumeRequest) -> DeleteReply;
    get_volume(GetVolumeRequest) -> VolumeReply;
    list_volumes(ListVolumesRequest) -> ListVolumesReply;
    expand_volume(ExpandVolumeRequest) -> VolumeReply;
    modify_volume(ModifyVolumeRequest) -> VolumeReply;
    create_snapshot(CreateSnapshotRequest) -> SnapshotReply;
    delete_snapshot(DeleteSnapshotRequest) -> DeleteReply;
    get_snapshot(GetSnapshotRequest) -> SnapshotReply;
    snapshot_ranges(SnapshotRangesRequest) -> SnapshotRangesReply;
    hold_group(HoldGroupRequest) -> HoldGroupReply;
    cut_group(CutGroupRequest) -> CutGroupReply;
    release_group(ReleaseGroupRequest) -> DeleteReply;
    attach(AttachRequest) -> AttachReply;
    detach(AttachRequest) -> AttachReply;
    seal(SealRequest) -> AttachReply;
    import(ImportRequest) -> ImportReply;
    track(TrackRequest) -> TrackReply;
    hold(HoldRequest) -> HoldReply;
    follow(FollowRequest) -> FollowReply;
}
