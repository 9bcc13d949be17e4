//! QMP's input: a byte stream cut into JSON messages, in QEMU's JSON dialect.
//!
//! Hand-written rather than built on serde_json, because what is needed is QEMU's behaviour, not
//! RFC 8259's: single-quoted strings and the `\'` escape, modified UTF-8 (`C0 80` is NUL),
//! noncharacters rejected, integers kept as i64/u64 before falling back to doubles, QEMU's
//! per-message limits (token bytes, token count, nesting) and QEMU's exact error texts — and
//! serde_json's stream reader can neither enforce those limits while a message is still
//! arriving nor resynchronise after an error.
//!
//! Input arrives in arbitrary chunks: a message may be split over many chunks and one chunk
//! may hold many messages. Unlike QEMU, which keeps reporting follow-on errors for the rest of
//! a bad message, every bad message yields exactly one error:
//!
//! * after a syntax error or a limit, the rest of the message is lexed but discarded until its
//!   brackets balance;
//! * after a lexical error (a stray byte) inside a message, bytes are skipped up to the next
//!   structural character (`{ } [ ] , :`) or line end, as QEMU does, then discarded until the
//!   brackets balance; after one between messages, up to the next line end, `{` or `[`;
//! * a control character other than tab, CR and LF, or a `0xFE`/`0xFF` byte, is QMP's
//!   documented way to reset the parser: it ends any message in progress (reported as a stray
//!   byte unless the message already had its error) and input is skipped up to the next line
//!   end, `{` or `[`.

use serde_json::{Map, Number, Value};

/// Largest total size of a message's tokens, in bytes (QEMU's `MAX_TOKEN_SIZE`).
pub const MAX_TOKEN_SIZE: usize = 64 << 20;
/// Largest number of tokens in one message (QEMU's `MAX_TOKEN_COUNT`).
pub const MAX_TOKEN_COUNT: usize = 2 << 20;
/// Deepest nesting of arrays and objects in one message (QEMU's `MAX_NESTING`).
pub const MAX_NESTING: usize = 1 << 10;

/// One item cut from the input stream.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// A complete JSON value.
    Value(Value),
    /// A message that could not be parsed, with QEMU's description of why.
    Error(String),
}

/// Where the lexer is inside the current token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lex {
    Start,
    Str { quote: u8 },
    StrEscape { quote: u8 },
    Minus,
    Zero,
    Int,
    FracStart,
    Frac,
    ExpStart,
    ExpSign,
    Exp,
    Keyword,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TokenKind {
    LCurly,
    RCurly,
    LSquare,
    RSquare,
    Colon,
    Comma,
    Str,
    Integer,
    Float,
    Keyword,
}

/// What the stream does with input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Lexing and parsing a message.
    Normal,
    /// The current message had its error: lex it, track its brackets, keep nothing.
    Discard,
    /// After a stray byte: skip raw bytes up to a structural character, or (when
    /// `until_opener`) up to the next `{` or `[`.
    Skip { until_opener: bool },
}

#[derive(Debug)]
enum ObjState {
    /// Right after `{`: a key or `}`.
    KeyOrEnd,
    /// After `,`: a key.
    Key,
    Colon,
    Value,
    CommaOrEnd,
}

#[derive(Debug)]
enum ArrState {
    ValueOrEnd,
    Value,
    CommaOrEnd,
}

#[derive(Debug)]
enum Frame {
    Object {
        map: Map<String, Value>,
        key: Option<String>,
        state: ObjState,
        /// This object is being parsed in a key's position (QEMU parses it, then rejects it).
        as_key: bool,
    },
    Array {
        items: Vec<Value>,
        state: ArrState,
        as_key: bool,
    },
}

/// Result of feeding one token to the parser.
enum Step {
    More,
    Done(Value),
    Fail(String),
}

/// Incremental splitter and parser of a QMP input stream.
#[derive(Debug)]
pub struct JsonStream {
    mode: Mode,
    lex: Lex,
    /// Bytes of the token being lexed (kept only in `Normal` mode).
    token: Vec<u8>,
    /// Open brackets minus closed ones in the current message.
    open: i64,
    /// Tokens and token bytes of the current message so far.
    token_count: usize,
    token_bytes: usize,
    stack: Vec<Frame>,
}

impl Default for JsonStream {
    fn default() -> Self {
        Self::new()
    }
}

fn is_reset_byte(b: u8) -> bool {
    (b < 0x20 && b != b'\t' && b != b'\n' && b != b'\r') || b >= 0xFE
}

fn is_structural(b: u8) -> bool {
    matches!(b, b'{' | b'}' | b'[' | b']' | b',' | b':')
}

fn parse_error(what: impl AsRef<str>) -> String {
    format!("JSON parse error, {}", what.as_ref())
}

impl JsonStream {
    pub fn new() -> Self {
        JsonStream {
            mode: Mode::Normal,
            lex: Lex::Start,
            token: Vec::new(),
            open: 0,
            token_count: 0,
            token_bytes: 0,
            stack: Vec::new(),
        }
    }

    /// Feed a chunk of input; complete messages and errors are appended to `out` in order.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<Message>) {
        let mut i = 0;
        while i < input.len() {
            // Fast path: the body of a string being kept.
            if let Lex::Str { quote } = self.lex {
                let rest = &input[i..];
                let n = rest
                    .iter()
                    .position(|&b| b == quote || b == b'\\' || !(0x20..0xFE).contains(&b))
                    .unwrap_or(rest.len());
                if n > 0 {
                    if self.mode == Mode::Normal {
                        if self.token_bytes + self.token.len() + n + 1 >= MAX_TOKEN_SIZE {
                            self.fail(out, "JSON token size limit exceeded".to_string());
                        } else {
                            self.token.extend_from_slice(&rest[..n]);
                        }
                    }
                    i += n;
                    continue;
                }
            }
            if self.byte(input[i], out) {
                i += 1;
            }
        }
    }

    /// Process one byte; false when the byte must be looked at again (it ended a token).
    fn byte(&mut self, b: u8, out: &mut Vec<Message>) -> bool {
        match self.mode {
            Mode::Skip { until_opener } => {
                if is_reset_byte(b) {
                    self.open = 0;
                    self.mode = Mode::Skip { until_opener: true };
                } else if b == b'\n' || b == b'\r' {
                    // A line end is a resynchronisation point, as in QEMU.
                    self.mode = if self.open > 0 {
                        Mode::Discard
                    } else {
                        self.reset_message();
                        Mode::Normal
                    };
                } else if until_opener {
                    if b == b'{' || b == b'[' {
                        self.reset_message();
                        self.mode = Mode::Normal;
                        return false;
                    }
                } else if is_structural(b) {
                    self.mode = if self.open > 0 {
                        Mode::Discard
                    } else {
                        self.reset_message();
                        Mode::Normal
                    };
                    return false;
                }
                true
            }
            Mode::Normal | Mode::Discard => self.lex_byte(b, out),
        }
    }

    fn lex_byte(&mut self, b: u8, out: &mut Vec<Message>) -> bool {
        use Lex::*;
        let keep = self.mode == Mode::Normal;
        let (next, consumed, emit): (Option<Lex>, bool, Option<TokenKind>) = match self.lex {
            Start => match b {
                b' ' | b'\t' | b'\r' | b'\n' => return true,
                b'{' => (None, true, Some(TokenKind::LCurly)),
                b'}' => (None, true, Some(TokenKind::RCurly)),
                b'[' => (None, true, Some(TokenKind::LSquare)),
                b']' => (None, true, Some(TokenKind::RSquare)),
                b':' => (None, true, Some(TokenKind::Colon)),
                b',' => (None, true, Some(TokenKind::Comma)),
                b'"' | b'\'' => (Some(Str { quote: b }), true, None),
                b'-' => (Some(Minus), true, None),
                b'0' => (Some(Zero), true, None),
                b'1'..=b'9' => (Some(Int), true, None),
                b'a'..=b'z' => (Some(Keyword), true, None),
                _ => return self.stray(b, out),
            },
            Str { quote } => {
                if b == quote {
                    (None, true, Some(TokenKind::Str))
                } else if b == b'\\' {
                    (Some(StrEscape { quote }), true, None)
                } else if (0x20..=0xFD).contains(&b) {
                    (Some(Str { quote }), true, None)
                } else {
                    return self.stray(b, out);
                }
            }
            StrEscape { quote } => {
                if (0x20..=0xFD).contains(&b) {
                    (Some(Str { quote }), true, None)
                } else {
                    return self.stray(b, out);
                }
            }
            Minus => match b {
                b'0' => (Some(Zero), true, None),
                b'1'..=b'9' => (Some(Int), true, None),
                _ => return self.stray(b, out),
            },
            Zero => match b {
                b'0'..=b'9' => return self.stray(b, out),
                b'.' => (Some(FracStart), true, None),
                _ => (None, false, Some(TokenKind::Integer)),
            },
            Int => match b {
                b'0'..=b'9' => (Some(Int), true, None),
                b'.' => (Some(FracStart), true, None),
                b'e' | b'E' => (Some(ExpStart), true, None),
                _ => (None, false, Some(TokenKind::Integer)),
            },
            FracStart => match b {
                b'0'..=b'9' => (Some(Frac), true, None),
                _ => return self.stray(b, out),
            },
            Frac => match b {
                b'0'..=b'9' => (Some(Frac), true, None),
                b'e' | b'E' => (Some(ExpStart), true, None),
                _ => (None, false, Some(TokenKind::Float)),
            },
            ExpStart => match b {
                b'+' | b'-' => (Some(ExpSign), true, None),
                b'0'..=b'9' => (Some(Exp), true, None),
                _ => return self.stray(b, out),
            },
            ExpSign => match b {
                b'0'..=b'9' => (Some(Exp), true, None),
                _ => return self.stray(b, out),
            },
            Exp => match b {
                b'0'..=b'9' => (Some(Exp), true, None),
                _ => (None, false, Some(TokenKind::Float)),
            },
            Keyword => match b {
                b'a'..=b'z' => (Some(Keyword), true, None),
                _ => (None, false, Some(TokenKind::Keyword)),
            },
        };
        if consumed && keep {
            if self.token_bytes + self.token.len() + 1 >= MAX_TOKEN_SIZE {
                self.fail(out, "JSON token size limit exceeded".to_string());
            } else {
                self.token.push(b);
            }
        }
        match emit {
            Some(kind) => {
                self.lex = Start;
                self.token_done(kind, out);
            }
            None => {
                if let Some(next) = next {
                    self.lex = next;
                }
            }
        }
        consumed
    }

    /// A byte no token can contain.
    fn stray(&mut self, b: u8, out: &mut Vec<Message>) -> bool {
        if self.mode == Mode::Normal {
            let mut text = std::mem::take(&mut self.token);
            text.push(b);
            // QEMU formats the token with %s: a NUL byte ends it.
            if let Some(nul) = text.iter().position(|&c| c == 0) {
                text.truncate(nul);
            }
            let text = String::from_utf8_lossy(&text).into_owned();
            out.push(Message::Error(parse_error(format!("stray '{text}'"))));
        }
        self.token.clear();
        self.lex = Lex::Start;
        self.stack.clear();
        // The byte is consumed; a bracket still counts toward the message's balance.
        match b {
            b'{' | b'[' => self.open += 1,
            b'}' | b']' => self.open -= 1,
            _ if is_reset_byte(b) => self.open = 0,
            _ => {}
        }
        self.mode = Mode::Skip {
            until_opener: self.open <= 0,
        };
        true
    }

    /// Report the current message's error and discard the rest of it.
    fn fail(&mut self, out: &mut Vec<Message>, desc: String) {
        out.push(Message::Error(desc));
        self.token.clear();
        self.stack.clear();
        if self.open > 0 || self.lex != Lex::Start {
            self.mode = Mode::Discard;
        } else {
            self.reset_message();
        }
    }

    fn reset_message(&mut self) {
        self.open = 0;
        self.token_count = 0;
        self.token_bytes = 0;
        self.stack.clear();
        // Do not keep a huge token's buffer for the life of the connection.
        if self.token.capacity() > 1 << 20 {
            self.token = Vec::new();
        } else {
            self.token.clear();
        }
    }

    fn token_done(&mut self, kind: TokenKind, out: &mut Vec<Message>) {
        match kind {
            TokenKind::LCurly | TokenKind::LSquare => self.open += 1,
            TokenKind::RCurly | TokenKind::RSquare => self.open -= 1,
            _ => {}
        }
        if self.mode == Mode::Discard {
            if self.open <= 0 {
                self.reset_message();
                self.mode = Mode::Normal;
            }
            return;
        }
        let token = std::mem::take(&mut self.token);
        // QEMU's limits, in QEMU's order.
        let limit = if self.token_bytes + token.len() + 1 > MAX_TOKEN_SIZE {
            Some("JSON token size limit exceeded")
        } else if self.token_count + 1 > MAX_TOKEN_COUNT {
            Some("JSON token count limit exceeded")
        } else if self.open > MAX_NESTING as i64 {
            Some("JSON nesting depth limit exceeded")
        } else {
            None
        };
        if let Some(limit) = limit {
            self.fail(out, limit.to_string());
            return;
        }
        self.token_bytes += token.len();
        self.token_count += 1;
        match self.parse_token(kind, &token) {
            Step::More => {}
            Step::Done(value) => {
                out.push(Message::Value(value));
                self.reset_message();
            }
            Step::Fail(desc) => self.fail(out, desc),
        }
        // Keep the allocation for the next token, unless it is huge.
        if token.capacity() <= 1 << 20 {
            self.token = token;
            self.token.clear();
        }
    }

    /// Feed one token to the incremental parser, mirroring the errors of QEMU's
    /// recursive-descent parser.
    fn parse_token(&mut self, kind: TokenKind, text: &[u8]) -> Step {
        // What the innermost frame expects decides how the token is read.
        enum Want {
            Value,
            ValueOrEnd,
            Key { or_end: bool },
            Colon,
            Sep { object: bool },
        }
        let want = match self.stack.last() {
            None => Want::Value,
            Some(Frame::Object { state, .. }) => match state {
                ObjState::KeyOrEnd => Want::Key { or_end: true },
                ObjState::Key => Want::Key { or_end: false },
                ObjState::Colon => Want::Colon,
                ObjState::Value => Want::Value,
                ObjState::CommaOrEnd => Want::Sep { object: true },
            },
            Some(Frame::Array { state, .. }) => match state {
                ArrState::ValueOrEnd => Want::ValueOrEnd,
                ArrState::Value => Want::Value,
                ArrState::CommaOrEnd => Want::Sep { object: false },
            },
        };
        match want {
            Want::Colon => {
                if kind != TokenKind::Colon {
                    return Step::Fail(parse_error("missing : in object pair"));
                }
                if let Some(Frame::Object { state, .. }) = self.stack.last_mut() {
                    *state = ObjState::Value;
                }
                Step::More
            }
            Want::Sep { object } => {
                let (close, msg) = if object {
                    (TokenKind::RCurly, "expected separator in dict")
                } else {
                    (TokenKind::RSquare, "expected separator in list")
                };
                if kind == close {
                    self.close_container()
                } else if kind == TokenKind::Comma {
                    match self.stack.last_mut() {
                        Some(Frame::Object { state, .. }) => *state = ObjState::Key,
                        Some(Frame::Array { state, .. }) => *state = ArrState::Value,
                        None => {}
                    }
                    Step::More
                } else {
                    Step::Fail(parse_error(msg))
                }
            }
            Want::ValueOrEnd if kind == TokenKind::RSquare => self.close_container(),
            Want::Key { or_end: true } if kind == TokenKind::RCurly => self.close_container(),
            Want::Key { .. } => match kind {
                TokenKind::Str => match decode_string(text) {
                    Ok(key) => {
                        if let Some(Frame::Object {
                            key: slot, state, ..
                        }) = self.stack.last_mut()
                        {
                            *slot = Some(key);
                            *state = ObjState::Colon;
                        }
                        Step::More
                    }
                    Err(e) => Step::Fail(e),
                },
                TokenKind::LCurly | TokenKind::LSquare => self.open_container(kind, true),
                _ => match scalar(kind, text) {
                    Ok(_) => Step::Fail(parse_error("key is not a string in object")),
                    Err(e) => Step::Fail(e),
                },
            },
            Want::Value | Want::ValueOrEnd => match kind {
                TokenKind::LCurly | TokenKind::LSquare => self.open_container(kind, false),
                _ => match scalar(kind, text) {
                    Ok(value) => self.add_value(value),
                    Err(e) => Step::Fail(e),
                },
            },
        }
    }

    fn open_container(&mut self, kind: TokenKind, as_key: bool) -> Step {
        self.stack.push(if kind == TokenKind::LCurly {
            Frame::Object {
                map: Map::new(),
                key: None,
                state: ObjState::KeyOrEnd,
                as_key,
            }
        } else {
            Frame::Array {
                items: Vec::new(),
                state: ArrState::ValueOrEnd,
                as_key,
            }
        });
        Step::More
    }

    fn close_container(&mut self) -> Step {
        let (value, as_key) = match self.stack.pop() {
            Some(Frame::Object { map, as_key, .. }) => (Value::Object(map), as_key),
            Some(Frame::Array { items, as_key, .. }) => (Value::Array(items), as_key),
            None => return Step::Fail(parse_error("expecting value")),
        };
        if as_key {
            return Step::Fail(parse_error("key is not a string in object"));
        }
        self.add_value(value)
    }

    /// A complete value in the innermost frame's value position.
    fn add_value(&mut self, value: Value) -> Step {
        match self.stack.last_mut() {
            None => Step::Done(value),
            Some(Frame::Array { items, state, .. }) => {
                items.push(value);
                *state = ArrState::CommaOrEnd;
                Step::More
            }
            Some(Frame::Object {
                map, key, state, ..
            }) => {
                let Some(key) = key.take() else {
                    return Step::Fail(parse_error("expecting value"));
                };
                if map.contains_key(&key) {
                    return Step::Fail(parse_error("duplicate key"));
                }
                map.insert(key, value);
                *state = ObjState::CommaOrEnd;
                Step::More
            }
        }
    }
}

/// A scalar token as a value, or the parse error QEMU gives for it. Punctuation in a value's
/// position is "expecting value".
fn scalar(kind: TokenKind, text: &[u8]) -> Result<Value, String> {
    match kind {
        TokenKind::Str => decode_string(text).map(Value::String),
        TokenKind::Integer | TokenKind::Float => number(kind, text),
        TokenKind::Keyword => match text {
            b"true" => Ok(Value::Bool(true)),
            b"false" => Ok(Value::Bool(false)),
            b"null" => Ok(Value::Null),
            _ => Err(parse_error(format!(
                "invalid keyword '{}'",
                String::from_utf8_lossy(text)
            ))),
        },
        _ => Err(parse_error("expecting value")),
    }
}

/// QEMU's numbers: an integer is an i64 if it fits, else a u64, else a double.
fn number(kind: TokenKind, text: &[u8]) -> Result<Value, String> {
    // The lexer only lets ASCII digits, signs, '.', 'e' and 'E' through.
    let text = std::str::from_utf8(text).map_err(|_| parse_error("expecting value"))?;
    if kind == TokenKind::Integer {
        if let Ok(i) = text.parse::<i64>() {
            return Ok(Value::Number(i.into()));
        }
        if let Ok(u) = text.parse::<u64>() {
            return Ok(Value::Number(u.into()));
        }
    }
    let f: f64 = text.parse().map_err(|_| parse_error("expecting value"))?;
    // QEMU would carry an infinity and print the invalid JSON `inf`; we refuse the number.
    Number::from_f64(f)
        .map(Value::Number)
        .ok_or_else(|| parse_error(format!("number {text} is out of range")))
}

/// Whether QEMU accepts `cp` as a character: Unicode scalar values except noncharacters.
fn valid_codepoint(cp: u32) -> bool {
    cp <= 0x10FFFF
        && !(0xD800..=0xDFFF).contains(&cp)
        && !(0xFDD0..=0xFDEF).contains(&cp)
        && (cp & 0xFFFE) != 0xFFFE
}

fn hex4(bytes: &[u8]) -> Option<u32> {
    if bytes.len() < 4 {
        return None;
    }
    let mut cp = 0u32;
    for &b in &bytes[..4] {
        cp = (cp << 4) | (b as char).to_digit(16)?;
    }
    Some(cp)
}

/// Decode one modified-UTF-8 character at the start of `bytes`: (code point, length).
fn utf8_char(bytes: &[u8]) -> Option<(u32, usize)> {
    let lead = *bytes.first()?;
    let (len, min, init) = match lead {
        0x00..=0x7F => return Some((u32::from(lead), 1)),
        0xC0..=0xDF => (2, 0x80, u32::from(lead & 0x1F)),
        0xE0..=0xEF => (3, 0x800, u32::from(lead & 0x0F)),
        0xF0..=0xF7 => (4, 0x10000, u32::from(lead & 0x07)),
        _ => return None,
    };
    if bytes.len() < len {
        return None;
    }
    let mut cp = init;
    for &c in &bytes[1..len] {
        if c & 0xC0 != 0x80 {
            return None;
        }
        cp = (cp << 6) | u32::from(c & 0x3F);
    }
    // Modified UTF-8 writes NUL as the overlong C0 80; every other overlong form is invalid.
    if cp < min && !(len == 2 && cp == 0) {
        return None;
    }
    valid_codepoint(cp).then_some((cp, len))
}

/// A string token (with its quotes) to its value, or QEMU's error for it.
fn decode_string(token: &[u8]) -> Result<String, String> {
    let Some((&quote, rest)) = token.split_first() else {
        return Err(parse_error("expecting value"));
    };
    let body = rest.strip_suffix(&[quote]).unwrap_or(rest);
    let mut s = String::with_capacity(body.len());
    let mut i = 0;
    while i < body.len() {
        let b = body[i];
        if b == b'\\' {
            let esc = body.get(i + 1).copied().unwrap_or(0);
            i += 2;
            let c = match esc {
                b'"' => '"',
                b'\'' => '\'',
                b'\\' => '\\',
                b'/' => '/',
                b'b' => '\u{8}',
                b'f' => '\u{c}',
                b'n' => '\n',
                b'r' => '\r',
                b't' => '\t',
                b'u' => {
                    let start = i - 2;
                    // QEMU reads the hex digits from the token text, quote included.
                    let after = &rest[i.min(rest.len())..];
                    let mut cp = hex4(after).map_or(-1i64, i64::from);
                    i += 4;
                    if (0xD800..=0xDBFF).contains(&cp)
                        && body.get(i) == Some(&b'\\')
                        && body.get(i + 1) == Some(&b'u')
                    {
                        let trail = hex4(&rest[(i + 2).min(rest.len())..]);
                        match trail {
                            Some(t) if (0xDC00..=0xDFFF).contains(&t) => {
                                cp = 0x10000 + ((cp & 0x3FF) << 10) + i64::from(t & 0x3FF);
                                i += 6;
                            }
                            _ => cp = -1,
                        }
                    }
                    let ch = u32::try_from(cp)
                        .ok()
                        .filter(|&c| valid_codepoint(c))
                        .and_then(char::from_u32);
                    match ch {
                        Some(c) => c,
                        None => {
                            let end = i.min(rest.len());
                            let mut shown = &rest[start..end];
                            if let Some(nul) = shown.iter().position(|&c| c == 0) {
                                shown = &shown[..nul];
                            }
                            return Err(parse_error(format!(
                                "{} is not a valid Unicode character",
                                String::from_utf8_lossy(shown)
                            )));
                        }
                    }
                }
                _ => return Err(parse_error("invalid escape sequence in string")),
            };
            s.push(c);
        } else {
            match utf8_char(&body[i..]).and_then(|(cp, len)| char::from_u32(cp).map(|c| (c, len))) {
                Some((c, len)) => {
                    s.push(c);
                    i += len;
                }
                None => return Err(parse_error("invalid UTF-8 sequence in string")),
            }
        }
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse_all(input: &[u8]) -> Vec<Message> {
        let mut stream = JsonStream::new();
        let mut out = Vec::new();
        stream.feed(input, &mut out);
        out
    }

    fn err(desc: &str) -> Message {
        Message::Error(desc.to_string())
    }

    #[test]
    fn an_object_split_over_many_chunks_is_one_message() {
        let input = br#"{"execute": "query-version", "id": [1, "two", {"x": null}]}"#;
        let mut stream = JsonStream::new();
        let mut out = Vec::new();
        for b in input.iter() {
            stream.feed(std::slice::from_ref(b), &mut out);
        }
        assert_eq!(
            out,
            vec![Message::Value(
                json!({"execute": "query-version", "id": [1, "two", {"x": null}]})
            )]
        );
    }

    #[test]
    fn several_objects_in_one_chunk_are_separate_messages() {
        let out = parse_all(br#"{"a":1}{"b":2}  {"c":3}"#);
        assert_eq!(
            out,
            vec![
                Message::Value(json!({"a": 1})),
                Message::Value(json!({"b": 2})),
                Message::Value(json!({"c": 3}))
            ]
        );
    }

    #[test]
    fn single_quoted_strings_and_the_apostrophe_escape_are_accepted() {
        let out = parse_all(b"{'a': 'it\\'s \"x\"'}");
        assert_eq!(out, vec![Message::Value(json!({"a": "it's \"x\""}))]);
    }

    #[test]
    fn integers_are_i64_then_u64_then_double() {
        let out = parse_all(b"[-0, 18446744073709551615, 18446744073709551616, 1.5e3]");
        let Message::Value(Value::Array(v)) = &out[0] else {
            panic!("{out:?}")
        };
        assert_eq!(v[0].as_i64(), Some(0));
        assert_eq!(v[1].as_u64(), Some(u64::MAX));
        assert!(v[2].is_f64());
        assert_eq!(v[3].as_f64(), Some(1500.0));
    }

    #[test]
    fn modified_utf8_nul_and_escapes_decode() {
        let out =
            parse_all(b"[\"a\xc0\x80b\", \"\\u0000\", \"\\ud83d\\ude00\", \"\xf0\x9f\x98\x80\"]");
        assert_eq!(
            out,
            vec![Message::Value(json!(["a\u{0}b", "\u{0}", "😀", "😀"]))]
        );
    }

    #[test]
    fn syntax_errors_carry_qemus_texts() {
        let cases: &[(&[u8], &str)] = &[
            (b"{\"execute\": }", "JSON parse error, expecting value"),
            (b"}", "JSON parse error, expecting value"),
            (b"{\"a\":1,}", "JSON parse error, expecting value"),
            (b"{\"a\" 1}", "JSON parse error, missing : in object pair"),
            (
                b"{\"a\":1 \"b\":2}",
                "JSON parse error, expected separator in dict",
            ),
            (b"[1 2]", "JSON parse error, expected separator in list"),
            (b"{1:2}", "JSON parse error, key is not a string in object"),
            (b"{\"a\":1,\"a\":2}", "JSON parse error, duplicate key"),
            (b"[tru]", "JSON parse error, invalid keyword 'tru'"),
            (
                b"[\"\\x\"]",
                "JSON parse error, invalid escape sequence in string",
            ),
            (
                b"[\"\xc3(\"]",
                "JSON parse error, invalid UTF-8 sequence in string",
            ),
            (
                b"[\"\xc0\xaf\"]",
                "JSON parse error, invalid UTF-8 sequence in string",
            ),
            (
                b"[\"\xed\xa0\x80\"]",
                "JSON parse error, invalid UTF-8 sequence in string",
            ),
            (
                b"[\"\\ud800\"]",
                "JSON parse error, \\ud800 is not a valid Unicode character",
            ),
            (
                b"[\"\\ude00\"]",
                "JSON parse error, \\ude00 is not a valid Unicode character",
            ),
            (
                b"[\"\\ufffe\"]",
                "JSON parse error, \\ufffe is not a valid Unicode character",
            ),
            (
                b"[\"\\u12g4\"]",
                "JSON parse error, \\u12g4 is not a valid Unicode character",
            ),
            (
                b"[\"\\ud83d\\u0041\"]",
                "JSON parse error, \\ud83d is not a valid Unicode character",
            ),
            (
                b"[\"\\u12\"]",
                "JSON parse error, \\u12\" is not a valid Unicode character",
            ),
            (
                b"[\"\xef\xbf\xbe\"]",
                "JSON parse error, invalid UTF-8 sequence in string",
            ),
            (
                b"[\"\xef\xb7\x90\"]",
                "JSON parse error, invalid UTF-8 sequence in string",
            ),
            (b"[0e5]", "JSON parse error, expected separator in list"),
        ];
        for (input, desc) in cases {
            assert_eq!(
                parse_all(input),
                vec![err(desc)],
                "input {:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn stray_bytes_are_reported_with_the_token_so_far() {
        let cases: &[(&[u8], &str)] = &[
            (b"@", "JSON parse error, stray '@'"),
            (b"[01]", "JSON parse error, stray '01'"),
            (b"-a", "JSON parse error, stray '-a'"),
            (b"1.e5", "JSON parse error, stray '1.e'"),
            (b"[1.]", "JSON parse error, stray '1.]'"),
            (b"True", "JSON parse error, stray 'T'"),
            (b"{\"id\":%d}", "JSON parse error, stray '%'"),
            (b"\x01", "JSON parse error, stray '\u{1}'"),
            (b"\x00", "JSON parse error, stray ''"),
            (b"\xff", "JSON parse error, stray '\u{fffd}'"),
            (b"{\"id\":\"a\x01b\"}", "JSON parse error, stray '\"a\u{1}'"),
            (b"{\"id\":\"a\nb\"}", "JSON parse error, stray '\"a\n'"),
        ];
        for (input, desc) in cases {
            assert_eq!(
                parse_all(input),
                vec![err(desc)],
                "input {:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn a_bad_message_gets_one_error_and_the_next_message_parses() {
        let inputs: &[&[u8]] = &[
            b"{\"id\":01}{\"ok\":1}",
            b"{\"id\":\"a\x01b\"}\n{\"ok\":1}",
            b"{\"id\":\"a\tb\"}\n{\"ok\":1}",
            b"@ x, \"y\": 1 {\"ok\":1}",
            b"{\"execute\":\x1b{\"ok\":1}",
            b"{\"a\" 1, \"b\": [1, {\"c\": 2}]}{\"ok\":1}",
            b"{\"a\":1]{\"ok\":1}",
        ];
        for input in inputs {
            let out = parse_all(input);
            assert_eq!(
                out.len(),
                2,
                "input {:?}: {out:?}",
                String::from_utf8_lossy(input)
            );
            assert!(matches!(out[0], Message::Error(_)));
            assert_eq!(out[1], Message::Value(json!({"ok": 1})));
        }
    }

    #[test]
    fn nesting_up_to_the_limit_is_accepted() {
        let depth = MAX_NESTING;
        let input = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        let out = parse_all(input.as_bytes());
        assert!(matches!(out.as_slice(), [Message::Value(_)]), "{out:?}");
    }

    #[test]
    fn nesting_beyond_the_limit_is_one_error() {
        let depth = MAX_NESTING + 1;
        let input = format!("{}{}{{\"ok\":1}}", "[".repeat(depth), "]".repeat(depth));
        let out = parse_all(input.as_bytes());
        assert_eq!(
            out,
            vec![
                err("JSON nesting depth limit exceeded"),
                Message::Value(json!({"ok": 1}))
            ]
        );
    }

    #[test]
    fn too_many_tokens_is_one_error() {
        // `[` + k zeros + (k-1) commas + `]` = 2k + 1 tokens.
        let k = MAX_TOKEN_COUNT / 2;
        let mut input = b"[".to_vec();
        input.extend(std::iter::repeat_n(b"0,".as_slice(), k - 1).flatten());
        input.extend_from_slice(b"0]{\"ok\":1}");
        let out = parse_all(&input);
        assert_eq!(
            out,
            vec![
                err("JSON token count limit exceeded"),
                Message::Value(json!({"ok": 1}))
            ]
        );
    }

    #[test]
    fn tokens_at_the_count_limit_are_accepted() {
        let k = MAX_TOKEN_COUNT / 2 - 1;
        let mut input = b"[".to_vec();
        input.extend(std::iter::repeat_n(b"0,".as_slice(), k - 1).flatten());
        input.extend_from_slice(b"0]");
        let out = parse_all(&input);
        assert!(matches!(out.as_slice(), [Message::Value(_)]));
    }

    #[test]
    fn an_oversized_string_is_one_error() {
        let mut input = b"{\"id\": \"".to_vec();
        input.resize(input.len() + MAX_TOKEN_SIZE, b'a');
        input.extend_from_slice(b"\"}{\"ok\":1}");
        let mut stream = JsonStream::new();
        let mut out = Vec::new();
        for chunk in input.chunks(65536) {
            stream.feed(chunk, &mut out);
        }
        assert_eq!(
            out,
            vec![
                err("JSON token size limit exceeded"),
                Message::Value(json!({"ok": 1}))
            ]
        );
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut seed = 0x2545_F491_4F6C_DD1Du64;
        let mut stream = JsonStream::new();
        let mut out = Vec::new();
        for _ in 0..2000 {
            let mut chunk = Vec::new();
            for _ in 0..64 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                // Bias toward JSON punctuation so the parser gets deep into its states.
                let alphabet = b"{}[]:,\"'\\u0123456789abcdef-+.eE tnrl\x01\xff\xc3\xa9";
                let pick = (seed % (alphabet.len() as u64 + 8)) as usize;
                chunk.push(if pick < alphabet.len() {
                    alphabet[pick]
                } else {
                    seed as u8
                });
            }
            stream.feed(&chunk, &mut out);
        }
        out.clear();
        stream.feed(b"\x1b{\"ok\":1}", &mut out);
        assert_eq!(out.last(), Some(&Message::Value(json!({"ok": 1}))));
    }
}
