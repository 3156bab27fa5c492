//! Offload copy (the SCSI copy manager): by token (SBC-4 POPULATE TOKEN
//! and WRITE USING TOKEN, SPC-5 RECEIVE ROD TOKEN INFORMATION), where an
//! initiator asks for a token standing for ranges of one unit, then has
//! ranges of this or another unit of the node written from it; and
//! EXTENDED COPY (LID1) with block-to-block segments between units named by
//! their designators, with RECEIVE COPY RESULTS. No data crosses the
//! network.
//!
//! A token pins its ranges in the engine ([`Pinned`]): the frozen layers
//! that hold them, at the instant POPULATE TOKEN ran (a volume's writable
//! top is frozen first if the ranges reach into it, as for a snapshot).
//! WRITE USING TOKEN lands those layers' extents in the destination's top
//! layer by FICLONERANGE where the filesystem shares extents (XFS with
//! reflink), by copy_file_range where it does not, never through this
//! process's memory. The block device zero ROD token writes zeros.
//!
//! Tokens are 512 random-looking bytes (a 16-byte handle and a 32-byte
//! secret from the system's random source), valid on every target of this
//! node until their inactivity timeout passes, the session that made them
//! ends, or what they were made of is deleted (then they are revoked); an
//! unknown, expired or revoked token gets the INVALID TOKEN OPERATION code
//! SPC-5 gives. A unit of another node attached here makes no token; one
//! written from a token gets the bytes through the data path. What tokens
//! hold is bounded: [`MAX_SESSION_TOKENS`] per session (checked before a
//! pin freezes anything), [`MAX_TOKENS`] and [`MAX_PINNED_RUNS`] on the
//! node, [`MAX_TOKEN_BLOCKS`] per token and per WRITE USING TOKEN; a pin
//! freezes no chain past its depth limit.
//!
//! EXTENDED COPY acts for the session's initiator port: it reaches the
//! session's own unit and units whose targets need no CHAP, honours their
//! reservations, and writes each unit under its fence (`reserve.rs`).
//!
//! Written by hand: no crate implements a SCSI copy manager.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::engine::{BlockRange, ErrorKind, Landed, Pinned, Pool, SnapshotId, VolumeId, ZeroFlags};
use crate::frontend::Export;
use crate::metrics::{Metrics, OpMetrics};

use super::TARGET_PREFIX;
use super::chap::Secrets;
use super::scsi::{BLOCK, Lun, Sense, be16, be32, be64, failed, naa, truncate};

/// Length of a ROD token.
pub const ROD_TOKEN_LEN: usize = 512;
/// ROD type of the tokens made here: a point-in-time copy.
pub const ROD_TYPE_POINT_IN_TIME: u32 = 0x0080_0000;
/// The block device zero ROD token's type: writes zeros.
pub const ROD_TYPE_ZERO: u32 = 0xffff_0001;
/// Block device range descriptors one command may carry.
pub const MAX_RANGES: usize = 64;
/// The longest parameter list of POPULATE TOKEN or WRITE USING TOKEN
/// taken in: room for more descriptors than [`MAX_RANGES`], so that too
/// many get their own sense code.
pub const MAX_PARAMETER_LIST: u64 = 64 << 10;
/// Blocks one token may stand for, and one WRITE USING TOKEN may write
/// (1 GiB).
pub const MAX_TOKEN_BLOCKS: u64 = 1 << 18;
/// Blocks per WRITE USING TOKEN an initiator should aim for (256 MiB).
const OPTIMAL_TRANSFER_BLOCKS: u64 = 1 << 16;
/// Live tokens of one session, and of the node.
pub const MAX_SESSION_TOKENS: usize = 16;
pub const MAX_TOKENS: usize = 1024;
/// Runs of distinct sources the live tokens of one session, and of the
/// node, may pin together (each costs about 48 bytes).
pub const MAX_SESSION_RUNS: usize = 1 << 14;
pub const MAX_PINNED_RUNS: usize = 1 << 20;
/// Inactivity timeout of a token when POPULATE TOKEN gives none, and the
/// longest one may ask for, in seconds.
pub const DEFAULT_TIMEOUT_S: u32 = 30;
pub const MAX_TIMEOUT_S: u32 = 600;
/// Copy operation results one session keeps for RECEIVE ROD TOKEN
/// INFORMATION.
const KEPT_RESULTS: usize = 16;
/// Handles of expired tokens remembered, to answer "expired", not
/// "unknown".
const EXPIRED_REMEMBERED: usize = 1024;

/// Service actions of THIRD-PARTY COPY OUT (0x83) and IN (0x84).
pub const EXTENDED_COPY: u8 = 0x00;
pub const POPULATE_TOKEN: u8 = 0x10;
pub const WRITE_USING_TOKEN: u8 = 0x11;
pub const RECEIVE_ROD_TOKEN_INFORMATION: u8 = 0x07;
pub const COPY_STATUS: u8 = 0x00;
pub const OPERATING_PARAMETERS: u8 = 0x03;
/// EXTENDED COPY limits: CSCD (target) descriptors, segment descriptors,
/// and the bytes of both lists together.
const MAX_CSCDS: usize = 8;
const MAX_SEGMENTS: usize = 64;
const MAX_DESCRIPTOR_LIST: usize = 2048;
/// The most blocks one segment moves (its count is 16 bits).
const MAX_SEGMENT_BLOCKS: u64 = 0xffff;

impl Sense {
    pub const TOKEN_UNKNOWN: Sense = Sense::illegal(0x23, 0x04);
    pub const TOKEN_CORRUPT: Sense = Sense::illegal(0x23, 0x05);
    pub const TOKEN_EXPIRED: Sense = Sense::illegal(0x23, 0x07);
    pub const TOKEN_REVOKED: Sense = Sense::illegal(0x23, 0x06);
    pub const UNSUPPORTED_TOKEN_TYPE: Sense = Sense::illegal(0x23, 0x01);
    pub const REMOTE_TOKEN_CREATION_NOT_SUPPORTED: Sense = Sense::illegal(0x23, 0x03);
    pub const TOO_MANY_SEGMENT_DESCRIPTORS: Sense = Sense::illegal(0x26, 0x08);
    pub const NO_RESOURCES_FOR_TOKEN: Sense = Sense::illegal(0x55, 0x0d);
    pub const TOO_MANY_TARGET_DESCRIPTORS: Sense = Sense::illegal(0x26, 0x06);
    pub const UNSUPPORTED_TARGET_DESCRIPTOR: Sense = Sense::illegal(0x26, 0x07);
    pub const UNSUPPORTED_SEGMENT_DESCRIPTOR: Sense = Sense::illegal(0x26, 0x09);
    /// COPY ABORTED: a segment names a CSCD descriptor the list lacks.
    pub const UNREACHABLE_COPY_TARGET: Sense = Sense::copy_aborted(0x08, 0x04);
    /// COPY ABORTED: a unit no designator here names, or a segment that
    /// does not fit its unit (what LIO answers, and libiscsi accepts).
    pub const COPY_TARGET_NOT_REACHABLE: Sense = Sense::copy_aborted(0x0d, 0x02);
}

/// One token's handle: its bytes 8..24.
type Handle = [u8; 16];

/// What a token was made of: it is revoked when that is deleted.
#[derive(Debug, Clone, Copy)]
enum Source {
    Volume(VolumeId),
    Snapshot(SnapshotId),
}

#[derive(Debug)]
struct Token {
    bytes: Box<[u8; ROD_TOKEN_LEN]>,
    /// The session that made it (its tokens end with it).
    owner: u64,
    source: Source,
    pins: Vec<Pinned>,
    blocks: u64,
    runs: usize,
    timeout: Duration,
    last_used: Mutex<Instant>,
}

impl Token {
    fn expired(&self, now: Instant) -> bool {
        now.duration_since(*self.last_used.lock().expect("token use")) > self.timeout
    }
}

#[derive(Debug, Default)]
struct Table {
    live: HashMap<Handle, Arc<Token>>,
    runs: usize,
    expired: VecDeque<Handle>,
}

impl Table {
    /// Drops the tokens whose inactivity timeout has passed.
    fn expire(&mut self, now: Instant) {
        let gone: Vec<Handle> = self
            .live
            .iter()
            .filter(|(_, t)| t.expired(now))
            .map(|(h, _)| *h)
            .collect();
        for h in gone {
            self.remove(&h);
            self.expired.push_back(h);
            if self.expired.len() > EXPIRED_REMEMBERED {
                self.expired.pop_front();
            }
        }
    }

    fn remove(&mut self, h: &Handle) {
        if let Some(t) = self.live.remove(h) {
            self.runs -= t.runs;
        }
    }
}

/// The node's copy manager: the live tokens, shared by every target.
#[derive(Debug)]
pub struct CopyManager {
    pool: Pool,
    /// Targets with a CHAP secret: EXTENDED COPY reaches no unit of one
    /// but the session's own.
    chap: Arc<Secrets>,
    tokens: Mutex<Table>,
    sessions: AtomicU64,
}

impl CopyManager {
    pub fn new(pool: Pool, chap: Arc<Secrets>) -> Self {
        CopyManager {
            pool,
            chap,
            tokens: Mutex::default(),
            sessions: AtomicU64::new(1),
        }
    }

    /// Whether session `owner` may make one more token (checked before a
    /// pin freezes anything).
    fn room(&self, owner: u64) -> Result<(), Sense> {
        let mut t = self.tokens.lock().expect("token table");
        t.expire(Instant::now());
        let mine = t.live.values().filter(|k| k.owner == owner).count();
        if mine >= MAX_SESSION_TOKENS || t.live.len() >= MAX_TOKENS {
            return Err(Sense::NO_RESOURCES_FOR_TOKEN);
        }
        Ok(())
    }

    fn add(&self, token: Token) -> Result<(), Sense> {
        let mut t = self.tokens.lock().expect("token table");
        t.expire(Instant::now());
        let (mine, mine_runs) = t
            .live
            .values()
            .filter(|k| k.owner == token.owner)
            .fold((0, 0), |(n, r), k| (n + 1, r + k.runs));
        if mine >= MAX_SESSION_TOKENS
            || mine_runs + token.runs > MAX_SESSION_RUNS
            || t.live.len() >= MAX_TOKENS
            || t.runs + token.runs > MAX_PINNED_RUNS
        {
            return Err(Sense::NO_RESOURCES_FOR_TOKEN);
        }
        t.runs += token.runs;
        let handle = handle_of(&token.bytes[..]);
        t.live.insert(handle, Arc::new(token));
        Ok(())
    }

    /// Whether what a token was made of still exists.
    fn exists(&self, source: Source) -> bool {
        match source {
            Source::Volume(v) => self.pool.volume_info(v).is_ok(),
            Source::Snapshot(s) => self.pool.snapshot_info(s).is_ok(),
        }
    }

    /// The live token these bytes are, its use noted.
    fn find(&self, bytes: &[u8]) -> Result<Arc<Token>, Sense> {
        let handle = handle_of(bytes);
        let mut t = self.tokens.lock().expect("token table");
        let now = Instant::now();
        t.expire(now);
        let Some(token) = t.live.get(&handle) else {
            return Err(if t.expired.contains(&handle) {
                Sense::TOKEN_EXPIRED
            } else {
                Sense::TOKEN_UNKNOWN
            });
        };
        // The whole token must match, its secret included.
        if token.bytes[..] != bytes[..ROD_TOKEN_LEN] {
            return Err(Sense::TOKEN_UNKNOWN);
        }
        // Its source was deleted: what it pins may be read no more.
        if !self.exists(token.source) {
            t.remove(&handle);
            return Err(Sense::TOKEN_REVOKED);
        }
        *token.last_used.lock().expect("token use") = now;
        Ok(Arc::clone(token))
    }

    fn delete(&self, bytes: &[u8]) {
        self.tokens
            .lock()
            .expect("token table")
            .remove(&handle_of(bytes));
    }
}

fn handle_of(bytes: &[u8]) -> Handle {
    bytes[8..24].try_into().expect("16 bytes")
}

/// A finished copy operation, kept for RECEIVE ROD TOKEN INFORMATION.
#[derive(Debug, Clone)]
struct Outcome {
    list_id: u32,
    service_action: u8,
    /// Blocks written (EXTENDED COPY, WRITE USING TOKEN) or represented
    /// (POPULATE TOKEN), and segments done (EXTENDED COPY).
    blocks: u64,
    segments: u16,
    result: Result<Option<Box<[u8; ROD_TOKEN_LEN]>>, Sense>,
}

/// One session's side of the copy manager (its I_T nexus): the results
/// of its copy operations by list identifier. The tokens the session made
/// end with it.
#[derive(Debug)]
pub struct Nexus {
    pub manager: Arc<CopyManager>,
    id: u64,
    results: Mutex<VecDeque<Outcome>>,
    /// POPULATE TOKEN (bytes a token stands for) and WRITE USING TOKEN
    /// (bytes written from one) of this unit.
    populated: OpMetrics,
    written: OpMetrics,
}

impl Nexus {
    pub fn new(manager: Arc<CopyManager>, metrics: &Metrics, export: &str) -> Self {
        Nexus {
            id: manager.sessions.fetch_add(1, Ordering::Relaxed),
            manager,
            results: Mutex::default(),
            populated: metrics.op(export, "populate_token"),
            written: metrics.op(export, "write_using_token"),
        }
    }

    fn record(&self, outcome: Outcome) {
        let mut r = self.results.lock().expect("copy results");
        // A new operation with a list identifier replaces the old one's.
        r.retain(|o| o.list_id != outcome.list_id);
        if r.len() == KEPT_RESULTS {
            r.pop_front();
        }
        r.push_back(outcome);
    }
}

impl Drop for Nexus {
    fn drop(&mut self) {
        let mut t = self.manager.tokens.lock().expect("token table");
        let mine: Vec<Handle> = t
            .live
            .iter()
            .filter(|(_, k)| k.owner == self.id)
            .map(|(h, _)| *h)
            .collect();
        for h in mine {
            t.remove(&h);
        }
    }
}

/// Block device range descriptors (16 bytes each) of a parameter list:
/// counted and checked against the unit, none overlapping another, their
/// total within [`MAX_TOKEN_BLOCKS`].
fn ranges(lun: &Lun, list: &[u8]) -> Result<Vec<BlockRange>, Sense> {
    if !list.len().is_multiple_of(16) || list.is_empty() {
        return Err(Sense::INVALID_FIELD_IN_PARAMETERS);
    }
    if list.len() / 16 > MAX_RANGES {
        return Err(Sense::TOO_MANY_SEGMENT_DESCRIPTORS);
    }
    let mut total = 0u64;
    let mut out = Vec::new();
    for d in list.chunks(16) {
        let r = BlockRange {
            first: be64(d),
            blocks: be32(&d[8..]),
        };
        lun.range(r.first, r.blocks)?;
        total += r.blocks;
        if r.blocks > 0 {
            out.push(r);
        }
    }
    if total > MAX_TOKEN_BLOCKS {
        return Err(Sense::INVALID_FIELD_IN_PARAMETERS);
    }
    let mut sorted = out.clone();
    sorted.sort_by_key(|r| r.first);
    if sorted
        .windows(2)
        .any(|w| w[0].first + w[0].blocks > w[1].first)
    {
        return Err(Sense::INVALID_FIELD_IN_PARAMETERS);
    }
    Ok(out)
}

/// The parameter list a THIRD-PARTY COPY OUT command's CDB announces.
pub fn parameter_length(cdb: &[u8; 16]) -> u64 {
    be32(&cdb[10..])
}

/// Runs EXTENDED COPY, POPULATE TOKEN or WRITE USING TOKEN, recording the
/// outcome for RECEIVE COPY RESULTS or RECEIVE ROD TOKEN INFORMATION.
pub fn copy_out(lun: &Lun, cdb: &[u8; 16], data: &[u8]) -> Result<(), Sense> {
    let service_action = cdb[1] & 0x1f;
    let (mut blocks, mut segments) = (0, 0);
    let (list_id, keep, result) = match service_action {
        EXTENDED_COPY => {
            // An empty parameter list copies nothing.
            if data.is_empty() {
                return Ok(());
            }
            // LIST ID USAGE 10b (discard) and 11b (no identifier): no one
            // will ask for the outcome; 01b is reserved.
            let usage = data.get(1).map_or(0, |b| (b >> 3) & 3);
            if usage == 1 {
                return Err(Sense::INVALID_FIELD_IN_PARAMETERS);
            }
            let keep = usage == 0;
            let r = extended_copy(lun, data, &mut blocks, &mut segments).map(|()| None);
            (u32::from(data[0]), keep, r)
        }
        POPULATE_TOKEN => {
            let r = populate(lun, data, &mut blocks).map(Some);
            (be32(&cdb[6..]) as u32, true, r)
        }
        WRITE_USING_TOKEN => {
            let r = write_using(lun, data, &mut blocks).map(|()| None);
            (be32(&cdb[6..]) as u32, true, r)
        }
        _ => return Err(Sense::INVALID_FIELD_IN_CDB),
    };
    if keep {
        lun.copies.record(Outcome {
            list_id,
            service_action,
            blocks,
            segments,
            result: result.clone(),
        });
    }
    result.map(drop)
}

/// EXTENDED COPY (LID1): identification CSCD descriptors (0xE4) naming
/// units of this node by a designator of their VPD page 0x83, and
/// block-to-block segment descriptors (0x02), run in order. Every
/// descriptor is checked before any segment runs; a failed segment ends
/// the copy (those before it stay written, as SPC allows).
fn extended_copy(
    lun: &Lun,
    data: &[u8],
    blocks: &mut u64,
    segments_done: &mut u16,
) -> Result<(), Sense> {
    if data.len() < 16 {
        return Err(Sense::PARAMETER_LIST_LENGTH);
    }
    let cscd_len = be16(&data[2..]) as usize;
    let segments_len = be32(&data[8..]) as usize;
    if be32(&data[12..]) != 0 {
        // Inline data: no segment type that uses it is supported.
        return Err(Sense::INVALID_FIELD_IN_PARAMETERS);
    }
    if cscd_len + segments_len > MAX_DESCRIPTOR_LIST {
        return Err(Sense::PARAMETER_LIST_LENGTH);
    }
    if data.len() < 16 + cscd_len + segments_len {
        return Err(Sense::PARAMETER_LIST_LENGTH);
    }
    let cscd_list = &data[16..16 + cscd_len];
    let segment_list = &data[16 + cscd_len..16 + cscd_len + segments_len];
    // CSCD descriptors: 32 bytes each.
    if !cscd_len.is_multiple_of(32) {
        return Err(Sense::PARAMETER_LIST_LENGTH);
    }
    if cscd_len / 32 > MAX_CSCDS {
        return Err(Sense::TOO_MANY_TARGET_DESCRIPTORS);
    }
    let mut units = Vec::new();
    for d in cscd_list.chunks(32) {
        if d[0] != 0xe4 {
            return Err(Sense::UNSUPPORTED_TARGET_DESCRIPTOR);
        }
        // Peripheral device type 0 (block); its block length, if given,
        // must be this unit's.
        let block_len = be32(&d[28..]) & 0x00ff_ffff;
        if d[1] & 0x1f != 0 || (block_len != 0 && block_len != BLOCK) {
            return Err(Sense::INVALID_FIELD_IN_PARAMETERS);
        }
        units.push(d);
    }
    // Segment descriptors: their own lengths; block to block only.
    let mut segments = Vec::new();
    let mut at = 0;
    while at < segment_list.len() {
        let rest = &segment_list[at..];
        if rest.len() < 4 {
            return Err(Sense::PARAMETER_LIST_LENGTH);
        }
        if rest[0] != 0x02 {
            return Err(Sense::UNSUPPORTED_SEGMENT_DESCRIPTOR);
        }
        let len = 4 + be16(&rest[2..]) as usize;
        if len != 28 || rest.len() < len {
            return Err(Sense::PARAMETER_LIST_LENGTH);
        }
        segments.push(&rest[..len]);
        if segments.len() > MAX_SEGMENTS {
            return Err(Sense::TOO_MANY_SEGMENT_DESCRIPTORS);
        }
        at += len;
    }
    let started = Instant::now();
    // Each unit is looked up once, when a segment first names it.
    let mut resolved: Vec<Option<Export>> = vec![None; units.len()];
    let mut unit = |i: usize| -> Result<Export, Sense> {
        let d = units.get(i).ok_or(Sense::UNREACHABLE_COPY_TARGET)?;
        if let Some(e) = &resolved[i] {
            return Ok(e.clone());
        }
        let e = resolve(lun, d)?;
        resolved[i] = Some(e.clone());
        Ok(e)
    };
    for d in segments {
        let (src, dst) = (unit(be16(&d[4..]) as usize)?, unit(be16(&d[6..]) as usize)?);
        let n = be16(&d[10..]);
        let (from, to) = (be64(&d[12..]), be64(&d[20..]));
        let fits = |e: &Export, lba: u64| {
            lba.checked_add(n)
                .is_some_and(|end| end <= e.size() / BLOCK)
        };
        if !fits(&src, from) || !fits(&dst, to) {
            return Err(Sense::COPY_TARGET_NOT_REACHABLE);
        }
        if dst.read_only() {
            return Err(Sense::WRITE_PROTECTED);
        }
        // The copy is this port's: other units' reservations hold for it.
        lun.port.may_read(&src.name())?;
        *segments_done += 1;
        if n == 0 {
            continue;
        }
        let range = [BlockRange {
            first: from,
            blocks: n,
        }];
        let overlaps = src.name() == dst.name() && from < to + n && to < from + n;
        let pins = match &src {
            // Copied at once: the live top may be read, unless the copy
            // overlaps itself (then it reads a frozen instant).
            Export::Volume(v) if overlaps => lun.copies.manager.pool.pin(v.id(), &range),
            Export::Volume(v) => v.pin_live(&range),
            Export::Snapshot(s) => s.pin(&range),
            Export::Remote(_) => return Err(Sense::COPY_TARGET_NOT_REACHABLE),
        }
        .map_err(|e| failed(lun, "extended copy", &e, false))?;
        lun.port.writing(Some(&dst.name()), || {
            land(&dst, to, &pins[0], 0, n).map_err(|e| failed(lun, "extended copy", &e, true))
        })?;
        *blocks += n;
    }
    lun.copies
        .written
        .observe(*blocks * BLOCK, started.elapsed());
    Ok(())
}

/// The unit an identification CSCD descriptor names by its NAA (as VPD
/// page 0x83 gives it): this session's own, or a unit of this node whose
/// target needs no CHAP (any initiator may log in to it anyway); a unit
/// behind CHAP is out of reach of another target's session.
fn resolve(lun: &Lun, d: &[u8]) -> Result<Export, Sense> {
    // Binary code set, a logical unit's designator, NAA, 16 bytes.
    let designator = &d[8..24];
    if d[4] & 0x0f != 1 || d[5] & 0x30 != 0 || d[5] & 0x0f != 3 || d[7] != 16 {
        return Err(Sense::COPY_TARGET_NOT_REACHABLE);
    }
    if naa(&lun.export.name())[..] == *designator {
        return Ok(lun.export.clone());
    }
    let manager = &lun.copies.manager;
    let names = Export::list(&manager.pool).map_err(|e| failed(lun, "extended copy", &e, false))?;
    let Some(name) = names
        .into_iter()
        .map(|(name, _)| name)
        .find(|name| naa(name)[..] == *designator)
    else {
        return Err(Sense::COPY_TARGET_NOT_REACHABLE);
    };
    let target = format!("{TARGET_PREFIX}{name}");
    if super::secret_for(&manager.chap, &manager.pool, Some(&target)).is_some() {
        tracing::warn!(
            target_name = %lun.target,
            unit = %name,
            "EXTENDED COPY names a unit whose target needs CHAP: refused"
        );
        return Err(Sense::COPY_TARGET_NOT_REACHABLE);
    }
    match Export::open(&manager.pool, &name) {
        Ok(Some(e)) => Ok(e),
        Ok(None) => Err(Sense::COPY_TARGET_NOT_REACHABLE),
        Err(e) => Err(failed(lun, "extended copy", &e, false)),
    }
}

fn populate(lun: &Lun, data: &[u8], blocks: &mut u64) -> Result<Box<[u8; ROD_TOKEN_LEN]>, Sense> {
    if data.len() < 16 || be16(data) + 2 > data.len() as u64 {
        return Err(Sense::PARAMETER_LIST_LENGTH);
    }
    let rtv = data[2] & 0x02 != 0;
    let timeout = match be32(&data[4..]) as u32 {
        0 => DEFAULT_TIMEOUT_S,
        t if t > MAX_TIMEOUT_S => return Err(Sense::INVALID_FIELD_IN_PARAMETERS),
        t => t,
    };
    // The copy manager's choice (0) or a point-in-time copy.
    if rtv && !matches!(be32(&data[8..]) as u32, 0 | ROD_TYPE_POINT_IN_TIME) {
        return Err(Sense::UNSUPPORTED_TOKEN_TYPE);
    }
    let list = be16(&data[14..]) as usize;
    if 16 + list > data.len() {
        return Err(Sense::PARAMETER_LIST_LENGTH);
    }
    let ranges = ranges(lun, &data[16..16 + list])?;
    let started = Instant::now();
    let manager = &lun.copies.manager;
    manager.room(lun.copies.id)?;
    let (source, pins) = match &lun.export {
        Export::Volume(v) => (Source::Volume(v.id()), manager.pool.pin(v.id(), &ranges)),
        Export::Snapshot(s) => (Source::Snapshot(s.id()), s.pin(&ranges)),
        Export::Remote(_) => return Err(Sense::REMOTE_TOKEN_CREATION_NOT_SUPPORTED),
    };
    let pins = pins.map_err(|e| match e.kind() {
        // The chain is at its depth limit: no freeze until merges catch up.
        ErrorKind::LimitReached => Sense::NO_RESOURCES_FOR_TOKEN,
        _ => failed(lun, "populate token", &e, false),
    })?;
    *blocks = pins.iter().map(Pinned::blocks).sum();
    let bytes = new_token(lun, *blocks)?;
    manager.add(Token {
        bytes: bytes.clone(),
        owner: lun.copies.id,
        source,
        runs: pins.iter().map(Pinned::runs).sum(),
        pins,
        blocks: *blocks,
        timeout: Duration::from_secs(u64::from(timeout)),
        last_used: Mutex::new(Instant::now()),
    })?;
    lun.copies
        .populated
        .observe(*blocks * BLOCK, started.elapsed());
    Ok(bytes)
}

/// A token's bytes (SPC-5 ROD token format): type, length, a random
/// handle, the unit it was made on, the bytes it represents, and a random
/// secret.
fn new_token(lun: &Lun, blocks: u64) -> Result<Box<[u8; ROD_TOKEN_LEN]>, Sense> {
    let mut t = Box::new([0u8; ROD_TOKEN_LEN]);
    t[0..4].copy_from_slice(&ROD_TYPE_POINT_IN_TIME.to_be_bytes());
    t[6..8].copy_from_slice(&((ROD_TOKEN_LEN - 8) as u16).to_be_bytes());
    // Creator logical unit: its NAA designator (as VPD page 0x83 has it).
    t[24..28].copy_from_slice(&[0x01, 0x03, 0x00, 0x10]);
    t[28..44].copy_from_slice(&super::scsi::naa(&lun.export.name()));
    t[56..64].copy_from_slice(&(blocks * BLOCK).to_be_bytes());
    let rng = ring::rand::SystemRandom::new();
    ring::rand::SecureRandom::fill(&rng, &mut t[8..24])
        .and_then(|()| ring::rand::SecureRandom::fill(&rng, &mut t[96..128]))
        .map_err(|_| Sense::INTERNAL_FAILURE)?;
    Ok(t)
}

fn write_using(lun: &Lun, data: &[u8], blocks: &mut u64) -> Result<(), Sense> {
    lun.writable()?;
    if data.len() < 536 || be16(data) + 2 > data.len() as u64 {
        return Err(Sense::PARAMETER_LIST_LENGTH);
    }
    let del_tkn = data[2] & 0x02 != 0;
    let offset = be64(&data[8..]);
    let token = &data[16..16 + ROD_TOKEN_LEN];
    let list = be16(&data[534..]) as usize;
    if 536 + list > data.len() {
        return Err(Sense::PARAMETER_LIST_LENGTH);
    }
    let ranges = ranges(lun, &data[536..536 + list])?;
    let wanted: u64 = ranges.iter().map(|r| r.blocks).sum();
    let started = Instant::now();
    let zero = be32(token) as u32 == ROD_TYPE_ZERO;
    if !zero && be32(token) as u32 != ROD_TYPE_POINT_IN_TIME {
        return Err(Sense::UNSUPPORTED_TOKEN_TYPE);
    }
    if !zero && be16(&token[6..]) != (ROD_TOKEN_LEN - 8) as u64 {
        return Err(Sense::TOKEN_CORRUPT);
    }
    lun.port.writing(None, || {
        if !zero {
            return land_token(lun, token, offset, &ranges, wanted, blocks);
        }
        // The block device zero token.
        for r in &ranges {
            lun.export
                .write_zeroes(r.first * BLOCK, r.blocks * BLOCK, ZeroFlags::default())
                .map_err(|e| failed(lun, "write using token", &e, true))?;
            *blocks += r.blocks;
        }
        Ok(())
    })?;
    if del_tkn && !zero {
        lun.copies.manager.delete(token);
    }
    lun.copies
        .written
        .observe(wanted * BLOCK, started.elapsed());
    Ok(())
}

/// Writes `ranges` from block `offset` of the token these bytes are.
fn land_token(
    lun: &Lun,
    token: &[u8],
    offset: u64,
    ranges: &[BlockRange],
    wanted: u64,
    blocks: &mut u64,
) -> Result<(), Sense> {
    let source = lun.copies.manager.find(token)?;
    if offset
        .checked_add(wanted)
        .is_none_or(|end| end > source.blocks)
    {
        return Err(Sense::INVALID_FIELD_IN_PARAMETERS);
    }
    let mut landed = Landed::default();
    let mut at = offset;
    for r in ranges {
        let mut done = 0;
        while done < r.blocks {
            // The pin holding block `at` of the token, and where in it.
            let (pin, within) = locate(&source.pins, at);
            let n = (r.blocks - done).min(pin.blocks() - within);
            let dst = r.first + done;
            let got = land(&lun.export, dst, pin, within, n)
                .map_err(|e| failed(lun, "write using token", &e, true))?;
            landed.shared += got.shared;
            landed.copied += got.copied;
            landed.zeroed += got.zeroed;
            done += n;
            at += n;
            *blocks += n;
        }
    }
    tracing::debug!(
        target_name = %lun.target,
        shared = landed.shared,
        copied = landed.copied,
        zeroed = landed.zeroed,
        "write using token"
    );
    Ok(())
}

/// The pin that holds block `at` of a token, and the block within it.
fn locate(pins: &[Pinned], mut at: u64) -> (&Pinned, u64) {
    for p in pins {
        if at < p.blocks() {
            return (p, at);
        }
        at -= p.blocks();
    }
    unreachable!("a block within the token's length");
}

/// Writes `n` blocks of `pin` from block `within` at block `dst` of the
/// unit: by reference into a volume of this node; for a volume of another
/// node, read here and written through the data path. Durable at the next
/// SYNCHRONIZE CACHE, as a WRITE without FUA.
fn land(
    unit: &Export,
    dst: u64,
    pin: &Pinned,
    within: u64,
    n: u64,
) -> crate::engine::Result<Landed> {
    match unit {
        // A piece at a time: a landing holds the volume's gate, which a
        // snapshot waits for.
        Export::Volume(v) => {
            const PIECE: u64 = 2048;
            let mut landed = Landed::default();
            let mut done = 0;
            while done < n {
                let k = (n - done).min(PIECE);
                let got = v.write_pinned(dst + done, pin, within + done, k, false)?;
                landed.shared += got.shared;
                landed.copied += got.copied;
                landed.zeroed += got.zeroed;
                done += k;
            }
            Ok(landed)
        }
        other => {
            const PIECE: u64 = 256;
            let mut buf = vec![0u8; (PIECE.min(n) * BLOCK) as usize];
            let mut done = 0;
            while done < n {
                let k = (n - done).min(PIECE);
                let part = &mut buf[..(k * BLOCK) as usize];
                pin.read(within + done, part)?;
                other.write((dst + done) * BLOCK, part, false)?;
                done += k;
            }
            Ok(Landed {
                copied: n * BLOCK,
                ..Landed::default()
            })
        }
    }
}

/// THIRD-PARTY COPY IN: RECEIVE COPY STATUS (LID1), RECEIVE COPY
/// OPERATING PARAMETERS, RECEIVE ROD TOKEN INFORMATION.
pub fn copy_in(lun: &Lun, cdb: &[u8; 16], data_in: &mut Vec<u8>) -> Result<(), Sense> {
    match cdb[1] & 0x1f {
        COPY_STATUS => copy_status(lun, cdb, data_in),
        OPERATING_PARAMETERS => {
            data_in.extend_from_slice(&operating_parameters());
            truncate(data_in, be32(&cdb[10..]));
            Ok(())
        }
        RECEIVE_ROD_TOKEN_INFORMATION => receive_rod_token_information(lun, cdb, data_in),
        _ => Err(Sense::INVALID_FIELD_IN_CDB),
    }
}

/// RECEIVE COPY OPERATING PARAMETERS: the EXTENDED COPY limits.
fn operating_parameters() -> Vec<u8> {
    let implemented = [0x02u8, 0xe4];
    let mut d = vec![0u8; 44];
    d[4] = 0x01; // SNLID: a list identifier may be left unused
    d[8..10].copy_from_slice(&(MAX_CSCDS as u16).to_be_bytes());
    d[10..12].copy_from_slice(&(MAX_SEGMENTS as u16).to_be_bytes());
    d[12..16].copy_from_slice(&(MAX_DESCRIPTOR_LIST as u32).to_be_bytes());
    d[16..20].copy_from_slice(&((MAX_SEGMENT_BLOCKS * BLOCK) as u32).to_be_bytes());
    d[34..36].copy_from_slice(&(KEPT_RESULTS as u16).to_be_bytes());
    d[36] = KEPT_RESULTS as u8;
    d[43] = implemented.len() as u8;
    d.extend_from_slice(&implemented);
    let available = (d.len() - 4) as u32;
    d[..4].copy_from_slice(&available.to_be_bytes());
    d
}

/// RECEIVE COPY STATUS (LID1): how the EXTENDED COPY with the CDB's list
/// identifier ended (they all end before their status returns).
fn copy_status(lun: &Lun, cdb: &[u8; 16], data_in: &mut Vec<u8>) -> Result<(), Sense> {
    let list_id = u32::from(cdb[2]);
    let mut results = lun.copies.results.lock().expect("copy results");
    let Some(i) = results
        .iter()
        .position(|o| o.list_id == list_id && o.service_action == EXTENDED_COPY)
    else {
        return Err(Sense::INVALID_FIELD_IN_CDB);
    };
    // Returned once, then forgotten (SPC-5).
    let o = results.remove(i).expect("found");
    let mut d = vec![0u8; 12];
    d[3] = 8;
    d[4] = if o.result.is_ok() { 0x01 } else { 0x02 };
    d[5..7].copy_from_slice(&o.segments.to_be_bytes());
    d[7] = 0xf1; // blocks of the destination
    d[8..12].copy_from_slice(&(o.blocks.min(u64::from(u32::MAX)) as u32).to_be_bytes());
    data_in.extend_from_slice(&d);
    truncate(data_in, be32(&cdb[10..]));
    Ok(())
}

/// RECEIVE ROD TOKEN INFORMATION: the outcome of the operation with the
/// CDB's list identifier, with the token POPULATE TOKEN made.
fn receive_rod_token_information(
    lun: &Lun,
    cdb: &[u8; 16],
    data_in: &mut Vec<u8>,
) -> Result<(), Sense> {
    let list_id = be32(&cdb[2..]) as u32;
    let allocation = be32(&cdb[10..]);
    let mut results = lun.copies.results.lock().expect("copy results");
    let Some(i) = results.iter().position(|o| o.list_id == list_id) else {
        return Err(Sense::INVALID_FIELD_IN_CDB);
    };
    let outcome = &results[i];
    let mut d = vec![0u8; 32];
    d[4] = outcome.service_action;
    d[8..12].copy_from_slice(&0xffff_fffeu32.to_be_bytes());
    d[15] = 0xf1; // transfer count in blocks of the destination
    d[16..24].copy_from_slice(&outcome.blocks.to_be_bytes());
    match &outcome.result {
        Ok(token) => {
            d[5] = 0x01; // completed without errors
            match token {
                Some(t) => {
                    d.extend_from_slice(&((2 + ROD_TOKEN_LEN) as u32).to_be_bytes());
                    d.extend_from_slice(&[0, 0]);
                    d.extend_from_slice(&t[..]);
                }
                None => d.extend_from_slice(&0u32.to_be_bytes()),
            }
        }
        Err(sense) => {
            d[5] = 0x02; // completed with errors
            d[12] = super::scsi::CHECK_CONDITION;
            let s = sense.fixed();
            d[13] = s.len().next_multiple_of(4) as u8;
            d[14] = s.len() as u8;
            d.extend_from_slice(&s);
            d.resize(32 + usize::from(d[13]), 0);
            d.extend_from_slice(&0u32.to_be_bytes());
        }
    }
    let available = (d.len() - 4) as u32;
    d[..4].copy_from_slice(&available.to_be_bytes());
    // Returned whole (or not wanted): the copy manager may forget it.
    if allocation == 0 || allocation >= d.len() as u64 {
        results.remove(i);
    }
    data_in.extend_from_slice(&d);
    truncate(data_in, allocation);
    Ok(())
}

/// VPD page 0x8F (third-party copy): the token limits, the commands, the
/// token features and types.
pub fn vpd_page() -> Vec<u8> {
    let mut b = Vec::new();
    let mut descriptor = |kind: u16, body: &[u8]| {
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&(body.len() as u16).to_be_bytes());
        b.extend_from_slice(body);
    };
    // Block device ROD token limits.
    let mut limits = vec![0u8; 32];
    limits[6..8].copy_from_slice(&(MAX_RANGES as u16).to_be_bytes());
    limits[8..12].copy_from_slice(&MAX_TIMEOUT_S.to_be_bytes());
    limits[12..16].copy_from_slice(&DEFAULT_TIMEOUT_S.to_be_bytes());
    limits[16..24].copy_from_slice(&MAX_TOKEN_BLOCKS.to_be_bytes());
    limits[24..32].copy_from_slice(&OPTIMAL_TRANSFER_BLOCKS.to_be_bytes());
    descriptor(0x0000, &limits);
    // Supported commands: 0x83 (EXTENDED COPY, POPULATE TOKEN, WRITE
    // USING TOKEN) and 0x84 (RECEIVE COPY STATUS, RECEIVE COPY OPERATING
    // PARAMETERS, RECEIVE ROD TOKEN INFORMATION).
    let commands = [
        0x83,
        3,
        EXTENDED_COPY,
        POPULATE_TOKEN,
        WRITE_USING_TOKEN,
        0x84,
        3,
        COPY_STATUS,
        OPERATING_PARAMETERS,
        RECEIVE_ROD_TOKEN_INFORMATION,
    ];
    let mut list = vec![commands.len() as u8];
    list.extend_from_slice(&commands);
    list.resize(list.len().next_multiple_of(4), 0);
    descriptor(0x0001, &list);
    // Parameter data (EXTENDED COPY limits) and supported descriptors.
    let mut params = vec![0u8; 28];
    params[4..6].copy_from_slice(&(MAX_CSCDS as u16).to_be_bytes());
    params[6..8].copy_from_slice(&(MAX_SEGMENTS as u16).to_be_bytes());
    params[8..12].copy_from_slice(&(MAX_DESCRIPTOR_LIST as u32).to_be_bytes());
    descriptor(0x0004, &params);
    descriptor(0x0008, &[2, 0x02, 0xe4, 0]);
    // ROD token features: no remote tokens; lifetimes; the block
    // device features (most bytes per token, optimal transfer).
    let mut features = vec![0u8; 44];
    features[12..16].copy_from_slice(&1u32.to_be_bytes());
    features[16..20].copy_from_slice(&MAX_TIMEOUT_S.to_be_bytes());
    features[20..24].copy_from_slice(&MAX_TIMEOUT_S.to_be_bytes());
    let mut block = vec![0u8; 48];
    block[2..4].copy_from_slice(&44u16.to_be_bytes());
    block[8..16].copy_from_slice(&(MAX_TOKEN_BLOCKS * BLOCK).to_be_bytes());
    block[16..24].copy_from_slice(&(OPTIMAL_TRANSFER_BLOCKS * BLOCK).to_be_bytes());
    block[24..32].copy_from_slice(&(MAX_TOKEN_BLOCKS * BLOCK).to_be_bytes());
    block[32..40].copy_from_slice(&(OPTIMAL_TRANSFER_BLOCKS * BLOCK).to_be_bytes());
    features[42..44].copy_from_slice(&(block.len() as u16).to_be_bytes());
    features.extend_from_slice(&block);
    descriptor(0x0106, &features);
    // Supported ROD types: point in time (tokens in and out), block
    // device zero (in).
    let mut types = vec![0u8; 4];
    types[2..4].copy_from_slice(&128u16.to_be_bytes());
    for (kind, flags) in [(ROD_TYPE_POINT_IN_TIME, 0x03u8), (ROD_TYPE_ZERO, 0x02)] {
        let mut t = vec![0u8; 64];
        t[0..4].copy_from_slice(&kind.to_be_bytes());
        t[4] = flags;
        types.extend_from_slice(&t);
    }
    descriptor(0x0108, &types);
    // General copy operations: one operation at a time per command.
    let mut general = vec![0u8; 32];
    general[0..4].copy_from_slice(&(MAX_TOKENS as u32).to_be_bytes());
    general[4..8].copy_from_slice(&(KEPT_RESULTS as u32).to_be_bytes());
    general[8..12].copy_from_slice(
        &((MAX_TOKEN_BLOCKS * BLOCK).min(u64::from(u32::MAX)) as u32).to_be_bytes(),
    );
    descriptor(0x8001, &general);
    b
}
