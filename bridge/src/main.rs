//! `argus-bridge`: parse the flags, set up logging, run the bridge until
//! SIGTERM/SIGINT. A second signal ends the process at once.

use clap::Parser;

use argus_bridge::app;
use argus_bridge::config::{Cli, LogFormat};
use argus_pipeline::process;

/// mimalloc: fewer instructions per allocation than glibc's malloc, and the bridge
/// allocates per message (docs/benchmarks.md, "Instructions per message").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = match Cli::parse().into_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("argus-bridge: {e}");
            std::process::exit(2);
        }
    };
    process::init_logging(config.log_format == LogFormat::Json);

    let shutdown = async {
        process::shutdown_signal().await;
        tracing::info!("Signal received; draining. Send it again to stop at once.");
        // Second signal: stop now. Unacknowledged messages are redelivered.
        tokio::spawn(async {
            process::shutdown_signal().await;
            tracing::warn!("Second signal: exiting without draining.");
            std::process::exit(130);
        });
    };
    app::run(config, shutdown).await
}
