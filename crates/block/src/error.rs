//! The error every block-layer operation returns: a QMP-ready description, plus the errno for
//! I/O failures (jobs report `strerror(errno)` in their events).

use std::fmt;

/// A block-layer failure. `desc` is worded exactly as qemu-storage-daemon words it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockError {
    desc: String,
    errno: Option<i32>,
}

impl BlockError {
    /// An error with a description and no errno.
    pub fn new(desc: impl Into<String>) -> Self {
        BlockError {
            desc: desc.into(),
            errno: None,
        }
    }

    /// An I/O error: the description is `strerror(errno)` (e.g. `Input/output error`).
    pub fn from_errno(errno: i32) -> Self {
        BlockError {
            desc: strerror(errno),
            errno: Some(errno),
        }
    }

    /// An error with a description that also carries an errno.
    pub fn with_errno(desc: impl Into<String>, errno: i32) -> Self {
        BlockError {
            desc: desc.into(),
            errno: Some(errno),
        }
    }

    /// The human-readable description (QMP `desc`).
    pub fn desc(&self) -> &str {
        &self.desc
    }

    /// The errno, for I/O errors.
    pub fn errno(&self) -> Option<i32> {
        self.errno
    }
}

impl fmt::Display for BlockError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.desc)
    }
}

impl std::error::Error for BlockError {}

impl From<std::io::Error> for BlockError {
    fn from(e: std::io::Error) -> Self {
        BlockError::from_errno(e.raw_os_error().unwrap_or(libc::EIO))
    }
}

/// `strerror(errno)` as glibc words it, e.g. `No such file or directory`.
pub fn strerror(errno: i32) -> String {
    let text = std::io::Error::from_raw_os_error(errno).to_string();
    match text.rfind(" (os error ") {
        Some(cut) => text[..cut].to_string(),
        None => text,
    }
}

/// Shorthand for results of this crate.
pub type BlockResult<T> = Result<T, BlockError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_read_like_strerror() {
        assert_eq!(
            BlockError::from_errno(libc::EIO).desc(),
            "Input/output error"
        );
        assert_eq!(BlockError::from_errno(libc::EIO).errno(), Some(libc::EIO));
        assert_eq!(strerror(libc::ENOENT), "No such file or directory");
    }
}
