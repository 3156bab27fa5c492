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
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::error::{Error, Result, io_error};
use super::sys;

const REFRESH: Duration = Duration::from_millis(100);
const MIN_RESERVE: u64 = 16 << 20;
const MAX_RESERVE: u64 = 256 << 20;

/// See the module docs.
#[derive(Debug)]
pub(crate) struct SpaceGuard {
    dir: PathBuf,
    reserve: u64,
    state: Mutex<Estimate>,
}

#[derive(Debug)]
struct Estimate {
    free: u64,
    at: Instant,
}

impl SpaceGuard {
    /// A guard for the filesystem of `dir`; `reserve` overrides the default.
    pub(crate) fn new(dir: &Path, reserve: Option<u64>) -> Result<Self> {
        let (total, free) = sys::fs_space(dir).map_err(|e| io_error("read free space", dir, e))?;
        let reserve = reserve.unwrap_or((total / 100).clamp(MIN_RESERVE, MAX_RESERVE));
        Ok(SpaceGuard {
            dir: dir.to_path_buf(),
            reserve,
            state: Mutex::new(Estimate {
                free,
                at: Instant::now(),
            }),
        })
    }

    /// Bytes kept free for metadata.
    pub(crate) fn reserve(&self) -> u64 {
        self.reserve
    }

    /// Admits a data write of `bytes`, or refuses it with `NoSpace` if it
    /// would eat into the reserve.
    pub(crate) fn admit(&self, bytes: u64) -> Result<()> {
        let mut est = self.state.lock().expect("space estimate");
        let stale = est.at.elapsed() > REFRESH;
        if stale || est.free < self.reserve + bytes {
            let (_, free) =
                sys::fs_space(&self.dir).map_err(|e| io_error("read free space", &self.dir, e))?;
            *est = Estimate {
                free,
                at: Instant::now(),
            };
        }
        if est.free < self.reserve + bytes {
            return Err(Error::NoSpace {
                op: "write data",
                source: std::io::Error::from_raw_os_error(libc::ENOSPC),
            });
        }
        est.free -= bytes;
        Ok(())
    }
}
