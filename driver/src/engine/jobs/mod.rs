//! Background jobs of one pool: merges (fold layers nothing needs on their
//! own, shorten chains past their depth limit) and flattens (make a volume
//! independent of every layer under its top). They run while the volumes
//! serve I/O.
//!
//! ```text
//! enqueue ─▶ jobs table (catalog) ─▶ dispatcher thread: at most `max_running` at once,
//!            one job per layer family ─▶ worker: loop { plan.rs: next step from the
//!            catalog ─▶ fold.rs: run it (throttle.rs, copy.rs) } ─▶ done | failed
//! ```
//!
//! Access rules between a job and foreground I/O, by offset range:
//! - a job step that changes a volume's blocks holds the range lock of
//!   those blocks (as writes do), at most `step_bytes` at a time, and holds
//!   the volume's gate shared (so a snapshot, resize or delete waits for
//!   the step, and the step sees whether the top changed);
//! - it changes a block only if the live view still resolves it to the
//!   layer being folded: a block a write or discard took over is skipped,
//!   never overwritten, and a step that finds the chain changed ends and
//!   the job is planned again;
//! - reads take no lock: a block reads from the old layer until its entry
//!   names the new one, which happens after its data is there;
//! - switching which layers a chain uses holds the volume briefly (new I/O
//!   waits, in-flight I/O drains) and the pool's shape lock (no snapshot,
//!   clone or delete meanwhile); the hold is measured.
//!
//! Jobs keep their state in the catalog's `jobs` table; progress within a
//! step is in memory. After a crash, running jobs are queued again and
//! planned from the chain as it is; every step is idempotent (see
//! `fold.rs` for what a crash at each point leaves).

pub(crate) mod copy;
pub(crate) mod failpoint;
mod fold;
mod plan;
pub(crate) mod throttle;

pub use copy::Method;
pub use failpoint::NAMES as FAILPOINTS;
#[cfg(feature = "failpoints")]
pub use failpoint::on as on_failpoint;
pub(crate) use plan::foldable as plan_foldable;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::catalog::{JobKind, JobReason, JobRecord, JobState};
use super::error::{Error, Result};
use super::ids::{FamilyId, JobId, LayerId, VolumeId};
use super::pool::{Pool, PoolInner};
use fold::{Ctx, Outcome};
use plan::Step;
use throttle::Bucket;

/// Limits of the job runner.
#[derive(Debug, Clone)]
pub struct JobConfig {
    /// Jobs running at once; more wait in the queue (never refused).
    pub max_running: usize,
    /// Bytes per second one job may move (copied bytes; a reflinked byte
    /// counts 1/32).
    pub job_bytes_per_sec: u64,
    /// Bytes per second all jobs together may move.
    pub node_bytes_per_sec: u64,
    /// Longest chain before a merge is queued, unless a volume's policy
    /// says otherwise.
    pub default_max_chain_depth: u32,
    /// Largest piece of a volume a step holds at once.
    pub step_bytes: u64,
    /// How long a step waits when the volume was busy, and how many times
    /// in a row at most (while writes have allowance left).
    pub yield_time: Duration,
    pub max_yields: u32,
    /// Finished jobs kept for `strata jobs`.
    pub keep_finished: usize,
    /// Jobs run on threads of their own. Off (for tests that count every
    /// call a workload makes), nothing runs until
    /// [`Pool::run_jobs_here`](crate::engine::Pool::run_jobs_here).
    pub background: bool,
}

impl Default for JobConfig {
    fn default() -> Self {
        JobConfig {
            max_running: 2,
            job_bytes_per_sec: 128 << 20,
            node_bytes_per_sec: 256 << 20,
            default_max_chain_depth: 32,
            step_bytes: 1 << 20,
            yield_time: Duration::from_millis(2),
            max_yields: 25,
            keep_finished: 64,
            background: true,
        }
    }
}

/// Receives what jobs do, for metrics.
pub trait JobObserver: Send + Sync + std::fmt::Debug {
    /// Bytes moved by `method`.
    fn bytes(&self, kind: JobKind, method: Method, bytes: u64);
    /// A range or a volume was held for `seconds`.
    fn hold(&self, kind: JobKind, seconds: f64);
    /// A job waited `seconds` for its byte budget.
    fn throttled(&self, kind: JobKind, seconds: f64);
}

/// A job, as `strata jobs` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct JobInfo {
    pub id: JobId,
    pub kind: JobKind,
    pub reason: JobReason,
    /// The volume it works on (merge, flatten), or `None` (fold).
    pub volume: Option<VolumeId>,
    /// The layer it folds (fold).
    pub layer: Option<LayerId>,
    pub state: JobState,
    /// Why a queued or running job waits, if it does.
    pub waiting: Option<String>,
    /// A failure, or what was left alone and why.
    pub message: String,
    pub done_bytes: u64,
    pub total_bytes: u64,
    pub reflink_bytes: u64,
    pub copy_bytes: u64,
    /// Bytes moved per second since the job started (running jobs).
    pub rate_bytes_per_sec: f64,
    pub created_unix_ns: u64,
    pub finished_unix_ns: u64,
}

/// Live progress of a running job.
#[derive(Debug)]
pub(crate) struct Progress {
    done: AtomicU64,
    total: AtomicU64,
    reflink: AtomicU64,
    copy: AtomicU64,
    started: Instant,
    waiting: Mutex<Option<String>>,
}

impl Progress {
    fn new() -> Self {
        Progress {
            done: AtomicU64::new(0),
            total: AtomicU64::new(0),
            reflink: AtomicU64::new(0),
            copy: AtomicU64::new(0),
            started: Instant::now(),
            waiting: Mutex::new(None),
        }
    }
    pub(crate) fn add_total(&self, bytes: u64) {
        self.total.fetch_add(bytes, Ordering::Relaxed);
    }
    pub(crate) fn done(&self, bytes: u64) {
        self.done.fetch_add(bytes, Ordering::Relaxed);
    }
    pub(crate) fn moved(&self, m: Method, bytes: u64) {
        match m {
            Method::Reflink => &self.reflink,
            Method::Copy => &self.copy,
        }
        .fetch_add(bytes, Ordering::Relaxed);
    }
    pub(crate) fn set_waiting(&self, why: Option<String>) {
        *self.waiting.lock().expect("progress") = why;
    }
}

#[derive(Debug, Default)]
struct RunState {
    running: HashMap<JobId, Arc<Progress>>,
    families: HashSet<FamilyId>,
    /// Why queued jobs wait.
    waiting: HashMap<JobId, String>,
}

/// The job runner of one pool.
#[derive(Debug)]
pub(crate) struct Jobs {
    pub(crate) config: JobConfig,
    pub(crate) node_bucket: Bucket,
    state: Mutex<RunState>,
    wake: Condvar,
    stop: AtomicBool,
    observer: RwLock<Option<Arc<dyn JobObserver>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

impl Jobs {
    pub(crate) fn new(config: JobConfig) -> Self {
        Jobs {
            node_bucket: Bucket::new(config.node_bytes_per_sec),
            config,
            state: Mutex::new(RunState::default()),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
            observer: RwLock::new(None),
            threads: Mutex::new(Vec::new()),
        }
    }

    pub(crate) fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    pub(crate) fn observe(&self, f: impl FnOnce(&dyn JobObserver)) {
        if let Some(o) = &*self.observer.read().expect("observer") {
            f(o.as_ref());
        }
    }

    pub(crate) fn set_observer(&self, o: Arc<dyn JobObserver>) {
        *self.observer.write().expect("observer") = Some(o);
    }

    fn notify(&self) {
        let _s = self.state.lock().expect("job state");
        self.wake.notify_all();
    }

    /// Starts the dispatcher of `pool`.
    pub(crate) fn start(inner: &Arc<PoolInner>) {
        let (weak, jobs) = (Arc::downgrade(inner), Arc::clone(&inner.jobs));
        let handle = std::thread::Builder::new()
            .name("strata-jobs".into())
            .spawn(move || dispatch(weak, jobs))
            .expect("spawn the job dispatcher");
        inner.jobs.threads.lock().expect("job threads").push(handle);
    }

    /// Stops every job at its next piece and waits for the threads (also
    /// for one the dispatcher started while this was stopping it).
    pub(crate) fn shutdown(&self) {
        self.stop.store(true, Ordering::Release);
        self.notify();
        loop {
            let threads = std::mem::take(&mut *self.threads.lock().expect("job threads"));
            if threads.is_empty() {
                return;
            }
            for t in threads {
                let _ = t.join();
            }
        }
    }
}

/// The dispatcher: starts queued jobs while there is room. It holds the
/// pool only while it looks at the queue, never while it waits.
fn dispatch(weak: Weak<PoolInner>, jobs: Arc<Jobs>) {
    loop {
        if jobs.stopping() {
            return;
        }
        {
            let Some(inner) = weak.upgrade() else { return };
            let pool = Pool::internal(inner);
            if let Err(e) = start_ready(&pool, true) {
                tracing::warn!(error = %e, "starting jobs failed");
            }
        }
        let s = jobs.state.lock().expect("job state");
        if jobs.stopping() {
            return;
        }
        let _ = jobs.wake.wait_timeout(s, Duration::from_secs(1));
    }
}

/// Starts the queued jobs there is room for: each on a thread of its own,
/// or, without `spawn`, one after another on this thread.
fn start_ready(pool: &Pool, spawn: bool) -> Result<()> {
    let sh = pool.shared();
    let jobs = &pool.inner().jobs;
    let mut queued: Vec<JobRecord> = sh
        .catalog
        .read()?
        .jobs()?
        .into_iter()
        .filter(|j| j.state == JobState::Queued)
        .collect();
    queued.sort_by_key(|j| j.created_ns);
    for job in queued {
        let family = plan::family(&sh.catalog.read()?, &job)?;
        let mut st = jobs.state.lock().expect("job state");
        let running = st.running.len();
        if running >= jobs.config.max_running {
            st.waiting.insert(
                job.id,
                format!("queued: {running} jobs are running (the node's limit)"),
            );
            continue;
        }
        let Some(family) = family else {
            drop(st);
            finish(
                pool,
                job.id,
                JobState::Done,
                "nothing to do: its target is gone".into(),
                None,
            )?;
            continue;
        };
        if st.families.contains(&family) {
            st.waiting.insert(
                job.id,
                "queued: another job works on this volume's layers".into(),
            );
            continue;
        }
        st.families.insert(family);
        st.waiting.remove(&job.id);
        let progress = Arc::new(Progress::new());
        st.running.insert(job.id, Arc::clone(&progress));
        drop(st);
        let mut rec = job.clone();
        rec.state = JobState::Running;
        {
            let mut txn = sh.catalog.write()?;
            txn.put_job(&rec)?;
            txn.commit()?;
        }
        let weak = Arc::downgrade(pool.inner());
        if !spawn {
            run(weak, rec, family, progress);
            continue;
        }
        let mut threads = jobs.threads.lock().expect("job threads");
        if jobs.stopping() {
            // Queued again at the next open.
            drop(threads);
            release(pool, rec.id, family);
            return Ok(());
        }
        let handle = std::thread::Builder::new()
            .name(format!("strata-job-{}", rec.kind.label()))
            .spawn(move || {
                lower_priority();
                run(weak, rec, family, progress)
            })
            .map_err(|e| Error::Io {
                op: "start a job thread",
                path: Default::default(),
                source: e,
            })?;
        threads.retain(|t| !t.is_finished());
        threads.push(handle);
    }
    Ok(())
}

/// Makes the calling thread yield to foreground work: the lowest
/// best-effort I/O priority (not the idle class, which a busy disk could
/// starve) and the idle CPU scheduling class (it runs when a core has
/// nothing else to do; under a flood that saturates the cores, the write
/// allowance makes writers wait, which frees a core for the job). Neither
/// needs privileges.
fn lower_priority() {
    const IOPRIO_WHO_PROCESS: libc::c_long = 1;
    const IOPRIO_CLASS_BE: libc::c_long = 2;
    const IOPRIO_CLASS_SHIFT: libc::c_long = 13;
    // SAFETY: gettid, ioprio_set and sched_setscheduler take plain integers
    // and a parameter struct that lives for the call; they act on this
    // thread only.
    unsafe {
        let tid = libc::gettid();
        libc::syscall(
            libc::SYS_ioprio_set,
            IOPRIO_WHO_PROCESS,
            libc::c_long::from(tid),
            (IOPRIO_CLASS_BE << IOPRIO_CLASS_SHIFT) | 7,
        );
        let param = libc::sched_param { sched_priority: 0 };
        libc::sched_setscheduler(0, libc::SCHED_IDLE, &param);
    }
}

/// Runs one job to its end (or until the pool closes).
fn run(weak: Weak<PoolInner>, job: JobRecord, family: FamilyId, progress: Arc<Progress>) {
    let bucket = Bucket::new(
        weak.upgrade()
            .map_or(1 << 20, |i| i.jobs.config.job_bytes_per_sec),
    );
    let no_reflink = AtomicBool::new(false);
    let mut notes = Vec::new();
    let mut replans = 0u32;
    let outcome = loop {
        let Some(inner) = weak.upgrade() else {
            break Ok(Outcome::Interrupted);
        };
        if inner.jobs.stopping() {
            break Ok(Outcome::Interrupted);
        }
        let pool = Pool::internal(inner);
        let step = (|| {
            let txn = pool.shared().catalog.read()?;
            let depth = match job.max_depth {
                0 => pool.max_chain_depth(VolumeId(job.target))?,
                d => d,
            };
            plan::next(&txn, &job, depth)
        })();
        let plan = match step {
            Ok(p) => p,
            Err(e) => break Err(e),
        };
        notes = plan.notes;
        let Some(step) = plan.step else {
            break Ok(Outcome::Done);
        };
        let ctx = Ctx {
            pool: &pool,
            jobs: &pool.inner().jobs,
            kind: job.kind,
            bucket: &bucket,
            progress: &progress,
            no_reflink: &no_reflink,
        };
        let r = match step {
            Step::IntoTop {
                volume,
                top,
                parent,
            } => fold::into_top(&ctx, volume, top, parent),
            Step::IntoFrozen { layer, child } => fold::into_frozen(&ctx, layer, child),
        };
        // A step that failed because what it worked on was deleted meanwhile
        // (a volume, a snapshot's layers) did not fail: plan again. A
        // volume being deleted is gone for its calls before the catalog
        // says so: planned still, but replanned too.
        let r = match r {
            Err(e)
                if matches!(e, Error::VolumeNotFound(_)) || !still_planned(&pool, &job, step) =>
            {
                tracing::debug!(job = %job.id, error = %e, "step ended by a change of the chain");
                Ok(Outcome::Replan)
            }
            r => r,
        };
        match r {
            Ok(Outcome::Done) => replans = 0,
            Ok(Outcome::Replan) => {
                // The chain changed under the step (a snapshot, a delete).
                // Something that keeps changing it must not spin the job.
                replans += 1;
                if replans > 50 {
                    break Err(Error::Corrupt(format!(
                        "step {step:?} found the chain changed 50 times in a row"
                    )));
                }
                std::thread::sleep(Duration::from_millis(10 * u64::from(replans)));
            }
            Ok(Outcome::Interrupted) => break Ok(Outcome::Interrupted),
            Err(e) => break Err(e),
        }
    };
    let Some(inner) = weak.upgrade() else { return };
    let pool = Pool::internal(inner);
    let (state, message) = match outcome {
        Ok(Outcome::Interrupted) => {
            // Stays running in the catalog: queued again at the next open.
            release(&pool, job.id, family);
            return;
        }
        Ok(_) => (JobState::Done, notes.join("; ")),
        Err(e) => {
            tracing::warn!(job = %job.id, kind = job.kind.label(), error = %e, "job failed");
            (JobState::Failed, crate::engine::error::chain(&e))
        }
    };
    if let Err(e) = finish(&pool, job.id, state, message, Some(&progress)) {
        tracing::warn!(job = %job.id, error = %e, "recording the end of a job failed");
    }
    // Before the release: a waiter on the jobs (the crash test's child)
    // must not see the job over before this point has run.
    failpoint::hit("engine::merge::job::after_done");
    release(&pool, job.id, family);
}

/// Whether `job` would still take `step` next.
fn still_planned(pool: &Pool, job: &JobRecord, step: Step) -> bool {
    (|| {
        let txn = pool.shared().catalog.read()?;
        let depth = match job.max_depth {
            0 => pool.max_chain_depth(VolumeId(job.target))?,
            d => d,
        };
        plan::next(&txn, job, depth)
    })()
    .is_ok_and(|p| p.step == Some(step))
}

fn release(pool: &Pool, id: JobId, family: FamilyId) {
    let jobs = &pool.inner().jobs;
    let mut st = jobs.state.lock().expect("job state");
    st.running.remove(&id);
    st.families.remove(&family);
    jobs.wake.notify_all();
}

/// Records the end of a job and prunes old finished ones.
fn finish(
    pool: &Pool,
    id: JobId,
    state: JobState,
    message: String,
    progress: Option<&Progress>,
) -> Result<()> {
    let sh = pool.shared();
    let keep = pool.inner().jobs.config.keep_finished;
    let mut txn = sh.catalog.write()?;
    let Some(mut rec) = txn.job(id)? else {
        return Ok(());
    };
    rec.state = state;
    rec.message = message;
    rec.finished_ns = now_ns();
    if let Some(p) = progress {
        rec.reflink_bytes += p.reflink.load(Ordering::Relaxed);
        rec.copy_bytes += p.copy.load(Ordering::Relaxed);
    }
    txn.put_job(&rec)?;
    txn.commit()?;
    let mut finished: Vec<JobRecord> = sh
        .catalog
        .read()?
        .jobs()?
        .into_iter()
        .filter(|j| matches!(j.state, JobState::Done | JobState::Failed))
        .collect();
    if finished.len() > keep {
        finished.sort_by_key(|j| j.finished_ns);
        let mut txn = sh.catalog.write()?;
        for j in &finished[..finished.len() - keep] {
            txn.remove_job(j.id)?;
        }
        txn.commit()?;
    }
    Ok(())
}

impl Pool {
    /// Queues a job (or returns the one already queued or running for the
    /// same kind and target).
    pub(crate) fn enqueue(
        &self,
        kind: JobKind,
        target: u128,
        max_depth: u32,
        reason: JobReason,
    ) -> Result<JobId> {
        let sh = self.shared();
        let mut txn = sh.catalog.write()?;
        let existing = {
            let read = sh.catalog.read()?;
            read.jobs()?.into_iter().find(|j| {
                j.kind == kind
                    && j.target == target
                    && matches!(j.state, JobState::Queued | JobState::Running)
            })
        };
        if let Some(j) = existing {
            return Ok(j.id);
        }
        let rec = JobRecord {
            id: JobId::new_random(),
            kind,
            target,
            max_depth,
            reason,
            state: JobState::Queued,
            created_ns: now_ns(),
            finished_ns: 0,
            reflink_bytes: 0,
            copy_bytes: 0,
            message: String::new(),
        };
        txn.put_job(&rec)?;
        txn.commit()?;
        self.inner().jobs.notify();
        Ok(rec.id)
    }

    /// Queues a merge of `volume`: fold the layers of its chain that
    /// nothing needs on their own, then, if the chain is still longer than
    /// `max_depth` (0: the volume's policy), move the top's parents into
    /// the top until it is not.
    pub fn merge(&self, volume: VolumeId, max_depth: u32) -> Result<JobId> {
        self.volume_info(volume)?;
        self.enqueue(JobKind::Merge, volume.0, max_depth, JobReason::Request)
    }

    /// Queues a flatten of `volume`: every layer under its top is moved
    /// into the top, so the volume shares nothing with its source or its
    /// snapshots any more.
    pub fn flatten(&self, volume: VolumeId) -> Result<JobId> {
        self.volume_info(volume)?;
        self.enqueue(JobKind::Flatten, volume.0, 0, JobReason::Request)
    }

    /// Every job the pool keeps (queued, running, and recent finished ones),
    /// oldest first.
    pub fn jobs(&self) -> Result<Vec<JobInfo>> {
        let recs = self.shared().catalog.read()?.jobs()?;
        let st = self.inner().jobs.state.lock().expect("job state");
        let mut out: Vec<JobInfo> = recs
            .into_iter()
            .map(|r| {
                let live = st.running.get(&r.id);
                let (mut done, mut total, mut reflink, mut copy, mut rate) =
                    (0, 0, r.reflink_bytes, r.copy_bytes, 0.0);
                let mut waiting = st.waiting.get(&r.id).cloned();
                if let Some(p) = live {
                    done = p.done.load(Ordering::Relaxed);
                    total = p.total.load(Ordering::Relaxed);
                    let (rl, cp) = (
                        p.reflink.load(Ordering::Relaxed),
                        p.copy.load(Ordering::Relaxed),
                    );
                    reflink += rl;
                    copy += cp;
                    rate = (rl + cp) as f64 / p.started.elapsed().as_secs_f64().max(1e-3);
                    waiting = p.waiting.lock().expect("progress").clone();
                }
                if matches!(r.state, JobState::Done | JobState::Failed) {
                    waiting = None;
                }
                let (volume, layer) = match r.kind {
                    JobKind::Fold => (None, Some(LayerId(r.target))),
                    _ => (Some(VolumeId(r.target)), None),
                };
                JobInfo {
                    id: r.id,
                    kind: r.kind,
                    reason: r.reason,
                    volume,
                    layer,
                    state: r.state,
                    waiting,
                    message: r.message,
                    done_bytes: done,
                    total_bytes: total,
                    reflink_bytes: reflink,
                    copy_bytes: copy,
                    rate_bytes_per_sec: rate,
                    created_unix_ns: r.created_ns,
                    finished_unix_ns: r.finished_ns,
                }
            })
            .collect();
        out.sort_by_key(|j| j.created_unix_ns);
        Ok(out)
    }

    /// Waits until no job is queued or running (for tests and tools), up
    /// to `timeout`; `false` if jobs remain.
    pub fn wait_for_jobs(&self, timeout: Duration) -> Result<bool> {
        let deadline = Instant::now() + timeout;
        loop {
            let busy = self
                .shared()
                .catalog
                .read()?
                .jobs()?
                .iter()
                .any(|j| matches!(j.state, JobState::Queued | JobState::Running))
                // A job recorded done may still be finishing its thread.
                || !self.inner().jobs.state.lock().expect("job state").running.is_empty();
            if !busy {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs every queued job to its end on this thread, as long as some
    /// are queued (a job may queue another): for a pool opened with
    /// `jobs.background` off, where nothing else runs them.
    pub fn run_jobs_here(&self) -> Result<()> {
        for _ in 0..64 {
            let queued = self
                .shared()
                .catalog
                .read()?
                .jobs()?
                .iter()
                .any(|j| j.state == JobState::Queued);
            if !queued {
                return Ok(());
            }
            start_ready(self, false)?;
        }
        Ok(())
    }

    /// Reports what jobs do (bytes by method, holds, throttling) to `o`.
    pub fn set_job_observer(&self, o: Arc<dyn JobObserver>) {
        self.inner().jobs.set_observer(o);
    }
}
