//! The `tandem` binary: all logic lives in the `tandem_supervisor` library.

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    tandem_supervisor::main(&args)
}
