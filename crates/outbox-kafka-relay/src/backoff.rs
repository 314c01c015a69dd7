use std::time::Duration;

use rand::Rng;

/// Capped exponential backoff with full jitter: after `n` consecutive failures the delay is
/// uniform in `[initial * 2^(n-1) / 2, initial * 2^(n-1)]`, at most `max`. Jitter keeps many
/// relays from retrying in lockstep against a recovering broker.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    initial: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    pub(crate) fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max,
            failures: 0,
        }
    }

    /// Records a failure and returns how long to wait before the next try.
    pub(crate) fn next_delay(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        Self::delay_after(self.initial, self.max, self.failures)
    }

    /// The jittered delay after `failures` consecutive failures (at least 1).
    pub(crate) fn delay_after(initial: Duration, max: Duration, failures: u32) -> Duration {
        let exp = failures.clamp(1, 20) - 1;
        let ceiling = initial.saturating_mul(1 << exp).min(max);
        let floor = ceiling / 2;
        floor
            + ceiling
                .saturating_sub(floor)
                .mul_f64(rand::rng().random::<f64>())
    }

    pub(crate) fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_then_caps() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let first = backoff.next_delay();
        assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
        let third = {
            backoff.next_delay();
            backoff.next_delay()
        };
        assert!(third >= Duration::from_millis(200) && third <= Duration::from_millis(400));
        for _ in 0..30 {
            assert!(backoff.next_delay() <= Duration::from_secs(1));
        }
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(100));
    }
}
