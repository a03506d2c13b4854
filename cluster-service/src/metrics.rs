//! cluster-service's Prometheus metrics (`GET /metrics`, bearer token `<data-dir>/metrics.token` or
//! `--metrics-token`): workers by liveness and instances by status (counted at each scrape), placement decisions,
//! MQTT messages in and out, the cluster's own reconnects to an external broker, the embedded broker's connections
//! and logins, and the process's own resource use.

use std::sync::Arc;

pub use oakestra_runtime::metrics::{DirectionLabel, OutcomeLabel, StateLabel, StatusLabel};
use oakestra_runtime::metrics::{
    MirrorCounter, MqttCounters, ProcessMetrics,
    prometheus_client::{
        metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
        registry::Registry,
    },
};

/// Every metric the cluster exposes.
#[derive(Debug)]
pub struct ClusterMetrics {
    registry: Registry,
    process: Arc<ProcessMetrics>,
    /// Instances by status (set at each scrape).
    pub instances: Family<StatusLabel, Gauge>,
    /// Workers by liveness (set at each scrape).
    pub workers: Family<StateLabel, Gauge>,
    /// Placement decisions by outcome.
    pub decisions: Family<OutcomeLabel, Counter>,
    /// MQTT messages the cluster handled (`in`) and sent (`out`).
    pub mqtt_messages: Family<DirectionLabel, Counter>,
    /// Connections to the embedded broker (set at each scrape; 0 with an external broker).
    pub broker_connections: Gauge,
    /// Seconds from sending an instance to its worker to the first sign of it running.
    pub deploy_seconds: Histogram,
    /// The cluster's own MQTT client (to an external broker; the embedded one is in-process and never drops).
    pub mqtt: Arc<MqttCounters>,
    mqtt_reconnects: MirrorCounter,
    broker_logins: MirrorCounter,
}

impl Default for ClusterMetrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let process = ProcessMetrics::register(&mut registry);
        let me = Self {
            registry: Registry::default(),
            process,
            instances: Family::default(),
            workers: Family::default(),
            decisions: Family::default(),
            mqtt_messages: Family::default(),
            broker_connections: Gauge::default(),
            deploy_seconds: Histogram::new([0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0]),
            mqtt: Arc::default(),
            mqtt_reconnects: MirrorCounter::default(),
            broker_logins: MirrorCounter::default(),
        };
        me.mqtt_reconnects.register(
            &mut registry,
            "oakestra_cluster_mqtt_reconnects",
            "Reconnects of the cluster's MQTT client to an external broker",
        );
        me.broker_logins.register(
            &mut registry,
            "oakestra_cluster_broker_logins",
            "Logins the embedded broker accepted (worker connects, reconnects included)",
        );
        registry.register(
            "oakestra_cluster_instances",
            "Instances by status",
            me.instances.clone(),
        );
        registry.register(
            "oakestra_cluster_workers",
            "Workers by liveness",
            me.workers.clone(),
        );
        registry.register(
            "oakestra_cluster_placement_decisions",
            "Placement decisions by outcome",
            me.decisions.clone(),
        );
        registry.register(
            "oakestra_cluster_mqtt_messages",
            "MQTT messages handled (in) and sent (out)",
            me.mqtt_messages.clone(),
        );
        registry.register(
            "oakestra_cluster_deploy_seconds",
            "Time from sending an instance to its worker to its first sign of running",
            me.deploy_seconds.clone(),
        );
        registry.register(
            "oakestra_cluster_broker_connections",
            "Connections to the embedded broker",
            me.broker_connections.clone(),
        );
        Self { registry, ..me }
    }
}

impl ClusterMetrics {
    /// Counts a placement decision.
    pub fn decided(&self, placed: bool) {
        self.decisions.get_or_create(&OutcomeLabel::of(placed)).inc();
    }

    /// Counts an MQTT message.
    pub fn message(&self, inbound: bool) {
        let direction = if inbound { "in" } else { "out" };
        self.mqtt_messages
            .get_or_create(&DirectionLabel {
                direction: direction.into(),
            })
            .inc();
    }

    /// The exposition text, with the process metrics and the broker's logins (`None` with an external broker)
    /// read now.
    pub fn render(&self, broker_logins: Option<u64>) -> String {
        self.process.update();
        self.mqtt_reconnects.observe(self.mqtt.reconnects());
        self.broker_logins.observe(broker_logins.unwrap_or(0));
        oakestra_runtime::metrics::render(&self.registry)
    }
}
