//! A creation killed at any point leaves either no qcow2 header or a header whose refcount
//! structures are in the file: never a header pointing past the end (what `qemu-img check`
//! calls corruption; QEMU's own creation writes its header first and can leave that).

use std::io;
use std::sync::{Arc, Mutex};

use qcow2::{CreateOptions, Storage, create_with};

/// An in-memory file that keeps every state it went through, one per write.
#[derive(Default)]
struct Recording {
    bytes: Mutex<Vec<u8>>,
    states: Mutex<Vec<Vec<u8>>>,
}

impl Storage for Recording {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        let bytes = self.bytes.lock().unwrap();
        for (i, b) in buf.iter_mut().enumerate() {
            *b = bytes.get(off as usize + i).copied().unwrap_or(0);
        }
        Ok(())
    }
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        let mut bytes = self.bytes.lock().unwrap();
        let end = off as usize + buf.len();
        if bytes.len() < end {
            bytes.resize(end, 0);
        }
        bytes[off as usize..end].copy_from_slice(buf);
        self.states.lock().unwrap().push(bytes.clone());
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.bytes.lock().unwrap().len() as u64)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut bytes = self.bytes.lock().unwrap();
        bytes.resize(len as usize, 0);
        self.states.lock().unwrap().push(bytes.clone());
        Ok(())
    }
}

fn be64(bytes: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(bytes[at..at + 8].try_into().unwrap())
}

#[test]
fn every_state_of_a_creation_has_no_header_or_its_refcount_structures() {
    for cluster_size in [512, 65536] {
        // An old image's bytes in the file first: creation overwrites a file in place.
        let storage = Arc::new(Recording::default());
        storage.write_at(&[0xaa; 4096], 0).unwrap();
        storage.states.lock().unwrap().clear();
        let options = CreateOptions {
            size: 1 << 20,
            cluster_size,
            ..CreateOptions::default()
        };
        create_with(storage.clone(), &options).unwrap();
        let states = storage.states.lock().unwrap();
        assert!(states.len() > 2, "the creation wrote something");
        for (n, state) in states.iter().enumerate() {
            if state[..4] != *b"QFI\xfb" {
                // No header: not an image yet.
                continue;
            }
            let table = be64(state, 48);
            let clusters = u64::from(u32::from_be_bytes(state[56..60].try_into().unwrap()));
            let end = table + clusters * cluster_size;
            assert!(
                end <= state.len() as u64,
                "state {n} (cluster size {cluster_size}): the header points at a refcount \
                 table ending at {end}, the file has {} bytes",
                state.len()
            );
            let block = be64(state, table as usize);
            assert!(
                block != 0 && block + cluster_size <= state.len() as u64,
                "state {n}: the refcount table's first block is not in the file"
            );
        }
    }
}
