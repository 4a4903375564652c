//! The NATS connection every Argus binary opens: its user and password
//! ([`NatsAuthArgs`], `--nats-user` / `NATS_USER`, the password from `NATS_PASSWORD`
//! or `--nats-password-file`), one [`NatsAuth::options`] that sets them together
//! with the user's own inbox prefix, and [`connect`], which turns a refused login into
//! a [`NatsConnectError`] that names the user (never the password).
//!
//! The users and what each may do are defined once, in
//! `compose/nats/authorization.conf`. Each user may read replies only under
//! `_INBOX.<user>.>` ([`inbox_prefix`]): JetStream publish acks and API answers
//! arrive there, so one user cannot read another's replies.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_nats::{ConnectErrorKind, ConnectOptions, Event, ServerAddr, ServerError};

/// The env var with the password of `--nats-user`. There is no flag for the password
/// itself: a flag's value shows in `ps`.
pub const PASSWORD_ENV: &str = "NATS_PASSWORD";

/// The inbox prefix of `user`: its replies arrive on `_INBOX.<user>.<id>.<n>`, the only
/// subjects `compose/nats/authorization.conf` lets it subscribe to.
pub fn inbox_prefix(user: &str) -> String {
    format!("_INBOX.{user}")
}

/// A password: kept out of `Debug` and `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct Password(String);

impl Password {
    pub fn new(password: impl Into<String>) -> Self {
        Password(password.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Password(<redacted>)")
    }
}

/// A hook called with every connection event (the binaries count them as metrics).
pub type EventHook = Arc<dyn Fn(&Event) + Send + Sync>;

/// How a client logs in: a user and its password, or nothing (a server without
/// authorization).
#[derive(Clone, Default)]
pub struct NatsAuth {
    user: Option<(String, Password)>,
    hook: Option<EventHook>,
}

impl std::fmt::Debug for NatsAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsAuth")
            .field("user", &self.user())
            .finish_non_exhaustive()
    }
}

impl NatsAuth {
    /// No credentials.
    pub fn none() -> Self {
        NatsAuth::default()
    }

    /// `user` with `password`.
    pub fn user_password(user: impl Into<String>, password: impl Into<String>) -> Self {
        NatsAuth {
            user: Some((user.into(), Password::new(password))),
            hook: None,
        }
    }

    /// The same credentials, with `hook` called on every connection event.
    pub fn with_event_hook(mut self, hook: EventHook) -> Self {
        self.hook = Some(hook);
        self
    }

    /// The user, if any.
    pub fn user(&self) -> Option<&str> {
        self.user.as_ref().map(|(u, _)| u.as_str())
    }

    /// Client options with the credentials, the user's inbox prefix, the client's
    /// `name` (shown in the server's `/connz`), and an event callback that logs the
    /// server's errors (a refused publish or subscription arrives only this way:
    /// `-ERR 'Permissions Violation ...'`).
    pub fn options(&self, name: &str) -> ConnectOptions {
        let mut options = match &self.user {
            Some((user, password)) => {
                ConnectOptions::with_user_and_password(user.clone(), password.expose().to_owned())
                    .custom_inbox_prefix(inbox_prefix(user))
            }
            None => ConnectOptions::new(),
        };
        let hook = self.hook.clone();
        let user = self.user().unwrap_or("(none)").to_owned();
        options = options.name(name).event_callback(move |event| {
            let hook = hook.clone();
            let user = user.clone();
            async move {
                match &event {
                    // The server's own words (they name the subject, never a secret).
                    Event::ServerError(e @ ServerError::Other(_)) => {
                        tracing::error!(nats_user = %user, error = %e,
                            "NATS refused an operation of this client; see compose/nats/authorization.conf for what this user may do.");
                    }
                    Event::ServerError(e) => {
                        tracing::error!(nats_user = %user, error = %e, "NATS server error.");
                    }
                    Event::ClientError(e) => {
                        tracing::warn!(nats_user = %user, error = %e, "NATS client error.");
                    }
                    _ => {}
                }
                if let Some(hook) = hook {
                    hook(&event);
                }
            }
        });
        options
    }
}

/// Why no connection to NATS was opened.
#[derive(Debug, thiserror::Error)]
pub enum NatsConnectError {
    /// A URL of `--nats-urls` does not parse (the URL is not repeated: it may hold a password).
    #[error("--nats-urls: a URL is invalid: {0}")]
    Url(String),
    /// The server refused the login (`ConnectErrorKind::AuthorizationViolation`).
    #[error("NATS refused the login of user {user}: check --nats-user / NATS_USER and its password (NATS_PASSWORD or --nats-password-file)")]
    Refused { user: String },
    /// The server requires a user and none was given.
    #[error("NATS requires a user: set --nats-user / NATS_USER and its password (NATS_PASSWORD or --nats-password-file)")]
    NoUser,
    /// No server answered, or another connection error.
    #[error("cannot connect to NATS at --nats-urls: {0}")]
    Connect(#[source] async_nats::ConnectError),
}

impl NatsConnectError {
    /// From a connection error of `auth`'s login, decided by the error's kind.
    pub fn from_connect(e: async_nats::ConnectError, auth: &NatsAuth) -> Self {
        match (e.kind(), auth.user()) {
            (ConnectErrorKind::AuthorizationViolation, Some(user)) => NatsConnectError::Refused {
                user: user.to_owned(),
            },
            (ConnectErrorKind::AuthorizationViolation, None) => NatsConnectError::NoUser,
            _ => NatsConnectError::Connect(e),
        }
    }

    /// True when the credentials were refused: no retry can help.
    pub fn is_refused(&self) -> bool {
        matches!(
            self,
            NatsConnectError::Refused { .. } | NatsConnectError::NoUser
        )
    }
}

/// Parses `--nats-urls` values (blank ones skipped).
pub fn server_addrs(urls: &[String]) -> Result<Vec<ServerAddr>, NatsConnectError> {
    let addrs = urls
        .iter()
        .map(|u| u.trim())
        .filter(|u| !u.is_empty())
        .map(|u| u.parse::<ServerAddr>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| NatsConnectError::Url(e.to_string()))?;
    if addrs.is_empty() {
        return Err(NatsConnectError::Url("no URL given".into()));
    }
    Ok(addrs)
}

/// When the servers cannot be reached at start-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unreachable {
    /// Fail now (the CLIs).
    Fail,
    /// Return a client that keeps connecting in the background (the services, which
    /// start while NATS is down and retry).
    Retry,
}

/// Connects `name` to `urls` as `auth`. Tries every server once: refused credentials are
/// a [`NatsConnectError::Refused`] now, decided from `ConnectErrorKind`, whatever
/// `unreachable` says; with [`Unreachable::Retry`] servers that do not answer give a
/// client that keeps trying (a login refused later is logged by the event callback).
pub async fn connect(
    auth: &NatsAuth,
    urls: &[String],
    name: &str,
    unreachable: Unreachable,
) -> Result<async_nats::Client, NatsConnectError> {
    let addrs = server_addrs(urls)?;
    let first = auth
        .options(name)
        .connection_timeout(Duration::from_secs(5))
        .connect(addrs.clone())
        .await;
    match first {
        Ok(client) => Ok(client),
        Err(e) if e.kind() == ConnectErrorKind::AuthorizationViolation => {
            Err(NatsConnectError::from_connect(e, auth))
        }
        Err(e) => match unreachable {
            Unreachable::Fail => Err(NatsConnectError::from_connect(e, auth)),
            Unreachable::Retry => auth
                .options(name)
                .retry_on_initial_connect()
                .connect(addrs)
                .await
                .map_err(|e| NatsConnectError::from_connect(e, auth)),
        },
    }
}

/// Why `--nats-user` and its password cannot be used. Names the flag; never holds the
/// password.
#[derive(Debug, thiserror::Error)]
#[error("invalid --{flag}: {reason}")]
pub struct NatsAuthError {
    pub flag: &'static str,
    pub reason: String,
}

/// The NATS user flags, shared by every binary (`#[command(flatten)]`).
#[derive(Debug, Clone, clap::Args)]
pub struct NatsAuthArgs {
    /// NATS user (`compose/nats/authorization.conf` lists each binary's). Its password
    /// comes from the env var NATS_PASSWORD or from --nats-password-file; there is no
    /// flag with the password itself, as a flag's value shows in `ps`. Unset: connect
    /// without credentials (a server without authorization).
    #[arg(long, env = "NATS_USER", global = true)]
    pub nats_user: Option<String>,

    /// File whose first line is the password of --nats-user (e.g. a secret mounted
    /// 0600). Used instead of NATS_PASSWORD; setting both is an error.
    #[arg(long, env = "NATS_PASSWORD_FILE", global = true)]
    pub nats_password_file: Option<PathBuf>,
}

impl NatsAuthArgs {
    /// The credentials, with the password from `NATS_PASSWORD` or the file.
    pub fn auth(&self) -> Result<NatsAuth, NatsAuthError> {
        self.auth_with(std::env::var(PASSWORD_ENV).ok())
    }

    /// [`NatsAuthArgs::auth`] with the value of `NATS_PASSWORD` given (for tests).
    pub fn auth_with(&self, env_password: Option<String>) -> Result<NatsAuth, NatsAuthError> {
        let env_password = env_password.filter(|p| !p.is_empty());
        let user = self
            .nats_user
            .as_deref()
            .map(str::trim)
            .filter(|u| !u.is_empty());
        let err = |flag, reason: &str| NatsAuthError {
            flag,
            reason: reason.to_owned(),
        };
        let password = match (&self.nats_password_file, env_password) {
            (Some(_), Some(_)) => {
                return Err(err(
                    "nats-password-file",
                    "NATS_PASSWORD is set too; set one of them",
                ))
            }
            (Some(path), None) => {
                let text = std::fs::read_to_string(path).map_err(|e| NatsAuthError {
                    flag: "nats-password-file",
                    reason: format!("cannot read {}: {}", path.display(), e.kind()),
                })?;
                let line = text.lines().next().unwrap_or("").trim().to_owned();
                if line.is_empty() {
                    return Err(NatsAuthError {
                        flag: "nats-password-file",
                        reason: format!("{} is empty", path.display()),
                    });
                }
                Some(line)
            }
            (None, env) => env,
        };
        match (user, password) {
            (Some(user), Some(password)) => Ok(NatsAuth::user_password(user, password)),
            (Some(_), None) => Err(err(
                "nats-user",
                "has no password: set NATS_PASSWORD or --nats-password-file",
            )),
            (None, Some(_)) => Err(err(
                "nats-user",
                "is not set, but a NATS password is (NATS_PASSWORD or --nats-password-file)",
            )),
            (None, None) => Ok(NatsAuth::none()),
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        auth: NatsAuthArgs,
    }

    fn cli(args: &[&str]) -> NatsAuthArgs {
        // The flags have env twins, and `compose/test` runs the tests with `.stack/env`
        // exported (an operator's NATS login): only the arguments count here.
        for var in ["NATS_USER", "NATS_PASSWORD", "NATS_PASSWORD_FILE"] {
            std::env::remove_var(var);
        }
        Cli::try_parse_from(std::iter::once("t").chain(args.iter().copied()))
            .expect("clap")
            .auth
    }

    #[test]
    fn user_and_password_from_env_or_file() {
        let auth = cli(&["--nats-user", "bridge"])
            .auth_with(Some("p123".into()))
            .expect("valid");
        assert_eq!(auth.user(), Some("bridge"));
        assert!(!format!("{auth:?}").contains("p123"));

        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("pw");
        std::fs::write(&file, "pfile\n").expect("write");
        let args = cli(&[
            "--nats-user",
            "dlq",
            "--nats-password-file",
            file.to_str().expect("utf-8"),
        ]);
        assert_eq!(args.auth_with(None).expect("valid").user(), Some("dlq"));
        let e = args.auth_with(Some("p".into())).unwrap_err();
        assert_eq!(e.flag, "nats-password-file");
    }

    #[test]
    fn a_user_needs_a_password_and_a_password_a_user() {
        assert_eq!(
            cli(&["--nats-user", "bridge"])
                .auth_with(None)
                .unwrap_err()
                .flag,
            "nats-user"
        );
        let e = cli(&[]).auth_with(Some("secret-pw".into())).unwrap_err();
        assert_eq!(e.flag, "nats-user");
        assert!(!e.to_string().contains("secret-pw"), "{e}");
        assert!(cli(&[]).auth_with(None).expect("none").user().is_none());
    }
}
