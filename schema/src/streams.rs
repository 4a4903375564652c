//! JetStream topology as code: the plan's six streams (§W1-T3 3.2) and six durable pull
//! consumers (§3.3), defined once in [`STREAMS`] and [`CONSUMERS`].
//!
//! - [`apply`] creates what is missing and updates what differs; a second run reports every
//!   item [`Action::Unchanged`]. A setting NATS cannot change in place (stream storage or
//!   retention; consumer deliver/ack/replay policy, push vs pull) is not sent: it is returned as
//!   [`StreamsError::CannotChange`] naming stream, consumer and field, after the rest was applied.
//! - [`verify`] lists every difference between the servers and the definition ([`Drift`]).
//! - [`run_cli`]: `argus-schema streams apply|verify|show`.
//!
//! Wire format: requests are JSON this module builds itself (not async-nats' config structs),
//! so it sends only the fields the definitions use, all known since nats-server 2.9 (no metadata,
//! subject transforms, compression, `filter_subjects`, consumer `action`). Tests, the local
//! stack and production run the release pinned in compose/nats/requirements.txt.
//!
//! Replicas: [`detect_replicas`] asks the servers. A server outside a cluster (its INFO has no
//! cluster name) holds 1. In a cluster, a tiny in-memory probe stream is created with 3, then 2
//! replicas and deleted at once; the meta leader only places it if that many JetStream servers
//! are up, so this counts JetStream-enabled servers, not just routes. With no `--replicas`,
//! apply never lowers the replicas an existing stream has (a node that is down during a run
//! must not scale production down).

use std::fmt;
use std::time::Duration;

use async_nats::jetstream;
use serde_json::{json, Value};

use crate::nats::{NatsAuth, NatsAuthArgs, Unreachable};

/// One stream of the plan's §3.2.
#[derive(Debug, Clone, Copy)]
pub struct StreamSpec {
    pub name: &'static str,
    pub subjects: &'static [&'static str],
    pub max_age: Duration,
    pub max_bytes: i64,
    /// `None`: the server default ([`SERVER_DEFAULT_DUPLICATE_WINDOW`]); the plan sets it only
    /// for `TELEMETRY_RAW_V1`.
    pub duplicate_window: Option<Duration>,
}

/// One durable consumer of the plan's §3.3 (ack explicit, deliver all, max deliver 3).
#[derive(Debug, Clone, Copy)]
pub struct ConsumerSpec {
    pub stream: &'static str,
    pub durable: &'static str,
    pub ack_wait: Duration,
}

const DAY: u64 = 24 * 60 * 60;
const GIB: i64 = 1024 * 1024 * 1024;

/// nats-server's duplicate window when none is given: 2 minutes (or max_age if shorter).
pub const SERVER_DEFAULT_DUPLICATE_WINDOW: Duration = Duration::from_secs(120);
/// Deliveries per message before the server gives up on it (plan §3.3).
pub const MAX_DELIVER: i64 = 3;

// Subject and stream names of the two streams the ingestion edge writes, defined once
// here; `argus-pipeline` (envelope, dead letters), the load tester and the tests take
// them from these constants. A macro, so that the `>` wildcards below are built from
// the same literal at compile time.
macro_rules! raw_prefix {
    () => {
        "telemetry.raw.v1"
    };
}
macro_rules! dlq_prefix {
    () => {
        "telemetry.dlq"
    };
}

/// The raw telemetry stream: every accepted reading, once.
pub const RAW_STREAM: &str = "TELEMETRY_RAW_V1";
/// Subject prefix of [`RAW_STREAM`]; the device id is the last token.
pub const RAW_SUBJECT_PREFIX: &str = raw_prefix!();
/// Every subject of [`RAW_STREAM`].
pub const RAW_SUBJECTS: &str = concat!(raw_prefix!(), ".>");
/// The dead-letter stream: refused input, with its reason.
pub const DLQ_STREAM: &str = "TELEMETRY_DLQ";
/// Subject prefix of [`DLQ_STREAM`]; the reason is the last token.
pub const DLQ_SUBJECT_PREFIX: &str = dlq_prefix!();
/// Every subject of [`DLQ_STREAM`].
pub const DLQ_SUBJECTS: &str = concat!(dlq_prefix!(), ".>");

/// The plan's six streams: limits retention, file storage, discard old.
pub const STREAMS: &[StreamSpec] = &[
    StreamSpec {
        name: RAW_STREAM,
        subjects: &[RAW_SUBJECTS],
        max_age: Duration::from_secs(7 * DAY),
        max_bytes: 10 * GIB,
        duplicate_window: Some(Duration::from_secs(120)),
    },
    StreamSpec {
        name: "TELEMETRY_LOGICAL_DEVICES_V1",
        subjects: &["telemetry.logical_devices.v1.>"],
        max_age: Duration::from_secs(DAY),
        max_bytes: 5 * GIB,
        duplicate_window: None,
    },
    StreamSpec {
        name: "TELEMETRY_NORMALIZED_V1",
        subjects: &["telemetry.normalized.v1.>"],
        max_age: Duration::from_secs(DAY),
        max_bytes: 5 * GIB,
        duplicate_window: None,
    },
    StreamSpec {
        name: "TELEMETRY_ASSET_V1",
        subjects: &["telemetry.asset.v1.>"],
        max_age: Duration::from_secs(DAY),
        max_bytes: 5 * GIB,
        duplicate_window: None,
    },
    StreamSpec {
        name: "EVENTS_V1",
        subjects: &["events.v1.>"],
        max_age: Duration::from_secs(30 * DAY),
        max_bytes: 2 * GIB,
        duplicate_window: None,
    },
    StreamSpec {
        name: DLQ_STREAM,
        subjects: &[DLQ_SUBJECTS],
        max_age: Duration::from_secs(30 * DAY),
        max_bytes: GIB,
        duplicate_window: None,
    },
];

/// The plan's six durable pull consumers.
pub const CONSUMERS: &[ConsumerSpec] = &[
    ConsumerSpec {
        stream: RAW_STREAM,
        durable: "demux-processor-group",
        ack_wait: Duration::from_secs(30),
    },
    ConsumerSpec {
        stream: "TELEMETRY_LOGICAL_DEVICES_V1",
        durable: "normalization-processor-group",
        ack_wait: Duration::from_secs(30),
    },
    ConsumerSpec {
        stream: "TELEMETRY_NORMALIZED_V1",
        durable: "tsdb-writer-group",
        ack_wait: Duration::from_secs(60),
    },
    ConsumerSpec {
        stream: "TELEMETRY_NORMALIZED_V1",
        durable: "asset-processor-group",
        ack_wait: Duration::from_secs(30),
    },
    ConsumerSpec {
        stream: "TELEMETRY_ASSET_V1",
        durable: "realtime-broadcaster-group",
        ack_wait: Duration::from_secs(10),
    },
    ConsumerSpec {
        stream: "TELEMETRY_ASSET_V1",
        durable: "event-engine-group",
        ack_wait: Duration::from_secs(30),
    },
];

/// Raw telemetry subject of one device: `telemetry.raw.v1.<deviceId>`.
pub fn raw_subject(device_id: &uuid::Uuid) -> String {
    format!("{RAW_SUBJECT_PREFIX}.{device_id}")
}

/// Dead-letter subject: `telemetry.dlq.<reason>`.
pub fn dlq_subject(reason: &str) -> String {
    format!("{DLQ_SUBJECT_PREFIX}.{reason}")
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl StreamSpec {
    /// The `StreamConfig` JSON sent to `$JS.API.STREAM.CREATE|UPDATE.<name>` (2.9 fields only).
    pub fn config_json(&self, replicas: usize) -> Value {
        let mut v = json!({
            "name": self.name,
            "subjects": self.subjects,
            "retention": "limits",
            "max_consumers": -1,
            "max_msgs": -1,
            "max_bytes": self.max_bytes,
            "max_age": nanos(self.max_age),
            "max_msgs_per_subject": -1,
            "max_msg_size": -1,
            "discard": "old",
            "storage": "file",
            "num_replicas": replicas,
        });
        if let (Some(d), Some(obj)) = (self.duplicate_window, v.as_object_mut()) {
            obj.insert("duplicate_window".into(), json!(nanos(d)));
        }
        v
    }

    /// (field, wanted value, can NATS change it in place) as the server reports them.
    fn expected(&self, replicas: usize) -> Vec<(&'static str, Value, bool)> {
        let dup = self
            .duplicate_window
            .unwrap_or(SERVER_DEFAULT_DUPLICATE_WINDOW);
        vec![
            ("storage", json!("file"), false),
            ("retention", json!("limits"), false),
            ("subjects", json!(self.subjects), true),
            ("max_age", json!(nanos(self.max_age)), true),
            ("max_bytes", json!(self.max_bytes), true),
            ("max_msgs", json!(-1), true),
            ("max_msgs_per_subject", json!(-1), true),
            ("max_msg_size", json!(-1), true),
            ("max_consumers", json!(-1), true),
            ("discard", json!("old"), true),
            ("duplicate_window", json!(nanos(dup)), true),
            ("num_replicas", json!(replicas), true),
        ]
    }
}

impl ConsumerSpec {
    /// The `ConsumerConfig` JSON: a durable pull consumer (no `deliver_subject`).
    pub fn config_json(&self) -> Value {
        json!({
            "durable_name": self.durable,
            "name": self.durable,
            "deliver_policy": "all",
            "ack_policy": "explicit",
            "ack_wait": nanos(self.ack_wait),
            "max_deliver": MAX_DELIVER,
            "replay_policy": "instant",
        })
    }

    fn expected(&self) -> Vec<(&'static str, Value, bool)> {
        vec![
            ("deliver_policy", json!("all"), false),
            ("ack_policy", json!("explicit"), false),
            ("replay_policy", json!("instant"), false),
            // Pull consumer: no deliver subject. Push <-> pull cannot change in place.
            ("deliver_subject", Value::Null, false),
            ("filter_subject", Value::Null, true),
            ("ack_wait", json!(nanos(self.ack_wait)), true),
            ("max_deliver", json!(MAX_DELIVER), true),
        ]
    }
}

/// One difference between the live servers and the definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drift {
    pub stream: String,
    /// `None` for a stream setting.
    pub consumer: Option<String>,
    /// The JetStream config field (`max_bytes`, `ack_wait`, ...), or `exists`.
    pub field: String,
    /// Live value as JSON text (`missing` if the stream or consumer does not exist).
    pub live: String,
    pub wanted: String,
}

impl fmt::Display for Drift {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.consumer {
            Some(c) => write!(f, "stream {} consumer {}", self.stream, c)?,
            None => write!(f, "stream {}", self.stream)?,
        }
        write!(
            f,
            ": {} is {}, wanted {}",
            self.field, self.live, self.wanted
        )
    }
}

/// What [`apply`] did to one stream or consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Created,
    /// Updated in place; the fields that differed.
    Updated(Vec<String>),
    Unchanged,
    /// Not touched: a field differs that NATS cannot change in place (see [`StreamsError::CannotChange`]).
    Conflict(Vec<String>),
}

/// One line of an [`ApplyReport`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemReport {
    pub stream: String,
    pub consumer: Option<String>,
    pub action: Action,
}

impl fmt::Display for ItemReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.consumer {
            Some(c) => write!(f, "consumer {}/{}: ", self.stream, c)?,
            None => write!(f, "stream {}: ", self.stream)?,
        }
        match &self.action {
            Action::Created => write!(f, "created"),
            Action::Updated(fields) => write!(f, "updated ({})", fields.join(", ")),
            Action::Unchanged => write!(f, "unchanged"),
            Action::Conflict(fields) => {
                write!(f, "CANNOT CHANGE IN PLACE ({})", fields.join(", "))
            }
        }
    }
}

/// Result of [`apply`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplyReport {
    /// Replicas wanted for new streams (given, or detected).
    pub replicas: usize,
    /// One entry per stream and consumer, in definition order.
    pub items: Vec<ItemReport>,
}

impl ApplyReport {
    /// True if nothing was created or updated.
    pub fn is_unchanged(&self) -> bool {
        self.items.iter().all(|i| i.action == Action::Unchanged)
    }
}

/// Errors of [`apply`], [`verify`] and [`detect_replicas`].
#[derive(Debug, thiserror::Error)]
pub enum StreamsError {
    /// No answer from the JetStream API (timeout, no responders: JetStream not enabled?).
    #[error("JetStream request {subject} failed: {reason}")]
    Request { subject: String, reason: String },
    /// The JetStream API answered with an error.
    #[error("JetStream refused {what}: {description} (code {code}, err_code {err_code})")]
    Api {
        what: String,
        code: u64,
        err_code: u64,
        description: String,
    },
    /// Settings NATS cannot change in place; everything else was applied ([`ApplyReport`]
    /// inside). Fix by hand (e.g. recreate the consumer or back up and recreate the stream).
    #[error("{} setting(s) cannot be changed in place: {}", .conflicts.len(), join(.conflicts))]
    CannotChange {
        conflicts: Vec<Drift>,
        report: ApplyReport,
    },
    /// `--replicas` out of range.
    #[error("invalid replicas {0}: must be 1..=5")]
    InvalidReplicas(usize),
}

impl StreamsError {
    /// True if retrying later may succeed (server unavailable, no JetStream leader yet).
    pub fn is_retriable(&self) -> bool {
        match self {
            Self::Request { .. } => true,
            // 10008: JetStream not temporarily available; 10023: insufficient resources.
            Self::Api { err_code, .. } => matches!(err_code, 10008 | 10023),
            Self::CannotChange { .. } | Self::InvalidReplicas(_) => false,
        }
    }
}

fn join(d: &[Drift]) -> String {
    d.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

const ERR_STREAM_NOT_FOUND: u64 = 10059;
const ERR_CONSUMER_NOT_FOUND: u64 = 10014;

/// Timeout of one JetStream API request (stream creation with 3 replicas takes a moment).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

fn context(client: &async_nats::Client) -> jetstream::Context {
    jetstream::ContextBuilder::new()
        .timeout(REQUEST_TIMEOUT)
        .build(client.clone())
}

/// Sends one JetStream API request; `Ok(Err(api error))` when the server refused it.
async fn api(
    js: &jetstream::Context,
    subject: &str,
    body: &Value,
) -> Result<Result<Value, StreamsError>, StreamsError> {
    let resp: Value =
        js.request(subject.to_owned(), body)
            .await
            .map_err(|e| StreamsError::Request {
                subject: format!("$JS.API.{subject}"),
                reason: e.to_string(),
            })?;
    if let Some(err) = resp.get("error") {
        let num = |k: &str| err.get(k).and_then(Value::as_u64).unwrap_or(0);
        return Ok(Err(StreamsError::Api {
            what: subject.to_owned(),
            code: num("code"),
            err_code: num("err_code"),
            description: err
                .get("description")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned(),
        }));
    }
    Ok(Ok(resp))
}

fn is_err_code(e: &StreamsError, code: u64) -> bool {
    matches!(e, StreamsError::Api { err_code, .. } if *err_code == code)
}

/// The live config of a stream, `None` if it does not exist.
async fn stream_config(js: &jetstream::Context, name: &str) -> Result<Option<Value>, StreamsError> {
    match api(js, &format!("STREAM.INFO.{name}"), &json!({})).await? {
        Ok(mut info) => Ok(Some(info["config"].take())),
        Err(e) if is_err_code(&e, ERR_STREAM_NOT_FOUND) => Ok(None),
        Err(e) => Err(e),
    }
}

async fn consumer_config(
    js: &jetstream::Context,
    stream: &str,
    durable: &str,
) -> Result<Option<Value>, StreamsError> {
    match api(js, &format!("CONSUMER.INFO.{stream}.{durable}"), &json!({})).await? {
        Ok(mut info) => Ok(Some(info["config"].take())),
        Err(e) if is_err_code(&e, ERR_CONSUMER_NOT_FOUND) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Normalises what the server reports for comparison: absent, `""` and `[]` are "unset".
fn live_value(config: &Value, field: &str) -> Value {
    match config.get(field) {
        None | Some(Value::Null) => Value::Null,
        Some(Value::String(s)) if s.is_empty() => Value::Null,
        Some(v) => v.clone(),
    }
}

fn diff(
    stream: &str,
    consumer: Option<&str>,
    live: &Value,
    expected: Vec<(&'static str, Value, bool)>,
) -> Vec<(Drift, bool)> {
    expected
        .into_iter()
        .filter_map(|(field, wanted, mutable)| {
            let have = live_value(live, field);
            (have != wanted).then(|| {
                let text = |v: &Value| {
                    if v.is_null() {
                        "unset".to_owned()
                    } else {
                        v.to_string()
                    }
                };
                (
                    Drift {
                        stream: stream.to_owned(),
                        consumer: consumer.map(str::to_owned),
                        field: field.to_owned(),
                        live: text(&have),
                        wanted: text(&wanted),
                    },
                    mutable,
                )
            })
        })
        .collect()
}

fn live_replicas(config: &Value) -> usize {
    config
        .get("num_replicas")
        .and_then(Value::as_u64)
        .map_or(1, |r| r.max(1) as usize)
}

/// Replicas the servers can hold: 1 outside a cluster; in a cluster min(3, JetStream servers
/// up), found with a short-lived in-memory probe stream (see the module docs).
pub async fn detect_replicas(client: &async_nats::Client) -> Result<usize, StreamsError> {
    if client.server_info().cluster.is_none() {
        return Ok(1);
    }
    let js = context(client);
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let name = format!("ARGUS_REPLICAS_PROBE_{}", &tag[..12]);
    for replicas in [3usize, 2] {
        let body = json!({
            "name": name,
            "subjects": [format!("_argus.replicas_probe.{tag}")],
            "retention": "limits",
            "max_msgs": 1,
            "storage": "memory",
            "num_replicas": replicas,
        });
        match api(&js, &format!("STREAM.CREATE.{name}"), &body).await? {
            Ok(_) => {
                if let Err(e) = api(&js, &format!("STREAM.DELETE.{name}"), &json!({})).await? {
                    tracing::warn!(stream = %name, error = %e, "Could not delete the replicas probe stream.");
                }
                return Ok(replicas);
            }
            Err(e) => {
                tracing::debug!(replicas, error = %e, "Replicas probe refused.");
            }
        }
    }
    Ok(1)
}

/// Creates the missing streams and consumers and updates those that differ (idempotent).
///
/// `replicas`: `Some(n)` sets every stream to `n`; `None` uses [`detect_replicas`] for new
/// streams and never lowers an existing stream's replicas. Fields NATS cannot change in place
/// are not sent; they come back as [`StreamsError::CannotChange`] after everything else was
/// applied.
pub async fn apply(
    client: &async_nats::Client,
    replicas: Option<usize>,
) -> Result<ApplyReport, StreamsError> {
    if let Some(r) = replicas {
        if !(1..=5).contains(&r) {
            return Err(StreamsError::InvalidReplicas(r));
        }
    }
    let target = match replicas {
        Some(r) => r,
        None => detect_replicas(client).await?,
    };
    let js = context(client);
    let mut report = ApplyReport {
        replicas: target,
        items: Vec::new(),
    };
    let mut conflicts = Vec::new();

    for s in STREAMS {
        let live = stream_config(&js, s.name).await?;
        let action = match &live {
            None => {
                api(
                    &js,
                    &format!("STREAM.CREATE.{}", s.name),
                    &s.config_json(target),
                )
                .await??;
                tracing::info!(stream = s.name, replicas = target, "Created stream.");
                Action::Created
            }
            Some(live) => {
                let want = match replicas {
                    Some(r) => r,
                    None => target.max(live_replicas(live)),
                };
                let diffs = diff(s.name, None, live, s.expected(want));
                let fixed: Vec<_> = diffs
                    .iter()
                    .filter(|(_, m)| !m)
                    .map(|(d, _)| d.clone())
                    .collect();
                if !fixed.is_empty() {
                    let fields = fixed.iter().map(|d| d.field.clone()).collect();
                    conflicts.extend(fixed);
                    Action::Conflict(fields)
                } else if diffs.is_empty() {
                    Action::Unchanged
                } else {
                    api(
                        &js,
                        &format!("STREAM.UPDATE.{}", s.name),
                        &s.config_json(want),
                    )
                    .await??;
                    let fields: Vec<String> = diffs.into_iter().map(|(d, _)| d.field).collect();
                    tracing::info!(stream = s.name, fields = ?fields, "Updated stream.");
                    Action::Updated(fields)
                }
            }
        };
        report.items.push(ItemReport {
            stream: s.name.into(),
            consumer: None,
            action,
        });
        for c in CONSUMERS.iter().filter(|c| c.stream == s.name) {
            let action = match consumer_config(&js, c.stream, c.durable).await? {
                None => {
                    create_consumer(&js, c).await??;
                    tracing::info!(stream = c.stream, consumer = c.durable, "Created consumer.");
                    Action::Created
                }
                Some(live) => {
                    let diffs = diff(c.stream, Some(c.durable), &live, c.expected());
                    let fixed: Vec<_> = diffs
                        .iter()
                        .filter(|(_, m)| !m)
                        .map(|(d, _)| d.clone())
                        .collect();
                    if !fixed.is_empty() {
                        let fields = fixed.iter().map(|d| d.field.clone()).collect();
                        conflicts.extend(fixed);
                        Action::Conflict(fields)
                    } else if diffs.is_empty() {
                        Action::Unchanged
                    } else {
                        create_consumer(&js, c).await??;
                        let fields: Vec<String> = diffs.into_iter().map(|(d, _)| d.field).collect();
                        tracing::info!(stream = c.stream, consumer = c.durable, fields = ?fields, "Updated consumer.");
                        Action::Updated(fields)
                    }
                }
            };
            report.items.push(ItemReport {
                stream: c.stream.into(),
                consumer: Some(c.durable.into()),
                action,
            });
        }
    }
    if conflicts.is_empty() {
        Ok(report)
    } else {
        Err(StreamsError::CannotChange { conflicts, report })
    }
}

/// Creates or updates a durable consumer (2.9+: `$JS.API.CONSUMER.CREATE.<stream>.<name>`
/// without an `action`, which means create-or-update on every version).
async fn create_consumer(
    js: &jetstream::Context,
    c: &ConsumerSpec,
) -> Result<Result<Value, StreamsError>, StreamsError> {
    let body = json!({ "stream_name": c.stream, "config": c.config_json() });
    api(
        js,
        &format!("CONSUMER.CREATE.{}.{}", c.stream, c.durable),
        &body,
    )
    .await
}

/// Every difference between the servers and the definition (empty: in sync), expecting at
/// least the replicas the servers can hold ([`detect_replicas`]).
pub async fn verify(client: &async_nats::Client) -> Result<Vec<Drift>, StreamsError> {
    verify_with(client, None).await
}

/// [`verify`] with an explicit replica count: `Some(n)` expects exactly `n`; `None` expects at
/// least [`detect_replicas`] (more replicas than the servers can place right now is not drift).
pub async fn verify_with(
    client: &async_nats::Client,
    replicas: Option<usize>,
) -> Result<Vec<Drift>, StreamsError> {
    let detected = match replicas {
        Some(r) => r,
        None => detect_replicas(client).await?,
    };
    let js = context(client);
    let mut drifts = Vec::new();
    for s in STREAMS {
        let Some(live) = stream_config(&js, s.name).await? else {
            drifts.push(Drift {
                stream: s.name.into(),
                consumer: None,
                field: "exists".into(),
                live: "missing".into(),
                wanted: "present".into(),
            });
            continue;
        };
        let want = match replicas {
            Some(r) => r,
            None => detected.max(live_replicas(&live)),
        };
        drifts.extend(
            diff(s.name, None, &live, s.expected(want))
                .into_iter()
                .map(|(d, _)| d),
        );
        for c in CONSUMERS.iter().filter(|c| c.stream == s.name) {
            match consumer_config(&js, c.stream, c.durable).await? {
                None => drifts.push(Drift {
                    stream: c.stream.into(),
                    consumer: Some(c.durable.into()),
                    field: "exists".into(),
                    live: "missing".into(),
                    wanted: "present".into(),
                }),
                Some(live) => drifts.extend(
                    diff(c.stream, Some(c.durable), &live, c.expected())
                        .into_iter()
                        .map(|(d, _)| d),
                ),
            }
        }
    }
    Ok(drifts)
}

/// Connects to NATS (several URLs of one cluster) as `auth`, failing fast if none
/// answers or the login is refused.
pub async fn connect(auth: &NatsAuth, urls: &[String]) -> anyhow::Result<async_nats::Client> {
    let client = crate::nats::connect(auth, urls, "argus-schema", Unreachable::Fail).await?;
    Ok(client)
}

/// `argus-schema streams ...`: the JetStream topology (streams and durable consumers).
#[derive(Debug, clap::Args)]
pub struct StreamsArgs {
    /// NATS server URLs, comma-separated (several nodes of one cluster).
    #[arg(
        long,
        env = "NATS_URLS",
        value_delimiter = ',',
        default_value = "nats://127.0.0.1:4222",
        global = true
    )]
    pub nats_urls: Vec<String>,
    /// The admin user (`compose/nats/authorization.conf`).
    #[command(flatten)]
    pub auth: NatsAuthArgs,
    #[command(subcommand)]
    pub command: StreamsCommand,
}

/// Subcommands of `argus-schema streams`.
#[derive(Debug, clap::Subcommand)]
pub enum StreamsCommand {
    /// Create missing streams and consumers, update those that differ (safe to re-run).
    Apply {
        /// Stream replicas. Default: what the servers can hold (1 on a single server, 3 on a
        /// 3-node cluster); without this flag an existing stream is never scaled down.
        #[arg(long, env = "ARGUS_STREAMS_REPLICAS")]
        replicas: Option<usize>,
    },
    /// Compare the servers with the definition; exit 1 listing every difference.
    Verify {
        /// Expect exactly this many replicas (default: at least what the servers can hold).
        #[arg(long, env = "ARGUS_STREAMS_REPLICAS")]
        replicas: Option<usize>,
    },
    /// Print the definition (the JSON configs apply sends) without connecting.
    Show,
    /// Print a stream's newest messages: sequence, subject, `Nats-Msg-Id` and body, one
    /// JSON object per line (e.g. `streams messages TELEMETRY_DLQ --last 20`).
    Messages {
        /// The stream, e.g. TELEMETRY_RAW_V1 or TELEMETRY_DLQ.
        stream: String,
        /// How many of the newest messages.
        #[arg(long, default_value_t = 10)]
        last: u64,
    },
}

/// Runs `argus-schema streams ...`.
pub async fn run_cli(args: StreamsArgs) -> anyhow::Result<()> {
    if let StreamsCommand::Show = args.command {
        for s in STREAMS {
            println!("{}", s.config_json(3));
            for c in CONSUMERS.iter().filter(|c| c.stream == s.name) {
                println!("  {}", c.config_json());
            }
        }
        return Ok(());
    }
    let auth = args.auth.auth()?;
    let client = connect(&auth, &args.nats_urls).await?;
    match args.command {
        StreamsCommand::Apply { replicas } => match apply(&client, replicas).await {
            Ok(report) => {
                print_report(&report);
                if report.is_unchanged() {
                    println!("Nothing changed: the topology matches the definition.");
                }
                Ok(())
            }
            Err(StreamsError::CannotChange { conflicts, report }) => {
                print_report(&report);
                for d in &conflicts {
                    eprintln!("cannot change in place: {d}");
                }
                anyhow::bail!(
                    "{} setting(s) cannot be changed in place; recreate those by hand",
                    conflicts.len()
                )
            }
            Err(e) => Err(with_hint(e)),
        },
        StreamsCommand::Verify { replicas } => {
            let drifts = verify_with(&client, replicas).await?;
            if drifts.is_empty() {
                println!(
                    "OK: {} streams and {} consumers match the definition.",
                    STREAMS.len(),
                    CONSUMERS.len()
                );
                Ok(())
            } else {
                for d in &drifts {
                    println!("DRIFT {d}");
                }
                anyhow::bail!("{} difference(s) from the definition", drifts.len())
            }
        }
        StreamsCommand::Show => Ok(()),
        StreamsCommand::Messages { stream, last } => {
            for line in newest_messages(&client, &stream, last).await? {
                println!("{line}");
            }
            Ok(())
        }
    }
}

/// The newest `last` messages of `stream`, oldest first, each as one JSON line:
/// `{"seq", "subject", "msgId", "time", "body"}` (`body` parsed when it is JSON).
pub async fn newest_messages(
    client: &async_nats::Client,
    stream: &str,
    last: u64,
) -> anyhow::Result<Vec<String>> {
    use anyhow::Context as _;
    let js = jetstream::new(client.clone());
    let mut handle = js
        .get_stream(stream)
        .await
        .map_err(|e| anyhow::anyhow!("stream {stream}: {e}"))?;
    let state = handle.info().await.context("stream info")?.state.clone();
    let first = state
        .first_sequence
        .max(state.last_sequence.saturating_sub(last.saturating_sub(1)));
    let mut lines = Vec::new();
    for seq in first..=state.last_sequence {
        if state.messages == 0 {
            break;
        }
        // A sequence can be missing (deleted, or aged out meanwhile): skip it.
        let Ok(msg) = handle.get_raw_message(seq).await else {
            continue;
        };
        let body: Value = serde_json::from_slice(&msg.payload)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&msg.payload).into_owned()));
        let msg_id = msg
            .headers
            .get("Nats-Msg-Id")
            .map(|v| v.as_str().to_string());
        lines.push(
            json!({
                "seq": msg.sequence,
                "subject": msg.subject.as_str(),
                "msgId": msg_id,
                "time": msg.time.to_string(),
                "body": body,
            })
            .to_string(),
        );
    }
    Ok(lines)
}

/// Sum of the streams' `max_bytes`: JetStream reserves it on every replica when it places a
/// stream, so each server's `max_file_store` must be at least this (28 GiB).
pub fn total_max_bytes() -> i64 {
    STREAMS.iter().map(|s| s.max_bytes).sum()
}

fn with_hint(e: StreamsError) -> anyhow::Error {
    match &e {
        StreamsError::Api {
            err_code: 10005 | 10023,
            ..
        } => anyhow::anyhow!(
            "{e}. Hint: JetStream reserves each stream's max_bytes on every replica, so every \
             server needs jetstream.max_file_store >= {} GiB (the sum of the streams' max_bytes), \
             and --replicas cannot exceed the JetStream servers that are up",
            total_max_bytes() / (1024 * 1024 * 1024)
        ),
        _ => e.into(),
    }
}

fn print_report(report: &ApplyReport) {
    println!("replicas for new streams: {}", report.replicas);
    for item in &report.items {
        println!("{item}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fields nats-server 2.9 knows in StreamConfig / ConsumerConfig that we send.
    const STREAM_FIELDS_2_9: &[&str] = &[
        "name",
        "subjects",
        "retention",
        "max_consumers",
        "max_msgs",
        "max_bytes",
        "max_age",
        "max_msgs_per_subject",
        "max_msg_size",
        "discard",
        "storage",
        "num_replicas",
        "duplicate_window",
    ];
    const CONSUMER_FIELDS_2_9: &[&str] = &[
        "durable_name",
        "name",
        "deliver_policy",
        "ack_policy",
        "ack_wait",
        "max_deliver",
        "replay_policy",
    ];

    #[test]
    fn sends_only_2_9_fields() {
        for s in STREAMS {
            for k in s.config_json(3).as_object().unwrap().keys() {
                assert!(STREAM_FIELDS_2_9.contains(&k.as_str()), "{k}");
            }
        }
        for c in CONSUMERS {
            for k in c.config_json().as_object().unwrap().keys() {
                assert!(CONSUMER_FIELDS_2_9.contains(&k.as_str()), "{k}");
            }
        }
    }

    #[test]
    fn definition_matches_the_plan() {
        assert_eq!(STREAMS.len(), 6);
        assert_eq!(CONSUMERS.len(), 6);
        let raw = STREAMS[0].config_json(3);
        assert_eq!(raw["max_age"], 7 * 24 * 3600 * 1_000_000_000u64);
        assert_eq!(raw["max_bytes"], 10 * 1024 * 1024 * 1024i64);
        assert_eq!(raw["duplicate_window"], 120 * 1_000_000_000u64);
        assert!(STREAMS[1].config_json(1).get("duplicate_window").is_none());
        assert_eq!(total_max_bytes(), 28 * GIB);
        for c in CONSUMERS {
            assert!(STREAMS.iter().any(|s| s.name == c.stream));
        }
        assert_eq!(
            raw_subject(&uuid::Uuid::nil()),
            "telemetry.raw.v1.00000000-0000-0000-0000-000000000000"
        );
    }

    #[test]
    fn diff_reports_fields_and_mutability() {
        let mut live = STREAMS[0].config_json(1);
        live["storage"] = json!("memory");
        live["max_bytes"] = json!(1);
        let d = diff("S", None, &live, STREAMS[0].expected(1));
        let fields: Vec<_> = d.iter().map(|(d, m)| (d.field.as_str(), *m)).collect();
        assert_eq!(fields, vec![("storage", false), ("max_bytes", true)]);
        assert_eq!(
            d[0].0.to_string(),
            r#"stream S: storage is "memory", wanted "file""#
        );
    }
}
