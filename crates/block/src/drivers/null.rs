//! `null-co`: a node of a given size (default 1 GiB) that reads zeros and drops writes.

use crate::driver::{BlockDriver, DriverInfo, DriverSpec, OpenContext};
use crate::error::BlockResult;

/// The `null-co` driver.
pub const SPEC: DriverSpec = DriverSpec {
    name: "null-co",
    is_protocol: true,
    open,
};

/// A null device.
pub struct NullDriver {
    size: u64,
    filename: Option<String>,
}

fn open(ctx: &mut OpenContext<'_>) -> BlockResult<Box<dyn BlockDriver>> {
    let size = ctx.opt_u64("size")?.unwrap_or(1 << 30);
    let read_zeroes = ctx.opt_bool("read-zeroes")?;
    let latency = ctx.opt_u64("latency-ns")?;
    let filename =
        if ctx.options().contains_key("size") || read_zeroes.is_some() || latency.is_some() {
            None
        } else {
            Some("null-co://".to_string())
        };
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

    fn info(&self) -> DriverInfo {
        DriverInfo {
            filename: self.filename.clone(),
            actual_size: Some(0),
            ..DriverInfo::default()
        }
    }
}
