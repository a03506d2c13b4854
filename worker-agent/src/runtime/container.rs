//! The containerd runtime (`docker`): image, OCI spec, container and task through containerd, the overlay attach
//! between task creation and start (the reference's order), and exit watching that rides out containerd restarts.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{DeployRequest, Ended, Error, Found, Runtime, TaskState, Usage};
use crate::containerd::Containerd;
use crate::metrics;
use crate::registry::Platform;
use crate::spec::{self, SpecOptions};

/// The virtualization name the containerd runtime registers under (the reference's name for it).
pub const NAME: &str = "docker";

/// containerd behind the [`Runtime`] interface.
#[derive(Debug, Clone)]
pub struct ContainerRuntime {
    client: Containerd,
}

impl ContainerRuntime {
    /// The runtime over a connected client.
    pub fn new(client: Containerd) -> Self {
        Self { client }
    }

    /// The containerd client.
    pub fn client(&self) -> &Containerd {
        &self.client
    }
}

fn io(path: &Path, e: &std::io::Error) -> Error {
    Error::Io {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

/// `/etc/hosts`, `/etc/resolv.conf` and `/etc/hostname` of an instance, in `dir`.
fn write_instance_files(dir: &Path, hostname: &str) -> Result<PathBuf, Error> {
    std::fs::create_dir_all(dir).map_err(|e| io(dir, &e))?;
    let write = |name: &str, text: String| {
        let p = dir.join(name);
        std::fs::write(&p, text).map_err(|e| io(&p, &e))
    };
    write(
        "hosts",
        format!("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{hostname}\n"),
    )?;
    write("hostname", format!("{hostname}\n"))?;
    write("resolv.conf", resolv_conf())?;
    Ok(dir.to_owned())
}

/// The `resolv.conf` instances get: systemd-resolved's upstream list when present, else the host's unless it only
/// points at a loopback resolver (unreachable from the instance's namespace), else a public resolver.
pub fn resolv_conf() -> String {
    for path in ["/run/systemd/resolve/resolv.conf", "/etc/resolv.conf"] {
        if let Ok(text) = std::fs::read_to_string(path) {
            let usable = text.lines().any(|l| {
                let mut w = l.split_whitespace();
                w.next() == Some("nameserver")
                    && w.next()
                        .and_then(|ip| ip.parse::<IpAddr>().ok())
                        .is_some_and(|ip| !ip.is_loopback())
            });
            if usable {
                return text;
            }
        }
    }
    "nameserver 8.8.8.8\n".to_owned()
}

#[async_trait::async_trait]
impl Runtime for ContainerRuntime {
    fn name(&self) -> &'static str {
        NAME
    }

    async fn create(&self, req: &DeployRequest<'_>) -> Result<(), Error> {
        let cmd = req.cmd;
        let platform = if cmd.platform.trim().is_empty() {
            Platform::host()
        } else {
            Platform::parse(cmd.platform.trim()).map_err(crate::containerd::RuntimeError::from)?
        };
        let image = self
            .client
            .ensure_image(cmd.image.trim(), &platform, req.progress)
            .await?;
        let hostname = format!("instance-{}", cmd.instance_number);
        let files = write_instance_files(req.instance_dir, &hostname)?;
        let opts = SpecOptions {
            hostname,
            cgroups_path: self.client.cgroups_path(req.task),
            hosts_file: files.join("hosts").display().to_string(),
            resolv_conf: files.join("resolv.conf").display().to_string(),
            hostname_file: files.join("hostname").display().to_string(),
        };
        let spec = spec::build(&image.config, cmd, &opts).map_err(crate::containerd::RuntimeError::from)?;
        self.client
            .create_container(req.task, &image, &spec, req.labels.clone())
            .await?;
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(req.log)
            .map_err(|e| io(req.log, &e))?;
        let pid = self.client.create_task(req.task, req.log).await?;
        if let Some(nm) = req.netmanager {
            nm.attach(pid, &cmd.job_name, cmd.instance_number, &cmd.port)
                .await
                .map_err(|e| Error::Overlay(e.to_string()))?;
        }
        Ok(())
    }

    async fn start(&self, task: &str) -> Result<u32, Error> {
        self.client.start_task(task).await?;
        match self.client.task_state(task).await? {
            TaskState::Alive { pid } => Ok(pid),
            // It already ended; the watcher reports how.
            _ => Ok(0),
        }
    }

    async fn wait(&self, task: &str) -> Ended {
        let code = loop {
            match self.client.wait(task).await {
                Ok(exit) => break Some(exit.code),
                Err(e) if e.is_not_found() => break None,
                Err(e) => {
                    tracing::debug!(task = %task, error = %e, "wait interrupted; polling the task");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    match self.client.task_state(task).await {
                        Ok(TaskState::Stopped { exit_code }) => break Some(exit_code),
                        Ok(TaskState::Missing) => break None,
                        _ => {}
                    }
                }
            }
        };
        Ended { code, reason: None }
    }

    async fn stop(&self, task: &str, force: bool) -> Result<(), Error> {
        let (signal, all) = if force { (9, true) } else { (15, false) };
        self.client.kill(task, signal, all).await?;
        Ok(())
    }

    async fn remove(&self, task: &str) -> Result<Option<u32>, Error> {
        Ok(self.client.remove(task).await?)
    }

    async fn list(&self) -> Result<Vec<Found>, Error> {
        let mut out = Vec::new();
        for c in self.client.list().await? {
            let state = self.client.task_state(&c.id).await.unwrap_or(TaskState::Missing);
            out.push(Found {
                id: c.id,
                labels: c.labels,
                state,
            });
        }
        Ok(out)
    }

    async fn usage(&self, task: &str) -> Option<Usage> {
        let path = self.client.cgroups_path(task);
        let stats = tokio::task::spawn_blocking(move || metrics::cgroup_stats(&path))
            .await
            .ok()
            .flatten()?;
        Some(Usage {
            cpu_ns: stats.cpu_usage_ns,
            memory_bytes: stats.memory_bytes,
            oom_kills: stats.oom_kills,
        })
    }

    async fn disk_usage(&self, task: &str) -> i64 {
        self.client.disk_usage(task).await.unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_never_points_at_loopback() {
        let text = resolv_conf();
        for line in text.lines().filter(|l| l.starts_with("nameserver")) {
            let ip: IpAddr = line
                .split_whitespace()
                .nth(1)
                .unwrap_or("")
                .parse()
                .unwrap_or(IpAddr::from([8, 8, 8, 8]));
            assert!(!ip.is_loopback(), "{text}");
        }
    }
}
