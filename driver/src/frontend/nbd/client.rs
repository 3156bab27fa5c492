//! The client side of NBD, as the node needs it: the fixed newstyle
//! handshake up to `NBD_OPT_GO` (what the kernel's nbd driver expects to
//! have been done before it is handed a socket), and simple-reply
//! transmission for tools and benchmarks. No structured replies: the
//! kernel's client does not speak them.

use std::io::{Read, Write};

use super::protocol::*;

/// What the server said about the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportInfo {
    pub size: u64,
    /// Transmission flags (`TFLAG_*`), as the kernel wants them.
    pub flags: u16,
}

fn invalid(msg: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg)
}

fn read_u16(s: &mut impl Read) -> std::io::Result<u16> {
    let mut b = [0u8; 2];
    s.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}

fn read_u32(s: &mut impl Read) -> std::io::Result<u32> {
    let mut b = [0u8; 4];
    s.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64(s: &mut impl Read) -> std::io::Result<u64> {
    let mut b = [0u8; 8];
    s.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

/// Negotiates `export` on a fresh connection; on success the connection is
/// in the transmission phase.
pub fn negotiate<S: Read + Write>(s: &mut S, export: &str) -> std::io::Result<ExportInfo> {
    if read_u64(s)? != NBD_MAGIC || read_u64(s)? != IHAVEOPT {
        return Err(invalid("not an NBD server (bad greeting)".into()));
    }
    let server = read_u16(s)?;
    if server & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(invalid("the server does not speak fixed newstyle".into()));
    }
    let mut client = FLAG_C_FIXED_NEWSTYLE;
    if server & FLAG_NO_ZEROES != 0 {
        client |= FLAG_C_NO_ZEROES;
    }
    let mut out = Vec::new();
    out.extend_from_slice(&client.to_be_bytes());
    let name = export.as_bytes();
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&OPT_GO.to_be_bytes());
    out.extend_from_slice(&(4 + name.len() as u32 + 2).to_be_bytes());
    out.extend_from_slice(&(name.len() as u32).to_be_bytes());
    out.extend_from_slice(name);
    out.extend_from_slice(&0u16.to_be_bytes()); // no extra info requests
    s.write_all(&out)?;
    let mut info = None;
    loop {
        if read_u64(s)? != OPT_REPLY_MAGIC {
            return Err(invalid("bad option reply magic".into()));
        }
        let _option = read_u32(s)?;
        let kind = read_u32(s)?;
        let len = read_u32(s)?;
        if len > MAX_OPTION_LEN {
            return Err(invalid(format!("option reply of {len} bytes")));
        }
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data)?;
        match kind {
            REP_INFO
                if data.len() >= 12 && u16::from_be_bytes([data[0], data[1]]) == INFO_EXPORT =>
            {
                info = Some(ExportInfo {
                    size: u64::from_be_bytes(data[2..10].try_into().expect("8 bytes")),
                    flags: u16::from_be_bytes([data[10], data[11]]),
                });
            }
            REP_INFO => {}
            REP_ACK => {
                return info
                    .ok_or_else(|| invalid("NBD_OPT_GO acknowledged without export info".into()));
            }
            k if k & REP_ERR != 0 => {
                return Err(std::io::Error::other(format!(
                    "the server refused export {export:?}: {}",
                    String::from_utf8_lossy(&data)
                )));
            }
            other => return Err(invalid(format!("unexpected option reply {other}"))),
        }
    }
}

/// A negotiated connection that sends one request at a time.
#[derive(Debug)]
pub struct Client<S> {
    stream: S,
    cookie: u64,
    pub info: ExportInfo,
}

impl<S: Read + Write> Client<S> {
    pub fn connect(mut stream: S, export: &str) -> std::io::Result<Self> {
        let info = negotiate(&mut stream, export)?;
        Ok(Client {
            stream,
            cookie: 0,
            info,
        })
    }

    fn request(&mut self, kind: u16, offset: u64, len: u32, payload: &[u8]) -> std::io::Result<()> {
        self.cookie += 1;
        let mut h = Vec::with_capacity(REQUEST_LEN + payload.len());
        h.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        h.extend_from_slice(&0u16.to_be_bytes());
        h.extend_from_slice(&kind.to_be_bytes());
        h.extend_from_slice(&self.cookie.to_be_bytes());
        h.extend_from_slice(&offset.to_be_bytes());
        h.extend_from_slice(&len.to_be_bytes());
        h.extend_from_slice(payload);
        self.stream.write_all(&h)?;
        if read_u32(&mut self.stream)? != SIMPLE_REPLY_MAGIC {
            return Err(invalid("bad reply magic".into()));
        }
        let error = read_u32(&mut self.stream)?;
        if read_u64(&mut self.stream)? != self.cookie {
            return Err(invalid("reply for another request".into()));
        }
        if error != 0 {
            return Err(std::io::Error::from_raw_os_error(error as i32));
        }
        Ok(())
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.request(CMD_WRITE, offset, data.len() as u32, data)
    }

    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.request(CMD_READ, offset, buf.len() as u32, &[])?;
        self.stream.read_exact(buf)
    }

    pub fn flush(&mut self) -> std::io::Result<()> {
        self.request(CMD_FLUSH, 0, 0, &[])
    }
}
