//! The overlay testbed with everything on it: a netns [`Testbed`] whose LAN namespace runs root, cluster (embedded
//! broker) and one private containerd, and in each worker namespace a real NetManager (on the dataplane the test
//! names) and NodeEngine; plus the teardown that checks nothing stays behind.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};

use crate::containerd::Containerd;
use crate::harness::Proc;
use crate::netns::{HostSnapshot, Testbed, require_root};
use crate::stack::{IMAGE, Stack};

/// Root, cluster and `n` overlay workers (`w1`, `w2`, …) on a testbed. Fields drop in declaration order: the
/// workers first, the namespaces last.
#[derive(Debug)]
pub struct OverlayBed {
    /// The NodeEngines, worker `i` at index `i`.
    pub engines: Vec<Proc>,
    /// The NetManagers, worker `i` at index `i`.
    pub netmanagers: Vec<Proc>,
    /// root and cluster, in the LAN namespace.
    pub stack: Stack,
    /// The containerd every worker uses, one containerd namespace per worker (named like the worker).
    pub ctrd: Containerd,
    /// The namespaces.
    pub tb: Testbed,
    /// Data directories and logs.
    pub dir: PathBuf,
    /// The LAN address the cluster and its broker listen on.
    pub lan_ip: String,
    /// The `--dataplane` of worker `i`'s NetManager.
    pub dataplanes: Vec<String>,
    /// Flags every NodeEngine gets on top of the defaults (e.g. `-u=true`).
    pub engine_flags: Vec<String>,
    host_before: HostSnapshot,
}

impl OverlayBed {
    /// Builds testbed `tag` with one worker per entry of `dataplanes` (worker `i`'s NetManager runs with
    /// `--dataplane dataplanes[i]`; `auto-nobpf` is `auto` under [`NOBPF`], where every `bpf(2)` call fails with
    /// EPERM as without CAP_BPF), enters its LAN namespace on this thread (so everything the test starts, and its
    /// HTTP calls, live there), starts root and cluster (with `cluster_flags` added) and the workers.
    pub async fn start(tag: &str, dataplanes: &[&str], cluster_flags: &[&str]) -> Self {
        Self::start_with(tag, dataplanes, cluster_flags, &[]).await
    }

    /// [`Self::start`] with `engine_flags` added to every NodeEngine's arguments.
    pub async fn start_with(
        tag: &str,
        dataplanes: &[&str],
        cluster_flags: &[&str],
        engine_flags: &[&str],
    ) -> Self {
        let workers = dataplanes.len();
        require_root();
        let host_before = HostSnapshot::take();
        let tb = Testbed::new(tag, workers);
        tb.lan.enter_current_thread();
        let dir = std::env::temp_dir().join(format!("oakestra-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the test directory");
        let ctrd = Containerd::start(tag);
        let lan_ip = tb.lan_addr().to_string();
        let stack = Stack::start_with(&dir, &lan_ip, cluster_flags).await;
        let mut bed = Self {
            engines: Vec::new(),
            netmanagers: Vec::new(),
            stack,
            ctrd,
            tb,
            dir,
            lan_ip,
            dataplanes: dataplanes.iter().map(|d| (*d).to_owned()).collect(),
            engine_flags: owned(engine_flags),
            host_before,
        };
        for (i, dataplane) in dataplanes.iter().enumerate() {
            let name = Self::name(i);
            bed.ctrd.import_test_image(&name, IMAGE);
            let (nm, ne) = overlay_worker(
                &bed.dir,
                bed.tb.workers[i].ns.name(),
                &name,
                &bed.lan_ip,
                bed.stack.cluster_port,
                &bed.ctrd,
                dataplane,
                &bed.engine_flags,
            );
            bed.netmanagers.push(nm);
            bed.engines.push(ne);
        }
        bed
    }

    /// The node name (and containerd namespace) of worker `i`: `w<i+1>`.
    pub fn name(i: usize) -> String {
        format!("w{}", i + 1)
    }

    /// `NetManager status` of worker `i`, `None` while it does not answer (e.g. starting).
    pub fn try_netmanager_status(&self, i: usize) -> Option<Value> {
        let sock = worker_path(&self.dir, &Self::name(i), "nm.sock");
        let out = std::process::Command::new(crate::procs::binary("NetManager"))
            .args(["status", "--socket", &sock])
            .output()
            .ok()?;
        serde_json::from_slice(&out.stdout).ok()
    }

    /// `NetManager status` of worker `i` (panics if it does not answer).
    pub fn netmanager_status(&self, i: usize) -> Value {
        let sock = worker_path(&self.dir, &Self::name(i), "nm.sock");
        let out = std::process::Command::new(crate::procs::binary("NetManager"))
            .args(["status", "--socket", &sock])
            .output()
            .expect("run NetManager status");
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "NetManager status of worker {i}: {e}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    /// Waits (up to 60 s) for every NetManager to be registered, then checks that each runs the dataplane it was
    /// started with (`auto` must have become `ebpf` here: the test machines run the fast path) and that an eBPF
    /// worker's fast path is attached to its underlay.
    pub fn assert_dataplanes(&self) {
        for (i, want) in self.dataplanes.iter().enumerate() {
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            let mut status = self.netmanager_status(i);
            while status["registered"] != json!(true) && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(250));
                status = self.netmanager_status(i);
            }
            let d = &status["dataplane"];
            let mode = if want == "tun" || want == NOBPF {
                "tun"
            } else {
                "ebpf"
            };
            assert_eq!(d["mode"], mode, "worker {i} asked for {want}: {d}");
            if want == NOBPF {
                // The fallback names its reason, in the status and in one warning.
                let why = d["fallback"].as_str().unwrap_or_default();
                assert!(
                    why.contains("no permission") && why.contains("CAP_BPF"),
                    "worker {i}: {d}"
                );
                let log = self.netmanagers[i].log();
                let warnings = log
                    .lines()
                    .filter(|l| l.contains("eBPF fast path unavailable"))
                    .count();
                assert_eq!(warnings, 1, "worker {i}'s log: {log}");
            }
            if mode == "ebpf" {
                assert_eq!(d["underlay"], "eth0", "worker {i}'s underlay: {d}");
                assert!(d["ebpf"].is_object(), "worker {i}: {d}");
            } else {
                assert!(d["ebpf"].is_null(), "worker {i}: {d}");
            }
        }
    }

    /// The packets worker `i`'s fast path handled itself so far: (redirected locally + encapsulated,
    /// decapsulated); `(0, 0)` on the TUN dataplane.
    pub fn fast_path_packets(&self, i: usize) -> (u64, u64) {
        let status = self.netmanager_status(i);
        let e = &status["dataplane"]["ebpf"];
        let n = |k: &str| e[k]["packets"].as_u64().unwrap_or(0);
        (n("egress_local") + n("egress_encap"), n("ingress_decap"))
    }

    /// Every process of the bed, for failure messages.
    pub fn procs(&self) -> Vec<&Proc> {
        self.engines
            .iter()
            .chain(&self.netmanagers)
            .chain([&self.stack.root, &self.stack.cluster])
            .collect()
    }

    /// Starts worker `i`'s NodeEngine again (same state directory, so it adopts what the last one left), logging
    /// to `<dir>/w<i+1>-<log>.log`; the caller puts it in [`Self::engines`].
    pub fn node_engine(&self, i: usize, log: &str) -> Proc {
        overlay_node_engine(
            &self.dir,
            self.tb.workers[i].ns.name(),
            &Self::name(i),
            &self.lan_ip,
            self.stack.cluster_port,
            &self.ctrd,
            log,
            &self.engine_flags,
        )
    }

    /// Stops worker `i`'s NetManager (SIGTERM: it removes its veths, TUN, bridge and programs, and must exit 0)
    /// and starts it again with the same flags, logging to `<dir>/w<i+1>-<log>.log`. The NodeEngine notices and
    /// registers it again.
    pub fn restart_netmanager(&mut self, i: usize, log: &str) {
        let nm = &mut self.netmanagers[i];
        assert_eq!(nm.terminate(Duration::from_secs(10)), Some(0), "{}", nm.log());
        self.netmanagers[i] = overlay_netmanager(
            &self.dir,
            self.tb.workers[i].ns.name(),
            &Self::name(i),
            &self.dataplanes[i],
            log,
        );
    }

    /// Stops the NodeEngines, then the NetManagers (each must exit 0 having removed its bridge, TUN, veths,
    /// nftables table and tc programs; checked in every worker namespace), the control plane and containerd, removes the
    /// namespaces, and checks that the host's namespace is as it was and never saw an overlay address.
    pub fn finish(self) {
        let Self {
            mut engines,
            mut netmanagers,
            stack,
            ctrd,
            tb,
            dir,
            host_before,
            ..
        } = self;
        for e in &mut engines {
            e.terminate(Duration::from_secs(10));
        }
        for nm in &mut netmanagers {
            assert_eq!(nm.terminate(Duration::from_secs(10)), Some(0), "{}", nm.log());
        }
        for w in &tb.workers {
            let links = String::from_utf8_lossy(&w.ns.run(&["ip", "-o", "link"]).stdout).to_string();
            assert!(
                !links.contains("goProxy") && !links.contains("veth"),
                "left behind in {}: {links}",
                w.ns.name()
            );
            // The fast path's programs and the clsact qdisc it added to the underlay are gone too.
            let qdiscs = String::from_utf8_lossy(&w.ns.run(&["tc", "qdisc", "show", "dev", "eth0"]).stdout)
                .to_string();
            assert!(
                !qdiscs.contains("clsact"),
                "clsact qdisc left on eth0 in {}: {qdiscs}",
                w.ns.name()
            );
            let nft = String::from_utf8_lossy(&w.ns.run(&["nft", "list", "tables"]).stdout).to_string();
            assert!(
                !nft.contains("oakestra"),
                "nft table left in {}: {nft}",
                w.ns.name()
            );
        }
        drop(stack);
        drop(ctrd);
        drop(tb);
        HostSnapshot::assert_no_overlay();
        host_before.assert_unchanged(&HostSnapshot::take());
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// The `dataplanes` entry for a NetManager on `--dataplane auto` that may not use eBPF (see [`OverlayBed::start`]).
pub const NOBPF: &str = "auto-nobpf";

/// Starts one worker of an overlay testbed in netns `netns`: a NetManager on `dataplane` (socket, state and logs
/// under `dir/<name>-*`) and a NodeEngine using it ([`overlay_node_engine`]). Returns (NetManager, NodeEngine).
#[allow(clippy::too_many_arguments, reason = "the places and names of one worker")]
pub fn overlay_worker(
    dir: &Path,
    netns: &str,
    name: &str,
    cluster_ip: &str,
    cluster_port: u16,
    ctrd: &Containerd,
    dataplane: &str,
    engine_flags: &[String],
) -> (Proc, Proc) {
    let nm = overlay_netmanager(dir, netns, name, dataplane, "netmanager");
    let ne = overlay_node_engine(
        dir,
        netns,
        name,
        cluster_ip,
        cluster_port,
        ctrd,
        "nodeengine",
        engine_flags,
    );
    (nm, ne)
}

/// Starts the NetManager of overlay worker `name` (see [`overlay_worker`]) on `dataplane`, logging to
/// `dir/<name>-<log>.log`.
pub fn overlay_netmanager(dir: &Path, netns: &str, name: &str, dataplane: &str, log: &str) -> Proc {
    let cfg = worker_path(dir, name, "netcfg.json");
    std::fs::write(
        &cfg,
        json!({"NodePublicAddress": "0.0.0.0", "NodePublicPort": "50103", "ClusterUrl": "0.0.0.0",
               "ClusterMqttPort": "10003"})
        .to_string(),
    )
    .expect("writing netcfg.json");
    let nm_args = owned(&[
        "--config",
        &cfg,
        "--socket",
        &worker_path(dir, name, "nm.sock"),
        "--state-dir",
        &worker_path(dir, name, "nm-state"),
        "--log-file",
        "none",
        "--workers",
        "2",
        "--dataplane",
        if dataplane == NOBPF { "auto" } else { dataplane },
    ]);
    let log = dir.join(format!("{name}-{log}.log"));
    // In this mount namespace (nsenter, not `ip netns exec`), as on a real worker: the named namespaces it makes
    // for unikernels must be visible to the NodeEngine.
    if dataplane == NOBPF {
        let mut args = vec![crate::procs::binary("NetManager").display().to_string()];
        args.extend(nm_args);
        Proc::start_in_net(netns, "nobpf", &args, log)
    } else {
        Proc::start_in_net(netns, "NetManager", &nm_args, log)
    }
}

/// Starts the NodeEngine of overlay worker `name` (see [`overlay_worker`]): it uses that worker's NetManager,
/// registers at the cluster on `cluster_ip:cluster_port`, runs containers in `ctrd`'s namespace `name`, keeps its
/// state in `dir/<name>-ne-state` (a restarted one adopts what the last one left), reports every 0.5 s, and logs
/// to `dir/<name>-<log>.log`; `extra` flags come last.
#[allow(clippy::too_many_arguments, reason = "the places and names of one worker")]
pub fn overlay_node_engine(
    dir: &Path,
    netns: &str,
    name: &str,
    cluster_ip: &str,
    cluster_port: u16,
    ctrd: &Containerd,
    log: &str,
    extra: &[String],
) -> Proc {
    let d = |x: &str| worker_path(dir, name, x);
    let mut ne_args = owned(&[
        "-a",
        cluster_ip,
        "-p",
        &cluster_port.to_string(),
        "-n",
        &d("nm.sock"),
        "-l",
        &d("apps"),
        "--conf",
        &d("no-conf.json"),
        "--containerd",
        &ctrd.socket.display().to_string(),
        "--namespace",
        name,
        "--state-dir",
        &d("ne-state"),
        "--log-file",
        "none",
        "--report-interval",
        "0.5",
        "--node-name",
        name,
        "--join-token",
        crate::stack::WORKER_JOIN_TOKEN,
    ]);
    ne_args.extend(extra.iter().cloned());
    Proc::start_in(
        netns,
        "NodeEngine",
        &ne_args,
        dir.join(format!("{name}-{log}.log")),
    )
}

/// `dir/<worker>-<what>`: where an overlay worker keeps a file or directory.
fn worker_path(dir: &Path, worker: &str, what: &str) -> String {
    dir.join(format!("{worker}-{what}")).display().to_string()
}

fn owned(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| (*s).to_owned()).collect()
}
