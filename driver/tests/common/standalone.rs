//! A `strata standalone` process for end-to-end tests: started in a
//! temporary directory, stopped (or killed) on demand, its CLI and NBD
//! URIs at hand.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

pub struct Standalone {
    pub dir: tempfile::TempDir,
    child: Option<Child>,
    pub metrics_port: u16,
    /// Also serve NBD on this loopback TCP port.
    pub nbd_tcp_port: Option<u16>,
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Standalone {
    pub fn start() -> Standalone {
        Self::start_with_tcp(false)
    }

    /// Starts a server that, with `tcp`, also serves NBD on loopback TCP.
    pub fn start_with_tcp(tcp: bool) -> Standalone {
        let dir = tempfile::tempdir().unwrap();
        let nbd_tcp_port = tcp.then(free_port);
        let mut s = Standalone {
            dir,
            child: None,
            metrics_port: free_port(),
            nbd_tcp_port,
        };
        s.spawn();
        s
    }

    pub fn pool(&self) -> PathBuf {
        self.dir.path().join("pool")
    }

    pub fn csi_socket(&self) -> PathBuf {
        self.dir.path().join("csi.sock")
    }

    pub fn nbd_socket(&self) -> PathBuf {
        self.dir.path().join("nbd.sock")
    }

    /// The node's state directory (records, FUSE mountpoints, fd holder).
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// Where tests put staging and target paths, as kubelet would.
    pub fn kubelet_dir(&self) -> PathBuf {
        self.dir.path().join("kubelet")
    }

    /// (Re)starts the server and waits until it answers.
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("strata.log"))
            .unwrap();
        let tcp: Vec<String> = self
            .nbd_tcp_port
            .map(|port| vec!["--nbd-listen".into(), format!("tcp://127.0.0.1:{port}")])
            .unwrap_or_default();
        let child = Command::new(env!("CARGO_BIN_EXE_strata"))
            .arg("standalone")
            .arg("--pool")
            .arg(self.pool())
            .arg("--csi-endpoint")
            .arg(format!("unix://{}", self.csi_socket().display()))
            .arg("--nbd-listen")
            .arg(format!("unix://{}", self.nbd_socket().display()))
            .arg("--metrics-listen")
            .arg(format!("127.0.0.1:{}", self.metrics_port))
            .arg("--node-id")
            .arg("test-node")
            .arg("--state-dir")
            .arg(self.state_dir())
            .args(&tcp)
            .env(
                "STRATA_LOG",
                std::env::var("STRATA_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self.csi_socket().exists() && self.cli(&["volume", "list"]).status.success() {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "strata standalone exited at start ({status}):\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("strata standalone did not become ready:\n{}", self.log());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("strata.log")).unwrap_or_default()
    }

    /// Runs the `strata` CLI against this server.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_strata"))
            .args(args)
            .env(
                "STRATA_CSI_ENDPOINT",
                format!("unix://{}", self.csi_socket().display()),
            )
            .output()
            .unwrap()
    }

    /// Runs the CLI with `-o json` and parses its output.
    pub fn cli_json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        let out = self.cli(&all);
        assert!(
            out.status.success(),
            "strata {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Creates a volume and returns its ID.
    pub fn create_volume(&self, name: &str, size: &str) -> String {
        let v = self.cli_json(&["volume", "create", name, "--size", size]);
        v[0]["id"].as_str().unwrap().to_string()
    }

    /// Snapshots a volume and returns the snapshot ID.
    pub fn snapshot(&self, name: &str, volume: &str) -> String {
        let v = self.cli_json(&["snapshot", "create", name, "--volume", volume]);
        v[0]["id"].as_str().unwrap().to_string()
    }

    /// The NBD URI of an export.
    pub fn uri(&self, export: &str) -> String {
        format!(
            "nbd+unix:///{export}?socket={}",
            self.nbd_socket().display()
        )
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// SIGTERM; returns the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut c = self.child.take().expect("running");
        // SAFETY: kill(2) with a pid we own and a valid signal number.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        c.wait().unwrap()
    }

    pub fn metrics(&self) -> String {
        scrape(self.metrics_port)
    }
}

/// GET /metrics from a server on a loopback port.
pub fn scrape(port: u16) -> String {
    try_scrape(port).unwrap()
}

/// [`scrape`], or the error of a process not (yet) listening.
pub fn try_scrape(port: u16) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    write!(s, "GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

impl Drop for Standalone {
    fn drop(&mut self) {
        self.kill9();
        release_mounts(self.dir.path());
    }
}

/// Removes every mount and loop device under `dir` that a test left
/// behind (a failed assertion skips the unstage), and stops the fd holder,
/// so nothing outlives the test.
pub fn release_mounts(dir: &Path) {
    // First end the FUSE connections (the server is gone already): I/O
    // to them then fails at once instead of waiting for a server forever,
    // so the unmounts below cannot hang.
    holder_kill(&dir.join("state/fuse-holder.sock"));
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut points: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(dir))
        .collect();
    // Deepest and latest first: filesystems on loop devices before the
    // FUSE mounts under them.
    points.reverse();
    let fuse_dir = dir.join("state/fuse");
    let (fuse, others): (Vec<_>, Vec<_>) =
        points.into_iter().partition(|p| p.starts_with(&fuse_dir));
    for p in &others {
        let _ = Command::new("umount").arg("-l").arg(p).status();
    }
    if let Ok(entries) = std::fs::read_dir("/sys/block") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let backing = std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file"));
            if backing.is_ok_and(|b| Path::new(b.trim()).starts_with(dir)) {
                let _ = Command::new("losetup")
                    .arg("-d")
                    .arg(format!("/dev/{name}"))
                    .status();
            }
        }
    }
    for p in &fuse {
        let _ = Command::new("umount").arg("-l").arg(p).status();
    }
}

/// Kills the fd holder listening on `socket`, if one runs.
pub fn holder_kill(socket: &Path) {
    if let Some(pid) = holder_pid(socket) {
        // SAFETY: kill(2) with a pid and a valid signal.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while holder_pid(socket).is_some() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The pid of the fd holder on `socket` (it answers PING).
pub fn holder_pid(socket: &Path) -> Option<u32> {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(b"PING").ok()?;
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).ok()?;
    std::str::from_utf8(&buf[..n])
        .ok()?
        .strip_prefix("PONG ")?
        .parse()
        .ok()
}

/// Runs a Python script with libnbd's bindings (Debian's python, which
/// has them), with `uri(...)`-style values substituted by the caller.
pub fn nbdsh(script: &str) -> Output {
    Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(script)
        .output()
        .unwrap()
}

pub fn assert_ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn write_random(path: &Path, len: usize, seed: u64) -> Vec<u8> {
    let mut data = vec![0u8; len];
    super::Rng::new(seed).fill(&mut data);
    std::fs::write(path, &data).unwrap();
    data
}
