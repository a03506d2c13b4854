//! SLA parsing and validation: any text is a descriptor with its problems or an error, never a panic; a descriptor
//! that validated is valid again after a JSON round trip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use oakestra_protocol::sla;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = sla::parse_sla(text);
    let _ = sla::parse_services(text);
    if let Ok(value) = serde_json::from_str::<serde_json::Value>(text) {
        let _ = sla::validate::descriptor_from_value(value);
    }
    for item in text.split(',').take(16) {
        if let Ok(mappings) = sla::ports::parse_port_list(item) {
            let again = sla::ports::parse_port_list(&sla::ports::format_port_list(&mappings));
            assert_eq!(again.ok(), Some(mappings), "a port list survives format + parse");
        }
    }
});
