//! `argus-ingest-http`: parse flags, connect, bind, serve until SIGTERM/SIGINT.

use anyhow::Context as _;
use clap::Parser as _;

use argus_ingest_http::{serve, AppState, Cli};
use argus_pipeline::process;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Cli::parse().into_config()?;
    process::init_logging(config.log_json);

    let listen = config.listen;
    let shutdown_timeout = config.shutdown_timeout;
    let crl_max_age = config.crl_max_age;
    let state = AppState::connect(config).await?;
    if let Some(cert) = state.certificates() {
        argus_ingest_http::crl::describe();
        tokio::spawn(argus_ingest_http::crl::keep_fresh(
            cert.clone(),
            crl_max_age,
        ));
    }
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("could not bind --listen {listen}"))?;
    tracing::info!(addr = %listener.local_addr()?, "Listening.");

    let (first_tx, first_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, state, async {
        let _ = first_rx.await;
    }));
    process::shutdown_signal().await;
    let _ = first_tx.send(());
    // Second stage: a second signal or the timeout ends it hard.
    tokio::select! {
        r = server => { r.context("server task failed")??; }
        _ = process::shutdown_signal() => { tracing::warn!("Second signal: exiting now."); }
        _ = tokio::time::sleep(shutdown_timeout) => {
            tracing::warn!(timeout = ?shutdown_timeout, "Shutdown timed out: exiting now.");
        }
    }
    Ok(())
}
