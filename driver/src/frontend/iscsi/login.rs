//! Login and text negotiation (RFC 7143 §6, §13): `key=value` pairs, each
//! answered by the rule of its key (lowest, highest, OR, AND, first in the
//! offer's list we support, or a declaration needing no answer). Pure: no
//! I/O, so every rule is tested on its own.

use super::chap::Chap;
use super::pdu::Digests;

/// The most `key=value` text one login or text exchange may carry (over
/// several PDUs): far above what any initiator sends.
pub const MAX_TEXT: usize = 64 << 10;

/// What this target accepts in one data segment (declared to the
/// initiator as MaxRecvDataSegmentLength).
pub const OUR_MAX_RECV: u32 = 256 << 10;
/// The largest burst (the data of one R2T or of one Data-In sequence).
pub const OUR_MAX_BURST: u32 = 1 << 20;
/// The largest unsolicited (immediate) burst.
pub const OUR_FIRST_BURST: u32 = 64 << 10;

/// Parses a text data segment into its pairs. `None` for a pair without
/// `=`, an empty or over-long key (RFC 7143 §6.1: 63 bytes) or text that
/// is not UTF-8.
pub fn parse(text: &[u8]) -> Option<Vec<(String, String)>> {
    let mut out = Vec::new();
    for item in text.split(|&b| b == 0) {
        if item.is_empty() {
            continue;
        }
        let item = std::str::from_utf8(item).ok()?;
        let (k, v) = item.split_once('=')?;
        if k.is_empty() || k.len() > 63 {
            return None;
        }
        out.push((k.to_string(), v.to_string()));
    }
    Some(out)
}

/// Encodes pairs as a text data segment.
pub fn encode(pairs: &[(String, String)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in pairs {
        out.extend_from_slice(k.as_bytes());
        out.push(b'=');
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    out
}

/// Whether the session is for discovery (SendTargets only) or I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionType {
    Discovery,
    Normal,
}

/// The operational parameters in force after negotiation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Params {
    pub digests: Digests,
    /// The initiator's MaxRecvDataSegmentLength: the most data this
    /// target may put in one PDU it sends.
    pub send_segment: u32,
    pub max_burst: u32,
    pub first_burst: u32,
    pub immediate_data: bool,
    pub initial_r2t: bool,
}

impl Default for Params {
    /// The RFC's defaults, with this target's limits where they are lower.
    fn default() -> Self {
        Params {
            digests: Digests::default(),
            send_segment: 8192,
            max_burst: 262_144,
            first_burst: 65_536,
            immediate_data: true,
            initial_r2t: true,
        }
    }
}

/// Declarations and answers gathered over one login.
#[derive(Debug, Default)]
pub struct Negotiation {
    pub params: Params,
    pub initiator_name: Option<String>,
    pub target_name: Option<String>,
    pub session_type: Option<SessionType>,
    /// Set once MaxRecvDataSegmentLength was declared to the initiator.
    declared_recv: bool,
    /// Keys offered so far: each may be offered once (RFC 7143 §6.2).
    seen: std::collections::HashSet<String>,
    /// Authentication: set from the target's secrets before the first
    /// request is answered.
    pub chap: Chap,
}

/// The most keys one login may carry.
pub const MAX_KEYS: usize = 256;

/// A login refused: its status (class and detail) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub status: u16,
    pub why: String,
}

fn number(v: &str, min: u64, max: u64) -> Option<u64> {
    let n = if let Some(hex) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        u64::from_str_radix(hex, 16).ok()?
    } else {
        v.parse().ok()?
    };
    (min..=max).contains(&n).then_some(n)
}

fn yes_no(v: &str) -> Option<bool> {
    match v {
        "Yes" => Some(true),
        "No" => Some(false),
        _ => None,
    }
}

fn word(b: bool) -> &'static str {
    if b { "Yes" } else { "No" }
}

impl Negotiation {
    /// Answers the pairs of one login request (`stage` 0 is security, 1
    /// operational). Returns the answer pairs.
    pub fn answer(
        &mut self,
        pairs: &[(String, String)],
        stage: u8,
    ) -> Result<Vec<(String, String)>, Refused> {
        let mut out: Vec<(String, String)> = Vec::new();
        let (mut chap_n, mut chap_r, mut chap_i, mut chap_c) = (None, None, None, None);
        let mut reply = |k: &str, v: &str| out.push((k.to_string(), v.to_string()));
        for (k, v) in pairs {
            if self.seen.len() >= MAX_KEYS {
                return Err(Refused {
                    status: 0x0200,
                    why: format!("more than {MAX_KEYS} keys"),
                });
            }
            if !self.seen.insert(k.clone()) {
                return Err(Refused {
                    status: 0x0200,
                    why: format!("{k} offered twice"),
                });
            }
            match k.as_str() {
                "InitiatorName" => self.initiator_name = Some(v.clone()),
                "InitiatorAlias" => {}
                "TargetName" => self.target_name = Some(v.clone()),
                "SessionType" => {
                    self.session_type = Some(match v.as_str() {
                        "Discovery" => SessionType::Discovery,
                        "Normal" => SessionType::Normal,
                        _ => {
                            return Err(Refused {
                                status: 0x0209,
                                why: format!("SessionType={v}"),
                            });
                        }
                    })
                }
                "AuthMethod" => reply(k, self.chap.method(v)),
                "CHAP_A" => {
                    for (k, v) in self.chap.algorithm(v)? {
                        reply(&k, &v);
                    }
                }
                "CHAP_N" => chap_n = Some(v.as_str()),
                "CHAP_R" => chap_r = Some(v.as_str()),
                "CHAP_I" => chap_i = Some(v.as_str()),
                "CHAP_C" => chap_c = Some(v.as_str()),
                "HeaderDigest" | "DataDigest" => {
                    let pick = v
                        .split(',')
                        .find(|d| matches!(*d, "None" | "CRC32C"))
                        .unwrap_or("Reject");
                    let on = pick == "CRC32C";
                    if k == "HeaderDigest" {
                        self.params.digests.header = on;
                    } else {
                        self.params.digests.data = on;
                    }
                    reply(k, pick);
                }
                "MaxRecvDataSegmentLength" => match number(v, 512, (1 << 24) - 1) {
                    Some(n) => self.params.send_segment = n as u32,
                    None => reply(k, "Reject"),
                },
                "MaxBurstLength" | "FirstBurstLength" => match number(v, 512, (1 << 24) - 1) {
                    Some(n) => {
                        let ours = if k == "MaxBurstLength" {
                            OUR_MAX_BURST
                        } else {
                            OUR_FIRST_BURST
                        };
                        let n = (n as u32).min(ours);
                        if k == "MaxBurstLength" {
                            self.params.max_burst = n;
                        } else {
                            self.params.first_burst = n;
                        }
                        reply(k, &n.to_string());
                    }
                    None => reply(k, "Reject"),
                },
                "ImmediateData" | "InitialR2T" | "DataPDUInOrder" | "DataSequenceInOrder" => {
                    match yes_no(v) {
                        // ImmediateData is AND'ed with our Yes; the other
                        // three are OR'ed with our Yes.
                        Some(b) if k == "ImmediateData" => {
                            self.params.immediate_data = b;
                            reply(k, word(b));
                        }
                        Some(_) => reply(k, "Yes"),
                        None => reply(k, "Reject"),
                    }
                }
                "MaxConnections" | "MaxOutstandingR2T" => match number(v, 1, 65535) {
                    Some(_) => reply(k, "1"),
                    None => reply(k, "Reject"),
                },
                "ErrorRecoveryLevel" => match number(v, 0, 2) {
                    Some(_) => reply(k, "0"),
                    None => reply(k, "Reject"),
                },
                "DefaultTime2Wait" => match number(v, 0, 3600) {
                    Some(n) => reply(k, &n.max(2).to_string()),
                    None => reply(k, "Reject"),
                },
                "DefaultTime2Retain" => match number(v, 0, 3600) {
                    // No connection recovery at level 0: nothing is kept.
                    Some(_) => reply(k, "0"),
                    None => reply(k, "Reject"),
                },
                "IFMarker" | "OFMarker" => reply(k, "No"),
                "IFMarkInt" | "OFMarkInt" => reply(k, "Irrelevant"),
                _ => reply(k, "NotUnderstood"),
            }
        }
        if chap_n.is_some() || chap_r.is_some() || chap_i.is_some() || chap_c.is_some() {
            out.extend(self.chap.response(chap_n, chap_r, chap_i, chap_c)?);
        }
        if self.params.first_burst > self.params.max_burst {
            self.params.first_burst = self.params.max_burst;
            set(
                &mut out,
                "FirstBurstLength",
                self.params.max_burst.to_string(),
            );
        }
        if stage == 1 && !self.declared_recv {
            self.declared_recv = true;
            out.push(("MaxRecvDataSegmentLength".into(), OUR_MAX_RECV.to_string()));
        }
        Ok(out)
    }

    /// Whether this target may now accept data segments up to
    /// [`OUR_MAX_RECV`] (else the RFC's default of 8192 holds).
    pub fn declared_recv(&self) -> bool {
        self.declared_recv
    }
}

/// Sets `key`'s answer, adding it if the offer did not name it.
fn set(out: &mut Vec<(String, String)>, key: &str, value: String) {
    match out.iter_mut().find(|(k, _)| k == key) {
        Some(pair) => pair.1 = value,
        None => out.push((key.to_string(), value)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(s: &str) -> Vec<(String, String)> {
        parse(s.replace(' ', "\0").as_bytes()).unwrap()
    }

    fn get<'a>(out: &'a [(String, String)], k: &str) -> Option<&'a str> {
        out.iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn text_parses_and_refuses_garbage() {
        assert_eq!(
            parse(b"A=1\0B=x=y\0\0").unwrap(),
            vec![("A".into(), "1".into()), ("B".into(), "x=y".into())]
        );
        assert!(parse(b"novalue\0").is_none());
        assert!(parse(b"=1\0").is_none());
        assert!(parse(&[0xff, b'=', b'1', 0]).is_none());
        assert!(parse(format!("{}=1", "k".repeat(64)).as_bytes()).is_none());
        let round = pairs("X=1 Y=2");
        assert_eq!(parse(&encode(&round)).unwrap(), round);
    }

    #[test]
    fn each_key_is_answered_by_its_rule() {
        let mut n = Negotiation::default();
        let out = n
            .answer(
                &pairs(
                    "InitiatorName=iqn.x SessionType=Normal TargetName=iqn.t AuthMethod=CHAP,None \
                     HeaderDigest=CRC32C,None DataDigest=None MaxRecvDataSegmentLength=65536 \
                     MaxBurstLength=16776192 FirstBurstLength=262144 ImmediateData=No \
                     InitialR2T=No MaxConnections=4 ErrorRecoveryLevel=2 DefaultTime2Wait=0 \
                     X-foo=bar MaxOutstandingR2T=bogus",
                ),
                1,
            )
            .unwrap();
        assert_eq!(n.initiator_name.as_deref(), Some("iqn.x"));
        assert_eq!(n.target_name.as_deref(), Some("iqn.t"));
        assert_eq!(n.session_type, Some(SessionType::Normal));
        assert_eq!(get(&out, "AuthMethod"), Some("None"));
        assert_eq!(get(&out, "HeaderDigest"), Some("CRC32C"));
        assert_eq!(get(&out, "DataDigest"), Some("None"));
        assert_eq!(get(&out, "MaxBurstLength"), Some("1048576"));
        assert_eq!(get(&out, "FirstBurstLength"), Some("65536"));
        assert_eq!(get(&out, "ImmediateData"), Some("No"));
        assert_eq!(get(&out, "InitialR2T"), Some("Yes"));
        assert_eq!(get(&out, "MaxConnections"), Some("1"));
        assert_eq!(get(&out, "ErrorRecoveryLevel"), Some("0"));
        assert_eq!(get(&out, "DefaultTime2Wait"), Some("2"));
        assert_eq!(get(&out, "X-foo"), Some("NotUnderstood"));
        assert_eq!(get(&out, "MaxOutstandingR2T"), Some("Reject"));
        assert_eq!(get(&out, "MaxRecvDataSegmentLength"), Some("262144"));
        assert_eq!(
            n.params,
            Params {
                digests: Digests {
                    header: true,
                    data: false
                },
                send_segment: 65536,
                max_burst: 1 << 20,
                first_burst: 65536,
                immediate_data: false,
                initial_r2t: true,
            }
        );
        // A key offered again fails the login.
        assert_eq!(
            n.answer(&pairs("HeaderDigest=None"), 1).unwrap_err().status,
            0x0200
        );
        // Declared once only; a first burst over the burst is lowered to
        // it, and said so.
        let mut m = Negotiation::default();
        let first = m.answer(&pairs("FirstBurstLength=65536"), 1).unwrap();
        assert_eq!(get(&first, "MaxRecvDataSegmentLength"), Some("262144"));
        let again = m.answer(&pairs("MaxBurstLength=4096"), 1).unwrap();
        assert_eq!(get(&again, "MaxRecvDataSegmentLength"), None);
        assert_eq!(get(&again, "FirstBurstLength"), Some("4096"));
        assert_eq!(m.params.first_burst, 4096);
    }

    #[test]
    fn unsupported_offers_are_rejected_and_bad_session_types_fail() {
        let mut n = Negotiation::default();
        let out = n
            .answer(
                &pairs("AuthMethod=CHAP HeaderDigest=MD5 MaxRecvDataSegmentLength=1"),
                0,
            )
            .unwrap();
        assert_eq!(get(&out, "AuthMethod"), Some("Reject"));
        assert_eq!(get(&out, "HeaderDigest"), Some("Reject"));
        assert_eq!(get(&out, "MaxRecvDataSegmentLength"), Some("Reject"));
        assert_eq!(n.params.send_segment, 8192);
        assert_eq!(
            n.answer(&pairs("SessionType=Other"), 0).unwrap_err().status,
            0x0209
        );
        let mut many = Negotiation::default();
        let keys: Vec<(String, String)> =
            (0..300).map(|i| (format!("X-k{i}"), "1".into())).collect();
        assert_eq!(many.answer(&keys, 0).unwrap_err().status, 0x0200);
    }
}
