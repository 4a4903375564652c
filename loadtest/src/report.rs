//! The run report: JSON (machine-readable), a terminal table, a Markdown summary and an SVG
//! latency plot.

use std::path::Path;

use anyhow::Context;
use serde::Serialize;

use crate::accounting::Accounting;
use crate::latency::{Percentiles, Window};
use crate::payload::PropertiesMode;
use crate::procstat::{GroupSummary, ProcSummary, SystemCpu};

/// The machine the run happened on, for the benchmark document.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    pub memory_gib: f64,
    pub kernel: String,
}

impl Machine {
    pub fn detect() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let mem_kib: f64 = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        Self {
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu_model,
            memory_gib: (mem_kib / 1024.0 / 1024.0 * 10.0).round() / 10.0,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_string())
                .unwrap_or_default(),
        }
    }
}

/// One `mqtt` or `http` run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub mode: &'static str,
    pub run_id: String,
    pub started_at: String,
    pub command: String,
    pub machine: Machine,
    /// The run's settings (devices, rate, count, connections, ...), as given.
    pub config: serde_json::Value,
    #[serde(flatten)]
    pub accounting: Accounting,
    /// From the first send to the last send.
    pub publish_duration_s: f64,
    /// Sent messages per second of `publish_duration_s`.
    pub publish_rate_msgs_per_s: f64,
    /// Delivered (in JetStream) messages per second, from the first send to the last delivery.
    pub throughput_msgs_per_s: f64,
    /// Publish -> delivery from `TELEMETRY_RAW_V1` to the test's own consumer.
    pub latency_ms: Percentiles,
    /// Publish -> broker PUBACK (MQTT) or -> HTTP response.
    pub ack_latency_ms: Percentiles,
    /// Mean over the samples, summed over the bridge processes (100 = one core).
    pub bridge_cpu_percent: Option<f64>,
    pub bridge_cpu_percent_max: Option<f64>,
    /// Peak resident memory, summed over the bridge processes.
    pub bridge_rss_mib: Option<f64>,
    pub bridge_rss_mib_mean: Option<f64>,
    pub bridge_pids: Vec<u32>,
    /// The run's rows divided by the span of their `created_at` (commit batches).
    pub postgres_rows_per_s: Option<f64>,
    /// How long the collection waited after the last send until everything was accounted for
    /// (or the `--settle` deadline passed).
    pub settled_after_s: f64,
    pub windows: Vec<Window>,
    /// CPU (100 = one core) and peak RSS of every process tree named by a `.pid` file in
    /// `--pid-dir` (Postgres with its backends, each NATS node, Mosquitto, ...) and of the
    /// load tester itself: where the machine's time went.
    pub processes: Vec<GroupSummary>,
    /// The whole machine (at most `machine.cpus` x 100).
    pub system_cpu_percent: Option<SystemCpu>,
    /// Machine CPU not spent by the sampled processes (other work on the machine, e.g.
    /// compilers): a run with a high figure here measured a contended machine.
    pub other_cpu_percent: Option<f64>,
    /// Sender failures (connections refused or lost, HTTP errors): any of them fails the run.
    pub errors: Vec<String>,
    /// MQTT: connections re-established after the broker dropped them (a broker restart).
    /// Not a failure by itself: what matters is that every acked message arrived.
    pub reconnects: u64,
    /// MQTT: messages published again after a reconnect because their PUBACK had not come
    /// (the bridge's message ids make the copies no-ops; `duplicated` checks it).
    pub resent: u64,
    /// With `--properties`: how many messages reached each store with them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub properties: Option<PropertiesCheck>,
    /// sent > 0, no sender errors, and lost == duplicated == unacked == 0.
    pub passed: bool,
    /// Human-readable notes (e.g. why CPU was not sampled).
    pub notes: Vec<String>,
}

/// Where the MQTT 5 publish properties of a `--properties` run arrived.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct PropertiesCheck {
    pub mode: PropertiesMode,
    /// Messages in `TELEMETRY_RAW_V1` whose envelope has `properties`.
    pub published_with_properties: u64,
    /// Rows with `mqtt_properties` set.
    pub persisted_with_properties: u64,
    /// Rows with `correlation_id`, `sequence_number` and `total_chunks` set
    /// (expected for every row with `chunked`).
    pub persisted_with_chunk_fields: u64,
}

impl Report {
    /// Records where the properties arrived; a message stored or published
    /// without them is an error, which fails the run.
    pub fn check_properties(
        &mut self,
        mode: PropertiesMode,
        published_with_properties: u64,
        persisted_with_properties: u64,
        persisted_with_chunk_fields: u64,
    ) {
        let a = self.accounting;
        let mut short = vec![
            (
                "published",
                a.published,
                published_with_properties,
                "properties",
            ),
            (
                "persisted",
                a.persisted,
                persisted_with_properties,
                "mqtt_properties",
            ),
        ];
        if mode == PropertiesMode::Chunked {
            short.push((
                "persisted",
                a.persisted,
                persisted_with_chunk_fields,
                "chunk columns",
            ));
        }
        for (store, all, with, what) in short {
            if with < all {
                self.errors.push(format!(
                    "{} of {all} {store} messages lack their {what}",
                    all - with
                ));
            }
        }
        self.properties = Some(PropertiesCheck {
            mode,
            published_with_properties,
            persisted_with_properties,
            persisted_with_chunk_fields,
        });
        self.finish();
    }

    pub fn set_proc(&mut self, proc: Option<ProcSummary>) {
        if let Some(p) = proc {
            self.bridge_cpu_percent = Some(round1(p.cpu_percent_mean));
            self.bridge_cpu_percent_max = Some(round1(p.cpu_percent_max));
            self.bridge_rss_mib = Some(round1(p.rss_mib_max));
            self.bridge_rss_mib_mean = Some(round1(p.rss_mib_mean));
        }
    }

    pub fn finish(&mut self) {
        let a = &self.accounting;
        self.passed = a.sent > 0
            && self.errors.is_empty()
            && a.lost == 0
            && a.duplicated == 0
            && a.unacked == 0;
    }

    /// The rows of the terminal table and the Markdown summary.
    pub fn rows(&self) -> Vec<(&'static str, String)> {
        let a = &self.accounting;
        let opt = |v: Option<f64>, unit: &str| v.map_or("n/a".into(), |v| format!("{v:.1}{unit}"));
        let lat = |p: &Percentiles| {
            format!(
                "p50 {:.2} / p95 {:.2} / p99 {:.2} / max {:.2} ms (n={})",
                p.p50, p.p95, p.p99, p.max, p.count
            )
        };
        let mut rows = vec![
            ("run", format!("{} ({})", self.run_id, self.mode)),
            ("sent", a.sent.to_string()),
            ("acked", a.acked.to_string()),
            ("unacked", a.unacked.to_string()),
            ("persisted (Postgres)", a.persisted.to_string()),
            ("published (JetStream)", a.published.to_string()),
            ("dead-lettered", a.dead_lettered.to_string()),
            (
                "lost",
                format!(
                    "{} (missing in Postgres {}, in JetStream {})",
                    a.lost, a.missing_postgres, a.missing_jetstream
                ),
            ),
            (
                "duplicated",
                format!(
                    "{} (extra rows {}, extra stream messages {})",
                    a.duplicated, a.duplicate_rows, a.duplicate_stream_messages
                ),
            ),
            (
                "publish rate",
                format!(
                    "{:.0} msg/s over {:.2} s",
                    self.publish_rate_msgs_per_s, self.publish_duration_s
                ),
            ),
            (
                "end-to-end throughput",
                format!("{:.0} msg/s", self.throughput_msgs_per_s),
            ),
            ("latency publish->JetStream", lat(&self.latency_ms)),
            ("latency publish->ack", lat(&self.ack_latency_ms)),
            (
                "bridge CPU (mean / max)",
                format!(
                    "{} / {}",
                    opt(self.bridge_cpu_percent, " %"),
                    opt(self.bridge_cpu_percent_max, " %")
                ),
            ),
            (
                "bridge RSS (peak / mean)",
                format!(
                    "{} / {}",
                    opt(self.bridge_rss_mib, " MiB"),
                    opt(self.bridge_rss_mib_mean, " MiB")
                ),
            ),
            (
                "Postgres write rate",
                opt(self.postgres_rows_per_s, " rows/s"),
            ),
            (
                "machine CPU (mean / max)",
                self.system_cpu_percent.map_or("n/a".into(), |s| {
                    format!(
                        "{:.0} % / {:.0} % of {} % ({} % outside the sampled processes)",
                        s.cpu_percent_mean,
                        s.cpu_percent_max,
                        self.machine.cpus * 100,
                        self.other_cpu_percent
                            .map_or("n/a".into(), |o| format!("{o:.0}"))
                    )
                }),
            ),
            (
                "CPU by process (mean %)",
                busiest(&self.processes, usize::MAX),
            ),
            (
                "reconnects / resent",
                format!("{} / {}", self.reconnects, self.resent),
            ),
            ("settled after", format!("{:.2} s", self.settled_after_s)),
        ];
        if let Some(p) = &self.properties {
            rows.push((
                "with properties",
                format!(
                    "{} published, {} persisted, {} with chunk columns (--properties {})",
                    p.published_with_properties,
                    p.persisted_with_properties,
                    p.persisted_with_chunk_fields,
                    format!("{:?}", p.mode).to_lowercase()
                ),
            ));
        }
        rows.push(("result", if self.passed { "PASS" } else { "FAIL" }.into()));
        rows
    }

    pub fn table(&self) -> String {
        let rows = self.rows();
        let w = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        let mut out = String::new();
        for (k, v) in rows {
            out.push_str(&format!("{k:<w$}  {v}\n"));
        }
        for e in &self.errors {
            out.push_str(&format!("error: {e}\n"));
        }
        for n in &self.notes {
            out.push_str(&format!("note: {n}\n"));
        }
        out
    }

    pub fn markdown(&self) -> String {
        let mut out = format!(
            "### argus-loadtest {} run `{}`\n\n- command: `{}`\n- date: {}\n- machine: {} CPUs ({}), {:.1} GiB RAM, kernel {}\n\n| metric | value |\n|---|---|\n",
            self.mode,
            self.run_id,
            self.command,
            self.started_at,
            self.machine.cpus,
            self.machine.cpu_model,
            self.machine.memory_gib,
            self.machine.kernel
        );
        for (k, v) in self.rows() {
            out.push_str(&format!("| {k} | {v} |\n"));
        }
        for e in &self.errors {
            out.push_str(&format!("\nError: {e}\n"));
        }
        for n in &self.notes {
            out.push_str(&format!("\nNote: {n}\n"));
        }
        out
    }
}

/// `name cpu%` of the `n` busiest process trees, busiest first.
pub fn busiest(processes: &[GroupSummary], n: usize) -> String {
    let mut p: Vec<&GroupSummary> = processes.iter().collect();
    p.sort_by(|a, b| b.cpu_percent_mean.total_cmp(&a.cpu_percent_mean));
    if p.is_empty() {
        return "n/a".into();
    }
    p.iter()
        .take(n)
        .map(|g| format!("{} {:.0}", g.name, g.cpu_percent_mean))
        .collect::<Vec<_>>()
        .join(", ")
}

pub fn round1(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

pub fn write_json<T: Serialize>(path: &Path, value: &T) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))
}

pub fn write_text(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// Draws p50/p95/p99 per 1-second window of send time into an SVG file.
pub fn plot_latency(path: &Path, title: &str, windows: &[Window]) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (960, 540)).into_drawing_area();
    root.fill(&WHITE)
        .map_err(|e| anyhow::anyhow!("plot: {e}"))?;
    let x_max = windows.iter().map(|w| w.t_s).max().unwrap_or(0) as f64 + 1.0;
    let y_max = windows
        .iter()
        .map(|w| w.latency_ms.p99)
        .fold(1.0_f64, f64::max)
        * 1.1;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)
        .map_err(|e| anyhow::anyhow!("plot: {e}"))?;
    chart
        .configure_mesh()
        .x_desc("seconds since the first send (1 s windows of send time)")
        .y_desc("latency publish -> JetStream delivery (ms)")
        .draw()
        .map_err(|e| anyhow::anyhow!("plot: {e}"))?;
    type Pick = fn(&Window) -> f64;
    let series: [(&str, RGBColor, Pick); 3] = [
        ("p50", BLUE, |w| w.latency_ms.p50),
        ("p95", RGBColor(230, 140, 0), |w| w.latency_ms.p95),
        ("p99", RED, |w| w.latency_ms.p99),
    ];
    for (name, color, f) in series {
        chart
            .draw_series(LineSeries::new(
                windows.iter().map(|w| (w.t_s as f64 + 0.5, f(w))),
                color.stroke_width(2),
            ))
            .map_err(|e| anyhow::anyhow!("plot: {e}"))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()
        .map_err(|e| anyhow::anyhow!("plot: {e}"))?;
    root.present().map_err(|e| anyhow::anyhow!("plot: {e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_report() -> Report {
        Report {
            mode: "mqtt",
            run_id: "r".into(),
            started_at: "2026-01-01T00:00:00Z".into(),
            command: "argus-loadtest mqtt".into(),
            machine: Machine::detect(),
            config: serde_json::json!({}),
            accounting: Accounting {
                sent: 10,
                acked: 10,
                persisted: 10,
                published: 10,
                ..Accounting::default()
            },
            publish_duration_s: 1.0,
            publish_rate_msgs_per_s: 10.0,
            throughput_msgs_per_s: 9.5,
            latency_ms: Percentiles {
                count: 10,
                p50: 1.0,
                p95: 2.0,
                p99: 3.0,
                max: 4.0,
                mean: 1.5,
            },
            ack_latency_ms: Percentiles::default(),
            bridge_cpu_percent: None,
            bridge_cpu_percent_max: None,
            bridge_rss_mib: None,
            bridge_rss_mib_mean: None,
            bridge_pids: vec![],
            postgres_rows_per_s: Some(100.0),
            settled_after_s: 0.1,
            windows: vec![Window {
                t_s: 0,
                latency_ms: Percentiles::default(),
            }],
            processes: vec![],
            system_cpu_percent: None,
            other_cpu_percent: None,
            properties: None,
            errors: vec![],
            reconnects: 0,
            resent: 0,
            passed: false,
            notes: vec![],
        }
    }

    #[test]
    fn a_message_stored_without_its_properties_fails_the_run() {
        let mut r = sample_report();
        r.check_properties(PropertiesMode::Chunked, 10, 10, 10);
        assert!(r.passed, "{:?}", r.errors);
        assert_eq!(
            serde_json::to_value(&r).unwrap()["properties"]["mode"],
            "chunked"
        );
        let mut r = sample_report();
        r.check_properties(PropertiesMode::Chunked, 10, 10, 7);
        assert!(!r.passed);
        assert_eq!(
            r.errors,
            ["3 of 10 persisted messages lack their chunk columns"]
        );
        // Without chunks, the chunk columns are not expected.
        let mut r = sample_report();
        r.check_properties(PropertiesMode::User, 9, 10, 0);
        assert_eq!(
            r.errors,
            ["1 of 10 published messages lack their properties"]
        );
    }

    #[test]
    fn json_has_the_contract_fields() {
        let mut r = sample_report();
        r.finish();
        let v = serde_json::to_value(&r).unwrap();
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
            assert!(v.get(f).is_some(), "missing {f}");
        }
        assert_eq!(v["latency_ms"]["p95"], 2.0);
        assert_eq!(v["passed"], true);
        assert!(r.table().contains("PASS"));
        assert!(r.markdown().contains("| lost | 0"));
    }

    #[test]
    fn sender_errors_or_nothing_sent_fail_the_run() {
        let mut r = sample_report();
        r.errors.push("connection 0: refused".into());
        r.finish();
        assert!(!r.passed);
        let mut r = sample_report();
        r.accounting = Accounting::default();
        r.finish();
        assert!(!r.passed, "a run that sent nothing proves nothing");
    }

    #[test]
    fn any_loss_fails_the_run() {
        let mut r = sample_report();
        r.accounting.lost = 1;
        r.finish();
        assert!(!r.passed);
    }

    #[test]
    fn plot_writes_an_svg() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lat.svg");
        let p = |v: f64| Percentiles {
            count: 1,
            p50: v,
            p95: v * 2.0,
            p99: v * 3.0,
            max: v * 4.0,
            mean: v,
        };
        let w: Vec<Window> = (0..5)
            .map(|i| Window {
                t_s: i,
                latency_ms: p(1.0 + i as f64),
            })
            .collect();
        plot_latency(&path, "test", &w).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg") || svg.contains("<svg"));
        assert!(svg.contains("p95"));
    }
}
