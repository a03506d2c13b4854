//! MQTT 3.1.1 packets (and 3.1's `MQIsdp` CONNECT): framing, decoding into owned packets and encoding, pure.
//!
//! Decoding never panics and never allocates more than the frame it was given: a length prefix is checked against
//! the bytes present and against the caller's size limit before anything is read. Payloads and topics are slices of
//! the frame ([`Bytes`]), so a message fanned out to many subscribers is never copied.

use bytes::{Buf as _, BufMut as _, Bytes, BytesMut};

/// Longest topic name or filter accepted (bytes). The contract's longest is `nodes/<128>/net/service/address-changed`.
pub const MAX_TOPIC_LEN: usize = 1024;
/// Most filters in one SUBSCRIBE or UNSUBSCRIBE.
pub const MAX_FILTERS: usize = 64;

/// Quality of service of a message or subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum QoS {
    /// At most once.
    AtMostOnce = 0,
    /// At least once (PUBACK).
    AtLeastOnce = 1,
    /// Exactly once (PUBREC, PUBREL, PUBCOMP).
    ExactlyOnce = 2,
}

impl QoS {
    fn from_bits(bits: u8) -> Option<Self> {
        match bits {
            0 => Some(Self::AtMostOnce),
            1 => Some(Self::AtLeastOnce),
            2 => Some(Self::ExactlyOnce),
            _ => None,
        }
    }
}

/// A last will: published by the broker when the connection ends without DISCONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Will {
    /// Its topic.
    pub topic: String,
    /// Its payload.
    pub payload: Bytes,
    /// Its QoS.
    pub qos: QoS,
    /// Whether it is retained.
    pub retain: bool,
}

/// A CONNECT packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    /// 4 for MQTT 3.1.1, 3 for MQTT 3.1 (`MQIsdp`); anything else is answered with return code 1.
    pub level: u8,
    /// The client id (may be empty).
    pub client_id: String,
    /// Clean session flag.
    pub clean_session: bool,
    /// Keep-alive in seconds (0: none).
    pub keep_alive: u16,
    /// The user name, if sent.
    pub username: Option<String>,
    /// The password, if sent (binary in MQTT; compared as bytes).
    pub password: Option<Bytes>,
    /// The last will, if any.
    pub will: Option<Will>,
}

/// A PUBLISH packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    /// Redelivery flag.
    pub dup: bool,
    /// QoS.
    pub qos: QoS,
    /// Retain flag.
    pub retain: bool,
    /// Topic name (no wildcards).
    pub topic: String,
    /// Packet id (QoS 1 and 2 only).
    pub pkid: u16,
    /// Payload.
    pub payload: Bytes,
}

/// A packet a client sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    /// CONNECT.
    Connect(Box<Connect>),
    /// PUBLISH.
    Publish(Publish),
    /// PUBACK (QoS 1 delivered to the client).
    PubAck(u16),
    /// PUBREC (QoS 2 step 1; the broker never sends QoS 2, so it only acknowledges).
    PubRec(u16),
    /// PUBREL (QoS 2 step 2).
    PubRel(u16),
    /// PUBCOMP (QoS 2 step 3).
    PubComp(u16),
    /// SUBSCRIBE: packet id, (filter, requested QoS) pairs.
    Subscribe(u16, Vec<(String, QoS)>),
    /// UNSUBSCRIBE: packet id, filters.
    Unsubscribe(u16, Vec<String>),
    /// PINGREQ.
    PingReq,
    /// DISCONNECT.
    Disconnect,
}

/// Why bytes are not a valid packet. The connection is closed on any of these.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// The remaining-length prefix is longer than 4 bytes.
    #[error("malformed remaining length")]
    BadLength,
    /// The packet is larger than allowed.
    #[error("packet of {size} bytes exceeds the limit of {limit}")]
    TooLarge {
        /// Its size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// A packet type a client may not send (CONNACK, SUBACK, …) or the reserved types 0 and 15.
    #[error("packet type {0} is not accepted from a client")]
    BadType(u8),
    /// The fixed header's flags are wrong for the type.
    #[error("packet type {kind}: flags {flags:#06b} are reserved")]
    BadFlags {
        /// The type.
        kind: u8,
        /// The flags.
        flags: u8,
    },
    /// A field runs past the end of the packet.
    #[error("{0} runs past the end of the packet")]
    Truncated(&'static str),
    /// A string is not UTF-8 or contains U+0000.
    #[error("{0} is not a valid UTF-8 string")]
    BadString(&'static str),
    /// The CONNECT's protocol name is not `MQTT`/`MQIsdp`.
    #[error("protocol name {0:?} is not MQTT")]
    BadProtocol(String),
    /// A CONNECT field combination the spec forbids (reserved bit, will flags, password without user name).
    #[error("CONNECT: {0}")]
    BadConnect(&'static str),
    /// QoS 3.
    #[error("QoS 3 does not exist")]
    BadQoS,
    /// A topic name or filter breaks the rules (wildcards, length, empty).
    #[error("topic {topic:?}: {rule}")]
    BadTopic {
        /// The topic (cut to 64 bytes).
        topic: String,
        /// The rule.
        rule: &'static str,
    },
    /// A SUBSCRIBE/UNSUBSCRIBE without filters, or with too many.
    #[error("{kind} carries {count} filters (1 to {MAX_FILTERS} allowed)")]
    FilterCount {
        /// SUBSCRIBE or UNSUBSCRIBE.
        kind: &'static str,
        /// How many.
        count: usize,
    },
    /// Packet id 0 where one is required.
    #[error("packet id 0 is not allowed")]
    ZeroPacketId,
    /// Bytes left over after the packet's fields.
    #[error("{0} bytes after the end of the packet")]
    Trailing(usize),
}

/// The size of the frame at the start of `buf`, once its fixed header is complete: `Ok(None)` if more bytes are
/// needed to know. Refuses frames larger than `limit` as soon as the length is known, before they are buffered.
pub fn frame_len(buf: &[u8], limit: usize) -> Result<Option<usize>, CodecError> {
    let mut remaining: usize = 0;
    for i in 0..4 {
        let Some(&byte) = buf.get(1 + i) else {
            return Ok(None);
        };
        remaining |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            let size = 1 + i + 1 + remaining;
            if size > limit {
                return Err(CodecError::TooLarge { size, limit });
            }
            return Ok(Some(size));
        }
    }
    Err(CodecError::BadLength)
}

/// Decodes one whole frame (exactly [`frame_len`] bytes).
pub fn decode(frame: Bytes) -> Result<Packet, CodecError> {
    let Some(&first) = frame.first() else {
        return Err(CodecError::Truncated("fixed header"));
    };
    let kind = first >> 4;
    let flags = first & 0x0f;
    let mut body = frame;
    // Skip the fixed header: the type byte and 1-4 length bytes.
    let header = 1 + body[1..].iter().position(|b| b & 0x80 == 0).map_or(4, |p| p + 1);
    body.advance(header.min(body.len()));
    let expect_flags = |want: u8| {
        if flags == want {
            Ok(())
        } else {
            Err(CodecError::BadFlags { kind, flags })
        }
    };
    let packet = match kind {
        1 => {
            expect_flags(0)?;
            Packet::Connect(Box::new(connect(&mut body)?))
        }
        3 => Packet::Publish(publish(flags, &mut body)?),
        4 => {
            expect_flags(0)?;
            Packet::PubAck(pkid(&mut body)?)
        }
        5 => {
            expect_flags(0)?;
            Packet::PubRec(pkid(&mut body)?)
        }
        6 => {
            expect_flags(0b0010)?;
            Packet::PubRel(pkid(&mut body)?)
        }
        7 => {
            expect_flags(0)?;
            Packet::PubComp(pkid(&mut body)?)
        }
        8 => {
            expect_flags(0b0010)?;
            let id = pkid(&mut body)?;
            let mut filters = Vec::new();
            while body.has_remaining() {
                let filter = string(&mut body, "topic filter")?;
                check_filter(&filter)?;
                let qos = QoS::from_bits(u8_field(&mut body, "requested QoS")?).ok_or(CodecError::BadQoS)?;
                filters.push((filter, qos));
                if filters.len() > MAX_FILTERS {
                    return Err(CodecError::FilterCount {
                        kind: "SUBSCRIBE",
                        count: filters.len(),
                    });
                }
            }
            if filters.is_empty() {
                return Err(CodecError::FilterCount {
                    kind: "SUBSCRIBE",
                    count: 0,
                });
            }
            Packet::Subscribe(id, filters)
        }
        10 => {
            expect_flags(0b0010)?;
            let id = pkid(&mut body)?;
            let mut filters = Vec::new();
            while body.has_remaining() {
                let filter = string(&mut body, "topic filter")?;
                check_filter(&filter)?;
                filters.push(filter);
                if filters.len() > MAX_FILTERS {
                    return Err(CodecError::FilterCount {
                        kind: "UNSUBSCRIBE",
                        count: filters.len(),
                    });
                }
            }
            if filters.is_empty() {
                return Err(CodecError::FilterCount {
                    kind: "UNSUBSCRIBE",
                    count: 0,
                });
            }
            Packet::Unsubscribe(id, filters)
        }
        12 => {
            expect_flags(0)?;
            Packet::PingReq
        }
        14 => {
            expect_flags(0)?;
            Packet::Disconnect
        }
        other => return Err(CodecError::BadType(other)),
    };
    if body.has_remaining() && !matches!(packet, Packet::Publish(_)) {
        return Err(CodecError::Trailing(body.remaining()));
    }
    Ok(packet)
}

fn u8_field(body: &mut Bytes, what: &'static str) -> Result<u8, CodecError> {
    if body.has_remaining() {
        Ok(body.get_u8())
    } else {
        Err(CodecError::Truncated(what))
    }
}

fn u16_field(body: &mut Bytes, what: &'static str) -> Result<u16, CodecError> {
    if body.remaining() >= 2 {
        Ok(body.get_u16())
    } else {
        Err(CodecError::Truncated(what))
    }
}

fn pkid(body: &mut Bytes) -> Result<u16, CodecError> {
    match u16_field(body, "packet id")? {
        0 => Err(CodecError::ZeroPacketId),
        id => Ok(id),
    }
}

fn binary(body: &mut Bytes, what: &'static str) -> Result<Bytes, CodecError> {
    let len = usize::from(u16_field(body, what)?);
    if body.remaining() < len {
        return Err(CodecError::Truncated(what));
    }
    Ok(body.split_to(len))
}

fn string(body: &mut Bytes, what: &'static str) -> Result<String, CodecError> {
    let raw = binary(body, what)?;
    match std::str::from_utf8(&raw) {
        Ok(s) if !s.contains('\0') => Ok(s.to_owned()),
        _ => Err(CodecError::BadString(what)),
    }
}

fn bad_topic(topic: &str, rule: &'static str) -> CodecError {
    let mut cut = topic.len().min(64);
    while !topic.is_char_boundary(cut) {
        cut -= 1;
    }
    CodecError::BadTopic {
        topic: topic[..cut].to_owned(),
        rule,
    }
}

/// A topic name a client may publish to: 1 to [`MAX_TOPIC_LEN`] bytes, no `+`/`#`.
pub fn check_topic(topic: &str) -> Result<(), CodecError> {
    if topic.is_empty() {
        return Err(bad_topic(topic, "a topic name must not be empty"));
    }
    if topic.len() > MAX_TOPIC_LEN {
        return Err(bad_topic(topic, "longer than 1024 bytes"));
    }
    if topic.contains(['+', '#']) {
        return Err(bad_topic(topic, "a topic name must not contain wildcards"));
    }
    Ok(())
}

/// A topic filter: 1 to [`MAX_TOPIC_LEN`] bytes, `+` only as a whole level, `#` only as the whole last level.
pub fn check_filter(filter: &str) -> Result<(), CodecError> {
    if filter.is_empty() {
        return Err(bad_topic(filter, "a topic filter must not be empty"));
    }
    if filter.len() > MAX_TOPIC_LEN {
        return Err(bad_topic(filter, "longer than 1024 bytes"));
    }
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        if level.contains('#') && (level != "#" || levels.peek().is_some()) {
            return Err(bad_topic(filter, "`#` must be the whole last level"));
        }
        if level.contains('+') && level != "+" {
            return Err(bad_topic(filter, "`+` must be a whole level"));
        }
    }
    Ok(())
}

/// Whether `topic` matches `filter` (MQTT rules; topics starting with `$` match no filter starting with a
/// wildcard).
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && filter.starts_with(['+', '#']) {
        return false;
    }
    let mut topic_levels = topic.split('/');
    for level in filter.split('/') {
        if level == "#" {
            return true;
        }
        match topic_levels.next() {
            Some(t) if level == "+" || level == t => {}
            _ => return false,
        }
    }
    topic_levels.next().is_none()
}

/// Whether a filter has wildcards.
pub fn is_wildcard(filter: &str) -> bool {
    filter.contains(['+', '#'])
}

fn connect(body: &mut Bytes) -> Result<Connect, CodecError> {
    let protocol = string(body, "protocol name")?;
    let level = u8_field(body, "protocol level")?;
    if protocol != "MQTT" && protocol != "MQIsdp" {
        return Err(CodecError::BadProtocol(protocol));
    }
    let flags = u8_field(body, "connect flags")?;
    let keep_alive = u16_field(body, "keep alive")?;
    if level != 3 && level != 4 {
        // Answered with CONNACK 1 by the caller; the rest of the packet is not read (MQTT 5 differs from here).
        body.advance(body.remaining());
        return Ok(Connect {
            level,
            client_id: String::new(),
            clean_session: true,
            keep_alive,
            username: None,
            password: None,
            will: None,
        });
    }
    if flags & 0x01 != 0 {
        return Err(CodecError::BadConnect("the reserved flag is set"));
    }
    let clean_session = flags & 0x02 != 0;
    let will_flag = flags & 0x04 != 0;
    let will_qos = QoS::from_bits((flags >> 3) & 0x03).ok_or(CodecError::BadQoS)?;
    let will_retain = flags & 0x20 != 0;
    let has_password = flags & 0x40 != 0;
    let has_username = flags & 0x80 != 0;
    if !will_flag && (will_qos != QoS::AtMostOnce || will_retain) {
        return Err(CodecError::BadConnect("will QoS or retain set without a will"));
    }
    if has_password && !has_username {
        return Err(CodecError::BadConnect("a password without a user name"));
    }
    let client_id = string(body, "client id")?;
    let will = if will_flag {
        let topic = string(body, "will topic")?;
        check_topic(&topic)?;
        let payload = binary(body, "will message")?;
        Some(Will {
            topic,
            payload,
            qos: will_qos,
            retain: will_retain,
        })
    } else {
        None
    };
    let username = has_username.then(|| string(body, "user name")).transpose()?;
    let password = has_password.then(|| binary(body, "password")).transpose()?;
    if body.has_remaining() {
        return Err(CodecError::Trailing(body.remaining()));
    }
    Ok(Connect {
        level,
        client_id,
        clean_session,
        keep_alive,
        username,
        password,
        will,
    })
}

fn publish(flags: u8, body: &mut Bytes) -> Result<Publish, CodecError> {
    let dup = flags & 0x08 != 0;
    let qos = QoS::from_bits((flags >> 1) & 0x03).ok_or(CodecError::BadQoS)?;
    let retain = flags & 0x01 != 0;
    if qos == QoS::AtMostOnce && dup {
        return Err(CodecError::BadFlags { kind: 3, flags });
    }
    let topic = string(body, "topic name")?;
    check_topic(&topic)?;
    let pkid = if qos == QoS::AtMostOnce { 0 } else { pkid(body)? };
    let payload = body.split_to(body.remaining());
    Ok(Publish {
        dup,
        qos,
        retain,
        topic,
        pkid,
        payload,
    })
}

// === Encoding (broker → client) =================================================================================

fn put_remaining_length(out: &mut BytesMut, mut len: usize) {
    loop {
        // Truncation intended: the low 7 bits.
        #[allow(clippy::cast_possible_truncation)]
        let mut byte = (len & 0x7f) as u8;
        len >>= 7;
        if len > 0 {
            byte |= 0x80;
        }
        out.put_u8(byte);
        if len == 0 {
            return;
        }
    }
}

/// CONNACK with `session_present` and return code `code` (0 accepted, 1 bad level, 2 bad client id, 4 bad login,
/// 5 not authorised).
pub fn connack(out: &mut BytesMut, session_present: bool, code: u8) {
    out.put_slice(&[0x20, 0x02, u8::from(session_present), code]);
}

/// A PUBLISH to a client. `pkid` is ignored for QoS 0. The topic must be at most 65535 bytes (topics are checked
/// against [`MAX_TOPIC_LEN`] on the way in).
pub fn publish_packet(out: &mut BytesMut, topic: &str, payload: &[u8], qos: QoS, retain: bool, pkid: u16) {
    let topic_len = u16::try_from(topic.len()).unwrap_or(u16::MAX);
    let topic = &topic.as_bytes()[..usize::from(topic_len)];
    let id_len = if qos == QoS::AtMostOnce { 0 } else { 2 };
    let remaining = 2 + topic.len() + id_len + payload.len();
    out.reserve(5 + remaining);
    out.put_u8(0x30 | ((qos as u8) << 1) | u8::from(retain));
    put_remaining_length(out, remaining);
    out.put_u16(topic_len);
    out.put_slice(topic);
    if qos != QoS::AtMostOnce {
        out.put_u16(pkid);
    }
    out.put_slice(payload);
}

/// PUBACK, PUBREC or PUBCOMP (`kind` 4, 5 or 7) for `pkid`.
pub fn ack(out: &mut BytesMut, kind: u8, pkid: u16) {
    out.put_u8(kind << 4);
    out.put_u8(2);
    out.put_u16(pkid);
}

/// SUBACK with one return code per filter (granted QoS, or 0x80 for a refused filter).
pub fn suback(out: &mut BytesMut, pkid: u16, codes: &[u8]) {
    out.put_u8(0x90);
    put_remaining_length(out, 2 + codes.len());
    out.put_u16(pkid);
    out.put_slice(codes);
}

/// UNSUBACK.
pub fn unsuback(out: &mut BytesMut, pkid: u16) {
    out.put_slice(&[0xb0, 0x02]);
    out.put_u16(pkid);
}

/// PINGRESP.
pub fn pingresp(out: &mut BytesMut) {
    out.put_slice(&[0xd0, 0x00]);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use proptest::prelude::*;

    use super::*;

    fn frame(kind_flags: u8, body: &[u8]) -> Bytes {
        let mut out = BytesMut::new();
        out.put_u8(kind_flags);
        put_remaining_length(&mut out, body.len());
        out.put_slice(body);
        out.freeze()
    }

    fn s(text: &str) -> Vec<u8> {
        let mut v = u16::try_from(text.len()).unwrap().to_be_bytes().to_vec();
        v.extend_from_slice(text.as_bytes());
        v
    }

    fn connect_body(flags: u8, fields: &[&str]) -> Vec<u8> {
        let mut body = s("MQTT");
        body.extend_from_slice(&[4, flags, 0, 30]);
        for f in fields {
            body.extend(s(f));
        }
        body
    }

    fn decoded(bytes: Bytes) -> Result<Packet, CodecError> {
        let len = frame_len(&bytes, 1 << 20)?.expect("complete");
        assert_eq!(len, bytes.len());
        decode(bytes)
    }

    #[test]
    fn connect_with_login_and_will() {
        // user, password, will (QoS 1), clean session.
        let body = connect_body(
            0x80 | 0x40 | 0x08 | 0x04 | 0x02,
            &["n1-ne", "nodes/n1/lost", "{}", "n1-ne", "pw"],
        );
        let Packet::Connect(c) = decoded(frame(0x10, &body)).unwrap() else {
            panic!("not a CONNECT")
        };
        assert_eq!(c.client_id, "n1-ne");
        assert_eq!(c.username.as_deref(), Some("n1-ne"));
        assert_eq!(c.password.as_deref(), Some(&b"pw"[..]));
        assert!(c.clean_session);
        assert_eq!(c.keep_alive, 30);
        let will = c.will.unwrap();
        assert_eq!(
            (will.topic.as_str(), &will.payload[..], will.qos),
            ("nodes/n1/lost", &b"{}"[..], QoS::AtLeastOnce)
        );
    }

    #[test]
    fn connect_rules() {
        // Password without user name.
        let body = connect_body(0x40 | 0x02, &["c", "pw"]);
        assert!(matches!(
            decoded(frame(0x10, &body)),
            Err(CodecError::BadConnect(_))
        ));
        // Reserved flag.
        assert!(matches!(
            decoded(frame(0x10, &connect_body(0x01, &["c"]))),
            Err(CodecError::BadConnect(_))
        ));
        // Wrong protocol name.
        let mut body = s("HTTP");
        body.extend_from_slice(&[4, 0, 0, 0]);
        body.extend(s("c"));
        assert!(matches!(
            decoded(frame(0x10, &body)),
            Err(CodecError::BadProtocol(_))
        ));
        // MQTT 5: decoded as far as the level, so the caller can answer "unacceptable protocol version".
        let mut body = s("MQTT");
        body.extend_from_slice(&[5, 2, 0, 0, 0]);
        let Packet::Connect(c) = decoded(frame(0x10, &body)).unwrap() else {
            panic!()
        };
        assert_eq!(c.level, 5);
        // Trailing garbage.
        let mut body = connect_body(0x02, &["c"]);
        body.push(0);
        assert_eq!(decoded(frame(0x10, &body)), Err(CodecError::Trailing(1)));
    }

    #[test]
    fn publish_round_trip() {
        let mut out = BytesMut::new();
        publish_packet(&mut out, "nodes/a/job", b"{\"x\":1}", QoS::AtLeastOnce, false, 7);
        let Packet::Publish(p) = decoded(out.freeze()).unwrap() else {
            panic!()
        };
        assert_eq!(
            (p.topic.as_str(), p.pkid, p.qos, &p.payload[..]),
            ("nodes/a/job", 7, QoS::AtLeastOnce, &b"{\"x\":1}"[..])
        );
    }

    #[test]
    fn publish_rules() {
        let mut body = s("a/+");
        body.extend_from_slice(&[0, 1]);
        assert!(matches!(
            decoded(frame(0x32, &body)),
            Err(CodecError::BadTopic { .. })
        ));
        // QoS 1 with packet id 0.
        let mut body = s("a/b");
        body.extend_from_slice(&[0, 0]);
        assert_eq!(decoded(frame(0x32, &body)), Err(CodecError::ZeroPacketId));
        // QoS 3.
        assert_eq!(decoded(frame(0x36, &s("a"))), Err(CodecError::BadQoS));
        // Not UTF-8.
        assert_eq!(
            decoded(frame(0x30, &[0, 2, 0xff, 0xfe])),
            Err(CodecError::BadString("topic name"))
        );
        // Topic length past the end.
        assert_eq!(
            decoded(frame(0x30, &[0, 9, b'a'])),
            Err(CodecError::Truncated("topic name"))
        );
    }

    #[test]
    fn subscribe_and_unsubscribe() {
        let mut body = vec![0, 9];
        body.extend(s("nodes/+/job"));
        body.push(1);
        body.extend(s("#"));
        body.push(2);
        assert_eq!(
            decoded(frame(0x82, &body)).unwrap(),
            Packet::Subscribe(
                9,
                vec![
                    ("nodes/+/job".into(), QoS::AtLeastOnce),
                    ("#".into(), QoS::ExactlyOnce)
                ]
            )
        );
        assert!(matches!(
            decoded(frame(0x80, &body)),
            Err(CodecError::BadFlags { .. })
        ));
        assert!(matches!(
            decoded(frame(0x82, &[0, 9])),
            Err(CodecError::FilterCount { count: 0, .. })
        ));
        let mut bad = vec![0, 9];
        bad.extend(s("a/#/b"));
        bad.push(0);
        assert!(matches!(
            decoded(frame(0x82, &bad)),
            Err(CodecError::BadTopic { .. })
        ));
        let mut body = vec![0, 3];
        body.extend(s("a/b"));
        assert_eq!(
            decoded(frame(0xa2, &body)).unwrap(),
            Packet::Unsubscribe(3, vec!["a/b".into()])
        );
    }

    #[test]
    fn frame_lengths() {
        assert_eq!(frame_len(&[0x30], 100), Ok(None));
        assert_eq!(frame_len(&[0x30, 0x80], 100), Ok(None));
        assert_eq!(frame_len(&[0x30, 0x05], 100), Ok(Some(7)));
        assert_eq!(frame_len(&[0x30, 0x80, 0x01], 1000), Ok(Some(131)));
        assert_eq!(
            frame_len(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01], 100),
            Err(CodecError::BadLength)
        );
        assert_eq!(
            frame_len(&[0x30, 0xff, 0x7f], 100),
            Err(CodecError::TooLarge {
                size: 16386,
                limit: 100
            })
        );
        let mut out = BytesMut::new();
        put_remaining_length(&mut out, 268_435_455);
        assert_eq!(&out[..], &[0xff, 0xff, 0xff, 0x7f]);
    }

    #[test]
    fn filters_match_like_the_spec() {
        assert!(matches("#", "nodes/a/job"));
        assert!(matches("nodes/#", "nodes"));
        assert!(matches("nodes/+/job", "nodes/a/job"));
        assert!(!matches("nodes/+/job", "nodes/a/b/job"));
        assert!(matches("nodes/+/net/#", "nodes/a/net/subnet"));
        assert!(!matches("nodes/+", "nodes/a/job"));
        assert!(matches("+/+", "/x"));
        assert!(!matches("#", "$SYS/x"));
        assert!(!matches("a/b", "a/b/c"));
        assert!(check_filter("a/+/b/#").is_ok());
        assert!(check_filter("a+/b").is_err());
        assert!(check_filter("a/#/").is_err());
    }

    proptest! {
        /// Whatever arrives, decoding returns a packet or an error, never a panic, and framing never claims more
        /// than the limit.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(Some(len)) = frame_len(&bytes, 150) {
                prop_assert!(len <= 150);
                if len <= bytes.len() {
                    let _ = decode(Bytes::copy_from_slice(&bytes[..len]));
                }
            }
        }

        /// Well-formed publishes survive an encode/decode round trip.
        #[test]
        fn publish_encoding_round_trips(topic in "[a-z0-9/]{1,40}", payload in proptest::collection::vec(any::<u8>(), 0..300), qos in 0u8..2, pkid in 1u16..) {
            let qos = QoS::from_bits(qos).unwrap();
            let mut out = BytesMut::new();
            publish_packet(&mut out, &topic, &payload, qos, false, pkid);
            let Packet::Publish(p) = decoded(out.freeze()).unwrap() else { panic!() };
            prop_assert_eq!(p.topic, topic);
            prop_assert_eq!(&p.payload[..], &payload[..]);
            prop_assert_eq!(p.qos, qos);
        }
    }
}
