//! The wall clock as the daemons store it: Unix milliseconds and seconds (0 if the clock is before 1970).

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .ok()
        .and_then(|d| i64::try_from(d.as_millis()).ok())
        .unwrap_or(0)
}

/// Whole seconds since the Unix epoch.
pub fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn milliseconds_and_seconds_agree() {
        let (ms, s) = (super::now_ms(), super::unix_secs());
        // 2026-01-01 or later, and the two readings within a second of each other.
        assert!(s > 1_767_225_600, "{s}");
        assert!((ms / 1000 - i64::try_from(s).unwrap()).abs() <= 1, "{ms} {s}");
    }
}
