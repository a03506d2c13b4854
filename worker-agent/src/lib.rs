//! `NodeEngine`: the oakestra-rs worker agent: registers with a cluster, runs containers through containerd and unikernels through QEMU, reports metrics
//!
//! The binary still refuses to run ("not implemented yet", issue 5) until it can run workloads; the library already
//! holds the finished parts:
//! - [`config`]: `/etc/oakestra/conf.json` (read leniently, unknown keys kept) and the NetManager (`-n`) setting.

pub mod config;

use clap::Parser;

/// What the command line asks for.
#[derive(Debug, Parser)]
#[command(name = "NodeEngine", version, about = "the oakestra-rs worker agent: registers with a cluster, runs containers through containerd and unikernels through QEMU, reports metrics", long_about = None, after_help = "Status: not implemented yet (issue 5).")]
pub struct Cli {
    /// Arguments the finished binary will take (see the README); accepted here only to be refused.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
    pub args: Vec<String>,
}

/// Why the binary stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The binary's issue has not landed yet.
    #[error("NodeEngine is not implemented yet (issue 5)")]
    NotImplemented,
}

/// Runs the binary.
pub fn run(_cli: Cli) -> Result<(), Error> {
    Err(Error::NotImplemented)
}
