//! `argus-loadtest ramp`: steps the MQTT rate up until a step is not sustainable, and reports
//! the highest rate that was.
//!
//! With several `--mqtt-version`s every step runs once per version, one after the other,
//! so that the versions are compared on the same machine in the same run; a version stops
//! at its first step that is not sustainable, and the ramp ends when every version has.
//!
//! A step is sustainable when nothing was lost, duplicated or left unacked, its p95
//! (publish -> JetStream delivery) is within `--p95-bound-ms`, and the publishers achieved at
//! least 95 % of the asked rate (otherwise the broker or bridge pushed back: saturation).

use argus_pipeline::flags::MqttVersion;
use serde::Serialize;

use crate::cli::{MqttArgs, RampArgs};
use crate::pacing::Rate;
use crate::payload::PropertiesMode;
use crate::report::{Machine, Report};

/// The share of the asked rate a step must achieve.
pub const MIN_ACHIEVED: f64 = 0.95;

#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub rate: f64,
    pub mqtt_version: String,
    pub run_id: String,
    pub sent: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub unacked: u64,
    pub dead_lettered: u64,
    pub publish_rate_msgs_per_s: f64,
    pub throughput_msgs_per_s: f64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub bridge_cpu_percent: Option<f64>,
    pub bridge_rss_mib: Option<f64>,
    pub postgres_rows_per_s: Option<f64>,
    pub system_cpu_percent: Option<f64>,
    pub other_cpu_percent: Option<f64>,
    /// The three busiest process trees (mean CPU %, 100 = one core).
    pub busiest: String,
    pub processes: Vec<crate::procstat::GroupSummary>,
    pub sustainable: bool,
    /// Why the step is not sustainable (empty when it is).
    pub reason: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct RampReport {
    pub run_id: String,
    pub started_at: String,
    pub command: String,
    pub machine: Machine,
    pub p95_bound_ms: f64,
    pub step_duration_s: f64,
    pub devices: usize,
    pub steps: Vec<Step>,
    /// The highest asked rate whose step was sustainable, of the first
    /// `--mqtt-version` given.
    pub highest_sustainable_rate: Option<f64>,
    /// The end-to-end throughput measured at that step.
    pub highest_sustainable_throughput_msgs_per_s: Option<f64>,
    /// The same, for each `--mqtt-version`, in the order given.
    pub by_version: Vec<VersionResult>,
    /// Any loss in any step.
    pub lost: u64,
}

/// The ramp's result for one MQTT version.
#[derive(Debug, Clone, Serialize)]
pub struct VersionResult {
    pub mqtt_version: String,
    pub highest_sustainable_rate: Option<f64>,
    pub highest_sustainable_throughput_msgs_per_s: Option<f64>,
}

/// Judges one step (pure, unit-tested).
pub fn judge(rate: f64, r: &Report, p95_bound_ms: f64) -> (bool, String) {
    let a = &r.accounting;
    let mut why = Vec::new();
    if a.lost > 0 {
        why.push(format!("lost {}", a.lost));
    }
    if a.duplicated > 0 {
        why.push(format!("duplicated {}", a.duplicated));
    }
    if a.unacked > 0 {
        why.push(format!("unacked {}", a.unacked));
    }
    if !r.errors.is_empty() {
        why.push(format!("sender errors: {}", r.errors.join("; ")));
    }
    if r.latency_ms.count == 0 || r.latency_ms.p95 > p95_bound_ms {
        why.push(format!(
            "p95 {:.1} ms > {p95_bound_ms} ms",
            r.latency_ms.p95
        ));
    }
    if r.publish_rate_msgs_per_s < MIN_ACHIEVED * rate {
        why.push(format!(
            "achieved {:.0} msg/s < {:.0} % of {rate}",
            r.publish_rate_msgs_per_s,
            MIN_ACHIEVED * 100.0
        ));
    }
    (why.is_empty(), why.join("; "))
}

pub fn step_of(rate: f64, version: MqttVersion, r: &Report, p95_bound_ms: f64) -> Step {
    let (sustainable, reason) = judge(rate, r, p95_bound_ms);
    Step {
        rate,
        mqtt_version: version.to_string(),
        run_id: r.run_id.clone(),
        sent: r.accounting.sent,
        lost: r.accounting.lost,
        duplicated: r.accounting.duplicated,
        unacked: r.accounting.unacked,
        dead_lettered: r.accounting.dead_lettered,
        publish_rate_msgs_per_s: r.publish_rate_msgs_per_s.round(),
        throughput_msgs_per_s: r.throughput_msgs_per_s.round(),
        p50_ms: r.latency_ms.p50,
        p95_ms: r.latency_ms.p95,
        p99_ms: r.latency_ms.p99,
        max_ms: r.latency_ms.max,
        bridge_cpu_percent: r.bridge_cpu_percent,
        bridge_rss_mib: r.bridge_rss_mib,
        postgres_rows_per_s: r.postgres_rows_per_s.map(f64::round),
        system_cpu_percent: r.system_cpu_percent.map(|s| s.cpu_percent_mean),
        other_cpu_percent: r.other_cpu_percent,
        busiest: crate::report::busiest(&r.processes, 3),
        processes: r.processes.clone(),
        sustainable,
        reason,
    }
}

pub async fn run(args: &RampArgs) -> anyhow::Result<RampReport> {
    anyhow::ensure!(!args.steps.is_empty(), "--steps: at least one rate");
    let base = args
        .common
        .run_id
        .clone()
        .unwrap_or_else(crate::run::new_run_id);
    let started_at = chrono::Utc::now().to_rfc3339();
    let mut versions: Vec<MqttVersion> = Vec::new();
    for v in &args.mqtt_version {
        if !versions.contains(v) {
            versions.push(*v);
        }
    }
    anyhow::ensure!(!versions.is_empty(), "--mqtt-version: at least one version");
    let mut live = versions.clone();
    let mut steps = Vec::new();
    for (i, rate) in args.steps.iter().copied().enumerate() {
        anyhow::ensure!(rate > 0.0, "--steps: rates must be positive");
        for version in live.clone() {
            let tag = match version {
                MqttVersion::V5 => "v5",
                MqttVersion::V311 => "v311",
            };
            let mut common = args.common.clone();
            common.run_id = Some(format!("{base}s{i}{tag}"));
            common.json = None;
            common.markdown = None;
            common.plot = None;
            let step_args = MqttArgs {
                common,
                mqtt: args.mqtt.clone(),
                devices: args.devices,
                unknown_devices: 0,
                devices_per_connection: 1,
                rate: Rate::PerSecond(rate),
                count: 0,
                duration: Some(args.step_duration),
                inflight: args.inflight,
                mqtt_version: version,
                properties: PropertiesMode::None,
            };
            eprintln!(
                "ramp: step {i}: {rate} msg/s for {:?} over MQTT {version}",
                args.step_duration
            );
            let r = crate::commands::mqtt(&step_args).await?;
            let step = step_of(rate, version, &r, args.p95_bound_ms);
            eprintln!(
                "ramp: step {i} (MQTT {version}): achieved {:.0} msg/s, e2e {:.0} msg/s, p95 {:.1} ms, lost {} -> {}",
                step.publish_rate_msgs_per_s,
                step.throughput_msgs_per_s,
                step.p95_ms,
                step.lost,
                if step.sustainable {
                    "sustainable".to_string()
                } else {
                    format!("NOT sustainable ({})", step.reason)
                }
            );
            if !step.sustainable {
                live.retain(|v| *v != version);
            }
            steps.push(step);
        }
        if live.is_empty() {
            break;
        }
    }
    let by_version: Vec<VersionResult> = versions
        .iter()
        .map(|v| {
            let best = steps
                .iter()
                .rev()
                .find(|s| s.sustainable && s.mqtt_version == v.to_string());
            VersionResult {
                mqtt_version: v.to_string(),
                highest_sustainable_rate: best.map(|s| s.rate),
                highest_sustainable_throughput_msgs_per_s: best.map(|s| s.throughput_msgs_per_s),
            }
        })
        .collect();
    Ok(RampReport {
        run_id: base,
        started_at,
        command: std::env::args().collect::<Vec<_>>().join(" "),
        machine: Machine::detect(),
        p95_bound_ms: args.p95_bound_ms,
        step_duration_s: args.step_duration.as_secs_f64(),
        devices: args.devices,
        highest_sustainable_rate: by_version[0].highest_sustainable_rate,
        highest_sustainable_throughput_msgs_per_s: by_version[0]
            .highest_sustainable_throughput_msgs_per_s,
        by_version,
        lost: steps.iter().map(|s| s.lost).sum(),
        steps,
    })
}

impl RampReport {
    pub fn markdown(&self) -> String {
        let mut out = format!(
            "### argus-loadtest ramp `{}`\n\n- command: `{}`\n- date: {}\n- machine: {} CPUs ({}), {:.1} GiB RAM\n- p95 bound {} ms, {} s per step, {} devices\n\n\
| MQTT | asked msg/s | achieved msg/s | e2e msg/s | p50 ms | p95 ms | p99 ms | lost | bridge CPU % | bridge RSS MiB | machine CPU % (other) | busiest (CPU %) | sustainable |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
            self.run_id,
            self.command,
            self.started_at,
            self.machine.cpus,
            self.machine.cpu_model,
            self.machine.memory_gib,
            self.p95_bound_ms,
            self.step_duration_s,
            self.devices
        );
        let opt = |v: Option<f64>| v.map_or("n/a".to_string(), |v| format!("{v:.0}"));
        for s in &self.steps {
            let machine = format!(
                "{} ({})",
                opt(s.system_cpu_percent),
                opt(s.other_cpu_percent)
            );
            out.push_str(&format!(
                "| {} | {} | {:.0} | {:.0} | {:.2} | {:.2} | {:.2} | {} | {} | {} | {} | {} | {} |\n",
                s.mqtt_version,
                s.rate,
                s.publish_rate_msgs_per_s,
                s.throughput_msgs_per_s,
                s.p50_ms,
                s.p95_ms,
                s.p99_ms,
                s.lost,
                opt(s.bridge_cpu_percent),
                opt(s.bridge_rss_mib),
                machine,
                s.busiest,
                if s.sustainable {
                    "yes".to_string()
                } else {
                    format!("no: {}", s.reason)
                }
            ));
        }
        out.push('\n');
        for v in &self.by_version {
            out.push_str(&format!(
                "Highest sustainable rate, MQTT {}: {}\n",
                v.mqtt_version,
                match (
                    v.highest_sustainable_rate,
                    v.highest_sustainable_throughput_msgs_per_s
                ) {
                    (Some(r), Some(t)) => format!("{r} msg/s asked ({t:.0} msg/s end to end)"),
                    _ => "none of the steps".into(),
                }
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accounting::Accounting;
    use crate::latency::Percentiles;

    fn report(p95: f64, achieved: f64, lost: u64) -> Report {
        Report {
            mode: "mqtt",
            run_id: "r".into(),
            started_at: String::new(),
            command: String::new(),
            machine: Machine::detect(),
            config: serde_json::Value::Null,
            accounting: Accounting {
                sent: 100,
                acked: 100,
                lost,
                ..Accounting::default()
            },
            publish_duration_s: 1.0,
            publish_rate_msgs_per_s: achieved,
            throughput_msgs_per_s: achieved,
            latency_ms: Percentiles {
                count: 100,
                p95,
                ..Percentiles::default()
            },
            ack_latency_ms: Percentiles::default(),
            bridge_cpu_percent: None,
            bridge_cpu_percent_max: None,
            bridge_rss_mib: None,
            bridge_rss_mib_mean: None,
            bridge_pids: vec![],
            postgres_rows_per_s: None,
            settled_after_s: 0.0,
            windows: vec![],
            processes: vec![],
            system_cpu_percent: None,
            other_cpu_percent: None,
            properties: None,
            errors: vec![],
            reconnects: 0,
            resent: 0,
            passed: lost == 0,
            notes: vec![],
        }
    }

    #[test]
    fn a_step_needs_low_p95_no_loss_and_the_asked_rate() {
        assert!(judge(1000.0, &report(20.0, 990.0, 0), 100.0).0);
        let (ok, why) = judge(1000.0, &report(150.0, 990.0, 0), 100.0);
        assert!(!ok && why.contains("p95"));
        let (ok, why) = judge(1000.0, &report(20.0, 990.0, 3), 100.0);
        assert!(!ok && why.contains("lost 3"));
        let (ok, why) = judge(1000.0, &report(20.0, 800.0, 0), 100.0);
        assert!(!ok && why.contains("achieved 800"));
    }
}
