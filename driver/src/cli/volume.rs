//! `strata volume …` and `strata snapshot …`: the control plane through
//! CSI, for people.

use std::collections::HashMap;
use std::process::ExitCode;

use csi_proto::csi::v1::volume_capability::{
    AccessMode, AccessType, MountVolume, access_mode::Mode,
};
use csi_proto::csi::v1::volume_content_source::{SnapshotSource, Type, VolumeSource};
use csi_proto::csi::v1::*;
use serde::Serialize;

use super::client::{admin, controller, status_message};
use super::output::{self, Format};
use super::size;
use crate::endpoint::Endpoint;

#[derive(Debug, Serialize)]
struct VolumeOut {
    id: String,
    size_bytes: i64,
    size: String,
    source: String,
    node: String,
}

#[derive(Debug, Serialize)]
struct SnapshotOut {
    id: String,
    volume: String,
    size_bytes: i64,
    size: String,
    created: String,
    /// Bytes deleting it would free (its layer's blocks the layer above
    /// overrides, or all of it when nothing else needs it).
    frees_bytes: Option<u64>,
}

fn volume_out(v: &Volume) -> VolumeOut {
    let source = match v.content_source.as_ref().and_then(|s| s.r#type.as_ref()) {
        Some(Type::Snapshot(s)) => format!("snapshot {}", s.snapshot_id),
        Some(Type::Volume(v)) => format!("volume {}", v.volume_id),
        None => "-".into(),
    };
    let node = v
        .accessible_topology
        .first()
        .and_then(|t| t.segments.values().next().cloned())
        .unwrap_or_else(|| "-".into());
    VolumeOut {
        id: v.volume_id.clone(),
        size_bytes: v.capacity_bytes,
        size: size::format(v.capacity_bytes as u64),
        source,
        node,
    }
}

fn snapshot_out(s: &Snapshot) -> SnapshotOut {
    let created = s
        .creation_time
        .as_ref()
        .map(|t| humantime_utc(t.seconds))
        .unwrap_or_else(|| "-".into());
    SnapshotOut {
        id: s.snapshot_id.clone(),
        volume: s.source_volume_id.clone(),
        size_bytes: s.size_bytes,
        size: size::format(s.size_bytes as u64),
        created,
        frees_bytes: None,
    }
}

/// `YYYY-MM-DD HH:MM:SS` UTC from Unix seconds (no date library needed).
fn humantime_utc(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("strata: {msg}");
    ExitCode::FAILURE
}

fn print_volumes(format: Format, vols: Vec<VolumeOut>) {
    match format {
        Format::Json => output::json(&vols),
        Format::Table => output::table(
            &["ID", "SIZE", "SOURCE", "NODE"],
            &vols
                .into_iter()
                .map(|v| vec![v.id, v.size, v.source, v.node])
                .collect::<Vec<_>>(),
        ),
    }
}

fn print_snapshots(format: Format, snaps: Vec<SnapshotOut>) {
    match format {
        Format::Json => output::json(&snaps),
        Format::Table => output::table(
            &["ID", "VOLUME", "SIZE", "CREATED (UTC)", "DELETING FREES"],
            &snaps
                .into_iter()
                .map(|s| {
                    let frees = s.frees_bytes.map_or_else(|| "-".into(), size::format);
                    vec![s.id, s.volume, s.size, s.created, frees]
                })
                .collect::<Vec<_>>(),
        ),
    }
}

/// Options of `strata volume create`.
#[derive(Debug, Clone)]
pub struct CreateVolume {
    pub name: String,
    pub size: Option<u64>,
    pub from_snapshot: Option<String>,
    pub from_volume: Option<String>,
    pub fs_type: Option<String>,
    pub block: bool,
}

pub async fn create(endpoint: &Endpoint, format: Format, args: CreateVolume) -> ExitCode {
    let mut client = match controller(endpoint).await {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let access_type = if args.block {
        AccessType::Block(Default::default())
    } else {
        AccessType::Mount(MountVolume {
            fs_type: args.fs_type.clone().unwrap_or_default(),
            ..Default::default()
        })
    };
    let source = match (args.from_snapshot, args.from_volume) {
        (Some(s), None) => Some(VolumeContentSource {
            r#type: Some(Type::Snapshot(SnapshotSource { snapshot_id: s })),
        }),
        (None, Some(v)) => Some(VolumeContentSource {
            r#type: Some(Type::Volume(VolumeSource { volume_id: v })),
        }),
        (None, None) => None,
        (Some(_), Some(_)) => return fail("give --from-snapshot or --from-volume, not both"),
    };
    let mut parameters = HashMap::new();
    if let Some(fs) = args.fs_type {
        parameters.insert("fsType".to_string(), fs);
    }
    let req = CreateVolumeRequest {
        name: args.name,
        capacity_range: args.size.map(|s| CapacityRange {
            required_bytes: s as i64,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![VolumeCapability {
            access_type: Some(access_type),
            access_mode: Some(AccessMode {
                mode: Mode::SingleNodeWriter as i32,
            }),
        }],
        parameters,
        volume_content_source: source,
        ..Default::default()
    };
    match client.create_volume(req).await {
        Ok(r) => {
            let v = r.into_inner().volume.unwrap_or_default();
            print_volumes(format, vec![volume_out(&v)]);
            ExitCode::SUCCESS
        }
        Err(s) => fail(status_message(&s)),
    }
}

/// Collects every page of a paginated list: `page(token)` returns a
/// page's items and the next token (empty at the end).
async fn all_pages<T, F, Fut>(mut page: F) -> Result<Vec<T>, tonic::Status>
where
    F: FnMut(String) -> Fut,
    Fut: std::future::Future<Output = Result<(Vec<T>, String), tonic::Status>>,
{
    let mut out = Vec::new();
    let mut token = String::new();
    loop {
        let (items, next) = page(token).await?;
        out.extend(items);
        if next.is_empty() {
            return Ok(out);
        }
        token = next;
    }
}

pub async fn list(endpoint: &Endpoint, format: Format) -> ExitCode {
    let client = match controller(endpoint).await {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let vols = all_pages(|starting_token| {
        let mut client = client.clone();
        async move {
            let r = client
                .list_volumes(ListVolumesRequest {
                    max_entries: 500,
                    starting_token,
                })
                .await?;
            let r = r.into_inner();
            let items = r
                .entries
                .iter()
                .filter_map(|e| e.volume.as_ref())
                .map(volume_out)
                .collect();
            Ok((items, r.next_token))
        }
    })
    .await;
    match vols {
        Ok(vols) => {
            print_volumes(format, vols);
            ExitCode::SUCCESS
        }
        Err(s) => fail(status_message(&s)),
    }
}

pub async fn delete(endpoint: &Endpoint, id: String) -> ExitCode {
    let mut client = match controller(endpoint).await {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    match client
        .delete_volume(DeleteVolumeRequest {
            volume_id: id.clone(),
            ..Default::default()
        })
        .await
    {
        Ok(_) => {
            println!("deleted volume {id}");
            ExitCode::SUCCESS
        }
        Err(s) => fail(status_message(&s)),
    }
}

pub async fn acknowledge_loss(endpoint: &Endpoint, id: String) -> ExitCode {
    let mut client = match admin(endpoint).await {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let req = csi_proto::admin::v1::AcknowledgeLossRequest {
        volume_id: id.clone(),
    };
    match client.acknowledge_loss(req).await {
        Ok(r) => {
            let lost = r.into_inner().lost;
            if lost.is_empty() {
                println!("volume {id} had no recorded loss");
            } else {
                println!("volume {id} takes writes again; it had lost: {lost}");
            }
            ExitCode::SUCCESS
        }
        Err(s) => fail(status_message(&s)),
    }
}

pub async fn expand(
    endpoint: &Endpoint,
    format: Format,
    id: String,
    size: u64,
    path: Option<std::path::PathBuf>,
) -> ExitCode {
    let mut client = match controller(endpoint).await {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let req = ControllerExpandVolumeRequest {
        volume_id: id.clone(),
        capacity_range: Some(CapacityRange {
            required_bytes: size as i64,
            limit_bytes: 0,
        }),
        ..Default::default()
    };
    let mut bytes = match client.controller_expand_volume(req).await {
        Ok(r) => r.into_inner().capacity_bytes,
        Err(s) => return fail(status_message(&s)),
    };
    if let Some(path) = &path {
        match super::mount::expand_on_node(endpoint, &id, path, bytes as u64).await {
            Ok(b) => bytes = b,
            Err(e) => return fail(e),
        }
    }
    match format {
        Format::Json => output::json(&serde_json::json!({ "id": id, "size_bytes": bytes })),
        Format::Table => println!("volume {id} is now {}", size::format(bytes as u64)),
    }
    ExitCode::SUCCESS
}

pub async fn snapshot_create(
    endpoint: &Endpoint,
    format: Format,
    name: String,
    volume: String,
    freeze_filesystem: bool,
) -> ExitCode {
    let mut client = match controller(endpoint).await {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let mut parameters = HashMap::new();
    if freeze_filesystem {
        parameters.insert("freezeFilesystem".to_string(), "true".to_string());
    }
    let req = CreateSnapshotRequest {
        source_volume_id: volume,
        name,
        parameters,
        ..Default::default()
    };
    match client.create_snapshot(req).await {
        Ok(r) => {
            let s = r.into_inner().snapshot.unwrap_or_default();
            print_snapshots(format, vec![snapshot_out(&s)]);
            ExitCode::SUCCESS
        }
        Err(s) => fail(status_message(&s)),
    }
}

pub async fn snapshot_list(
    endpoint: &Endpoint,
    format: Format,
    volume: Option<String>,
) -> ExitCode {
    let client = match controller(endpoint).await {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let source_volume_id = volume.unwrap_or_default();
    let snaps = all_pages(|starting_token| {
        let mut client = client.clone();
        let req = ListSnapshotsRequest {
            max_entries: 500,
            starting_token,
            source_volume_id: source_volume_id.clone(),
            ..Default::default()
        };
        async move {
            let r = client.list_snapshots(req).await?.into_inner();
            let items = r
                .entries
                .iter()
                .filter_map(|e| e.snapshot.as_ref())
                .map(snapshot_out)
                .collect();
            Ok((items, r.next_token))
        }
    })
    .await;
    let mut snaps = match snaps {
        Ok(snaps) => snaps,
        Err(s) => return fail(status_message(&s)),
    };
    match super::jobs::snapshot_frees(endpoint).await {
        Ok(frees) => {
            for s in &mut snaps {
                s.frees_bytes = frees.get(&s.id).copied();
            }
        }
        Err(e) => eprintln!("strata: (what deleting each snapshot frees is unknown: {e})"),
    }
    print_snapshots(format, snaps);
    ExitCode::SUCCESS
}

pub async fn snapshot_delete(endpoint: &Endpoint, id: String) -> ExitCode {
    let mut client = match controller(endpoint).await {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    match client
        .delete_snapshot(DeleteSnapshotRequest {
            snapshot_id: id.clone(),
            ..Default::default()
        })
        .await
    {
        Ok(_) => {
            println!("deleted snapshot {id}");
            ExitCode::SUCCESS
        }
        Err(s) => fail(status_message(&s)),
    }
}

#[derive(Debug, Serialize)]
struct DiffOut {
    base: String,
    target: String,
    volume_capacity_bytes: i64,
    changed_bytes: i64,
    ranges: Vec<RangeOut>,
}

#[derive(Debug, Serialize)]
struct RangeOut {
    offset: i64,
    length: i64,
}

pub async fn snapshot_diff(
    endpoint: &Endpoint,
    format: Format,
    base: String,
    target: String,
) -> ExitCode {
    let mut client = match super::client::snapshot_metadata(endpoint).await {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let req = GetMetadataDeltaRequest {
        base_snapshot_id: base.clone(),
        target_snapshot_id: target.clone(),
        ..Default::default()
    };
    let mut out = DiffOut {
        base,
        target,
        volume_capacity_bytes: 0,
        changed_bytes: 0,
        ranges: Vec::new(),
    };
    let stream = client.get_metadata_delta(req).await;
    let mut stream = match stream {
        Ok(s) => s.into_inner(),
        Err(s) => return fail(status_message(&s)),
    };
    loop {
        match stream.message().await {
            Ok(Some(page)) => {
                out.volume_capacity_bytes = page.volume_capacity_bytes;
                for r in page.block_metadata {
                    out.changed_bytes += r.size_bytes;
                    out.ranges.push(RangeOut {
                        offset: r.byte_offset,
                        length: r.size_bytes,
                    });
                }
            }
            Ok(None) => break,
            Err(s) => return fail(status_message(&s)),
        }
    }
    match format {
        Format::Json => output::json(&out),
        Format::Table => {
            let rows: Vec<Vec<String>> = out
                .ranges
                .iter()
                .map(|r| {
                    vec![
                        r.offset.to_string(),
                        r.length.to_string(),
                        size::format(r.length as u64),
                    ]
                })
                .collect();
            output::table(&["OFFSET", "LENGTH", "SIZE"], &rows);
            println!(
                "{} ranges, {} changed of {}",
                out.ranges.len(),
                size::format(out.changed_bytes as u64),
                size::format(out.volume_capacity_bytes as u64)
            );
        }
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    #[test]
    fn dates_are_formatted_in_utc() {
        assert_eq!(super::humantime_utc(0), "1970-01-01 00:00:00");
        assert_eq!(super::humantime_utc(1_795_305_600), "2026-11-22 00:00:00");
    }
}
