//! The one seam between the engine and the filesystem. Every call the
//! engine makes on the pool's files goes through [`Fs`] (names:
//! open/create, rename, unlink, directory fsync, listing, free space, the
//! pool lock) and [`FileIo`] (one open file: pread, pwrite, fdatasync and
//! fsync, ftruncate, fallocate, FICLONERANGE, copy_file_range, mmap), the
//! catalog's redb file included ([`CatalogFile`]).
//!
//! [`RealFs`] is the production implementation: the system calls, nothing
//! added but one indirect call. [`fault::FaultFs`] is the test one: files
//! in memory that can fail the Nth call (or the Nth of one kind) with any
//! errno, and lose power (every write no fsync made durable, every
//! directory entry no directory fsync made durable, is gone).

pub mod fault;

use std::any::Any;
use std::ffi::{CString, OsString};
use std::fmt;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

/// How to open a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Open {
    /// An existing file, read-only.
    Read,
    /// An existing file, to read and write.
    ReadWrite,
    /// Read and write; created empty if missing.
    Create,
    /// Read and write; created, and an error (`AlreadyExists`) if it exists.
    CreateNew,
    /// Read and write; created, or emptied if it exists.
    Truncate,
}

/// A copy between files: `len` bytes from offset `from` of the source to
/// offset `to` of the destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub from: u64,
    pub to: u64,
    pub len: u64,
}

impl Span {
    /// The same offset in both files.
    pub fn at(offset: u64, len: u64) -> Span {
        Span {
            from: offset,
            to: offset,
            len,
        }
    }

    /// The part `done..` of this span.
    pub fn skip(self, done: u64) -> Span {
        Span {
            from: self.from + done,
            to: self.to + done,
            len: self.len - done,
        }
    }
}

/// What a space call (fallocate, a pointer copy) could do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallocated {
    /// Done.
    Done,
    /// The filesystem does not do this (the caller falls back).
    Unsupported,
}

/// What a name is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    File,
    Dir,
}

/// An open file.
pub type File = Arc<dyn FileIo>;

/// The filesystem, by name. Paths are absolute or relative to the working
/// directory, as with `std::fs`.
pub trait Fs: Send + Sync + fmt::Debug {
    fn open(&self, path: &Path, how: Open) -> io::Result<File>;
    /// Makes `path` and its missing parents.
    fn create_dir_all(&self, path: &Path) -> io::Result<()>;
    /// What `path` is, `None` if nothing is there.
    fn entry(&self, path: &Path) -> io::Result<Option<Entry>>;
    /// The names in directory `dir`.
    fn read_dir(&self, dir: &Path) -> io::Result<Vec<OsString>>;
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// Makes the entries of `dir` (created, renamed, removed) durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// Total and free bytes of the filesystem holding `path`.
    fn space(&self, path: &Path) -> io::Result<(u64, u64)>;
    /// Takes an exclusive lock on the file `path` (created if missing),
    /// held until the returned value is dropped; `None` if another holder
    /// has it.
    fn lock(&self, path: &Path) -> io::Result<Option<Box<dyn Any + Send + Sync>>>;
    /// Identifies the page cache that holds the data of files under
    /// `path`: what survives a process crash but not a power cut, nor an
    /// unmount (a filesystem shut down after an I/O error, a disk that went
    /// away and came back), is trusted only under the same ID. Zeros if
    /// unknown: then nothing is trusted.
    fn page_cache_id(&self, path: &Path) -> [u8; 16];
}

/// One open file. Positioned calls only; several threads may use one
/// file at once.
pub trait FileIo: Send + Sync + fmt::Debug {
    /// Reads at `offset`; fewer bytes than asked only at the end of file.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// fdatasync.
    fn sync_data(&self) -> io::Result<()>;
    /// fsync.
    fn sync_all(&self) -> io::Result<()>;
    fn len(&self) -> io::Result<u64>;
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    /// ftruncate.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Frees `offset..offset+len` (reads return zeros), keeping the size.
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<Fallocated>;
    /// Makes `offset..offset+len` read as zeros with its blocks allocated,
    /// keeping the size.
    fn zero_range(&self, offset: u64, len: u64) -> io::Result<Fallocated>;
    /// Allocates `offset..offset+len` (posix_fallocate): later writes
    /// there cannot fail for want of space.
    fn allocate(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Shares `src`'s extents of `offset..offset+len` at the same offset
    /// here (FICLONERANGE): `Unsupported` where the filesystem (or this
    /// pair of files) cannot.
    fn clone_range(&self, src: &dyn FileIo, span: Span) -> io::Result<Fallocated>;
    /// copy_file_range of up to `span.len` bytes from `src`: bytes copied
    /// (0 at the end of `src`), `None` where the kernel cannot (the caller
    /// reads and writes).
    fn copy_range(&self, src: &dyn FileIo, span: Span) -> io::Result<Option<u64>>;
    /// Starts writing back `offset..offset+len` (a hint).
    fn start_writeback(&self, offset: u64, len: u64);
    /// Maps the first `len` bytes (shared: stores reach the file).
    fn map(&self, len: usize) -> io::Result<Mapping>;
    fn as_any(&self) -> &dyn Any;
}

/// A shared mapping of a file; unmapped when dropped.
pub struct Mapping {
    ptr: *mut u8,
    len: usize,
    _owner: Box<dyn Any + Send + Sync>,
}

// SAFETY: the mapping is plain memory owned by this value (or by its
// owner, kept alive with it); who may write it is the holder's business,
// as for a `Box<[u8]>` behind a raw pointer.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl fmt::Debug for Mapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mapping").field("len", &self.len).finish()
    }
}

impl Mapping {
    /// A mapping of `len` bytes at `ptr`, valid while `owner` lives.
    ///
    /// # Safety
    /// `ptr..ptr+len` must be valid for reads and writes for as long as
    /// `owner` is alive, and nothing else may free it meanwhile.
    pub(crate) unsafe fn new(ptr: *mut u8, len: usize, owner: Box<dyn Any + Send + Sync>) -> Self {
        Mapping {
            ptr,
            len,
            _owner: owner,
        }
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Reads exactly `buf.len()` bytes at `offset`; bytes past the end of the
/// file read as zeros.
pub(crate) fn read_full(file: &dyn FileIo, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
    while !buf.is_empty() {
        match file.read_at(buf, offset) {
            Ok(0) => {
                buf.fill(0);
                break;
            }
            Ok(n) => {
                buf = &mut buf[n..];
                offset += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The whole file.
pub(crate) fn read_all(file: &dyn FileIo) -> io::Result<Vec<u8>> {
    let len =
        usize::try_from(file.len()?).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    let mut buf = vec![0u8; len];
    read_full(file, &mut buf, 0)?;
    Ok(buf)
}

/// The redb storage of the catalog, on an [`FileIo`] file.
#[derive(Debug)]
pub(crate) struct CatalogFile(pub(crate) File);

impl redb::StorageBackend for CatalogFile {
    fn len(&self) -> io::Result<u64> {
        self.0.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        if offset + out.len() as u64 > self.0.len()? {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "read past the end of the catalog",
            ));
        }
        read_full(&*self.0, out, offset)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.0.sync_data()
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.0.write_all_at(data, offset)
    }
}

/// The real filesystem.
#[derive(Debug, Default, Clone, Copy)]
pub struct RealFs;

impl RealFs {
    /// The real filesystem, as the engine takes it.
    pub fn shared() -> Arc<dyn Fs> {
        Arc::new(RealFs)
    }
}

#[derive(Debug)]
struct RealFile(std::fs::File);

fn cstr(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn fallocate(
    file: &std::fs::File,
    mode: libc::c_int,
    offset: u64,
    len: u64,
) -> io::Result<Fallocated> {
    let (Ok(off), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    };
    // SAFETY: fallocate only reads its integer arguments; the fd is valid for
    // the lifetime of `file`.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), mode, off, len) };
    if rc == 0 {
        return Ok(Fallocated::Done);
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => Ok(Fallocated::Unsupported),
        _ => Err(err),
    }
}

/// `FICLONERANGE` = `_IOW(0x94, 13, struct file_clone_range)`.
const FICLONERANGE: libc::c_ulong = 0x4020_940d;

#[repr(C)]
struct FileCloneRange {
    src_fd: i64,
    src_offset: u64,
    src_length: u64,
    dest_offset: u64,
}

impl RealFile {
    fn of(f: &dyn FileIo) -> Option<&std::fs::File> {
        f.as_any().downcast_ref::<RealFile>().map(|r| &r.0)
    }

    /// Extents shared by a pointer copy do not share the page cache: reads
    /// of the destination would go to the disk even where the source was
    /// cached. If the range's first page is cached in the source (a read
    /// that may not wait succeeds), ask for the destination's range to be
    /// read ahead, so a merge does not turn a hot range cold.
    fn warm_if_cached(&self, src: &std::fs::File, span: Span) {
        let mut page = [0u8; 4096];
        let iov = libc::iovec {
            iov_base: page.as_mut_ptr().cast(),
            iov_len: page.len(),
        };
        // SAFETY: one iovec over a local buffer; RWF_NOWAIT fails instead of
        // waiting for I/O. posix_fadvise takes plain integers.
        unsafe {
            if libc::preadv2(src.as_raw_fd(), &iov, 1, span.from as i64, libc::RWF_NOWAIT) > 0 {
                libc::posix_fadvise(
                    self.0.as_raw_fd(),
                    span.to as i64,
                    span.len as i64,
                    libc::POSIX_FADV_WILLNEED,
                );
            }
        }
    }
}

/// Unmaps a real mapping when dropped.
struct RealMap {
    ptr: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping belongs to this value alone.
unsafe impl Send for RealMap {}
// SAFETY: as above; it is never accessed through `&RealMap`.
unsafe impl Sync for RealMap {}

impl Drop for RealMap {
    fn drop(&mut self) {
        // SAFETY: unmapping a mapping this value owns, exactly once.
        unsafe { libc::munmap(self.ptr, self.len) };
    }
}

impl FileIo for RealFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.0.read_at(buf, offset)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0.write_all_at(buf, offset)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.0.sync_data()
    }

    fn sync_all(&self) -> io::Result<()> {
        self.0.sync_all()
    }

    fn len(&self) -> io::Result<u64> {
        self.0.metadata().map(|m| m.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<Fallocated> {
        fallocate(
            &self.0,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
    }

    fn zero_range(&self, offset: u64, len: u64) -> io::Result<Fallocated> {
        fallocate(
            &self.0,
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
    }

    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        match fallocate(&self.0, 0, offset, len)? {
            Fallocated::Done => Ok(()),
            // A filesystem without fallocate: the blocks come with writes.
            Fallocated::Unsupported => Ok(()),
        }
    }

    fn clone_range(&self, src: &dyn FileIo, span: Span) -> io::Result<Fallocated> {
        let Some(src) = RealFile::of(src) else {
            return Ok(Fallocated::Unsupported);
        };
        let arg = FileCloneRange {
            src_fd: i64::from(src.as_raw_fd()),
            src_offset: span.from,
            src_length: span.len,
            dest_offset: span.to,
        };
        // SAFETY: FICLONERANGE reads one `struct file_clone_range` (repr(C),
        // same layout) that lives for the call.
        let rc = unsafe { libc::ioctl(self.0.as_raw_fd(), FICLONERANGE, &arg) };
        if rc == 0 {
            self.warm_if_cached(src, span);
            return Ok(Fallocated::Done);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            // Not a filesystem that shares extents (or not between these
            // files).
            Some(libc::EOPNOTSUPP | libc::EXDEV | libc::EINVAL | libc::ENOTTY | libc::ENOSYS) => {
                Ok(Fallocated::Unsupported)
            }
            _ => Err(e),
        }
    }

    fn copy_range(&self, src: &dyn FileIo, span: Span) -> io::Result<Option<u64>> {
        let Some(src) = RealFile::of(src) else {
            return Ok(None);
        };
        loop {
            let mut off_in = span.from as i64;
            let mut off_out = span.to as i64;
            // SAFETY: both descriptors are open; the offsets are locals the
            // call updates.
            let n = unsafe {
                libc::copy_file_range(
                    src.as_raw_fd(),
                    &mut off_in,
                    self.0.as_raw_fd(),
                    &mut off_out,
                    span.len as usize,
                    0,
                )
            };
            if n >= 0 {
                return Ok(Some(n as u64));
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EXDEV | libc::ENOSYS | libc::EOPNOTSUPP | libc::EINVAL) => {
                    return Ok(None);
                }
                _ => return Err(e),
            }
        }
    }

    fn start_writeback(&self, offset: u64, len: u64) {
        // SAFETY: sync_file_range on an open descriptor with plain integers.
        unsafe {
            libc::sync_file_range(
                self.0.as_raw_fd(),
                offset as i64,
                len as i64,
                libc::SYNC_FILE_RANGE_WRITE,
            )
        };
    }

    fn map(&self, len: usize) -> io::Result<Mapping> {
        // SAFETY: a shared read-write mapping of a file we hold open; the
        // result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                self.0.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `ptr..ptr+len` is the mapping just made; RealMap unmaps
        // it when the Mapping (its owner) goes, and nothing else does.
        Ok(unsafe { Mapping::new(ptr.cast(), len, Box::new(RealMap { ptr, len })) })
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl Fs for RealFs {
    fn open(&self, path: &Path, how: Open) -> io::Result<File> {
        let mut o = std::fs::File::options();
        o.read(true);
        match how {
            Open::Read => {}
            Open::ReadWrite => {
                o.write(true);
            }
            Open::Create => {
                o.write(true).create(true).truncate(false);
            }
            Open::CreateNew => {
                o.write(true).create_new(true);
            }
            Open::Truncate => {
                o.write(true).create(true).truncate(true);
            }
        }
        Ok(Arc::new(RealFile(o.open(path)?)))
    }

    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        std::fs::create_dir_all(path)
    }

    fn entry(&self, path: &Path) -> io::Result<Option<Entry>> {
        match std::fs::metadata(path) {
            Ok(m) if m.is_dir() => Ok(Some(Entry::Dir)),
            Ok(_) => Ok(Some(Entry::File)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn read_dir(&self, dir: &Path) -> io::Result<Vec<OsString>> {
        std::fs::read_dir(dir)?
            .map(|e| e.map(|e| e.file_name()))
            .collect()
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        std::fs::File::open(dir)?.sync_all()
    }

    fn space(&self, path: &Path) -> io::Result<(u64, u64)> {
        let c = cstr(path)?;
        // SAFETY: an all-zero statvfs is a valid value of this plain C struct.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: `c` is a valid NUL-terminated path and `st` a valid out pointer.
        if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // Free as seen by this process: root may use the blocks reserved
        // for root.
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let unit = st.f_frsize as u64;
        let free = if root { st.f_bfree } else { st.f_bavail } as u64;
        Ok((st.f_blocks as u64 * unit, free * unit))
    }

    fn lock(&self, path: &Path) -> io::Result<Option<Box<dyn Any + Send + Sync>>> {
        let lock = std::fs::File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)?;
        match lock.try_lock() {
            Ok(()) => Ok(Some(Box::new(lock))),
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(e)) => Err(e),
        }
    }

    /// The boot ID with the mount ID of `path`'s filesystem (unique within
    /// a boot, new at every mount) folded into its last 8 bytes.
    fn page_cache_id(&self, path: &Path) -> [u8; 16] {
        let text = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
        let Ok(boot) = uuid::Uuid::parse_str(text.trim()) else {
            return [0; 16];
        };
        let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
            return [0; 16];
        };
        // SAFETY: statx fills a zeroed struct of its own type; a null-free
        // path and plain integer flags.
        let mnt_id = unsafe {
            let mut stx: libc::statx = std::mem::zeroed();
            let rc = libc::statx(
                libc::AT_FDCWD,
                c_path.as_ptr(),
                0,
                libc::STATX_MNT_ID,
                &mut stx,
            );
            (rc == 0 && stx.stx_mask & libc::STATX_MNT_ID != 0).then_some(stx.stx_mnt_id)
        };
        let Some(mnt_id) = mnt_id else {
            return [0; 16];
        };
        let mut id = *boot.as_bytes();
        for (b, m) in id[8..].iter_mut().zip(mnt_id.to_le_bytes()) {
            *b ^= m;
        }
        id
    }
}
