//! The NodeEngine's Prometheus metrics, served on the opt-in `--metrics-listen` port: instances on this worker,
//! deploys with their outcome and latency, status reports sent, the MQTT session (messages, reconnects), the
//! node's load as last reported, and the process itself.

use std::sync::Arc;

use oakestra_runtime::metrics::{
    MqttCounters, MqttMetrics, OutcomeLabel, PhaseLabel, ProcessMetrics, StatusLabel,
    prometheus_client::{
        metrics::{
            counter::Counter,
            family::Family,
            gauge::Gauge,
            histogram::{Histogram, exponential_buckets},
        },
        registry::Registry,
    },
    render,
};

/// Every metric of the NodeEngine.
#[derive(Debug)]
pub struct Telemetry {
    registry: Registry,
    instances: Family<PhaseLabel, Gauge>,
    deploys: Family<OutcomeLabel, Counter>,
    deploy_seconds: Histogram,
    status_reports: Family<StatusLabel, Counter>,
    mqtt: Arc<MqttCounters>,
    mqtt_metrics: MqttMetrics,
    node_cpu: Gauge<f64, std::sync::atomic::AtomicU64>,
    node_memory: Gauge<f64, std::sync::atomic::AtomicU64>,
    process: Arc<ProcessMetrics>,
}

impl Default for Telemetry {
    fn default() -> Self {
        Self::new()
    }
}

impl Telemetry {
    /// Every metric, registered.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let process = ProcessMetrics::register(&mut registry);
        let instances = Family::<PhaseLabel, Gauge>::default();
        registry.register(
            "oakestra_worker_instances",
            "Instances on this worker, by phase (deploying: image, overlay and task being set up; running)",
            instances.clone(),
        );
        let deploys = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "oakestra_worker_deploys",
            "Deploy commands handled, by outcome (started, failed)",
            deploys.clone(),
        );
        // 50 ms .. ~100 s: a cached image starts in well under a second, a pull over a slow link takes minutes.
        let deploy_seconds = Histogram::new(exponential_buckets(0.05, 2.0, 12));
        registry.register(
            "oakestra_worker_deploy_seconds",
            "Time from a deploy command to the instance's task running (image pull, overlay attach and start)",
            deploy_seconds.clone(),
        );
        let status_reports = Family::<StatusLabel, Counter>::default();
        registry.register(
            "oakestra_worker_status_reports",
            "Instance status reports sent to the cluster, by status",
            status_reports.clone(),
        );
        let mqtt_metrics = MqttMetrics::register(&mut registry, "oakestra_worker");
        let node_cpu = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "oakestra_worker_node_cpu_percent",
            "The node's CPU use in percent, as last reported to the cluster",
            node_cpu.clone(),
        );
        let node_memory = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "oakestra_worker_node_memory_percent",
            "The node's memory use in percent, as last reported to the cluster",
            node_memory.clone(),
        );
        Self {
            registry,
            instances,
            deploys,
            deploy_seconds,
            status_reports,
            mqtt: Arc::default(),
            mqtt_metrics,
            node_cpu,
            node_memory,
            process,
        }
    }

    /// The counters the MQTT session bumps (they live as long as the agent, across sessions).
    pub fn mqtt(&self) -> Arc<MqttCounters> {
        Arc::clone(&self.mqtt)
    }

    /// A deploy command ended: its task runs (`Some(seconds)` since the command) or it failed (`None`).
    pub fn deploy_done(&self, started_after: Option<f64>) {
        let outcome = if started_after.is_some() {
            "started"
        } else {
            "failed"
        };
        self.deploys
            .get_or_create(&OutcomeLabel {
                outcome: outcome.into(),
            })
            .inc();
        if let Some(seconds) = started_after {
            self.deploy_seconds.observe(seconds);
        }
    }

    /// A status report was sent.
    pub fn status_reported(&self, status: &str) {
        self.status_reports
            .get_or_create(&StatusLabel {
                status: status.into(),
            })
            .inc();
    }

    /// The node's load as just reported.
    pub fn node_load(&self, cpu_percent: f64, memory_percent: f64) {
        self.node_cpu.set(cpu_percent);
        self.node_memory.set(memory_percent);
    }

    /// Takes a reading and renders the exposition: `deploying` and `running` instances now, and whether the MQTT
    /// session is up.
    pub fn render(&self, deploying: usize, running: usize, mqtt_connected: bool) -> String {
        self.process.update();
        for (phase, n) in [("deploying", deploying), ("running", running)] {
            self.instances
                .get_or_create(&PhaseLabel { phase: phase.into() })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        for outcome in ["started", "failed"] {
            // Touch both series so a scrape shows them before the first deploy.
            self.deploys
                .get_or_create(&OutcomeLabel {
                    outcome: outcome.into(),
                })
                .inc_by(0);
        }
        self.mqtt_metrics.observe(mqtt_connected, &self.mqtt);
        render(&self.registry)
    }
}

#[cfg(test)]
mod tests {
    use oakestra_runtime::metrics::sample;

    use super::*;

    #[test]
    fn every_series_is_there_from_the_start_and_follows_the_agent() {
        let t = Telemetry::new();
        let text = t.render(0, 0, false);
        for series in [
            "oakestra_worker_instances{phase=\"running\"}",
            "oakestra_worker_deploys_total{outcome=\"failed\"}",
            "oakestra_worker_deploy_seconds_count",
            "oakestra_worker_mqtt_connected",
            "oakestra_worker_mqtt_reconnects_total",
            "oakestra_worker_mqtt_messages_total{direction=\"in\"}",
            "oakestra_worker_node_cpu_percent",
        ] {
            assert_eq!(sample(&text, series), Some(0.0), "{series} in\n{text}");
        }
        t.deploy_done(Some(0.3));
        t.deploy_done(None);
        t.status_reported("RUNNING");
        t.node_load(12.5, 40.0);
        let mqtt = t.mqtt();
        mqtt.connected();
        mqtt.connected();
        mqtt.message_in();
        let text = t.render(1, 2, true);
        for (series, value) in [
            ("oakestra_worker_instances{phase=\"deploying\"}", 1.0),
            ("oakestra_worker_instances{phase=\"running\"}", 2.0),
            ("oakestra_worker_deploys_total{outcome=\"started\"}", 1.0),
            ("oakestra_worker_deploys_total{outcome=\"failed\"}", 1.0),
            ("oakestra_worker_deploy_seconds_count", 1.0),
            ("oakestra_worker_deploy_seconds_bucket{le=\"0.4\"}", 1.0),
            ("oakestra_worker_status_reports_total{status=\"RUNNING\"}", 1.0),
            ("oakestra_worker_mqtt_connected", 1.0),
            ("oakestra_worker_mqtt_connections_total", 2.0),
            ("oakestra_worker_mqtt_reconnects_total", 1.0),
            ("oakestra_worker_mqtt_messages_total{direction=\"in\"}", 1.0),
            ("oakestra_worker_node_cpu_percent", 12.5),
            ("oakestra_worker_node_memory_percent", 40.0),
        ] {
            assert_eq!(sample(&text, series), Some(value), "{series} in\n{text}");
        }
    }
}
