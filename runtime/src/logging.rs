//! The log set-up of every daemon (feature `logging`): `tracing` events to stderr (coloured at a terminal) and,
//! when a file is given and can be opened, appended to it too (without colours). `RUST_LOG` overrides the level.

use std::path::Path;

use tracing_subscriber::{EnvFilter, fmt::writer::MakeWriterExt};

/// Installs the global subscriber: `default` (e.g. `info`, `debug`) unless `RUST_LOG` says otherwise; `file` is
/// created with its directory if needed. Returns false when the file could not be opened (only stderr then).
pub fn init(default: &str, file: Option<&Path>) -> bool {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let opened = file.and_then(|p| {
        if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
            let _ = std::fs::create_dir_all(dir);
        }
        std::fs::OpenOptions::new().create(true).append(true).open(p).ok()
    });
    let wanted_file = file.is_some();
    let got_file = opened.is_some();
    match opened {
        Some(f) => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(false)
            .with_writer(std::io::stderr.and(std::sync::Mutex::new(f)))
            .init(),
        None => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
    !wanted_file || got_file
}
