//! The soak's short form, run by `dev/test` and CI: a minute at 500 msg/s through the real
//! `outbox relay` daemon, PostgreSQL and Kafka (the `dev/up` services; without them the soak
//! command fails, and so does this test), judged by the same rules as the 30-minute run.
//!
//! The minute is shorter than PostgreSQL's autovacuum naptime, so the tables' dead tuples and
//! size grow for most of it: the allowances of one naptime of rows (see `soak/mod.rs`) are what
//! this run is judged against, and a relay that stopped cleaning up, or a leak of a kilobyte a
//! message, still fails it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

use serde_json::Value;

/// The newest modification time of the files `path` holds (or of `path`).
fn newest(path: &Path) -> SystemTime {
    let Ok(meta) = std::fs::metadata(path) else {
        return SystemTime::UNIX_EPOCH;
    };
    if !meta.is_dir() {
        return meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
    }
    std::fs::read_dir(path)
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| newest(&entry.path()))
        .max()
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

/// The `outbox` daemon this checkout builds. A workspace run (`dev/test`) has just built it
/// beside the bench, for `outbox-cli`'s own tests; a `cargo test -p outbox-bench` has not, so
/// when it is missing or older than its sources it is built here. (Building it every time
/// would replace the workspace's binary with one of other features.)
fn relay_daemon() -> PathBuf {
    let beside = Path::new(env!("CARGO_BIN_EXE_outbox-bench")).with_file_name("outbox");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let sources = ["Cargo.toml", "Cargo.lock"]
        .iter()
        .map(|file| root.join(file))
        .chain(
            ["outbox", "outbox-kafka-relay", "outbox-cli"]
                .iter()
                .flat_map(|krate| {
                    let dir = root.join("crates").join(krate);
                    [dir.join("Cargo.toml"), dir.join("src")]
                }),
        )
        .map(|path| newest(&path))
        .max()
        .unwrap_or(SystemTime::UNIX_EPOCH);
    if beside.is_file() && newest(&beside) >= sources {
        return beside;
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| env!("CARGO").to_owned());
    let mut build = Command::new(cargo);
    build.args([
        "build",
        "-p",
        "outbox-cli",
        "--bin",
        "outbox",
        "--message-format=json-render-diagnostics",
    ]);
    if !cfg!(debug_assertions) {
        build.arg("--release");
    }
    let output = build.output().expect("run cargo");
    assert!(
        output.status.success(),
        "cargo build -p outbox-cli failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|message| message["target"]["name"] == "outbox")
        .find_map(|message| message["executable"].as_str().map(PathBuf::from))
        .expect("cargo reported no outbox executable")
}

#[test]
fn a_minute_at_500_per_second_loses_nothing_and_grows_nothing() {
    let relay = relay_daemon();
    let out = std::env::temp_dir().join(format!("outbox-soak-test-{}", std::process::id()));
    let status = Command::new(env!("CARGO_BIN_EXE_outbox-bench"))
        .args([
            "soak",
            "--rate",
            "500",
            "--duration",
            "60s",
            "--warm-up",
            "20s",
        ])
        .args(["--sample-interval", "2s", "--latency-window", "5s"])
        .args([
            "--retention",
            "10s",
            "--cleanup-interval",
            "2s",
            "--drain-timeout",
            "30s",
        ])
        .arg("--out")
        .arg(&out)
        .arg("--relay-bin")
        .arg(&relay)
        .status()
        .expect("run outbox-bench soak");
    assert!(
        status.success(),
        "the soak failed ({status}): its summary is above, its files in {}",
        out.display()
    );

    let soak: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("soak.json")).unwrap()).unwrap();
    let outcome = &soak["outcome"];
    assert_eq!(outcome["committed"], 30_000, "{outcome}");
    assert_eq!(outcome["lost"], 0, "{outcome}");
    assert_eq!(outcome["received"], 30_000, "{outcome}");
    assert_eq!(soak["passed"], true);
    let verdicts = soak["verdicts"].as_array().unwrap();
    let judged: Vec<&str> = verdicts
        .iter()
        .map(|v| v["series"].as_str().unwrap())
        .collect();
    assert_eq!(
        judged,
        [
            "relay RSS",
            "relay open fds",
            "message table size",
            "published table size",
            "message dead tuples",
            "published dead tuples",
            "backlog",
            "commit → consumer p99",
        ]
    );
    for verdict in verdicts {
        assert_eq!(verdict["verdict"], "pass", "{verdict}");
        assert!(verdict["samples"].as_u64().unwrap() >= 3, "{verdict}");
        assert!(verdict["growth"].is_f64(), "{verdict}");
    }
    // Cleanup ran: the published table holds about the retention's worth of rows, not all.
    let samples = soak["samples"].as_array().unwrap();
    assert!(samples.len() >= 25, "{} samples", samples.len());
    let published = samples.last().unwrap()["published_rows"].as_f64().unwrap();
    assert!(published < 20_000.0, "{published} published rows kept");
    assert_eq!(soak["latency_windows"].as_array().unwrap().len(), 12);

    let csv = std::fs::read_to_string(out.join("soak.csv")).unwrap();
    assert!(csv.starts_with("t_seconds,relay_rss_bytes,"), "{csv}");
    assert_eq!(csv.lines().count(), samples.len() + 1);
    let latency = std::fs::read_to_string(out.join("soak-latency.csv")).unwrap();
    assert_eq!(latency.lines().count(), 13, "{latency}");
    let png = std::fs::read(out.join("soak.png")).unwrap();
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n"),
        "soak.png is not a PNG"
    );
    std::fs::remove_dir_all(&out).unwrap();
}
