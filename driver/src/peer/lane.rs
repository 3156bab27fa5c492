//! A client's side of the data lane (`peer.proto`, LaneRequest; the
//! owner's side, and why lanes exist, in `agent::lane`): blocking TLS
//! connections to one owner, each carrying one request at a time, kept
//! for the next request once answered. The calling thread (a frontend's
//! worker) writes the request and reads the answer itself, within the
//! call's timeout however slowly the owner takes or sends the bytes
//! ([`super::LaneSocket`]).
//!
//! An owner without lanes (an older Strata answers ALPN `h2`), or with
//! all its lanes taken, is asked through the RPCs instead, and not dialled
//! again for [`OFF_FOR`].

use std::net::{TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use csi_proto::peer::v1::lane_request::Op;
use csi_proto::peer::v1::{LaneReply, LaneRequest};
use prost::Message;
use tokio_rustls::rustls::{ClientConnection, StreamOwned};
use tonic::{Code, Status};

use super::{
    LANE_ALPN, LANE_SLICE, LaneSocket, MOVED_HEADER, SESSION_HEADER, decode_data_frame, ends_lane,
    read_frame, short_read, write_frame,
};
use tokio_rustls::rustls;

/// Idle lanes kept per owner, for all the volumes this node uses there
/// (a FUSE attachment has 8 workers, a copy 4; the owner serves 64 lanes
/// to one node, 256 in all).
const KEEP: usize = 32;
/// A lane idle for longer is closed rather than used: well before the
/// owner closes it (`agent::lane::IDLE`), which would fail the request
/// and cost a retry.
const STALE: Duration = Duration::from_secs(120);
/// How long an owner without a lane for this node is asked through the
/// RPCs before a lane is tried again.
const OFF_FOR: Duration = Duration::from_secs(30);

/// One lane: the connection, the boot ID its owner said in its hello,
/// and the buffer of its frames (both ways).
struct Lane {
    stream: StreamOwned<ClientConnection, LaneSocket<TcpStream>>,
    boot: String,
    used: Instant,
    buf: Vec<u8>,
}

/// The lanes to one owner (shared by the volumes this node uses there).
pub struct Lanes {
    /// `None`: this node has no client configuration for lanes.
    config: Option<Arc<rustls::ClientConfig>>,
    address: String,
    /// The name the owner's certificate must carry.
    server: String,
    connect_timeout: Duration,
    call_timeout: Duration,
    idle: Mutex<Vec<Lane>>,
    /// Until when the owner is asked through the RPCs.
    off_until: Mutex<Option<Instant>>,
}

impl std::fmt::Debug for Lanes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lanes")
            .field("address", &self.address)
            .field("idle", &self.idle.lock().map_or(0, |i| i.len()))
            .finish()
    }
}

impl Lanes {
    /// Lanes to the owner at `address` whose certificate names `server`
    /// (`crate::tls::TlsFiles::server_name_of`).
    pub fn new(
        config: Option<Arc<rustls::ClientConfig>>,
        address: &str,
        server: &str,
        connect_timeout: Duration,
        call_timeout: Duration,
    ) -> Self {
        Lanes {
            config,
            address: address.to_string(),
            server: server.to_string(),
            connect_timeout,
            call_timeout,
            idle: Mutex::default(),
            off_until: Mutex::default(),
        }
    }

    /// `req` on a lane: `None` when there is none (ask through the RPC),
    /// else the answer and the owner's boot ID, a refusal as the RPC's
    /// status (with its headers), or UNAVAILABLE when the lane failed
    /// (the outcome is not known). With `into`, the answer's data is
    /// copied there straight from the frame (DATA_LOSS if it is not
    /// `into`'s size) and the answer returned without it.
    pub fn call(
        &self,
        req: &LaneRequest,
        into: Option<&mut [u8]>,
    ) -> Option<Result<(LaneReply, String), Status>> {
        let taken = {
            let mut idle = self.idle.lock().expect("lanes");
            idle.retain(|l| l.used.elapsed() < STALE);
            idle.pop()
        };
        let mut lane = match taken {
            Some(l) => l,
            None => match self.dial() {
                Ok(Some(l)) => l,
                Ok(None) => return None,
                Err(s) => return Some(Err(s)),
            },
        };
        let Lane { stream, buf, .. } = &mut lane;
        // However slowly the owner takes the request or sends the answer,
        // the call ends at its timeout.
        stream.sock.until(Instant::now() + self.call_timeout);
        let exchanged = write_frame(stream, req, buf)
            .and_then(|()| read_frame(stream, buf))
            .and_then(|got| {
                got.then_some(()).ok_or_else(|| {
                    std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed by the owner")
                })
            });
        if let Err(e) = exchanged {
            // The owner went away (or the network did): the other idle
            // lanes are most likely as dead, and the retry dials anew.
            self.idle.lock().expect("lanes").clear();
            return Some(Err(self.failed(e)));
        }
        let undecoded = |e: std::io::Error| Status::unknown(format!("data lane: {e}"));
        let reply = match into {
            None => LaneReply::decode(lane.buf.as_slice()).map_err(|e| undecoded(e.into())),
            Some(into) => {
                decode_data_frame(&lane.buf)
                    .map_err(undecoded)
                    .and_then(|(reply, data)| {
                        if reply.code != Code::Ok as i32 {
                            return Ok(reply);
                        }
                        if data.len() != into.len() {
                            let at = match &req.op {
                                Some(Op::Read(r)) => r.offset,
                                _ => 0,
                            };
                            return Err(short_read(into.len(), data.len(), at));
                        }
                        into.copy_from_slice(data);
                        Ok(reply)
                    })
            }
        };
        let reply = match reply {
            Ok(r) => r,
            Err(s) => return Some(Err(s)),
        };
        let boot = lane.boot.clone();
        lane.used = Instant::now();
        if !ends_lane(reply.code) {
            let mut idle = self.idle.lock().expect("lanes");
            if idle.len() < KEEP {
                idle.push(lane);
            }
        }
        if reply.code != Code::Ok as i32 {
            return Some(Err(status(reply)));
        }
        Some(Ok((reply, boot)))
    }

    fn failed(&self, e: std::io::Error) -> Status {
        Status::unavailable(format!("data lane to {}: {e}", self.address))
    }

    /// A new lane; `None` if the owner has none for this node now.
    fn dial(&self) -> Result<Option<Lane>, Status> {
        let Some(config) = &self.config else {
            return Ok(None);
        };
        if self
            .off_until
            .lock()
            .expect("lanes")
            .is_some_and(|t| Instant::now() < t)
        {
            return Ok(None);
        }
        let addr = self
            .address
            .to_socket_addrs()
            .map_err(|e| self.failed(e))?
            .next()
            .ok_or_else(|| Status::unavailable(format!("{} resolves to nothing", self.address)))?;
        let slice = self.connect_timeout.min(LANE_SLICE);
        let tcp = TcpStream::connect_timeout(&addr, self.connect_timeout)
            .and_then(|t| {
                t.set_nodelay(true)?;
                t.set_read_timeout(Some(slice))?;
                t.set_write_timeout(Some(slice))?;
                Ok(t)
            })
            .map_err(|e| self.failed(e))?;
        let server = rustls::pki_types::ServerName::try_from(self.server.clone()).map_err(|e| {
            Status::invalid_argument(format!("data lane: the owner's name {}: {e}", self.server))
        })?;
        let conn = ClientConnection::new(Arc::clone(config), server)
            .map_err(|e| Status::internal(format!("data lane TLS: {e}")))?;
        // The handshake and the hello, within the connect timeout.
        let tcp = LaneSocket::new(tcp, Instant::now() + self.connect_timeout);
        let mut stream = StreamOwned::new(conn, tcp);
        while stream.conn.is_handshaking() {
            stream
                .conn
                .complete_io(&mut stream.sock)
                .map_err(|e| self.failed(e))?;
        }
        if stream.conn.alpn_protocol() != Some(LANE_ALPN) {
            tracing::info!(owner = %self.address, "the owner has no data lanes (an older Strata?): its RPCs are used");
            self.off();
            return Ok(None);
        }
        // Nothing was sent yet: without a hello, the RPCs carry the
        // request (the owner may be out of threads).
        let mut buf = Vec::new();
        let hello = match read_frame(&mut stream, &mut buf) {
            Ok(true) => LaneReply::decode(buf.as_slice()).ok(),
            _ => None,
        };
        let Some(hello) = hello else {
            tracing::warn!(owner = %self.address, "a data lane without a hello: the owner's RPCs are used");
            self.off();
            return Ok(None);
        };
        if hello.code != Code::Ok as i32 {
            tracing::warn!(owner = %self.address, refusal = %hello.message, "no data lane: the owner's RPCs are used");
            self.off();
            return Ok(None);
        }
        let tcp = &stream.sock.tcp;
        let slice = Some(self.call_timeout.min(LANE_SLICE));
        tcp.set_read_timeout(slice)
            .and_then(|()| tcp.set_write_timeout(slice))
            .map_err(|e| self.failed(e))?;
        Ok(Some(Lane {
            stream,
            boot: hello.boot,
            used: Instant::now(),
            buf,
        }))
    }

    fn off(&self) {
        *self.off_until.lock().expect("lanes") = Some(Instant::now() + OFF_FOR);
    }
}

/// A lane's refusal as the RPC's status, with its headers.
fn status(reply: LaneReply) -> Status {
    let mut s = Status::new(Code::from(reply.code), reply.message);
    if reply.session > 0
        && let Ok(v) = reply.session.to_string().parse()
    {
        s.metadata_mut().insert(SESSION_HEADER, v);
    }
    if !reply.moved.is_empty()
        && let Ok(v) = reply.moved.parse()
    {
        s.metadata_mut().insert(MOVED_HEADER, v);
    }
    s
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::net::TcpListener;

    use super::*;
    use tokio_rustls::rustls::ServerConnection;

    /// An owner that answers the hello, reads a request, then sends its
    /// answer a byte of TLS record at a time, each before the socket's
    /// timeout: the call still ends at its timeout, not when the answer
    /// is in.
    #[test]
    fn a_call_ends_at_its_timeout_however_slowly_the_owner_answers() {
        let dir = tempfile::tempdir().unwrap();
        let script =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/gen-agent-certs");
        let out = std::process::Command::new(script)
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let tls = crate::tls::TlsFiles::load(dir.path()).unwrap();
        let server = tls.rustls_server(&[LANE_ALPN]).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            let (mut tcp, _) = listener.accept().unwrap();
            let mut conn = ServerConnection::new(server).unwrap();
            while conn.is_handshaking() {
                conn.complete_io(&mut tcp).unwrap();
            }
            let mut stream = StreamOwned::new(conn, tcp);
            let hello = LaneReply {
                boot: "b1".into(),
                ..Default::default()
            };
            write_frame(&mut stream, &hello, &mut Vec::new()).unwrap();
            let mut buf = Vec::new();
            assert!(read_frame(&mut stream, &mut buf).unwrap());
            let answer = LaneReply {
                message: "x".repeat(200),
                ..Default::default()
            };
            let mut frame = Vec::new();
            frame.extend_from_slice(&(answer.encoded_len() as u32).to_be_bytes());
            answer.encode(&mut frame).unwrap();
            stream.conn.writer().write_all(&frame).unwrap();
            let mut record = Vec::new();
            while stream.conn.wants_write() {
                stream.conn.write_tls(&mut record).unwrap();
            }
            for b in record {
                if stream.sock.write_all(&[b]).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let client = tls.rustls_client(&[LANE_ALPN]).unwrap();
        let timeout = Duration::from_secs(1);
        let lanes = Lanes::new(
            Some(client),
            &address,
            crate::tls::SERVER_NAME,
            Duration::from_secs(5),
            timeout,
        );
        let began = Instant::now();
        let r = lanes.call(&LaneRequest::default(), None).expect("a lane");
        let took = began.elapsed();
        assert_eq!(r.unwrap_err().code(), Code::Unavailable);
        assert!(took < timeout * 2, "the call took {took:?}");
    }
}
