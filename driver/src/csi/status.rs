//! gRPC status codes at the CSI edge: the node's mapping
//! (`rpc/status.rs`) and the controller's records errors.

use tonic::Status;

use crate::cluster::records::RecordsError;
pub(crate) use crate::rpc::status::*;

/// A records-store error as a gRPC status.
pub(crate) fn records(e: RecordsError) -> Status {
    Status::internal(e.to_string())
}
