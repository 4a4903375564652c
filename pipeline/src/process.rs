//! What every Argus binary does at start and at stop: log to stderr, and wait for
//! SIGTERM or SIGINT.

/// Logs to stderr at the level `RUST_LOG` gives (default `info`): human-readable
/// lines, or with `json` one JSON object per line, the event's fields at the top level.
/// Colours only on a terminal: a log file or a collector gets plain text.
pub fn init_logging(json: bool) {
    init_logging_at(json, "info");
}

/// [`init_logging`] with another level where `RUST_LOG` is unset (a command-line
/// tool such as `argus-dlq` logs only warnings by default).
pub fn init_logging_at(json: bool, default_filter: &str) {
    use std::io::IsTerminal as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    if json {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
}

/// Completes on SIGTERM or SIGINT (Ctrl-C elsewhere than Unix).
pub async fn shutdown_signal() {
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
