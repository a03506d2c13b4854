//! Small helpers every cross-binary suite needs: free ports, child processes killed on drop, waiting for a
//! condition.

use std::future::Future;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port")
}

/// One of the workspace's binaries as a child process, stderr in a log file; killed on drop.
#[derive(Debug)]
pub struct Proc {
    child: Child,
    /// Its log file.
    pub log: PathBuf,
}

impl Proc {
    /// Starts binary `name` with `args` and `RUST_LOG=info`.
    pub fn start(name: &str, args: &[String], log: PathBuf) -> Self {
        Self::spawn(Command::new(crate::procs::binary(name)), args, log)
    }

    fn spawn(mut command: Command, args: &[String], log: PathBuf) -> Self {
        let child = command
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("create the log"))
            .spawn()
            .expect("start the binary");
        Self { child, log }
    }

    /// Starts binary `name` inside network namespace `netns` (`ip netns exec`), otherwise like [`Self::start`].
    pub fn start_in(netns: &str, name: &str, args: &[String], log: PathBuf) -> Self {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", netns])
            .arg(crate::procs::binary(name));
        Self::spawn(command, args, log)
    }

    /// Starts binary `name` inside network namespace `netns` with `nsenter --net`: unlike `ip netns exec`, in this
    /// mount namespace, as on a real worker (named namespaces it creates under /run/netns are seen by every
    /// process).
    pub fn start_in_net(netns: &str, name: &str, args: &[String], log: PathBuf) -> Self {
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net=/var/run/netns/{netns}"))
            .arg("--")
            .arg(crate::procs::binary(name));
        Self::spawn(command, args, log)
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills it (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// What it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (polling every 100 ms) until its log contains `needle`; panics with the log after `secs`.
    pub async fn wait_for_log(&self, needle: &str, secs: u64) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while !self.log().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "no {needle:?} in {} within {secs} s:\n{}",
                self.log.display(),
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Sends SIGTERM and waits up to `within` for the exit; returns the exit code (None: it had to be killed).
    pub fn terminate(&mut self, within: Duration) -> Option<i32> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `check` every 100 ms until it yields `Some`, or panics after `secs` with `what` and the logs of `procs`.
pub async fn eventually<T, Fut: Future<Output = Option<T>>>(
    secs: u64,
    what: &str,
    procs: &[&Proc],
    mut check: impl FnMut() -> Fut,
) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() > deadline {
            let logs: Vec<String> = procs
                .iter()
                .map(|p| format!("--- {}:\n{}", p.log.display(), p.log()))
                .collect();
            panic!("timed out after {secs} s waiting for {what}\n{}", logs.join("\n"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
