//! The opt-in Prometheus metrics of the NetManager (`--metrics-listen`): packets, bytes and drops per dataplane
//! path (the TUN proxy and the eBPF fast path), what the fast path hands to the slow path, flows, MQTT and the
//! process, read at each scrape from the counters the dataplane keeps anyway.

use oakestra_runtime::metrics::{
    Mirror, MqttCounters, MqttMetrics, PathDirectionLabel, PathLabel, ProcessMetrics, ReasonLabel,
    prometheus_client::{
        metrics::{family::Family, gauge::Gauge},
        registry::Registry,
    },
    render,
};

use crate::fastpath::FastPathStats;

/// The TUN proxy's totals.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProxyTotals {
    /// Packets read from the TUN (containers → overlay).
    pub tun_rx: u64,
    /// Their bytes.
    pub tun_rx_bytes: u64,
    /// Datagrams from peers (overlay → containers).
    pub udp_rx: u64,
    /// Their payload bytes.
    pub udp_rx_bytes: u64,
    /// Packets written to the TUN.
    pub tun_tx: u64,
    /// Datagrams sent to peers.
    pub udp_tx: u64,
    /// Packets dropped.
    pub dropped: u64,
    /// Flows created.
    pub flows_created: u64,
    /// Flows in the connection table now.
    pub flows: u64,
}

/// One reading of everything exposed.
#[derive(Debug, Clone, Default)]
pub struct Traffic {
    /// The TUN proxy.
    pub proxy: ProxyTotals,
    /// The eBPF fast path, when it runs.
    pub fast: Option<FastPathStats>,
    /// Instances attached to the overlay on this worker.
    pub instances: u64,
    /// Whether the MQTT session is up.
    pub mqtt_connected: bool,
    /// The session's connection and message counts.
    pub mqtt: std::sync::Arc<MqttCounters>,
}

/// The registry and its metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    packets: Mirror<PathDirectionLabel>,
    bytes: Mirror<PathDirectionLabel>,
    dropped: Mirror<PathLabel>,
    slow_path: Mirror<ReasonLabel>,
    flows: Family<PathLabel, Gauge>,
    flows_created: Mirror<PathLabel>,
    instances: Gauge,
    registered: Gauge,
    mqtt: MqttMetrics,
    process: std::sync::Arc<ProcessMetrics>,
}

fn label(path: &str) -> PathLabel {
    PathLabel { path: path.into() }
}

fn path_direction(path: &str, direction: &str) -> PathDirectionLabel {
    PathDirectionLabel {
        path: path.into(),
        direction: direction.into(),
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Every metric, registered.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let process = ProcessMetrics::register(&mut registry);
        let packets = Mirror::default();
        packets.register(
            &mut registry,
            "oakestra_netmanager_packets",
            "Packets carried, by dataplane path (proxy, fastpath) and direction (egress: from local containers; ingress: from peers)",
        );
        let bytes = Mirror::default();
        bytes.register(
            &mut registry,
            "oakestra_netmanager_bytes",
            "Bytes carried, by dataplane path and direction (the proxy counts what it read: egress from the TUN, ingress from the tunnel)",
        );
        let dropped = Mirror::default();
        dropped.register(
            &mut registry,
            "oakestra_netmanager_dropped_packets",
            "Packets dropped, by dataplane path",
        );
        let slow_path = Mirror::default();
        slow_path.register(
            &mut registry,
            "oakestra_netmanager_fastpath_slow_path_packets",
            "Packets the eBPF fast path left to the TUN proxy, by reason (miss_egress, miss_ingress: flow unknown; pass_egress, pass_ingress: not handled in the kernel)",
        );
        let flows = Family::<PathLabel, Gauge>::default();
        registry.register(
            "oakestra_netmanager_flows",
            "Flows in each dataplane's table now (proxy: connection table; fastpath: BPF flow map entries, one per direction)",
            flows.clone(),
        );
        let flows_created = Mirror::default();
        flows_created.register(
            &mut registry,
            "oakestra_netmanager_flows_created",
            "Flows the TUN proxy decided (each then runs in the fast path when it is on)",
        );
        let gauge = |registry: &mut Registry, name: &str, help: &str| {
            let g = Gauge::default();
            registry.register(name, help, g.clone());
            g
        };
        let instances = gauge(
            &mut registry,
            "oakestra_netmanager_instances",
            "Instances attached to the overlay on this worker",
        );
        let registered = gauge(
            &mut registry,
            "oakestra_netmanager_registered",
            "1 once the NodeEngine registered this NetManager and it joined the cluster",
        );
        let mqtt = MqttMetrics::register(&mut registry, "oakestra_netmanager");
        Self {
            registry,
            packets,
            bytes,
            dropped,
            slow_path,
            flows,
            flows_created,
            instances,
            registered,
            mqtt,
            process,
        }
    }

    /// Takes a reading and renders the exposition.
    pub fn render(&self, traffic: Option<&Traffic>) -> String {
        self.process.update();
        let t = traffic.cloned().unwrap_or_default();
        self.registered.set(i64::from(traffic.is_some()));
        let p = t.proxy;
        let f = t.fast.clone().unwrap_or_default();
        for (path, direction, packets, bytes) in [
            ("proxy", "egress", p.tun_rx, p.tun_rx_bytes),
            ("proxy", "ingress", p.udp_rx, p.udp_rx_bytes),
            (
                "fastpath",
                "egress",
                f.egress_local.packets + f.egress_encap.packets,
                f.egress_local.bytes + f.egress_encap.bytes,
            ),
            (
                "fastpath",
                "ingress",
                f.ingress_decap.packets,
                f.ingress_decap.bytes,
            ),
        ] {
            let l = path_direction(path, direction);
            self.packets.observe(&l, packets);
            self.bytes.observe(&l, bytes);
        }
        self.dropped.observe(&label("proxy"), p.dropped);
        self.dropped.observe(&label("fastpath"), f.errors.packets);
        for (reason, count) in [
            ("miss_egress", f.slow_egress_miss.packets),
            ("miss_ingress", f.slow_ingress_miss.packets),
            ("pass_egress", f.slow_egress_pass.packets),
            ("pass_ingress", f.slow_ingress_pass.packets),
        ] {
            self.slow_path.observe(
                &ReasonLabel {
                    reason: reason.into(),
                },
                count,
            );
        }
        let gauge = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.flows.get_or_create(&label("proxy")).set(gauge(p.flows));
        self.flows.get_or_create(&label("fastpath")).set(gauge(f.flows));
        self.flows_created.observe(&label("proxy"), p.flows_created);
        self.instances.set(gauge(t.instances));
        self.mqtt.observe(t.mqtt_connected, &t.mqtt);
        render(&self.registry)
    }
}

#[cfg(test)]
mod tests {
    use oakestra_runtime::metrics::sample;

    use super::*;
    use crate::fastpath::Count;

    #[test]
    fn every_series_is_there_before_registration_and_follows_the_counters() {
        let m = Metrics::new();
        let text = m.render(None);
        for series in [
            "oakestra_netmanager_packets_total{path=\"proxy\",direction=\"egress\"}",
            "oakestra_netmanager_packets_total{path=\"fastpath\",direction=\"ingress\"}",
            "oakestra_netmanager_bytes_total{path=\"proxy\",direction=\"ingress\"}",
            "oakestra_netmanager_dropped_packets_total{path=\"fastpath\"}",
            "oakestra_netmanager_fastpath_slow_path_packets_total{reason=\"miss_egress\"}",
            "oakestra_netmanager_flows{path=\"proxy\"}",
            "oakestra_netmanager_flows_created_total{path=\"proxy\"}",
            "oakestra_netmanager_registered",
            "oakestra_netmanager_mqtt_reconnects_total",
            "oakestra_netmanager_mqtt_messages_total{direction=\"out\"}",
        ] {
            assert_eq!(sample(&text, series), Some(0.0), "{series} in\n{text}");
        }
        assert!(sample(&text, "process_resident_memory_bytes").is_some_and(|v| v > 0.0));

        let traffic = Traffic {
            proxy: ProxyTotals {
                tun_rx: 10,
                tun_rx_bytes: 1000,
                udp_rx: 4,
                dropped: 1,
                flows: 2,
                flows_created: 3,
                ..ProxyTotals::default()
            },
            fast: Some(FastPathStats {
                flows: 6,
                egress_local: Count {
                    packets: 5,
                    bytes: 500,
                },
                egress_encap: Count {
                    packets: 7,
                    bytes: 700,
                },
                slow_egress_miss: Count {
                    packets: 2,
                    bytes: 100,
                },
                ..FastPathStats::default()
            }),
            instances: 2,
            mqtt_connected: true,
            mqtt: {
                let mqtt = std::sync::Arc::new(MqttCounters::default());
                for _ in 0..3 {
                    mqtt.connected();
                }
                for _ in 0..8 {
                    mqtt.message_in();
                }
                mqtt
            },
        };
        let text = m.render(Some(&traffic));
        for (series, value) in [
            (
                "oakestra_netmanager_packets_total{path=\"proxy\",direction=\"egress\"}",
                10.0,
            ),
            (
                "oakestra_netmanager_bytes_total{path=\"proxy\",direction=\"egress\"}",
                1000.0,
            ),
            (
                "oakestra_netmanager_packets_total{path=\"fastpath\",direction=\"egress\"}",
                12.0,
            ),
            (
                "oakestra_netmanager_bytes_total{path=\"fastpath\",direction=\"egress\"}",
                1200.0,
            ),
            ("oakestra_netmanager_dropped_packets_total{path=\"proxy\"}", 1.0),
            (
                "oakestra_netmanager_fastpath_slow_path_packets_total{reason=\"miss_egress\"}",
                2.0,
            ),
            ("oakestra_netmanager_flows{path=\"fastpath\"}", 6.0),
            ("oakestra_netmanager_flows_created_total{path=\"proxy\"}", 3.0),
            ("oakestra_netmanager_instances", 2.0),
            ("oakestra_netmanager_registered", 1.0),
            ("oakestra_netmanager_mqtt_connected", 1.0),
            ("oakestra_netmanager_mqtt_reconnects_total", 2.0),
            ("oakestra_netmanager_mqtt_messages_total{direction=\"in\"}", 8.0),
        ] {
            assert_eq!(sample(&text, series), Some(value), "{series} in\n{text}");
        }
    }
}
