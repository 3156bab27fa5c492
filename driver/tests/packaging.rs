//! The deployment files: the checked-in CRDs are what `strata crdgen`
//! prints; every YAML file parses; the chart's templates use only values
//! that values.yaml defines and close every block they open; the chart
//! passes `helm lint --strict` and renders with other values; the plain
//! manifests are the chart rendered (`scripts/render-manifests`) and build
//! with `kubectl kustomize`; and everything, examples included, passes
//! `kubectl create --dry-run=client --validate=false`; and every shell
//! script passes shellcheck (the kind e2e scripts cannot run here).
//!
//! kubectl needs API discovery even for a client-side dry run, and no API
//! server runs on these machines: `common/discovery.rs` serves discovery
//! built from k8s-openapi's resource constants and the CRDs themselves.

mod common;
#[cfg(feature = "kubernetes")]
#[path = "common/discovery.rs"]
mod discovery;

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn yaml_docs(text: &str, what: &Path) -> Vec<Value> {
    serde_saphyr::from_multiple::<Value>(text)
        .unwrap_or_else(|e| panic!("{} does not parse: {e}", what.display()))
        .into_iter()
        .filter(|d| !d.is_null())
        .collect()
}

fn files(dir: &Path, ext: &[&str], out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            files(&p, ext, out);
        } else if p
            .extension()
            .is_some_and(|x| ext.contains(&x.to_str().unwrap()))
        {
            out.push(p);
        }
    }
}

#[test]
fn checked_in_crds_are_what_crdgen_prints() {
    let out = Command::new(env!("CARGO_BIN_EXE_strata"))
        .arg("crdgen")
        .output()
        .unwrap();
    assert!(out.status.success());
    let generated = String::from_utf8(out.stdout).unwrap();
    for f in [
        "charts/strata/crds/strata.dev.yaml",
        "manifests/base/crds.yaml",
    ] {
        let checked_in = std::fs::read_to_string(root().join(f)).unwrap();
        assert!(
            checked_in == generated,
            "{f} differs from `strata crdgen`; run: strata crdgen > {f}"
        );
    }
    let docs = yaml_docs(&generated, Path::new("crdgen"));
    let names: Vec<&str> = docs
        .iter()
        .map(|d| d["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "stratavolumes.strata.dev",
            "stratasnapshots.strata.dev",
            "stratanodes.strata.dev"
        ]
    );
    for d in &docs {
        let v = &d["spec"]["versions"][0];
        assert!(
            v["subresources"]["status"].is_object(),
            "status subresource"
        );
        assert!(v["additionalPrinterColumns"].as_array().unwrap().len() >= 3);
    }
}

#[test]
fn every_yaml_file_parses_and_every_object_has_kind_and_name() {
    let mut all = Vec::new();
    for d in ["manifests", "charts/strata/crds", "e2e/kind"] {
        files(&root().join(d), &["yaml", "yml"], &mut all);
    }
    for f in ["charts/strata/Chart.yaml", "charts/strata/values.yaml"] {
        all.push(root().join(f));
    }
    assert!(all.len() > 15, "{all:?}");
    for f in &all {
        for doc in yaml_docs(&std::fs::read_to_string(f).unwrap(), f) {
            let plain_data = f.ends_with("values.yaml")
                || f.ends_with("testdriver.yaml")
                || f.ends_with("Chart.yaml");
            if plain_data {
                continue;
            }
            assert!(doc["kind"].is_string(), "{}: no kind", f.display());
            assert!(
                doc["apiVersion"].is_string(),
                "{}: no apiVersion",
                f.display()
            );
            let kustomization = doc["kind"] == "Kustomization" || doc["kind"] == "Cluster";
            assert!(
                kustomization || doc["metadata"]["name"].is_string(),
                "{}: no metadata.name",
                f.display()
            );
        }
    }
}

/// `.Values.a.b.c` paths in a template.
fn value_paths(template: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = template;
    while let Some(i) = rest.find(".Values.") {
        let tail = &rest[i + ".Values.".len()..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '.' || c == '_'))
            .unwrap_or(tail.len());
        out.push(tail[..end].trim_end_matches('.').to_string());
        rest = &tail[end..];
    }
    out
}

#[test]
fn chart_templates_use_only_defined_values_and_close_their_blocks() {
    let chart = root().join("charts/strata");
    let values = yaml_docs(
        &std::fs::read_to_string(chart.join("values.yaml")).unwrap(),
        &chart.join("values.yaml"),
    )
    .remove(0);
    let mut templates = Vec::new();
    files(&chart.join("templates"), &["yaml", "tpl"], &mut templates);
    assert!(templates.len() >= 8);
    let mut used = 0;
    for t in &templates {
        let text = std::fs::read_to_string(t).unwrap();
        for path in value_paths(&text) {
            let mut v = &values;
            for part in path.split('.') {
                v = v.get(part).unwrap_or_else(|| {
                    panic!(
                        "{} uses .Values.{path}, which values.yaml does not define",
                        t.display()
                    )
                });
            }
            used += 1;
        }
        let opens = [
            "{{- if ",
            "{{ if ",
            "{{- with ",
            "{{ with ",
            "{{- define ",
            "{{- range ",
            "{{ define ",
        ]
        .iter()
        .map(|o| text.matches(o).count())
        .sum::<usize>();
        let ends = ["{{- end }}", "{{ end }}", "{{- end -}}"]
            .iter()
            .map(|e| text.matches(e).count())
            .sum::<usize>();
        assert_eq!(opens, ends, "{}: unbalanced blocks", t.display());
    }
    assert!(used > 40, "only {used} value references found");
}

fn run_tool(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `helm template` of the chart with `--set` pairs.
fn helm_template(set: &[&str]) -> String {
    let mut cmd = Command::new("helm");
    cmd.args(["template", "strata"])
        .arg(root().join("charts/strata"))
        .args(["--namespace", "strata-system"]);
    for s in set {
        cmd.args(["--set", s]);
    }
    run_tool(&mut cmd)
}

/// `kubectl kustomize manifests/`, on a copy with fresh agent certificates.
fn kustomize() -> String {
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("manifests");
    run_tool(
        Command::new("cp")
            .arg("-r")
            .arg(root().join("manifests"))
            .arg(&copy),
    );
    let _ = std::fs::remove_dir_all(copy.join("base/tls"));
    common::cluster::gen_certs(&copy.join("base/tls"));
    run_tool(Command::new("kubectl").arg("kustomize").arg(&copy))
}

fn kinds_and_names(docs: &[Value]) -> Vec<String> {
    let mut out: Vec<String> = docs
        .iter()
        .map(|d| {
            format!(
                "{}/{}",
                d["kind"].as_str().unwrap(),
                d["metadata"]["name"].as_str().unwrap()
            )
        })
        .collect();
    out.sort();
    out
}

fn container_args<'a>(docs: &'a [Value], kind: &str, container: &str) -> Vec<&'a str> {
    let d = docs.iter().find(|d| d["kind"] == kind).unwrap();
    let c = d["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == container)
        .unwrap();
    c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect()
}

#[test]
fn manifests_are_the_chart_rendered() {
    if common::require_tools(&["helm"]).is_err() {
        return;
    }
    let generated = run_tool(Command::new(root().join("scripts/render-manifests")).arg("--stdout"));
    let checked_in = std::fs::read_to_string(root().join("manifests/base/strata.yaml")).unwrap();
    assert!(
        checked_in == generated,
        "manifests/base/strata.yaml differs from the chart; run scripts/render-manifests"
    );
}

#[test]
fn chart_lints_and_renders_with_other_values() {
    if common::require_tools(&["helm"]).is_err() {
        return;
    }
    run_tool(
        Command::new("helm")
            .args(["lint", "--strict"])
            .arg(root().join("charts/strata")),
    );

    let defaults = yaml_docs(&helm_template(&[]), Path::new("helm template"));
    let names = kinds_and_names(&defaults);
    for want in [
        "CSIDriver/csi.strata.dev",
        "DaemonSet/strata-node",
        "Deployment/strata-controller",
        "Secret/strata-agent-tls",
        "StorageClass/strata",
        "VolumeSnapshotClass/strata",
        "Service/strata-node-metrics",
        "Service/strata-controller-metrics",
        "DaemonSet/strata-fuse-holder",
    ] {
        assert!(names.iter().any(|n| n == want), "no {want} in {names:?}");
    }
    assert!(!names.iter().any(|n| n.starts_with("ServiceMonitor/")));
    let provisioner = container_args(&defaults, "Deployment", "csi-provisioner");
    assert!(
        provisioner.contains(&"--enable-capacity"),
        "{provisioner:?}"
    );
    assert!(
        provisioner.contains(&"--extra-create-metadata"),
        "{provisioner:?}"
    );

    let other = yaml_docs(
        &helm_template(&[
            "agentTls.existingSecret=my-certs",
            "storageClass.create=false",
            "volumeSnapshotClass.create=false",
            "metrics.serviceMonitor.enabled=true",
            "controller.enableCapacity=false",
            "controller.overcommit=2.5",
            "controller.replicas=2",
            "kubeletDir=/var/lib/k0s/kubelet",
            "node.iscsi.enabled=true",
        ]),
        Path::new("helm template --set ..."),
    );
    let names = kinds_and_names(&other);
    for gone in ["Secret/", "StorageClass/", "VolumeSnapshotClass/"] {
        assert!(
            !names.iter().any(|n| n.starts_with(gone)),
            "{gone} still in {names:?}"
        );
    }
    assert!(
        names.iter().any(|n| n == "ServiceMonitor/strata-node")
            && names
                .iter()
                .any(|n| n == "ServiceMonitor/strata-controller"),
        "{names:?}"
    );
    let provisioner = container_args(&other, "Deployment", "csi-provisioner");
    assert!(
        !provisioner.contains(&"--enable-capacity"),
        "{provisioner:?}"
    );
    let controller = container_args(&other, "Deployment", "strata");
    assert!(controller.contains(&"--overcommit=2.5"), "{controller:?}");
    // A certificate per node: from the node's own disk, the controller's
    // from the Secret it names (without one the chart refuses to render).
    let per_node = yaml_docs(
        &helm_template(&[
            "agentTls.existingSecret=controller-certs",
            "agentTls.nodeHostPath=/etc/strata/agent",
        ]),
        Path::new("helm template --set agentTls.nodeHostPath"),
    );
    let tls_volume = |name: &str| {
        let w = workloads(&per_node)
            .find(|w| w["metadata"]["name"] == name)
            .unwrap();
        w["spec"]["template"]["spec"]["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == "agent-tls")
            .unwrap()
            .clone()
    };
    assert_eq!(
        tls_volume("strata-node")["hostPath"]["path"],
        "/etc/strata/agent"
    );
    assert_eq!(
        tls_volume("strata-controller")["secret"]["secretName"],
        "controller-certs"
    );
    let refused = Command::new("helm")
        .args(["template", "strata"])
        .arg(root().join("charts/strata"))
        .args(["--set", "agentTls.nodeHostPath=/etc/strata/agent"])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("needs agentTls.existingSecret"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    // iSCSI: the node's own target on the host's loopback.
    let node_ds = |docs: &[Value]| -> Value {
        docs.iter()
            .find(|d| d["kind"] == "DaemonSet" && d["metadata"]["name"] == "strata-node")
            .unwrap()
            .clone()
    };
    let iscsi_listen = |ds: &Value| -> Vec<String> {
        strings(&container(ds, "strata")["args"])
            .into_iter()
            .filter(|a| a.starts_with("--iscsi-listen"))
            .map(str::to_string)
            .collect()
    };
    let ds = node_ds(&other);
    assert_eq!(iscsi_listen(&ds), ["--iscsi-listen=127.0.0.1:3260"]);
    assert_eq!(ds["spec"]["template"]["spec"]["hostNetwork"], true);
    assert!(
        serde_json::to_string(&ds)
            .unwrap()
            .contains("\"/etc/iscsi\"")
    );
    let ds = node_ds(&defaults);
    assert!(ds["spec"]["template"]["spec"]["hostNetwork"].is_null());
    assert!(iscsi_listen(&ds).is_empty());
    let deployment = other.iter().find(|d| d["kind"] == "Deployment").unwrap();
    assert_eq!(deployment["spec"]["replicas"], 2);
    let spread = &deployment["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"];
    assert!(spread.is_object(), "{deployment}");
    let one = defaults.iter().find(|d| d["kind"] == "Deployment").unwrap();
    assert!(one["spec"]["template"]["spec"]["affinity"].is_null());
    let rendered = serde_json::to_string(&other).unwrap();
    assert!(rendered.contains("my-certs"));
    assert!(rendered.contains("/var/lib/k0s/kubelet/plugins"));
    assert!(!rendered.contains("/var/lib/kubelet"));
}

#[test]
fn manifests_render_with_kustomize() {
    if common::require_tools(&["kubectl"]).is_err() {
        return;
    }
    let docs = yaml_docs(&kustomize(), Path::new("kubectl kustomize"));
    let names = kinds_and_names(&docs);
    for want in [
        "CSIDriver/csi.strata.dev",
        "CustomResourceDefinition/stratavolumes.strata.dev",
        "DaemonSet/strata-node",
        "Deployment/strata-controller",
        "Namespace/strata-system",
        "Secret/strata-agent-tls",
        "StorageClass/strata",
        "VolumeSnapshotClass/strata",
    ] {
        assert!(names.iter().any(|n| n == want), "no {want} in {names:?}");
    }
    for d in &docs {
        let cluster_scoped = matches!(
            d["kind"].as_str().unwrap(),
            "CSIDriver"
                | "ClusterRole"
                | "ClusterRoleBinding"
                | "CustomResourceDefinition"
                | "Namespace"
                | "StorageClass"
                | "VolumeSnapshotClass"
        );
        if cluster_scoped {
            assert!(d["metadata"]["namespace"].is_null(), "{d}");
        } else {
            assert_eq!(d["metadata"]["namespace"], "strata-system", "{d}");
        }
    }
    let secret = docs.iter().find(|d| d["kind"] == "Secret").unwrap();
    for key in ["ca.crt", "tls.crt", "tls.key"] {
        assert!(secret["data"][key].is_string(), "secret lacks {key}");
    }
}

/// Objects that kubectl accepts in a client-side dry run, as "kind/name".
#[cfg(feature = "kubernetes")]
fn dry_run(server: &str, yaml: &str) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("objects.yaml");
    std::fs::write(&file, yaml).unwrap();
    let out = run_tool(
        Command::new("kubectl")
            .env("KUBECONFIG", dir.path().join("none"))
            .env("HOME", dir.path())
            .args([
                "--server",
                server,
                "create",
                "--dry-run=client",
                "--validate=false",
                "-o",
                "name",
                "-f",
            ])
            .arg(&file),
    );
    let mut names: Vec<String> = out.lines().map(str::to_string).collect();
    names.sort();
    names
}

#[cfg(feature = "kubernetes")]
#[test]
fn everything_passes_kubectl_create_dry_run() {
    if common::require_tools(&["kubectl", "helm"]).is_err() {
        return;
    }
    let crds = std::fs::read_to_string(root().join("charts/strata/crds/strata.dev.yaml")).unwrap();
    let mut kinds = discovery::builtins();
    kinds.extend(discovery::from_crds(&yaml_docs(&crds, Path::new("crds"))));
    // From external-snapshotter's and prometheus-operator's CRDs, which the
    // cluster brings; they are not in k8s-openapi.
    for (group, version, kind, plural, namespaced) in [
        (
            "snapshot.storage.k8s.io",
            "v1",
            "VolumeSnapshotClass",
            "volumesnapshotclasses",
            false,
        ),
        (
            "snapshot.storage.k8s.io",
            "v1",
            "VolumeSnapshot",
            "volumesnapshots",
            true,
        ),
        (
            "groupsnapshot.storage.k8s.io",
            "v1",
            "VolumeGroupSnapshotClass",
            "volumegroupsnapshotclasses",
            false,
        ),
        (
            "groupsnapshot.storage.k8s.io",
            "v1",
            "VolumeGroupSnapshot",
            "volumegroupsnapshots",
            true,
        ),
        (
            "monitoring.coreos.com",
            "v1",
            "ServiceMonitor",
            "servicemonitors",
            true,
        ),
        // storage.k8s.io/v1 since Kubernetes 1.34; k8s-openapi is built
        // for 1.33 here.
        (
            "storage.k8s.io",
            "v1",
            "VolumeAttributesClass",
            "volumeattributesclasses",
            false,
        ),
    ] {
        kinds.push(discovery::Kind {
            group: group.into(),
            version: version.into(),
            kind: kind.into(),
            plural: plural.into(),
            namespaced,
        });
    }
    let server = discovery::serve(kinds);

    let kustomized = kustomize();
    let accepted = dry_run(&server, &kustomized);
    let docs = yaml_docs(&kustomized, Path::new("kubectl kustomize"));
    assert_eq!(accepted.len(), docs.len(), "{accepted:?}");
    assert!(
        accepted
            .iter()
            .any(|n| n == "volumesnapshotclass.snapshot.storage.k8s.io/strata")
    );
    assert!(
        accepted
            .iter()
            .any(|n| n == "stratavolumes.strata.dev" || n.ends_with("/stratavolumes.strata.dev"))
    );

    let chart = helm_template(&["metrics.serviceMonitor.enabled=true"]);
    let accepted = dry_run(&server, &format!("{crds}\n---\n{chart}"));
    assert!(
        accepted
            .iter()
            .any(|n| n == "servicemonitor.monitoring.coreos.com/strata-node"),
        "{accepted:?}"
    );

    let mut examples = Vec::new();
    files(&root().join("manifests/examples"), &["yaml"], &mut examples);
    examples.sort();
    let text: Vec<String> = examples
        .iter()
        .map(|f| std::fs::read_to_string(f).unwrap())
        .collect();
    let accepted = dry_run(&server, &text.join("\n---\n"));
    for want in [
        "persistentvolumeclaim/",
        "pod/",
        "volumesnapshot.snapshot.storage.k8s.io/",
        "volumeattributesclass.storage.k8s.io/",
    ] {
        assert!(
            accepted.iter().any(|n| n.starts_with(want)),
            "no {want} in {accepted:?}"
        );
    }

    // And a mistake is caught: an apiVersion the server does not serve.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.yaml");
    std::fs::write(
        &file,
        "apiVersion: storage.k8s.io/v1beta1\nkind: CSIDriver\nmetadata:\n  name: x\n",
    )
    .unwrap();
    let out = Command::new("kubectl")
        .env("KUBECONFIG", dir.path().join("none"))
        .args([
            "--server",
            &server,
            "create",
            "--dry-run=client",
            "--validate=false",
            "-f",
        ])
        .arg(&file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no matches for kind"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn shell_scripts_pass_shellcheck() {
    if common::require_tools(&["shellcheck"]).is_err() {
        return;
    }
    let mut scripts = vec![root().join(".ci/run")];
    for dir in ["scripts", "e2e/kind", "e2e/vm"] {
        for e in std::fs::read_dir(root().join(dir)).unwrap() {
            let p = e.unwrap().path();
            let text = std::fs::read(&p).unwrap_or_default();
            if text.starts_with(b"#!/bin/bash")
                || text.starts_with(b"#!/usr/bin/env bash")
                || text.starts_with(b"#!/bin/sh")
                || text.starts_with(b"#!/bin/busybox sh")
            {
                scripts.push(p);
            }
        }
    }
    assert!(scripts.len() >= 10, "{scripts:?}");
    run_tool(
        Command::new("shellcheck")
            .args(["--severity=warning", "--external-sources"])
            .args(&scripts),
    );
}

/// The workload (Deployment or DaemonSet) objects of a render.
fn workloads(docs: &[Value]) -> impl Iterator<Item = &Value> {
    docs.iter()
        .filter(|d| d["kind"] == "Deployment" || d["kind"] == "DaemonSet")
}

fn container<'a>(workload: &'a Value, name: &str) -> &'a Value {
    containers(workload)
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name} in {}", workload["metadata"]["name"]))
}

fn containers(workload: &Value) -> &Vec<Value> {
    workload["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap()
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// (namespaced, apiGroup, resource, verb) granted to ServiceAccount
/// `account`: ClusterRoles bound cluster-wide grant everywhere (namespaced
/// `false` and `true`); Roles bound in `namespace` grant there only.
fn grants(docs: &[Value], account: &str, namespace: &str) -> Vec<(bool, String, String, String)> {
    let bound = |binding: &Value| {
        binding["subjects"].as_array().is_some_and(|s| {
            s.iter().any(|s| {
                s["kind"] == "ServiceAccount" && s["name"] == account && s["namespace"] == namespace
            })
        })
    };
    let mut out = Vec::new();
    for b in docs
        .iter()
        .filter(|d| (d["kind"] == "ClusterRoleBinding" || d["kind"] == "RoleBinding") && bound(d))
    {
        let role_kind = b["roleRef"]["kind"].as_str().unwrap();
        let role_name = &b["roleRef"]["name"];
        let role = docs
            .iter()
            .find(|d| d["kind"] == role_kind && &d["metadata"]["name"] == role_name)
            .unwrap_or_else(|| panic!("{role_kind} {role_name} is bound but not rendered"));
        let cluster_wide = b["kind"] == "ClusterRoleBinding";
        if !cluster_wide && b["metadata"]["namespace"] != namespace {
            continue;
        }
        for rule in role["rules"].as_array().unwrap() {
            for g in strings(&rule["apiGroups"]) {
                for r in strings(&rule["resources"]) {
                    for v in strings(&rule["verbs"]) {
                        let scopes: &[bool] = if cluster_wide {
                            &[false, true]
                        } else {
                            &[true]
                        };
                        for &namespaced in scopes {
                            out.push((namespaced, g.to_string(), r.to_string(), v.to_string()));
                        }
                    }
                }
            }
        }
    }
    out
}

/// What `sidecar` (an entry of tests/data/sidecars.yaml) lacks in the
/// rendered `docs`, in words; empty when the chart gives it everything.
fn lacks(docs: &[Value], sidecar: &Value) -> Vec<String> {
    let name = sidecar["container"].as_str().unwrap();
    let mut out = Vec::new();
    let mut found = 0;
    for w in workloads(docs) {
        let namespace = w["metadata"]["namespace"].as_str().unwrap();
        let account = w["spec"]["template"]["spec"]["serviceAccountName"]
            .as_str()
            .unwrap_or("default");
        for c in containers(w).iter().filter(|c| c["name"] == name) {
            found += 1;
            let at = format!("{} {}", w["metadata"]["name"], name);
            if c["image"] != sidecar["image"] {
                out.push(format!(
                    "{at}: image {} but tests/data/sidecars.yaml describes {}",
                    c["image"], sidecar["image"]
                ));
            }
            let args = strings(&c["args"]);
            let on = |when: &Value| {
                when.as_str().is_none_or(|f| {
                    args.iter()
                        .any(|a| *a == f || a.starts_with(&format!("{f}=")))
                })
            };
            let env: Vec<&str> = c["env"]
                .as_array()
                .map(|e| e.iter().filter_map(|v| v["name"].as_str()).collect())
                .unwrap_or_default();
            for e in sidecar["env"].as_array().unwrap() {
                let var = e["name"].as_str().unwrap();
                if on(&e["when"]) && !env.contains(&var) {
                    out.push(format!("{at}: no env {var}"));
                }
            }
            // Every $(VAR) an argument names is defined.
            for a in &args {
                let mut rest = *a;
                while let Some(i) = rest.find("$(") {
                    let end = rest[i..].find(')').unwrap() + i;
                    let var = &rest[i + 2..end];
                    if !env.contains(&var) {
                        out.push(format!("{at}: argument {a} names undefined {var}"));
                    }
                    rest = &rest[end..];
                }
            }
            let granted = grants(docs, account, namespace);
            for (key, namespaced) in [("clusterRules", false), ("namespacedRules", true)] {
                for rule in sidecar[key].as_array().unwrap() {
                    if !on(&rule["when"]) {
                        continue;
                    }
                    let (g, r) = (
                        rule["apiGroup"].as_str().unwrap(),
                        rule["resource"].as_str().unwrap(),
                    );
                    for v in strings(&rule["verbs"]) {
                        let have = granted.iter().any(|(n, gg, rr, vv)| {
                            *n == namespaced
                                && gg == g
                                && (rr == r || rr == "*")
                                && (vv == v || vv == "*")
                        });
                        if !have {
                            let scope = if namespaced {
                                "in its namespace"
                            } else {
                                "cluster-wide"
                            };
                            out.push(format!(
                                "{at}: ServiceAccount {account} may not {v} {g}/{r} {scope}"
                            ));
                        }
                    }
                }
            }
        }
    }
    if found == 0 {
        out.push(format!("no container {name} in any workload"));
    }
    out
}

fn sidecar_facts() -> Vec<Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/sidecars.yaml");
    yaml_docs(&std::fs::read_to_string(&path).unwrap(), &path)
        .remove(0)
        .as_array()
        .unwrap()
        .clone()
}

/// The chart as the real sidecars would run it cannot fail at start for a
/// missing env var or RBAC rule: every fact of tests/data/sidecars.yaml
/// holds, with and without capacity. And the check can fail: a render
/// without the resizer's cluster-wide pod watch, or without the
/// provisioner's NAMESPACE, is caught.
#[test]
fn sidecars_get_the_env_and_rbac_their_upstream_files_name() {
    if common::require_tools(&["helm"]).is_err() {
        return;
    }
    let facts = sidecar_facts();
    assert_eq!(facts.len(), 7);
    for set in [
        &[][..],
        &["controller.enableCapacity=false", "controller.replicas=3"],
    ] {
        for sidecar in &facts {
            // An optional sidecar is rendered with the values that add it.
            let mut with: Vec<&str> = set.to_vec();
            with.extend(strings(&sidecar["chart"]));
            let docs = yaml_docs(&helm_template(&with), Path::new("helm template"));
            let missing = lacks(&docs, sidecar);
            assert!(missing.is_empty(), "{with:?}:\n{}", missing.join("\n"));
        }
    }
    // Without its values, the optional sidecar and its objects are gone.
    let plain = helm_template(&[]);
    assert!(!plain.contains("csi-snapshot-metadata") && !plain.contains("SnapshotMetadataService"));
    // Group snapshots: the snapshotter's gate (`gates` in the facts) and
    // a class, only when asked for.
    let snapshotter = facts
        .iter()
        .find(|f| f["container"] == "csi-snapshotter")
        .unwrap();
    for gate in snapshotter["gates"].as_array().unwrap() {
        let flag = gate["flag"].as_str().unwrap();
        for (with, on) in [(strings(&gate["chart"]), true), (vec![], false)] {
            let docs = yaml_docs(&helm_template(&with), Path::new("helm template"));
            let ctl = docs.iter().find(|d| d["kind"] == "Deployment").unwrap();
            let args = strings(&container(ctl, "csi-snapshotter")["args"]);
            assert_eq!(args.contains(&flag), on, "{with:?}: {args:?}");
            let class = docs.iter().any(|d| {
                d["kind"] == "VolumeGroupSnapshotClass" && d["driver"] == "csi.strata.dev"
            });
            assert_eq!(class, on, "{with:?}");
        }
    }

    let docs = yaml_docs(&helm_template(&[]), Path::new("helm template"));
    // The provisioner's capacity objects are owned two levels up from its
    // pod: that is a Deployment's pod (pod -> ReplicaSet -> Deployment).
    let controller = docs.iter().find(|d| d["kind"] == "Deployment").unwrap();
    let args = strings(&container(controller, "csi-provisioner")["args"]);
    assert!(args.contains(&"--capacity-ownerref-level=2"), "{args:?}");

    let mut broken = docs.clone();
    for d in broken.iter_mut().filter(|d| d["kind"] == "ClusterRole") {
        let rules = d["rules"].as_array_mut().unwrap();
        rules.retain(|r| !strings(&r["resources"]).contains(&"pods"));
    }
    let resizer = facts
        .iter()
        .find(|f| f["container"] == "csi-resizer")
        .unwrap();
    let missing = lacks(&broken, resizer);
    assert!(
        missing
            .iter()
            .any(|m| m.contains("may not watch /pods cluster-wide")),
        "{missing:?}"
    );
    let mut broken = docs.clone();
    for d in broken.iter_mut().filter(|d| d["kind"] == "Deployment") {
        for c in d["spec"]["template"]["spec"]["containers"]
            .as_array_mut()
            .unwrap()
        {
            if let Some(env) = c["env"].as_array_mut() {
                env.retain(|e| e["name"] != "NAMESPACE");
            }
        }
    }
    let provisioner = facts
        .iter()
        .find(|f| f["container"] == "csi-provisioner")
        .unwrap();
    assert!(
        lacks(&broken, provisioner)
            .iter()
            .any(|m| m.contains("no env NAMESPACE"))
    );
}

/// What a production chart needs beyond starting: probes that fit the
/// sidecars' timeouts and a slow start, priorities, requests, a budget
/// for several controllers, network policies, metrics Services that match
/// their pods, the fd holder outliving node plugin rollouts, the
/// provisioner's fstype key, and `helm template` with no --kube-version.
#[test]
fn chart_is_ready_for_production() {
    if common::require_tools(&["helm"]).is_err() {
        return;
    }
    // helm_template passes no --kube-version: Helm's default must pass
    // the chart's kubeVersion.
    let docs = yaml_docs(&helm_template(&[]), Path::new("helm template"));
    let find = |kind: &str, component: &str| {
        docs.iter()
            .find(|d| {
                d["kind"] == kind
                    && d["metadata"]["labels"]["app.kubernetes.io/component"] == component
            })
            .unwrap_or_else(|| panic!("no {kind} {component}"))
    };
    let node = find("DaemonSet", "node");
    let controller = find("Deployment", "controller");
    let holder = find("DaemonSet", "fuse-holder");

    // Probes: kubelet's timeout above the sidecar's --probe-timeout, and a
    // startup allowance of minutes for serving staged volumes again.
    for (w, main) in [(node, "strata"), (controller, "strata")] {
        let probe_timeout: u64 = strings(&container(w, "liveness-probe")["args"])
            .iter()
            .find_map(|a| a.strip_prefix("--probe-timeout="))
            .and_then(|t| t.strip_suffix('s'))
            .expect("--probe-timeout=Ns")
            .parse()
            .unwrap();
        let live = &container(w, main)["livenessProbe"];
        let timeout = live["timeoutSeconds"].as_u64().unwrap();
        assert!(timeout >= 3 && timeout > probe_timeout, "{live}");
    }
    let startup = &container(node, "strata")["startupProbe"];
    let allowance =
        startup["periodSeconds"].as_u64().unwrap() * startup["failureThreshold"].as_u64().unwrap();
    assert!(allowance >= 300, "{startup}");
    let registrar = container(node, "node-driver-registrar");
    let endpoint = strings(&registrar["args"])
        .iter()
        .find_map(|a| a.strip_prefix("--http-endpoint=:"))
        .expect("the registrar serves /healthz")
        .to_string();
    assert_eq!(registrar["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(registrar["ports"][0]["containerPort"].to_string(), endpoint);

    // Ports are unique within each pod.
    for w in workloads(&docs) {
        let mut ports: Vec<u64> = containers(w)
            .iter()
            .flat_map(|c| c["ports"].as_array().cloned().unwrap_or_default())
            .map(|p| p["containerPort"].as_u64().unwrap())
            .collect();
        let n = ports.len();
        ports.sort_unstable();
        ports.dedup();
        assert_eq!(ports.len(), n, "{}", w["metadata"]["name"]);
    }

    // Priorities and requests.
    for (w, class) in [
        (node, "system-node-critical"),
        (holder, "system-node-critical"),
        (controller, "system-cluster-critical"),
    ] {
        assert_eq!(w["spec"]["template"]["spec"]["priorityClassName"], class);
        for c in containers(w) {
            let requests = &c["resources"]["requests"];
            assert!(
                requests["cpu"].is_string() && requests["memory"].is_string(),
                "{} {} has no requests",
                w["metadata"]["name"],
                c["name"]
            );
            assert!(
                c["resources"]["limits"]["memory"].is_null(),
                "no memory limits on the data path"
            );
        }
    }

    // The fd holder: its own DaemonSet, never rolled by an upgrade, on the
    // socket the node plugin looks for, which waits for it.
    assert_eq!(holder["spec"]["updateStrategy"]["type"], "OnDelete");
    assert_eq!(node["spec"]["updateStrategy"]["type"], "RollingUpdate");
    assert!(containers(node).iter().all(|c| c["name"] != "fuse-holder"));
    let node_args = strings(&container(node, "strata")["args"]);
    assert!(
        node_args.contains(&"--fuse-holder=external"),
        "{node_args:?}"
    );
    let state = node_args
        .iter()
        .find_map(|a| a.strip_prefix("--state-dir="))
        .unwrap();
    let holder_args = strings(&container(holder, "fuse-holder")["args"]);
    assert!(
        holder_args.contains(&format!("--socket={state}/fuse-holder.sock").as_str()),
        "{holder_args:?}"
    );
    assert!(holder_args.contains(&"--idle-seconds=0"));

    // No budget for one controller; one that keeps one for several.
    assert!(!docs.iter().any(|d| d["kind"] == "PodDisruptionBudget"));
    let three = yaml_docs(
        &helm_template(&["controller.replicas=3"]),
        Path::new("helm template"),
    );
    let pdb = three
        .iter()
        .find(|d| d["kind"] == "PodDisruptionBudget")
        .unwrap();
    assert_eq!(pdb["spec"]["minAvailable"], 1);
    assert_eq!(
        pdb["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"],
        "controller"
    );

    // NetworkPolicies: the agent and peer ports only from Strata's pods.
    for (w, port) in [(node, 9809), (controller, 9812)] {
        let component = &w["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"];
        let policy = docs
            .iter()
            .find(|d| {
                d["kind"] == "NetworkPolicy"
                    && d["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"]
                        == *component
            })
            .unwrap_or_else(|| panic!("no NetworkPolicy for {component}"));
        let rule = policy["spec"]["ingress"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["ports"][0]["port"] == port)
            .unwrap();
        let from = serde_json::to_string(&rule["from"]).unwrap();
        assert!(
            from.contains("\"strata\"") && from.contains("controller"),
            "{from}"
        );
    }
    assert!(
        yaml_docs(
            &helm_template(&["networkPolicy.enabled=false"]),
            Path::new("helm template")
        )
        .iter()
        .all(|d| d["kind"] != "NetworkPolicy")
    );

    // Each metrics Service selects exactly the pods that serve its port.
    let services: Vec<&Value> = docs.iter().filter(|d| d["kind"] == "Service").collect();
    assert_eq!(services.len(), 2);
    for svc in services {
        let selector = svc["spec"]["selector"].as_object().unwrap();
        let port = svc["spec"]["ports"][0]["targetPort"].as_u64().unwrap();
        let selected: Vec<&Value> = workloads(&docs)
            .filter(|w| {
                let labels = &w["spec"]["template"]["metadata"]["labels"];
                selector.iter().all(|(k, v)| &labels[k] == v)
            })
            .collect();
        assert_eq!(selected.len(), 1, "{}", svc["metadata"]["name"]);
        let serves = containers(selected[0]).iter().any(|c| {
            c["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|p| p["containerPort"] == port)
        });
        assert!(
            serves,
            "{} selects pods without port {port}",
            svc["metadata"]["name"]
        );
    }

    // The StorageClass names the filesystem the way the provisioner reads
    // it, and only that way.
    let class = docs.iter().find(|d| d["kind"] == "StorageClass").unwrap();
    let params = class["parameters"].as_object().unwrap();
    assert_eq!(params["csi.storage.k8s.io/fstype"], "ext4");
    assert!(
        !params.keys().any(|k| k.eq_ignore_ascii_case("fstype")),
        "{params:?}"
    );
}

/// testdriver.yaml claims only what the code backs: its smallest size
/// holds XFS, its largest fits a layer file on ext4 (a real ext4 image,
/// so root), the StorageClass comes from the driver name (as for
/// csi-driver-host-path), and the runner passes -kubeconfig.
#[test]
fn testdriver_claims_what_the_code_backs() {
    let text = std::fs::read_to_string(root().join("e2e/kind/testdriver.yaml")).unwrap();
    let d = yaml_docs(&text, Path::new("testdriver.yaml")).remove(0);
    assert_eq!(d["StorageClass"]["FromName"], true);
    assert_eq!(d["SnapshotClass"]["FromName"], true);
    let size = |v: &Value| strata::cli::size::parse(v.as_str().unwrap()).unwrap();
    let range = &d["DriverInfo"]["SupportedSizeRange"];
    let (min, max) = (size(&range["Min"]), size(&range["Max"]));
    for (fs, _) in strata::node::mount::FILESYSTEMS {
        let need = strata::node::mount::min_size(fs).unwrap();
        assert!(min >= need, "Min {min} is below what {fs} needs ({need})");
        assert!(d["DriverInfo"]["SupportedFsType"][fs].is_object());
    }
    let run = std::fs::read_to_string(root().join("e2e/kind/run")).unwrap();
    assert!(
        run.contains("-kubeconfig"),
        "e2e/kind/run passes no -kubeconfig to e2e.test"
    );

    if common::require(common::is_root(), "needs root for an ext4 loop image").is_err() {
        return;
    }
    // 4 KiB blocks, as on any real pool (a small image would get 1 KiB).
    let fs = common::LoopFs::new(&["mkfs.ext4", "-q", "-F", "-b", "4096"], 64).unwrap();
    let pool = strata::engine::Pool::open(&fs.path().join("pool"), Default::default()).unwrap();
    let v = pool
        .create_volume(max)
        .unwrap_or_else(|e| panic!("Max {max} on ext4: {e}"));
    pool.delete_volume(v.id).unwrap();
}
