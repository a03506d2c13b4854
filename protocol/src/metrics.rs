//! Prometheus metrics every daemon shares (feature `metrics`): the process collector (resident memory, CPU time,
//! threads, open files, read from `/proc/self` at each scrape) and the text exposition of a registry.

use std::sync::{Mutex, PoisonError, atomic::AtomicU64};

pub use prometheus_client;
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, gauge::Gauge},
    registry::Registry,
};

/// A label set with one `status` label (an instance status as Oakestra spells it).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    /// The status.
    pub status: String,
}

/// A label set with one `state` label (`active`/`inactive`, `alive`/`dead`).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    /// The state.
    pub state: String,
}

/// A label set with one `outcome` label (`placed` or `refused`).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    /// The outcome.
    pub outcome: String,
}

/// A label set with one `slot` label (a plugin slot's name).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SlotLabel {
    /// The slot.
    pub slot: String,
}

/// A label set with one `direction` label (`in` or `out`).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabel {
    /// The direction.
    pub direction: String,
}

/// The value of sample `series` (its name with its labels, exactly as exposed) in an exposition `text`, if present.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .split(' ')
            .next()?
            .parse()
            .ok()
    })
}

/// The content type of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Linux reports CPU times in /proc in USER_HZ, which is 100 on every architecture it exposes to user space.
const USER_HZ: f64 = 100.0;

/// The process's own resource use.
#[derive(Debug, Default)]
pub struct ProcessMetrics {
    rss: Gauge,
    cpu: Counter<f64, AtomicU64>,
    threads: Gauge,
    fds: Gauge,
    /// CPU seconds already counted.
    counted: Mutex<f64>,
}

/// One reading of `/proc/self`.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ProcessSample {
    /// Resident memory in bytes.
    pub rss_bytes: u64,
    /// User + system CPU time in seconds.
    pub cpu_seconds: f64,
    /// Threads.
    pub threads: u64,
    /// Open file descriptors.
    pub open_fds: u64,
}

/// Reads `/proc/self/status`, `/proc/self/stat` and `/proc/self/fd`; missing pieces read as 0.
pub fn process_sample() -> ProcessSample {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // The command name may hold spaces and parentheses: the fields start after the last ')'.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the state field.
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    #[allow(
        clippy::cast_precision_loss,
        reason = "CPU seconds as a float, as Prometheus wants them"
    )]
    let cpu_seconds = (ticks(11) + ticks(12)) as f64 / USER_HZ;
    ProcessSample {
        rss_bytes: field("VmRSS:").saturating_mul(1024),
        cpu_seconds,
        threads: field("Threads:"),
        open_fds: std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64),
    }
}

impl ProcessMetrics {
    /// Registers the `process_*` metrics in `registry`.
    pub fn register(registry: &mut Registry) -> std::sync::Arc<Self> {
        let me = std::sync::Arc::new(Self::default());
        registry.register("process_resident_memory_bytes", "Resident memory", me.rss.clone());
        registry.register("process_cpu_seconds", "User and system CPU time", me.cpu.clone());
        registry.register("process_threads", "Threads", me.threads.clone());
        registry.register("process_open_fds", "Open file descriptors", me.fds.clone());
        me
    }

    /// Takes a new reading (call before encoding).
    pub fn update(&self) {
        let s = process_sample();
        let gauge = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.rss.set(gauge(s.rss_bytes));
        self.threads.set(gauge(s.threads));
        self.fds.set(gauge(s.open_fds));
        let mut counted = self.counted.lock().unwrap_or_else(PoisonError::into_inner);
        if s.cpu_seconds > *counted {
            self.cpu.inc_by(s.cpu_seconds - *counted);
            *counted = s.cpu_seconds;
        }
    }
}

/// The registry in the text exposition format.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, registry);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_process_reads_itself() {
        let s = process_sample();
        assert!(s.rss_bytes > 1024 * 1024, "{s:?}");
        assert!(s.threads >= 1 && s.open_fds >= 3, "{s:?}");
        let mut registry = Registry::default();
        let m = ProcessMetrics::register(&mut registry);
        m.update();
        let text = render(&registry);
        for name in [
            "process_resident_memory_bytes ",
            "process_cpu_seconds_total ",
            "process_threads ",
            "process_open_fds ",
        ] {
            assert!(text.contains(name), "{name} in {text}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
