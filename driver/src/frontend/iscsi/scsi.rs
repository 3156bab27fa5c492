//! SCSI block commands (SBC-4, SPC-5) over an [`Export`], with 4096-byte
//! logical blocks: the CDB is checked before any data is asked for
//! ([`plan`]), then run ([`execute`]) with the data the initiator sent.
//! Every refusal is sense data with the key and code the standards give;
//! engine errors become sense here, at the edge.

use std::time::Instant;

use crate::engine::{BLOCK_SIZE, Error, ErrorKind, ZeroFlags};
use crate::frontend::{Export, IoMetrics};

use super::copy;
use super::reserve::{self, PERSISTENT_RESERVE_IN, PERSISTENT_RESERVE_OUT, RELEASE_6, RESERVE_6};

/// Logical block size.
pub const BLOCK: u64 = BLOCK_SIZE;
/// Most blocks one READ or WRITE moves (32 MiB). Their data streams
/// through the target a burst at a time, so this bounds no memory.
pub const MAX_TRANSFER_BLOCKS: u32 = 8192;
/// Most blocks one VERIFY compares (1 MiB), held whole in memory.
pub const MAX_VERIFY_BLOCKS: u32 = 256;
/// Most blocks one UNMAP descriptor or WRITE SAME covers (4 GiB).
pub const MAX_UNMAP_BLOCKS: u32 = 1 << 20;
/// Most blocks one COMPARE AND WRITE covers (its compare and write data,
/// 2 × 128 KiB, are held whole).
pub const MAX_COMPARE_BLOCKS: u8 = 32;
/// Most descriptors one UNMAP carries.
pub const MAX_UNMAP_DESCRIPTORS: u32 = 256;

/// SCSI status codes.
pub const GOOD: u8 = 0x00;
pub const CHECK_CONDITION: u8 = 0x02;
pub const RESERVATION_CONFLICT: u8 = 0x18;

/// Sense keys.
mod key {
    pub const NOT_READY: u8 = 0x02;
    pub const MEDIUM_ERROR: u8 = 0x03;
    pub const HARDWARE_ERROR: u8 = 0x04;
    pub const ILLEGAL_REQUEST: u8 = 0x05;
    pub const DATA_PROTECT: u8 = 0x07;
    pub const COPY_ABORTED: u8 = 0x0a;
    pub const ABORTED_COMMAND: u8 = 0x0b;
    pub const MISCOMPARE: u8 = 0x0e;
}

/// Why a command failed: the sense key and additional sense code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sense {
    pub key: u8,
    pub asc: u8,
    pub ascq: u8,
    /// The INFORMATION field (for MISCOMPARE: the offset of the first
    /// byte that differs).
    pub info: Option<u32>,
}

impl Sense {
    pub(super) const fn illegal(asc: u8, ascq: u8) -> Self {
        Sense::new(key::ILLEGAL_REQUEST, asc, ascq)
    }
    pub(super) const fn copy_aborted(asc: u8, ascq: u8) -> Self {
        Sense::new(key::COPY_ABORTED, asc, ascq)
    }
    const fn new(key: u8, asc: u8, ascq: u8) -> Self {
        Sense {
            key,
            asc,
            ascq,
            info: None,
        }
    }
    pub const INVALID_OPCODE: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x20, 0x00);
    pub const LBA_OUT_OF_RANGE: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x21, 0x00);
    pub const INVALID_FIELD_IN_CDB: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x24, 0x00);
    pub const LUN_NOT_SUPPORTED: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x25, 0x00);
    pub const INVALID_FIELD_IN_PARAMETERS: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x26, 0x00);
    pub const PARAMETER_LIST_LENGTH: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x1a, 0x00);
    pub const SAVING_NOT_SUPPORTED: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x39, 0x00);
    pub const WRITE_PROTECTED: Sense = Sense::new(key::DATA_PROTECT, 0x27, 0x00);
    pub const SPACE_ALLOCATION_FAILED: Sense = Sense::new(key::DATA_PROTECT, 0x27, 0x07);
    pub const READ_ERROR: Sense = Sense::new(key::MEDIUM_ERROR, 0x11, 0x00);
    pub const WRITE_ERROR: Sense = Sense::new(key::MEDIUM_ERROR, 0x0c, 0x00);
    pub const MISCOMPARE: Sense = Sense::new(key::MISCOMPARE, 0x1d, 0x00);
    pub const NOT_ACCESSIBLE: Sense = Sense::new(key::NOT_READY, 0x04, 0x0a);
    pub const DATA_PHASE_ERROR: Sense = Sense::new(key::ABORTED_COMMAND, 0x4b, 0x00);
    pub const DATA_OFFSET_ERROR: Sense = Sense::new(key::ABORTED_COMMAND, 0x4b, 0x05);
    pub const INTERNAL_FAILURE: Sense = Sense::new(key::HARDWARE_ERROR, 0x44, 0x00);

    /// Fixed-format sense data (SPC-5 §4.4.3), 18 bytes.
    pub fn fixed(&self) -> [u8; 18] {
        let mut s = [0u8; 18];
        s[0] = 0x70;
        if let Some(info) = self.info {
            s[0] |= 0x80; // VALID
            s[3..7].copy_from_slice(&info.to_be_bytes());
        }
        s[2] = self.key;
        s[7] = 10;
        s[12] = self.asc;
        s[13] = self.ascq;
        s
    }

    /// The sense for an engine error while `writing` (or reading).
    fn of(e: &Error, writing: bool) -> Sense {
        match e.kind() {
            ErrorKind::OutOfRange => Sense::LBA_OUT_OF_RANGE,
            ErrorKind::ReadOnly => Sense::WRITE_PROTECTED,
            ErrorKind::NoSpace => Sense::SPACE_ALLOCATION_FAILED,
            ErrorKind::Moved => Sense::NOT_ACCESSIBLE,
            ErrorKind::InvalidArgument => Sense::INVALID_FIELD_IN_CDB,
            ErrorKind::Io | ErrorKind::Corrupt if writing => Sense::WRITE_ERROR,
            ErrorKind::Io | ErrorKind::Corrupt => Sense::READ_ERROR,
            _ => Sense::INTERNAL_FAILURE,
        }
    }
}

/// The logical unit behind LUN 0 of a target.
#[derive(Debug)]
pub struct Lun {
    pub export: Export,
    /// The target's IQN.
    pub target: String,
    pub metrics: IoMetrics,
    /// The session's side of the node's copy manager (tokens).
    pub copies: copy::Nexus,
    /// The session's initiator port, for reservations.
    pub port: reserve::Port,
}

impl Lun {
    fn blocks(&self) -> u64 {
        self.export.size() / BLOCK
    }

    /// Bytes of `blocks` from `lba`, refused if past the end.
    pub(super) fn range(&self, lba: u64, blocks: u64) -> Result<(u64, u64), Sense> {
        match lba.checked_add(blocks) {
            Some(end) if end <= self.blocks() => Ok((lba * BLOCK, blocks * BLOCK)),
            _ => Err(Sense::LBA_OUT_OF_RANGE),
        }
    }

    pub(super) fn writable(&self) -> Result<(), Sense> {
        if self.export.read_only() {
            return Err(Sense::WRITE_PROTECTED);
        }
        Ok(())
    }
}

pub(super) fn be16(b: &[u8]) -> u64 {
    u64::from(u16::from_be_bytes([b[0], b[1]]))
}
pub(super) fn be32(b: &[u8]) -> u64 {
    u64::from(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}
pub(super) fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().expect("8 bytes"))
}

pub mod opcode {
    pub const TEST_UNIT_READY: u8 = 0x00;
    pub const REQUEST_SENSE: u8 = 0x03;
    pub const READ_6: u8 = 0x08;
    pub const WRITE_6: u8 = 0x0a;
    pub const INQUIRY: u8 = 0x12;
    pub const MODE_SELECT_6: u8 = 0x15;
    pub const MODE_SENSE_6: u8 = 0x1a;
    pub const START_STOP_UNIT: u8 = 0x1b;
    pub const READ_CAPACITY_10: u8 = 0x25;
    pub const READ_10: u8 = 0x28;
    pub const WRITE_10: u8 = 0x2a;
    pub const VERIFY_10: u8 = 0x2f;
    pub const SYNCHRONIZE_CACHE_10: u8 = 0x35;
    pub const WRITE_SAME_10: u8 = 0x41;
    pub const UNMAP: u8 = 0x42;
    pub const MODE_SELECT_10: u8 = 0x55;
    pub const MODE_SENSE_10: u8 = 0x5a;
    pub const READ_16: u8 = 0x88;
    pub const WRITE_16: u8 = 0x8a;
    pub const VERIFY_16: u8 = 0x8f;
    pub const WRITE_VERIFY_10: u8 = 0x2e;
    pub const WRITE_VERIFY_12: u8 = 0xae;
    pub const WRITE_VERIFY_16: u8 = 0x8e;
    pub const VERIFY_12: u8 = 0xaf;
    pub const PREFETCH_10: u8 = 0x34;
    pub const PREFETCH_16: u8 = 0x90;
    pub const SYNCHRONIZE_CACHE_16: u8 = 0x91;
    pub const WRITE_SAME_16: u8 = 0x93;
    pub const SERVICE_ACTION_IN_16: u8 = 0x9e;
    pub const REPORT_LUNS: u8 = 0xa0;
    pub const COMPARE_AND_WRITE: u8 = 0x89;
    pub const MAINTENANCE_IN: u8 = 0xa3;
    pub const READ_12: u8 = 0xa8;
    pub const THIRD_PARTY_COPY_OUT: u8 = 0x83;
    pub const THIRD_PARTY_COPY_IN: u8 = 0x84;
    pub const WRITE_12: u8 = 0xaa;
}
use opcode::*;

const READ_CAPACITY_16: u8 = 0x10;
const REPORT_SUPPORTED_OPCODES: u8 = 0x0c;
const GET_LBA_STATUS: u8 = 0x12;

/// A READ/WRITE/VERIFY-style CDB: where, how many blocks, and FUA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Rw {
    lba: u64,
    blocks: u64,
    fua: bool,
}

fn rw(cdb: &[u8; 16]) -> Option<Rw> {
    let fua = cdb[1] & 0x08 != 0;
    Some(match cdb[0] {
        READ_6 | WRITE_6 => {
            let lba = (u64::from(cdb[1] & 0x1f) << 16) | be16(&cdb[2..]);
            // A transfer length of 0 means 256 blocks.
            let n = if cdb[4] == 0 { 256 } else { u64::from(cdb[4]) };
            return Some(Rw {
                lba,
                blocks: n,
                fua: false,
            });
        }
        READ_10 | WRITE_10 | WRITE_VERIFY_10 | VERIFY_10 | SYNCHRONIZE_CACHE_10 | WRITE_SAME_10
        | PREFETCH_10 => Rw {
            lba: be32(&cdb[2..]),
            blocks: be16(&cdb[7..]),
            fua,
        },
        READ_12 | WRITE_12 | WRITE_VERIFY_12 | VERIFY_12 => Rw {
            lba: be32(&cdb[2..]),
            blocks: be32(&cdb[6..]),
            fua,
        },
        READ_16 | WRITE_16 | WRITE_VERIFY_16 | VERIFY_16 | SYNCHRONIZE_CACHE_16 | WRITE_SAME_16
        | PREFETCH_16 => Rw {
            lba: be64(&cdb[2..]),
            blocks: be32(&cdb[10..]),
            fua,
        },
        _ => return None,
    })
}

/// Whether the CDB is a WRITE (6, 10, 12 or 16) or a WRITE AND VERIFY.
pub fn is_write(cdb: &[u8; 16]) -> bool {
    matches!(
        cdb[0],
        WRITE_6
            | WRITE_10
            | WRITE_12
            | WRITE_16
            | WRITE_VERIFY_10
            | WRITE_VERIFY_12
            | WRITE_VERIFY_16
    )
}

/// What a command needs from the initiator before it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// Data-Out bytes the command reads (0 for none).
    pub data_out: u64,
    /// A READ or WRITE: its data streams between the initiator and the
    /// unit (`read_part`, `write_part`) instead of being held whole.
    pub stream: Option<Stream>,
}

/// The bytes a READ or WRITE moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stream {
    pub offset: u64,
    pub len: u64,
    pub fua: bool,
    pub write: bool,
    /// WRITE AND VERIFY: each part is read back and compared once durable.
    pub verify: bool,
}

/// Reads part of a READ's range.
pub fn read_part(lun: &Lun, offset: u64, buf: &mut [u8]) -> Result<(), Sense> {
    let started = Instant::now();
    lun.export
        .read(offset, buf)
        .map_err(|e| failed(lun, "read", &e, false))?;
    lun.metrics
        .read
        .observe(buf.len() as u64, started.elapsed());
    Ok(())
}

/// Writes part of a WRITE's range (and for WRITE AND VERIFY, makes it
/// durable, reads it back and compares), unless a reservation made since
/// the command arrived stops it.
pub fn write_part(lun: &Lun, offset: u64, data: &[u8], stream: &Stream) -> Result<(), Sense> {
    lun.port.writing(None, || {
        let started = Instant::now();
        lun.export
            .write(offset, data, stream.fua || stream.verify)
            .map_err(|e| failed(lun, "write", &e, true))?;
        lun.metrics
            .write
            .observe(data.len() as u64, started.elapsed());
        Ok(())
    })?;
    if stream.verify {
        let mut back = vec![0u8; data.len()];
        read_part(lun, offset, &mut back)?;
        if back != data {
            return Err(Sense::MISCOMPARE);
        }
    }
    Ok(())
}

/// Checks a CDB against the unit before any data is solicited; `edtl`
/// is the data the initiator says it moves.
pub fn plan(lun: Option<&Lun>, cdb: &[u8; 16], edtl: u32) -> Result<Plan, Sense> {
    let none = Ok(Plan {
        data_out: 0,
        stream: None,
    });
    let Some(lun) = lun else {
        // Only INQUIRY and REPORT LUNS answer for a LUN that is not there.
        return match cdb[0] {
            INQUIRY | REPORT_LUNS | REQUEST_SENSE => none,
            _ => Err(Sense::LUN_NOT_SUPPORTED),
        };
    };
    let out = |n: u64| {
        Ok(Plan {
            data_out: n,
            stream: None,
        })
    };
    lun.port.check(cdb)?;
    match cdb[0] {
        READ_6 | READ_10 | READ_12 | READ_16 | WRITE_6 | WRITE_10 | WRITE_12 | WRITE_16
        | WRITE_VERIFY_10 | WRITE_VERIFY_12 | WRITE_VERIFY_16 => {
            let r = rw(cdb).expect("a read or write CDB");
            let write = is_write(cdb);
            let verify = matches!(cdb[0], WRITE_VERIFY_10 | WRITE_VERIFY_12 | WRITE_VERIFY_16);
            // BYTCHK of WRITE AND VERIFY: 0 (verify the medium) or 1
            // (compare with the data); both read back and compare here.
            if verify && cdb[1] & 0x04 != 0 {
                return Err(Sense::INVALID_FIELD_IN_CDB);
            }
            if cdb[0] != READ_6 && cdb[0] != WRITE_6 && cdb[1] & 0xe0 != 0 {
                // RDPROTECT/WRPROTECT: no protection information here.
                return Err(Sense::INVALID_FIELD_IN_CDB);
            }
            if write {
                lun.writable()?;
            }
            if r.blocks > u64::from(MAX_TRANSFER_BLOCKS) {
                return Err(Sense::INVALID_FIELD_IN_CDB);
            }
            let (offset, len) = lun.range(r.lba, r.blocks)?;
            Ok(Plan {
                data_out: if write { len } else { 0 },
                stream: Some(Stream {
                    offset,
                    len,
                    fua: r.fua && !verify,
                    write,
                    verify,
                }),
            })
        }
        PREFETCH_10 | PREFETCH_16 => {
            // Range checked; there is no cache of the unit's own to fill,
            // so GOOD (not CONDITION MET), as SBC allows.
            let r = rw(cdb).expect("a prefetch CDB");
            lun.range(r.lba, r.blocks)?;
            none
        }
        VERIFY_10 | VERIFY_12 | VERIFY_16 => {
            let r = rw(cdb).expect("a verify CDB");
            if cdb[1] & 0xe0 != 0 || r.blocks > u64::from(MAX_VERIFY_BLOCKS) {
                return Err(Sense::INVALID_FIELD_IN_CDB);
            }
            lun.range(r.lba, r.blocks)?;
            match (cdb[1] >> 1) & 3 {
                0 => none,
                1 => out(r.blocks * BLOCK),
                // BYTCHK 3: one block compared against each.
                3 => out(if r.blocks == 0 { 0 } else { BLOCK }),
                _ => Err(Sense::INVALID_FIELD_IN_CDB),
            }
        }
        WRITE_SAME_10 | WRITE_SAME_16 => {
            let r = rw(cdb).expect("a write same CDB");
            lun.writable()?;
            let ndob = cdb[0] == WRITE_SAME_16 && cdb[1] & 0x01 != 0;
            // WSNZ is set: 0 blocks is refused, not "to the end". ANCHOR:
            // anchored blocks are not supported (ANC_SUP 0).
            if cdb[1] & 0xf0 != 0 || r.blocks == 0 || r.blocks > u64::from(MAX_UNMAP_BLOCKS) {
                return Err(Sense::INVALID_FIELD_IN_CDB);
            }
            lun.range(r.lba, r.blocks)?;
            out(if ndob { 0 } else { BLOCK })
        }
        COMPARE_AND_WRITE => {
            lun.writable()?;
            let blocks = cdb[13];
            // 0 blocks is a no-op, unless the initiator sends data for it:
            // then the CDB and the data disagree (a count that wrapped).
            if cdb[1] & 0xe0 != 0
                || blocks > MAX_COMPARE_BLOCKS
                || (blocks == 0 && edtl > 0)
                || !lun.export.has_layers()
            {
                return Err(Sense::INVALID_FIELD_IN_CDB);
            }
            lun.range(be64(&cdb[2..]), u64::from(blocks))?;
            out(2 * u64::from(blocks) * BLOCK)
        }
        UNMAP => {
            lun.writable()?;
            let len = be16(&cdb[7..]);
            if cdb[1] & 0x01 != 0 {
                return Err(Sense::INVALID_FIELD_IN_CDB);
            }
            if len > 8 + 16 * u64::from(MAX_UNMAP_DESCRIPTORS) {
                return Err(Sense::PARAMETER_LIST_LENGTH);
            }
            out(len)
        }
        MODE_SELECT_6 => out(u64::from(cdb[4])),
        MODE_SELECT_10 => out(be16(&cdb[7..])),
        // The basic parameter list is 24 bytes; a longer one is refused
        // once read (REGISTER AND MOVE is not supported).
        PERSISTENT_RESERVE_OUT => {
            let len = be32(&cdb[5..]);
            if len > 4096 {
                return Err(Sense::PARAMETER_LIST_LENGTH);
            }
            out(len)
        }
        THIRD_PARTY_COPY_OUT => {
            let sa = cdb[1] & 0x1f;
            match sa {
                copy::EXTENDED_COPY | copy::POPULATE_TOKEN => {}
                copy::WRITE_USING_TOKEN => lun.writable()?,
                _ => return Err(Sense::INVALID_FIELD_IN_CDB),
            }
            let len = copy::parameter_length(cdb);
            if len > copy::MAX_PARAMETER_LIST {
                return Err(Sense::PARAMETER_LIST_LENGTH);
            }
            out(len)
        }
        _ => none,
    }
}

/// Runs a command whose [`plan`] passed, with the data it asked for.
/// Data for the initiator goes to `data_in` (already cut to the CDB's
/// allocation length).
pub fn execute(
    lun: Option<&Lun>,
    cdb: &[u8; 16],
    data_out: &[u8],
    data_in: &mut Vec<u8>,
) -> Result<(), Sense> {
    data_in.clear();
    let Some(lun) = lun else {
        return match cdb[0] {
            INQUIRY => inquiry(None, cdb, data_in),
            REPORT_LUNS => report_luns(cdb, data_in),
            REQUEST_SENSE => request_sense(cdb, data_in),
            _ => Err(Sense::LUN_NOT_SUPPORTED),
        };
    };
    // A write runs under its unit's fence (see `reserve.rs`); copies
    // admit each unit they write themselves.
    if reserve::Port::writes(cdb) && cdb[0] != THIRD_PARTY_COPY_OUT {
        return lun.port.writing(None, || run(lun, cdb, data_out, data_in));
    }
    run(lun, cdb, data_out, data_in)
}

fn run(lun: &Lun, cdb: &[u8; 16], data_out: &[u8], data_in: &mut Vec<u8>) -> Result<(), Sense> {
    match cdb[0] {
        TEST_UNIT_READY | START_STOP_UNIT => Ok(()),
        REQUEST_SENSE => request_sense(cdb, data_in),
        INQUIRY => inquiry(Some(lun), cdb, data_in),
        REPORT_LUNS => report_luns(cdb, data_in),
        READ_CAPACITY_10 => {
            let last = lun.blocks().saturating_sub(1);
            data_in.extend_from_slice(&(last.min(0xffff_ffff) as u32).to_be_bytes());
            data_in.extend_from_slice(&(BLOCK as u32).to_be_bytes());
            Ok(())
        }
        SERVICE_ACTION_IN_16 => match cdb[1] & 0x1f {
            READ_CAPACITY_16 => {
                let mut d = [0u8; 32];
                d[..8].copy_from_slice(&lun.blocks().saturating_sub(1).to_be_bytes());
                d[8..12].copy_from_slice(&(BLOCK as u32).to_be_bytes());
                // LBPME (thin provisioning) and LBPRZ (unmapped reads zero).
                d[14] = 0xc0;
                data_in.extend_from_slice(&d);
                truncate(data_in, be32(&cdb[10..]));
                Ok(())
            }
            GET_LBA_STATUS => lba_status(lun, cdb, data_in),
            _ => Err(Sense::INVALID_FIELD_IN_CDB),
        },
        // Streamed by the session through `read_part` and `write_part`
        // (their plan has a `Stream`); never run here.
        READ_6 | READ_10 | READ_12 | READ_16 | WRITE_6 | WRITE_10 | WRITE_12 | WRITE_16
        | WRITE_VERIFY_10 | WRITE_VERIFY_12 | WRITE_VERIFY_16 => Err(Sense::INTERNAL_FAILURE),
        PREFETCH_10 | PREFETCH_16 => Ok(()),
        VERIFY_10 | VERIFY_12 | VERIFY_16 => verify(lun, cdb, data_out),
        COMPARE_AND_WRITE => compare_and_write(lun, cdb, data_out),
        MAINTENANCE_IN if cdb[1] & 0x1f == REPORT_SUPPORTED_OPCODES => {
            supported_opcodes(cdb, data_in)
        }
        SYNCHRONIZE_CACHE_10 | SYNCHRONIZE_CACHE_16 => {
            let r = rw(cdb).expect("a sync CDB");
            // 0 blocks means "to the end"; the range is still checked.
            lun.range(r.lba, r.blocks)?;
            let started = Instant::now();
            lun.export
                .flush()
                .map_err(|e| failed(lun, "flush", &e, true))?;
            lun.metrics.flush.observe(0, started.elapsed());
            Ok(())
        }
        WRITE_SAME_10 | WRITE_SAME_16 => write_same(lun, cdb, data_out),
        UNMAP => unmap(lun, data_out),
        MODE_SENSE_6 | MODE_SENSE_10 => mode_sense(lun, cdb, data_in),
        MODE_SELECT_6 | MODE_SELECT_10 => mode_select(lun, cdb, data_out),
        THIRD_PARTY_COPY_OUT => copy::copy_out(lun, cdb, data_out),
        THIRD_PARTY_COPY_IN => copy::copy_in(lun, cdb, data_in),
        PERSISTENT_RESERVE_IN => lun.port.reserve_in(cdb, data_in),
        PERSISTENT_RESERVE_OUT => lun.port.reserve_out(cdb, data_out),
        RESERVE_6 => lun.port.reserve6(),
        RELEASE_6 => lun.port.release6(),
        _ => Err(Sense::INVALID_OPCODE),
    }
}

pub(super) fn failed(lun: &Lun, op: &'static str, e: &Error, writing: bool) -> Sense {
    let sense = Sense::of(e, writing);
    tracing::warn!(
        target_name = %lun.target,
        op,
        error = %crate::engine::error::chain(e),
        key = sense.key,
        asc = sense.asc,
        "iSCSI command failed"
    );
    sense
}

pub(super) fn truncate(data: &mut Vec<u8>, allocation: u64) {
    data.truncate(allocation.min(data.len() as u64) as usize);
}

fn request_sense(cdb: &[u8; 16], data_in: &mut Vec<u8>) -> Result<(), Sense> {
    // Nothing is pending: sense is returned with each failed command.
    data_in.extend_from_slice(&Sense::new(0, 0, 0).fixed());
    truncate(data_in, u64::from(cdb[4]));
    Ok(())
}

fn report_luns(cdb: &[u8; 16], data_in: &mut Vec<u8>) -> Result<(), Sense> {
    let allocation = be32(&cdb[6..]);
    if allocation < 16 || cdb[2] > 2 && !(0x10..=0x12).contains(&cdb[2]) {
        return Err(Sense::INVALID_FIELD_IN_CDB);
    }
    data_in.extend_from_slice(&8u32.to_be_bytes());
    data_in.extend_from_slice(&[0u8; 4]);
    data_in.extend_from_slice(&[0u8; 8]);
    truncate(data_in, allocation);
    Ok(())
}

/// The designator of a unit: a stable 16-byte NAA from its name.
pub(super) fn naa(name: &str) -> [u8; 16] {
    let d = ring::digest::digest(&ring::digest::SHA256, name.as_bytes());
    let mut n = [0u8; 16];
    n.copy_from_slice(&d.as_ref()[..16]);
    // NAA 6 (IEEE registered extended), company ID 0: the rest is ours.
    n[0] = 0x60;
    n[1] = 0;
    n[2] = 0;
    n[3] &= 0x0f;
    n
}

fn inquiry(lun: Option<&Lun>, cdb: &[u8; 16], data_in: &mut Vec<u8>) -> Result<(), Sense> {
    let evpd = cdb[1] & 0x01 != 0;
    let page = cdb[2];
    let allocation = be16(&cdb[3..]);
    if cdb[1] & 0xfe != 0 || (!evpd && page != 0) {
        return Err(Sense::INVALID_FIELD_IN_CDB);
    }
    // Peripheral qualifier 3 and type 0x1f: no unit at this LUN.
    let peripheral = if lun.is_some() { 0x00 } else { 0x7f };
    if !evpd {
        let mut d = vec![0u8; 66];
        d[0] = peripheral;
        d[2] = 0x06; // SPC-4
        d[3] = 0x12; // HiSup, response data format 2
        d[5] = 0x08; // 3PC: third-party copy (offload copy by token)
        d[4] = (d.len() - 5) as u8;
        d[7] = 0x02; // CmdQue
        d[8..16].copy_from_slice(b"STRATA  ");
        let product: &[u8; 16] = match lun.map(|l| l.export.read_only()) {
            Some(true) => b"SNAPSHOT        ",
            _ => b"VOLUME          ",
        };
        d[16..32].copy_from_slice(product);
        d[32..36].copy_from_slice(b"0001");
        // Version descriptors: SAM-5, SPC-4, SBC-3, iSCSI.
        for (i, v) in [0x00a0u16, 0x0460, 0x04c0, 0x0960].iter().enumerate() {
            d[58 + 2 * i..60 + 2 * i].copy_from_slice(&v.to_be_bytes());
        }
        data_in.extend_from_slice(&d);
        truncate(data_in, allocation);
        return Ok(());
    }
    let Some(lun) = lun else {
        return Err(Sense::LUN_NOT_SUPPORTED);
    };
    let name = lun.export.name();
    let body: Vec<u8> = match page {
        0x00 => vec![0x00, 0x80, 0x83, 0x8f, 0xb0, 0xb1, 0xb2],
        0x8f => copy::vpd_page(),
        0x80 => name.as_bytes().to_vec(),
        0x83 => {
            let mut b = Vec::new();
            let mut designator = |code_set: u8, assoc_type: u8, value: &[u8]| {
                // Protocol iSCSI (5) where PIV is set (a port's or target's).
                let piv = assoc_type & 0x30 != 0;
                b.push(if piv { 0x50 } else { 0 } | code_set);
                b.push(if piv { 0x80 } else { 0 } | assoc_type);
                b.push(0);
                b.push(value.len() as u8);
                b.extend_from_slice(value);
            };
            let mut vendor = b"STRATA  ".to_vec();
            vendor.extend_from_slice(name.as_bytes());
            // T10 vendor ID and NAA, both of the unit.
            designator(0x02, 0x01, &vendor);
            designator(0x01, 0x03, &naa(&name));
            // Relative target port 1.
            designator(0x01, 0x14, &[0, 0, 0, 1]);
            // SCSI name string of the target, NUL-ended, a multiple of 4.
            let mut iqn = lun.target.as_bytes().to_vec();
            iqn.push(0);
            iqn.resize(iqn.len().next_multiple_of(4), 0);
            designator(0x03, 0x28, &iqn);
            b
        }
        0xb0 => {
            let mut b = vec![0u8; 0x3c];
            b[0] = 0x01; // WSNZ
            b[1] = MAX_COMPARE_BLOCKS;
            b[2..4].copy_from_slice(&1u16.to_be_bytes());
            b[4..8].copy_from_slice(&MAX_TRANSFER_BLOCKS.to_be_bytes());
            b[8..12].copy_from_slice(&MAX_TRANSFER_BLOCKS.to_be_bytes());
            b[16..20].copy_from_slice(&MAX_UNMAP_BLOCKS.to_be_bytes());
            b[20..24].copy_from_slice(&MAX_UNMAP_DESCRIPTORS.to_be_bytes());
            b[24..28].copy_from_slice(&1u32.to_be_bytes());
            b[32..40].copy_from_slice(&u64::from(MAX_UNMAP_BLOCKS).to_be_bytes());
            b
        }
        0xb1 => {
            let mut b = vec![0u8; 0x3c];
            b[1] = 0x01; // non-rotating
            b
        }
        0xb2 => {
            // LBPU, LBPWS, LBPWS10, LBPRZ=1; thin provisioned.
            vec![0x00, 0xe0 | 0x04, 0x02, 0x00]
        }
        _ => return Err(Sense::INVALID_FIELD_IN_CDB),
    };
    data_in.extend_from_slice(&[peripheral, page]);
    data_in.extend_from_slice(&(body.len() as u16).to_be_bytes());
    data_in.extend_from_slice(&body);
    truncate(data_in, allocation);
    Ok(())
}

fn lba_status(lun: &Lun, cdb: &[u8; 16], data_in: &mut Vec<u8>) -> Result<(), Sense> {
    let lba = be64(&cdb[2..]);
    let allocation = be32(&cdb[10..]);
    if lba >= lun.blocks() {
        return Err(Sense::LBA_OUT_OF_RANGE);
    }
    // Enough descriptors to fill the allocation, at most 1024 per answer,
    // from maps read 1 GiB at a time (what one query holds grows with the
    // fragmentation of that window only).
    const WINDOW_BLOCKS: u64 = 1 << 18;
    let room = (allocation.saturating_sub(8) / 16).clamp(1, 1024) as usize;
    let end = lba + (lun.blocks() - lba).min(u64::from(u32::MAX));
    let mut d = vec![0u8; 8];
    let mut window = lba;
    'windows: while window < end {
        let window_end = (window + WINDOW_BLOCKS).min(end);
        let extents = lun
            .export
            .block_status(window * BLOCK, (window_end - window) * BLOCK)
            .map_err(|e| failed(lun, "block_status", &e, false))?;
        let mut at = window;
        for e in extents {
            let blocks = (e.len / BLOCK).min(window_end - at);
            if blocks == 0 {
                continue;
            }
            // Merge with the last descriptor if it has the same state.
            let state = u8::from(e.zero);
            let n = (d.len() - 8) / 16;
            if n > 0 && d[d.len() - 4] == state {
                let last = d.len() - 16;
                let count = be32(&d[last + 8..]) + blocks;
                if count <= u64::from(u32::MAX) {
                    d[last + 8..last + 12].copy_from_slice(&(count as u32).to_be_bytes());
                    at += blocks;
                    continue;
                }
            }
            if n == room {
                break 'windows;
            }
            d.extend_from_slice(&at.to_be_bytes());
            d.extend_from_slice(&(blocks as u32).to_be_bytes());
            d.extend_from_slice(&[state, 0, 0, 0]);
            at += blocks;
        }
        window = window_end;
    }
    let n = (d.len() - 4) as u32;
    d[..4].copy_from_slice(&n.to_be_bytes());
    data_in.extend_from_slice(&d);
    truncate(data_in, allocation);
    Ok(())
}

fn verify(lun: &Lun, cdb: &[u8; 16], data_out: &[u8]) -> Result<(), Sense> {
    let r = rw(cdb).expect("a verify CDB");
    let (offset, len) = lun.range(r.lba, r.blocks)?;
    let mut have = vec![0u8; len as usize];
    lun.export
        .read(offset, &mut have)
        .map_err(|e| failed(lun, "read", &e, false))?;
    let equal = match (cdb[1] >> 1) & 3 {
        0 => true,
        1 => have == data_out,
        _ => have.chunks(BLOCK as usize).all(|b| b == data_out),
    };
    if equal {
        Ok(())
    } else {
        Err(Sense::MISCOMPARE)
    }
}

fn compare_and_write(lun: &Lun, cdb: &[u8; 16], data_out: &[u8]) -> Result<(), Sense> {
    let blocks = u64::from(cdb[13]);
    let (offset, len) = lun.range(be64(&cdb[2..]), blocks)?;
    if len == 0 {
        return Ok(());
    }
    let (expect, data) = data_out.split_at(len as usize);
    let fua = cdb[1] & 0x08 != 0;
    let started = Instant::now();
    match lun.export.compare_and_write(offset, expect, data, fua) {
        Ok(None) => {
            lun.metrics.write.observe(len, started.elapsed());
            Ok(())
        }
        Ok(Some(at)) => Err(Sense {
            info: Some(at as u32),
            ..Sense::MISCOMPARE
        }),
        Err(e) => Err(failed(lun, "compare_and_write", &e, true)),
    }
}

/// The commands this unit runs: opcode, service action, CDB length.
const COMMANDS: &[(u8, Option<u8>, u8)] = &[
    (TEST_UNIT_READY, None, 6),
    (REQUEST_SENSE, None, 6),
    (READ_6, None, 6),
    (WRITE_6, None, 6),
    (INQUIRY, None, 6),
    (MODE_SELECT_6, None, 6),
    (MODE_SENSE_6, None, 6),
    (START_STOP_UNIT, None, 6),
    (READ_CAPACITY_10, None, 10),
    (READ_10, None, 10),
    (WRITE_10, None, 10),
    (VERIFY_10, None, 10),
    (WRITE_VERIFY_10, None, 10),
    (PREFETCH_10, None, 10),
    (SYNCHRONIZE_CACHE_10, None, 10),
    (WRITE_SAME_10, None, 10),
    (UNMAP, None, 10),
    (MODE_SELECT_10, None, 10),
    (MODE_SENSE_10, None, 10),
    (READ_16, None, 16),
    (COMPARE_AND_WRITE, None, 16),
    (WRITE_16, None, 16),
    (VERIFY_16, None, 16),
    (WRITE_VERIFY_16, None, 16),
    (PREFETCH_16, None, 16),
    (SYNCHRONIZE_CACHE_16, None, 16),
    (WRITE_SAME_16, None, 16),
    (SERVICE_ACTION_IN_16, Some(READ_CAPACITY_16), 16),
    (SERVICE_ACTION_IN_16, Some(GET_LBA_STATUS), 16),
    (REPORT_LUNS, None, 12),
    (MAINTENANCE_IN, Some(REPORT_SUPPORTED_OPCODES), 12),
    (READ_12, None, 12),
    (WRITE_12, None, 12),
    (WRITE_VERIFY_12, None, 12),
    (VERIFY_12, None, 12),
    (RESERVE_6, None, 6),
    (RELEASE_6, None, 6),
    (PERSISTENT_RESERVE_IN, Some(0), 10),
    (PERSISTENT_RESERVE_IN, Some(1), 10),
    (PERSISTENT_RESERVE_IN, Some(2), 10),
    (PERSISTENT_RESERVE_IN, Some(3), 10),
    (PERSISTENT_RESERVE_OUT, Some(0), 10),
    (PERSISTENT_RESERVE_OUT, Some(1), 10),
    (PERSISTENT_RESERVE_OUT, Some(2), 10),
    (PERSISTENT_RESERVE_OUT, Some(3), 10),
    (PERSISTENT_RESERVE_OUT, Some(4), 10),
    (PERSISTENT_RESERVE_OUT, Some(5), 10),
    (PERSISTENT_RESERVE_OUT, Some(6), 10),
    (THIRD_PARTY_COPY_OUT, Some(copy::EXTENDED_COPY), 16),
    (THIRD_PARTY_COPY_OUT, Some(copy::POPULATE_TOKEN), 16),
    (THIRD_PARTY_COPY_OUT, Some(copy::WRITE_USING_TOKEN), 16),
    (THIRD_PARTY_COPY_IN, Some(copy::COPY_STATUS), 16),
    (THIRD_PARTY_COPY_IN, Some(copy::OPERATING_PARAMETERS), 16),
    (
        THIRD_PARTY_COPY_IN,
        Some(copy::RECEIVE_ROD_TOKEN_INFORMATION),
        16,
    ),
];

/// REPORT SUPPORTED OPERATION CODES (SPC-5 §6.35): all commands, or one.
/// The CDB usage map marks every bit of the CDB but the control byte as
/// examined (a superset: reserved bits are among them).
fn supported_opcodes(cdb: &[u8; 16], data_in: &mut Vec<u8>) -> Result<(), Sense> {
    let rctd = cdb[2] & 0x80 != 0;
    let option = cdb[2] & 0x07;
    let (opcode, action) = (cdb[3], be16(&cdb[4..]) as u8);
    let allocation = be32(&cdb[6..]);
    // The command timeouts descriptor: no timeouts are known.
    let timeouts = [0, 0x0a, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    match option {
        0 => {
            let mut d = vec![0u8; 4];
            for &(op, sa, len) in COMMANDS {
                d.extend_from_slice(&[op, 0]);
                d.extend_from_slice(&u16::from(sa.unwrap_or(0)).to_be_bytes());
                d.push(0);
                d.push(u8::from(sa.is_some()) | if rctd { 0x02 } else { 0 });
                d.extend_from_slice(&u16::from(len).to_be_bytes());
                if rctd {
                    d.extend_from_slice(&timeouts);
                }
            }
            let n = (d.len() - 4) as u32;
            d[..4].copy_from_slice(&n.to_be_bytes());
            data_in.extend_from_slice(&d);
        }
        1..=3 => {
            let takes_action = COMMANDS
                .iter()
                .any(|&(op, sa, _)| op == opcode && sa.is_some());
            // 1 names an opcode without service actions, 2 one with; 3 either.
            if (option == 1 && takes_action) || (option == 2 && !takes_action && known(opcode)) {
                return Err(Sense::INVALID_FIELD_IN_CDB);
            }
            let found = COMMANDS.iter().find(|&&(op, sa, _)| {
                op == opcode && (sa.is_none() || option == 1 || sa == Some(action))
            });
            let mut d = vec![0u8; 4];
            if let Some(&(op, _, len)) = found {
                d[1] = 0x03 | if rctd { 0x80 } else { 0 };
                d[2..4].copy_from_slice(&u16::from(len).to_be_bytes());
                let mut usage = vec![0xffu8; usize::from(len)];
                usage[0] = op;
                if let Some(&(_, Some(sa), _)) = found {
                    usage[1] = 0xe0 | sa;
                }
                usage[usize::from(len) - 1] = 0;
                d.extend_from_slice(&usage);
                if rctd {
                    d.extend_from_slice(&timeouts);
                }
            } else {
                d[1] = 0x01; // not supported
            }
            data_in.extend_from_slice(&d);
        }
        _ => return Err(Sense::INVALID_FIELD_IN_CDB),
    }
    truncate(data_in, allocation);
    Ok(())
}

fn known(opcode: u8) -> bool {
    COMMANDS.iter().any(|&(op, _, _)| op == opcode)
}

fn write_same(lun: &Lun, cdb: &[u8; 16], data_out: &[u8]) -> Result<(), Sense> {
    let r = rw(cdb).expect("a write same CDB");
    let (offset, len) = lun.range(r.lba, r.blocks)?;
    let unmap = cdb[1] & 0x08 != 0;
    let ndob = cdb[0] == WRITE_SAME_16 && cdb[1] & 0x01 != 0;
    let started = Instant::now();
    if ndob || data_out.iter().all(|&b| b == 0) {
        let flags = ZeroFlags {
            no_hole: !unmap,
            fast: false,
        };
        lun.export
            .write_zeroes(offset, len, flags)
            .map_err(|e| failed(lun, "write_zeroes", &e, true))?;
        lun.metrics.zero.observe(len, started.elapsed());
        return Ok(());
    }
    // A pattern that is not zeros is written as data, UNMAP or not: an
    // unmapped block reads as zeros (LBPRZ), and SBC lets the target
    // write instead of unmapping.
    // The pattern repeated into at most 1 MiB, written as often as needed.
    let chunk_blocks = r.blocks.min(256) as usize;
    let pattern = data_out.repeat(chunk_blocks);
    let mut at = 0;
    while at < len {
        let n = (len - at).min(pattern.len() as u64);
        lun.export
            .write(offset + at, &pattern[..n as usize], false)
            .map_err(|e| failed(lun, "write", &e, true))?;
        at += n;
    }
    lun.metrics.write.observe(len, started.elapsed());
    Ok(())
}

fn unmap(lun: &Lun, data_out: &[u8]) -> Result<(), Sense> {
    if data_out.is_empty() {
        return Ok(());
    }
    if data_out.len() < 8 {
        return Err(Sense::PARAMETER_LIST_LENGTH);
    }
    let descriptors = be16(&data_out[2..]) as usize;
    if !descriptors.is_multiple_of(16) || 8 + descriptors > data_out.len() {
        return Err(Sense::PARAMETER_LIST_LENGTH);
    }
    let list: Vec<(u64, u64)> = data_out[8..8 + descriptors]
        .chunks(16)
        .map(|d| (be64(d), be32(&d[8..])))
        .collect();
    // Every descriptor is checked before any is applied.
    for &(lba, blocks) in &list {
        if blocks > u64::from(MAX_UNMAP_BLOCKS) {
            return Err(Sense::INVALID_FIELD_IN_PARAMETERS);
        }
        lun.range(lba, blocks)?;
    }
    for (lba, blocks) in list {
        if blocks == 0 {
            continue;
        }
        let started = Instant::now();
        lun.export
            .trim(lba * BLOCK, blocks * BLOCK)
            .map_err(|e| failed(lun, "trim", &e, true))?;
        lun.metrics.trim.observe(blocks * BLOCK, started.elapsed());
    }
    Ok(())
}

/// The mode pages this unit has, as current values (`changeable` gives
/// their masks instead: nothing can be changed).
fn mode_pages(page: u8, changeable: bool) -> Option<Vec<u8>> {
    let caching = || {
        let mut p = vec![0u8; 20];
        p[0] = 0x08;
        p[1] = 0x12;
        if !changeable {
            p[2] = 0x04; // WCE: writes are durable at SYNCHRONIZE CACHE or FUA.
        }
        p
    };
    let control = || {
        let mut p = vec![0u8; 12];
        p[0] = 0x0a;
        p[1] = 0x0a;
        if !changeable {
            p[3] = 0x10; // unrestricted reordering
            p[8..10].copy_from_slice(&0xffffu16.to_be_bytes());
        }
        p
    };
    match page {
        0x08 => Some(caching()),
        0x0a => Some(control()),
        0x3f => Some([caching(), control()].concat()),
        _ => None,
    }
}

fn mode_sense(lun: &Lun, cdb: &[u8; 16], data_in: &mut Vec<u8>) -> Result<(), Sense> {
    let ten = cdb[0] == MODE_SENSE_10;
    let dbd = cdb[1] & 0x08 != 0;
    let pc = cdb[2] >> 6;
    let page = cdb[2] & 0x3f;
    let subpage = cdb[3];
    let allocation = if ten {
        be16(&cdb[7..])
    } else {
        u64::from(cdb[4])
    };
    if pc == 3 {
        return Err(Sense::SAVING_NOT_SUPPORTED);
    }
    if subpage != 0 && subpage != 0xff {
        return Err(Sense::INVALID_FIELD_IN_CDB);
    }
    let pages = mode_pages(page, pc == 1).ok_or(Sense::INVALID_FIELD_IN_CDB)?;
    let mut descriptor = Vec::new();
    if !dbd {
        let blocks = lun.blocks();
        descriptor.push(0);
        let n = blocks.min(0xff_ffff) as u32;
        descriptor.extend_from_slice(&n.to_be_bytes()[1..]);
        descriptor.push(0);
        descriptor.extend_from_slice(&(BLOCK as u32).to_be_bytes()[1..]);
    }
    // Device-specific: WP for a read-only unit, DPOFUA.
    let specific = if lun.export.read_only() { 0x80 } else { 0 } | 0x10;
    if ten {
        let len = 6 + descriptor.len() + pages.len();
        data_in.extend_from_slice(&(len as u16).to_be_bytes());
        data_in.extend_from_slice(&[0, specific, 0, 0]);
        data_in.extend_from_slice(&(descriptor.len() as u16).to_be_bytes());
    } else {
        let len = 3 + descriptor.len() + pages.len();
        data_in.extend_from_slice(&[len as u8, 0, specific, descriptor.len() as u8]);
    }
    data_in.extend_from_slice(&descriptor);
    data_in.extend_from_slice(&pages);
    truncate(data_in, allocation);
    Ok(())
}

/// MODE SELECT: nothing is changeable, so a page is accepted only if it
/// repeats the current values.
fn mode_select(lun: &Lun, cdb: &[u8; 16], data: &[u8]) -> Result<(), Sense> {
    let ten = cdb[0] == MODE_SELECT_10;
    if cdb[1] & 0x01 != 0 {
        // SP: saving pages is not supported.
        return Err(Sense::INVALID_FIELD_IN_CDB);
    }
    if data.is_empty() {
        return Ok(());
    }
    let header = if ten { 8 } else { 4 };
    if data.len() < header {
        return Err(Sense::PARAMETER_LIST_LENGTH);
    }
    let descriptor = if ten {
        be16(&data[6..]) as usize
    } else {
        usize::from(data[3])
    };
    let mut at = header + descriptor;
    if at > data.len() {
        return Err(Sense::PARAMETER_LIST_LENGTH);
    }
    let _ = lun;
    while at < data.len() {
        if data.len() - at < 2 {
            return Err(Sense::PARAMETER_LIST_LENGTH);
        }
        let page = data[at] & 0x3f;
        let end = at + 2 + usize::from(data[at + 1]);
        let ours = mode_pages(page, false).ok_or(Sense::INVALID_FIELD_IN_PARAMETERS)?;
        if page == 0x3f || end > data.len() || data[at + 1..end] != ours[1..] {
            return Err(Sense::INVALID_FIELD_IN_PARAMETERS);
        }
        at = end;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Pool, PoolOptions};
    use crate::metrics::Metrics;

    fn lun(dir: &std::path::Path, size: u64) -> Lun {
        let pool = Pool::open(dir, PoolOptions::default()).unwrap();
        let id = pool.create_volume(size).unwrap().id;
        let export = Export::Volume(pool.volume(id).unwrap());
        let metrics = Metrics::new();
        Lun {
            metrics: IoMetrics::new(&metrics, &export.name()),
            copies: copy::Nexus::new(
                std::sync::Arc::new(copy::CopyManager::new(pool.clone(), Default::default())),
                &metrics,
                &export.name(),
            ),
            port: reserve::Port::new(Default::default(), export.name(), "iqn.test", [0; 6]),
            export,
            target: format!("iqn.test:{id}"),
        }
    }

    fn cdb(bytes: &[u8]) -> [u8; 16] {
        let mut c = [0u8; 16];
        c[..bytes.len()].copy_from_slice(bytes);
        c
    }

    fn unmap_list(descriptors: &[(u64, u32)]) -> Vec<u8> {
        let mut d = vec![0u8; 8];
        d[0..2].copy_from_slice(&((6 + 16 * descriptors.len()) as u16).to_be_bytes());
        d[2..4].copy_from_slice(&((16 * descriptors.len()) as u16).to_be_bytes());
        for &(lba, n) in descriptors {
            d.extend_from_slice(&lba.to_be_bytes());
            d.extend_from_slice(&n.to_be_bytes());
            d.extend_from_slice(&[0; 4]);
        }
        d
    }

    #[test]
    fn unmap_checks_every_descriptor_before_any_applies() {
        let dir = tempfile::tempdir().unwrap();
        let lun = lun(dir.path(), 1 << 20);
        lun.export.write(0, &[0xaa; 8192], false).unwrap();
        let c = cdb(&[UNMAP]);
        let mut out = Vec::new();
        // The second descriptor is past the end: nothing is unmapped.
        let bad = unmap_list(&[(0, 1), (255, 2)]);
        assert_eq!(
            execute(Some(&lun), &c, &bad, &mut out),
            Err(Sense::LBA_OUT_OF_RANGE)
        );
        let mut back = vec![0u8; 8192];
        lun.export.read(0, &mut back).unwrap();
        assert_eq!(back, vec![0xaa; 8192]);
        // Truncated lists and a descriptor length that is no multiple of 16.
        for list in [vec![0u8; 5], {
            let mut l = unmap_list(&[(0, 1)]);
            l[3] = 15;
            l
        }] {
            assert_eq!(
                execute(Some(&lun), &c, &list, &mut out),
                Err(Sense::PARAMETER_LIST_LENGTH)
            );
        }
        assert_eq!(
            execute(Some(&lun), &c, &unmap_list(&[(1, 1)]), &mut out),
            Ok(())
        );
        lun.export.read(0, &mut back).unwrap();
        assert_eq!(
            (&back[..4096], &back[4096..]),
            (&[0xaa; 4096][..], &[0u8; 4096][..])
        );
        // GET LBA STATUS: block 0 mapped, 1 deallocated, from 0 on.
        let status = cdb(&[
            SERVICE_ACTION_IN_16,
            GET_LBA_STATUS,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            1,
            0,
        ]);
        execute(Some(&lun), &status, &[], &mut out).unwrap();
        assert_eq!(&out[8..16], &0u64.to_be_bytes());
        assert_eq!((&out[16..20], out[20]), (&1u32.to_be_bytes()[..], 0));
        assert_eq!(&out[24..32], &1u64.to_be_bytes());
        assert_eq!(out[36], 1);
    }

    #[test]
    fn mode_select_takes_only_the_current_values() {
        let dir = tempfile::tempdir().unwrap();
        let lun = lun(dir.path(), 1 << 20);
        let mut out = Vec::new();
        let sense = cdb(&[MODE_SENSE_10, 0x08, 0x08, 0, 0, 0, 0, 0x01, 0x00]);
        execute(Some(&lun), &sense, &[], &mut out).unwrap();
        // Send back what MODE SENSE gave (the data length field zeroed).
        let mut same = out.clone();
        same[0..2].copy_from_slice(&[0, 0]);
        let select = cdb(&[MODE_SELECT_10, 0x10, 0, 0, 0, 0, 0, 0, same.len() as u8]);
        assert_eq!(execute(Some(&lun), &select, &same, &mut out), Ok(()));
        // Turning the write cache off is refused; so is a short page.
        let mut off = same.clone();
        off[8 + 2] &= !0x04;
        assert_eq!(
            execute(Some(&lun), &select, &off, &mut out),
            Err(Sense::INVALID_FIELD_IN_PARAMETERS)
        );
        assert_eq!(
            execute(Some(&lun), &select, &same[..12], &mut out),
            Err(Sense::INVALID_FIELD_IN_PARAMETERS)
        );
        // Saved values do not exist.
        let saved = cdb(&[MODE_SENSE_10, 0, 0xc8, 0, 0, 0, 0, 0, 0xff]);
        assert_eq!(
            execute(Some(&lun), &saved, &[], &mut out),
            Err(Sense::SAVING_NOT_SUPPORTED)
        );
    }

    #[test]
    fn no_unit_answers_only_inquiry_and_report_luns() {
        let inquiry = cdb(&[INQUIRY, 0, 0, 0, 36]);
        let mut out = Vec::new();
        execute(None, &inquiry, &[], &mut out).unwrap();
        assert_eq!((out[0], out.len()), (0x7f, 36));
        let read = cdb(&[READ_10, 0, 0, 0, 0, 0, 0, 0, 1]);
        assert_eq!(plan(None, &read, 4096), Err(Sense::LUN_NOT_SUPPORTED));
        let luns = cdb(&[REPORT_LUNS, 0, 0, 0, 0, 0, 0, 0, 0, 16]);
        execute(None, &luns, &[], &mut out).unwrap();
        assert_eq!(out, [0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    }
}
