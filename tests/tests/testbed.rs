//! Tests of the netns testbed harness itself (root): workers reach each other over the LAN bridge, containers on two
//! workers talk through routed veths with `netprobe`, a thread can enter a worker's netns, nothing survives a drop or
//! a panic, leftovers of a crashed run are removed, and the host's netns is the same before and after.
//! Each test has its own tag, so they run in parallel.

#![allow(clippy::unwrap_used, reason = "test code: a panic is the clearest failure")]

use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use oakestra_tests::netns::{Container, HostSnapshot, MARK_ENV, Testbed, netns_with_tag, require_root};

/// `netprobe`, built by cargo with this package's binaries before the tests run.
fn netprobe() -> &'static str {
    let path = env!("CARGO_BIN_EXE_netprobe");
    assert!(
        Path::new(path).is_file(),
        "{path} is missing: build it with `cargo build -p oakestra-tests --bin netprobe`"
    );
    path
}

/// A child process killed and reaped on drop (also when an assertion fails first).
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs netprobe in `c` and returns its stdout; panics with stderr on a non-zero exit.
fn probe(c: &Container, args: &[&str]) -> String {
    let out = c.command(netprobe()).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "netprobe {args:?} in {}: {}",
        c.name,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Whether process `pid` is gone (reaped, or at least no longer running).
fn gone(pid: u32) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Field 3 (after the parenthesised name) is the state; Z is a zombie nobody reaped yet.
        let state = stat.rsplit(')').next().and_then(|r| r.split_whitespace().next());
        if stat.is_empty() || state == Some("Z") {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn workers_reach_each_other_over_the_lan() {
    require_root();
    let tb = Testbed::new("tbping", 2);
    assert_eq!(netns_with_tag("tbping"), ["tbping-lan", "tbping-w1", "tbping-w2"]);
    assert_eq!(tb.worker(2).addr, Ipv4Addr::new(172, 31, 0, 12));
    let ping = |from: &Testbed, w: usize, to: Ipv4Addr| {
        let out = from
            .worker(w)
            .ns
            .run(&["busybox", "ping", "-c", "1", "-W", "2", &to.to_string()]);
        assert!(
            out.status.success(),
            "worker {w} cannot ping {to}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    ping(&tb, 1, tb.worker(2).addr);
    ping(&tb, 2, tb.lan_addr());
    let addrs = tb.worker(1).ns.ip(&["-o", "-4", "addr", "show", "dev", "eth0"]);
    assert!(addrs.contains("172.31.0.11/24"), "{addrs}");
    let routes = tb.worker(1).ns.ip(&["route"]);
    assert!(routes.contains("default via 172.31.0.1 dev eth0"), "{routes}");
    assert!(
        tb.lan
            .ip(&["-o", "link", "show", "master", "lan0"])
            .contains("tbpingw2")
    );
    drop(tb);
    assert!(netns_with_tag("tbping").is_empty());
}

#[test]
fn containers_on_two_workers_exchange_tcp_and_udp() {
    require_root();
    let before = HostSnapshot::take();
    let pids = {
        let tb = Testbed::new("tbprobe", 2);
        let client = tb.container(1, "client");
        let server = tb.container(2, "server");
        let ino = |p: std::path::PathBuf| p.metadata().unwrap().ino();
        assert_ne!(
            ino(client.netns_path()),
            ino(tb.worker(1).ns.path()),
            "a container has a netns of its own"
        );
        assert_ne!(ino(client.netns_path()), ino(server.netns_path()));
        // Routed veths: 192.168.101.0/24 behind worker 1, 192.168.102.0/24 behind worker 2, workers route to each
        // other's container subnet over the LAN.
        client.attach_veth(
            "vc",
            Ipv4Addr::new(192, 168, 101, 2),
            Ipv4Addr::new(192, 168, 101, 1),
            24,
            None,
        );
        server.attach_veth(
            "vs",
            Ipv4Addr::new(192, 168, 102, 2),
            Ipv4Addr::new(192, 168, 102, 1),
            24,
            None,
        );
        for (w, subnet, via) in [(1, "192.168.102.0/24", 2), (2, "192.168.101.0/24", 1)] {
            let ns = &tb.worker(w).ns;
            ns.sysctl("net.ipv4.ip_forward", "1");
            let now = ns.run(&["cat", "/proc/sys/net/ipv4/ip_forward"]).stdout;
            assert_eq!(String::from_utf8_lossy(&now).trim(), "1");
            ns.ip(&["route", "add", subnet, "via", &tb.worker(via).addr.to_string()]);
        }

        let _serve = Reaped(
            server
                .command(netprobe())
                .args([
                    "serve", "--name", "server", "--tcp", "7000", "--tcp", "7003", "--udp", "7001",
                ])
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap(),
        );
        let _pingpong = Reaped(
            server
                .command(netprobe())
                .args(["pingpong-serve", "--port", "7002"])
                .spawn()
                .unwrap(),
        );
        for (proto, port) in [("tcp", 7000), ("tcp", 7003), ("udp", 7001), ("tcp", 7002)] {
            server.wait_socket(proto, port, Duration::from_secs(5));
        }

        let to = "192.168.102.2";
        assert_eq!(
            probe(
                &client,
                &["tcp", to, "7000", "--count", "3", "--interval-ms", "10"]
            ),
            "server\nserver\nserver\n"
        );
        assert_eq!(probe(&client, &["tcp", to, "7003"]), "server\n");
        assert_eq!(
            probe(&client, &["tcp-each", to, "7000", "--count", "2"]),
            "server\nserver\n"
        );
        assert_eq!(
            probe(&client, &["udp", to, "7001", "--size", "1200", "--count", "2"]),
            "server 1200\nserver 1200\n"
        );
        assert_eq!(probe(&client, &["udp", to, "7001"]), "server 16\n");
        // Dual stack: the same listener answers IPv6 and IPv4 (as a mapped address) inside the server.
        assert_eq!(probe(&server, &["tcp", "::1", "7000"]), "server\n");
        assert_eq!(probe(&server, &["udp", "127.0.0.1", "7001"]), "server 16\n");
        let pp = probe(&client, &["pingpong", to, "7002", "--seconds", "0.3"]);
        let fields: Vec<&str> = pp
            .split_whitespace()
            .map(|f| f.split('=').next().unwrap())
            .collect();
        assert_eq!(fields, ["avg_us", "p50_us", "p99_us", "samples"], "{pp}");

        // Failures are exit code 1 with a message: nothing listens on 7999.
        let refused = client
            .command(netprobe())
            .args(["tcp", to, "7999"])
            .output()
            .unwrap();
        assert_eq!(refused.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&refused.stderr).contains("connect 192.168.102.2:7999"));
        let silent = client
            .command(netprobe())
            .args(["udp", to, "7999"])
            .output()
            .unwrap();
        assert_eq!(silent.status.code(), Some(1));

        // The client container cannot see the server's address as its own: separate netns.
        assert!(!client.ip(&["-o", "addr"]).contains("192.168.102.2"));
        (client.pid, server.pid)
    };
    assert!(netns_with_tag("tbprobe").is_empty());
    assert!(
        gone(pids.0) && gone(pids.1),
        "container processes survived the drop"
    );
    HostSnapshot::take().assert_unchanged(&before);
    HostSnapshot::assert_no_overlay();
}

#[test]
fn a_thread_in_a_worker_netns_has_its_sockets_there() {
    require_root();
    let tb = Testbed::new("tbenter", 2);
    // 172.31.0.12 exists only in worker 2's netns: binding it here, in the host netns, must fail.
    assert!(TcpListener::bind("172.31.0.12:0").is_err());
    let listener = std::thread::scope(|s| {
        s.spawn(|| {
            tb.worker(2).ns.enter_current_thread();
            TcpListener::bind("172.31.0.12:0").unwrap()
        })
        .join()
        .unwrap()
    });
    let port = listener.local_addr().unwrap().port();
    let dialled = std::thread::scope(|s| {
        s.spawn(|| {
            tb.worker(1).ns.enter_current_thread();
            // A child spawned from this thread lives in worker 1's netns too.
            let out = Command::new("ip")
                .args(["-o", "-4", "addr", "show", "dev", "eth0"])
                .output()
                .unwrap();
            assert!(String::from_utf8_lossy(&out.stdout).contains("172.31.0.11/24"));
            TcpStream::connect(("172.31.0.12", port))
                .unwrap()
                .local_addr()
                .unwrap()
        })
        .join()
        .unwrap()
    });
    let (_, peer) = listener.accept().unwrap();
    assert_eq!(peer, dialled);
    assert_eq!(peer.ip().to_string(), "172.31.0.11");
}

#[test]
fn a_panic_leaves_nothing_behind() {
    require_root();
    let pid = Mutex::new(0);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let tb = Testbed::new("tbpanic", 2);
        let c = tb.container(2, "c");
        *pid.lock().unwrap() = c.pid;
        panic!("a failing test");
    }));
    assert!(result.is_err());
    assert!(netns_with_tag("tbpanic").is_empty());
    assert!(gone(*pid.lock().unwrap()));
}

#[test]
fn leftovers_of_a_crashed_run_are_removed() {
    require_root();
    // What a run killed with SIGKILL leaves: named netns (one with a process inside, one worker more than the new
    // testbed has) and a container's sleep whose netns has no name.
    for ns in ["tbstale-lan", "tbstale-w7"] {
        let _ = Command::new("ip").args(["netns", "del", ns]).output();
        assert!(
            Command::new("ip")
                .args(["netns", "add", ns])
                .status()
                .unwrap()
                .success()
        );
    }
    let mut in_stale_ns = Command::new("ip")
        .args(["netns", "exec", "tbstale-w7", "sleep", "infinity"])
        .spawn()
        .unwrap();
    let mut stray_container = Command::new("unshare")
        .args(["--net", "sleep", "infinity"])
        .env(MARK_ENV, "tbstale-w7-old")
        .spawn()
        .unwrap();
    // Both must have exec'd sleep (and so be findable) before the testbed looks for them.
    for pid in [in_stale_ns.id(), stray_container.id()] {
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .unwrap_or_default()
            .trim()
            != "sleep"
        {
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    let tb = Testbed::new("tbstale", 2);
    assert_eq!(
        netns_with_tag("tbstale"),
        ["tbstale-lan", "tbstale-w1", "tbstale-w2"]
    );
    let exited = |c: &mut Child| {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if c.try_wait().unwrap().is_some() {
                return true;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    assert!(
        exited(&mut in_stale_ns),
        "the process in the stale netns survived"
    );
    assert!(exited(&mut stray_container), "the stray container survived");
    // The new testbed works.
    let out = tb
        .worker(1)
        .ns
        .run(&["busybox", "ping", "-c", "1", "-W", "2", "172.31.0.12"]);
    assert!(out.status.success());
    drop(tb);
    assert!(netns_with_tag("tbstale").is_empty());
}

#[test]
fn two_testbeds_with_one_tag_take_turns() {
    require_root();
    // The second `new` must wait for the first testbed's drop instead of deleting its namespaces as leftovers.
    let (created, dropped) = std::thread::scope(|s| {
        let (tx, rx) = std::sync::mpsc::channel();
        let first = s.spawn(move || {
            let tb = Testbed::new("tblock", 1);
            tx.send(()).unwrap();
            std::thread::sleep(Duration::from_millis(500));
            assert!(
                tb.worker(1).ns.path().exists(),
                "the waiting testbed deleted a live one"
            );
            assert!(tb.worker(1).ns.run(&["true"]).status.success());
            drop(tb);
            Instant::now()
        });
        rx.recv().unwrap();
        let second = Testbed::new("tblock", 1);
        let created = Instant::now();
        assert_eq!(netns_with_tag("tblock"), ["tblock-lan", "tblock-w1"]);
        drop(second);
        (created, first.join().unwrap())
    });
    assert!(
        created >= dropped,
        "the second testbed was built while the first was alive"
    );
    assert!(netns_with_tag("tblock").is_empty());
}
