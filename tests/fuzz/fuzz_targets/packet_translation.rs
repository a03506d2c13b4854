//! The NetManager's packet parsing and address translation: any bytes parse or fail, never panic; a parsed packet
//! rewritten to other addresses of its family parses again with those addresses.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use libfuzzer_sys::fuzz_target;
use oakestra_netmanager::packet;

fuzz_target!(|data: &[u8]| {
    let Ok(h) = packet::parse(data) else { return };
    let _ = packet::flow_key(&h);
    let (src, dst) = match h.src {
        IpAddr::V4(_) => (IpAddr::V4(Ipv4Addr::new(10, 30, 0, 7)), IpAddr::V4(Ipv4Addr::new(10, 18, 0, 66))),
        IpAddr::V6(_) => (
            IpAddr::V6(Ipv6Addr::new(0xfdff, 0x2000, 0, 0, 0, 0, 0, 7)),
            IpAddr::V6(Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 0x102)),
        ),
    };
    let mut buf = data.to_vec();
    if packet::rewrite(&mut buf, &h, src, dst).is_ok() {
        let again = packet::parse(&buf).expect("a rewritten packet parses");
        assert_eq!((again.src, again.dst), (src, dst));
    }
    let mut buf = data.to_vec();
    let _ = packet::complete_partial_checksum(&mut buf, &h);
    let _ = packet::segment_tcp(data, &h, 1280, |segment| {
        assert!(segment.len() <= 1280, "a segment beyond the MTU");
    });
});
