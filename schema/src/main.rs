//! `argus-schema`: apply, roll back and inspect the Postgres schema, seed the
//! demo data, and manage the JetStream topology. A thin shell over the library.

use std::process::ExitCode;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};

use argus_schema::{connect, migrate, seed};

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
            let mut client = connect(&args.db.database_url).await?;
            let report = migrate::migrate_to(&mut client, to).await?;
            println!("{report}");
        }
        Command::Rollback(args) => {
            let to = version_arg(args.to)?;
            let mut client = connect(&args.db.database_url).await?;
            let report = migrate::rollback(&mut client, to).await?;
            println!("{report}");
        }
        Command::Status(db) => {
            let client = connect(&db.database_url).await?;
            let status = migrate::status(&client).await?;
            println!("{status}");
            if !status.is_up_to_date() {
                return Ok(ExitCode::from(2));
            }
        }
        Command::Seed(db) => {
            let mut client = connect(&db.database_url).await?;
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
