//! Grants: the controller's word that a node may use a volume held by
//! another node. A grant names the volume, the node it was published to,
//! the epoch of that attachment (which the owner's agent chose and recorded
//! when the controller published the volume: `agent.proto`, Attach) and
//! whether it is read-only, and carries an HMAC-SHA256 over them.
//!
//! The HMAC key is derived from the private key of the cluster's TLS
//! certificate, which the controller and every node share (one Secret):
//! whoever can pass the agent port's mutual TLS can also make grants. So a
//! grant does not keep out an attacker who holds that key (nothing does);
//! it keeps a node from using a volume the controller did not publish to
//! it, and, with the owner's record of the current attachment (whose node
//! and epoch a grant must name), an older attachment from writing after a
//! newer one began or after the volume was unpublished.

use ring::hmac;

use crate::tls::TlsFiles;
use csi_proto::peer::v1 as pb;

/// The key grants are made and checked with.
#[derive(Clone)]
pub struct GrantKey(hmac::Key);

impl std::fmt::Debug for GrantKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GrantKey(..)")
    }
}

/// Why a grant was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GrantError {
    #[error("the request carries no grant")]
    Missing,
    #[error("the grant is not for volume {asked} but for {granted}")]
    OtherVolume { asked: String, granted: String },
    #[error("the grant's MAC is wrong (not made by this cluster's controller)")]
    BadMac,
}

impl GrantKey {
    /// The key of the cluster whose TLS files these are.
    pub fn from_tls(tls: &TlsFiles) -> Self {
        Self::from_secret(tls.key_pem())
    }

    pub fn from_secret(secret: &[u8]) -> Self {
        let salt = hmac::Key::new(hmac::HMAC_SHA256, b"strata peer grant key v1");
        let derived = hmac::sign(&salt, secret);
        GrantKey(hmac::Key::new(hmac::HMAC_SHA256, derived.as_ref()))
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
    pub fn make(&self, volume_id: &str, node_id: &str, epoch: u64, read_only: bool) -> pb::Grant {
        let message = Self::message(volume_id, node_id, epoch, read_only);
        let tag = hmac::sign(&self.0, &message);
        pb::Grant {
            volume_id: volume_id.to_string(),
            node_id: node_id.to_string(),
            epoch,
            mac: tag.as_ref().to_vec(),
            session: 0,
            read_only,
        }
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
        hmac::verify(
            &self.0,
            &Self::message(&g.volume_id, &g.node_id, g.epoch, g.read_only),
            &g.mac,
        )
        .map_err(|_| GrantError::BadMac)?;
        Ok(g)
    }
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
    if mac.len() != 64 || node_id.is_empty() {
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
        let g = key.make("vol-1", "node-b", 42, false);
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
                ..key.make("vol-1", "node-b", 42, true)
            },
        ] {
            assert_eq!(key.check(Some(&tamper), "vol-1"), Err(GrantError::BadMac));
        }
        // Field boundaries are part of what is signed.
        let shifted = key.make("vol-1n", "ode-b", 42, false);
        assert_ne!(shifted.mac, g.mac);
    }

    #[test]
    fn grants_round_trip_as_text_and_garbage_is_refused() {
        let key = GrantKey::from_secret(b"k");
        for read_only in [false, true] {
            let g = key.make("vol-1", "node.with.dots", 7, read_only);
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
}
