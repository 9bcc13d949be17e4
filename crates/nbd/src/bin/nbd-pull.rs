//! `nbd-pull`: the backup server's side of a pull-mode incremental backup. Copies the extents
//! a dirty bitmap marks from a fleecing export to a writable export at the same offsets
//! (typically an incremental qcow2 over the previous backup, exported by blockjobd or
//! `qemu-nbd`), then flushes it.
//!
//! ```text
//! nbd-pull --bitmap b0 nbd+unix:///fleece?socket=A.sock nbd+unix:///inc?socket=B.sock
//! ```

use std::process::ExitCode;

use clap::Parser;
use nbd::client::Connector;
use nbd::client::pull::{parse_uri, pull};

/// Copy the dirty extents of an NBD export's bitmap to another NBD export.
#[derive(Parser)]
#[command(name = "nbd-pull", version)]
struct Args {
    /// The bitmap whose dirty extents are copied (the export's `qemu:dirty-bitmap:NAME`).
    #[arg(long)]
    bitmap: String,
    /// The export to read (`nbd+unix:///EXPORT?socket=PATH` or `nbd://HOST:PORT/EXPORT`).
    from: String,
    /// The export to write, of the same size.
    to: String,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let connector = |uri: &str| parse_uri(uri).map(|(addr, export)| Connector::new(addr, export));
    let (from, to) = match (connector(&args.from), connector(&args.to)) {
        (Ok(from), Ok(to)) => (from, to),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("nbd-pull: {e}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("nbd-pull: {e}");
            return ExitCode::FAILURE;
        }
    };
    let context = format!("{}{}", nbd::wire::DIRTY_BITMAP_PREFIX, args.bitmap);
    match runtime.block_on(pull(&from, &context, &to)) {
        Ok(report) => {
            println!(
                "pulled {} bytes ({} as zeroes) in {} dirty extents",
                report.bytes, report.zero_bytes, report.extents
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("nbd-pull: {e}");
            ExitCode::FAILURE
        }
    }
}
