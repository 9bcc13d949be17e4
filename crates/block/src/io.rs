//! Async I/O on nodes: each request runs on tokio's blocking pool, so an async executor never
//! waits for the disk. Requests are passed down whole (a large sequential copy stays one
//! `pread`/`pwrite`).

use std::sync::Arc;

use crate::error::{BlockError, BlockResult};
use crate::node::BlockNode;
pub use qcow2::PageBuf;

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> BlockResult<T> + Send + 'static,
) -> BlockResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| BlockError::with_errno("I/O worker failed", libc::EIO))?
}

/// Reads `len` bytes at `offset`.
pub async fn read(node: Arc<BlockNode>, offset: u64, len: usize) -> BlockResult<Vec<u8>> {
    blocking(move || {
        let mut buf = vec![0u8; len];
        node.read_at(offset, &mut buf)?;
        Ok(buf)
    })
    .await
}

/// Reads `len` bytes at `offset` into a page-aligned buffer: the kernel copies into aligned
/// memory several times faster (measured through a qcow2 node: 5.7 GB/s against 1.4 GB/s
/// for 1 MiB reads from the page cache), so large copies should use this over [`read`].
pub async fn read_aligned(node: Arc<BlockNode>, offset: u64, len: usize) -> BlockResult<PageBuf> {
    blocking(move || {
        let mut buf = PageBuf::zeroed(len);
        node.read_at(offset, &mut buf)?;
        Ok(buf)
    })
    .await
}

/// Writes `data` at `offset`; gives the buffer back for reuse.
pub async fn write(node: Arc<BlockNode>, offset: u64, data: Vec<u8>) -> BlockResult<Vec<u8>> {
    blocking(move || {
        node.write_at(offset, &data)?;
        Ok(data)
    })
    .await
}

/// Writes `len` zeros at `offset`.
pub async fn write_zeroes(node: Arc<BlockNode>, offset: u64, len: u64) -> BlockResult<()> {
    blocking(move || node.write_zeroes_at(offset, len)).await
}

/// Flushes the node and its children.
pub async fn flush(node: Arc<BlockNode>) -> BlockResult<()> {
    blocking(move || node.flush()).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::BlockGraph;
    use crate::test_support::AddJson;
    use serde_json::json;

    #[tokio::test]
    async fn async_write_then_read_round_trips_through_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.raw");
        std::fs::File::create(&path)
            .unwrap()
            .set_len(4 << 20)
            .unwrap();
        let mut g = BlockGraph::new();
        let node = g
            .blockdev_add_json(&json!({"driver": "file", "node-name": "f", "filename": path}))
            .unwrap();
        let data = vec![0xabu8; 2 << 20];
        write(node.clone(), 1 << 20, data.clone()).await.unwrap();
        flush(node.clone()).await.unwrap();
        assert_eq!(read(node.clone(), 1 << 20, 2 << 20).await.unwrap(), data);
        let aligned = read_aligned(node.clone(), 1 << 20, 2 << 20).await.unwrap();
        assert_eq!(aligned.as_ptr() as usize % 4096, 0);
        assert_eq!(&aligned[..], &data[..]);
        write_zeroes(node.clone(), 1 << 20, 4096).await.unwrap();
        assert_eq!(read(node, 1 << 20, 4096).await.unwrap(), vec![0u8; 4096]);
    }

    #[tokio::test]
    async fn async_io_errors_carry_errno() {
        let mut g = BlockGraph::new();
        let node = g
            .blockdev_add_json(&json!({"driver": "blkdebug", "node-name": "d",
                "inject-error": [{"event": "pwritev", "errno": 5}],
                "image": {"driver": "null-co"}}))
            .unwrap();
        let e = write(node, 0, vec![0; 512]).await.unwrap_err();
        assert_eq!(e.errno(), Some(libc::EIO));
    }
}
