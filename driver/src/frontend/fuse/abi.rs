//! The parts of the FUSE kernel protocol (`<linux/fuse.h>`, 7.40) that a
//! one-file filesystem needs: request parsing and reply encoding, byte by
//! byte (little endian, the layout of the C structs), without `unsafe`.

/// The protocol version this server speaks (7.40 added
/// `FUSE_NOTIFY_RESEND`, which lets a restarted server take over requests
/// that its predecessor read but never answered).
pub const KERNEL_VERSION: u32 = 7;
pub const KERNEL_MINOR_VERSION: u32 = 40;
/// The oldest kernel protocol this server accepts (7.28: `FUSE_MAX_PAGES`).
pub const MIN_KERNEL_MINOR: u32 = 28;

pub const IN_HEADER_LEN: usize = 40;
pub const OUT_HEADER_LEN: usize = 16;

// Opcodes.
pub const LOOKUP: u32 = 1;
pub const FORGET: u32 = 2;
pub const GETATTR: u32 = 3;
pub const SETATTR: u32 = 4;
pub const OPEN: u32 = 14;
pub const READ: u32 = 15;
pub const WRITE: u32 = 16;
pub const STATFS: u32 = 17;
pub const RELEASE: u32 = 18;
pub const FSYNC: u32 = 20;
pub const FLUSH: u32 = 25;
pub const INIT: u32 = 26;
pub const OPENDIR: u32 = 27;
pub const READDIR: u32 = 28;
pub const RELEASEDIR: u32 = 29;
pub const FSYNCDIR: u32 = 30;
pub const ACCESS: u32 = 34;
pub const INTERRUPT: u32 = 36;
pub const DESTROY: u32 = 38;
pub const BATCH_FORGET: u32 = 42;
pub const FALLOCATE: u32 = 43;
pub const SYNCFS: u32 = 50;

// INIT flags (the high 32 bits travel in `flags2`).
pub const ASYNC_READ: u64 = 1 << 0;
pub const BIG_WRITES: u64 = 1 << 5;
pub const ASYNC_DIO: u64 = 1 << 15;
pub const MAX_PAGES: u64 = 1 << 22;
pub const INIT_EXT: u64 = 1 << 30;
pub const HAS_RESEND: u64 = 1 << 39;

/// Set in `unique` of a request the kernel sends again after
/// `FUSE_NOTIFY_RESEND`; the reply echoes `unique` as received.
pub const UNIQUE_RESEND: u64 = 1 << 63;

// Notifications (server to kernel, `unique` 0, `error` = the code).
pub const NOTIFY_INVAL_INODE: i32 = 2;
pub const NOTIFY_RESEND: i32 = 7;

// SETATTR `valid` bits.
pub const FATTR_SIZE: u32 = 1 << 3;
pub const FATTR_MODE: u32 = 1 << 0;
pub const FATTR_UID: u32 = 1 << 1;
pub const FATTR_GID: u32 = 1 << 2;

/// OPEN reply flag: bypass the page cache for this open file.
pub const FOPEN_DIRECT_IO: u32 = 1 << 0;

// fallocate modes.
pub const FALLOC_KEEP_SIZE: u32 = 0x01;
pub const FALLOC_PUNCH_HOLE: u32 = 0x02;
pub const FALLOC_ZERO_RANGE: u32 = 0x10;

/// Node IDs: the root directory and the one file in it.
pub const ROOT_ID: u64 = 1;
pub const FILE_ID: u64 = 2;

/// A request whose body is shorter than its opcode needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Truncated;

/// Little-endian field reader over a request body.
#[derive(Debug)]
pub struct Body<'a>(pub &'a [u8]);

impl Body<'_> {
    pub fn u32(&self, at: usize) -> Result<u32, Truncated> {
        self.0
            .get(at..at + 4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
            .ok_or(Truncated)
    }

    pub fn u64(&self, at: usize) -> Result<u64, Truncated> {
        self.0
            .get(at..at + 8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
            .ok_or(Truncated)
    }

    /// A NUL-terminated name starting at `at`.
    pub fn name(&self, at: usize) -> Result<&[u8], Truncated> {
        let rest = self.0.get(at..).ok_or(Truncated)?;
        let end = rest.iter().position(|&b| b == 0).ok_or(Truncated)?;
        Ok(&rest[..end])
    }
}

/// `fuse_in_header`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InHeader {
    pub len: u32,
    pub opcode: u32,
    pub unique: u64,
    pub nodeid: u64,
}

impl InHeader {
    pub fn parse(b: &[u8]) -> Result<InHeader, Truncated> {
        if b.len() < IN_HEADER_LEN {
            return Err(Truncated);
        }
        let r = Body(b);
        Ok(InHeader {
            len: r.u32(0)?,
            opcode: r.u32(4)?,
            unique: r.u64(8)?,
            nodeid: r.u64(16)?,
        })
    }
}

/// `fuse_out_header` for a reply of `body_len` bytes (`error` is 0 or a
/// negative errno) or a notification (`unique` 0, `error` = the code).
pub fn out_header(unique: u64, error: i32, body_len: usize) -> [u8; OUT_HEADER_LEN] {
    let mut h = [0u8; OUT_HEADER_LEN];
    h[0..4].copy_from_slice(&((OUT_HEADER_LEN + body_len) as u32).to_le_bytes());
    h[4..8].copy_from_slice(&error.to_le_bytes());
    h[8..16].copy_from_slice(&unique.to_le_bytes());
    h
}

/// A reply body under construction.
#[derive(Debug, Default)]
pub struct Out(pub Vec<u8>);

impl Out {
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn zeros(&mut self, n: usize) -> &mut Self {
        self.0.resize(self.0.len() + n, 0);
        self
    }
}

/// What INIT agreed on; a restarted server needs it to go on serving a
/// connection it did not initialise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Negotiated {
    /// The protocol minor both sides speak.
    pub minor: u32,
    /// Largest WRITE payload the kernel sends.
    pub max_write: u32,
    /// The kernel understands `FUSE_NOTIFY_RESEND`.
    pub resend: bool,
}

/// Parses `fuse_init_in` and builds `fuse_init_out` granting what this
/// server wants, or `Err(reason)` for a kernel too old to serve.
pub fn init_reply(body: &[u8], max_write: u32) -> Result<(Out, Negotiated), String> {
    let r = Body(body);
    let major = r.u32(0).map_err(|_| "short INIT".to_string())?;
    let minor = r.u32(4).map_err(|_| "short INIT".to_string())?;
    let max_readahead = r.u32(8).map_err(|_| "short INIT".to_string())?;
    let flags_lo = r.u32(12).map_err(|_| "short INIT".to_string())?;
    let mut offered = u64::from(flags_lo);
    if offered & INIT_EXT != 0 {
        offered |= u64::from(r.u32(16).unwrap_or(0)) << 32;
    }
    if major != KERNEL_VERSION {
        return Err(format!(
            "kernel FUSE protocol {major}.{minor}; this server speaks 7.x"
        ));
    }
    if minor < MIN_KERNEL_MINOR {
        return Err(format!(
            "kernel FUSE protocol 7.{minor} is older than 7.{MIN_KERNEL_MINOR}"
        ));
    }
    let wanted = ASYNC_READ | BIG_WRITES | ASYNC_DIO | MAX_PAGES | INIT_EXT;
    let granted = offered & wanted;
    let minor = minor.min(KERNEL_MINOR_VERSION);
    let max_pages = (max_write / 4096).max(1) as u16;
    let mut out = Out::default();
    out.u32(KERNEL_VERSION)
        .u32(minor)
        .u32(max_readahead)
        .u32(granted as u32)
        .u16(64) // max_background
        .u16(48) // congestion_threshold
        .u32(max_write)
        .u32(1) // time_gran (ns)
        .u16(max_pages)
        .u16(0) // map_alignment
        .u32((granted >> 32) as u32)
        .zeros(7 * 4);
    Ok((
        out,
        Negotiated {
            minor,
            max_write,
            resend: offered & HAS_RESEND != 0,
        },
    ))
}

/// `fuse_attr` of the root directory or of the volume file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub size: u64,
    pub blocks: u64,
    pub mode: u32,
    pub nlink: u32,
    pub mtime: u64,
}

impl Attr {
    pub fn encode(&self, out: &mut Out) {
        out.u64(self.ino)
            .u64(self.size)
            .u64(self.blocks)
            .u64(self.mtime) // atime
            .u64(self.mtime)
            .u64(self.mtime) // ctime
            .u32(0)
            .u32(0)
            .u32(0)
            .u32(self.mode)
            .u32(self.nlink)
            .u32(0) // uid
            .u32(0) // gid
            .u32(0) // rdev
            .u32(4096) // blksize
            .u32(0); // flags
    }
}

/// `fuse_entry_out` (LOOKUP).
pub fn entry_out(attr: &Attr, valid_secs: u64) -> Out {
    let mut out = Out::default();
    out.u64(attr.ino)
        .u64(1) // generation
        .u64(valid_secs)
        .u64(valid_secs)
        .u32(0)
        .u32(0);
    attr.encode(&mut out);
    out
}

/// `fuse_attr_out` (GETATTR, SETATTR).
pub fn attr_out(attr: &Attr, valid_secs: u64) -> Out {
    let mut out = Out::default();
    out.u64(valid_secs).u32(0).u32(0);
    attr.encode(&mut out);
    out
}

/// `fuse_open_out`.
pub fn open_out(open_flags: u32) -> Out {
    let mut out = Out::default();
    out.u64(0).u32(open_flags).u32(0);
    out
}

/// `fuse_write_out`.
pub fn write_out(size: u32) -> Out {
    let mut out = Out::default();
    out.u32(size).u32(0);
    out
}

/// `fuse_statfs_out` for a filesystem of `blocks` 4 KiB blocks, `free` of
/// them free, holding `files` files.
pub fn statfs_out(blocks: u64, free: u64, files: u64) -> Out {
    let mut out = Out::default();
    out.u64(blocks)
        .u64(free)
        .u64(free)
        .u64(files)
        .u64(0)
        .u32(4096) // bsize
        .u32(255) // namelen
        .u32(4096) // frsize
        .u32(0)
        .zeros(6 * 4);
    out
}

/// Appends one `fuse_dirent` (8-byte aligned) to a READDIR reply.
pub fn dirent(out: &mut Out, ino: u64, next_offset: u64, name: &[u8], dtype: u32) {
    out.u64(ino)
        .u64(next_offset)
        .u32(name.len() as u32)
        .u32(dtype);
    out.0.extend_from_slice(name);
    let pad = (8 - (24 + name.len()) % 8) % 8;
    out.zeros(pad);
}

/// The body of `FUSE_NOTIFY_INVAL_INODE` for the whole of inode `ino`
/// (attributes and cached data).
pub fn inval_inode(ino: u64) -> Out {
    let mut out = Out::default();
    out.u64(ino).u64(0).u64(0);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn init_in(minor: u32, flags: u64) -> Vec<u8> {
        let mut b = Out::default();
        b.u32(7)
            .u32(minor)
            .u32(128 << 10)
            .u32(flags as u32)
            .u32((flags >> 32) as u32)
            .zeros(11 * 4);
        b.0
    }

    #[test]
    fn init_grants_only_what_the_kernel_offers_and_reports_resend() {
        let offered = ASYNC_READ | ASYNC_DIO | MAX_PAGES | INIT_EXT | HAS_RESEND | (1 << 16);
        let (out, n) = init_reply(&init_in(44, offered), 256 << 10).unwrap();
        assert_eq!(out.0.len(), 64, "fuse_init_out is 64 bytes");
        let r = Body(&out.0);
        assert_eq!(r.u32(0).unwrap(), 7);
        assert_eq!(
            r.u32(4).unwrap(),
            40,
            "our minor, not the kernel's newer one"
        );
        let granted = u64::from(r.u32(12).unwrap());
        assert_eq!(granted, ASYNC_READ | ASYNC_DIO | MAX_PAGES | INIT_EXT);
        assert_eq!(r.u32(20).unwrap(), 256 << 10, "max_write");
        assert_eq!(&out.0[28..30], &64u16.to_le_bytes(), "max_pages");
        assert_eq!(
            n,
            Negotiated {
                minor: 40,
                max_write: 256 << 10,
                resend: true
            }
        );
        let (_, old) = init_reply(&init_in(38, ASYNC_READ), 1 << 20).unwrap();
        assert_eq!((old.minor, old.resend), (38, false));
        assert!(init_reply(&init_in(20, 0), 1 << 20).is_err());
        assert!(init_reply(&[1, 2, 3], 1 << 20).is_err());
    }

    #[test]
    fn struct_sizes_match_the_kernel_abi() {
        let attr = Attr {
            ino: 2,
            size: 1 << 30,
            blocks: 8,
            mode: 0o100600,
            nlink: 1,
            mtime: 0,
        };
        let mut a = Out::default();
        attr.encode(&mut a);
        assert_eq!(a.0.len(), 88, "fuse_attr");
        assert_eq!(entry_out(&attr, 1).0.len(), 128, "fuse_entry_out");
        assert_eq!(attr_out(&attr, 1).0.len(), 104, "fuse_attr_out");
        assert_eq!(open_out(0).0.len(), 16, "fuse_open_out");
        assert_eq!(statfs_out(1, 1, 1).0.len(), 80, "fuse_statfs_out");
        assert_eq!(inval_inode(2).0.len(), 24, "fuse_notify_inval_inode_out");
        let mut d = Out::default();
        dirent(&mut d, 2, 3, b"disk", 8);
        assert_eq!(d.0.len(), 32, "24-byte dirent header + name, padded to 8");
        let h = out_header(0x8000_0000_0000_0005, -5, 8);
        assert_eq!(u32::from_le_bytes(h[0..4].try_into().unwrap()), 24);
        assert_eq!(i32::from_le_bytes(h[4..8].try_into().unwrap()), -5);
    }

    #[test]
    fn request_parsing_refuses_short_bodies() {
        assert_eq!(InHeader::parse(&[0u8; 39]), Err(Truncated));
        let b = Body(b"disk\0rest");
        assert_eq!(b.name(0).unwrap(), b"disk");
        assert_eq!(Body(b"no-nul").name(0), Err(Truncated));
        assert_eq!(Body(&[1, 2]).u64(0), Err(Truncated));
    }
}
