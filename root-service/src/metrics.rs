//! root-service's Prometheus metrics (`GET /metrics`, bearer token `<data-dir>/metrics.token` or `--metrics-token`):
//! instances by status and clusters by liveness (counted at each scrape), scheduling decisions and their latency,
//! scheduler-plugin delegations and fallbacks, and the process's own resource use.

use std::sync::Arc;

pub use oakestra_runtime::metrics::{OutcomeLabel, SlotLabel, StateLabel, StatusLabel};
use oakestra_runtime::metrics::{
    ProcessMetrics,
    prometheus_client::{
        metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
        registry::Registry,
    },
    set_counts,
};

/// Every metric root exposes.
#[derive(Debug)]
pub struct RootMetrics {
    registry: Registry,
    process: Arc<ProcessMetrics>,
    /// Instances by status (set at each scrape).
    pub instances: Family<StatusLabel, Gauge>,
    /// Clusters by liveness (set at each scrape).
    pub clusters: Family<StateLabel, Gauge>,
    /// Scheduling decisions by outcome.
    pub decisions: Family<OutcomeLabel, Counter>,
    /// Seconds one scheduling decision took (including a scheduler plugin's round trip).
    pub decision_seconds: Histogram,
    /// Placements decided by a plugin, by slot (set at each scrape).
    pub plugin_delegated: Family<SlotLabel, Gauge>,
    /// Placements the built-in scheduler made because a plugin could not be used, by slot (set at each scrape).
    pub plugin_fallbacks: Family<SlotLabel, Gauge>,
}

impl Default for RootMetrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let process = ProcessMetrics::register(&mut registry);
        let me = Self {
            instances: Family::default(),
            clusters: Family::default(),
            decisions: Family::default(),
            decision_seconds: Histogram::new([
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.5,
            ]),
            plugin_delegated: Family::default(),
            plugin_fallbacks: Family::default(),
            process,
            registry: Registry::default(),
        };
        registry.register(
            "oakestra_root_instances",
            "Instances by status",
            me.instances.clone(),
        );
        registry.register(
            "oakestra_root_clusters",
            "Registered clusters by liveness",
            me.clusters.clone(),
        );
        registry.register(
            "oakestra_root_scheduling_decisions",
            "Scheduling decisions by outcome",
            me.decisions.clone(),
        );
        registry.register(
            "oakestra_root_scheduling_decision_seconds",
            "Time one scheduling decision took",
            me.decision_seconds.clone(),
        );
        registry.register(
            "oakestra_root_plugin_placements",
            "Placements a scheduler plugin decided, by slot",
            me.plugin_delegated.clone(),
        );
        registry.register(
            "oakestra_root_plugin_fallbacks",
            "Placements the built-in scheduler made because the plugin could not be used, by slot",
            me.plugin_fallbacks.clone(),
        );
        Self { registry, ..me }
    }
}

impl RootMetrics {
    /// Counts one scheduling decision.
    pub fn decided(&self, placed: bool, seconds: f64) {
        self.decisions.get_or_create(&OutcomeLabel::of(placed)).inc();
        self.decision_seconds.observe(seconds);
    }

    /// Sets the instance gauges from `(status, count)` rows, dropping statuses no instance has any more.
    pub fn set_instances(&self, rows: &[(String, i64)]) {
        let rows = rows.iter().map(|(status, n)| {
            let labels = StatusLabel {
                status: status.clone(),
            };
            (labels, usize::try_from(*n).unwrap_or(0))
        });
        set_counts(&self.instances, rows);
    }

    /// Sets the cluster gauges.
    pub fn set_clusters(&self, active: usize, inactive: usize) {
        let state = |s: &str| StateLabel { state: s.into() };
        set_counts(
            &self.clusters,
            [(state("active"), active), (state("inactive"), inactive)],
        );
    }

    /// The exposition text, with the process metrics read now.
    pub fn render(&self) -> String {
        self.process.update();
        oakestra_runtime::metrics::render(&self.registry)
    }
}
