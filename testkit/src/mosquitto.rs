//! A Mosquitto broker with the caller's configuration, on a free loopback port.

use std::process::Command;
use std::time::Duration;

use tempfile::TempDir;

use crate::process::Server;
use crate::{find_binary, free_port, wait_for_port, wait_for_port_closed};

/// A running `mosquitto -c <config>`. Killed on drop.
///
/// The configuration text may use `{port}` (the listener port chosen here) and `{dir}`
/// (a private directory for persistence, certificates, ACL files). When the tests run as
/// root, `user root` is prepended so the broker can read files under `{dir}`; a config
/// that sets `user` itself keeps its own.
#[derive(Debug)]
pub struct Mosquitto {
    port: u16,
    dir: TempDir,
    config_path: std::path::PathBuf,
    server: Option<Server>,
}

impl Mosquitto {
    pub async fn start(config_text: &str) -> Mosquitto {
        let dir = tempfile::Builder::new()
            .prefix("argus-mosquitto-")
            .tempdir()
            .expect("tempdir");
        Self::start_in(dir, config_text).await
    }

    /// Like [`Mosquitto::start`], with a directory the caller already filled (certificates...).
    pub async fn start_in(dir: TempDir, config_text: &str) -> Mosquitto {
        let port = free_port();
        let mut text = config_text
            .replace("{port}", &port.to_string())
            .replace("{dir}", &dir.path().display().to_string());
        if crate::running_as_root() && !text.lines().any(|l| l.trim_start().starts_with("user ")) {
            text = format!("user root\n{text}");
        }
        let config_path = dir.path().join("mosquitto.conf");
        std::fs::write(&config_path, text).expect("write mosquitto.conf");
        let mut mq = Mosquitto {
            port,
            dir,
            config_path,
            server: None,
        };
        mq.start_again().await;
        mq
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The private directory (`{dir}` in the configuration).
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// (Re)starts the broker with the same configuration and persistence.
    pub async fn start_again(&mut self) {
        if self.server.as_mut().is_some_and(Server::is_running) {
            return;
        }
        let mut cmd = Command::new(find_binary("mosquitto"));
        cmd.arg("-c").arg(&self.config_path);
        self.server = Some(Server::spawn(cmd, self.dir.path().join("mosquitto.log")));
        assert!(
            wait_for_port(self.port, Duration::from_secs(10)).await,
            "mosquitto did not open port {}:\n{}",
            self.port,
            self.log_tail()
        );
    }

    /// Starts it again after [`Mosquitto::stop`] (alias of [`Mosquitto::start_again`]).
    pub async fn restart(&mut self) {
        self.start_again().await;
    }

    /// Stops the broker gracefully (SIGTERM: it saves its persistence file) and waits.
    pub async fn stop(&mut self) {
        if let Some(mut server) = self.server.take() {
            server.terminate();
        }
        wait_for_port_closed(self.port, Duration::from_secs(10)).await;
    }

    /// The broker's process id while it runs (what a pid file holds).
    pub fn pid(&self) -> Option<u32> {
        self.server.as_ref().and_then(Server::pid)
    }

    /// SIGHUP: Mosquitto re-reads its configuration, ACL and CRL.
    pub fn reload(&self) {
        if let Some(server) = &self.server {
            server.signal("HUP");
        }
    }

    pub fn log_tail(&self) -> String {
        let text =
            std::fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}
