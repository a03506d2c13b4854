//! `NetManager`: the oakestra-rs semantic overlay on a worker: veth/bridge plumbing, TUN proxy, table queries
//!
//! This binary is a placeholder until its issue lands (issue 6): it explains itself with `--help` and refuses to run
//! with a clear "not implemented yet" error, so scripts and tests can already find it.

use clap::Parser;

/// What the command line asks for.
#[derive(Debug, Parser)]
#[command(name = "NetManager", version, about = "the oakestra-rs semantic overlay on a worker: veth/bridge plumbing, TUN proxy, table queries", long_about = None, after_help = "Status: not implemented yet (issue 6).")]
pub struct Cli {
    /// Arguments the finished binary will take (see the README); accepted here only to be refused.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
    pub args: Vec<String>,
}

/// Why the binary stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The binary's issue has not landed yet.
    #[error("NetManager is not implemented yet (issue 6)")]
    NotImplemented,
}

/// Runs the binary.
pub fn run(_cli: Cli) -> Result<(), Error> {
    Err(Error::NotImplemented)
}
