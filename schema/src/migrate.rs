//! The migration runner.
//!
//! Migrations are plain SQL files in `schema/migrations/`, `NNNN_name.up.sql`
//! and `NNNN_name.down.sql`, embedded at compile time ([`MIGRATIONS`]).
//!
//! - [`migrate`] applies the pending ones in order, each in its own
//!   transaction, and records `(version, name, checksum, applied_at)` in
//!   `schema_migrations`; the checksum is the SHA-256 (hex) of the up file.
//! - [`rollback`] runs down files, newest first, each in its own transaction.
//! - [`status`] lists every known migration and whether it is applied.
//!
//! `migrate` and `rollback` hold a session-level Postgres advisory lock
//! ([`LOCK_KEY`]) for the whole run, so two runners started at once are safe:
//! the second waits, then finds nothing left to do. Both refuse to run when an
//! applied migration's up file has changed since (checksum mismatch) or when
//! the database has a migration this build does not know.

use std::fmt;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use ring::digest::{digest, SHA256};
use tokio_postgres::Client;

use crate::{connect, pg_error_text, ConnectError};

/// One migration: an up and a down SQL script.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    pub version: i32,
    pub name: &'static str,
    pub up: &'static str,
    pub down: &'static str,
}

impl Migration {
    /// SHA-256 of the up file, lowercase hex: what `schema_migrations.checksum` holds.
    pub fn checksum(&self) -> String {
        hex::encode(digest(&SHA256, self.up.as_bytes()))
    }

    /// `0002_iot_foundation`: the file stem, how messages name a migration.
    pub fn id(&self) -> String {
        format!("{:04}_{}", self.version, self.name)
    }
}

macro_rules! migration {
    ($version:literal, $prefix:literal, $name:literal) => {
        Migration {
            version: $version,
            name: $name,
            up: include_str!(concat!("../migrations/", $prefix, "_", $name, ".up.sql")),
            down: include_str!(concat!("../migrations/", $prefix, "_", $name, ".down.sql")),
        }
    };
}

/// Every migration, in order. Add new ones at the end; a unit test checks
/// that this list and the files in `schema/migrations/` agree.
pub static MIGRATIONS: &[Migration] = &[
    migration!(1, "0001", "platform_base"),
    migration!(2, "0002", "iot_foundation"),
    migration!(3, "0003", "device_certificates"),
    migration!(4, "0004", "device_api_keys"),
    migration!(5, "0005", "telemetry_content_digest"),
    migration!(6, "0006", "telemetry_mqtt_properties"),
    migration!(7, "0007", "service_roles"),
];

/// The advisory lock key held while migrating or rolling back ("ARGUS_MG").
pub const LOCK_KEY: i64 = 0x4152_4755_535f_4d47;

/// The runner's bookkeeping table. It is left in place (empty) by `rollback --to 0`.
const CREATE_TABLE: &str = "CREATE TABLE IF NOT EXISTS schema_migrations (
    version    INTEGER PRIMARY KEY,
    name       TEXT NOT NULL,
    checksum   TEXT NOT NULL,
    applied_at TIMESTAMPTZ NOT NULL DEFAULT NOW()
)";

/// The latest version this build knows.
pub fn latest_version() -> i32 {
    MIGRATIONS.last().map_or(0, |m| m.version)
}

/// "0, 1, 2, 3, 4, 5": the versions `--to` accepts.
fn valid_targets() -> String {
    std::iter::once("0".to_owned())
        .chain(MIGRATIONS.iter().map(|m| m.version.to_string()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Errors of [`migrate`], [`rollback`] and [`status`].
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// A statement failed; `action` says which step (e.g. "apply migration 0002_iot_foundation").
    #[error("could not {action}: {reason}")]
    Db {
        action: String,
        reason: String,
        #[source]
        source: tokio_postgres::Error,
    },
    /// An applied migration's up file differs from what was applied.
    #[error(
        "migration {id} was changed after it was applied (checksum in database {recorded}, \
         in this build {expected}); refusing to run. Restore the original file, or put the \
         change in a new migration"
    )]
    ChecksumMismatch {
        id: String,
        version: i32,
        recorded: String,
        expected: String,
    },
    /// The database has a migration this build does not know (a newer build applied it).
    #[error(
        "the database has migration {version:04}_{name} applied, which this build of \
         argus-schema does not know (latest here is {latest:04}); use a newer argus-schema"
    )]
    UnknownApplied {
        version: i32,
        name: String,
        latest: i32,
    },
    /// `rollback` with no migration applied.
    #[error("nothing to roll back: no migration is applied")]
    NothingToRollBack,
    /// `--to V` where V is neither 0 nor a known version.
    #[error("there is no migration version {target} (valid versions: {valid})")]
    NoSuchVersion { target: i32, valid: String },
    /// `rollback --to V` where V is not below the current version.
    #[error(
        "cannot roll back to version {target}: the database is at version {current}, \
         a rollback target must be lower"
    )]
    TargetNotBelowCurrent { target: i32, current: i32 },
}

impl MigrateError {
    fn db(action: impl Into<String>, source: tokio_postgres::Error) -> Self {
        Self::Db {
            action: action.into(),
            reason: pg_error_text(&source),
            source,
        }
    }

    /// True when running again later may succeed (connection problems);
    /// false for refusals and SQL errors.
    pub fn is_retriable(&self) -> bool {
        match self {
            Self::Connect(e) => e.is_retriable(),
            Self::Db { source, .. } => source.is_closed() || source.as_db_error().is_none(),
            _ => false,
        }
    }
}

/// One migration applied or rolled back by this run.
#[derive(Debug, Clone)]
pub struct Step {
    pub version: i32,
    pub name: &'static str,
    pub elapsed: Duration,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04}_{} ({} ms)",
            self.version,
            self.name,
            self.elapsed.as_millis()
        )
    }
}

/// What [`migrate`] did.
#[derive(Debug, Clone)]
pub struct MigrateReport {
    /// Applied by this run, in order.
    pub applied: Vec<Step>,
    /// How many were applied already before this run.
    pub already_applied: usize,
    /// The version the database is at now.
    pub current_version: i32,
}

impl fmt::Display for MigrateReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for step in &self.applied {
            writeln!(f, "applied {step}")?;
        }
        if self.applied.is_empty() {
            write!(
                f,
                "database is up to date at version {} ({} migrations applied)",
                self.current_version, self.already_applied
            )
        } else {
            write!(
                f,
                "database is at version {} ({} applied now, {} before)",
                self.current_version,
                self.applied.len(),
                self.already_applied
            )
        }
    }
}

/// What [`rollback`] did.
#[derive(Debug, Clone)]
pub struct RollbackReport {
    /// Rolled back by this run, newest first.
    pub rolled_back: Vec<Step>,
    /// The version the database is at now (0: none applied).
    pub current_version: i32,
}

impl fmt::Display for RollbackReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for step in &self.rolled_back {
            writeln!(f, "rolled back {step}")?;
        }
        write!(f, "database is at version {}", self.current_version)
    }
}

/// The state of one known migration in a database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    Pending,
    Applied {
        at: DateTime<Utc>,
    },
    /// Applied, but the up file has changed since: `migrate` will refuse.
    Changed {
        at: DateTime<Utc>,
    },
}

/// One line of [`status`].
#[derive(Debug, Clone)]
pub struct StatusEntry {
    pub version: i32,
    pub name: String,
    pub state: State,
    /// False for a migration applied in the database but unknown to this build.
    pub known: bool,
}

/// What [`status`] found.
#[derive(Debug, Clone)]
pub struct Status {
    pub entries: Vec<StatusEntry>,
    pub current_version: i32,
}

impl Status {
    pub fn pending(&self) -> usize {
        self.entries
            .iter()
            .filter(|e| e.state == State::Pending)
            .count()
    }

    /// True when every known migration is applied unchanged and nothing unknown is applied.
    pub fn is_up_to_date(&self) -> bool {
        self.entries
            .iter()
            .all(|e| e.known && matches!(e.state, State::Applied { .. }))
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:<8} {:<24} {:<10} APPLIED AT",
            "VERSION", "NAME", "STATE"
        )?;
        for e in &self.entries {
            let (state, at) = match &e.state {
                State::Pending => ("pending", String::new()),
                State::Applied { at } if e.known => ("applied", at.to_rfc3339()),
                State::Applied { at } => ("UNKNOWN", at.to_rfc3339()),
                State::Changed { at } => ("CHANGED", at.to_rfc3339()),
            };
            writeln!(
                f,
                "{:<8} {:<24} {:<10} {}",
                format!("{:04}", e.version),
                e.name,
                state,
                at
            )?;
        }
        write!(
            f,
            "current version {}, latest {}, {} pending",
            self.current_version,
            latest_version(),
            self.pending()
        )
    }
}

/// A row of `schema_migrations`.
struct Applied {
    version: i32,
    name: String,
    checksum: String,
    applied_at: DateTime<Utc>,
}

async fn read_applied(client: &Client) -> Result<Vec<Applied>, MigrateError> {
    let rows = client
        .query(
            "SELECT version, name, checksum, applied_at FROM schema_migrations ORDER BY version",
            &[],
        )
        .await
        .map_err(|e| MigrateError::db("read schema_migrations", e))?;
    Ok(rows
        .iter()
        .map(|r| Applied {
            version: r.get(0),
            name: r.get(1),
            checksum: r.get(2),
            applied_at: r.get(3),
        })
        .collect())
}

/// Refuses to go on when an applied migration is unknown or was changed.
fn verify(applied: &[Applied]) -> Result<(), MigrateError> {
    for a in applied {
        let Some(m) = MIGRATIONS.iter().find(|m| m.version == a.version) else {
            return Err(MigrateError::UnknownApplied {
                version: a.version,
                name: a.name.clone(),
                latest: latest_version(),
            });
        };
        let expected = m.checksum();
        if a.checksum != expected {
            return Err(MigrateError::ChecksumMismatch {
                id: m.id(),
                version: m.version,
                recorded: a.checksum.clone(),
                expected,
            });
        }
    }
    Ok(())
}

/// Runs `body` while holding the advisory lock on this session, and releases
/// the lock afterwards whatever the outcome (if the session died, the server
/// released it already).
async fn with_lock<T>(
    client: &mut Client,
    body: impl AsyncFnOnce(&mut Client) -> Result<T, MigrateError>,
) -> Result<T, MigrateError> {
    let got: bool = client
        .query_one("SELECT pg_try_advisory_lock($1)", &[&LOCK_KEY])
        .await
        .map_err(|e| MigrateError::db("take the migration lock", e))?
        .get(0);
    if !got {
        tracing::info!(
            lock_key = LOCK_KEY,
            "Another migration runner holds the lock; waiting for it."
        );
        client
            .execute("SELECT pg_advisory_lock($1)", &[&LOCK_KEY])
            .await
            .map_err(|e| MigrateError::db("take the migration lock", e))?;
    }
    let result = body(client).await;
    if let Err(e) = client
        .execute("SELECT pg_advisory_unlock($1)", &[&LOCK_KEY])
        .await
    {
        tracing::warn!(error = %pg_error_text(&e), "Could not release the migration lock.");
    }
    result
}

/// Applies every pending migration, in order, each in its own transaction.
pub async fn migrate(client: &mut Client) -> Result<MigrateReport, MigrateError> {
    migrate_to(client, latest_version()).await
}

/// Applies the pending migrations up to and including version `target`
/// (which must be 0 or a known version), in order, each in its own transaction.
pub async fn migrate_to(client: &mut Client, target: i32) -> Result<MigrateReport, MigrateError> {
    if target != 0 && !MIGRATIONS.iter().any(|m| m.version == target) {
        return Err(MigrateError::NoSuchVersion {
            target,
            valid: valid_targets(),
        });
    }
    with_lock(client, async |client: &mut Client| {
        client
            .batch_execute(CREATE_TABLE)
            .await
            .map_err(|e| MigrateError::db("create schema_migrations", e))?;
        let applied = read_applied(client).await?;
        verify(&applied)?;
        let already_applied = applied.len();
        let mut steps = Vec::new();
        for m in MIGRATIONS.iter().filter(|m| m.version <= target) {
            if applied.iter().any(|a| a.version == m.version) {
                continue;
            }
            let started = Instant::now();
            let action = format!("apply migration {}", m.id());
            let tx = client
                .transaction()
                .await
                .map_err(|e| MigrateError::db(action.clone(), e))?;
            tx.batch_execute(m.up)
                .await
                .map_err(|e| MigrateError::db(action.clone(), e))?;
            tx.execute(
                "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                &[&m.version, &m.name, &m.checksum()],
            )
            .await
            .map_err(|e| MigrateError::db(action.clone(), e))?;
            tx.commit()
                .await
                .map_err(|e| MigrateError::db(action.clone(), e))?;
            let step = Step {
                version: m.version,
                name: m.name,
                elapsed: started.elapsed(),
            };
            tracing::info!(migration = %m.id(), elapsed_ms = step.elapsed.as_millis() as u64, "Applied migration.");
            steps.push(step);
        }
        let current_version = read_applied(client)
            .await?
            .last()
            .map_or(0, |a| a.version);
        Ok(MigrateReport {
            applied: steps,
            already_applied,
            current_version,
        })
    })
    .await
}

/// Connects to `url` and runs [`migrate`].
pub async fn migrate_url(url: &str) -> Result<MigrateReport, MigrateError> {
    let mut client = connect(url).await?;
    migrate(&mut client).await
}

/// Rolls back applied migrations, newest first, each in its own transaction.
///
/// `to = None` rolls back one step; `Some(v)` rolls back every migration above
/// version `v` (`Some(0)`: all). Nothing changes when the target is invalid:
/// not 0 and not a known version, or not below the current version, or when
/// nothing is applied.
pub async fn rollback(
    client: &mut Client,
    to: Option<i32>,
) -> Result<RollbackReport, MigrateError> {
    with_lock(client, async |client: &mut Client| {
        client
            .batch_execute(CREATE_TABLE)
            .await
            .map_err(|e| MigrateError::db("create schema_migrations", e))?;
        let applied = read_applied(client).await?;
        verify(&applied)?;
        let Some(current) = applied.last().map(|a| a.version) else {
            return Err(MigrateError::NothingToRollBack);
        };
        let target = match to {
            Some(0) => 0,
            Some(v) => {
                if !MIGRATIONS.iter().any(|m| m.version == v) {
                    return Err(MigrateError::NoSuchVersion {
                        target: v,
                        valid: valid_targets(),
                    });
                }
                v
            }
            None => applied
                .iter()
                .rev()
                .nth(1)
                .map_or(0, |a| a.version),
        };
        if target >= current {
            return Err(MigrateError::TargetNotBelowCurrent { target, current });
        }
        let mut steps = Vec::new();
        for a in applied.iter().rev().filter(|a| a.version > target) {
            // verify() guarantees every applied version is known.
            let Some(m) = MIGRATIONS.iter().find(|m| m.version == a.version) else {
                continue;
            };
            let started = Instant::now();
            let action = format!("roll back migration {}", m.id());
            let tx = client
                .transaction()
                .await
                .map_err(|e| MigrateError::db(action.clone(), e))?;
            tx.batch_execute(m.down)
                .await
                .map_err(|e| MigrateError::db(action.clone(), e))?;
            tx.execute(
                "DELETE FROM schema_migrations WHERE version = $1",
                &[&m.version],
            )
            .await
            .map_err(|e| MigrateError::db(action.clone(), e))?;
            tx.commit()
                .await
                .map_err(|e| MigrateError::db(action.clone(), e))?;
            let step = Step {
                version: m.version,
                name: m.name,
                elapsed: started.elapsed(),
            };
            tracing::info!(migration = %m.id(), elapsed_ms = step.elapsed.as_millis() as u64, "Rolled back migration.");
            steps.push(step);
        }
        Ok(RollbackReport {
            rolled_back: steps,
            current_version: target,
        })
    })
    .await
}

/// Lists every known migration (and any unknown applied one) with its state.
/// Read-only: does not create `schema_migrations` and takes no lock.
pub async fn status(client: &Client) -> Result<Status, MigrateError> {
    let exists: bool = client
        .query_one("SELECT to_regclass('schema_migrations') IS NOT NULL", &[])
        .await
        .map_err(|e| MigrateError::db("look for schema_migrations", e))?
        .get(0);
    let applied = if exists {
        read_applied(client).await?
    } else {
        Vec::new()
    };
    let mut entries: Vec<StatusEntry> = MIGRATIONS
        .iter()
        .map(|m| {
            let state = match applied.iter().find(|a| a.version == m.version) {
                None => State::Pending,
                Some(a) if a.checksum == m.checksum() => State::Applied { at: a.applied_at },
                Some(a) => State::Changed { at: a.applied_at },
            };
            StatusEntry {
                version: m.version,
                name: m.name.to_owned(),
                state,
                known: true,
            }
        })
        .collect();
    for a in &applied {
        if !MIGRATIONS.iter().any(|m| m.version == a.version) {
            entries.push(StatusEntry {
                version: a.version,
                name: a.name.clone(),
                state: State::Applied { at: a.applied_at },
                known: false,
            });
        }
    }
    entries.sort_by_key(|e| e.version);
    Ok(Status {
        entries,
        current_version: applied.last().map_or(0, |a| a.version),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_matches_files() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/migrations");
        let mut files: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".sql"))
            .collect();
        files.sort();
        let mut expected: Vec<String> = MIGRATIONS
            .iter()
            .flat_map(|m| [format!("{}.down.sql", m.id()), format!("{}.up.sql", m.id())])
            .collect();
        expected.sort();
        assert_eq!(
            files, expected,
            "schema/migrations/ and MIGRATIONS disagree"
        );
    }

    #[test]
    fn versions_increase() {
        for pair in MIGRATIONS.windows(2) {
            assert!(pair[0].version < pair[1].version);
        }
        assert_eq!(MIGRATIONS[0].version, 1);
    }

    #[test]
    fn checksum_is_sha256_hex() {
        let c = MIGRATIONS[0].checksum();
        assert_eq!(c.len(), 64);
        assert!(c
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
    }
}
