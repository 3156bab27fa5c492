//! The NBD wire format (fixed newstyle negotiation, simple and structured
//! replies): constants, parsing of what clients send, and encoding of what
//! the server sends. Pure functions over bytes, no I/O, so that everything a
//! client can send is fuzzed (`driver/fuzz`).
//!
//! Numbers follow the NBD protocol document (NetworkBlockDevice/nbd,
//! `doc/proto.md`). All integers are big endian.

use crate::engine::SnapshotId;

/// "NBDMAGIC", sent first by the server.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": the newstyle magic, and the magic of every option request.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of option replies.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of transmission requests.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of simple replies.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of structured reply chunks.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flags (server).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flags.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

/// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_ERR + 1;
pub const REP_ERR_POLICY: u32 = REP_ERR + 2;
pub const REP_ERR_INVALID: u32 = REP_ERR + 3;
pub const REP_ERR_UNKNOWN: u32 = REP_ERR + 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_ERR + 7;
pub const REP_ERR_TOO_BIG: u32 = REP_ERR + 9;

/// Info types (in `NBD_REP_INFO` replies and INFO/GO requests).
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flags.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_SEND_DF: u16 = 1 << 7;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TFLAG_SEND_CACHE: u16 = 1 << 10;
pub const TFLAG_SEND_FAST_ZERO: u16 = 1 << 11;

/// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

/// Structured reply flags and types.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

/// Errors of the transmission phase.
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// `base:allocation` status flags.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

/// The metadata contexts Strata serves, and their context IDs on every
/// connection that selects them.
pub const BASE_ALLOCATION: &str = "base:allocation";
pub const BASE_ALLOCATION_ID: u32 = 1;
/// For each extent, the depth in the chain of the layer it resolves to
/// (0: no layer defines it), as qemu serves it for qcow2 backing chains.
pub const ALLOCATION_DEPTH: &str = "qemu:allocation-depth";
pub const ALLOCATION_DEPTH_ID: u32 = 2;
/// `qemu:dirty-bitmap:<snapshot ID>`: the blocks written or discarded
/// since that older snapshot of the export's volume, flagged
/// [`STATE_DIRTY`], as qemu serves its dirty bitmaps for incremental
/// backups.
pub const DIRTY_BITMAP_PREFIX: &str = "qemu:dirty-bitmap:";
pub const DIRTY_BITMAP_ID: u32 = 3;
/// `qemu:dirty-bitmap` status flag.
pub const STATE_DIRTY: u32 = 1 << 0;

/// The metadata contexts a negotiation selected.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Contexts {
    pub allocation: bool,
    pub depth: bool,
    /// The base snapshot of `qemu:dirty-bitmap:<base>`.
    pub dirty: Option<SnapshotId>,
}

impl Contexts {
    pub fn any(self) -> bool {
        self.allocation || self.depth || self.dirty.is_some()
    }

    /// Both selections together (of two dirty bitmaps, the later one).
    pub fn or(self, other: Contexts) -> Contexts {
        Contexts {
            allocation: self.allocation || other.allocation,
            depth: self.depth || other.depth,
            dirty: other.dirty.or(self.dirty),
        }
    }

    /// The selected ones as (ID, name).
    pub fn named(self) -> impl Iterator<Item = (u32, String)> {
        [
            (
                self.allocation,
                BASE_ALLOCATION_ID,
                BASE_ALLOCATION.to_string(),
            ),
            (
                self.depth,
                ALLOCATION_DEPTH_ID,
                ALLOCATION_DEPTH.to_string(),
            ),
        ]
        .into_iter()
        .filter(|(on, ..)| *on)
        .map(|(_, id, name)| (id, name))
        .chain(
            self.dirty
                .map(|b| (DIRTY_BITMAP_ID, format!("{DIRTY_BITMAP_PREFIX}{b}"))),
        )
    }
}

/// Length of a request header.
pub const REQUEST_LEN: usize = 28;
/// Longest option payload accepted during negotiation.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Longest string (export name, query) inside an option.
pub const MAX_STRING_LEN: usize = 4096;

/// The largest request the server serves (advertised as the maximum block
/// size): 32 MiB, the size the protocol recommends servers accept.
pub const MAX_REQUEST: u32 = 32 << 20;
/// Writes up to this length above [`MAX_REQUEST`] are read and discarded
/// (with an error reply) so the connection stays in sync; longer ones end
/// the connection.
pub const MAX_DISCARDED_PAYLOAD: u32 = 64 << 20;

/// An option request header (after the magic was checked).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub length: u32,
}

/// The client sent something that is not NBD.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadMagic;

/// Parses a 16-byte option header.
pub fn parse_option_header(b: &[u8; 16]) -> Result<OptionHeader, BadMagic> {
    if u64::from_be_bytes(b[0..8].try_into().expect("8 bytes")) != IHAVEOPT {
        return Err(BadMagic);
    }
    Ok(OptionHeader {
        option: u32::from_be_bytes(b[8..12].try_into().expect("4 bytes")),
        length: u32::from_be_bytes(b[12..16].try_into().expect("4 bytes")),
    })
}

/// A malformed option payload (answered with `NBD_REP_ERR_INVALID`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidOption(pub &'static str);

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], InvalidOption> {
        if self.0.len() < n {
            return Err(InvalidOption("option payload is truncated"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u16(&mut self) -> Result<u16, InvalidOption> {
        Ok(u16::from_be_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }
    fn u32(&mut self) -> Result<u32, InvalidOption> {
        Ok(u32::from_be_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn string(&mut self) -> Result<String, InvalidOption> {
        let n = self.u32()? as usize;
        if n > MAX_STRING_LEN {
            return Err(InvalidOption("string too long"));
        }
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| InvalidOption("string is not UTF-8"))
    }
    fn done(&self) -> Result<(), InvalidOption> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(InvalidOption("trailing bytes in option"))
        }
    }
}

/// The payload of `NBD_OPT_INFO` / `NBD_OPT_GO`: export name and the info
/// types the client asks for.
pub fn parse_info_request(data: &[u8]) -> Result<(String, Vec<u16>), InvalidOption> {
    let mut c = Cursor(data);
    let name = c.string()?;
    let n = c.u16()?;
    let infos = (0..n).map(|_| c.u16()).collect::<Result<Vec<_>, _>>()?;
    c.done()?;
    Ok((name, infos))
}

/// The payload of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`:
/// export name and queries.
pub fn parse_meta_context_request(data: &[u8]) -> Result<(String, Vec<String>), InvalidOption> {
    let mut c = Cursor(data);
    let name = c.string()?;
    let n = c.u32()?;
    if n as usize > data.len() / 4 {
        return Err(InvalidOption("more queries than the payload can hold"));
    }
    let queries = (0..n).map(|_| c.string()).collect::<Result<Vec<_>, _>>()?;
    c.done()?;
    Ok((name, queries))
}

/// Which contexts a meta-context query selects (none, for one we do not
/// serve). For LIST, a namespace (`base:`, `qemu:`) selects what we serve
/// in it.
pub fn query_selects(query: &str, listing: bool) -> Contexts {
    Contexts {
        allocation: query == BASE_ALLOCATION || (listing && query == "base:"),
        depth: query == ALLOCATION_DEPTH || (listing && query == "qemu:"),
        // Named ones only: the snapshots a bitmap can name are not listed.
        // As Strata writes the ID, so that the reply names what was asked.
        dirty: query.strip_prefix(DIRTY_BITMAP_PREFIX).and_then(|b| {
            b.parse::<SnapshotId>()
                .ok()
                .filter(|id| id.to_string() == b)
        }),
    }
}

/// Encodes an option reply.
pub fn option_reply(option: u32, reply: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(20 + data.len());
    out.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// An error option reply with a human-readable message.
pub fn option_error(option: u32, reply: u32, message: &str) -> Vec<u8> {
    option_reply(option, reply, message.as_bytes())
}

/// `NBD_INFO_EXPORT`: size and transmission flags.
pub fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut d = Vec::with_capacity(12);
    d.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    d.extend_from_slice(&size.to_be_bytes());
    d.extend_from_slice(&flags.to_be_bytes());
    d
}

/// `NBD_INFO_BLOCK_SIZE`: minimum, preferred and maximum block size.
pub fn info_block_size(min: u32, preferred: u32, max: u32) -> Vec<u8> {
    let mut d = Vec::with_capacity(14);
    d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    d.extend_from_slice(&min.to_be_bytes());
    d.extend_from_slice(&preferred.to_be_bytes());
    d.extend_from_slice(&max.to_be_bytes());
    d
}

/// `NBD_INFO_NAME` or `NBD_INFO_DESCRIPTION`.
pub fn info_string(kind: u16, s: &str) -> Vec<u8> {
    let mut d = kind.to_be_bytes().to_vec();
    d.extend_from_slice(s.as_bytes());
    d
}

/// `NBD_REP_SERVER` payload for one export.
pub fn rep_server(name: &str, description: &str) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(description.as_bytes());
    d
}

/// `NBD_REP_META_CONTEXT` payload.
pub fn rep_meta_context(id: u32, name: &str) -> Vec<u8> {
    let mut d = id.to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d
}

/// A transmission request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

/// Parses a 28-byte request header.
pub fn parse_request(b: &[u8; REQUEST_LEN]) -> Result<Request, BadMagic> {
    if u32::from_be_bytes(b[0..4].try_into().expect("4 bytes")) != REQUEST_MAGIC {
        return Err(BadMagic);
    }
    Ok(Request {
        flags: u16::from_be_bytes(b[4..6].try_into().expect("2 bytes")),
        kind: u16::from_be_bytes(b[6..8].try_into().expect("2 bytes")),
        cookie: u64::from_be_bytes(b[8..16].try_into().expect("8 bytes")),
        offset: u64::from_be_bytes(b[16..24].try_into().expect("8 bytes")),
        length: u32::from_be_bytes(b[24..28].try_into().expect("4 bytes")),
    })
}

/// What the export being served allows, for validating requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportLimits {
    pub size: u64,
    pub read_only: bool,
    pub structured: bool,
    /// A metadata context was selected (BLOCK_STATUS needs one).
    pub meta_context: bool,
}

/// A request that passed validation, ready to execute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read {
        offset: u64,
        length: u32,
    },
    Write {
        offset: u64,
        length: u32,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        length: u32,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        length: u32,
        fua: bool,
        no_hole: bool,
        /// Fail with ENOTSUP rather than write zeroes as data.
        fast: bool,
    },
    BlockStatus {
        offset: u64,
        length: u32,
        one: bool,
    },
    /// Read ahead: the range will be read soon.
    Cache {
        offset: u64,
        length: u32,
    },
    Disconnect,
}

/// What to do with a request that fails validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejected {
    /// The NBD error to reply with.
    pub error: u32,
    /// Why, for the error reply's message and the metrics label.
    pub why: &'static str,
}

const fn rejected(error: u32, why: &'static str) -> Rejected {
    Rejected { error, why }
}

/// Checks a request against the protocol and the export, and turns it into
/// a [`Command`]. Never panics on any input.
pub fn validate(req: &Request, ex: &ExportLimits) -> Result<Command, Rejected> {
    let allowed = match req.kind {
        CMD_READ => CMD_FLAG_FUA | if ex.structured { CMD_FLAG_DF } else { 0 },
        CMD_WRITE | CMD_TRIM => CMD_FLAG_FUA,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
        CMD_BLOCK_STATUS => CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
        CMD_CACHE => CMD_FLAG_FUA,
        CMD_FLUSH | CMD_DISC => CMD_FLAG_FUA,
        _ => return Err(rejected(EINVAL, "unknown_command")),
    };
    if req.flags & !allowed != 0 {
        return Err(rejected(EINVAL, "bad_flags"));
    }
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let in_range = req
        .offset
        .checked_add(u64::from(req.length))
        .is_some_and(|end| end <= ex.size);
    let writes = matches!(req.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if writes && ex.read_only {
        return Err(rejected(EPERM, "read_only"));
    }
    match req.kind {
        CMD_DISC => Ok(Command::Disconnect),
        CMD_FLUSH if req.offset != 0 || req.length != 0 => {
            Err(rejected(EINVAL, "flush_with_range"))
        }
        CMD_FLUSH => Ok(Command::Flush),
        CMD_READ if req.length > MAX_REQUEST => Err(rejected(EOVERFLOW, "too_large")),
        CMD_WRITE if req.length > MAX_REQUEST => Err(rejected(EINVAL, "too_large")),
        CMD_WRITE | CMD_WRITE_ZEROES if !in_range => Err(rejected(ENOSPC, "out_of_range")),
        _ if !in_range => Err(rejected(EINVAL, "out_of_range")),
        CMD_READ => Ok(Command::Read {
            offset: req.offset,
            length: req.length,
        }),
        CMD_WRITE => Ok(Command::Write {
            offset: req.offset,
            length: req.length,
            fua,
        }),
        CMD_TRIM => Ok(Command::Trim {
            offset: req.offset,
            length: req.length,
            fua,
        }),
        CMD_WRITE_ZEROES => Ok(Command::WriteZeroes {
            offset: req.offset,
            length: req.length,
            fua,
            no_hole: req.flags & CMD_FLAG_NO_HOLE != 0,
            fast: req.flags & CMD_FLAG_FAST_ZERO != 0,
        }),
        CMD_CACHE => Ok(Command::Cache {
            offset: req.offset,
            length: req.length,
        }),
        CMD_BLOCK_STATUS if !ex.meta_context => Err(rejected(EINVAL, "no_meta_context")),
        CMD_BLOCK_STATUS if req.length == 0 => Err(rejected(EINVAL, "zero_length")),
        CMD_BLOCK_STATUS => Ok(Command::BlockStatus {
            offset: req.offset,
            length: req.length,
            one: req.flags & CMD_FLAG_REQ_ONE != 0,
        }),
        _ => Err(rejected(EINVAL, "unknown_command")),
    }
}

/// A simple reply header (followed by the data of a successful read).
pub fn simple_reply(cookie: u64, error: u32) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// A structured reply chunk header.
pub fn structured_header(flags: u16, kind: u16, cookie: u64, length: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..20].copy_from_slice(&length.to_be_bytes());
    b
}

/// A final `NBD_REPLY_TYPE_ERROR` chunk.
pub fn structured_error(cookie: u64, error: u32, message: &str) -> Vec<u8> {
    let msg = &message.as_bytes()[..message.len().min(1024)];
    let mut out = structured_header(
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        cookie,
        6 + msg.len() as u32,
    )
    .to_vec();
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg);
    out
}

/// An `NBD_REPLY_TYPE_BLOCK_STATUS` chunk of context `id`: (length,
/// flags or value) descriptors; `done` on the last chunk of the reply.
pub fn structured_block_status(
    cookie: u64,
    id: u32,
    extents: &[(u32, u32)],
    done: bool,
) -> Vec<u8> {
    let len = 4 + 8 * extents.len() as u32;
    let flags = if done { REPLY_FLAG_DONE } else { 0 };
    let mut out = structured_header(flags, REPLY_TYPE_BLOCK_STATUS, cookie, len).to_vec();
    out.extend_from_slice(&id.to_be_bytes());
    for (length, flags) in extents {
        out.extend_from_slice(&length.to_be_bytes());
        out.extend_from_slice(&flags.to_be_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> ExportLimits {
        ExportLimits {
            size: 1 << 20,
            read_only: false,
            structured: true,
            meta_context: true,
        }
    }

    fn req(kind: u16, flags: u16, offset: u64, length: u32) -> Request {
        Request {
            flags,
            kind,
            cookie: 7,
            offset,
            length,
        }
    }

    #[test]
    fn request_round_trips_through_the_header_layout() {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[6..8].copy_from_slice(&CMD_WRITE.to_be_bytes());
        b[8..16].copy_from_slice(&42u64.to_be_bytes());
        b[16..24].copy_from_slice(&4096u64.to_be_bytes());
        b[24..28].copy_from_slice(&512u32.to_be_bytes());
        assert_eq!(
            parse_request(&b),
            Ok(req(CMD_WRITE, 0, 4096, 512).with_cookie(42))
        );
        b[0] ^= 1;
        assert_eq!(parse_request(&b), Err(BadMagic));
    }

    impl Request {
        fn with_cookie(mut self, c: u64) -> Self {
            self.cookie = c;
            self
        }
    }

    #[test]
    fn write_past_the_end_is_enospc_and_read_past_the_end_is_einval() {
        let ex = limits();
        assert_eq!(
            validate(&req(CMD_WRITE, 0, (1 << 20) - 1, 2), &ex)
                .unwrap_err()
                .error,
            ENOSPC
        );
        assert_eq!(
            validate(&req(CMD_READ, 0, 1 << 20, 1), &ex)
                .unwrap_err()
                .error,
            EINVAL
        );
        assert_eq!(
            validate(&req(CMD_READ, 0, u64::MAX, 2), &ex)
                .unwrap_err()
                .error,
            EINVAL
        );
    }

    #[test]
    fn writes_to_a_read_only_export_are_eperm() {
        let ex = ExportLimits {
            read_only: true,
            ..limits()
        };
        for kind in [CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES] {
            assert_eq!(
                validate(&req(kind, 0, 0, 4096), &ex).unwrap_err().error,
                EPERM
            );
        }
        assert!(validate(&req(CMD_READ, 0, 0, 4096), &ex).is_ok());
    }

    #[test]
    fn unknown_commands_and_flags_are_einval() {
        let ex = limits();
        assert_eq!(
            validate(&req(99, 0, 0, 1), &ex).unwrap_err().why,
            "unknown_command"
        );
        assert_eq!(
            validate(&req(CMD_WRITE, CMD_FLAG_NO_HOLE, 0, 1), &ex)
                .unwrap_err()
                .why,
            "bad_flags"
        );
        let no_sr = ExportLimits {
            structured: false,
            ..limits()
        };
        assert_eq!(
            validate(&req(CMD_READ, CMD_FLAG_DF, 0, 1), &no_sr)
                .unwrap_err()
                .error,
            EINVAL
        );
    }

    #[test]
    fn block_status_needs_a_negotiated_context() {
        let ex = ExportLimits {
            meta_context: false,
            ..limits()
        };
        assert_eq!(
            validate(&req(CMD_BLOCK_STATUS, 0, 0, 4096), &ex)
                .unwrap_err()
                .why,
            "no_meta_context"
        );
        assert!(matches!(
            validate(&req(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 0, 4096), &limits()),
            Ok(Command::BlockStatus { one: true, .. })
        ));
    }

    #[test]
    fn oversized_reads_are_eoverflow() {
        let ex = ExportLimits {
            size: 1 << 40,
            ..limits()
        };
        assert_eq!(
            validate(&req(CMD_READ, 0, 0, MAX_REQUEST + 1), &ex)
                .unwrap_err()
                .error,
            EOVERFLOW
        );
    }

    #[test]
    fn info_request_parses_name_and_infos() {
        let mut d = 3u32.to_be_bytes().to_vec();
        d.extend_from_slice(b"vol");
        d.extend_from_slice(&2u16.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        d.extend_from_slice(&INFO_NAME.to_be_bytes());
        assert_eq!(
            parse_info_request(&d),
            Ok(("vol".into(), vec![INFO_BLOCK_SIZE, INFO_NAME]))
        );
        d.push(0);
        assert!(parse_info_request(&d).is_err());
    }

    #[test]
    fn meta_context_request_with_absurd_count_is_invalid() {
        let mut d = 0u32.to_be_bytes().to_vec();
        d.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_meta_context_request(&d).is_err());
    }
}
