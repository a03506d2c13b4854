//! Entry point of `cluster-service`: parse flags, set up logging, run until SIGTERM/SIGINT, map errors to exit codes
//! (64 invalid configuration, 1 runtime failure).

use std::process::ExitCode;

use clap::Parser;
use oakestra_cluster_service::{Cli, Config, Error};
use oakestra_runtime::signal::EXIT_USAGE;

fn main() -> ExitCode {
    oakestra_cluster_service::memory::limit_arenas();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(), // --help, --version
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(EXIT_USAGE);
        }
    };
    oakestra_runtime::logging::init("info", None);
    let config = match Config::from_cli(cli) {
        Ok(config) => config,
        Err(e) => {
            #[allow(
                clippy::print_stderr,
                reason = "a usage error is for the user, like clap's own errors"
            )]
            {
                eprintln!("error: {e}\n\nFor more information, try '--help'.");
            }
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return fail(&Error::Serve(e), 1),
    };
    match runtime.block_on(oakestra_cluster_service::run(
        config,
        oakestra_runtime::signal::shutdown_signal(),
    )) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e, 1),
    }
}

fn fail(e: &Error, code: u8) -> ExitCode {
    tracing::error!("{e}");
    #[allow(
        clippy::print_stderr,
        reason = "the one line a user sees even with logging filtered out"
    )]
    {
        eprintln!("error: {e}");
    }
    ExitCode::from(code)
}
