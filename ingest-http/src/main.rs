//! `argus-ingest-http`: parse flags, connect, bind, serve until SIGTERM/SIGINT.

use anyhow::Context as _;
use clap::Parser as _;

use argus_ingest_http::{serve, AppState, Cli};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Cli::parse().into_config()?;
    init_logging(config.log_json);

    let listen = config.listen;
    let shutdown_timeout = config.shutdown_timeout;
    let state = AppState::connect(config).await?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("could not bind --listen {listen}"))?;
    tracing::info!(addr = %listener.local_addr()?, "Listening.");

    let (first_tx, first_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, state, async {
        let _ = first_rx.await;
    }));
    shutdown_signal().await;
    let _ = first_tx.send(());
    // Second stage: a second signal or the timeout ends it hard.
    tokio::select! {
        r = server => { r.context("server task failed")??; }
        _ = shutdown_signal() => { tracing::warn!("Second signal: exiting now."); }
        _ = tokio::time::sleep(shutdown_timeout) => {
            tracing::warn!(timeout = ?shutdown_timeout, "Shutdown timed out: exiting now.");
        }
    }
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
