//! The network-namespace testbed: named netns, a LAN of workers behind one bridge, "containers" (a process holding
//! its own netns), and snapshots of the host's netns that prove a test left it untouched.
//!
//! [`Testbed::new`]`("tb", 2)` builds (the same topology as `scripts/testbed.sh up 2 --tag tb`):
//! ```text
//!  netns tb-lan                              netns tb-w1
//!  bridge lan0 172.31.0.1/24 ── tbw1 ═══ eth0 172.31.0.11/24, default via 172.31.0.1
//!                            └─ tbw2 ═══ eth0 172.31.0.12/24, default via 172.31.0.1
//!                                        netns tb-w2
//! ```
//! The `lan` netns is the cluster side (root and cluster services run there); a [`Container`] is a `sleep` process in
//! a fresh netns created from inside its worker's netns, reached with `nsenter`.
//!
//! Rules this module keeps, so a test can never damage the machine it runs on: every link, address, route and sysctl
//! it sets lives in a namespace it created (`ip -n`, `ip netns exec`, `nsenter`), never in the host's; every
//! namespace and process it starts is removed on drop, also when a test panics; leftovers of a crashed run with the
//! same tag are removed before a testbed is built.

use std::ffi::OsStr;
use std::fs::File;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The bridge in the LAN netns every worker hangs off.
pub const LAN_BRIDGE: &str = "lan0";
/// A worker's LAN interface (inside its netns).
pub const WORKER_LAN_IF: &str = "eth0";
/// The LAN's prefix length (`172.31.0.0/24`).
pub const LAN_PREFIX: u8 = 24;
/// Where `ip netns add` pins named namespaces.
const NETNS_DIR: &str = "/run/netns";
/// Every process the harness starts carries this variable (value: the netns or container it belongs to), so the
/// processes of a crashed run can be found and killed even after their namespace lost its name.
pub const MARK_ENV: &str = "OAKESTRA_TESTBED_PROC";

/// Whether the process runs as root (uid 0), as building a testbed needs.
pub fn is_root() -> bool {
    rustix::process::getuid().is_root()
}

/// Panics with a clear message unless the process runs as root (uid 0): namespaces, veths and bridges need it.
pub fn require_root() {
    assert!(
        is_root(),
        "this test/bench needs root (uid 0): it creates network namespaces, bridges and veths. \
         Run it as root, e.g. `sudo -E env PATH=$PATH cargo test -p oakestra-tests --test testbed`"
    );
}

/// Runs `cmd`; panics with the command line and its stderr when it cannot start or exits non-zero. Returns stdout.
pub fn output_ok(cmd: &mut Command) -> String {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim(),
        String::from_utf8_lossy(&out.stdout).trim()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Cleanup problems: printed, never a panic (a panic inside a drop during unwinding would abort the test binary).
#[allow(
    clippy::print_stderr,
    reason = "cleanup runs in Drop, where a panic is not an option"
)]
fn note(msg: &str) {
    eprintln!("testbed: {msg}");
}

/// A name usable for a netns, a tag or a container: `[a-z0-9-]`, 1..=`max` characters.
fn valid_name(name: &str, max: usize, dash: bool) -> bool {
    (1..=max).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || (dash && b == b'-'))
}

/// (device, inode) of a namespace file: two paths name the same netns iff these are equal (what `ip netns pids`
/// compares).
fn ns_id(path: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// The pids of all processes (other than this one) whose thread-group leader lives in netns `id`.
fn pids_in_netns(id: (u64, u64)) -> Vec<u32> {
    proc_pids()
        .filter(|pid| ns_id(Path::new(&format!("/proc/{pid}/ns/net"))) == Some(id))
        .collect()
}

/// The pids of all processes (other than this one) whose [`MARK_ENV`] value satisfies `matches`.
fn pids_marked(matches: impl Fn(&str) -> bool) -> Vec<u32> {
    let key = format!("{MARK_ENV}=");
    proc_pids()
        .filter(|pid| {
            let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
                return false;
            };
            env.split(|b| *b == 0)
                .filter_map(|kv| std::str::from_utf8(kv).ok())
                .filter_map(|kv| kv.strip_prefix(&key))
                .any(&matches)
        })
        .collect()
}

/// Every pid in /proc except our own (a harness must never kill the test process itself).
fn proc_pids() -> impl Iterator<Item = u32> {
    let me = std::process::id();
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(move |pid| *pid != me)
}

/// SIGKILL to each pid; already-gone processes are fine.
fn kill_all(pids: impl IntoIterator<Item = u32>) {
    for pid in pids {
        if let Some(pid) = i32::try_from(pid).ok().and_then(rustix::process::Pid::from_raw) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        }
    }
}

/// Kills what runs in netns `name` (or was started for it) and deletes it. Best effort: never panics.
fn remove_netns(name: &str) {
    let path = Path::new(NETNS_DIR).join(name);
    if let Some(id) = ns_id(&path) {
        kill_all(pids_in_netns(id));
    }
    kill_all(pids_marked(|m| m == name));
    match Command::new("ip").args(["netns", "del", name]).output() {
        Ok(out) if !out.status.success() && path.exists() => note(&format!(
            "ip netns del {name}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => note(&format!("ip netns del {name}: {e}")),
        _ => {}
    }
}

/// A named network namespace (`ip netns add`), deleted on drop together with the processes still in it.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates netns `name` (`[a-z0-9-]`, at most 32 characters) with `lo` up. A netns of that name left over from
    /// an earlier run is deleted first: names belong to one test.
    pub fn new(name: &str) -> Self {
        assert!(
            valid_name(name, 32, true),
            "netns name {name:?}: use [a-z0-9-], at most 32 characters"
        );
        if Path::new(NETNS_DIR).join(name).exists() {
            remove_netns(name);
        }
        output_ok(Command::new("ip").args(["netns", "add", name]));
        // From here on the drop removes it, also if bringing lo up fails.
        let ns = Self {
            name: name.to_owned(),
        };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The file pinning it: `/run/netns/<name>`.
    pub fn path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.name)
    }

    /// A command running `program` inside this netns (`ip netns exec <name> program`); add arguments to it.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name])
            .arg(program)
            .env(MARK_ENV, &self.name);
        cmd
    }

    /// Runs `args[0]` with the remaining arguments inside this netns and returns its output, whatever the exit
    /// status. Panics only when the command cannot be started at all.
    pub fn run(&self, args: &[&str]) -> Output {
        let (program, rest) = args.split_first().expect("Netns::run needs at least a program");
        self.command(program)
            .args(rest)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {args:?} in netns {}: {e}", self.name))
    }

    /// `ip -n <name> <args>`; panics with ip's stderr on failure; returns stdout.
    pub fn ip(&self, args: &[&str]) -> String {
        output_ok(Command::new("ip").args(["-n", &self.name]).args(args))
    }

    /// Sets sysctl `key` (e.g. `net.ipv4.ip_forward`) inside this netns: the `net.*` sysctls are per namespace.
    pub fn sysctl(&self, key: &str, value: &str) {
        output_ok(&mut self.sysctl_command(key, value));
    }

    /// The command [`Netns::sysctl`] runs, e.g. to queue it as a later undo step. It writes `/proc/sys/<key with
    /// dots as slashes>` from a shell inside the netns (the file resolves to the writer's netns), so procps'
    /// `sysctl` need not be installed.
    pub fn sysctl_command(&self, key: &str, value: &str) -> Command {
        assert!(!key.contains('/'), "sysctl key {key:?}: use dots");
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        let mut cmd = self.command("sh");
        cmd.args(["-c", r#"printf '%s\n' "$2" > "$1""#, "sysctl", &path, value]);
        cmd
    }

    /// Moves the calling thread into this netns (`setns(CLONE_NEWNET)`): sockets it creates and processes it spawns
    /// from then on live here. The thread never comes back; use a thread of its own (a test's thread may be the
    /// harness's main thread, and [`HostSnapshot`] reads the netns of the main thread).
    pub fn enter_current_thread(&self) {
        enter_netns(&self.path());
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        remove_netns(&self.name);
    }
}

/// `setns(fd of path, CLONE_NEWNET)` for the calling thread, through rustix's safe wrapper.
fn enter_netns(path: &Path) {
    let file = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    rustix::thread::move_into_link_name_space(file.as_fd(), Some(rustix::thread::LinkNameSpaceType::Network))
        .unwrap_or_else(|e| panic!("setns({}, CLONE_NEWNET): {e}", path.display()));
}

/// One worker: its netns and its LAN address.
#[derive(Debug)]
pub struct Worker {
    /// Its netns, `<tag>-w<index>`.
    pub ns: Netns,
    /// Its LAN address (on `eth0`), `172.31.0.<10 + index>`.
    pub addr: Ipv4Addr,
    /// 1-based.
    pub index: usize,
}

/// A LAN netns with a bridge and `n` worker netns attached to it by veths. Dropping it deletes all of them (and
/// kills the processes still inside, containers of this tag included).
#[derive(Debug)]
pub struct Testbed {
    /// The cluster side: bridge `lan0` with [`Testbed::lan_addr`].
    pub lan: Netns,
    /// Worker `i` (1-based) is `workers[i - 1]`.
    pub workers: Vec<Worker>,
    tag: String,
    /// Held until the namespaces are gone (fields drop in order: this one last): two runs with the same tag, e.g.
    /// the same suite from two checkouts, take turns instead of deleting each other's namespaces as "stale".
    _lock: TagLock,
}

/// The LAN address of worker `index` (1-based).
pub fn worker_addr(index: usize) -> Ipv4Addr {
    let last = u8::try_from(10 + index).expect("at most 200 workers");
    Ipv4Addr::new(172, 31, 0, last)
}

/// The netns names that belong to testbed `tag`: `<tag>-lan` and `<tag>-w<N>`, as present in /run/netns now.
pub fn netns_with_tag(tag: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(NETNS_DIR)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| {
            n.strip_prefix(tag)
                .and_then(|rest| rest.strip_prefix('-'))
                .is_some_and(|rest| {
                    rest == "lan"
                        || rest
                            .strip_prefix('w')
                            .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
                })
        })
        .collect();
    names.sort();
    names
}

/// Removes whatever a testbed `tag` left behind: its processes (marked) and its namespaces.
fn cleanup_tag(tag: &str) {
    let prefix = format!("{tag}-");
    kill_all(pids_marked(|m| m.starts_with(&prefix)));
    for name in netns_with_tag(tag) {
        remove_netns(&name);
    }
}

/// The per-tag lock: an exclusive `flock` on `/run/oakestra-testbed-<tag>.lock`, released (and the file removed)
/// on drop. The kernel drops the lock of a crashed process by itself.
#[derive(Debug)]
struct TagLock {
    path: PathBuf,
    _file: File,
}

impl TagLock {
    fn take(tag: &str) -> Self {
        let path = PathBuf::from(format!("/run/oakestra-testbed-{tag}.lock"));
        let mut waited = false;
        loop {
            let file = File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
            if file.try_lock().is_err() {
                if !waited {
                    note(&format!(
                        "testbed {tag} is in use by another process; waiting for it"
                    ));
                    waited = true;
                }
                file.lock()
                    .unwrap_or_else(|e| panic!("lock {}: {e}", path.display()));
            }
            // The holder before us removes the file when done: a lock on that removed inode excludes nobody who
            // opens the path afterwards, so only a lock on the file the path still names counts.
            let same = |m: std::fs::Metadata| (m.dev(), m.ino());
            if std::fs::metadata(&path).ok().map(same) == file.metadata().ok().map(same) {
                return Self { path, _file: file };
            }
        }
    }
}

impl Drop for TagLock {
    fn drop(&mut self) {
        // Removed while still locked (the file is closed right after): see the check in `take`.
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Testbed {
    /// Builds the topology of the module docs with `workers` workers (1..=200). `tag` (`[a-z0-9]`, at most 8
    /// characters) prefixes every name; leftovers of an earlier run with the same tag are removed first.
    pub fn new(tag: &str, workers: usize) -> Self {
        require_root();
        assert!(
            valid_name(tag, 8, false),
            "testbed tag {tag:?}: use [a-z0-9], at most 8 characters (it prefixes interface names)"
        );
        assert!(
            (1..=200).contains(&workers),
            "a testbed has 1..=200 workers, not {workers}"
        );
        let lock = TagLock::take(tag);
        cleanup_tag(tag);

        let lan = Netns::new(&format!("{tag}-lan"));
        let lan_cidr = format!("{}/{LAN_PREFIX}", Self::LAN_ADDR);
        lan.ip(&["link", "add", "name", LAN_BRIDGE, "type", "bridge"]);
        lan.ip(&["addr", "add", &lan_cidr, "dev", LAN_BRIDGE]);
        lan.ip(&["link", "set", LAN_BRIDGE, "up"]);
        // A panic below drops `lan` and the workers built so far: nothing outlives a failed setup.
        let mut list = Vec::with_capacity(workers);
        for index in 1..=workers {
            let ns = Netns::new(&format!("{tag}-w{index}"));
            let port = format!("{tag}w{index}");
            lan.ip(&[
                "link",
                "add",
                "name",
                &port,
                "type",
                "veth",
                "peer",
                "name",
                WORKER_LAN_IF,
                "netns",
                ns.name(),
            ]);
            lan.ip(&["link", "set", &port, "master", LAN_BRIDGE, "up"]);
            let addr = worker_addr(index);
            ns.ip(&[
                "addr",
                "add",
                &format!("{addr}/{LAN_PREFIX}"),
                "dev",
                WORKER_LAN_IF,
            ]);
            ns.ip(&["link", "set", WORKER_LAN_IF, "up"]);
            ns.ip(&["route", "add", "default", "via", &Self::LAN_ADDR.to_string()]);
            list.push(Worker { ns, addr, index });
        }
        Self {
            lan,
            workers: list,
            tag: tag.to_owned(),
            _lock: lock,
        }
    }

    /// The bridge's address in the LAN netns.
    const LAN_ADDR: Ipv4Addr = Ipv4Addr::new(172, 31, 0, 1);

    /// The LAN (cluster side) address, `172.31.0.1`.
    pub fn lan_addr(&self) -> Ipv4Addr {
        Self::LAN_ADDR
    }

    /// Its tag.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// Worker `index` (1-based).
    pub fn worker(&self, index: usize) -> &Worker {
        index
            .checked_sub(1)
            .and_then(|i| self.workers.get(i))
            .unwrap_or_else(|| {
                panic!(
                    "worker {index}: this testbed has workers 1..={}",
                    self.workers.len()
                )
            })
    }

    /// Starts a container `name` (`[a-z0-9-]`, at most 16 characters) on worker `worker` (1-based): a fresh netns
    /// with only `lo` (up), created from inside the worker's netns; killed on drop.
    pub fn container(&self, worker: usize, name: &str) -> Container {
        assert!(
            valid_name(name, 16, true),
            "container name {name:?}: use [a-z0-9-], at most 16 characters"
        );
        let w = self.worker(worker);
        Container::start(&w.ns, worker, name, format!("{}-w{worker}-{name}", self.tag))
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        // Containers and strays of this tag first; the fields' drops then delete the namespaces, the lock goes last.
        let prefix = format!("{}-", self.tag);
        kill_all(pids_marked(|m| m.starts_with(&prefix)));
    }
}

/// A "container": a `sleep infinity` process whose own netns is the container's network, started from its worker's
/// netns. Killed on drop together with everything else in its netns.
#[derive(Debug)]
pub struct Container {
    /// The `sleep` process holding the netns (`nsenter -t <pid> -n`).
    pub pid: u32,
    /// Its name.
    pub name: String,
    /// Its worker (1-based).
    pub worker: usize,
    worker_ns: String,
    marker: String,
    netns: (u64, u64),
    child: Child,
}

impl Container {
    /// `ip netns exec <worker> unshare --net sleep infinity`: both `ip` and `unshare` exec the next program, so the
    /// spawned pid ends up as `sleep` in the new netns; waits (5 s at most) until it got there.
    fn start(worker: &Netns, index: usize, name: &str, marker: String) -> Self {
        let mut child = Command::new("ip")
            .args([
                "netns",
                "exec",
                worker.name(),
                "unshare",
                "--net",
                "sleep",
                "infinity",
            ])
            .env(MARK_ENV, &marker)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("start container {name}: {e}"));
        let pid = child.id();
        let worker_id = ns_id(&worker.path());
        let deadline = Instant::now() + Duration::from_secs(5);
        let netns = loop {
            if let Ok(Some(status)) = child.try_wait() {
                let err = child
                    .wait_with_output()
                    .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
                    .unwrap_or_default();
                panic!("container {name} exited ({status}) during start: {}", err.trim());
            }
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            let id = ns_id(Path::new(&format!("/proc/{pid}/ns/net")));
            if comm.trim() == "sleep"
                && let Some(id) = id.filter(|id| Some(*id) != worker_id)
            {
                break id;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("container {name} did not reach its own netns within 5 s");
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let container = Self {
            pid,
            name: name.to_owned(),
            worker: index,
            worker_ns: worker.name().to_owned(),
            marker,
            netns,
            child,
        };
        container.ip(&["link", "set", "lo", "up"]);
        container
    }

    /// A command running `program` in this container's netns (`nsenter -t <pid> -n program`); add arguments to it.
    /// Only the network namespace changes: the file system is the host's.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.args(["-t", &self.pid.to_string(), "-n"])
            .arg(program)
            .env(MARK_ENV, &self.marker);
        cmd
    }

    /// Runs `args[0]` with the remaining arguments in the container and returns its output, whatever the exit
    /// status. Panics only when the command cannot be started at all.
    pub fn run(&self, args: &[&str]) -> Output {
        let (program, rest) = args
            .split_first()
            .expect("Container::run needs at least a program");
        self.command(program)
            .args(rest)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {args:?} in container {}: {e}", self.name))
    }

    /// `ip <args>` inside the container; panics with ip's stderr on failure; returns stdout.
    pub fn ip(&self, args: &[&str]) -> String {
        output_ok(self.command("ip").args(args))
    }

    /// The container's netns file, `/proc/<pid>/ns/net`.
    pub fn netns_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/ns/net", self.pid))
    }

    /// The name of its worker's netns.
    pub fn worker_netns(&self) -> &str {
        &self.worker_ns
    }

    /// Moves the calling thread into this container's netns; see [`Netns::enter_current_thread`].
    pub fn enter_current_thread(&self) {
        enter_netns(&self.netns_path());
    }

    /// Connects the container to its worker by a veth pair routed through the worker: `eth0` inside with
    /// `addr/prefix` and a default route via `gateway`; `host_if` in the worker's netns with `gateway/prefix`. `mtu`
    /// applies to both ends (None: the kernel's 1500). Undo with [`Container::detach_veth`].
    pub fn attach_veth(
        &self,
        host_if: &str,
        addr: Ipv4Addr,
        gateway: Ipv4Addr,
        prefix: u8,
        mtu: Option<u32>,
    ) {
        let mtu = mtu.map(|m| m.to_string());
        let mtu_args: Vec<&str> = mtu.as_deref().map(|m| vec!["mtu", m]).unwrap_or_default();
        let pid = self.pid.to_string();
        let mut add = vec!["-n", &self.worker_ns, "link", "add", "name", host_if];
        add.extend(&mtu_args);
        add.extend(["type", "veth", "peer", "name", "eth0"]);
        add.extend(&mtu_args);
        add.extend(["netns", &pid]);
        output_ok(Command::new("ip").args(&add));
        let gw_cidr = format!("{gateway}/{prefix}");
        output_ok(Command::new("ip").args(["-n", &self.worker_ns, "addr", "add", &gw_cidr, "dev", host_if]));
        output_ok(Command::new("ip").args(["-n", &self.worker_ns, "link", "set", host_if, "up"]));
        self.ip(&["addr", "add", &format!("{addr}/{prefix}"), "dev", "eth0"]);
        self.ip(&["link", "set", "eth0", "up"]);
        self.ip(&["route", "add", "default", "via", &gateway.to_string()]);
    }

    /// Deletes the veth pair [`Container::attach_veth`] made (both ends and the container's routes over it).
    pub fn detach_veth(&self, host_if: &str) {
        output_ok(Command::new("ip").args(["-n", &self.worker_ns, "link", "del", host_if]));
    }

    /// Whether a socket of `proto` (`tcp`: listening; `udp`: bound) on `port` exists in the container's netns, read
    /// from `/proc/<pid>/net/{proto,proto6}` (the table of the netns of `pid`): no tool needed.
    pub fn has_socket(&self, proto: &str, port: u16) -> bool {
        let want_state = if proto == "tcp" { "0A" } else { "07" };
        let hex_port = format!(":{port:04X}");
        [proto.to_owned(), format!("{proto}6")].iter().any(|table| {
            std::fs::read_to_string(format!("/proc/{}/net/{table}", self.pid))
                .unwrap_or_default()
                .lines()
                .skip(1)
                .any(|line| {
                    let f: Vec<&str> = line.split_whitespace().collect();
                    f.len() > 3 && f[1].ends_with(&hex_port) && f[3] == want_state
                })
        })
    }

    /// Waits up to `within` for [`Container::has_socket`]; panics on timeout.
    pub fn wait_socket(&self, proto: &str, port: u16, within: Duration) {
        let deadline = Instant::now() + within;
        while !self.has_socket(proto, port) {
            assert!(
                Instant::now() < deadline,
                "no {proto} socket on port {port} in container {} within {within:?}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        kill_all(pids_in_netns(self.netns));
        let marker = self.marker.clone();
        kill_all(pids_marked(|m| m == marker));
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The state of the host's netns (the netns of this process's main thread) that a testbed must never touch:
/// links, addresses, routes and policy rules of both families, the forwarding sysctls, and the nftables ruleset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostSnapshot {
    sections: Vec<(String, Vec<String>)>,
}

/// Tokens followed by a value that changes on its own (address lifetimes, route expiry, nft counters, the netnsid
/// numbering of peers): both are dropped before comparing.
const VOLATILE_KEYS: &[&str] = &[
    "valid_lft",
    "preferred_lft",
    "expires",
    "link-netnsid",
    "packets",
    "bytes",
];

/// One line of `ip -o` / `ip route` / `nft` output without its volatile parts; `drop_index` removes the leading
/// `N:` ifindex of `ip -o link`/`addr` (indexes are not what a test changes).
fn normalise(line: &str, drop_index: bool) -> String {
    let mut out: Vec<&str> = Vec::new();
    let mut tokens = line
        .split(|c: char| c.is_whitespace() || c == '\\')
        .filter(|t| !t.is_empty());
    if drop_index {
        // `4:` (the ifindex) comes first; `ip -o addr` then repeats the name.
        let mut peek = tokens.clone();
        if peek
            .next()
            .is_some_and(|t| t.ends_with(':') && t[..t.len() - 1].parse::<u32>().is_ok())
        {
            tokens = peek;
        }
    }
    while let Some(t) = tokens.next() {
        if VOLATILE_KEYS.contains(&t) {
            tokens.next();
        } else {
            out.push(t);
        }
    }
    out.join(" ")
}

/// A command in the host's netns: that of the main thread, whatever netns the calling thread entered.
fn host_command(program: &str) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/proc/{}/ns/net", std::process::id()))
        .arg(program);
    cmd
}

/// Stdout of a host command, or its error text (then a change in availability shows up as a difference too).
fn host_lines(program: &str, args: &[&str]) -> Vec<String> {
    match host_command(program).args(args).stdin(Stdio::null()).output() {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_owned)
            .collect(),
        Ok(out) => vec![format!(
            "<{program} failed: {}>",
            String::from_utf8_lossy(&out.stderr).trim()
        )],
        Err(e) => vec![format!("<{program}: {e}>")],
    }
}

/// Whether `addr` is in a range the Oakestra overlay hands out: IPv4 `10.16.0.0/12` (worker subnets 10.18/16,
/// service and instance IPs 10.30/16); IPv6 `fc00::/8` (worker subnets from `fc00::/120` upward) and `fdff::/16`
/// (instance and service IPs). Not all of `fc00::/7`: `fd00::/8` also holds the hosts' own ULAs (RFC 4193), e.g.
/// `fd00::2/64` on our CI machines, which are not the overlay's.
pub fn is_overlay_addr(addr: IpAddr) -> bool {
    match addr {
        IpAddr::V4(a) => {
            let o = a.octets();
            o[0] == 10 && (o[1] & 0xf0) == 16
        }
        IpAddr::V6(a) => {
            let s = a.segments()[0];
            s & 0xff00 == 0xfc00 || s == 0xfdff
        }
    }
}

/// The overlay addresses (plain or `addr/len`) appearing in `line`.
fn overlay_tokens(line: &str) -> Vec<String> {
    line.split(|c: char| c.is_whitespace() || c == '\\')
        .filter(|t| {
            t.split('/')
                .next()
                .and_then(|a| a.parse::<IpAddr>().ok())
                .is_some_and(is_overlay_addr)
        })
        .map(str::to_owned)
        .collect()
}

impl HostSnapshot {
    /// Reads the host netns now.
    pub fn take() -> Self {
        let sorted = |program: &str, args: &[&str], drop_index: bool| {
            let mut lines: Vec<String> = host_lines(program, args)
                .iter()
                .map(|l| normalise(l, drop_index))
                .collect();
            lines.sort();
            (format!("{program} {}", args.join(" ")), lines)
        };
        let mut sections = vec![
            sorted("ip", &["-o", "link"], true),
            sorted("ip", &["-o", "addr"], true),
            sorted("ip", &["-4", "route", "show", "table", "all"], false),
            sorted("ip", &["-6", "route", "show", "table", "all"], false),
            sorted("ip", &["-4", "rule"], false),
            sorted("ip", &["-6", "rule"], false),
            // What a worker netns gets and the host must not: forwarding.
            sorted(
                "grep",
                &[
                    "-H",
                    ".",
                    "/proc/sys/net/ipv4/ip_forward",
                    "/proc/sys/net/ipv6/conf/all/forwarding",
                ],
                false,
            ),
        ];
        // nft's order is the rule order, which matters: not sorted.
        if Command::new("nft")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
        {
            let lines = host_lines("nft", &["list", "ruleset"])
                .iter()
                .map(|l| normalise(l, false))
                .collect();
            sections.push(("nft list ruleset".to_owned(), lines));
        }
        Self { sections }
    }

    /// Panics with the lines that disappeared (`-`) and appeared (`+`) per section unless `after` equals `self`.
    pub fn assert_unchanged(&self, after: &HostSnapshot) {
        if self == after {
            return;
        }
        let mut report = String::new();
        for (what, before) in &self.sections {
            let now = after
                .sections
                .iter()
                .find(|(w, _)| w == what)
                .map(|(_, l)| l.as_slice())
                .unwrap_or_default();
            if before.as_slice() == now {
                continue;
            }
            report.push_str(&format!("[{what}]\n"));
            let (gone, new) = (minus(before, now), minus(now, before));
            if gone.is_empty() && new.is_empty() {
                report.push_str("  same lines in a different order\n");
            }
            for l in gone {
                report.push_str(&format!("- {l}\n"));
            }
            for l in new {
                report.push_str(&format!("+ {l}\n"));
            }
        }
        for (what, _) in after
            .sections
            .iter()
            .filter(|(w, _)| !self.sections.iter().any(|(b, _)| b == w))
        {
            report.push_str(&format!("[{what}] appeared\n"));
        }
        panic!("the host's network namespace changed:\n{report}");
    }

    /// Panics listing every overlay address or route ([`is_overlay_addr`]) found in the host netns.
    pub fn assert_no_overlay() {
        let mut found = Vec::new();
        for args in [
            &["-o", "addr"][..],
            &["-4", "route", "show", "table", "all"],
            &["-6", "route", "show", "table", "all"],
        ] {
            for line in host_lines("ip", args) {
                if !overlay_tokens(&line).is_empty() {
                    found.push(format!("ip {}: {}", args.join(" "), normalise(&line, false)));
                }
            }
        }
        assert!(
            found.is_empty(),
            "overlay addresses/routes in the host netns:\n{}",
            found.join("\n")
        );
    }
}

/// The lines of `a` not matched one-for-one in `b` (a multiset difference).
fn minus<'a>(a: &'a [String], b: &[String]) -> Vec<&'a String> {
    let mut rest: Vec<&String> = b.iter().collect();
    a.iter()
        .filter(|l| {
            if let Some(i) = rest.iter().position(|r| r == l) {
                rest.swap_remove(i);
                false
            } else {
                true
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volatile_fields_and_the_ifindex_are_dropped() {
        let addr = r"4: eth0    inet6 fd00::2/64 scope global dynamic \       valid_lft 86391sec preferred_lft 14391sec";
        assert_eq!(
            normalise(addr, true),
            "eth0 inet6 fd00::2/64 scope global dynamic"
        );
        let nft = "    counter packets 12 bytes 3456 accept";
        assert_eq!(normalise(nft, false), "counter accept");
        let route = "2001:db8::/64 via fe80::1 dev eth0 proto ra metric 100 expires 1799sec pref medium";
        assert_eq!(
            normalise(route, false),
            "2001:db8::/64 via fe80::1 dev eth0 proto ra metric 100 pref medium"
        );
        // A route starting with a number is not an ifindex.
        assert_eq!(normalise("10.0.0.0/8 dev x", true), "10.0.0.0/8 dev x");
    }

    #[test]
    fn overlay_ranges() {
        let yes = [
            "10.16.0.1",
            "10.18.0.66",
            "10.30.0.2",
            "10.31.255.255",
            "fc00::102",
            "fdff:2000::2",
        ];
        let no = [
            "10.15.255.255",
            "10.32.0.0",
            "172.31.0.1",
            "fd00::2",
            "fe80::1",
            "192.0.2.2",
        ];
        for a in yes {
            assert!(is_overlay_addr(a.parse().unwrap()), "{a}");
        }
        for a in no {
            assert!(!is_overlay_addr(a.parse().unwrap()), "{a}");
        }
        assert_eq!(
            overlay_tokens("10.18.0.0/16 via 172.31.0.12 dev eth0"),
            vec!["10.18.0.0/16".to_owned()]
        );
        assert!(overlay_tokens("default via 192.0.2.1 dev eth0").is_empty());
    }

    #[test]
    #[should_panic(expected = "[ip -o addr]\n- eth0 inet 192.0.2.2/24\n+ eth0 inet 10.18.0.1/24\n")]
    fn a_changed_host_is_reported_line_by_line() {
        let snap = |addr: &str| HostSnapshot {
            sections: vec![
                ("ip -o link".to_owned(), vec!["eth0: <UP>".to_owned()]),
                ("ip -o addr".to_owned(), vec![format!("eth0 inet {addr}")]),
            ],
        };
        snap("192.0.2.2/24").assert_unchanged(&snap("192.0.2.2/24"));
        snap("192.0.2.2/24").assert_unchanged(&snap("10.18.0.1/24"));
    }

    #[test]
    fn names_and_tag_matching() {
        assert!(
            valid_name("otb", 8, false)
                && !valid_name("o-tb", 8, false)
                && !valid_name("toolongtag", 8, false)
        );
        assert_eq!(worker_addr(2), Ipv4Addr::new(172, 31, 0, 12));
        let a = vec!["x".to_owned(), "y".to_owned(), "x".to_owned()];
        let b = vec!["x".to_owned()];
        assert_eq!(minus(&a, &b), vec!["y", "x"]);
    }
}
