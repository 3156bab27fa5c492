//! Just enough of an API server for `kubectl create --dry-run=client
//! --validate=false`: kubectl maps every object's apiVersion and kind to a
//! resource through discovery before it prints a dry run, and no API
//! server can run on these machines.
//!
//! What it serves is not made up here: the built-in kinds come from
//! k8s-openapi's generated `Resource` constants (group, version, plural,
//! scope), the custom kinds from the CustomResourceDefinitions given to it,
//! the way an API server serves a CRD. An apiVersion/kind pair that a real
//! server would not know is unknown here as well, so kubectl refuses it.

use std::any::TypeId;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;

use k8s_openapi::api::{apps, core, networking, policy, rbac, storage};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::{NamespaceResourceScope, Resource};
use serde_json::{Value, json};

/// One resource as discovery lists it.
#[derive(Clone, Debug)]
pub struct Kind {
    pub group: String,
    pub version: String,
    pub kind: String,
    pub plural: String,
    pub namespaced: bool,
}

fn builtin<T: Resource + 'static>() -> Kind {
    Kind {
        group: T::GROUP.to_string(),
        version: T::VERSION.to_string(),
        kind: T::KIND.to_string(),
        plural: T::URL_PATH_SEGMENT.to_string(),
        namespaced: TypeId::of::<T::Scope>() == TypeId::of::<NamespaceResourceScope>(),
    }
}

/// The built-in kinds a storage driver's deployment and examples use.
pub fn builtins() -> Vec<Kind> {
    vec![
        builtin::<core::v1::Namespace>(),
        builtin::<core::v1::ServiceAccount>(),
        builtin::<core::v1::Secret>(),
        builtin::<core::v1::ConfigMap>(),
        builtin::<core::v1::Service>(),
        builtin::<core::v1::Pod>(),
        builtin::<core::v1::PersistentVolumeClaim>(),
        builtin::<apps::v1::Deployment>(),
        builtin::<apps::v1::DaemonSet>(),
        builtin::<rbac::v1::ClusterRole>(),
        builtin::<rbac::v1::ClusterRoleBinding>(),
        builtin::<rbac::v1::Role>(),
        builtin::<rbac::v1::RoleBinding>(),
        builtin::<storage::v1::CSIDriver>(),
        builtin::<storage::v1::StorageClass>(),
        builtin::<policy::v1::PodDisruptionBudget>(),
        builtin::<networking::v1::NetworkPolicy>(),
        builtin::<CustomResourceDefinition>(),
    ]
}

/// The kinds that CustomResourceDefinition documents declare.
pub fn from_crds(docs: &[Value]) -> Vec<Kind> {
    let mut out = Vec::new();
    for d in docs
        .iter()
        .filter(|d| d["kind"] == "CustomResourceDefinition")
    {
        let spec = &d["spec"];
        for v in spec["versions"].as_array().into_iter().flatten() {
            if v["served"] == false {
                continue;
            }
            out.push(Kind {
                group: spec["group"].as_str().unwrap().to_string(),
                version: v["name"].as_str().unwrap().to_string(),
                kind: spec["names"]["kind"].as_str().unwrap().to_string(),
                plural: spec["names"]["plural"].as_str().unwrap().to_string(),
                namespaced: spec["scope"] == "Namespaced",
            });
        }
    }
    out
}

/// Serves discovery for `kinds` on a loopback port until the process
/// ends; returns the server URL for `kubectl --server`.
pub fn serve(kinds: Vec<Kind>) -> String {
    let mut groups: BTreeMap<(String, String), Vec<Kind>> = BTreeMap::new();
    for k in kinds {
        groups
            .entry((k.group.clone(), k.version.clone()))
            .or_default()
            .push(k);
    }
    let mut pages: BTreeMap<String, Value> = BTreeMap::new();
    let mut group_list = Vec::new();
    for ((group, version), kinds) in &groups {
        let group_version = if group.is_empty() {
            version.clone()
        } else {
            format!("{group}/{version}")
        };
        let resources: Vec<Value> = kinds
            .iter()
            .map(|k| {
                json!({
                    "name": k.plural,
                    "singularName": k.kind.to_lowercase(),
                    "namespaced": k.namespaced,
                    "kind": k.kind,
                    "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"],
                })
            })
            .collect();
        let path = if group.is_empty() {
            format!("/api/{version}")
        } else {
            format!("/apis/{group_version}")
        };
        pages.insert(
            path,
            json!({"kind": "APIResourceList", "apiVersion": "v1",
                   "groupVersion": group_version, "resources": resources}),
        );
        if !group.is_empty() {
            let gv = json!({"groupVersion": group_version, "version": version});
            group_list.push(json!({"name": group, "versions": [gv], "preferredVersion": gv}));
        }
    }
    pages.insert(
        "/api".into(),
        json!({"kind": "APIVersions", "versions": ["v1"],
               "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]}),
    );
    pages.insert(
        "/apis".into(),
        json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": group_list}),
    );
    pages.insert(
        "/version".into(),
        json!({"major": "1", "minor": "34", "gitVersion": "v1.34.0"}),
    );

    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut request = String::new();
            if reader.read_line(&mut request).is_err() {
                continue;
            }
            // Headers are not needed; read them off so the client is not
            // reset before it has read the answer.
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                line.clear();
            }
            let path = request
                .split_whitespace()
                .nth(1)
                .unwrap_or("/")
                .split('?')
                .next()
                .unwrap()
                .to_string();
            let (status, body) = match pages.get(&path) {
                Some(v) => ("200 OK", v.to_string()),
                None => (
                    "404 Not Found",
                    json!({"kind": "Status", "code": 404}).to_string(),
                ),
            };
            let _ = write!(
                conn,
                "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    url
}
