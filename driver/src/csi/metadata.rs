//! The CSI SnapshotMetadata service: the allocated ranges of a snapshot
//! (GetMetadataAllocated) and the ranges changed between two snapshots of
//! one volume (GetMetadataDelta), for backup tools through the
//! external-snapshot-metadata sidecar. Served beside the Controller: the
//! snapshot's node answers from its presence maps a page at a time (agent
//! SnapshotRanges), and each page becomes one message of the stream.
//!
//! Ranges are VARIABLE_LENGTH: the engine keeps runs of blocks, so a
//! written megabyte is one tuple rather than 256, and every offset and
//! length is a multiple of 4096 bytes. `starting_offset` is rounded down
//! to a block. A base snapshot held by another node than the target (one
//! that could not move with its volume), or one whose history the node
//! lacks (a volume copied whole), is FAILED_PRECONDITION: the caller makes
//! a full backup instead.

use csi_proto::agent::v1 as agent;
use csi_proto::csi::v1::snapshot_metadata_server::SnapshotMetadata;
use csi_proto::csi::v1::*;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status};

use super::controller::ControllerService;
use crate::agent::MAX_RANGES_PER_PAGE;
use crate::engine::SnapshotId;

/// The stream of either RPC: pages made here, or a leader's passed on
/// (`replica.rs`).
pub type Pages<R> = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<R, Status>> + Send>>;

/// Ranges per message when the request names no `max_results`.
const DEFAULT_RESULTS: usize = 1024;

/// Messages computed ahead of a slow reader.
const AHEAD: usize = 2;

/// One page of ranges as a message of either stream.
trait Page: Send + 'static {
    fn new(size: u64, ranges: Vec<BlockMetadata>) -> Self;
}

impl Page for GetMetadataAllocatedResponse {
    fn new(size: u64, ranges: Vec<BlockMetadata>) -> Self {
        GetMetadataAllocatedResponse {
            block_metadata_type: BlockMetadataType::VariableLength as i32,
            volume_capacity_bytes: size as i64,
            block_metadata: ranges,
        }
    }
}

impl Page for GetMetadataDeltaResponse {
    fn new(size: u64, ranges: Vec<BlockMetadata>) -> Self {
        GetMetadataDeltaResponse {
            block_metadata_type: BlockMetadataType::VariableLength as i32,
            volume_capacity_bytes: size as i64,
            block_metadata: ranges,
        }
    }
}

/// A snapshot ID of the request: required, and one of Strata's (anything
/// else names no snapshot).
fn snapshot_arg(id: &str, field: &str) -> Result<String, Status> {
    if id.is_empty() {
        return Err(Status::invalid_argument(format!("{field} is required")));
    }
    id.parse::<SnapshotId>()
        .map_err(|_| Status::not_found(format!("snapshot {id:?} does not exist")))?;
    Ok(id.to_string())
}

impl ControllerService {
    /// Streams the pages of `target`'s ranges (changed since `base`, if
    /// given) from `starting_offset`, `max_results` per message.
    async fn stream_ranges<P: Page>(
        &self,
        target: &str,
        base: Option<&str>,
        starting_offset: i64,
        max_results: i32,
    ) -> Result<Pages<P>, Status> {
        let target = snapshot_arg(target, "snapshot_id")?;
        let base = base
            .map(|b| snapshot_arg(b, "base_snapshot_id"))
            .transpose()?;
        let from = u64::try_from(starting_offset)
            .map_err(|_| Status::invalid_argument("starting_offset is negative"))?;
        let max = match usize::try_from(max_results) {
            Ok(0) => DEFAULT_RESULTS,
            Ok(n) => n.min(MAX_RANGES_PER_PAGE),
            Err(_) => return Err(Status::invalid_argument("max_results is negative")),
        };
        let not_found = |id: &str| Status::not_found(format!("snapshot {id:?} does not exist"));
        let node = self
            .snapshot_node(&target)
            .await?
            .ok_or_else(|| not_found(&target))?;
        // Snapshots of one volume, the base the older, that the node
        // cannot compare (their history there was not kept, as after a
        // volume moved without them): a reason for a full backup.
        let mut unrelated_is_full = false;
        if let Some(b) = &base {
            let base_node = self.snapshot_node(b).await?.ok_or_else(|| not_found(b))?;
            // Snapshots of two volumes are a wrong request wherever they
            // are; of one volume on two nodes, a reason for a full backup.
            let (bk, tk) = (b.clone(), target.clone());
            let volumes = self
                .records(move |r| Ok((r.snapshot(&bk)?, r.snapshot(&tk)?)))
                .await?;
            if let (Some(bv), Some(tv)) = volumes {
                if bv.source_volume_id != tv.source_volume_id {
                    return Err(Status::invalid_argument(format!(
                        "snapshot {b} is of volume {} and {target} of volume {}: a delta is \
                         between snapshots of one volume",
                        bv.source_volume_id, tv.source_volume_id
                    )));
                }
                unrelated_is_full = bv.created_unix_ns <= tv.created_unix_ns;
            }
            if base_node != node {
                return Err(Status::failed_precondition(format!(
                    "snapshot {b} is on node {base_node} and {target} on node {node}: Strata \
                     tracks changes between snapshots of one node; make a full backup"
                )));
            }
        }
        let agent = self.agent(&node)?;
        // The node's pages are as large as they may be (each one opens
        // the snapshot's view); the stream's messages are the caller's.
        let ask = move |from: u64| agent::SnapshotRangesRequest {
            snapshot_id: target.clone(),
            base_snapshot_id: base.clone().unwrap_or_default(),
            starting_offset: from,
            max_results: MAX_RANGES_PER_PAGE as u32,
            ..Default::default()
        };
        // The first page before the stream: its errors are the call's.
        let mut page = agent
            .snapshot_ranges(Request::new(ask(from)))
            .await
            .map_err(|e| match e.code() {
                Code::InvalidArgument if unrelated_is_full => Status::failed_precondition(format!(
                    "node {node} cannot tell the changes between these snapshots (their \
                     volume moved between nodes without them); make a full backup: {}",
                    e.message()
                )),
                _ => e,
            })?
            .into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(AHEAD);
        tokio::spawn(async move {
            loop {
                let last = page.next_offset >= page.size_bytes;
                let ranges: Vec<BlockMetadata> = page
                    .ranges
                    .iter()
                    .map(|r| BlockMetadata {
                        byte_offset: r.offset as i64,
                        size_bytes: r.length as i64,
                    })
                    .collect();
                // An empty answer is one message too (it carries the size).
                let mut messages: Vec<Vec<BlockMetadata>> =
                    ranges.chunks(max).map(<[BlockMetadata]>::to_vec).collect();
                if messages.is_empty() && last {
                    messages.push(Vec::new());
                }
                for m in messages {
                    if tx.send(Ok(P::new(page.size_bytes, m))).await.is_err() {
                        return;
                    }
                }
                if last {
                    return;
                }
                page = match agent
                    .snapshot_ranges(Request::new(ask(page.next_offset)))
                    .await
                {
                    Ok(p) => p.into_inner(),
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                };
            }
        });
        Ok(Box::pin(ReceiverStream::new(rx)))
    }
}

#[tonic::async_trait]
impl SnapshotMetadata for ControllerService {
    type GetMetadataAllocatedStream = Pages<GetMetadataAllocatedResponse>;
    type GetMetadataDeltaStream = Pages<GetMetadataDeltaResponse>;

    async fn get_metadata_allocated(
        &self,
        req: Request<GetMetadataAllocatedRequest>,
    ) -> Result<Response<Self::GetMetadataAllocatedStream>, Status> {
        let req = req.into_inner();
        let stream = self
            .stream_ranges(&req.snapshot_id, None, req.starting_offset, req.max_results)
            .await?;
        Ok(Response::new(stream))
    }

    async fn get_metadata_delta(
        &self,
        req: Request<GetMetadataDeltaRequest>,
    ) -> Result<Response<Self::GetMetadataDeltaStream>, Status> {
        let req = req.into_inner();
        let stream = self
            .stream_ranges(
                &req.target_snapshot_id,
                Some(&req.base_snapshot_id),
                req.starting_offset,
                req.max_results,
            )
            .await?;
        Ok(Response::new(stream))
    }
}
