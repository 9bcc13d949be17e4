//! What an image is stored on, and what it reads unallocated clusters from.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

/// Byte-addressed storage holding an image (a file, or a block-layer node).
///
/// Reads past the end return zeros; writes past the end grow the storage.
#[allow(clippy::len_without_is_empty)] // storage is never asked whether it is empty
pub trait Storage: Send + Sync {
    /// Fill `buf` with the bytes at `off` (zeros past the end).
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()>;
    /// Write all of `buf` at `off`.
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()>;
    /// Make previous writes durable.
    fn flush(&self) -> io::Result<()>;
    /// Current length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Truncate or extend to `len` bytes.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Reserves space for `[off, off + len)` (inside the current length) so later writes
    /// there cannot fail for lack of space (`posix_fallocate`); by default, writes zeros.
    fn reserve(&self, off: u64, len: u64) -> io::Result<()> {
        const CHUNK: u64 = 1 << 20;
        let zeros = vec![0u8; CHUNK.min(len) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(CHUNK);
            self.write_at(&zeros[..n as usize], off + done)?;
            done += n;
        }
        Ok(())
    }
}

impl Storage for File {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match FileExt::read_at(self, &mut buf[done..], off + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.write_all_at(buf, off)
    }
    fn flush(&self) -> io::Result<()> {
        self.sync_data()
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        File::set_len(self, len)
    }
    fn reserve(&self, off: u64, len: u64) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let (Ok(off), Ok(len)) = (i64::try_from(off), i64::try_from(len)) else {
            return Err(io::Error::from_raw_os_error(libc::EFBIG));
        };
        // SAFETY: posix_fallocate on a file descriptor we own, with checked ranges.
        match unsafe { libc::posix_fallocate(self.as_raw_fd(), off, len) } {
            0 => Ok(()),
            errno => Err(io::Error::from_raw_os_error(errno)),
        }
    }
}

/// A read-only image that unallocated clusters fall through to.
pub trait Backing: Send + Sync {
    /// Virtual size in bytes; reads past it return zeros (the caller clips).
    fn size(&self) -> u64;
    /// Fill `buf` with the guest data at `off` (`off + buf.len() <= size()`).
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()>;
}

/// A raw image used as a backing file.
pub struct RawImage {
    storage: Arc<dyn Storage>,
    size: u64,
}

impl RawImage {
    /// A raw image over `storage`, its size being the storage's length.
    pub fn new(storage: Arc<dyn Storage>) -> io::Result<RawImage> {
        let size = storage.len()?;
        Ok(RawImage { storage, size })
    }
}

impl Backing for RawImage {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.storage.read_at(buf, off)
    }
}

/// A zeroed, page-aligned byte buffer. The kernel copies to and from page-aligned user memory
/// several times faster than from a plain `Vec<u8>` (measured: 14 GB/s against 2.6 GB/s for
/// 1 MiB preads from the page cache), so buffers this crate hands to storage are page-aligned,
/// and callers moving data through an [`Image`](crate::Image) should use one too.
pub struct PageBuf {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: PageBuf owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for PageBuf {}
// SAFETY: shared access only hands out &[u8].
unsafe impl Sync for PageBuf {}

impl PageBuf {
    const ALIGN: usize = 4096;

    fn layout(len: usize) -> std::alloc::Layout {
        std::alloc::Layout::from_size_align(len.max(1), Self::ALIGN)
            .unwrap_or_else(|_| std::alloc::Layout::new::<u8>())
    }

    /// A buffer of `len` zero bytes.
    pub fn zeroed(len: usize) -> PageBuf {
        let layout = Self::layout(len);
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        match std::ptr::NonNull::new(raw) {
            Some(ptr) => PageBuf { ptr, len },
            None => std::alloc::handle_alloc_error(layout),
        }
    }
}

impl std::ops::Deref for PageBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr points to len initialised (zeroed) bytes owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for PageBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as for deref, and &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for PageBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in zeroed() with the same layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.len)) }
    }
}

#[cfg(test)]
mod tests {
    use super::PageBuf;

    #[test]
    fn page_buffers_are_page_aligned_and_zeroed() {
        for len in [0usize, 1, 4096, 1 << 20] {
            let mut b = PageBuf::zeroed(len);
            assert_eq!(b.len(), len);
            assert_eq!(b.as_ptr() as usize % 4096, 0);
            assert!(b.iter().all(|&x| x == 0));
            b.iter_mut().for_each(|x| *x = 7);
            assert!(b.iter().all(|&x| x == 7));
        }
    }
}
