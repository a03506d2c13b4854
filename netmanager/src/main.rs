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
    let (settings, _) = Settings::resolve(&cli.run).map_err(|e| (e.to_string(), 64))?;
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
    let (settings, found) = Settings::resolve(&cli.run).map_err(|e| (e.to_string(), 64))?;
    init_tracing(settings.log_file.as_deref(), settings.debug);
    if !found {
        tracing::warn!(
            path = %cli.run.config.as_deref().map_or(oakestra_netmanager::config::DEFAULT_CONFIG_PATH.into(), |p| p.display().to_string()),
            "no netcfg.json; using the defaults"
        );
    }
    // The control plane is light (HTTP API, MQTT, timers); the packet path runs on its own threads.
    runtime()?.block_on(async {
        let (tx, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            oakestra_protocol::signal::shutdown_signal().await;
            let _ = tx.send(true);
        });
        oakestra_netmanager::run(settings, rx)
            .await
            .map_err(|e| (e.to_string(), 1))
    })
}

fn init_tracing(log_file: Option<&std::path::Path>, debug: bool) {
    use tracing_subscriber::fmt::writer::MakeWriterExt;
    let default = if debug { "debug" } else { "info" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let file = log_file.and_then(|p| {
        if let Some(dir) = p.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        std::fs::OpenOptions::new().create(true).append(true).open(p).ok()
    });
    match file {
        Some(f) => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(false)
            .with_writer(std::io::stderr.and(std::sync::Mutex::new(f)))
            .init(),
        None => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init(),
    }
}
