//! `null-co`: a node of a given size (default 1 GiB) that reads zeros and drops writes.

use qmp_api::BlockdevOptionsNull;

use crate::driver::{BlockDriver, DriverInfo, OpenContext};
use crate::error::{BlockError, BlockResult};

/// A null device.
pub struct NullDriver {
    size: u64,
    filename: Option<String>,
}

/// Opens a null device. `read-zeroes` acts as QEMU's with it on (reads always give zeroes,
/// which `read-zeroes: false` leaves unspecified); `latency-ns` is refused unless 0.
pub(crate) fn open(
    _ctx: &mut OpenContext<'_>,
    options: &BlockdevOptionsNull,
) -> BlockResult<Box<dyn BlockDriver>> {
    let size = match options.size {
        None => 1 << 30,
        Some(size) => u64::try_from(size)
            .map_err(|_| BlockError::new("Parameter 'size' expects a non-negative value"))?,
    };
    if options.latency_ns.is_some_and(|l| l != 0) {
        return Err(BlockError::new(
            "Parameter 'latency-ns' is not supported by this block layer",
        ));
    }
    // QEMU names the node `null-co://` only when no option changes what it is.
    let plain =
        options.size.is_none() && options.read_zeroes.is_none() && options.latency_ns.is_none();
    let filename = plain.then(|| "null-co://".to_string());
    Ok(Box::new(NullDriver { size, filename }))
}

impl BlockDriver for NullDriver {
    fn size(&self) -> BlockResult<u64> {
        Ok(self.size)
    }

    /// Always zeros (QEMU leaves the buffer untouched without `read-zeroes`; zeros are a valid
    /// and safer choice).
    fn read_at(&self, _offset: u64, buf: &mut [u8]) -> BlockResult<()> {
        buf.fill(0);
        Ok(())
    }

    fn write_at(&self, _offset: u64, _buf: &[u8]) -> BlockResult<()> {
        Ok(())
    }

    fn write_zeroes_at(&self, _offset: u64, _len: u64) -> BlockResult<()> {
        Ok(())
    }

    fn flush(&self) -> BlockResult<()> {
        Ok(())
    }

    /// Everything reads as zeroes (as QEMU's null-co with `read-zeroes`): a reader that asks
    /// first (a backup) writes zeroes instead of copying buffers of them.
    fn zero_status(&self, _offset: u64, len: u64) -> BlockResult<(bool, bool, u64)> {
        Ok((true, true, len))
    }

    fn info(&self) -> DriverInfo {
        DriverInfo {
            filename: self.filename.clone(),
            actual_size: Some(0),
            ..DriverInfo::default()
        }
    }
}
