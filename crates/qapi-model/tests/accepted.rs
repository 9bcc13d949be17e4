//! Schemas QEMU's generator accepts load here too (each found by running
//! QEMU 10.0's `qapi-gen.py` on variants of the garden fixture).

fn loads(text: &str) {
    if let Err(d) = qapi_model::load_str("t.json", text) {
        panic!("QEMU accepts this schema, we reject it:\n{d}");
    }
}

/// `QType` is QEMU's predefined enum (`none`, `qnull`, `qnum`, ...): as an
/// alternate's branch it takes strings only, so a number branch beside it
/// can be told apart.
#[test]
fn an_alternate_may_have_a_qtype_branch_beside_a_number() {
    loads("{ 'alternate': 'Amount', 'data': { 'exact': 'int', 'kind': 'QType' } }");
}
