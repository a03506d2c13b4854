//! The runtime seam: what the agent asks of a runtime (create, start, wait, stop, remove, list for adoption,
//! usage), with two implementations, [`container::ContainerRuntime`] (containerd) and
//! [`unikernel::UnikernelRuntime`] (QEMU). The agent routes each deploy by the job's `virtualization`.

pub mod container;
#[cfg(test)]
pub mod fake;
pub mod unikernel;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use oakestra_protocol::mqtt::worker::DeployCommand;

use crate::containerd::RuntimeError as ContainerdError;
pub use crate::containerd::TaskState;
use crate::guest::GuestError;
use crate::overlay::NetManager;

/// What adoption after a restart needs to know about an instance, kept with it by the runtime.
pub type Labels = HashMap<String, String>;

/// Why a runtime operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// containerd.
    #[error(transparent)]
    Container(#[from] ContainerdError),
    /// QEMU and unikernel images.
    #[error(transparent)]
    Guest(#[from] GuestError),
    /// The overlay refused the instance.
    #[error("overlay attach failed: {0}")]
    Overlay(String),
    /// Writing the instance's files failed.
    #[error("{path}: {reason}")]
    Io {
        /// The path.
        path: String,
        /// What failed.
        reason: String,
    },
}

/// One deploy, as the agent hands it to a runtime.
pub struct DeployRequest<'a> {
    /// The task id (`<job>.instance.<n>`).
    pub task: &'a str,
    /// The cluster's command.
    pub cmd: &'a DeployCommand,
    /// Stored with the instance, returned by [`Runtime::list`].
    pub labels: Labels,
    /// The instance's log file (stdout/stderr, or a guest's serial console).
    pub log: &'a Path,
    /// A directory of the agent's for this instance's files.
    pub instance_dir: &'a Path,
    /// The overlay, when this worker has one: the runtime attaches the instance before it runs.
    pub netmanager: Option<&'a NetManager>,
    /// Progress for `status_detail` while a deploy takes long (downloads).
    pub progress: &'a (dyn Fn(&str) + Send + Sync),
}

impl std::fmt::Debug for DeployRequest<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeployRequest")
            .field("task", &self.task)
            .field("labels", &self.labels)
            .finish_non_exhaustive()
    }
}

/// How an instance ended.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ended {
    /// Exit code (128 + signal for a signalled process), when known.
    pub code: Option<u32>,
    /// A runtime's own words on why (a guest's shutdown reason), when it has them.
    pub reason: Option<String>,
}

/// Resource use of a running instance.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// CPU time used so far, in nanoseconds.
    pub cpu_ns: u64,
    /// Memory in use, in bytes.
    pub memory_bytes: u64,
    /// OOM kills in the instance's cgroup.
    pub oom_kills: u64,
}

/// An instance a runtime holds, as listed for adoption.
#[derive(Debug, Clone)]
pub struct Found {
    /// The id (task id for ours).
    pub id: String,
    /// Its labels.
    pub labels: Labels,
    /// Its state.
    pub state: TaskState,
}

/// A runtime.
#[async_trait::async_trait]
pub trait Runtime: Send + Sync + std::fmt::Debug {
    /// The `virtualization` name it registers (`docker`, `unikernel`).
    fn name(&self) -> &'static str;
    /// Prepares the instance up to the point where it only needs starting, attached to the overlay when there
    /// is one. On error the agent calls [`Runtime::remove`] and detaches the overlay.
    async fn create(&self, req: &DeployRequest<'_>) -> Result<(), Error>;
    /// Starts the created instance; returns once it runs, with its main pid.
    async fn start(&self, task: &str) -> Result<u32, Error>;
    /// Waits until the instance ended (riding out the runtime's own restarts).
    async fn wait(&self, task: &str) -> Ended;
    /// Asks the instance to stop (`force`: kills it).
    async fn stop(&self, task: &str, force: bool) -> Result<(), Error>;
    /// Removes everything of the instance the runtime made (not the overlay attachment); returns the exit code
    /// it had, when known. Objects already gone count as removed.
    async fn remove(&self, task: &str) -> Result<Option<u32>, Error>;
    /// The instances it holds (ours and strangers: the agent removes what it cannot adopt).
    async fn list(&self) -> Result<Vec<Found>, Error>;
    /// Current resource use, when readable.
    async fn usage(&self, task: &str) -> Option<Usage>;
    /// Bytes the instance writes to disk.
    async fn disk_usage(&self, task: &str) -> i64;
}

/// The runtimes of this worker, by `virtualization` name.
#[derive(Debug, Clone, Default)]
pub struct Runtimes {
    all: Vec<Arc<dyn Runtime>>,
}

impl Runtimes {
    /// The runtimes, containerd first.
    pub fn new(all: Vec<Arc<dyn Runtime>>) -> Self {
        Self { all }
    }

    /// The runtime for a job's `virtualization` (`""`, `container`, `containerd` mean `docker`).
    pub fn for_virtualization(&self, virtualization: &str) -> Option<Arc<dyn Runtime>> {
        let name = match virtualization.trim() {
            "" | "container" | "containerd" => "docker",
            other => other,
        };
        self.all.iter().find(|r| r.name() == name).cloned()
    }

    /// Every runtime.
    pub fn all(&self) -> &[Arc<dyn Runtime>] {
        &self.all
    }

    /// The names, for the registration's `virtualization`.
    pub fn names(&self) -> Vec<String> {
        self.all.iter().map(|r| r.name().to_owned()).collect()
    }
}
