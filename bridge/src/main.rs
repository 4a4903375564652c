//! `argus-bridge`: parse the flags, set up logging, run the bridge until
//! SIGTERM/SIGINT. A second signal ends the process at once.

use clap::Parser;

use argus_bridge::app;
use argus_bridge::config::{Cli, LogFormat};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = match Cli::parse().into_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("argus-bridge: {e}");
            std::process::exit(2);
        }
    };
    init_tracing(config.log_format);

    let shutdown = async {
        wait_for_signal().await;
        tracing::info!("Signal received; draining. Send it again to stop at once.");
        // Second signal: stop now. Unacknowledged messages are redelivered.
        tokio::spawn(async {
            wait_for_signal().await;
            tracing::warn!("Second signal: exiting without draining.");
            std::process::exit(130);
        });
    };
    app::run(config, shutdown).await
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}

/// Completes on SIGTERM or SIGINT.
async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
