//! A minimal, explicit little-endian encoding for catalog records. Every
//! record starts with its own version byte, so a record layout can change
//! without a pool-wide migration; the layouts are listed in `FORMAT.md`.

use super::super::error::{Error, Result};

/// Appends fixed-width little-endian fields.
#[derive(Debug, Default)]
pub(crate) struct Writer(pub(crate) Vec<u8>);

impl Writer {
    pub(crate) fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    pub(crate) fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub(crate) fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub(crate) fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub(crate) fn u128(&mut self, v: u128) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// A string: its length (`u16`, cut to 65 535 bytes) and UTF-8 bytes.
    pub(crate) fn str(&mut self, v: &str) -> &mut Self {
        let mut end = v.len().min(u16::MAX as usize);
        while !v.is_char_boundary(end) {
            end -= 1;
        }
        self.u16(end as u16);
        self.0.extend_from_slice(&v.as_bytes()[..end]);
        self
    }
    /// An optional `u128`: a presence byte, then the value if present.
    pub(crate) fn opt_u128(&mut self, v: Option<u128>) -> &mut Self {
        match v {
            Some(v) => self.u8(1).u128(v),
            None => self.u8(0),
        }
    }
}

/// Reads what [`Writer`] wrote; running out of bytes is corruption.
#[derive(Debug)]
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8], what: &'static str) -> Self {
        Reader { buf, what }
    }

    fn take<const N: usize>(&mut self) -> Result<[u8; N]> {
        if self.buf.len() < N {
            return Err(Error::Corrupt(format!("{} record is truncated", self.what)));
        }
        let (head, rest) = self.buf.split_at(N);
        self.buf = rest;
        Ok(head.try_into().expect("split at N"))
    }

    pub(crate) fn u8(&mut self) -> Result<u8> {
        Ok(self.take::<1>()?[0])
    }
    pub(crate) fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take()?))
    }
    pub(crate) fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take()?))
    }
    pub(crate) fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take()?))
    }
    pub(crate) fn u128(&mut self) -> Result<u128> {
        Ok(u128::from_le_bytes(self.take()?))
    }
    pub(crate) fn opt_u128(&mut self) -> Result<Option<u128>> {
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some(self.u128()?)),
            b => Err(Error::Corrupt(format!(
                "{} record has option tag {b}",
                self.what
            ))),
        }
    }

    pub(crate) fn str(&mut self) -> Result<String> {
        let len = self.u16()? as usize;
        if self.buf.len() < len {
            return Err(Error::Corrupt(format!("{} record is truncated", self.what)));
        }
        let (head, rest) = self.buf.split_at(len);
        self.buf = rest;
        String::from_utf8(head.to_vec()).map_err(|_| {
            Error::Corrupt(format!(
                "{} record has a string that is not UTF-8",
                self.what
            ))
        })
    }

    /// Checks the record version byte.
    pub(crate) fn version(&mut self, supported: u8) -> Result<()> {
        match self.u8()? {
            v if v == supported => Ok(()),
            v => Err(Error::Corrupt(format!(
                "{} record has version {v}, this build reads version {supported}",
                self.what
            ))),
        }
    }

    /// Whether every byte was read.
    pub(crate) fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_round_trip() {
        let mut w = Writer::default();
        w.u8(1)
            .u16(2)
            .u32(3)
            .u64(4)
            .u128(5)
            .opt_u128(None)
            .opt_u128(Some(6))
            .str("héllo");
        let mut r = Reader::new(&w.0, "test");
        assert_eq!(r.u8().unwrap(), 1);
        assert_eq!(r.u16().unwrap(), 2);
        assert_eq!(r.u32().unwrap(), 3);
        assert_eq!(r.u64().unwrap(), 4);
        assert_eq!(r.u128().unwrap(), 5);
        assert_eq!(r.opt_u128().unwrap(), None);
        assert_eq!(r.opt_u128().unwrap(), Some(6));
        assert_eq!(r.str().unwrap(), "héllo");
        assert!(r.is_empty());
    }

    #[test]
    fn truncated_record_is_corruption_not_a_panic() {
        let mut r = Reader::new(&[1, 2], "test");
        assert!(matches!(r.u64(), Err(Error::Corrupt(_))));
    }
}
