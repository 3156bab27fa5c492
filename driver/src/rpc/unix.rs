//! The CSI unix socket's connections, made acceptable to h2 whatever
//! `:authority` the client sends.
//!
//! gRPC clients built on grpc C-core (Python, Ruby, C++; since 1.57) send
//! the percent-encoded socket path as `:authority` on a unix socket
//! (`tmp%2Fcsi.sock`). That is no valid authority, and h2, which tonic
//! serves with, resets every such stream with PROTOCOL_ERROR; it has no
//! option to accept it (hyperium/h2 PR 487 is still open). So every
//! connection on the socket reads through [`AuthorityFix`]: the client's
//! HTTP/2 frames pass unchanged except header blocks, which are decoded
//! with an HPACK decoder (`loona-hpack`) and written again as literals
//! that never touch h2's dynamic table, with an invalid `:authority`
//! replaced by `localhost`. Writing the blocks again is what keeps h2's
//! table consistent: if some blocks were passed on as sent, they could
//! name table entries h2 never saw.
//!
//! What is written by hand is the frame layer (nine-byte headers, padding,
//! priority, CONTINUATION), which no crate offers apart from a whole
//! HTTP/2 implementation; it is small and fixed by RFC 9113. Memory per
//! connection is bounded: one header block of at most [`MAX_HEADER_BLOCK`]
//! bytes in at most 32 frames, decoded to at most as many bytes (HPACK
//! lets one byte stand for a whole table entry); other frames stream
//! through without being held. Header frames larger than the 16 KiB h2
//! advertises are refused, as h2 would.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;
use tonic::transport::server::{Connected, UdsConnectInfo};

/// The client connection preface (RFC 9113 section 3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// Largest frame payload written: the smallest SETTINGS_MAX_FRAME_SIZE a
/// peer may have, so any server accepts it.
const MAX_FRAME: usize = 16_384;
/// Largest header block (all its frames) a connection may send, and the
/// most its decoded fields may come to: HPACK can make one byte stand for
/// a whole table entry, so the decoded size is bounded on its own. h2
/// advertises 16 KiB of header list; this leaves room above it.
pub const MAX_HEADER_BLOCK: usize = 64 << 10;
/// Most frames one header block may span (a flood of CONTINUATION frames
/// is refused).
const MAX_BLOCK_FRAMES: usize = 32;
/// HPACK dynamic table size the server side allows (HTTP/2's default;
/// tonic does not advertise another).
const TABLE_SIZE: usize = 4096;
/// What replaces an `:authority` that is not one.
const LOCALHOST: &[u8] = b"localhost";

/// The connections of `listener`, each read through [`AuthorityFix`]: what
/// tonic's `serve_with_incoming` takes for the CSI socket.
pub fn incoming(
    listener: tokio::net::UnixListener,
) -> impl tokio_stream::Stream<Item = io::Result<AuthorityFix>> {
    use tokio_stream::StreamExt;
    tokio_stream::wrappers::UnixListenerStream::new(listener).map(|c| c.map(AuthorityFix::new))
}

/// A unix socket connection whose header blocks are rewritten as the
/// module doc says; writes go to the socket unchanged.
pub struct AuthorityFix {
    inner: UnixStream,
    rewriter: Rewriter,
    /// Bytes read from the socket, not yet rewritten.
    input: Vec<u8>,
    /// Bytes rewritten, not yet handed to the reader.
    output: Vec<u8>,
    output_at: usize,
}

impl AuthorityFix {
    pub fn new(inner: UnixStream) -> Self {
        AuthorityFix {
            inner,
            rewriter: Rewriter::new(),
            input: Vec::new(),
            output: Vec::new(),
            output_at: 0,
        }
    }
}

impl std::fmt::Debug for AuthorityFix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthorityFix")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl Connected for AuthorityFix {
    type ConnectInfo = UdsConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl AsyncRead for AuthorityFix {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.output_at < this.output.len() {
                let n = buf.remaining().min(this.output.len() - this.output_at);
                buf.put_slice(&this.output[this.output_at..this.output_at + n]);
                this.output_at += n;
                if this.output_at == this.output.len() {
                    this.output.clear();
                    this.output_at = 0;
                }
                return Poll::Ready(Ok(()));
            }
            let mut chunk = [0u8; 8192];
            let mut read = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut read))?;
            if read.filled().is_empty() {
                // End of the stream: a frame cut short is passed on as it
                // is, for h2 to see the truncation itself.
                if this.input.is_empty() {
                    return Poll::Ready(Ok(()));
                }
                this.output = std::mem::take(&mut this.input);
                this.output_at = 0;
                continue;
            }
            this.input.extend_from_slice(read.filled());
            let used = this.rewriter.feed(&this.input, &mut this.output)?;
            this.input.drain(..used);
        }
    }
}

impl AsyncWrite for AuthorityFix {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Where the rewriter is in the client's byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Inside the connection preface, this many bytes of it seen.
    Preface(usize),
    /// At a frame header.
    Frame,
    /// Inside the payload of a frame that passes unchanged.
    Passing(usize),
}

/// A header block being gathered from HEADERS and CONTINUATION frames.
struct Block {
    stream: u32,
    end_stream: bool,
    frames: usize,
    /// The five priority bytes of the HEADERS frame, if it had them.
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
}

/// The client-to-server half of an HTTP/2 connection, rewritten.
struct Rewriter {
    state: State,
    block: Option<Block>,
    decoder: loona_hpack::Decoder<'static>,
}

fn invalid(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

impl Rewriter {
    fn new() -> Self {
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(TABLE_SIZE);
        Rewriter {
            state: State::Preface(0),
            block: None,
            decoder,
        }
    }

    /// Rewrites what it can of `input` into `out`; returns how many bytes
    /// of `input` it used (the rest waits for more).
    fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> io::Result<usize> {
        let mut at = 0;
        loop {
            let rest = &input[at..];
            match self.state {
                State::Preface(seen) => {
                    let n = rest.len().min(PREFACE.len() - seen);
                    if n == 0 {
                        return Ok(at);
                    }
                    out.extend_from_slice(&rest[..n]);
                    at += n;
                    self.state = if seen + n == PREFACE.len() {
                        State::Frame
                    } else {
                        State::Preface(seen + n)
                    };
                }
                State::Passing(left) => {
                    let n = rest.len().min(left);
                    if n == 0 {
                        return Ok(at);
                    }
                    out.extend_from_slice(&rest[..n]);
                    at += n;
                    self.state = if n == left {
                        State::Frame
                    } else {
                        State::Passing(left - n)
                    };
                }
                State::Frame => {
                    if rest.len() < FRAME_HEADER {
                        return Ok(at);
                    }
                    let len = usize::from(rest[0]) << 16
                        | usize::from(rest[1]) << 8
                        | usize::from(rest[2]);
                    let (kind, flags) = (rest[3], rest[4]);
                    let stream =
                        u32::from_be_bytes([rest[5], rest[6], rest[7], rest[8]]) & 0x7fff_ffff;
                    let in_block = self.block.is_some();
                    if kind != HEADERS && kind != CONTINUATION && !in_block {
                        out.extend_from_slice(&rest[..FRAME_HEADER]);
                        at += FRAME_HEADER;
                        if len > 0 {
                            self.state = State::Passing(len);
                        }
                        continue;
                    }
                    if len > MAX_FRAME {
                        // Over the SETTINGS_MAX_FRAME_SIZE h2 advertises.
                        return Err(invalid(format!("a {len}-byte header frame")));
                    }
                    if rest.len() < FRAME_HEADER + len {
                        return Ok(at);
                    }
                    let payload = &rest[FRAME_HEADER..FRAME_HEADER + len];
                    self.header_frame(kind, flags, stream, payload, out)?;
                    at += FRAME_HEADER + len;
                }
            }
        }
    }

    /// One HEADERS or CONTINUATION frame (or, inside a block, any frame:
    /// the protocol allows only CONTINUATION there).
    fn header_frame(
        &mut self,
        kind: u8,
        flags: u8,
        stream: u32,
        payload: &[u8],
        out: &mut Vec<u8>,
    ) -> io::Result<()> {
        match (kind, &mut self.block) {
            (HEADERS, None) => {
                let mut p = payload;
                let mut pad = 0;
                if flags & PADDED != 0 {
                    let (&n, tail) = p
                        .split_first()
                        .ok_or_else(|| invalid("HEADERS without its pad length".into()))?;
                    (pad, p) = (usize::from(n), tail);
                }
                let mut priority = None;
                if flags & PRIORITY != 0 {
                    let bytes: [u8; 5] = p
                        .get(..5)
                        .and_then(|b| b.try_into().ok())
                        .ok_or_else(|| invalid("HEADERS shorter than its priority".into()))?;
                    priority = Some(bytes);
                    p = &p[5..];
                }
                let end = p
                    .len()
                    .checked_sub(pad)
                    .ok_or_else(|| invalid("HEADERS padding longer than the frame".into()))?;
                self.block = Some(Block {
                    stream,
                    end_stream: flags & END_STREAM != 0,
                    frames: 1,
                    priority,
                    fragment: p[..end].to_vec(),
                });
            }
            (CONTINUATION, Some(block)) if block.stream == stream => {
                block.frames += 1;
                if block.fragment.len() + payload.len() > MAX_HEADER_BLOCK
                    || block.frames > MAX_BLOCK_FRAMES
                {
                    return Err(invalid(format!(
                        "a header block over {MAX_HEADER_BLOCK} bytes or {MAX_BLOCK_FRAMES} frames"
                    )));
                }
                block.fragment.extend_from_slice(payload);
            }
            _ => {
                return Err(invalid(format!(
                    "frame type {kind} on stream {stream} where a header block's frame belongs"
                )));
            }
        }
        if flags & END_HEADERS == 0 {
            return Ok(());
        }
        let block = self.block.take().expect("a block is being gathered");
        let mut encoded = Vec::with_capacity(block.fragment.len() * 2);
        let mut bad = None;
        let mut too_big = false;
        let decoded = self.decoder.decode_with_cb(&block.fragment, |name, value| {
            if too_big || encoded.len() + name.len() + value.len() > MAX_HEADER_BLOCK {
                too_big = true;
                return;
            }
            let value: &[u8] = if &*name == b":authority" && !valid_authority(&value) {
                bad.get_or_insert_with(|| String::from_utf8_lossy(&value).into_owned());
                LOCALHOST
            } else {
                &value
            };
            literal(&name, value, &mut encoded);
        });
        match decoded {
            // A block of only a table size update is valid HTTP/2; the
            // decoder took the update and there is nothing to write.
            Ok(()) | Err(loona_hpack::decoder::DecoderError::SizeUpdateAtEnd) => {}
            Err(e) => return Err(invalid(format!("undecodable header block: {e:?}"))),
        }
        if too_big {
            return Err(invalid(format!(
                "a header block that decodes to over {MAX_HEADER_BLOCK} bytes"
            )));
        }
        if let Some(bad) = bad {
            tracing::debug!(authority = %bad, "client sent an invalid :authority; served as localhost");
        }
        write_block(&block, &encoded, out);
        Ok(())
    }
}

/// Whether h2 accepts `value` as an `:authority`.
fn valid_authority(value: &[u8]) -> bool {
    http::uri::Authority::try_from(value).is_ok()
}

/// A literal header field without indexing, new name, no Huffman coding
/// (RFC 7541 section 6.2.2): it never changes the decoder's table.
fn literal(name: &[u8], value: &[u8], out: &mut Vec<u8>) {
    out.push(0x00);
    for s in [name, value] {
        loona_hpack::encoder::encode_integer_into(s.len(), 7, 0, out)
            .expect("writing to a Vec cannot fail");
        out.extend_from_slice(s);
    }
}

/// `block`'s rewritten header block as HEADERS and CONTINUATION frames.
fn write_block(block: &Block, encoded: &[u8], out: &mut Vec<u8>) {
    let priority = block.priority.as_ref().map_or(&[][..], |p| &p[..]);
    let first = (MAX_FRAME - priority.len()).min(encoded.len());
    let mut chunks = vec![&encoded[..first]];
    chunks.extend(encoded[first..].chunks(MAX_FRAME));
    let last = chunks.len() - 1;
    for (i, chunk) in chunks.into_iter().enumerate() {
        let (kind, mut flags, extra) = if i == 0 {
            let mut flags = if block.end_stream { END_STREAM } else { 0 };
            if !priority.is_empty() {
                flags |= PRIORITY;
            }
            (HEADERS, flags, priority)
        } else {
            (CONTINUATION, 0, &[][..])
        };
        if i == last {
            flags |= END_HEADERS;
        }
        let len = extra.len() + chunk.len();
        out.extend_from_slice(&(len as u32).to_be_bytes()[1..]);
        out.extend_from_slice(&[kind, flags]);
        out.extend_from_slice(&block.stream.to_be_bytes());
        out.extend_from_slice(extra);
        out.extend_from_slice(chunk);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Encodes headers the way a client might: with Huffman strings and
    /// dynamic table insertions.
    fn client_block(encoder: &mut loona_hpack::Encoder<'_>, headers: &[(&[u8], &[u8])]) -> Vec<u8> {
        encoder.encode(headers.iter().copied())
    }

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        out.extend_from_slice(&[kind, flags]);
        out.extend_from_slice(&stream.to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    /// Feeds `input` in pieces of `step` bytes; returns the rewritten
    /// stream, which must be all of it.
    fn rewrite(input: &[u8], step: usize) -> Vec<u8> {
        let mut r = Rewriter::new();
        let (mut pending, mut out) = (Vec::new(), Vec::new());
        for piece in input.chunks(step) {
            pending.extend_from_slice(piece);
            let used = r.feed(&pending, &mut out).unwrap();
            pending.drain(..used);
        }
        assert!(pending.is_empty(), "{} bytes left", pending.len());
        out
    }

    type Headers = Vec<(Vec<u8>, Vec<u8>)>;

    /// The header blocks of a rewritten stream, decoded with a fresh
    /// decoder as h2 would, and the frames' (type, flags, stream).
    fn decode_all(stream: &[u8]) -> (Vec<Headers>, Vec<(u8, u8, u32)>) {
        assert!(stream.starts_with(PREFACE));
        let mut at = PREFACE.len();
        let mut decoder = loona_hpack::Decoder::new();
        let (mut blocks, mut frames, mut block) = (Vec::new(), Vec::new(), Vec::new());
        while at < stream.len() {
            let len = usize::from(stream[at]) << 16
                | usize::from(stream[at + 1]) << 8
                | usize::from(stream[at + 2]);
            let (kind, flags) = (stream[at + 3], stream[at + 4]);
            let id = u32::from_be_bytes(stream[at + 5..at + 9].try_into().unwrap());
            assert!(len <= MAX_FRAME);
            let mut payload = &stream[at + 9..at + 9 + len];
            frames.push((kind, flags, id));
            if kind == HEADERS && flags & PRIORITY != 0 {
                payload = &payload[5..];
            }
            if kind == HEADERS || kind == CONTINUATION {
                block.extend_from_slice(payload);
                if flags & END_HEADERS != 0 {
                    blocks.push(decoder.decode(&std::mem::take(&mut block)).unwrap());
                }
            }
            at += 9 + len;
        }
        (blocks, frames)
    }

    #[test]
    fn an_invalid_authority_becomes_localhost_and_the_rest_is_unchanged() {
        let mut encoder = loona_hpack::Encoder::new();
        let request: Vec<(&[u8], &[u8])> = vec![
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", b"/csi.v1.Identity/GetPluginInfo"),
            (b":authority", b"tmp%2Fsa%2Fcsi.sock"),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
        ];
        let mut input = PREFACE.to_vec();
        input.extend(frame(0x4, 0, 0, &[0, 3, 0, 0, 0, 100])); // SETTINGS
        input.extend(frame(0x4, 0x1, 0, &[])); // SETTINGS ACK: no payload
        let first = client_block(&mut encoder, &request);
        input.extend(frame(HEADERS, END_HEADERS, 1, &first));
        input.extend(frame(0x0, END_STREAM, 1, b"\0\0\0\0\0")); // DATA
        // The second request names the table entries the first made.
        let second = client_block(&mut encoder, &request);
        assert!(second.len() < first.len(), "the client used its table");
        // Padded, with priority, split over a CONTINUATION.
        let mut padded = vec![4u8];
        padded.extend_from_slice(&[0, 0, 0, 0, 16]);
        padded.extend_from_slice(&second[..3]);
        padded.extend_from_slice(&[0; 4]);
        input.extend(frame(HEADERS, PADDED | PRIORITY | END_STREAM, 3, &padded));
        input.extend(frame(CONTINUATION, END_HEADERS, 3, &second[3..]));
        // A valid authority is kept.
        let third = client_block(
            &mut encoder,
            &[(b":authority", b"localhost:50051"), (b":path", b"/x")],
        );
        input.extend(frame(HEADERS, END_HEADERS, 5, &third));

        for step in [1, 7, 4096] {
            let out = rewrite(&input, step);
            let (blocks, frames) = decode_all(&out);
            assert_eq!(blocks.len(), 3);
            for block in &blocks[..2] {
                let want: Vec<(Vec<u8>, Vec<u8>)> = request
                    .iter()
                    .map(|(n, v)| {
                        let v: &[u8] = if *n == b":authority" { b"localhost" } else { v };
                        (n.to_vec(), v.to_vec())
                    })
                    .collect();
                assert_eq!(block, &want);
            }
            assert_eq!(blocks[2][0].1, b"localhost:50051");
            assert_eq!(
                frames,
                [
                    (0x4, 0, 0),
                    (0x4, 0x1, 0),
                    (HEADERS, END_HEADERS, 1),
                    (0x0, END_STREAM, 1),
                    (HEADERS, END_STREAM | PRIORITY | END_HEADERS, 3),
                    (HEADERS, END_HEADERS, 5),
                ]
            );
        }
    }

    #[test]
    fn large_blocks_are_split_and_oversized_or_broken_ones_refused() {
        let big = vec![b'a'; 40_000];
        let mut encoder = loona_hpack::Encoder::new();
        let block = client_block(&mut encoder, &[(b":path", b"/"), (b"x-big", &big)]);
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, 0, 1, &block[..10_000]));
        input.extend(frame(CONTINUATION, 0, 1, &block[10_000..20_000]));
        input.extend(frame(CONTINUATION, 0, 1, &block[20_000..30_000]));
        input.extend(frame(CONTINUATION, END_HEADERS, 1, &block[30_000..]));
        let out = rewrite(&input, 1000);
        let (blocks, frames) = decode_all(&out);
        assert_eq!(blocks[0][1].1, big);
        assert_eq!(frames.len(), 3, "{frames:?}");

        let mut r = Rewriter::new();
        let mut out = Vec::new();
        let mut huge = PREFACE.to_vec();
        huge.extend_from_slice(&[0xff, 0xff, 0xff, HEADERS, 0, 0, 0, 0, 1]);
        assert!(
            r.feed(&huge, &mut out).is_err(),
            "a header frame over the bound"
        );

        // One byte per field naming a 4000-byte table entry: would decode
        // to about 4000 times its size.
        let mut encoder = loona_hpack::Encoder::new();
        let entry = vec![b'x'; 4000];
        let first = client_block(&mut encoder, &[(b"x-big", &entry)]);
        let mut bomb = PREFACE.to_vec();
        bomb.extend(frame(HEADERS, END_HEADERS, 1, &first));
        bomb.extend(frame(HEADERS, END_HEADERS, 3, &[0xbe; 16_000]));
        let mut out = Vec::new();
        assert!(
            Rewriter::new().feed(&bomb, &mut out).is_err(),
            "a decompression bomb"
        );
        assert!(out.len() < 2 * MAX_HEADER_BLOCK, "{} bytes out", out.len());

        // A flood of empty CONTINUATION frames.
        let mut flood = PREFACE.to_vec();
        flood.extend(frame(HEADERS, 0, 1, &block[..10]));
        for _ in 0..100 {
            flood.extend(frame(CONTINUATION, 0, 1, &[]));
        }
        assert!(Rewriter::new().feed(&flood, &mut Vec::new()).is_err());

        // A block with only a table size update (to 4096: 0x3f 0xe1 0x1f).
        let mut update = PREFACE.to_vec();
        update.extend(frame(HEADERS, END_HEADERS, 1, &[0x3f, 0xe1, 0x1f]));
        let out = rewrite(&update, 3);
        assert_eq!(out[PREFACE.len() + 3], HEADERS);

        let mut r = Rewriter::new();
        let mut wrong = PREFACE.to_vec();
        wrong.extend(frame(HEADERS, 0, 1, &block[..10]));
        wrong.extend(frame(0x0, 0, 1, b"data"));
        assert!(
            r.feed(&wrong, &mut Vec::new()).is_err(),
            "DATA inside a header block"
        );

        let mut r = Rewriter::new();
        let mut garbage = PREFACE.to_vec();
        garbage.extend(frame(HEADERS, END_HEADERS, 1, &[0xff, 0xff, 0xff, 0xff]));
        assert!(
            r.feed(&garbage, &mut Vec::new()).is_err(),
            "undecodable block"
        );
    }

    /// A client that hangs up in the middle of a header frame: what it
    /// sent reaches h2 (which sees the truncation), in reads of any size.
    #[tokio::test]
    async fn a_frame_cut_short_by_the_end_of_the_stream_is_passed_on() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut client, server) = UnixStream::pair().unwrap();
        let mut sent = PREFACE.to_vec();
        sent.extend_from_slice(&[0, 0x3e, 0x80, HEADERS, END_HEADERS, 0, 0, 0, 1]);
        sent.extend_from_slice(&[0x82; 15_000]);
        client.write_all(&sent).await.unwrap();
        drop(client);
        let mut server = AuthorityFix::new(server);
        let mut got = Vec::new();
        let mut buf = [0u8; 100];
        loop {
            let n = server.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, sent);
    }
}
