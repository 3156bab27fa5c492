//! Strata's own gRPC API (`strata.admin.v1.Admin`), served beside CSI on
//! the same socket: what CSI has no words for. Merges and flattens on
//! request, the job list, and what deleting a snapshot would free. Engine
//! errors become gRPC codes in `csi/status.rs`, as for CSI.

use csi_proto::admin::v1::admin_server::Admin;
use csi_proto::admin::v1::*;
use tonic::{Request, Response, Status};

use crate::agent::volume_id;
use crate::engine::{JobInfo, Pool};
use crate::rpc::{Started, status};

/// The Admin service.
#[derive(Debug, Clone)]
pub struct AdminService {
    started: Started,
}

impl AdminService {
    pub fn new(started: Started) -> Self {
        AdminService { started }
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Pool) -> crate::engine::Result<T> + Send + 'static,
    ) -> Result<T, Status> {
        let pool = self.started.get()?.pool.clone();
        tokio::task::spawn_blocking(move || f(&pool).map_err(status::engine))
            .await
            .map_err(status::join)?
    }
}

fn job_message(j: &JobInfo) -> Job {
    Job {
        id: j.id.to_string(),
        kind: j.kind.label().into(),
        reason: j.reason.label().into(),
        volume_id: j.volume.map(|v| v.to_string()).unwrap_or_default(),
        layer_id: j.layer.map(|l| l.to_string()).unwrap_or_default(),
        state: j.state.label().into(),
        waiting: j.waiting.clone().unwrap_or_default(),
        message: j.message.clone(),
        done_bytes: j.done_bytes,
        total_bytes: j.total_bytes,
        reflink_bytes: j.reflink_bytes,
        copy_bytes: j.copy_bytes,
        rate_bytes_per_second: j.rate_bytes_per_sec,
        created_unix_ns: j.created_unix_ns,
        finished_unix_ns: j.finished_unix_ns,
    }
}

/// The job `id` as the pool lists it.
fn reply(pool: &Pool, id: crate::engine::JobId) -> crate::engine::Result<JobReply> {
    Ok(JobReply {
        job: pool.jobs()?.iter().find(|j| j.id == id).map(job_message),
    })
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn merge_volume(
        &self,
        req: Request<MergeVolumeRequest>,
    ) -> Result<Response<JobReply>, Status> {
        let req = req.into_inner();
        let v = volume_id(&req.volume_id)?;
        let r = self
            .blocking(move |pool| {
                let id = pool.merge(v, req.max_depth)?;
                reply(pool, id)
            })
            .await?;
        Ok(Response::new(r))
    }

    async fn flatten_volume(
        &self,
        req: Request<FlattenVolumeRequest>,
    ) -> Result<Response<JobReply>, Status> {
        let v = volume_id(&req.into_inner().volume_id)?;
        let r = self
            .blocking(move |pool| {
                let id = pool.flatten(v)?;
                reply(pool, id)
            })
            .await?;
        Ok(Response::new(r))
    }

    async fn acknowledge_loss(
        &self,
        req: Request<AcknowledgeLossRequest>,
    ) -> Result<Response<AcknowledgeLossReply>, Status> {
        let v = volume_id(&req.into_inner().volume_id)?;
        let lost = self
            .blocking(move |pool| {
                let lost = pool.volume_fault(v)?.unwrap_or_default();
                pool.acknowledge_loss(v)?;
                Ok(lost)
            })
            .await?;
        Ok(Response::new(AcknowledgeLossReply { lost }))
    }

    async fn list_jobs(
        &self,
        _: Request<ListJobsRequest>,
    ) -> Result<Response<ListJobsReply>, Status> {
        let jobs = self.blocking(|pool| pool.jobs()).await?;
        Ok(Response::new(ListJobsReply {
            jobs: jobs.iter().map(job_message).collect(),
        }))
    }

    async fn snapshot_space(
        &self,
        req: Request<SnapshotSpaceRequest>,
    ) -> Result<Response<SnapshotSpaceReply>, Status> {
        let filter = req.into_inner().source_volume_id;
        let snapshots = self
            .blocking(move |pool| {
                let mut out = Vec::new();
                for s in pool.list_snapshots()? {
                    if !filter.is_empty() && s.volume.to_string() != filter {
                        continue;
                    }
                    match pool.snapshot_frees(s.id) {
                        Ok(frees) => out.push(SnapshotSpace {
                            snapshot_id: s.id.to_string(),
                            frees_bytes: frees,
                        }),
                        // Deleted meanwhile.
                        Err(crate::engine::Error::SnapshotNotFound(_)) => {}
                        Err(e) => return Err(e),
                    }
                }
                Ok(out)
            })
            .await?;
        Ok(Response::new(SnapshotSpaceReply { snapshots }))
    }
}
