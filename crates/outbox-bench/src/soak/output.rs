//! The soak's files: `soak.json`, `soak.csv`, `soak-latency.csv`, and `soak.png` drawn by
//! gnuplot from the two CSV files, and the summary printed at the end.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context as _};
use serde_json::{json, Value};

use super::{Column, Judged, Soak, Source};
use crate::report::fmt;

const MIB: f64 = 1024.0 * 1024.0;

/// Fails with instructions when gnuplot cannot be run (checked before a long run, not after).
pub(crate) fn check_gnuplot() -> anyhow::Result<()> {
    match Command::new("gnuplot")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
    {
        Ok(status) if status.success() => Ok(()),
        _ => bail!(
            "gnuplot is needed for soak.png: install Debian's gnuplot-nox (dev/soak does), or pass --no-plot"
        ),
    }
}

/// Writes every file; returns their paths.
pub(crate) fn write(soak: &Soak) -> anyhow::Result<Vec<PathBuf>> {
    let dir = &soak.args.out;
    let json_path = dir.join("soak.json");
    let csv_path = dir.join("soak.csv");
    let latency_path = dir.join("soak-latency.csv");
    let files = [
        (
            &json_path,
            serde_json::to_string_pretty(&document(soak))? + "\n",
        ),
        (&csv_path, samples_csv(soak)),
        (&latency_path, latency_csv(soak)),
    ];
    for (path, text) in &files {
        std::fs::write(path, text).with_context(|| format!("write {}", path.display()))?;
    }
    let mut written = vec![json_path, csv_path, latency_path];
    if !soak.args.no_plot {
        let png = dir.join("soak.png");
        plot(soak, &png)?;
        written.push(png);
    }
    Ok(written)
}

/// A JSON number, or null for NaN and infinities.
fn num(v: f64) -> Value {
    if v.is_finite() {
        json!(v)
    } else {
        Value::Null
    }
}

fn document(soak: &Soak) -> Value {
    let a = &soak.args;
    let o = &soak.outcome;
    let cpu = relay_cpu_us_per_message(soak);
    let verdicts: Vec<Value> = soak
        .judged
        .iter()
        .map(|j| {
            let v = &j.verdict;
            json!({
                "series": j.name,
                "column": match j.source {
                    Source::Column(c) => c.key(),
                    Source::P99 => "p99_ms",
                },
                "unit": j.unit,
                "verdict": v.judgement.as_str(),
                "passed": v.judgement.passed(),
                "samples": v.samples,
                "level": num(v.level),
                "min": num(v.min),
                "max": num(v.max),
                "start": num(v.start),
                "end": num(v.end),
                "growth": num(v.growth),
                "allowed": num(v.allowed),
                "allowance": {"relative": j.allowance.relative, "absolute": num(j.allowance.absolute)},
                "slope_per_hour": num(v.slope * 3600.0),
                "from_seconds": num(v.from),
                "window_seconds": v.window,
            })
        })
        .collect();
    let windows: Vec<Value> = soak
        .windows
        .iter()
        .map(|w| {
            json!({"start_seconds": w.start, "count": w.count, "p50_ms": num(w.p50_ms),
                   "p99_ms": num(w.p99_ms), "max_ms": num(w.max_ms)})
        })
        .collect();
    let samples: Vec<Value> = soak
        .samples
        .iter()
        .map(|s| {
            let mut sample = serde_json::Map::new();
            sample.insert("t_seconds".into(), num(s.t));
            for column in Column::ALL {
                sample.insert(column.key().into(), num(s.get(column)));
            }
            Value::Object(sample)
        })
        .collect();
    let mut run = soak.machine.clone();
    run["relay_bin"] = json!(soak.relay_bin.display().to_string());
    json!({
        "run": run,
        "settings": {
            "rate": a.rate,
            "duration_seconds": a.duration.as_secs_f64(),
            "warm_up_seconds": soak.warm_up.as_secs_f64(),
            "sample_interval_seconds": a.sample_interval.as_secs_f64(),
            "latency_window_seconds": a.latency_window.as_secs_f64(),
            "writers": a.writers,
            "retention_seconds": a.retention.as_secs_f64(),
            "cleanup_interval_seconds": a.cleanup_interval.as_secs_f64(),
            "drain_timeout_seconds": a.drain_timeout.as_secs_f64(),
            "payload_bytes": a.payload_bytes,
            "keys": a.keys,
            "partitions": a.partitions,
            "autovacuum_naptime_seconds": soak.autovacuum_naptime,
        },
        "passed": soak.passed(),
        "outcome": {
            "committed": o.committed,
            "received": o.received,
            "lost": o.lost,
            "lost_examples": o.lost_examples,
            "duplicates": o.duplicates,
            "unreported": o.unreported,
            "writer_seconds": o.writer_seconds,
            "achieved_rate": num(o.committed as f64 / o.writer_seconds),
            "drain_seconds": o.drain_seconds,
            "aborted": o.aborted,
            "relay_cpu_us_per_message": num(cpu),
        },
        "verdicts": verdicts,
        "latency_windows": windows,
        "samples": samples,
    })
}

/// The relay's CPU over the run per committed message, in µs.
fn relay_cpu_us_per_message(soak: &Soak) -> f64 {
    let cpu = |s: Option<&super::Sample>| s.map_or(f64::NAN, |s| s.get(Column::RelayCpu));
    let used = cpu(soak.samples.last()) - cpu(soak.samples.first());
    let messages = soak
        .samples
        .last()
        .map_or(f64::NAN, |s| s.get(Column::Committed))
        - soak
            .samples
            .first()
            .map_or(f64::NAN, |s| s.get(Column::Committed));
    1e6 * used / messages
}

/// A CSV field: the number, or empty when missing (gnuplot skips it).
fn field(v: f64) -> String {
    if v.is_finite() {
        format!("{v}")
    } else {
        String::new()
    }
}

fn samples_csv(soak: &Soak) -> String {
    let mut csv = String::from("t_seconds");
    for column in Column::ALL {
        csv.push(',');
        csv.push_str(column.key());
    }
    csv.push('\n');
    for sample in &soak.samples {
        csv.push_str(&field(sample.t));
        for column in Column::ALL {
            csv.push(',');
            csv.push_str(&field(sample.get(column)));
        }
        csv.push('\n');
    }
    csv
}

fn latency_csv(soak: &Soak) -> String {
    let mut csv = String::from("start_seconds,count,p50_ms,p99_ms,max_ms\n");
    for w in &soak.windows {
        let _ = writeln!(
            csv,
            "{},{},{},{},{}",
            field(w.start),
            w.count,
            field(w.p50_ms),
            field(w.p99_ms),
            field(w.max_ms)
        );
    }
    csv
}

/// How a series is shown: its unit's display name and divisor.
fn display(unit: &str) -> (&'static str, f64) {
    match unit {
        "bytes" => ("MiB", MIB),
        "tuples" => ("thousand tuples", 1000.0),
        "ms" => ("ms", 1.0),
        "fds" => ("fds", 1.0),
        _ => ("messages", 1.0),
    }
}

/// A value in a series' display unit, e.g. "23.1 MiB".
fn shown(j: &Judged, v: f64) -> String {
    match j.unit {
        "bytes" => format!("{} MiB", fmt(v / MIB)),
        "ms" => format!("{} ms", fmt(v)),
        unit => format!("{} {unit}", fmt(v)),
    }
}

/// The growth and its allowance in words, e.g. "+0.21 MiB (allowed 4.00): pass".
fn growth_words(j: &Judged) -> String {
    let v = &j.verdict;
    if !v.growth.is_finite() {
        return v.judgement.as_str().to_owned();
    }
    let (unit, div) = display(j.unit);
    format!(
        "{}{} {unit} (allowed {}): {}",
        if v.growth >= 0.0 { "+" } else { "" },
        fmt(v.growth / div),
        fmt(v.allowed / div),
        v.judgement.as_str()
    )
}

/// A duration in minutes when whole, else in seconds.
fn duration_words(d: std::time::Duration) -> String {
    match d.as_secs() {
        s if s >= 60 && s % 60 == 0 && d.subsec_nanos() == 0 => format!("{} min", s / 60),
        _ => format!("{} s", fmt(d.as_secs_f64())),
    }
}

/// The one-line outcome, e.g. for the plot's title.
fn headline(soak: &Soak) -> String {
    let o = &soak.outcome;
    format!(
        "{}: {} msg/s for {}, {} writers, {} build; {} committed, {} lost{}",
        if soak.passed() { "PASS" } else { "FAIL" },
        fmt(soak.args.rate),
        duration_words(soak.args.duration),
        soak.args.writers,
        soak.machine["profile"].as_str().unwrap_or("?"),
        fmt(o.committed as f64),
        o.lost,
        o.aborted
            .as_ref()
            .map(|why| format!("; stopped early: {why}"))
            .unwrap_or_default()
    )
}

/// The text printed at the end.
pub(crate) fn summary(soak: &Soak) -> String {
    let o = &soak.outcome;
    let mut text = format!("soak {}\n", headline(soak));
    let _ = writeln!(
        text,
        "writers achieved {} msg/s over {:.1} s; {} received, {} duplicates, {} unreported; {}; relay CPU {} µs per message",
        fmt(o.committed as f64 / o.writer_seconds),
        o.writer_seconds,
        fmt(o.received as f64),
        o.duplicates,
        o.unreported,
        match o.drain_seconds {
            Some(s) => format!("every commit received {s:.1} s after the writers stopped"),
            None => format!("{} never received (first: {:?})", o.lost, o.lost_examples),
        },
        fmt(relay_cpu_us_per_message(soak)),
    );
    let tested: Vec<_> = soak
        .windows
        .iter()
        .filter(|w| w.start >= soak.warm_up.as_secs_f64() && w.count > 0)
        .collect();
    let range = |f: fn(&super::Window) -> f64| {
        let (lo, hi) = tested
            .iter()
            .map(|w| f(w))
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
                (lo.min(v), hi.max(v))
            });
        format!("{}–{}", fmt(lo), fmt(hi))
    };
    let _ = writeln!(
        text,
        "commit → consumer per {} s window after the warm-up: p50 {} ms, p99 {} ms",
        soak.args.latency_window.as_secs(),
        range(|w| w.p50_ms),
        range(|w| w.p99_ms)
    );
    let _ = writeln!(
        text,
        "\n| series | level | fitted start → end | growth, allowed | verdict |\n|---|---:|---:|---:|---|"
    );
    for j in &soak.judged {
        let v = &j.verdict;
        let _ = writeln!(
            text,
            "| {} | {} | {} → {} | {}, {} | {} |",
            j.name,
            shown(j, v.level),
            shown(j, v.start),
            shown(j, v.end),
            shown(j, v.growth),
            shown(j, v.allowed),
            v.judgement.as_str()
        );
    }
    text
}

/// Text as a gnuplot string (single-quoted: nothing is special but the quote, doubled).
fn quoted(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// A path as a gnuplot string.
fn quoted_path(path: &Path) -> String {
    quoted(&path.display().to_string())
}

/// Draws `soak.png`: six panels against minutes, the warm-up shaded, each judged series with
/// its fitted line after the warm-up and its verdict in the key.
fn plot(soak: &Soak, png: &Path) -> anyhow::Result<()> {
    let dir = &soak.args.out;
    let samples = quoted_path(&dir.join("soak.csv"));
    let latency = quoted_path(&dir.join("soak-latency.csv"));
    let warm_up = soak.warm_up.as_secs_f64() / 60.0;
    let judged = |source: Source| soak.judged.iter().find(|j| j.source == source);
    let mut script = format!(
        "set terminal pngcairo size 1600,1250 font 'sans,11' noenhanced
set output {output}
set datafile separator comma
set multiplot layout 3,2 title {title} font 'sans,14'
set grid
set key top left opaque box
set xlabel 'minutes since the writers started'
set xrange [0:{minutes}]
set yrange [0:*]
set offsets 0, 0, graph 0.25, 0
set samples 400
set object 1 rect from 0, graph 0 to {warm_up}, graph 1 behind fillcolor rgb '#e8e8e8' fillstyle solid noborder
set label 1 'warm-up' at {warm_label}, graph 1.03 center textcolor rgb '#777777'
",
        output = quoted_path(png),
        title = quoted(&format!("outbox soak {}", headline(soak))),
        minutes = soak.args.duration.as_secs_f64() / 60.0,
        warm_label = warm_up / 2.0,
    );
    let mut fit = 0;
    // A series line and its fitted line as `plot` items; `first` names the fitted line in the
    // panel's key.
    let mut items = |j: &Judged,
                     data: &str,
                     x: &str,
                     color: &str,
                     label: &str,
                     first: bool|
     -> String {
        let (_, div) = display(j.unit);
        let v = &j.verdict;
        let line = format!(
            "{data} every ::1 using ({x}/60):(${}/{div}) with lines lw 2 lc rgb '{color}' title '{label}: {}'",
            column_number(j.source),
            growth_words(j).replace('\'', "''"),
        );
        if !v.slope.is_finite() {
            return line;
        }
        fit += 1;
        let (from, to) = (v.from / 60.0, (v.from + v.window) / 60.0);
        let _ = writeln!(
            script,
            "f{fit}(x) = x >= {from} && x <= {to} ? ({start} + {slope} * (x * 60 - {t0})) / {div} : 1/0",
            start = v.start,
            slope = v.slope,
            t0 = v.from,
        );
        let title = match first {
            true => "title 'trend after the warm-up (Theil-Sen)'",
            false => "notitle",
        };
        format!("{line}, f{fit}(x) with lines dt 2 lw 2 lc rgb 'black' {title}")
    };
    // (title, y axis label, logarithmic, plot items). A y axis starts at 0, so that a flat series
    // looks flat; the latency's is logarithmic, so that p50 and p99 both show beside spikes.
    let mut panels: Vec<(String, &str, bool, String)> = Vec::new();
    for (title, ylabel, parts) in [
        (
            "relay RSS (VmRSS)",
            "MiB",
            vec![(Column::RelayRss, "#1f77b4", "RSS")],
        ),
        (
            "relay open file descriptors",
            "fds",
            vec![(Column::RelayFds, "#1f77b4", "fds")],
        ),
        (
            "table size (pg_total_relation_size)",
            "MiB",
            vec![
                (Column::MessageBytes, "#d62728", "message"),
                (Column::PublishedBytes, "#2ca02c", "published"),
            ],
        ),
        (
            "dead tuples (n_dead_tup)",
            "thousand tuples",
            vec![
                (Column::MessageDead, "#d62728", "message"),
                (Column::PublishedDead, "#2ca02c", "published"),
            ],
        ),
    ] {
        let plots: Vec<String> = parts
            .into_iter()
            .enumerate()
            .filter_map(|(i, (column, color, label))| {
                judged(Source::Column(column))
                    .map(|j| items(j, &samples, "$1", color, label, i == 0))
            })
            .collect();
        panels.push((title.to_owned(), ylabel, false, plots.join(", ")));
    }
    if let Some(j) = judged(Source::P99) {
        let half = soak.args.latency_window.as_secs_f64() / 2.0;
        let p99 = items(j, &latency, &format!("($1+{half})"), "#9467bd", "p99", true);
        panels.push((
            format!(
                "commit → consumer latency per {} s window",
                soak.args.latency_window.as_secs()
            ),
            "ms (log scale)",
            true,
            format!(
                "{p99}, {latency} every ::1 using (($1+{half})/60):3 with lines lw 2 lc rgb '#17becf' title 'p50'"
            ),
        ));
    }
    if let Some(j) = judged(Source::Column(Column::Backlog)) {
        panels.push((
            "backlog (pending messages)".to_owned(),
            "messages",
            false,
            items(j, &samples, "$1", "#ff7f0e", "backlog", true),
        ));
    }
    for (title, ylabel, log, plots) in panels {
        let axis = match log {
            true => "set logscale y\nset yrange [1:*]",
            false => "unset logscale y\nset yrange [0:*]",
        };
        let _ = writeln!(
            script,
            "set title {}\nset ylabel {}\n{axis}\nplot {plots}",
            quoted(&title),
            quoted(ylabel),
        );
    }
    script.push_str("unset multiplot\n");

    let mut gnuplot = Command::new("gnuplot")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("run gnuplot (Debian's gnuplot-nox)")?;
    gnuplot
        .stdin
        .take()
        .context("gnuplot's stdin")?
        .write_all(script.as_bytes())?;
    let output = gnuplot.wait_with_output()?;
    let errors = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() || !png.is_file() {
        bail!("gnuplot failed ({}): {errors}", output.status);
    }
    Ok(())
}

/// The CSV column (1-based) of a series: `soak.csv` has the time first, `soak-latency.csv`
/// the p99 fourth.
fn column_number(source: Source) -> usize {
    match source {
        Source::Column(column) => column.index() + 2,
        Source::P99 => 4,
    }
}
