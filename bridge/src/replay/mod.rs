//! `argus-dlq`: the dead-letter stream for operators. `list` shows what is in
//! `TELEMETRY_DLQ`; `replay` sends letters back through the bridge's own admit
//! stage ([`crate::admit::Admit::check`]: properties, payload checks, registry)
//! and sink, the path live MQTT traffic takes, once the cause is fixed (a device
//! registered, a limit raised).
//!
//! ```text
//! TELEMETRY_DLQ ──> scan (durable consumer, bounded) ──> filter ──> Admit::check ──> Sink ──> stored once
//!                                                                       '── refused ──> unchanged, or a letter with its new reason
//! ```
//!
//! Layout:
//! - [`cli`]: the flags, and `list` / `replay` runs (progress bar, summary);
//! - [`filter`]: `--reason`, `--device`, `--since`, `--until`;
//! - [`scan`]: the consumer that keeps a replay's progress, and its bound;
//! - [`outcome`]: one batch of letters to their outcomes;
//! - [`report`]: the summary and its table.

pub mod cli;
pub mod filter;
pub mod outcome;
pub mod report;
pub mod scan;

pub use cli::{Cli, Command};
