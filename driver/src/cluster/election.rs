//! Which of several `strata controller` replicas acts, and where the
//! others find it.
//!
//! With the embedded store the election is a lock file beside the records
//! (`flock`, released by the kernel when the holder dies), holding the
//! leader's address; in Kubernetes it is a Lease, with the address in an
//! annotation (`cluster/kube/lease.rs`). Either way a round says
//! [`Round::Leading`] or names the leader's address for forwarding.

use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

/// The outcome of one round of the election.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Round {
    /// This process leads.
    Leading,
    /// Another process leads; its controller address, when it gave one.
    Following(Option<String>),
}

/// Why a round could not be decided.
#[derive(Debug, thiserror::Error)]
pub enum ElectionError {
    #[error("lock file {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[cfg(feature = "kubernetes")]
    #[error(transparent)]
    Lease(#[from] crate::cluster::kube::lease::LeaseError),
}

/// The election a controller takes part in.
#[derive(Debug)]
pub enum Election {
    File(FileLock),
    #[cfg(feature = "kubernetes")]
    Lease(Box<crate::cluster::kube::lease::LeaderLease>),
}

impl Election {
    /// One round. A leader of a lock file stays leader until it exits; a
    /// Lease must be renewed by calling this again within its duration.
    pub async fn round(&self) -> Result<Round, ElectionError> {
        match self {
            Election::File(f) => f.round(),
            #[cfg(feature = "kubernetes")]
            Election::Lease(l) => Ok(l.try_acquire().await?),
        }
    }

    /// Steps down at shutdown, so a follower takes over at once.
    pub async fn release(&self) -> Result<(), ElectionError> {
        match self {
            Election::File(f) => {
                // Closing the descriptor drops the flock.
                f.held.lock().unwrap_or_else(|e| e.into_inner()).take();
                Ok(())
            }
            #[cfg(feature = "kubernetes")]
            Election::Lease(l) => l.release().await.map(|_| ()).map_err(Into::into),
        }
    }

    /// How often a leader must renew: `None` for a lock file, which the
    /// kernel keeps until the process exits.
    pub fn renew_every(&self) -> Option<Duration> {
        match self {
            Election::File(_) => None,
            #[cfg(feature = "kubernetes")]
            Election::Lease(l) => Some(l.duration() / 3),
        }
    }

    /// How often a follower tries again.
    pub fn retry(&self) -> Duration {
        match self {
            Election::File(_) => Duration::from_millis(500),
            #[cfg(feature = "kubernetes")]
            Election::Lease(l) => l.duration() / 5,
        }
    }
}

/// A lock file: whoever holds `flock` on it leads and has written its
/// address into it.
#[derive(Debug)]
pub struct FileLock {
    path: PathBuf,
    address: Option<String>,
    held: Mutex<Option<std::fs::File>>,
}

impl FileLock {
    /// The lock for the records file `records` (`records.leader` beside it).
    pub fn beside(records: &Path, address: Option<String>) -> FileLock {
        let mut name = records.as_os_str().to_owned();
        name.push(".leader");
        FileLock {
            path: PathBuf::from(name),
            address,
            held: Mutex::new(None),
        }
    }

    fn io(&self, source: std::io::Error) -> ElectionError {
        ElectionError::Io {
            path: self.path.clone(),
            source,
        }
    }

    fn round(&self) -> Result<Round, ElectionError> {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if held.is_some() {
            return Ok(Round::Leading);
        }
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&self.path)
            .map_err(|e| self.io(e))?;
        // SAFETY: flock on a descriptor this function owns.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(self.io(err));
            }
            let mut text = String::new();
            file.read_to_string(&mut text).map_err(|e| self.io(e))?;
            let leader = text.trim();
            return Ok(Round::Following(
                (!leader.is_empty()).then(|| leader.to_string()),
            ));
        }
        file.set_len(0).map_err(|e| self.io(e))?;
        file.rewind().map_err(|e| self.io(e))?;
        if let Some(a) = &self.address {
            file.write_all(a.as_bytes()).map_err(|e| self.io(e))?;
        }
        file.sync_data().map_err(|e| self.io(e))?;
        *held = Some(file);
        Ok(Round::Leading)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_holder_leads_and_the_others_learn_its_address() {
        let dir = tempfile::tempdir().unwrap();
        let records = dir.path().join("records.redb");
        let a = FileLock::beside(&records, Some("127.0.0.1:1".into()));
        let b = FileLock::beside(&records, Some("127.0.0.1:2".into()));
        assert_eq!(a.round().unwrap(), Round::Leading);
        assert_eq!(a.round().unwrap(), Round::Leading);
        assert_eq!(
            b.round().unwrap(),
            Round::Following(Some("127.0.0.1:1".into()))
        );
        // The holder goes away (as its process would on exit).
        drop(a);
        assert_eq!(b.round().unwrap(), Round::Leading);
        let c = FileLock::beside(&records, None);
        assert_eq!(
            c.round().unwrap(),
            Round::Following(Some("127.0.0.1:2".into()))
        );
        drop(b);
        // A leader without an address leaves none behind.
        assert_eq!(c.round().unwrap(), Round::Leading);
        let d = FileLock::beside(&records, Some("x:1".into()));
        assert_eq!(d.round().unwrap(), Round::Following(None));
    }
}
