//! The NetManager local API bodies: any bytes decode or fail, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use oakestra_protocol::api::netmanager;

fuzz_target!(|data: &[u8]| {
    let _ = serde_json::from_slice::<netmanager::RegisterRequest>(data);
    let _ = serde_json::from_slice::<netmanager::ContainerDeployRequest>(data);
    let _ = serde_json::from_slice::<netmanager::ContainerDeployResponse>(data);
    let _ = serde_json::from_slice::<netmanager::UndeployRequest>(data);
});
