//! The semantic overlay end to end, on a netns testbed: root and cluster on the "LAN" namespace, two workers each
//! running a real NetManager and a real NodeEngine (one private containerd), real containers. A client container
//! reaches a service's round-robin addresses (v4 and v6) whose instances run on both workers: TCP, UDP (also a
//! fragmented datagram), ping, round robin across instances, one TCP flow staying on one instance, new flows
//! avoiding a removed instance, a host port mapping, and nothing leaking into the host's namespace.
#![allow(clippy::unwrap_used, reason = "test code: a panic is the clearest failure")]

use std::time::Duration;

use oakestra_tests::{
    harness::eventually,
    incontainer::{lines, nsenter, probe, serve, tasks},
    netns::HostSnapshot,
    overlaybed::OverlayBed,
    procs::binary,
    stack::{IMAGE, call},
};
use serde_json::json;

const RR_V4: &str = "10.30.55.55";
const RR_V6: &str = "fdff:2000::55";

#[tokio::test(flavor = "current_thread")]
async fn service_addresses_balance_across_workers_and_nothing_leaks() {
    let bed = OverlayBed::start("ovl", 2, &[]).await;
    let (stack, ctrd, tb) = (&bed.stack, &bed.ctrd, &bed.tb);
    let all = bed.procs();

    // One application: the server (two instances, each needs both cores, so one per worker) and a client.
    let srv = json!({"microserviceID": "", "microservice_name": "srv", "microservice_namespace": "test",
        "virtualization": "container", "memory": 64, "vcpus": 2, "code": IMAGE,
        "cmd": ["sleep", "3600"], "port": "9090:8080",
        "addresses": {"rr_ip": RR_V4, "rr_ip_v6": RR_V6}});
    let cli = json!({"microserviceID": "", "microservice_name": "cli", "microservice_namespace": "test",
        "virtualization": "container", "memory": 32, "vcpus": 0, "code": IMAGE, "cmd": ["sleep", "3600"]});
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
    let app_id = apps.body[0]["_id"].as_str().unwrap().to_owned();
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
            .unwrap()["_id"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let (srv_id, cli_id) = (id_of("srv"), id_of("cli"));
    // Both workers must be up before placing the servers.
    stack.wait_active_workers(2, 60, &all).await;
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
                    .any(|t| t.ends_with(&format!(".instance.{}", i["instance_number"])))
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
