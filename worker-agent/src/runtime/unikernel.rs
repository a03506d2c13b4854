//! The unikernel runtime (`unikernel`, `-u=true`): each instance is one QEMU process, started paused in the
//! instance's network namespace with a tap, moved into its own cgroup (memory and CPU limits), then continued over
//! QMP. A second QMP socket carries the events its watcher reads, so a guest that powers off, panics or resets is
//! reported with that reason. QEMU runs in its own process group and outlives a NodeEngine restart, which adopts
//! it from the instance's `guest.json`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use oakestra_protocol::api::netmanager::ContainerDeployResponse;
use sha2::{Digest as _, Sha256};

use super::{DeployRequest, Ended, Error, Found, Labels, Runtime, TaskState, Usage};
use crate::guest::GuestError;
use crate::guest::image::{self, ImageCache};
use crate::guest::qemu::{self, Accel, GuestAddresses, Nic, Plan, ProbeOutcome};
use crate::guest::qmp::{self, Qmp};
use crate::metrics::{self, CgroupLayout};
use crate::registry::Registry;

/// The virtualization name (the reference's).
pub const NAME: &str = "unikernel";
/// How long QEMU gets to open its monitor after it was spawned.
const QMP_READY: Duration = Duration::from_secs(15);
/// How long the KVM probe guest may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// Memory QEMU itself may use on top of the guest's (TCG's translation cache, device state, I/O buffers).
const QEMU_OVERHEAD_MIB: u64 = 192;
/// The cgroup parent of every guest (`/oakestra-unikernel/<task>`).
const CGROUP_PARENT: &str = "/oakestra-unikernel";
/// Clock ticks per second of `/proc/<pid>/stat` (USER_HZ, 100 on every Linux architecture we run on).
const USER_HZ: u64 = 100;

/// What the runtime runs with.
#[derive(Debug, Clone)]
pub struct UnikernelConfig {
    /// Instances, sockets and the image cache live here (`<state dir>/unikernel`).
    pub dir: PathBuf,
    /// The QEMU binary.
    pub qemu: PathBuf,
    /// `x86_64` or `aarch64`.
    pub arch: String,
    /// The accelerator, and why.
    pub accel: Accel,
    /// Why that accelerator.
    pub accel_reason: String,
    /// Whether `/dev/vhost-net` exists.
    pub vhost: bool,
    /// Downloads (the registry client's TLS roots).
    pub registry: Registry,
    /// The image cache.
    pub cache: ImageCache,
}

/// The QEMU binary for this machine, found in `PATH`.
pub fn find_qemu() -> Option<PathBuf> {
    let name = match std::env::consts::ARCH {
        "x86_64" => "qemu-system-x86_64",
        "aarch64" => "qemu-system-aarch64",
        _ => return None,
    };
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    })
}

/// Probes KVM once: `/dev/kvm` must open, and (on x86) a probe guest must really run on it.
pub async fn probe_accel(qemu: &Path, scratch: &Path) -> (Accel, String) {
    let device = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(|_| ())
        .map_err(|e| e.to_string());
    let outcome = if device.is_ok() && std::env::consts::ARCH == "x86_64" {
        Some(run_probe(qemu, scratch, Accel::Kvm).await)
    } else {
        None
    };
    qemu::decide_accel(device, outcome.as_ref())
}

/// Runs the probe guest with `accel` (KVM for the probe; TCG shows the probe image itself works).
pub async fn run_probe(qemu: &Path, scratch: &Path, accel: Accel) -> ProbeOutcome {
    let image = scratch.join(format!("kvm-probe.{}.bin", std::process::id()));
    if let Err(e) =
        std::fs::create_dir_all(scratch).and_then(|()| std::fs::write(&image, qemu::probe_image()))
    {
        return ProbeOutcome::Refused(format!("cannot write the probe image: {e}"));
    }
    let child = tokio::process::Command::new(qemu)
        .args(qemu::probe_args(&image, accel))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn();
    let outcome = match child {
        Err(e) => ProbeOutcome::Refused(format!("{}: {e}", qemu.display())),
        Ok(child) => match tokio::time::timeout(PROBE_TIMEOUT, child.wait_with_output()).await {
            Err(_) => qemu::probe_verdict(None, ""),
            Ok(Err(e)) => ProbeOutcome::Refused(e.to_string()),
            Ok(Ok(out)) => {
                let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
                text.push('\n');
                text.push_str(&String::from_utf8_lossy(&out.stderr));
                // Killed by a signal (QEMU aborts on some KVM errors): a refusal, not a hang.
                qemu::probe_verdict(Some(out.status.code().unwrap_or(-1)), &text)
            }
        },
    };
    let _ = std::fs::remove_file(&image);
    outcome
}

/// What `guest.json` in an instance's directory holds.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Meta {
    pid: u32,
    labels: Labels,
    netns: Option<String>,
    accel: Accel,
    image: String,
}

/// A guest this runtime knows.
#[derive(Debug)]
struct Guest {
    pid: u32,
    /// QEMU as our child (not after a restart): its exit status.
    child: Option<Arc<tokio::sync::Mutex<tokio::process::Child>>>,
}

/// QEMU behind the [`Runtime`] interface.
#[derive(Debug)]
pub struct UnikernelRuntime {
    cfg: UnikernelConfig,
    cgroups: CgroupLayout,
    guests: Mutex<HashMap<String, Guest>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Whether `pid` is a QEMU of `task` (it could have been reused by another process).
fn is_guest_process(pid: u32, task: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmd| {
        let name = format!("{task},debug-threads=on");
        cmd.split(|b| *b == 0).any(|arg| arg == name.as_bytes())
    }) && !is_zombie(pid)
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

fn signal(pid: u32, sig: rustix::process::Signal) {
    if let Some(p) = i32::try_from(pid).ok().and_then(rustix::process::Pid::from_raw) {
        let _ = rustix::process::kill_process(p, sig);
    }
}

/// CPU time (ns) and resident memory (bytes) of `pid` from `/proc`.
fn proc_usage(pid: u32) -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the command: state is field 3 of the whole line, utime 14, stime 15 → indexes 11 and 12 here.
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0);
    Some((ticks * (1_000_000_000 / USER_HZ), rss_kib * 1024))
}

fn dir_size(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_size(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map(|m| m.len()).unwrap_or(0),
            _ => 0,
        })
        .sum()
}

/// The tail of a log for an error message (QEMU writes its complaints there).
fn log_tail(log: &Path) -> String {
    let tail = metrics::log_tail(log, 400);
    let line = tail
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim()
        .to_owned();
    if line.is_empty() { "no output".into() } else { line }
}

impl UnikernelRuntime {
    /// The runtime; creates its directories.
    pub fn new(cfg: UnikernelConfig) -> Result<Self, GuestError> {
        for d in [cfg.dir.join("instances"), cfg.dir.join("sock")] {
            std::fs::create_dir_all(&d).map_err(|e| GuestError::io(&d, &e))?;
        }
        Ok(Self {
            cfg,
            cgroups: metrics::cgroup_root(),
            guests: Mutex::new(HashMap::new()),
        })
    }

    /// The accelerator guests run with, and why.
    pub fn accel(&self) -> (Accel, &str) {
        (self.cfg.accel, &self.cfg.accel_reason)
    }

    /// The image cache.
    pub fn cache(&self) -> &ImageCache {
        &self.cfg.cache
    }

    fn instance_dir(&self, task: &str) -> PathBuf {
        self.cfg.dir.join("instances").join(task)
    }

    /// The two QMP sockets (control, events): short names, as unix socket paths are limited to 108 bytes.
    fn sockets(&self, task: &str) -> (PathBuf, PathBuf) {
        let h = Sha256::digest(task.as_bytes());
        let key: String = h.iter().take(8).map(|b| format!("{b:02x}")).collect();
        let dir = self.cfg.dir.join("sock");
        (dir.join(format!("{key}.qmp")), dir.join(format!("{key}.ev")))
    }

    fn cgroup_path(task: &str) -> String {
        format!("{CGROUP_PARENT}/{task}")
    }

    fn read_meta(&self, task: &str) -> Option<Meta> {
        let text = std::fs::read_to_string(self.instance_dir(task).join("guest.json")).ok()?;
        serde_json::from_str(&text).ok()
    }

    fn pid_of(&self, task: &str) -> Option<u32> {
        lock(&self.guests)
            .get(task)
            .map(|g| g.pid)
            .or_else(|| self.read_meta(task).map(|m| m.pid))
            .filter(|p| *p > 0)
    }

    /// Puts `pid` into the instance's cgroup with the guest's limits. Failures are logged: the guest runs
    /// without limits rather than not at all.
    fn confine(&self, task: &str, pid: u32, memory_mib: u64, vcpus: u32) {
        let path = Self::cgroup_path(task);
        let limit = (memory_mib + QEMU_OVERHEAD_MIB) * 1024 * 1024;
        let quota = u64::from(vcpus) * 100_000;
        let result = match &self.cgroups {
            CgroupLayout::V2 { root } => (|| {
                let parent = root.join(CGROUP_PARENT.trim_start_matches('/'));
                std::fs::create_dir_all(&parent)?;
                // Controllers must be enabled on the way down; the root usually has them already.
                let _ = std::fs::write(root.join("cgroup.subtree_control"), "+memory +cpu");
                let _ = std::fs::write(parent.join("cgroup.subtree_control"), "+memory +cpu");
                let dir = self.cgroups.dir("", &path);
                std::fs::create_dir_all(&dir)?;
                std::fs::write(dir.join("memory.max"), limit.to_string())?;
                std::fs::write(dir.join("cpu.max"), format!("{quota} 100000"))?;
                std::fs::write(dir.join("cgroup.procs"), pid.to_string())
            })(),
            CgroupLayout::V1 { .. } => (|| {
                let memory = self.cgroups.dir("memory", &path);
                std::fs::create_dir_all(&memory)?;
                std::fs::write(memory.join("memory.limit_in_bytes"), limit.to_string())?;
                std::fs::write(memory.join("cgroup.procs"), pid.to_string())?;
                let cpu = self.cgroups.dir("cpu", &path);
                std::fs::create_dir_all(&cpu)?;
                std::fs::write(cpu.join("cpu.cfs_period_us"), "100000")?;
                std::fs::write(cpu.join("cpu.cfs_quota_us"), quota.to_string())?;
                std::fs::write(cpu.join("cgroup.procs"), pid.to_string())?;
                let acct = self.cgroups.dir("cpuacct", &path);
                if acct != cpu {
                    std::fs::create_dir_all(&acct)?;
                    std::fs::write(acct.join("cgroup.procs"), pid.to_string())?;
                }
                Ok(())
            })(),
        };
        match result {
            Ok(()) => {
                tracing::debug!(task = %task, pid, memory_limit = limit, cpu_quota_us = quota, "guest confined to its cgroup")
            }
            Err(e) => {
                tracing::warn!(task = %task, pid, error = %e, "cannot put the guest's QEMU into a cgroup; it runs without memory and CPU limits")
            }
        }
    }

    fn unconfine(&self, task: &str) {
        let path = Self::cgroup_path(task);
        for controller in ["memory", "cpu", "cpuacct", ""] {
            let dir = self.cgroups.dir(controller, &path);
            if dir.is_dir() {
                let _ = std::fs::remove_dir(&dir);
            }
        }
    }

    /// The overlay attach of a guest: the NetManager's namespace, tap, MAC and addresses.
    async fn attach(&self, req: &DeployRequest<'_>) -> Result<Option<(String, Nic, GuestAddresses)>, Error> {
        let Some(nm) = req.netmanager else {
            return Ok(None);
        };
        let cmd = req.cmd;
        let answer: ContainerDeployResponse = nm
            .attach_unikernel(&cmd.job_name, cmd.instance_number, &cmd.port)
            .await
            .map_err(|e| Error::Overlay(e.to_string()))?;
        let nic = answer.guest.clone().ok_or_else(|| {
            Error::Overlay(
                "the NetManager's /unikernel/deploy answer has no `guest` NIC description (a reference NetManager? \
                 its unikernel layout gives guests no network, oakestra#424); use the oakestra-rs NetManager"
                    .into(),
            )
        })?;
        let bad =
            |what: &str, value: &str| Error::Overlay(format!("the NetManager answered {what} = {value:?}"));
        let v4 = answer
            .ns_ipv4()
            .ok_or_else(|| bad("nsAddress", &answer.ns_address))?;
        let gw4 = nic
            .gateway
            .parse()
            .map_err(|_| bad("guest.gateway", &nic.gateway))?;
        let v6 = match (answer.ns_ipv6(), nic.gateway_v6.parse()) {
            (Some(a), Ok(g)) => Some((a, g, nic.prefix_v6)),
            _ => None,
        };
        Ok(Some((
            nic.netns.clone(),
            Nic {
                tap: nic.tap.clone(),
                mac: nic.mac.clone(),
                vhost: self.cfg.vhost,
                mtu: nic.mtu,
            },
            GuestAddresses {
                v4,
                gw4,
                prefix4: nic.prefix,
                v6,
            },
        )))
    }
}

#[async_trait::async_trait]
impl Runtime for UnikernelRuntime {
    fn name(&self) -> &'static str {
        NAME
    }

    async fn create(&self, req: &DeployRequest<'_>) -> Result<(), Error> {
        let cmd = req.cmd;
        let task = req.task;
        let (memory_mib, vcpus) = qemu::sizes(cmd.memory, cmd.vcpus)?;
        let url = image::pick_url(&cmd.image, &cmd.vm_images, &cmd.arch, &self.cfg.arch)?;
        (req.progress)(&format!("fetching the unikernel image {url}"));
        let report = |got: u64, total: Option<u64>| {
            let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
            let text = match total {
                Some(t) => format!("downloading {url}: {:.1} of {:.1} MiB", mib(got), mib(t)),
                None => format!("downloading {url}: {:.1} MiB", mib(got)),
            };
            (req.progress)(&text);
        };
        let (img, cached) = self.cfg.cache.get(&self.cfg.registry, &url, &report).await?;
        tracing::info!(task = %task, url = %url, digest = %img.digest, cached, "unikernel image ready");
        self.cfg.cache.acquire(&img, task)?;
        let dir = self.instance_dir(task);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| GuestError::io(&dir, &e))?;
        let files = match &img.files {
            Some(src) => {
                // A copy per instance: the guest may write to its share, never to the cache.
                let to = dir.join("files");
                image::copy_tree(src, &to).map_err(|e| GuestError::io(&to, &e))?;
                Some(to)
            }
            None => None,
        };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(req.log)
            .map_err(|e| GuestError::io(req.log, &e))?;
        let net = self.attach(req).await?;
        let (control, events) = self.sockets(task);
        let _ = std::fs::remove_file(&control);
        let _ = std::fs::remove_file(&events);
        let plan = Plan {
            task: task.to_owned(),
            arch: self.cfg.arch.clone(),
            accel: self.cfg.accel,
            memory_mib,
            vcpus,
            kernel: img.kernel.clone(),
            initramfs: img.initramfs.clone(),
            files,
            log: req.log.to_owned(),
            qmp: control.clone(),
            events,
            nic: net.as_ref().map(|(_, nic, _)| nic.clone()),
            addresses: net.as_ref().map(|(_, _, a)| a.clone()),
            cmd: cmd.cmd.clone(),
        };
        let args = plan.args()?;
        let netns = net.map(|(ns, _, _)| ns);
        let mut command = match &netns {
            Some(ns) => {
                let mut c = tokio::process::Command::new("nsenter");
                c.arg(format!("--net=/var/run/netns/{ns}")).arg(&self.cfg.qemu);
                c
            }
            None => tokio::process::Command::new(&self.cfg.qemu),
        };
        let stderr = log.try_clone().map_err(|e| GuestError::io(req.log, &e))?;
        command
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(stderr))
            // Its own process group: a Ctrl-C or SIGTERM to the NodeEngine does not reach the guests, which
            // outlive an agent restart like containers do.
            .process_group(0)
            .kill_on_drop(false);
        tracing::debug!(task = %task, netns = ?netns, args = ?args, "starting QEMU");
        let child = command
            .spawn()
            .map_err(|e| GuestError::Qemu(format!("cannot run {}: {e}", self.cfg.qemu.display())))?;
        let pid = child.id().unwrap_or(0);
        let meta = Meta {
            pid,
            labels: req.labels.clone(),
            netns,
            accel: self.cfg.accel,
            image: url.clone(),
        };
        let meta_path = dir.join("guest.json");
        let written = serde_json::to_vec(&meta)
            .map_err(|e| GuestError::Qemu(e.to_string()))
            .and_then(|b| std::fs::write(&meta_path, b).map_err(|e| GuestError::io(&meta_path, &e)));
        let child = Arc::new(tokio::sync::Mutex::new(child));
        lock(&self.guests).insert(
            task.to_owned(),
            Guest {
                pid,
                child: Some(child.clone()),
            },
        );
        written?;
        // QEMU opens its monitor once the machine is built (paused); an early exit is a start-up failure.
        let ready = tokio::select! {
            q = Qmp::connect_retrying(&control, QMP_READY) => q.map(|_| ()),
            status = async { child.lock().await.wait().await } => Err(GuestError::Qemu(format!(
                "QEMU exited during start-up ({}): {}",
                status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string()),
                log_tail(req.log)
            ))),
        };
        ready?;
        self.confine(task, pid, memory_mib, vcpus);
        Ok(())
    }

    async fn start(&self, task: &str) -> Result<u32, Error> {
        let pid = self
            .pid_of(task)
            .ok_or_else(|| GuestError::NotFound(task.to_owned()))?;
        let (control, _) = self.sockets(task);
        let mut q = Qmp::connect_retrying(&control, QMP_READY).await?;
        q.execute("cont", None).await?;
        let status = q.execute("query-status", None).await?;
        if status.get("running").and_then(serde_json::Value::as_bool) != Some(true) {
            return Err(GuestError::Qemu(format!("the guest does not run after `cont`: {status}")).into());
        }
        Ok(pid)
    }

    async fn wait(&self, task: &str) -> Ended {
        let (_, events) = self.sockets(task);
        let pid = self.pid_of(task);
        let child = lock(&self.guests).get(task).and_then(|g| g.child.clone());
        let alive = || pid.is_some_and(|p| is_guest_process(p, task));
        let ending = loop {
            match Qmp::connect(&events, Duration::from_secs(2)).await {
                Ok(q) => break q.wait_end().await,
                Err(_) if !alive() => break qmp::Ending::Vanished,
                Err(e) => {
                    tracing::debug!(task = %task, error = %e, "guest event socket not ready; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        };
        let status = match child {
            Some(c) => c.lock().await.wait().await.ok().and_then(|s| s.code()),
            None => {
                while alive() {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                None
            }
        };
        let (code, reason) = qmp::exit_of(&ending, status);
        tracing::info!(task = %task, ending = ?ending, qemu_status = ?status, "guest ended");
        Ended {
            code,
            reason: Some(reason),
        }
    }

    async fn stop(&self, task: &str, force: bool) -> Result<(), Error> {
        let pid = self
            .pid_of(task)
            .ok_or_else(|| GuestError::NotFound(task.to_owned()))?;
        if force {
            signal(pid, rustix::process::Signal::KILL);
            return Ok(());
        }
        let (control, _) = self.sockets(task);
        match Qmp::connect(&control, Duration::from_secs(2)).await {
            Ok(mut q) => {
                // QEMU may close the socket before answering `quit`.
                let _ = q.execute("quit", None).await;
            }
            Err(e) => {
                tracing::debug!(task = %task, error = %e, "no QMP for a graceful quit; sending SIGTERM");
                signal(pid, rustix::process::Signal::TERM);
            }
        }
        Ok(())
    }

    async fn remove(&self, task: &str) -> Result<Option<u32>, Error> {
        let known = lock(&self.guests).remove(task);
        let pid = known
            .as_ref()
            .map(|g| g.pid)
            .or_else(|| self.read_meta(task).map(|m| m.pid));
        let mut code = None;
        if let Some(pid) = pid.filter(|p| *p > 0 && is_guest_process(*p, task)) {
            signal(pid, rustix::process::Signal::KILL);
        }
        if let Some(child) = known.and_then(|g| g.child) {
            let mut c = child.lock().await;
            if let Ok(Ok(status)) = tokio::time::timeout(Duration::from_secs(5), c.wait()).await {
                code = status.code().and_then(|c| u32::try_from(c).ok());
            }
        } else if let Some(pid) = pid {
            for _ in 0..50 {
                if !is_guest_process(pid, task) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        self.unconfine(task);
        let (control, events) = self.sockets(task);
        let _ = std::fs::remove_file(control);
        let _ = std::fs::remove_file(events);
        let _ = std::fs::remove_dir_all(self.instance_dir(task));
        self.cfg.cache.release(task);
        let held: Vec<String> = lock(&self.guests).keys().cloned().collect();
        let cache = self.cfg.cache.clone();
        let _ = tokio::task::spawn_blocking(move || cache.gc(&|t| held.iter().any(|h| h == t))).await;
        Ok(code)
    }

    async fn list(&self) -> Result<Vec<Found>, Error> {
        let dir = self.cfg.dir.join("instances");
        let mut out = Vec::new();
        let entries = std::fs::read_dir(&dir).map_err(|e| GuestError::io(&dir, &e))?;
        for entry in entries.flatten() {
            let task = entry.file_name().to_string_lossy().into_owned();
            let Some(meta) = self.read_meta(&task) else {
                // A deploy that died before writing its metadata: nothing runs from it.
                out.push(Found {
                    id: task,
                    labels: Labels::new(),
                    state: TaskState::Missing,
                });
                continue;
            };
            let state = if is_guest_process(meta.pid, &task) {
                lock(&self.guests).entry(task.clone()).or_insert(Guest {
                    pid: meta.pid,
                    child: None,
                });
                TaskState::Alive { pid: meta.pid }
            } else {
                TaskState::Missing
            };
            out.push(Found {
                id: task,
                labels: meta.labels,
                state,
            });
        }
        Ok(out)
    }

    async fn usage(&self, task: &str) -> Option<Usage> {
        let pid = self.pid_of(task)?;
        let path = Self::cgroup_path(task);
        tokio::task::spawn_blocking(move || {
            let (cpu_ns, memory_bytes) = proc_usage(pid)?;
            let oom_kills = metrics::cgroup_stats(&path).map(|s| s.oom_kills).unwrap_or(0);
            Some(Usage {
                cpu_ns,
                memory_bytes,
                oom_kills,
            })
        })
        .await
        .ok()
        .flatten()
    }

    async fn disk_usage(&self, task: &str) -> i64 {
        let dir = self.instance_dir(task);
        tokio::task::spawn_blocking(move || i64::try_from(dir_size(&dir)).unwrap_or(i64::MAX))
            .await
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_usage_reads_this_process() {
        let (cpu, rss) = proc_usage(std::process::id()).unwrap();
        assert!(rss > 0);
        let _ = cpu;
        assert!(!is_guest_process(std::process::id(), "a.b.c.d.instance.0"));
        assert!(is_zombie(u32::MAX));
    }
}
