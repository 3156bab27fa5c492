//! The two ways a layer's blocks move into the layer above it.
//!
//! **Into the writable top, in place** ([`into_top`]), for `parent` right
//! under the top `T` of a volume:
//! 1. checkpoint the volumes that froze a layer since their last
//!    checkpoint (every presence change of frozen layers is in the catalog;
//!    the top's dirty pages are not written back here, which on XFS would
//!    stall the top's writers);
//! 2. for each run of blocks `parent` defines, in pieces of a few MiB,
//!    [`Volume::absorb`]: under the range lock, the blocks whose entry in
//!    the live view is still `parent` (or a zero of `parent`'s) are moved
//!    into `T`'s file (pointer copy where the filesystem can) and become
//!    `T`'s, exactly as a foreground write would make them. A foreground
//!    write or discard of a block either ran before (the block is `T`'s
//!    already: skipped, never overwritten) or waits for the piece. Reads go
//!    on throughout: a block reads from `parent` until its entry names `T`,
//!    which happens only after its data is in `T`'s file;
//! 3. checkpoint again: `T`'s new blocks are in the catalog;
//! 4. switch, holding the volume (new I/O waits, in-flight I/O drains):
//!    one catalog transaction makes `T` sit on `parent`'s parent and drops
//!    `T`'s reference to `parent` (which goes if nothing else needs it).
//!
//! A crash before 4 leaves `T` holding copies of `parent`'s blocks over a
//! chain that still has `parent`: the same contents; the job, planned
//! again, skips what was moved. A snapshot of the volume during 2 freezes
//! `T`: the step notices and the job plans again.
//!
//! **Into a frozen child, by a new file** ([`into_frozen`]), for foldable
//! `L` under its only child `C`, both frozen (their files never change in
//! place):
//! 1. build `layers/<C>.data.merge`: `C`'s data blocks, then `L`'s blocks
//!    that `C` does not define; sync it;
//! 2. under the pool's shape lock (no snapshot, clone or delete can free
//!    `L` or `C` meanwhile), check both are still there, rename the new
//!    file over `C`'s and sync the directory. The new file holds `C`'s
//!    blocks unchanged, plus blocks `C`'s presence does not name yet
//!    (never read): a crash here leaves the old state;
//! 3. switch: one catalog transaction gives `C` the union of both presence
//!    maps and `L`'s parent, and removes `L`; then, holding each volume
//!    whose live view names `L`, their entries for `L` name `C`. `L`'s
//!    file goes when the last reader of it (an open snapshot export) is
//!    done. A failed commit changes no view.
//!
//! Both reserve the space they may write before they start (nothing when
//! the filesystem shares extents) and wait, visibly, until they can.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::super::catalog::JobKind;
use super::super::error::{Error, Result, io_error};
use super::super::geometry::{BLOCK_SIZE, CHUNK_BLOCKS};
use super::super::ids::{LayerId, VolumeId};
use super::super::io::{FileIo, Open, Span};
use super::super::layer::{LAYERS_DIR, layer_path, remove_quietly, sync_dir};
use super::super::pool::Pool;
use super::super::presence::{self, BlockState};
use super::copy::{self, Method};
use super::plan::foldable;
use super::throttle::{Bucket, REFLINK_COST_DIVISOR};
use super::{Jobs, Progress, failpoint};

/// How a step ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Done,
    /// The chain changed under the step: plan again.
    Replan,
    /// The pool is closing.
    Interrupted,
}

/// What a step needs from its job.
pub(crate) struct Ctx<'a> {
    pub pool: &'a Pool,
    pub jobs: &'a Jobs,
    pub kind: JobKind,
    pub bucket: &'a Bucket,
    pub progress: &'a Progress,
    /// The filesystem refused a pointer copy: byte copies from now on.
    pub no_reflink: &'a AtomicBool,
}

impl Ctx<'_> {
    fn failpoint(&self, step: &str) {
        let kind = match self.kind {
            JobKind::Flatten => "flatten",
            JobKind::Merge | JobKind::Fold => "merge",
        };
        failpoint::hit(&format!("engine::{kind}::{step}"));
    }

    fn stopping(&self) -> bool {
        self.jobs.stopping()
    }

    /// Waits for the budgets before moving `bytes`.
    fn throttle(&self, bytes: u64) {
        let cost = if self.no_reflink.load(Ordering::Relaxed) {
            bytes
        } else {
            bytes / REFLINK_COST_DIVISOR
        };
        let waited = self.bucket.take(cost) + self.jobs.node_bucket.take(cost);
        if !waited.is_zero() {
            self.jobs
                .observe(|o| o.throttled(self.kind, waited.as_secs_f64()));
        }
    }

    fn moved(&self, method: Method, bytes: u64) {
        self.progress.moved(method, bytes);
        self.jobs.observe(|o| o.bytes(self.kind, method, bytes));
    }

    fn held(&self, d: Duration) {
        self.jobs.observe(|o| o.hold(self.kind, d.as_secs_f64()));
    }

    /// Copies a range, counting it by method.
    fn move_data(
        &self,
        src: &dyn FileIo,
        dst: &dyn FileIo,
        off: u64,
        len: u64,
        what: &std::path::Path,
    ) -> Result<()> {
        let m = copy::copy_range(src, dst, Span::at(off, len), self.no_reflink)
            .map_err(|e| io_error("copy between layers", what, e))?;
        self.moved(m, len);
        Ok(())
    }

    /// Sets `bytes` aside (as a byte copy may write them all), waiting
    /// while the pool lacks them; `None` if the pool is closing first.
    fn reserve(&self, bytes: u64) -> Result<Option<Reserved<'_>>> {
        let bytes = if self.no_reflink.load(Ordering::Relaxed) {
            bytes
        } else {
            bytes / 64
        };
        let space = &self.pool.shared().space;
        loop {
            match space.reserve_for_job(bytes)? {
                Ok(()) => {
                    self.progress.set_waiting(None);
                    return Ok(Some(Reserved { ctx: self, bytes }));
                }
                Err(available) => self.progress.set_waiting(Some(format!(
                    "waiting for {} MiB of free space ({} MiB free above the reserve and other jobs)",
                    bytes.div_ceil(1 << 20),
                    available >> 20
                ))),
            }
            if self.stopping() {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

/// Space set aside for one step.
struct Reserved<'a> {
    ctx: &'a Ctx<'a>,
    bytes: u64,
}

impl Drop for Reserved<'_> {
    fn drop(&mut self) {
        self.ctx.pool.shared().space.release_job(self.bytes);
    }
}

/// Blocks per piece: a step holds at most this much of a volume at once.
/// A byte copy holds its range for as long as copying takes, so its pieces
/// are an eighth of a pointer copy's.
fn piece_blocks(ctx: &Ctx<'_>) -> u64 {
    let bytes = if ctx.no_reflink.load(Ordering::Relaxed) {
        ctx.jobs.config.step_bytes / 8
    } else {
        ctx.jobs.config.step_bytes
    };
    (bytes / BLOCK_SIZE).max(1)
}

/// See the module docs.
pub(crate) fn into_top(
    ctx: &Ctx<'_>,
    volume: VolumeId,
    top: LayerId,
    parent: LayerId,
) -> Result<Outcome> {
    let pool = ctx.pool;
    let sh = pool.shared();
    let vol = match pool.volume(volume) {
        Ok(v) => v,
        Err(Error::VolumeNotFound(_)) => return Ok(Outcome::Replan),
        Err(e) => return Err(e),
    };
    pool.checkpoint_frozen()?;
    let (prec, chunks) = {
        let txn = sh.catalog.read()?;
        let Some(t) = txn.layer(top)? else {
            return Ok(Outcome::Replan);
        };
        if t.parent != Some(parent) || t.frozen {
            return Ok(Outcome::Replan);
        }
        let Some(prec) = txn.layer(parent)? else {
            return Ok(Outcome::Replan);
        };
        (prec, txn.presence(parent)?)
    };
    let total: u64 = chunks
        .iter()
        .flat_map(|(_, runs)| runs.iter())
        .filter(|r| r.state == BlockState::Data)
        .map(|r| u64::from(r.len) * BLOCK_SIZE)
        .sum();
    ctx.progress.add_total(total);
    let Some(_space) = ctx.reserve(total)? else {
        return Ok(Outcome::Interrupted);
    };
    let parent_h = sh.layer(prec.id, prec.slot);
    vol.allowance.start();
    let copied = (|| {
        let mut activity = vol.activity.load(Ordering::Relaxed);
        for (chunk, runs) in &chunks {
            for run in runs {
                let run_start = u64::from(*chunk) * CHUNK_BLOCKS + u64::from(run.start);
                let run_end = run_start + u64::from(run.len);
                let mut s = run_start;
                while s < run_end {
                    if ctx.stopping() {
                        return Ok(Outcome::Interrupted);
                    }
                    let e = (s + piece_blocks(ctx)).min(run_end);
                    let bytes = (e - s) * BLOCK_SIZE;
                    if run.state == BlockState::Data {
                        ctx.throttle(bytes);
                    }
                    // Yield to a busy volume while writes have credit.
                    for _ in 0..ctx.jobs.config.max_yields {
                        let now = vol.activity.load(Ordering::Relaxed);
                        if now == activity || !vol.allowance.has_credit() {
                            break;
                        }
                        activity = now;
                        std::thread::sleep(ctx.jobs.config.yield_time);
                    }
                    let mut mv = |src: &dyn FileIo, dst: &dyn FileIo, off: u64, len: u64| {
                        ctx.move_data(src, dst, off, len, parent_h.path())
                    };
                    match vol.absorb(top, &parent_h, (s, e), run.state, &mut mv)? {
                        None => return Ok(Outcome::Replan),
                        Some((_, held)) => ctx.held(held),
                    }
                    if run.state == BlockState::Data {
                        ctx.progress.done(bytes);
                        vol.allowance.replenish(bytes);
                    }
                    s = e;
                }
            }
            ctx.failpoint("fold_top::after_chunk");
        }
        Ok(Outcome::Done)
    })();
    vol.allowance.stop();
    match copied? {
        Outcome::Done => {}
        other => return Ok(other),
    }
    vol.flush_and_checkpoint()?;
    ctx.failpoint("fold_top::after_checkpoint");

    // The switch.
    let _shape = sh.shape.lock().expect("shape lock");
    // Frozen views pinned by the volume may be purged below: fold its
    // journal first, so none of them is needed to find a presence.
    vol.flush_and_checkpoint()?;
    let (switched, held) = vol.hold(|st| -> Result<Option<Vec<LayerId>>> {
        if st.top.id != top || st.view.count_slot(parent_h.slot) > 0 {
            return Ok(None);
        }
        let mut txn = sh.catalog.write()?;
        let (Some(mut t), Some(p)) = (txn.layer(top)?, txn.layer(parent)?) else {
            return Ok(None);
        };
        if t.parent != Some(parent) {
            return Ok(None);
        }
        t.parent = p.parent;
        txn.put_layer(&t)?;
        if let Some(pp) = p.parent {
            txn.retain_layer(pp)?;
        }
        let freed = txn.release_layer(parent)?;
        txn.commit()?;
        st.view.remove_layer(&parent_h);
        st.base = None;
        st.base_weak = std::sync::Weak::new();
        Ok(Some(freed))
    });
    ctx.held(held);
    let Some(freed) = switched? else {
        return Ok(Outcome::Replan);
    };
    if !freed.is_empty() {
        sh.purge_views_holding(&parent_h);
    }
    drop(parent_h);
    sh.discard_layers(&freed);
    ctx.failpoint("fold_top::after_switch");
    Ok(Outcome::Done)
}

/// Per block of one chunk: where the merged layer's data comes from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum From {
    Nothing,
    Child,
    Layer,
}

/// See the module docs.
pub(crate) fn into_frozen(ctx: &Ctx<'_>, layer: LayerId, child: LayerId) -> Result<Outcome> {
    let pool = ctx.pool;
    let sh = pool.shared();
    pool.checkpoint_frozen()?;
    let (l, c, merged, copies) = {
        let txn = sh.catalog.read()?;
        let (Some(l), Some(c)) = (txn.layer(layer)?, txn.layer(child)?) else {
            return Ok(Outcome::Replan);
        };
        if !foldable(&txn, &l)? || c.parent != Some(l.id) || !c.frozen {
            return Ok(Outcome::Replan);
        }
        let (lp, cp) = (txn.presence(l.id)?, txn.presence(c.id)?);
        let mut chunks: Vec<u32> = lp.iter().chain(cp.iter()).map(|(k, _)| *k).collect();
        chunks.sort_unstable();
        chunks.dedup();
        let states = |p: &[(u32, Vec<presence::Run>)], k: u32| {
            p.iter().find(|(c, _)| *c == k).map_or_else(
                || vec![BlockState::Absent; CHUNK_BLOCKS as usize],
                |(_, r)| presence::expand(r),
            )
        };
        let mut merged = Vec::new();
        let mut copies: Vec<(u64, u64, From)> = Vec::new();
        for k in chunks {
            let (ls, cs) = (states(&lp, k), states(&cp, k));
            let base = u64::from(k) * CHUNK_BLOCKS;
            let mut m = cs.clone();
            for i in 0..m.len() {
                if m[i] == BlockState::Absent {
                    m[i] = ls[i];
                }
                let from = match (cs[i], ls[i]) {
                    (BlockState::Data, _) => From::Child,
                    (BlockState::Absent, BlockState::Data) => From::Layer,
                    _ => From::Nothing,
                };
                match copies.last_mut() {
                    Some((s, len, f)) if *f == from && *s + *len == base + i as u64 => *len += 1,
                    _ => copies.push((base + i as u64, 1, from)),
                }
            }
            merged.push((k, presence::encode(&m)));
        }
        copies.retain(|(_, _, f)| *f != From::Nothing);
        (l, c, merged, copies)
    };
    ctx.failpoint("fold_frozen::planned");
    let total: u64 = copies.iter().map(|(_, n, _)| n * BLOCK_SIZE).sum();
    ctx.progress.add_total(total);
    let Some(_space) = ctx.reserve(total)? else {
        return Ok(Outcome::Interrupted);
    };
    let (l_h, c_h) = (sh.layer(l.id, l.slot), sh.layer(c.id, c.slot));
    let tmp = sh.dir.join(LAYERS_DIR).join(format!("{}.data.merge", c.id));
    let built = (|| -> Result<Outcome> {
        let out = sh
            .fs
            .open(&tmp, Open::Truncate)
            .map_err(|e| io_error("create", &tmp, e))?;
        out.set_len(c.size).map_err(|e| io_error("size", &tmp, e))?;
        for &(start, n, from) in &copies {
            let src = match from {
                From::Child => c_h.file()?,
                _ => l_h.file()?,
            };
            let mut s = start;
            while s < start + n {
                if ctx.stopping() {
                    return Ok(Outcome::Interrupted);
                }
                let e = (s + piece_blocks(ctx)).min(start + n);
                let bytes = (e - s) * BLOCK_SIZE;
                ctx.throttle(bytes);
                ctx.move_data(&*src, &*out, s * BLOCK_SIZE, bytes, &tmp)?;
                ctx.progress.done(bytes);
                s = e;
            }
        }
        if sh.opts.sync {
            out.sync_all().map_err(|e| io_error("sync", &tmp, e))?;
        }
        Ok(Outcome::Done)
    })();
    match built {
        Ok(Outcome::Done) => {}
        other => {
            remove_quietly(&*sh.fs, &tmp);
            return other;
        }
    }
    ctx.failpoint("fold_frozen::after_build");

    // From here on no snapshot, clone or delete runs (they take the shape
    // lock): `L` and `C` cannot be freed between the check below and the
    // commit, so the new file never ends up as the file of a layer the
    // catalog no longer has.
    let _shape = sh.shape.lock().expect("shape lock");
    let still = {
        let txn = sh.catalog.read()?;
        txn.layer(child)?.is_some_and(|c| c.parent == Some(layer)) && txn.layer(layer)?.is_some()
    };
    if !still {
        remove_quietly(&*sh.fs, &tmp);
        return Ok(Outcome::Replan);
    }
    let dest = layer_path(&sh.dir, c.id);
    let installed = sh
        .fs
        .rename(&tmp, &dest)
        .map_err(|e| io_error("rename", &dest, e))
        .and_then(|()| {
            if sh.opts.sync {
                sync_dir(&*sh.fs, &sh.dir.join(LAYERS_DIR))?;
            }
            Ok(())
        });
    c_h.reopen();
    if let Err(e) = installed {
        remove_quietly(&*sh.fs, &tmp);
        return Err(e);
    }
    ctx.failpoint("fold_frozen::after_rename");

    // The switch: the catalog first (`C` gets both presence maps), then
    // the live views that name `L` name `C` instead. Until the views
    // change they read `L`'s blocks from `L`'s file, which stays until
    // its last handle goes; if the commit fails they are left as they are
    // and still right (the new file holds `C`'s blocks unchanged).
    let affected: Vec<_> = pool
        .loaded_volumes()
        .into_iter()
        .filter(|v| v.state.read().expect("volume state").view.holds(&l_h))
        .collect();
    for v in &affected {
        v.flush_and_checkpoint()?;
    }
    let committed = (|| -> Result<bool> {
        let mut txn = sh.catalog.write()?;
        let (Some(l), Some(mut c)) = (txn.layer(layer)?, txn.layer(child)?) else {
            return Ok(false);
        };
        if c.parent != Some(l.id) {
            return Ok(false);
        }
        c.parent = l.parent;
        txn.put_layer(&c)?;
        for (k, enc) in &merged {
            txn.put_presence_chunk(c.id, *k, enc.as_deref())?;
        }
        // The child takes over `l`'s reference to its parent.
        txn.remove_layer(&l)?;
        if let Some(s) = l.snapshot {
            txn.remove_snapshot(s)?;
        }
        txn.commit()?;
        Ok(true)
    })()?;
    if !committed {
        return Ok(Outcome::Replan);
    }
    for v in &affected {
        let ((), held) = v.hold(|st| {
            st.view.rename_slot(&l_h, c.slot);
            st.base = None;
            st.base_weak = std::sync::Weak::new();
        });
        ctx.held(held);
    }
    sh.purge_views_holding(&l_h);
    drop(l_h);
    sh.discard_layers(&[l.id]);
    ctx.failpoint("fold_frozen::after_commit");
    Ok(Outcome::Done)
}
