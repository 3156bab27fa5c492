//! A filesystem in memory for crash and error-path tests: [`FaultFs`].
//!
//! It keeps two states of everything, as a disk under a page cache does:
//! what the process sees, and what is durable. A file's data becomes
//! durable at its fdatasync/fsync; a name (a created, renamed or removed
//! entry, a new directory) at an fsync of its directory. [`FaultFs::power_cut`]
//! throws away everything that is not durable (and everything under the
//! directories marked as tmpfs), ends the process that was using it (every
//! later call of its handles fails with EIO) and changes the boot ID.
//!
//! Faults: the Nth call (or the Nth call of one [`Op`]) fails with a given
//! errno, once or from then on; or the power goes at the Nth call. A
//! failed fdatasync behaves as Linux's does (the "fsyncgate" behaviour):
//! the pages it failed to write are marked clean, so a later fdatasync
//! succeeds without writing them and they are lost at the next power cut
//! unless written again.
//!
//! Every call the engine makes is counted (but `statvfs`, which the engine
//! makes on a timer), so a test can run a workload once to count its calls
//! and then once per call with a fault there.

use std::any::Any;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use super::{Entry, Fallocated, File, FileIo, Fs, Mapping, Open, Span};

const PAGE: u64 = 4096;

/// The kinds of calls, for faults aimed at one kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Open,
    Create,
    Read,
    Write,
    Sync,
    SetLen,
    Fallocate,
    Clone,
    Rename,
    Remove,
    SyncDir,
    MkDir,
    List,
    Stat,
    Map,
    Lock,
}

impl Op {
    /// Whether the call can allocate space (so ENOSPC and EDQUOT are
    /// errors it can really get).
    pub fn allocates(self) -> bool {
        matches!(
            self,
            Op::Create
                | Op::Write
                | Op::SetLen
                | Op::Fallocate
                | Op::Clone
                | Op::Rename
                | Op::MkDir
                | Op::Map
                | Op::Sync
                | Op::SyncDir
        )
    }
}

/// A call that fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fail {
    /// The Nth matching call (1 is the first) fails.
    pub at: u64,
    /// Only calls of this kind match (`None`: every call).
    pub op: Option<Op>,
    pub errno: i32,
    /// Every matching call after it fails too (a dead disk, a full one).
    pub sticky: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Node {
    File(u64),
    Dir,
}

#[derive(Debug, Clone, Default)]
struct Content {
    len: u64,
    pages: BTreeMap<u64, Arc<[u8; PAGE as usize]>>,
}

impl Content {
    fn read(&self, buf: &mut [u8], offset: u64) -> usize {
        if offset >= self.len {
            return 0;
        }
        let n = buf.len().min((self.len - offset) as usize);
        let mut done = 0;
        while done < n {
            let at = offset + done as u64;
            let (page, within) = (at / PAGE, (at % PAGE) as usize);
            let take = (n - done).min(PAGE as usize - within);
            match self.pages.get(&page) {
                Some(p) => buf[done..done + take].copy_from_slice(&p[within..within + take]),
                None => buf[done..done + take].fill(0),
            }
            done += take;
        }
        n
    }

    /// Writes `data` at `offset` (growing the file); returns the pages
    /// it changed.
    fn write(&mut self, data: &[u8], offset: u64) -> Vec<u64> {
        let mut changed = Vec::new();
        let mut done = 0;
        while done < data.len() {
            let at = offset + done as u64;
            let (page, within) = (at / PAGE, (at % PAGE) as usize);
            let take = (data.len() - done).min(PAGE as usize - within);
            let p = self
                .pages
                .entry(page)
                .or_insert_with(|| Arc::new([0; PAGE as usize]));
            Arc::make_mut(p)[within..within + take].copy_from_slice(&data[done..done + take]);
            changed.push(page);
            done += take;
        }
        self.len = self.len.max(offset + data.len() as u64);
        changed
    }

    /// Zeros `offset..offset+len`; `free` drops whole pages.
    fn zero(&mut self, offset: u64, len: u64) -> Vec<u64> {
        let end = offset + len;
        let mut changed = Vec::new();
        let pages: Vec<u64> = self
            .pages
            .range(offset / PAGE..end.div_ceil(PAGE))
            .map(|(k, _)| *k)
            .collect();
        for page in pages {
            let (ps, pe) = (page * PAGE, page * PAGE + PAGE);
            if offset <= ps && pe <= end {
                self.pages.remove(&page);
            } else {
                let p = self.pages.get_mut(&page).expect("listed");
                let (s, e) = (offset.max(ps) - ps, end.min(pe) - ps);
                Arc::make_mut(p)[s as usize..e as usize].fill(0);
            }
            changed.push(page);
        }
        changed
    }

    fn set_len(&mut self, len: u64) {
        if len < self.len {
            self.zero(len, self.len - len);
        }
        self.len = len;
    }
}

/// The memory a mapping of a file shows: the file's page cache, which
/// outlives the process (not a power cut).
struct MapBuf(Box<[std::cell::UnsafeCell<u8>]>);

// SAFETY: plain bytes; who writes them when is the mapping holder's
// business, exactly as for a real shared mapping.
unsafe impl Send for MapBuf {}
// SAFETY: as above.
unsafe impl Sync for MapBuf {}

impl MapBuf {
    fn ptr(&self) -> *mut u8 {
        self.0.as_ptr() as *mut u8
    }

    fn snapshot(&self) -> Vec<u8> {
        // SAFETY: reading plain bytes the holder may be writing: the
        // engine never reads a mapped file through the file while it
        // writes the mapping, so this sees a consistent state.
        unsafe { std::slice::from_raw_parts(self.ptr(), self.0.len()) }.to_vec()
    }
}

struct Inode {
    cur: Content,
    disk: Content,
    /// Pages a failed fdatasync marked clean without writing them.
    lost: BTreeSet<u64>,
    map: Option<Arc<MapBuf>>,
}

impl Inode {
    /// The mapping's bytes are the file's.
    fn absorb_map(&mut self) {
        if let Some(m) = &self.map {
            let bytes = m.snapshot();
            self.cur.write(&bytes, 0);
        }
    }

    /// Pages that differ from the disk.
    fn dirty(&self) -> Vec<u64> {
        let mut out: BTreeSet<u64> = BTreeSet::new();
        for (k, p) in &self.cur.pages {
            if self.disk.pages.get(k).is_none_or(|d| !Arc::ptr_eq(d, p)) {
                out.insert(*k);
            }
        }
        for k in self.disk.pages.keys() {
            if !self.cur.pages.contains_key(k) {
                out.insert(*k);
            }
        }
        out.into_iter().collect()
    }

    fn sync(&mut self) {
        self.absorb_map();
        let mut disk = self.cur.clone();
        for page in &self.lost {
            match self.disk.pages.get(page) {
                Some(old) => {
                    disk.pages.insert(*page, Arc::clone(old));
                }
                None => {
                    disk.pages.remove(page);
                }
            }
        }
        self.disk = disk;
    }

    fn fail_sync(&mut self) {
        self.absorb_map();
        let dirty = self.dirty();
        self.lost.extend(dirty);
    }
}

struct State {
    /// Bumped by a power cut: handles of older processes are dead.
    era: u64,
    boot: [u8; 16],
    ns: BTreeMap<PathBuf, Node>,
    durable: BTreeMap<PathBuf, Node>,
    inodes: HashMap<u64, Inode>,
    next_ino: u64,
    /// Directories whose contents no power cut spares (tmpfs).
    volatile: Vec<PathBuf>,
    calls: u64,
    matched: u64,
    fail: Option<Fail>,
    power_cut_at: Option<u64>,
    /// Bytes the disk holds; allocating more fails with ENOSPC.
    capacity: Option<u64>,
    locks: HashSet<PathBuf>,
    trace: VecDeque<String>,
}

const TRACE: usize = 64;

impl State {
    fn used(&self) -> u64 {
        self.inodes
            .values()
            .map(|i| {
                i.cur.pages.len() as u64 * PAGE + i.map.as_ref().map_or(0, |m| m.0.len() as u64)
            })
            .sum()
    }

    fn ensure_room(&self, more: u64) -> io::Result<()> {
        match self.capacity {
            Some(cap) if self.used() + more > cap => {
                Err(io::Error::from_raw_os_error(libc::ENOSPC))
            }
            _ => Ok(()),
        }
    }

    fn parent_is_dir(&self, path: &Path) -> io::Result<()> {
        match path.parent().map(|p| self.ns.get(p)) {
            Some(Some(Node::Dir)) => Ok(()),
            Some(Some(Node::File(_))) => Err(io::Error::from_raw_os_error(libc::ENOTDIR)),
            _ => Err(io::Error::from_raw_os_error(libc::ENOENT)),
        }
    }

    fn file(&self, path: &Path) -> io::Result<u64> {
        match self.ns.get(path) {
            Some(Node::File(ino)) => Ok(*ino),
            Some(Node::Dir) => Err(io::Error::from_raw_os_error(libc::EISDIR)),
            None => Err(io::Error::from_raw_os_error(libc::ENOENT)),
        }
    }

    fn new_inode(&mut self) -> u64 {
        self.next_ino += 1;
        self.inodes.insert(
            self.next_ino,
            Inode {
                cur: Content::default(),
                disk: Content::default(),
                lost: BTreeSet::new(),
                map: None,
            },
        );
        self.next_ino
    }

    fn power_cut(&mut self) {
        self.era += 1;
        self.boot = *uuid::Uuid::new_v4().as_bytes();
        self.locks.clear();
        let durable = std::mem::take(&mut self.durable);
        let survives = |p: &Path| {
            let mut a = p.parent();
            while let Some(d) = a {
                if durable.get(d) != Some(&Node::Dir) {
                    return false;
                }
                a = d.parent();
            }
            true
        };
        let mut ns: BTreeMap<PathBuf, Node> = durable
            .iter()
            .filter(|(p, _)| survives(p))
            .map(|(p, n)| (p.clone(), *n))
            .collect();
        ns.retain(|p, _| !self.volatile.iter().any(|v| p.starts_with(v) && p != v));
        self.durable = ns.clone();
        self.ns = ns;
        for inode in self.inodes.values_mut() {
            inode.cur = inode.disk.clone();
            inode.lost.clear();
            inode.map = None;
        }
        self.trace.push_back("-- power cut --".into());
    }
}

/// See the module docs. Clones are the same disk.
#[derive(Clone)]
pub struct FaultFs {
    st: Arc<Mutex<State>>,
}

impl std::fmt::Debug for FaultFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FaultFs")
    }
}

impl Default for FaultFs {
    fn default() -> Self {
        Self::new()
    }
}

impl Clone for Inode {
    fn clone(&self) -> Self {
        let mut cur = self.cur.clone();
        if let Some(m) = &self.map {
            cur.write(&m.snapshot(), 0);
        }
        Inode {
            cur,
            disk: self.disk.clone(),
            lost: self.lost.clone(),
            map: None,
        }
    }
}

impl FaultFs {
    /// A copy of this disk as it is now (page cache included): to try
    /// several futures from one moment. Its handles are not carried over.
    pub fn fork(&self) -> FaultFs {
        let st = self.state();
        FaultFs {
            st: Arc::new(Mutex::new(State {
                era: st.era + 1,
                boot: st.boot,
                ns: st.ns.clone(),
                durable: st.durable.clone(),
                inodes: st.inodes.iter().map(|(k, v)| (*k, v.clone())).collect(),
                next_ino: st.next_ino,
                volatile: st.volatile.clone(),
                calls: 0,
                matched: 0,
                fail: None,
                power_cut_at: None,
                capacity: st.capacity,
                locks: HashSet::new(),
                trace: VecDeque::new(),
            })),
        }
    }

    /// An empty disk with only `/`.
    pub fn new() -> Self {
        let root = BTreeMap::from([(PathBuf::from("/"), Node::Dir)]);
        FaultFs {
            st: Arc::new(Mutex::new(State {
                era: 0,
                boot: *uuid::Uuid::new_v4().as_bytes(),
                ns: root.clone(),
                durable: root,
                inodes: HashMap::new(),
                next_ino: 0,
                volatile: Vec::new(),
                calls: 0,
                matched: 0,
                fail: None,
                power_cut_at: None,
                capacity: None,
                locks: HashSet::new(),
                trace: VecDeque::new(),
            })),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The filesystem as one process sees it: dead after a power cut.
    pub fn process(&self) -> Arc<dyn Fs> {
        Arc::new(Proc {
            fs: self.clone(),
            era: self.state().era,
        })
    }

    /// Marks `dir` as a tmpfs: nothing under it survives a power cut.
    pub fn volatile(&self, dir: &Path) {
        self.state().volatile.push(dir.to_path_buf());
    }

    /// The disk holds at most `bytes` (ENOSPC beyond).
    pub fn set_capacity(&self, bytes: Option<u64>) {
        self.state().capacity = bytes;
    }

    /// From now on, `fail` applies (counted from the next call).
    pub fn fail(&self, fail: Option<Fail>) {
        let mut st = self.state();
        st.fail = fail;
        st.matched = 0;
    }

    /// The power goes at the `n`th call from now (that call fails).
    pub fn power_cut_at(&self, n: Option<u64>) {
        let mut st = self.state();
        st.power_cut_at = n.map(|n| st.calls + n);
    }

    /// The power goes now.
    pub fn power_cut(&self) {
        self.state().power_cut();
    }

    /// The process dies now (kill -9): its handles are dead and its locks
    /// released, but everything it wrote stays, as the page cache keeps it.
    pub fn kill_process(&self) {
        let mut st = self.state();
        st.era += 1;
        st.locks.clear();
        st.trace.push_back("-- process killed --".into());
    }

    /// Calls made so far.
    pub fn calls(&self) -> u64 {
        self.state().calls
    }

    /// Calls the current [`Fail`] has matched so far.
    pub fn matched(&self) -> u64 {
        self.state().matched
    }

    /// The last calls made, newest last (for a failure's message).
    pub fn trace(&self) -> Vec<String> {
        self.state().trace.iter().cloned().collect()
    }

    /// Starts a call of `op` by the process of generation `era`: counts
    /// it, and fails it if it is the one to fail (or the power goes).
    fn call(
        &self,
        era: u64,
        op: Op,
        what: &dyn std::fmt::Display,
    ) -> io::Result<MutexGuard<'_, State>> {
        let mut st = self.state();
        if st.era != era {
            return Err(io::Error::other("the process lost power"));
        }
        st.calls += 1;
        if st.trace.len() == TRACE {
            st.trace.pop_front();
        }
        let line = format!("{} {op:?} {what}", st.calls);
        st.trace.push_back(line);
        if st.power_cut_at == Some(st.calls) {
            st.power_cut_at = None;
            st.power_cut();
            return Err(io::Error::other("the power went"));
        }
        if let Some(f) = st.fail
            && f.op.is_none_or(|o| o == op)
        {
            st.matched += 1;
            if st.matched == f.at || (f.sticky && st.matched > f.at) {
                if let Some(last) = st.trace.back_mut() {
                    last.push_str(&format!("  <- failed (errno {})", f.errno));
                }
                return Err(io::Error::from_raw_os_error(f.errno));
            }
        }
        Ok(st)
    }
}

/// One process's view of a [`FaultFs`].
#[derive(Debug)]
struct Proc {
    fs: FaultFs,
    era: u64,
}

#[derive(Debug)]
struct FaultFile {
    fs: FaultFs,
    era: u64,
    ino: u64,
    writable: bool,
    name: PathBuf,
}

struct Lock {
    fs: FaultFs,
    era: u64,
    path: PathBuf,
}

impl Drop for Lock {
    fn drop(&mut self) {
        let mut st = self.fs.state();
        if st.era == self.era {
            st.locks.remove(&self.path);
        }
    }
}

impl Fs for Proc {
    fn open(&self, path: &Path, how: Open) -> io::Result<File> {
        let op = if how == Open::Read || how == Open::ReadWrite {
            Op::Open
        } else {
            Op::Create
        };
        let mut st = self.fs.call(self.era, op, &path.display())?;
        let ino = match (st.ns.get(path).copied(), how) {
            (Some(Node::Dir), _) => return Err(io::Error::from_raw_os_error(libc::EISDIR)),
            (Some(_), Open::CreateNew) => return Err(io::Error::from_raw_os_error(libc::EEXIST)),
            (Some(Node::File(ino)), Open::Truncate) => {
                let inode = st.inodes.get_mut(&ino).expect("inode");
                inode.cur.set_len(0);
                if let Some(m) = &inode.map {
                    // SAFETY: zeroing the mapping's own bytes.
                    unsafe { std::ptr::write_bytes(m.ptr(), 0, m.0.len()) };
                }
                ino
            }
            (Some(Node::File(ino)), _) => ino,
            (None, Open::Read | Open::ReadWrite) => {
                return Err(io::Error::from_raw_os_error(libc::ENOENT));
            }
            (None, _) => {
                st.parent_is_dir(path)?;
                st.ensure_room(0)?;
                let ino = st.new_inode();
                st.ns.insert(path.to_path_buf(), Node::File(ino));
                ino
            }
        };
        Ok(Arc::new(FaultFile {
            fs: self.fs.clone(),
            era: self.era,
            ino,
            writable: how != Open::Read,
            name: path.to_path_buf(),
        }))
    }

    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        let mut st = self.fs.call(self.era, Op::MkDir, &path.display())?;
        let mut missing = Vec::new();
        let mut p = Some(path);
        while let Some(d) = p {
            match st.ns.get(d) {
                Some(Node::Dir) => break,
                Some(Node::File(_)) => return Err(io::Error::from_raw_os_error(libc::ENOTDIR)),
                None => missing.push(d.to_path_buf()),
            }
            p = d.parent();
        }
        for d in missing.into_iter().rev() {
            st.ns.insert(d, Node::Dir);
        }
        Ok(())
    }

    fn entry(&self, path: &Path) -> io::Result<Option<Entry>> {
        let st = self.fs.call(self.era, Op::Stat, &path.display())?;
        Ok(st.ns.get(path).map(|n| match n {
            Node::File(_) => Entry::File,
            Node::Dir => Entry::Dir,
        }))
    }

    fn read_dir(&self, dir: &Path) -> io::Result<Vec<OsString>> {
        let st = self.fs.call(self.era, Op::List, &dir.display())?;
        if st.ns.get(dir) != Some(&Node::Dir) {
            return Err(io::Error::from_raw_os_error(libc::ENOENT));
        }
        Ok(st
            .ns
            .keys()
            .filter(|p| p.parent() == Some(dir))
            .filter_map(|p| p.file_name().map(|n| n.to_os_string()))
            .collect())
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let what = format!("{} -> {}", from.display(), to.display());
        let mut st = self.fs.call(self.era, Op::Rename, &what)?;
        let ino = st.file(from)?;
        st.parent_is_dir(to)?;
        if st.ns.get(to) == Some(&Node::Dir) {
            return Err(io::Error::from_raw_os_error(libc::EISDIR));
        }
        st.ns.remove(from);
        st.ns.insert(to.to_path_buf(), Node::File(ino));
        Ok(())
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let mut st = self.fs.call(self.era, Op::Remove, &path.display())?;
        st.file(path)?;
        st.ns.remove(path);
        Ok(())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut st = self.fs.call(self.era, Op::SyncDir, &dir.display())?;
        if st.ns.get(dir) != Some(&Node::Dir) {
            return Err(io::Error::from_raw_os_error(libc::ENOENT));
        }
        let State { ns, durable, .. } = &mut *st;
        durable.retain(|p, _| p.parent() != Some(dir));
        for (p, n) in ns.iter().filter(|(p, _)| p.parent() == Some(dir)) {
            durable.insert(p.clone(), *n);
        }
        Ok(())
    }

    fn space(&self, _: &Path) -> io::Result<(u64, u64)> {
        // Not counted: the engine reads free space on a timer, so counting
        // it would make the Nth call a different one from run to run.
        let st = self.fs.state();
        if st.era != self.era {
            return Err(io::Error::other("the process lost power"));
        }
        let total = st.capacity.unwrap_or(1 << 40);
        Ok((total, total.saturating_sub(st.used())))
    }

    fn lock(&self, path: &Path) -> io::Result<Option<Box<dyn Any + Send + Sync>>> {
        let mut st = self.fs.call(self.era, Op::Lock, &path.display())?;
        if !st.ns.contains_key(path) {
            st.parent_is_dir(path)?;
            let ino = st.new_inode();
            st.ns.insert(path.to_path_buf(), Node::File(ino));
        }
        if !st.locks.insert(path.to_path_buf()) {
            return Ok(None);
        }
        Ok(Some(Box::new(Lock {
            fs: self.fs.clone(),
            era: self.era,
            path: path.to_path_buf(),
        })))
    }

    fn page_cache_id(&self, _: &Path) -> [u8; 16] {
        self.fs.state().boot
    }
}

impl FaultFile {
    fn call(&self, op: Op) -> io::Result<MutexGuard<'_, State>> {
        self.fs.call(self.era, op, &self.name.display())
    }

    fn check_writable(&self) -> io::Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(io::Error::from_raw_os_error(libc::EBADF))
        }
    }

    /// Runs a sync; a fault there marks the dirty pages lost.
    fn sync(&self) -> io::Result<()> {
        let ino = self.ino;
        let mut st = match self.call(Op::Sync) {
            Ok(st) => st,
            Err(e) => {
                let mut st = self.fs.state();
                if st.era == self.era
                    && let Some(inode) = st.inodes.get_mut(&ino)
                {
                    inode.fail_sync();
                }
                return Err(e);
            }
        };
        st.inodes.get_mut(&ino).expect("inode").sync();
        Ok(())
    }
}

impl FileIo for FaultFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let mut st = self.call(Op::Read)?;
        let inode = st.inodes.get_mut(&self.ino).expect("inode");
        inode.absorb_map();
        Ok(inode.cur.read(buf, offset))
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check_writable()?;
        let mut st = self.call(Op::Write)?;
        let new_pages = {
            let inode = &st.inodes[&self.ino];
            (offset / PAGE..(offset + buf.len() as u64).div_ceil(PAGE))
                .filter(|p| !inode.cur.pages.contains_key(p))
                .count() as u64
        };
        st.ensure_room(new_pages * PAGE)?;
        let inode = st.inodes.get_mut(&self.ino).expect("inode");
        inode.absorb_map();
        for page in inode.cur.write(buf, offset) {
            inode.lost.remove(&page);
        }
        if let Some(m) = &inode.map {
            let n = m.0.len().saturating_sub(offset as usize).min(buf.len());
            if (offset as usize) < m.0.len() {
                // SAFETY: within the mapping's bytes.
                unsafe {
                    std::ptr::copy_nonoverlapping(buf.as_ptr(), m.ptr().add(offset as usize), n)
                };
            }
        }
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        self.sync()
    }

    fn sync_all(&self) -> io::Result<()> {
        self.sync()
    }

    fn len(&self) -> io::Result<u64> {
        let st = self.call(Op::Stat)?;
        Ok(st.inodes[&self.ino].cur.len)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.check_writable()?;
        let mut st = self.call(Op::SetLen)?;
        if len > i64::MAX as u64 {
            return Err(io::Error::from_raw_os_error(libc::EFBIG));
        }
        let inode = st.inodes.get_mut(&self.ino).expect("inode");
        inode.absorb_map();
        inode.cur.set_len(len);
        Ok(())
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<Fallocated> {
        self.check_writable()?;
        let mut st = self.call(Op::Fallocate)?;
        let inode = st.inodes.get_mut(&self.ino).expect("inode");
        let end = (offset + len).min(inode.cur.len);
        if offset < end {
            inode.cur.zero(offset, end - offset);
        }
        Ok(Fallocated::Done)
    }

    fn zero_range(&self, offset: u64, len: u64) -> io::Result<Fallocated> {
        self.check_writable()?;
        let mut st = self.call(Op::Fallocate)?;
        st.ensure_room(len)?;
        let inode = st.inodes.get_mut(&self.ino).expect("inode");
        let end = (offset + len).min(inode.cur.len);
        if offset < end {
            let zeros = vec![0u8; (end - offset) as usize];
            for page in inode.cur.write(&zeros, offset) {
                inode.lost.remove(&page);
            }
        }
        Ok(Fallocated::Done)
    }

    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_writable()?;
        let mut st = self.call(Op::Fallocate)?;
        let missing = {
            let inode = &st.inodes[&self.ino];
            (offset / PAGE..(offset + len).div_ceil(PAGE))
                .filter(|p| !inode.cur.pages.contains_key(p))
                .count() as u64
        };
        st.ensure_room(missing * PAGE)?;
        let inode = st.inodes.get_mut(&self.ino).expect("inode");
        // Allocated blocks: pages of zeros.
        for page in offset / PAGE..(offset + len).div_ceil(PAGE) {
            inode
                .cur
                .pages
                .entry(page)
                .or_insert_with(|| Arc::new([0; PAGE as usize]));
        }
        inode.cur.len = inode.cur.len.max(offset + len);
        Ok(())
    }

    fn clone_range(&self, src: &dyn FileIo, span: Span) -> io::Result<Fallocated> {
        self.check_writable()?;
        let Some(src) = src.as_any().downcast_ref::<FaultFile>() else {
            return Ok(Fallocated::Unsupported);
        };
        let mut st = self.call(Op::Clone)?;
        st.ensure_room(span.len)?;
        let mut data = vec![0u8; span.len as usize];
        st.inodes[&src.ino].cur.read(&mut data, span.from);
        let inode = st.inodes.get_mut(&self.ino).expect("inode");
        for page in inode.cur.write(&data, span.to) {
            inode.lost.remove(&page);
        }
        Ok(Fallocated::Done)
    }

    fn copy_range(&self, _: &dyn FileIo, _: Span) -> io::Result<Option<u64>> {
        Ok(None)
    }

    fn start_writeback(&self, _: u64, _: u64) {}

    fn map(&self, len: usize) -> io::Result<Mapping> {
        let mut st = self.call(Op::Map)?;
        let inode = st.inodes.get_mut(&self.ino).expect("inode");
        let buf = match &inode.map {
            Some(m) if m.0.len() == len => Arc::clone(m),
            _ => {
                inode.absorb_map();
                let mut bytes = vec![0u8; len];
                inode.cur.read(&mut bytes, 0);
                let buf = Arc::new(MapBuf(
                    bytes.into_iter().map(std::cell::UnsafeCell::new).collect(),
                ));
                inode.map = Some(Arc::clone(&buf));
                buf
            }
        };
        let ptr = buf.ptr();
        // SAFETY: the bytes live in `buf`, which the mapping keeps alive.
        Ok(unsafe { Mapping::new(ptr, len, Box::new(buf)) })
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(fs: &dyn Fs, path: &str, data: &[u8]) -> File {
        let f = fs.open(Path::new(path), Open::Create).unwrap();
        f.write_all_at(data, 0).unwrap();
        f
    }

    fn read(fs: &dyn Fs, path: &str) -> io::Result<Vec<u8>> {
        let f = fs.open(Path::new(path), Open::Read)?;
        super::super::read_all(&*f)
    }

    #[test]
    fn a_power_cut_keeps_only_what_was_synced() {
        let disk = FaultFs::new();
        let fs = disk.process();
        fs.create_dir_all(Path::new("/p")).unwrap();
        fs.sync_dir(Path::new("/")).unwrap();
        let a = write(&*fs, "/p/a", b"one");
        a.sync_data().unwrap();
        fs.sync_dir(Path::new("/p")).unwrap();
        a.write_all_at(b"two", 0).unwrap();
        let b = write(&*fs, "/p/b", b"bee");
        b.sync_data().unwrap(); // data durable, but not its name
        let c = write(&*fs, "/p/c", b"sea");
        c.sync_data().unwrap();
        fs.rename(Path::new("/p/c"), Path::new("/p/d")).unwrap();
        assert_eq!(read(&*fs, "/p/a").unwrap(), b"two");
        disk.power_cut();
        assert!(
            a.read_at(&mut [0; 3], 0).is_err(),
            "the old process is dead"
        );
        let fs = disk.process();
        assert_eq!(read(&*fs, "/p/a").unwrap(), b"one");
        assert!(read(&*fs, "/p/b").is_err());
        assert!(read(&*fs, "/p/d").is_err());
        assert!(read(&*fs, "/p/c").is_err(), "never had a durable name");
    }

    #[test]
    fn a_failed_fdatasync_loses_its_pages_even_if_the_next_one_succeeds() {
        let disk = FaultFs::new();
        let fs = disk.process();
        let f = write(&*fs, "/f", &[1; 8192]);
        f.sync_data().unwrap();
        fs.sync_dir(Path::new("/")).unwrap();
        f.write_all_at(&[2; 4096], 0).unwrap();
        disk.fail(Some(Fail {
            at: 1,
            op: Some(Op::Sync),
            errno: libc::EIO,
            sticky: false,
        }));
        assert_eq!(f.sync_data().unwrap_err().raw_os_error(), Some(libc::EIO));
        f.sync_data().unwrap();
        let mut buf = [0u8; 4096];
        f.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf, [2; 4096], "the page cache still has it");
        disk.power_cut();
        let fs = disk.process();
        assert_eq!(read(&*fs, "/f").unwrap()[..4096], [1; 4096]);
    }

    #[test]
    fn faults_hit_the_nth_call_of_a_kind_and_can_stay() {
        let disk = FaultFs::new();
        let fs = disk.process();
        let f = write(&*fs, "/f", b"x");
        disk.fail(Some(Fail {
            at: 2,
            op: Some(Op::Write),
            errno: libc::ENOSPC,
            sticky: true,
        }));
        f.write_all_at(b"a", 0).unwrap();
        let mut buf = [0u8; 1];
        f.read_at(&mut buf, 0).unwrap();
        for _ in 0..3 {
            assert_eq!(
                f.write_all_at(b"b", 0).unwrap_err().raw_os_error(),
                Some(libc::ENOSPC)
            );
        }
        assert_eq!(buf, *b"a");
        disk.set_capacity(Some(8192));
        disk.fail(None);
        f.write_all_at(&[0; 4096], 4096).unwrap();
        assert!(f.write_all_at(&[0; 4096], 8192).is_err(), "full");
    }

    #[test]
    fn mappings_are_the_page_cache() {
        let disk = FaultFs::new();
        let fs = disk.process();
        let f = write(&*fs, "/m", &[0; 64]);
        let m = f.map(64).unwrap();
        // SAFETY: within the 64 mapped bytes.
        unsafe { *m.as_ptr().add(3) = 9 };
        drop(m);
        drop(f);
        // A new process of the same boot sees it.
        let f = fs.open(Path::new("/m"), Open::ReadWrite).unwrap();
        let m = f.map(64).unwrap();
        // SAFETY: as above.
        assert_eq!(unsafe { *m.as_ptr().add(3) }, 9);
    }
}
