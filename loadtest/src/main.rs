//! `argus-loadtest`: parse the command line, run, print and write the report.
//! Exit code: 0 = sent, nothing lost/duplicated/unacked, no sender error; 1 = the run failed;
//! 2 = setup error.

use clap::Parser;

use argus_loadtest::cli::{Cli, Command};
use argus_loadtest::{commands, report, run};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match dispatch(cli.command).await {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::from(1),
        Err(e) => {
            eprintln!("argus-loadtest: error: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

async fn dispatch(cmd: Command) -> anyhow::Result<bool> {
    match cmd {
        Command::Mqtt(a) => {
            let r = commands::mqtt(&a).await?;
            run::emit(&r, &a.common)?;
            Ok(r.passed)
        }
        Command::Http(a) => {
            let r = commands::http(&a).await?;
            run::emit(&r, &a.common)?;
            Ok(r.passed)
        }
        Command::Ramp(a) => {
            let r = argus_loadtest::ramp::run(&a).await?;
            println!("{}", r.markdown());
            if let Some(p) = &a.common.json {
                report::write_json(p, &r)?;
            }
            if let Some(p) = &a.common.markdown {
                report::write_text(p, &r.markdown())?;
            }
            Ok(r.lost == 0)
        }
        Command::Baseline(a) => {
            let r = argus_loadtest::baseline::run(&a).await?;
            println!("{}", r.markdown());
            if let Some(p) = &a.common.json {
                report::write_json(p, &r)?;
            }
            if let Some(p) = &a.common.markdown {
                report::write_text(p, &r.markdown())?;
            }
            Ok(r.bridge_run_lost.unwrap_or(0) == 0)
        }
    }
}
