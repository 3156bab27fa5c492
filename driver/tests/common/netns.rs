//! Network namespaces for tests that give each process its own network:
//! one namespace per member, joined by veth pairs to a bridge in a hub
//! namespace, on 10.250.0.0/24 (which exists only inside these
//! namespaces). Nothing here sends a packet from the root namespace: code
//! that talks to a member's address runs in a member's namespace
//! ([`Net::run_in`]). Dropping the [`Net`] deletes every namespace it made.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The namespaces of one test.
pub struct Net {
    prefix: String,
    members: Vec<String>,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Net {
    /// One namespace per name, each with `eth0` at `10.250.0.<i+1>`.
    pub fn new(names: &[&str]) -> Net {
        let prefix = format!("st{}", std::process::id());
        let mut net = Net {
            prefix,
            members: Vec::new(),
        };
        let hub = net.ns("hub");
        ip(&["netns", "add", &hub]);
        ip(&["-n", &hub, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &hub, "link", "set", "br0", "up"]);
        for (i, name) in names.iter().enumerate() {
            let ns = net.ns(name);
            ip(&["netns", "add", &ns]);
            net.members.push(name.to_string());
            let port = format!("p{i}");
            ip(&[
                "-n", &hub, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
                &ns,
            ]);
            ip(&["-n", &hub, "link", "set", &port, "master", "br0", "up"]);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/24", net.addr(name)),
                "dev",
                "eth0",
            ]);
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
        }
        net
    }

    fn ns(&self, name: &str) -> String {
        format!("{}-{name}", self.prefix)
    }

    fn index(&self, name: &str) -> usize {
        self.members
            .iter()
            .position(|m| m == name)
            .unwrap_or_else(|| panic!("no member {name}"))
    }

    /// The member's address.
    pub fn addr(&self, name: &str) -> String {
        format!("10.250.0.{}", self.index(name) + 1)
    }

    /// The namespace file a process joins (`setns`).
    pub fn path(&self, name: &str) -> PathBuf {
        Path::new("/run/netns").join(self.ns(name))
    }

    /// Takes the member's link down (a partition) or up again.
    pub fn link(&self, name: &str, up: bool) {
        let port = format!("p{}", self.index(name));
        ip(&[
            "-n",
            &self.ns("hub"),
            "link",
            "set",
            &port,
            if up { "up" } else { "down" },
        ]);
    }

    /// Limits the member's link to `rate` (e.g. `40mbit`) both ways with
    /// `tc tbf`.
    pub fn limit(&self, name: &str, rate: &str) {
        let port = format!("p{}", self.index(name));
        for (ns, dev) in [(self.ns("hub"), port.as_str()), (self.ns(name), "eth0")] {
            let out = Command::new("ip")
                .args(["netns", "exec", &ns, "tc", "qdisc", "replace", "dev", dev])
                .args([
                    "root", "tbf", "rate", rate, "burst", "64kb", "latency", "200ms",
                ])
                .output()
                .expect("tc");
            assert!(
                out.status.success(),
                "tc on {dev} in {ns}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    /// Runs `f` on a thread inside the member's network namespace.
    pub fn run_in<T: Send + 'static>(
        &self,
        name: &str,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> T {
        in_ns(&self.path(name), f)
    }
}

/// Runs `f` on a thread inside the network namespace of file `ns`.
pub fn in_ns<T: Send + 'static>(ns: &Path, f: impl FnOnce() -> T + Send + 'static) -> T {
    let file = std::fs::File::open(ns).unwrap();
    std::thread::spawn(move || {
        // SAFETY: setns on this new thread only, with a namespace file it
        // holds open.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .unwrap()
}

impl Drop for Net {
    fn drop(&mut self) {
        for name in self.members.iter().map(String::as_str).chain(["hub"]) {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.ns(name)])
                .output();
        }
    }
}

/// Whether this machine can make the namespaces (root, `ip`, `tc`, veth).
pub fn available() -> Result<(), String> {
    super::require(super::is_root(), "needs root for network namespaces")?;
    super::require_tools(&["ip", "tc"])?;
    let probe = format!("st{}-probe", std::process::id());
    let ok = Command::new("ip")
        .args(["netns", "add", &probe])
        .status()
        .is_ok_and(|s| s.success());
    let _ = Command::new("ip").args(["netns", "del", &probe]).status();
    super::require(ok, "`ip netns add` fails here")
}
