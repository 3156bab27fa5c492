//! Layer data files and the bounded cache of their open file descriptors.
//!
//! A [`Layer`] is the in-memory handle of one layer file
//! (`layers/<layer-id>.data`, a sparse file whose offsets are the volume's
//! offsets). The pool keeps at most one handle per layer; indexes hold
//! handles for every layer they name, which is what pins a layer's file
//! while an open snapshot export still reads it after the snapshot (and even
//! the layer) was deleted from the catalog: the file is unlinked when the
//! last handle drops.
//!
//! File descriptors are opened lazily and bounded by [`FdCache`], a clock
//! (second-chance) cache, so a node with thousands of layers never runs out
//! of descriptors. In-flight I/O holds an `Arc<File>`, so evicting a
//! descriptor never breaks a request that is using it.

use std::collections::VecDeque;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};

use super::error::{Error, Result, io_error};
use super::ids::LayerId;
use super::io::{Fallocated, File, Fs, Open, Span, read_full};
use super::jobs::copy::{Method, copy_range};

/// Directory of layer files inside a pool.
pub(crate) const LAYERS_DIR: &str = "layers";

/// Path of a layer's data file.
pub(crate) fn layer_path(pool: &Path, id: LayerId) -> PathBuf {
    pool.join(LAYERS_DIR).join(format!("{id}.data"))
}

/// Creates an empty sparse layer file of `size` bytes and makes its
/// existence durable (file and directory fsync) unless `sync` is false.
pub(crate) fn create_layer_file(
    fs: &dyn Fs,
    pool: &Path,
    id: LayerId,
    size: u64,
    sync: bool,
) -> Result<()> {
    let path = layer_path(pool, id);
    let file = fs
        .open(&path, Open::CreateNew)
        .map_err(|e| io_error("create layer file", &path, e))?;
    let made = file
        .set_len(size)
        .map_err(|e| too_large_or(e, size, &path, "size layer file"))
        .and_then(|()| {
            if sync {
                file.sync_all()
                    .map_err(|e| io_error("sync layer file", &path, e))?;
                sync_dir(fs, &pool.join(LAYERS_DIR))?;
            }
            Ok(())
        });
    if made.is_err() {
        drop(file);
        remove_quietly(fs, &path);
    }
    made
}

/// EFBIG (the filesystem's file size limit) as its own error; others as
/// usual.
fn too_large_or(e: io::Error, size: u64, path: &Path, op: &'static str) -> super::error::Error {
    if e.raw_os_error() == Some(libc::EFBIG) {
        return super::error::Error::TooLargeForFilesystem {
            size,
            path: path.to_path_buf(),
        };
    }
    io_error(op, path, e)
}

/// Removes a file that may already be gone; other failures are logged (a
/// leftover file is an orphan that the next open removes).
pub(crate) fn remove_quietly(fs: &dyn Fs, path: &Path) {
    if let Err(e) = fs.remove_file(path)
        && e.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!(path = %path.display(), error = %e, "could not remove file");
    }
}

/// fsyncs a directory so that entries created or removed in it persist.
pub(crate) fn sync_dir(fs: &dyn Fs, dir: &Path) -> Result<()> {
    fs.sync_dir(dir)
        .map_err(|e| io_error("sync directory", dir, e))
}

/// Bounds the number of open layer descriptors.
#[derive(Debug)]
pub(crate) struct FdCache {
    capacity: usize,
    open: AtomicUsize,
    clock: Mutex<VecDeque<Weak<Layer>>>,
}

impl FdCache {
    pub(crate) fn new(capacity: usize) -> Arc<Self> {
        Arc::new(FdCache {
            capacity: capacity.max(16),
            open: AtomicUsize::new(0),
            clock: Mutex::new(VecDeque::new()),
        })
    }

    /// Descriptors currently open.
    #[cfg(test)]
    pub(crate) fn open_count(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    fn opened(&self, layer: &Arc<Layer>) {
        self.open.fetch_add(1, Ordering::Relaxed);
        let mut clock = self.clock.lock().expect("fd cache lock");
        clock.push_back(Arc::downgrade(layer));
        let mut budget = 2 * clock.len();
        while self.open.load(Ordering::Relaxed) > self.capacity && budget > 0 {
            budget -= 1;
            let Some(weak) = clock.pop_front() else { break };
            let Some(victim) = weak.upgrade() else {
                continue;
            };
            if victim.used.swap(false, Ordering::Relaxed) {
                clock.push_back(weak);
            } else if victim.close_fd() {
                self.open.fetch_sub(1, Ordering::Relaxed);
            }
        }
        if clock.len() > 2 * self.capacity + 1024 {
            clock.retain(|w| w.upgrade().is_some_and(|l| l.has_fd()));
        }
    }
}

/// The handle of one layer file. See the module docs.
#[derive(Debug)]
pub(crate) struct Layer {
    pub(crate) id: LayerId,
    pub(crate) slot: u16,
    path: PathBuf,
    fs: Arc<dyn Fs>,
    file: RwLock<Option<File>>,
    used: AtomicBool,
    removed: AtomicBool,
    fds: Arc<FdCache>,
    /// Serialises changes to the file. ext4 and XFS serialise buffered
    /// writes to one file on the inode lock anyway; waiting here (asleep)
    /// instead of in the kernel (spinning on the lock) keeps many
    /// concurrent writers from burning CPU for nothing (measured: with 32
    /// writers, half the CPU went to spinning on the inode rwsem).
    writing: Mutex<()>,
}

impl Layer {
    pub(crate) fn new(
        fs: Arc<dyn Fs>,
        pool: &Path,
        id: LayerId,
        slot: u16,
        fds: Arc<FdCache>,
    ) -> Self {
        Layer {
            id,
            slot,
            path: layer_path(pool, id),
            fs,
            file: RwLock::new(None),
            used: AtomicBool::new(false),
            removed: AtomicBool::new(false),
            fds,
            writing: Mutex::new(()),
        }
    }

    /// The open file, opening it if needed.
    pub(crate) fn file(self: &Arc<Self>) -> Result<File> {
        self.used.store(true, Ordering::Relaxed);
        if let Some(f) = &*self.file.read().expect("layer fd lock") {
            return Ok(Arc::clone(f));
        }
        let mut slot = self.file.write().expect("layer fd lock");
        if let Some(f) = &*slot {
            return Ok(Arc::clone(f));
        }
        let f = self
            .fs
            .open(&self.path, Open::ReadWrite)
            .map_err(|e| io_error("open layer file", &self.path, e))?;
        *slot = Some(Arc::clone(&f));
        drop(slot);
        self.fds.opened(self);
        Ok(f)
    }

    fn has_fd(&self) -> bool {
        self.file.read().expect("layer fd lock").is_some()
    }

    fn close_fd(&self) -> bool {
        self.file.write().expect("layer fd lock").take().is_some()
    }

    /// Reads `buf.len()` bytes at `offset`; bytes past the end of the file
    /// read as zeros.
    pub(crate) fn read_at(self: &Arc<Self>, buf: &mut [u8], offset: u64) -> Result<()> {
        read_full(&*self.file()?, buf, offset).map_err(|e| io_error("read layer", &self.path, e))
    }

    pub(crate) fn write_at(self: &Arc<Self>, buf: &[u8], offset: u64) -> Result<()> {
        let file = self.file()?;
        let _writing = self.writing.lock().expect("layer write lock");
        file.write_all_at(buf, offset)
            .map_err(|e| io_error("write layer", &self.path, e))
    }

    /// Forgets the open descriptor: the next access opens the path again
    /// (after a new file was renamed over it).
    pub(crate) fn reopen(&self) {
        if self.close_fd() {
            self.fds.open.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// The path of the layer's file.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Makes written data durable (fdatasync).
    pub(crate) fn sync_data(self: &Arc<Self>) -> Result<()> {
        self.file()?
            .sync_data()
            .map_err(|e| io_error("sync layer", &self.path, e))
    }

    /// Frees the file blocks of a byte range (best effort: a filesystem
    /// without hole punching keeps the blocks; the presence map already
    /// says the range is not read from this file).
    pub(crate) fn punch(self: &Arc<Self>, offset: u64, len: u64) -> Result<()> {
        let file = self.file()?;
        let _writing = self.writing.lock().expect("layer write lock");
        file.punch_hole(offset, len)
            .map(drop)
            .map_err(|e| io_error("punch hole in layer", &self.path, e))
    }

    /// Copies `span` of `src`'s file into this layer's file (a pointer
    /// copy where the filesystem shares extents, see `jobs::copy`), a few
    /// MiB per hold of the write lock so writes to other blocks of this
    /// layer never wait for a whole copy.
    pub(crate) fn copy_from(
        self: &Arc<Self>,
        src: &Arc<Layer>,
        span: Span,
        no_reflink: &AtomicBool,
    ) -> Result<Method> {
        const PIECE: u64 = 8 << 20;
        let (from, to) = (src.file()?, self.file()?);
        let mut method = Method::Reflink;
        let mut done = 0;
        while done < span.len {
            let piece = Span {
                len: (span.len - done).min(PIECE),
                ..span.skip(done)
            };
            let _writing = self.writing.lock().expect("layer write lock");
            if copy_range(&*from, &*to, piece, no_reflink)
                .map_err(|e| io_error("copy into layer", &self.path, e))?
                == Method::Copy
            {
                method = Method::Copy;
            }
            done += piece.len;
        }
        Ok(method)
    }

    /// Makes a byte range read as zeros with its blocks allocated.
    pub(crate) fn zero_allocated(
        self: &Arc<Self>,
        offset: u64,
        len: u64,
        fast: bool,
    ) -> Result<()> {
        let f = self.file()?;
        let _writing = self.writing.lock().expect("layer write lock");
        match f.zero_range(offset, len) {
            Ok(Fallocated::Done) => Ok(()),
            Ok(Fallocated::Unsupported) if fast => Err(Error::SlowZero { offset, len }),
            Ok(Fallocated::Unsupported) => {
                let zeros = vec![0u8; len.min(1 << 20) as usize];
                let mut done = 0;
                while done < len {
                    let n = (len - done).min(zeros.len() as u64) as usize;
                    f.write_all_at(&zeros[..n], offset + done)
                        .map_err(|e| io_error("zero layer", &self.path, e))?;
                    done += n as u64;
                }
                Ok(())
            }
            Err(e) => Err(io_error("zero layer", &self.path, e)),
        }
    }

    /// Extends (or sets) the file length.
    pub(crate) fn set_len(self: &Arc<Self>, len: u64) -> Result<()> {
        self.file()?
            .set_len(len)
            .map_err(|e| too_large_or(e, len, &self.path, "resize layer file"))
    }

    /// The catalog no longer knows this layer: delete the file once the
    /// last handle is gone.
    pub(crate) fn mark_removed(&self) {
        self.removed.store(true, Ordering::Release);
    }

    /// Removes the file now if the layer was freed (at pool close, when
    /// no new reader comes; one that has it open reads on).
    pub(crate) fn remove_if_freed(&self) {
        if self.removed.load(Ordering::Acquire) {
            remove_quietly(&*self.fs, &self.path);
        }
    }
}

impl Drop for Layer {
    fn drop(&mut self) {
        if self
            .file
            .get_mut()
            .map(|f| f.take().is_some())
            .unwrap_or(false)
        {
            self.fds.open.fetch_sub(1, Ordering::Relaxed);
        }
        if self.removed.load(Ordering::Acquire) {
            remove_quietly(&*self.fs, &self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::io::RealFs;

    #[test]
    fn fd_cache_keeps_descriptors_bounded() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join(LAYERS_DIR)).unwrap();
        let fds = FdCache::new(16);
        let layers: Vec<Arc<Layer>> = (0..100)
            .map(|i| {
                let id = LayerId(i);
                create_layer_file(&RealFs, dir.path(), id, 8192, false).unwrap();
                Arc::new(Layer::new(
                    RealFs::shared(),
                    dir.path(),
                    id,
                    2,
                    Arc::clone(&fds),
                ))
            })
            .collect();
        for (i, l) in layers.iter().enumerate() {
            l.write_at(&[i as u8; 16], 0).unwrap();
        }
        assert!(fds.open_count() <= 17, "{} open", fds.open_count());
        for (i, l) in layers.iter().enumerate() {
            let mut buf = [0u8; 16];
            l.read_at(&mut buf, 0).unwrap();
            assert_eq!(buf, [i as u8; 16]);
        }
        drop(layers);
        assert_eq!(fds.open_count(), 0);
    }

    #[test]
    fn removed_layer_file_is_deleted_when_last_handle_drops() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join(LAYERS_DIR)).unwrap();
        let id = LayerId(7);
        create_layer_file(&RealFs, dir.path(), id, 4096, false).unwrap();
        let layer = Arc::new(Layer::new(
            RealFs::shared(),
            dir.path(),
            id,
            2,
            FdCache::new(16),
        ));
        let pin = Arc::clone(&layer);
        layer.mark_removed();
        drop(layer);
        assert!(layer_path(dir.path(), id).exists());
        drop(pin);
        assert!(!layer_path(dir.path(), id).exists());
    }

    #[test]
    fn read_past_end_of_file_is_zeros() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join(LAYERS_DIR)).unwrap();
        create_layer_file(&RealFs, dir.path(), LayerId(1), 10, false).unwrap();
        let layer = Arc::new(Layer::new(
            RealFs::shared(),
            dir.path(),
            LayerId(1),
            2,
            FdCache::new(16),
        ));
        let mut buf = [1u8; 64];
        layer.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf, [0u8; 64]);
    }
}
