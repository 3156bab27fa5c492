//! `strata volume move`, `strata node drain` and `strata node forget`:
//! moves between nodes, through the controller's Cluster service.

use std::process::ExitCode;

use csi_proto::cluster::v1::cluster_client::ClusterClient;
use csi_proto::cluster::v1::{
    DrainNodeRequest, ForgetNodeRequest, MoveVolumeReply, MoveVolumeRequest, MovedSnapshot,
};
use serde::Serialize;
use tonic::Code;

use super::client::{channel, status_message};
use super::output::{self, Format};
use super::size;
use crate::endpoint::Endpoint;

#[derive(Debug, Serialize)]
struct MovedOut {
    volume: String,
    from: String,
    to: String,
    copied_bytes: u64,
    seconds: f64,
}

fn moved_out(r: &MoveVolumeReply) -> MovedOut {
    MovedOut {
        volume: r.volume_id.clone(),
        from: r.from_node.clone(),
        to: r.to_node.clone(),
        copied_bytes: r.copied_bytes,
        seconds: r.seconds,
    }
}

fn moved_row(m: &MovedOut) -> Vec<String> {
    vec![
        m.volume.clone(),
        m.from.clone(),
        m.to.clone(),
        size::format(m.copied_bytes),
        format!("{:.1}", m.seconds),
    ]
}

const MOVED_HEADERS: [&str; 5] = ["VOLUME", "FROM", "TO", "COPIED", "SECONDS"];

#[derive(Debug, Serialize)]
struct SnapshotOut {
    snapshot: String,
    from: String,
    to: String,
    copied_bytes: u64,
    /// The snapshot there it was made from (only what changed since it was
    /// copied); empty: all of it was copied.
    base: String,
}

fn snapshot_out(r: MovedSnapshot) -> SnapshotOut {
    SnapshotOut {
        snapshot: r.snapshot_id,
        from: r.from_node,
        to: r.to_node,
        copied_bytes: r.copied_bytes,
        base: r.base_snapshot_id,
    }
}

const SNAPSHOT_HEADERS: [&str; 5] = ["SNAPSHOT", "FROM", "TO", "COPIED", "CHANGES SINCE"];

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("strata: {msg}");
    ExitCode::FAILURE
}

async fn client(endpoint: &Endpoint) -> Result<ClusterClient<tonic::transport::Channel>, String> {
    Ok(ClusterClient::new(channel(endpoint).await?))
}

/// `strata volume move ID [--to NODE]`: waits for the move (a call that
/// times out on its way to the leader is made again, and joins the move,
/// which goes on meanwhile).
pub async fn move_to(
    endpoint: &Endpoint,
    format: Format,
    id: String,
    to: Option<String>,
) -> ExitCode {
    let mut c = match client(endpoint).await {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let req = MoveVolumeRequest {
        volume_id: id,
        node_id: to.unwrap_or_default(),
    };
    let reply = loop {
        match c.move_volume(req.clone()).await {
            Ok(r) => break r.into_inner(),
            Err(s) if s.code() == Code::DeadlineExceeded => continue,
            Err(s) if s.code() == Code::Unimplemented => {
                return fail("this endpoint is not a Strata controller (moves need a cluster)");
            }
            Err(s) => return fail(status_message(&s)),
        }
    };
    let m = moved_out(&reply);
    let snapshots_moved: Vec<SnapshotOut> = reply
        .moved_snapshots
        .into_iter()
        .map(snapshot_out)
        .collect();
    let snapshots_stayed: Vec<(String, String)> = reply
        .stayed_snapshots
        .into_iter()
        .map(|s| (s.snapshot_id, s.why))
        .collect();
    match format {
        Format::Json => output::json(&serde_json::json!({
            "volume": m.volume,
            "from": m.from,
            "to": m.to,
            "copied_bytes": m.copied_bytes,
            "seconds": m.seconds,
            "snapshots_moved": snapshots_moved,
            "snapshots_stayed": snapshots_stayed,
        })),
        Format::Table => {
            output::table(&MOVED_HEADERS, &[moved_row(&m)]);
            snapshots_table(&snapshots_moved);
            for (snapshot, why) in &snapshots_stayed {
                eprintln!("snapshot {snapshot} stays where it is: {why}");
            }
        }
    }
    // The volume moved; a snapshot that stays is said above.
    ExitCode::SUCCESS
}

/// The snapshots moved, if any.
fn snapshots_table(moved: &[SnapshotOut]) {
    if moved.is_empty() {
        return;
    }
    let rows: Vec<Vec<String>> = moved
        .iter()
        .map(|m| {
            let base = if m.base.is_empty() { "-" } else { &m.base };
            vec![
                m.snapshot.clone(),
                m.from.clone(),
                m.to.clone(),
                size::format(m.copied_bytes),
                base.to_string(),
            ]
        })
        .collect();
    output::table(&SNAPSHOT_HEADERS, &rows);
}

/// `strata node drain NODE`: exits 1 if a volume stays.
pub async fn drain(endpoint: &Endpoint, format: Format, node: String) -> ExitCode {
    let mut c = match client(endpoint).await {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let reply = match c
        .drain_node(DrainNodeRequest {
            node_id: node.clone(),
            undo: false,
        })
        .await
    {
        Ok(r) => r.into_inner(),
        Err(s) if s.code() == Code::Unimplemented => {
            return fail("this endpoint is not a Strata controller (drains need a cluster)");
        }
        Err(s) => return fail(status_message(&s)),
    };
    let moved: Vec<MovedOut> = reply.moved.iter().map(moved_out).collect();
    let snapshots_moved: Vec<SnapshotOut> = reply
        .moved_snapshots
        .into_iter()
        .map(snapshot_out)
        .collect();
    let (snapshots, volumes): (Vec<_>, Vec<_>) = reply
        .stayed
        .into_iter()
        .partition(|s| !s.snapshot_id.is_empty());
    let stayed: Vec<(String, String)> = volumes.into_iter().map(|s| (s.volume_id, s.why)).collect();
    let snapshots: Vec<(String, String)> = snapshots
        .into_iter()
        .map(|s| (s.snapshot_id, s.why))
        .collect();
    match format {
        Format::Json => output::json(&serde_json::json!({
            "moved": moved,
            "snapshots_moved": snapshots_moved,
            "stayed": stayed,
            "snapshots_stayed": snapshots,
        })),
        Format::Table => {
            output::table(
                &MOVED_HEADERS,
                &moved.iter().map(moved_row).collect::<Vec<_>>(),
            );
            snapshots_table(&snapshots_moved);
            for (volume, why) in &stayed {
                eprintln!("volume {volume} stays on node {node}: {why}");
            }
            for (snapshot, why) in &snapshots {
                eprintln!("snapshot {snapshot} stays on node {node}: {why}");
            }
        }
    }
    if stayed.is_empty() && snapshots.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// `strata node undrain NODE`.
pub async fn undrain(endpoint: &Endpoint, node: String) -> ExitCode {
    let mut c = match client(endpoint).await {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let req = DrainNodeRequest {
        node_id: node.clone(),
        undo: true,
    };
    match c.drain_node(req).await {
        Ok(_) => {
            println!("node {node} takes new volumes again");
            ExitCode::SUCCESS
        }
        Err(s) => fail(status_message(&s)),
    }
}

/// `strata node forget NODE [--abandon-data]`.
pub async fn forget(endpoint: &Endpoint, node: String, abandon_data: bool) -> ExitCode {
    let mut c = match client(endpoint).await {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let req = ForgetNodeRequest {
        node_id: node.clone(),
        abandon_data,
    };
    match c.forget_node(req).await {
        Ok(r) => {
            let r = r.into_inner();
            println!("node {node} is forgotten; if it comes back, it registers as a new node");
            for (what, ids) in [("volume", &r.lost_volumes), ("snapshot", &r.lost_snapshots)] {
                for id in ids {
                    println!("lost {what} {id}: its data was on node {node}; delete it");
                }
            }
            for id in &r.holed_volumes {
                println!("lost volume {id}: it was still fetching from node {node}; delete it");
            }
            for id in &r.kept_snapshots {
                println!(
                    "snapshot {id} had moved to node {node}: it stays where it came from, if \
                     that node still holds it"
                );
            }
            ExitCode::SUCCESS
        }
        Err(s) if s.code() == Code::Unimplemented => {
            fail("this endpoint is not a Strata controller (nodes are forgotten by a cluster's)")
        }
        Err(s) => fail(status_message(&s)),
    }
}
