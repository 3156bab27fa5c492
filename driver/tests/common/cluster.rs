//! A cluster on loopback for end-to-end tests: `strata node` processes,
//! each with its own pool, CSI socket and agent port, and a
//! `strata controller` that reaches them with mutual TLS. Certificates come
//! from `scripts/gen-agent-certs`, as a user would make them.

use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::standalone::{free_port, release_mounts};

/// Makes a CA and a certificate in `dir` with the project's script.
pub fn gen_certs(dir: &Path) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/gen-agent-certs");
    let out = Command::new(script).arg(dir).output().unwrap();
    assert!(
        out.status.success(),
        "gen-agent-certs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Makes a certificate per process with the project's script: `dir`
/// holds the CA, `dir/controller` and `dir/nodes/NAME` are the
/// controller's and each node's `--agent-tls` directories.
pub fn gen_certs_per_process(dir: &Path, nodes: &[&str]) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/gen-agent-certs");
    let mut cmd = Command::new(script);
    for n in nodes {
        cmd.args(["--node", n]);
    }
    let out = cmd.arg(dir).output().unwrap();
    assert!(
        out.status.success(),
        "gen-agent-certs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One `strata` server process, restartable with the same arguments; on
/// drop it is killed and what it left mounted under `dir` is released.
pub struct Proc {
    pub dir: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
    /// A path that exists once the process has bound its CSI socket.
    socket: PathBuf,
    /// The network namespace (file) the process runs in, if not this one.
    pub netns: Option<PathBuf>,
    /// Environment of the next starts, beside `STRATA_LOG`.
    pub env: Vec<(String, String)>,
}

impl Proc {
    /// Starts `strata ARGS` with its log in `dir/strata.log`, and waits
    /// for `socket`.
    pub fn new(dir: PathBuf, args: Vec<String>, socket: PathBuf) -> Proc {
        Proc::new_in(dir, args, socket, None)
    }

    /// [`Proc::new`] in the network namespace of file `netns`.
    pub fn new_in(
        dir: PathBuf,
        args: Vec<String>,
        socket: PathBuf,
        netns: Option<PathBuf>,
    ) -> Proc {
        std::fs::create_dir_all(&dir).unwrap();
        let mut p = Proc {
            dir,
            args,
            child: None,
            socket,
            netns,
            env: Vec::new(),
        };
        p.spawn();
        p
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("strata.log")).unwrap_or_default()
    }

    /// The arguments of the next start.
    /// The attach backend the running process chose (`fuse` or `nbd`),
    /// from the ready line it prints.
    pub fn attach_backend(&self) -> String {
        const READY: &str = "volumes attach via ";
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let log = self.log();
            if let Some(at) = log.rfind(READY) {
                let rest = &log[at + READY.len()..];
                return rest[..rest.find(')').unwrap_or(rest.len())].to_string();
            }
            assert!(Instant::now() < deadline, "no ready line:\n{log}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The running process's ID.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn args(&self) -> &[String] {
        &self.args
    }

    /// Adds arguments for the next start.
    pub fn add_args(&mut self, extra: &[&str]) {
        self.args.extend(extra.iter().map(|a| a.to_string()));
    }

    /// Replaces the value after `flag` for the next start.
    pub fn set_arg(&mut self, flag: &str, value: &str) {
        let at = self.args.iter().position(|a| a == flag).expect("flag");
        self.args[at + 1] = value.to_string();
    }

    /// (Re)starts the process and waits for its CSI socket (a socket left
    /// by a killed process is removed first, so it is not mistaken for
    /// the new one).
    pub fn spawn(&mut self) {
        let _ = std::fs::remove_file(&self.socket);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("strata.log"))
            .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_strata"));
        let ns = self.netns.as_ref().map(|p| std::fs::File::open(p).unwrap());
        if let Some(fd) = ns.as_ref().map(|f| f.as_raw_fd()) {
            // SAFETY: only setns, async-signal-safe, between fork and exec,
            // on a descriptor this process holds open until after spawn.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setns(fd, libc::CLONE_NEWNET) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        }
        let child = cmd
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
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
        while !self.socket.exists() {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "strata {} exited at start ({status}):\n{}",
                    self.args[0],
                    self.log()
                );
            }
            assert!(Instant::now() < deadline, "no socket:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, and waits for the exit.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut c = self.child.take().expect("running");
        // SAFETY: signalling a child this test started and has not reaped.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        c.wait().unwrap()
    }

    /// Whether the process exits (a failpoint killed it) within `d`.
    pub fn exits_within(&mut self, d: Duration) -> bool {
        let deadline = Instant::now() + d;
        let c = self.child.as_mut().expect("running");
        while Instant::now() < deadline {
            if c.try_wait().unwrap().is_some() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
        // A failed test shows what its processes warned of and said last
        // (their directory goes with the test's).
        if std::thread::panicking() {
            let log = self.log();
            let lines: Vec<_> = log.lines().collect();
            let last = lines.len().saturating_sub(40);
            eprintln!(
                "--- {}/strata.log (warnings, then the last 40 lines):",
                self.dir.display()
            );
            let warned = lines[..last]
                .iter()
                .filter(|l| l.contains(" WARN ") || l.contains(" ERROR ") || l.contains("failed"));
            for line in warned.take(100).chain(&lines[last..]) {
                eprintln!("{line}");
            }
        }
        release_mounts(&self.dir);
    }
}

/// A `strata node`.
pub struct NodeProc {
    pub id: String,
    pub agent: String,
    pub metrics_port: u16,
    pub proc: Proc,
}

impl NodeProc {
    pub fn start(root: &Path, id: &str, tls: &Path) -> NodeProc {
        NodeProc::start_in(root, id, tls, None)
    }

    /// A node in member `id` of `net`, its agent on the member's address.
    pub fn start_on(root: &Path, id: &str, tls: &Path, net: &super::netns::Net) -> NodeProc {
        NodeProc::start_in(
            root,
            id,
            tls,
            Some((net.path(id), format!("{}:9809", net.addr(id)))),
        )
    }

    fn start_in(root: &Path, id: &str, tls: &Path, net: Option<(PathBuf, String)>) -> NodeProc {
        let dir = root.join(id);
        let (netns, agent) = match net {
            Some((ns, agent)) => (Some(ns), agent),
            None => (None, format!("127.0.0.1:{}", free_port())),
        };
        let metrics_port = free_port();
        let csi = dir.join("csi.sock");
        let args = vec![
            "node".to_string(),
            "--pool".into(),
            dir.join("pool").display().to_string(),
            "--csi-endpoint".into(),
            format!("unix://{}", csi.display()),
            "--nbd-listen".into(),
            format!("unix://{}", dir.join("nbd.sock").display()),
            "--metrics-listen".into(),
            format!("127.0.0.1:{metrics_port}"),
            "--node-id".into(),
            id.into(),
            "--state-dir".into(),
            dir.join("state").display().to_string(),
            "--agent-listen".into(),
            agent.clone(),
            "--agent-tls".into(),
            tls.display().to_string(),
        ];
        let node = NodeProc {
            id: id.into(),
            agent,
            metrics_port,
            proc: Proc::new_in(dir, args, csi, netns),
        };
        node.wait_for_agent();
        // In the kernel VM every node must use the kernel's nbd driver.
        if let Ok(want) = std::env::var("STRATA_EXPECT_ATTACH") {
            assert_eq!(node.proc.attach_backend(), want, "STRATA_EXPECT_ATTACH");
        }
        node
    }

    /// Restarts the node with its agent on another port, as a node whose
    /// pod was made again comes back at a new address.
    pub fn move_agent(&mut self) {
        let agent = format!("127.0.0.1:{}", free_port());
        self.proc.kill9();
        self.proc.set_arg("--agent-listen", &agent);
        self.agent = agent;
        self.proc.spawn();
        self.wait_for_agent();
    }

    /// Waits until the agent port accepts connections (it opens once the
    /// node has served its staged volumes again).
    pub fn wait_for_agent(&self) {
        let agent = self.agent.clone();
        let connects = move || {
            let deadline = Instant::now() + Duration::from_secs(30);
            while std::net::TcpStream::connect(&agent).is_err() {
                if Instant::now() > deadline {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            true
        };
        // From inside the node's namespace, where its address is.
        let up = match &self.proc.netns {
            Some(ns) => super::netns::in_ns(ns, connects),
            None => connects(),
        };
        assert!(up, "no agent:\n{}", self.proc.log());
    }

    pub fn csi_socket(&self) -> PathBuf {
        self.proc.dir.join("csi.sock")
    }

    pub fn kubelet_dir(&self) -> PathBuf {
        self.proc.dir.join("kubelet")
    }

    pub fn metrics(&self) -> String {
        super::standalone::scrape(self.metrics_port)
    }
}

/// A `strata controller` with a 1 s heartbeat and a 3 s stale timeout.
pub struct ControllerProc {
    pub proc: Proc,
    pub metrics_port: u16,
}

impl ControllerProc {
    pub fn start(root: &Path, agents: &[&str], tls: &Path) -> ControllerProc {
        let records = root.join("controller/records.redb");
        ControllerProc::replica(root, "controller", &records, agents, tls)
    }

    /// One of several replicas sharing the records file `records`, each
    /// in its own directory `root/name` with its own peer port.
    pub fn replica(
        root: &Path,
        name: &str,
        records: &Path,
        agents: &[&str],
        tls: &Path,
    ) -> ControllerProc {
        ControllerProc::replica_in(root, name, records, agents, tls, None)
    }

    /// A controller in member `member` of `net`.
    pub fn start_on(
        root: &Path,
        agents: &[&str],
        tls: &Path,
        net: &super::netns::Net,
        member: &str,
    ) -> ControllerProc {
        let records = root.join("controller/records.redb");
        let ns = Some(net.path(member));
        ControllerProc::replica_in(root, "controller", &records, agents, tls, ns)
    }

    fn replica_in(
        root: &Path,
        name: &str,
        records: &Path,
        agents: &[&str],
        tls: &Path,
        netns: Option<PathBuf>,
    ) -> ControllerProc {
        let dir = root.join(name);
        let csi = dir.join("csi.sock");
        let metrics_port = free_port();
        let mut args = vec![
            "controller".to_string(),
            "--csi-endpoint".into(),
            format!("unix://{}", csi.display()),
            "--records".into(),
            records.display().to_string(),
            "--agent-tls".into(),
            tls.display().to_string(),
            "--heartbeat-seconds".into(),
            "1".into(),
            "--stale-seconds".into(),
            "3".into(),
            "--metrics-listen".into(),
            format!("127.0.0.1:{metrics_port}"),
            "--peer-listen".into(),
            format!("127.0.0.1:{}", free_port()),
        ];
        for a in agents {
            args.extend(["--node-agent".to_string(), a.to_string()]);
        }
        ControllerProc {
            proc: Proc::new_in(dir, args, csi, netns),
            metrics_port,
        }
    }

    /// Whether this replica says it leads (`strata_controller_leading`).
    pub fn leading(&self) -> bool {
        super::standalone::try_scrape(self.metrics_port)
            .is_ok_and(|m| m.lines().any(|l| l == "strata_controller_leading 1"))
    }

    pub fn csi_socket(&self) -> PathBuf {
        self.proc.dir.join("csi.sock")
    }

    pub fn metrics(&self) -> String {
        super::standalone::scrape(self.metrics_port)
    }
}
