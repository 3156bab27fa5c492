//! The data path between nodes. A node that stages a volume another node
//! holds serves it to its own kernel like a local one (kernel nbd, or FUSE
//! and a loop device) and forwards the I/O to the owner: [`RemoteVolume`]
//! is the frontends' [`crate::frontend::RemoteDevice`] over the owner's
//! `strata.peer.v1.Peer` service, which `strata node` serves on its agent
//! port (mutual TLS; the server side is the agent's `peer` module).
//!
//! Every request carries the [`grant`] the controller made when it
//! published the volume to this node. A FLUSH or FUA write is answered
//! once the owner made it durable. While the owner cannot be reached, I/O
//! waits and retries (as the kernel's nbd driver waits for a restarted
//! server) for up to [`RETRY_FOR`], then fails with EIO.

pub mod client;
pub mod grant;
pub mod lane;

pub use client::{Peers, RemoteVolume, Target};

pub use grant::GrantKey;
use prost::Message as _;

/// How long a request to an unreachable owner is retried before it fails.
pub const RETRY_FOR: std::time::Duration = std::time::Duration::from_secs(120);

/// The largest read or write one request carries; larger ones are split.
pub const MAX_IO: usize = 1 << 20;

/// The largest range one Map request covers: its answer is at most one
/// extent per two blocks, 32 Ki extents of at most 23 bytes each, well
/// inside the data path's message limit (`MAX_IO` + 64 KiB).
pub const MAX_MAP: u64 = 256 << 20;

/// The ALPN protocol of the data lane (`peer.proto`, LaneRequest).
pub const LANE_ALPN: &[u8] = b"strata-data/1";

/// The largest frame of the data lane: one request's data and room for
/// the rest.
pub const MAX_FRAME: usize = MAX_IO + (64 << 10);

/// The longest one read or write of a lane's socket waits before its
/// deadline is checked again (the socket's own timeout).
pub const LANE_SLICE: std::time::Duration = std::time::Duration::from_secs(20);

/// Whether a lane's answer with status `code` refused its caller or its
/// grant: the owner then closes the lane (a node it does not accept keeps
/// none), and the client does not keep it.
pub fn ends_lane(code: i32) -> bool {
    [tonic::Code::PermissionDenied, tonic::Code::Unauthenticated]
        .iter()
        .any(|c| *c as i32 == code)
}

/// A data lane's socket, under its TLS, on either side: a read or a write
/// gives up at the lane's deadline, and one that times out before it
/// (after the socket's own timeout, at most [`LANE_SLICE`]) is tried
/// again. So a lane's time limits hold however slowly the other side
/// sends or takes the bytes, also within one TLS record, which rustls
/// reads whole before it hands anything up.
#[derive(Debug)]
pub struct LaneSocket<T> {
    pub tcp: T,
    deadline: std::time::Instant,
}

impl<T> LaneSocket<T> {
    pub fn new(tcp: T, deadline: std::time::Instant) -> Self {
        LaneSocket { tcp, deadline }
    }

    /// Reads and writes from now on give up at `deadline`.
    pub fn until(&mut self, deadline: std::time::Instant) {
        self.deadline = deadline;
    }

    pub fn deadline(&self) -> std::time::Instant {
        self.deadline
    }

    fn retried<R>(
        &mut self,
        mut io: impl FnMut(&mut T) -> std::io::Result<R>,
    ) -> std::io::Result<R> {
        use std::io::ErrorKind::{TimedOut, WouldBlock};
        loop {
            if std::time::Instant::now() >= self.deadline {
                return Err(std::io::Error::new(TimedOut, "the lane's time is up"));
            }
            match io(&mut self.tcp) {
                Err(e) if matches!(e.kind(), WouldBlock | TimedOut) => {}
                r => return r,
            }
        }
    }
}

impl<T: std::io::Read> std::io::Read for LaneSocket<T> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.retried(|t| t.read(buf))
    }
}

impl<T: std::io::Write> std::io::Write for LaneSocket<T> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.retried(|t| t.write(buf))
    }
    // rustls hands its records over as several slices: one system call
    // for all of them, as the socket itself would take them.
    fn write_vectored(&mut self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        self.retried(|t| t.write_vectored(bufs))
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.retried(|t| t.flush())
    }
}

/// Reads one frame of the data lane into `buf`: false at the end of the
/// stream before a frame; InvalidData for a frame above [`MAX_FRAME`].
pub fn read_frame(from: &mut impl std::io::Read, buf: &mut Vec<u8>) -> std::io::Result<bool> {
    let mut len = [0u8; 4];
    match from.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(false),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a frame of {len} bytes; at most {MAX_FRAME}"),
        ));
    }
    // Grown as the data comes, not to what the length claims.
    use std::io::Read as _;
    buf.clear();
    let got = from.by_ref().take(len as u64).read_to_end(buf)?;
    if got < len {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(true)
}

/// Writes `msg` as one frame of the data lane, encoded in `buf` (a lane
/// reuses one buffer for all its frames).
pub fn write_frame(
    to: &mut impl std::io::Write,
    msg: &impl prost::Message,
    buf: &mut Vec<u8>,
) -> std::io::Result<()> {
    let len = msg.encoded_len();
    buf.clear();
    buf.reserve(4 + len);
    buf.extend_from_slice(&(len as u32).to_be_bytes());
    msg.encode(buf).map_err(std::io::Error::other)?;
    to.write_all(buf)?;
    to.flush()
}

/// The field number of `LaneReply.data` (`peer.proto`).
const DATA_FIELD: u32 = 6;

/// Reads' data up to this size is sent in one write with its head.
const COPIED_DATA: usize = 64 << 10;

/// Writes a read's answer as one frame of the data lane: `head` (without
/// data) and then `data` as its `data` field (an encoding of `head` with
/// that data), without copying data above [`COPIED_DATA`] into `buf`
/// first.
pub fn write_data_frame(
    to: &mut impl std::io::Write,
    head: &csi_proto::peer::v1::LaneReply,
    data: &[u8],
    buf: &mut Vec<u8>,
) -> std::io::Result<()> {
    use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};
    debug_assert!(head.data.is_empty());
    let field = key_len(DATA_FIELD) + encoded_len_varint(data.len() as u64) + data.len();
    let len = head.encoded_len() + field;
    buf.clear();
    buf.extend_from_slice(&(len as u32).to_be_bytes());
    head.encode(buf).map_err(std::io::Error::other)?;
    encode_key(DATA_FIELD, WireType::LengthDelimited, buf);
    encode_varint(data.len() as u64, buf);
    // A small read costs less copied than sent as a record of its own.
    if data.len() <= COPIED_DATA {
        buf.extend_from_slice(data);
        to.write_all(buf)?;
    } else {
        to.write_all(buf)?;
        to.write_all(data)?;
    }
    to.flush()
}

/// Decodes a frame of the data lane holding a `LaneReply` without copying
/// its data: the reply (its `data` empty) and the data, a slice of `buf`.
/// InvalidData if it does not decode.
pub fn decode_data_frame(buf: &[u8]) -> std::io::Result<(csi_proto::peer::v1::LaneReply, &[u8])> {
    use csi_proto::peer::v1::LaneReply;
    use prost::encoding::{DecodeContext, WireType, decode_key, decode_varint, skip_field};
    let bad = |e: &dyn std::fmt::Display| {
        std::io::Error::new(std::io::ErrorKind::InvalidData, format!("a reply: {e}"))
    };
    let mut rest = buf;
    while !rest.is_empty() {
        let at = buf.len() - rest.len();
        let (field, wire) = decode_key(&mut rest).map_err(|e| bad(&e))?;
        if field == DATA_FIELD && wire == WireType::LengthDelimited {
            let len = decode_varint(&mut rest).map_err(|e| bad(&e))?;
            let len = usize::try_from(len)
                .ok()
                .filter(|&n| n <= rest.len())
                .ok_or_else(|| bad(&"data beyond the frame"))?;
            let data = &rest[..len];
            let mut reply = LaneReply::decode(&buf[..at]).map_err(|e| bad(&e))?;
            reply.merge(&rest[len..]).map_err(|e| bad(&e))?;
            if !reply.data.is_empty() {
                return Err(bad(&"data twice"));
            }
            return Ok((reply, data));
        }
        skip_field(wire, field, &mut rest, DecodeContext::default()).map_err(|e| bad(&e))?;
    }
    Ok((LaneReply::decode(buf).map_err(|e| bad(&e))?, &[]))
}

/// The refusal of a read answered with `got` bytes for `asked` at `at`.
pub(crate) fn short_read(asked: usize, got: usize, at: u64) -> tonic::Status {
    tonic::Status::data_loss(format!("asked for {asked} bytes at {at}, got {got}"))
}

/// Metadata of an ABORTED answer: the owner's newest session for the
/// attachment (a client continues in a newer one).
pub const SESSION_HEADER: &str = "strata-session";
/// On a refusal of a volume that moved away live: the new owner.
pub const MOVED_HEADER: &str = "strata-moved";

/// Metadata of every answer: the owner machine's boot ID.
pub const BOOT_HEADER: &str = "strata-boot";

/// This machine's boot ID, read once, so every answer and seal of this
/// process says the same ("" if it cannot be read). With the `failpoints`
/// feature, the `STRATA_TEST_BOOT_ID` environment variable stands in for
/// it, so a test can make a restarted process look like a rebooted
/// machine.
pub fn boot_id() -> String {
    static BOOT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BOOT.get_or_init(|| {
        #[cfg(feature = "failpoints")]
        if let Ok(id) = std::env::var("STRATA_TEST_BOOT_ID") {
            return id;
        }
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    })
    .clone()
}

#[cfg(test)]
mod tests {
    use super::*;
    use csi_proto::peer::v1::LaneReply;

    /// A read's frame as the owner writes it, without its 4-byte length.
    fn data_frame(head: &LaneReply, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        write_data_frame(&mut out, head, data, &mut Vec::new()).unwrap();
        let len = u32::from_be_bytes(out[..4].try_into().unwrap()) as usize;
        assert_eq!(len, out.len() - 4, "the length says the rest");
        out.split_off(4)
    }

    #[test]
    fn a_data_frame_is_the_reply_prost_would_encode_and_decodes_in_place() {
        let small: Vec<u8> = (0..300u32).map(|i| i as u8).collect();
        let large = vec![5u8; COPIED_DATA + 1];
        for (head, data) in [
            (LaneReply::default(), &small),
            (LaneReply::default(), &large),
            (
                LaneReply {
                    session: 9,
                    moved: "n2".into(),
                    ..Default::default()
                },
                &small,
            ),
        ] {
            let frame = data_frame(&head, data);
            let whole = LaneReply {
                data: data.clone(),
                ..head.clone()
            };
            assert_eq!(LaneReply::decode(frame.as_slice()).unwrap(), whole);
            let (reply, got) = decode_data_frame(&frame).unwrap();
            assert_eq!((reply, got), (head, data.as_slice()));
        }
        // A reply without data (a refusal), as prost encodes it.
        let refusal = LaneReply {
            code: 7,
            message: "no".into(),
            ..Default::default()
        };
        let encoded = refusal.encode_to_vec();
        let (reply, got) = decode_data_frame(&encoded).unwrap();
        assert_eq!((reply, got), (refusal, &[][..]));
        // Data after the data, fields after it, data claiming more than
        // the frame holds, garbage.
        let mut twice = data_frame(&LaneReply::default(), b"ab");
        twice.extend(data_frame(&LaneReply::default(), b"cd"));
        assert!(decode_data_frame(&twice).is_err());
        let mut after = data_frame(&LaneReply::default(), b"ab");
        after.extend(
            LaneReply {
                code: 3,
                ..Default::default()
            }
            .encode_to_vec(),
        );
        let (reply, got) = decode_data_frame(&after).unwrap();
        assert_eq!((reply.code, got), (3, &b"ab"[..]));
        let mut short = data_frame(&LaneReply::default(), &small);
        short.truncate(100);
        assert!(decode_data_frame(&short).is_err());
        assert!(decode_data_frame(&[0xff; 9]).is_err());
    }

    /// A peer that never takes a byte (each socket write times out).
    struct Stuck;

    impl std::io::Write for Stuck {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            std::thread::sleep(std::time::Duration::from_millis(5));
            Err(std::io::ErrorKind::WouldBlock.into())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_lane_socket_write_gives_up_at_its_deadline() {
        use std::io::Write as _;
        let began = std::time::Instant::now();
        let mut s = LaneSocket::new(Stuck, began + std::time::Duration::from_millis(50));
        let e = s.write_all(b"answer").unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        assert!(began.elapsed() < std::time::Duration::from_secs(1));
    }
}
