//! Generic netlink, as much as configuring the kernel's nbd driver needs:
//! building messages and attributes, resolving a family by name, and a
//! request that waits for the kernel's acknowledgement.
//!
//! ```text
//! nlmsghdr (16) │ genlmsghdr (4) │ nlattr (4) payload pad4 │ nlattr ...
//! ```

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;

const NLMSG_HDR: usize = 16;
const GENL_HDR: usize = 4;

fn align4(n: usize) -> usize {
    n.div_ceil(4) * 4
}

/// Netlink attributes being built.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Attrs(Vec<u8>);

impl Attrs {
    fn put(&mut self, ty: u16, payload: &[u8]) -> &mut Self {
        let len = 4 + payload.len();
        self.0.extend_from_slice(&(len as u16).to_ne_bytes());
        self.0.extend_from_slice(&ty.to_ne_bytes());
        self.0.extend_from_slice(payload);
        self.0.resize(align4(self.0.len()), 0);
        self
    }

    pub fn u32(&mut self, ty: u16, v: u32) -> &mut Self {
        self.put(ty, &v.to_ne_bytes())
    }

    pub fn u64(&mut self, ty: u16, v: u64) -> &mut Self {
        self.put(ty, &v.to_ne_bytes())
    }

    /// A NUL-terminated string.
    pub fn string(&mut self, ty: u16, s: &str) -> &mut Self {
        let mut b = s.as_bytes().to_vec();
        b.push(0);
        self.put(ty, &b)
    }

    /// A nested attribute whose contents `f` builds.
    pub fn nested(&mut self, ty: u16, f: impl FnOnce(&mut Attrs)) -> &mut Self {
        let mut inner = Attrs::default();
        f(&mut inner);
        self.put(ty, &inner.0)
    }

    pub fn bytes(&self) -> &[u8] {
        &self.0
    }
}

/// A generic netlink request: headers and attributes.
pub fn message(family: u16, seq: u32, cmd: u8, version: u8, attrs: &Attrs) -> Vec<u8> {
    let len = NLMSG_HDR + GENL_HDR + attrs.0.len();
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&family.to_ne_bytes());
    m.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes()); // port: the kernel fills it
    m.push(cmd);
    m.push(version);
    m.extend_from_slice(&0u16.to_ne_bytes());
    m.extend_from_slice(&attrs.0);
    m
}

/// The attributes in `b`, as (type, payload); stops at anything malformed.
pub fn parse_attrs(b: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + 4 <= b.len() {
        let len = u16::from_ne_bytes([b[at], b[at + 1]]) as usize;
        let ty = u16::from_ne_bytes([b[at + 2], b[at + 3]]) & 0x3fff;
        if len < 4 || at + len > b.len() {
            break;
        }
        out.push((ty, &b[at + 4..at + len]));
        at += align4(len);
    }
    out
}

/// A generic netlink socket.
#[derive(Debug)]
pub struct Genl {
    fd: OwnedFd,
    seq: u32,
}

impl Genl {
    pub fn open() -> std::io::Result<Genl> {
        // SAFETY: socket(2) with constant arguments; the result is checked.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_GENERIC,
            )
        };
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a descriptor we just created and own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let tv = libc::timeval {
            tv_sec: 10,
            tv_usec: 0,
        };
        // SAFETY: SO_RCVTIMEO takes a timeval, passed with its size.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        Ok(Genl { fd, seq: 1 })
    }

    /// The ID of generic netlink family `name`, or `None` if the kernel has
    /// no such family (its module is not loaded, or not built).
    pub fn family(&mut self, name: &str) -> std::io::Result<Option<u16>> {
        let mut attrs = Attrs::default();
        attrs.string(CTRL_ATTR_FAMILY_NAME, name);
        match self.call(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, 1, &attrs) {
            Ok(replies) => Ok(replies.iter().find_map(|r| {
                parse_attrs(r)
                    .into_iter()
                    .find(|(t, p)| *t == CTRL_ATTR_FAMILY_ID && p.len() >= 2)
                    .map(|(_, p)| u16::from_ne_bytes([p[0], p[1]]))
            })),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Sends one request and returns the attribute payloads of the replies
    /// that came before the kernel's acknowledgement; a negative
    /// acknowledgement is the error.
    pub fn call(
        &mut self,
        family: u16,
        cmd: u8,
        version: u8,
        attrs: &Attrs,
    ) -> std::io::Result<Vec<Vec<u8>>> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let msg = message(family, seq, cmd, version, attrs);
        // SAFETY: an all-zero sockaddr_nl addresses the kernel.
        let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        kernel.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: valid buffer and address for the duration of the call.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                0,
                (&kernel as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut replies = Vec::new();
        let mut buf = vec![0u8; 64 << 10];
        loop {
            // SAFETY: `buf` is a valid writable buffer.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let mut at = 0;
            let n = n as usize;
            while at + NLMSG_HDR <= n {
                let b = &buf[at..n];
                let len = u32::from_ne_bytes(b[0..4].try_into().expect("4")) as usize;
                let ty = u16::from_ne_bytes([b[4], b[5]]);
                let rseq = u32::from_ne_bytes(b[8..12].try_into().expect("4"));
                if len < NLMSG_HDR || len > b.len() {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "malformed netlink reply",
                    ));
                }
                if rseq == seq {
                    match ty {
                        NLMSG_ERROR => {
                            let code = i32::from_ne_bytes(b[16..20].try_into().expect("4"));
                            if code == 0 {
                                return Ok(replies);
                            }
                            return Err(std::io::Error::from_raw_os_error(-code));
                        }
                        NLMSG_DONE => return Ok(replies),
                        _ if len >= NLMSG_HDR + GENL_HDR => {
                            replies.push(b[NLMSG_HDR + GENL_HDR..len].to_vec());
                        }
                        _ => {}
                    }
                }
                at += align4(len);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_are_padded_and_nest() {
        let mut a = Attrs::default();
        a.u32(1, 7).string(2, "nbd").nested(7, |n| {
            n.nested(1, |s| {
                s.u32(1, 3);
            });
        });
        let b = a.bytes();
        // u32: 8 bytes; "nbd\0": 4 + 4 = 8; nest(nest(u32)) = 4 + 4 + 8 = 16.
        assert_eq!(b.len(), 32);
        assert_eq!(&b[0..4], &[8, 0, 1, 0]);
        assert_eq!(&b[12..16], b"nbd\0");
        let top = parse_attrs(b);
        assert_eq!(top.len(), 3);
        assert_eq!(top[1], (2, &b"nbd\0"[..]));
        let inner = parse_attrs(top[2].1);
        assert_eq!(inner.len(), 1);
        assert_eq!(
            parse_attrs(inner[0].1),
            vec![(1u16, &3u32.to_ne_bytes()[..])]
        );
        // Truncated input stops parsing instead of reading past the end.
        assert_eq!(parse_attrs(&b[..6]).len(), 0);
    }

    #[test]
    fn message_headers_carry_length_family_and_command() {
        let mut a = Attrs::default();
        a.u32(1, 5);
        let m = message(0x1c, 9, 3, 1, &a);
        assert_eq!(m.len(), 16 + 4 + 8);
        assert_eq!(u32::from_ne_bytes(m[0..4].try_into().unwrap()), 28);
        assert_eq!(u16::from_ne_bytes([m[4], m[5]]), 0x1c);
        assert_eq!(u16::from_ne_bytes([m[6], m[7]]), NLM_F_REQUEST | NLM_F_ACK);
        assert_eq!(u32::from_ne_bytes(m[8..12].try_into().unwrap()), 9);
        assert_eq!((m[16], m[17]), (3, 1));
    }

    /// Against the running kernel: the controller family always exists;
    /// a made-up one does not.
    #[test]
    fn families_resolve_against_the_kernel() {
        let mut g = Genl::open().expect("netlink socket");
        assert_eq!(g.family("nlctrl").unwrap(), Some(GENL_ID_CTRL));
        assert_eq!(g.family("strata-nofam").unwrap(), None);
    }
}
