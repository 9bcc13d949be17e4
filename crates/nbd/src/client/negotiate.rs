//! The client side of the fixed newstyle handshake: options one at a time, each reply read to
//! its end (ACK or an error), until GO (or EXPORT_NAME on servers without GO) enters
//! transmission.

use std::io;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{ClientError, ExportInfo, ServerAddr, Stream};
use crate::wire;

/// A connection in option haggling. Ask what the server offers ([`Negotiation::list_exports`],
/// [`Negotiation::info`], [`Negotiation::list_meta_contexts`]), choose
/// ([`Negotiation::structured_replies`], [`Negotiation::set_meta_contexts`]), then enter
/// transmission on an export with [`Negotiation::go`].
pub struct Negotiation {
    pub(super) stream: Stream,
    no_zeroes: bool,
    structured: bool,
    /// The contexts the last SET_META_CONTEXT selected, and on which export.
    selected: Option<(String, Vec<(u32, String)>)>,
}

/// One option reply: its type and data.
struct OptionReply {
    kind: u32,
    data: Vec<u8>,
}

/// Option reply data longer than this is refused (the server's answers are names and a few
/// numbers).
const MAX_REPLY_DATA: u32 = 64 * 1024;

impl Negotiation {
    /// Connects and reads the greeting; refuses servers without the fixed newstyle handshake.
    pub async fn connect(addr: &ServerAddr) -> Result<Negotiation, ClientError> {
        let mut stream = Stream::connect(addr).await.map_err(ClientError::Connect)?;
        let magic = stream.read_u64().await.map_err(ClientError::Connect)?;
        let style = stream.read_u64().await.map_err(ClientError::Connect)?;
        if magic != wire::NBDMAGIC || style != wire::IHAVEOPT {
            return Err(ClientError::Protocol(
                "not an NBD server with the newstyle handshake".into(),
            ));
        }
        let flags = stream.read_u16().await.map_err(ClientError::Connect)?;
        if flags & wire::FLAG_FIXED_NEWSTYLE == 0 {
            return Err(ClientError::Protocol(
                "the server does not offer the fixed newstyle handshake".into(),
            ));
        }
        let no_zeroes = flags & wire::FLAG_NO_ZEROES != 0;
        let mut client_flags = wire::FLAG_C_FIXED_NEWSTYLE;
        if no_zeroes {
            client_flags |= wire::FLAG_C_NO_ZEROES;
        }
        stream
            .write_u32(client_flags)
            .await
            .map_err(ClientError::Connect)?;
        Ok(Negotiation {
            stream,
            no_zeroes,
            structured: false,
            selected: None,
        })
    }

    /// Sends one option and reads its replies up to the final one; an error reply becomes
    /// [`ClientError::Refused`].
    async fn option(&mut self, option: u32, data: &[u8]) -> Result<Vec<OptionReply>, ClientError> {
        let mut request = Vec::with_capacity(16 + data.len());
        request.extend_from_slice(&wire::IHAVEOPT.to_be_bytes());
        request.extend_from_slice(&option.to_be_bytes());
        request.extend_from_slice(&length_u32(data.len())?.to_be_bytes());
        request.extend_from_slice(data);
        self.stream.write_all(&request).await.map_err(lost)?;
        let mut replies = Vec::new();
        loop {
            let magic = self.stream.read_u64().await.map_err(lost)?;
            let answered = self.stream.read_u32().await.map_err(lost)?;
            let kind = self.stream.read_u32().await.map_err(lost)?;
            let length = self.stream.read_u32().await.map_err(lost)?;
            if magic != wire::OPTION_REPLY_MAGIC || answered != option {
                return Err(ClientError::Protocol(format!(
                    "bad reply to option {option} (magic {magic:#x}, option {answered})"
                )));
            }
            if length > MAX_REPLY_DATA {
                return Err(ClientError::Protocol(format!(
                    "option reply of {length} bytes"
                )));
            }
            let mut data = vec![0u8; length as usize];
            self.stream.read_exact(&mut data).await.map_err(lost)?;
            if kind & wire::REP_FLAG_ERROR != 0 {
                return Err(ClientError::Refused {
                    option,
                    reply: kind,
                    message: String::from_utf8_lossy(&data).into_owned(),
                });
            }
            if kind == wire::REP_ACK {
                return Ok(replies);
            }
            replies.push(OptionReply { kind, data });
        }
    }

    /// `NBD_OPT_STRUCTURED_REPLY`: true if the server agreed (then READ answers come in chunks
    /// and BLOCK_STATUS is possible); false if it does not know the option.
    pub async fn structured_replies(&mut self) -> Result<bool, ClientError> {
        if self.structured {
            return Ok(true);
        }
        match self.option(wire::OPT_STRUCTURED_REPLY, &[]).await {
            Ok(_) => self.structured = true,
            Err(ClientError::Refused { reply, .. }) if reply == wire::REP_ERR_UNSUP => {}
            Err(error) => return Err(error),
        }
        Ok(self.structured)
    }

    /// `NBD_OPT_LIST`: the export names and descriptions.
    pub async fn list_exports(&mut self) -> Result<Vec<(String, String)>, ClientError> {
        let replies = self.option(wire::OPT_LIST, &[]).await?;
        let mut exports = Vec::new();
        for reply in replies.iter().filter(|r| r.kind == wire::REP_SERVER) {
            let (name, rest) = take_string(&reply.data)
                .ok_or_else(|| ClientError::Protocol("malformed NBD_REP_SERVER".into()))?;
            exports.push((name, String::from_utf8_lossy(rest).into_owned()));
        }
        Ok(exports)
    }

    /// `NBD_OPT_LIST_META_CONTEXT`: the contexts of `export` the queries match (no query: all).
    pub async fn list_meta_contexts(
        &mut self,
        export: &str,
        queries: &[&str],
    ) -> Result<Vec<String>, ClientError> {
        let data = meta_request(export, queries)?;
        let replies = self.option(wire::OPT_LIST_META_CONTEXT, &data).await?;
        Ok(contexts_of(&replies)?
            .into_iter()
            .map(|(_, name)| name)
            .collect())
    }

    /// `NBD_OPT_SET_META_CONTEXT`: selects the contexts for a later [`Negotiation::go`] on
    /// `export`; returns those the server knows (a name it does not know is left out).
    /// Needs structured replies, which it negotiates first.
    pub async fn set_meta_contexts(
        &mut self,
        export: &str,
        names: &[&str],
    ) -> Result<Vec<String>, ClientError> {
        if !self.structured_replies().await? {
            return Err(ClientError::Protocol(
                "the server has no structured replies, so no metadata contexts".into(),
            ));
        }
        let data = meta_request(export, names)?;
        let replies = self.option(wire::OPT_SET_META_CONTEXT, &data).await?;
        let contexts = contexts_of(&replies)?;
        let names = contexts.iter().map(|(_, name)| name.clone()).collect();
        self.selected = Some((export.to_owned(), contexts));
        Ok(names)
    }

    /// `NBD_OPT_INFO`: what [`Negotiation::go`] would report, staying in negotiation.
    pub async fn info(&mut self, export: &str) -> Result<ExportInfo, ClientError> {
        let replies = self.option(wire::OPT_INFO, &info_request(export)?).await?;
        self.export_info(export, &replies)
    }

    /// `NBD_OPT_GO` (or `NBD_OPT_EXPORT_NAME` on servers without it): enters transmission on
    /// `export`.
    pub async fn go(mut self, export: &str) -> Result<(Stream, ExportInfo), ClientError> {
        match self.option(wire::OPT_GO, &info_request(export)?).await {
            Ok(replies) => {
                let info = self.export_info(export, &replies)?;
                Ok((self.stream, info))
            }
            Err(ClientError::Refused { reply, .. }) if reply == wire::REP_ERR_UNSUP => {
                self.export_name(export).await
            }
            Err(error) => Err(error),
        }
    }

    /// The old way in: no error reply is possible, the server hangs up on an unknown name.
    async fn export_name(mut self, export: &str) -> Result<(Stream, ExportInfo), ClientError> {
        let mut request = Vec::with_capacity(16 + export.len());
        request.extend_from_slice(&wire::IHAVEOPT.to_be_bytes());
        request.extend_from_slice(&wire::OPT_EXPORT_NAME.to_be_bytes());
        request.extend_from_slice(&length_u32(export.len())?.to_be_bytes());
        request.extend_from_slice(export.as_bytes());
        self.stream.write_all(&request).await.map_err(lost)?;
        let refused = |_| ClientError::Refused {
            option: wire::OPT_EXPORT_NAME,
            reply: wire::REP_ERR_UNKNOWN,
            message: format!("export '{export}' not present"),
        };
        let size = self.stream.read_u64().await.map_err(refused)?;
        let flags = self.stream.read_u16().await.map_err(refused)?;
        if !self.no_zeroes {
            let mut zeroes = [0u8; 124];
            self.stream.read_exact(&mut zeroes).await.map_err(lost)?;
        }
        let info = ExportInfo {
            name: export.to_owned(),
            size,
            flags,
            block_size: None,
            structured: self.structured,
            contexts: self.contexts_for(export),
        };
        Ok((self.stream, info))
    }

    fn contexts_for(&self, export: &str) -> Vec<(u32, String)> {
        match &self.selected {
            Some((selected, contexts)) if selected == export => contexts.clone(),
            _ => Vec::new(),
        }
    }

    fn export_info(
        &self,
        export: &str,
        replies: &[OptionReply],
    ) -> Result<ExportInfo, ClientError> {
        let mut size_flags = None;
        let mut block_size = None;
        for reply in replies.iter().filter(|r| r.kind == wire::REP_INFO) {
            let data = &reply.data;
            let kind = data.get(0..2).map(|b| u16::from_be_bytes([b[0], b[1]]));
            match kind {
                Some(wire::INFO_EXPORT) if data.len() == 12 => {
                    let size = u64::from_be_bytes(data[2..10].try_into().unwrap_or_default());
                    let flags = u16::from_be_bytes([data[10], data[11]]);
                    size_flags = Some((size, flags));
                }
                Some(wire::INFO_BLOCK_SIZE) if data.len() == 14 => {
                    let word = |at: usize| {
                        u32::from_be_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]])
                    };
                    block_size = Some((word(2), word(6), word(10)));
                }
                // Other information (name, description) is not needed.
                _ => {}
            }
        }
        let (size, flags) = size_flags
            .ok_or_else(|| ClientError::Protocol("no NBD_INFO_EXPORT in the reply".into()))?;
        Ok(ExportInfo {
            name: export.to_owned(),
            size,
            flags,
            block_size,
            structured: self.structured,
            contexts: self.contexts_for(export),
        })
    }

    /// `NBD_OPT_ABORT`, then the connection closes.
    pub async fn abort(mut self) -> Result<(), ClientError> {
        let mut request = Vec::with_capacity(16);
        request.extend_from_slice(&wire::IHAVEOPT.to_be_bytes());
        request.extend_from_slice(&wire::OPT_ABORT.to_be_bytes());
        request.extend_from_slice(&0u32.to_be_bytes());
        self.stream.write_all(&request).await.map_err(lost)?;
        // The server may hang up without its ACK, which the protocol allows.
        let _ = self.stream.shutdown().await;
        Ok(())
    }
}

fn lost(error: io::Error) -> ClientError {
    ClientError::Disconnected(error.to_string())
}

fn length_u32(len: usize) -> Result<u32, ClientError> {
    u32::try_from(len)
        .ok()
        .filter(|&len| len as usize <= wire::MAX_STRING * 16)
        .ok_or_else(|| ClientError::InvalidRequest("option data too long".into()))
}

/// The data of `NBD_OPT_INFO` / `NBD_OPT_GO`: the name, and a request for block sizes.
fn info_request(export: &str) -> Result<Vec<u8>, ClientError> {
    if export.len() > wire::MAX_STRING {
        return Err(ClientError::InvalidRequest(
            "export name longer than 4096 bytes".into(),
        ));
    }
    let mut data = Vec::with_capacity(8 + export.len());
    data.extend_from_slice(&length_u32(export.len())?.to_be_bytes());
    data.extend_from_slice(export.as_bytes());
    data.extend_from_slice(&1u16.to_be_bytes());
    data.extend_from_slice(&wire::INFO_BLOCK_SIZE.to_be_bytes());
    Ok(data)
}

/// The data of `NBD_OPT_{LIST,SET}_META_CONTEXT`.
fn meta_request(export: &str, queries: &[&str]) -> Result<Vec<u8>, ClientError> {
    let too_long = std::iter::once(&export)
        .chain(queries)
        .any(|text| text.len() > wire::MAX_STRING);
    if too_long {
        return Err(ClientError::InvalidRequest(
            "export or context name longer than 4096 bytes".into(),
        ));
    }
    let mut data = Vec::new();
    data.extend_from_slice(&length_u32(export.len())?.to_be_bytes());
    data.extend_from_slice(export.as_bytes());
    data.extend_from_slice(&length_u32(queries.len())?.to_be_bytes());
    for query in queries {
        data.extend_from_slice(&length_u32(query.len())?.to_be_bytes());
        data.extend_from_slice(query.as_bytes());
    }
    length_u32(data.len())?;
    Ok(data)
}

/// The `NBD_REP_META_CONTEXT` replies: (id, name).
fn contexts_of(replies: &[OptionReply]) -> Result<Vec<(u32, String)>, ClientError> {
    replies
        .iter()
        .filter(|r| r.kind == wire::REP_META_CONTEXT)
        .map(|r| {
            let id = r
                .data
                .get(0..4)
                .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
                .ok_or_else(|| ClientError::Protocol("malformed NBD_REP_META_CONTEXT".into()))?;
            Ok((id, String::from_utf8_lossy(&r.data[4..]).into_owned()))
        })
        .collect()
}

/// A string prefixed by its 32-bit length, and what follows.
fn take_string(data: &[u8]) -> Option<(String, &[u8])> {
    let len = u32::from_be_bytes(data.get(0..4)?.try_into().ok()?) as usize;
    let text = data.get(4..4usize.checked_add(len)?)?;
    Some((String::from_utf8_lossy(text).into_owned(), &data[4 + len..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_request_asks_for_block_sizes() {
        assert_eq!(
            info_request("ab").unwrap(),
            [0, 0, 0, 2, b'a', b'b', 0, 1, 0, 3]
        );
    }

    #[test]
    fn meta_request_lists_export_then_counted_queries() {
        assert_eq!(
            meta_request("d", &["x:"]).unwrap(),
            [0, 0, 0, 1, b'd', 0, 0, 0, 1, 0, 0, 0, 2, b'x', b':']
        );
    }

    #[test]
    fn a_server_reply_string_past_its_data_is_malformed() {
        assert!(take_string(&[0, 0, 0, 9, b'a']).is_none());
        assert_eq!(
            take_string(&[0, 0, 0, 1, b'a', b'd']),
            Some(("a".to_string(), &b"d"[..]))
        );
    }
}
