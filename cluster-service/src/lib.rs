//! `cluster-service`: the oakestra-rs cluster orchestrator: cluster manager, MQTT broker, cluster scheduler and network service
//!
//! The binary still refuses to run ("not implemented yet", issue 4) until workers can join; the library already
//! holds the finished parts:
//! - [`store`]: the embedded SQLite database (`<data-dir>/cluster.db`) and the persisted identity at root;
//! - [`root_link`]: registration with root (join token, back-off, re-registration keeping the id) and the report.

pub mod root_link;
pub mod store;

use std::path::PathBuf;

use clap::Parser;

/// What the command line asks for.
#[derive(Debug, Parser)]
#[command(name = "cluster-service", version, about = "the oakestra-rs cluster orchestrator: cluster manager, MQTT broker, cluster scheduler and network service", long_about = None, after_help = "Status: not implemented yet (issue 4).")]
pub struct Cli {
    /// Arguments the finished binary will take (see the README); accepted here only to be refused.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
    pub args: Vec<String>,
}

/// Why the binary stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The binary's issue has not landed yet.
    #[error("cluster-service is not implemented yet (issue 4)")]
    NotImplemented,
    /// A file or directory could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A database statement failed.
    #[error("database: {0}")]
    Sql(#[from] rusqlite::Error),
    /// A blocking task panicked or was cancelled.
    #[error("background task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// Root could not be reached.
    #[error("calling root: {0}")]
    Call(#[from] oakestra_protocol::client::ClientError),
    /// Root answered with an error.
    #[error("{url}: root answered HTTP {status}: {body}")]
    Root {
        /// The URL called.
        url: String,
        /// The status.
        status: u16,
        /// The answer body.
        body: String,
    },
}

/// Runs the binary.
pub fn run(_cli: Cli) -> Result<(), Error> {
    Err(Error::NotImplemented)
}
