//! TLS on the device listener: the certificate and key from PEM files (`--tls-cert`,
//! `--tls-key`), reloaded on SIGHUP without dropping the listener.
//!
//! [`CertReloader`] is rustls' certificate resolver: every handshake takes the
//! certificate it holds at that moment, so a reload swaps it for new connections
//! while open ones keep theirs. A reload that cannot read the files, or finds a key
//! that does not match the certificate, keeps the old certificate and says so (log
//! and `argus_http_tls_reloads_total{result="error"}`).
//!
//! [`TlsListener`] is the axum listener: a task accepts TCP connections and runs each
//! handshake on its own task (bounded, with a timeout), so a slow client never holds
//! up the others; finished handshakes are handed to `axum::serve`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::metrics;

/// Longest a client may take to finish its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshakes in progress at once; past that, accepting waits.
pub const MAX_HANDSHAKES: usize = 1024;

/// Why a certificate or key could not be used (names the file, never its content).
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: rustls_pki_types::pem::Error,
    },
    #[error("{path} holds no PEM CERTIFICATE")]
    NoCertificate { path: PathBuf },
    #[error("{path}: the private key cannot be used: {source}")]
    Key {
        path: PathBuf,
        source: rustls::Error,
    },
    #[error("the key {key} does not belong to the certificate {cert}: {source}")]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        source: rustls::Error,
    },
    #[error("TLS configuration: {0}")]
    Config(rustls::Error),
}

/// Reads a certificate chain and its private key, and checks that they belong together.
pub fn load_certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsError::Read {
            path: cert.to_owned(),
            source,
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: cert.to_owned(),
        });
    }
    let private = PrivateKeyDer::from_pem_file(key).map_err(|source| TlsError::Read {
        path: key.to_owned(),
        source,
    })?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&private).map_err(|source| {
        TlsError::Key {
            path: key.to_owned(),
            source,
        }
    })?;
    let certified = CertifiedKey::new(chain, signing);
    certified
        .keys_match()
        .map_err(|source| TlsError::Mismatch {
            cert: cert.to_owned(),
            key: key.to_owned(),
            source,
        })?;
    Ok(certified)
}

/// The device listener's certificate, swapped by [`CertReloader::reload`].
pub struct CertReloader {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
}

impl std::fmt::Debug for CertReloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertReloader")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl CertReloader {
    /// Loads the files once (start-up: an error here refuses to start).
    pub fn load(cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Result<Arc<Self>, TlsError> {
        let (cert, key) = (cert.into(), key.into());
        let first = load_certified_key(&cert, &key)?;
        Ok(Arc::new(CertReloader {
            cert,
            key,
            current: RwLock::new(Arc::new(first)),
        }))
    }

    /// Reads the files again; on success new handshakes use them, on failure the old
    /// certificate stays. Either way it is logged and counted.
    pub fn reload(&self) -> Result<(), TlsError> {
        match load_certified_key(&self.cert, &self.key) {
            Ok(next) => {
                let next = Arc::new(next);
                match self.current.write() {
                    Ok(mut current) => *current = next,
                    Err(poisoned) => *poisoned.into_inner() = next,
                }
                ::metrics::counter!(metrics::TLS_RELOADS_TOTAL, "result" => "ok").increment(1);
                tracing::info!(cert = %self.cert.display(), "Reloaded the TLS certificate.");
                Ok(())
            }
            Err(e) => {
                ::metrics::counter!(metrics::TLS_RELOADS_TOTAL, "result" => "error").increment(1);
                tracing::error!(error = %e, "Could not reload the TLS certificate; keeping the old one.");
                Err(e)
            }
        }
    }

    fn current(&self) -> Arc<CertifiedKey> {
        match self.current.read() {
            Ok(current) => current.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// A rustls server configuration (ring, TLS 1.2 and 1.3, HTTP/1.1) that takes its
    /// certificate from this reloader at every handshake.
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<ServerConfig>, TlsError> {
        let mut config =
            ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .map_err(TlsError::Config)?
                .with_no_client_auth()
                .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

impl ResolvesServerCert for CertReloader {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// Reloads `reloader` on every SIGHUP, for as long as the process runs.
pub async fn reload_on_sighup(reloader: Arc<CertReloader>) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangups = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "Cannot listen for SIGHUP: the TLS certificate will not be reloaded.");
            return;
        }
    };
    while hangups.recv().await.is_some() {
        tracing::info!("SIGHUP: reloading the TLS certificate.");
        let _ = reloader.reload();
    }
}

/// A TLS listener for `axum::serve`: TCP accepted here, handshakes on their own tasks.
pub struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
    accepting: tokio::task::JoinHandle<()>,
}

impl TlsListener {
    pub fn new(tcp: TcpListener, config: Arc<ServerConfig>) -> std::io::Result<TlsListener> {
        let local = tcp.local_addr()?;
        let (tx, ready) = mpsc::channel(64);
        let accepting = tokio::spawn(accept_loop(tcp, TlsAcceptor::from(config), tx));
        Ok(TlsListener {
            ready,
            local,
            accepting,
        })
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        // Stops accepting (the server has stopped asking for connections).
        self.accepting.abort();
    }
}

async fn accept_loop(
    mut tcp: TcpListener,
    acceptor: TlsAcceptor,
    ready: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
) {
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    loop {
        let Ok(permit) = handshakes.clone().acquire_owned().await else {
            return;
        };
        // axum's accept: retries (and logs) accept errors such as too many open files.
        let (stream, peer) = axum::serve::Listener::accept(&mut tcp).await;
        let acceptor = acceptor.clone();
        let ready = ready.clone();
        tokio::spawn(async move {
            let outcome = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await;
            drop(permit);
            match outcome {
                Ok(Ok(tls)) => {
                    let _ = ready.send((tls, peer)).await;
                }
                Ok(Err(e)) => {
                    ::metrics::counter!(metrics::TLS_HANDSHAKE_FAILURES_TOTAL).increment(1);
                    tracing::debug!(%peer, error = %e, "TLS handshake failed.");
                }
                Err(_) => {
                    ::metrics::counter!(metrics::TLS_HANDSHAKE_FAILURES_TOTAL).increment(1);
                    tracing::debug!(%peer, "TLS handshake timed out.");
                }
            }
        });
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(next) => next,
            // The accept task ended (it never does on its own): serve nothing more.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}
