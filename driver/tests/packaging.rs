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
        .args(["--namespace", "strata-system", "--kube-version", "1.34.0"]);
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
            .args(["lint", "--strict", "--kube-version", "1.34.0"])
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
        "Service/strata-metrics",
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
        names.iter().any(|n| n == "ServiceMonitor/strata"),
        "{names:?}"
    );
    let provisioner = container_args(&other, "Deployment", "csi-provisioner");
    assert!(
        !provisioner.contains(&"--enable-capacity"),
        "{provisioner:?}"
    );
    let controller = container_args(&other, "Deployment", "strata");
    assert!(controller.contains(&"--overcommit=2.5"), "{controller:?}");
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
    for (group, kind, plural, namespaced) in [
        (
            "snapshot.storage.k8s.io",
            "VolumeSnapshotClass",
            "volumesnapshotclasses",
            false,
        ),
        (
            "snapshot.storage.k8s.io",
            "VolumeSnapshot",
            "volumesnapshots",
            true,
        ),
        (
            "monitoring.coreos.com",
            "ServiceMonitor",
            "servicemonitors",
            true,
        ),
    ] {
        kinds.push(discovery::Kind {
            group: group.into(),
            version: "v1".into(),
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
            .any(|n| n == "servicemonitor.monitoring.coreos.com/strata"),
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
    for dir in ["scripts", "e2e/kind"] {
        for e in std::fs::read_dir(root().join(dir)).unwrap() {
            let p = e.unwrap().path();
            let text = std::fs::read(&p).unwrap_or_default();
            if text.starts_with(b"#!/bin/bash")
                || text.starts_with(b"#!/usr/bin/env bash")
                || text.starts_with(b"#!/bin/sh")
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
