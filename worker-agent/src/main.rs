//! Entry point of `NodeEngine`: parse flags, set up logging, run the agent or a subcommand, map errors to exit codes.

use std::process::ExitCode;

use clap::Parser;
use oakestra_worker_agent::{Cli, Command, Settings, agent, commands};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        None | Some(Command::Run) => run(&cli),
        Some(Command::Status) => commands::status(&cli.run).map_err(|e| (e.to_string(), 3)),
        Some(Command::Version) => {
            commands::version();
            Ok(())
        }
        Some(Command::Stop) => commands::stop(&cli.run).map_err(|e| (e.to_string(), 1)),
        Some(Command::Logs {
            ref target,
            instance,
            follow,
            lines,
        }) => commands::log_file(&cli.run, target.as_deref(), instance)
            .and_then(|path| commands::logs(&path, lines, follow))
            .map_err(|e| (e.to_string(), 1)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err((message, code)) => {
            #[allow(
                clippy::print_stderr,
                reason = "the one line a user sees when the command fails"
            )]
            {
                eprintln!("NodeEngine: {message}");
            }
            ExitCode::from(code)
        }
    }
}

fn run(cli: &Cli) -> Result<(), (String, u8)> {
    let settings =
        Settings::resolve(&cli.run).map_err(|e| (e.to_string(), oakestra_runtime::signal::EXIT_USAGE))?;
    // Logs go to stderr and, when it can be opened, to the log file too (what `NodeEngine logs` prints).
    if !oakestra_runtime::logging::init("info", settings.log_file.as_deref()) {
        tracing::warn!(file = ?settings.log_file, "cannot open the log file; logging to stderr only");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| (format!("cannot start the runtime: {e}"), 1))?;
    runtime.block_on(async {
        agent::run(settings, oakestra_runtime::signal::shutdown_watch())
            .await
            .map_err(|e| (e.to_string(), 1))
    })
}
