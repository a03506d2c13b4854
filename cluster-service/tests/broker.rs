//! The MQTT broker against real brokers and real MQTT 3.1.1 clients (rumqttc), all on 127.0.0.1: the embedded
//! rumqttd with and without auth, and a Mosquitto child process whose password and ACL files the module writes.

#![allow(clippy::unwrap_used, reason = "tests")]

mod support;

use std::{net::SocketAddr, os::unix::fs::PermissionsExt as _, time::Duration};

use oakestra_cluster_service::broker::{
    Broker, BrokerConfig, BrokerError, Credentials, hash_password, new_secret,
};
use rumqttc::{AsyncClient, ConnectReturnCode, Event, MqttOptions, Packet, Publish, QoS};
use support::{Mosquitto, TempDir, free_port};
use tokio::{sync::mpsc, task::JoinHandle, time::timeout};

/// How long a connection may take to be accepted or refused, a message to arrive.
const DEADLINE: Duration = Duration::from_secs(5);
/// How long to wait to show a message is not delivered, once a later message in the same stream was.
const QUIET: Duration = Duration::from_millis(500);

/// A connected client whose incoming packets arrive on `packets`.
struct Conn {
    client: AsyncClient,
    packets: mpsc::UnboundedReceiver<Packet>,
    task: JoinHandle<()>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Conn {
    async fn subscribe(&mut self, filter: &str) {
        self.client.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
        timeout(DEADLINE, async {
            loop {
                if let Packet::SubAck(_) = self.packets.recv().await.expect("connection closed") {
                    return;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no SUBACK for {filter}"));
    }

    async fn publish(&self, topic: &str, payload: &str) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.as_bytes().to_vec())
            .await
            .unwrap();
    }

    async fn next_publish(&mut self) -> Publish {
        timeout(DEADLINE, self.next_publish_forever())
            .await
            .expect("no message within the deadline")
    }

    async fn next_publish_forever(&mut self) -> Publish {
        loop {
            if let Packet::Publish(p) = self.packets.recv().await.expect("connection closed") {
                return p;
            }
        }
    }

    /// Asserts nothing more is published to this client for [`QUIET`].
    async fn assert_quiet(&mut self) {
        if let Ok(p) = timeout(QUIET, self.next_publish_forever()).await {
            panic!("unexpected message on {}: {:?}", p.topic, p.payload);
        }
    }
}

/// Connects as `client_id` with `login`; the error if the broker refuses (or closes) within [`DEADLINE`].
async fn connect(port: u16, client_id: &str, login: Option<(&str, &str)>) -> Result<Conn, String> {
    let mut options = MqttOptions::new(client_id, "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(10));
    if let Some((user, password)) = login {
        options.set_credentials(user, password);
    }
    let (client, mut eventloop) = AsyncClient::new(options, 16);
    let Ok(first) = timeout(DEADLINE, eventloop.poll()).await else {
        panic!("{client_id}: neither accepted nor refused within {DEADLINE:?}");
    };
    match first {
        Ok(Event::Incoming(Packet::ConnAck(ack))) if ack.code == ConnectReturnCode::Success => {}
        Ok(other) => return Err(format!("unexpected first event {other:?}")),
        Err(e) => return Err(e.to_string()),
    }
    let (tx, packets) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        while let Ok(event) = eventloop.poll().await {
            if let Event::Incoming(packet) = event
                && tx.send(packet).is_err()
            {
                return;
            }
        }
    });
    Ok(Conn {
        client,
        packets,
        task,
    })
}

async fn connect_ok(port: u16, user: &str, password: &str) -> Conn {
    connect(port, user, Some((user, password)))
        .await
        .unwrap_or_else(|e| panic!("{user} refused: {e}"))
}

async fn assert_refused(port: u16, client_id: &str, login: Option<(&str, &str)>) -> String {
    match connect(port, client_id, login).await {
        Ok(_) => panic!("client id {client_id} with {login:?} was accepted"),
        Err(e) => e,
    }
}

/// Retries `connect` until it is accepted (`want_ok`) or refused, within [`DEADLINE`]: Mosquitto applies a
/// reload shortly after the SIGHUP, not during the `kill`.
async fn eventually(port: u16, user: &str, password: &str, want_ok: bool) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let result = connect(port, user, Some((user, password))).await;
        if result.is_ok() == want_ok {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{user}: still {} after reload",
            if want_ok { "refused" } else { "accepted" }
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn embedded(port: u16, allow_anonymous: bool, credentials: Credentials) -> Broker {
    let listen: SocketAddr = ([127, 0, 0, 1], port).into();
    Broker::start(
        BrokerConfig::Embedded {
            listen,
            allow_anonymous,
        },
        credentials,
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn embedded_with_auth() {
    let cluster_pw = new_secret();
    let n1 = new_secret();
    let credentials = Credentials::new("cluster", &hash_password(&cluster_pw));
    credentials.set_node("n1", &hash_password(&n1));
    let port = free_port();
    let broker = embedded(port, false, credentials).await;
    assert_eq!(broker.client_endpoint(), ("127.0.0.1".to_owned(), port));
    assert_eq!(broker.worker_port(), port);

    // Both users of the node, with the node's one secret.
    let mut net = connect_ok(port, "n1", &n1).await;
    let ne = connect_ok(port, "n1-ne", &n1).await;

    // rumqttd closes the connection without a CONNACK on a refused login.
    assert_refused(port, "n1", Some(("n1", "wrong"))).await;
    assert_refused(port, "n1-ne", Some(("n1-ne", &cluster_pw))).await;
    assert_refused(port, "n2", Some(("n1", &n1))).await;
    assert_refused(port, "n1", None).await;
    assert_refused(port, "n1", Some(("n1", ""))).await;
    assert_refused(port, "nobody", Some(("nobody", &n1))).await;

    // The cluster user sees the node's information; the node gets the cluster's commands.
    let (host, client_port) = broker.client_endpoint();
    assert_eq!(host, "127.0.0.1");
    let mut cluster = connect_ok(client_port, "cluster", &cluster_pw).await;
    cluster.subscribe("nodes/+/information").await;
    net.subscribe("nodes/n1/control/deploy").await;
    ne.publish("nodes/n1/information", "{\"cpu\":1}").await;
    let p = cluster.next_publish().await;
    assert_eq!(p.topic, "nodes/n1/information");
    assert_eq!(&p.payload[..], b"{\"cpu\":1}");
    cluster.publish("nodes/n1/control/deploy", "job").await;
    assert_eq!(net.next_publish().await.topic, "nodes/n1/control/deploy");

    // A node added later logs in without a restart; a removed one no longer does.
    let n2 = new_secret();
    assert_refused(port, "n2", Some(("n2", &n2))).await;
    broker.credentials().set_node("n2", &hash_password(&n2));
    broker.credentials_changed().await.unwrap();
    let n2_ne = connect_ok(port, "n2-ne", &n2).await;
    n2_ne.publish("nodes/n2/information", "{}").await;
    assert_eq!(cluster.next_publish().await.topic, "nodes/n2/information");
    broker.credentials().remove_node("n2");
    assert_refused(port, "n2", Some(("n2", &n2))).await;
}

#[tokio::test]
async fn embedded_anonymous() {
    let port = free_port();
    let _broker = embedded(port, true, Credentials::default()).await;
    let mut sub = connect(port, "worker-net", None).await.unwrap();
    let publisher = connect(port, "worker-ne", None).await.unwrap();
    sub.subscribe("jobs/+/updates_available").await;
    publisher.publish("jobs/app1/updates_available", "x").await;
    let p = sub.next_publish().await;
    assert_eq!(p.topic, "jobs/app1/updates_available");
    assert_eq!(&p.payload[..], b"x");
    // Logins are not checked either.
    connect(port, "someone", Some(("someone", "anything")))
        .await
        .unwrap();
}

#[tokio::test]
async fn embedded_port_in_use_is_an_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let listen = taken.local_addr().unwrap();
    let err = Broker::start(
        BrokerConfig::Embedded {
            listen,
            allow_anonymous: true,
        },
        Credentials::default(),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, BrokerError::Bind { addr, .. } if addr == listen),
        "{err}"
    );
}

#[tokio::test]
async fn embedded_port_zero_is_resolved() {
    let listen: SocketAddr = ([127, 0, 0, 1], 0).into();
    let broker = Broker::start(
        BrokerConfig::Embedded {
            listen,
            allow_anonymous: true,
        },
        Credentials::default(),
    )
    .await
    .unwrap();
    let (_, port) = broker.client_endpoint();
    assert_ne!(port, 0);
    assert_eq!(broker.worker_port(), port);
    connect(port, "c", None).await.unwrap();
}

#[tokio::test]
async fn mosquitto_external() {
    let dir = TempDir::new();
    let port = free_port();
    let cluster_pw = new_secret();
    let (a, b) = (new_secret(), new_secret());
    let credentials = Credentials::new("cluster", &hash_password(&cluster_pw));
    credentials.set_node("a", &hash_password(&a));
    credentials.set_node("b", &hash_password(&b));
    let pid_file = dir.0.join("run").join("mosquitto.pid");

    // Mosquitto is not running yet: the files are written, the failing reload is only logged.
    let broker = Broker::start(
        BrokerConfig::External {
            host: "127.0.0.1".into(),
            port,
            password_file: Some(dir.0.join("passwd")),
            acl_file: Some(dir.0.join("acl")),
            reload_command: Some(format!("kill -HUP \"$(cat '{}')\"", pid_file.display())),
        },
        credentials,
    )
    .await
    .unwrap();
    assert_eq!(broker.client_endpoint(), ("127.0.0.1".to_owned(), port));
    assert_eq!(broker.worker_port(), port);
    assert_eq!(
        std::fs::read_to_string(dir.0.join("passwd")).unwrap(),
        broker.credentials().password_file()
    );
    assert_eq!(
        std::fs::read_to_string(dir.0.join("acl")).unwrap(),
        broker.credentials().acl_file()
    );
    let mode = std::fs::metadata(dir.0.join("passwd"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert!(mode == 0o640 || mode == 0o644, "mode {mode:o}");

    let mosquitto = Mosquitto::start(&dir.0, port).await;
    let log = || mosquitto.log_text();

    // Logins.
    let refused = assert_refused(port, "a", Some(("a", "wrong"))).await;
    assert!(refused.contains("refused"), "{refused}");
    assert_refused(port, "a", Some(("a", &b))).await;
    assert_refused(port, "a", None).await;
    let mut cluster = connect(port, "cluster", Some(("cluster", &cluster_pw)))
        .await
        .unwrap_or_else(|e| panic!("cluster refused: {e}\n{}", log()));
    let mut node_a = connect_ok(port, "a", &a).await;
    let mut node_b_ne = connect_ok(port, "b-ne", &b).await;

    // A node publishes only under its own id: A's forged message about B is dropped, and since the same client's
    // QoS 1 messages arrive in order, receiving A's later own message first proves the forged one never came.
    cluster.subscribe("nodes/+/information").await;
    node_a.publish("nodes/b/information", "forged").await;
    node_a.publish("nodes/a/information", "real").await;
    let p = cluster.next_publish().await;
    assert_eq!(
        (p.topic.as_str(), &p.payload[..]),
        ("nodes/a/information", &b"real"[..])
    );
    cluster.assert_quiet().await;

    // A node reads only its own commands: A subscribed to B's deploy topic gets nothing, B's NodeEngine gets it.
    node_a.subscribe("nodes/b/control/deploy").await;
    node_a.subscribe("nodes/a/control/deploy").await;
    node_b_ne.subscribe("nodes/b/control/deploy").await;
    cluster.publish("nodes/b/control/deploy", "for-b").await;
    cluster.publish("nodes/a/control/deploy", "for-a").await;
    let p = node_b_ne.next_publish().await;
    assert_eq!(
        (p.topic.as_str(), &p.payload[..]),
        ("nodes/b/control/deploy", &b"for-b"[..])
    );
    let p = node_a.next_publish().await;
    assert_eq!(
        (p.topic.as_str(), &p.payload[..]),
        ("nodes/a/control/deploy", &b"for-a"[..])
    );
    node_a.assert_quiet().await;
    node_b_ne.assert_quiet().await;

    // Nodes read jobs/#, only the cluster writes there.
    node_b_ne.subscribe("jobs/+/updates_available").await;
    node_a.publish("jobs/x/updates_available", "forged").await;
    cluster.publish("jobs/x/updates_available", "real").await;
    let p = node_b_ne.next_publish().await;
    assert_eq!(&p.payload[..], b"real", "{}", log());
    node_b_ne.assert_quiet().await;

    // A node added after start logs in once the files are rewritten and Mosquitto reloaded; a removed one no
    // longer can.
    let c = new_secret();
    assert_refused(port, "c", Some(("c", &c))).await;
    broker.credentials().set_node("c", &hash_password(&c));
    broker.credentials_changed().await.unwrap();
    eventually(port, "c-ne", &c, true).await;
    let node_c = connect_ok(port, "c", &c).await;
    node_c.publish("nodes/c/information", "hello").await;
    let p = cluster.next_publish().await;
    assert_eq!(
        (p.topic.as_str(), &p.payload[..]),
        ("nodes/c/information", &b"hello"[..])
    );

    broker.credentials().remove_node("a");
    broker.credentials_changed().await.unwrap();
    eventually(port, "a", &a, false).await;
    assert!(log().contains("Reloading config"), "{}", log());
}
