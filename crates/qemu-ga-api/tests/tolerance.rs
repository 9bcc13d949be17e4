//! The guest agent's compatibility promise, both sides: a client reads a newer agent's
//! replies tolerantly, a server reads arguments strictly.

use qemu_ga_api::qapi_runtime::Command;
use qemu_ga_api::{Commands, GuestDiskBusType, GuestGetDisksArguments, dispatch};
use serde_json::json;

#[test]
fn a_newer_agents_disks_reply_reads_with_unknown_bus_types_and_members() {
    let pci = json!({"domain": 0, "bus": 0, "slot": 4, "function": 0});
    let reply = json!([{
        "name": "/dev/vda", "partition": false, "wear-level": 3,
        "address": {"pci-controller": pci, "bus-type": "cxl", "bus": 0, "target": 0, "unit": 0}
    }]);
    let disks = GuestGetDisksArguments::read_returns(&reply).expect("tolerant read");
    let address = disks[0].address.as_ref().expect("an address");
    assert_eq!(address.bus_type, GuestDiskBusType::UnknownValue);
    assert_eq!(address.pci_controller.slot, 4);
}

struct Agent;
impl Commands for Agent {}

#[test]
fn an_agent_refuses_arguments_its_schema_does_not_have() {
    let arguments = json!({"path": "/bin/true", "detach": true});
    let error = dispatch(&mut Agent, "guest-exec", arguments.as_object().cloned())
        .expect_err("unknown member");
    assert_eq!(error.desc, "Parameter 'detach' is unexpected");
}
