//! Small helpers: clocks, /proc figures, histograms, progress bars, the message shape.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde_json::{json, Value};

/// Wall-clock microseconds since the Unix epoch: the clock both the writers and the consumer
/// read, so that a timestamp carried in a payload can be compared on receipt.
pub(crate) fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// A field of `/proc/<pid>/status` in kB (`VmHWM`, `VmRSS`); `pid` may be `"self"`.
pub(crate) fn proc_status_kb(pid: &str, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|line| {
        let rest = line.strip_prefix(field)?.strip_prefix(':')?;
        rest.trim().trim_end_matches("kB").trim().parse().ok()
    })
}

/// CPU seconds (user + system) of a process and its threads so far.
pub(crate) fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces): state is field 3, utime 14.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// CPU seconds so far of every process named `name` (the PostgreSQL server and its backends,
/// the Kafka broker's JVM), including their children that have exited: a backend whose client
/// disconnected is gone from `/proc` by the time a phase ends, but the postmaster that reaped
/// it carries its CPU in its own `cutime`/`cstime`.
pub(crate) fn cpu_seconds_of(name: &str) -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return f64::NAN;
    };
    dir.filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|comm| comm.trim() == name)
        })
        .filter_map(|pid| Some(cpu_seconds(pid)? + reaped_children_cpu_seconds(pid)?))
        .sum()
}

/// CPU seconds of the children a process has waited for (`cutime` + `cstime`).
fn reaped_children_cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(13)?.parse::<f64>().ok()? + fields.get(14)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// CPU seconds so far of the relay's process, PostgreSQL, the Kafka broker and this process.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CpuSample {
    pub(crate) relay: f64,
    pub(crate) postgres: f64,
    pub(crate) kafka: f64,
    pub(crate) bench: f64,
}

impl CpuSample {
    pub(crate) fn now(relay: u32) -> CpuSample {
        CpuSample {
            relay: cpu_seconds(relay).unwrap_or(f64::NAN),
            postgres: cpu_seconds_of("postgres"),
            kafka: cpu_seconds_of("java"),
            bench: cpu_seconds(std::process::id()).unwrap_or(f64::NAN),
        }
    }
}

/// A latency histogram in microseconds, from 1 µs to 10 minutes, 3 significant digits.
pub(crate) fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

/// Records a duration in microseconds (saturating at the histogram's bound).
pub(crate) fn record(histogram: &mut Histogram<u64>, duration: Duration) {
    histogram.saturating_record(duration.as_micros().max(1) as u64);
}

/// A quantile in milliseconds.
pub(crate) fn quantile_ms(histogram: &Histogram<u64>, quantile: f64) -> f64 {
    histogram.value_at_quantile(quantile) as f64 / 1000.0
}

/// Maximum in milliseconds.
pub(crate) fn max_ms(histogram: &Histogram<u64>) -> f64 {
    histogram.max() as f64 / 1000.0
}

/// p50/p90/p99/p99.9/max in milliseconds and the count.
pub(crate) fn histogram_json(histogram: &Histogram<u64>) -> Value {
    json!({
        "count": histogram.len(),
        "p50_ms": quantile_ms(histogram, 0.50),
        "p90_ms": quantile_ms(histogram, 0.90),
        "p99_ms": quantile_ms(histogram, 0.99),
        "p999_ms": quantile_ms(histogram, 0.999),
        "max_ms": max_ms(histogram),
        "mean_ms": histogram.mean() / 1000.0,
    })
}

/// Median, minimum and maximum of a set of per-round figures.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Spread {
    pub(crate) median: f64,
    pub(crate) min: f64,
    pub(crate) max: f64,
    pub(crate) rounds: usize,
}

impl Spread {
    pub(crate) fn of(values: &[f64]) -> Spread {
        let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
        sorted.sort_by(f64::total_cmp);
        if sorted.is_empty() {
            return Spread {
                median: f64::NAN,
                min: f64::NAN,
                max: f64::NAN,
                rounds: 0,
            };
        }
        let n = sorted.len();
        let median = if n % 2 == 1 {
            sorted[n / 2]
        } else {
            (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
        };
        Spread {
            median,
            min: sorted[0],
            max: sorted[n - 1],
            rounds: n,
        }
    }

    pub(crate) fn json(&self, values: &[f64]) -> Value {
        json!({"median": self.median, "min": self.min, "max": self.max, "rounds": values})
    }
}

/// Every progress bar is drawn through this one, so that [`say`] can print between them.
fn progress() -> &'static MultiProgress {
    static PROGRESS: std::sync::OnceLock<MultiProgress> = std::sync::OnceLock::new();
    PROGRESS.get_or_init(MultiProgress::new)
}

/// A progress bar for `len` items on stderr (hidden when stderr is not a terminal).
pub(crate) fn bar(prefix: &str, len: u64) -> ProgressBar {
    let bar = progress().add(ProgressBar::new(len)).with_style(
        ProgressStyle::with_template(
            "{prefix:>22} [{elapsed_precise}] {bar:30} {human_pos}/{human_len} ({per_sec}) {msg}",
        )
        .expect("valid template"),
    );
    bar.set_prefix(prefix.to_owned());
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// A spinner counting items without a known total.
pub(crate) fn spinner(prefix: &str) -> ProgressBar {
    let bar = progress().add(ProgressBar::new_spinner()).with_style(
        ProgressStyle::with_template(
            "{prefix:>22} [{elapsed_precise}] {spinner} {human_pos} ({per_sec}) {msg}",
        )
        .expect("valid template"),
    );
    bar.set_prefix(prefix.to_owned());
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// Prints a line on stderr without tearing the progress bars.
pub(crate) fn say(line: impl AsRef<str>) {
    progress().suspend(|| eprintln!("{}", line.as_ref()));
}

/// The key of message `n`: `key-<n mod keys>`.
pub(crate) fn key(n: u64, keys: usize) -> String {
    format!("key-{}", n % keys.max(1) as u64)
}

/// A payload of `len` bytes (at least 18): the send time in microseconds since the epoch
/// (8 bytes, big-endian), the phase (2 bytes), the message number (8 bytes), then pseudo-random
/// letters and digits, which lz4 cannot shrink much (a repeated filler would compress to
/// nothing and flatter every Kafka figure).
pub(crate) fn payload(len: usize, sent_micros: u64, phase: u16, n: u64) -> Vec<u8> {
    const ALPHABET: &[u8; 36] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let len = len.max(18);
    let mut payload = Vec::with_capacity(len);
    payload.extend_from_slice(&sent_micros.to_be_bytes());
    payload.extend_from_slice(&phase.to_be_bytes());
    payload.extend_from_slice(&n.to_be_bytes());
    // xorshift64*, seeded by the message number.
    let mut state = n.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    while payload.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        let word = state.wrapping_mul(0x2545_F491_4F6C_DD1D);
        for byte in word.to_le_bytes().iter().take(len - payload.len()) {
            payload.push(ALPHABET[(*byte % 36) as usize]);
        }
    }
    payload
}

/// The send time and phase carried by a [`payload`].
pub(crate) fn decode_payload(payload: &[u8]) -> Option<(u64, u16)> {
    let sent = u64::from_be_bytes(payload.get(..8)?.try_into().ok()?);
    let phase = u16::from_be_bytes(payload.get(8..10)?.try_into().ok()?);
    Some((sent, phase))
}

/// Today's date and time in UTC, ISO 8601 (no calendar crate needed for this).
pub(crate) fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_round_trips() {
        let p = payload(256, 1_700_000_000_000_000, 7, 42);
        assert_eq!(p.len(), 256);
        assert_eq!(decode_payload(&p), Some((1_700_000_000_000_000, 7)));
    }

    #[test]
    fn spread_takes_the_median() {
        let s = Spread::of(&[3.0, 1.0, 2.0]);
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        assert_eq!(Spread::of(&[1.0, 2.0, 3.0, 10.0]).median, 2.5);
    }

    #[test]
    fn reads_own_status() {
        assert!(proc_status_kb("self", "VmHWM").unwrap() > 0);
    }
}
