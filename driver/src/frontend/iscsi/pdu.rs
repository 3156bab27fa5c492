//! iSCSI PDUs on the wire (RFC 7143 §11): the 48-byte basic header
//! segment, additional header segments, the data segment and its padding,
//! and the optional CRC32C digests. Reading is bounded: a PDU whose data
//! segment is larger than what this side declared is refused before any
//! of it is read.

use std::io::{self, Read, Write};

/// Size of the basic header segment.
pub const BHS_LEN: usize = 48;

/// Initiator opcodes.
pub mod op {
    pub const NOP_OUT: u8 = 0x00;
    pub const SCSI_COMMAND: u8 = 0x01;
    pub const TASK_MGMT: u8 = 0x02;
    pub const LOGIN: u8 = 0x03;
    pub const TEXT: u8 = 0x04;
    pub const DATA_OUT: u8 = 0x05;
    pub const LOGOUT: u8 = 0x06;
    pub const SNACK: u8 = 0x10;
    // Target opcodes.
    pub const NOP_IN: u8 = 0x20;
    pub const SCSI_RESPONSE: u8 = 0x21;
    pub const TASK_MGMT_RESPONSE: u8 = 0x22;
    pub const LOGIN_RESPONSE: u8 = 0x23;
    pub const TEXT_RESPONSE: u8 = 0x24;
    pub const DATA_IN: u8 = 0x25;
    pub const LOGOUT_RESPONSE: u8 = 0x26;
    pub const R2T: u8 = 0x31;
    pub const REJECT: u8 = 0x3f;
}

/// The "no tag" value of task tags and target transfer tags.
pub const NO_TAG: u32 = 0xffff_ffff;

/// Which digests a connection uses, as negotiated at login.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Digests {
    pub header: bool,
    pub data: bool,
}

/// Why a PDU could not be read.
#[derive(Debug, thiserror::Error)]
pub enum PduError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("data segment of {len} bytes is over the {limit} bytes this target accepts")]
    TooLong { len: usize, limit: usize },
    #[error("header digest mismatch")]
    HeaderDigest,
    /// The header is good, so the connection may answer with a Reject.
    #[error("data digest mismatch")]
    DataDigest(Box<Pdu>),
}

impl PduError {
    /// A short name for the protocol-error metric.
    pub fn kind(&self) -> &'static str {
        match self {
            PduError::Io(_) => "io",
            PduError::TooLong { .. } => "data_too_long",
            PduError::HeaderDigest => "header_digest",
            PduError::DataDigest(_) => "data_digest",
        }
    }
}

/// One PDU: its basic header and data segment (additional header
/// segments are read and dropped: no command this target runs uses one).
#[derive(Clone, PartialEq, Eq)]
pub struct Pdu {
    pub bhs: [u8; BHS_LEN],
    pub ahs_len: usize,
    pub data: Vec<u8>,
}

impl std::fmt::Debug for Pdu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pdu")
            .field("opcode", &format_args!("{:#04x}", self.opcode()))
            .field("itt", &format_args!("{:#010x}", self.itt()))
            .field("data", &self.data.len())
            .finish()
    }
}

impl Pdu {
    /// A PDU with the given opcode (and the F bit set: every target PDU
    /// but a Data-In in the middle of a sequence or a continued text
    /// answer is final).
    pub fn new(opcode: u8) -> Self {
        let mut bhs = [0u8; BHS_LEN];
        bhs[0] = opcode;
        bhs[1] = 0x80;
        Pdu {
            bhs,
            ahs_len: 0,
            data: Vec::new(),
        }
    }

    pub fn opcode(&self) -> u8 {
        self.bhs[0] & 0x3f
    }

    /// The I bit: an immediate command (it takes no CmdSN of its own).
    pub fn immediate(&self) -> bool {
        self.bhs[0] & 0x40 != 0
    }

    /// The F bit.
    pub fn is_final(&self) -> bool {
        self.bhs[1] & 0x80 != 0
    }

    pub fn flags(&self) -> u8 {
        self.bhs[1]
    }

    pub fn u16_at(&self, at: usize) -> u16 {
        u16::from_be_bytes([self.bhs[at], self.bhs[at + 1]])
    }

    pub fn u32_at(&self, at: usize) -> u32 {
        u32::from_be_bytes(self.bhs[at..at + 4].try_into().expect("4 bytes"))
    }

    pub fn u64_at(&self, at: usize) -> u64 {
        u64::from_be_bytes(self.bhs[at..at + 8].try_into().expect("8 bytes"))
    }

    pub fn set_u16(&mut self, at: usize, v: u16) -> &mut Self {
        self.bhs[at..at + 2].copy_from_slice(&v.to_be_bytes());
        self
    }

    pub fn set_u32(&mut self, at: usize, v: u32) -> &mut Self {
        self.bhs[at..at + 4].copy_from_slice(&v.to_be_bytes());
        self
    }

    pub fn set_u64(&mut self, at: usize, v: u64) -> &mut Self {
        self.bhs[at..at + 8].copy_from_slice(&v.to_be_bytes());
        self
    }

    /// The initiator task tag.
    pub fn itt(&self) -> u32 {
        self.u32_at(16)
    }

    pub fn lun(&self) -> u64 {
        self.u64_at(8)
    }

    /// The DataSegmentLength field.
    pub fn data_len(&self) -> usize {
        (usize::from(self.bhs[5]) << 16)
            | (usize::from(self.bhs[6]) << 8)
            | usize::from(self.bhs[7])
    }

    /// Reads one PDU. A data segment over `max_data` bytes is refused
    /// after the header, before any of it is read.
    pub fn read_from(
        r: &mut impl Read,
        digests: Digests,
        max_data: usize,
    ) -> Result<Pdu, PduError> {
        let mut bhs = [0u8; BHS_LEN];
        r.read_exact(&mut bhs)?;
        let mut pdu = Pdu {
            bhs,
            ahs_len: usize::from(bhs[4]) * 4,
            data: Vec::new(),
        };
        let len = pdu.data_len();
        if len > max_data {
            return Err(PduError::TooLong {
                len,
                limit: max_data,
            });
        }
        // At most 1020 bytes: TotalAHSLength is one byte of 4-byte words.
        let mut ahs = vec![0u8; pdu.ahs_len];
        r.read_exact(&mut ahs)?;
        if digests.header {
            let mut d = [0u8; 4];
            r.read_exact(&mut d)?;
            let want = crc32c::crc32c_append(crc32c::crc32c(&bhs), &ahs);
            if u32::from_le_bytes(d) != want {
                return Err(PduError::HeaderDigest);
            }
        }
        if len > 0 {
            let padded = len.next_multiple_of(4);
            let mut data = vec![0u8; padded];
            r.read_exact(&mut data)?;
            let bad_digest = if digests.data {
                let mut d = [0u8; 4];
                r.read_exact(&mut d)?;
                u32::from_le_bytes(d) != crc32c::crc32c(&data)
            } else {
                false
            };
            data.truncate(len);
            pdu.data = data;
            if bad_digest {
                return Err(PduError::DataDigest(Box::new(pdu)));
            }
        }
        Ok(pdu)
    }

    /// Writes the PDU (with its data segment, padded) in one write.
    pub fn write_to(&mut self, w: &mut impl Write, digests: Digests) -> io::Result<()> {
        self.write_with(w, digests, &[])
    }

    /// Writes the PDU with `data` as its data segment instead of its own
    /// (so a read's buffer is sent without another copy into the PDU).
    pub fn write_with(
        &mut self,
        w: &mut impl Write,
        digests: Digests,
        data: &[u8],
    ) -> io::Result<()> {
        let data: &[u8] = if data.is_empty() { &self.data } else { data };
        let len = data.len();
        assert!(len < 1 << 24, "data segment over 16 MiB");
        self.bhs[4] = 0;
        self.bhs[5] = (len >> 16) as u8;
        self.bhs[6] = (len >> 8) as u8;
        self.bhs[7] = len as u8;
        let pad = len.next_multiple_of(4) - len;
        let mut out = Vec::with_capacity(BHS_LEN + 8 + len + pad);
        out.extend_from_slice(&self.bhs);
        if digests.header {
            out.extend_from_slice(&crc32c::crc32c(&self.bhs).to_le_bytes());
        }
        if len > 0 {
            out.extend_from_slice(data);
            out.extend_from_slice(&[0u8; 3][..pad]);
            if digests.data {
                let crc = crc32c::crc32c_append(crc32c::crc32c(data), &[0u8; 3][..pad]);
                out.extend_from_slice(&crc.to_le_bytes());
            }
        }
        w.write_all(&out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pdu_reads_back_as_written_with_and_without_digests() {
        for digests in [
            Digests::default(),
            Digests {
                header: true,
                data: true,
            },
        ] {
            for len in [0usize, 1, 3, 4, 5, 8191] {
                let mut p = Pdu::new(op::TEXT_RESPONSE);
                p.set_u32(16, 0x1234_5678);
                p.data = (0..len).map(|i| i as u8).collect();
                let mut wire = Vec::new();
                p.write_to(&mut wire, digests).unwrap();
                assert_eq!(wire.len() % 4, 0);
                let back = Pdu::read_from(&mut wire.as_slice(), digests, 8192).unwrap();
                assert_eq!(back, p);
                assert_eq!(back.itt(), 0x1234_5678);
            }
        }
    }

    #[test]
    fn oversized_segments_and_bad_digests_are_refused() {
        let mut p = Pdu::new(op::SCSI_RESPONSE);
        p.data = vec![7; 100];
        let both = Digests {
            header: true,
            data: true,
        };
        let mut wire = Vec::new();
        p.write_to(&mut wire, both).unwrap();
        assert!(matches!(
            Pdu::read_from(&mut wire.as_slice(), both, 99),
            Err(PduError::TooLong { len: 100, .. })
        ));
        let mut bad_header = wire.clone();
        bad_header[2] ^= 1;
        assert!(matches!(
            Pdu::read_from(&mut bad_header.as_slice(), both, 8192),
            Err(PduError::HeaderDigest)
        ));
        let mut bad_data = wire.clone();
        bad_data[BHS_LEN + 4 + 10] ^= 1;
        assert!(matches!(
            Pdu::read_from(&mut bad_data.as_slice(), both, 8192),
            Err(PduError::DataDigest(p)) if p.data.len() == 100
        ));
        // A truncated PDU is an I/O error, not a panic.
        assert!(matches!(
            Pdu::read_from(&mut &wire[..60], both, 8192),
            Err(PduError::Io(_))
        ));
    }
}
