//! Mutual TLS between Strata's processes (the agent port: the controller's
//! calls and the nodes' data path). Every side loads three PEM files from one
//! directory, named as in a Kubernetes TLS Secret with a CA: `ca.crt` (the
//! CA that signed every Strata certificate), `tls.crt` and `tls.key` (this
//! process's certificate and key). The server requires a client
//! certificate signed by that CA; the client checks the server's
//! certificate against the same CA and the name [`SERVER_NAME`], so a node
//! certificate need not name the node's changing pod IP.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tonic::Status;
use tonic::transport::{
    Certificate, Channel, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig,
};

/// HTTP/2 flow control on the agent port, where the data path's requests
/// carry up to 1 MiB (`peer::MAX_IO`): with hyper's defaults (windows of 1
/// or 2 MiB, frames of 16 KiB) a few reads in flight stall on window
/// updates. What a server or a client lets one stream have in flight
/// unread: the server (which buffers for clients it cannot trust with its
/// memory) two requests, the client (which reads only what it asked for)
/// more.
pub const SERVER_STREAM_WINDOW: u32 = 2 << 20;
pub const CLIENT_STREAM_WINDOW: u32 = 8 << 20;
/// What one connection may have in flight unread.
pub const SERVER_CONNECTION_WINDOW: u32 = 16 << 20;
pub const CLIENT_CONNECTION_WINDOW: u32 = 32 << 20;
/// The largest HTTP/2 frame: one request's data in one frame.
pub const MAX_FRAME: u32 = 1 << 20;

/// The DNS name every agent's server certificate carries.
pub const SERVER_NAME: &str = "strata-agent";

/// Why the TLS files could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} holds no PEM {what}")]
    NotPem { path: PathBuf, what: &'static str },
}

/// The CA, certificate and key of one process.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    ca: Vec<u8>,
    cert: Vec<u8>,
    key: Vec<u8>,
}

fn read(dir: &Path, name: &str, what: &'static str) -> Result<Vec<u8>, TlsError> {
    let path = dir.join(name);
    let data = std::fs::read(&path).map_err(|source| TlsError::Read {
        path: path.clone(),
        source,
    })?;
    // rustls reports a file without PEM blocks only at the first
    // handshake; say it at start-up instead.
    if !String::from_utf8_lossy(&data).contains("-----BEGIN ") {
        return Err(TlsError::NotPem { path, what });
    }
    Ok(data)
}

impl TlsFiles {
    /// Loads `ca.crt`, `tls.crt` and `tls.key` from `dir`.
    pub fn load(dir: &Path) -> Result<Self, TlsError> {
        Ok(TlsFiles {
            ca: read(dir, "ca.crt", "certificate")?,
            cert: read(dir, "tls.crt", "certificate")?,
            key: read(dir, "tls.key", "private key")?,
        })
    }

    /// The private key's PEM, the secret every holder of the cluster's
    /// certificate shares (peer grants are keyed from it).
    pub(crate) fn key_pem(&self) -> &[u8] {
        &self.key
    }

    fn identity(&self) -> Identity {
        Identity::from_pem(&self.cert, &self.key)
    }

    /// The agent server's side: clients must present a certificate from
    /// the CA.
    pub fn server(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(self.identity())
            .client_ca_root(Certificate::from_pem(&self.ca))
    }

    /// The controller's side.
    pub fn client(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca))
            .identity(self.identity())
            .domain_name(SERVER_NAME)
    }

    /// A channel to `address` (`host:port`) with these certificates. No
    /// connection is made until the first call; tonic re-makes it after a
    /// failure. `what` names the peer in errors.
    pub fn channel(
        &self,
        what: &str,
        address: &str,
        connect_timeout: Duration,
        call_timeout: Duration,
    ) -> Result<Channel, Status> {
        let endpoint = Endpoint::from_shared(format!("https://{address}"))
            .map_err(|e| Status::internal(format!("{what} address {address:?}: {e}")))?
            .tls_config(self.client())
            .map_err(|e| Status::internal(format!("{what} TLS configuration: {e}")))?
            .connect_timeout(connect_timeout)
            .timeout(call_timeout)
            .tcp_nodelay(true)
            .initial_stream_window_size(CLIENT_STREAM_WINDOW)
            .initial_connection_window_size(CLIENT_CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME);
        Ok(endpoint.connect_lazy())
    }
}
