//! SLA validation and address allocation: what root-service does per request. Prints one line per case.

#![allow(clippy::print_stdout, reason = "a benchmark reports on stdout")]

use oakestra_benches::time_ns;
use oakestra_protocol::{
    addr::{BalancingPolicy, InstanceIpv6Pool, PolicyIpv6Pool, ServiceIpv4Pool},
    sla,
};

fn main() {
    let seed = include_str!("../../protocol/tests/fixtures/seed-clientsrvr.json");
    let ns = time_ns(20_000, || {
        sla::parse_sla(seed).map(|v| v.value.applications.len())
    });
    println!("sla: parse+validate the seed clientsrvr SLA (2 services)   {ns:>10.0} ns");

    let services: Vec<serde_json::Value> = (0..100)
        .map(|i| {
            serde_json::json!({"microservice_name": format!("svc{i}"), "microservice_namespace": "test",
                "virtualization": "container", "code": "docker.io/library/nginx:latest", "memory": 100,
                "vcpus": 1, "port": "80:80/tcp", "addresses": {"rr_ip": format!("10.30.{}.{}", i / 200, i % 200 + 1)}})
        })
        .collect();
    let big = serde_json::json!({"microservices": services}).to_string();
    let ns = time_ns(500, || {
        sla::parse_services(&big).map(|v| v.value.microservices.len())
    });
    println!("sla: parse+validate a 100-service dashboard descriptor      {ns:>10.0} ns");

    // Fill a fresh pool of 65,534 addresses; the cost per allocation includes skipping the used run at the cursor.
    let capacity = ServiceIpv4Pool::new().capacity();
    let mut filled = 0u32;
    let start = std::time::Instant::now();
    let mut pool = ServiceIpv4Pool::new();
    while pool.allocate().is_ok() {
        filled += 1;
    }
    let ns = start.elapsed().as_secs_f64() * 1e9 / f64::from(filled.max(1));
    println!("addr: fill the service IPv4 pool ({filled} of {capacity})           {ns:>10.0} ns/address");
    let ns = time_ns(100_000, || pool.allocate().is_err());
    println!("addr: allocate from the full pool (exhausted error)         {ns:>10.0} ns");
    // Churn: free one address and allocate again, the steady state of a busy root.
    let mut k = 0u32;
    let ns = time_ns(20_000, || {
        k = (k + 7919) % filled;
        let a = std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(10, 30, 0, 1)) + k);
        (pool.free(a).is_ok(), pool.allocate().ok())
    });
    println!("addr: free one + allocate one in the full pool              {ns:>10.0} ns");

    let mut v6 = InstanceIpv6Pool::new();
    let mut rr = PolicyIpv6Pool::new(BalancingPolicy::ROUND_ROBIN);
    let ns = time_ns(100_000, || (v6.allocate().ok(), rr.allocate().ok()));
    println!("addr: allocate an instance + a round-robin IPv6 address     {ns:>10.0} ns");
}
