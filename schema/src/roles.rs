//! The service roles that migration `0007_service_roles` creates, and how their
//! passwords are set (a migration cannot know them).
//!
//! [`set_passwords`] hashes each password here, on the client, into a SCRAM-SHA-256
//! verifier and sends only that (`ALTER ROLE … PASSWORD 'SCRAM-SHA-256$…'`): the
//! plain password never reaches the server, its logs or `pg_stat_statements`. Run it
//! as the owner (the role that runs the migrations; it holds `CREATEROLE`).

use std::fmt;

use tokio_postgres::Client;

use crate::pg_error_text;

/// The bridge, `argus-dlq`, and the HTTP sidecar's ingest path.
pub const INGEST: &str = "argus_ingest";
/// The HTTP sidecar's admin routes (API keys, certificates).
pub const ADMIN: &str = "argus_admin";
/// Read-only: operators, the load tester's counts, dashboards.
pub const READER: &str = "argus_reader";
/// Every service role, in the order the migration creates them.
pub const ALL: [&str; 3] = [INGEST, ADMIN, READER];

/// A password, kept out of `Debug` and `Display`.
#[derive(Clone)]
pub struct Password(String);

impl Password {
    pub fn new(text: impl Into<String>) -> Self {
        Password(text.into())
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(…)")
    }
}

/// Why a password could not be set. Never contains the password.
#[derive(Debug, thiserror::Error)]
pub enum PasswordError {
    #[error(
        "{role} is not a service role (expected one of argus_ingest, argus_admin, argus_reader)"
    )]
    UnknownRole { role: String },
    #[error("the password for {role} is empty")]
    Empty { role: &'static str },
    /// The role does not exist yet: run `argus-schema migrate` first.
    #[error("role {role} does not exist; run `argus-schema migrate` first")]
    NoSuchRole {
        role: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    /// The connected role may not change it (it needs `CREATEROLE`).
    #[error(
        "may not set the password of {role}: {reason}; connect as the owner (DATABASE_OWNER_URL)"
    )]
    NotAllowed {
        role: &'static str,
        reason: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("could not set the password of {role}: {reason}")]
    Db {
        role: &'static str,
        reason: String,
        #[source]
        source: tokio_postgres::Error,
    },
}

/// Sets each role's password, in one transaction (all or none).
pub async fn set_passwords(
    client: &mut Client,
    passwords: &[(&str, Password)],
) -> Result<Vec<&'static str>, PasswordError> {
    let mut checked = Vec::with_capacity(passwords.len());
    for (role, password) in passwords {
        let role: &'static str =
            ALL.iter()
                .copied()
                .find(|r| r == role)
                .ok_or_else(|| PasswordError::UnknownRole {
                    role: (*role).to_owned(),
                })?;
        if password.0.is_empty() {
            return Err(PasswordError::Empty { role });
        }
        checked.push((role, password));
    }
    let db = |role, source: tokio_postgres::Error| PasswordError::Db {
        role,
        reason: pg_error_text(&source),
        source,
    };
    let tx = client
        .transaction()
        .await
        .map_err(|e| db(checked.first().map_or(INGEST, |c| c.0), e))?;
    for (role, password) in &checked {
        // The role name is one of our constants, and the verifier is base64 and `$:`:
        // neither can carry a quote. ALTER ROLE takes no bind parameters.
        let verifier = postgres_protocol::password::scram_sha_256(password.0.as_bytes());
        debug_assert!(!verifier.contains('\''));
        let sql = format!("ALTER ROLE {role} PASSWORD '{verifier}'");
        if let Err(source) = tx.batch_execute(&sql).await {
            use tokio_postgres::error::SqlState;
            return Err(match source.code() {
                Some(c) if *c == SqlState::UNDEFINED_OBJECT => {
                    PasswordError::NoSuchRole { role, source }
                }
                Some(c) if *c == SqlState::INSUFFICIENT_PRIVILEGE => PasswordError::NotAllowed {
                    role,
                    reason: pg_error_text(&source),
                    source,
                },
                _ => db(role, source),
            });
        }
    }
    tx.commit()
        .await
        .map_err(|e| db(checked.first().map_or(INGEST, |c| c.0), e))?;
    Ok(checked.into_iter().map(|(r, _)| r).collect())
}
