//! The alert path end to end, with real servers: a Prometheus that loads the project's
//! rule file (`compose/prometheus/rules/argus.yml`, every `for:` shortened to 2 s) and
//! scrapes a real bridge, an Alertmanager, and the local stack's webhook receiver
//! (`compose/lib/alert-receiver`). Stopping the bridge fires `ArgusBridgeDown` in
//! Prometheus and a "firing" notification reaches the receiver; starting the bridge
//! again resolves it, and a "resolved" notification follows.
//!
//! Everything runs on free ports in a temporary directory, so it disturbs neither the
//! local stack nor other tests. Needs Debian's `prometheus`, `prometheus-alertmanager`
//! and `python3` (compose/test installs them): missing binaries fail the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use argus_testkit::process::Server;
use common::*;
use serde_json::Value;

const ALERT: &str = "ArgusBridgeDown";

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

/// The project's rule file with every `for:` set to `short` (the rules are unchanged otherwise).
fn rules_with_short_for(short: &str) -> String {
    let text = std::fs::read_to_string(repo_file("compose/prometheus/rules/argus.yml"))
        .expect("read compose/prometheus/rules/argus.yml");
    assert!(
        text.contains(&format!("alert: {ALERT}")),
        "the rule file has no alert {ALERT}"
    );
    text.lines()
        .map(|line| match line.trim_start().strip_prefix("for: ") {
            Some(_) => {
                let indent = line.len() - line.trim_start().len();
                format!("{}for: {short}", " ".repeat(indent))
            }
            None => line.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

async fn get_json(url: &str) -> Option<Value> {
    let response = reqwest::get(url).await.ok()?;
    if !response.status().is_success() {
        return None;
    }
    response.json().await.ok()
}

/// Polls `probe` every 200 ms until it returns `Some`; panics with `what` and `logs` after `timeout`.
async fn poll<T, F, Fut>(what: &str, timeout: Duration, logs: &[&Path], mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        if Instant::now() > deadline {
            let tails: Vec<String> = logs
                .iter()
                .map(|p| {
                    let text = std::fs::read_to_string(p).unwrap_or_default();
                    let lines: Vec<&str> = text.lines().collect();
                    let from = lines.len().saturating_sub(15);
                    format!("--- {}:\n{}", p.display(), lines[from..].join("\n"))
                })
                .collect();
            panic!(
                "timed out after {timeout:?} waiting for {what}\n{}",
                tails.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The state (`pending`/`firing`) of `ArgusBridgeDown` for `instance` in Prometheus' /api/v1/alerts.
async fn alert_state(prometheus: &str, instance: &str) -> Option<String> {
    let doc = get_json(&format!("{prometheus}/api/v1/alerts")).await?;
    doc["data"]["alerts"]
        .as_array()?
        .iter()
        .find(|a| a["labels"]["alertname"] == ALERT && a["labels"]["instance"] == instance)
        .and_then(|a| a["state"].as_str().map(String::from))
}

/// The notifications the receiver stored that carry `ArgusBridgeDown` for `instance` with
/// the alert status `status` (`firing`/`resolved`).
fn notifications(file: &Path, instance: &str, status: &str) -> Vec<Value> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).expect("each stored line is JSON"))
        .filter(|n| {
            n["alerts"].as_array().is_some_and(|alerts| {
                alerts.iter().any(|a| {
                    a["labels"]["alertname"] == ALERT
                        && a["labels"]["instance"] == instance
                        && a["status"] == status
                })
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_bridge_fires_argus_bridge_down_and_its_restart_resolves_it() {
    let prometheus_bin = argus_testkit::find_binary("prometheus");
    let alertmanager_bin = argus_testkit::find_binary("prometheus-alertmanager");
    let python = argus_testkit::find_binary("python3");
    let started = Instant::now();

    let stack = Stack::start(false).await;
    let dir = tempfile::Builder::new()
        .prefix("argus-alerts-")
        .tempdir()
        .unwrap();
    let d = dir.path();
    let (bridge_port, prom_port, am_port, receiver_port) = (
        argus_testkit::free_port(),
        argus_testkit::free_port(),
        argus_testkit::free_port(),
        argus_testkit::free_port(),
    );
    let instance = format!("127.0.0.1:{bridge_port}");
    let prometheus = format!("http://127.0.0.1:{prom_port}");
    let bridge = stack.bridge_process(0, bridge_port).await;

    // The receiver the local stack runs, on its own port and file.
    let received = d.join("notifications.jsonl");
    let mut receiver_cmd = Command::new(&python);
    receiver_cmd
        .arg(repo_file("compose/lib/alert-receiver"))
        .arg(receiver_port.to_string())
        .arg(&received);
    let receiver_log = d.join("alert-receiver.log");
    let _receiver = Server::spawn(receiver_cmd, receiver_log.clone());

    let am_config = write(
        d,
        "alertmanager.yml",
        &format!(
            "global: {{ resolve_timeout: 5s }}
route:
  receiver: test
  group_by: [alertname, instance]
  group_wait: 1s
  group_interval: 1s
  repeat_interval: 1m
receivers:
  - name: test
    webhook_configs:
      - url: http://127.0.0.1:{receiver_port}/alerts
        send_resolved: true
"
        ),
    );
    let mut am_cmd = Command::new(&alertmanager_bin);
    am_cmd
        .arg(format!("--config.file={}", am_config.display()))
        .arg(format!("--storage.path={}", d.join("am-data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{am_port}"))
        .arg("--cluster.listen-address=");
    let am_log = d.join("alertmanager.log");
    let _alertmanager = Server::spawn(am_cmd, am_log.clone());

    std::fs::create_dir_all(d.join("rules")).unwrap();
    write(d, "rules/argus.yml", &rules_with_short_for("2s"));
    let prom_config = write(
        d,
        "prometheus.yml",
        &format!(
            "global:
  scrape_interval: 1s
  scrape_timeout: 900ms
  evaluation_interval: 1s
rule_files: [rules/argus.yml]
alerting:
  alertmanagers:
    - static_configs:
        - targets: ['127.0.0.1:{am_port}']
scrape_configs:
  - job_name: argus-bridge
    static_configs:
      - targets: ['{instance}']
"
        ),
    );
    let mut prom_cmd = Command::new(&prometheus_bin);
    prom_cmd
        .arg(format!("--config.file={}", prom_config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            d.join("prom-data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
        .arg("--rules.alert.resend-delay=1s");
    let prom_log = d.join("prometheus.log");
    let _prometheus = Server::spawn(prom_cmd, prom_log.clone());
    let logs = [prom_log.as_path(), am_log.as_path(), receiver_log.as_path()];

    for (what, url) in [
        ("Prometheus /-/ready", format!("{prometheus}/-/ready")),
        (
            "Alertmanager /-/ready",
            format!("http://127.0.0.1:{am_port}/-/ready"),
        ),
        (
            "alert-receiver GET /",
            format!("http://127.0.0.1:{receiver_port}/"),
        ),
    ] {
        poll(what, Duration::from_secs(20), &logs, || async {
            reqwest::get(&url)
                .await
                .ok()
                .filter(|r| r.status().is_success())
                .map(|_| ())
        })
        .await;
    }
    // Prometheus scrapes the running bridge: up == 1, and no ArgusBridgeDown.
    let up_query = format!("{prometheus}/api/v1/query?query=up{{instance=%22{instance}%22}}");
    poll(
        "up == 1 for the bridge",
        Duration::from_secs(20),
        &logs,
        || async {
            let doc = get_json(&up_query).await?;
            (doc["data"]["result"][0]["value"][1] == "1").then_some(())
        },
    )
    .await;
    assert_eq!(alert_state(&prometheus, &instance).await, None);

    // Stop the bridge: the alert fires in Prometheus, then reaches the receiver.
    let mut bridge = bridge;
    bridge.sigterm();
    let stopped_at = Instant::now();
    bridge.child.wait().unwrap();
    poll(
        "ArgusBridgeDown firing in Prometheus /api/v1/alerts",
        Duration::from_secs(30),
        &logs,
        || async {
            (alert_state(&prometheus, &instance).await.as_deref() == Some("firing")).then_some(())
        },
    )
    .await;
    let fired_after = stopped_at.elapsed();
    let firing = poll(
        "a firing ArgusBridgeDown notification at the webhook receiver",
        Duration::from_secs(30),
        &logs,
        || async {
            notifications(&received, &instance, "firing")
                .into_iter()
                .next()
        },
    )
    .await;
    assert_eq!(firing["status"], "firing");
    assert_eq!(firing["receiver"], "test");
    assert!(
        notifications(&received, &instance, "resolved").is_empty(),
        "resolved before the bridge came back"
    );

    // Start it again on the same port: the alert resolves, and the receiver hears so.
    let restarted = stack.bridge_process(0, bridge_port).await;
    let restarted_at = Instant::now();
    poll(
        "ArgusBridgeDown gone from Prometheus /api/v1/alerts",
        Duration::from_secs(30),
        &logs,
        || async {
            alert_state(&prometheus, &instance)
                .await
                .is_none()
                .then_some(())
        },
    )
    .await;
    let resolved = poll(
        "a resolved ArgusBridgeDown notification at the webhook receiver",
        Duration::from_secs(30),
        &logs,
        || async {
            notifications(&received, &instance, "resolved")
                .into_iter()
                .next()
        },
    )
    .await;
    assert_eq!(resolved["status"], "resolved");
    eprintln!(
        "ArgusBridgeDown fired {fired_after:?} after the stop, resolved (notified) {:?} after the restart; test took {:?}",
        restarted_at.elapsed(),
        started.elapsed()
    );
    drop(restarted);
}
