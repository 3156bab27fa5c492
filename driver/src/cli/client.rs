//! A CSI client over a unix socket, for the CLI.

use std::path::PathBuf;

use csi_proto::admin::v1::admin_client::AdminClient;
use csi_proto::csi::v1::controller_client::ControllerClient;
use csi_proto::csi::v1::node_client::NodeClient;
use csi_proto::csi::v1::snapshot_metadata_client::SnapshotMetadataClient;
use hyper_util::rt::TokioIo;
use tonic::transport::Channel;

use crate::endpoint::Endpoint;

/// Connects to the CSI endpoint of a running Strata.
pub async fn controller(endpoint: &Endpoint) -> Result<ControllerClient<Channel>, String> {
    Ok(ControllerClient::new(channel(endpoint).await?))
}

/// The CSI SnapshotMetadata service of a running Strata.
pub async fn snapshot_metadata(
    endpoint: &Endpoint,
) -> Result<SnapshotMetadataClient<Channel>, String> {
    Ok(SnapshotMetadataClient::new(channel(endpoint).await?))
}

/// Strata's own admin service.
pub async fn admin(endpoint: &Endpoint) -> Result<AdminClient<Channel>, String> {
    Ok(AdminClient::new(channel(endpoint).await?))
}

/// The Node service of a running Strata.
pub async fn node(endpoint: &Endpoint) -> Result<NodeClient<Channel>, String> {
    Ok(NodeClient::new(channel(endpoint).await?))
}

pub(super) async fn channel(endpoint: &Endpoint) -> Result<Channel, String> {
    let unreachable = |e: &dyn std::fmt::Display| {
        format!(
            "cannot reach Strata at {endpoint}: {e} (is `strata standalone` running? set --endpoint or STRATA_CSI_ENDPOINT)"
        )
    };
    match endpoint {
        Endpoint::Unix(path) => {
            let path: PathBuf = path.clone();
            tonic::transport::Endpoint::from_static("http://[::]:50051")
                .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                    let path = path.clone();
                    async move {
                        Ok::<_, std::io::Error>(TokioIo::new(
                            tokio::net::UnixStream::connect(path).await?,
                        ))
                    }
                }))
                .await
                .map_err(|e| unreachable(&crate::engine::error::chain(&e)))
        }
        Endpoint::Tcp(addr) => tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| unreachable(&e))?
            .connect()
            .await
            .map_err(|e| unreachable(&crate::engine::error::chain(&e))),
    }
}

/// A gRPC error for people: the code in words and the server's message.
pub fn status_message(s: &tonic::Status) -> String {
    let what = match s.code() {
        tonic::Code::NotFound => "not found",
        tonic::Code::AlreadyExists => "already exists",
        tonic::Code::InvalidArgument => "invalid request",
        tonic::Code::OutOfRange => "out of range",
        tonic::Code::ResourceExhausted => "out of space",
        tonic::Code::Aborted => "busy",
        tonic::Code::Unavailable => "unavailable",
        tonic::Code::Unimplemented => "not supported",
        tonic::Code::FailedPrecondition => "not now",
        _ => "error",
    };
    format!("{what}: {}", s.message())
}
