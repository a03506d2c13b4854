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
    // 64 = EX_USAGE: the configuration is wrong, restarting will not help.
    let settings = Settings::resolve(&cli.run).map_err(|e| (e.to_string(), 64))?;
    init_tracing(settings.log_file.as_deref());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| (format!("cannot start the runtime: {e}"), 1))?;
    runtime.block_on(async {
        let (tx, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            oakestra_protocol::signal::shutdown_signal().await;
            let _ = tx.send(true);
        });
        agent::run(settings, rx).await.map_err(|e| (e.to_string(), 1))
    })
}

/// Logs to stderr and, when it can be opened, appended to the log file (what `NodeEngine logs` prints).
fn init_tracing(log_file: Option<&std::path::Path>) {
    use tracing_subscriber::fmt::writer::MakeWriterExt;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
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
