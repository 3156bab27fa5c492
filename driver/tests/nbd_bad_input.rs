//! Bad NBD input, byte by byte: every refusal is the protocol's answer, the
//! connection survives wherever the protocol allows, the server never goes
//! down, and data flushed before stays intact.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::standalone::Standalone;
use strata::frontend::nbd::protocol::*;

struct Raw(UnixStream);

impl Raw {
    /// Connects and does the greeting with `client_flags`.
    fn connect(s: &Standalone, client_flags: u32) -> Raw {
        let sock = UnixStream::connect(s.nbd_socket()).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut raw = Raw(sock);
        let mut greeting = [0u8; 18];
        raw.0.read_exact(&mut greeting).unwrap();
        assert_eq!(&greeting[..8], &NBD_MAGIC.to_be_bytes());
        assert_eq!(&greeting[8..16], &IHAVEOPT.to_be_bytes());
        raw.0.write_all(&client_flags.to_be_bytes()).unwrap();
        raw
    }

    fn option(&mut self, option: u32, data: &[u8]) {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.0.write_all(&b).unwrap();
    }

    /// Reads one option reply: (reply type, data).
    fn reply(&mut self) -> (u32, Vec<u8>) {
        let mut h = [0u8; 20];
        self.0.read_exact(&mut h).unwrap();
        assert_eq!(&h[..8], &OPT_REPLY_MAGIC.to_be_bytes());
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        let mut data = vec![0u8; len];
        self.0.read_exact(&mut data).unwrap();
        (kind, data)
    }

    /// Reads replies until the final ACK or error; returns the last type.
    fn final_reply(&mut self) -> u32 {
        loop {
            let (kind, _) = self.reply();
            if kind == REP_ACK || kind & (1 << 31) != 0 {
                return kind;
            }
        }
    }

    fn go(&mut self, export: &str) -> u32 {
        let mut d = (export.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        self.option(OPT_GO, &d);
        self.final_reply()
    }

    fn request(
        &mut self,
        kind: u16,
        flags: u16,
        cookie: u64,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) {
        let mut b = REQUEST_MAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(payload);
        self.0.write_all(&b).unwrap();
    }

    /// Reads a simple reply: (cookie, error, data of `data_len` if no error).
    fn simple(&mut self, data_len: usize) -> (u64, u32, Vec<u8>) {
        let mut h = [0u8; 16];
        self.0.read_exact(&mut h).unwrap();
        assert_eq!(&h[..4], &SIMPLE_REPLY_MAGIC.to_be_bytes());
        let error = u32::from_be_bytes(h[4..8].try_into().unwrap());
        let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
        let mut data = vec![0u8; if error == 0 { data_len } else { 0 }];
        self.0.read_exact(&mut data).unwrap();
        (cookie, error, data)
    }

    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.0.read(&mut b), Ok(0) | Err(_))
    }
}

const FLAGS: u32 = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;

#[test]
fn negotiation_errors_get_protocol_replies_and_the_connection_goes_on() {
    let s = Standalone::start();
    let vol = s.create_volume("neg", "4MiB");
    let mut c = Raw::connect(&s, FLAGS);
    c.option(99, b"whatever");
    assert_eq!(c.final_reply(), REP_ERR_UNSUP);
    c.option(OPT_GO, &[0, 0, 0, 200, b'x']); // name longer than the payload
    assert_eq!(c.final_reply(), REP_ERR_INVALID);
    assert_eq!(c.go("no-such-export"), REP_ERR_UNKNOWN);
    c.option(OPT_STARTTLS, &[]);
    assert_eq!(c.final_reply(), REP_ERR_POLICY);
    let mut meta = (vol.len() as u32).to_be_bytes().to_vec();
    meta.extend_from_slice(vol.as_bytes());
    meta.extend_from_slice(&0u32.to_be_bytes());
    c.option(OPT_SET_META_CONTEXT, &meta);
    assert_eq!(
        c.final_reply(),
        REP_ERR_INVALID,
        "SET_META_CONTEXT before structured replies"
    );
    c.option(OPT_LIST, b"junk");
    assert_eq!(c.final_reply(), REP_ERR_INVALID);
    c.option(OPT_LIST, &[]);
    assert_eq!(c.final_reply(), REP_ACK);
    c.option(OPT_INFO, &[0, 0, 0, 0, 0, 0]);
    assert_eq!(
        c.final_reply(),
        REP_ERR_UNKNOWN,
        "INFO of the empty (default) export"
    );
    // A large option is refused but can be skipped...
    c.option(OPT_LIST, &vec![0u8; 200 << 10]);
    assert_eq!(c.final_reply(), REP_ERR_TOO_BIG);
    // ...and after all that, GO still works.
    assert_eq!(c.go(&vol), REP_ACK);
}

#[test]
fn connections_that_cannot_be_kept_in_sync_are_closed_and_the_server_lives_on() {
    let s = Standalone::start();
    let vol = s.create_volume("close", "4MiB");
    // Unknown client flags.
    let mut c = Raw::connect(&s, 0xffff);
    assert!(c.closed());
    // Bad option magic.
    let mut c = Raw::connect(&s, FLAGS);
    c.0.write_all(&[0u8; 16]).unwrap();
    assert!(c.closed());
    // An option too large to skip.
    let mut c = Raw::connect(&s, FLAGS);
    let mut h = IHAVEOPT.to_be_bytes().to_vec();
    h.extend_from_slice(&OPT_LIST.to_be_bytes());
    h.extend_from_slice(&u32::MAX.to_be_bytes());
    c.0.write_all(&h).unwrap();
    assert!(c.closed());
    // Bad request magic during transmission.
    let mut c = Raw::connect(&s, FLAGS);
    assert_eq!(c.go(&vol), REP_ACK);
    c.0.write_all(&[0xAAu8; 28]).unwrap();
    assert!(c.closed());
    // The server still serves.
    let mut c = Raw::connect(&s, FLAGS);
    assert_eq!(c.go(&vol), REP_ACK);
    c.request(CMD_READ, 0, 1, 0, 4096, &[]);
    assert_eq!(c.simple(4096).1, 0);
}

#[test]
fn bad_requests_get_errors_and_flushed_data_survives_them() {
    let s = Standalone::start();
    let vol = s.create_volume("req", "4MiB");
    let size = 4u64 << 20;
    let mut c = Raw::connect(&s, FLAGS);
    assert_eq!(c.go(&vol), REP_ACK);
    c.request(CMD_WRITE, CMD_FLAG_FUA, 1, 8192, 4096, &[0x5a; 4096]);
    assert_eq!(c.simple(0), (1, 0, vec![]));
    let cases: Vec<(u16, u16, u64, u32, usize, u32)> = vec![
        // kind, flags, offset, length, payload, expected error
        (99, 0, 0, 0, 0, EINVAL), // unknown command
        (CMD_WRITE, CMD_FLAG_NO_HOLE, 0, 4096, 4096, EINVAL), // flag not valid for WRITE
        (CMD_READ, CMD_FLAG_DF, 0, 4096, 0, EINVAL), // DF without structured replies
        (CMD_READ, 0, size, 1, 0, EINVAL), // past the end
        (CMD_WRITE, 0, size - 1, 2, 2, ENOSPC), // write past the end
        (CMD_WRITE_ZEROES, 0, size - 4096, 8192, 0, ENOSPC), // zeroes past the end
        (CMD_TRIM, 0, size - 4096, 8192, 0, EINVAL), // trim past the end
        (CMD_TRIM, 0, u64::MAX - 10, 4096, 0, EINVAL), // offset overflow
        (CMD_FLUSH, 0, 4096, 0, 0, EINVAL), // flush with a range
        (CMD_BLOCK_STATUS, 0, 0, 4096, 0, EINVAL), // no meta context
        (CMD_READ, 0, 0, MAX_REQUEST + 1, 0, EOVERFLOW), // oversized read
        (
            CMD_WRITE,
            0,
            0,
            MAX_REQUEST + 1,
            (MAX_REQUEST + 1) as usize,
            EINVAL,
        ), // oversized write
        // Fast zeroing that would write zeroes as data (a partial block of
        // the flushed one): refused at once, nothing changed.
        (
            CMD_WRITE_ZEROES,
            CMD_FLAG_FAST_ZERO,
            8192 + 512,
            512,
            0,
            ENOTSUP,
        ),
        (
            CMD_WRITE_ZEROES,
            CMD_FLAG_FAST_ZERO | CMD_FLAG_NO_HOLE,
            8192,
            100,
            0,
            ENOTSUP,
        ),
        // Whole blocks are fast.
        (CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 1 << 20, 8192, 0, 0),
        // Read-ahead, within the export only.
        (CMD_CACHE, 0, 0, 1 << 20, 0, 0),
        (CMD_CACHE, 0, size - 4096, 8192, 0, EINVAL),
        (CMD_CACHE, CMD_FLAG_NO_HOLE, 0, 4096, 0, EINVAL),
    ];
    for (i, (kind, flags, offset, len, payload, want)) in cases.into_iter().enumerate() {
        let cookie = 100 + i as u64;
        c.request(kind, flags, cookie, offset, len, &vec![0xEE; payload]);
        let (got_cookie, error, _) = c.simple(0);
        assert_eq!((got_cookie, error), (cookie, want), "case {i}");
    }
    // Same connection, still in sync, and the flushed block is intact.
    c.request(CMD_READ, 0, 7, 8192, 4096, &[]);
    let (_, error, data) = c.simple(4096);
    assert_eq!(error, 0);
    assert!(data.iter().all(|&b| b == 0x5a));
    let metrics = s.metrics();
    assert!(
        metrics.contains("strata_nbd_protocol_errors_total{kind=\"unknown_command\"} 1"),
        "{metrics}"
    );
}

/// LIST_META_CONTEXT answers context ID 0; a SET that fails clears the
/// selection an earlier SET made, so BLOCK_STATUS is refused after it.
#[test]
fn meta_context_ids_and_a_failed_set() {
    let s = Standalone::start();
    let vol = s.create_volume("meta", "4MiB");
    let mut c = Raw::connect(&s, FLAGS);
    c.option(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(c.final_reply(), REP_ACK);
    let query_of = |export: &str, queries: &[&str]| {
        let mut d = (export.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        d
    };
    let query = |export: &str| query_of(export, &["base:allocation"]);
    // The contexts an answer names, with their IDs.
    let contexts = |c: &mut Raw| {
        let mut named = Vec::new();
        loop {
            let (kind, data) = c.reply();
            if kind == REP_ACK {
                return named;
            }
            assert_eq!(kind, REP_META_CONTEXT);
            let id = u32::from_be_bytes(data[..4].try_into().unwrap());
            named.push((id, String::from_utf8(data[4..].to_vec()).unwrap()));
        }
    };
    let context_id = |c: &mut Raw| {
        let named = contexts(c);
        assert_eq!(named.len(), 1, "{named:?}");
        named[0].0
    };
    c.option(OPT_LIST_META_CONTEXT, &query(&vol));
    assert_eq!(context_id(&mut c), 0);
    // LIST of nothing, or of a namespace: what is served there, as ID 0.
    let both = vec![
        (0, "base:allocation".to_string()),
        (0, "qemu:allocation-depth".to_string()),
    ];
    c.option(OPT_LIST_META_CONTEXT, &query_of(&vol, &[]));
    assert_eq!(contexts(&mut c), both);
    c.option(OPT_LIST_META_CONTEXT, &query_of(&vol, &["qemu:", "base:"]));
    assert_eq!(contexts(&mut c), both);
    // SET of both, and of one we do not serve (selects nothing of it).
    c.option(
        OPT_SET_META_CONTEXT,
        &query_of(
            &vol,
            &[
                "qemu:allocation-depth",
                "qemu:dirty-bitmap:x",
                "base:allocation",
            ],
        ),
    );
    let set = contexts(&mut c);
    assert_eq!(set.len(), 2, "{set:?}");
    assert!(
        set.iter().all(|(id, _)| *id != 0) && set[0].0 != set[1].0,
        "{set:?}"
    );
    c.option(OPT_SET_META_CONTEXT, &query_of(&vol, &["qemu:"]));
    assert_eq!(contexts(&mut c), []);
    c.option(OPT_SET_META_CONTEXT, &query(&vol));
    assert_ne!(context_id(&mut c), 0);
    c.option(OPT_SET_META_CONTEXT, &query("no-such-export"));
    assert_eq!(c.final_reply(), REP_ERR_UNKNOWN);
    assert_eq!(c.go(&vol), REP_ACK);
    c.request(CMD_BLOCK_STATUS, 0, 1, 0, 4096, &[]);
    let mut h = [0u8; 20];
    c.0.read_exact(&mut h).unwrap();
    let kind = u16::from_be_bytes(h[6..8].try_into().unwrap());
    let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
    let mut body = vec![0u8; len];
    c.0.read_exact(&mut body).unwrap();
    assert_eq!(kind, REPLY_TYPE_ERROR);
    assert_eq!(u32::from_be_bytes(body[..4].try_into().unwrap()), EINVAL);

    // Contexts selected for one export do not hold for another.
    let other = s.create_volume("meta-other", "4MiB");
    let mut c = Raw::connect(&s, FLAGS);
    c.option(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(c.final_reply(), REP_ACK);
    c.option(OPT_SET_META_CONTEXT, &query(&vol));
    assert_ne!(context_id(&mut c), 0);
    assert_eq!(c.go(&other), REP_ACK);
    c.request(CMD_BLOCK_STATUS, 0, 2, 0, 4096, &[]);
    c.0.read_exact(&mut h).unwrap();
    let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
    let mut body = vec![0u8; len];
    c.0.read_exact(&mut body).unwrap();
    assert_eq!(
        u16::from_be_bytes(h[6..8].try_into().unwrap()),
        REPLY_TYPE_ERROR
    );
    assert_eq!(u32::from_be_bytes(body[..4].try_into().unwrap()), EINVAL);
}

/// Clients that send reads and never read the replies hold at most their
/// connections' budgets: the server's memory stays bounded (before, every
/// worker kept its 32 MiB reply: 1 GiB per connection).
#[test]
fn clients_that_never_read_their_replies_cannot_take_the_servers_memory() {
    let s = Standalone::start();
    let vol = s.create_volume("hog", "64MiB");
    let before = s.rss_bytes();
    let mut hogs = Vec::new();
    for _ in 0..2 {
        let mut c = Raw::connect(&s, FLAGS);
        assert_eq!(c.go(&vol), REP_ACK);
        // Small socket buffers: the replies stay in the server.
        let fd = std::os::fd::AsRawFd::as_raw_fd(&c.0);
        let size: libc::c_int = 4096;
        // SAFETY: setting an int socket option on a socket this test owns.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                (&raw const size).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        for cookie in 0..64 {
            c.request(CMD_READ, 0, cookie, 0, MAX_REQUEST, &[]);
        }
        hogs.push(c);
    }
    // Let the workers take what they can.
    std::thread::sleep(Duration::from_secs(3));
    let grown = s.rss_bytes().saturating_sub(before);
    eprintln!(
        "server memory grew by {} MiB with 2 connections holding 64 reads of 32 MiB each",
        grown >> 20
    );
    assert!(grown < 400 << 20, "grew by {} MiB", grown >> 20);
    // The server still serves others.
    drop(hogs);
    let mut c = Raw::connect(&s, FLAGS);
    assert_eq!(c.go(&vol), REP_ACK);
    c.request(CMD_READ, 0, 1, 0, 4096, &[]);
    assert_eq!(c.simple(4096).1, 0);
}
