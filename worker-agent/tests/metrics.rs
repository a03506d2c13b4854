#![allow(clippy::unwrap_used, reason = "tests")]
//! `metrics` against the real host: the node sampler, and the stats of a real cgroup (created, filled, OOM-killed
//! and removed again). Needs root.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use oakestra_worker_agent::metrics::{
    self, CgroupLayout, CgroupStats, CpuTracker, NodeSampler, cgroup_root, cgroup_stats,
};

const LIMIT: u64 = 32 << 20;

#[test]
fn node_sampler_on_this_host() {
    let mut sampler = NodeSampler::new();
    let first = sampler.sample();
    let cores = std::thread::available_parallelism().unwrap().get();
    assert_eq!(first.vcpus, i64::try_from(cores).unwrap());
    assert!(first.memory_total_mib > 0, "{first:?}");
    assert!(first.memory_available_mib <= first.memory_total_mib, "{first:?}");
    assert!((0.0..=100.0).contains(&first.memory_percent), "{first:?}");
    let disk = first.disk.get("/").copied().unwrap();
    assert!((0.0..=100.0).contains(&disk), "{first:?}");
    assert!((0.0..=100.0).contains(&first.cpu_percent), "{first:?}");

    let deadline = Instant::now() + Duration::from_millis(300);
    let mut spin = 0u64;
    while Instant::now() < deadline {
        spin = std::hint::black_box(spin.wrapping_add(1));
    }
    let second = sampler.sample();
    assert!((0.0..=100.0).contains(&second.cpu_percent), "{second:?}");
    assert!(
        second.cpu_percent > 0.0,
        "a busy loop ran between the samples: {second:?}"
    );
}

#[test]
fn system_info_on_this_host() {
    let info = metrics::system_info();
    assert!(!info.kernel_version.is_empty(), "{info:?}");
    assert!(!info.hostname.is_empty(), "{info:?}");
    assert!(info.uptime_secs > 0, "{info:?}");
    assert_eq!(info.architecture, metrics::goarch());
}

/// The cgroup directories of one test (one per v1 controller, one on v2) and the processes inside them: on drop
/// (also when an assertion failed) the processes are killed and reaped, then the directories removed.
struct TestCgroup {
    /// `/oakestra-metrics-test-<pid>`, as runc's `linux.cgroupsPath` would name it.
    path: String,
    /// Every directory created, for `cgroup.procs` and for removal.
    dirs: Vec<PathBuf>,
    children: Vec<Child>,
}

impl TestCgroup {
    fn create(layout: &CgroupLayout) -> Self {
        let path = format!("/oakestra-metrics-test-{}", std::process::id());
        let mut cgroup = TestCgroup {
            path: path.clone(),
            dirs: Vec::new(),
            children: Vec::new(),
        };
        match layout {
            CgroupLayout::V1 { .. } => {
                for controller in ["memory", "cpuacct"] {
                    let dir = layout.dir(controller, &path);
                    fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
                    cgroup.dirs.push(dir);
                }
                let memory = layout.dir("memory", &path);
                write(&memory.join("memory.limit_in_bytes"), &LIMIT.to_string());
                // With swap, a process past the limit would be swapped out rather than killed: cap memory+swap too.
                let memsw = memory.join("memory.memsw.limit_in_bytes");
                if memsw.exists() {
                    write(&memsw, &LIMIT.to_string());
                }
            }
            CgroupLayout::V2 { root } => {
                // The memory and cpu controllers must be enabled for the root's children.
                let controllers = fs::read_to_string(root.join("cgroup.subtree_control")).unwrap();
                for controller in ["memory", "cpu"] {
                    if !controllers.split_whitespace().any(|c| c == controller) {
                        write(&root.join("cgroup.subtree_control"), &format!("+{controller}"));
                    }
                }
                let dir = layout.dir("", &path);
                fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
                cgroup.dirs.push(dir.clone());
                write(&dir.join("memory.max"), &LIMIT.to_string());
                let swap = dir.join("memory.swap.max");
                if swap.exists() {
                    write(&swap, "0");
                }
            }
        }
        cgroup
    }

    /// Starts `sh -c 'read _; <script>'`, moves it into every directory of the cgroup through `cgroup.procs`, and
    /// only then lets the script run (by answering the `read`), so everything the script does is charged here.
    fn run_inside(&mut self, script: &str) -> usize {
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(format!("read _ && {script}"))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let pid = child.id();
        let mut stdin: ChildStdin = child.stdin.take().unwrap();
        self.children.push(child);
        for dir in &self.dirs {
            write(&dir.join("cgroup.procs"), &pid.to_string());
        }
        stdin.write_all(b"go\n").unwrap();
        drop(stdin);
        self.children.len() - 1
    }

    /// Waits (at most 30 s) for child `index` to exit.
    fn wait(&mut self, index: usize) -> ExitStatus {
        let child = &mut self.children[index];
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "child {} did not exit", child.id());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for TestCgroup {
    #[allow(
        clippy::print_stderr,
        reason = "a leftover cgroup is worth a line in the test output"
    )]
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        for dir in &self.dirs {
            // The kernel may take a moment to notice the last task left.
            let mut removed = false;
            for _ in 0..100 {
                if fs::remove_dir(dir).is_ok() || !dir.exists() {
                    removed = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            if !removed {
                eprintln!("could not remove {}", dir.display());
            }
        }
    }
}

fn write(path: &Path, text: &str) {
    fs::write(path, text).unwrap_or_else(|e| panic!("write {text:?} to {}: {e}", path.display()));
}

/// Polls `cgroup_stats` until `done` holds (at most 10 s), returning the last stats.
fn stats_until(path: &str, done: impl Fn(&CgroupStats) -> bool) -> CgroupStats {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stats = cgroup_stats(path).unwrap_or_else(|| panic!("no stats for {path}"));
        if done(&stats) || Instant::now() >= deadline {
            return stats;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn stats_of_a_real_cgroup() {
    assert!(
        rustix::process::geteuid().is_root(),
        "this test creates cgroups under /sys/fs/cgroup and must run as root"
    );
    let layout = cgroup_root();
    let mut cgroup = TestCgroup::create(&layout);
    let path = cgroup.path.clone();

    // Some work, then a process that stays alive so its memory stays charged.
    cgroup.run_inside("dd if=/dev/zero of=/dev/null bs=1M count=200 && exec sleep 60");
    let stats = stats_until(&path, |s| s.cpu_usage_ns > 0 && s.memory_bytes > 0);
    assert!(stats.cpu_usage_ns > 0, "{stats:?}");
    assert!(stats.memory_bytes > 0, "{stats:?}");
    assert_eq!(stats.memory_limit_bytes, Some(LIMIT), "{stats:?}");
    assert_eq!(stats.oom_kills, 0, "{stats:?}");
    eprintln!("{layout:?} {path}: {stats:?}");

    let mut tracker = CpuTracker::new();
    let cores = std::thread::available_parallelism().unwrap().get();
    assert_eq!(
        tracker.percent(&path, stats.cpu_usage_ns, Instant::now(), cores),
        0.0
    );
    std::thread::sleep(Duration::from_millis(100));
    let later = cgroup_stats(&path).unwrap();
    let percent = tracker.percent(&path, later.cpu_usage_ns, Instant::now(), cores);
    assert!((0.0..=100.0).contains(&percent), "{percent}");

    // dd allocates a buffer of `bs` bytes and fills it: 64 MiB past a 32 MiB limit.
    let dd = if Path::new("/usr/bin/busybox").exists() || Path::new("/bin/busybox").exists() {
        "busybox dd"
    } else {
        "dd"
    };
    let hog = cgroup.run_inside(&format!("exec {dd} if=/dev/zero of=/dev/null bs=64M count=1"));
    let status = cgroup.wait(hog);
    assert!(
        !status.success(),
        "the allocation past the limit succeeded: {status:?}"
    );
    let stats = stats_until(&path, |s| s.oom_kills >= 1);
    assert!(stats.oom_kills >= 1, "{stats:?} after {status:?}");
    eprintln!("after the hog ({status}): {stats:?}");
}
