//! Unikernel guests: images ([`image`]), QEMU command lines and the accelerator choice ([`qemu`]), and QEMU's
//! monitor ([`qmp`]). The runtime that runs them is [`crate::runtime::unikernel`].

pub mod image;
pub mod qemu;
pub mod qmp;

use std::path::Path;

/// Why a guest could not be deployed or managed. Each variant carries the offending value.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// The service's image (`code`, `arch`) is unusable, or the tarball is broken.
    #[error("unikernel image: {0}")]
    Image(String),
    /// Downloading the tarball failed.
    #[error("unikernel image download failed: {0}")]
    Download(String),
    /// A service field is out of range.
    #[error("{0}")]
    Invalid(String),
    /// A file operation failed.
    #[error("{path}: {reason}")]
    Io {
        /// The path.
        path: String,
        /// What failed.
        reason: String,
    },
    /// QEMU's monitor did not answer as expected.
    #[error("QMP {socket}: {reason}")]
    Qmp {
        /// The socket.
        socket: String,
        /// What failed.
        reason: String,
    },
    /// QEMU could not be started or ended during start-up.
    #[error("QEMU: {0}")]
    Qemu(String),
    /// The overlay could not give the guest a NIC.
    #[error("overlay: {0}")]
    Network(String),
    /// No such guest.
    #[error("no unikernel instance {0}")]
    NotFound(String),
}

impl GuestError {
    /// An I/O error on `path`.
    pub fn io(path: &Path, e: &std::io::Error) -> Self {
        GuestError::Io {
            path: path.display().to_string(),
            reason: e.to_string(),
        }
    }
}
