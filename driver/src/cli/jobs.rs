//! `strata jobs`, `strata volume merge|flatten`: background jobs through
//! Strata's admin API.

use std::process::ExitCode;
use std::time::Duration;

use csi_proto::admin::v1::*;
use serde::Serialize;

use super::client::{admin, status_message};
use super::output::{self, Format};
use super::size;
use crate::endpoint::Endpoint;

#[derive(Debug, Serialize)]
struct JobOut {
    id: String,
    kind: String,
    reason: String,
    target: String,
    state: String,
    progress: String,
    rate: String,
    reflink_bytes: u64,
    copy_bytes: u64,
    /// Why it waits, what it left alone, or why it failed.
    note: String,
    created_unix_ns: u64,
    finished_unix_ns: u64,
}

fn job_out(j: &Job) -> JobOut {
    let progress = if j.state == "running" && j.total_bytes > 0 {
        format!(
            "{:.0}% of {}",
            100.0 * j.done_bytes as f64 / j.total_bytes as f64,
            size::format(j.total_bytes)
        )
    } else {
        "-".into()
    };
    let rate = if j.state == "running" {
        format!("{}/s", size::format(j.rate_bytes_per_second as u64))
    } else {
        "-".into()
    };
    let target = if j.volume_id.is_empty() {
        format!("layer {}", j.layer_id)
    } else {
        format!("volume {}", j.volume_id)
    };
    let note = [j.waiting.as_str(), j.message.as_str()]
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    JobOut {
        id: j.id.clone(),
        kind: j.kind.clone(),
        reason: j.reason.clone(),
        target,
        state: j.state.clone(),
        progress,
        rate,
        reflink_bytes: j.reflink_bytes,
        copy_bytes: j.copy_bytes,
        note,
        created_unix_ns: j.created_unix_ns,
        finished_unix_ns: j.finished_unix_ns,
    }
}

fn print(format: Format, jobs: &[Job]) {
    let rows: Vec<JobOut> = jobs.iter().map(job_out).collect();
    match format {
        Format::Json => output::json(&rows),
        Format::Table => output::table(
            &[
                "ID",
                "KIND",
                "WHY",
                "TARGET",
                "STATE",
                "PROGRESS",
                "RATE",
                "MOVED (REFLINK/COPY)",
                "NOTE",
            ],
            &rows
                .into_iter()
                .map(|j| {
                    vec![
                        j.id,
                        j.kind,
                        j.reason,
                        j.target,
                        j.state,
                        j.progress,
                        j.rate,
                        format!(
                            "{}/{}",
                            size::format(j.reflink_bytes),
                            size::format(j.copy_bytes)
                        ),
                        j.note,
                    ]
                })
                .collect::<Vec<_>>(),
        ),
    }
}

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("strata: {msg}");
    ExitCode::FAILURE
}

pub async fn list(endpoint: &Endpoint, format: Format) -> ExitCode {
    let mut c = match admin(endpoint).await {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    match c.list_jobs(ListJobsRequest {}).await {
        Ok(r) => {
            print(format, &r.into_inner().jobs);
            ExitCode::SUCCESS
        }
        Err(s) => fail(status_message(&s)),
    }
}

/// What to start.
#[derive(Debug, Clone, Copy)]
pub enum Start {
    Merge { max_depth: u32 },
    Flatten,
}

/// Starts a merge or flatten of `id`; with `wait`, follows it to its end.
pub async fn start(
    endpoint: &Endpoint,
    format: Format,
    id: String,
    what: Start,
    wait: bool,
) -> ExitCode {
    let mut c = match admin(endpoint).await {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let r = match what {
        Start::Merge { max_depth } => {
            c.merge_volume(MergeVolumeRequest {
                volume_id: id,
                max_depth,
            })
            .await
        }
        Start::Flatten => {
            c.flatten_volume(FlattenVolumeRequest { volume_id: id })
                .await
        }
    };
    let job = match r {
        Ok(r) => r.into_inner().job.unwrap_or_default(),
        Err(s) => return fail(status_message(&s)),
    };
    if !wait {
        print(format, std::slice::from_ref(&job));
        return ExitCode::SUCCESS;
    }
    loop {
        let now = match c.list_jobs(ListJobsRequest {}).await {
            Ok(r) => r.into_inner().jobs.into_iter().find(|j| j.id == job.id),
            Err(s) => return fail(status_message(&s)),
        };
        match now {
            Some(j) if j.state == "done" || j.state == "failed" => {
                print(format, std::slice::from_ref(&j));
                return if j.state == "done" {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                };
            }
            Some(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            None => return fail(format!("job {} is no longer listed", job.id)),
        }
    }
}

/// Bytes deleting each snapshot would free, by snapshot ID.
pub async fn snapshot_frees(
    endpoint: &Endpoint,
) -> Result<std::collections::HashMap<String, u64>, String> {
    let mut c = admin(endpoint).await?;
    let r = c
        .snapshot_space(SnapshotSpaceRequest::default())
        .await
        .map_err(|s| status_message(&s))?;
    Ok(r.into_inner()
        .snapshots
        .into_iter()
        .map(|s| (s.snapshot_id, s.frees_bytes))
        .collect())
}
