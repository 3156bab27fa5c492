//! Listen addresses given on the command line: `unix:///path/to.sock` or
//! `tcp://127.0.0.1:10809`.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// Where a server listens (or a client connects).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A unix socket path.
    Unix(PathBuf),
    /// A TCP address.
    Tcp(SocketAddr),
}

impl FromStr for Endpoint {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("unix://") {
            if !path.starts_with('/') {
                return Err(format!(
                    "{s:?}: a unix endpoint needs an absolute path, e.g. unix:///run/strata/csi.sock"
                ));
            }
            return Ok(Endpoint::Unix(PathBuf::from(path)));
        }
        if let Some(addr) = s.strip_prefix("tcp://") {
            return addr
                .parse()
                .map(Endpoint::Tcp)
                .map_err(|_| format!("{s:?}: expected tcp://IP:PORT, e.g. tcp://127.0.0.1:10809"));
        }
        Err(format!("{s:?}: expected unix:///PATH or tcp://IP:PORT"))
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "unix://{}", p.display()),
            Endpoint::Tcp(a) => write!(f, "tcp://{a}"),
        }
    }
}

/// Binds a unix socket with mode 0600 (only root may connect), replacing
/// a stale socket file left by an earlier run and creating its directory.
pub fn bind_unix_std(path: &Path) -> std::io::Result<std::os::unix::net::UnixListener> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() {
            std::fs::remove_file(path)?;
        } else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let listener = std::os::unix::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// [`bind_unix_std`] for the async runtime.
pub fn bind_unix(path: &Path) -> std::io::Result<tokio::net::UnixListener> {
    let l = bind_unix_std(path)?;
    l.set_nonblocking(true)?;
    tokio::net::UnixListener::from_std(l)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_unix_and_tcp_and_rejects_the_rest() {
        assert_eq!(
            "unix:///run/x.sock".parse(),
            Ok(Endpoint::Unix("/run/x.sock".into()))
        );
        assert_eq!(
            "tcp://127.0.0.1:10809".parse(),
            Ok(Endpoint::Tcp("127.0.0.1:10809".parse().unwrap()))
        );
        assert!("unix://relative".parse::<Endpoint>().is_err());
        assert!("http://x".parse::<Endpoint>().is_err());
        assert!("tcp://localhost".parse::<Endpoint>().is_err());
    }
}
