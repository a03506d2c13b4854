//! What the overlay costs on the data path: TCP throughput (`iperf3`) and request/response latency (`sockperf`
//! ping-pong, else `netprobe pingpong`) from a container on worker 1 to a container on worker 2 of a netns testbed,
//! for each way of connecting them:
//!
//! - `veth`: routed veths, the workers forwarding over the LAN; the floor every other path is compared to.
//! - `vxlan`: the kernel's VXLAN between the two workers (id 42, port 4789), container veths at MTU 1450.
//! - `overlay`: our overlay through two NetManagers on the TUN dataplane (`--dataplane tun`): every packet crosses
//!   user space on both workers.
//! - `ebpf`: the same two NetManagers with the eBPF fast path (`--dataplane ebpf`): the TUN proxy decides each
//!   flow's first packets, tc programs carry the rest in the kernel.
//!
//! `cargo bench --bench overlay`. Needs root (it prints a note and exits 0 without) and `iperf3`; everything runs in
//! namespaces of its own, removed at the end (also on a panic).

#![allow(clippy::print_stdout, reason = "a benchmark reports on stdout")]
#![allow(
    clippy::print_stderr,
    reason = "a benchmark explains on stderr why it cannot run"
)]
#![allow(clippy::unwrap_used, reason = "a benchmark fails loudly")]

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use oakestra_tests::netns::{Container, Netns, Testbed, is_root};
use oakestra_tests::procs;

/// The testbed's tag: fixed, so the leftovers of an interrupted run are removed by the next one.
const TAG: &str = "ovbench";
/// The client container's subnet (behind worker 1) and the server container's (behind worker 2).
const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(192, 168, 101, 2);
const CLIENT_GW: Ipv4Addr = Ipv4Addr::new(192, 168, 101, 1);
const CLIENT_NET: &str = "192.168.101.0/24";
const SERVER_ADDR: Ipv4Addr = Ipv4Addr::new(192, 168, 102, 2);
const SERVER_GW: Ipv4Addr = Ipv4Addr::new(192, 168, 102, 1);
const SERVER_NET: &str = "192.168.102.0/24";
/// Seconds per throughput run and per latency run.
const SECONDS: u32 = 5;
/// Ping-pong message size in bytes.
const MSG: usize = 64;
const IPERF_PORT: u16 = 5201;
const PINGPONG_PORT: u16 = 11111;

/// Commands undoing a path's setup, run in reverse order on drop, after the processes the path started were
/// stopped (SIGTERM and a wait, or SIGKILL): the next path starts from bare containers.
#[derive(Debug, Default)]
struct Teardown(Vec<Command>, Vec<(Child, bool)>);

impl Teardown {
    /// Queues `ip -n <ns> <args>`.
    fn ip(&mut self, ns: &str, args: &[&str]) {
        let mut cmd = Command::new("ip");
        cmd.args(["-n", ns]).args(args);
        self.0.push(cmd);
    }

    /// Kills `child` (SIGKILL) when the path is torn down.
    fn kill(&mut self, child: Child) {
        self.1.push((child, false));
    }

    /// Stops `child` with SIGTERM (it cleans up after itself) when the path is torn down.
    fn terminate(&mut self, child: Child) {
        self.1.push((child, true));
    }

    /// Queues a command.
    fn push(&mut self, cmd: Command) {
        self.0.push(cmd);
    }
}

impl Drop for Teardown {
    fn drop(&mut self) {
        while let Some((mut child, gently)) = self.1.pop() {
            if gently {
                let _ = Command::new("kill").arg(child.id().to_string()).status();
                let deadline = Instant::now() + Duration::from_secs(10);
                while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        while let Some(mut cmd) = self.0.pop() {
            match cmd.output() {
                Ok(out) if out.status.success() => {}
                Ok(out) => eprintln!(
                    "teardown {cmd:?}: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
                Err(e) => eprintln!("teardown {cmd:?}: {e}"),
            }
        }
    }
}

/// What a path hands the measurement: the address the client dials and the undo of the path's setup.
#[derive(Debug)]
struct Target {
    addr: IpAddr,
    /// Local API sockets of the NetManagers on this path (their counters are printed after the run).
    netmanagers: Vec<PathBuf>,
    /// Their process ids (their resident memory is printed before and after the run).
    netmanager_pids: Vec<u32>,
    _teardown: Teardown,
}

/// One path's figures.
#[derive(Debug, Clone, Copy)]
struct Measurement {
    gbps: f64,
    p50_us: f64,
    p99_us: f64,
}

/// Sets a path up between the client and server containers, or says why it cannot.
type Setup = fn(&Testbed, &Container, &Container) -> Result<Target, String>;

/// OUR overlay on the TUN dataplane.
fn setup_overlay(tb: &Testbed, client: &Container, server: &Container) -> Result<Target, String> {
    setup_netmanagers(tb, client, server, "tun")
}

/// OUR overlay with the eBPF fast path.
fn setup_ebpf(tb: &Testbed, client: &Container, server: &Container) -> Result<Target, String> {
    setup_netmanagers(tb, client, server, "ebpf")
}

/// Both containers on routed veths; each worker forwards and routes the other's container subnet to it over the LAN.
fn setup_veth(tb: &Testbed, client: &Container, server: &Container) -> Result<Target, String> {
    let mut undo = Teardown::default();
    attach(&mut undo, client, "vbc", CLIENT_ADDR, CLIENT_GW, None);
    attach(&mut undo, server, "vbs", SERVER_ADDR, SERVER_GW, None);
    for (w, peer, subnet) in [(1, 2, SERVER_NET), (2, 1, CLIENT_NET)] {
        let ns = &tb.worker(w).ns;
        forward(&mut undo, ns);
        ns.ip(&["route", "add", subnet, "via", &tb.worker(peer).addr.to_string()]);
        undo.ip(ns.name(), &["route", "del", subnet]);
    }
    Ok(Target {
        addr: SERVER_ADDR.into(),
        netmanagers: Vec::new(),
        netmanager_pids: Vec::new(),
        _teardown: undo,
    })
}

/// Kernel VXLAN (VNI 42, UDP 4789) between the workers' LAN addresses, a /30 on it, the container subnets routed
/// through it; container veths at 1450 so no inner packet needs fragmenting.
fn setup_vxlan(tb: &Testbed, client: &Container, server: &Container) -> Result<Target, String> {
    let mut undo = Teardown::default();
    attach(&mut undo, client, "vxc", CLIENT_ADDR, CLIENT_GW, Some(1450));
    attach(&mut undo, server, "vxs", SERVER_ADDR, SERVER_GW, Some(1450));
    for (w, peer, subnet, own, via) in [
        (1, 2, SERVER_NET, "192.168.200.1/30", "192.168.200.2"),
        (2, 1, CLIENT_NET, "192.168.200.2/30", "192.168.200.1"),
    ] {
        let ns = &tb.worker(w).ns;
        forward(&mut undo, ns);
        let (local, remote) = (tb.worker(w).addr.to_string(), tb.worker(peer).addr.to_string());
        ns.ip(&[
            "link", "add", "name", "vx42", "type", "vxlan", "id", "42", "dstport", "4789", "local", &local,
            "remote", &remote, "dev", "eth0",
        ]);
        // Deleting the device takes its address and the route through it along.
        undo.ip(ns.name(), &["link", "del", "vx42"]);
        ns.ip(&["addr", "add", own, "dev", "vx42"]);
        ns.ip(&["link", "set", "vx42", "up"]);
        ns.ip(&["route", "add", subnet, "via", via, "dev", "vx42"]);
    }
    Ok(Target {
        addr: SERVER_ADDR.into(),
        netmanagers: Vec::new(),
        netmanager_pids: Vec::new(),
        _teardown: undo,
    })
}

/// OUR overlay: two NetManagers (one per worker) on `dataplane`, the client dialling the server's round-robin
/// service address. The cluster side is Mosquitto in the LAN namespace plus [`responder`], a minimal stand-in for
/// the cluster's network service (subnets, table queries from what the NetManagers report): the bench measures the
/// dataplane, not the control plane, and needs no containerd.
fn setup_netmanagers(
    tb: &Testbed,
    client: &Container,
    server: &Container,
    dataplane: &str,
) -> Result<Target, String> {
    if !have("mosquitto") {
        return Err("skipped: mosquitto is not installed (apt-get install mosquitto)".into());
    }
    let dir = std::env::temp_dir().join(format!("oakestra-overlay-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let lan = tb.lan_addr().to_string();
    let conf = dir.join("mosquitto.conf");
    std::fs::write(&conf, format!("listener 1883 {lan}\nallow_anonymous true\n"))
        .map_err(|e| e.to_string())?;
    let mut undo = Teardown::default();
    // Runs last (teardown goes in reverse): the NetManagers' sockets, state and logs.
    let mut rm = Command::new("rm");
    rm.arg("-rf").arg(&dir);
    undo.push(rm);
    let broker = tb
        .lan
        .command("mosquitto")
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    undo.kill(broker);
    std::thread::sleep(Duration::from_millis(300));
    responder::start(tb.lan.path(), format!("{lan}:1883"));
    let netmanager = procs::binary("NetManager");
    let cfg = dir.join("netcfg.json");
    std::fs::write(
        &cfg,
        format!(r#"{{"NodePublicAddress":"0.0.0.0","ClusterUrl":"{lan}","ClusterMqttPort":"1883"}}"#),
    )
    .map_err(|e| e.to_string())?;
    let mut sockets = Vec::new();
    let mut pids = Vec::new();
    for w in [1, 2] {
        let sock = dir.join(format!("w{w}.sock"));
        let nm = tb
            .worker(w)
            .ns
            .command(&netmanager)
            .args([
                "--config",
                cfg.to_str().unwrap(),
                "--socket",
                sock.to_str().unwrap(),
            ])
            .args([
                "--state-dir",
                dir.join(format!("w{w}-state")).to_str().unwrap(),
                "--log-file",
                "none",
                "--dataplane",
                dataplane,
            ])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join(format!("w{w}.log"))).map_err(|e| e.to_string())?)
            .spawn()
            .map_err(|e| e.to_string())?;
        pids.push(nm.id());
        undo.terminate(nm);
        sockets.push(sock);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        use oakestra_runtime::client::call_unix;
        let post = |sock: PathBuf, path: &'static str, body: serde_json::Value| async move {
            for _ in 0..100 {
                match call_unix(
                    "POST".parse().unwrap(),
                    &sock,
                    path,
                    Some(&body),
                    Duration::from_secs(15),
                )
                .await
                {
                    Ok(r) if r.status == 200 => return Ok(r.body),
                    Ok(r) => return Err(format!("{path}: {} {}", r.status, r.body)),
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
            Err(format!("{path}: NetManager not reachable on {}", sock.display()))
        };
        for (i, sock) in sockets.iter().enumerate() {
            post(
                sock.clone(),
                "/register",
                serde_json::json!({"client_id": format!("w{}", i + 1), "cluster_address": lan}),
            )
            .await?;
        }
        post(
            sockets[0].clone(),
            "/container/deploy",
            serde_json::json!({"pid": client.pid,
            "serviceName": responder::CLIENT_JOB, "instanceNumber": 0, "portMappings": ""}),
        )
        .await?;
        post(
            sockets[1].clone(),
            "/container/deploy",
            serde_json::json!({"pid": server.pid,
            "serviceName": responder::SERVER_JOB, "instanceNumber": 0, "portMappings": ""}),
        )
        .await?;
        Ok::<(), String>(())
    })?;
    // The first packet of the first flow waits for the table query; warm the path up once.
    let _ = client
        .command("busybox")
        .args(["ping", "-c", "3", "-W", "2", responder::SERVICE_IP])
        .output();
    Ok(Target {
        addr: responder::SERVICE_IP.parse().unwrap(),
        netmanagers: sockets,
        netmanager_pids: pids,
        _teardown: undo,
    })
}

/// A stand-in for the cluster's network service on the bench's broker: hands out worker subnets, remembers what
/// the NetManagers report as deployed, and answers table queries for the two jobs of the bench.
mod responder {
    use std::{collections::BTreeMap, path::PathBuf, time::Duration};

    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    use serde_json::{Value, json};

    pub const CLIENT_JOB: &str = "bench.test.cli.test";
    pub const SERVER_JOB: &str = "bench.test.srv.test";
    pub const SERVICE_IP: &str = "10.30.55.55";

    fn instance_ips(job: &str) -> (&'static str, &'static str) {
        if job == SERVER_JOB {
            ("10.30.0.1", "fdff::1")
        } else {
            ("10.30.0.2", "fdff::2")
        }
    }

    /// Runs the responder on a thread inside the network namespace at `netns` until the process exits.
    pub fn start(netns: PathBuf, broker: String) {
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&netns).unwrap();
            rustix::thread::move_into_link_name_space(
                std::os::fd::AsFd::as_fd(&ns),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )
            .unwrap();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(run(broker));
        });
    }

    async fn run(broker: String) {
        let (host, port) = broker.rsplit_once(':').unwrap();
        let mut opts = MqttOptions::new("bench-cluster", host, port.parse().unwrap());
        opts.set_keep_alive(Duration::from_secs(5));
        let (client, mut events) = AsyncClient::new(opts, 100);
        client.subscribe("nodes/+/net/#", QoS::AtLeastOnce).await.unwrap();
        let mut subnets: BTreeMap<String, u32> = BTreeMap::new();
        let mut deployed: BTreeMap<String, Value> = BTreeMap::new();
        while let Ok(ev) = events.poll().await {
            let Event::Incoming(Packet::Publish(p)) = ev else {
                continue;
            };
            let parts: Vec<&str> = p.topic.split('/').collect();
            let (Some(node), Some(rest)) = (parts.get(1), p.topic.splitn(4, '/').nth(3)) else {
                continue;
            };
            let body: Value = serde_json::from_slice(&p.payload).unwrap_or(Value::Null);
            match rest {
                "subnet" => {
                    let next = u32::try_from(subnets.len()).unwrap();
                    let k = *subnets.entry((*node).to_owned()).or_insert(next);
                    let reply = json!({"address": format!("10.18.{}.{}", k / 4, (k % 4) * 64),
                                       "addressv6": format!("fc00::{:x}", (k + 1) * 0x100)});
                    let _ = client
                        .publish(
                            format!("nodes/{node}/net/subnetwork/result"),
                            QoS::AtLeastOnce,
                            false,
                            reply.to_string(),
                        )
                        .await;
                }
                "service/deployed" => {
                    if let Some(job) = body["appname"].as_str() {
                        deployed.insert(job.to_owned(), body.clone());
                    }
                }
                "tablequery/request" => {
                    let key = body["sname"]
                        .as_str()
                        .filter(|s| !s.is_empty())
                        .or_else(|| body["sip"].as_str())
                        .unwrap_or_default()
                        .to_owned();
                    let job = if key == SERVICE_IP
                        || key == "fdff:2000::55"
                        || key == SERVER_JOB
                        || key == instance_ips(SERVER_JOB).0
                        || key == instance_ips(SERVER_JOB).1
                    {
                        SERVER_JOB
                    } else {
                        CLIENT_JOB
                    };
                    let list: Vec<Value> = deployed.get(job).map(|d| {
                        let (ip, ip6) = instance_ips(job);
                        let mut sips = vec![json!({"IpType": "instance_ip", "Address": ip, "Address_v6": ip6})];
                        if job == SERVER_JOB {
                            sips.push(json!({"IpType": "RR", "Address": SERVICE_IP, "Address_v6": "fdff:2000::55"}));
                        }
                        json!({"instance_number": 0, "instance_ip": ip, "instance_ip_v6": ip6,
                               "namespace_ip": d["nsip"], "namespace_ip_v6": d["nsipv6"], "host_ip": d["host_ip"],
                               "host_port": d["host_port"].as_str().and_then(|p| p.parse::<u16>().ok()),
                               "service_ip": sips})
                    }).into_iter().collect();
                    let reply = json!({"app_name": job, "query_key": key, "instance_list": list});
                    let _ = client
                        .publish(
                            format!("nodes/{node}/net/tablequery/result"),
                            QoS::AtLeastOnce,
                            false,
                            reply.to_string(),
                        )
                        .await;
                }
                _ => {}
            }
        }
    }
}

/// A veth from `c` to its worker (see `Container::attach_veth`), deleted again by `undo`.
fn attach(undo: &mut Teardown, c: &Container, host_if: &str, addr: Ipv4Addr, gw: Ipv4Addr, mtu: Option<u32>) {
    c.attach_veth(host_if, addr, gw, 24, mtu);
    undo.ip(c.worker_netns(), &["link", "del", host_if]);
}

/// IPv4 forwarding on in worker netns `ns` (only there: `net.*` sysctls are per namespace), off again by `undo`.
fn forward(undo: &mut Teardown, ns: &Netns) {
    ns.sysctl("net.ipv4.ip_forward", "1");
    undo.push(ns.sysctl_command("net.ipv4.ip_forward", "0"));
}

/// A server process killed and reaped on drop.
struct Server(Child);

impl Server {
    /// Starts `program args` in `c` and waits until it listens on TCP `port`.
    fn start(c: &Container, program: impl AsRef<std::ffi::OsStr>, args: &[&str], port: u16) -> Self {
        let child = c
            .command(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let server = Self(child);
        c.wait_socket("tcp", port, Duration::from_secs(10));
        server
    }

    /// Waits up to `within` for it to exit by itself (`iperf3 -s -1` does after one test).
    fn finish(mut self, within: Duration) {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs a client in `c`; panics with its output when it fails. Returns stdout and stderr together (sockperf prints
/// its report on either, depending on the version).
fn client_output(c: &Container, program: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> String {
    let out = c
        .command(&program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{} {args:?} failed: {text}",
        program.as_ref().to_string_lossy()
    );
    text
}

/// Whether `program` runs at all (`--version`).
fn have(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// `bits_per_second` of `end.sum_received` in iperf3's `-J` report, in Gbit/s.
fn iperf_gbps(json: &str) -> Option<f64> {
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    Some(v["end"]["sum_received"]["bits_per_second"].as_f64()? / 1e9)
}

/// The value of sockperf's `percentile <p> =` line (microseconds, half round trip).
fn sockperf_percentile(report: &str, p: &str) -> Option<f64> {
    let key = format!("percentile {p} =");
    report
        .lines()
        .find_map(|l| l.split_once(&key))
        .and_then(|(_, v)| v.trim().parse().ok())
}

/// `key=value` from netprobe pingpong's line.
fn netprobe_field(line: &str, key: &str) -> Option<f64> {
    line.split_whitespace()
        .find_map(|f| f.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
}

/// netprobe, for the latency fallback: built by `cargo build [--release] -p oakestra-tests --bin netprobe`.
fn netprobe() -> PathBuf {
    let release = procs::target_dir();
    let debug = release.parent().map(|t| t.join("debug")).unwrap_or_default();
    [release.join("netprobe"), debug.join("netprobe")]
        .into_iter()
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("sockperf is missing and so is netprobe: install sockperf, or `cargo build --release -p oakestra-tests --bin netprobe`")
        })
}

/// Throughput and latency from `client` to `target`, the servers running in `server`.
fn measure(client: &Container, server: &Container, target: &Target) -> Measurement {
    let addr = target.addr.to_string();
    let secs = SECONDS.to_string();

    let iperf = Server::start(
        server,
        "iperf3",
        &["-s", "-1", "-p", &IPERF_PORT.to_string()],
        IPERF_PORT,
    );
    let report = client_output(
        client,
        "iperf3",
        &["-c", &addr, "-p", &IPERF_PORT.to_string(), "-t", &secs, "-J"],
    );
    let gbps =
        iperf_gbps(&report).unwrap_or_else(|| panic!("no end.sum_received in iperf3's report: {report}"));
    iperf.finish(Duration::from_secs(5));

    let port = PINGPONG_PORT.to_string();
    let (p50_us, p99_us) = if have("sockperf") {
        let _srv = Server::start(
            server,
            "sockperf",
            &["server", "--tcp", "-i", "0.0.0.0", "-p", &port],
            PINGPONG_PORT,
        );
        let msg = MSG.to_string();
        let report = client_output(
            client,
            "sockperf",
            &[
                "ping-pong",
                "--tcp",
                "-i",
                &addr,
                "-p",
                &port,
                "-m",
                &msg,
                "-t",
                &secs,
            ],
        );
        let p =
            |q| sockperf_percentile(&report, q).unwrap_or_else(|| panic!("no percentile {q} in: {report}"));
        (p("50.000"), p("99.000"))
    } else {
        let probe = netprobe();
        let _srv = Server::start(
            server,
            &probe,
            &["pingpong-serve", "--port", &port],
            PINGPONG_PORT,
        );
        let line = client_output(
            client,
            &probe,
            &[
                "pingpong",
                &addr,
                &port,
                "--size",
                &MSG.to_string(),
                "--seconds",
                &secs,
            ],
        );
        let f = |k| netprobe_field(&line, k).unwrap_or_else(|| panic!("no {k} in: {line}"));
        (f("p50_us"), f("p99_us"))
    };
    Measurement { gbps, p50_us, p99_us }
}

/// `VmRSS` of process `pid` in MB (0 if it cannot be read).
fn rss_mb(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1000.0)
}

/// The dataplane counters of one NetManager (from `NetManager status`), so a slow run shows where packets went.
fn print_counters(sock: &std::path::Path) {
    let out = Command::new(procs::binary("NetManager"))
        .arg("status")
        .arg("--socket")
        .arg(sock)
        .output();
    match out {
        Ok(o) => match serde_json::from_slice::<serde_json::Value>(&o.stdout) {
            Ok(v) => {
                eprintln!("  {}: counters {}", sock.display(), v["counters"]);
                let d = &v["dataplane"];
                if !d["ebpf"].is_null() {
                    eprintln!("  {}: ebpf {}", sock.display(), d["ebpf"]);
                }
            }
            Err(_) => eprintln!(
                "  {}: no status ({})",
                sock.display(),
                String::from_utf8_lossy(&o.stderr).trim()
            ),
        },
        Err(e) => eprintln!("  {}: cannot run NetManager status: {e}", sock.display()),
    }
}

fn main() -> ExitCode {
    if !is_root() {
        println!(
            "overlay bench: skipped, needs root (it builds network namespaces, veths and VXLAN devices); run it as root"
        );
        return ExitCode::SUCCESS;
    }
    if !have("iperf3") {
        eprintln!("overlay bench: iperf3 is not installed (apt-get install iperf3 sockperf)");
        return ExitCode::FAILURE;
    }
    let latency_tool = if have("sockperf") {
        "sockperf ping-pong"
    } else {
        "netprobe pingpong (sockperf not installed)"
    };

    let tb = Testbed::new(TAG, 2);
    let client = tb.container(1, "client");
    let server = tb.container(2, "server");
    let paths: [(&str, Setup); 4] = [
        ("veth", setup_veth),
        ("vxlan", setup_vxlan),
        ("overlay", setup_overlay),
        ("ebpf", setup_ebpf),
    ];
    let mut rows: Vec<(&str, Measurement)> = Vec::new();
    // `OVERLAY_BENCH_PATHS=overlay` (comma-separated) measures only some paths; veth is always measured, as the base.
    let only = std::env::var("OVERLAY_BENCH_PATHS").ok();
    let wanted = |name: &str| {
        name == "veth"
            || only
                .as_deref()
                .is_none_or(|o| o.split(',').any(|p| p.trim() == name))
    };
    for (name, setup) in paths {
        if !wanted(name) {
            continue;
        }
        match setup(&tb, &client, &server) {
            Ok(target) => {
                // Idle: registered, both containers attached, maps loaded, one ping through; nothing running.
                std::thread::sleep(Duration::from_secs(2));
                for pid in &target.netmanager_pids {
                    println!("{name}: NetManager pid {pid} idle RSS {:.1} MB", rss_mb(*pid));
                }
                // `OVERLAY_BENCH_HOLD=<seconds>`: keep the path up before measuring, to look at it by hand.
                let hold = std::env::var("OVERLAY_BENCH_HOLD")
                    .ok()
                    .and_then(|s| s.parse::<u64>().ok());
                if let Some(secs) = hold.filter(|_| name != "veth") {
                    eprintln!(
                        "{name}: holding {secs} s (client pid {}, server pid {})",
                        client.pid, server.pid
                    );
                    std::thread::sleep(Duration::from_secs(secs));
                }
                let m = measure(&client, &server, &target);
                for sock in &target.netmanagers {
                    print_counters(sock);
                }
                for pid in &target.netmanager_pids {
                    println!(
                        "{name}: NetManager pid {pid} RSS after the run {:.1} MB",
                        rss_mb(*pid)
                    );
                }
                println!(
                    "{name}: {:.2} Gbit/s, p50 {:.1} us, p99 {:.1} us",
                    m.gbps, m.p50_us, m.p99_us
                );
                rows.push((name, m));
                // `target` drops here: the path is torn down before the next one is built.
            }
            Err(why) => println!("{name}: {why}"),
        }
    }
    drop((client, server, tb));

    let veth = rows.iter().find(|(n, _)| *n == "veth").map(|(_, m)| *m).unwrap();
    println!();
    println!(
        "TCP container -> container across 2 workers; throughput: iperf3 -t {SECONDS}; latency: {latency_tool}, \
         {MSG} B, half round trip"
    );
    println!(
        "{:<8} {:>10} {:>10} {:>9} {:>9} {:>14}",
        "path", "Gbit/s", "% of veth", "p50 us", "p99 us", "+p50 vs veth"
    );
    for (name, m) in &rows {
        println!(
            "{:<8} {:>10.2} {:>9.1}% {:>9.1} {:>9.1} {:>+14.1}",
            name,
            m.gbps,
            100.0 * m.gbps / veth.gbps,
            m.p50_us,
            m.p99_us,
            m.p50_us - veth.p50_us
        );
    }
    // The closing lines: each overlay dataplane against veth, eBPF also against the kernel's VXLAN.
    let row = |want: &str| rows.iter().find(|(n, _)| *n == want).map(|(_, m)| *m);
    if let Some(m) = row("overlay") {
        println!(
            "overlay vs veth: throughput {:.0}% added-latency-p50 {:.1} us",
            100.0 * m.gbps / veth.gbps,
            m.p50_us - veth.p50_us
        );
    }
    if let Some(m) = row("ebpf") {
        let vs_vxlan = row("vxlan").map_or_else(
            || "n/a (vxlan not measured)".to_owned(),
            |x| format!("{:.0}%", 100.0 * m.gbps / x.gbps),
        );
        println!(
            "ebpf vs veth: throughput {:.0}% added-latency-p50 {:.1} us ; vs vxlan: throughput {vs_vxlan}",
            100.0 * m.gbps / veth.gbps,
            m.p50_us - veth.p50_us
        );
    }
    ExitCode::SUCCESS
}
