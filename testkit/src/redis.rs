//! A Redis server on a free loopback port.

use std::process::Command;
use std::time::Duration;

use tempfile::TempDir;

use crate::process::Server;
use crate::{find_binary, free_port, wait_for_port, wait_for_port_closed};

/// A `redis-server` without persistence. Killed on drop; [`RedisServer::stop`] and
/// [`RedisServer::start`] take it away and bring it back on the same port.
#[derive(Debug)]
pub struct RedisServer {
    port: u16,
    dir: TempDir,
    server: Option<Server>,
}

impl RedisServer {
    pub async fn start() -> RedisServer {
        let mut redis = RedisServer {
            port: free_port(),
            dir: tempfile::Builder::new()
                .prefix("argus-redis-")
                .tempdir()
                .expect("tempdir"),
            server: None,
        };
        redis.start_again().await;
        redis
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Starts it again after [`RedisServer::stop`] (same port).
    pub async fn start_again(&mut self) {
        if self.server.as_mut().is_some_and(Server::is_running) {
            return;
        }
        let mut cmd = Command::new(find_binary("redis-server"));
        cmd.args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--daemonize", "no", "--dir"])
            .arg(self.dir.path());
        self.server = Some(Server::spawn(cmd, self.dir.path().join("redis.log")));
        assert!(
            wait_for_port(self.port, Duration::from_secs(10)).await,
            "redis-server did not open port {}",
            self.port
        );
    }

    /// Alias of [`RedisServer::start_again`], matching the other servers.
    pub async fn restart(&mut self) {
        self.start_again().await;
    }

    /// Kills the server and waits for its port to close.
    pub async fn stop(&mut self) {
        if let Some(mut server) = self.server.take() {
            server.kill();
        }
        wait_for_port_closed(self.port, Duration::from_secs(10)).await;
    }
}
