//! Worker failure end to end, on the overlay testbed: root and cluster in the "LAN" namespace, two workers each with
//! a real NetManager and NodeEngine. A server instance with a round-robin address runs on one worker, a client on
//! the other. The server's NodeEngine is killed (SIGKILL: no goodbye); the broker publishes its last will, the
//! cluster declares the worker dead once the lost grace (3 s) is over, long before its worker timeout (30 s here),
//! the instance comes back RUNNING on the client's worker, and the client reaches it through the same service IP,
//! with no flow left going to the orphaned container (a NodeEngine killed and restarted at once, before, kept its
//! instance in place). The killed NodeEngine then starts again: it adopts the orphan,
//! the cluster tells it to remove it, and root still lists one instance. Everything is gone afterwards.
//!
//! It runs on the TUN dataplane, on the eBPF fast path (whose flow maps must drop the dead instance's flows at
//! once) and on a mixed pair.
#![allow(clippy::unwrap_used, reason = "test code: a panic is the clearest failure")]
#![allow(clippy::print_stderr, reason = "the test reports the failover times it saw")]

use std::time::{Duration, Instant};

use oakestra_tests::{
    containerd::Containerd,
    harness::eventually,
    incontainer::{lines, probe, serve, tasks},
    overlaybed::OverlayBed,
    stack::Stack,
};
use serde_json::{Value, json};

const RR_V4: &str = "10.30.56.56";
const RR_V6: &str = "fdff:2000::56";
/// The cluster's `--worker-timeout`, longer than the wait for the replacement: only the last will can move it in
/// time. The lost grace is the default, 3 s.
const WORKER_TIMEOUT_S: &str = "30";
/// Task id prefix of the server's instances.
const SRV_TASK: &str = "fos.test.srv.test.instance.";

/// The one instance of `job` root lists, once it is RUNNING.
async fn running(stack: &Stack, job: &str) -> Option<Value> {
    let list = stack.instances(job).await;
    match list.as_slice() {
        [one] if one["status"] == json!("RUNNING") => Some(one.clone()),
        _ => None,
    }
}

/// The init pid of the server instance in worker `ns`, if one runs there.
fn server_pid(ctrd: &Containerd, ns: &str) -> Option<u32> {
    tasks(ctrd, ns)
        .into_iter()
        .find_map(|(task, pid)| task.starts_with(SRV_TASK).then_some(pid))
}

/// One scenario at a time (each is a whole testbed).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "current_thread")]
async fn on_the_tun_dataplane() {
    let _one = SERIAL.lock().await;
    instances_of_a_killed_worker_come_back_on_another_behind_the_same_service_ip("fotun", &["tun", "tun"])
        .await;
}

#[tokio::test(flavor = "current_thread")]
async fn on_the_ebpf_dataplane() {
    let _one = SERIAL.lock().await;
    instances_of_a_killed_worker_come_back_on_another_behind_the_same_service_ip("foebpf", &["ebpf", "ebpf"])
        .await;
}

#[tokio::test(flavor = "current_thread")]
async fn on_a_mixed_pair() {
    let _one = SERIAL.lock().await;
    instances_of_a_killed_worker_come_back_on_another_behind_the_same_service_ip("fomix", &["ebpf", "tun"])
        .await;
}

async fn instances_of_a_killed_worker_come_back_on_another_behind_the_same_service_ip(
    tag: &str,
    dataplanes: &[&str],
) {
    let mut bed = OverlayBed::start(tag, dataplanes, &["--worker-timeout", WORKER_TIMEOUT_S]).await;
    let names = [OverlayBed::name(0), OverlayBed::name(1)];
    bed.stack.wait_active_workers(2, 60, &bed.procs()).await;
    bed.assert_dataplanes();

    // The server first, wherever the cluster puts it; then the client, pinned to the other worker.
    let srv = json!({"microservice_name": "srv", "memory": 64, "cmd": ["sleep", "3600"],
        "addresses": {"rr_ip": RR_V4, "rr_ip_v6": RR_V6}});
    let srv_id = bed.stack.deploy("fos", &srv).await;
    let first = eventually(90, "the server RUNNING", &bed.procs(), || {
        running(&bed.stack, &srv_id)
    })
    .await;
    let home = (0..2)
        .find(|&w| server_pid(&bed.ctrd, &names[w]).is_some())
        .expect("the server's container on one worker");
    let other = 1 - home;
    let cli = json!({"microservice_name": "cli", "memory": 32, "cmd": ["sleep", "3600"],
        "constraints": [{"type": "direct", "node": names[other]}]});
    let cli_id = bed.stack.deploy("foc", &cli).await;
    eventually(90, "the client RUNNING", &bed.procs(), || {
        running(&bed.stack, &cli_id)
    })
    .await;
    let cli_pid = tasks(&bed.ctrd, &names[other])
        .into_iter()
        .find_map(|(task, pid)| task.starts_with("foc.test.cli.test.instance.").then_some(pid))
        .expect("the client's container on the other worker");
    let old_name = format!("srv-on-{}", names[home]);
    let _old_server = serve(
        server_pid(&bed.ctrd, &names[home]).unwrap(),
        &old_name,
        8080,
        8081,
    );
    std::thread::sleep(Duration::from_millis(300));
    for rr in [RR_V4, RR_V6] {
        let got = lines(&probe(cli_pid, &["tcp-each", rr, "8080", "--count", "2"]));
        assert_eq!(
            got,
            vec![old_name.clone(), old_name.clone()],
            "before the kill, via {rr}"
        );
    }

    // A NodeEngine that crashes and is back at once (as systemd restarts it) keeps its instances where they are:
    // it reports again within the lost grace.
    let server_before = server_pid(&bed.ctrd, &names[home]);
    bed.engines[home].kill();
    bed.engines[home] = bed.node_engine(home, "nodeengine-restarted");
    tokio::time::sleep(Duration::from_secs(5)).await;
    let kept = running(&bed.stack, &srv_id)
        .await
        .expect("the server still RUNNING");
    assert_eq!(
        kept["worker_id"], first["worker_id"],
        "moved after a quick restart: {kept}"
    );
    assert_eq!(
        server_pid(&bed.ctrd, &names[home]),
        server_before,
        "the same container"
    );
    assert_eq!(server_pid(&bed.ctrd, &names[other]), None, "no second server");

    // SIGKILL the server's NodeEngine. Its container and NetManager stay: only the agent is gone.
    bed.engines[home].kill();
    let killed = Instant::now();
    let replacement = eventually(
        20,
        "the server RUNNING again on the other worker",
        &bed.procs(),
        || async {
            let i = running(&bed.stack, &srv_id).await?;
            (i["worker_id"] != first["worker_id"] && server_pid(&bed.ctrd, &names[other]).is_some())
                .then_some(i)
        },
    )
    .await;
    let to_running = killed.elapsed();
    assert_eq!(
        replacement["instance_number"], first["instance_number"],
        "the same instance, moved: {replacement}"
    );
    let new_name = format!("srv-on-{}", names[other]);
    let _new_server = serve(
        server_pid(&bed.ctrd, &names[other]).unwrap(),
        &new_name,
        8080,
        8081,
    );
    // Every new flow to the service IP now reaches the replacement, though the orphan still answers on its old
    // instance address: the client's NetManager dropped the old instance from its table.
    for rr in [RR_V4, RR_V6] {
        eventually(
            30,
            &format!("new flows via {rr} to reach {new_name} only"),
            &bed.procs(),
            || async {
                let out = probe(cli_pid, &["tcp-each", rr, "8080", "--count", "4"]);
                let text = String::from_utf8_lossy(&out.stdout).to_string();
                (out.status.success()
                    && text.lines().count() == 4
                    && text.lines().all(|l| l.trim() == new_name))
                .then_some(())
            },
        )
        .await;
    }
    let to_reachable = killed.elapsed();
    let udp = lines(&probe(cli_pid, &["udp", RR_V4, "8081", "--count", "2"]));
    assert!(
        udp.iter().all(|l| l.starts_with(&new_name)),
        "udp after the failover: {udp:?}"
    );
    eprintln!(
        "failover: worker kill -> replacement RUNNING at root {:.2} s, -> reachable via {RR_V4} and {RR_V6} {:.2} s \
         (lost grace 3 s, worker timeout {WORKER_TIMEOUT_S} s)",
        to_running.as_secs_f64(),
        to_reachable.as_secs_f64()
    );

    // The killed NodeEngine starts again: it adopts the orphan, which the cluster has placed elsewhere, so it is
    // removed; root still lists the one instance on the other worker.
    bed.engines[home] = bed.node_engine(home, "nodeengine-2");
    bed.stack.wait_active_workers(2, 60, &bed.procs()).await;
    eventually(
        60,
        "the orphaned server container to be removed",
        &bed.procs(),
        || async { server_pid(&bed.ctrd, &names[home]).is_none().then_some(()) },
    )
    .await;
    let after = running(&bed.stack, &srv_id)
        .await
        .expect("the one server instance RUNNING");
    assert_eq!(after["worker_id"], replacement["worker_id"], "{after}");
    let got = lines(&probe(cli_pid, &["tcp-each", RR_V4, "8080", "--count", "2"]));
    assert_eq!(got, vec![new_name.clone(), new_name.clone()], "after the restart");

    // Delete both applications: every container goes; then nothing stays behind.
    bed.stack.delete_applications().await;
    eventually(60, "every container to be removed", &bed.procs(), || async {
        names.iter().all(|n| tasks(&bed.ctrd, n).is_empty()).then_some(())
    })
    .await;
    bed.finish();
}
