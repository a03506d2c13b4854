//! The MQTT payload decoders, worker ⇄ cluster and NetManager ⇄ cluster: any bytes decode or fail, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use oakestra_protocol::mqtt::{net, worker};

fuzz_target!(|data: &[u8]| {
    if let Ok(info) = serde_json::from_slice::<worker::NodeInformation>(data) {
        let _ = info.cluster_patch();
    }
    let _ = serde_json::from_slice::<worker::ResourcesReport>(data);
    let _ = serde_json::from_slice::<worker::JobStatusReport>(data);
    let _ = serde_json::from_slice::<worker::DeleteCommand>(data);
    if let Ok(serde_json::Value::Object(doc)) = serde_json::from_slice(data) {
        let _ = worker::DeployCommand::from_job_document(doc, 0);
    }
    let _ = serde_json::from_slice::<net::SubnetRequest>(data);
    let _ = serde_json::from_slice::<net::SubnetResult>(data);
    let _ = serde_json::from_slice::<net::TableQueryRequest>(data);
    let _ = serde_json::from_slice::<net::TableQueryResult>(data);
    let _ = serde_json::from_slice::<net::ServiceDeployed>(data);
    let _ = serde_json::from_slice::<net::AddressChanged>(data);
    let _ = serde_json::from_slice::<net::InterestRemove>(data);
    let _ = serde_json::from_slice::<net::UpdatesAvailable>(data);
});
