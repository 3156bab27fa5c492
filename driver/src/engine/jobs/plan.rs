//! What a job does next, decided from the catalog alone: a job keeps no
//! cursor, so after a crash it is planned again from the chain as it is,
//! and every step is idempotent.
//!
//! A frozen layer is *foldable* when nothing needs it on its own: no
//! visible snapshot is on it and exactly one layer (its child) is built on
//! it (`refs == 1`). Folding it moves its blocks into the child, which then
//! sits on the foldable layer's parent; the layer and the space held only
//! by the blocks its child overrides go. A layer with several children
//! (clones, or a snapshot and the volume) is never folded: that would copy
//! its data once per child.

use super::super::catalog::{JobKind, JobRecord, LayerRecord, ReadTxn, SnapshotState};
use super::super::error::Result;
use super::super::ids::{FamilyId, LayerId, VolumeId};

/// One step of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// Move `parent`'s blocks into the writable top of `volume`, in place,
    /// under range coordination; the top then sits on `parent`'s parent.
    /// `parent` goes if nothing else needs it.
    IntoTop {
        volume: VolumeId,
        top: LayerId,
        parent: LayerId,
    },
    /// Fold foldable `layer` into its only child `child`, a frozen layer:
    /// a new file for the child is built and swapped in.
    IntoFrozen { layer: LayerId, child: LayerId },
}

/// The next step, or `None` when the job is done; the string notes what
/// was left alone and why.
#[derive(Debug, Default)]
pub(crate) struct Plan {
    pub step: Option<Step>,
    pub notes: Vec<String>,
}

/// Whether `l` is needed only by its one child.
pub(crate) fn foldable(txn: &ReadTxn, l: &LayerRecord) -> Result<bool> {
    if !l.frozen || l.refs != 1 {
        return Ok(false);
    }
    Ok(match l.snapshot {
        Some(s) => txn
            .snapshot(s)?
            .is_none_or(|s| s.state == SnapshotState::Deleted),
        None => true,
    })
}

/// Why a frozen layer of a chain stays (if it is not foldable).
fn why_kept(txn: &ReadTxn, l: &LayerRecord) -> Result<Option<String>> {
    if foldable(txn, l)? {
        return Ok(None);
    }
    let snapshot = match l.snapshot {
        Some(s) => txn.snapshot(s)?.filter(|s| s.state == SnapshotState::Ready),
        None => None,
    };
    Ok(Some(match snapshot {
        Some(s) => format!("layer {} is snapshot {}", l.id, s.id),
        None => format!(
            "layer {} has {} children (clones or snapshots built on it): kept until only one remains",
            l.id,
            txn.children(l.id)?.len()
        ),
    }))
}

/// The volume whose writable top is `layer`.
fn volume_on_top(txn: &ReadTxn, layer: LayerId) -> Result<Option<VolumeId>> {
    Ok(txn
        .volumes()?
        .into_iter()
        .find(|v| v.top == layer)
        .map(|v| v.id))
}

/// The family a job works on (jobs of one family run one at a time), or
/// `None` if its target is gone.
pub(crate) fn family(txn: &ReadTxn, job: &JobRecord) -> Result<Option<FamilyId>> {
    let layer = match job.kind {
        JobKind::Fold => Some(LayerId(job.target)),
        JobKind::Merge | JobKind::Flatten => txn.volume(VolumeId(job.target))?.map(|v| v.top),
    };
    Ok(match layer {
        Some(l) => txn.layer(l)?.map(|l| l.family),
        None => None,
    })
}

/// Plans the next step of `job`; `max_depth` is the depth a merge
/// shortens to.
pub(crate) fn next(txn: &ReadTxn, job: &JobRecord, max_depth: u32) -> Result<Plan> {
    let mut plan = Plan::default();
    match job.kind {
        JobKind::Fold => {
            let Some(l) = txn.layer(LayerId(job.target))? else {
                return Ok(plan);
            };
            if let Some(why) = why_kept(txn, &l)? {
                plan.notes.push(why);
                return Ok(plan);
            }
            let children = txn.children(l.id)?;
            let [child] = children.as_slice() else {
                return Ok(plan);
            };
            plan.step = Some(match volume_on_top(txn, child.id)? {
                Some(volume) => Step::IntoTop {
                    volume,
                    top: child.id,
                    parent: l.id,
                },
                None => Step::IntoFrozen {
                    layer: l.id,
                    child: child.id,
                },
            });
        }
        JobKind::Flatten => {
            let Some(v) = txn.volume(VolumeId(job.target))? else {
                return Ok(plan);
            };
            let top = txn.layer_required(v.top)?;
            if let Some(parent) = top.parent {
                plan.step = Some(Step::IntoTop {
                    volume: v.id,
                    top: top.id,
                    parent,
                });
            }
        }
        JobKind::Merge => {
            let Some(v) = txn.volume(VolumeId(job.target))? else {
                return Ok(plan);
            };
            // Base first; the top last.
            let chain = txn.chain(v.top)?;
            let top = chain.last().expect("a chain has its top");
            // Fold what nothing needs, nearest the top first.
            for (i, l) in chain.iter().enumerate().rev().skip(1) {
                match why_kept(txn, l)? {
                    None => {
                        let child = &chain[i + 1];
                        plan.step = Some(if child.id == top.id {
                            Step::IntoTop {
                                volume: v.id,
                                top: top.id,
                                parent: l.id,
                            }
                        } else {
                            Step::IntoFrozen {
                                layer: l.id,
                                child: child.id,
                            }
                        });
                        return Ok(plan);
                    }
                    Some(why) => plan.notes.push(why),
                }
            }
            // Still too deep: the top takes its parent's blocks (the parent
            // stays for what else needs it).
            if chain.len() > max_depth.max(1) as usize
                && let Some(parent) = top.parent
            {
                plan.notes.clear();
                plan.step = Some(Step::IntoTop {
                    volume: v.id,
                    top: top.id,
                    parent,
                });
            }
        }
    }
    Ok(plan)
}
