//! CHAP and mutual CHAP at login (RFC 7143 §12.1.3, RFC 1994) with MD5,
//! the one algorithm every initiator offers. Secrets come from a file
//! (`--iscsi-chap-secrets`), one line per target:
//!
//! ```text
//! # target (an IQN, or * for every target and discovery)  user  secret  [target-user target-secret]
//! iqn.2026-12.dev.strata:0b9e...  alice  a-secret-of-12+-chars
//! *                               bob    another-long-secret  strata  the-targets-own-secret
//! ```
//!
//! A target with a line requires CHAP; one without (and no `*` line)
//! takes None. The node adds a volume's own secret (from the Kubernetes
//! Secret its StorageClass names) while the volume is staged with
//! `frontend: iscsi` ([`Secrets::stage`]); it wins over the file's lines.
//! The digest comes from the `md-5` crate.

use std::collections::HashMap;
use std::path::Path;
use std::sync::RwLock;

use md5::{Digest, Md5};

use super::login::Refused;

/// RFC 7143 asks for secrets of at least 96 bits.
const MIN_SECRET: usize = 12;

/// The longest user name or secret (what open-iscsi's records hold).
const MAX_VALUE: usize = 255;

/// The secrets of one target.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret {
    user: String,
    secret: Vec<u8>,
    /// What the target answers the initiator's challenge with (mutual).
    target: Option<(String, Vec<u8>)>,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secret")
            .field("user", &self.user)
            .field("mutual", &self.target.is_some())
            .finish_non_exhaustive()
    }
}

impl Secret {
    /// A secret of a volume (`user`, `secret`) and, for mutual CHAP, the
    /// target's own (`target`); secrets shorter than 96 bits are refused.
    pub fn new(user: &str, secret: &str, target: Option<(&str, &str)>) -> Result<Secret, String> {
        // What iscsiadm keeps of a value: at most 255 bytes, trimmed; a
        // value it would change is refused rather than changed.
        let kept = |v: &str| {
            !v.is_empty()
                && v.len() <= MAX_VALUE
                && v.trim() == v
                && !v.chars().any(char::is_control)
        };
        let values = [
            Some(user),
            Some(secret),
            target.map(|t| t.0),
            target.map(|t| t.1),
        ];
        if !values.into_iter().flatten().all(kept) {
            return Err(format!(
                "CHAP user names and secrets need 1 to {MAX_VALUE} bytes, with no control \
                 characters and no spaces at either end"
            ));
        }
        let short = |s: &str| s.len() < MIN_SECRET;
        if short(secret) || target.is_some_and(|(_, s)| short(s)) {
            return Err(format!(
                "CHAP secrets need at least {MIN_SECRET} characters"
            ));
        }
        // RFC 7143 §12.1.3: the two directions use different secrets.
        if target.is_some_and(|(_, s)| s == secret) {
            return Err("the target's CHAP secret must differ from the initiator's".into());
        }
        Ok(Secret {
            user: user.to_string(),
            secret: secret.as_bytes().to_vec(),
            target: target.map(|(u, s)| (u.to_string(), s.as_bytes().to_vec())),
        })
    }
}

/// Every target's secrets: the file's, and those of the volumes staged
/// with a secret of their own.
#[derive(Debug, Default)]
pub struct Secrets {
    by_target: HashMap<String, Secret>,
    any: Option<Secret>,
    staged: RwLock<HashMap<String, Secret>>,
}

impl Secrets {
    /// Reads a secrets file; the error names the line.
    pub fn load(path: &Path) -> Result<Secrets, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    fn parse(text: &str) -> Result<Secrets, String> {
        let mut out = Secrets::default();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() != 3 && f.len() != 5 {
                return Err(format!(
                    "line {}: want TARGET USER SECRET [TARGET-USER TARGET-SECRET]",
                    n + 1
                ));
            }
            let secret = Secret::new(f[1], f[2], (f.len() == 5).then(|| (f[3], f[4])))
                .map_err(|e| format!("line {}: {e}", n + 1))?;
            if f[0] == "*" {
                out.any = Some(secret);
            } else {
                out.by_target.insert(f[0].to_ascii_lowercase(), secret);
            }
        }
        Ok(out)
    }

    /// Whether every target (and discovery) requires CHAP.
    pub fn covers_all(&self) -> bool {
        self.any.is_some()
    }

    /// The secret a login to `target` (None: a discovery session) needs.
    pub fn for_target(&self, target: Option<&str>) -> Option<Secret> {
        target
            .and_then(|t| self.own(t))
            .or_else(|| self.any.clone())
    }

    /// The secret of `target` itself: staged, or its line in the file.
    pub fn own(&self, target: &str) -> Option<Secret> {
        let t = target.to_ascii_lowercase();
        let staged = self.staged.read().expect("staged secrets");
        staged.get(&t).or_else(|| self.by_target.get(&t)).cloned()
    }

    /// From now on, a login to `target` needs `secret` (a volume staged
    /// with a secret of its own). Sessions logged in already stay.
    pub fn stage(&self, target: &str, secret: Secret) {
        self.staged
            .write()
            .expect("staged secrets")
            .insert(target.to_ascii_lowercase(), secret);
    }

    /// Ends [`Secrets::stage`]: `target` needs what the file says again.
    pub fn unstage(&self, target: &str) {
        self.staged
            .write()
            .expect("staged secrets")
            .remove(&target.to_ascii_lowercase());
    }
}

/// Where a login's authentication stands.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Chap {
    /// No secret for this target: AuthMethod None.
    #[default]
    Off,
    /// CHAP is required and was not agreed yet.
    Wanted(Secret),
    /// AuthMethod=CHAP was agreed; the algorithm comes next.
    Agreed(Secret),
    /// The challenge went out.
    Challenged {
        secret: Secret,
        id: u8,
        challenge: [u8; 16],
    },
    /// The initiator proved it knows the secret.
    Done,
}

fn failed(why: &str) -> Refused {
    Refused {
        status: 0x0201,
        why: format!("CHAP: {why}"),
    }
}

fn md5(id: u8, secret: &[u8], challenge: &[u8]) -> [u8; 16] {
    let mut h = Md5::new();
    h.update([id]);
    h.update(secret);
    h.update(challenge);
    h.finalize().into()
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::from("0x");
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// A `0x`-prefixed hex value (CHAP_R, CHAP_C); base64 is not taken.
fn unhex(v: &str) -> Option<Vec<u8>> {
    let h = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X"))?;
    if h.is_empty() || h.len() % 2 != 0 || h.len() > 2048 {
        return None;
    }
    (0..h.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&h[i..i + 2], 16).ok())
        .collect()
}

impl Chap {
    /// Answers AuthMethod.
    pub fn method(&mut self, offered: &str) -> &'static str {
        let has = |m: &str| offered.split(',').any(|o| o == m);
        match self {
            Chap::Off if has("None") => "None",
            Chap::Wanted(secret) if has("CHAP") => {
                *self = Chap::Agreed(secret.clone());
                "CHAP"
            }
            _ => "Reject",
        }
    }

    /// Answers CHAP_A: MD5 (5) if offered, with the challenge.
    pub fn algorithm(&mut self, offered: &str) -> Result<Vec<(String, String)>, Refused> {
        let Chap::Agreed(secret) = self else {
            return Err(failed("CHAP_A out of turn"));
        };
        if !offered.split(',').any(|a| a == "5") {
            return Err(failed("no MD5 (5) in CHAP_A"));
        }
        let mut random = [0u8; 17];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut random)
            .map_err(|_| failed("no random challenge"))?;
        let (id, mut challenge) = (random[0], [0u8; 16]);
        challenge.copy_from_slice(&random[1..]);
        let answer = vec![
            ("CHAP_A".to_string(), "5".to_string()),
            ("CHAP_I".to_string(), id.to_string()),
            ("CHAP_C".to_string(), hex(&challenge)),
        ];
        *self = Chap::Challenged {
            secret: secret.clone(),
            id,
            challenge,
        };
        Ok(answer)
    }

    /// Checks CHAP_N and CHAP_R; with CHAP_I and CHAP_C (mutual CHAP),
    /// answers the initiator's challenge.
    pub fn response(
        &mut self,
        name: Option<&str>,
        response: Option<&str>,
        their_id: Option<&str>,
        their_challenge: Option<&str>,
    ) -> Result<Vec<(String, String)>, Refused> {
        let Chap::Challenged {
            secret,
            id,
            challenge,
        } = self
        else {
            return Err(failed("a response before the challenge"));
        };
        let (Some(name), Some(response)) = (name, response) else {
            return Err(failed("CHAP_N and CHAP_R come together"));
        };
        let want = md5(*id, &secret.secret, challenge);
        let got = unhex(response).ok_or_else(|| failed("CHAP_R is not 0x-hex"))?;
        // Both checks always run: the answer does not tell which failed.
        let user_ok = name == secret.user;
        if !(user_ok & (got == want)) {
            return Err(failed("wrong user or secret"));
        }
        let mut answer = Vec::new();
        match (their_id, their_challenge) {
            (None, None) => {}
            (Some(i), Some(c)) => {
                let Some((user, target_secret)) = &secret.target else {
                    return Err(failed(
                        "mutual CHAP asked, but this target has no secret of its own",
                    ));
                };
                let i: u8 = i.parse().map_err(|_| failed("CHAP_I is not a byte"))?;
                let c = unhex(c).ok_or_else(|| failed("CHAP_C is not 0x-hex"))?;
                // A reflected challenge would have us answer our own.
                if c == challenge[..] {
                    return Err(failed("the initiator sent back the target's challenge"));
                }
                answer.push(("CHAP_N".to_string(), user.clone()));
                answer.push(("CHAP_R".to_string(), hex(&md5(i, target_secret, &c))));
            }
            _ => return Err(failed("CHAP_I and CHAP_C come together")),
        }
        *self = Chap::Done;
        Ok(answer)
    }

    /// Whether the login may leave the security stage.
    pub fn satisfied(&self) -> bool {
        matches!(self, Chap::Off | Chap::Done)
    }

    /// Whether a CHAP exchange is under way (the security stage goes on
    /// even if the initiator asked to leave it).
    pub fn in_progress(&self) -> bool {
        matches!(self, Chap::Agreed(_) | Chap::Challenged { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "# comment\n\
        iqn.2026-12.dev.strata:vol  alice  alice-secret-12\n\
        *  bob  bob-secret-long  strata  target-secret-1\n";

    fn get<'a>(a: &'a [(String, String)], k: &str) -> &'a str {
        &a.iter().find(|(key, _)| key == k).unwrap().1
    }

    #[test]
    fn secrets_parse_and_refuse_short_or_malformed_lines() {
        let s = Secrets::parse(FILE).unwrap();
        assert_eq!(
            s.for_target(Some("IQN.2026-12.dev.strata:VOL"))
                .unwrap()
                .user,
            "alice"
        );
        assert_eq!(s.for_target(Some("iqn.other")).unwrap().user, "bob");
        assert_eq!(s.for_target(None).unwrap().user, "bob");
        assert!(Secrets::parse("* u short").is_err());
        assert!(Secrets::parse("* u long-enough-secret t short").is_err());
        assert!(Secrets::parse("* u").is_err());
        assert!(!format!("{s:?}").contains("secret-12"), "secrets in Debug");
    }

    /// A staged volume's secret wins over the file's lines until it is
    /// unstaged; names compare without case.
    #[test]
    fn a_staged_secret_wins_until_unstaged() {
        let s = Secrets::parse(FILE).unwrap();
        let own = Secret::new("carol", "carol-secret-1", Some(("t", "target-secret"))).unwrap();
        s.stage("IQN.2026-12.dev.strata:VOL", own.clone());
        assert_eq!(s.for_target(Some("iqn.2026-12.dev.strata:vol")), Some(own));
        assert_eq!(s.for_target(None).unwrap().user, "bob", "discovery keeps *");
        s.unstage("iqn.2026-12.dev.strata:vol");
        assert_eq!(
            s.for_target(Some("iqn.2026-12.dev.strata:vol"))
                .unwrap()
                .user,
            "alice"
        );
        let none = Secrets::default();
        none.stage("iqn.x", Secret::new("u", "long-enough-1", None).unwrap());
        assert!(none.for_target(Some("iqn.y")).is_none());
        assert!(Secret::new("", "long-enough-1", None).is_err());
        assert!(Secret::new("u", "long-enough-1", Some(("t", "short"))).is_err());
        assert!(Secret::new("u", "long-enough-1", Some(("t", "long-enough-1"))).is_err());
        assert!(Secret::new("u", "long-enough-1\n", None).is_err());
        assert!(Secret::new("u", " long-enough-1", None).is_err());
        assert!(Secret::new("u", &"x".repeat(256), None).is_err());
        assert!(Secret::new("u", &"x".repeat(255), None).is_ok());
    }

    #[test]
    fn chap_and_mutual_chap_prove_both_sides() {
        let s = Secrets::parse(FILE).unwrap();
        let mut chap = Chap::Wanted(s.for_target(None).unwrap().clone());
        assert!(chap.algorithm("5").is_err(), "CHAP_A before AuthMethod");
        assert_eq!(chap.method("CHAP,None"), "CHAP");
        assert!(chap.in_progress());
        assert!(chap.algorithm("7").is_err());
        let a = chap.algorithm("7,5").unwrap();
        let id: u8 = get(&a, "CHAP_I").parse().unwrap();
        let c = unhex(get(&a, "CHAP_C")).unwrap();
        let good = hex(&md5(id, b"bob-secret-long", &c));
        // Wrong secret, wrong user: refused with 0x0201.
        let mut wrong = chap.clone();
        let bad = hex(&md5(id, b"not-the-secret", &c));
        assert_eq!(
            wrong
                .response(Some("bob"), Some(&bad), None, None)
                .unwrap_err()
                .status,
            0x0201
        );
        let mut wrong = chap.clone();
        assert!(
            wrong
                .response(Some("eve"), Some(&good), None, None)
                .is_err()
        );
        // A reflected challenge is refused.
        let mut reflect = chap.clone();
        let r = reflect.response(Some("bob"), Some(&good), Some("1"), Some(get(&a, "CHAP_C")));
        assert!(r.is_err());
        // Mutual: the target answers the initiator's challenge with its own secret.
        let answer = chap
            .response(
                Some("bob"),
                Some(&good),
                Some("9"),
                Some("0x0102030405060708"),
            )
            .unwrap();
        assert_eq!(get(&answer, "CHAP_N"), "strata");
        let want = hex(&md5(9, b"target-secret-1", &[1, 2, 3, 4, 5, 6, 7, 8]));
        assert_eq!(get(&answer, "CHAP_R"), want);
        assert!(chap.satisfied());
        // Without a secret, only None is agreed.
        assert_eq!(Chap::Off.method("CHAP"), "Reject");
        let mut refused = Chap::Wanted(s.for_target(None).unwrap().clone());
        assert_eq!(refused.method("None"), "Reject");
        assert!(!refused.in_progress() && !refused.satisfied());
        assert!(!Chap::Wanted(s.for_target(None).unwrap().clone()).satisfied());
    }
}
