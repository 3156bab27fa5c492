//! `strata records …`: the controller's records, offline.

use std::path::Path;
use std::process::ExitCode;

use crate::cluster::records::{Copied, EmbeddedRecords, copy_all};

/// Where `strata records copy` writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Destination {
    Embedded(std::path::PathBuf),
    Kubernetes,
}

impl std::str::FromStr for Destination {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s == "kubernetes" {
            return Ok(Destination::Kubernetes);
        }
        match s.strip_prefix("embedded:") {
            Some(path) if !path.is_empty() => Ok(Destination::Embedded(path.into())),
            _ => Err(format!(
                "{s:?}: expected `kubernetes` or `embedded:PATH` (a redb file)"
            )),
        }
    }
}

pub(super) fn copy(from: &Path, to: Destination) -> ExitCode {
    // Opening would make an empty store where there is none.
    if !from.is_file() {
        eprintln!(
            "strata records copy: {} is not a records file",
            from.display()
        );
        return ExitCode::FAILURE;
    }
    // An embedded store in use by a controller is locked: say so plainly.
    let source = match EmbeddedRecords::open(from) {
        Ok(r) => r,
        Err(e) => {
            eprintln!(
                "strata records copy: cannot open {} (stop the controller that uses it first): {}",
                from.display(),
                crate::engine::error::chain(&e)
            );
            return ExitCode::FAILURE;
        }
    };
    let done = match to {
        Destination::Embedded(path) => match EmbeddedRecords::open(&path) {
            Ok(dest) => copy_all(&source, &dest).map_err(|e| crate::engine::error::chain(&e)),
            Err(e) => Err(format!(
                "{}: {}",
                path.display(),
                crate::engine::error::chain(&e)
            )),
        },
        Destination::Kubernetes => into_kubernetes(source),
    };
    match done {
        Ok(Copied {
            volumes,
            snapshots,
            unchanged,
        }) => {
            println!(
                "copied {volumes} volume and {snapshots} snapshot record(s); {unchanged} already there"
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("strata records copy: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(feature = "kubernetes")]
fn into_kubernetes(source: EmbeddedRecords) -> Result<Copied, String> {
    super::runtime().block_on(async move {
        let client = kube::Client::try_default()
            .await
            .map_err(|e| format!("connecting to Kubernetes: {e}"))?;
        let handle = tokio::runtime::Handle::current();
        // The custom-resource store blocks on the runtime: run it off it.
        tokio::task::spawn_blocking(move || {
            let dest = crate::cluster::kube::KubeRecords::new(client, handle);
            copy_all(&source, &dest).map_err(|e| crate::engine::error::chain(&e))
        })
        .await
        .map_err(|e| e.to_string())?
    })
}

#[cfg(not(feature = "kubernetes"))]
fn into_kubernetes(_: EmbeddedRecords) -> Result<Copied, String> {
    Err(crate::cluster::NO_KUBERNETES.into())
}

#[cfg(test)]
mod tests {
    use super::Destination;

    #[test]
    fn destinations_parse() {
        assert_eq!("kubernetes".parse(), Ok(Destination::Kubernetes));
        assert_eq!(
            "embedded:/var/lib/x.redb".parse(),
            Ok(Destination::Embedded("/var/lib/x.redb".into()))
        );
        assert!("embedded:".parse::<Destination>().is_err());
        assert!("etcd".parse::<Destination>().is_err());
    }
}
