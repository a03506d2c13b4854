//! The semantic overlay end to end, on a netns testbed: root and cluster on the "LAN" namespace, two workers each
//! running a real NetManager and a real NodeEngine (one private containerd), real containers. A client container
//! reaches a service's round-robin addresses (v4 and v6) whose instances run on both workers: TCP, UDP (also a
//! fragmented datagram), ping, round robin across instances, one TCP flow staying on one instance, bulk TCP both
//! ways to a service on the other worker, new flows avoiding a removed instance, a host port mapping, and nothing
//! leaking into the host's namespace.
//!
//! The scenario runs three times: both workers on the TUN dataplane, both on the eBPF fast path (which must carry
//! established flows itself: the TUN path only sees their first packets), and a mixed pair (the client's worker
//! on eBPF, the other on TUN), so the two dataplanes interoperate in both directions.
#![allow(clippy::unwrap_used, reason = "test code: a panic is the clearest failure")]
#![allow(clippy::print_stderr, reason = "the test reports what it observed")]

use std::process::Stdio;
use std::time::Duration;

use oakestra_tests::{
    harness::eventually,
    incontainer::{lines, nsenter, probe, serve, tasks},
    netns::HostSnapshot,
    overlaybed::{NOBPF, OverlayBed},
    procs::binary,
    stack::{IMAGE, call},
};
use serde_json::{Value, json};

const RR_V4: &str = "10.30.55.55";
const RR_V6: &str = "fdff:2000::55";
/// The bulk service's address (one instance, on the second worker).
const BULK_V4: &str = "10.30.57.57";

/// One scenario at a time: each builds a testbed with two workers, a containerd and the control plane, which is
/// all two cores can carry.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "current_thread")]
async fn on_the_tun_dataplane() {
    let _one = SERIAL.lock().await;
    scenario("ovltun", &["tun", "tun"]).await;
}

#[tokio::test(flavor = "current_thread")]
async fn on_the_ebpf_dataplane() {
    let _one = SERIAL.lock().await;
    scenario("ovlebpf", &["ebpf", "ebpf"]).await;
}

#[tokio::test(flavor = "current_thread")]
async fn on_a_mixed_pair() {
    let _one = SERIAL.lock().await;
    scenario("ovlmix", &["ebpf", "tun"]).await;
}

/// The second worker's NetManager asks for `auto` but may not use eBPF: it falls back to the TUN dataplane with
/// one warning naming the reason, and still interoperates with the eBPF worker.
#[tokio::test(flavor = "current_thread")]
async fn auto_falls_back_to_tun_without_ebpf_permission() {
    let _one = SERIAL.lock().await;
    scenario("ovlnobpf", &["ebpf", NOBPF]).await;
}

/// `iperf3 -c <addr> -t 2 [-R] -J` in the client container; Gbit/s received.
fn bulk(cli_pid: u32, addr: &str, reverse: bool) -> f64 {
    let mut args = vec!["iperf3", "-c", addr, "-t", "2", "-J"];
    if reverse {
        args.push("-R");
    }
    let out = nsenter(cli_pid, &args).output().unwrap();
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    let bps = report["end"]["sum_received"]["bits_per_second"].as_f64();
    assert!(
        out.status.success() && bps.is_some(),
        "iperf3 to {addr} (reverse {reverse}) failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    bps.unwrap_or(0.0) / 1e9
}

/// The client runs on worker 1 (`w1`); servers run on both workers, the bulk service on `w2`.
async fn scenario(tag: &str, dataplanes: &[&str]) {
    let bed = OverlayBed::start(tag, dataplanes, &[]).await;
    let (stack, ctrd, tb) = (&bed.stack, &bed.ctrd, &bed.tb);
    let all = bed.procs();
    let ebpf = |w: usize| dataplanes[w] == "ebpf" || dataplanes[w] == "auto";

    // One application: the server (two instances, each needs both cores, so one per worker) and a client.
    let srv = json!({"microserviceID": "", "microservice_name": "srv", "microservice_namespace": "test",
        "virtualization": "container", "memory": 64, "vcpus": 2, "code": IMAGE,
        "cmd": ["sleep", "3600"], "port": "9090:8080",
        "addresses": {"rr_ip": RR_V4, "rr_ip_v6": RR_V6}});
    let cli = json!({"microserviceID": "", "microservice_name": "cli", "microservice_namespace": "test",
        "virtualization": "container", "memory": 32, "vcpus": 0, "code": IMAGE, "cmd": ["sleep", "3600"],
        "constraints": [{"type": "direct", "node": OverlayBed::name(0)}]});
    let sla = json!({"sla_version": "v2.0", "customerID": "Admin", "applications": [{
        "applicationID": "", "application_name": "ovl", "application_namespace": "test",
        "application_desc": "", "microservices": [srv, cli]}]});
    let apps = call(
        "POST",
        &format!("{}/api/application", stack.root_url),
        Some(&stack.token),
        Some(&sla),
    )
    .await;
    assert_eq!(apps.status, 200, "{}", apps.body);
    let app_id = apps.body[0]["_id"]["$oid"].as_str().unwrap().to_owned();
    let services = call(
        "GET",
        &format!("{}/api/services/{app_id}", stack.root_url),
        Some(&stack.token),
        None,
    )
    .await;
    let id_of = |name: &str| {
        services
            .body
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["microservice_name"] == json!(name))
            .unwrap()["_id"]["$oid"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let (srv_id, cli_id) = (id_of("srv"), id_of("cli"));
    // Both workers must be up before placing the servers.
    stack.wait_active_workers(2, 60, &all).await;
    bed.assert_dataplanes();
    for id in [&srv_id, &srv_id, &cli_id] {
        let r = call(
            "POST",
            &format!("{}/api/service/{id}/instance", stack.root_url),
            Some(&stack.token),
            Some(&json!({})),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    for (id, n) in [(&srv_id, 2), (&cli_id, 1)] {
        eventually(90, &format!("{n} instance(s) of {id} RUNNING"), &all, || async {
            let list = stack.instances(id).await;
            (list.iter().filter(|i| i["status"] == json!("RUNNING")).count() == n).then_some(())
        })
        .await;
    }

    // Find the containers: which worker runs which instance.
    let mut servers: Vec<(String, u32, usize)> = Vec::new(); // (name, pid, worker index)
    let mut client = None;
    for (w, name) in ["w1", "w2"].iter().enumerate() {
        for (task, pid) in tasks(ctrd, name) {
            if task.starts_with("ovl.test.srv.test.instance.") {
                servers.push((format!("srv-on-{name}"), pid, w));
            } else if task.starts_with("ovl.test.cli.test.instance.") {
                client = Some((pid, w));
            }
        }
    }
    assert_eq!(servers.len(), 2, "one server per worker: {servers:?}");
    assert_ne!(servers[0].2, servers[1].2, "servers on different workers");
    let (cli_pid, cli_worker) = client.expect("the client container");
    assert_eq!(cli_worker, 0, "the client is pinned to w1");
    let _serve: Vec<_> = servers
        .iter()
        .map(|(name, pid, _)| serve(*pid, name, 8080, 8081))
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    HostSnapshot::assert_no_overlay();

    // Round robin: consecutive new flows alternate between the two instances, for v4 and v6.
    for rr in [RR_V4, RR_V6] {
        let names = lines(&probe(cli_pid, &["tcp-each", rr, "8080", "--count", "6"]));
        eprintln!("new flows via {rr}: {names:?}");
        assert_eq!(names.len(), 6, "{names:?}");
        for pair in names.windows(2) {
            assert_ne!(pair[0], pair[1], "round robin alternates via {rr}: {names:?}");
        }
        let distinct: std::collections::BTreeSet<&String> = names.iter().collect();
        assert_eq!(distinct.len(), 2, "{names:?}");
    }
    // One TCP flow stays on one instance.
    let names = lines(&probe(
        cli_pid,
        &["tcp", RR_V4, "8080", "--count", "8", "--interval-ms", "100"],
    ));
    assert_eq!(names.len(), 8);
    assert!(
        names.iter().all(|n| *n == names[0]),
        "one flow, one instance: {names:?}"
    );
    // UDP, including a datagram that the 1450-byte MTU fragments.
    for rr in [RR_V4, RR_V6] {
        let got = lines(&probe(cli_pid, &["udp", rr, "8081", "--count", "3"]));
        assert_eq!(got.len(), 3, "{got:?}");
        let big = lines(&probe(cli_pid, &["udp", rr, "8081", "--size", "4000"]));
        eprintln!("udp via {rr}: {got:?}, 4000 bytes: {big:?}");
        assert!(
            big[0].ends_with(" 4000"),
            "fragmented datagram arrives whole via {rr}: {big:?}"
        );
    }
    // Ping to the service addresses (the reference drops ICMP).
    let ping = nsenter(cli_pid, &["busybox", "ping", "-c", "2", "-W", "3", RR_V4])
        .output()
        .unwrap();
    assert!(
        ping.status.success(),
        "ping {RR_V4}: {}",
        String::from_utf8_lossy(&ping.stdout)
    );
    let ping6 = nsenter(cli_pid, &["busybox", "ping6", "-c", "2", "-W", "3", RR_V6])
        .output()
        .unwrap();
    assert!(
        ping6.status.success(),
        "ping6 {RR_V6}: {}",
        String::from_utf8_lossy(&ping6.stdout)
    );

    // One long TCP flow: on an eBPF worker the TUN path sees only its first packets (and its FIN), the fast path
    // carries the rest.
    let tun_rx = |w: usize| bed.netmanager_status(w)["counters"]["tun_rx"].as_u64().unwrap();
    let (tun_before, fast_before) = (tun_rx(0), bed.fast_path_packets(0).0);
    let names = lines(&probe(
        cli_pid,
        &["tcp", RR_V4, "8080", "--count", "200", "--interval-ms", "5"],
    ));
    assert_eq!(names.len(), 200);
    let (tun_delta, fast_delta) = (tun_rx(0) - tun_before, bed.fast_path_packets(0).0 - fast_before);
    eprintln!(
        "long flow of 200 rounds from w1: TUN path read {tun_delta} packets, fast path forwarded {fast_delta}"
    );
    if ebpf(0) {
        assert!(
            fast_delta >= 200,
            "the fast path forwarded {fast_delta} packets of 200+"
        );
        assert!(
            tun_delta <= 10,
            "the TUN path read {tun_delta} packets of an established flow"
        );
    } else {
        assert_eq!(fast_delta, 0);
        assert!(tun_delta >= 200, "the TUN path read {tun_delta} packets");
    }

    // Bulk TCP both ways to a service on the other worker: GSO super-packets on the fast path, and on a mixed pair
    // what the eBPF worker sends whole must be cut and checksummed by the TUN worker.
    let blk = json!({"microservice_name": "blk", "memory": 32, "cmd": ["sleep", "3600"],
        "constraints": [{"type": "direct", "node": OverlayBed::name(1)}], "addresses": {"rr_ip": BULK_V4}});
    let blk_id = stack.deploy("ovlblk", &blk).await;
    eventually(90, "the bulk server RUNNING", &all, || async {
        let list = stack.instances(&blk_id).await;
        (list.iter().filter(|i| i["status"] == json!("RUNNING")).count() == 1).then_some(())
    })
    .await;
    let blk_pid = tasks(ctrd, &OverlayBed::name(1))
        .into_iter()
        .find_map(|(t, pid)| t.starts_with("ovlblk.test.blk.test.instance.").then_some(pid))
        .expect("the bulk server's container");
    let mut iperf = nsenter(blk_pid, &["iperf3", "-s"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let seg_before = bed.netmanager_status(1)["counters"]["segmented"]
        .as_u64()
        .unwrap();
    let up = bulk(cli_pid, BULK_V4, false);
    let down = bulk(cli_pid, BULK_V4, true);
    let _ = iperf.kill();
    let _ = iperf.wait();
    let segmented = bed.netmanager_status(1)["counters"]["segmented"]
        .as_u64()
        .unwrap()
        - seg_before;
    eprintln!(
        "bulk w1 -> w2 {up:.2} Gbit/s, w2 -> w1 {down:.2} Gbit/s; super-packets cut on w2: {segmented}"
    );
    assert!(up > 0.05 && down > 0.05, "bulk throughput {up} / {down} Gbit/s");
    if ebpf(0) && !ebpf(1) {
        assert!(
            segmented > 0,
            "the TUN worker never cut a super-packet from the eBPF worker"
        );
    }
    if ebpf(0) && ebpf(1) {
        let (out0, in0) = bed.fast_path_packets(0);
        let (out1, in1) = bed.fast_path_packets(1);
        assert!(
            out0 > 1000 && in1 > 1000,
            "w1 sent {out0}, w2 received {in1} in the kernel"
        );
        assert!(
            out1 > 1000 && in0 > 1000,
            "w2 sent {out1}, w1 received {in0} in the kernel"
        );
    }

    // A host port mapping: the worker's LAN address, port 9090, reaches the server on that worker.
    for (name, _, w) in &servers {
        let addr = tb.workers[*w].addr.to_string();
        let netprobe = binary("netprobe");
        let out = tb
            .lan
            .command(&netprobe)
            .args(["tcp", &addr, "9090"])
            .output()
            .unwrap();
        assert_eq!(lines(&out), vec![name.clone()], "port 9090 on {addr}");
    }

    // Remove the server instance on the other worker: new flows all go to the remaining one.
    let remote = servers.iter().find(|s| s.2 != cli_worker).unwrap().clone();
    let local = servers.iter().find(|s| s.2 == cli_worker).unwrap().clone();
    let list = stack.instances(&srv_id).await;
    let remote_number = list
        .iter()
        .find(|i| {
            i["worker_id"].is_string()
                && i["status"] == json!("RUNNING")
                && tasks(ctrd, if remote.2 == 0 { "w1" } else { "w2" })
                    .keys()
                    .any(|t| *t == format!("ovl.test.srv.test.instance.{}", i["instance_number"]))
        })
        .map(|i| i["instance_number"].as_i64().unwrap())
        .unwrap();
    let r = call(
        "DELETE",
        &format!("{}/api/service/{srv_id}/instance/{remote_number}", stack.root_url),
        Some(&stack.token),
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    eventually(60, "the remote server instance to be gone", &all, || async {
        (stack.instances(&srv_id).await.len() == 1).then_some(())
    })
    .await;
    eventually(30, "new flows to avoid the removed instance", &all, || async {
        let out = probe(cli_pid, &["tcp-each", RR_V4, "8080", "--count", "4"]);
        let names = String::from_utf8_lossy(&out.stdout).to_string();
        (out.status.success() && names.lines().count() == 4 && names.lines().all(|l| l.trim() == local.0))
            .then_some(())
    })
    .await;

    // Stop everything: the NetManagers remove their bridge, TUN, veths and nftables table.
    let r = call(
        "DELETE",
        &format!("{}/api/application/{app_id}", stack.root_url),
        Some(&stack.token),
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    drop(all);
    bed.finish();
}
