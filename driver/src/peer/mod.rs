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

/// Metadata of an ABORTED answer: the owner's newest session for the
/// attachment (a client continues in a newer one).
pub const SESSION_HEADER: &str = "strata-session";
/// On a refusal of a volume that moved away live: the new owner.
pub const MOVED_HEADER: &str = "strata-moved";

/// Metadata of every answer: the owner machine's boot ID.
pub const BOOT_HEADER: &str = "strata-boot";

/// This machine's boot ID (with the `failpoints` feature, the
/// `STRATA_TEST_BOOT_ID` environment variable stands in for it, so a test
/// can make a restarted process look like a rebooted machine).
pub fn boot_id() -> String {
    #[cfg(feature = "failpoints")]
    if let Ok(id) = std::env::var("STRATA_TEST_BOOT_ID") {
        return id;
    }
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}
