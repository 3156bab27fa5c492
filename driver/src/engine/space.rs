//! The free-space reserve.
//!
//! Data writes are refused with `NoSpace` once the pool's filesystem has
//! less than a reserve left (1% of the filesystem, at least 16 MiB and at
//! most 256 MiB). The reserve is what flushes, checkpoints, snapshots and
//! the recovery at open need for metadata, so a pool that filled up still
//! flushes what it acknowledged, reopens, and can delete things to make
//! room: a full pool never becomes an unopenable one.
//!
//! Free space is read with `statvfs` at most every 100 ms (and whenever the
//! estimate gets close to the reserve); in between, every admitted write is
//! subtracted from the estimate as if it allocated new blocks, so many
//! writers cannot overshoot the reserve between two readings.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::error::{Error, Result, io_error};
use super::io::Fs;

const REFRESH: Duration = Duration::from_millis(100);
const MIN_RESERVE: u64 = 16 << 20;
const MAX_RESERVE: u64 = 256 << 20;

/// See the module docs.
#[derive(Debug)]
pub(crate) struct SpaceGuard {
    fs: Arc<dyn Fs>,
    dir: PathBuf,
    reserve: u64,
    state: Mutex<Estimate>,
    /// Space jobs have set aside for what they will write; foreground
    /// writes cannot have it.
    for_jobs: AtomicU64,
}

#[derive(Debug)]
struct Estimate {
    free: u64,
    at: Instant,
}

impl SpaceGuard {
    /// A guard for the filesystem of `dir`; `reserve` overrides the default.
    pub(crate) fn new(fs: Arc<dyn Fs>, dir: &Path, reserve: Option<u64>) -> Result<Self> {
        let (total, free) = fs
            .space(dir)
            .map_err(|e| io_error("read free space", dir, e))?;
        let reserve = reserve.unwrap_or((total / 100).clamp(MIN_RESERVE, MAX_RESERVE));
        Ok(SpaceGuard {
            fs,
            dir: dir.to_path_buf(),
            reserve,
            state: Mutex::new(Estimate {
                free,
                at: Instant::now(),
            }),
            for_jobs: AtomicU64::new(0),
        })
    }

    fn free(&self) -> Result<(u64, u64)> {
        self.fs
            .space(&self.dir)
            .map_err(|e| io_error("read free space", &self.dir, e))
    }

    /// Bytes kept free for metadata.
    pub(crate) fn reserve(&self) -> u64 {
        self.reserve
    }

    /// Admits a data write of `bytes`, or refuses it with `NoSpace` if it
    /// would eat into the reserve.
    pub(crate) fn admit(&self, bytes: u64) -> Result<()> {
        let mut est = self.state.lock().expect("space estimate");
        // What jobs set aside is not for foreground writes.
        let needed = self.reserve + self.for_jobs.load(Ordering::Acquire) + bytes;
        if est.at.elapsed() > REFRESH || est.free < needed {
            let (_, free) = self.free()?;
            *est = Estimate {
                free,
                at: Instant::now(),
            };
        }
        if est.free < needed {
            return Err(Error::NoSpace {
                op: "write data",
                source: std::io::Error::from_raw_os_error(libc::ENOSPC),
            });
        }
        est.free -= bytes;
        Ok(())
    }

    /// Sets `bytes` aside for a job, if the filesystem has them above the
    /// reserve and what other jobs hold; otherwise says how much there is.
    pub(crate) fn reserve_for_job(&self, bytes: u64) -> Result<Result<(), u64>> {
        let _est = self.state.lock().expect("space estimate");
        let (_, free) = self.free()?;
        let held = self.for_jobs.load(Ordering::Acquire);
        let available = free.saturating_sub(self.reserve + held);
        if available < bytes {
            return Ok(Err(available));
        }
        self.for_jobs.fetch_add(bytes, Ordering::AcqRel);
        Ok(Ok(()))
    }

    /// Gives back what [`SpaceGuard::reserve_for_job`] set aside.
    pub(crate) fn release_job(&self, bytes: u64) {
        self.for_jobs.fetch_sub(bytes, Ordering::AcqRel);
    }
}
