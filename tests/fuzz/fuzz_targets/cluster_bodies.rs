//! The cluster-facing HTTP bodies: worker registrations (bounded: what passes is within every limit and passes
//! again), root's calls to the cluster, and the bodies a cluster sends root (type checks). Never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use oakestra_protocol::api::{cluster, federation, shape};

fuzz_target!(|data: &[u8]| {
    if let Ok(registration) = serde_json::from_slice::<cluster::NodeRegistration>(data)
        && let Ok(kept) = registration.bounded()
    {
        assert!(kept.extra.is_empty());
        assert!((1..=cluster::MAX_HOST_LEN).contains(&kept.host.len()));
        assert_eq!(kept.bounded().as_ref(), Ok(&kept), "bounding is idempotent");
    }
    let _ = serde_json::from_slice::<federation::JobUpdate>(data);
    if let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) {
        let _ = shape::cluster_registration(&value);
        let _ = shape::deploy_result(&value);
        let _ = shape::net_deploy_status(&value);
        let _ = shape::cluster_report(&value);
    }
});
