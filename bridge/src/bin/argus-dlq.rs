//! `argus-dlq list|replay`: the dead-letter stream for operators
//! (`argus_bridge::replay`). Exit status: 0 done, 1 failed, 2 bad flags,
//! 130 interrupted (run the same command again to resume).

use clap::Parser;

use argus_bridge::replay::{cli, Cli, Command};
use argus_pipeline::process;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Cli::parse();
    process::init_logging_at(false, "warn");
    match args.command {
        Command::List(a) => cli::list(a).await,
        Command::Replay(a) => {
            let json = a.json;
            let capped = a.max_letters.is_some();
            let summary = cli::replay(a, process::shutdown_signal()).await?;
            if json {
                println!("{}", serde_json::to_string(&summary)?);
            } else {
                print!("{}", summary.table());
            }
            if !summary.complete {
                if capped && summary.read > 0 {
                    eprintln!("Stopped at --max-letters; run the same command again to go on.");
                } else {
                    eprintln!("Interrupted; run the same command again to resume.");
                    std::process::exit(130);
                }
            }
            Ok(())
        }
    }
}
