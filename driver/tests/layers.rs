//! The crate's layers: a lower module never names a higher one. Each
//! top-level module of `driver/src` may use only the modules listed for it
//! here (as `crate::<module>`); a new edge must be added on purpose.
//!
//! engine < frontend < peer < node < rpc < agent, cluster, csi, admin
//! < controller, standalone < cli; `tls`, `endpoint` and `metrics` sit
//! at the bottom.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// What each module may name.
const ALLOWED: &[(&str, &[&str])] = &[
    ("engine", &[]),
    ("endpoint", &[]),
    ("tls", &[]),
    ("frontend", &["engine", "metrics"]),
    ("metrics", &["engine"]),
    ("peer", &["engine", "frontend", "metrics", "tls"]),
    (
        "node",
        &["engine", "frontend", "metrics", "endpoint", "peer"],
    ),
    ("rpc", &["engine", "node", "peer"]),
    (
        "agent",
        &["engine", "node", "metrics", "rpc", "peer", "tls"],
    ),
    // Moves make grants for the data path and count themselves.
    (
        "cluster",
        &["engine", "agent", "rpc", "tls", "peer", "metrics"],
    ),
    ("admin", &["engine", "agent", "rpc"]),
    (
        "csi",
        &[
            "engine", "node", "metrics", "rpc", "agent", "cluster", "peer", "tls",
        ],
    ),
    (
        "controller",
        &[
            "engine",
            "endpoint",
            "metrics",
            "rpc",
            "agent",
            "cluster",
            "csi",
            "standalone",
            "peer",
            "tls",
        ],
    ),
    (
        "standalone",
        &[
            "engine",
            "endpoint",
            "frontend",
            "metrics",
            "node",
            "rpc",
            "agent",
            "cluster",
            "csi",
            "admin",
            "controller",
            "peer",
            "tls",
        ],
    ),
];

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The top-level modules `text` names as `crate::<module>` or in a
/// group, `crate::{a, b::c}`.
fn named(text: &str) -> BTreeSet<String> {
    let word = |s: &str| -> String {
        let s = s.trim_start();
        let end = s
            .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
            .unwrap_or(s.len());
        s[..end].to_string()
    };
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            // Only the first path segment of each item counts.
            out.extend(group[..end].split(',').map(word));
        } else {
            out.insert(word(rest));
        }
    }
    out.remove("");
    out
}

#[test]
fn lower_layers_never_name_higher_ones() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let allowed: BTreeMap<&str, &[&str]> = ALLOWED.iter().copied().collect();
    let mut wrong = Vec::new();
    let mut checked = 0;
    for (module, may) in &allowed {
        let mut files = Vec::new();
        let dir = src.join(module);
        if dir.is_dir() {
            rust_files(&dir, &mut files);
        } else {
            files.push(src.join(format!("{module}.rs")));
        }
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap();
            checked += 1;
            for m in named(&text) {
                if m != *module && !may.contains(&m.as_str()) {
                    wrong.push(format!("{} names crate::{m}", f.display()));
                }
            }
        }
    }
    assert!(checked > 50, "only {checked} files");
    assert!(wrong.is_empty(), "upward imports:\n{}", wrong.join("\n"));
}

#[test]
fn the_check_sees_an_upward_import() {
    let text = "use crate::engine::Pool;\nfn f() { crate::cli::error_chain(&e); }\n\
                use crate::{csi::Core, standalone};";
    assert_eq!(
        named(text),
        BTreeSet::from(["engine", "cli", "csi", "standalone"].map(String::from))
    );
}
