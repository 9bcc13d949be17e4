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

    /// With the monitors still open: the NBD server stops, every job is cancelled and waited
    /// for ([`SharedBlockdev::stop_jobs`]), its events reaching the clients.
    fn stop(&self) {
        self.0.stop_jobs();
    }
}

/// The job core's and the command layer's events into the monitor's broadcast; their waits
/// on the dispatcher open its hold ([`Broadcast::polling`]).
struct EventsToMonitor(Broadcast);

impl job::EventSink for EventsToMonitor {
    fn emit(&self, event: qmp_api::Event) {
        self.0.emit(&event);
    }

    fn polling(&self) -> job::Polling {
        job::Polling::new(self.0.polling())
    }

    fn observed(&self) {
        self.0.observed();
    }
}

/// Builds the daemon's services on the current tokio runtime: jobs as tasks, block I/O on the
/// blocking pool, events into `events`. On shutdown every job is cancelled while the monitors
/// are open (the backend's `stop`), then every image is flushed and closed (qcow2 metadata and
/// persistent bitmaps written): an error there is the shutdown's error.
pub fn block_services(events: Broadcast) -> Services {
    let sink: Arc<dyn job::EventSink> = Arc::new(EventsToMonitor(events));
    let shared = Arc::new(SharedBlockdev::new(Blockdev::for_tokio(sink)));
    let on_shutdown = {
        let shared = Arc::clone(&shared);
        move || {
            // Jobs a failed startup left (none: startup runs no job) and anything the
            // monitor's stop did not reach are stopped here too.
            shared.stop_jobs();
            shared
                .close_images()
                .map_err(|e| format!("closing images: {e}"))
        }
    };
    let register = {
        let shared = Arc::clone(&shared);
        move |id: &str, filename: &str| shared.register_monitor_chardev(id, filename)
    };
    let mut services = Services::new(Arc::new(BlockBackend(shared)), on_shutdown);
    services.monitor_chardev = Some(Box::new(register));
    services
}
