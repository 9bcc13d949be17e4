//! The daemon's command backend: the block command layer ([`blockdev::Blockdev`]) behind the
//! monitor, with its QMP events fed into the monitor's broadcast.

use std::sync::Arc;

use blockdev::{Blockdev, SharedBlockdev};
use monitor::{Broadcast, QmpBackend};
use qmp_api::QmpError;
use serde_json::{Map, Value};

use crate::Services;

/// [`SharedBlockdev`] as the monitor's [`QmpBackend`]: commands run one at a time.
pub struct BlockBackend(Arc<SharedBlockdev>);

impl QmpBackend for BlockBackend {
    fn execute(
        &self,
        name: &str,
        arguments: Option<Map<String, Value>>,
    ) -> Result<Value, QmpError> {
        self.0.execute(name, arguments)
    }

    fn has_command(&self, name: &str) -> bool {
        qmp_api::command_properties(name).is_some()
    }
}

/// Builds the daemon's services on the current tokio runtime: jobs as tasks, block I/O on the
/// blocking pool, events into `events`; on shutdown every job is cancelled and every image is
/// flushed and closed (qcow2 metadata and persistent bitmaps written).
pub fn block_services(events: Broadcast) -> Services {
    let sink: Arc<dyn job::EventSink> = Arc::new(move |event: qmp_api::Event| events.emit(&event));
    let shared = Arc::new(SharedBlockdev::new(Blockdev::for_tokio(sink)));
    let on_shutdown = {
        let shared = Arc::clone(&shared);
        move || {
            if let Err(e) = shared.shutdown() {
                eprintln!("blockjobd: closing images: {e}");
            }
        }
    };
    Services::new(Arc::new(BlockBackend(shared)), on_shutdown)
}
