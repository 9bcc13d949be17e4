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
    /// Replaced (by a read-write descriptor) when the node is reopened read-write.
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

    /// Opens the file again for writing; the image locks held move to the new descriptor
    /// (taken there before the old one, which holds the same shared locks, is closed).
    fn reopen_read_write(&self) -> BlockResult<()> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.path)
            .map_err(|e| open_error(&self.path, &e))?;
        let st = *lock(&self.locks);
        if self.locking {
            for (i, _) in Perm::NAMED.iter().enumerate() {
                let bit = 1u8 << i;
                if st.perm & bit != 0 {
                    set_lock_byte(&file, PERM_LOCK_BASE + i as i64, true)?;
                }
                if st.unshared & bit != 0 {
                    set_lock_byte(&file, SHARED_LOCK_BASE + i as i64, true)?;
                }
            }
        }
        *self.file.write().unwrap_or_else(|e| e.into_inner()) = file;
        Ok(())
    }

    fn close(&self) -> BlockResult<()> {
        self.file().sync_data()?;
        Ok(())
    }
}
