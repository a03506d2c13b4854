#![allow(clippy::unwrap_used, reason = "tests")]
//! The plumbing modules (`netlink`, `nft`, `sysctl`, and the eBPF fast path's loader and attachments) against the
//! real kernel. Needs root, `ip`, `nsenter`,
//! `unshare`, `nft`, `busybox` and `/dev/net/tun`.
//!
//! Every test works only inside network namespaces it creates (`oakplumb-<test>-<pid>`) and removes them when it
//! ends, also when it fails: the code under test runs on a thread that entered the test's namespace (so its netlink
//! sockets, `nft` children and `/proc/sys/net` writes all land there), "containers" are `unshare --net sleep`
//! processes, and every address used lives inside those namespaces. Nothing touches the host's own links, routes,
//! nftables or sysctls, and no packet leaves the test namespaces.

use std::fs::File;
use std::future::Future;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use std::sync::Arc;

use oakestra_ebpf_common::{FlowKey, LocalDest, proto};
use oakestra_netmanager::conntrack::FlowMirror;
use oakestra_netmanager::fastpath::{self, FastPath, FastPathConfig};
use oakestra_netmanager::netlink::{Attach, GuestWiring, Netlink, NetnsTarget, PlumbError, veth_names};
use oakestra_netmanager::nft::{self, HostRules, L4Proto, PortMapping};
use oakestra_netmanager::proxy;
use oakestra_netmanager::sysctl;
use rustix::thread::{LinkNameSpaceType, move_into_link_name_space};
use serde_json::Value;

const BRIDGE: &str = "goProxyBridge";
const BR4: Ipv4Addr = Ipv4Addr::new(10, 18, 0, 1);
const BR6: Ipv6Addr = Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 1);
const BRIDGE_MAC: [u8; 6] = [0x02, 0x4e, 10, 18, 0, 1];
const MTU: u32 = 1450;

/// Runs a command, fails the test if it fails, returns its stdout.
fn cmd(program: &str, args: &[&str]) -> String {
    let out = run(program, args);
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

fn json(text: &str) -> Value {
    if text.trim().is_empty() {
        Value::Array(vec![])
    } else {
        serde_json::from_str(text).unwrap()
    }
}

/// `ip -j <args>` in the calling thread's namespace.
fn ip_json(args: &[&str]) -> Value {
    json(&cmd("ip", &[&["-j"], args].concat()))
}

/// `ip -j <args>` inside the namespace of `pid`.
fn ip_json_in(pid: i32, args: &[&str]) -> Value {
    let pid = pid.to_string();
    json(&cmd(
        "nsenter",
        &[&["-t", pid.as_str(), "-n", "ip", "-j"], args].concat(),
    ))
}

/// `ip -j <args>` inside the namespace file `path`.
fn ip_json_at(path: &Path, args: &[&str]) -> Value {
    let net = format!("--net={}", path.display());
    json(&cmd("nsenter", &[&[net.as_str(), "ip", "-j"], args].concat()))
}

/// (device, inode) of a namespace file: equal pairs mean the same namespace.
fn ns_id(path: impl AsRef<Path>) -> (u64, u64) {
    let meta = std::fs::metadata(path).unwrap();
    (meta.dev(), meta.ino())
}

fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A network namespace owned by one test, deleted (with everything in it) on drop.
struct TestNetns {
    name: String,
}

impl TestNetns {
    fn new(test: &str) -> Self {
        let name = format!("oakplumb-{test}-{}", std::process::id());
        // A leftover of an earlier run that died with the same pid would make `add` fail.
        let _ = run("ip", &["netns", "del", &name]);
        cmd("ip", &["netns", "add", &name]);
        Self { name }
    }

    fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// Runs `body` on a new thread that has entered this namespace, on a current-thread tokio runtime of that
    /// thread (so every socket, child process and spawned connection the code under test creates is in here).
    fn run<F, Fut>(&self, body: F)
    where
        F: FnOnce() -> Fut + Send,
        Fut: Future<Output = ()>,
    {
        let path = self.path();
        std::thread::scope(|scope| {
            let worker = scope.spawn(|| {
                let ns = File::open(&path).unwrap();
                move_into_link_name_space(ns.as_fd(), Some(LinkNameSpaceType::Network)).unwrap();
                // Refuse to run anything unless this thread is provably in the test namespace.
                assert_eq!(
                    ns_id("/proc/thread-self/ns/net"),
                    ns_id(&path),
                    "not inside the test namespace"
                );
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                runtime.block_on(body());
            });
            if let Err(panic) = worker.join() {
                std::panic::resume_unwind(panic);
            }
        });
    }
}

impl Drop for TestNetns {
    #[allow(
        clippy::print_stderr,
        reason = "a failed cleanup is worth a line in the test output"
    )]
    fn drop(&mut self) {
        let out = run("ip", &["netns", "del", &self.name]);
        if !out.status.success() {
            eprintln!(
                "cleanup: ip netns del {}: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// A named namespace created by the code under test; removed on drop in case the test failed before doing so.
struct NamedNetnsGuard(String);

impl Drop for NamedNetnsGuard {
    fn drop(&mut self) {
        if Path::new("/run/netns").join(&self.0).exists() {
            let _ = run("ip", &["netns", "del", &self.0]);
        }
    }
}

/// A stand-in container: a process in a network namespace of its own, killed on drop (which frees the namespace
/// and, with it, whatever we moved there).
struct Container {
    child: Child,
}

impl Container {
    /// Starts it and waits until it really is in another namespace than the calling thread.
    fn start() -> Self {
        let child = Command::new("unshare")
            .args(["--net", "sleep", "120"])
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let container = Self { child };
        let own = ns_id("/proc/thread-self/ns/net");
        let theirs = format!("/proc/{}/ns/net", container.child.id());
        wait_until(
            "the container's own network namespace",
            Duration::from_secs(5),
            || std::fs::metadata(&theirs).is_ok() && ns_id(&theirs) != own,
        );
        container
    }

    fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).unwrap()
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn attach_spec(host: &str, peer: &str, target: NetnsTarget, n: u8) -> Attach {
    Attach {
        host_name: host.to_owned(),
        peer_name: peer.to_owned(),
        peer_mac: [0x02, 0x4f, 10, 18, 0, n],
        bridge: BRIDGE.to_owned(),
        mtu: MTU,
        target,
        guest_port: false,
        v4: Ipv4Addr::new(10, 18, 0, n),
        v4_prefix: 26,
        gw4: BR4,
        v6: Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, u16::from(n)),
        v6_prefix: 120,
        gw6: BR6,
    }
}

async fn bridge(nl: &Netlink) -> u32 {
    nl.recreate_bridge(BRIDGE, MTU, BRIDGE_MAC, BR4, 26, BR6, 120)
        .await
        .unwrap()
}

/// (family, local, prefixlen) of every global address in an `ip -j addr` link entry, checking none is tentative.
fn global_addresses(link: &Value) -> Vec<(String, String, u64)> {
    let mut found = Vec::new();
    for addr in link["addr_info"].as_array().unwrap() {
        if addr["scope"] != "global" {
            continue;
        }
        assert!(
            addr.get("tentative").is_none(),
            "tentative address (DAD not disabled): {addr}"
        );
        found.push((
            addr["family"].as_str().unwrap().to_owned(),
            addr["local"].as_str().unwrap().to_owned(),
            addr["prefixlen"].as_u64().unwrap(),
        ));
    }
    found.sort();
    found
}

fn flags(link: &Value) -> Vec<String> {
    link["flags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap().to_owned())
        .collect()
}

fn addrs(list: &[(&str, &str, u64)]) -> Vec<(String, String, u64)> {
    let mut v: Vec<_> = list
        .iter()
        .map(|(f, a, p)| ((*f).to_owned(), (*a).to_owned(), *p))
        .collect();
    v.sort();
    v
}

/// Pings `target` from inside `pid`'s namespace (a few tries: the first packet may wait for neighbour discovery).
fn ping_from(pid: i32, target: &str) {
    let pid = pid.to_string();
    let mut last = None;
    for _ in 0..3 {
        let out = run(
            "nsenter",
            &["-t", &pid, "-n", "busybox", "ping", "-c1", "-W2", target],
        );
        if out.status.success() {
            return;
        }
        last = Some(out);
    }
    let out = last.unwrap();
    panic!(
        "ping {target} from the container failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn bridge_is_recreated_idempotently() {
    let ns = TestNetns::new("bridge");
    ns.run(|| async {
        let nl = Netlink::connect().unwrap();
        let first = bridge(&nl).await;
        let second = bridge(&nl).await;
        assert_ne!(first, second, "the second call replaces the bridge");
        assert_eq!(nl.link_index(BRIDGE).await.unwrap(), Some(second));

        let link = &ip_json(&["-d", "addr", "show", "dev", BRIDGE])[0];
        assert_eq!(link["mtu"], MTU);
        assert_eq!(link["linkinfo"]["info_kind"], "bridge");
        assert!(flags(link).contains(&"UP".to_owned()), "{link}");
        assert_eq!(
            global_addresses(link),
            addrs(&[("inet", "10.18.0.1", 26), ("inet6", "fc00::1", 120)]),
            "exactly the two addresses, once each"
        );

        assert!(nl.delete_link(BRIDGE).await.unwrap());
        assert!(
            !nl.delete_link(BRIDGE).await.unwrap(),
            "deleting an absent link is Ok(false)"
        );
        assert_eq!(nl.link_index(BRIDGE).await.unwrap(), None);
    });
}

#[test]
fn attach_wires_a_container_and_detach_removes_the_pair() {
    let ns = TestNetns::new("attach");
    ns.run(|| async {
        let nl = Netlink::connect().unwrap();
        bridge(&nl).await;
        let container = Container::start();
        let pid = container.pid();
        let (host, peer) = veth_names(1, "task-attach");
        let index = nl
            .attach(&attach_spec(&host, &peer, NetnsTarget::Pid(pid), 2))
            .await
            .unwrap();

        // Host side: one veth end, in the bridge, up, with the MTU; the peer is not in our namespace. The index
        // returned is the host end's; the bridge keeps the MAC address it was given.
        let host_link = &ip_json(&["-d", "link", "show", "dev", &host])[0];
        assert_eq!(host_link["ifindex"], index);
        assert_eq!(nl.mac_of(BRIDGE).await.unwrap(), BRIDGE_MAC);
        assert_eq!(host_link["mtu"], MTU);
        assert_eq!(host_link["master"], BRIDGE);
        assert_eq!(host_link["linkinfo"]["info_kind"], "veth");
        assert!(flags(host_link).contains(&"UP".to_owned()), "{host_link}");
        assert_eq!(nl.link_index(&peer).await.unwrap(), None);

        // Container side: addresses with their prefixes, not tentative, up, MTU, lo up, both default routes.
        let inside = &ip_json_in(pid, &["addr", "show", "dev", &peer])[0];
        assert_eq!(inside["mtu"], MTU);
        assert_eq!(
            inside["address"], "02:4f:0a:12:00:02",
            "the container end has the MAC it was given"
        );
        assert!(flags(inside).contains(&"UP".to_owned()), "{inside}");
        assert_eq!(
            global_addresses(inside),
            addrs(&[("inet", "10.18.0.2", 26), ("inet6", "fc00::2", 120)])
        );
        let lo = &ip_json_in(pid, &["link", "show", "dev", "lo"])[0];
        assert!(flags(lo).contains(&"UP".to_owned()), "{lo}");
        let v4_default = ip_json_in(pid, &["-4", "route", "show", "default"]);
        assert_eq!(v4_default.as_array().unwrap().len(), 1, "{v4_default}");
        assert_eq!(v4_default[0]["gateway"], "10.18.0.1");
        assert_eq!(v4_default[0]["dev"], peer.as_str());
        let v6_default = ip_json_in(pid, &["-6", "route", "show", "default"]);
        assert_eq!(v6_default.as_array().unwrap().len(), 1, "{v6_default}");
        assert_eq!(v6_default[0]["gateway"], "fc00::1");
        assert_eq!(v6_default[0]["dev"], peer.as_str());

        // The wiring carries traffic (container to bridge, both inside the test's namespaces).
        ping_from(pid, "10.18.0.1");
        ping_from(pid, "fc00::1");

        nl.detach(&host).await.unwrap();
        assert_eq!(nl.link_index(&host).await.unwrap(), None);
        let left = ip_json_in(pid, &["link", "show"]);
        let names: Vec<&str> = left
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["ifname"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["lo"], "the peer went with the host end");
        nl.detach(&host).await.unwrap();
    });
}

#[test]
fn failed_attaches_leave_no_veth_behind() {
    let ns = TestNetns::new("attachfail");
    ns.run(|| async {
        let nl = Netlink::connect().unwrap();
        let (host, peer) = veth_names(2, "task-fail");
        let no_veth = || {
            let veths = ip_json(&["link", "show", "type", "veth"]);
            assert_eq!(
                veths.as_array().unwrap().len(),
                0,
                "a veth was left behind: {veths}"
            );
        };

        // No bridge yet: refused before anything is created.
        let container = Container::start();
        let err = nl
            .attach(&attach_spec(&host, &peer, NetnsTarget::Pid(container.pid()), 3))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, PlumbError::LinkMissing(name) if name == BRIDGE),
            "{err}"
        );
        no_veth();

        bridge(&nl).await;
        // A task that is gone: the error names its namespace file.
        let mut gone = Command::new("true").spawn().unwrap();
        gone.wait().unwrap();
        let dead = i32::try_from(gone.id()).unwrap();
        let err = nl
            .attach(&attach_spec(&host, &peer, NetnsTarget::Pid(dead), 3))
            .await
            .unwrap_err();
        assert!(matches!(err, PlumbError::NetnsOpen { .. }), "{err}");
        let message = err.to_string();
        assert!(message.contains(&format!("/proc/{dead}/ns/net")), "{message}");
        assert_eq!(nl.link_index(&host).await.unwrap(), None);
        no_veth();

        // A failure inside the container, after the pair exists (an IPv6 gateway that is not on-link): the pair
        // is removed before the error comes back.
        let mut spec = attach_spec(&host, &peer, NetnsTarget::Pid(container.pid()), 3);
        spec.gw6 = "2001:db8::1".parse().unwrap();
        let err = nl.attach(&spec).await.unwrap_err();
        let message = err.to_string();
        assert!(message.contains("::/0 via 2001:db8::1"), "{message}");
        assert_eq!(nl.link_index(&host).await.unwrap(), None);
        no_veth();
        let left = ip_json_in(container.pid(), &["link", "show"]);
        assert_eq!(
            left.as_array().unwrap().len(),
            1,
            "only lo in the container: {left}"
        );

        // The same names work afterwards.
        nl.attach(&attach_spec(&host, &peer, NetnsTarget::Pid(container.pid()), 3))
            .await
            .unwrap();
        nl.detach(&host).await.unwrap();
        no_veth();
    });
}

#[test]
fn setup_tun_installs_routes_idempotently() {
    let ns = TestNetns::new("tun");
    ns.run(|| async {
        let nl = Netlink::connect().unwrap();
        let err = nl.setup_tun("t0", 1400, 1000, &[], &[]).await.unwrap_err();
        assert!(
            matches!(&err, PlumbError::LinkMissing(name) if name == "t0"),
            "{err}"
        );

        cmd("ip", &["tuntap", "add", "mode", "tun", "name", "t0"]);
        let v4 = ["10.16.0.0/12".parse().unwrap()];
        let v6 = ["fc00::/7".parse().unwrap()];
        nl.setup_tun("t0", 1400, 1000, &v4, &v6).await.unwrap();
        nl.setup_tun("t0", 1400, 1000, &v4, &v6).await.unwrap();

        let link = &ip_json(&["addr", "show", "dev", "t0"])[0];
        assert_eq!(link["mtu"], 1400);
        assert_eq!(link["txqlen"], 1000);
        assert!(flags(link).contains(&"UP".to_owned()), "{link}");
        assert_eq!(global_addresses(link), vec![], "no addresses on the TUN");

        let routes4 = ip_json(&["-4", "route", "show", "dev", "t0"]);
        let dsts4: Vec<&str> = routes4
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["dst"].as_str().unwrap())
            .collect();
        assert_eq!(dsts4, ["10.16.0.0/12"], "{routes4}");
        let routes6 = ip_json(&["-6", "route", "show", "dev", "t0"]);
        let dsts6: Vec<&str> = routes6
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["dst"].as_str().unwrap())
            .filter(|d| !d.starts_with("fe80:") && !d.starts_with("ff00:") && !d.starts_with("multicast"))
            .collect();
        assert_eq!(dsts6, ["fc00::/7"], "{routes6}");
    });
}

#[test]
fn default_route_v4_prefers_the_default_route_then_falls_back() {
    let ns = TestNetns::new("defroute");
    ns.run(|| async {
        let nl = Netlink::connect().unwrap();
        assert_eq!(
            nl.default_route_v4(&[]).await.unwrap(),
            None,
            "nothing but a down lo"
        );

        // veth pairs stand in for NICs (this kernel has no dummy driver); both ends stay in the test namespace.
        for (a, b) in [("lan0", "lan1"), ("wan0", "wan1")] {
            cmd("ip", &["link", "add", a, "type", "veth", "peer", "name", b]);
        }
        cmd("ip", &["addr", "add", "192.0.2.10/24", "dev", "lan0"]);
        cmd("ip", &["addr", "add", "198.51.100.7/24", "dev", "wan0"]);
        for l in ["lo", "lan0", "lan1"] {
            cmd("ip", &["link", "set", l, "up"]);
        }
        let lan = Some((Ipv4Addr::new(192, 0, 2, 10), "lan0".to_owned()));
        let wan = Some((Ipv4Addr::new(198, 51, 100, 7), "wan0".to_owned()));

        // No default route: the first up, non-loopback, non-excluded interface with a global address.
        assert_eq!(nl.default_route_v4(&[]).await.unwrap(), lan);
        assert_eq!(
            nl.default_route_v4(&["lan0"]).await.unwrap(),
            None,
            "wan0 is down, lan1 has no address"
        );
        cmd("ip", &["link", "set", "wan0", "up"]);
        cmd("ip", &["link", "set", "wan1", "up"]);
        assert_eq!(nl.default_route_v4(&["lan0"]).await.unwrap(), wan);

        // A default route wins over the fallback: its interface's first address.
        cmd(
            "ip",
            &[
                "route",
                "add",
                "default",
                "via",
                "198.51.100.1",
                "dev",
                "wan0",
                "metric",
                "100",
            ],
        );
        assert_eq!(nl.default_route_v4(&[]).await.unwrap(), wan);

        // The lowest metric wins, and its preferred source beats the interface's first address.
        cmd("ip", &["addr", "add", "192.0.2.20/24", "dev", "lan0"]);
        cmd(
            "ip",
            &[
                "route",
                "add",
                "default",
                "via",
                "192.0.2.1",
                "dev",
                "lan0",
                "src",
                "192.0.2.20",
                "metric",
                "10",
            ],
        );
        assert_eq!(
            nl.default_route_v4(&[]).await.unwrap(),
            Some((Ipv4Addr::new(192, 0, 2, 20), "lan0".to_owned()))
        );
    });
}

/// A TCP listener on `port` inside `pid`'s namespace (a thread that entered it), accepting `count` connections and
/// sending back what each peer wrote.
fn container_listener(
    pid: i32,
    port: u16,
    count: usize,
) -> mpsc::Receiver<Result<Vec<(IpAddr, String)>, String>> {
    let (ready_tx, ready_rx) = mpsc::channel();
    let (done_tx, done_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let result = (|| -> Result<Vec<(IpAddr, String)>, String> {
            let ns = File::open(format!("/proc/{pid}/ns/net")).map_err(|e| e.to_string())?;
            move_into_link_name_space(ns.as_fd(), Some(LinkNameSpaceType::Network))
                .map_err(|e| e.to_string())?;
            // [::] takes IPv4 too (v4-mapped) in a fresh namespace, where bindv6only is 0.
            let listener = TcpListener::bind((Ipv6Addr::UNSPECIFIED, port)).map_err(|e| e.to_string())?;
            listener.set_nonblocking(true).map_err(|e| e.to_string())?;
            let _ = ready_tx.send(());
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut got = Vec::new();
            while got.len() < count {
                match listener.accept() {
                    Ok((mut stream, peer)) => {
                        stream.set_nonblocking(false).map_err(|e| e.to_string())?;
                        stream
                            .set_read_timeout(Some(Duration::from_secs(5)))
                            .map_err(|e| e.to_string())?;
                        let mut text = String::new();
                        stream.read_to_string(&mut text).map_err(|e| e.to_string())?;
                        let ip = match peer.ip() {
                            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
                            v4 => v4,
                        };
                        got.push((ip, text));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if Instant::now() > deadline {
                            return Err(format!("only {} of {count} connections arrived", got.len()));
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => return Err(e.to_string()),
                }
            }
            Ok(got)
        })();
        let _ = done_tx.send(result);
    });
    // Wait for the bind (or the thread's early error, which then arrives on the result channel).
    let _ = ready_rx.recv_timeout(Duration::from_secs(5));
    done_rx
}

fn send(to: SocketAddr, text: &str) {
    let mut stream = TcpStream::connect_timeout(&to, Duration::from_secs(3))
        .unwrap_or_else(|e| panic!("connect to {to} (DNAT to the container) failed: {e}"));
    stream.write_all(text.as_bytes()).unwrap();
}

#[test]
fn nft_table_applies_idempotently_and_dnats_published_ports() {
    let ns = TestNetns::new("nft");
    ns.run(|| async {
        let nl = Netlink::connect().unwrap();
        cmd("ip", &["link", "set", "lo", "up"]);
        bridge(&nl).await;
        let container = Container::start();
        let pid = container.pid();
        let (host, peer) = veth_names(3, "task-nft");
        let c4 = Ipv4Addr::new(10, 18, 0, 2);
        let c6: Ipv6Addr = "fc00::2".parse().unwrap();
        nl.attach(&attach_spec(&host, &peer, NetnsTarget::Pid(pid), 2))
            .await
            .unwrap();
        // The host's "LAN" addresses (a veth end inside the test namespace; nothing is routed anywhere else).
        cmd(
            "ip",
            &["link", "add", "lan0", "type", "veth", "peer", "name", "lan1"],
        );
        cmd("ip", &["addr", "add", "192.0.2.1/24", "dev", "lan0"]);
        cmd("ip", &["addr", "add", "2001:db8::1/64", "dev", "lan0", "nodad"]);
        cmd("ip", &["link", "set", "lan0", "up"]);
        cmd("ip", &["link", "set", "lan1", "up"]);
        sysctl::host_forwarding_and_rp_filter(&[BRIDGE]).unwrap();

        let rules = HostRules {
            table: "oakestra".into(),
            bridge: BRIDGE.into(),
            tun: "goProxyTun".into(),
            subnet_v4: "10.18.0.0/26".parse().unwrap(),
            subnet_v6: "fc00::/120".parse().unwrap(),
            mappings: vec![(
                PortMapping {
                    host_port: 8080,
                    container_port: 80,
                    protocol: L4Proto::Tcp,
                },
                c4,
                c6,
            )],
        };
        let script = nft::render(&rules);
        nft::apply(&script).await.unwrap();
        nft::apply(&script).await.unwrap();

        // One copy of each chain and rule after two applies.
        let listing = json(&cmd("nft", &["-j", "list", "table", "inet", "oakestra"]));
        let items = listing["nftables"].as_array().unwrap();
        let mut chains: Vec<(String, String, String)> = items
            .iter()
            .filter_map(|i| i.get("chain"))
            .map(|c| {
                let s = |k: &str| c[k].as_str().unwrap_or_default().to_owned();
                (s("name"), s("type"), s("hook"))
            })
            .collect();
        chains.sort();
        assert_eq!(
            chains,
            [
                ("forward".into(), "filter".into(), "forward".into()),
                ("output".into(), "nat".into(), "output".into()),
                ("postrouting".into(), "nat".into(), "postrouting".into()),
                ("prerouting".into(), "nat".into(), "prerouting".into()),
            ]
        );
        let rules_in = |chain: &str| -> Vec<Value> {
            items
                .iter()
                .filter_map(|i| i.get("rule"))
                .filter(|r| r["chain"] == chain)
                .cloned()
                .collect()
        };
        assert_eq!(rules_in("forward").len(), 4);
        assert_eq!(rules_in("postrouting").len(), 2);
        for chain in ["prerouting", "output"] {
            let rules = rules_in(chain);
            assert_eq!(rules.len(), 2, "{chain}: {rules:?}");
            for rule in &rules {
                let text = rule["expr"].to_string();
                assert!(
                    text.contains(r#""fib":{"flags":["daddr"],"result":"type"}"#),
                    "{text}"
                );
                assert!(text.contains(r#""right":"local""#), "{text}");
                assert!(text.contains(r#""dnat""#), "{text}");
            }
        }
        let output = cmd("nft", &["list", "table", "inet", "oakestra"]);
        assert!(
            output.contains("fib daddr type local tcp dport 8080 dnat ip to 10.18.0.2:80"),
            "{output}"
        );
        assert!(
            output.contains("fib daddr type local tcp dport 8080 dnat ip6 to [fc00::2]:80"),
            "{output}"
        );
        assert_eq!(output.matches("masquerade").count(), 2, "{output}");

        // The mapping really DNATs connections to this host's own addresses into the container.
        let results = container_listener(pid, 80, 2);
        send(SocketAddr::from((Ipv4Addr::new(192, 0, 2, 1), 8080)), "via-v4");
        send(
            SocketAddr::from(("2001:db8::1".parse::<Ipv6Addr>().unwrap(), 8080)),
            "via-v6",
        );
        let got = results.recv_timeout(Duration::from_secs(15)).unwrap().unwrap();
        assert_eq!(
            got,
            [
                (IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), "via-v4".to_owned()),
                (IpAddr::V6("2001:db8::1".parse().unwrap()), "via-v6".to_owned())
            ]
        );

        // A bad script: nft's complaint and the line it blamed come back.
        let err =
            nft::apply("table inet oakestra_bad {\n\tchain c {\n\t\tip saddr 10.0.0.0/33 accept\n\t}\n}\n")
                .await
                .unwrap_err();
        match &err {
            PlumbError::Nft { stderr, line, .. } => {
                assert!(stderr.contains("Error"), "{stderr}");
                assert_eq!(line.as_ref().map(|(n, _)| *n), Some(3), "{err}");
            }
            other => panic!("expected an nft error, got {other}"),
        }

        nft::remove_table("oakestra").await.unwrap();
        let tables = cmd("nft", &["list", "tables"]);
        assert!(!tables.contains("oakestra"), "{tables}");
        nft::remove_table("oakestra").await.unwrap();
    });
}

#[test]
fn sysctl_round_trips_in_a_test_namespace() {
    let host_forward = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap();
    let ns = TestNetns::new("sysctl");
    ns.run(|| async {
        sysctl::set("net.ipv4.ip_forward", "0").unwrap();
        assert_eq!(sysctl::get("net.ipv4.ip_forward").unwrap(), "0");
        sysctl::set("net.ipv4.ip_forward", "1").unwrap();
        assert_eq!(sysctl::get("net.ipv4.ip_forward").unwrap(), "1");
        sysctl::set("net.ipv4.ip_forward", "0").unwrap();

        cmd(
            "ip",
            &["link", "add", "lan0", "type", "veth", "peer", "name", "lan1"],
        );
        let all_before = sysctl::get("net.ipv4.conf.all.rp_filter").unwrap();
        sysctl::host_forwarding_and_rp_filter(&["lan0"]).unwrap();
        assert_eq!(sysctl::get("net.ipv4.ip_forward").unwrap(), "1");
        assert_eq!(sysctl::get("net.ipv6.conf.all.forwarding").unwrap(), "1");
        assert_eq!(sysctl::get("net.ipv4.conf.lan0.rp_filter").unwrap(), "2");
        assert_eq!(
            sysctl::get("net.ipv4.conf.all.rp_filter").unwrap(),
            all_before,
            "`all` is left alone"
        );

        let err = sysctl::set("net.ipv4.conf.nosuchlink.rp_filter", "2").unwrap_err();
        assert!(
            err.to_string().contains("net.ipv4.conf.nosuchlink.rp_filter"),
            "{err}"
        );
        assert!(matches!(
            sysctl::set("../../etc/passwd", "x"),
            Err(PlumbError::SysctlKey(_))
        ));
        assert!(matches!(
            sysctl::get("net/ipv4/ip_forward"),
            Err(PlumbError::SysctlKey(_))
        ));
    });
    assert_eq!(
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap(),
        host_forward,
        "the host's own value is untouched"
    );
}

#[test]
fn named_netns_hosts_an_attached_instance() {
    let ns = TestNetns::new("named");
    let name = format!("oakplumb-uk-{}", std::process::id());
    let _guard = NamedNetnsGuard(name.clone());
    let _ = run("ip", &["netns", "del", &name]);
    ns.run(|| async {
        let nl = Netlink::connect().unwrap();
        let path = Netlink::create_named_netns(&name).await.unwrap();
        assert_eq!(path, Path::new("/run/netns").join(&name));
        assert_ne!(
            ns_id(&path),
            ns_id("/proc/thread-self/ns/net"),
            "a namespace of its own"
        );
        let err = Netlink::create_named_netns(&name).await.unwrap_err();
        assert!(matches!(err, PlumbError::NetnsExists(_)), "{err}");

        bridge(&nl).await;
        let (host, peer) = veth_names(4, "unikernel-1");
        nl.attach(&attach_spec(&host, &peer, NetnsTarget::Path(path.clone()), 5))
            .await
            .unwrap();
        let inside = &ip_json_at(&path, &["addr", "show", "dev", &peer])[0];
        assert_eq!(
            global_addresses(inside),
            addrs(&[("inet", "10.18.0.5", 26), ("inet6", "fc00::5", 120)])
        );

        Netlink::delete_named_netns(&name).await.unwrap();
        assert!(!path.exists());
        Netlink::delete_named_netns(&name).await.unwrap();
        // With its namespace gone the peer is destroyed, and the host end with it (the kernel does this shortly
        // after the last reference goes).
        let deadline = Instant::now() + Duration::from_secs(20);
        while nl.link_index(&host).await.unwrap().is_some() {
            assert!(Instant::now() < deadline, "the host end outlived the namespace");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
}

/// The guest side of a unikernel's namespace, as the daemon names it.
const GUEST_TAP: &str = "tap0";
const GUEST_BRIDGE: &str = "br0";

/// The MAC a guest uses for address `10.18.0.<n>` (the daemon's `container_mac`), as `ip` prints it.
fn guest_mac(n: u8) -> String {
    format!("02:4f:0a:12:00:{n:02x}")
}

/// A unikernel instance wired as the daemon wires it, in the named namespace `name` (created here): the veth with
/// a bare peer (MAC `02:4d:…`), then the guest's tap and bridge. Returns the host end, its index, the peer and the
/// namespace file.
async fn unikernel(nl: &Netlink, name: &str, key: &str, n: u8) -> (String, u32, String, PathBuf) {
    let path = Netlink::create_named_netns(name).await.unwrap();
    let (host, peer) = veth_names(u32::from(n), key);
    let mut spec = attach_spec(&host, &peer, NetnsTarget::Path(path.clone()), n);
    spec.guest_port = true;
    spec.peer_mac = [0x02, 0x4d, 10, 18, 0, n];
    let index = nl.attach(&spec).await.unwrap();
    Netlink::wire_guest(&guest_wiring(&path, &peer)).await.unwrap();
    (host, index, peer, path)
}

fn guest_wiring(netns: &Path, peer: &str) -> GuestWiring {
    GuestWiring {
        netns: netns.to_owned(),
        peer_name: peer.to_owned(),
        tap: GUEST_TAP.to_owned(),
        bridge: GUEST_BRIDGE.to_owned(),
        mtu: MTU,
    }
}

/// A stand-in for a QEMU guest whose NIC is bridged in the unikernel namespace `netns`: a process in a namespace of
/// its own, reached by a veth whose near end joins the guest bridge (alongside the tap) and whose far end has the
/// instance's addresses, the guest MAC and default routes through the worker bridge.
fn veth_guest(netns: &Path, n: u8) -> Container {
    let guest = Container::start();
    let pid = guest.pid().to_string();
    let net = format!("--net={}", netns.display());
    let mtu = MTU.to_string();
    let in_unikernel = |args: &[&str]| cmd("nsenter", &[&[net.as_str(), "ip"], args].concat());
    in_unikernel(&[
        "link", "add", "gst0", "mtu", &mtu, "type", "veth", "peer", "name", "gst1", "netns", &pid,
    ]);
    in_unikernel(&["link", "set", "gst0", "master", GUEST_BRIDGE, "up"]);
    let in_guest = |args: &[&str]| cmd("nsenter", &[&["-t", pid.as_str(), "-n", "ip"], args].concat());
    let (v4, v6) = (format!("10.18.0.{n}/26"), format!("fc00::{n:x}/120"));
    in_guest(&["link", "set", "gst1", "address", &guest_mac(n), "mtu", &mtu, "up"]);
    in_guest(&["link", "set", "lo", "up"]);
    in_guest(&["addr", "add", &v4, "dev", "gst1"]);
    in_guest(&["addr", "add", &v6, "dev", "gst1", "nodad"]);
    in_guest(&["route", "add", "default", "via", "10.18.0.1"]);
    in_guest(&["-6", "route", "add", "default", "via", "fc00::1"]);
    guest
}

/// Runs `f` on a thread that entered the namespace file `path`.
fn in_netns_at<T: Send + 'static>(path: &Path, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = path.to_owned();
    std::thread::spawn(move || {
        let ns = File::open(&path).unwrap();
        move_into_link_name_space(ns.as_fd(), Some(LinkNameSpaceType::Network)).unwrap();
        f()
    })
    .join()
    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// An ARP request from `sender_mac`/`sender` for `target`, as a guest's NIC would put it on the tap.
fn arp_request(sender_mac: [u8; 6], sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut frame = vec![0xff; 6];
    frame.extend_from_slice(&sender_mac);
    frame.extend_from_slice(&[0x08, 0x06, 0x00, 0x01, 0x08, 0x00, 6, 4, 0x00, 0x01]);
    frame.extend_from_slice(&sender_mac);
    frame.extend_from_slice(&sender.octets());
    frame.extend_from_slice(&[0; 6]);
    frame.extend_from_slice(&target.octets());
    frame
}

/// The sender MAC of an ARP reply to `to_mac` saying where `from` is, if `frame` is one.
fn arp_reply_from(frame: &[u8], to_mac: [u8; 6], from: Ipv4Addr) -> Option<[u8; 6]> {
    let is_reply = frame.len() >= 42
        && frame[..6] == to_mac
        && frame[12..14] == [0x08, 0x06]
        && frame[20..22] == [0x00, 0x02]
        && frame[28..32] == from.octets();
    is_reply.then(|| <[u8; 6]>::try_from(&frame[22..28]).unwrap())
}

#[test]
fn a_unikernel_guest_owns_its_addresses_behind_a_tap_and_a_bridge() {
    let ns = TestNetns::new("guest");
    let name = format!("oakplumb-ukg-{}", std::process::id());
    let _guard = NamedNetnsGuard(name.clone());
    let _ = run("ip", &["netns", "del", &name]);
    ns.run(|| async {
        let nl = Netlink::connect().unwrap();
        bridge(&nl).await;
        let (host, _, peer, path) = unikernel(&nl, &name, "unikernel-guest", 5).await;
        // Wiring again starts from scratch and ends the same.
        Netlink::wire_guest(&guest_wiring(&path, &peer)).await.unwrap();

        // Host side: the host end is in the worker bridge, as a container's.
        let host_link = &ip_json(&["link", "show", "dev", &host])[0];
        assert_eq!(host_link["master"], BRIDGE);
        assert!(flags(host_link).contains(&"UP".to_owned()), "{host_link}");

        // Inside: exactly lo, the peer, the tap and the bridge; no address on any (not even IPv6 link-local, so the
        // namespace itself sends nothing) and no routes.
        let links = ip_json_at(&path, &["-d", "addr", "show"]);
        let link = |name: &str| -> Value {
            links
                .as_array()
                .unwrap()
                .iter()
                .find(|l| l["ifname"] == name)
                .cloned()
                .unwrap_or_else(|| panic!("no {name} in the unikernel namespace: {links}"))
        };
        let mut names: Vec<&str> = links
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["ifname"].as_str().unwrap())
            .collect();
        names.sort_unstable();
        let mut expected = vec![GUEST_BRIDGE, "lo", peer.as_str(), GUEST_TAP];
        expected.sort_unstable();
        assert_eq!(names, expected);
        for name in [peer.as_str(), GUEST_TAP, GUEST_BRIDGE] {
            let l = link(name);
            assert_eq!(l["addr_info"], Value::Array(vec![]), "{name} has addresses: {l}");
            assert_eq!(l["mtu"], MTU, "{l}");
            assert!(flags(&l).contains(&"UP".to_owned()), "{l}");
            let detail = &ip_json_at(&path, &["-d", "link", "show", "dev", name])[0];
            assert_eq!(detail["inet6_addr_gen_mode"], "none", "{detail}");
        }
        let peer_link = link(&peer);
        assert_eq!(peer_link["address"], "02:4d:0a:12:00:05", "not the guest's MAC");
        assert_eq!(peer_link["master"], GUEST_BRIDGE);
        let tap = link(GUEST_TAP);
        assert_eq!(tap["master"], GUEST_BRIDGE);
        assert_eq!(tap["linkinfo"]["info_kind"], "tun", "{tap}");
        let tap_info = &tap["linkinfo"]["info_data"];
        assert_eq!(
            (
                &tap_info["type"],
                &tap_info["pi"],
                &tap_info["multi_queue"],
                &tap_info["persist"]
            ),
            (
                &Value::from("tap"),
                &Value::from(false),
                &Value::from(false),
                &Value::from(true)
            ),
            "{tap}"
        );
        let br = link(GUEST_BRIDGE);
        assert_eq!(br["linkinfo"]["info_kind"], "bridge", "{br}");
        let br_info = &br["linkinfo"]["info_data"];
        assert_eq!(
            (
                &br_info["stp_state"],
                &br_info["forward_delay"],
                &br_info["mcast_snooping"]
            ),
            (&Value::from(0), &Value::from(0), &Value::from(0)),
            "{br}"
        );
        for family in ["-4", "-6"] {
            let routes = ip_json_at(&path, &[family, "route", "show"]);
            assert_eq!(routes, Value::Array(vec![]), "{family} routes in the namespace");
        }

        // The tap as QEMU opens it: a guest with the instance's MAC and address asks for the gateway, and the
        // worker bridge's answer comes back through the veth, the guest bridge and the tap.
        let gw = in_netns_at(&path, || {
            let tap = tun_rs::DeviceBuilder::new()
                .name(GUEST_TAP)
                .layer(tun_rs::Layer::L2)
                .inherit_enable_state()
                .build_sync()
                .unwrap();
            tap.set_nonblocking(true).unwrap();
            let me = [0x02, 0x4f, 10, 18, 0, 5];
            let (guest, gateway) = (Ipv4Addr::new(10, 18, 0, 5), Ipv4Addr::new(10, 18, 0, 1));
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut buf = [0u8; 2048];
            let mut next_ask = Instant::now();
            loop {
                assert!(
                    Instant::now() < deadline,
                    "no ARP answer from the gateway on the tap"
                );
                if Instant::now() >= next_ask {
                    tap.send(&arp_request(me, guest, gateway)).unwrap();
                    next_ask = Instant::now() + Duration::from_millis(500);
                }
                match tap.recv(&mut buf) {
                    Ok(n) => {
                        if let Some(mac) = arp_reply_from(&buf[..n], me, gateway) {
                            break mac;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(e) => panic!("reading the tap: {e}"),
                }
            }
        });
        assert_eq!(gw, BRIDGE_MAC);

        // A guest behind the bridge (QEMU gone, the tap closed): it reaches the worker bridge, and the host side
        // reaches it by its address, resolving it to the guest MAC, not the peer's.
        let guest = veth_guest(&path, 5);
        ping_from(guest.pid(), "10.18.0.1");
        ping_from(guest.pid(), "fc00::1");
        for target in ["10.18.0.5", "fc00::5"] {
            let out = run("busybox", &["ping", "-c1", "-W2", target]);
            assert!(out.status.success(), "ping {target} from the host side: {out:?}");
            let neigh = ip_json(&["neigh", "show", target]);
            assert_eq!(neigh[0]["lladdr"], guest_mac(5), "{neigh}");
        }

        // Undeploy: deleting the namespace takes the tap, the bridge and the veth (both ends) with it.
        Netlink::delete_named_netns(&name).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while nl.link_index(&host).await.unwrap().is_some()
            || ip_json_in(guest.pid(), &["link", "show"])
                .as_array()
                .unwrap()
                .len()
                > 1
        {
            assert!(
                Instant::now() < deadline,
                "the unikernel namespace outlived its deletion"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
}

/// Runs `f` on a thread that entered the network namespace of process `pid`.
fn in_netns_of<T: Send + 'static>(
    pid: i32,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    std::thread::spawn(move || {
        let ns = File::open(format!("/proc/{pid}/ns/net")).unwrap();
        move_into_link_name_space(ns.as_fd(), Some(LinkNameSpaceType::Network)).unwrap();
        f()
    })
}

/// The fast path loaded, with the container program on each `(host veth, its index, n)` and `10.18.0.<n>`
/// recorded as a local destination behind it (MAC `02:4f:0a:12:00:<n>`, as the daemon records instances).
fn fast_path_with_locals(locals: &[(&String, u32, u8)]) -> Arc<FastPath> {
    let fast = Arc::new(FastPath::load(&fast_path_config(None)).unwrap());
    for &(host, index, n) in locals {
        fast.attach_container(host).unwrap();
        let dest = LocalDest {
            ifindex: index,
            mac: [0x02, 0x4f, 10, 18, 0, n],
            _pad: [0; 2],
        };
        fast.set_local(IpAddr::V4(Ipv4Addr::new(10, 18, 0, n)), dest)
            .unwrap();
    }
    fast
}

fn fast_path_config(underlay: Option<Ipv4Addr>) -> FastPathConfig {
    FastPathConfig {
        max_flows: 1024,
        tunnel_port: 50103,
        underlay_v4: underlay,
        gateway_mac: BRIDGE_MAC,
    }
}

/// The names of the tc programs on `dev`'s ingress (`tc filter show`).
fn ingress_programs(dev: &str) -> String {
    String::from_utf8_lossy(&run("tc", &["filter", "show", "dev", dev, "ingress"]).stdout).into_owned()
}

/// A UDP exchange between two local instances that only the fast path can carry: the flows the slow path would
/// write for `client` (10.18.0.2, instance 10.30.0.5) asking the service 10.30.55.55, balanced to `server`
/// (10.18.0.3, instance 10.30.0.7), are installed; `server` answers with the source it saw. Checks both packets
/// were delivered locally in the kernel (`bpf_redirect_peer`) with the translations applied.
fn udp_through_the_fast_path(fast: &FastPath, client_pid: i32, server_pid: i32) {
    // What the slow path would write for the client's flow to the service and for the server's reply: both ends
    // local.
    let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
    let k1 = FlowKey::v4(
        [10, 18, 0, 2],
        [10, 30, 55, 55],
        40000u16.to_be(),
        9000u16.to_be(),
        proto::UDP,
    );
    let out = proxy::flow_pair(
        &k1,
        ip("10.30.55.55"),
        ip("10.30.0.5"),
        ip("10.18.0.3"),
        ip("10.30.0.7"),
        None,
    );
    let k3 = FlowKey::v4(
        [10, 18, 0, 3],
        [10, 30, 0, 5],
        9000u16.to_be(),
        40000u16.to_be(),
        proto::UDP,
    );
    let back = proxy::flow_pair(
        &k3,
        ip("10.30.0.5"),
        ip("10.30.0.7"),
        ip("10.18.0.2"),
        ip("10.30.0.5"),
        None,
    );
    for (k, a) in out.iter().chain(back.iter()) {
        fast.install(k, a).unwrap();
    }
    let before = fast.stats();

    // The server answers whoever writes to it on UDP 9000 with what it saw as the source; the client asks the
    // service.
    let server = in_netns_of(server_pid, || {
        let s = std::net::UdpSocket::bind("0.0.0.0:9000").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 64];
        let (_, from) = s.recv_from(&mut buf).unwrap();
        s.send_to(from.to_string().as_bytes(), from).unwrap();
        from
    });
    std::thread::sleep(Duration::from_millis(200));
    let client = in_netns_of(client_pid, || {
        let s = std::net::UdpSocket::bind("0.0.0.0:40000").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.send_to(b"ping", "10.30.55.55:9000").unwrap();
        let mut buf = [0u8; 64];
        let (n, from) = s.recv_from(&mut buf).unwrap();
        (from, String::from_utf8_lossy(&buf[..n]).into_owned())
    });
    let seen_by_server = server.join().unwrap();
    let (reply_from, text) = client.join().unwrap();
    // The server saw the client's instance address; the client got its answer from the address it asked.
    assert_eq!(seen_by_server, "10.30.0.5:40000".parse::<SocketAddr>().unwrap());
    assert_eq!(text, "10.30.0.5:40000");
    assert_eq!(reply_from, "10.30.55.55:9000".parse::<SocketAddr>().unwrap());
    let after = fast.stats();
    assert_eq!(
        after.egress_local.packets - before.egress_local.packets,
        2,
        "{after:?}"
    );
    assert_eq!(after.errors.packets, 0);
    assert_eq!(after.flows, 4);
    assert!(fast.last_seen(&k1).is_some());
}

#[test]
fn fast_path_delivers_between_local_containers_in_the_kernel() {
    let ns = TestNetns::new("fastlocal");
    ns.run(|| async {
        let nl = Netlink::connect().unwrap();
        bridge(&nl).await;
        sysctl::host_forwarding_and_rp_filter(&[BRIDGE]).unwrap();
        let (c1, c2) = (Container::start(), Container::start());
        let (h1, p1) = veth_names(1, "fast-c1");
        let (h2, p2) = veth_names(2, "fast-c2");
        let i1 = nl
            .attach(&attach_spec(&h1, &p1, NetnsTarget::Pid(c1.pid()), 2))
            .await
            .unwrap();
        let i2 = nl
            .attach(&attach_spec(&h2, &p2, NetnsTarget::Pid(c2.pid()), 3))
            .await
            .unwrap();

        let fast = fast_path_with_locals(&[(&h1, i1, 2), (&h2, i2, 3)]);
        assert!(
            ingress_programs(&h1).contains("oakestra_from_container"),
            "{}",
            ingress_programs(&h1)
        );

        udp_through_the_fast_path(&fast, c1.pid(), c2.pid());

        // Detached and shut down: nothing of ours is left on the veths.
        fast.detach_container(&h1);
        assert!(
            !ingress_programs(&h1).contains("oakestra"),
            "{}",
            ingress_programs(&h1)
        );
        assert_eq!(fast.shutdown(), None, "no underlay was attached");
        assert!(
            !ingress_programs(&h2).contains("oakestra"),
            "{}",
            ingress_programs(&h2)
        );
        nl.detach(&h1).await.unwrap();
        nl.detach(&h2).await.unwrap();
    });
}

#[test]
fn fast_path_delivers_to_a_unikernel_guest_through_its_bridge() {
    let ns = TestNetns::new("fastguest");
    let name = format!("oakplumb-ukf-{}", std::process::id());
    let _guard = NamedNetnsGuard(name.clone());
    let _ = run("ip", &["netns", "del", &name]);
    ns.run(|| async {
        let nl = Netlink::connect().unwrap();
        bridge(&nl).await;
        sysctl::host_forwarding_and_rp_filter(&[BRIDGE]).unwrap();
        let c1 = Container::start();
        let (h1, p1) = veth_names(1, "fastg-c1");
        let i1 = nl
            .attach(&attach_spec(&h1, &p1, NetnsTarget::Pid(c1.pid()), 2))
            .await
            .unwrap();
        let (h2, i2, _, path) = unikernel(&nl, &name, "fastg-uk", 3).await;
        let guest = veth_guest(&path, 3);

        // As the daemon records them: the unikernel's host end, with the guest's MAC (not its bridge port's).
        let fast = fast_path_with_locals(&[(&h1, i1, 2), (&h2, i2, 3)]);
        // `bpf_redirect_peer` lands the container's packet on the bare peer's ingress; the guest bridge forwards it
        // to the guest by its MAC. The guest's answer leaves through the same veth into the container program.
        udp_through_the_fast_path(&fast, c1.pid(), guest.pid());

        fast.shutdown();
        nl.detach(&h1).await.unwrap();
        Netlink::delete_named_netns(&name).await.unwrap();
    });
}

#[test]
fn fast_path_underlay_attach_shutdown_and_leftovers() {
    let ns = TestNetns::new("fastunder");
    ns.run(|| async {
        let nl = Netlink::connect().unwrap();
        cmd(
            "ip",
            &["link", "add", "und0", "type", "veth", "peer", "name", "und1"],
        );
        cmd("ip", &["link", "set", "und0", "up"]);
        let clsact = || {
            String::from_utf8_lossy(&run("tc", &["qdisc", "show", "dev", "und0"]).stdout).contains("clsact")
        };
        assert!(!clsact());

        // Attach, shut down: the program and the clsact qdisc we added are gone.
        let fast = FastPath::load(&fast_path_config(Some(Ipv4Addr::new(192, 0, 2, 7)))).unwrap();
        fast.attach_underlay("und0").unwrap();
        assert!(clsact());
        assert!(ingress_programs("und0").contains("oakestra_from_underlay"));
        assert_eq!(fast.stats().underlay.as_deref(), Some("und0"));
        assert_eq!(fast.shutdown().as_deref(), Some("und0"), "we added the qdisc");
        assert!(!ingress_programs("und0").contains("oakestra"));
        assert!(nl.remove_clsact_if_empty("und0").await.unwrap());
        assert!(!clsact());
        drop(fast);

        // A NetManager that is killed leaves its program attached; the next start removes it.
        let killed = FastPath::load(&fast_path_config(Some(Ipv4Addr::new(192, 0, 2, 7)))).unwrap();
        killed.attach_underlay("und0").unwrap();
        std::mem::forget(killed);
        assert!(ingress_programs("und0").contains("oakestra_from_underlay"));
        let links = nl.link_names().await.unwrap();
        assert_eq!(fastpath::remove_leftovers(&links), ["und0"]);
        assert!(!ingress_programs("und0").contains("oakestra"));
        assert!(
            fastpath::remove_leftovers(&links).is_empty(),
            "nothing left to remove"
        );

        // Someone else's filter keeps the qdisc in place.
        cmd(
            "tc",
            &[
                "filter", "add", "dev", "und0", "ingress", "prio", "7", "u32", "match", "u32", "0", "0",
                "classid", "1:1",
            ],
        );
        assert!(!nl.remove_clsact_if_empty("und0").await.unwrap());
        assert!(clsact());
        // A second fast path attaching to the same interface does not remove it either.
        let again = FastPath::load(&fast_path_config(Some(Ipv4Addr::new(192, 0, 2, 7)))).unwrap();
        again.attach_underlay("und0").unwrap();
        assert_eq!(again.shutdown(), None, "the qdisc was there before");
        assert!(clsact());
    });
}
