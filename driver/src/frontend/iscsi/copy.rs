//! Offload copy by token (SBC-4 POPULATE TOKEN and WRITE USING TOKEN,
//! SPC-5 RECEIVE ROD TOKEN INFORMATION): an initiator asks for a token
//! standing for ranges of one unit, then has ranges of this or another
//! unit of the node written from it, and no data crosses the network.
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
//! node until their inactivity timeout passes or the process ends; a token
//! that is unknown, expired or for a unit of another node gets the
//! INVALID TOKEN OPERATION code SPC-5 gives. What tokens may hold is
//! bounded: [`MAX_TOKENS`] tokens, [`MAX_PINNED_RUNS`] runs over all of
//! them, [`MAX_TOKEN_BLOCKS`] per token and per WRITE USING TOKEN.
//!
//! Written by hand: no crate implements a SCSI copy manager.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::engine::{BlockRange, Landed, Pinned, Pool, ZeroFlags};
use crate::frontend::Export;
use crate::metrics::{Metrics, OpMetrics};

use super::scsi::{BLOCK, Lun, Sense, be16, be32, be64, failed, truncate};

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
/// Live tokens of the node.
pub const MAX_TOKENS: usize = 256;
/// Runs of distinct sources all live tokens may pin together (each costs
/// about 48 bytes).
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
pub const POPULATE_TOKEN: u8 = 0x10;
pub const WRITE_USING_TOKEN: u8 = 0x11;
pub const RECEIVE_ROD_TOKEN_INFORMATION: u8 = 0x07;

impl Sense {
    pub const TOKEN_UNKNOWN: Sense = Sense::illegal(0x23, 0x04);
    pub const TOKEN_CORRUPT: Sense = Sense::illegal(0x23, 0x05);
    pub const TOKEN_EXPIRED: Sense = Sense::illegal(0x23, 0x07);
    pub const UNSUPPORTED_TOKEN_TYPE: Sense = Sense::illegal(0x23, 0x01);
    pub const REMOTE_TOKEN_CREATION_NOT_SUPPORTED: Sense = Sense::illegal(0x23, 0x03);
    pub const TOO_MANY_SEGMENT_DESCRIPTORS: Sense = Sense::illegal(0x26, 0x08);
    pub const NO_RESOURCES_FOR_TOKEN: Sense = Sense::illegal(0x55, 0x0d);
}

/// One token's handle: its bytes 8..24.
type Handle = [u8; 16];

#[derive(Debug)]
struct Token {
    bytes: Box<[u8; ROD_TOKEN_LEN]>,
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
    tokens: Mutex<Table>,
}

impl CopyManager {
    pub fn new(pool: Pool) -> Self {
        CopyManager {
            pool,
            tokens: Mutex::default(),
        }
    }

    fn add(&self, token: Token) -> Result<(), Sense> {
        let mut t = self.tokens.lock().expect("token table");
        t.expire(Instant::now());
        if t.live.len() >= MAX_TOKENS || t.runs + token.runs > MAX_PINNED_RUNS {
            return Err(Sense::NO_RESOURCES_FOR_TOKEN);
        }
        t.runs += token.runs;
        let handle = handle_of(&token.bytes[..]);
        t.live.insert(handle, Arc::new(token));
        Ok(())
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
    /// Blocks written (WRITE USING TOKEN) or represented (POPULATE TOKEN).
    blocks: u64,
    result: Result<Option<Box<[u8; ROD_TOKEN_LEN]>>, Sense>,
}

/// One session's side of the copy manager (its I_T nexus): the results
/// of its copy operations by list identifier.
#[derive(Debug)]
pub struct Nexus {
    pub manager: Arc<CopyManager>,
    results: Mutex<VecDeque<Outcome>>,
    /// POPULATE TOKEN (bytes a token stands for) and WRITE USING TOKEN
    /// (bytes written from one) of this unit.
    populated: OpMetrics,
    written: OpMetrics,
}

impl Nexus {
    pub fn new(manager: Arc<CopyManager>, metrics: &Metrics, export: &str) -> Self {
        Nexus {
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

/// Block device range descriptors (16 bytes each) of a parameter list:
/// counted and checked against the unit, their total within
/// [`MAX_TOKEN_BLOCKS`].
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
    Ok(out)
}

/// The parameter list a THIRD-PARTY COPY OUT command's CDB announces.
pub fn parameter_length(cdb: &[u8; 16]) -> u64 {
    be32(&cdb[10..])
}

/// Runs POPULATE TOKEN or WRITE USING TOKEN, recording the outcome.
pub fn copy_out(lun: &Lun, cdb: &[u8; 16], data: &[u8]) -> Result<(), Sense> {
    let list_id = be32(&cdb[6..]) as u32;
    let service_action = cdb[1] & 0x1f;
    let mut blocks = 0;
    let result = match service_action {
        POPULATE_TOKEN => populate(lun, data, &mut blocks).map(Some),
        WRITE_USING_TOKEN => write_using(lun, data, &mut blocks).map(|()| None),
        _ => return Err(Sense::INVALID_FIELD_IN_CDB),
    };
    lun.copies.record(Outcome {
        list_id,
        service_action,
        blocks,
        result: result.clone(),
    });
    result.map(drop)
}

fn populate(
    lun: &Lun,
    data: &[u8],
    blocks: &mut u64,
) -> Result<Box<[u8; ROD_TOKEN_LEN]>, Sense> {
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
    let pins = match &lun.export {
        Export::Volume(v) => lun.copies.manager.pool.pin(v.id(), &ranges),
        Export::Snapshot(s) => s.pin(&ranges),
        Export::Remote(_) => return Err(Sense::REMOTE_TOKEN_CREATION_NOT_SUPPORTED),
    }
    .map_err(|e| failed(lun, "populate token", &e, false))?;
    *blocks = pins.iter().map(Pinned::blocks).sum();
    let bytes = new_token(lun, *blocks)?;
    lun.copies.manager.add(Token {
        bytes: bytes.clone(),
        runs: pins.iter().map(Pinned::runs).sum(),
        pins,
        blocks: *blocks,
        timeout: Duration::from_secs(u64::from(timeout)),
        last_used: Mutex::new(Instant::now()),
    })?;
    lun.copies.populated.observe(*blocks * BLOCK, started.elapsed());
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
    if be32(token) as u32 == ROD_TYPE_ZERO {
        for r in &ranges {
            lun.export
                .write_zeroes(r.first * BLOCK, r.blocks * BLOCK, ZeroFlags::default())
                .map_err(|e| failed(lun, "write using token", &e, true))?;
            *blocks += r.blocks;
        }
        lun.copies.written.observe(wanted * BLOCK, started.elapsed());
        return Ok(());
    }
    if be32(token) as u32 != ROD_TYPE_POINT_IN_TIME {
        return Err(Sense::UNSUPPORTED_TOKEN_TYPE);
    }
    if be16(&token[6..]) != (ROD_TOKEN_LEN - 8) as u64 {
        return Err(Sense::TOKEN_CORRUPT);
    }
    let source = lun.copies.manager.find(token)?;
    if offset
        .checked_add(wanted)
        .is_none_or(|end| end > source.blocks)
    {
        return Err(Sense::INVALID_FIELD_IN_PARAMETERS);
    }
    let mut landed = Landed::default();
    let mut at = offset;
    for r in &ranges {
        let mut done = 0;
        while done < r.blocks {
            // The pin holding block `at` of the token, and where in it.
            let (pin, within) = locate(&source.pins, at);
            let n = (r.blocks - done).min(pin.blocks() - within);
            let dst = r.first + done;
            let got = land(lun, dst, pin, within, n)
                .map_err(|e| failed(lun, "write using token", &e, true))?;
            landed.shared += got.shared;
            landed.copied += got.copied;
            landed.zeroed += got.zeroed;
            done += n;
            at += n;
            *blocks += n;
        }
    }
    if del_tkn {
        lun.copies.manager.delete(token);
    }
    lun.copies.written.observe(wanted * BLOCK, started.elapsed());
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
fn land(lun: &Lun, dst: u64, pin: &Pinned, within: u64, n: u64) -> crate::engine::Result<Landed> {
    match &lun.export {
        Export::Volume(v) => v.write_pinned(dst, pin, within, n, false),
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

/// RECEIVE ROD TOKEN INFORMATION: the outcome of the operation with the
/// CDB's list identifier, with the token POPULATE TOKEN made.
pub fn receive_rod_token_information(
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
    // Supported commands: 0x83 (POPULATE TOKEN, WRITE USING TOKEN) and
    // 0x84 (RECEIVE ROD TOKEN INFORMATION).
    let commands = [0x83, 2, POPULATE_TOKEN, WRITE_USING_TOKEN, 0x84, 1, RECEIVE_ROD_TOKEN_INFORMATION];
    let mut list = vec![commands.len() as u8];
    list.extend_from_slice(&commands);
    list.resize(list.len().next_multiple_of(4), 0);
    descriptor(0x0001, &list);
    // ROD token features: no remote tokens; lifetimes; the block
    // device features (most bytes per token, optimal transfer).
    let mut features = vec![0u8; 32];
    features[12..16].copy_from_slice(&1u32.to_be_bytes());
    features[16..20].copy_from_slice(&MAX_TIMEOUT_S.to_be_bytes());
    features[20..24].copy_from_slice(&MAX_TIMEOUT_S.to_be_bytes());
    let mut block = vec![0u8; 48];
    block[2..4].copy_from_slice(&44u16.to_be_bytes());
    block[8..16].copy_from_slice(&(MAX_TOKEN_BLOCKS * BLOCK).to_be_bytes());
    block[16..24].copy_from_slice(&(OPTIMAL_TRANSFER_BLOCKS * BLOCK).to_be_bytes());
    block[24..32].copy_from_slice(&(MAX_TOKEN_BLOCKS * BLOCK).to_be_bytes());
    block[32..40].copy_from_slice(&(OPTIMAL_TRANSFER_BLOCKS * BLOCK).to_be_bytes());
    features[30..32].copy_from_slice(&(block.len() as u16).to_be_bytes());
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
    general[8..12].copy_from_slice(&((MAX_TOKEN_BLOCKS * BLOCK).min(u64::from(u32::MAX)) as u32).to_be_bytes());
    descriptor(0x8001, &general);
    b
}
