//! A hand-driven iSCSI initiator for tests and benchmarks: one
//! connection, one command at a time, no digests.

use std::io::Read;
use std::net::TcpStream;
use std::time::Duration;

use strata::frontend::iscsi::pdu::{Digests, NO_TAG, Pdu, op};

const BLOCK: usize = 4096;
/// Bytes per Data-Out PDU (the target takes up to 256 KiB).
const DATA_OUT: usize = 64 << 10;

/// A hand-driven initiator: one connection, one command at a time.
pub struct Initiator {
    pub s: TcpStream,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    pub itt: u32,
}

/// A command's outcome: SCSI status, Data-In bytes, sense key/ASC/ASCQ
/// (for CHECK CONDITION) and the response flags' residual bits.
#[derive(Debug)]
pub struct Answer {
    pub status: u8,
    pub data: Vec<u8>,
    pub sense: Option<(u8, u8, u8)>,
    pub residual: (u8, u32),
}

impl Initiator {
    pub fn connect(port: u16) -> Initiator {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_nodelay(true).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        Initiator {
            s,
            cmd_sn: 1,
            exp_stat_sn: 0,
            itt: 1,
        }
    }

    pub fn send(&mut self, pdu: &mut Pdu) {
        pdu.write_to(&mut self.s, Digests::default()).unwrap();
    }

    pub fn recv(&mut self) -> Pdu {
        let p = Pdu::read_from(&mut self.s, Digests::default(), 1 << 20).unwrap();
        if matches!(
            p.opcode(),
            op::SCSI_RESPONSE | op::LOGIN_RESPONSE | op::NOP_IN | op::TEXT_RESPONSE
        ) || (p.opcode() == op::DATA_IN && p.flags() & 0x01 != 0)
        {
            self.exp_stat_sn = p.u32_at(24).wrapping_add(1);
        }
        p
    }

    /// Logs in with `pairs`; returns the final response's status and data.
    pub fn login_with(&mut self, pairs: &[(&str, &str)]) -> (u16, String) {
        let mut p = Pdu::new(op::LOGIN);
        p.bhs[0] |= 0x40;
        // Transit from operational negotiation to full feature phase.
        p.bhs[1] = 0x80 | (1 << 2) | 3;
        p.bhs[8..14].copy_from_slice(&[0x40, 0, 0, 0, 0, 1]);
        p.set_u32(16, self.itt).set_u32(24, self.cmd_sn);
        for (k, v) in pairs {
            p.data.extend_from_slice(format!("{k}={v}\0").as_bytes());
        }
        self.send(&mut p);
        let r = self.recv();
        assert_eq!(r.opcode(), op::LOGIN_RESPONSE);
        (r.u16_at(36), String::from_utf8_lossy(&r.data).into_owned())
    }

    pub fn login(&mut self, target: &str) {
        let (status, text) = self.login_with(&[
            ("InitiatorName", "iqn.2026-12.dev.strata:test"),
            ("SessionType", "Normal"),
            ("TargetName", target),
            ("MaxRecvDataSegmentLength", "65536"),
        ]);
        assert_eq!(status, 0, "login refused: {text}");
    }

    /// Runs one command: sends `out` as immediate data, the rest when the
    /// target asks (R2T), gathers Data-In until the status.
    pub fn command(&mut self, cdb: &[u8], edtl: u32, out: &[u8], fua_write: bool) -> Answer {
        let itt = self.itt;
        self.itt += 1;
        let mut p = Pdu::new(op::SCSI_COMMAND);
        p.bhs[1] = 0x80
            | if out.is_empty() && !fua_write {
                0x40
            } else {
                0x20
            };
        p.set_u32(16, itt)
            .set_u32(20, edtl)
            .set_u32(24, self.cmd_sn)
            .set_u32(28, self.exp_stat_sn);
        p.bhs[32..32 + cdb.len()].copy_from_slice(cdb);
        self.cmd_sn += 1;
        let first = out.len().min(8192);
        p.data = out[..first].to_vec();
        self.send(&mut p);
        let mut data = Vec::new();
        loop {
            let r = self.recv();
            match r.opcode() {
                op::R2T => {
                    let (ttt, at, len) =
                        (r.u32_at(20), r.u32_at(40) as usize, r.u32_at(44) as usize);
                    for (i, chunk) in out[at..at + len].chunks(DATA_OUT).enumerate() {
                        let mut d = Pdu::new(op::DATA_OUT);
                        let last = at + (i + 1) * DATA_OUT >= at + len;
                        d.bhs[1] = if last { 0x80 } else { 0 };
                        d.set_u32(16, itt)
                            .set_u32(20, ttt)
                            .set_u32(36, i as u32)
                            .set_u32(40, (at + i * DATA_OUT) as u32);
                        d.data = chunk.to_vec();
                        self.send(&mut d);
                    }
                }
                op::DATA_IN => {
                    assert_eq!(r.u32_at(40) as usize, data.len(), "Data-In out of order");
                    data.extend_from_slice(&r.data);
                    if r.flags() & 0x01 != 0 {
                        return Answer {
                            status: r.bhs[3],
                            data,
                            sense: None,
                            residual: (r.flags() & 0x06, r.u32_at(44)),
                        };
                    }
                }
                op::SCSI_RESPONSE => {
                    assert_eq!(r.itt(), itt);
                    let sense =
                        (r.data.len() >= 16).then(|| (r.data[4] & 0x0f, r.data[14], r.data[15]));
                    return Answer {
                        status: r.bhs[3],
                        data,
                        sense,
                        residual: (r.flags() & 0x06, r.u32_at(44)),
                    };
                }
                other => panic!("unexpected opcode {other:#x}"),
            }
        }
    }

    pub fn write16(&mut self, lba: u64, data: &[u8], fua: bool) -> Answer {
        let mut cdb = [0u8; 16];
        cdb[0] = 0x8a;
        cdb[1] = if fua { 0x08 } else { 0 };
        cdb[2..10].copy_from_slice(&lba.to_be_bytes());
        cdb[10..14].copy_from_slice(&((data.len() / BLOCK) as u32).to_be_bytes());
        self.command(&cdb, data.len() as u32, data, true)
    }

    pub fn read16(&mut self, lba: u64, blocks: u32) -> Answer {
        let mut cdb = [0u8; 16];
        cdb[0] = 0x88;
        cdb[2..10].copy_from_slice(&lba.to_be_bytes());
        cdb[10..14].copy_from_slice(&blocks.to_be_bytes());
        self.command(&cdb, blocks * BLOCK as u32, &[], false)
    }

    pub fn sync_cache(&mut self) -> Answer {
        self.command(&[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], 0, &[], false)
    }

    /// A NOP-Out ping, answered with the same data.
    pub fn ping(&mut self) -> bool {
        let mut p = Pdu::new(op::NOP_OUT);
        p.bhs[0] |= 0x40;
        p.set_u32(16, 0xabcd)
            .set_u32(20, NO_TAG)
            .set_u32(24, self.cmd_sn);
        p.data = b"ping".to_vec();
        self.send(&mut p);
        let r = self.recv();
        r.opcode() == op::NOP_IN && r.itt() == 0xabcd && r.data == b"ping"
    }

    /// Whether the target closed the connection (EOF or reset).
    pub fn closed(&mut self) -> bool {
        let mut b = [0u8; 48];
        matches!(self.s.read(&mut b), Ok(0) | Err(_))
    }

    /// POPULATE TOKEN of `ranges` (first block, blocks) under list `id`.
    pub fn populate_token(&mut self, id: u32, ranges: &[(u64, u32)], timeout_s: u32) -> Answer {
        let mut p = vec![0u8; 16];
        p[0..2].copy_from_slice(&((14 + 16 * ranges.len()) as u16).to_be_bytes());
        p[4..8].copy_from_slice(&timeout_s.to_be_bytes());
        p[14..16].copy_from_slice(&((16 * ranges.len()) as u16).to_be_bytes());
        p.extend(range_descriptors(ranges));
        self.third_party_copy_out(0x10, id, &p)
    }

    /// RECEIVE ROD TOKEN INFORMATION of list `id`: the answer, and the
    /// token if it has one.
    pub fn receive_token(&mut self, id: u32) -> (Answer, Option<Vec<u8>>) {
        let mut cdb = [0u8; 16];
        cdb[0] = 0x84;
        cdb[1] = 0x07;
        cdb[2..6].copy_from_slice(&id.to_be_bytes());
        cdb[10..14].copy_from_slice(&1024u32.to_be_bytes());
        let a = self.command(&cdb, 1024, &[], false);
        let token = (a.status == 0 && a.data.len() >= 32)
            .then(|| {
                let at = 32 + usize::from(a.data[13]);
                let n = u32::from_be_bytes(a.data[at..at + 4].try_into().unwrap()) as usize;
                (n >= 514).then(|| a.data[at + 6..at + 6 + 512].to_vec())
            })
            .flatten();
        (a, token)
    }

    /// WRITE USING TOKEN: `ranges` from block `offset` of the token.
    pub fn write_using_token(
        &mut self,
        id: u32,
        token: &[u8],
        offset: u64,
        ranges: &[(u64, u32)],
    ) -> Answer {
        let mut p = vec![0u8; 536];
        p[0..2].copy_from_slice(&((534 + 16 * ranges.len()) as u16).to_be_bytes());
        p[8..16].copy_from_slice(&offset.to_be_bytes());
        p[16..16 + token.len()].copy_from_slice(token);
        p[534..536].copy_from_slice(&((16 * ranges.len()) as u16).to_be_bytes());
        p.extend(range_descriptors(ranges));
        self.third_party_copy_out(0x11, id, &p)
    }

    fn third_party_copy_out(&mut self, action: u8, id: u32, params: &[u8]) -> Answer {
        let mut cdb = [0u8; 16];
        cdb[0] = 0x83;
        cdb[1] = action;
        cdb[6..10].copy_from_slice(&id.to_be_bytes());
        cdb[10..14].copy_from_slice(&(params.len() as u32).to_be_bytes());
        self.command(&cdb, params.len() as u32, params, true)
    }
}

/// A unit's NAA designator, from its VPD page 0x83.
pub fn naa_of(i: &mut Initiator) -> Vec<u8> {
    let page = i.command(&[0x12, 1, 0x83, 1, 0, 0], 256, &[], false).data;
    let mut at = 4;
    while at + 4 <= page.len() {
        let len = usize::from(page[at + 3]);
        if page[at + 1] & 0x0f == 3 {
            return page[at + 4..at + 4 + len].to_vec();
        }
        at += 4 + len;
    }
    panic!("no NAA designator in {page:?}");
}

impl Initiator {
    /// EXTENDED COPY (LID1): identification CSCD descriptors with these
    /// NAA designators, block-to-block segments (source index, destination
    /// index, blocks, source LBA, destination LBA).
    pub fn extended_copy(
        &mut self,
        list_id: u8,
        units: &[Vec<u8>],
        segments: &[(u16, u16, u16, u64, u64)],
    ) -> Answer {
        let mut p = vec![0u8; 16];
        p[0] = list_id;
        p[2..4].copy_from_slice(&((32 * units.len()) as u16).to_be_bytes());
        p[8..12].copy_from_slice(&((28 * segments.len()) as u32).to_be_bytes());
        for naa in units {
            let mut d = vec![0u8; 32];
            d[0] = 0xe4;
            d[4] = 1;
            d[5] = 3;
            d[7] = naa.len() as u8;
            d[8..8 + naa.len()].copy_from_slice(naa);
            d[29..32].copy_from_slice(&(BLOCK as u32).to_be_bytes()[1..]);
            p.extend(d);
        }
        for &(src, dst, n, from, to) in segments {
            let mut d = vec![0u8; 28];
            d[0] = 0x02;
            d[3] = 24;
            d[4..6].copy_from_slice(&src.to_be_bytes());
            d[6..8].copy_from_slice(&dst.to_be_bytes());
            d[10..12].copy_from_slice(&n.to_be_bytes());
            d[12..20].copy_from_slice(&from.to_be_bytes());
            d[20..28].copy_from_slice(&to.to_be_bytes());
            p.extend(d);
        }
        self.third_party_copy_out(0x00, 0, &p)
    }

    /// RECEIVE COPY STATUS (LID1) of list `id`.
    pub fn copy_status(&mut self, id: u8) -> Answer {
        let mut cdb = [0u8; 16];
        cdb[0] = 0x84;
        cdb[2] = id;
        cdb[10..14].copy_from_slice(&64u32.to_be_bytes());
        self.command(&cdb, 64, &[], false)
    }
}

impl Initiator {
    /// Logs in to `target` as initiator `name`.
    pub fn login_as(&mut self, target: &str, name: &str) {
        let (status, text) = self.login_with(&[
            ("InitiatorName", name),
            ("SessionType", "Normal"),
            ("TargetName", target),
        ]);
        assert_eq!(status, 0, "login refused: {text}");
    }

    /// PERSISTENT RESERVE OUT `action` of reservation type `kind` with
    /// the basic parameter list.
    pub fn reserve_out(&mut self, action: u8, kind: u8, key: u64, new_key: u64) -> Answer {
        let mut p = key.to_be_bytes().to_vec();
        p.extend_from_slice(&new_key.to_be_bytes());
        p.extend_from_slice(&[0; 8]);
        let mut cdb = [0u8; 10];
        cdb[0] = 0x5f;
        cdb[1] = action;
        cdb[2] = kind;
        cdb[5..9].copy_from_slice(&24u32.to_be_bytes());
        self.command(&cdb, 24, &p, true)
    }

    /// PERSISTENT RESERVE IN `action`.
    pub fn reserve_in(&mut self, action: u8) -> Answer {
        let mut cdb = [0u8; 10];
        cdb[0] = 0x5e;
        cdb[1] = action;
        cdb[7..9].copy_from_slice(&1024u16.to_be_bytes());
        self.command(&cdb, 1024, &[], false)
    }
}

fn range_descriptors(ranges: &[(u64, u32)]) -> Vec<u8> {
    ranges
        .iter()
        .flat_map(|&(lba, n)| {
            let mut d = lba.to_be_bytes().to_vec();
            d.extend_from_slice(&n.to_be_bytes());
            d.extend_from_slice(&[0; 4]);
            d
        })
        .collect()
}
