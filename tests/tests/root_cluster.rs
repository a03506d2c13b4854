//! The real `root-service` and `cluster-service` binaries together, with a scripted worker (plain HTTP + MQTT
//! client in the test): the cluster registers with root's join token and reports; a user's instance goes root →
//! cluster → worker; the worker's resource report makes it RUNNING at root; deleting it at root reaches the worker.
//! Everything listens on 127.0.0.1.

#![allow(clippy::unwrap_used, reason = "test code: a panic is the clearest failure")]

use std::time::Duration;

use oakestra_protocol::api::cluster::NodeRegistered;
use oakestra_runtime::client;
use oakestra_tests::harness::{Proc, eventually, free_port};
use oakestra_tests::stack::{cluster_args, root_args};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{Value, json};
use tokio::sync::mpsc;

const JOIN_TOKEN: &str = "root-cluster-test-join-token";

async fn call(method: &str, url: &str, bearer: Option<&str>, body: Option<&Value>) -> client::Response {
    let method = method.parse().unwrap();
    client::call(method, url, bearer, body, Duration::from_secs(10))
        .await
        .unwrap()
}

/// Cluster `name` as root's `/api/clusters/active` lists it, if it does.
async fn active_cluster(root_url: &str, name: &str) -> Option<Value> {
    let url = format!("{root_url}/api/clusters/active");
    let r = client::call::<Value>("GET".parse().unwrap(), &url, None, None, Duration::from_secs(2))
        .await
        .ok()?;
    r.body
        .as_array()?
        .iter()
        .find(|c| c["cluster_name"] == json!(name))
        .cloned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_goes_from_root_through_the_cluster_to_a_worker_and_back() {
    let dir = std::env::temp_dir().join(format!("oakestra-root-cluster-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (root_port, cluster_port, mqtt_port) = (free_port(), free_port(), free_port());
    let root_url = format!("http://127.0.0.1:{root_port}");
    let cluster_url = format!("http://127.0.0.1:{cluster_port}");

    let root = Proc::start(
        "root-service",
        &root_args(&dir, root_port, JOIN_TOKEN),
        dir.join("root.log"),
    );
    let cluster = Proc::start(
        "cluster-service",
        &cluster_args(
            &dir,
            "edgecluster",
            &root_url,
            JOIN_TOKEN,
            cluster_port,
            mqtt_port,
        ),
        dir.join("cluster.log"),
    );
    let both = [&root, &cluster];

    // The cluster registers and reports: root lists it as active.
    eventually(20, "the cluster to be active at root", &both, || async {
        active_cluster(&root_url, "edgecluster").await.map(|_| ())
    })
    .await;

    // A worker joins the cluster.
    let body = json!({"host": "worker-1", "ip": "127.0.0.1", "port": "3000", "cpu_percent": 2.0, "vcpus": 4,
                      "architecture": "amd64", "memory_percent": 10.0, "memory": 4000, "virtualization": ["docker"],
                      "supported_addons": [], "csi_drivers": []});
    let r = call(
        "POST",
        &format!("{cluster_url}/api/node/register"),
        Some(oakestra_tests::stack::WORKER_JOIN_TOKEN),
        Some(&body),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let node: NodeRegistered = serde_json::from_value(r.body).unwrap();
    assert_eq!(node.mqtt_broker_port_u16(), Some(mqtt_port));
    let user = format!("{}-ne", node.id);
    let mut options = MqttOptions::new(user.clone(), "127.0.0.1", mqtt_port);
    options.set_credentials(user, node.mqtt_password.clone().unwrap());
    options.set_max_packet_size(1 << 20, 1 << 20);
    let (mqtt, mut eventloop) = AsyncClient::new(options, 100);
    let (tx, mut inbox) = mpsc::unbounded_channel::<(String, Value)>();
    tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let _ = tx.send((
                        p.topic.clone(),
                        serde_json::from_slice(&p.payload).unwrap_or(Value::Null),
                    ));
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    mqtt.subscribe(format!("nodes/{}/control/#", node.id), QoS::AtLeastOnce)
        .await
        .unwrap();
    let info_topic = format!("nodes/{}/information", node.id);
    let heartbeat = {
        let mqtt = mqtt.clone();
        tokio::spawn(async move {
            loop {
                let info = json!({"ip": "127.0.0.1", "cpu_percent": 2.0, "memory": 4000, "vcpus": 4});
                let _ = mqtt
                    .publish(
                        info_topic.clone(),
                        QoS::AtLeastOnce,
                        false,
                        serde_json::to_vec(&info).unwrap(),
                    )
                    .await;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };

    // Root sees the worker's capacity in the cluster's report.
    eventually(20, "the worker's capacity at root", &both, || async {
        let c = active_cluster(&root_url, "edgecluster").await?;
        (c["active_nodes"] == json!(1) && c["total_cpu_cores"] == json!(4)).then_some(())
    })
    .await;

    // A user deploys one instance.
    let login = call(
        "POST",
        &format!("{root_url}/api/auth/login"),
        None,
        Some(&json!({"username": "Admin", "password": "Admin"})),
    )
    .await;
    assert_eq!(login.status, 200, "{}", login.body);
    let token = login.body["token"].as_str().unwrap().to_owned();
    let sla = json!({"sla_version": "v2.0", "customerID": "Admin", "applications": [{
        "applicationID": "", "application_name": "demo", "application_namespace": "test", "application_desc": "",
        "microservices": [{"microserviceID": "", "microservice_name": "web", "microservice_namespace": "test",
                           "virtualization": "container", "cmd": [], "memory": 100, "vcpus": 1,
                           "code": "docker.io/library/nginx:latest"}]}]});
    let apps = call(
        "POST",
        &format!("{root_url}/api/application"),
        Some(&token),
        Some(&sla),
    )
    .await;
    assert_eq!(apps.status, 200, "{}", apps.body);
    let app = apps.body[0]["_id"]["$oid"].as_str().unwrap().to_owned();
    let services = call(
        "GET",
        &format!("{root_url}/api/services/{app}"),
        Some(&token),
        None,
    )
    .await;
    let job = services.body[0]["_id"]["$oid"].as_str().unwrap().to_owned();
    let r = call(
        "POST",
        &format!("{root_url}/api/service/{job}/instance"),
        Some(&token),
        Some(&json!({})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["status"], json!("CLUSTER_SCHEDULED"), "{}", r.body);

    // The worker gets the deploy command with the job's fields.
    let (topic, cmd) = tokio::time::timeout(Duration::from_secs(20), inbox.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(topic, format!("nodes/{}/control/deploy", node.id));
    assert_eq!(cmd["_id"], json!(job));
    assert_eq!(cmd["job_name"], json!("demo.test.web.test"));
    assert_eq!(cmd["instance_number"], json!(0));
    assert_eq!(cmd["image"], json!("docker.io/library/nginx:latest"));

    // It reports the instance: RUNNING at root, with the worker's data.
    let resources = json!({"services": [{"cpu_percent": "1.0", "memory_percent": "0.1", "disk": "0", "logs": "ready\n",
                                          "job_name": "demo.test.web.test", "virtualization": "docker", "instance": 0}]});
    let topic = format!("nodes/{}/jobs/resources", node.id);
    let instance = eventually(20, "RUNNING at root", &both, || {
        let (mqtt, topic, token, resources) = (mqtt.clone(), topic.clone(), token.clone(), resources.clone());
        let url = format!("{root_url}/api/service/{job}");
        async move {
            mqtt.publish(
                topic,
                QoS::AtLeastOnce,
                false,
                serde_json::to_vec(&resources).unwrap(),
            )
            .await
            .ok()?;
            let r = client::call::<Value>(
                "GET".parse().unwrap(),
                &url,
                Some(&token),
                None,
                Duration::from_secs(2),
            )
            .await
            .ok()?;
            let i = r.body["instance_list"][0].clone();
            (i["status"] == json!("RUNNING")).then_some(i)
        }
    })
    .await;
    assert_eq!(instance["logs"], json!("ready\n"), "{instance}");

    // Deleting the instance at root reaches the worker.
    let r = call(
        "DELETE",
        &format!("{root_url}/api/service/{job}/instance/0"),
        Some(&token),
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let delete = loop {
        let (topic, v) = tokio::time::timeout(Duration::from_secs(20), inbox.recv())
            .await
            .unwrap()
            .unwrap();
        if topic.ends_with("control/delete") {
            break v;
        }
    };
    assert_eq!(delete["job_name"], json!("demo.test.web.test"));
    assert_eq!(delete["instance_number"], json!(0));
    heartbeat.abort();
    drop(cluster);
    drop(root);
    let _ = std::fs::remove_dir_all(&dir);
}
