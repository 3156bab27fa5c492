//! The deployment files: the checked-in CRDs are what `strata crdgen`
//! prints; every YAML file parses; the chart's templates use only values
//! that values.yaml defines and close every block they open; the plain
//! manifests render with `kubectl kustomize` and pin the same images as
//! the chart.
//!
//! Not checked here: `kubectl create --dry-run=client` needs an API server
//! for discovery even with --validate=false, and none runs on these
//! machines; `helm template` needs Helm, which cannot be installed here.

mod common;

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

#[test]
fn manifests_render_with_kustomize_and_pin_the_charts_images() {
    let values = std::fs::read_to_string(root().join("charts/strata/values.yaml")).unwrap();
    let mut rendered_images = String::new();
    for f in ["manifests/base/controller.yaml", "manifests/base/node.yaml"] {
        rendered_images.push_str(&std::fs::read_to_string(root().join(f)).unwrap());
    }
    for line in values
        .lines()
        .filter(|l| l.trim_start().starts_with("image: "))
    {
        let image = line.trim_start().trim_start_matches("image: ");
        assert!(
            rendered_images.contains(image),
            "manifests/ do not use the chart's {image}"
        );
    }

    if !common::have_tool("kubectl") {
        // kubectl is not in Debian's archive; nothing to install it from
        // here. The parse test above still covers every file.
        eprintln!("\n*** SKIPPED: kubectl kustomize (no kubectl on this machine) ***\n");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("manifests");
    let out = Command::new("cp")
        .arg("-r")
        .arg(root().join("manifests"))
        .arg(&copy)
        .status()
        .unwrap();
    assert!(out.success());
    common::cluster::gen_certs(&copy.join("base/tls"));
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(&copy)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kubectl kustomize: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let docs = yaml_docs(&String::from_utf8(out.stdout).unwrap(), &copy);
    let mut kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    kinds.sort();
    kinds.dedup();
    for want in [
        "CSIDriver",
        "ClusterRole",
        "CustomResourceDefinition",
        "DaemonSet",
        "Deployment",
        "Secret",
        "StorageClass",
        "VolumeSnapshotClass",
    ] {
        assert!(kinds.contains(&want), "no {want} in {kinds:?}");
    }
    for d in &docs {
        let namespaced = !matches!(
            d["kind"].as_str().unwrap(),
            "CSIDriver"
                | "ClusterRole"
                | "ClusterRoleBinding"
                | "CustomResourceDefinition"
                | "Namespace"
                | "StorageClass"
                | "VolumeSnapshotClass"
        );
        if namespaced {
            assert_eq!(d["metadata"]["namespace"], "strata-system", "{d}");
        }
    }
    let secret = docs.iter().find(|d| d["kind"] == "Secret").unwrap();
    for key in ["ca.crt", "tls.crt", "tls.key"] {
        assert!(secret["data"][key].is_string(), "secret lacks {key}");
    }
}
