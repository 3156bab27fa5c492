//! Fixed newstyle negotiation: from the greeting to `NBD_OPT_GO` (or
//! `NBD_OPT_EXPORT_NAME`). Every malformed option gets the error reply the
//! protocol defines and the negotiation goes on; only a wrong magic, unknown
//! client flags or an oversized option end the connection.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};

use super::protocol::*;
use crate::engine::BLOCK_SIZE;
use crate::frontend::{Export, Exports};
use crate::metrics::Metrics;

/// What a successful negotiation agreed on.
#[derive(Debug)]
pub(super) struct Session {
    pub export: Export,
    pub structured: bool,
    pub contexts: Contexts,
}

/// Option payloads up to this size are read and refused when too large;
/// larger ones end the connection (they cannot be skipped cheaply).
const MAX_SKIPPED_OPTION: u32 = 1 << 20;

fn transmission_flags(export: &Export, structured: bool) -> u16 {
    let mut f = TFLAG_HAS_FLAGS
        | TFLAG_SEND_FLUSH
        | TFLAG_SEND_FUA
        | TFLAG_CAN_MULTI_CONN
        | TFLAG_SEND_CACHE;
    if export.read_only() {
        f |= TFLAG_READ_ONLY;
    } else {
        f |= TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES | TFLAG_SEND_FAST_ZERO;
    }
    if structured {
        f |= TFLAG_SEND_DF;
    }
    f
}

async fn open_export(exports: &Exports, name: &str) -> Option<Export> {
    let exports = exports.clone();
    let name = name.to_string();
    match tokio::task::spawn_blocking(move || exports.open(&name)).await {
        Ok(Ok(e)) => e,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "opening an NBD export failed");
            None
        }
        Err(_) => None,
    }
}

/// Runs the negotiation. `Ok(None)`: the client aborted or must be
/// disconnected; `Ok(Some)`: transmission starts.
pub(super) async fn negotiate<S>(
    rd: &mut BufReader<S>,
    exports: &Exports,
    metrics: &Metrics,
) -> std::io::Result<Option<Session>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut out = Replies(Vec::new());
    let result = negotiate_inner(rd, &mut out, exports, metrics).await;
    out.send(rd.get_mut()).await?;
    result
}

/// Replies are gathered and written in one go per negotiation step.
struct Replies(Vec<u8>);

impl Replies {
    fn push(&mut self, b: &[u8]) {
        self.0.extend_from_slice(b);
    }

    async fn send<W: AsyncWrite + Unpin>(&mut self, w: &mut W) -> std::io::Result<()> {
        if !self.0.is_empty() {
            w.write_all(&self.0).await?;
            w.flush().await?;
            self.0.clear();
        }
        Ok(())
    }
}

async fn negotiate_inner<S>(
    rd: &mut BufReader<S>,
    wr: &mut Replies,
    exports: &Exports,
    metrics: &Metrics,
) -> std::io::Result<Option<Session>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    wr.push(&NBD_MAGIC.to_be_bytes());
    wr.push(&IHAVEOPT.to_be_bytes());
    wr.push(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    wr.send(rd.get_mut()).await?;
    let client = rd.read_u32().await?;
    if client & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0
        || client & FLAG_C_FIXED_NEWSTYLE == 0
    {
        metrics.nbd_protocol_error("client_flags");
        return Ok(None);
    }
    let no_zeroes = client & FLAG_C_NO_ZEROES != 0;
    let mut structured = false;
    // The selected contexts, and the export they were selected for: they
    // hold only if the client goes on to that export.
    let mut contexts = Contexts::default();
    let mut contexts_for = String::new();
    loop {
        // Replies to the previous option go out before the next is read.
        wr.send(rd.get_mut()).await?;
        let mut header = [0u8; 16];
        rd.read_exact(&mut header).await?;
        let Ok(opt) = parse_option_header(&header) else {
            metrics.nbd_protocol_error("bad_option_magic");
            return Ok(None);
        };
        if opt.length > MAX_OPTION_LEN {
            metrics.nbd_protocol_error("option_too_large");
            if opt.length > MAX_SKIPPED_OPTION {
                return Ok(None);
            }
            tokio::io::copy(
                &mut (&mut *rd).take(u64::from(opt.length)),
                &mut tokio::io::sink(),
            )
            .await?;
            wr.push(&option_error(
                opt.option,
                REP_ERR_TOO_BIG,
                "option payload too large",
            ));
            continue;
        }
        let mut data = vec![0u8; opt.length as usize];
        rd.read_exact(&mut data).await?;
        let reply = |r: u32, d: &[u8]| option_reply(opt.option, r, d);
        match opt.option {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data).into_owned();
                let Some(export) = open_export(exports, &name).await else {
                    // The protocol has no error reply here: disconnect.
                    metrics.nbd_protocol_error("unknown_export");
                    return Ok(None);
                };
                wr.push(&export.size().to_be_bytes());
                wr.push(&transmission_flags(&export, structured).to_be_bytes());
                if !no_zeroes {
                    wr.push(&[0u8; 124]);
                }
                return Ok(Some(Session {
                    export,
                    structured,
                    contexts: if name == contexts_for {
                        contexts
                    } else {
                        Contexts::default()
                    },
                }));
            }
            OPT_ABORT => {
                wr.push(&reply(REP_ACK, &[]));
                return Ok(None);
            }
            OPT_LIST if !data.is_empty() => {
                metrics.nbd_protocol_error("invalid_option");
                wr.push(&option_error(
                    opt.option,
                    REP_ERR_INVALID,
                    "LIST takes no data",
                ));
            }
            OPT_LIST => {
                let all = exports.clone();
                let listed = tokio::task::spawn_blocking(move || all.list()).await;
                match listed {
                    Ok(Ok(exports)) => {
                        for (name, description) in exports {
                            wr.push(&reply(REP_SERVER, &rep_server(&name, &description)));
                        }
                        wr.push(&reply(REP_ACK, &[]));
                    }
                    _ => {
                        wr.push(&option_error(
                            opt.option,
                            REP_ERR_SHUTDOWN,
                            "cannot list exports",
                        ));
                    }
                }
            }
            OPT_STRUCTURED_REPLY if !data.is_empty() => {
                metrics.nbd_protocol_error("invalid_option");
                wr.push(&option_error(
                    opt.option,
                    REP_ERR_INVALID,
                    "STRUCTURED_REPLY takes no data",
                ));
            }
            OPT_STRUCTURED_REPLY => {
                structured = true;
                wr.push(&reply(REP_ACK, &[]));
            }
            OPT_INFO | OPT_GO => {
                let (name, infos) = match parse_info_request(&data) {
                    Ok(x) => x,
                    Err(InvalidOption(why)) => {
                        metrics.nbd_protocol_error("invalid_option");
                        wr.push(&option_error(opt.option, REP_ERR_INVALID, why));
                        continue;
                    }
                };
                let Some(export) = open_export(exports, &name).await else {
                    metrics.nbd_protocol_error("unknown_export");
                    let msg = format!("no volume or snapshot named {name:?}");
                    wr.push(&option_error(opt.option, REP_ERR_UNKNOWN, &msg));
                    continue;
                };
                let flags = transmission_flags(&export, structured);
                wr.push(&reply(REP_INFO, &info_export(export.size(), flags)));
                wr.push(&reply(
                    REP_INFO,
                    &info_block_size(1, BLOCK_SIZE as u32, MAX_REQUEST),
                ));
                if infos.contains(&INFO_NAME) {
                    wr.push(&reply(REP_INFO, &info_string(INFO_NAME, &name)));
                }
                if infos.contains(&INFO_DESCRIPTION) {
                    let what = match export {
                        Export::Snapshot(_) => "Strata snapshot (read-only)",
                        _ if export.read_only() => "Strata volume (published read-only)",
                        _ => "Strata volume",
                    };
                    wr.push(&reply(REP_INFO, &info_string(INFO_DESCRIPTION, what)));
                }
                wr.push(&reply(REP_ACK, &[]));
                if opt.option == OPT_GO {
                    return Ok(Some(Session {
                        export,
                        structured,
                        contexts: if name == contexts_for {
                            contexts
                        } else {
                            Contexts::default()
                        },
                    }));
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let setting = opt.option == OPT_SET_META_CONTEXT;
                if setting {
                    // A SET replaces the selection, also when it fails.
                    contexts = Contexts::default();
                }
                if setting && !structured {
                    metrics.nbd_protocol_error("invalid_option");
                    let msg = "negotiate NBD_OPT_STRUCTURED_REPLY first";
                    wr.push(&option_error(opt.option, REP_ERR_INVALID, msg));
                    continue;
                }
                let (name, queries) = match parse_meta_context_request(&data) {
                    Ok(x) => x,
                    Err(InvalidOption(why)) => {
                        metrics.nbd_protocol_error("invalid_option");
                        wr.push(&option_error(opt.option, REP_ERR_INVALID, why));
                        continue;
                    }
                };
                let Some(export) = open_export(exports, &name).await else {
                    metrics.nbd_protocol_error("unknown_export");
                    let msg = format!("no volume or snapshot named {name:?}");
                    wr.push(&option_error(opt.option, REP_ERR_UNKNOWN, &msg));
                    continue;
                };
                let mut selected = if queries.is_empty() {
                    // LIST of nothing: everything served.
                    Contexts {
                        allocation: !setting,
                        depth: !setting,
                        dirty: None,
                    }
                } else {
                    queries
                        .iter()
                        .fold(Contexts::default(), |c, q| c.or(query_selects(q, !setting)))
                };
                // A volume of another node: its chain is the owner's.
                selected.depth &= export.has_layers();
                // A bitmap only of an older snapshot of the export's volume
                // (asked of the engine off the async workers).
                if let Some(base) = selected.dirty {
                    let of = export.clone();
                    let check = tokio::task::spawn_blocking(move || of.changed_since(base, 0, 0));
                    if !matches!(check.await, Ok(Ok(_))) {
                        tracing::debug!(export = %name, %base, "no dirty bitmap against that snapshot");
                        selected.dirty = None;
                    }
                }
                if setting {
                    contexts = selected;
                    contexts_for = name;
                }
                for (id, name) in selected.named() {
                    // LIST answers context ID 0: IDs name a selection.
                    let id = if setting { id } else { 0 };
                    wr.push(&reply(REP_META_CONTEXT, &rep_meta_context(id, &name)));
                }
                wr.push(&reply(REP_ACK, &[]));
            }
            OPT_STARTTLS => {
                let msg =
                    "TLS is not offered: NBD is served on a local unix socket or loopback only";
                wr.push(&option_error(opt.option, REP_ERR_POLICY, msg));
            }
            other => {
                metrics.nbd_protocol_error("unknown_option");
                wr.push(&option_error(other, REP_ERR_UNSUP, "option not supported"));
            }
        }
    }
}
