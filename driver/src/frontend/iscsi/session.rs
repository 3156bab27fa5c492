//! One iSCSI connection, from its first login PDU to its logout: the
//! login phase (security and operational negotiation, target lookup),
//! then the full feature phase: SCSI commands with their Data-In, R2T and
//! Data-Out, NOP, text (SendTargets), task management and logout.
//!
//! Commands run in arrival order on the connection's thread. A write that
//! needs more data than came with it solicits the rest (one R2T at a
//! time, MaxOutstandingR2T=1); other commands arriving meanwhile run at
//! once, and further writes wait their turn. READ and WRITE data streams
//! through a burst at a time, so what a connection holds is bounded
//! whatever the transfer length: the active write's immediate data and
//! current burst (64 KiB + 1 MiB), the immediate data of at most
//! [`MAX_WAITING`] waiting writes (64 × 64 KiB), one read chunk (1 MiB),
//! a WRITE AND VERIFY's read-back of one burst (1 MiB + 64 KiB), one PDU
//! (256 KiB) and the socket buffer (64 KiB): about 7.5 MiB.

use std::collections::VecDeque;
use std::io::{self, BufReader};
use std::net::{Shutdown, TcpStream};
use std::time::Duration;

use super::chap::Chap;
use super::login::{self, MAX_TEXT, Negotiation, OUR_MAX_RECV, Params, SessionType};
use super::pdu::{Digests, NO_TAG, Pdu, PduError, op};
use super::scsi::{self, CHECK_CONDITION, GOOD, Lun, RESERVATION_CONFLICT, Sense};
use super::{Deadline, TARGET_PREFIX, Target};

/// Commands the initiator may have outstanding (CmdSN window).
const WINDOW: u32 = 32;
/// Writes waiting for their turn to solicit data; more get TASK SET FULL.
pub const MAX_WAITING: usize = 64;
const TASK_SET_FULL: u8 = 0x28;

/// Why a connection ended other than by logout or EOF.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error(transparent)]
    Pdu(#[from] PduError),
    #[error("I/O: {0}")]
    Io(#[from] io::Error),
    #[error("protocol error: {0}")]
    Protocol(String),
}

impl ConnError {
    pub fn kind(&self) -> &'static str {
        match self {
            ConnError::Pdu(e) => e.kind(),
            ConnError::Io(_) => "io",
            ConnError::Protocol(_) => "protocol",
        }
    }
}

fn protocol(msg: impl Into<String>) -> ConnError {
    ConnError::Protocol(msg.into())
}

/// A command, with the data it gathered so far.
#[derive(Debug)]
struct Task {
    itt: u32,
    lun: u64,
    cdb: [u8; 16],
    edtl: u32,
    /// Bytes the CDB says the command moves out, and those it reads
    /// (fewer if the initiator sends fewer).
    expected: usize,
    need: usize,
    /// A READ or WRITE (streamed), or `None` for a command whose data
    /// is held whole.
    stream: Option<scsi::Stream>,
    /// Bytes received so far; `data` holds those not yet written (a
    /// WRITE's current burst) or all of them (other commands).
    received: usize,
    data: Vec<u8>,
    /// Target transfer tag of the open R2T, where its burst ends, and the
    /// DataSN due next in it.
    ttt: u32,
    burst_end: usize,
    r2t_sn: u32,
    data_sn: u32,
}

/// Bytes of a READ read from the unit at a time.
const READ_CHUNK: usize = 1 << 20;

/// The residual of a command that moves `moved` bytes where the initiator
/// expected `edtl`: (flag, count), O=0x04 overflow, U=0x02 underflow.
fn residual(moved: usize, edtl: u32) -> (u8, usize) {
    let edtl = edtl as usize;
    if moved > edtl {
        (0x04, moved - edtl)
    } else if moved < edtl {
        (0x02, edtl - moved)
    } else {
        (0, 0)
    }
}

/// One connection's state, from login on.
pub struct Conn<'a> {
    target: &'a Target,
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    digests: Digests,
    params: Params,
    /// What this side accepts in one data segment.
    recv_limit: usize,
    stat_sn: u32,
    exp_cmd_sn: u32,
    kind: SessionType,
    lun: Option<Lun>,
    active: Option<Task>,
    waiting: VecDeque<Task>,
    next_ttt: u32,
    /// The rest of a text answer too long for one PDU, and its tag.
    text_rest: Option<(u32, Vec<u8>)>,
    data_in: Vec<u8>,
    /// PDUs rejected so far; past [`MAX_REJECTS`] the connection ends.
    rejects: u32,
}

/// Rejected PDUs a connection may send before it is closed.
const MAX_REJECTS: u32 = 16;
/// The largest text answer (SendTargets) kept for one request.
const MAX_TEXT_ANSWER: usize = 1 << 20;

/// Serves one accepted connection until it ends. `deadline` is watched
/// from outside (`mod.rs`): the connection moves it on after login and
/// after every whole PDU.
pub fn serve(target: &Target, stream: TcpStream, deadline: &Deadline) -> Result<(), ConnError> {
    let writer = stream.try_clone()?;
    let mut conn = Conn {
        target,
        reader: BufReader::with_capacity(64 << 10, stream),
        writer,
        digests: Digests::default(),
        params: Params::default(),
        recv_limit: 8192,
        stat_sn: 0,
        exp_cmd_sn: 0,
        kind: SessionType::Normal,
        lun: None,
        active: None,
        waiting: VecDeque::new(),
        next_ttt: 1,
        text_rest: None,
        data_in: Vec::new(),
        rejects: 0,
    };
    if !conn.login()? {
        return Ok(());
    }
    deadline.extend(target.config.idle_timeout);
    conn.full_feature(deadline)
}

impl Conn<'_> {
    fn max_cmd_sn(&self) -> u32 {
        let busy = self.waiting.len() as u32 + u32::from(self.active.is_some());
        self.exp_cmd_sn
            .wrapping_add(WINDOW.saturating_sub(busy).max(1))
            .wrapping_sub(1)
    }

    /// Fills StatSN, ExpCmdSN and MaxCmdSN; `advance` for a PDU that
    /// carries status (StatSN is then taken).
    fn numbers(&mut self, pdu: &mut Pdu, advance: bool) {
        let max = self.max_cmd_sn();
        pdu.set_u32(24, self.stat_sn)
            .set_u32(28, self.exp_cmd_sn)
            .set_u32(32, max);
        if advance {
            self.stat_sn = self.stat_sn.wrapping_add(1);
        }
    }

    fn send(&mut self, pdu: &mut Pdu) -> io::Result<()> {
        pdu.write_to(&mut self.writer, self.digests)
    }

    // ---- login -------------------------------------------------------

    /// Runs the login phase. `Ok(false)` if it failed and was answered
    /// (the connection then closes).
    fn login(&mut self) -> Result<bool, ConnError> {
        let mut neg = Negotiation::default();
        let mut text = Vec::new();
        let mut first = true;
        let mut isid = [0u8; 6];
        loop {
            let pdu = Pdu::read_from(&mut self.reader, Digests::default(), OUR_MAX_RECV as usize)?;
            if pdu.opcode() != op::LOGIN {
                return Err(protocol(format!(
                    "opcode {:#04x} before login completed",
                    pdu.opcode()
                )));
            }
            let flags = pdu.flags();
            let (transit, more) = (flags & 0x80 != 0, flags & 0x40 != 0);
            let (csg, nsg) = ((flags >> 2) & 3, flags & 3);
            if transit && more {
                return self.login_failed(&pdu, 0x0200, "both T and C set");
            }
            if first {
                isid.copy_from_slice(&pdu.bhs[8..14]);
                self.exp_cmd_sn = pdu.u32_at(24);
                self.stat_sn = pdu.u32_at(28);
                if pdu.bhs[3] > 0 {
                    return self.login_failed(&pdu, 0x0205, "unsupported version");
                }
                if pdu.u16_at(14) != 0 {
                    // No connection is ever added to a session (MaxConnections=1).
                    return self.login_failed(&pdu, 0x020a, "TSIH of an existing session");
                }
            }
            text.extend_from_slice(&pdu.data);
            if text.len() > MAX_TEXT {
                return self.login_failed(&pdu, 0x0200, "login text over 64 KiB");
            }
            if more {
                // More text follows: acknowledge with an empty response.
                let mut r = self.login_response(&pdu, isid, csg << 2, 0);
                self.numbers(&mut r, true);
                self.send(&mut r)?;
                continue;
            }
            let Some(pairs) = login::parse(&text) else {
                return self.login_failed(&pdu, 0x0200, "malformed login text");
            };
            text.clear();
            if first {
                // The target's secret decides whether CHAP is required.
                let key = |k: &str| {
                    pairs
                        .iter()
                        .find(|(key, _)| key == k)
                        .map(|(_, v)| v.as_str())
                };
                let target = match key("SessionType") {
                    Some("Discovery") => None,
                    _ => key("TargetName"),
                };
                let t = &self.target;
                if let Some(secret) = super::secret_for(&t.config.chap, t.exports.pool(), target) {
                    neg.chap = Chap::Wanted(secret);
                }
            }
            if csg > 1 || (transit && (nsg <= csg || nsg == 2)) {
                return self.login_failed(&pdu, 0x020b, "invalid stage transition");
            }
            let mut answers = match neg.answer(&pairs, csg) {
                Ok(a) => a,
                Err(e) => return self.login_failed(&pdu, e.status, &e.why),
            };
            if first {
                first = false;
                match neg.initiator_name.as_deref() {
                    None => return self.login_failed(&pdu, 0x0207, "no InitiatorName"),
                    // iSCSI names are 1 to 223 bytes (RFC 3720 3.2.6.1);
                    // reservations know initiators by them.
                    Some(n) if n.is_empty() || n.len() > 223 => {
                        return self.login_failed(&pdu, 0x0200, "InitiatorName of no valid length");
                    }
                    Some(_) => {}
                }
                self.kind = neg.session_type.unwrap_or(SessionType::Normal);
                if self.kind == SessionType::Normal {
                    let Some(name) = neg.target_name.clone() else {
                        return self.login_failed(&pdu, 0x0207, "no TargetName");
                    };
                    // IQNs compare without case (RFC 3722).
                    let initiator = neg.initiator_name.as_deref().unwrap_or("");
                    match self
                        .target
                        .open(&name.to_ascii_lowercase(), initiator, isid)
                    {
                        Ok(Some(lun)) => self.lun = Some(lun),
                        Ok(None) => return self.login_failed(&pdu, 0x0203, "no such target"),
                        Err(e) => {
                            tracing::warn!(target_name = %name, error = %e, "iSCSI target could not be opened");
                            return self.login_failed(&pdu, 0x0301, "target unavailable");
                        }
                    }
                    answers.push(("TargetPortalGroupTag".into(), "1".into()));
                }
            }
            // Leaving the security stage (or skipping it) needs CHAP done
            // where the target has a secret; while the exchange goes on,
            // the answer stays in the stage (no T bit).
            let pending = !neg.chap.satisfied();
            if pending && (csg == 1 || (transit && !neg.chap.in_progress())) {
                return self.login_failed(&pdu, 0x0201, "authentication required");
            }
            let transit = transit && !pending;
            let done = transit && nsg == 3;
            let t = if transit { 0x80 | nsg } else { 0 };
            let mut r = self.login_response(&pdu, isid, t | (csg << 2), 0);
            if done {
                r.set_u16(14, self.target.new_tsih());
            }
            r.data = login::encode(&answers);
            self.numbers(&mut r, true);
            self.send(&mut r)?;
            if done {
                self.params = neg.params.clone();
                self.digests = self.params.digests;
                if neg.declared_recv() {
                    self.recv_limit = OUR_MAX_RECV as usize;
                }
                tracing::debug!(
                    initiator = neg.initiator_name.as_deref().unwrap_or(""),
                    target_name = neg.target_name.as_deref().unwrap_or(""),
                    params = ?self.params,
                    "iSCSI login"
                );
                return Ok(true);
            }
        }
    }

    fn login_response(&self, req: &Pdu, isid: [u8; 6], flags: u8, status: u16) -> Pdu {
        let mut r = Pdu::new(op::LOGIN_RESPONSE);
        r.bhs[1] = flags;
        r.bhs[8..14].copy_from_slice(&isid);
        r.set_u32(16, req.itt()).set_u16(36, status);
        r
    }

    fn login_failed(&mut self, req: &Pdu, status: u16, why: &str) -> Result<bool, ConnError> {
        tracing::info!(
            why,
            status = format_args!("{status:#06x}"),
            "iSCSI login refused"
        );
        self.target.metrics.iscsi_protocol_error("login_refused");
        let mut isid = [0u8; 6];
        isid.copy_from_slice(&req.bhs[8..14]);
        let mut r = self.login_response(req, isid, 0, status);
        self.numbers(&mut r, true);
        self.send(&mut r)?;
        Ok(false)
    }

    // ---- full feature phase -----------------------------------------

    fn full_feature(&mut self, deadline: &Deadline) -> Result<(), ConnError> {
        loop {
            if self.rejects > MAX_REJECTS {
                return Err(protocol(format!("{} PDUs rejected", self.rejects)));
            }
            let pdu = match Pdu::read_from(&mut self.reader, self.digests, self.recv_limit) {
                Ok(p) => p,
                Err(PduError::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(PduError::DataDigest(p)) => {
                    // The header is sound: say which PDU, then end (level 0).
                    self.reject(&p, 0x02)?;
                    return Err(PduError::DataDigest(p).into());
                }
                Err(e) => return Err(e.into()),
            };
            deadline.extend(self.target.config.idle_timeout);
            if !self.sequence(&pdu) {
                continue;
            }
            match pdu.opcode() {
                op::NOP_OUT => self.nop(pdu)?,
                op::SCSI_COMMAND => self.command(pdu)?,
                op::DATA_OUT => self.data_out(pdu)?,
                op::TASK_MGMT => self.task_management(&pdu)?,
                op::TEXT => self.text(&pdu)?,
                op::LOGOUT => return self.logout(&pdu),
                op::SNACK => self.reject(&pdu, 0x05)?,
                other => {
                    self.reject(&pdu, 0x04)?;
                    return Err(protocol(format!(
                        "opcode {other:#04x} in full feature phase"
                    )));
                }
            }
        }
    }

    /// Checks the CmdSN of a PDU that has one; `false` to drop it (out of
    /// the window: RFC 7143 §4.2.2.1 says to ignore it).
    fn sequence(&mut self, pdu: &Pdu) -> bool {
        let numbered = matches!(
            pdu.opcode(),
            op::NOP_OUT | op::SCSI_COMMAND | op::TASK_MGMT | op::TEXT | op::LOGOUT
        );
        if !numbered || pdu.immediate() {
            return true;
        }
        // A NOP-Out answering our ping carries no CmdSN of its own.
        if pdu.opcode() == op::NOP_OUT && pdu.itt() == NO_TAG {
            return true;
        }
        let cmd_sn = pdu.u32_at(24);
        if cmd_sn != self.exp_cmd_sn {
            tracing::debug!(
                cmd_sn,
                expected = self.exp_cmd_sn,
                "iSCSI PDU out of its CmdSN window dropped"
            );
            self.target.metrics.iscsi_protocol_error("cmd_sn");
            return false;
        }
        let in_window = self.max_cmd_sn().wrapping_sub(cmd_sn) < WINDOW;
        if !in_window {
            self.target.metrics.iscsi_protocol_error("cmd_sn_window");
            return false;
        }
        self.exp_cmd_sn = self.exp_cmd_sn.wrapping_add(1);
        true
    }

    fn reject(&mut self, pdu: &Pdu, reason: u8) -> io::Result<()> {
        tracing::debug!(opcode = pdu.opcode(), reason, "iSCSI PDU rejected");
        self.rejects += 1;
        self.target.metrics.iscsi_protocol_error("reject");
        let mut r = Pdu::new(op::REJECT);
        r.bhs[2] = reason;
        r.set_u32(16, NO_TAG);
        self.numbers(&mut r, true);
        r.data = pdu.bhs.to_vec();
        self.send(&mut r)
    }

    fn nop(&mut self, pdu: Pdu) -> io::Result<()> {
        if pdu.itt() == NO_TAG {
            return Ok(());
        }
        let mut r = Pdu::new(op::NOP_IN);
        r.bhs[8..16].copy_from_slice(&pdu.bhs[8..16]);
        r.set_u32(16, pdu.itt()).set_u32(20, NO_TAG);
        self.numbers(&mut r, true);
        let mut data = pdu.data;
        data.truncate(self.params.send_segment as usize);
        r.data = data;
        self.send(&mut r)
    }

    fn logout(&mut self, pdu: &Pdu) -> Result<(), ConnError> {
        let reason = pdu.flags() & 0x7f;
        let mut r = Pdu::new(op::LOGOUT_RESPONSE);
        // Closing the session or this connection: done. Recovery: not
        // supported at error recovery level 0.
        r.bhs[2] = if reason == 2 { 2 } else { 0 };
        r.set_u32(16, pdu.itt());
        self.numbers(&mut r, true);
        self.send(&mut r)?;
        let _ = self.writer.shutdown(Shutdown::Write);
        Ok(())
    }

    // ---- SCSI --------------------------------------------------------

    fn command(&mut self, pdu: Pdu) -> Result<(), ConnError> {
        if self.kind == SessionType::Discovery {
            self.reject(&pdu, 0x04)?;
            return Err(protocol("SCSI command in a discovery session"));
        }
        let write = pdu.flags() & 0x20 != 0;
        let pdu_attr = pdu.flags() & 0x07;
        let edtl = pdu.u32_at(20);
        if pdu.data.len() > edtl as usize
            || pdu.data.len() > self.params.first_burst as usize
            || (!pdu.data.is_empty() && (!write || !self.params.immediate_data))
        {
            self.reject(&pdu, 0x09)?;
            return Err(protocol("immediate data beyond what was negotiated"));
        }
        if !pdu.is_final() {
            // Unsolicited Data-Out would follow, which InitialR2T=Yes forbids.
            self.reject(&pdu, 0x04)?;
            return Err(protocol("unsolicited data with InitialR2T=Yes"));
        }
        let itt = pdu.itt();
        let mut cdb = [0u8; 16];
        cdb.copy_from_slice(&pdu.bhs[32..48]);
        let lun_field = pdu.lun();
        if pdu.ahs_len > 0 {
            // An extended CDB: no command of this target needs one.
            return self.check_condition(itt, edtl, 0, Sense::INVALID_FIELD_IN_CDB);
        }
        let plan = match scsi::plan(self.lun_at(lun_field), &cdb, edtl) {
            Err(sense) => return self.check_condition(itt, edtl, 0, sense),
            Ok(p) => p,
        };
        let expected = plan.data_out as usize;
        if expected > 0 && !write {
            return self.check_condition(itt, edtl, 0, Sense::INVALID_FIELD_IN_CDB);
        }
        // The initiator sends less than the CDB says: a WRITE writes what
        // was sent (the rest, even of a block, is the overflow residual,
        // as RFC 7143 allows); anything else is refused before data is
        // asked for.
        let mut need = expected;
        if expected > edtl as usize {
            if !plan.stream.is_some_and(|s| s.write) {
                return self.check_condition(itt, edtl, expected, Sense::INVALID_FIELD_IN_CDB);
            }
            need = edtl as usize;
        }
        let mut data = pdu.data;
        data.truncate(need);
        let task = Task {
            itt,
            lun: lun_field,
            cdb,
            edtl,
            expected,
            need,
            stream: plan.stream,
            received: data.len(),
            data,
            ttt: NO_TAG,
            burst_end: 0,
            r2t_sn: 0,
            data_sn: 0,
        };
        // An ORDERED task waits for the write gathering data before it;
        // SIMPLE ones run at once (the control page allows reordering).
        let ordered = pdu_attr == 2 && self.active.is_some();
        if task.received == need && !ordered {
            return self.finish(task);
        }
        if self.active.is_none() {
            self.solicit(task)
        } else if self.waiting.len() < MAX_WAITING {
            self.waiting.push_back(task);
            Ok(())
        } else {
            let mut r = self.response(itt, TASK_SET_FULL, (0, 0));
            self.numbers(&mut r, true);
            Ok(self.send(&mut r)?)
        }
    }

    fn lun_at(&self, lun_field: u64) -> Option<&Lun> {
        // LUN 0 in any of its encodings is all zeros.
        if lun_field == 0 {
            self.lun.as_ref()
        } else {
            None
        }
    }

    /// Sends the next R2T of `task` and makes it the active write.
    fn solicit(&mut self, mut task: Task) -> Result<(), ConnError> {
        let from = task.received;
        let len = (task.need - from).min(self.params.max_burst as usize);
        task.ttt = self.next_ttt;
        self.next_ttt = self.next_ttt.wrapping_add(1).max(1) % NO_TAG;
        task.burst_end = from + len;
        task.data_sn = 0;
        let mut r = Pdu::new(op::R2T);
        r.set_u64(8, task.lun)
            .set_u32(16, task.itt)
            .set_u32(20, task.ttt)
            .set_u32(36, task.r2t_sn)
            .set_u32(40, from as u32)
            .set_u32(44, len as u32);
        task.r2t_sn += 1;
        self.numbers(&mut r, false);
        self.active = Some(task);
        self.send(&mut r)?;
        Ok(())
    }

    fn data_out(&mut self, pdu: Pdu) -> Result<(), ConnError> {
        let Some(task) = self.active.as_mut() else {
            // Data of an aborted task may still arrive: dropped.
            return Ok(());
        };
        if task.itt != pdu.itt() || task.ttt != pdu.u32_at(20) {
            tracing::debug!(itt = pdu.itt(), "iSCSI Data-Out for no open R2T dropped");
            return Ok(());
        }
        let offset = pdu.u32_at(40) as usize;
        let fault = if pdu.data.is_empty() {
            Some((Sense::DATA_PHASE_ERROR, "an empty Data-Out".to_string()))
        } else if offset != task.received || offset + pdu.data.len() > task.burst_end {
            Some((
                Sense::DATA_OFFSET_ERROR,
                format!(
                    "Data-Out at {offset}+{} outside the solicited burst",
                    pdu.data.len()
                ),
            ))
        } else if pdu.u32_at(36) != task.data_sn {
            Some((
                Sense::DATA_PHASE_ERROR,
                format!(
                    "Data-Out DataSN {} where {} was due",
                    pdu.u32_at(36),
                    task.data_sn
                ),
            ))
        } else if pdu.is_final() != (offset + pdu.data.len() == task.burst_end) {
            Some((
                Sense::DATA_PHASE_ERROR,
                "Data-Out F bit does not end the burst".to_string(),
            ))
        } else {
            None
        };
        if let Some((sense, why)) = fault {
            // The task fails and is forgotten (its further Data-Out is
            // dropped); the connection goes on.
            tracing::debug!(itt = pdu.itt(), why, "iSCSI write failed on bad Data-Out");
            self.target
                .metrics
                .iscsi_protocol_error("data_out_sequence");
            let task = self.active.take().expect("active write");
            self.check_condition(task.itt, task.edtl, task.expected, sense)?;
            return self.next_waiting();
        }
        task.data_sn = task.data_sn.wrapping_add(1);
        task.received += pdu.data.len();
        task.data.extend_from_slice(&pdu.data);
        let burst_done = task.received == task.burst_end;
        if !burst_done {
            return Ok(());
        }
        let mut task = self.active.take().expect("active write");
        if task.received < task.need {
            // A WRITE's burst goes to the unit now, so a connection holds
            // at most one burst whatever the transfer length.
            if let Some(stream) = task.stream {
                let lun = self
                    .lun_at(task.lun)
                    .expect("a WRITE was planned on a unit");
                let at = (task.received - task.data.len()) as u64;
                if let Err(sense) = scsi::write_part(lun, stream.offset + at, &task.data, &stream) {
                    self.check_condition(task.itt, task.edtl, task.expected, sense)?;
                    return self.next_waiting();
                }
                task.data.clear();
            }
            return self.solicit(task);
        }
        self.finish(task)?;
        self.next_waiting()
    }

    /// Runs the waiting tasks that have their data (ORDERED ones), up to
    /// the next write that needs more, whose data it then solicits.
    fn next_waiting(&mut self) -> Result<(), ConnError> {
        while let Some(next) = self.waiting.pop_front() {
            if next.received < next.need {
                return self.solicit(next);
            }
            self.finish(next)?;
        }
        Ok(())
    }

    /// Runs a command that has all its data, and answers it.
    fn finish(&mut self, task: Task) -> Result<(), ConnError> {
        if let Some(stream) = task.stream {
            return if stream.write {
                self.finish_write(task, stream)
            } else {
                self.read(task, stream)
            };
        }
        let mut data_in = std::mem::take(&mut self.data_in);
        let result = scsi::execute(self.lun_at(task.lun), &task.cdb, &task.data, &mut data_in);
        let answered = match result {
            Ok(()) => {
                // What moved: the data read, or the data the CDB took.
                let moved = if data_in.is_empty() {
                    task.expected
                } else {
                    data_in.len()
                };
                let residual = residual(moved, task.edtl);
                let n = data_in.len().min(task.edtl as usize);
                self.data_in_pdus(task.itt, &data_in[..n], 0, &mut 0, true, residual)
            }
            Err(sense) => self.check_condition(task.itt, task.edtl, task.expected, sense),
        };
        data_in.clear();
        self.data_in = data_in;
        answered
    }

    fn finish_write(&mut self, task: Task, stream: scsi::Stream) -> Result<(), ConnError> {
        let lun = self
            .lun_at(task.lun)
            .expect("a WRITE was planned on a unit");
        let at = (task.received - task.data.len()) as u64;
        let written = if task.data.is_empty() {
            Ok(())
        } else {
            scsi::write_part(lun, stream.offset + at, &task.data, &stream)
        };
        match written {
            Ok(()) => {
                let mut r = self.response(task.itt, GOOD, residual(task.expected, task.edtl));
                self.numbers(&mut r, true);
                Ok(self.send(&mut r)?)
            }
            Err(sense) => self.check_condition(task.itt, task.edtl, task.expected, sense),
        }
    }

    /// A READ: a chunk at a time from the unit to Data-In PDUs, the last
    /// with the status. A failed chunk ends it with CHECK CONDITION.
    fn read(&mut self, task: Task, stream: scsi::Stream) -> Result<(), ConnError> {
        let total = stream.len as usize;
        let send = total.min(task.edtl as usize);
        let residual = residual(total, task.edtl);
        if send == 0 {
            let mut r = self.response(task.itt, GOOD, residual);
            self.numbers(&mut r, true);
            return Ok(self.send(&mut r)?);
        }
        let mut buf = std::mem::take(&mut self.data_in);
        let mut data_sn = 0;
        let mut at = 0;
        let mut answered = Ok(());
        while at < send {
            let n = (send - at).min(READ_CHUNK);
            buf.resize(n, 0);
            let lun = self.lun_at(task.lun).expect("a READ was planned on a unit");
            if let Err(sense) = scsi::read_part(lun, stream.offset + at as u64, &mut buf) {
                answered = self.check_condition(task.itt, task.edtl, 0, sense);
                break;
            }
            let last = at + n == send;
            answered = self.data_in_pdus(task.itt, &buf, at, &mut data_sn, last, residual);
            if answered.is_err() {
                break;
            }
            at += n;
        }
        buf.clear();
        self.data_in = buf;
        answered
    }

    /// Sends `data` (at `offset` of the command's data) in Data-In PDUs
    /// the initiator accepts; `last` puts the status (GOOD) and residual
    /// in the final one, or sends a response if there is no data.
    fn data_in_pdus(
        &mut self,
        itt: u32,
        data: &[u8],
        offset: usize,
        data_sn: &mut u32,
        last: bool,
        residual: (u8, usize),
    ) -> Result<(), ConnError> {
        if data.is_empty() {
            let mut r = self.response(itt, GOOD, residual);
            self.numbers(&mut r, true);
            return Ok(self.send(&mut r)?);
        }
        let segment = self.params.send_segment as usize;
        let burst = self.params.max_burst as usize;
        let mut at = 0;
        while at < data.len() {
            let abs = offset + at;
            let n = (data.len() - at).min(segment).min(burst - abs % burst);
            let end = last && at + n == data.len();
            let mut r = Pdu::new(op::DATA_IN);
            // F ends each burst (sequence) and the data.
            r.bhs[1] = if end || (abs + n).is_multiple_of(burst) {
                0x80
            } else {
                0
            };
            r.set_u32(16, itt)
                .set_u32(20, NO_TAG)
                .set_u32(36, *data_sn)
                .set_u32(40, abs as u32);
            if end {
                // Status with the last Data-In (phase collapse).
                r.bhs[1] |= 0x01 | residual.0;
                r.bhs[3] = GOOD;
                r.set_u32(44, residual.1 as u32);
            }
            self.numbers(&mut r, end);
            r.write_with(&mut self.writer, self.digests, &data[at..at + n])?;
            at += n;
            *data_sn += 1;
        }
        Ok(())
    }

    /// Answers CHECK CONDITION with `sense`; `expected` is what the CDB
    /// would have moved out (for the residual).
    fn check_condition(
        &mut self,
        itt: u32,
        edtl: u32,
        expected: usize,
        sense: Sense,
    ) -> Result<(), ConnError> {
        if sense == Sense::RESERVATION_CONFLICT {
            let mut r = self.response(itt, RESERVATION_CONFLICT, residual(expected, edtl));
            self.numbers(&mut r, true);
            return Ok(self.send(&mut r)?);
        }
        tracing::debug!(itt, ?sense, "iSCSI command answered CHECK CONDITION");
        let mut r = self.response(itt, CHECK_CONDITION, residual(expected, edtl));
        r.data.extend_from_slice(&18u16.to_be_bytes());
        r.data.extend_from_slice(&sense.fixed());
        self.numbers(&mut r, true);
        Ok(self.send(&mut r)?)
    }

    fn response(&self, itt: u32, status: u8, residual: (u8, usize)) -> Pdu {
        let mut r = Pdu::new(op::SCSI_RESPONSE);
        r.bhs[1] = 0x80 | residual.0;
        r.bhs[3] = status;
        r.set_u32(16, itt).set_u32(44, residual.1 as u32);
        r
    }

    fn task_management(&mut self, pdu: &Pdu) -> Result<(), ConnError> {
        let function = pdu.flags() & 0x7f;
        let referenced = pdu.u32_at(20);
        let response = match function {
            // ABORT TASK: a write still gathering data is dropped. Any other
            // task was answered already (commands run as they arrive, and
            // on one connection every earlier CmdSN has arrived): "task
            // does not exist".
            1 => {
                if self.active.as_ref().is_some_and(|t| t.itt == referenced) {
                    self.active = None;
                    self.next_waiting()?;
                    0
                } else if let Some(i) = self.waiting.iter().position(|t| t.itt == referenced) {
                    self.waiting.remove(i);
                    0
                } else {
                    1
                }
            }
            // ABORT TASK SET, CLEAR TASK SET, LUN RESET, TARGET WARM/COLD RESET.
            2 | 4 | 5 | 6 | 7 => {
                if matches!(function, 2 | 4 | 5) && self.lun_at(pdu.lun()).is_none() {
                    2
                } else {
                    self.active = None;
                    self.waiting.clear();
                    // Resets end RESERVE(6) reservations.
                    if let (5..=7, Some(lun)) = (function, &self.lun) {
                        lun.port.reset();
                    }
                    0
                }
            }
            // TASK REASSIGN: no connection recovery at level 0.
            8 => 4,
            _ => 5,
        };
        let mut r = Pdu::new(op::TASK_MGMT_RESPONSE);
        r.bhs[2] = response;
        r.set_u32(16, pdu.itt());
        self.numbers(&mut r, true);
        Ok(self.send(&mut r)?)
    }

    // ---- text --------------------------------------------------------

    fn text(&mut self, pdu: &Pdu) -> Result<(), ConnError> {
        let ttt = pdu.u32_at(20);
        let answer = if ttt != NO_TAG {
            match self.text_rest.take() {
                Some((tag, rest)) if tag == ttt => rest,
                _ => {
                    self.reject(pdu, 0x09)?;
                    return Err(protocol("text continuation with an unknown tag"));
                }
            }
        } else {
            if pdu.flags() & 0x40 != 0 {
                // A request continued over several PDUs: not needed for
                // any key this target answers.
                self.reject(pdu, 0x05)?;
                return Ok(());
            }
            let Some(pairs) = login::parse(&pdu.data) else {
                self.reject(pdu, 0x09)?;
                return Ok(());
            };
            let mut out = Vec::new();
            let mut listed = false;
            for (k, v) in &pairs {
                match k.as_str() {
                    // One listing per request, whatever it asks.
                    "SendTargets" if listed => out.push((k.clone(), "Reject".into())),
                    "SendTargets" => {
                        listed = true;
                        out.extend(self.send_targets(v));
                    }
                    "MaxRecvDataSegmentLength" => match v.parse::<u32>() {
                        Ok(n) if (512..1 << 24).contains(&n) => self.params.send_segment = n,
                        _ => out.push((k.clone(), "Reject".into())),
                    },
                    _ => out.push((k.clone(), "NotUnderstood".into())),
                }
            }
            let mut text = login::encode(&out);
            if text.len() > MAX_TEXT_ANSWER {
                tracing::warn!(bytes = text.len(), "iSCSI text answer cut to 1 MiB");
                text.truncate(MAX_TEXT_ANSWER);
                // End on a whole pair.
                let end = text.iter().rposition(|&b| b == 0).map_or(0, |i| i + 1);
                text.truncate(end);
            }
            text
        };
        let limit = self.params.send_segment as usize;
        let mut r = Pdu::new(op::TEXT_RESPONSE);
        r.set_u32(16, pdu.itt());
        if answer.len() > limit {
            let tag = self.next_ttt;
            self.next_ttt = self.next_ttt.wrapping_add(1).max(1) % NO_TAG;
            r.bhs[1] = 0x40; // C: more follows
            r.set_u32(20, tag);
            r.data = answer[..limit].to_vec();
            self.text_rest = Some((tag, answer[limit..].to_vec()));
        } else {
            r.set_u32(20, NO_TAG);
            r.data = answer;
        }
        self.numbers(&mut r, true);
        Ok(self.send(&mut r)?)
    }

    fn send_targets(&self, which: &str) -> Vec<(String, String)> {
        let address = match self.writer.local_addr() {
            Ok(std::net::SocketAddr::V6(a)) => format!("[{}]:{},1", a.ip(), a.port()),
            Ok(a) => format!("{a},1"),
            Err(_) => return Vec::new(),
        };
        let names: Vec<String> = match which {
            "All" => match self.target.exports.list() {
                Ok(list) => list.into_iter().map(|(n, _)| n).collect(),
                Err(e) => {
                    tracing::warn!(error = %e, "listing iSCSI targets failed");
                    Vec::new()
                }
            },
            "" => self.lun.iter().map(|l| l.export.name()).collect(),
            name => match name.strip_prefix(TARGET_PREFIX) {
                Some(id) if matches!(self.target.exports.open(id), Ok(Some(_))) => {
                    vec![id.to_string()]
                }
                _ => Vec::new(),
            },
        };
        let mut out = Vec::new();
        for n in names {
            out.push(("TargetName".into(), format!("{TARGET_PREFIX}{n}")));
            out.push(("TargetAddress".into(), address.clone()));
        }
        out
    }
}

/// How long a write to the initiator may block before the connection is
/// given up (an initiator that stopped reading).
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(60);
