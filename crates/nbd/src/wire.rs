//! The NBD protocol's numbers (magics, options, replies, flags, commands, errors) and limits,
//! as the NBD project's `doc/proto.md` defines them. All integers travel big-endian.

use std::io;

/// `NBDMAGIC`: first word of the server's greeting.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: second word of the greeting, and the first word of every option request.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// First word of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// First word of every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// First word of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// First word of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flags (server → client).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flags (client → server).
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

/// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_FLAG_ERROR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
pub const REP_ERR_PLATFORM: u32 = REP_FLAG_ERROR | 4;
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR | 7;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_FLAG_ERROR | 8;
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;

/// Information types of `NBD_REP_INFO`.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flags.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const FLAG_READ_ONLY: u16 = 1 << 1;
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const FLAG_SEND_FUA: u16 = 1 << 3;
pub const FLAG_ROTATIONAL: u16 = 1 << 4;
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const FLAG_SEND_DF: u16 = 1 << 7;
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const FLAG_SEND_CACHE: u16 = 1 << 10;
pub const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

/// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

/// Structured reply chunk flags and types.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) + 2;

/// The metadata context every export has, its id (QEMU's), and its extent flags.
pub const BASE_ALLOCATION: &str = "base:allocation";
pub const BASE_ALLOCATION_ID: u32 = 0;
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;
/// QEMU's contexts (`docs/interop/nbd.rst`): allocation depth, and dirty bitmaps (bit 0 set:
/// dirty).
pub const ALLOCATION_DEPTH: &str = "qemu:allocation-depth";
pub const DIRTY_BITMAP_PREFIX: &str = "qemu:dirty-bitmap:";
pub const STATE_DIRTY: u32 = 1 << 0;

/// Error values of replies (the protocol fixes these numbers; they match Linux's errno).
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// Largest READ or WRITE payload served (QEMU's limit as well).
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;
/// Longest string (export name, description) the protocol allows.
pub const MAX_STRING: usize = 4096;
/// Largest option data read into memory; longer options are skipped and refused.
pub const MAX_OPTION_DATA: u32 = 64 * 1024;
/// Option data longer than this is not even skipped: the client is disconnected (QEMU's limit).
pub const MAX_OPTION_SKIP: u32 = MAX_PAYLOAD;
/// Most options one handshake may send before the server gives up on the client: far more
/// than any real client needs (`nbdinfo --list` sends two per export), few enough that an
/// option haggling loop ends even without a handshake timeout.
pub const MAX_OPTIONS: usize = 65536;
/// Most extents sent in one BLOCK_STATUS chunk (QEMU's limit: 1 MiB of extents).
pub const MAX_EXTENTS: usize = 1024 * 1024 / 8;
/// Most requests of one connection executed at once (QEMU's `MAX_NBD_REQUESTS`); the server
/// reads no further request until one of them is answered.
pub const MAX_REQUESTS_IN_FLIGHT: usize = 16;
/// Block sizes advertised with `NBD_INFO_BLOCK_SIZE`: any byte alignment works, 4 KiB is best.
pub const MIN_BLOCK: u32 = 1;
pub const PREFERRED_BLOCK: u32 = 4096;

/// Size in bytes of a transmission request header.
pub const REQUEST_LEN: usize = 28;
/// Size in bytes of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Size in bytes of a structured reply chunk header.
pub const CHUNK_HEADER_LEN: usize = 20;

/// The I/O error a reply's error value stands for (the client side of [`errno_of`]): the
/// protocol's values are Linux's errno numbers; an unknown one counts as `EINVAL`, as the
/// protocol asks.
pub fn error_of(errno: u32) -> io::Error {
    let known = [
        EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN,
    ];
    let errno = if known.contains(&errno) {
        errno
    } else {
        EINVAL
    };
    io::Error::from_raw_os_error(errno as i32)
}

/// The protocol error value for an I/O error of an export backend: an OS error as QEMU's
/// `system_errno_to_nbd_errno` maps it (`EPERM`/`EROFS`, `EIO`, `ENOMEM`, `ENOSPC`/`EDQUOT`/
/// `EFBIG`, `EOVERFLOW`, `ENOTSUP`, `ESHUTDOWN`; anything else, `EACCES` included, is
/// `EINVAL`), other errors by kind.
pub fn errno_of(error: &io::Error) -> u32 {
    if let Some(errno) = error.raw_os_error() {
        return match errno {
            1 | 30 => EPERM,         // EPERM, EROFS
            5 => EIO,                // EIO
            12 => ENOMEM,            // ENOMEM
            27 | 28 | 122 => ENOSPC, // EFBIG, ENOSPC, EDQUOT
            75 => EOVERFLOW,         // EOVERFLOW
            95 => ENOTSUP,           // EOPNOTSUPP (= ENOTSUP on Linux)
            108 => ESHUTDOWN,        // ESHUTDOWN
            _ => EINVAL,
        };
    }
    match error.kind() {
        io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem => EPERM,
        io::ErrorKind::OutOfMemory => ENOMEM,
        io::ErrorKind::InvalidInput => EINVAL,
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded => ENOSPC,
        io::ErrorKind::FileTooLarge => EOVERFLOW,
        io::ErrorKind::Unsupported => ENOTSUP,
        _ => EIO,
    }
}

/// A transmission request header, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

impl Request {
    /// Decodes a request header; `None` when the magic is wrong (the stream is out of sync).
    pub fn decode(bytes: &[u8; REQUEST_LEN]) -> Option<Request> {
        let (magic, rest) = bytes.split_at(4);
        if u32::from_be_bytes(magic.try_into().ok()?) != REQUEST_MAGIC {
            return None;
        }
        Some(Request {
            flags: u16::from_be_bytes(rest[0..2].try_into().ok()?),
            command: u16::from_be_bytes(rest[2..4].try_into().ok()?),
            cookie: u64::from_be_bytes(rest[4..12].try_into().ok()?),
            offset: u64::from_be_bytes(rest[12..20].try_into().ok()?),
            length: u32::from_be_bytes(rest[20..24].try_into().ok()?),
        })
    }
}

/// Writes a simple reply header into the first [`SIMPLE_REPLY_LEN`] bytes of `out`.
pub fn encode_simple_reply(out: &mut [u8], error: u32, cookie: u64) {
    out[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
}

/// Writes a structured reply chunk header into the first [`CHUNK_HEADER_LEN`] bytes of `out`.
pub fn encode_chunk_header(out: &mut [u8], flags: u16, kind: u16, cookie: u64, payload_len: u32) {
    out[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&flags.to_be_bytes());
    out[6..8].copy_from_slice(&kind.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
    out[16..20].copy_from_slice(&payload_len.to_be_bytes());
}

/// A whole final structured chunk with `payload`.
pub fn chunk(kind: u16, cookie: u64, payload: &[u8]) -> Vec<u8> {
    chunk_with_flags(REPLY_FLAG_DONE, kind, cookie, payload)
}

/// A whole structured chunk with `payload` and chunk `flags`.
pub fn chunk_with_flags(flags: u16, kind: u16, cookie: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(CHUNK_HEADER_LEN + payload.len());
    out.resize(CHUNK_HEADER_LEN, 0);
    // Payloads are bounded by MAX_PAYLOAD plus a small header.
    encode_chunk_header(&mut out, flags, kind, cookie, payload.len() as u32);
    out.extend_from_slice(payload);
    out
}

/// An option reply: header and data, ready to send.
pub fn option_reply(option: u32, reply: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(20 + data.len());
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    // Data is bounded by MAX_STRING-sized names and descriptions, far below u32::MAX.
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// The send buffer the client asks for on a unix socket connection, and the server on the
/// unix connections it accepts: a whole 1 MiB request (or reply, or several replies) and more
/// fit, so a writer hands its data to the kernel in one call instead of waking up for every
/// ~200 KiB the peer drains (the default `net.core.wmem_default`). The kernel caps it at
/// `net.core.wmem_max`. TCP keeps the kernel's autotuning, which a set size would turn off.
pub(crate) const UNIX_SEND_BUFFER: usize = 4 << 20;

/// Asks for [`UNIX_SEND_BUFFER`] on `socket`; a refusal leaves the default (only speed is at
/// stake).
pub(crate) fn widen_send_buffer(socket: &impl std::os::fd::AsFd) {
    let _ = socket2::SockRef::from(socket).set_send_buffer_size(UNIX_SEND_BUFFER);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_unix_connection_gets_the_wide_send_buffer_up_to_the_kernels_cap() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().expect("socket pair");
        widen_send_buffer(&a);
        let cap: usize = std::fs::read_to_string("/proc/sys/net/core/wmem_max")
            .expect("/proc/sys/net/core/wmem_max (a Linux host)")
            .trim()
            .parse()
            .expect("wmem_max is a number");
        let size = socket2::SockRef::from(&a)
            .send_buffer_size()
            .expect("SO_SNDBUF");
        // Linux doubles what is asked for (bookkeeping overhead), after capping it.
        assert_eq!(size, 2 * UNIX_SEND_BUFFER.min(cap));
    }

    #[test]
    fn request_header_decodes_big_endian_fields() {
        let mut bytes = [0u8; REQUEST_LEN];
        bytes[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        bytes[4..6].copy_from_slice(&CMD_FLAG_FUA.to_be_bytes());
        bytes[6..8].copy_from_slice(&CMD_WRITE.to_be_bytes());
        bytes[8..16].copy_from_slice(&0x0102_0304_0506_0708u64.to_be_bytes());
        bytes[16..24].copy_from_slice(&512u64.to_be_bytes());
        bytes[24..28].copy_from_slice(&4096u32.to_be_bytes());
        assert_eq!(
            Request::decode(&bytes),
            Some(Request {
                flags: CMD_FLAG_FUA,
                command: CMD_WRITE,
                cookie: 0x0102_0304_0506_0708,
                offset: 512,
                length: 4096
            })
        );
    }

    #[test]
    fn request_header_with_a_bad_magic_is_refused() {
        let bytes = [0xffu8; REQUEST_LEN];
        assert_eq!(Request::decode(&bytes), None);
    }

    #[test]
    fn backend_errors_map_to_protocol_error_values() {
        let errno = |kind| errno_of(&io::Error::from(kind));
        assert_eq!(errno(io::ErrorKind::PermissionDenied), EPERM);
        assert_eq!(errno(io::ErrorKind::StorageFull), ENOSPC);
        assert_eq!(errno(io::ErrorKind::InvalidInput), EINVAL);
        assert_eq!(errno(io::ErrorKind::Other), EIO);
        assert_eq!(errno_of(&io::Error::from_raw_os_error(28)), ENOSPC);
    }
}
