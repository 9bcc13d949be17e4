//! The block layer's events as the generated QMP events.

use std::sync::Arc;

use job::EventSink;
use qmp_api::{BlockImageCorruptedData, Event};

fn wire_int(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// The block layer's events as QMP events sent to `events`.
pub fn block_event_sink(events: Arc<dyn EventSink>) -> block::BlockEventSink {
    Arc::new(move |event: block::BlockEvent| match event {
        block::BlockEvent::ImageCorrupted {
            node_name,
            msg,
            offset,
            size,
            fatal,
        } => {
            // Nodes of this daemon belong to no device: QEMU sends "" then.
            let mut data = BlockImageCorruptedData::new("", msg, fatal);
            data.node_name = Some(node_name);
            data.offset = offset.map(wire_int);
            data.size = size.map(wire_int);
            events.emit(Event::BlockImageCorrupted(data));
        }
    })
}
