//! Everything an NBD client can send, through the server's parsers and
//! request validation: option headers and payloads (INFO/GO, meta
//! contexts) and transmission requests checked against arbitrary export
//! limits. The property: no input panics, and every accepted request lies
//! inside the export.

#![no_main]

use libfuzzer_sys::fuzz_target;
use strata::frontend::nbd::protocol::*;

fuzz_target!(|data: &[u8]| {
    if data.len() < 12 {
        return;
    }
    let (head, rest) = data.split_at(12);
    let limits = ExportLimits {
        size: u64::from_be_bytes(head[0..8].try_into().unwrap()) >> (head[8] % 64),
        read_only: head[9] & 1 != 0,
        structured: head[9] & 2 != 0,
        meta_context: head[9] & 4 != 0,
    };
    let _ = parse_info_request(rest);
    let _ = parse_meta_context_request(rest);
    if let Ok(b) = <&[u8; 16]>::try_from(&rest[..rest.len().min(16)]) {
        let _ = parse_option_header(b);
    }
    for chunk in rest.chunks_exact(REQUEST_LEN) {
        let Ok(req) = parse_request(chunk.try_into().unwrap()) else { continue };
        match validate(&req, &limits) {
            Ok(Command::Read { offset, length })
            | Ok(Command::Write { offset, length, .. })
            | Ok(Command::Trim { offset, length, .. })
            | Ok(Command::WriteZeroes { offset, length, .. })
            | Ok(Command::BlockStatus { offset, length, .. })
            | Ok(Command::Cache { offset, length }) => {
                assert!(offset.checked_add(u64::from(length)).is_some_and(|end| end <= limits.size));
                assert!(length <= MAX_REQUEST || matches!(req.kind, CMD_TRIM | CMD_WRITE_ZEROES | CMD_BLOCK_STATUS | CMD_CACHE));
            }
            Ok(Command::Flush) | Ok(Command::Disconnect) => {}
            Err(r) => assert!(r.error != 0),
        }
    }
});
