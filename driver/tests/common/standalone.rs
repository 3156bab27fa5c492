//! A `strata standalone` process for end-to-end tests: started in a
//! temporary directory, stopped (or killed) on demand, its CLI and NBD
//! URIs at hand.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output};
use std::time::{Duration, Instant};

use super::cluster::Proc;

pub struct Standalone {
    /// Declared before `dir`, so the process is gone before its directory.
    proc: Proc,
    pub dir: tempfile::TempDir,
    pub metrics_port: u16,
    /// Also serve NBD on this loopback TCP port.
    pub nbd_tcp_port: Option<u16>,
}

/// A loopback TCP port nothing listens on, for a server the test starts.
///
/// Chosen below Linux's ephemeral range (32768 and up), where the kernel
/// never puts the local end of an outgoing connection: a port from
/// `bind(:0)` can be taken by some client's connection before the server
/// binds it. Test processes run in parallel, so the search starts at a
/// point drawn from the process ID, the time and a counter, and each port
/// handed out is reserved for an hour with a file in the temp directory:
/// a server a test kills and restarts on its port must find it free, not
/// taken by another test process meanwhile.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const LOW: u32 = 20000;
    const SPAN: u32 = 12000;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let start = std::process::id().wrapping_mul(7919) ^ nanos;
    for _ in 0..SPAN {
        let port = LOW + (start.wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed) * 613)) % SPAN;
        if std::net::TcpListener::bind(("127.0.0.1", port as u16)).is_ok() && reserve(port) {
            return port as u16;
        }
    }
    panic!("no free loopback port in {LOW}..{}", LOW + SPAN);
}

/// Reserves `port` across test processes (see [`free_port`]); false if
/// another process holds it.
fn reserve(port: u32) -> bool {
    let dir = std::env::temp_dir().join("strata-test-ports");
    let _ = std::fs::create_dir_all(&dir);
    let file = dir.join(port.to_string());
    let stale = std::fs::metadata(&file)
        .and_then(|m| m.modified())
        .is_ok_and(|t| t.elapsed().unwrap_or_default() > std::time::Duration::from_secs(3600));
    if stale {
        let _ = std::fs::remove_file(&file);
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&file)
        .is_ok()
}

impl Standalone {
    pub fn start() -> Standalone {
        Self::start_with_tcp(false)
    }

    /// Starts a server that, with `tcp`, also serves NBD on loopback TCP.
    pub fn start_with_tcp(tcp: bool) -> Standalone {
        Self::start_with(tcp, &[])
    }

    /// Starts a server with `extra` arguments.
    pub fn start_with(tcp: bool, extra: &[&str]) -> Standalone {
        Self::start_on(None, tcp, extra)
    }

    /// [`Standalone::start_with`] with the pool in `pool` (default: in
    /// the server's scratch directory).
    pub fn start_on(pool: Option<&Path>, tcp: bool, extra: &[&str]) -> Standalone {
        let dir = tempfile::tempdir().unwrap();
        let nbd_tcp_port = tcp.then(free_port);
        let metrics_port = free_port();
        let path = |name: &str| dir.path().join(name).display().to_string();
        let mut args: Vec<String> = vec![
            "standalone".into(),
            "--pool".into(),
            pool.map_or_else(|| path("pool"), |p| p.display().to_string()),
            "--csi-endpoint".into(),
            format!("unix://{}", path("csi.sock")),
            "--nbd-listen".into(),
            format!("unix://{}", path("nbd.sock")),
            "--metrics-listen".into(),
            format!("127.0.0.1:{metrics_port}"),
            "--node-id".into(),
            "test-node".into(),
            "--state-dir".into(),
            path("state"),
        ];
        if let Some(port) = nbd_tcp_port {
            args.extend(["--nbd-listen".into(), format!("tcp://127.0.0.1:{port}")]);
        }
        args.extend(extra.iter().map(|a| a.to_string()));
        // The VM stage runs some tests again over another backend.
        if let Ok(attach) = std::env::var("STRATA_TEST_ATTACH")
            && !extra.contains(&"--attach")
        {
            // iSCSI attaches through the node's own target.
            if attach == "iscsi" {
                args.extend([
                    "--iscsi-listen".into(),
                    format!("127.0.0.1:{}", free_port()),
                ]);
            }
            args.extend(["--attach".into(), attach]);
        }
        let proc = Proc::new(dir.path().to_path_buf(), args, dir.path().join("csi.sock"));
        let s = Standalone {
            proc,
            dir,
            metrics_port,
            nbd_tcp_port,
        };
        s.wait_ready();
        // In the kernel VM every test must use the kernel's nbd driver: a
        // silent fall back to FUSE would test the wrong path.
        if let Ok(want) = std::env::var("STRATA_EXPECT_ATTACH")
            && !s.proc.args().iter().any(|a| a == "--attach")
        {
            assert_eq!(s.attach_backend(), want, "STRATA_EXPECT_ATTACH");
        }
        s
    }

    /// The attach backend the running process chose (`fuse` or `nbd`),
    /// from the ready line it prints.
    pub fn attach_backend(&self) -> String {
        self.proc.attach_backend()
    }

    pub fn pool(&self) -> PathBuf {
        self.dir.path().join("pool")
    }

    pub fn csi_socket(&self) -> PathBuf {
        self.dir.path().join("csi.sock")
    }

    /// The server's resident memory, from /proc.
    pub fn rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.proc.pid())).unwrap();
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap();
        kib << 10
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
        self.proc.spawn();
        self.wait_ready();
    }

    /// Waits until the CLI gets an answer (the pool is open).
    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self.cli(&["volume", "list"]).status.success() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("strata standalone did not become ready:\n{}", self.log());
    }

    pub fn log(&self) -> String {
        self.proc.log()
    }

    /// Adds arguments for the next start (a new version's flags).
    pub fn set_args_extra(&mut self, extra: &[&str]) {
        self.proc.add_args(extra);
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
        self.proc.kill9();
    }

    /// The failpoint (`STRATA_FAILPOINT`) of the next start, or none.
    pub fn set_failpoint(&mut self, name: Option<&str>) {
        self.proc.env = name
            .map(|n| vec![("STRATA_FAILPOINT".to_string(), n.to_string())])
            .unwrap_or_default();
    }

    /// SIGTERM; returns the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        self.proc.terminate()
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
        .split(' ')
        .next()?
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

/// The value of the sample `series` (name and labels, as printed) in a
/// scrape, if it is there.
pub fn metric_value(scrape: &str, series: &str) -> Option<f64> {
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}
