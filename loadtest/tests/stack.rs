//! End to end against the local stack (`compose/up`), run by `compose/test`, which exports
//! `.stack/env`. Without those variables these tests FAIL on purpose: a silent pass would
//! claim a measurement that never happened.

use std::process::Command;

fn stack_var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: these tests measure the local stack. Run them through \
             compose/test, or `compose/up && source .stack/env` first."
        )
    })
}

fn loadtest(sub: &str) -> Command {
    for v in [
        "DATABASE_OWNER_URL",
        "NATS_URLS",
        "MQTT_URL",
        "MQTT_CA_FILE",
        "ARGUS_PKI_DIR",
    ] {
        stack_var(v);
    }
    let mut c = Command::new(env!("CARGO_BIN_EXE_argus-loadtest"));
    c.arg(sub).arg("--quiet");
    // The stack's pid files live at the repository root, one level above this crate.
    let stack = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.stack");
    c.arg("--pid-dir").arg(stack.join("pids"));
    // As the load tester's own NATS user (`.stack/env` exports the operator's, admin);
    // `baseline` makes scratch streams, which only admin may.
    if sub != "baseline" {
        c.env_remove("NATS_PASSWORD")
            .env("NATS_USER", "loadtest")
            .env(
                "NATS_PASSWORD_FILE",
                stack.join("secrets/nats-loadtest.password"),
            );
    }
    c
}

fn read_json(path: &std::path::Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).expect("report written")).expect("JSON report")
}

/// Runs `argus-loadtest <sub> <args> --json <tmp>`: its exit status and report.
fn run(sub: &str, args: &[&str]) -> (std::process::ExitStatus, serde_json::Value) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let json = dir.path().join("r.json");
    let status = loadtest(sub)
        .args(args)
        .arg("--json")
        .arg(&json)
        .status()
        .expect("run argus-loadtest");
    (status, read_json(&json))
}

#[test]
fn a_short_mqtt_run_through_the_stack_loses_nothing() {
    let (status, r) = run(
        "mqtt",
        &[
            "--devices",
            "5",
            "--count",
            "300",
            "--rate",
            "500",
            "--settle",
            "30s",
        ],
    );
    assert!(status.success(), "exit {status:?}: {r:#}");
    for f in [
        "sent",
        "acked",
        "persisted",
        "published",
        "lost",
        "duplicated",
        "dead_lettered",
        "throughput_msgs_per_s",
        "bridge_cpu_percent",
        "bridge_rss_mib",
    ] {
        assert!(r.get(f).is_some(), "missing field {f}: {r:#}");
    }
    for p in ["p50", "p95", "p99", "max"] {
        assert!(
            r["latency_ms"][p].as_f64().unwrap() > 0.0,
            "latency {p}: {r:#}"
        );
    }
    assert_eq!(r["sent"], 300);
    assert_eq!(r["acked"], 300);
    assert_eq!(r["persisted"], 300);
    assert_eq!(r["published"], 300);
    assert_eq!(r["lost"], 0);
    assert_eq!(r["duplicated"], 0);
    assert!(r["throughput_msgs_per_s"].as_f64().unwrap() > 0.0);
}

/// MQTT 5 devices with the chunked gateway's properties: every message arrives once, and
/// both stores carry its properties (the envelope's `properties`, the row's
/// `mqtt_properties` and chunk columns), which the load tester counts and checks.
#[test]
fn mqtt_5_properties_reach_both_stores_through_the_stack() {
    let (status, r) = run(
        "mqtt",
        &[
            "--mqtt-version",
            "5",
            "--properties",
            "chunked",
            "--devices",
            "3",
            "--count",
            "200",
            "--rate",
            "400",
            "--settle",
            "30s",
        ],
    );
    assert!(status.success(), "exit {status:?}: {r:#}");
    assert_eq!(r["persisted"], 200, "{r:#}");
    assert_eq!(r["published"], 200, "{r:#}");
    assert_eq!(r["lost"], 0, "{r:#}");
    let p = &r["properties"];
    assert_eq!(p["mode"], "chunked", "{r:#}");
    assert_eq!(p["published_with_properties"], 200, "{r:#}");
    assert_eq!(p["persisted_with_properties"], 200, "{r:#}");
    assert_eq!(p["persisted_with_chunk_fields"], 200, "{r:#}");
}

#[test]
fn messages_of_an_unknown_device_are_dead_lettered_not_lost() {
    let (status, r) = run(
        "mqtt",
        &[
            "--devices",
            "0",
            "--unknown-devices",
            "2",
            "--count",
            "100",
            "--rate",
            "200",
            "--settle",
            "30s",
        ],
    );
    assert!(status.success(), "exit {status:?}: {r:#}");
    assert_eq!(r["acked"], 100, "{r:#}");
    assert_eq!(r["dead_lettered"], 100, "{r:#}");
    assert_eq!(r["persisted"], 0);
    assert_eq!(r["lost"], 0);
}

#[test]
fn a_short_http_run_through_the_sidecar_loses_nothing() {
    stack_var("INGEST_HTTP_URL");
    stack_var("INGEST_HTTP_CA_FILE");
    stack_var("INGEST_HTTP_ADMIN_URL");
    stack_var("ARGUS_ADMIN_TOKEN");
    let (status, r) = run(
        "http",
        &[
            "--devices",
            "4",
            "--count",
            "200",
            "--batch",
            "10",
            "--concurrency",
            "4",
            "--rate",
            "400",
            "--settle",
            "30s",
        ],
    );
    assert!(status.success(), "exit {status:?}: {r:#}");
    assert_eq!(r["acked"], 200, "{r:#}");
    assert_eq!(r["persisted"], 200);
    assert_eq!(r["published"], 200);
    assert_eq!(r["lost"], 0);
}
