//! `copy-on-read` added with `blockdev-add`: the same filter node a stream job inserts
//! ([`crate::filter`]), named by the user. Its reads copy what the backing chain of its
//! child holds, down to `bottom` (or the whole chain), into the child's own layer; writes pass
//! through.

use qmp_api::BlockdevOptionsCor;

use crate::driver::{BlockDriver, ChildKind, OpenContext};
use crate::error::{BlockError, BlockResult};
use crate::filter::{FilterDriver, FilterKind};

/// Opens a copy-on-read node over its `file` (QEMU's `cor_open`: the child first, then the
/// bottom node's look-up).
pub(crate) fn open(
    ctx: &mut OpenContext<'_>,
    options: &BlockdevOptionsCor,
) -> BlockResult<Box<dyn BlockDriver>> {
    let file = ctx.open_child("file", &options.file, ChildKind::Filtered)?;
    if let Some(bottom) = &options.bottom
        && ctx.graph.lookup(bottom).is_err()
    {
        return Err(BlockError::new(format!("Bottom node '{bottom}' not found")));
    }
    let name = ctx.ensure_name()?;
    let kind = FilterKind::CopyOnRead {
        bottom: options.bottom.clone(),
    };
    // QEMU's `json:` name of the node leaves `bottom` out.
    let node_options = kind.options(&name, &file);
    Ok(Box::new(FilterDriver::new(kind, file, true, node_options)))
}
