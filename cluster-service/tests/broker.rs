//! The MQTT broker against real MQTT 3.1.1 clients (rumqttc) and raw sockets, all on 127.0.0.1: the embedded broker
//! (logins, topic ACLs, anonymous compatibility, persistent sessions, wills, garbage), and a Mosquitto child process
//! whose password and ACL files the module writes.

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
            max_connections: 1000,
        },
        credentials,
    )
    .await
    .unwrap()
}

/// Waits until the client's connection is closed by the broker.
async fn closed(conn: &mut Conn) {
    timeout(DEADLINE, async { while conn.packets.recv().await.is_some() {} })
        .await
        .expect("the broker did not close the connection");
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

    // Refused logins get CONNACK 4 (bad user name or password) or 5 (not authorised: no credentials).
    for (client_id, login, code) in [
        ("n1", Some(("n1", "wrong")), "BadUserNamePassword"),
        (
            "n1-ne",
            Some(("n1-ne", cluster_pw.as_str())),
            "BadUserNamePassword",
        ),
        ("n2", Some(("n1", n1.as_str())), "BadUserNamePassword"),
        ("n1", Some(("n1", "")), "BadUserNamePassword"),
        ("nobody", Some(("nobody", n1.as_str())), "BadUserNamePassword"),
        ("n1", None, "NotAuthorized"),
    ] {
        let e = assert_refused(port, client_id, login).await;
        assert!(e.contains(code), "{client_id} {login:?}: {e}");
    }

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

    // A node added later logs in without a restart; a revoked one is disconnected and no longer logs in.
    let n2 = new_secret();
    assert_refused(port, "n2", Some(("n2", &n2))).await;
    broker.credentials().set_node("n2", &hash_password(&n2));
    broker.credentials_changed().await.unwrap();
    let mut n2_ne = connect_ok(port, "n2-ne", &n2).await;
    n2_ne.publish("nodes/n2/information", "{}").await;
    assert_eq!(cluster.next_publish().await.topic, "nodes/n2/information");
    broker.revoke_node("n2");
    closed(&mut n2_ne).await;
    assert_refused(port, "n2", Some(("n2", &n2))).await;
    assert_eq!(broker.embedded().unwrap().router().counters().denied_publishes, 0);
}

#[tokio::test]
async fn embedded_topic_acls() {
    let cluster_pw = new_secret();
    let (a, b) = (new_secret(), new_secret());
    let credentials = Credentials::new("cluster", &hash_password(&cluster_pw));
    credentials.set_node("a", &hash_password(&a));
    credentials.set_node("b", &hash_password(&b));
    let port = free_port();
    let broker = embedded(port, false, credentials).await;
    let mut cluster = connect_ok(port, "cluster", &cluster_pw).await;
    let node_a = connect_ok(port, "a", &a).await;
    let mut node_a_ne = connect_ok(port, "a-ne", &a).await;
    let mut node_b_ne = connect_ok(port, "b-ne", &b).await;

    // A node publishes only under its own id: A's forged messages about B are dropped (not delivered to the
    // cluster, nor to B's own subscription); receiving A's later own message first proves they never came.
    cluster.subscribe("nodes/+/#").await;
    node_b_ne.subscribe("nodes/b/control/deploy").await;
    node_a.publish("nodes/b/job", "forged").await;
    node_a.publish("nodes/b/control/deploy", "forged").await;
    node_a.publish("nodes/a/information", "real").await;
    let p = cluster.next_publish().await;
    assert_eq!(
        (p.topic.as_str(), &p.payload[..]),
        ("nodes/a/information", &b"real"[..])
    );
    cluster.assert_quiet().await;
    node_b_ne.assert_quiet().await;
    assert_eq!(broker.embedded().unwrap().router().counters().denied_publishes, 2);

    // `#` from a worker means "everything of mine": B's commands never reach A.
    node_a_ne.subscribe("#").await;
    cluster.publish("nodes/b/control/deploy", "for-b").await;
    cluster.publish("nodes/a/control/deploy", "for-a").await;
    let p = node_b_ne.next_publish().await;
    assert_eq!(
        (p.topic.as_str(), &p.payload[..]),
        ("nodes/b/control/deploy", &b"for-b"[..])
    );
    let p = node_a_ne.next_publish().await;
    assert_eq!(
        (p.topic.as_str(), &p.payload[..]),
        ("nodes/a/control/deploy", &b"for-a"[..])
    );
    node_a_ne.assert_quiet().await;

    // Subscribing to another node's topic is refused in the SUBACK.
    node_a_ne
        .client
        .subscribe("nodes/b/control/deploy", QoS::AtLeastOnce)
        .await
        .unwrap();
    let ack = timeout(DEADLINE, async {
        loop {
            if let Packet::SubAck(ack) = node_a_ne.packets.recv().await.expect("closed") {
                return ack;
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(ack.return_codes, vec![rumqttc::SubscribeReasonCode::Failure]);

    // Nodes read the job update notices by name; only the cluster writes them.
    node_b_ne.subscribe("jobs/app.ns.svc.ns/updates_available").await;
    node_a
        .publish("jobs/app.ns.svc.ns/updates_available", "forged")
        .await;
    cluster
        .publish("jobs/app.ns.svc.ns/updates_available", "real")
        .await;
    let p = node_b_ne.next_publish().await;
    assert_eq!(&p.payload[..], b"real");
    node_b_ne.assert_quiet().await;
}

#[tokio::test]
async fn embedded_anonymous_identifies_registered_nodes_by_client_id() {
    let credentials = Credentials::new("cluster", &hash_password("cpw"));
    credentials.set_node("a", &hash_password("secret-a"));
    credentials.set_node("b", &hash_password("secret-b"));
    let port = free_port();
    let broker = embedded(port, true, credentials).await;
    // Reference workers: no credentials, client ids `<id>` and `<id>-ne`.
    let mut net_b = connect(port, "b", None).await.unwrap();
    let ne_a = connect(port, "a-ne", None).await.unwrap();
    net_b.subscribe("nodes/b/net/subnetwork/result").await;
    // Unknown client ids, and the cluster's own user, are refused without a login.
    assert_refused(port, "someone", None).await;
    assert_refused(port, "cluster", None).await;
    // A wrong password is still refused.
    assert_refused(port, "a", Some(("a", "wrong"))).await;
    // The ACLs apply: anonymous A cannot write B's topics.
    ne_a.publish("nodes/b/net/subnetwork/result", "forged").await;
    ne_a.publish("nodes/a/information", "{}").await;
    let mut cluster = connect_ok(port, "cluster", "cpw").await;
    cluster.subscribe("nodes/+/information").await;
    ne_a.publish("nodes/a/information", "{}").await;
    assert_eq!(cluster.next_publish().await.topic, "nodes/a/information");
    net_b.assert_quiet().await;
    assert_eq!(broker.embedded().unwrap().router().counters().denied_publishes, 1);
}

#[tokio::test]
async fn embedded_persistent_sessions_and_wills() {
    let credentials = Credentials::new("cluster", &hash_password("cpw"));
    credentials.set_node("a", &hash_password("sa"));
    let port = free_port();
    let _broker = embedded(port, false, credentials).await;
    let mut cluster = connect_ok(port, "cluster", "cpw").await;
    cluster.subscribe("nodes/+/lost").await;

    // A NodeEngine-like client: persistent session and a last will.
    let connect_ne = || async {
        let mut options = MqttOptions::new("a-ne", "127.0.0.1", port);
        options
            .set_credentials("a-ne", "sa")
            .set_keep_alive(Duration::from_secs(5))
            .set_clean_session(false)
            .set_last_will(rumqttc::LastWill::new(
                "nodes/a/lost",
                "{\"lost\":true}",
                QoS::AtLeastOnce,
                false,
            ));
        let (client, mut eventloop) = AsyncClient::new(options, 16);
        let Ok(Event::Incoming(Packet::ConnAck(ack))) = eventloop.poll().await else {
            panic!("no CONNACK")
        };
        (client, eventloop, ack.session_present)
    };
    let (client, mut eventloop, present) = connect_ne().await;
    assert!(!present);
    client
        .subscribe("nodes/a/control/deploy", QoS::AtLeastOnce)
        .await
        .unwrap();
    loop {
        if let Event::Incoming(Packet::SubAck(_)) = eventloop.poll().await.unwrap() {
            break;
        }
    }
    // Killed without DISCONNECT: the will reaches the cluster.
    drop(eventloop);
    drop(client);
    let p = cluster.next_publish().await;
    assert_eq!(
        (p.topic.as_str(), &p.payload[..]),
        ("nodes/a/lost", &b"{\"lost\":true}"[..])
    );

    // A command sent while it is away is kept and delivered when it comes back.
    cluster.publish("nodes/a/control/deploy", "while-away").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (client, mut eventloop, present) = connect_ne().await;
    assert!(present, "the session was kept");
    let p = timeout(DEADLINE, async {
        loop {
            if let Event::Incoming(Packet::Publish(p)) = eventloop.poll().await.unwrap() {
                return p;
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(
        (p.topic.as_str(), &p.payload[..]),
        ("nodes/a/control/deploy", &b"while-away"[..])
    );
    // A goodbye publishes no will.
    client.disconnect().await.unwrap();
    while eventloop.poll().await.is_ok() {}
    cluster.assert_quiet().await;
}

#[tokio::test]
async fn embedded_closes_garbage_and_keeps_serving() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let credentials = Credentials::new("cluster", &hash_password("cpw"));
    let port = free_port();
    let broker = embedded(port, false, credentials).await;
    // Not MQTT, an oversized length prefix, a CONNECT for MQTT 5: each ends the connection, never the broker.
    let cases: [&[u8]; 3] = [
        b"GET / HTTP/1.1\r\n\r\n",
        &[0x10, 0xff, 0xff, 0xff, 0x7f],
        &[0x10, 0x0b, 0, 4, b'M', b'Q', b'T', b'T', 5, 2, 0, 0, 0],
    ];
    for bytes in cases {
        let mut raw = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        raw.write_all(bytes).await.unwrap();
        let mut answer = Vec::new();
        timeout(DEADLINE, raw.read_to_end(&mut answer))
            .await
            .expect("the broker kept a garbage connection open")
            .unwrap();
        // MQTT 5 gets CONNACK "unacceptable protocol version"; the rest nothing.
        if bytes.get(8) == Some(&5) {
            assert_eq!(answer, [0x20, 0x02, 0x00, 0x01]);
        } else {
            assert!(answer.is_empty(), "{answer:?}");
        }
    }
    connect_ok(port, "cluster", "cpw").await;
    assert_eq!(broker.embedded().unwrap().connections(), 1);
}

#[tokio::test]
async fn embedded_port_in_use_is_an_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let listen = taken.local_addr().unwrap();
    let err = Broker::start(
        BrokerConfig::Embedded {
            listen,
            allow_anonymous: true,
            max_connections: 10,
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
async fn embedded_port_zero_is_resolved_and_stop_closes_everything() {
    let listen: SocketAddr = ([127, 0, 0, 1], 0).into();
    let broker = Broker::start(
        BrokerConfig::Embedded {
            listen,
            allow_anonymous: false,
            max_connections: 10,
        },
        Credentials::new("cluster", &hash_password("cpw")),
    )
    .await
    .unwrap();
    let (_, port) = broker.client_endpoint();
    assert_ne!(port, 0);
    assert_eq!(broker.worker_port(), port);
    let mut conn = connect_ok(port, "cluster", "cpw").await;
    broker.stop();
    closed(&mut conn).await;
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err(),
        "still listening"
    );
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

    // `#` yields only the node's own topics.
    let mut node_a_ne = connect_ok(port, "a-ne", &a).await;
    node_a_ne.subscribe("#").await;
    cluster.publish("nodes/b/control/delete", "for-b").await;
    cluster.publish("nodes/a/control/delete", "for-a").await;
    let p = node_a_ne.next_publish().await;
    assert_eq!(
        (p.topic.as_str(), &p.payload[..]),
        ("nodes/a/control/delete", &b"for-a"[..])
    );
    node_a_ne.assert_quiet().await;

    // Nodes read the job update notices, only the cluster writes there.
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
