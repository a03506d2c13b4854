//! The retry back-off every daemon uses while a peer is not there yet (the cluster, the broker, containerd, the
//! NetManager, root): the pause doubles after each failed attempt, up to a cap, and starts small again after a
//! success. Pure arithmetic; the caller sleeps.

use std::time::Duration;

/// The usual cap: a returning peer is noticed within half a minute.
pub const MAX_PAUSE: Duration = Duration::from_secs(30);

/// The pause after `pause`: twice as long, at most [`MAX_PAUSE`].
pub fn double(pause: Duration) -> Duration {
    doubled(pause, MAX_PAUSE)
}

/// The pause after `pause`: twice as long, at most `cap`.
pub fn doubled(pause: Duration, cap: Duration) -> Duration {
    pause.saturating_mul(2).min(cap)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_and_never_overflows() {
        let mut p = Duration::from_millis(500);
        let mut seen = Vec::new();
        for _ in 0..8 {
            seen.push(p.as_millis());
            p = double(p);
        }
        assert_eq!(seen, [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000]);
        assert_eq!(
            doubled(Duration::MAX, Duration::from_secs(10)),
            Duration::from_secs(10)
        );
    }
}
