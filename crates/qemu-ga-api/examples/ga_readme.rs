use qemu_ga_api::qapi_runtime::{Command, QmpError};
use qemu_ga_api::{GuestExecArguments, GuestExecCaptureOutput, GuestExecStatusArguments};
use serde_json::json;

fn main() -> Result<(), QmpError> {
    // Run `uname -r` in the guest, capturing its output.
    let mut exec = GuestExecArguments::new("/bin/uname");
    exec.arg = Some(vec!["-r".into()]);
    exec.capture_output = Some(GuestExecCaptureOutput::Flag(true));
    let request = json!({"execute": GuestExecArguments::NAME, "arguments": exec.arguments()?});
    // The agent's reply, read as the command's return type, gives the pid to poll.
    let started = GuestExecArguments::read_returns(&json!({"pid": 4242}))?;
    let poll = GuestExecStatusArguments { pid: started.pid };
    println!(
        "{request}, then {} with {:?}",
        GuestExecStatusArguments::NAME,
        poll.arguments()?
    );
    Ok(())
}
