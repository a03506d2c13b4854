//! The cluster's link to root against the real root-service router (in process, over real HTTP on 127.0.0.1:0).

#![allow(
    clippy::unwrap_used,
    reason = "test helpers outside #[test] fns: a panic is the clearest failure"
)]

use std::{
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
};

use oakestra_cluster_service::{
    root_link::{Delivery, RootLink},
    store::Store,
};
use oakestra_protocol::api::federation::ClusterRegistration;
use serde_json::{Map, json};
use tokio::{net::TcpListener, sync::oneshot};

const JOIN: &str = "cluster-test-join-token-42";

struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        Self(std::env::temp_dir().join(format!(
            "oakestra-cluster-it-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        )))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A root-service on 127.0.0.1:0 over `dir`; returns its URL and a stopper.
async fn root(dir: &std::path::Path) -> (String, oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    let mut config = oakestra_root_service::Config::new("127.0.0.1:0".parse().unwrap(), dir);
    config.join_token = Some(JOIN.into());
    let state = oakestra_root_service::build_state(&config).await.unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        oakestra_root_service::serve(listener, state, async {
            let _ = rx.await;
        })
        .await
        .unwrap();
    });
    (url, tx, task)
}

fn link(url: &str, token: &str, store: Store) -> RootLink {
    RootLink {
        root_url: url.to_owned(),
        join_token: token.to_owned(),
        registration: serde_json::from_value::<ClusterRegistration>(json!({
            "cluster_name": "edge1", "cluster_location": "48.1,11.6,500", "cluster_address": "127.0.0.1"
        }))
        .unwrap(),
        store,
    }
}

#[tokio::test]
async fn registers_reports_and_keeps_its_id_across_root_and_cluster_restarts() {
    let root_dir = TempDir::new();
    let cluster_dir = TempDir::new();
    let (url, stop, task) = root(&root_dir.0).await;

    // A wrong join token is refused with root's reason.
    let store = Store::open(cluster_dir.0.clone()).await.unwrap();
    let err = link(&url, "not-the-join-token", store.clone())
        .register()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("401"), "{err}");
    assert!(store.identity().await.unwrap().is_none());

    let link = link(&url, JOIN, store.clone());
    let (_never, mut stop_rx) = tokio::sync::watch::channel(false);
    let mut identity = link.ensure_registered(&mut stop_rx).await.unwrap();
    assert_eq!(identity.id.len(), 24);

    let mut report = Map::new();
    report.insert("vcpus".into(), json!(4));
    report.insert("memory".into(), json!(2048));
    report.insert("jobs".into(), json!([]));
    assert_eq!(link.report(&mut identity, &report).await, Delivery::Delivered);
    let clusters = reqwest_like_get(&format!("{url}/api/clusters/active")).await;
    assert_eq!(clusters[0]["cluster_name"], "edge1");
    assert_eq!(clusters[0]["total_cpu_cores"], 4);

    // A restarted cluster-service reuses its persisted identity without registering again.
    let reopened = Store::open(cluster_dir.0.clone()).await.unwrap();
    let again = self::link(&url, JOIN, reopened)
        .ensure_registered(&mut stop_rx)
        .await
        .unwrap();
    assert_eq!(again, identity);

    // Someone re-registers the same name (root hands out a new secret): the old one is refused, the link
    // registers again, keeps the id, and the report goes through.
    let other_dir = TempDir::new();
    let other = self::link(&url, JOIN, Store::open(other_dir.0.clone()).await.unwrap());
    let replaced = other.register().await.unwrap();
    assert_eq!(replaced.id, identity.id);
    assert_eq!(link.report(&mut identity, &report).await, Delivery::Reregistered);
    assert_eq!(identity.id, replaced.id);
    assert_ne!(identity.token, replaced.token);
    assert_eq!(
        store.identity().await.unwrap().unwrap(),
        identity,
        "the new secret is persisted"
    );

    // Root down: a report fails without panicking; root back on the same data: delivered again.
    let _ = stop.send(());
    task.await.unwrap();
    assert!(matches!(
        link.report(&mut identity, &report).await,
        Delivery::Failed(_)
    ));
    let (url2, stop2, task2) = root(&root_dir.0).await;
    let link2 = RootLink {
        root_url: url2,
        ..link.clone()
    };
    assert_eq!(link2.report(&mut identity, &report).await, Delivery::Delivered);
    let _ = stop2.send(());
    task2.await.unwrap();
}

#[tokio::test]
async fn registration_waits_for_root_and_can_be_stopped() {
    let dir = TempDir::new();
    let store = Store::open(dir.0.clone()).await.unwrap();
    // Nothing listens on this port.
    let free = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", free.local_addr().unwrap());
    drop(free);
    let link = link(&url, JOIN, store);
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let waiting = tokio::spawn(async move { link.ensure_registered(&mut stop_rx).await });
    tokio::time::sleep(std::time::Duration::from_millis(700)).await;
    assert!(!waiting.is_finished(), "keeps retrying while root is away");
    stop_tx.send(true).unwrap();
    assert_eq!(waiting.await.unwrap(), None);
}

async fn reqwest_like_get(url: &str) -> serde_json::Value {
    oakestra_runtime::client::call::<()>(
        hyper::Method::GET,
        url,
        None,
        None,
        std::time::Duration::from_secs(5),
    )
    .await
    .unwrap()
    .body
}
