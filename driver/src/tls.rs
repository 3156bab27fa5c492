//! Mutual TLS between Strata's processes (the agent port: the controller's
//! calls and the nodes' data path). Every side loads three PEM files from one
//! directory, named as in a Kubernetes TLS Secret with a CA: `ca.crt` (the
//! CA that signed every Strata certificate), `tls.crt` and `tls.key` (this
//! process's certificate and key). The server requires a client
//! certificate signed by that CA; the client checks the server's
//! certificate against the same CA and the name [`SERVER_NAME`], so a node
//! certificate need not name the node's changing pod IP.
//!
//! Two ways to hand out certificates:
//! - **Shared**: one certificate for the controller and every node (what
//!   the chart makes). Whoever holds it may do anything on the agent port.
//! - **Per process**: the directory also holds `controller.crt`, the
//!   controller's certificate. Each process has its own `tls.crt`, which
//!   names, beside [`SERVER_NAME`], the controller ([`CONTROLLER_NAME`]) or
//!   one node ([`node_name`]). Then only the controller's certificate may
//!   change a node's volumes ([`Callers`]), a node's may use only grants
//!   made out to it, and grants are signed with the controller's key,
//!   which no node holds (`peer::grant`).

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

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
pub const H2_MAX_FRAME: u32 = 1 << 20;
/// Requests one connection to the agent port may have open at once (each
/// may buffer up to a message, about a MiB; a data path's copy or remote
/// I/O over the RPCs keeps at most a few dozen in flight).
pub const SERVER_MAX_STREAMS: u32 = 128;
/// How often the agent port pings a connection that sends nothing, and
/// how long it waits for the answer before it closes the connection.
pub const SERVER_KEEPALIVE: (Duration, Duration) =
    (Duration::from_secs(30), Duration::from_secs(20));

/// The longest one request to the agent port may take, its request's
/// arrival included (a client that sends a message's header and then
/// trickles the rest keeps its buffer no longer). Well above the longest
/// legitimate wait: a read of a volume still fetching waits up to 120 s
/// for its source, an attach 30 s for the previous attachment's requests.
pub const SERVER_RPC_TIMEOUT: Duration = Duration::from_secs(300);

/// The DNS name every agent's server certificate carries.
pub const SERVER_NAME: &str = "strata-agent";

/// The name the controller's certificate carries when every process has
/// its own.
pub const CONTROLLER_NAME: &str = "controller.strata-agent";

/// The name node `node`'s certificate carries when every process has its
/// own.
pub fn node_name(node: &str) -> String {
    format!("{node}.node.strata-agent")
}

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
    #[error("the TLS files: {0}")]
    Config(String),
}

/// ring's cipher suites, AES-128-GCM first: the data path encrypts every
/// byte a node reads from another, and AES-128 does it in about 15% less
/// time than AES-256 (`openssl speed -evp`: 4.9 against 4.3 GB/s here)
/// at a strength no attacker of a cluster's network reaches.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    provider
        .cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(provider)
}

/// The CA, certificate and key of one process, and the controller's
/// certificate when every process has its own.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    ca: Vec<u8>,
    cert: Vec<u8>,
    key: Vec<u8>,
    controller: Option<CertificateDer<'static>>,
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
    /// Loads `ca.crt`, `tls.crt` and `tls.key` from `dir`, and
    /// `controller.crt` if it is there.
    pub fn load(dir: &Path) -> Result<Self, TlsError> {
        let controller = match dir.join("controller.crt").try_exists() {
            Ok(false) => None,
            _ => {
                let pem = read(dir, "controller.crt", "certificate")?;
                let der = CertificateDer::from_pem_slice(&pem)
                    .map_err(|e| TlsError::Config(format!("controller.crt: {e}")))?;
                webpki::EndEntityCert::try_from(&der)
                    .map_err(|e| TlsError::Config(format!("controller.crt: {e}")))?;
                Some(der)
            }
        };
        Ok(TlsFiles {
            ca: read(dir, "ca.crt", "certificate")?,
            cert: read(dir, "tls.crt", "certificate")?,
            key: read(dir, "tls.key", "private key")?,
            controller,
        })
    }

    /// The private key's PEM: with a shared certificate, the secret every
    /// holder shares (peer grants are keyed from it).
    pub(crate) fn key_pem(&self) -> &[u8] {
        &self.key
    }

    /// The private key.
    pub(crate) fn key_der(&self) -> Result<PrivateKeyDer<'static>, TlsError> {
        self.chain().map(|(_, key)| key)
    }

    /// The controller's certificate, when every process has its own.
    pub(crate) fn controller(&self) -> Option<&CertificateDer<'static>> {
        self.controller.as_ref()
    }

    /// Whether this process's certificate is the controller's (when
    /// every process has its own).
    pub(crate) fn is_controller(&self) -> bool {
        self.callers().is_controller(&self.own())
    }

    /// What callers of this process's agent port may do.
    pub fn callers(&self) -> Callers {
        Callers {
            controller: self.controller.clone(),
        }
    }

    /// This process's own certificate, as a caller's.
    fn own(&self) -> Caller {
        Caller::new(
            CertificateDer::pem_slice_iter(&self.cert)
                .next()
                .and_then(Result::ok),
        )
    }

    /// Refuses files that do not fit the process: `node` (`None`: the
    /// controller). With a certificate per process, a node's must name it
    /// and not be the controller's, and the controller's must be
    /// `controller.crt`; a certificate made for one process without
    /// `controller.crt` beside it would turn every check off.
    pub fn check_role(&self, node: Option<&str>) -> Result<(), TlsError> {
        let own = self.own();
        let name = node.map_or_else(|| CONTROLLER_NAME.to_string(), node_name);
        let fail = |why: String| Err(TlsError::Config(why));
        match (self.controller.is_some(), node) {
            (false, _) if own.is(&name) || own.is(CONTROLLER_NAME) => fail(format!(
                "tls.crt is the certificate of one process ({}), but controller.crt is \
                 missing: without it no caller would be checked",
                if own.is(&name) {
                    &name
                } else {
                    CONTROLLER_NAME
                }
            )),
            (false, _) => Ok(()),
            (true, Some(_)) if self.is_controller() => fail(
                "tls.crt is the controller's certificate (controller.crt): a node must not hold \
                 it"
                .into(),
            ),
            (true, Some(n)) if !own.is(&name) => fail(format!(
                "with a certificate per process (controller.crt), node {n:?}'s tls.crt must name \
                 {name}"
            )),
            (true, None) if !self.is_controller() => fail(
                "with a certificate per process (controller.crt), the controller's tls.crt must \
                 be controller.crt"
                    .into(),
            ),
            (true, _) => Ok(()),
        }
    }

    /// The name a client checks in the certificate of `server`.
    pub fn server_name_of(&self, server: Server) -> String {
        match (self.controller.is_some(), server) {
            (true, Server::Controller) => CONTROLLER_NAME.to_string(),
            (true, Server::Node(n)) => node_name(n),
            _ => SERVER_NAME.to_string(),
        }
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

    fn roots(&self) -> Result<rustls::RootCertStore, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&self.ca) {
            let cert = cert.map_err(|e| TlsError::Config(format!("ca.crt: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| TlsError::Config(format!("ca.crt: {e}")))?;
        }
        Ok(roots)
    }

    fn chain(&self) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
        let certs = CertificateDer::pem_slice_iter(&self.cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError::Config(format!("tls.crt: {e}")))?;
        let key = PrivateKeyDer::from_pem_slice(&self.key)
            .map_err(|e| TlsError::Config(format!("tls.key: {e}")))?;
        Ok((certs, key))
    }

    /// The agent port's server side as rustls takes it (the port is
    /// served outside tonic to tell the data lane from gRPC by `alpn`):
    /// what [`Self::server`] is to tonic.
    pub fn rustls_server(&self, alpn: &[&[u8]]) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let provider = provider();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(self.roots()?),
            Arc::clone(&provider),
        )
        .build()
        .map_err(|e| TlsError::Config(format!("client verifier: {e}")))?;
        let (certs, key) = self.chain()?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs, key)
            .map_err(|e| TlsError::Config(format!("tls.crt and tls.key: {e}")))?;
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(config))
    }

    /// A client of the agent port as rustls takes it, offering `alpn`:
    /// what [`Self::client`] is to tonic.
    pub fn rustls_client(&self, alpn: &[&[u8]]) -> Result<Arc<rustls::ClientConfig>, TlsError> {
        let provider = provider();
        let (certs, key) = self.chain()?;
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(certs, key)
            .map_err(|e| TlsError::Config(format!("tls.crt and tls.key: {e}")))?;
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(config))
    }

    /// The name a client checks in the agent's certificate.
    pub fn server_name() -> ServerName<'static> {
        ServerName::try_from(SERVER_NAME).expect("a DNS name")
    }

    /// A client's side, for reaching `server`.
    pub fn client(&self, server: Server) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca))
            .identity(self.identity())
            .domain_name(self.server_name_of(server))
    }

    /// A channel to `server` at `address` (`host:port`) with these
    /// certificates. No connection is made until the first call; tonic
    /// re-makes it after a failure. `what` names the peer in errors.
    pub fn channel(
        &self,
        what: &str,
        address: &str,
        server: Server,
        connect_timeout: Duration,
        call_timeout: Duration,
    ) -> Result<Channel, Status> {
        let endpoint = Endpoint::from_shared(format!("https://{address}"))
            .map_err(|e| Status::internal(format!("{what} address {address:?}: {e}")))?
            .tls_config(self.client(server))
            .map_err(|e| Status::internal(format!("{what} TLS configuration: {e}")))?
            .connect_timeout(connect_timeout)
            .timeout(call_timeout)
            .tcp_nodelay(true)
            .initial_stream_window_size(CLIENT_STREAM_WINDOW)
            .initial_connection_window_size(CLIENT_CONNECTION_WINDOW)
            .max_frame_size(H2_MAX_FRAME);
        Ok(endpoint.connect_lazy())
    }
}

/// The certificate a caller of the agent port presented (the handshake
/// checked it against the CA).
#[derive(Debug, Clone, Default)]
pub struct Caller {
    cert: Option<CertificateDer<'static>>,
    /// The node the certificate was found to name: a data lane's caller
    /// is checked once, not at every request.
    node: OnceLock<String>,
}

impl Caller {
    fn new(cert: Option<CertificateDer<'static>>) -> Caller {
        Caller {
            cert,
            node: OnceLock::new(),
        }
    }

    /// The caller of a gRPC request.
    pub fn of<T>(req: &tonic::Request<T>) -> Caller {
        Caller::new(req.peer_certs().and_then(|c| c.first().cloned()))
    }

    /// The caller whose certificate chain this is (the end entity first).
    pub fn from_chain(chain: Option<&[CertificateDer<'static>]>) -> Caller {
        Caller::new(chain.and_then(|c| c.first().cloned()))
    }

    /// Whether the certificate names node `node` ([`Self::is`]).
    fn is_node(&self, node: &str) -> bool {
        if self.node.get().is_some_and(|n| n == node) {
            return true;
        }
        let named = self.is(&node_name(node));
        if named {
            let _ = self.node.set(node.to_string());
        }
        named
    }

    /// Whether the certificate carries the DNS name `name` as such, not
    /// through a wildcard: one that also covers another name in `name`'s
    /// place does not count.
    fn is(&self, name: &str) -> bool {
        let Some(cert) = &self.cert else {
            return false;
        };
        let Ok(cert) = webpki::EndEntityCert::try_from(cert) else {
            return false;
        };
        let valid_for = |n: &str| {
            ServerName::try_from(n).is_ok_and(|n| cert.verify_is_valid_for_subject_name(&n).is_ok())
        };
        let Some((_, parent)) = name.split_once('.') else {
            return false;
        };
        valid_for(name) && !valid_for(&format!("strata-wildcard-probe.{parent}"))
    }
}

/// What callers of one agent port may do (see the module's doc): with a
/// shared certificate anything; with one per process, what their
/// certificate is.
#[derive(Debug, Clone, Default)]
pub struct Callers {
    /// `controller.crt`, with a certificate per process.
    controller: Option<CertificateDer<'static>>,
}

impl Callers {
    fn is_controller(&self, caller: &Caller) -> bool {
        self.controller.is_some() && caller.cert == self.controller
    }

    /// Refuses a caller other than the controller.
    pub fn controller(&self, caller: &Caller) -> Result<(), Status> {
        if self.controller.is_none() || self.is_controller(caller) {
            return Ok(());
        }
        Err(Status::permission_denied(
            "only the controller's certificate (controller.crt) may make this call",
        ))
    }

    /// Refuses a caller other than node `node` (or the controller).
    pub fn node(&self, caller: &Caller, node: &str) -> Result<(), Status> {
        if self.controller.is_none() || self.is_controller(caller) || caller.is_node(node) {
            return Ok(());
        }
        Err(Status::permission_denied(format!(
            "the grant is for node {node:?}, and the caller's certificate does not name it ({})",
            node_name(node)
        )))
    }
}

/// Whom a client means to reach: with a certificate per process, the
/// name it checks in the server's certificate (a shared one names only
/// [`SERVER_NAME`]).
#[derive(Debug, Clone, Copy)]
pub enum Server<'a> {
    /// Any Strata process (an agent address whose node is not known yet).
    Any,
    Controller,
    Node(&'a str),
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn aes_128_gcm_comes_first_and_nothing_is_dropped() {
        let ours = provider();
        let ring = rustls::crypto::ring::default_provider();
        assert_eq!(
            ours.cipher_suites[0].suite(),
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
        );
        assert_eq!(ours.cipher_suites.len(), ring.cipher_suites.len());
    }

    /// Certificates per process for `nodes`, made by the project's script:
    /// the directory of the CA, with `controller/` and `nodes/NAME/`.
    pub(crate) fn per_process(nodes: &[&str]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/gen-agent-certs");
        let mut cmd = std::process::Command::new(script);
        for n in nodes {
            cmd.args(["--node", n]);
        }
        let out = cmd.arg(dir.path()).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        dir
    }

    fn caller(path: &Path) -> Caller {
        let path = if path.is_dir() {
            path.join("tls.crt")
        } else {
            path.to_path_buf()
        };
        let pem = std::fs::read(path).unwrap();
        Caller::new(Some(CertificateDer::from_pem_slice(&pem).unwrap()))
    }

    /// A certificate for `sans` from the CA in `ca_dir`, as a caller's.
    fn signed_by_ca(ca_dir: &Path, sans: &str) -> Caller {
        let out = ca_dir.join("extra");
        std::fs::create_dir_all(&out).unwrap();
        std::fs::write(out.join("ext.cnf"), format!("subjectAltName={sans}\n")).unwrap();
        let run = |args: &[&str]| {
            let o = std::process::Command::new("openssl")
                .args(args)
                .current_dir(&out)
                .output()
                .unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        };
        run(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "x.key",
            "-out",
            "x.csr",
            "-subj",
            "/CN=x",
        ]);
        let (ca, key) = (ca_dir.join("ca.crt"), ca_dir.join("ca.key"));
        run(&[
            "x509",
            "-req",
            "-in",
            "x.csr",
            "-CA",
            ca.to_str().unwrap(),
            "-CAkey",
            key.to_str().unwrap(),
            "-CAcreateserial",
            "-days",
            "1",
            "-out",
            "x.crt",
            "-extfile",
            "ext.cnf",
        ]);
        caller(&out.join("x.crt"))
    }

    #[test]
    fn with_a_certificate_per_process_callers_may_do_what_theirs_names() {
        let dir = per_process(&["n1", "n2"]);
        let (ctl, n1) = (dir.path().join("controller"), dir.path().join("nodes/n1"));
        let files = TlsFiles::load(&n1).unwrap();
        assert!(!files.is_controller());
        assert!(TlsFiles::load(&ctl).unwrap().is_controller());
        let callers = files.callers();
        let (c, one) = (caller(&ctl), caller(&n1));
        callers.controller(&c).unwrap();
        callers.node(&c, "n1").unwrap();
        callers.node(&one, "n1").unwrap();
        for refused in [
            callers.controller(&one),
            callers.node(&one, "n2"),
            callers.node(&one, "n1.node.strata-agent"),
            callers.node(&one, ""),
            callers.controller(&Caller::default()),
            callers.node(&Caller::default(), "n1"),
        ] {
            assert_eq!(refused.unwrap_err().code(), tonic::Code::PermissionDenied);
        }
        // From the same CA: a wildcard does not name a node, nor another
        // certificate for the controller's name the controller.
        let wildcard = signed_by_ca(dir.path(), "DNS:strata-agent,DNS:*.node.strata-agent");
        let other_controller =
            signed_by_ca(dir.path(), "DNS:strata-agent,DNS:controller.strata-agent");
        let named = signed_by_ca(dir.path(), "DNS:strata-agent,DNS:n1.node.strata-agent");
        callers.node(&named, "n1").unwrap();
        for refused in [
            callers.node(&wildcard, "n1"),
            callers.node(&wildcard, "x.n1"),
            callers.controller(&other_controller),
            callers.node(&other_controller, "n1"),
        ] {
            assert_eq!(refused.unwrap_err().code(), tonic::Code::PermissionDenied);
        }
        // A shared certificate: every caller may do anything.
        let shared = Callers::default();
        shared.controller(&one).unwrap();
        shared.node(&one, "n2").unwrap();
        // Each process checks its files fit it.
        let ctl_files = TlsFiles::load(&ctl).unwrap();
        files.check_role(Some("n1")).unwrap();
        ctl_files.check_role(None).unwrap();
        for wrong in [
            files.check_role(Some("n2")),
            files.check_role(None),
            ctl_files.check_role(Some("n1")),
        ] {
            assert!(wrong.is_err());
        }
        assert_eq!(
            files.server_name_of(Server::Node("n2")),
            "n2.node.strata-agent"
        );
        assert_eq!(files.server_name_of(Server::Controller), CONTROLLER_NAME);
        assert_eq!(files.server_name_of(Server::Any), SERVER_NAME);
        // Without controller.crt, a node's own certificate does not start
        // (every check would be off); a shared one does.
        let bare = dir.path().join("bare");
        std::fs::create_dir(&bare).unwrap();
        for f in ["ca.crt", "tls.crt", "tls.key"] {
            std::fs::copy(n1.join(f), bare.join(f)).unwrap();
        }
        let bare = TlsFiles::load(&bare).unwrap();
        assert!(bare.check_role(Some("n1")).is_err());
        let bare_ctl = dir.path().join("bare-controller");
        std::fs::create_dir(&bare_ctl).unwrap();
        for f in ["ca.crt", "tls.crt", "tls.key"] {
            std::fs::copy(ctl.join(f), bare_ctl.join(f)).unwrap();
        }
        let bare_ctl = TlsFiles::load(&bare_ctl).unwrap();
        assert!(bare_ctl.check_role(None).is_err());
        assert!(bare_ctl.check_role(Some("n2")).is_err());
        assert_eq!(bare.server_name_of(Server::Node("n1")), SERVER_NAME);
        let shared = tempfile::tempdir().unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/gen-agent-certs");
        assert!(
            std::process::Command::new(script)
                .arg(shared.path())
                .status()
                .unwrap()
                .success()
        );
        let shared = TlsFiles::load(shared.path()).unwrap();
        shared.check_role(Some("n1")).unwrap();
        shared.check_role(None).unwrap();
        // A controller.crt that is not a certificate stops the start.
        std::fs::write(
            n1.join("controller.crt"),
            b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        assert!(TlsFiles::load(&n1).is_err());
    }
}
