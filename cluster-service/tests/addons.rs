//! Cluster-scoped addons against a real dockerd in a network namespace of the test's own, with the real
//! cluster-service in process (in that namespace) and two fake workers: the sample scheduler plugin installed through
//! the cluster's addons API (read from root's marketplace) fills the `cluster_scheduler` slot, so the next placements
//! follow its policy (the worker with the most free memory) without a restart; uninstalled, the built-in best fit
//! (the least free memory) is back.

#![allow(clippy::unwrap_used, reason = "tests")]

mod support;

use hyper::Method;
use oakestra_tests::{
    docker::{Dockerd, SCHEDULER_IMAGE, addon_images},
    netns::{Netns, require_root},
};
use serde_json::{Value, json};
use support::{
    BrokerKind, FakeRoot, FakeWorker, TempDir, call, eventually, fast_args, job_doc, set_flag, start_cluster,
};

const ADMIN: &str = "cluster-addons-operator-token";
const ENTRY: &str = "0123456789abcdef01234567";

async fn placed_on(cluster: &oakestra_cluster_service::Running, job: &str, n: i64) -> String {
    // No cores reserved, so every instance fits on either worker: only the policy decides.
    let doc = job_doc(job, "app.ns.svc.ns", json!({"memory": 10, "vcpus": 0}));
    let r = support::deploy(cluster, job, n, &doc).await;
    assert_eq!(r.status, 200, "{}", r.body);
    eventually(10, "the placement", || async {
        let state = cluster.engine.state();
        state.job(job)?.instances.get(&n)?.worker_id.clone()
    })
    .await
}

async fn scenario(dir: std::path::PathBuf, ns: String) {
    let dockerd = Dockerd::start(&ns, &dir.join("docker"));
    let (_, scheduler_tar) = addon_images();
    dockerd.load(&scheduler_tar);
    let root = FakeRoot::start().await;
    root.book.lock().unwrap().marketplace.push(json!({
        "_id": ENTRY, "name": "most-free-memory-cluster-scheduler", "status": "approved", "status_details": {},
        "services": [{"service_name": "cluster_scheduler", "image": SCHEDULER_IMAGE}]
    }));
    let mut args = fast_args(&root.url, &dir.join("cluster"));
    set_flag(&mut args, "--listen", "0.0.0.0:0");
    set_flag(&mut args, "--worker-timeout", "60");
    args.extend(
        [
            "--docker-socket",
            dockerd.socket().to_str().unwrap(),
            "--addons-admin-token",
            ADMIN,
            "--addons-poll-interval",
            "60",
        ]
        .map(str::to_owned),
    );
    let cluster = start_cluster(args, &BrokerKind::Embedded).await;
    eventually(10, "registration at root", || async { cluster.engine.identity() }).await;
    let small = FakeWorker::join(&cluster, "small", 4, 2000).await;
    let big = FakeWorker::join(&cluster, "big", 4, 8000).await;
    let view = cluster.engine.state().plugin_candidates(false);
    assert_eq!(
        placed_on(&cluster, "job1", 0).await,
        small.id,
        "built-in best fit; {view:?}"
    );

    // The cluster's addons API: the operator token only.
    let addons = |path: &str| format!("/api/v1/addons{path}");
    let r = call(
        cluster.addr,
        Method::POST,
        &addons(""),
        Some("wrong"),
        Some(&json!({"marketplace_id": ENTRY})),
    )
    .await;
    assert_eq!(r.status, 401, "{}", r.body);
    let r = call(
        cluster.addr,
        Method::POST,
        &addons(""),
        Some(ADMIN),
        Some(&json!({"marketplace_id": ENTRY})),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let id = r.body["_id"].as_str().unwrap().to_owned();
    assert!(
        root.calls(&format!("/api/cluster/marketplace/addons/{ENTRY}"))
            .iter()
            .all(|c| c.bearer.is_some()),
        "read from root with the cluster secret"
    );
    let status = || async {
        call(
            cluster.addr,
            Method::GET,
            &addons(&format!("/{id}")),
            Some(ADMIN),
            None,
        )
        .await
        .body
    };
    eventually(60, "the plugin active", || async {
        (status().await["status"] == "active").then_some(())
    })
    .await;
    let c = dockerd.docker(&["inspect", "cluster_scheduler"]);
    let c: Value = serde_json::from_str(&c).unwrap();
    assert_eq!(c[0]["Config"]["Labels"]["oak.addon.id"], json!(id));
    let slots = call(cluster.addr, Method::GET, &addons("/slots"), Some(ADMIN), None)
        .await
        .body;
    assert!(!slots["cluster_scheduler"]["plugin"].is_null(), "{slots}");
    // The plugin's server may need a moment after its container started; then every placement is its own.
    let mut n = 1;
    eventually(20, "a placement by the plugin", || {
        n += 1;
        let n = n;
        let (cluster, big) = (&cluster, &big);
        async move { (placed_on(cluster, "job1", n).await == big.id).then_some(()) }
    })
    .await;
    for k in 0..5 {
        assert_eq!(
            placed_on(&cluster, "job1", 100 + k).await,
            big.id,
            "the plugin's policy: most free memory"
        );
    }
    let slots = call(cluster.addr, Method::GET, &addons("/slots"), Some(ADMIN), None)
        .await
        .body;
    assert!(
        slots["cluster_scheduler"]["stats"]["delegated"].as_u64().unwrap() >= 5,
        "{slots}"
    );

    // Uninstalled: the container goes, the built-in scheduler is back.
    let r = call(
        cluster.addr,
        Method::DELETE,
        &addons(&format!("/{id}")),
        Some(ADMIN),
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    eventually(30, "the plugin disabled", || async {
        (status().await["status"] == "disabled").then_some(())
    })
    .await;
    assert_eq!(placed_on(&cluster, "job1", 200).await, small.id, "built-in again");
    assert!(
        dockerd
            .cli()
            .args(["inspect", "cluster_scheduler"])
            .output()
            .unwrap()
            .stdout
            .starts_with(b"[]")
    );
    drop((small, big));
    cluster.stop().await.unwrap();
}

#[test]
fn a_cluster_scheduler_plugin_places_until_uninstalled() {
    require_root();
    let ns = Netns::new("oak-cl-addons");
    ns.ip(&["link", "set", "lo", "up"]);
    let dir = TempDir::new();
    let (path, name) = (dir.0.clone(), ns.name().to_owned());
    let outcome = std::thread::scope(|scope| {
        scope
            .spawn(|| {
                ns.enter_current_thread();
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .unwrap()
                    .block_on(scenario(path, name));
            })
            .join()
    });
    drop(ns);
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}
