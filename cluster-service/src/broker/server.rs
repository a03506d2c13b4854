//! The embedded broker's network side: accepts TCP connections, authenticates each CONNECT, and runs one small task
//! per connection that moves packets between the socket and the [`Router`].
//!
//! An idle connection holds no buffers: the read buffer is allocated when the socket is readable and given back once
//! its packets are handled, the write buffer once written, the queue of messages to write once drained. What stays
//! is the task, the socket, the QoS 1 messages awaiting PUBACK (at most [`WINDOW`]) and the session in the router:
//! a few KiB, so tens of thousands of workers fit in a small cluster-service. Every socket has `TCP_NODELAY`
//! (commands are small and latency-bound).

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::BytesMut;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::watch,
    time::Instant,
};

use super::{
    Credentials,
    acl::Identity,
    codec::{self, CodecError, Connect, Packet, QoS},
    router::{Mailbox, Out, Outgoing, Router, Sink},
};

/// QoS 1 messages sent to one client and not yet acknowledged; more wait in its queue.
pub const WINDOW: usize = 64;
/// Largest CONNECT accepted (before the client is authenticated).
const MAX_CONNECT: usize = 16 * 1024;
/// QoS 2 messages from one client awaiting PUBREL.
const MAX_AWAITING_REL: usize = 64;
/// Bytes reserved for each socket read.
const READ_CHUNK: usize = 1024;
/// A client that does not take its messages for this long is disconnected.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// A write buffer grown past this is given back once written.
const KEEP_WRITE_CAPACITY: usize = 64 * 1024;

/// How the embedded broker behaves.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Largest packet accepted from an authenticated client.
    pub max_packet: usize,
    /// Connections held at once; more are closed at accept.
    pub max_connections: usize,
    /// Time a new connection has to send its CONNECT.
    pub connect_timeout: Duration,
    /// Let registered nodes' programs connect without credentials (identified by client id `<id>`/`<id>-ne`), as
    /// reference workers do. The topic ACLs still apply.
    pub allow_anonymous: bool,
}

/// The broker state shared by the accept loop, the connections and the in-process client.
#[derive(Debug)]
pub struct Embedded {
    router: Mutex<Router>,
    credentials: Credentials,
    settings: Settings,
    connections: AtomicUsize,
    logins: std::sync::atomic::AtomicU64,
    warned_full: AtomicBool,
}

impl Embedded {
    /// A broker with no sessions.
    pub fn new(credentials: Credentials, settings: Settings) -> Self {
        Self {
            router: Mutex::new(Router::default()),
            credentials,
            settings,
            connections: AtomicUsize::new(0),
            logins: std::sync::atomic::AtomicU64::new(0),
            warned_full: AtomicBool::new(false),
        }
    }

    /// The router, locked. Never held across an `.await`.
    pub fn router(&self) -> MutexGuard<'_, Router> {
        // Every router operation leaves its maps consistent before it can panic, so a poisoned lock is reusable.
        self.router.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Open network connections.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    /// Accepted logins so far (every connect of a worker, reconnects included).
    pub fn logins(&self) -> u64 {
        self.logins.load(Ordering::Relaxed)
    }

    /// Who a CONNECT is, or the CONNACK return code refusing it.
    fn authenticate(&self, connect: &Connect) -> Result<Identity, u8> {
        if connect.client_id.is_empty() {
            return Err(2);
        }
        match (&connect.username, &connect.password) {
            (Some(user), Some(password)) => {
                let password = std::str::from_utf8(password).map_err(|_| 4u8)?;
                self.credentials
                    .login(&connect.client_id, user, password)
                    .ok_or(4)
            }
            (Some(_), None) => Err(4),
            (None, _) if self.settings.allow_anonymous => {
                self.credentials.anonymous(&connect.client_id).ok_or(5)
            }
            (None, _) => Err(5),
        }
    }
}

/// Accepts connections on `listener` until `stop`.
pub async fn serve(listener: TcpListener, broker: Arc<Embedded>, mut stop: watch::Receiver<bool>) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.wait_for(|s| *s) => return,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: pause instead of spinning.
                tracing::warn!(error = %e, "MQTT accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if broker.connections() >= broker.settings.max_connections {
            if !broker.warned_full.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    max = broker.settings.max_connections,
                    "MQTT connection limit reached; new connections are closed"
                );
            }
            drop(stream);
            continue;
        }
        broker.warned_full.store(false, Ordering::Relaxed);
        broker.connections.fetch_add(1, Ordering::Relaxed);
        let broker = Arc::clone(&broker);
        let stop = stop.clone();
        tokio::spawn(async move {
            connection(stream, peer, &broker, stop).await;
            broker.connections.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// Why a connection ended.
#[derive(Debug)]
enum End {
    /// The client said DISCONNECT: no will.
    Goodbye,
    /// Anything else: the will is published.
    Abnormal(String),
}

/// One socket with its buffers.
struct Socket {
    stream: TcpStream,
    rbuf: BytesMut,
    wbuf: BytesMut,
}

impl Socket {
    /// The CONNECT a new connection must start with, reading as needed; `Ok(None)` at end of stream. Anything
    /// else is refused at its first byte, without waiting for the rest.
    async fn read_connect(&mut self, limit: usize) -> Result<Option<Packet>, String> {
        loop {
            if self.rbuf.first().is_some_and(|b| *b != 0x10) {
                return Err(format!(
                    "the first packet is not CONNECT (first byte {:#04x})",
                    self.rbuf[0]
                ));
            }
            if let Some(packet) = self.buffered(limit)? {
                return Ok(Some(packet));
            }
            self.rbuf.reserve(READ_CHUNK);
            match self.stream.read_buf(&mut self.rbuf).await {
                Ok(0) => return Ok(None),
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    /// A packet already in the read buffer, if a whole one is there.
    fn buffered(&mut self, limit: usize) -> Result<Option<Packet>, String> {
        match codec::frame_len(&self.rbuf, limit).map_err(|e| e.to_string())? {
            Some(len) if self.rbuf.len() >= len => {
                let frame = self.rbuf.split_to(len).freeze();
                codec::decode(frame)
                    .map(Some)
                    .map_err(|e: CodecError| e.to_string())
            }
            _ => Ok(None),
        }
    }

    /// Reads what the socket has now (it was reported readable); `Ok(false)` at end of stream.
    fn read_ready(&mut self) -> Result<bool, String> {
        loop {
            self.rbuf.reserve(READ_CHUNK);
            match self.stream.try_read_buf(&mut self.rbuf) {
                Ok(0) => return Ok(false),
                Ok(n) if n < READ_CHUNK => return Ok(true),
                // The chunk was filled: more may wait, but hand over what we have before it grows without bound.
                Ok(_) if self.rbuf.len() >= 64 * READ_CHUNK => return Ok(true),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(true),
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    /// Gives the read buffer's memory back when nothing is left in it (an idle connection holds none).
    fn release_read_buffer(&mut self) {
        if self.rbuf.is_empty() && self.rbuf.capacity() > 0 {
            self.rbuf = BytesMut::new();
        }
    }

    async fn flush(&mut self) -> Result<(), String> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        match tokio::time::timeout(WRITE_TIMEOUT, self.stream.write_all(&self.wbuf)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err(format!("the client took no data for {WRITE_TIMEOUT:?}")),
        }
        // Written: an idle connection keeps no write buffer either.
        self.wbuf = BytesMut::new();
        Ok(())
    }
}

async fn connection(stream: TcpStream, peer: SocketAddr, broker: &Embedded, stop: watch::Receiver<bool>) {
    let _ = stream.set_nodelay(true);
    let mut socket = Socket {
        stream,
        rbuf: BytesMut::new(),
        wbuf: BytesMut::new(),
    };
    let first = tokio::time::timeout(broker.settings.connect_timeout, socket.read_connect(MAX_CONNECT)).await;
    let connect = match first {
        Ok(Ok(Some(Packet::Connect(connect)))) => connect,
        Ok(Ok(Some(_))) => {
            tracing::debug!(%peer, "MQTT connection closed: the first packet was not CONNECT");
            return;
        }
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "MQTT connection closed before CONNECT");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "MQTT connection closed: no CONNECT in time");
            return;
        }
    };
    if connect.level != 4 && connect.level != 3 {
        codec::connack(&mut socket.wbuf, false, 1);
        let _ = socket.flush().await;
        return;
    }
    let identity = match broker.authenticate(&connect) {
        Ok(identity) => {
            broker.logins.fetch_add(1, Ordering::Relaxed);
            identity
        }
        Err(code) => {
            tracing::warn!(%peer, client_id = ?connect.client_id, user = ?connect.username, code,
                "MQTT login refused");
            codec::connack(&mut socket.wbuf, false, code);
            let _ = socket.flush().await;
            return;
        }
    };
    let (sink, mailbox) = Sink::conn();
    let connected =
        broker
            .router()
            .connect(&connect.client_id, identity.clone(), connect.clean_session, sink);
    codec::connack(&mut socket.wbuf, connected.session_present, 0);
    tracing::debug!(%peer, client_id = ?connect.client_id, ?identity, "MQTT client connected");

    let mut session = Session {
        broker,
        identity,
        client_id: connect.client_id.clone(),
        mailbox,
        inflight: Vec::new(),
        next_pkid: 0,
        awaiting_rel: Vec::new(),
        warned_denied: false,
    };
    let keep_alive =
        (connect.keep_alive > 0).then(|| Duration::from_millis(u64::from(connect.keep_alive) * 1500));
    let end = session.run(&mut socket, keep_alive, stop).await;
    let unacked: Vec<Outgoing> = session.inflight.drain(..).map(|(_, m)| m).collect();
    let mut router = broker.router();
    if let End::Abnormal(why) = &end {
        tracing::debug!(%peer, client_id = ?connect.client_id, %why, "MQTT connection lost");
        if let Some(will) = &connect.will {
            router.publish(
                &session.identity,
                &will.topic,
                will.payload.clone(),
                will.qos,
                will.retain,
            );
        }
    }
    router.disconnect(&connect.client_id, connected.generation, unacked);
}

/// A connected, authenticated client.
struct Session<'a> {
    broker: &'a Embedded,
    identity: Identity,
    client_id: String,
    mailbox: Arc<Mailbox>,
    /// Sent QoS 1 messages awaiting PUBACK.
    inflight: Vec<(u16, Outgoing)>,
    next_pkid: u16,
    /// Received QoS 2 packet ids awaiting PUBREL.
    awaiting_rel: Vec<u16>,
    warned_denied: bool,
}

impl Session<'_> {
    async fn run(
        &mut self,
        socket: &mut Socket,
        keep_alive: Option<Duration>,
        mut stop: watch::Receiver<bool>,
    ) -> End {
        // Without a keep-alive the client asked never to be timed out; a day stands in for "never".
        let patience = keep_alive.unwrap_or(Duration::from_secs(86_400));
        let idle = tokio::time::sleep(patience);
        tokio::pin!(idle);
        let limit = self.broker.settings.max_packet;
        loop {
            // Everything already buffered is handled before waiting again.
            loop {
                match socket.buffered(limit) {
                    Ok(Some(packet)) => match self.handle(packet, &mut socket.wbuf) {
                        Ok(true) => {}
                        Ok(false) => {
                            let _ = socket.flush().await;
                            return End::Goodbye;
                        }
                        Err(why) => return End::Abnormal(why),
                    },
                    Ok(None) => break,
                    Err(why) => return End::Abnormal(format!("malformed packet: {why}")),
                }
            }
            socket.release_read_buffer();
            // Queued messages go out before waiting (up to the window and a write buffer's worth at a time).
            while self.inflight.len() < WINDOW && socket.wbuf.len() < KEEP_WRITE_CAPACITY {
                let Some(out) = self.mailbox.pop() else { break };
                if let Err(why) = self.send(out, &mut socket.wbuf) {
                    let _ = socket.flush().await;
                    return End::Abnormal(why.into());
                }
            }
            if let Err(why) = socket.flush().await {
                return End::Abnormal(why);
            }
            let more_to_send = self.inflight.len() < WINDOW && !self.mailbox.is_empty();
            if more_to_send {
                continue;
            }
            let window_open = self.inflight.len() < WINDOW;
            tokio::select! {
                ready = socket.stream.readable() => {
                    if let Err(e) = ready {
                        return End::Abnormal(e.to_string());
                    }
                    match socket.read_ready() {
                        Ok(true) => idle.as_mut().reset(Instant::now() + patience),
                        Ok(false) => return End::Abnormal("the client closed the connection".into()),
                        Err(e) => return End::Abnormal(e),
                    }
                },
                () = self.mailbox.wait(), if window_open => {}
                () = &mut idle => return End::Abnormal(format!("no packet within 1.5 × the keep-alive ({patience:?})")),
                _ = stop.wait_for(|s| *s) => return End::Abnormal("the broker is stopping".into()),
            }
        }
    }

    /// Encodes one message for the client; `Err` if the connection must close.
    fn send(&mut self, out: Out, wbuf: &mut BytesMut) -> Result<(), &'static str> {
        match out {
            Out::Close(why) => Err(why),
            Out::Publish(message) => {
                if message.qos == QoS::AtMostOnce {
                    codec::publish_packet(
                        wbuf,
                        &message.topic,
                        &message.payload,
                        QoS::AtMostOnce,
                        message.retain,
                        0,
                    );
                } else {
                    let pkid = self.next_pkid();
                    codec::publish_packet(
                        wbuf,
                        &message.topic,
                        &message.payload,
                        QoS::AtLeastOnce,
                        message.retain,
                        pkid,
                    );
                    self.inflight.push((pkid, message));
                }
                Ok(())
            }
        }
    }

    fn next_pkid(&mut self) -> u16 {
        loop {
            self.next_pkid = self.next_pkid.wrapping_add(1).max(1);
            if !self.inflight.iter().any(|(id, _)| *id == self.next_pkid) {
                return self.next_pkid;
            }
        }
    }

    /// Handles one packet from the client, queueing answers in `wbuf`. `Ok(false)` after DISCONNECT, `Err` for a
    /// protocol violation.
    fn handle(&mut self, packet: Packet, wbuf: &mut BytesMut) -> Result<bool, String> {
        match packet {
            Packet::Publish(p) => {
                let duplicate = p.qos == QoS::ExactlyOnce && self.awaiting_rel.contains(&p.pkid);
                if !duplicate {
                    let allowed =
                        self.broker
                            .router()
                            .publish(&self.identity, &p.topic, p.payload, p.qos, p.retain);
                    if !allowed && !self.warned_denied {
                        self.warned_denied = true;
                        tracing::warn!(client_id = ?self.client_id, topic = ?p.topic,
                            "MQTT publish outside the client's topics dropped (further ones on this connection are counted, not logged)");
                    }
                }
                match p.qos {
                    QoS::AtMostOnce => {}
                    QoS::AtLeastOnce => codec::ack(wbuf, 4, p.pkid),
                    QoS::ExactlyOnce => {
                        if !duplicate {
                            if self.awaiting_rel.len() >= MAX_AWAITING_REL {
                                return Err(format!(
                                    "more than {MAX_AWAITING_REL} QoS 2 messages awaiting PUBREL"
                                ));
                            }
                            self.awaiting_rel.push(p.pkid);
                        }
                        codec::ack(wbuf, 5, p.pkid);
                    }
                }
            }
            Packet::PubAck(id) => self.inflight.retain(|(pkid, _)| *pkid != id),
            // The broker never sends QoS 2, so PUBREC and PUBCOMP from a client refer to nothing.
            Packet::PubRec(_) | Packet::PubComp(_) => {}
            Packet::PubRel(id) => {
                self.awaiting_rel.retain(|pkid| *pkid != id);
                codec::ack(wbuf, 7, id);
            }
            Packet::Subscribe(id, filters) => {
                let codes = self.broker.router().subscribe(&self.client_id, &filters);
                if codes.contains(&0x80) {
                    let refused: Vec<&str> = filters
                        .iter()
                        .zip(&codes)
                        .filter(|(_, c)| **c == 0x80)
                        .map(|((f, _), _)| f.as_str())
                        .collect();
                    tracing::warn!(client_id = ?self.client_id, ?refused, "MQTT subscription outside the client's topics refused");
                }
                codec::suback(wbuf, id, &codes);
            }
            Packet::Unsubscribe(id, filters) => {
                self.broker.router().unsubscribe(&self.client_id, &filters);
                codec::unsuback(wbuf, id);
            }
            Packet::PingReq => codec::pingresp(wbuf),
            Packet::Disconnect => return Ok(false),
            Packet::Connect(_) => return Err("a second CONNECT".into()),
        }
        Ok(true)
    }
}
