//! Shared test fixtures: an in-memory export, a server on a temp-dir socket, a raw NBD client
//! speaking the protocol byte by byte, and QEMU's client tools.
#![allow(dead_code)]

use std::io;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use nbd::{Export, ExportBackend, Extent, ListenAddr, NbdServer, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

pub const MIB: usize = 1024 * 1024;

/// An export kept in memory, counting flushes.
pub struct MemoryExport {
    data: Mutex<Vec<u8>>,
    flushes: AtomicUsize,
}

impl MemoryExport {
    pub fn filled(size: usize, byte: u8) -> Arc<MemoryExport> {
        Arc::new(MemoryExport {
            data: Mutex::new(vec![byte; size]),
            flushes: AtomicUsize::new(0),
        })
    }

    pub fn bytes(&self) -> Vec<u8> {
        self.data.lock().unwrap().clone()
    }

    pub fn flushes(&self) -> usize {
        self.flushes.load(Ordering::SeqCst)
    }
}

impl ExportBackend for MemoryExport {
    fn size(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let data = self.data.lock().unwrap();
        let start = offset as usize;
        buf.copy_from_slice(&data[start..start + buf.len()]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut data = self.data.lock().unwrap();
        let start = offset as usize;
        data[start..start + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut data = self.data.lock().unwrap();
        data[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    /// 4 KiB blocks of zeroes are reported as zero holes, the rest as data.
    fn allocation(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        let data = self.data.lock().unwrap();
        let mut extents: Vec<Extent> = Vec::new();
        let mut at = offset;
        while at < offset + len {
            let end = ((at / 4096 + 1) * 4096).min(offset + len);
            let zero = data[at as usize..end as usize].iter().all(|&b| b == 0);
            match extents.last_mut() {
                Some(last) if last.zero == zero => last.length += end - at,
                _ => extents.push(Extent {
                    length: end - at,
                    hole: zero,
                    zero,
                }),
            }
            at = end;
        }
        Ok(extents)
    }
}

/// An export whose every I/O fails with `EIO`.
pub struct FailingExport;

impl ExportBackend for FailingExport {
    fn size(&self) -> u64 {
        MIB as u64
    }
    fn read_at(&self, _: &mut [u8], _: u64) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(5))
    }
    fn write_at(&self, _: &[u8], _: u64) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(5))
    }
    fn write_zeroes(&self, _: u64, _: u64) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(5))
    }
    fn flush(&self) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(5))
    }
}

/// A server on a unix socket in its own temp dir.
pub struct UnixServer {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub server: NbdServer,
}

impl UnixServer {
    pub async fn start() -> UnixServer {
        UnixServer::start_with(ServerConfig::default()).await
    }

    pub async fn start_with(config: ServerConfig) -> UnixServer {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("nbd.sock");
        let server = NbdServer::start(&ListenAddr::Unix(socket.clone()), config)
            .await
            .unwrap();
        UnixServer {
            dir,
            socket,
            server,
        }
    }

    pub fn export(&self, name: &str, backend: Arc<dyn ExportBackend>, writable: bool) {
        self.server
            .add_export(Export::new(name, backend).writable(writable))
            .unwrap();
    }

    pub fn uri(&self, name: &str) -> String {
        format!("nbd+unix:///{name}?socket={}", self.socket.display())
    }
}

/// Runs a QEMU tool to completion.
pub async fn run(program: &str, args: &[&str]) -> Output {
    tokio::process::Command::new(program)
        .args(args)
        .kill_on_drop(true)
        .output()
        .await
        .unwrap_or_else(|error| panic!("{program}: {error}"))
}

pub fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_LIST: u32 = 3;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const REP_META_CONTEXT: u32 = 4;
pub const CMD_BLOCK_STATUS: u16 = 7;
pub const REP_ACK: u32 = 1;
pub const REP_INFO: u32 = 3;
pub const REP_ERR_UNSUP: u32 = 0x8000_0001;
pub const REP_ERR_INVALID: u32 = 0x8000_0003;
pub const REP_ERR_UNKNOWN: u32 = 0x8000_0006;
pub const REP_ERR_TOO_BIG: u32 = 0x8000_0009;
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const FLAG_FUA: u16 = 1;
pub const FLAG_READ_ONLY: u16 = 1 << 1;
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;

/// An NBD client written from the protocol, for what QEMU's tools never send.
pub struct RawClient {
    pub stream: UnixStream,
}

impl RawClient {
    /// Connects and completes the greeting (fixed newstyle, no zeroes).
    pub async fn connect(socket: &Path) -> RawClient {
        let mut stream = UnixStream::connect(socket).await.unwrap();
        assert_eq!(stream.read_u64().await.unwrap(), NBDMAGIC);
        assert_eq!(stream.read_u64().await.unwrap(), IHAVEOPT);
        assert_eq!(stream.read_u16().await.unwrap(), 0b11);
        stream.write_u32(0b11).await.unwrap();
        RawClient { stream }
    }

    pub async fn send_option(&mut self, option: u32, data: &[u8]) {
        let mut message = IHAVEOPT.to_be_bytes().to_vec();
        message.extend_from_slice(&option.to_be_bytes());
        message.extend_from_slice(&(data.len() as u32).to_be_bytes());
        message.extend_from_slice(data);
        self.stream.write_all(&message).await.unwrap();
    }

    /// Reads one option reply: (reply type, data).
    pub async fn option_reply(&mut self, option: u32) -> (u32, Vec<u8>) {
        assert_eq!(self.stream.read_u64().await.unwrap(), REPLY_MAGIC);
        assert_eq!(self.stream.read_u32().await.unwrap(), option);
        let reply = self.stream.read_u32().await.unwrap();
        let length = self.stream.read_u32().await.unwrap();
        let mut data = vec![0u8; length as usize];
        self.stream.read_exact(&mut data).await.unwrap();
        (reply, data)
    }

    /// Sends an option and reads replies up to the final one (ACK or an error).
    pub async fn option(&mut self, option: u32, data: &[u8]) -> Vec<(u32, Vec<u8>)> {
        self.send_option(option, data).await;
        let mut replies = Vec::new();
        loop {
            let (reply, data) = self.option_reply(option).await;
            let last = reply == REP_ACK || reply & 0x8000_0000 != 0;
            replies.push((reply, data));
            if last {
                return replies;
            }
        }
    }

    /// NBD_OPT_GO on `name`: Ok((size, transmission flags)) or the error reply type.
    pub async fn go(&mut self, name: &str) -> Result<(u64, u16), u32> {
        let replies = self.option(OPT_GO, &info_request(name, &[])).await;
        let (last, _) = replies.last().unwrap();
        if *last != REP_ACK {
            return Err(*last);
        }
        let export = replies
            .iter()
            .find(|(reply, data)| *reply == REP_INFO && data[0..2] == [0, 0])
            .expect("NBD_INFO_EXPORT");
        let size = u64::from_be_bytes(export.1[2..10].try_into().unwrap());
        let flags = u16::from_be_bytes(export.1[10..12].try_into().unwrap());
        Ok((size, flags))
    }

    pub async fn send_request(&mut self, command: u16, flags: u16, offset: u64, length: u32) {
        let mut message = 0x2560_9513u32.to_be_bytes().to_vec();
        message.extend_from_slice(&flags.to_be_bytes());
        message.extend_from_slice(&command.to_be_bytes());
        message.extend_from_slice(&0xc0ffee_u64.to_be_bytes());
        message.extend_from_slice(&offset.to_be_bytes());
        message.extend_from_slice(&length.to_be_bytes());
        self.stream.write_all(&message).await.unwrap();
    }

    /// Reads a simple reply; for a successful read, `data_len` bytes of data follow.
    pub async fn simple_reply(&mut self, data_len: usize) -> (u32, Vec<u8>) {
        assert_eq!(self.stream.read_u32().await.unwrap(), 0x6744_6698);
        let error = self.stream.read_u32().await.unwrap();
        assert_eq!(self.stream.read_u64().await.unwrap(), 0xc0ffee);
        let mut data = Vec::new();
        if error == 0 && data_len > 0 {
            data = vec![0u8; data_len];
            self.stream.read_exact(&mut data).await.unwrap();
        }
        (error, data)
    }

    /// Reads a simple reply with any cookie (and `data_len` bytes of data after a success):
    /// (error, cookie).
    pub async fn simple_reply_any(&mut self, data_len: usize) -> (u32, u64) {
        assert_eq!(self.stream.read_u32().await.unwrap(), 0x6744_6698);
        let error = self.stream.read_u32().await.unwrap();
        let cookie = self.stream.read_u64().await.unwrap();
        if error == 0 && data_len > 0 {
            let mut data = vec![0u8; data_len];
            self.stream.read_exact(&mut data).await.unwrap();
        }
        (error, cookie)
    }

    /// A whole request: (error, read data).
    pub async fn request(
        &mut self,
        command: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> (u32, Vec<u8>) {
        self.send_request(command, flags, offset, length).await;
        self.stream.write_all(payload).await.unwrap();
        let data_len = if command == CMD_READ {
            length as usize
        } else {
            0
        };
        self.simple_reply(data_len).await
    }

    /// True when the server closes the connection (end of stream or reset) within 10 s;
    /// whatever it sends before is skipped.
    pub async fn is_closed_by_server(&mut self) -> bool {
        let mut rest = Vec::new();
        let drained = self.stream.read_to_end(&mut rest);
        tokio::time::timeout(std::time::Duration::from_secs(10), drained)
            .await
            .is_ok()
    }
}

/// The data of NBD_OPT_INFO / NBD_OPT_GO.
pub fn info_request(name: &str, wanted: &[u16]) -> Vec<u8> {
    let mut data = (name.len() as u32).to_be_bytes().to_vec();
    data.extend_from_slice(name.as_bytes());
    data.extend_from_slice(&(wanted.len() as u16).to_be_bytes());
    for info in wanted {
        data.extend_from_slice(&info.to_be_bytes());
    }
    data
}

/// The data of NBD_OPT_SET_META_CONTEXT / NBD_OPT_LIST_META_CONTEXT.
pub fn meta_request(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut data = (export.len() as u32).to_be_bytes().to_vec();
    data.extend_from_slice(export.as_bytes());
    data.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for query in queries {
        data.extend_from_slice(&(query.len() as u32).to_be_bytes());
        data.extend_from_slice(query.as_bytes());
    }
    data
}

/// One structured reply chunk: (flags, type, payload).
pub async fn read_chunk(client: &mut RawClient) -> (u16, u16, Vec<u8>) {
    assert_eq!(client.stream.read_u32().await.unwrap(), 0x668e_33ef);
    let flags = client.stream.read_u16().await.unwrap();
    let kind = client.stream.read_u16().await.unwrap();
    assert_eq!(client.stream.read_u64().await.unwrap(), 0xc0ffee);
    let length = client.stream.read_u32().await.unwrap();
    let mut payload = vec![0u8; length as usize];
    client.stream.read_exact(&mut payload).await.unwrap();
    (flags, kind, payload)
}
