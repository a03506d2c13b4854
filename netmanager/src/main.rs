//! Entry point of `NetManager`: parse flags, run, map the error to an exit code.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = oakestra_netmanager::Cli::parse();
    match oakestra_netmanager::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            #[allow(
                clippy::print_stderr,
                reason = "the one line a user sees when the binary refuses to run"
            )]
            {
                eprintln!("error: {e}");
            }
            ExitCode::from(2)
        }
    }
}
