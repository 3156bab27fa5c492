//! Grants: the controller's word that a node may use a volume held by
//! another node. A grant names the volume, the node it was published to,
//! the epoch of that attachment (which the owner's agent chose and recorded
//! when the controller published the volume: `agent.proto`, Attach) and
//! whether it is read-only, and carries a tag over them that only the
//! controller can make (the `mac` field):
//!
//! - With one certificate for every process (`crate::tls`, shared), an
//!   HMAC-SHA256 keyed from the certificate's private key, which the
//!   controller and every node share: whoever can pass the agent port's
//!   mutual TLS can also make grants. The grant keeps a node from using a
//!   volume the controller did not publish to it, and, with the owner's
//!   record of the current attachment (whose node and epoch a grant must
//!   name), an older attachment from writing after a newer one began or
//!   after the volume was unpublished; it does not keep out an attacker
//!   who holds the key.
//! - With a certificate per process, a signature with the controller's
//!   private key, which owners check with the controller's certificate.
//!   No node can make a grant, and the owner also checks that the caller's
//!   certificate names the grant's node (`crate::tls::Callers`), so a node
//!   whose key leaks reaches only the volumes published to it.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use ring::{hmac, rand, signature};
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::tls::{TlsError, TlsFiles};
use csi_proto::peer::v1 as pb;

/// The key grants are made and checked with.
#[derive(Clone)]
pub struct GrantKey(Kind);

#[derive(Clone)]
enum Kind {
    /// A shared certificate's: an HMAC.
    Shared(hmac::Key),
    /// Per-process certificates': the controller's signature.
    Signed(Arc<Signed>),
}

impl std::fmt::Debug for GrantKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.0 {
            Kind::Shared(_) => "GrantKey(shared)",
            Kind::Signed(_) => "GrantKey(signed)",
        })
    }
}

/// Grants signed by the controller.
struct Signed {
    controller: CertificateDer<'static>,
    /// The controller's key, in the controller only.
    signer: Option<Signer>,
    /// Grants whose signature checked (a digest of what was signed and
    /// the signature), so that a request costs a digest rather than a
    /// signature check; at most [`CHECKED`], forgotten all at once.
    checked: Mutex<HashSet<[u8; 32]>>,
}

/// Checked grants remembered.
const CHECKED: usize = 4096;

/// The longest tag a grant carries (an ECDSA P-384 signature is at most
/// 104 bytes).
const MAX_TAG: usize = 128;

enum Signer {
    Ecdsa(signature::EcdsaKeyPair),
    Ed25519(signature::Ed25519KeyPair),
}

/// What a signature covers before the grant: the controller's key also
/// signs its TLS handshakes, which must not pass for a grant, nor a grant
/// for them.
const SIGNED_CONTEXT: &[u8] = b"strata peer grant, signed, v1\0";

/// What a per-process certificate's signature may be.
static SIGNATURES: [&dyn tokio_rustls::rustls::pki_types::SignatureVerificationAlgorithm; 3] = [
    webpki::ring::ECDSA_P256_SHA256,
    webpki::ring::ECDSA_P384_SHA384,
    webpki::ring::ED25519,
];

impl Signer {
    fn load(key: &PrivateKeyDer<'_>) -> Result<Self, TlsError> {
        let unsupported = || {
            TlsError::Config(
                "tls.key: the controller signs grants with an ECDSA (P-256 or P-384) or Ed25519 \
                 key in PKCS#8; this is another kind"
                    .into(),
            )
        };
        let PrivateKeyDer::Pkcs8(der) = key else {
            return Err(unsupported());
        };
        let der = der.secret_pkcs8_der();
        let rng = rand::SystemRandom::new();
        for alg in [
            &signature::ECDSA_P256_SHA256_ASN1_SIGNING,
            &signature::ECDSA_P384_SHA384_ASN1_SIGNING,
        ] {
            if let Ok(k) = signature::EcdsaKeyPair::from_pkcs8(alg, der, &rng) {
                return Ok(Signer::Ecdsa(k));
            }
        }
        signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(der)
            .map(Signer::Ed25519)
            .map_err(|_| unsupported())
    }

    fn sign(&self, message: &[u8]) -> Option<Vec<u8>> {
        let message = &[SIGNED_CONTEXT, message].concat();
        match self {
            Signer::Ecdsa(k) => k
                .sign(&rand::SystemRandom::new(), message)
                .ok()
                .map(|s| s.as_ref().to_vec()),
            Signer::Ed25519(k) => Some(k.sign(message).as_ref().to_vec()),
        }
    }
}

impl Signed {
    fn verify(&self, message: &[u8], tag: &[u8]) -> bool {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(&(message.len() as u64).to_be_bytes());
        ctx.update(message);
        ctx.update(tag);
        let digest: [u8; 32] = ctx.finish().as_ref().try_into().expect("SHA-256");
        if self.checked.lock().expect("grants").contains(&digest) {
            return true;
        }
        let Ok(cert) = webpki::EndEntityCert::try_from(&self.controller) else {
            return false;
        };
        let signed = [SIGNED_CONTEXT, message].concat();
        let good = SIGNATURES
            .iter()
            .any(|alg| cert.verify_signature(*alg, &signed, tag).is_ok());
        if good {
            let mut checked = self.checked.lock().expect("grants");
            if checked.len() >= CHECKED {
                checked.clear();
            }
            checked.insert(digest);
        }
        good
    }
}

/// Why a grant was refused, or not made.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GrantError {
    #[error("the request carries no grant")]
    Missing,
    #[error("the grant is not for volume {asked} but for {granted}")]
    OtherVolume { asked: String, granted: String },
    #[error("the grant's MAC is wrong (not made by this cluster's controller)")]
    BadMac,
    #[error(
        "this process's certificate (tls.crt) is not the controller's (controller.crt): only \
         the controller makes grants"
    )]
    CannotSign,
    #[error("the grant key: {0}")]
    Key(String),
}

impl GrantKey {
    /// The key of the process whose TLS files these are: with a shared
    /// certificate, the HMAC key; with one per process, the controller's
    /// certificate, and its key in the controller.
    pub fn from_tls(tls: &TlsFiles) -> Result<Self, TlsError> {
        let Some(controller) = tls.controller() else {
            return Ok(Self::from_secret(tls.key_pem()));
        };
        let signer = if tls.is_controller() {
            let signer = Signer::load(&tls.key_der()?)?;
            // A key that is not the certificate's would make grants no
            // owner takes: say so at start-up.
            let probe = b"strata grant key probe";
            let signed = Signed {
                controller: controller.clone(),
                signer: None,
                checked: Mutex::default(),
            };
            if !signer.sign(probe).is_some_and(|t| signed.verify(probe, &t)) {
                return Err(TlsError::Config(
                    "tls.key is not the key of controller.crt".into(),
                ));
            }
            Some(signer)
        } else {
            None
        };
        Ok(GrantKey(Kind::Signed(Arc::new(Signed {
            controller: controller.clone(),
            signer,
            checked: Mutex::default(),
        }))))
    }

    pub fn from_secret(secret: &[u8]) -> Self {
        let salt = hmac::Key::new(hmac::HMAC_SHA256, b"strata peer grant key v1");
        let derived = hmac::sign(&salt, secret);
        GrantKey(Kind::Shared(hmac::Key::new(
            hmac::HMAC_SHA256,
            derived.as_ref(),
        )))
    }

    fn message(volume_id: &str, node_id: &str, epoch: u64, read_only: bool) -> Vec<u8> {
        // Lengths first: no two field lists encode alike. A read-only
        // grant's message is one byte longer; a read-write one's is what
        // grants were before read-only ones existed, so those stay valid.
        let mut m = Vec::with_capacity(volume_id.len() + node_id.len() + 25);
        m.extend_from_slice(&(volume_id.len() as u64).to_be_bytes());
        m.extend_from_slice(volume_id.as_bytes());
        m.extend_from_slice(&(node_id.len() as u64).to_be_bytes());
        m.extend_from_slice(node_id.as_bytes());
        m.extend_from_slice(&epoch.to_be_bytes());
        if read_only {
            m.push(b'r');
        }
        m
    }

    /// A grant of `volume_id` to `node_id` at `epoch`, read-only or not.
    pub fn make(
        &self,
        volume_id: &str,
        node_id: &str,
        epoch: u64,
        read_only: bool,
    ) -> Result<pb::Grant, GrantError> {
        let message = Self::message(volume_id, node_id, epoch, read_only);
        let mac = match &self.0 {
            Kind::Shared(key) => hmac::sign(key, &message).as_ref().to_vec(),
            Kind::Signed(s) => s
                .signer
                .as_ref()
                .and_then(|k| k.sign(&message))
                .ok_or(GrantError::CannotSign)?,
        };
        Ok(pb::Grant {
            volume_id: volume_id.to_string(),
            node_id: node_id.to_string(),
            epoch,
            mac,
            session: 0,
            read_only,
        })
    }

    /// Checks that `grant` was made with this key for `volume_id`
    /// (in constant time).
    pub fn check<'a>(
        &self,
        grant: Option<&'a pb::Grant>,
        volume_id: &str,
    ) -> Result<&'a pb::Grant, GrantError> {
        let g = grant.ok_or(GrantError::Missing)?;
        if g.volume_id != volume_id {
            return Err(GrantError::OtherVolume {
                asked: volume_id.to_string(),
                granted: g.volume_id.clone(),
            });
        }
        let message = Self::message(&g.volume_id, &g.node_id, g.epoch, g.read_only);
        let good = match &self.0 {
            Kind::Shared(key) => hmac::verify(key, &message, &g.mac).is_ok(),
            Kind::Signed(s) => g.mac.len() <= MAX_TAG && s.verify(&message, &g.mac),
        };
        if !good {
            return Err(GrantError::BadMac);
        }
        Ok(g)
    }
}

/// A grant made with the key of `tls` (the controller's), as [`encode`]
/// writes it.
pub fn issue(
    tls: &TlsFiles,
    volume_id: &str,
    node_id: &str,
    epoch: u64,
    read_only: bool,
) -> Result<String, GrantError> {
    let key =
        GrantKey::from_tls(tls).map_err(|e| GrantError::Key(crate::engine::error::chain(&e)))?;
    key.make(volume_id, node_id, epoch, read_only)
        .map(|g| encode(&g))
}

/// Text that starts a read-only grant's [`encode`]ing.
const READ_ONLY_PREFIX: &str = "ro.";

/// A grant as text (for CSI's publish context and the staging record):
/// `epoch.hexmac.node`, after `ro.` when read-only; the volume ID is beside
/// it in the context.
pub fn encode(g: &pb::Grant) -> String {
    let mac: String = g.mac.iter().map(|b| format!("{b:02x}")).collect();
    let ro = if g.read_only { READ_ONLY_PREFIX } else { "" };
    format!("{ro}{}.{}.{}", g.epoch, mac, g.node_id)
}

/// The grant of `volume_id` that [`encode`] wrote, if `s` is one.
pub fn decode(volume_id: &str, s: &str) -> Option<pb::Grant> {
    let (read_only, s) = match s.strip_prefix(READ_ONLY_PREFIX) {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let (epoch, rest) = s.split_once('.')?;
    let (mac, node_id) = rest.split_once('.')?;
    if mac.is_empty() || mac.len() % 2 != 0 || mac.len() > 2 * MAX_TAG || node_id.is_empty() {
        return None;
    }
    let mac = (0..mac.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(mac.get(i..i + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    Some(pb::Grant {
        volume_id: volume_id.to_string(),
        node_id: node_id.to_string(),
        epoch: epoch.parse().ok()?,
        mac,
        session: 0,
        read_only,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grant_checks_only_with_its_key_volume_node_and_epoch() {
        let key = GrantKey::from_secret(b"-----BEGIN PRIVATE KEY----- one");
        let g = key.make("vol-1", "node-b", 42, false).unwrap();
        assert_eq!(key.check(Some(&g), "vol-1"), Ok(&g));
        assert_eq!(key.check(None, "vol-1"), Err(GrantError::Missing));
        assert!(matches!(
            key.check(Some(&g), "vol-2"),
            Err(GrantError::OtherVolume { .. })
        ));
        let other = GrantKey::from_secret(b"-----BEGIN PRIVATE KEY----- two");
        assert_eq!(other.check(Some(&g), "vol-1"), Err(GrantError::BadMac));
        for tamper in [
            pb::Grant {
                epoch: 43,
                ..g.clone()
            },
            pb::Grant {
                node_id: "node-c".into(),
                ..g.clone()
            },
            pb::Grant {
                mac: vec![0; 32],
                ..g.clone()
            },
            // A read-write grant does not become read-only, nor the other
            // way round.
            pb::Grant {
                read_only: true,
                ..g.clone()
            },
            pb::Grant {
                read_only: false,
                ..key.make("vol-1", "node-b", 42, true).unwrap()
            },
        ] {
            assert_eq!(key.check(Some(&tamper), "vol-1"), Err(GrantError::BadMac));
        }
        // Field boundaries are part of what is signed.
        let shifted = key.make("vol-1n", "ode-b", 42, false).unwrap();
        assert_ne!(shifted.mac, g.mac);
    }

    #[test]
    fn grants_round_trip_as_text_and_garbage_is_refused() {
        let key = GrantKey::from_secret(b"k");
        for read_only in [false, true] {
            let g = key.make("vol-1", "node.with.dots", 7, read_only).unwrap();
            let text = encode(&g);
            assert_eq!(text.starts_with("ro."), read_only);
            assert_eq!(decode("vol-1", &text), Some(g));
        }
        for bad in [
            "ro.",
            "ro.7",
            "",
            "7",
            "7.abc.n",
            "x.00.n",
            &format!("7.{}.", "0".repeat(64)),
        ] {
            assert_eq!(decode("vol-1", bad), None, "{bad:?}");
        }
        assert_eq!(decode("vol-1", &format!("7.{}é.n", "0".repeat(63))), None);
    }

    #[test]
    fn with_a_certificate_per_process_only_the_controller_makes_grants() {
        let dir = crate::tls::tests::per_process(&["n1"]);
        let load = |d: &str| TlsFiles::load(&dir.path().join(d)).unwrap();
        let (ctl, n1) = (load("controller"), load("nodes/n1"));
        let owner = GrantKey::from_tls(&n1).unwrap();
        let g = GrantKey::from_tls(&ctl)
            .unwrap()
            .make("vol-1", "n1", 3, false)
            .unwrap();
        assert_eq!(owner.check(Some(&g), "vol-1"), Ok(&g));
        // Checked again from what was remembered.
        assert_eq!(owner.check(Some(&g), "vol-1"), Ok(&g));
        let text = issue(&ctl, "vol-1", "n1", 3, true).unwrap();
        let ro = decode("vol-1", &text).unwrap();
        assert!(ro.read_only);
        assert_eq!(owner.check(Some(&ro), "vol-1"), Ok(&ro));
        // A node cannot make one, with its key or as with a shared one.
        assert_eq!(
            owner.make("vol-1", "n1", 4, false),
            Err(GrantError::CannotSign)
        );
        assert!(matches!(
            issue(&n1, "vol-1", "n1", 4, false),
            Err(GrantError::CannotSign)
        ));
        let hmac = GrantKey::from_secret(n1.key_pem())
            .make("vol-1", "n1", 3, false)
            .unwrap();
        for forged in [
            hmac,
            pb::Grant {
                epoch: 4,
                ..g.clone()
            },
            pb::Grant {
                read_only: true,
                ..g.clone()
            },
            pb::Grant {
                node_id: "n2".into(),
                ..ro.clone()
            },
            pb::Grant {
                mac: [g.mac.clone(), vec![0; MAX_TAG]].concat(),
                ..g.clone()
            },
            pb::Grant {
                mac: Vec::new(),
                ..g.clone()
            },
        ] {
            assert_eq!(owner.check(Some(&forged), "vol-1"), Err(GrantError::BadMac));
        }
        // An ECDSA controller key (a node's, here, made the controller's)
        // signs too, with a signature that differs at every grant.
        let ecdsa = dir.path().join("ecdsa");
        std::fs::create_dir(&ecdsa).unwrap();
        for (from, to) in [
            ("ca.crt", "ca.crt"),
            ("tls.crt", "tls.crt"),
            ("tls.key", "tls.key"),
            ("tls.crt", "controller.crt"),
        ] {
            std::fs::copy(dir.path().join("nodes/n1").join(from), ecdsa.join(to)).unwrap();
        }
        let ecdsa = TlsFiles::load(&ecdsa).unwrap();
        let (one, two) = (
            issue(&ecdsa, "vol-1", "n1", 3, false).unwrap(),
            issue(&ecdsa, "vol-1", "n1", 3, false).unwrap(),
        );
        assert_ne!(one, two);
        let checker = TlsFiles::load(&dir.path().join("ecdsa")).unwrap();
        let checker = GrantKey::from_tls(&checker).unwrap();
        for text in [one, two] {
            let g = decode("vol-1", &text).unwrap();
            assert_eq!(checker.check(Some(&g), "vol-1"), Ok(&g));
            assert_eq!(owner.check(Some(&g), "vol-1"), Err(GrantError::BadMac));
        }
        // A controller whose key is not its certificate's does not start.
        let bad = dir.path().join("controller");
        std::fs::copy(dir.path().join("nodes/n1/tls.key"), bad.join("tls.key")).unwrap();
        assert!(GrantKey::from_tls(&TlsFiles::load(&bad).unwrap()).is_err());
    }
}
