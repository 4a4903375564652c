//! `argus-schema`: apply, roll back and inspect the Postgres schema, seed the
//! demo data, and manage the JetStream topology. A thin shell over the library.

use std::process::ExitCode;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};

use argus_schema::{connect_with, migrate, roles, seed};

/// Argus schema tool: Postgres migrations and seed data, JetStream streams.
///
/// Migrations are embedded in this binary; every command that changes the
/// schema holds a Postgres advisory lock, so running two at once is safe.
#[derive(Debug, Parser)]
#[command(name = "argus-schema", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Apply every pending migration, in order, each in its own transaction.
    ///
    /// Refuses to run if an applied migration's file has changed since it was applied.
    Migrate(MigrateArgs),
    /// Roll back applied migrations (one step by default).
    Rollback(RollbackArgs),
    /// Show every migration and whether it is applied.
    ///
    /// Exits 0 when the schema is up to date, 2 when migrations are pending or changed.
    Status(DbArgs),
    /// Set the service roles' passwords (run as the owner, after `migrate`).
    ///
    /// Reads them from the environment, never from the command line:
    /// ARGUS_PG_INGEST_PASSWORD (argus_ingest), ARGUS_PG_ADMIN_PASSWORD (argus_admin),
    /// ARGUS_PG_READER_PASSWORD (argus_reader). Each role whose variable is set gets that
    /// password, the others keep theirs. The password is
    /// hashed here (SCRAM-SHA-256) and only the hash is sent, so it never appears in
    /// the server's logs.
    Passwords(DbArgs),
    /// Insert the demo data (idempotent: fixed ids, existing rows are left alone).
    Seed(DbArgs),
    /// JetStream streams and consumers.
    Streams(argus_schema::streams::StreamsArgs),
}

#[derive(Debug, Args)]
struct DbArgs {
    /// Postgres URL, e.g. postgres://argus@127.0.0.1:17432/argus.
    #[arg(long, env = "DATABASE_URL", value_name = "URL", hide_env_values = true)]
    database_url: String,
    /// CA certificate (PEM) that the Postgres server's certificate must chain to, for
    /// sslmode=verify-full (or require) in the URL. The URL's sslrootcert= wins.
    #[arg(long, env = "PGSSLROOTCERT", value_name = "FILE")]
    pg_ca_file: Option<std::path::PathBuf>,
}

impl DbArgs {
    async fn connect(&self) -> Result<tokio_postgres::Client, argus_schema::ConnectError> {
        connect_with(&self.database_url, self.pg_ca_file.as_deref()).await
    }
}

#[derive(Debug, Args)]
struct MigrateArgs {
    #[command(flatten)]
    db: DbArgs,
    /// Stop after VERSION instead of applying everything pending.
    #[arg(long, value_name = "VERSION")]
    to: Option<u32>,
}

#[derive(Debug, Args)]
struct RollbackArgs {
    #[command(flatten)]
    db: DbArgs,
    /// Roll back every migration above VERSION (0: all of them).
    /// Without it, only the latest applied migration is rolled back.
    #[arg(long, value_name = "VERSION")]
    to: Option<u32>,
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            // The library's messages are complete sentences that already carry
            // their cause, so print only the top one: one clear line.
            eprintln!("argus-schema: error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Migrate(args) => {
            let to = version_arg(args.to)?.unwrap_or_else(migrate::latest_version);
            let mut client = args.db.connect().await?;
            let report = migrate::migrate_to(&mut client, to).await?;
            println!("{report}");
        }
        Command::Rollback(args) => {
            let to = version_arg(args.to)?;
            let mut client = args.db.connect().await?;
            let report = migrate::rollback(&mut client, to).await?;
            println!("{report}");
        }
        Command::Status(db) => {
            let client = db.connect().await?;
            let status = migrate::status(&client).await?;
            println!("{status}");
            if !status.is_up_to_date() {
                return Ok(ExitCode::from(2));
            }
        }
        Command::Passwords(db) => {
            let passwords: Vec<(&str, roles::Password)> = [
                (roles::INGEST, "ARGUS_PG_INGEST_PASSWORD"),
                (roles::ADMIN, "ARGUS_PG_ADMIN_PASSWORD"),
                (roles::READER, "ARGUS_PG_READER_PASSWORD"),
            ]
            .into_iter()
            .filter_map(|(role, var)| {
                std::env::var(var)
                    .ok()
                    .map(|pw| (role, roles::Password::new(pw)))
            })
            .collect();
            if passwords.is_empty() {
                anyhow::bail!(
                    "no password given: set ARGUS_PG_INGEST_PASSWORD, ARGUS_PG_ADMIN_PASSWORD \
                     and/or ARGUS_PG_READER_PASSWORD"
                );
            }
            let mut client = db.connect().await?;
            for role in roles::set_passwords(&mut client, &passwords).await? {
                println!("password of {role} set");
            }
        }
        Command::Seed(db) => {
            let mut client = db.connect().await?;
            let report = seed::seed(&mut client).await?;
            println!("{report}");
        }
        Command::Streams(args) => argus_schema::streams::run_cli(args).await?,
    }
    Ok(ExitCode::SUCCESS)
}

fn version_arg(to: Option<u32>) -> Result<Option<i32>> {
    to.map(i32::try_from)
        .transpose()
        .map_err(|_| anyhow::anyhow!("--to: version out of range"))
}
