//! Docker for the addons tests: a private `dockerd` and a local registry (Debian's `docker-registry` on
//! 127.0.0.1:5000) inside a network namespace the test created, and the two sample addon images
//! (`scripts/images/addons.sh`) as `docker load` archives.
//!
//! The daemon is started with `nsenter --net=/var/run/netns/<name>` (not `ip netns exec`, whose private `/sys`
//! hides the cgroup mounts: dockerd then fails with "Devices cgroup isn't mounted"), so its `docker0` bridge, NAT
//! rules and published ports all live in that namespace, and 127.0.0.1:5000 there is the registry (docker treats
//! registries on 127.0.0.0/8 as insecure: plain HTTP). Everything it uses is its own: data root, pid file, socket
//! and client config under the test's directory, a short exec root `/run/oakdk-<pid>-<n>` (unix socket paths are
//! limited to 107 bytes), containers' cgroups under `/oakdk-<pid>-<n>` in every hierarchy, an empty daemon config
//! (the host's `/etc/docker/daemon.json` is not read). Dropping a [`Dockerd`] removes its containers, stops it
//! (SIGTERM, then SIGKILL), kills what it left running, unmounts its overlay and netns mounts and deletes its
//! directories and cgroups. Missing packages (`docker.io`, `docker-registry`) are installed with apt-get.

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::netns::{MARK_ENV, output_ok};
use crate::procs::{binary, target_dir, workspace_root};

/// Name of the sample extension image (what `scripts/images/addons.sh` builds).
pub const HELLO_IMAGE: &str = "127.0.0.1:5000/oakestra/addon-hello:latest";
/// Name of the sample scheduler plugin image.
pub const SCHEDULER_IMAGE: &str = "127.0.0.1:5000/oakestra/addon-scheduler:latest";
/// Where [`Registry`] listens inside its namespace.
pub const REGISTRY_HOST: &str = "127.0.0.1:5000";

/// How long dockerd and the registry get to come up.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Cleanup problems: printed, never a panic (a panic inside a drop during unwinding would abort the test binary).
#[allow(
    clippy::print_stderr,
    reason = "cleanup runs in Drop, where a panic is not an option"
)]
fn note(msg: &str) {
    eprintln!("docker harness: {msg}");
}

/// Installs Debian `package` unless `binary` is on the PATH (see [`crate::apt::ensure`]: no daemon is started on the
/// host, and Debian's service for it stays off).
pub fn install_if_missing(binary: &str, package: &str) {
    let services: &[&str] = if package == "docker.io" {
        &["docker", "docker.socket"]
    } else {
        &[]
    };
    crate::apt::ensure(&[package], || crate::apt::on_path(binary), services);
}

/// The last `lines` lines of `text`.
fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// `nsenter --net=/var/run/netns/<netns> -- <program>`, marked as belonging to `netns` (see [`MARK_ENV`]).
fn in_netns_command(netns: &str, program: &str) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/var/run/netns/{netns}"))
        .arg("--")
        .arg(program)
        .env(MARK_ENV, netns);
    cmd
}

/// Runs `f` on a thread that entered network namespace `netns` (sockets it opens live there).
fn within_netns<T: Send>(netns: &str, f: impl FnOnce() -> T + Send) -> T {
    let path = format!("/var/run/netns/{netns}");
    std::thread::scope(|s| {
        s.spawn(|| {
            let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            rustix::thread::move_into_link_name_space(
                file.as_fd(),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )
            .unwrap_or_else(|e| panic!("setns({path}, CLONE_NEWNET): {e}"));
            f()
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// SIGTERM or SIGKILL to `pid`; a process already gone is fine.
fn signal(pid: u32, kill: bool) {
    if let Some(pid) = i32::try_from(pid).ok().and_then(rustix::process::Pid::from_raw) {
        let sig = if kill {
            rustix::process::Signal::KILL
        } else {
            rustix::process::Signal::TERM
        };
        let _ = rustix::process::kill_process(pid, sig);
    }
}

/// The pids (other than ours) whose command line mentions `needle`.
fn pids_mentioning(needle: &str) -> Vec<u32> {
    let me = std::process::id();
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != me)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).replace('\0', " ").contains(needle))
        })
        .collect()
}

/// Lazily unmounts every mount point at or below `dir`, deepest first.
fn unmount_below(dir: &Path) {
    let prefix = dir.display().to_string();
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        return;
    };
    let mut points: Vec<&str> = mounts
        .lines()
        .filter_map(|l| l.split(' ').nth(1))
        .filter(|p| *p == prefix || p.starts_with(&format!("{prefix}/")))
        .collect();
    points.sort_by(|a, b| b.cmp(a));
    points.dedup();
    for p in points {
        match Command::new("umount").args(["-l", p]).output() {
            Ok(o) if !o.status.success() => note(&format!(
                "umount -l {p}: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            )),
            Err(e) => note(&format!("umount -l {p}: {e}")),
            _ => {}
        }
    }
}

/// The directories of the cgroup tree `name` (a top-level cgroup) in every hierarchy, parents before children.
fn cgroup_dirs(name: &str) -> Vec<PathBuf> {
    fn walk(dir: PathBuf, out: &mut Vec<PathBuf>) {
        let children: Vec<PathBuf> = std::fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.path())
            .collect();
        out.push(dir);
        for c in children {
            walk(c, out);
        }
    }
    let mut out = Vec::new();
    for hierarchy in std::fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
    {
        let dir = hierarchy.path().join(name);
        if dir.is_dir() {
            walk(dir, &mut out);
        }
    }
    out
}

/// Kills the processes left in the cgroup tree `name` (containers whose daemon died without stopping them) and
/// removes its directories, children first.
fn remove_cgroups(name: &str) {
    let dirs = cgroup_dirs(name);
    let members = || -> Vec<u32> {
        let mut pids: Vec<u32> = dirs
            .iter()
            .filter_map(|d| std::fs::read_to_string(d.join("cgroup.procs")).ok())
            .flat_map(|procs| {
                procs
                    .lines()
                    .filter_map(|l| l.trim().parse().ok())
                    .collect::<Vec<u32>>()
            })
            .collect();
        pids.sort_unstable();
        pids.dedup();
        pids
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let pids = members();
        if pids.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            note(&format!("processes {pids:?} stay in cgroup {name}"));
            break;
        }
        for pid in pids {
            signal(pid, true);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for dir in dirs.iter().rev() {
        let _ = std::fs::remove_dir(dir);
    }
}

/// Removes what crashed runs left in /run: exec roots `/run/oakdk-<pid>-<n>` of processes that are gone, with
/// their mounts and cgroups.
fn sweep_stale_exec_roots() {
    for e in std::fs::read_dir("/run").into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix("oakdk-").and_then(|r| r.split('-').next()) else {
            continue;
        };
        if pid.parse::<u32>().is_err() || Path::new("/proc").join(pid).exists() {
            continue;
        }
        for p in pids_mentioning(&format!("{}/", e.path().display())) {
            signal(p, true);
        }
        unmount_below(&e.path());
        remove_cgroups(&name);
        let _ = std::fs::remove_dir_all(e.path());
    }
}

/// A `dockerd` owned by the test, running in a network namespace of the test's.
#[derive(Debug)]
pub struct Dockerd {
    child: Child,
    dir: PathBuf,
    exec_root: PathBuf,
    /// The tag of the exec root and the cgroup parent: `oakdk-<pid>-<n>`.
    tag: String,
    netns: String,
}

impl Dockerd {
    /// Starts dockerd inside netns `netns` (which must exist), with its data, socket, pid file and log under `dir`
    /// (created; a directory of its own, deleted on drop), and waits until it answers `/_ping`. Installs Debian's
    /// `docker.io` first when `dockerd` is missing.
    pub fn start(netns: &str, dir: &Path) -> Self {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        install_if_missing("dockerd", "docker.io");
        install_if_missing("nsenter", "util-linux");
        assert!(
            Path::new("/var/run/netns").join(netns).exists(),
            "netns {netns} does not exist: create it first (netns::Netns::new)"
        );
        sweep_stale_exec_roots();
        let tag = format!(
            "oakdk-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let exec_root = Path::new("/run").join(&tag);
        unmount_below(dir);
        let _ = std::fs::remove_dir_all(dir);
        let _ = std::fs::remove_dir_all(&exec_root);
        std::fs::create_dir_all(dir.join("client"))
            .unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        std::fs::write(dir.join("daemon.json"), "{}\n").expect("write the daemon config");
        let log = std::fs::File::create(dir.join("dockerd.log")).expect("create the dockerd log");
        let child = in_netns_command(netns, "dockerd")
            .arg("--config-file")
            .arg(dir.join("daemon.json"))
            .arg("--data-root")
            .arg(dir.join("data"))
            .arg("--exec-root")
            .arg(&exec_root)
            .arg("--pidfile")
            .arg(dir.join("dockerd.pid"))
            .arg("--host")
            .arg(format!("unix://{}", dir.join("docker.sock").display()))
            .arg(format!("--cgroup-parent=/{tag}"))
            .arg("--iptables=true")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone the log handle"))
            .stderr(log)
            .spawn()
            .expect("start dockerd through nsenter");
        let mut me = Self {
            child,
            dir: dir.to_owned(),
            exec_root,
            tag,
            netns: netns.to_owned(),
        };
        let deadline = Instant::now() + START_TIMEOUT;
        while !me.ping() {
            if let Ok(Some(status)) = me.child.try_wait() {
                panic!(
                    "dockerd exited ({status}) before answering on {}; its log:\n{}",
                    me.socket().display(),
                    tail(&me.log(), 40)
                );
            }
            assert!(
                Instant::now() < deadline,
                "dockerd did not answer /_ping on {} within {START_TIMEOUT:?}; its log:\n{}",
                me.socket().display(),
                tail(&me.log(), 40)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        me
    }

    /// Whether `GET /_ping` on the socket answers `OK`.
    fn ping(&self) -> bool {
        let Ok(mut s) = UnixStream::connect(self.socket()) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
        if s.write_all(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            .is_err()
        {
            return false;
        }
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        answer.starts_with("HTTP/1.") && answer.contains(" 200 ") && answer.ends_with("OK")
    }

    /// The API socket (`unix://` path), e.g. for `--docker-socket`.
    pub fn socket(&self) -> PathBuf {
        self.dir.join("docker.sock")
    }

    /// The netns it runs in.
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// A docker client command talking to this daemon (`docker -H unix://<socket>`, its own client config
    /// directory); add arguments to it.
    pub fn cli(&self) -> Command {
        let mut cmd = Command::new("docker");
        cmd.arg("-H")
            .arg(format!("unix://{}", self.socket().display()))
            .env("DOCKER_CONFIG", self.dir.join("client"))
            .stdin(Stdio::null());
        cmd
    }

    /// Runs `docker <args>` against this daemon; panics with its stderr on failure; returns stdout.
    pub fn docker(&self, args: &[&str]) -> String {
        output_ok(self.cli().args(args))
    }

    /// `docker load -i <tar>` (a `docker save` archive); panics on failure.
    pub fn load(&self, tar: &Path) {
        output_ok(self.cli().arg("load").arg("-i").arg(tar));
    }

    /// `docker push <image>`, e.g. to the [`Registry`] in the same netns; panics on failure.
    pub fn push(&self, image: &str) {
        self.docker(&["push", image]);
    }

    /// Whether `docker image inspect <image>` finds it locally.
    pub fn has_image(&self, image: &str) -> bool {
        self.cli()
            .args(["image", "inspect", image])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("dockerd.log")).unwrap_or_default()
    }

    fn remove_containers(&self) {
        let Ok(out) = self.cli().args(["ps", "-aq"]).output() else {
            return;
        };
        let ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        if ids.is_empty() {
            return;
        }
        match self.cli().args(["rm", "-f"]).args(&ids).output() {
            Ok(o) if !o.status.success() => note(&format!(
                "docker rm -f: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            )),
            Err(e) => note(&format!("docker rm -f: {e}")),
            _ => {}
        }
    }

    fn stop(&mut self) {
        signal(self.child.id(), false);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        note("dockerd did not stop within 20 s of SIGTERM; killing it");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.remove_containers();
        }
        self.stop();
        // Its containerd and shims if the stop was not clean: their command lines name the exec root.
        for pid in pids_mentioning(&format!("{}/", self.exec_root.display())) {
            signal(pid, true);
        }
        std::thread::sleep(Duration::from_millis(100));
        unmount_below(&self.exec_root);
        unmount_below(&self.dir);
        remove_cgroups(&self.tag);
        for d in [&self.exec_root, &self.dir] {
            if let Err(e) = std::fs::remove_dir_all(d)
                && d.exists()
            {
                note(&format!("remove {}: {e}", d.display()));
            }
        }
    }
}

/// Debian's `docker-registry` serving [`REGISTRY_HOST`] (127.0.0.1:5000) inside a netns of the test's, storage
/// under a directory of its own; stopped and deleted on drop.
#[derive(Debug)]
pub struct Registry {
    child: Child,
    dir: PathBuf,
    netns: String,
}

impl Registry {
    /// Starts the registry inside netns `netns` with its config, storage and log under `dir` (created; deleted on
    /// drop) and waits until `/v2/` answers there. Installs Debian's `docker-registry` first when missing.
    pub fn start(netns: &str, dir: &Path) -> Self {
        install_if_missing("docker-registry", "docker-registry");
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        // The package's own config wants htpasswd auth and :5000 on every address: ours has neither.
        std::fs::write(
            dir.join("config.yml"),
            format!(
                "version: 0.1\nlog: {{level: warn}}\nstorage: {{filesystem: {{rootdirectory: {}}}, delete: {{enabled: true}}}}\nhttp: {{addr: \"{REGISTRY_HOST}\"}}\n",
                dir.join("data").display()
            ),
        )
        .expect("write the registry config");
        let child = in_netns_command(netns, "docker-registry")
            .arg("serve")
            .arg(dir.join("config.yml"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("registry.log")).expect("create the registry log"))
            .spawn()
            .expect("start docker-registry through nsenter");
        let mut me = Self {
            child,
            dir: dir.to_owned(),
            netns: netns.to_owned(),
        };
        let deadline = Instant::now() + START_TIMEOUT;
        while !within_netns(netns, v2_answers) {
            if let Ok(Some(status)) = me.child.try_wait() {
                panic!(
                    "docker-registry exited ({status}) before answering in netns {netns}; its log:\n{}",
                    tail(&me.log(), 40)
                );
            }
            assert!(
                Instant::now() < deadline,
                "docker-registry did not answer /v2/ on {REGISTRY_HOST} in netns {netns} within {START_TIMEOUT:?}; its log:\n{}",
                tail(&me.log(), 40)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        me
    }

    /// `127.0.0.1:5000`: where it listens in its netns.
    pub fn host(&self) -> &str {
        REGISTRY_HOST
    }

    /// The netns it runs in.
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// Pushes `image` (named `127.0.0.1:5000/...`, loaded into `dockerd` in the same netns) here.
    pub fn push(&self, dockerd: &Dockerd, image: &str) {
        assert!(
            image.starts_with(&format!("{REGISTRY_HOST}/")),
            "{image} is not named after this registry ({REGISTRY_HOST}/...)"
        );
        assert_eq!(
            dockerd.netns(),
            self.netns,
            "dockerd and the registry must share a netns"
        );
        dockerd.push(image);
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("registry.log")).unwrap_or_default()
    }
}

/// Whether `GET /v2/` on [`REGISTRY_HOST`] answers 200 (in the calling thread's netns).
fn v2_answers() -> bool {
    let Ok(mut s) = std::net::TcpStream::connect(REGISTRY_HOST) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /v2/ HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut head = [0_u8; 12];
    s.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.") && head.ends_with(b"200")
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The two sample addon images as `docker load` archives: (`addon-hello.docker.tar`, `addon-scheduler.docker.tar`),
/// named [`HELLO_IMAGE`] and [`SCHEDULER_IMAGE`]. Built once per test process by `scripts/images/addons.sh` into
/// `<target>/<profile>/addon-images`, packaging the `oak-sample-scheduler` binary the suite built (`cargo build
/// --bins`).
pub fn addon_images() -> (PathBuf, PathBuf) {
    static IMAGES: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    IMAGES
        .get_or_init(|| {
            let out = target_dir().join("addon-images");
            let script = workspace_root().join("scripts/images/addons.sh");
            output_ok(
                Command::new("bash")
                    .arg(&script)
                    .arg("--out")
                    .arg(&out)
                    .arg("--scheduler")
                    .arg(binary("oak-sample-scheduler")),
            );
            let images = (
                out.join("addon-hello.docker.tar"),
                out.join("addon-scheduler.docker.tar"),
            );
            for tar in [&images.0, &images.1] {
                assert!(
                    tar.is_file(),
                    "{} did not write {}",
                    script.display(),
                    tar.display()
                );
            }
            images
        })
        .clone()
}

/// Where the sample extension's page is published by `examples/addons/hello-extension.json` (and the tests' copy).
pub const HELLO_URL: &str = "http://127.0.0.1:18080/";
/// The line the sample extension's page holds.
pub const HELLO_TEXT: &str = "hello from an oakestra-rs extension";

/// One `GET` of the sample extension's page (2 s at most): its body, or `None` while it does not answer.
pub async fn hello_page() -> Option<String> {
    let r = oakestra_runtime::client::call::<serde_json::Value>(
        "GET".parse().ok()?,
        HELLO_URL,
        None,
        None,
        std::time::Duration::from_secs(2),
    )
    .await
    .ok()?;
    Some(r.body.to_string())
}
