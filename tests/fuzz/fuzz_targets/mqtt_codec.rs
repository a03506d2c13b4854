//! The embedded broker's MQTT framing and decoding: never a panic, never a frame beyond the limit, and a decoded
//! PUBLISH re-encodes to the same topic and payload.
#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use oakestra_cluster_service::broker::codec::{self, Packet};

const LIMIT: usize = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok(Some(len)) = codec::frame_len(rest, LIMIT) {
        assert!(len <= LIMIT);
        if len > rest.len() {
            return;
        }
        let frame = Bytes::copy_from_slice(&rest[..len]);
        rest = &rest[len..];
        if let Ok(Packet::Publish(p)) = codec::decode(frame) {
            let mut out = BytesMut::new();
            codec::publish_packet(&mut out, &p.topic, &p.payload, p.qos.min(codec::QoS::AtLeastOnce), p.retain, p.pkid.max(1));
            let Ok(Packet::Publish(again)) = codec::decode(out.freeze()) else {
                panic!("a re-encoded PUBLISH does not decode");
            };
            assert_eq!((again.topic, again.payload), (p.topic, p.payload));
        }
    }
});
