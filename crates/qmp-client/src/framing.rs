//! Cutting the byte stream from a QMP server into messages.
//!
//! QEMU ends each message with a newline, but nothing in the protocol requires it (a
//! monitor with `pretty=on` spreads one message over many lines), so messages are cut
//! where their outermost object closes: a small scanner follows strings, escapes and
//! nesting across reads, and each complete message is then parsed by serde_json. Outside
//! a message only whitespace and the guest agent's `0xFF` delimiter (sent before the reply
//! to `guest-sync-delimited`) may appear.

/// How much room a read gets (at least half of it).
const READ_ROOM: usize = 64 * 1024;

/// Finds complete messages in a growing buffer; keeps its place between reads.
#[derive(Debug, Default)]
pub(crate) struct Framer {
    /// Bytes received and not yet handed out as messages (`buf[..end]`), then room to
    /// read into (initialised once, so reads never clear it again).
    buf: Vec<u8>,
    end: usize,
    /// How far `buf` has been scanned.
    scanned: usize,
    /// Start of the message being scanned, if one has begun.
    start: Option<usize>,
    depth: usize,
    in_string: bool,
    escaped: bool,
}

/// A byte that cannot begin a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StrayByte(pub u8);

impl Framer {
    /// Room to read into; say how much was read with [`Framer::filled`].
    pub(crate) fn space(&mut self) -> &mut [u8] {
        if self.buf.len() - self.end < READ_ROOM / 2 {
            self.buf.resize(self.end + READ_ROOM, 0);
        }
        &mut self.buf[self.end..]
    }

    /// `n` bytes were read into [`Framer::space`].
    pub(crate) fn filled(&mut self, n: usize) {
        self.end += n;
    }

    /// Appends received bytes (for tests).
    #[cfg(test)]
    pub(crate) fn push(&mut self, bytes: &[u8]) {
        self.space()[..bytes.len()].copy_from_slice(bytes);
        self.filled(bytes.len());
    }

    /// Bytes of a message begun and not finished (what EOF would cut off).
    pub(crate) fn partial(&self) -> &[u8] {
        match self.start {
            Some(start) => &self.buf[start..self.end],
            None => &[],
        }
    }

    /// Calls `each` with every complete message received so far, in order.
    pub(crate) fn messages(&mut self, mut each: impl FnMut(&[u8])) -> Result<(), StrayByte> {
        let mut consumed = 0;
        let mut i = self.scanned;
        while i < self.end {
            let byte = self.buf[i];
            match self.start {
                None => match byte {
                    b'{' => {
                        self.start = Some(i);
                        self.depth = 1;
                    }
                    b' ' | b'\t' | b'\r' | b'\n' | 0xff => consumed = i + 1,
                    other => return Err(StrayByte(other)),
                },
                Some(_) if self.in_string => {
                    if self.escaped {
                        self.escaped = false;
                    } else if byte == b'\\' {
                        self.escaped = true;
                    } else if byte == b'"' {
                        self.in_string = false;
                    } else {
                        // Most of a message is strings: skip to the next quote or
                        // backslash at once.
                        match memchr::memchr2(b'"', b'\\', &self.buf[i..self.end]) {
                            Some(skip) => i += skip,
                            None => i = self.end,
                        }
                        continue;
                    }
                }
                Some(start) => match byte {
                    b'"' => self.in_string = true,
                    b'{' | b'[' => self.depth += 1,
                    b'}' | b']' => {
                        self.depth -= 1;
                        if self.depth == 0 {
                            each(&self.buf[start..=i]);
                            self.start = None;
                            consumed = i + 1;
                        }
                    }
                    _ => {}
                },
            }
            i += 1;
        }
        if consumed > 0 {
            self.buf.copy_within(consumed..self.end, 0);
            self.end -= consumed;
        }
        self.scanned = i - consumed;
        if let Some(start) = self.start.as_mut() {
            *start -= consumed;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(framer: &mut Framer, bytes: &[u8]) -> Vec<String> {
        framer.push(bytes);
        let mut out = Vec::new();
        framer
            .messages(|m| out.push(String::from_utf8_lossy(m).into_owned()))
            .expect("no stray byte");
        out
    }

    #[test]
    fn messages_split_across_reads_are_joined() {
        let mut framer = Framer::default();
        assert!(feed(&mut framer, br#"{"return": {"a": "}"#).is_empty());
        assert_eq!(framer.partial(), br#"{"return": {"a": "}"#);
        let got = feed(&mut framer, b"\\\"{\"}}\r\n{\"event\": \"X\"}\n{");
        assert_eq!(got, [r#"{"return": {"a": "}\"{"}}"#, r#"{"event": "X"}"#]);
        assert_eq!(framer.partial(), b"{");
    }

    #[test]
    fn pretty_printed_messages_and_delimiters_are_read() {
        let mut framer = Framer::default();
        let got = feed(&mut framer, b"\xff{\n  \"return\": [\n    1\n  ]\n}\n");
        assert_eq!(got, ["{\n  \"return\": [\n    1\n  ]\n}"]);
        assert!(framer.partial().is_empty());
    }

    #[test]
    fn a_byte_outside_a_message_is_refused() {
        let mut framer = Framer::default();
        framer.push(b"{}x");
        let mut n = 0;
        assert_eq!(framer.messages(|_| n += 1), Err(StrayByte(b'x')));
        assert_eq!(n, 1);
    }
}
