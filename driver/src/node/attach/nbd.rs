//! The kernel nbd backend, configured over generic netlink.
//!
//! ```text
//! attach:  a socket pair to our NBD server, negotiated (NBD_OPT_GO, simple replies)
//!          ─▶ NBD_CMD_CONNECT {size, 4096-byte blocks, server flags, dead-connection
//!             timeout, backend = volume ID, sockets} ─▶ the kernel answers /dev/nbdN
//! restart: the kernel keeps /dev/nbdN waiting (dead-connection timeout) ─▶ new sockets
//!          ─▶ NBD_CMD_RECONFIGURE {index, backend, dead-connection timeout, sockets}
//! resize:  NBD_CMD_RECONFIGURE {index, backend, size}
//! detach:  NBD_CMD_DISCONNECT {index}
//! ```
//!
//! Once it serves every device again, a running node writes
//! `nbd-heartbeat` in its state directory every second: the boot, the
//! time on the boot clock and the dead-connection timeout in force. When
//! the next start comes later than that timeout, the kernel may have
//! failed I/O in between: the devices are served again but reported broken
//! (as a lost FUSE connection is), and stay reported so across later
//! restarts until unstaged.
//!
//! The development machines have no nbd module: `e2e/vm/suite` runs
//! the node tests against this backend in a VM with Debian's kernel.

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{Attach, Attached, Handle, Kind, SECTOR_SIZE};
use crate::engine::VolumeId;
use crate::frontend::Export;
use crate::frontend::nbd::{NbdServer, client};
use crate::node::error::{Error, Result, io};
use crate::node::netlink::{Attrs, Genl, parse_attrs};
use crate::node::state::StagedRecord;

const NBD_GENL_VERSION: u8 = 1;
const NBD_CMD_CONNECT: u8 = 1;
const NBD_CMD_DISCONNECT: u8 = 2;
const NBD_CMD_RECONFIGURE: u8 = 3;
const NBD_ATTR_INDEX: u16 = 1;
const NBD_ATTR_SIZE_BYTES: u16 = 2;
const NBD_ATTR_BLOCK_SIZE_BYTES: u16 = 3;
const NBD_ATTR_TIMEOUT: u16 = 4;
const NBD_ATTR_SERVER_FLAGS: u16 = 5;
const NBD_ATTR_SOCKETS: u16 = 7;
const NBD_ATTR_DEAD_CONN_TIMEOUT: u16 = 8;
const NBD_ATTR_BACKEND_IDENTIFIER: u16 = 10;
const NBD_SOCK_ITEM: u16 = 1;
const NBD_SOCK_FD: u16 = 1;

/// How long the kernel keeps a device whose server went away waiting for
/// new sockets before failing its I/O, unless the node says otherwise
/// (`--nbd-dead-timeout`): long enough for a node plugin to be restarted
/// (or its pod rescheduled onto the same node).
pub const DEAD_CONN_TIMEOUT_SECS: u64 = 600;
/// Connections per device. One: with no per-request timeout and one
/// connection the kernel never gives up on a live server (a slow flush
/// only logs "possible stuck request"). With several, it takes a request
/// that waits longer than 30 s as a dead connection, resends it on another
/// one while the first may still run, and never reconnects the first until
/// a restart. Our server runs several requests of one connection at once.
const CONNECTIONS: usize = 1;

fn sockets(attrs: &mut Attrs, fds: &[RawFd]) {
    attrs.nested(NBD_ATTR_SOCKETS, |s| {
        for fd in fds {
            s.nested(NBD_SOCK_ITEM, |item| {
                item.u32(NBD_SOCK_FD, *fd as u32);
            });
        }
    });
}

/// Attributes of `NBD_CMD_CONNECT`: a new device of `size` bytes over
/// `fds`, with no per-request timeout (with one connection, a live server
/// is never given up on) and the dead-connection timeout that lets it
/// survive a restart.
pub fn connect_attrs(
    size: u64,
    server_flags: u16,
    fds: &[RawFd],
    backend: &str,
    dead_secs: u64,
) -> Attrs {
    let mut a = Attrs::default();
    a.u64(NBD_ATTR_SIZE_BYTES, size)
        .u64(NBD_ATTR_BLOCK_SIZE_BYTES, u64::from(SECTOR_SIZE))
        .u64(NBD_ATTR_SERVER_FLAGS, u64::from(server_flags))
        .u64(NBD_ATTR_TIMEOUT, 0)
        .u64(NBD_ATTR_DEAD_CONN_TIMEOUT, dead_secs)
        .string(NBD_ATTR_BACKEND_IDENTIFIER, backend);
    sockets(&mut a, fds);
    a
}

/// What a reconfigure changes.
pub enum Change<'a> {
    /// New sockets after a restart, and this process's dead-connection
    /// timeout.
    Sockets { fds: &'a [RawFd], dead_secs: u64 },
    /// A new size after an expansion.
    Size(u64),
}

/// Attributes of `NBD_CMD_RECONFIGURE` for device `index`. The kernel
/// refuses a reconfigure of a device connected with a backend identifier
/// unless it names the same one ("must specify backend").
pub fn reconfigure_attrs(index: u32, backend: &str, change: Change<'_>) -> Attrs {
    let mut a = Attrs::default();
    a.u32(NBD_ATTR_INDEX, index)
        .string(NBD_ATTR_BACKEND_IDENTIFIER, backend);
    match change {
        Change::Sockets { fds, dead_secs } => {
            a.u64(NBD_ATTR_DEAD_CONN_TIMEOUT, dead_secs);
            sockets(&mut a, fds);
        }
        Change::Size(size) => {
            a.u64(NBD_ATTR_SIZE_BYTES, size);
        }
    }
    a
}

/// Attributes of `NBD_CMD_DISCONNECT` for device `index`.
pub fn disconnect_attrs(index: u32) -> Attrs {
    let mut a = Attrs::default();
    a.u32(NBD_ATTR_INDEX, index);
    a
}

/// The backend identifier device `index` was connected with, if any. The
/// kernel keeps it until the device's last user lets go, so a device
/// disconnected while something held it open can still show it.
fn backend_of(index: u32) -> Option<String> {
    std::fs::read_to_string(format!("/sys/block/nbd{index}/backend"))
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// Every nbd device whose backend identifier is `backend`, lowest first.
fn devices_of(backend: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    let mut out: Vec<u32> = dir
        .filter_map(|e| {
            let name = e.ok()?.file_name();
            let index: u32 = name.to_str()?.strip_prefix("nbd")?.parse().ok()?;
            (backend_of(index)? == backend).then_some(index)
        })
        .collect();
    out.sort_unstable();
    out
}

/// The nbd device index of a `/dev/nbdN` path.
fn index_of(device: &Path) -> Option<u32> {
    device.to_str()?.strip_prefix("/dev/nbd")?.parse().ok()
}

/// What a running node writes to its heartbeat file every second: when
/// (`CLOCK_BOOTTIME`, which counts as the kernel's timers do, also across
/// a suspend, and never steps), in which boot, and with which
/// dead-connection timeout the devices were configured.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Beat {
    boot_id: String,
    boottime: Duration,
    dead_secs: u64,
}

impl Beat {
    fn now(dead_secs: u64) -> Beat {
        Beat {
            boot_id: boot_id(),
            boottime: boottime(),
            dead_secs,
        }
    }

    fn encode(&self) -> String {
        format!(
            "{} {} {}\n",
            self.boot_id,
            self.boottime.as_millis(),
            self.dead_secs
        )
    }

    fn decode(s: &str) -> Option<Beat> {
        let mut f = s.split_whitespace();
        let boot_id = f.next()?.to_string();
        let ms: u64 = f.next()?.parse().ok()?;
        let dead_secs = f.next()?.parse().ok()?;
        Some(Beat {
            boot_id,
            boottime: Duration::from_millis(ms),
            dead_secs,
        })
    }

    /// How long nothing served the devices before `now`, if that was
    /// longer than the timeout the kernel had then (so it may have failed
    /// I/O): `None` when the gap was shorter, or the beat is of another
    /// boot (whose devices are gone).
    fn missed(&self, now: &Beat) -> Option<Duration> {
        if self.boot_id != now.boot_id {
            return None;
        }
        let gap = now.boottime.saturating_sub(self.boottime);
        (gap > Duration::from_secs(self.dead_secs)).then_some(gap)
    }
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn boottime() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Attaches volumes through the kernel's nbd driver.
#[derive(Debug)]
pub struct NbdAttach {
    server: Arc<NbdServer>,
    family: u16,
    /// The dead-connection timeout given to the kernel, in seconds.
    dead_secs: u64,
    /// The heartbeat file.
    heartbeat: PathBuf,
    /// The last beat of the process before this one, if one ran.
    predecessor: Option<Beat>,
    genl: Mutex<Option<Genl>>,
}

/// How often a running node touches its heartbeat file.
const HEARTBEAT: Duration = Duration::from_secs(1);

impl NbdAttach {
    /// `state_dir` keeps the heartbeat by which the next start learns how
    /// long nothing served the devices.
    pub fn new(
        server: Arc<NbdServer>,
        family: u16,
        dead_secs: u64,
        state_dir: &Path,
    ) -> Result<Self> {
        let heartbeat = state_dir.join("nbd-heartbeat");
        let predecessor = std::fs::read_to_string(&heartbeat)
            .ok()
            .and_then(|s| Beat::decode(&s));
        Ok(NbdAttach {
            server,
            family,
            dead_secs,
            heartbeat,
            predecessor,
            genl: Mutex::new(None),
        })
    }

    fn beat(path: &Path, dead_secs: u64) -> std::io::Result<()> {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, Beat::now(dead_secs).encode())?;
        std::fs::rename(&tmp, path)
    }

    fn call(&self, cmd: u8, attrs: &Attrs) -> Result<Vec<Vec<u8>>> {
        let mut g = self.genl.lock().expect("netlink socket");
        if g.is_none() {
            *g = Some(Genl::open().map_err(io("open netlink", "nbd"))?);
        }
        let genl = g.as_mut().expect("opened above");
        genl.call(self.family, cmd, NBD_GENL_VERSION, attrs)
            .map_err(io("configure the kernel nbd driver", "nbd"))
    }

    /// Makes our NBD server serve `export` by its name: a volume of
    /// another node is added to its exports (the pool's are there).
    fn serve(&self, export: Export) {
        if let Export::Remote(r) = export {
            self.server.exports().add_remote(r);
        }
    }

    /// Negotiated sockets for `volume`, served by our NBD server.
    fn connect(&self, volume: VolumeId) -> Result<(Vec<UnixStream>, client::ExportInfo)> {
        let mut out = Vec::new();
        let mut info = None;
        for _ in 0..CONNECTIONS {
            let mut s = self
                .server
                .connect_local()
                .map_err(io("connect to the NBD server for", volume.to_string()))?;
            info = Some(
                client::negotiate(&mut s, &volume.to_string())
                    .map_err(io("negotiate NBD for", volume.to_string()))?,
            );
            out.push(s);
        }
        Ok((out, info.expect("at least one connection")))
    }
}

impl Attach for NbdAttach {
    fn kind(&self) -> Kind {
        Kind::Nbd
    }

    fn attach(&self, vid: VolumeId, export: Export, _rec: &StagedRecord) -> Result<Attached> {
        // A device left with this backend (disconnected while something
        // held it open): disconnect it again, so only one ever names it.
        self.detach(vid)?;
        self.serve(export);
        let (socks, info) = self.connect(vid)?;
        let fds: Vec<RawFd> = socks.iter().map(|s| s.as_raw_fd()).collect();
        let replies = self.call(
            NBD_CMD_CONNECT,
            &connect_attrs(
                info.size,
                info.flags,
                &fds,
                &vid.to_string(),
                self.dead_secs,
            ),
        )?;
        // The kernel took its own references to the sockets.
        drop(socks);
        let index = replies
            .iter()
            .flat_map(|r| parse_attrs(r))
            .find(|(t, p)| *t == NBD_ATTR_INDEX && p.len() == 4)
            .map(|(_, p)| u32::from_ne_bytes(p.try_into().expect("4 bytes")))
            .ok_or_else(|| {
                Error::Unavailable("the kernel did not say which nbd device it made".into())
            })?;
        Ok(Attached {
            device: PathBuf::from(format!("/dev/nbd{index}")),
            handle: Handle::Nbd {
                index,
                backend: vid.to_string(),
            },
        })
    }

    fn resume(&self, vid: VolumeId, export: Export, rec: &StagedRecord) -> Result<Attached> {
        let backend = vid.to_string();
        // The device the record names, if it still carries this volume.
        let index = rec
            .device
            .as_deref()
            .and_then(index_of)
            .filter(|i| backend_of(*i).as_deref() == Some(backend.as_str()))
            .ok_or_else(|| {
                Error::Unavailable(format!(
                    "{} no longer carries volume {vid} (disconnected, or the node rebooted); \
                     unpublish and unstage it to attach it again",
                    rec.device
                        .as_deref()
                        .map_or("no nbd device".into(), |d| d.display().to_string())
                ))
            })?;
        self.serve(export);
        let (socks, _) = self.connect(vid)?;
        let fds: Vec<RawFd> = socks.iter().map(|s| s.as_raw_fd()).collect();
        self.call(
            NBD_CMD_RECONFIGURE,
            &reconfigure_attrs(
                index,
                &backend,
                Change::Sockets {
                    fds: &fds,
                    dead_secs: self.dead_secs,
                },
            ),
        )?;
        Ok(Attached {
            device: PathBuf::from(format!("/dev/nbd{index}")),
            handle: Handle::Nbd { index, backend },
        })
    }

    fn missed(&self) -> Option<String> {
        let before = self.predecessor.as_ref()?;
        let gap = before.missed(&Beat::now(self.dead_secs))?;
        Some(format!(
            "nothing served its nbd device for {} s, longer than the kernel's dead-connection \
             timeout then ({} s): I/O in that time may have failed; unpublish and unstage it \
             to attach it again",
            gap.as_secs(),
            before.dead_secs
        ))
    }

    fn serving(&self) -> Result<()> {
        let (path, dead_secs) = (self.heartbeat.clone(), self.dead_secs);
        Self::beat(&path, dead_secs).map_err(io("write", &path))?;
        std::thread::Builder::new()
            .name("nbd-heartbeat".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(HEARTBEAT);
                    if let Err(e) = Self::beat(&path, dead_secs) {
                        tracing::warn!(error = %e, "writing the nbd heartbeat failed");
                    }
                }
            })
            .map_err(io("start the heartbeat for", &self.heartbeat))?;
        Ok(())
    }

    fn resize(&self, attached: &Attached, size: u64) -> Result<()> {
        let Handle::Nbd { index, backend } = &attached.handle else {
            return Err(Error::InvalidArgument("not an nbd attachment".into()));
        };
        self.call(
            NBD_CMD_RECONFIGURE,
            &reconfigure_attrs(*index, backend, Change::Size(size)),
        )
        .map(drop)
    }

    fn detach(&self, volume: VolumeId) -> Result<()> {
        for index in devices_of(&volume.to_string()) {
            self.call(NBD_CMD_DISCONNECT, &disconnect_attrs(index))?;
        }
        self.server.exports().remove_remote(&volume.to_string());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u64_of(p: &[u8]) -> u64 {
        u64::from_ne_bytes(p.try_into().unwrap())
    }

    #[test]
    fn connect_carries_size_block_size_flags_timeouts_backend_and_every_socket() {
        let a = connect_attrs(10 << 30, 0x15d, &[7, 9], "vol-1", DEAD_CONN_TIMEOUT_SECS);
        let attrs = parse_attrs(a.bytes());
        let get = |t: u16| attrs.iter().find(|(ty, _)| *ty == t).map(|(_, p)| *p);
        assert_eq!(u64_of(get(NBD_ATTR_SIZE_BYTES).unwrap()), 10 << 30);
        assert_eq!(u64_of(get(NBD_ATTR_BLOCK_SIZE_BYTES).unwrap()), 4096);
        assert_eq!(u64_of(get(NBD_ATTR_SERVER_FLAGS).unwrap()), 0x15d);
        assert_eq!(u64_of(get(NBD_ATTR_TIMEOUT).unwrap()), 0);
        assert_eq!(
            u64_of(get(NBD_ATTR_DEAD_CONN_TIMEOUT).unwrap()),
            DEAD_CONN_TIMEOUT_SECS
        );
        assert_eq!(get(NBD_ATTR_BACKEND_IDENTIFIER).unwrap(), b"vol-1\0");
        assert!(get(NBD_ATTR_INDEX).is_none(), "the kernel picks the device");
        let items = parse_attrs(get(NBD_ATTR_SOCKETS).unwrap());
        let fds: Vec<u32> = items
            .iter()
            .map(|(t, item)| {
                assert_eq!(*t, NBD_SOCK_ITEM);
                let inner = parse_attrs(item);
                assert_eq!(inner[0].0, NBD_SOCK_FD);
                u32::from_ne_bytes(inner[0].1.try_into().unwrap())
            })
            .collect();
        assert_eq!(fds, vec![7, 9]);
    }

    #[test]
    fn a_gap_counts_against_the_timeout_in_force_then_and_only_in_the_same_boot() {
        let then = Beat {
            boot_id: "b1".into(),
            boottime: Duration::from_secs(100),
            dead_secs: 600,
        };
        assert_eq!(Beat::decode(&then.encode()), Some(then.clone()));
        assert_eq!(Beat::decode("garbage"), None);
        let at = |secs, dead_secs| Beat {
            boot_id: "b1".into(),
            boottime: Duration::from_secs(secs),
            dead_secs,
        };
        // The process now has a 2 s timeout, but the kernel had 600 then.
        assert_eq!(then.missed(&at(110, 2)), None);
        assert_eq!(then.missed(&at(700, 2)), None, "exactly the timeout");
        assert_eq!(then.missed(&at(701, 2)), Some(Duration::from_secs(601)));
        let short = Beat {
            dead_secs: 2,
            ..then.clone()
        };
        assert_eq!(short.missed(&at(103, 600)), Some(Duration::from_secs(3)));
        // Another boot: its devices are gone, nothing to report here.
        let rebooted = Beat {
            boot_id: "b2".into(),
            ..at(5000, 600)
        };
        assert_eq!(then.missed(&rebooted), None);
        // A boot clock before the beat (never, but not a panic).
        assert_eq!(then.missed(&at(50, 600)), None);
        assert_eq!(index_of(Path::new("/dev/nbd12")), Some(12));
        assert_eq!(index_of(Path::new("/dev/loop1")), None);
    }

    #[test]
    fn reconfigure_and_disconnect_name_the_device() {
        let r = reconfigure_attrs(
            3,
            "vol-a",
            Change::Sockets {
                fds: &[11],
                dead_secs: 7,
            },
        );
        let attrs = parse_attrs(r.bytes());
        assert_eq!(attrs[0], (NBD_ATTR_INDEX, &3u32.to_ne_bytes()[..]));
        // The kernel refuses a reconfigure without the connect's backend.
        assert_eq!(attrs[1], (NBD_ATTR_BACKEND_IDENTIFIER, &b"vol-a\0"[..]));
        // This process's timeout applies from now on.
        assert_eq!(attrs[2].0, NBD_ATTR_DEAD_CONN_TIMEOUT);
        assert_eq!(u64_of(attrs[2].1), 7);
        assert_eq!(attrs[3].0, NBD_ATTR_SOCKETS);
        assert_eq!(attrs.len(), 4, "no size: the device keeps its size");
        let grow = reconfigure_attrs(3, "vol-a", Change::Size(1 << 40));
        let attrs = parse_attrs(grow.bytes());
        assert_eq!(attrs.len(), 3, "index, backend and size, no sockets");
        assert_eq!(attrs[1].0, NBD_ATTR_BACKEND_IDENTIFIER);
        assert_eq!(u64_of(attrs[2].1), 1 << 40);
        let d = disconnect_attrs(5);
        assert_eq!(
            parse_attrs(d.bytes()),
            vec![(NBD_ATTR_INDEX, &5u32.to_ne_bytes()[..])]
        );
    }
}
