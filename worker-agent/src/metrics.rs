//! Node and instance metrics: CPU, memory, disk and GPU samples of the node, static system facts, per-instance
//! cgroup statistics (v1 and v2) with their CPU-percent bookkeeping, and the tail of an instance's log.
//!
//! Every parser is a pure function over `&str` and unit-tested; the readers around them are thin and synchronous
//! (small `/proc` and cgroup files): async callers run them in `tokio::task::spawn_blocking`. Nothing here fails
//! loudly: a missing source yields zeros (or `None`) and a `debug` log, because a node that cannot read one counter
//! must still report the others.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tracing::debug;

/// Where the kernel exposes the cgroup hierarchies.
const CGROUP_MOUNT: &str = "/sys/fs/cgroup";
/// How long `nvidia-smi` may take before it is killed and the node reports no GPU.
const NVIDIA_SMI_TIMEOUT: Duration = Duration::from_secs(2);
/// The `nvidia-smi` query whose CSV [`parse_nvidia_smi`] reads.
const NVIDIA_SMI_ARGS: [&str; 2] = [
    "--query-gpu=gpu_name,driver_version,utilization.gpu,memory.used,memory.total,temperature.gpu",
    "--format=csv,noheader,nounits",
];

/// One sample of the node, as the NodeEngine reports it every few seconds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeSample {
    /// Busy share of all CPUs since the previous sample, 0..=100.
    pub cpu_percent: f64,
    /// Logical cores this process may use.
    pub vcpus: i64,
    /// `MemAvailable`, in MiB.
    pub memory_available_mib: i64,
    /// `MemTotal`, in MiB.
    pub memory_total_mib: i64,
    /// Used memory (total minus available) as a share of the total, 0..=100.
    pub memory_percent: f64,
    /// Mount point to used percent; the reference reports the root filesystem only (`"/"`).
    pub disk: BTreeMap<String, f64>,
    /// NVIDIA GPUs (empty without `nvidia-smi`).
    pub gpus: Vec<Gpu>,
}

/// One GPU as `nvidia-smi` describes it. Fields the tool reports as unavailable (`[N/A]`) read as zero.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Gpu {
    /// Product name (`NVIDIA GeForce RTX 3080`).
    pub name: String,
    /// Driver version (`535.104.05`).
    pub driver: String,
    /// Utilisation, 0..=100.
    pub usage_percent: f64,
    /// Memory in use, in MiB.
    pub memory_used_mib: f64,
    /// Memory on the card, in MiB.
    pub memory_total_mib: f64,
    /// Core temperature, in °C.
    pub temperature_c: f64,
}

/// The aggregate CPU counters of `/proc/stat`, in clock ticks since boot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuTimes {
    /// Ticks spent doing work: user, nice, system, irq, softirq, steal (guest time is already inside user/nice).
    pub busy: u64,
    /// `busy` plus idle and iowait.
    pub total: u64,
}

impl CpuTimes {
    /// Busy share of the ticks between `earlier` and `self`, 0..=100; 0 when no tick passed or a counter went
    /// backwards.
    pub fn percent_since(self, earlier: CpuTimes) -> f64 {
        let total = self.total.saturating_sub(earlier.total);
        let busy = self.busy.saturating_sub(earlier.busy);
        if total == 0 {
            return 0.0;
        }
        (ratio(busy, total) * 100.0).clamp(0.0, 100.0)
    }
}

/// Samples the node; remembers the previous `/proc/stat` totals so [`NodeSample::cpu_percent`] covers the time
/// since the previous sample.
#[derive(Debug, Default)]
pub struct NodeSampler {
    previous: Option<CpuTimes>,
}

impl NodeSampler {
    /// A sampler whose first [`Self::sample`] measures the CPU since this call.
    pub fn new() -> Self {
        NodeSampler {
            previous: read_cpu_times(),
        }
    }

    /// Reads every source once. Never fails: a source that cannot be read contributes zeros and a `debug` log.
    pub fn sample(&mut self) -> NodeSample {
        let cpu_percent = match read_cpu_times() {
            Some(now) => {
                // Without a baseline the counters since boot stand in for "since the previous sample".
                let earlier = self.previous.unwrap_or_default();
                self.previous = Some(now);
                now.percent_since(earlier)
            }
            None => 0.0,
        };
        let (total_kib, available_kib) = read_meminfo().unwrap_or((0, 0));
        let memory_percent = if total_kib == 0 {
            0.0
        } else {
            ratio(total_kib - available_kib, total_kib) * 100.0
        };
        let mut disk = BTreeMap::new();
        match rustix::fs::statvfs("/") {
            Ok(vfs) => {
                disk.insert(
                    "/".to_owned(),
                    disk_used_percent(vfs.f_blocks, vfs.f_bfree, vfs.f_bavail),
                );
            }
            Err(err) => {
                debug!(%err, "statvfs / failed; reporting disk usage 0");
                disk.insert("/".to_owned(), 0.0);
            }
        }
        NodeSample {
            cpu_percent,
            vcpus: i64::try_from(logical_cores()).unwrap_or(i64::MAX),
            memory_available_mib: kib_to_mib(available_kib),
            memory_total_mib: kib_to_mib(total_kib),
            memory_percent,
            disk,
            gpus: gpus(),
        }
    }
}

/// Logical cores this process may run on (`std::thread::available_parallelism`), at least 1.
pub fn logical_cores() -> usize {
    match std::thread::available_parallelism() {
        Ok(n) => n.get(),
        Err(err) => {
            debug!(%err, "available_parallelism failed; assuming 1 core");
            1
        }
    }
}

/// The aggregate `cpu` line of `/proc/stat`. `None` when the line is missing or has fewer than the four fields
/// every kernel writes (user, nice, system, idle); later fields a kernel does not write count as zero.
pub fn parse_proc_stat_cpu(text: &str) -> Option<CpuTimes> {
    let line = text
        .lines()
        .find(|line| line.split_whitespace().next() == Some("cpu"))?;
    let fields = line
        .split_whitespace()
        .skip(1)
        .map(str::parse::<u64>)
        .collect::<Result<Vec<_>, _>>()
        .ok()?;
    if fields.len() < 4 {
        return None;
    }
    let field = |i: usize| fields.get(i).copied().unwrap_or(0);
    // user nice system idle iowait irq softirq steal [guest guest_nice: already counted in user and nice]
    let busy = [0, 1, 2, 5, 6, 7]
        .into_iter()
        .fold(0u64, |sum, i| sum.saturating_add(field(i)));
    let idle = field(3).saturating_add(field(4));
    Some(CpuTimes {
        busy,
        total: busy.saturating_add(idle),
    })
}

/// `(MemTotal, MemAvailable)` of `/proc/meminfo`, in kB. Kernels before 3.14 lack `MemAvailable`; there
/// `MemFree + Buffers + Cached` stands in. Available never exceeds total. `None` without `MemTotal`.
pub fn parse_meminfo(text: &str) -> Option<(u64, u64)> {
    let mut total = None;
    let mut available = None;
    let mut free_estimate: Option<u64> = None;
    for line in text.lines() {
        let Some((key, rest)) = line.split_once(':') else {
            continue;
        };
        let Some(value) = rest.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()) else {
            continue;
        };
        match key.trim() {
            "MemTotal" => total = Some(value),
            "MemAvailable" => available = Some(value),
            "MemFree" | "Buffers" | "Cached" => {
                free_estimate = Some(free_estimate.unwrap_or(0).saturating_add(value));
            }
            _ => {}
        }
    }
    let total = total?;
    let available = available.or(free_estimate).unwrap_or(0).min(total);
    Some((total, available))
}

/// Used percent of a filesystem from its `statvfs` block counts, the way `df` computes it: blocks reserved for
/// root count neither as used nor as available, so `used / (used + available)`.
pub fn disk_used_percent(blocks: u64, bfree: u64, bavail: u64) -> f64 {
    let used = blocks.saturating_sub(bfree);
    let usable = used.saturating_add(bavail);
    if usable == 0 {
        return 0.0;
    }
    (ratio(used, usable) * 100.0).clamp(0.0, 100.0)
}

/// The GPUs in the output of `nvidia-smi --query-gpu=gpu_name,driver_version,utilization.gpu,memory.used,
/// memory.total,temperature.gpu --format=csv,noheader,nounits`: one per line of six comma-separated fields.
/// Numbers the tool cannot report (`[N/A]`, `[Not Supported]`, empty) read as 0; a line without six fields, or
/// with a number field that is neither a number nor such a marker, is skipped.
pub fn parse_nvidia_smi(csv: &str) -> Vec<Gpu> {
    csv.lines().filter_map(parse_nvidia_smi_line).collect()
}

fn parse_nvidia_smi_line(line: &str) -> Option<Gpu> {
    let fields: Vec<&str> = line.split(',').map(str::trim).collect();
    let [name, driver, usage, used, total, temperature] = fields.as_slice() else {
        return None;
    };
    if name.is_empty() {
        return None;
    }
    Some(Gpu {
        name: (*name).to_owned(),
        driver: (*driver).to_owned(),
        usage_percent: smi_number(usage)?,
        memory_used_mib: smi_number(used)?,
        memory_total_mib: smi_number(total)?,
        temperature_c: smi_number(temperature)?,
    })
}

/// A numeric `nvidia-smi` field: the number, 0 for an "unavailable" marker, `None` for anything else.
fn smi_number(field: &str) -> Option<f64> {
    if let Ok(value) = field.parse::<f64>() {
        return value.is_finite().then_some(value);
    }
    let unavailable = field.is_empty()
        || (field.starts_with('[') && field.ends_with(']'))
        || field.eq_ignore_ascii_case("N/A");
    unavailable.then_some(0.0)
}

/// The node's NVIDIA GPUs: runs `nvidia-smi` when it is in `PATH` (killed after 2 s); without it, or when it fails,
/// no GPUs.
pub fn gpus() -> Vec<Gpu> {
    let Some(program) = find_in_path("nvidia-smi") else {
        return Vec::new();
    };
    match run_with_timeout(&program, &NVIDIA_SMI_ARGS, NVIDIA_SMI_TIMEOUT) {
        Some(out) => parse_nvidia_smi(&out),
        None => Vec::new(),
    }
}

/// The first executable file called `name` in `PATH`.
fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(path).is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

/// Runs `program args`, returning its standard output when it exits successfully within `timeout`; a program still
/// running at the deadline is killed.
fn run_with_timeout(program: &Path, args: &[&str], timeout: Duration) -> Option<String> {
    let mut child = match Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
    {
        Ok(child) => child,
        Err(err) => {
            debug!(program = %program.display(), %err, "cannot start");
            return None;
        }
    };
    // Drain the pipe on a thread so a chatty program cannot block on a full pipe while we wait for it.
    let reader = child.stdout.take().map(|mut stdout| {
        std::thread::spawn(move || {
            let mut out = Vec::new();
            let _ = stdout.read_to_end(&mut out);
            out
        })
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                debug!(program = %program.display(), "timed out; killing it");
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Err(err) => {
                debug!(program = %program.display(), %err, "wait failed");
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    // The child is gone (exited or killed and reaped), so the pipe's write end is closed and the reader finishes.
    let out = reader.and_then(|handle| handle.join().ok()).unwrap_or_default();
    match status {
        Some(status) if status.success() => Some(String::from_utf8_lossy(&out).into_owned()),
        Some(status) => {
            debug!(program = %program.display(), %status, "failed");
            None
        }
        None => None,
    }
}

/// Static facts about the node, sent when it registers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SystemInfo {
    /// Kernel release (`6.1.0-18-amd64`).
    pub kernel_version: String,
    /// `PRETTY_NAME` of `/etc/os-release` (`Debian GNU/Linux 12 (bookworm)`).
    pub os_version: String,
    /// Architecture in Go's `GOARCH` naming (see [`goarch`]).
    pub architecture: String,
    /// Seconds since boot.
    pub uptime_secs: u64,
    /// The node's host name.
    pub hostname: String,
}

/// Reads [`SystemInfo`]; a fact that cannot be read is empty (or 0) and logged at `debug`.
pub fn system_info() -> SystemInfo {
    let os_release = read_text("/etc/os-release").or_else(|| read_text("/usr/lib/os-release"));
    SystemInfo {
        kernel_version: read_text("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_owned())
            .unwrap_or_default(),
        os_version: os_release
            .as_deref()
            .and_then(parse_os_release_pretty_name)
            .unwrap_or_default(),
        architecture: goarch().to_owned(),
        uptime_secs: read_text("/proc/uptime")
            .as_deref()
            .and_then(parse_uptime)
            .unwrap_or(0),
        hostname: read_text("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_owned())
            .unwrap_or_default(),
    }
}

/// `PRETTY_NAME` of an os-release file, unquoted (double or single quotes, backslash escapes inside double quotes).
pub fn parse_os_release_pretty_name(text: &str) -> Option<String> {
    let value = text
        .lines()
        .filter_map(|line| line.trim().strip_prefix("PRETTY_NAME="))
        .next_back()?;
    let value = value.trim();
    let unquoted = if let Some(inner) = value.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
        let mut out = String::with_capacity(inner.len());
        let mut chars = inner.chars();
        while let Some(c) = chars.next() {
            if c == '\\' {
                if let Some(escaped) = chars.next() {
                    out.push(escaped);
                }
            } else {
                out.push(c);
            }
        }
        out
    } else if let Some(inner) = value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')) {
        inner.to_owned()
    } else {
        value.to_owned()
    };
    Some(unquoted)
}

/// Whole seconds since boot from `/proc/uptime` (`"350735.47 234388.90"`).
pub fn parse_uptime(text: &str) -> Option<u64> {
    let first = text.split_whitespace().next()?;
    let whole = first.split_once('.').map_or(first, |(whole, _)| whole);
    whole.parse().ok()
}

/// This build's architecture in Go's `GOARCH` naming, which the reference reports (`amd64`, `arm64`, `arm`, `386`,
/// `riscv64`, …); an architecture Go has no name for keeps Rust's name.
pub fn goarch() -> &'static str {
    let little = cfg!(target_endian = "little");
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "x86" => "386",
        "aarch64" => "arm64",
        "arm" => "arm",
        "riscv64" => "riscv64",
        "loongarch64" => "loong64",
        "s390x" => "s390x",
        "powerpc64" if little => "ppc64le",
        "powerpc64" => "ppc64",
        "powerpc" => "ppc",
        "mips" if little => "mipsle",
        "mips" => "mips",
        "mips64" if little => "mips64le",
        "mips64" => "mips64",
        "wasm32" => "wasm",
        other => other,
    }
}

/// Which cgroup hierarchy the node runs, and where it is mounted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupLayout {
    /// One hierarchy per controller: `<root>/<controller>/<cgroup path>` (hybrid systems count as v1, as runc
    /// treats them).
    V1 {
        /// The directory holding the controller mounts (`/sys/fs/cgroup`).
        root: PathBuf,
    },
    /// The unified hierarchy: `<root>/<cgroup path>`.
    V2 {
        /// The unified mount (`/sys/fs/cgroup`).
        root: PathBuf,
    },
}

impl CgroupLayout {
    /// The layout mounted at `root`: v2 when `root/cgroup.controllers` exists, v1 otherwise.
    pub fn detect(root: &Path) -> Self {
        if root.join("cgroup.controllers").exists() {
            CgroupLayout::V2 {
                root: root.to_path_buf(),
            }
        } else {
            CgroupLayout::V1 {
                root: root.to_path_buf(),
            }
        }
    }

    /// The directory of `cgroup_path` (`/oakestra/<id>`) for `controller` (ignored on v2, where one directory holds
    /// every controller's files).
    pub fn dir(&self, controller: &str, cgroup_path: &str) -> PathBuf {
        let relative = cgroup_path.trim_start_matches('/');
        match self {
            CgroupLayout::V1 { root } => root.join(controller).join(relative),
            CgroupLayout::V2 { root } => root.join(relative),
        }
    }
}

/// The cgroup layout of this node, mounted at `/sys/fs/cgroup`.
pub fn cgroup_root() -> CgroupLayout {
    CgroupLayout::detect(Path::new(CGROUP_MOUNT))
}

/// Resource use of one instance, read from its cgroup.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CgroupStats {
    /// CPU time used since the cgroup was created, in nanoseconds.
    pub cpu_usage_ns: u64,
    /// Memory charged to the cgroup now (v1 `memory.usage_in_bytes`, v2 `memory.current`; page cache included).
    pub memory_bytes: u64,
    /// The memory limit; `None` when unlimited.
    pub memory_limit_bytes: Option<u64>,
    /// How often the kernel's OOM killer killed a process of this cgroup (v1 needs kernel ≥ 4.13, else 0).
    pub oom_kills: u64,
}

/// The stats of the cgroup at `cgroup_path` (runc's `linux.cgroupsPath`, `/oakestra/<id>`) on this node's layout.
/// `None` when neither its CPU nor its memory usage can be read (no such cgroup); otherwise a file that cannot be
/// read counts as 0 (or no limit).
pub fn cgroup_stats(cgroup_path: &str) -> Option<CgroupStats> {
    cgroup_stats_in(&cgroup_root(), cgroup_path)
}

/// [`cgroup_stats`] on an explicit layout.
pub fn cgroup_stats_in(layout: &CgroupLayout, cgroup_path: &str) -> Option<CgroupStats> {
    match layout {
        CgroupLayout::V1 { root } => {
            // `cpuacct` is a symlink to `cpu,cpuacct` where the two are co-mounted; without the link only the
            // combined directory exists.
            let cpu = ["cpuacct", "cpu,cpuacct"].into_iter().find_map(|controller| {
                read_text(layout.dir(controller, cgroup_path).join("cpuacct.usage"))
                    .as_deref()
                    .and_then(parse_u64)
            });
            let memory = layout.dir("memory", cgroup_path);
            let usage = read_text(memory.join("memory.usage_in_bytes"))
                .as_deref()
                .and_then(parse_u64);
            if cpu.is_none() && usage.is_none() {
                debug!(root = %root.display(), cgroup_path, "no v1 cgroup stats");
                return None;
            }
            Some(CgroupStats {
                cpu_usage_ns: cpu.unwrap_or(0),
                memory_bytes: usage.unwrap_or(0),
                memory_limit_bytes: read_text(memory.join("memory.limit_in_bytes"))
                    .as_deref()
                    .and_then(parse_v1_limit),
                oom_kills: read_text(memory.join("memory.oom_control"))
                    .as_deref()
                    .and_then(|text| parse_flat_keyed(text, "oom_kill"))
                    .unwrap_or(0),
            })
        }
        CgroupLayout::V2 { root } => {
            let dir = layout.dir("", cgroup_path);
            let cpu = read_text(dir.join("cpu.stat"))
                .as_deref()
                .and_then(|text| parse_flat_keyed(text, "usage_usec"))
                .map(|usec| usec.saturating_mul(1000));
            let usage = read_text(dir.join("memory.current"))
                .as_deref()
                .and_then(parse_u64);
            if cpu.is_none() && usage.is_none() {
                debug!(root = %root.display(), cgroup_path, "no v2 cgroup stats");
                return None;
            }
            Some(CgroupStats {
                cpu_usage_ns: cpu.unwrap_or(0),
                memory_bytes: usage.unwrap_or(0),
                memory_limit_bytes: read_text(dir.join("memory.max"))
                    .as_deref()
                    .and_then(parse_v2_max),
                oom_kills: read_text(dir.join("memory.events"))
                    .as_deref()
                    .and_then(|text| parse_flat_keyed(text, "oom_kill"))
                    .unwrap_or(0),
            })
        }
    }
}

/// A cgroup file holding one unsigned number (`cpuacct.usage`, `memory.current`, …).
pub fn parse_u64(text: &str) -> Option<u64> {
    text.trim().parse().ok()
}

/// The value of `key` in a flat keyed cgroup file (`key value` per line: `cpu.stat`, `memory.events`,
/// `memory.oom_control`, `memory.stat`).
pub fn parse_flat_keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let mut parts = line.split_whitespace();
        (parts.next() == Some(key))
            .then(|| parts.next())
            .flatten()
            .and_then(|v| v.parse().ok())
    })
}

/// A v1 `memory.limit_in_bytes`; `None` for the "unlimited" value, which is the page counter's maximum times the
/// page size: about 2^63 on 64-bit kernels, `(2^31 - 1) × page size` on 32-bit ones.
pub fn parse_v1_limit(text: &str) -> Option<u64> {
    const THIRTY_TWO_BIT_MAX_PAGES: u64 = (1 << 31) - 1;
    let value = parse_u64(text)?;
    let unlimited = value >= 1 << 62
        || [4096u64, 16384, 65536]
            .into_iter()
            .any(|page| value == THIRTY_TWO_BIT_MAX_PAGES * page);
    (!unlimited).then_some(value)
}

/// A v2 `memory.max`; `None` for `max` (unlimited).
pub fn parse_v2_max(text: &str) -> Option<u64> {
    match text.trim() {
        "max" => None,
        other => other.parse().ok(),
    }
}

/// Turns each instance's cumulative CPU time into a share of the whole node: the CPU time used since the previous
/// reading over the wall time since then, divided by the node's logical cores (the reference sums each process's
/// CPU percent and divides by the cores).
#[derive(Debug, Default)]
pub struct CpuTracker {
    previous: HashMap<String, (u64, Instant)>,
}

impl CpuTracker {
    /// A tracker that knows no instance.
    pub fn new() -> Self {
        CpuTracker::default()
    }

    /// The CPU share of the node (0..=100) instance `id` used since its previous reading, given its cumulative
    /// `cpu_usage_ns` read at `now`. The first reading of an instance, a reading no later than the previous one and
    /// a counter that went backwards (the instance was recreated) give 0 and start over.
    pub fn percent(&mut self, id: &str, cpu_usage_ns: u64, now: Instant, cores: usize) -> f64 {
        let previous = self.previous.insert(id.to_owned(), (cpu_usage_ns, now));
        let Some((earlier_ns, earlier)) = previous else {
            return 0.0;
        };
        let wall_ns = now.saturating_duration_since(earlier).as_nanos();
        if wall_ns == 0 || cpu_usage_ns < earlier_ns {
            return 0.0;
        }
        let used_ns = cpu_usage_ns - earlier_ns;
        let cores = cores.max(1) as f64;
        (used_ns as f64 / wall_ns as f64 * 100.0 / cores).clamp(0.0, 100.0)
    }

    /// Drops what the tracker remembers about `id` (the instance is gone).
    pub fn forget(&mut self, id: &str) {
        self.previous.remove(id);
    }
}

/// The last `max_bytes` of the file at `path` as text (invalid UTF-8 replaced; a character cut in half at the
/// start is dropped). A missing or unreadable file gives `""`.
pub fn log_tail(path: &Path, max_bytes: u64) -> String {
    match read_tail(path, max_bytes) {
        Ok(bytes) => tail_text(&bytes, max_bytes),
        Err(err) => {
            debug!(path = %path.display(), %err, "cannot read log");
            String::new()
        }
    }
}

fn read_tail(path: &Path, max_bytes: u64) -> std::io::Result<Vec<u8>> {
    let mut file = fs::File::open(path)?;
    let len = file.metadata()?.len();
    let start = len.saturating_sub(max_bytes);
    file.seek(SeekFrom::Start(start))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// The last `max_bytes` of `bytes` as text: leading UTF-8 continuation bytes (the rest of a character cut off by
/// the window) are dropped, other invalid sequences replaced.
pub fn tail_text(bytes: &[u8], max_bytes: u64) -> String {
    let keep = usize::try_from(max_bytes).unwrap_or(usize::MAX).min(bytes.len());
    let window = &bytes[bytes.len() - keep..];
    // A UTF-8 character is at most 4 bytes, so at most 3 continuation bytes can lead the window.
    let cut = window
        .iter()
        .take(3)
        .take_while(|&&b| b & 0b1100_0000 == 0b1000_0000)
        .count();
    String::from_utf8_lossy(&window[cut..]).into_owned()
}

fn read_cpu_times() -> Option<CpuTimes> {
    let times = read_text("/proc/stat").as_deref().and_then(parse_proc_stat_cpu);
    if times.is_none() {
        debug!("no cpu line in /proc/stat; reporting cpu 0");
    }
    times
}

fn read_meminfo() -> Option<(u64, u64)> {
    let mem = read_text("/proc/meminfo").as_deref().and_then(parse_meminfo);
    if mem.is_none() {
        debug!("no MemTotal in /proc/meminfo; reporting memory 0");
    }
    mem
}

/// A small file's text; `None` (and a `debug` log) when it cannot be read.
fn read_text(path: impl AsRef<Path>) -> Option<String> {
    let path = path.as_ref();
    match fs::read_to_string(path) {
        Ok(text) => Some(text),
        Err(err) => {
            debug!(path = %path.display(), %err, "cannot read");
            None
        }
    }
}

fn kib_to_mib(kib: u64) -> i64 {
    i64::try_from(kib / 1024).unwrap_or(i64::MAX)
}

/// `part / whole` as a float (callers ensure `whole > 0`).
fn ratio(part: u64, whole: u64) -> f64 {
    part as f64 / whole as f64
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    const PROC_STAT: &str = "\
cpu  10132153 290696 3084719 46828483 16683 0 25195 0 175628 0
cpu0 1393280 32966 572056 13343292 6130 0 17875 0 23933 0
cpu1 1335186 32426 436218 13442931 6183 0 1856 0 25321 0
intr 199292243 38 0 0 0
ctxt 4135263232
btime 1700000000
processes 2335416
";

    #[test]
    fn proc_stat_aggregate_line() {
        let t = parse_proc_stat_cpu(PROC_STAT).unwrap();
        // busy: user + nice + system + irq + softirq + steal; guest (175628) is inside user already.
        let busy = 10132153 + 290696 + 3084719 + 25195;
        assert_eq!(t.busy, busy);
        assert_eq!(t.total, busy + 46828483 + 16683);
    }

    #[test]
    fn proc_stat_old_kernel_four_fields() {
        let t = parse_proc_stat_cpu("cpu 10 20 30 40\n").unwrap();
        assert_eq!(t, CpuTimes { busy: 60, total: 100 });
    }

    #[test]
    fn proc_stat_rejects_garbage() {
        assert_eq!(parse_proc_stat_cpu(""), None);
        assert_eq!(
            parse_proc_stat_cpu("cpu0 1 2 3 4\n"),
            None,
            "per-cpu lines are not the aggregate"
        );
        assert_eq!(parse_proc_stat_cpu("cpu 1 2 3\n"), None);
        assert_eq!(parse_proc_stat_cpu("cpu 1 2 x 4\n"), None);
    }

    #[test]
    fn cpu_percent_between_samples() {
        let a = CpuTimes {
            busy: 100,
            total: 1000,
        };
        let b = CpuTimes {
            busy: 350,
            total: 2000,
        };
        assert!((b.percent_since(a) - 25.0).abs() < 1e-9);
        assert_eq!(a.percent_since(a), 0.0, "no tick passed");
        assert_eq!(a.percent_since(b), 0.0, "counters went backwards");
        let all_busy = CpuTimes {
            busy: 1100,
            total: 2000,
        };
        assert!((all_busy.percent_since(a) - 100.0).abs() < 1e-9);
    }

    #[test]
    fn meminfo_total_and_available() {
        let text = "\
MemTotal:       16318412 kB
MemFree:          512000 kB
MemAvailable:    8123456 kB
Buffers:          100000 kB
Cached:          4000000 kB
SwapTotal:             0 kB
HugePages_Total:       0
";
        assert_eq!(parse_meminfo(text), Some((16318412, 8123456)));
    }

    #[test]
    fn meminfo_without_available_estimates_it() {
        let text = "MemTotal: 1000 kB\nMemFree: 100 kB\nBuffers: 20 kB\nCached: 300 kB\n";
        assert_eq!(parse_meminfo(text), Some((1000, 420)));
        assert_eq!(parse_meminfo("MemTotal: 1000 kB\n"), Some((1000, 0)));
    }

    #[test]
    fn meminfo_clamps_and_rejects() {
        assert_eq!(
            parse_meminfo("MemTotal: 10 kB\nMemAvailable: 20 kB\n"),
            Some((10, 10))
        );
        assert_eq!(parse_meminfo("MemFree: 10 kB\n"), None);
        assert_eq!(parse_meminfo("garbage\nMemTotal: lots\n"), None);
    }

    #[test]
    fn disk_percent_like_df() {
        // 1000 blocks, 400 free of which 350 available to users: 600 used of 950 usable.
        let p = disk_used_percent(1000, 400, 350);
        assert!((p - 600.0 / 950.0 * 100.0).abs() < 1e-9);
        assert_eq!(disk_used_percent(0, 0, 0), 0.0);
        assert_eq!(disk_used_percent(100, 0, 0), 100.0);
        assert_eq!(disk_used_percent(100, 100, 100), 0.0);
    }

    #[test]
    fn nvidia_smi_csv() {
        let csv = "\
NVIDIA GeForce RTX 3080, 535.104.05, 37, 2048, 10240, 61
Tesla T4, 470.57.02, [N/A], 0, 15360, [Not Supported]
No devices were found
NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.
Broken, 1.0, lots, 1, 2, 3
, 1.0, 1, 1, 2, 3
Too, few, 1, 2

Jetson, 1.2, 5.5, 100.25, 200, 40.5
";
        let gpus = parse_nvidia_smi(csv);
        assert_eq!(gpus.len(), 3, "{gpus:?}");
        assert_eq!(
            gpus[0],
            Gpu {
                name: "NVIDIA GeForce RTX 3080".into(),
                driver: "535.104.05".into(),
                usage_percent: 37.0,
                memory_used_mib: 2048.0,
                memory_total_mib: 10240.0,
                temperature_c: 61.0,
            }
        );
        assert_eq!(gpus[1].name, "Tesla T4");
        assert_eq!(gpus[1].usage_percent, 0.0);
        assert_eq!(gpus[1].memory_total_mib, 15360.0);
        assert_eq!(gpus[1].temperature_c, 0.0);
        assert_eq!(gpus[2].usage_percent, 5.5);
        assert_eq!(gpus[2].memory_used_mib, 100.25);
        assert!(parse_nvidia_smi("").is_empty());
    }

    #[test]
    fn nvidia_smi_crlf_and_nan() {
        let gpus = parse_nvidia_smi("A, 1, 2, 3, 4, 5\r\nB, 1, NaN, 3, 4, 5\r\n");
        assert_eq!(gpus.len(), 1);
        assert_eq!(gpus[0].temperature_c, 5.0);
    }

    #[test]
    fn os_release_pretty_name() {
        let text = "NAME=\"Debian GNU/Linux\"\nPRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nID=debian\n";
        assert_eq!(
            parse_os_release_pretty_name(text).unwrap(),
            "Debian GNU/Linux 12 (bookworm)"
        );
        assert_eq!(
            parse_os_release_pretty_name("PRETTY_NAME=Alpine\n").unwrap(),
            "Alpine"
        );
        assert_eq!(
            parse_os_release_pretty_name("PRETTY_NAME='Arch Linux'\n").unwrap(),
            "Arch Linux"
        );
        assert_eq!(
            parse_os_release_pretty_name("PRETTY_NAME=\"say \\\"hi\\\"\"\n").unwrap(),
            "say \"hi\""
        );
        assert_eq!(parse_os_release_pretty_name("NAME=x\n"), None);
    }

    #[test]
    fn uptime_whole_seconds() {
        assert_eq!(parse_uptime("350735.47 234388.90\n"), Some(350735));
        assert_eq!(parse_uptime("12 3\n"), Some(12));
        assert_eq!(parse_uptime(""), None);
        assert_eq!(parse_uptime("x.5 1"), None);
    }

    #[test]
    fn goarch_of_this_build() {
        let expected = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            other => other,
        };
        if ["x86_64", "aarch64", "arm", "riscv64"].contains(&std::env::consts::ARCH) {
            assert_eq!(goarch(), expected);
        }
    }

    #[test]
    fn cgroup_layout_dirs() {
        let v1 = CgroupLayout::V1 {
            root: "/sys/fs/cgroup".into(),
        };
        assert_eq!(
            v1.dir("memory", "/oakestra/abc"),
            Path::new("/sys/fs/cgroup/memory/oakestra/abc")
        );
        let v2 = CgroupLayout::V2 {
            root: "/sys/fs/cgroup".into(),
        };
        assert_eq!(
            v2.dir("memory", "/oakestra/abc"),
            Path::new("/sys/fs/cgroup/oakestra/abc")
        );
    }

    #[test]
    fn cgroup_layout_detection() {
        let dir = std::env::temp_dir().join(format!("oakestra-metrics-layout-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        assert!(matches!(CgroupLayout::detect(&dir), CgroupLayout::V1 { .. }));
        fs::write(dir.join("cgroup.controllers"), "cpu memory pids\n").unwrap();
        assert!(matches!(CgroupLayout::detect(&dir), CgroupLayout::V2 { .. }));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn v1_files() {
        assert_eq!(parse_u64("9172860222600\n"), Some(9172860222600));
        assert_eq!(parse_u64("x\n"), None);
        assert_eq!(parse_v1_limit("33554432\n"), Some(33554432));
        assert_eq!(
            parse_v1_limit("9223372036854771712\n"),
            None,
            "64-bit, 4 KiB pages"
        );
        assert_eq!(
            parse_v1_limit("9223372036854710272\n"),
            None,
            "64-bit, 64 KiB pages"
        );
        assert_eq!(parse_v1_limit("8796093018112\n"), None, "32-bit, 4 KiB pages");
        let oom_control = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n";
        assert_eq!(parse_flat_keyed(oom_control, "oom_kill"), Some(3));
        assert_eq!(parse_flat_keyed(oom_control, "oom_kill_disable"), Some(0));
        // Before kernel 4.13 there is no oom_kill line.
        assert_eq!(
            parse_flat_keyed("oom_kill_disable 0\nunder_oom 0\n", "oom_kill"),
            None
        );
    }

    #[test]
    fn v2_files() {
        let cpu_stat = "usage_usec 1234567\nuser_usec 1000000\nsystem_usec 234567\nnr_periods 0\n";
        assert_eq!(parse_flat_keyed(cpu_stat, "usage_usec"), Some(1234567));
        assert_eq!(parse_v2_max("max\n"), None);
        assert_eq!(parse_v2_max("33554432\n"), Some(33554432));
        assert_eq!(parse_v2_max("junk\n"), None);
        let events = "low 0\nhigh 0\nmax 12\noom 2\noom_kill 2\noom_group_kill 0\n";
        assert_eq!(parse_flat_keyed(events, "oom_kill"), Some(2));
        assert_eq!(parse_flat_keyed(events, "oom"), Some(2));
        assert_eq!(parse_flat_keyed(events, "missing"), None);
    }

    /// A fake cgroup tree in a temporary directory, read through `cgroup_stats_in`.
    struct FakeTree(PathBuf);

    impl FakeTree {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("oakestra-metrics-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            FakeTree(dir)
        }

        fn write(&self, relative: &str, text: &str) {
            let path = self.0.join(relative);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, text).unwrap();
        }
    }

    impl Drop for FakeTree {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn stats_from_a_v1_tree() {
        let tree = FakeTree::new("v1");
        tree.write("cpuacct/oakestra/x/cpuacct.usage", "5000\n");
        tree.write("memory/oakestra/x/memory.usage_in_bytes", "4096\n");
        tree.write("memory/oakestra/x/memory.limit_in_bytes", "9223372036854771712\n");
        tree.write(
            "memory/oakestra/x/memory.oom_control",
            "oom_kill_disable 0\nunder_oom 0\noom_kill 1\n",
        );
        let layout = CgroupLayout::V1 { root: tree.0.clone() };
        let stats = cgroup_stats_in(&layout, "/oakestra/x").unwrap();
        assert_eq!(
            stats,
            CgroupStats {
                cpu_usage_ns: 5000,
                memory_bytes: 4096,
                memory_limit_bytes: None,
                oom_kills: 1,
            }
        );
        assert_eq!(cgroup_stats_in(&layout, "/oakestra/missing"), None);
        // Co-mounted cpu and cpuacct without the `cpuacct` symlink.
        tree.write("cpu,cpuacct/oakestra/y/cpuacct.usage", "7\n");
        let stats = cgroup_stats_in(&layout, "/oakestra/y").unwrap();
        assert_eq!(stats.cpu_usage_ns, 7);
        assert_eq!(stats.memory_bytes, 0);
    }

    #[test]
    fn stats_from_a_v2_tree() {
        let tree = FakeTree::new("v2");
        tree.write(
            "oakestra/x/cpu.stat",
            "usage_usec 250\nuser_usec 200\nsystem_usec 50\n",
        );
        tree.write("oakestra/x/memory.current", "8192\n");
        tree.write("oakestra/x/memory.max", "33554432\n");
        tree.write(
            "oakestra/x/memory.events",
            "low 0\nhigh 0\nmax 4\noom 1\noom_kill 1\n",
        );
        let layout = CgroupLayout::V2 { root: tree.0.clone() };
        let stats = cgroup_stats_in(&layout, "oakestra/x").unwrap();
        assert_eq!(
            stats,
            CgroupStats {
                cpu_usage_ns: 250_000,
                memory_bytes: 8192,
                memory_limit_bytes: Some(33554432),
                oom_kills: 1,
            }
        );
        tree.write("oakestra/x/memory.max", "max\n");
        assert_eq!(
            cgroup_stats_in(&layout, "/oakestra/x")
                .unwrap()
                .memory_limit_bytes,
            None
        );
        assert_eq!(cgroup_stats_in(&layout, "/oakestra/missing"), None);
    }

    #[test]
    fn cpu_tracker_math() {
        let mut tracker = CpuTracker::new();
        let t0 = Instant::now();
        assert_eq!(tracker.percent("a", 1_000_000_000, t0, 4), 0.0, "first reading");
        // One full core for one second on a 4-core node: 25 % of the node.
        let t1 = t0 + Duration::from_secs(1);
        assert!((tracker.percent("a", 2_000_000_000, t1, 4) - 25.0).abs() < 1e-9);
        // Half a core for two seconds on 2 cores: 25 %.
        let t2 = t1 + Duration::from_secs(2);
        assert!((tracker.percent("a", 3_000_000_000, t2, 2) - 25.0).abs() < 1e-9);
        // Same instant: no wall time passed.
        assert_eq!(tracker.percent("a", 4_000_000_000, t2, 2), 0.0);
        // Counter went backwards (recreated): 0 and start over from the new value.
        let t3 = t2 + Duration::from_secs(1);
        assert_eq!(tracker.percent("a", 10, t3, 2), 0.0);
        let t4 = t3 + Duration::from_secs(1);
        assert!((tracker.percent("a", 10 + 500_000_000, t4, 1) - 50.0).abs() < 1e-9);
        // More than the node (clock skew between reads) is clamped; zero cores count as one.
        let t5 = t4 + Duration::from_millis(100);
        assert_eq!(tracker.percent("a", 10 + 5_000_000_000, t5, 0), 100.0);
        // Instances are independent; forgetting one restarts it.
        assert_eq!(tracker.percent("b", 5, t5, 2), 0.0);
        tracker.forget("a");
        assert_eq!(
            tracker.percent("a", 20_000_000_000, t5 + Duration::from_secs(1), 2),
            0.0
        );
    }

    #[test]
    fn tail_text_windows() {
        assert_eq!(tail_text(b"hello world", 5), "world");
        assert_eq!(tail_text(b"hi", 1024), "hi");
        assert_eq!(tail_text(b"", 10), "");
        // "é" is C3 A9: a window starting at A9 drops the half character instead of printing U+FFFD.
        assert_eq!(tail_text("aé!".as_bytes(), 2), "!");
        assert_eq!(tail_text("€x".as_bytes(), 3), "x");
        assert_eq!(tail_text(b"a\xffb", 3), "a\u{fffd}b");
    }

    #[test]
    fn log_tail_of_files() {
        let dir = std::env::temp_dir().join(format!("oakestra-metrics-log-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("app.log");
        let text: String = (0..500).map(|i| format!("line {i}\n")).collect();
        fs::write(&path, &text).unwrap();
        let tail = log_tail(&path, 1024);
        assert_eq!(tail.len(), 1024);
        assert!(text.ends_with(&tail));
        assert_eq!(log_tail(&path, 1 << 20), text);
        assert_eq!(log_tail(&dir.join("missing.log"), 1024), "");
        fs::remove_dir_all(&dir).unwrap();
    }
}
