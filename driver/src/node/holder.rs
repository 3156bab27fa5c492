//! The fd holder: a small, long-lived process (`strata fuse-holder`) that
//! keeps a duplicate of every `/dev/fuse` descriptor the node serves, so a
//! FUSE connection (and the loop device and filesystem above it) outlives
//! a restart of the serving process. The restarted server asks for the
//! descriptors back.
//!
//! Protocol, over a unix stream socket (mode 0600), one request per
//! message, descriptors as `SCM_RIGHTS`:
//!
//! ```text
//! PUT <key>   + fd   → OK            keep (a duplicate of) fd under key
//! GET <key>          → OK + fd | NONE
//! DROP <key>         → OK            close it (the volume was detached)
//! PING               → PONG <pid> <instance>   (instance: random, per holder)
//! ```
//!
//! It keeps nothing on disk: if the holder dies, its descriptors close and
//! the connections end (their mounts then fail with ENOTCONN), which the
//! node detects and reports at its next start.

use std::collections::HashMap;
use std::io::IoSlice;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::error::{Error, Result, io};

/// Largest request or reply.
const MAX_MESSAGE: usize = 512;

/// Sends `msg`, with `fd` attached if given.
fn send(sock: &UnixStream, msg: &[u8], fd: Option<RawFd>) -> std::io::Result<()> {
    let iov = [IoSlice::new(msg)];
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) } as usize;
    let mut control = vec![0u8; space];
    // SAFETY: an all-zero msghdr is valid; fields are set below.
    let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
    hdr.msg_iov = iov.as_ptr() as *mut libc::iovec;
    hdr.msg_iovlen = 1;
    if let Some(fd) = fd {
        hdr.msg_control = control.as_mut_ptr().cast();
        hdr.msg_controllen = space as _;
        // SAFETY: the control buffer is CMSG_SPACE(sizeof(int)) bytes, so
        // the first header and its data fit in it.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&hdr);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd);
        }
    }
    // SAFETY: `hdr` points at buffers that outlive the call.
    let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &hdr, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if n as usize != msg.len() {
        return Err(std::io::ErrorKind::WriteZero.into());
    }
    Ok(())
}

/// Receives one message and the descriptor attached to it, if any.
fn recv(sock: &UnixStream) -> std::io::Result<(Vec<u8>, Option<OwnedFd>)> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) } as usize;
    let mut control = vec![0u8; space];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is valid; fields are set below.
    let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
    hdr.msg_iov = &mut iov;
    hdr.msg_iovlen = 1;
    hdr.msg_control = control.as_mut_ptr().cast();
    hdr.msg_controllen = space as _;
    // SAFETY: `hdr` points at buffers that outlive the call.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut hdr, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if n == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    buf.truncate(n as usize);
    let mut fd = None;
    // SAFETY: the kernel filled `control` and `msg_controllen`; the CMSG
    // macros walk only within them.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&hdr);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let raw = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>());
                fd = Some(OwnedFd::from_raw_fd(raw));
            }
            cmsg = libc::CMSG_NXTHDR(&hdr, cmsg);
        }
    }
    Ok((buf, fd))
}

/// Runs the holder on `socket` until it has held nothing for `idle`
/// (`None`: until it is killed). A holder that already answers there (an
/// older one, about to go with its pod) is first asked for every
/// connection the node's staging records name, so none is lost when it
/// goes.
pub fn run(socket: &Path, idle: Option<Duration>) -> Result<()> {
    let mut held = adopt(socket);
    // Told apart from the holder before even where both are PID 1 of
    // their containers.
    let instance = uuid::Uuid::new_v4().as_u64_pair().0;
    let listener = crate::endpoint::bind_unix_std(socket).map_err(io("listen on", socket))?;
    listener
        .set_nonblocking(true)
        .map_err(io("listen on", socket))?;
    let mut empty_since = held.is_empty().then(Instant::now);
    loop {
        match listener.accept() {
            Ok((conn, _)) => {
                let _ = conn.set_nonblocking(false);
                let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
                serve_client(&conn, &mut held, instance);
                // Any request restarts the idle clock, so a client that
                // just found the holder alive has time to hand it an fd.
                empty_since = held.is_empty().then(Instant::now);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if let (Some(since), Some(idle)) = (empty_since, idle)
                    && since.elapsed() >= idle
                {
                    let _ = std::fs::remove_file(socket);
                    return Ok(());
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(io("accept on", socket)(e)),
        }
    }
}

/// The descriptors an older holder on `socket` keeps for the volumes the
/// staging records (`<socket's dir>/staged/<volume>.json`) name.
fn adopt(socket: &Path) -> HashMap<String, OwnedFd> {
    let mut held = HashMap::new();
    let older = Holder::new(socket.to_path_buf());
    let Some(pid) = older.ping() else {
        return held;
    };
    let staged = socket.with_file_name("staged");
    let names = std::fs::read_dir(&staged).into_iter().flatten().flatten();
    for name in names {
        let path = name.path();
        if path.extension().is_none_or(|x| x != "json") {
            continue;
        }
        let Some(key) = path.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        if let Ok(Some(fd)) = older.get(key) {
            held.insert(key.to_string(), fd);
        }
    }
    tracing::info!(
        pid,
        connections = held.len(),
        "took the connections of the holder that ran before"
    );
    held
}

fn serve_client(conn: &UnixStream, held: &mut HashMap<String, OwnedFd>, instance: u64) {
    while let Ok((msg, fd)) = recv(conn) {
        let text = String::from_utf8_lossy(&msg).into_owned();
        let (verb, key) = text
            .trim_end()
            .split_once(' ')
            .unwrap_or((text.trim_end(), ""));
        let sent = match (verb, fd) {
            ("PUT", Some(fd)) if !key.is_empty() => {
                held.insert(key.to_string(), fd);
                send(conn, b"OK", None)
            }
            ("GET", _) => match held.get(key) {
                Some(fd) => send(conn, b"OK", Some(fd.as_raw_fd())),
                None => send(conn, b"NONE", None),
            },
            ("DROP", _) => {
                held.remove(key);
                send(conn, b"OK", None)
            }
            ("PING", _) => send(
                conn,
                format!("PONG {} {instance}", std::process::id()).as_bytes(),
                None,
            ),
            _ => send(conn, b"ERR unknown request", None),
        };
        if sent.is_err() {
            return;
        }
    }
}

/// A client of the holder.
#[derive(Debug, Clone)]
pub struct Holder {
    socket: PathBuf,
}

impl Holder {
    pub fn new(socket: PathBuf) -> Self {
        Holder { socket }
    }

    fn request(&self, msg: &str, fd: Option<RawFd>) -> Result<(String, Option<OwnedFd>)> {
        let conn = UnixStream::connect(&self.socket).map_err(io("connect to", &self.socket))?;
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(io("connect to", &self.socket))?;
        send(&conn, msg.as_bytes(), fd).map_err(io("send to", &self.socket))?;
        let (reply, fd) = recv(&conn).map_err(io("receive from", &self.socket))?;
        Ok((String::from_utf8_lossy(&reply).into_owned(), fd))
    }

    /// Which holder answers (random per holder), if one does.
    pub fn instance(&self) -> Option<u64> {
        let (reply, _) = self.request("PING", None).ok()?;
        reply.strip_prefix("PONG ")?.split(' ').nth(1)?.parse().ok()
    }

    /// The holder's pid, if one answers.
    pub fn ping(&self) -> Option<u32> {
        let (reply, _) = self.request("PING", None).ok()?;
        reply.strip_prefix("PONG ")?.split(' ').next()?.parse().ok()
    }

    /// Waits up to `patience` for a holder that another process runs to
    /// answer.
    pub fn wait(&self, patience: Duration) -> Result<u32> {
        let deadline = Instant::now() + patience;
        loop {
            if let Some(pid) = self.ping() {
                return Ok(pid);
            }
            if Instant::now() >= deadline {
                return Err(Error::Unavailable(format!(
                    "no FUSE fd holder answers at {} (it runs beside the node: the chart's \
                     fuse-holder DaemonSet, or `strata fuse-holder --socket ...`)",
                    self.socket.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Makes sure a holder answers, starting `exe fuse-holder` (in its own
    /// process group, so signals to ours do not reach it) if none does.
    pub fn ensure_running(&self, exe: &Path, log: &Path) -> Result<u32> {
        if let Some(pid) = self.ping() {
            return Ok(pid);
        }
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(io("open", log))?;
        use std::os::unix::process::CommandExt;
        let mut child = Command::new(exe)
            .arg("fuse-holder")
            .arg("--socket")
            .arg(&self.socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .process_group(0)
            .spawn()
            .map_err(io("start", exe))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(pid) = self.ping() {
                // Reap it in the background if it exits while we live.
                std::thread::spawn(move || child.wait());
                return Ok(pid);
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(Error::Unavailable(format!(
                    "the FUSE fd holder exited at start ({status}); see {}",
                    log.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(Error::Unavailable(
            "the FUSE fd holder did not start".into(),
        ))
    }

    /// Hands the holder a duplicate of `fd` to keep under `key`.
    pub fn put(&self, key: &str, fd: RawFd) -> Result<()> {
        match self.request(&format!("PUT {key}"), Some(fd))?.0.as_str() {
            "OK" => Ok(()),
            other => Err(Error::Unavailable(format!(
                "fd holder refused PUT: {other}"
            ))),
        }
    }

    /// The descriptor kept under `key`, if the holder has it.
    pub fn get(&self, key: &str) -> Result<Option<OwnedFd>> {
        let (reply, fd) = self.request(&format!("GET {key}"), None)?;
        match (reply.as_str(), fd) {
            ("OK", Some(fd)) => Ok(Some(fd)),
            ("NONE", _) => Ok(None),
            (other, _) => Err(Error::Unavailable(format!("fd holder: {other}"))),
        }
    }

    /// Forgets `key` (its descriptor is closed).
    pub fn drop_fd(&self, key: &str) -> Result<()> {
        self.request(&format!("DROP {key}"), None).map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_travel_and_survive_the_sender() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("holder.sock");
        let s = sock.clone();
        let server = std::thread::spawn(move || run(&s, Some(Duration::from_millis(300))));
        let holder = Holder::new(sock.clone());
        let deadline = Instant::now() + Duration::from_secs(5);
        while holder.ping().is_none() {
            assert!(Instant::now() < deadline, "holder did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        // A pipe: what is written to the kept write end arrives at the read end.
        let mut fds = [0; 2];
        // SAFETY: pipe writes two descriptors into the array.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: both are fresh descriptors we own.
        let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        holder.put("vol-1", wr.as_raw_fd()).unwrap();
        drop(wr);
        assert!(holder.get("other").unwrap().is_none());
        let back = holder.get("vol-1").unwrap().expect("kept");
        let mut w = std::fs::File::from(back);
        std::io::Write::write_all(&mut w, b"x").unwrap();
        let mut r = std::fs::File::from(rd);
        let mut b = [0u8; 1];
        std::io::Read::read_exact(&mut r, &mut b).unwrap();
        assert_eq!(&b, b"x");
        drop(w);
        holder.drop_fd("vol-1").unwrap();
        assert!(holder.get("vol-1").unwrap().is_none());
        // Nothing held: the holder exits after its idle time.
        server.join().unwrap().unwrap();
        assert!(holder.ping().is_none());
    }

    /// A holder that starts where another answers (the chart's holder
    /// DaemonSet beside the holder an older node plugin started) takes the
    /// connections the staging records name, so the older one can go.
    #[test]
    fn a_new_holder_takes_the_connections_of_the_one_before() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("fuse-holder.sock");
        std::fs::create_dir(dir.path().join("staged")).unwrap();
        std::fs::write(dir.path().join("staged/vol-1.json"), "{}").unwrap();
        let start = |sock: &Path| {
            let s = sock.to_path_buf();
            std::thread::spawn(move || run(&s, Some(Duration::from_millis(300))));
        };
        start(&sock);
        let holder = Holder::new(sock.clone());
        let deadline = Instant::now() + Duration::from_secs(5);
        while holder.ping().is_none() {
            assert!(Instant::now() < deadline, "holder did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        let mut fds = [0; 2];
        // SAFETY: pipe writes two descriptors into the array.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: both are fresh descriptors we own.
        let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        holder.put("vol-1", wr.as_raw_fd()).unwrap();
        holder.put("not-staged", wr.as_raw_fd()).unwrap();
        drop(wr);
        // The second holder binds the same path: the first is unreachable
        // from now on, as when its pod goes.
        let old_socket = dir.path().join("old.sock");
        std::fs::hard_link(&sock, &old_socket).unwrap();
        start(&sock);
        use std::os::unix::fs::MetadataExt;
        let old_inode = std::fs::metadata(&old_socket).unwrap().ino();
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::metadata(&sock).map_or(true, |m| m.ino() == old_inode)
            || holder.ping().is_none()
        {
            assert!(Instant::now() < deadline, "the new holder did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        let fd = holder
            .get("vol-1")
            .unwrap()
            .expect("taken from the old holder");
        let mut w = std::fs::File::from(fd);
        std::io::Write::write_all(&mut w, b"y").unwrap();
        assert!(holder.get("not-staged").unwrap().is_none());
        let mut r = std::fs::File::from(rd);
        let mut b = [0u8; 1];
        std::io::Read::read_exact(&mut r, &mut b).unwrap();
        assert_eq!(&b, b"y");
    }
}
