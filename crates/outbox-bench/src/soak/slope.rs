//! The growth test: does a series sampled over a soak grow without bound?
//!
//! A finite run cannot prove that growth is unbounded; what it can show is a trend that, kept
//! up, would exhaust something. The rule:
//!
//! 1. Only samples after the warm-up count: caches, pools, buffers and the `published` table
//!    (which fills up to the retention before cleanup deletes anything) grow at first by design.
//! 2. The trend is the Theil–Sen slope: the median of the slopes between every pair of samples.
//!    Unlike least squares it is not moved by a few spikes (a latency outlier in the last minute,
//!    a sample taken just before autovacuum) nor much by one step (a table extended once).
//! 3. The growth is that slope times the window (from the first to the last sample counted): how
//!    much the fitted line rose over the run.
//! 4. The series passes when that growth is at most its allowance: a fraction of its level (the
//!    median of the samples) or an absolute amount, whichever is larger. The fraction makes the
//!    test scale with the series; the absolute amount covers series whose level is near zero
//!    and steps that are bounded by design (see the allowances in `soak/mod.rs`).
//!
//! A leak shows as the same slope all along and fails once the run is long enough for it to
//! exceed the allowance; a series that settles passes; noise, whatever its amplitude, moves
//! the median slope little. Fewer than [`MIN_SAMPLES`] samples is a failure: nothing was
//! tested.

use crate::util::Spread;

/// The fewest samples after the warm-up a series needs to be judged.
pub(crate) const MIN_SAMPLES: usize = 3;

/// Above this many samples, consecutive samples are merged (their medians) before the pairwise
/// slopes are taken: the pairs grow with the square of the samples.
const MAX_POINTS: usize = 600;

/// How much a series may grow over the tested window: the larger of `relative` × its level and
/// `absolute` (in the series' unit).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Allowance {
    pub(crate) relative: f64,
    pub(crate) absolute: f64,
}

impl Allowance {
    fn of(&self, level: f64) -> f64 {
        (self.relative * level.abs()).max(self.absolute)
    }
}

/// What the test found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Judgement {
    Passed,
    Grew,
    TooFewSamples,
}

impl Judgement {
    pub(crate) fn passed(self) -> bool {
        self == Judgement::Passed
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Judgement::Passed => "pass",
            Judgement::Grew => "FAIL: grows",
            Judgement::TooFewSamples => "FAIL: too few samples",
        }
    }
}

/// The test of one series.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Verdict {
    pub(crate) judgement: Judgement,
    /// Samples tested (after the warm-up, finite).
    pub(crate) samples: usize,
    /// Median of the samples.
    pub(crate) level: f64,
    pub(crate) min: f64,
    pub(crate) max: f64,
    /// Theil–Sen slope, per second.
    pub(crate) slope: f64,
    /// The fitted line at the first and the last sample tested.
    pub(crate) start: f64,
    pub(crate) end: f64,
    /// `end - start`.
    pub(crate) growth: f64,
    pub(crate) allowed: f64,
    /// The first sample tested, and the window from it to the last one, in seconds.
    pub(crate) from: f64,
    pub(crate) window: f64,
}

/// Judges `points` (seconds, value) from `warm_up` seconds on; non-finite values are skipped.
pub(crate) fn judge(points: &[(f64, f64)], warm_up: f64, allowance: Allowance) -> Verdict {
    let mut tested: Vec<(f64, f64)> = points
        .iter()
        .copied()
        .filter(|(t, y)| *t >= warm_up && t.is_finite() && y.is_finite())
        .collect();
    tested.sort_by(|a, b| a.0.total_cmp(&b.0));
    let values: Vec<f64> = tested.iter().map(|p| p.1).collect();
    let Spread {
        median: level,
        min,
        max,
        ..
    } = Spread::of(&values);
    let allowed = allowance.of(level);
    let (from, window) = match (tested.first(), tested.last()) {
        (Some(first), Some(last)) => (first.0, last.0 - first.0),
        _ => (f64::NAN, 0.0),
    };
    if tested.len() < MIN_SAMPLES || window <= 0.0 {
        return Verdict {
            judgement: Judgement::TooFewSamples,
            samples: tested.len(),
            level,
            min,
            max,
            slope: f64::NAN,
            start: f64::NAN,
            end: f64::NAN,
            growth: f64::NAN,
            allowed,
            from,
            window,
        };
    }
    let (slope, intercept) = theil_sen(&thin(&tested));
    let start = intercept + slope * tested[0].0;
    let end = intercept + slope * tested[tested.len() - 1].0;
    let growth = end - start;
    Verdict {
        judgement: if growth <= allowed {
            Judgement::Passed
        } else {
            Judgement::Grew
        },
        samples: tested.len(),
        level,
        min,
        max,
        slope,
        start,
        end,
        growth,
        allowed,
        from,
        window,
    }
}

/// The median of the pairwise slopes, and the median of `y - slope × t` as the intercept.
fn theil_sen(points: &[(f64, f64)]) -> (f64, f64) {
    let mut slopes = Vec::with_capacity(points.len() * points.len().saturating_sub(1) / 2);
    for (i, a) in points.iter().enumerate() {
        for b in &points[i + 1..] {
            if b.0 > a.0 {
                slopes.push((b.1 - a.1) / (b.0 - a.0));
            }
        }
    }
    let slope = median(&slopes);
    let residuals: Vec<f64> = points.iter().map(|(t, y)| y - slope * t).collect();
    (slope, median(&residuals))
}

/// At most [`MAX_POINTS`] points: runs of consecutive points replaced by their medians.
fn thin(points: &[(f64, f64)]) -> Vec<(f64, f64)> {
    if points.len() <= MAX_POINTS {
        return points.to_vec();
    }
    let per = points.len().div_ceil(MAX_POINTS);
    points
        .chunks(per)
        .map(|chunk| {
            let ts: Vec<f64> = chunk.iter().map(|p| p.0).collect();
            let ys: Vec<f64> = chunk.iter().map(|p| p.1).collect();
            (median(&ts), median(&ys))
        })
        .collect()
}

/// The median of the finite values (NaN when there are none).
fn median(values: &[f64]) -> f64 {
    Spread::of(values).median
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEN_PERCENT: Allowance = Allowance {
        relative: 0.10,
        absolute: 0.0,
    };

    /// Deterministic noise in [-1, 1) (xorshift), so that the tests do not depend on a seed
    /// crate.
    fn noise(n: usize) -> Vec<f64> {
        let mut state: u64 = 0x2545_F491_4F6C_DD1D;
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 11) as f64 / (1u64 << 52) as f64 - 1.0
            })
            .collect()
    }

    /// 30 minutes sampled every 5 s: `f(t)` plus `noise` × the noise.
    fn series(f: impl Fn(f64) -> f64, amplitude: f64) -> Vec<(f64, f64)> {
        noise(360)
            .into_iter()
            .enumerate()
            .map(|(i, e)| {
                let t = i as f64 * 5.0;
                (t, f(t) + amplitude * e)
            })
            .collect()
    }

    #[test]
    fn a_flat_noisy_series_passes() {
        // ±20% noise around 100, far more than the 10% allowed growth.
        let verdict = judge(&series(|_| 100.0, 20.0), 300.0, TEN_PERCENT);
        assert_eq!(verdict.judgement, Judgement::Passed, "{verdict:?}");
        assert!(verdict.growth.abs() < 3.0, "{verdict:?}");
        assert!((verdict.level - 100.0).abs() < 3.0, "{verdict:?}");
    }

    #[test]
    fn a_steadily_growing_series_fails() {
        // 100 + 1% per minute: 25% over the 25 minutes after the warm-up.
        let verdict = judge(&series(|t| 100.0 + t / 60.0, 2.0), 300.0, TEN_PERCENT);
        assert_eq!(verdict.judgement, Judgement::Grew, "{verdict:?}");
        assert!((verdict.slope * 60.0 - 1.0).abs() < 0.05, "{verdict:?}");
        assert!((verdict.growth - 24.9).abs() < 1.5, "{verdict:?}");
    }

    #[test]
    fn growth_below_the_allowance_passes() {
        // 5% over the window against 10% allowed.
        let verdict = judge(&series(|t| 100.0 + t / 300.0, 0.5), 300.0, TEN_PERCENT);
        assert_eq!(verdict.judgement, Judgement::Passed, "{verdict:?}");
        assert!(verdict.growth > 4.0, "{verdict:?}");
    }

    #[test]
    fn warm_up_growth_is_not_counted() {
        // Rises from 0 to 100 over the first 20 minutes, then flat.
        let rise = |t: f64| 100.0 * (t / 1200.0).min(1.0);
        let verdict = judge(&series(rise, 1.0), 1200.0, TEN_PERCENT);
        assert_eq!(verdict.judgement, Judgement::Passed, "{verdict:?}");
        // Without the warm-up the same series grows.
        let verdict = judge(&series(rise, 1.0), 0.0, TEN_PERCENT);
        assert_eq!(verdict.judgement, Judgement::Grew, "{verdict:?}");
    }

    #[test]
    fn spikes_at_the_end_do_not_make_a_trend() {
        // The last ten samples ten times the level: least squares would call this growth.
        let points: Vec<(f64, f64)> = series(|_| 10.0, 0.5)
            .into_iter()
            .map(|(t, y)| (t, if t >= 1750.0 { 100.0 } else { y }))
            .collect();
        let verdict = judge(&points, 300.0, TEN_PERCENT);
        assert_eq!(verdict.judgement, Judgement::Passed, "{verdict:?}");
    }

    #[test]
    fn a_sawtooth_passes_and_a_rising_sawtooth_fails() {
        // Dead tuples: climb for a minute, vacuumed to zero, again; judged as the soak judges
        // dead tuples (half the level). The window ends near a peak, which tilts the fit a
        // little (about the amplitude over the number of periods).
        let half = Allowance {
            relative: 0.5,
            absolute: 0.0,
        };
        let saw = |t: f64| 1000.0 * (t % 60.0) / 60.0;
        let verdict = judge(&series(saw, 50.0), 300.0, half);
        assert_eq!(verdict.judgement, Judgement::Passed, "{verdict:?}");
        assert!(verdict.growth.abs() < 100.0, "{verdict:?}");
        // Vacuum leaves more behind every time.
        let verdict = judge(&series(|t| saw(t) + t, 50.0), 300.0, half);
        assert_eq!(verdict.judgement, Judgement::Grew, "{verdict:?}");
    }

    #[test]
    fn a_staircase_fails() {
        // A table extended by 10% every five minutes: each step alone would be bounded.
        let verdict = judge(
            &series(|t| 100.0 * (1.0 + 0.1 * (t / 300.0).floor()), 0.0),
            300.0,
            TEN_PERCENT,
        );
        assert_eq!(verdict.judgement, Judgement::Grew, "{verdict:?}");
    }

    #[test]
    fn the_absolute_allowance_covers_series_near_zero() {
        // A backlog of 0-3 messages, rising by one over the run.
        let points = series(|t| 1.5 + t / 1800.0, 1.5);
        let strict = judge(&points, 300.0, TEN_PERCENT);
        assert_eq!(strict.judgement, Judgement::Grew, "{strict:?}");
        let verdict = judge(
            &points,
            300.0,
            Allowance {
                relative: 0.10,
                absolute: 100.0,
            },
        );
        assert_eq!(verdict.judgement, Judgement::Passed, "{verdict:?}");
        assert_eq!(verdict.allowed, 100.0);
    }

    #[test]
    fn too_few_samples_fail() {
        let verdict = judge(&[(0.0, 1.0), (400.0, 1.0)], 300.0, TEN_PERCENT);
        assert_eq!(verdict.judgement, Judgement::TooFewSamples);
        assert!(!verdict.judgement.passed());
        let verdict = judge(
            &[(400.0, f64::NAN), (405.0, 1.0), (410.0, f64::INFINITY)],
            300.0,
            TEN_PERCENT,
        );
        assert_eq!(verdict.judgement, Judgement::TooFewSamples);
    }

    #[test]
    fn long_runs_are_thinned_without_changing_the_trend() {
        // A day sampled every 5 s: 17,280 samples.
        let points: Vec<(f64, f64)> = noise(17_280)
            .into_iter()
            .enumerate()
            .map(|(i, e)| {
                let t = i as f64 * 5.0;
                (t, 100.0 + t / 3600.0 + e)
            })
            .collect();
        let verdict = judge(&points, 3600.0, TEN_PERCENT);
        assert!((verdict.slope * 3600.0 - 1.0).abs() < 0.01, "{verdict:?}");
        assert_eq!(verdict.samples, 17_280 - 720);
    }
}
