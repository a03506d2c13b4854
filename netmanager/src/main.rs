//! Entry point of `NetManager`: parse flags, set up logging, run the daemon or a subcommand, map errors to exit
//! codes (64: unusable configuration; 3: `status` found no daemon; 1: anything else).

use std::process::ExitCode;

use clap::Parser;
use oakestra_netmanager::{Cli, Command, Settings};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        None | Some(Command::Run) => run(&cli),
        Some(Command::Version) => {
            #[allow(clippy::print_stdout, reason = "the command's output")]
            {
                println!("NetManager {}", env!("CARGO_PKG_VERSION"));
            }
            Ok(())
        }
        Some(Command::Status) => status(&cli),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err((message, code)) => {
            #[allow(
                clippy::print_stderr,
                reason = "the one line a user sees when the command fails"
            )]
            {
                eprintln!("NetManager: {message}");
            }
            ExitCode::from(code)
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, (String, u8)> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| (format!("cannot start the runtime: {e}"), 1))
}

fn status(cli: &Cli) -> Result<(), (String, u8)> {
    let (settings, _) =
        Settings::resolve(&cli.run).map_err(|e| (e.to_string(), oakestra_runtime::signal::EXIT_USAGE))?;
    let state = runtime()?
        .block_on(oakestra_netmanager::status(&settings))
        .map_err(|e| (e.to_string(), 3))?;
    #[allow(clippy::print_stdout, reason = "the command's output")]
    {
        println!("{}", serde_json::to_string_pretty(&state).unwrap_or_default());
    }
    Ok(())
}

fn run(cli: &Cli) -> Result<(), (String, u8)> {
    let (settings, found) =
        Settings::resolve(&cli.run).map_err(|e| (e.to_string(), oakestra_runtime::signal::EXIT_USAGE))?;
    let level = if settings.debug { "debug" } else { "info" };
    if !oakestra_runtime::logging::init(level, settings.log_file.as_deref()) {
        tracing::warn!(file = ?settings.log_file, "cannot open the log file; logging to stderr only");
    }
    if !found {
        tracing::warn!(
            path = %cli.run.config.as_deref().map_or(oakestra_netmanager::config::DEFAULT_CONFIG_PATH.into(), |p| p.display().to_string()),
            "no netcfg.json; using the defaults"
        );
    }
    // The control plane is light (HTTP API, MQTT, timers); the packet path runs on its own threads.
    runtime()?.block_on(async {
        oakestra_netmanager::run(settings, oakestra_runtime::signal::shutdown_watch())
            .await
            .map_err(|e| (e.to_string(), 1))
    })
}
