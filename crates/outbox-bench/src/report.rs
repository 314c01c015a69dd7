//! The result table (printed) and the JSON document (written).

use serde_json::{json, Map, Value};

use crate::util::Spread;

/// One line of the table: a figure measured in several rounds (or once).
#[derive(Debug, Clone)]
pub(crate) struct Row {
    pub(crate) scenario: String,
    pub(crate) metric: String,
    pub(crate) unit: &'static str,
    pub(crate) spread: Spread,
}

/// A target of issue 5 and whether this run met it.
#[derive(Debug, Clone)]
pub(crate) struct TargetResult {
    pub(crate) name: String,
    pub(crate) target: String,
    pub(crate) measured: String,
    pub(crate) met: bool,
}

/// Everything the run produced.
#[derive(Debug, Default)]
pub(crate) struct Report {
    pub(crate) rows: Vec<Row>,
    pub(crate) targets: Vec<TargetResult>,
    pub(crate) details: Map<String, Value>,
}

impl Report {
    pub(crate) fn row(&mut self, scenario: &str, metric: &str, unit: &'static str, values: &[f64]) {
        self.rows.push(Row {
            scenario: scenario.to_owned(),
            metric: metric.to_owned(),
            unit,
            spread: Spread::of(values),
        });
    }

    pub(crate) fn target(&mut self, name: &str, target: &str, measured: String, met: bool) {
        self.targets.push(TargetResult {
            name: name.to_owned(),
            target: target.to_owned(),
            measured,
            met,
        });
    }

    pub(crate) fn detail(&mut self, scenario: &str, value: Value) {
        self.details.insert(scenario.to_owned(), value);
    }

    /// The table as Markdown (the same text is printed and goes into docs/performance.md).
    pub(crate) fn table(&self) -> String {
        let mut out = String::new();
        out.push_str("| scenario | metric | median | min | max | unit | rounds |\n");
        out.push_str("|---|---|---:|---:|---:|---|---:|\n");
        for row in &self.rows {
            let s = row.spread;
            let (min, max) = if s.rounds > 1 {
                (fmt(s.min), fmt(s.max))
            } else {
                ("".to_owned(), "".to_owned())
            };
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} |\n",
                row.scenario,
                row.metric,
                fmt(s.median),
                min,
                max,
                row.unit,
                s.rounds
            ));
        }
        out.push('\n');
        out.push_str("| target | wanted | measured | met |\n|---|---|---|---|\n");
        for t in &self.targets {
            out.push_str(&format!(
                "| {} | {} | {} | {} |\n",
                t.name,
                t.target,
                t.measured,
                if t.met { "yes" } else { "**no**" }
            ));
        }
        out
    }

    pub(crate) fn json(&self, header: Value) -> Value {
        let rows: Vec<Value> = self
            .rows
            .iter()
            .map(|r| {
                json!({
                    "scenario": r.scenario, "metric": r.metric, "unit": r.unit,
                    "median": finite(r.spread.median), "min": finite(r.spread.min),
                    "max": finite(r.spread.max), "rounds": r.spread.rounds,
                })
            })
            .collect();
        let targets: Vec<Value> = self
            .targets
            .iter()
            .map(|t| json!({"name": t.name, "target": t.target, "measured": t.measured, "met": t.met}))
            .collect();
        json!({
            "run": header,
            "table": rows,
            "targets": targets,
            "scenarios": Value::Object(self.details.clone()),
        })
    }
}

fn finite(v: f64) -> Value {
    if v.is_finite() {
        json!(v)
    } else {
        Value::Null
    }
}

/// A figure with precision fitting its size.
pub(crate) fn fmt(v: f64) -> String {
    if !v.is_finite() {
        "n/a".to_owned()
    } else if v.abs() >= 1000.0 {
        let whole = v.round() as i64;
        let digits = whole.abs().to_string();
        let mut grouped = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i) % 3 == 0 {
                grouped.push(',');
            }
            grouped.push(c);
        }
        if whole < 0 {
            format!("-{grouped}")
        } else {
            grouped
        }
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_figures() {
        assert_eq!(fmt(1234567.4), "1,234,567");
        assert_eq!(fmt(123.4), "123");
        assert_eq!(fmt(12.34), "12.3");
        assert_eq!(fmt(1.234), "1.23");
        assert_eq!(fmt(f64::NAN), "n/a");
    }
}
