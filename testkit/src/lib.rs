//! `argus-testkit`: real servers for tests, started on free ports and killed on `Drop`,
//! the way nats.rs's test harness does it.
//!
//! Layout:
//! - [`pg`]: a fresh database per test ([`pg::TestDb`]) on a shared server, and a private
//!   Postgres cluster ([`pg::PgServer`]) for tests that stop and start it.
//! - [`nats`]: a JetStream server ([`nats::NatsServer`]) and a real cluster ([`nats::NatsCluster`]).
//! - [`redis`]: a Redis server ([`redis::RedisServer`]).
//! - [`mosquitto`]: a Mosquitto broker with the caller's configuration ([`mosquitto::Mosquitto`]).
//! - [`process`]: a server child process that is killed when dropped (what every server above runs in).
//!
//! Binaries come from Debian's packages (`redis-server`, `mosquitto`, `postgresql-15`),
//! which `compose/test` installs, and nats-server from the pin of
//! `compose/nats/requirements.txt` ([`nats::server_binary`]). Panics here are deliberate: a test
//! whose servers cannot start must fail loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod mosquitto;
pub mod nats;
pub mod pg;
pub mod process;
pub mod redis;

use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

/// A TCP port that was free a moment ago on 127.0.0.1.
///
/// Ports are drawn at random from a high range (and checked by binding) so that tests
/// running in parallel processes rarely pick the same one.
pub fn free_port() -> u16 {
    use rand::Rng;
    let mut rng = rand::rng();
    loop {
        let port: u16 = rng.random_range(20_000..60_000);
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// Waits until something accepts TCP connections on `127.0.0.1:port`.
pub async fn wait_for_port(port: u16, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    false
}

/// Waits until nothing accepts TCP connections on `127.0.0.1:port`.
pub async fn wait_for_port_closed(port: u16, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_err() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    false
}

/// Finds a server binary on `PATH` or in the usual Debian places.
pub fn find_binary(name: &str) -> std::path::PathBuf {
    let mut dirs: Vec<std::path::PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.extend(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(Into::into));
    if let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") {
        let mut versions: Vec<_> = entries.flatten().map(|e| e.path().join("bin")).collect();
        versions.sort();
        versions.reverse();
        dirs.extend(versions);
    }
    dirs.into_iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("`{name}` not found on PATH or in /usr/sbin, /usr/lib/postgresql/*/bin; run compose/test, which installs it")
        })
}

/// Minimal HTTP GET against a loopback port; returns the status code and body.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((status, body))
}

/// Removes from this process's environment every variable an Argus flag reads as its
/// env twin (`ARGUS_*`, `NATS_*`, `PG*`, the database and Redis URLs). `compose/test`
/// runs the tests with `.stack/env` exported (an operator's NATS login, `ARGUS_PKI_DIR`,
/// ...); a test that parses flags calls this first, so only its own arguments count.
pub fn clear_flag_env() {
    const PREFIXES: [&str; 6] = [
        "ARGUS_",
        "NATS_",
        "PG",
        "ADMIN_DATABASE_URL",
        "DATABASE_URL",
        "REDIS_URL",
    ];
    for (var, _) in std::env::vars() {
        if PREFIXES.iter().any(|p| var.starts_with(p)) {
            std::env::remove_var(var);
        }
    }
}

/// True when this process runs as root (servers that refuse root are started as their user).
pub fn running_as_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}
