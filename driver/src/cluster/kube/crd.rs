//! Strata's custom resources (group `strata.dev`, version `v1alpha1`, all
//! cluster-scoped): one per volume, snapshot and node. The object's name is
//! the volume, snapshot or node ID; what can change after creation (the
//! record's state, a node's room and health) is in the status subresource.
//! `strata crdgen` prints their CRDs; `charts/strata/crds/strata.dev.yaml`
//! and `manifests/base/crds.yaml` are that output (a test checks).

// Each `printcolumn(...)` of kube's derive repeats the same keys, which
// clippy takes for duplicated attributes.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Where a volume's initial contents came from: one of the two is set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SourceSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<String>,
}

/// A volume: what CSI asked for, and the node that holds it.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "strata.dev",
    version = "v1alpha1",
    kind = "StrataVolume",
    status = "RecordStatus",
    shortname = "svol",
    category = "strata",
    doc = "A Strata volume: the CSI name it was created for, its size and the node that holds its layers",
    printcolumn(name = "CSI Name", type_ = "string", json_path = ".spec.csiName"),
    printcolumn(name = "Node", type_ = "string", json_path = ".spec.node"),
    printcolumn(name = "Bytes", type_ = "integer", json_path = ".spec.capacityBytes"),
    printcolumn(name = "State", type_ = "string", json_path = ".status.state"),
    printcolumn(name = "Moving To", type_ = "string", json_path = ".spec.moving.to"),
    printcolumn(name = "Move", type_ = "string", json_path = ".spec.moving.message"),
    printcolumn(name = "Lost With", type_ = "string", json_path = ".spec.lostWith"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct StrataVolumeSpec {
    pub csi_name: String,
    pub capacity_bytes: u64,
    #[serde(default)]
    pub parameters: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<SourceSpec>,
    pub node: String,
    /// Any node may attach it (over the data path to `node`); false pins it
    /// to `node`.
    #[serde(default)]
    pub anywhere: bool,
    pub created_unix_ns: u64,
    /// A move to another node under way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moving: Option<MoveSpec>,
    /// The PersistentVolumeClaim it was made for (Events go there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim: Option<ClaimSpec>,
    /// The node its data was lost with (`strata node forget
    /// --abandon-data`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost_with: Option<String>,
}

/// A PersistentVolumeClaim.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ClaimSpec {
    pub namespace: String,
    pub name: String,
}

/// A volume's move between nodes: from, to, the phase (`copying`,
/// `fetching` after a switch-first move's switch, `following` after a live
/// move's, `removing` the old copy, or `aborting`) and what it waits for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MoveSpec {
    pub from: String,
    pub to: String,
    /// Switch first: the target serves the volume while it fetches it.
    #[serde(default)]
    pub lazy: bool,
    /// Live: the volume is in use while it moves.
    #[serde(default)]
    pub live: bool,
    /// Live: the node it is published to (whose attachment follows it),
    /// and whether read-only.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub published_to: String,
    #[serde(default)]
    pub read_only: bool,
    /// Live: the boot ID the source sealed the volume under.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sealed_boot: String,
    pub phase: String,
    #[serde(default)]
    pub message: String,
    pub started_unix_ns: u64,
}

/// Whether the engine object behind a volume or snapshot record exists.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RecordStatus {
    /// `Creating` (the ID is chosen, the node may not have it yet) or
    /// `Ready`.
    #[serde(default)]
    pub state: String,
}

/// A snapshot: the volume it was taken of, and where its layers are.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "strata.dev",
    version = "v1alpha1",
    kind = "StrataSnapshot",
    status = "RecordStatus",
    shortname = "ssnap",
    category = "strata",
    doc = "A Strata snapshot: the CSI name it was created for, its source volume and node",
    printcolumn(name = "CSI Name", type_ = "string", json_path = ".spec.csiName"),
    printcolumn(name = "Volume", type_ = "string", json_path = ".spec.sourceVolume"),
    printcolumn(name = "Node", type_ = "string", json_path = ".spec.node"),
    printcolumn(name = "State", type_ = "string", json_path = ".status.state"),
    printcolumn(name = "Group", type_ = "string", json_path = ".spec.groupName"),
    printcolumn(name = "Moving To", type_ = "string", json_path = ".spec.moving.to"),
    printcolumn(name = "Lost With", type_ = "string", json_path = ".spec.lostWith"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct StrataSnapshotSpec {
    pub csi_name: String,
    pub source_volume: String,
    pub size_bytes: u64,
    pub node: String,
    pub created_unix_ns: u64,
    /// The group snapshot it was cut with: its ID and CSI name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_name: Option<String>,
    /// A move to another node under way (a drain's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moving: Option<MoveSpec>,
    /// The node its data was lost with (`strata node forget
    /// --abandon-data`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost_with: Option<String>,
}

/// A node running `strata node`: where its agent listens. It creates this
/// itself; the status is its last report and the controller's verdict.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "strata.dev",
    version = "v1alpha1",
    kind = "StrataNode",
    status = "StrataNodeStatus",
    shortname = "snode",
    category = "strata",
    doc = "A node running Strata's node plugin: its agent address, room and health",
    printcolumn(name = "Agent", type_ = "string", json_path = ".spec.agentAddress"),
    printcolumn(name = "State", type_ = "string", json_path = ".status.state"),
    printcolumn(name = "Volumes", type_ = "integer", json_path = ".status.volumes"),
    printcolumn(
        name = "Available",
        type_ = "integer",
        json_path = ".status.availableBytes"
    ),
    printcolumn(name = "Version", type_ = "string", json_path = ".status.version"),
    printcolumn(
        name = "Message",
        type_ = "string",
        json_path = ".status.message",
        priority = 1
    )
)]
#[serde(rename_all = "camelCase")]
pub struct StrataNodeSpec {
    pub agent_address: String,
    /// Being drained: no new volume is placed on it.
    #[serde(default)]
    pub draining: bool,
}

/// A node's last report (room, version) and health.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StrataNodeStatus {
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub capacity_bytes: u64,
    #[serde(default)]
    pub available_bytes: u64,
    #[serde(default)]
    pub provisioned_bytes: u64,
    #[serde(default)]
    pub max_volumes: u32,
    #[serde(default)]
    pub volumes: u32,
    /// `Ready` or `Stale`.
    #[serde(default)]
    pub state: String,
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub last_seen_unix_ns: u64,
}

/// The CRDs of every Strata resource, as one multi-document YAML stream.
pub fn crds_yaml() -> String {
    use kube::CustomResourceExt;
    let mut out =
        String::from("# Strata's custom resources. Generated by `strata crdgen`; do not edit.\n");
    for crd in [
        StrataVolume::crd(),
        StrataSnapshot::crd(),
        StrataNode::crd(),
    ] {
        out.push_str("---\n");
        out.push_str(&serde_saphyr::to_string(&crd).expect("a CRD serializes"));
    }
    out
}
