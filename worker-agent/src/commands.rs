//! The user-facing subcommands: `status`, `logs`, `stop`, `version`. They print for a person, so stdout is theirs.
#![allow(clippy::print_stdout, reason = "these commands print for the user")]

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::agent::read_status;
use crate::cli::RunFlags;
use crate::config::ConfFile;

/// Why a subcommand failed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The agent is not running.
    #[error("NodeEngine is not running (no live agent behind {})", state.display())]
    NotRunning {
        /// The state directory looked at.
        state: PathBuf,
    },
    /// A file could not be read.
    #[error("{}: {reason}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
    /// The target names no instance.
    #[error(
        "logs {target:?}: give a job name app.appns.svc.svcns or a task id app.appns.svc.svcns.instance.N"
    )]
    Target {
        /// What was given.
        target: String,
    },
    /// The agent did not stop.
    #[error("NodeEngine (pid {pid}) did not stop within {secs} s")]
    StopTimeout {
        /// Its pid.
        pid: u32,
        /// The wait.
        secs: u64,
    },
    /// Signalling failed.
    #[error("cannot signal pid {pid}: {reason}")]
    Signal {
        /// The pid.
        pid: u32,
        /// What failed.
        reason: String,
    },
}

/// `NodeEngine status`: whether the agent runs, and what it knows.
pub fn status(flags: &RunFlags) -> Result<(), CommandError> {
    let Some(s) = read_status(&flags.state_dir) else {
        return Err(CommandError::NotRunning {
            state: flags.state_dir.clone(),
        });
    };
    println!("NodeEngine running (pid {})", s.pid);
    println!("  node:      {} ({})", s.node_id, s.node_name);
    println!(
        "  cluster:   {} ({})",
        s.cluster,
        if s.connected { "connected" } else { "disconnected" }
    );
    println!("  instances: {}", s.instances.len());
    for i in &s.instances {
        println!("    {:<60} {:<10} pid {}", i.task, i.phase, i.pid);
    }
    Ok(())
}

/// `NodeEngine version`.
pub fn version() {
    println!("NodeEngine {} (oakestra-rs)", env!("CARGO_PKG_VERSION"));
}

/// The file `logs` prints: the agent's log, or an instance's log under the app-log directory.
pub fn log_file(flags: &RunFlags, target: Option<&str>, instance: u32) -> Result<PathBuf, CommandError> {
    let Some(target) = target else {
        return Ok(flags.log_file.clone());
    };
    let task = if target.parse::<oakestra_protocol::naming::TaskId>().is_ok() {
        target.to_owned()
    } else if let Ok(job) = target.parse::<oakestra_protocol::naming::JobName>() {
        job.task(instance).to_string()
    } else {
        return Err(CommandError::Target {
            target: target.to_owned(),
        });
    };
    let app_logs = match &flags.logs {
        Some(dir) => dir.clone(),
        None => PathBuf::from(
            ConfFile::load(&flags.conf)
                .map(|c| c.app_logs)
                .unwrap_or_else(|_| "/tmp".into()),
        ),
    };
    Ok(app_logs.join(task))
}

/// `NodeEngine logs`: the last `lines` lines, then (with `follow`) whatever is appended.
pub fn logs(path: &Path, lines: usize, follow: bool) -> Result<(), CommandError> {
    let read_err = |e: std::io::Error| CommandError::Read {
        path: path.to_owned(),
        reason: e.to_string(),
    };
    let mut file = std::fs::File::open(path).map_err(read_err)?;
    let len = file.metadata().map_err(read_err)?.len();
    // The tail of a huge log is all we need: read at most 1 MiB back.
    let start = len.saturating_sub(1024 * 1024);
    file.seek(SeekFrom::Start(start)).map_err(read_err)?;
    let mut buf = Vec::new();
    file.read_to_end(&mut buf).map_err(read_err)?;
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().collect();
    for line in &all[all.len().saturating_sub(lines)..] {
        println!("{line}");
    }
    if !follow {
        return Ok(());
    }
    let mut pos = start + buf.len() as u64;
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(pos);
        if len < pos {
            pos = 0; // truncated or rotated
        }
        if len > pos {
            let mut f = std::fs::File::open(path).map_err(read_err)?;
            f.seek(SeekFrom::Start(pos)).map_err(read_err)?;
            let mut more = Vec::new();
            f.read_to_end(&mut more).map_err(read_err)?;
            pos += more.len() as u64;
            print!("{}", String::from_utf8_lossy(&more));
        }
    }
}

/// `NodeEngine stop`: with systemd, stops the `nodeengine` and `netmanager` units; otherwise sends SIGTERM to the
/// running agent and waits until it is gone.
pub fn stop(flags: &RunFlags) -> Result<(), CommandError> {
    if Path::new("/run/systemd/system").exists()
        && Path::new("/etc/systemd/system/nodeengine.service").exists()
    {
        let ok = std::process::Command::new("systemctl")
            .args(["stop", "nodeengine", "netmanager"])
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            println!("stopped nodeengine and netmanager");
            return Ok(());
        }
    }
    let Some(s) = read_status(&flags.state_dir) else {
        return Err(CommandError::NotRunning {
            state: flags.state_dir.clone(),
        });
    };
    let pid =
        rustix::process::Pid::from_raw(i32::try_from(s.pid).unwrap_or(0)).ok_or(CommandError::Signal {
            pid: s.pid,
            reason: "invalid pid".into(),
        })?;
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).map_err(|e| CommandError::Signal {
        pid: s.pid,
        reason: e.to_string(),
    })?;
    let proc_dir = PathBuf::from(format!("/proc/{}", s.pid));
    for _ in 0..300 {
        if !proc_dir.exists() {
            println!("stopped NodeEngine (pid {})", s.pid);
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(CommandError::StopTimeout { pid: s.pid, secs: 30 })
}
