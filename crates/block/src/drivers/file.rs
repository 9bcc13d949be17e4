//! `file`: a POSIX file with positional I/O and QEMU-compatible image locking.
//!
//! Locking follows QEMU's file-posix protocol so that qemu-img/qemu-io and this process see
//! each other: for each permission bit `b` held, a shared OFD lock on byte `100 + b`; for each
//! permission *not shared*, a shared OFD lock on byte `200 + b`. Before taking permissions, a
//! probe (`F_OFD_GETLK` for a write lock) on `200 + b` for each wanted bit and on `100 + b` for
//! each unshared bit finds conflicting holders.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::sync::{Mutex, RwLock, RwLockReadGuard};

use qmp_api::{
    BlockdevAioOptions, BlockdevOptionsFile, ImageInfoSpecific, ImageInfoSpecificBranch,
    ImageInfoSpecificFile, ImageInfoSpecificFileWrapper, OnOffAuto,
};

use crate::driver::{BlockDriver, DriverInfo, OpenContext};
use crate::error::{BlockError, BlockResult, strerror};
use crate::node::lock;
use crate::perm::Perm;

const PERM_LOCK_BASE: i64 = 100;
const SHARED_LOCK_BASE: i64 = 200;

/// An open image file.
pub struct FileDriver {
    /// Replaced when the node is reopened with another mode.
    file: RwLock<File>,
    path: String,
    locking: bool,
    locks: Mutex<LockState>,
}

#[derive(Debug, Clone, Copy, Default)]
struct LockState {
    /// Bits whose byte 100+b we hold.
    perm: u8,
    /// Bits whose byte 200+b we hold (permissions we do not share).
    unshared: u8,
    /// Committed values to return to on abort.
    committed: (u8, u8),
}

/// Opens the file (read-write unless the node is read-only). Requests run as QEMU's
/// `aio: threads` runs them (positional I/O on a pool of threads): that value acts, `native`
/// and `io_uring` are refused. `aio-max-batch` acts as in QEMU with `threads`: it only bounds
/// the batches of the `native` and `io_uring` engines, so it changes nothing. `drop-cache` and
/// `x-check-cache-dropped` act when an inactive node becomes active again, which a node here
/// never is (`active: false` is refused), as in QEMU for a node never inactivated. `locking`
/// acts (`auto` is `on`: open file description locks are always there). A
/// persistent-reservation manager is refused.
pub(crate) fn open(
    ctx: &mut OpenContext<'_>,
    options: &BlockdevOptionsFile,
) -> BlockResult<Box<dyn crate::driver::BlockDriver>> {
    let path = options.filename.clone();
    let locking = !matches!(options.locking, Some(OnOffAuto::Off));
    match options.aio {
        None | Some(BlockdevAioOptions::Threads) => {}
        Some(other) => {
            return Err(BlockError::new(format!(
                "Parameter 'aio' is not supported with value '{}' by this block layer",
                other.as_str()
            )));
        }
    }
    if options.pr_manager.is_some() {
        return Err(BlockError::new(
            "Parameter 'pr-manager' is not supported by this block layer",
        ));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(!ctx.read_only())
        .open(&path)
        .map_err(|e| open_error(&path, &e))?;
    Ok(Box::new(FileDriver {
        file: RwLock::new(file),
        path,
        locking,
        locks: Mutex::new(LockState::default()),
    }))
}

fn open_error(path: &str, e: &std::io::Error) -> BlockError {
    let errno = e.raw_os_error().unwrap_or(libc::EIO);
    BlockError::with_errno(
        format!("Could not open '{path}': {}", strerror(errno)),
        errno,
    )
}

/// Takes (a shared OFD lock) or releases the lock on `byte` of `file`.
fn set_lock_byte(file: &File, byte: i64, locked: bool) -> BlockResult<()> {
    let mut fl = flock_for(byte, if locked { libc::F_RDLCK } else { libc::F_UNLCK });
    // SAFETY: fcntl with F_OFD_SETLK reads a valid, initialized `flock` we own.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &mut fl) };
    if r == -1 {
        let errno = std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO);
        return Err(BlockError::with_errno(
            format!("Failed to lock byte {byte}"),
            errno,
        ));
    }
    Ok(())
}

impl FileDriver {
    fn file(&self) -> RwLockReadGuard<'_, File> {
        self.file.read().unwrap_or_else(|e| e.into_inner())
    }

    fn set_lock_byte(&self, byte: i64, locked: bool) -> BlockResult<()> {
        set_lock_byte(&self.file(), byte, locked)
    }

    /// Whether another open file description holds a lock on `byte`.
    fn byte_is_locked_elsewhere(&self, byte: i64) -> BlockResult<bool> {
        let mut fl = flock_for(byte, libc::F_WRLCK);
        // SAFETY: fcntl with F_OFD_GETLK fills the valid `flock` we own.
        let r = unsafe { libc::fcntl(self.file().as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
        if r == -1 {
            let errno = std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO);
            return Err(BlockError::with_errno(
                format!("Failed to get lock byte {byte}"),
                errno,
            ));
        }
        Ok(i32::from(fl.l_type) != libc::F_UNLCK)
    }

    /// Makes the held lock bytes exactly `(perm, unshared)`.
    fn apply_locks(&self, st: &mut LockState, perm: u8, unshared: u8) -> BlockResult<()> {
        for (i, _) in Perm::NAMED.iter().enumerate() {
            let bit = 1u8 << i;
            for (base, want, have) in [
                (PERM_LOCK_BASE, perm, &mut st.perm),
                (SHARED_LOCK_BASE, unshared, &mut st.unshared),
            ] {
                if want & bit != *have & bit {
                    self.set_lock_byte(base + i as i64, want & bit != 0)?;
                    *have ^= bit;
                }
            }
        }
        Ok(())
    }

    fn check_locks(&self, perm: Perm, shared: Perm) -> BlockResult<()> {
        for (i, (p, name)) in Perm::NAMED.iter().enumerate() {
            if perm.contains(*p) && self.byte_is_locked_elsewhere(SHARED_LOCK_BASE + i as i64)? {
                return Err(BlockError::new(format!("Failed to get \"{name}\" lock")));
            }
        }
        for (i, (p, name)) in Perm::NAMED.iter().enumerate() {
            if !shared.contains(*p) && self.byte_is_locked_elsewhere(PERM_LOCK_BASE + i as i64)? {
                return Err(BlockError::new(format!(
                    "Failed to get shared \"{name}\" lock"
                )));
            }
        }
        Ok(())
    }

    /// The path opened.
    pub fn path(&self) -> &str {
        &self.path
    }
}

fn flock_for(byte: i64, kind: i32) -> libc::flock {
    // SAFETY: `flock` is plain data; all-zero is a valid value (pid must be 0 for OFD locks).
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte;
    fl.l_len = 1;
    fl
}

impl BlockDriver for FileDriver {
    fn size(&self) -> BlockResult<u64> {
        Ok(self.file().metadata()?.len())
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> BlockResult<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.file().read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> BlockResult<()> {
        Ok(self.file().write_all_at(buf, offset)?)
    }

    /// Punches a hole (QEMU's `raw_co_pdiscard`); a file system without holes keeps the data,
    /// which a discard allows.
    fn discard_at(&self, offset: u64, len: u64) -> BlockResult<()> {
        let (Ok(off), Ok(n)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
            return Err(BlockError::from_errno(libc::EINVAL));
        };
        let file = self.file();
        // SAFETY: fallocate on a file descriptor we own, with plain integer arguments.
        let r = unsafe {
            libc::fallocate(
                file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                n,
            )
        };
        if r == 0 {
            return Ok(());
        }
        match std::io::Error::last_os_error().raw_os_error() {
            Some(libc::EOPNOTSUPP) => Ok(()),
            Some(e) => Err(BlockError::from_errno(e)),
            None => Ok(()),
        }
    }

    fn flush(&self) -> BlockResult<()> {
        Ok(self.file().sync_data()?)
    }

    fn truncate(&self, size: u64) -> BlockResult<()> {
        Ok(self.file().set_len(size)?)
    }

    fn check_perm(&self, perm: Perm, shared: Perm) -> BlockResult<()> {
        if !self.locking {
            return Ok(());
        }
        let mut st = lock(&self.locks);
        st.committed = (st.perm, st.unshared);
        // Take the union first so nobody slips in between check and commit.
        let (p, u) = (st.perm | perm.bits(), st.unshared | (!shared).bits());
        let result = self
            .apply_locks(&mut st, p, u)
            .and_then(|()| self.check_locks(perm, shared));
        if result.is_err() {
            let (cp, cu) = st.committed;
            let _ = self.apply_locks(&mut st, cp, cu);
        }
        result
    }

    fn set_perm(&self, perm: Perm, shared: Perm) {
        if !self.locking {
            return;
        }
        let mut st = lock(&self.locks);
        // Releasing locks cannot fail for a conflict; a failure leaves a stricter lock.
        let _ = self.apply_locks(&mut st, perm.bits(), (!shared).bits());
        st.committed = (st.perm, st.unshared);
    }

    fn abort_perm(&self) {
        if !self.locking {
            return;
        }
        let mut st = lock(&self.locks);
        let (cp, cu) = st.committed;
        let _ = self.apply_locks(&mut st, cp, cu);
    }

    fn info(&self) -> DriverInfo {
        DriverInfo {
            filename: Some(self.path.clone()),
            actual_size: self.file().metadata().ok().map(|m| m.blocks() * 512),
            cluster_size: None,
            dirty_flag: Some(false),
            format_specific: Some(ImageInfoSpecific {
                branch: ImageInfoSpecificBranch::File(ImageInfoSpecificFileWrapper {
                    data: ImageInfoSpecificFile {
                        extent_size_hint: None,
                    },
                }),
            }),
        }
    }

    fn reopen_read_only(&self) -> BlockResult<()> {
        self.reopen(false)
    }

    fn reopen_read_write(&self) -> BlockResult<()> {
        self.reopen(true)
    }

    fn close(&self) -> BlockResult<()> {
        self.file().sync_data()?;
        Ok(())
    }
}

impl FileDriver {
    /// Opens the file again with the new mode; the lock bytes held move to the new
    /// descriptor before the old one (and its locks) goes.
    fn reopen(&self, write: bool) -> BlockResult<()> {
        let path = &self.path;
        let file = OpenOptions::new()
            .read(true)
            .write(write)
            .open(path)
            .map_err(|e| {
                let errno = e.raw_os_error().unwrap_or(libc::EIO);
                BlockError::with_errno(format!("Could not reopen file: {}", strerror(errno)), errno)
            })?;
        let mut slot = self.file.write().unwrap_or_else(|e| e.into_inner());
        if self.locking {
            let mut st = lock(&self.locks);
            let held = (st.perm, st.unshared);
            let mut moved = LockState::default();
            let staged = FileDriver {
                file: RwLock::new(file),
                path: path.clone(),
                locking: true,
                locks: Mutex::new(LockState::default()),
            };
            staged.apply_locks(&mut moved, held.0, held.1)?;
            moved.committed = st.committed;
            *st = moved;
            let file = staged.file.into_inner().unwrap_or_else(|e| e.into_inner());
            *slot = file;
        } else {
            *slot = file;
        }
        Ok(())
    }
}

/// `blockdev-create` of a `file` (QEMU's `raw_co_create`): the file is created or emptied
/// under image locks that keep others from resizing it meanwhile (taken, then checked
/// against other holders, then released), marked no-copy-on-write and given its extent size
/// hint where the file system has them (failures there are not errors, as in QEMU), and
/// grown to its size as `preallocation` says.
pub fn create(options: &qmp_api::BlockdevCreateOptionsFile) -> BlockResult<()> {
    use qmp_api::PreallocMode;
    let prealloc = options.preallocation.unwrap_or(PreallocMode::Off);
    let hint = options.extent_size_hint.unwrap_or(1 << 20);
    let hint = u32::try_from(hint).map_err(|_| BlockError::new("Extent size hint is too large"))?;
    let path = options.filename.as_str();
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| {
            let errno = e.raw_os_error().unwrap_or(libc::EIO);
            BlockError::with_errno(
                format!("Could not create '{path}': {}", strerror(errno)),
                errno,
            )
        })?;
    let driver = FileDriver {
        file: RwLock::new(file),
        path: path.to_string(),
        locking: true,
        locks: Mutex::new(LockState::default()),
    };
    let perm = Perm::WRITE | Perm::RESIZE;
    let shared = Perm::ALL & !Perm::RESIZE;
    driver.check_perm(perm, shared).map_err(|e| {
        BlockError::new(format!(
            "{}\nIs another process using the image [{path}]?",
            e.desc()
        ))
    })?;
    let result = driver.fill(options, prealloc, hint);
    driver.set_perm(Perm::NONE, Perm::ALL);
    result
}

impl FileDriver {
    fn fill(
        &self,
        options: &qmp_api::BlockdevCreateOptionsFile,
        prealloc: qmp_api::PreallocMode,
        hint: u32,
    ) -> BlockResult<()> {
        self.grow_to(0, qmp_api::PreallocMode::Off)?;
        {
            let file = self.file();
            let fd = file.as_raw_fd();
            if options.nocow == Some(true) {
                // FS_IOC_GETFLAGS/SETFLAGS with FS_NOCOW_FL; a file system without the flag
                // refuses, which is not an error (QEMU ignores it too).
                let mut attr: libc::c_long = 0;
                // SAFETY: the ioctls read and write one c_long we own.
                unsafe {
                    if libc::ioctl(fd, FS_IOC_GETFLAGS, &mut attr) == 0 {
                        attr |= FS_NOCOW_FL;
                        libc::ioctl(fd, FS_IOC_SETFLAGS, &attr);
                    }
                }
            }
            // FS_IOC_FSGETXATTR/FSSETXATTR: the extent size hint (XFS); QEMU warns when an
            // explicitly asked hint cannot be set, and goes on.
            let mut attr = FsXattr::default();
            // SAFETY: the ioctls read and write one `fsxattr` we own.
            let set = unsafe {
                libc::ioctl(fd, FS_IOC_FSGETXATTR, &mut attr) == 0 && {
                    attr.xflags |= FS_XFLAG_EXTSIZE;
                    attr.extsize = hint;
                    libc::ioctl(fd, FS_IOC_FSSETXATTR, &attr) == 0
                }
            };
            if !set && options.extent_size_hint.is_some_and(|h| h != 0) {
                tracing::warn!(
                    "Failed to set extent size hint: {}",
                    strerror(
                        std::io::Error::last_os_error()
                            .raw_os_error()
                            .unwrap_or(libc::EIO)
                    )
                );
            }
        }
        self.grow_to(options.size, prealloc)
    }

    /// Truncates or grows the file to `size`, preallocating the new part (QEMU's
    /// `raw_regular_truncate`); a failed preallocation restores the old length.
    fn grow_to(&self, size: u64, prealloc: qmp_api::PreallocMode) -> BlockResult<()> {
        use qmp_api::PreallocMode;
        let errno_of = |e: std::io::Error| e.raw_os_error().unwrap_or(libc::EIO);
        let with = |what: &str, errno: i32| {
            BlockError::with_errno(format!("{what}: {}", strerror(errno)), errno)
        };
        let current = self
            .file()
            .metadata()
            .map_err(|e| with("Could not stat file", errno_of(e)))?
            .len();
        if current > size && prealloc != PreallocMode::Off {
            return Err(BlockError::with_errno(
                "Cannot use preallocation for shrinking files",
                libc::ENOTSUP,
            ));
        }
        let result = match prealloc {
            PreallocMode::Off => {
                return self
                    .file()
                    .set_len(size)
                    .map_err(|e| with("Could not resize file", errno_of(e)));
            }
            PreallocMode::Falloc => {
                use qcow2::Storage;
                if size == current {
                    Ok(())
                } else {
                    Storage::reserve(&*self.file(), current, size - current)
                        .map_err(|e| with("Could not preallocate new data", errno_of(e)))
                }
            }
            PreallocMode::Full => self
                .file()
                .set_len(size)
                .map_err(|e| with("Could not resize file", errno_of(e)))
                .and_then(|()| {
                    let zeros = vec![0u8; 65536];
                    let mut at = current;
                    while at < size {
                        let n = (size - at).min(65536) as usize;
                        self.file().write_all_at(&zeros[..n], at).map_err(|e| {
                            with("Could not write zeros for preallocation", errno_of(e))
                        })?;
                        at += n as u64;
                    }
                    self.file()
                        .sync_all()
                        .map_err(|e| with("Could not flush file to disk", errno_of(e)))
                }),
            PreallocMode::Metadata => {
                return Err(BlockError::with_errno(
                    "Unsupported preallocation mode: metadata",
                    libc::ENOTSUP,
                ));
            }
        };
        if result.is_err() {
            let _ = self.file().set_len(current);
        }
        result
    }
}

/// Linux's `struct fsxattr`.
#[repr(C)]
#[derive(Default)]
struct FsXattr {
    xflags: u32,
    extsize: u32,
    nextents: u32,
    projid: u32,
    cowextsize: u32,
    pad: [u8; 8],
}

const FS_IOC_GETFLAGS: libc::c_ulong = 0x8008_6601;
const FS_IOC_SETFLAGS: libc::c_ulong = 0x4008_6602;
const FS_NOCOW_FL: libc::c_long = 0x0080_0000;
const FS_IOC_FSGETXATTR: libc::c_ulong = 0x801c_581f;
const FS_IOC_FSSETXATTR: libc::c_ulong = 0x401c_5820;
const FS_XFLAG_EXTSIZE: u32 = 0x0000_0800;
