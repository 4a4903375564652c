//! The `argus-dlq` command line: `list` and `replay`, and what each run does.

use std::io::IsTerminal as _;
use std::time::Duration;

use anyhow::Context as _;
use argus_pipeline::dlq::{DlqPublisher, DlqReason, StoredLetter};
use argus_pipeline::flags::{parse_duration, NatsArgs, PgArgs};
use argus_pipeline::registry::{Registry, RegistryConfig};
use argus_pipeline::sink::{Sink, SinkConfig};
use chrono::{DateTime, Utc};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use uuid::Uuid;

use super::filter::Filter;
use super::outcome::Outcome;
use super::outcome::Replayer;
use super::report::{table, Summary};
use super::scan::Scan;
use crate::admit::Admit;
use crate::config::{AdmitArgs, BridgeEnv};

/// `argus-dlq`: read the dead-letter stream and replay it through the bridge's admit path.
#[derive(Debug, Parser)]
#[command(
    name = "argus-dlq",
    version,
    about = "List the dead letters in TELEMETRY_DLQ, and replay them through the bridge's checks, registry and sink.",
    long_about = "List the dead letters in TELEMETRY_DLQ, and replay them through the bridge's checks, \
registry and sink (the path live MQTT traffic takes).\n\n\
A replay stores each letter that is accepted now under the id it would have had live, so a \
second replay stores nothing twice. It keeps its progress in a durable JetStream consumer: run \
the same command again to resume an interrupted replay. See docs/runbook.md, \"The dead-letter stream\"."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Dead letters matching the filters, oldest first, and their counts by reason.
    List(ListArgs),
    /// Send matching dead letters back through the admit path; ends with a summary table.
    Replay(ReplayArgs),
}

/// Which letters (all flags together; none selects every letter).
#[derive(Debug, Clone, Args)]
pub struct FilterArgs {
    /// Only letters with this reason, e.g. `unknown_device`.
    #[arg(long, value_parser = parse_reason)]
    pub reason: Option<DlqReason>,
    /// Only letters of this device (its UUID).
    #[arg(long)]
    pub device: Option<Uuid>,
    /// Only letters received at or after this time: RFC 3339 (`2026-12-07T08:00:00Z`) or an age (`2h`, `30m`).
    #[arg(long, value_parser = parse_time)]
    pub since: Option<DateTime<Utc>>,
    /// Only letters received before this time (same forms as `--since`).
    #[arg(long, value_parser = parse_time)]
    pub until: Option<DateTime<Utc>>,
}

impl FilterArgs {
    fn filter(&self) -> Filter {
        Filter {
            reason: self.reason,
            device: self.device,
            since: self.since,
            until: self.until,
        }
    }
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub filter: FilterArgs,
    /// Print at most this many letters (the counts cover them all).
    #[arg(long, default_value_t = 20)]
    pub limit: usize,
    /// Print JSON (`{"letters": [...], "byReason": {...}, "total": N}`) instead of tables.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub nats: NatsArgs,
}

#[derive(Debug, Args)]
pub struct ReplayArgs {
    #[command(flatten)]
    pub filter: FilterArgs,
    /// Decide what each letter would become, and write nothing (no consumer is kept either).
    #[arg(long)]
    pub dry_run: bool,
    /// Stop after this many letters; the next run with the same filters resumes after them.
    #[arg(long)]
    pub max_letters: Option<u64>,
    /// At most this many letters per second (0: as fast as the sink takes them).
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Letters fetched and made durable together.
    #[arg(long, default_value_t = 100)]
    pub batch: usize,
    /// How long a letter an interrupted run had waits before the next run takes it again.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub ack_wait: Duration,
    /// Print the summary as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// The bridge's bounds (its flags and env names).
    #[command(flatten)]
    pub admit: AdmitArgs,
    #[command(flatten)]
    pub pg: PgArgs<BridgeEnv>,
    #[command(flatten)]
    pub nats: NatsArgs,
}

fn parse_reason(s: &str) -> Result<DlqReason, String> {
    DlqReason::parse(s).ok_or_else(|| {
        let all: Vec<_> = DlqReason::ALL.iter().map(|r| r.as_str()).collect();
        format!("{s:?} is not a reason; one of {}", all.join(", "))
    })
}

fn parse_time(s: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    let age = parse_duration(s)
        .map_err(|_| format!("{s:?} is neither an RFC 3339 time nor an age like 2h"))?;
    let age = chrono::Duration::from_std(age).map_err(|e| e.to_string())?;
    Ok(Utc::now() - age)
}

async fn jetstream(nats: &NatsArgs) -> anyhow::Result<async_nats::jetstream::Context> {
    let urls = nats.validate()?;
    let client = argus_pipeline::nats::connect(
        nats.auth()?,
        &urls,
        "argus-dlq",
        argus_schema::nats::Unreachable::Fail,
    )
    .await?;
    Ok(async_nats::jetstream::new(client))
}

/// `argus-dlq list`.
pub async fn list(args: ListArgs) -> anyhow::Result<()> {
    let filter = args.filter.filter();
    let js = jetstream(&args.nats).await?;
    let mut scan = Scan::ephemeral(&js, &filter).await?;
    let mut by_reason = std::collections::BTreeMap::<String, u64>::new();
    let (mut shown, mut total, mut unreadable) = (Vec::new(), 0u64, 0u64);
    while let Some(batch) = scan.next_batch(500).await? {
        for d in batch {
            let Ok(stored) = StoredLetter::decode(&d.record) else {
                unreadable += 1;
                continue;
            };
            if !filter.matches(&stored) {
                continue;
            }
            total += 1;
            *by_reason
                .entry(stored.letter.reason.to_string())
                .or_default() += 1;
            if shown.len() < args.limit {
                shown.push((d.seq, stored));
            }
        }
    }
    if args.json {
        let letters: Vec<_> = shown
            .iter()
            .map(|(seq, s)| {
                let mut v: serde_json::Value =
                    serde_json::from_slice(&s.letter.encode()).unwrap_or_default();
                v["seq"] = (*seq).into();
                v
            })
            .collect();
        let out = serde_json::json!({"letters": letters, "byReason": by_reason, "total": total, "unreadable": unreadable});
        println!("{out}");
        return Ok(());
    }
    for (seq, s) in &shown {
        let l = &s.letter;
        let device = l.device_id.map_or("-".to_string(), |d| d.to_string());
        let source = if l.topic.is_some() { "mqtt" } else { "http" };
        let truncated = if s.truncated.is_some() {
            " [truncated]"
        } else {
            ""
        };
        println!(
            "{seq:>8}  {}  {:<18} {device:<36}  {source:<4}  {}{truncated}",
            l.received_at
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            l.reason.as_str(),
            l.detail
        );
    }
    if total as usize > shown.len() {
        println!("... {} more (--limit)", total as usize - shown.len());
    }
    println!("\nLetters by reason:");
    let mut rows: Vec<_> = by_reason.into_iter().collect();
    rows.push(("total".into(), total));
    if unreadable > 0 {
        rows.push(("unreadable records".into(), unreadable));
    }
    print!("{}", table(&rows));
    Ok(())
}

/// `argus-dlq replay`. Returns the summary; `interrupt` stops it between batches.
pub async fn replay(
    args: ReplayArgs,
    interrupt: impl std::future::Future<Output = ()>,
) -> anyhow::Result<Summary> {
    anyhow::ensure!(args.batch >= 1, "invalid --batch: must be at least 1");
    anyhow::ensure!(
        args.rate >= 0.0 && args.rate.is_finite(),
        "invalid --rate: must be 0 or more"
    );
    args.pg.validate()?;
    let (limits, property_limits) = args.admit.validate()?;
    let filter = args.filter.filter();
    let js = jetstream(&args.nats).await?;
    let pool = argus_pipeline::pg::pool(
        &args.pg.url()?,
        args.pg.pg_pool_size,
        argus_pipeline::pg::PoolTimeouts {
            create: Duration::from_secs(5),
            wait: Duration::from_secs(10),
        },
    )
    .map_err(|e| anyhow::anyhow!("--database-url: {e}"))?;
    // Devices are looked up in Postgres, not through the shared Redis cache:
    // its "absent" entry for a device registered moments ago may not have
    // expired yet, and a replay is run just after such a fix.
    let registry =
        Registry::start(RegistryConfig::default(), pool.clone()).context("device registry")?;
    let (sink, sink_task) = Sink::start(
        SinkConfig {
            batch_size: args.batch,
            ..SinkConfig::default()
        },
        pool.clone(),
        js.clone(),
    );
    let replayer = Replayer {
        admit: Admit {
            sink: sink.clone(),
            registry,
            dlq: DlqPublisher::new(js.clone()),
            limits,
            property_limits,
        },
        pool,
        dry_run: args.dry_run,
    };
    let mut scan = if args.dry_run {
        Scan::ephemeral(&js, &filter).await?
    } else {
        Scan::durable(&js, &filter, args.ack_wait).await?
    };
    let mut summary = Summary {
        dry_run: args.dry_run,
        resumed: scan.start.resumed,
        ..Summary::default()
    };
    if scan.start.resumed {
        tracing::info!(consumer = %filter.durable_name(), until_seq = scan.start.until_seq, "Resuming an interrupted replay.");
    }
    let bar = if std::io::stderr().is_terminal() {
        ProgressBar::new(scan.start.pending)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} letters  {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut pace =
        (args.rate > 0.0).then(|| tokio::time::interval(Duration::from_secs_f64(1.0 / args.rate)));
    tokio::pin!(interrupt);
    let mut complete = true;
    loop {
        let room = args.max_letters.map_or(args.batch as u64, |m| {
            m.saturating_sub(summary.read).min(args.batch as u64)
        });
        if room == 0 {
            complete = false;
            break;
        }
        let want = if pace.is_some() { 1 } else { room as usize };
        let next = tokio::select! {
            b = scan.next_batch(want) => b?,
            () = &mut interrupt => { complete = false; break; }
        };
        let Some(batch) = next else { break };
        if let Some(p) = pace.as_mut() {
            p.tick().await;
        }
        let outcomes = replayer.batch(&batch, &filter).await?;
        for (delivery, outcome) in batch.into_iter().zip(&outcomes) {
            let seq = delivery.seq;
            scan.done(delivery).await?;
            if let Outcome::Unreadable(why) = outcome {
                tracing::warn!(seq, %why, "Dead letter cannot be replayed; left as it is.");
            }
            if matches!(
                outcome,
                Outcome::Rejected {
                    rewritten: true,
                    ..
                }
            ) && !args.dry_run
            {
                scan.remove(seq).await?;
            }
            summary.count(outcome);
        }
        bar.set_position(summary.read);
        bar.set_message(format!(
            "{} stored, {} rejected",
            summary.stored,
            summary.rejected()
        ));
    }
    bar.finish_and_clear();
    summary.complete = complete;
    if complete && !args.dry_run {
        scan.finish().await?;
    }
    sink.close();
    let _ = sink_task.await;
    Ok(summary)
}
