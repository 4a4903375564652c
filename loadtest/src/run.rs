//! One measured run, shared by `mqtt` and `http`: collectors first, then the senders (given
//! as a future), then the settle loop, the accounting and the report.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use uuid::Uuid;

use crate::accounting::Observations;
use crate::cli::CommonArgs;
use crate::collect::{self, SharedSeen};
use crate::latency::Latencies;
use crate::payload::now_ns;
use crate::procstat;
use crate::report::{Machine, Report};
use crate::stop::stop_pair;

/// What the senders report back.
pub struct Sent {
    pub sent: u64,
    pub acked: Vec<u64>,
    pub first_send_ns: u64,
    pub last_send_ns: u64,
    pub ack_latency: Latencies,
    pub errors: Vec<String>,
    /// MQTT: sessions re-established after a lost connection.
    pub reconnects: u64,
    /// MQTT: messages published again after a reconnect (not yet acknowledged when the
    /// connection was lost).
    pub resent: u64,
    /// Added to the report's notes.
    pub notes: Vec<String>,
}

pub fn new_run_id() -> String {
    format!("lt{:08x}", rand::random::<u32>())
}

/// Collectors and samplers around one run.
pub struct Harness {
    pub run_id: String,
    pub common: CommonArgs,
    pub pg: collect::PgConn,
    pub nats: async_nats::Client,
    pub device_ids: Vec<Uuid>,
    raw: Option<SharedSeen>,
    dlq: Option<SharedSeen>,
    pub start_ns: u64,
    pub pids: Vec<u32>,
    pid_prefix: &'static str,
}

impl Harness {
    /// `pid_prefix`: which `.pid` files in `--pid-dir` name the processes to sample when no
    /// `--bridge-pid` is given (`bridge-` for MQTT runs, `ingest-http` for HTTP runs).
    pub async fn connect(
        common: &CommonArgs,
        run_id: String,
        pid_prefix: &'static str,
    ) -> anyhow::Result<Harness> {
        let pg = collect::PgConn::connect(&common.database_url).await?;
        let nats = collect::connect_nats(&common.nats_urls, &common.nats_auth.auth()?).await?;
        let pids = if common.bridge_pids.is_empty() {
            procstat::pids_from_dir(&common.pid_dir, pid_prefix)
        } else {
            common.bridge_pids.clone()
        };
        Ok(Harness {
            run_id,
            common: common.clone(),
            pg,
            nats,
            device_ids: Vec::new(),
            raw: None,
            dlq: None,
            start_ns: 0,
            pids,
            pid_prefix,
        })
    }

    /// Starts the consumers (before the first publish, so `DeliverPolicy::New` sees it all).
    pub async fn start_collectors(&mut self, device_ids: Vec<Uuid>) -> anyhow::Result<()> {
        let js = async_nats::jetstream::new(self.nats.clone());
        self.start_ns = now_ns();
        self.raw = Some(
            collect::spawn_collector(
                &js,
                &self.common.raw_stream,
                collect::raw_filters(&device_ids),
                &self.run_id,
                Some(self.start_ns),
            )
            .await?,
        );
        self.dlq = Some(
            collect::spawn_collector(
                &js,
                &self.common.dlq_stream,
                vec![collect::DLQ_SUBJECTS.to_string()],
                &self.run_id,
                None,
            )
            .await?,
        );
        self.device_ids = device_ids;
        Ok(())
    }

    pub fn progress(&self, len: Option<u64>) -> ProgressBar {
        if self.common.quiet {
            return ProgressBar::hidden();
        }
        let pb = match len {
            Some(n) => ProgressBar::new(n),
            None => ProgressBar::no_length(),
        };
        let style = ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} acked ({per_sec}) {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar());
        pb.set_style(style);
        pb
    }

    /// Messages of the run in the raw stream whose envelope carries `properties`.
    pub fn published_with_properties(&self) -> u64 {
        self.raw.as_ref().map_or(0, |r| {
            r.lock().unwrap_or_else(|e| e.into_inner()).with_properties
        })
    }

    /// Runs `senders` while sampling the bridge, then waits for stragglers and reports.
    pub async fn measure<F>(
        &mut self,
        mode: &'static str,
        config: serde_json::Value,
        senders: F,
    ) -> anyhow::Result<Report>
    where
        F: std::future::Future<Output = anyhow::Result<Sent>>,
    {
        let (raw, dlq) = match (&self.raw, &self.dlq) {
            (Some(r), Some(d)) => (r.clone(), d.clone()),
            _ => anyhow::bail!("start_collectors must run before measure"),
        };
        let started_at = chrono::Utc::now().to_rfc3339();
        let (stop_handle, stop) = stop_pair();
        let sampler = tokio::spawn(procstat::sample(
            self.pids.clone(),
            Duration::from_millis(500),
            stop,
        ));

        let (group_stop_handle, group_stop) = stop_pair();
        let group_sampler = tokio::spawn(procstat::sample_groups(
            procstat::groups_from_dir(&self.common.pid_dir),
            Duration::from_millis(500),
            group_stop,
        ));

        let sent = senders.await?;

        // Settle: poll until every acked message is in both stores (or dead-lettered).
        let settle_start = Instant::now();
        let deadline = settle_start + self.common.settle;
        let acked: HashSet<u64> = sent.acked.iter().copied().collect();
        let mut obs;
        let mut notes_pg: Option<String> = None;
        loop {
            obs = Observations {
                sent: sent.sent,
                acked: acked.clone(),
                postgres: self
                    .pg
                    .counts_until(&self.device_ids, &self.run_id, deadline)
                    .await?,
                jetstream: collect::counts_of(&raw),
                dead_letters: collect::counts_of(&dlq),
            };
            if obs.complete() || Instant::now() >= deadline {
                break;
            }
            // The Postgres count parses every row's payload: poll big runs less often.
            let pause = if acked.len() > 20_000 { 1_000 } else { 250 };
            tokio::time::sleep(Duration::from_millis(pause)).await;
        }
        let settled_after_s = settle_start.elapsed().as_secs_f64();
        // Duplicates arrive after the originals: give them a short grace period when
        // everything is already accounted for.
        if obs.complete() {
            tokio::time::sleep(Duration::from_millis(500)).await;
            // The grace period may end past the deadline: allow a few seconds to reconnect.
            obs.postgres = self
                .pg
                .counts_until(
                    &self.device_ids,
                    &self.run_id,
                    Instant::now() + Duration::from_secs(5),
                )
                .await?;
            obs.jetstream = collect::counts_of(&raw);
            obs.dead_letters = collect::counts_of(&dlq);
        }
        stop_handle.stop();
        let samples = sampler.await.unwrap_or_default();
        group_stop_handle.stop();
        let (processes, system_cpu_percent) = group_sampler.await.unwrap_or_default();

        let accounting = obs.account();
        if self.pg.reconnects > 0 {
            notes_pg = Some(format!(
                "the load tester's Postgres session was made again {} time(s) for the accounting",
                self.pg.reconnects
            ));
        }
        let (latency, windows, last_seen_ns) = {
            let g = raw.lock().unwrap_or_else(|e| e.into_inner());
            let l = g.latencies.as_ref();
            (
                l.map(Latencies::summary).unwrap_or_default(),
                l.map(Latencies::windows).unwrap_or_default(),
                g.last_seen_ns,
            )
        };
        let publish_duration_s =
            (sent.last_send_ns.saturating_sub(sent.first_send_ns)) as f64 / 1e9;
        let e2e_span_s = (last_seen_ns.saturating_sub(sent.first_send_ns)) as f64 / 1e9;
        let mut notes: Vec<String> = sent.notes.clone();
        notes.extend(notes_pg);
        if self.pids.is_empty() {
            notes.push(format!(
                "CPU/RSS not sampled: no --bridge-pid and no live {}*.pid in {}",
                self.pid_prefix,
                self.common.pid_dir.display()
            ));
        }
        let mut report = Report {
            mode,
            run_id: self.run_id.clone(),
            started_at,
            command: std::env::args().collect::<Vec<_>>().join(" "),
            machine: Machine::detect(),
            config,
            accounting,
            publish_duration_s,
            publish_rate_msgs_per_s: if publish_duration_s > 0.0 {
                sent.sent as f64 / publish_duration_s
            } else {
                0.0
            },
            throughput_msgs_per_s: if e2e_span_s > 0.0 {
                accounting.published as f64 / e2e_span_s
            } else {
                0.0
            },
            latency_ms: latency,
            ack_latency_ms: sent.ack_latency.summary(),
            bridge_cpu_percent: None,
            bridge_cpu_percent_max: None,
            bridge_rss_mib: None,
            bridge_rss_mib_mean: None,
            bridge_pids: self.pids.clone(),
            postgres_rows_per_s: self.pg.write_rate(&self.device_ids, &self.run_id).await,
            settled_after_s,
            windows,
            errors: sent.errors.clone(),
            reconnects: sent.reconnects,
            resent: sent.resent,
            other_cpu_percent: system_cpu_percent.map(|s| {
                let ours: f64 = processes.iter().map(|p| p.cpu_percent_mean).sum();
                crate::report::round1((s.cpu_percent_mean - ours).max(0.0))
            }),
            processes,
            system_cpu_percent,
            properties: None,
            passed: false,
            notes,
        };
        report.set_proc(procstat::summarize(&samples));
        if !self.pids.is_empty()
            && self.pid_prefix != "bridge-"
            && self.common.bridge_pids.is_empty()
        {
            report.notes.push(format!(
                "bridge_cpu_percent / bridge_rss_mib sample the {}*.pid processes of this mode",
                self.pid_prefix
            ));
        }
        report.finish();
        Ok(report)
    }
}

/// Writes the report's files as asked and prints the table.
pub fn emit(report: &Report, common: &CommonArgs) -> anyhow::Result<()> {
    println!("{}", report.table());
    if let Some(p) = &common.json {
        crate::report::write_json(p, report)?;
    }
    if let Some(p) = &common.markdown {
        crate::report::write_text(p, &report.markdown())?;
    }
    if let Some(p) = &common.plot {
        let title = format!(
            "argus-loadtest {} {}: latency publish -> JetStream",
            report.mode, report.run_id
        );
        crate::report::plot_latency(p, &title, &report.windows).context("writing the plot")?;
    }
    Ok(())
}
