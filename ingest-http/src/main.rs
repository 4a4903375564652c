//! `argus-ingest-http`: parse flags, connect, bind both listeners, serve until
//! SIGTERM/SIGINT; with TLS, SIGHUP reloads the device listener's certificate.

use anyhow::Context as _;
use clap::Parser as _;

use argus_ingest_http::tls::{CertReloader, TlsListener};
use argus_ingest_http::{serve, AppState, Cli, DeviceListener, Listeners};
use argus_pipeline::process;

/// mimalloc, as the bridge (bridge/src/main.rs): the pipeline allocates per reading.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Cli::parse().into_config()?;
    process::init_logging(config.log_json);

    let listen = config.listen;
    let admin_listen = config.admin_listen;
    // Before connecting: a certificate that cannot be used stops the start at once.
    let tls = match &config.tls {
        Some(files) => {
            let reloader =
                CertReloader::load(&files.cert, &files.key).context("--tls-cert/--tls-key")?;
            Some(reloader)
        }
        None => None,
    };
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
    let tcp = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("could not bind --listen {listen}"))?;
    let device = match tls {
        Some(reloader) => {
            let config = reloader.server_config().context("TLS configuration")?;
            tokio::spawn(argus_ingest_http::tls::reload_on_sighup(reloader));
            DeviceListener::Tls(TlsListener::new(tcp, config)?)
        }
        None => DeviceListener::Plain(tcp),
    };
    let admin = tokio::net::TcpListener::bind(admin_listen)
        .await
        .with_context(|| format!("could not bind --admin-listen {admin_listen}"))?;
    let tls_on = matches!(device, DeviceListener::Tls(_));
    tracing::info!(addr = %device.local_addr()?, tls = tls_on, "Device listener.");
    tracing::info!(addr = %admin.local_addr()?, "Admin listener (plain HTTP; keep it internal).");

    let (first_tx, first_rx) = tokio::sync::oneshot::channel::<()>();
    let listeners = Listeners { device, admin };
    let server = tokio::spawn(serve(listeners, state, async {
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
