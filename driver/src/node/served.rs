//! A staged volume as this node's frontends serve it ([`Served`]): from
//! this node's pool, or from the node that holds it, over the data path.
//! A live move switches it in place ([`Served::follow`], on the
//! controller's word: `agent.proto`, Follow). A call the old owner refuses
//! as moved waits for that switch and then goes to the new owner (so does
//! one that failed on the old owner after the switch), so the
//! kernel above sees a pause, not an error (for up to
//! [`crate::peer::RETRY_FOR`], as for an owner that is away).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::Instant;

use crate::engine::{Error, Result, Volume, VolumeId, ZeroFlags};
use crate::frontend::RemoteDevice;
use crate::peer::{RETRY_FOR, RemoteVolume};

/// Where a staged volume's I/O goes.
#[derive(Debug, Clone)]
pub enum Source {
    Local(Arc<Volume>),
    Remote(Arc<RemoteVolume>),
}

/// A staged volume, served from its current [`Source`].
#[derive(Debug)]
pub struct Served {
    vid: VolumeId,
    source: RwLock<Source>,
    /// Counts switches (read on every call without a lock); waiters for
    /// one sleep on `switched` under `waiting`.
    switches: AtomicU64,
    waiting: Mutex<()>,
    switched: Condvar,
    /// An earlier owner rebooted with writes it had answered and not
    /// flushed (see `peer::client`, Durability): they may be gone whatever
    /// serves the volume now, so every flush fails.
    lost: AtomicBool,
}

impl Served {
    pub fn new(vid: VolumeId, source: Source) -> Arc<Self> {
        Arc::new(Served {
            vid,
            source: RwLock::new(source),
            switches: AtomicU64::new(0),
            waiting: Mutex::new(()),
            switched: Condvar::new(),
            lost: AtomicBool::new(false),
        })
    }

    pub fn source(&self) -> Source {
        self.source.read().expect("source").clone()
    }

    /// The owner's volume, when another node holds it.
    pub fn remote(&self) -> Option<Arc<RemoteVolume>> {
        match self.source() {
            Source::Remote(r) => Some(r),
            Source::Local(_) => None,
        }
    }

    /// Serves from `source` from now on; calls waiting for it go on.
    /// Writes the old owner may have lost stay lost.
    pub fn follow(&self, source: Source) {
        let mut now = self.source.write().expect("source");
        let lost = matches!(&*now, Source::Remote(r) if r.lost_writes());
        *now = source;
        drop(now);
        if lost {
            self.lose();
        }
        self.wake();
    }

    /// Whether writes an earlier owner held may be lost.
    pub fn lost(&self) -> bool {
        self.lost.load(Ordering::Acquire)
    }

    /// Writes an earlier owner held may be lost: every flush fails from
    /// now on, recorded by the current owner's client (a restart of this
    /// process keeps failing them; on this node's own pool, the old
    /// client's record says so, and `resume` reads it).
    pub fn lose(&self) {
        self.lost.store(true, Ordering::Release);
        if let Source::Remote(r) = self.source()
            && let Err(e) = r.set_lost()
        {
            tracing::error!(volume = %self.vid, error = %e, "recording that writes may be lost");
        }
    }

    /// Calls waiting for a switch try their source again (also when it
    /// stays: a seal undone, see `agent.proto`, AttachRequest.unseal).
    pub fn wake(&self) {
        let _w = self.waiting.lock().expect("waiting");
        self.switches.fetch_add(1, Ordering::AcqRel);
        self.switched.notify_all();
    }

    /// Runs `op` on the current source; while it answers that the volume
    /// moved, waits for the switch and runs it again there.
    fn run<T>(&self, op: impl Fn(&Source) -> Result<T>) -> Result<T> {
        let deadline = Instant::now() + RETRY_FOR;
        loop {
            let seen = self.switches.load(Ordering::Acquire);
            let source = self.source();
            match op(&source) {
                // Failed on a source that was switched away from meanwhile
                // (its copy deleted since, say): the new one answers; but
                // writes the old one found lost stay lost.
                Err(e) if self.switches.load(Ordering::Acquire) != seen => {
                    if matches!(&source, Source::Remote(r) if r.lost_writes()) {
                        self.lose();
                    }
                    tracing::debug!(volume = %self.vid, error = %e, "a call that failed on the old owner goes to the new one");
                }
                Err(Error::Moved { node, .. }) if Instant::now() < deadline => {
                    tracing::debug!(volume = %self.vid, to = %node, "waiting for a moved volume's attachment to follow it");
                    let waiting = self.waiting.lock().expect("waiting");
                    let left = deadline.saturating_duration_since(Instant::now());
                    drop(
                        self.switched
                            .wait_timeout_while(waiting, left, |_| {
                                self.switches.load(Ordering::Acquire) == seen
                            })
                            .expect("waiting"),
                    );
                }
                r => return r,
            }
        }
    }
}

impl RemoteDevice for Served {
    fn name(&self) -> String {
        self.vid.to_string()
    }

    fn size(&self) -> u64 {
        match &*self.source.read().expect("source") {
            Source::Local(v) => v.size(),
            Source::Remote(r) => r.size(),
        }
    }

    fn read_only(&self) -> bool {
        match &*self.source.read().expect("source") {
            Source::Local(_) => false,
            Source::Remote(r) => r.read_only(),
        }
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        // `run` takes a shared closure; the buffer is lent to one attempt
        // at a time.
        let buf = Mutex::new(buf);
        self.run(|s| {
            let mut b = buf.lock().expect("buffer");
            match s {
                Source::Local(v) => v.read(offset, &mut b),
                Source::Remote(r) => r.read(offset, &mut b),
            }
        })
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        self.run(|s| match s {
            Source::Local(v) => v.write(offset, data, fua),
            Source::Remote(r) => r.write(offset, data, fua),
        })
    }

    fn flush(&self) -> Result<()> {
        // Asked at every attempt: a flush that waited for a switch, or
        // failed on the old owner, must not succeed on the new one over
        // writes the old one lost (`follow` finds them).
        self.run(|s| {
            if self.lost.load(Ordering::Acquire) {
                return Err(Error::Io {
                    op: "flush",
                    path: format!("volume {}", self.vid).into(),
                    source: std::io::Error::other(
                        "an earlier owner rebooted while it held acknowledged writes it had not \
                         flushed; they may be lost",
                    ),
                });
            }
            match s {
                Source::Local(v) => v.flush(),
                Source::Remote(r) => r.flush(),
            }
        })
    }

    fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.run(|s| match s {
            Source::Local(v) => v.trim(offset, len),
            Source::Remote(r) => r.trim(offset, len),
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.run(|s| match s {
            Source::Local(v) => v.write_zeroes(offset, len, flags),
            Source::Remote(r) => r.write_zeroes(offset, len, flags),
        })
    }
}
