//! Postgres for tests: a fresh database per test, or a private cluster to stop and start.

use std::process::Command;
use std::time::Duration;

use tempfile::TempDir;
use tokio_postgres::NoTls;

use crate::process::Server;
use crate::{find_binary, free_port, running_as_root, wait_for_port, wait_for_port_closed};

/// The server [`TestDb`] creates databases on: `ARGUS_TEST_PG_URL`, or the machine's
/// Postgres on 5432. The role must be allowed to create databases.
pub fn admin_url() -> String {
    std::env::var("ARGUS_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string())
}

/// `url` with its database name replaced by `dbname`.
pub fn with_database(url: &str, dbname: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    // After the scheme's "//", the path starts at the first '/'.
    let scheme_end = base.find("//").map(|i| i + 2).unwrap_or(0);
    let authority_end = base[scheme_end..]
        .find('/')
        .map(|i| scheme_end + i)
        .unwrap_or(base.len());
    let mut out = format!("{}/{}", &base[..authority_end], dbname);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

/// `url` with its user replaced by `user` and no password: how the tests log in as a
/// service role (`argus_ingest`, ...). The test clusters trust loopback logins (the
/// machine's, the local stack's and [`PgServer::start`]'s), so no password is needed.
pub fn with_user(url: &str, user: &str) -> String {
    let scheme_end = url.find("://").map(|i| i + 3).unwrap_or(0);
    let rest = &url[scheme_end..];
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let host = match rest[..authority_end].rfind('@') {
        Some(at) => &rest[at + 1..],
        None => rest,
    };
    format!("{}{user}@{host}", &url[..scheme_end])
}

/// Connects and spawns the connection task.
pub async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect to test Postgres ({}): {e}", redact(url)));
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

fn redact(url: &str) -> String {
    // Never print a password, even in tests.
    match (url.find("://"), url.find('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            let user = creds.split(':').next().unwrap_or("");
            format!("{}{}@{}", &url[..s + 3], user, &url[at + 1..])
        }
        _ => url.to_string(),
    }
}

/// A fresh, empty database for one test, dropped (with `FORCE`) when the value drops.
#[derive(Debug)]
pub struct TestDb {
    name: String,
    url: String,
    admin: String,
}

impl TestDb {
    /// Creates `argus_test_<random>` on [`admin_url`].
    pub async fn create() -> TestDb {
        Self::create_on(&admin_url()).await
    }

    /// Creates a fresh database on the server behind `admin_url`.
    pub async fn create_on(admin_url: &str) -> TestDb {
        let name = format!("argus_test_{}", uuid::Uuid::new_v4().simple());
        let admin = connect(admin_url).await;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap_or_else(|e| panic!("CREATE DATABASE on {}: {e}", redact(admin_url)));
        TestDb {
            url: with_database(admin_url, &name),
            name,
            admin: admin_url.to_string(),
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// This database's URL as `role` (see [`with_user`]), e.g. `argus_ingest`. The
    /// service roles exist once the database is migrated (migration 0007).
    pub fn url_as(&self, role: &str) -> String {
        with_user(&self.url, role)
    }

    pub async fn client(&self) -> tokio_postgres::Client {
        connect(&self.url).await
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let admin = self.admin.clone();
        let name = self.name.clone();
        // Drop runs inside the test's runtime: do the async work on a thread of its own.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                if let Ok((client, conn)) = tokio_postgres::connect(&admin, NoTls).await {
                    tokio::spawn(conn);
                    let _ = client
                        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .await;
                }
            });
        })
        .join();
    }
}

/// A private Postgres cluster (`initdb`) on a free port: superuser `postgres`, trust auth,
/// `fsync=off`. For tests that stop, start or restart the database. Killed on drop.
#[derive(Debug)]
pub struct PgServer {
    port: u16,
    dir: TempDir,
    server: Option<Server>,
    /// With [`PgServer::start_with_password`]: loopback TCP logins need this password.
    password: Option<String>,
    /// With [`PgServer::start_with_tls`]: `ssl=on` with the certificate in the data dir.
    tls: bool,
}

impl PgServer {
    pub async fn start() -> PgServer {
        Self::start_inner(None).await
    }

    /// Like [`PgServer::start`], but TCP logins need `password` (scram-sha-256), so a
    /// test can present a wrong one. [`PgServer::url`] includes the right password.
    pub async fn start_with_password(password: &str) -> PgServer {
        Self::start_inner(Some(password.to_string())).await
    }

    /// Like [`PgServer::start`], with `ssl=on` serving `cert_pem` (chain) and `key_pem`,
    /// and a pg_hba.conf that lets every role in over TLS only (`hostssl`); plain TCP is
    /// left to the superuser `postgres`, for this harness's own set-up.
    pub async fn start_with_tls(cert_pem: &str, key_pem: &str) -> PgServer {
        let mut pg = Self::init(None).await;
        let data = pg.dir.path().join("data");
        std::fs::write(data.join("server.crt"), cert_pem).expect("write server.crt");
        std::fs::write(data.join("server.key"), key_pem).expect("write server.key");
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\n\
             hostssl all all 127.0.0.1/32 trust\n\
             hostnossl all postgres 127.0.0.1/32 trust\n",
        )
        .expect("write pg_hba.conf");
        {
            use std::os::unix::fs::PermissionsExt;
            let key = data.join("server.key");
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))
                .expect("chmod server.key");
            if running_as_root() {
                let status = Command::new("chown")
                    .arg("postgres:postgres")
                    .arg(&key)
                    .arg(data.join("server.crt"))
                    .arg(data.join("pg_hba.conf"))
                    .status()
                    .expect("chown");
                assert!(status.success(), "chown of the server key failed");
            }
        }
        pg.tls = true;
        pg.restart().await;
        pg
    }

    async fn start_inner(password: Option<String>) -> PgServer {
        let mut pg = Self::init(password).await;
        pg.restart().await;
        pg
    }

    /// `initdb` on a free port; not started.
    async fn init(password: Option<String>) -> PgServer {
        let dir = tempfile::Builder::new()
            .prefix("argus-pg-")
            .tempdir()
            .expect("tempdir");
        let data = dir.path().join("data");
        if running_as_root() {
            // initdb and postgres refuse to run as root: the cluster belongs to `postgres`.
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .expect("chown");
            assert!(status.success(), "chown of the test cluster dir failed");
        }
        let mut initdb = as_postgres_user(&find_binary("initdb"));
        initdb
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "--no-sync", "-E", "UTF8"])
            .stdout(std::process::Stdio::null());
        match &password {
            None => {
                initdb.args(["-A", "trust"]);
            }
            Some(pw) => {
                let pwfile = dir.path().join("pwfile");
                std::fs::write(&pwfile, pw).expect("write pwfile");
                if running_as_root() {
                    let _ = Command::new("chown")
                        .arg("postgres:postgres")
                        .arg(&pwfile)
                        .status();
                }
                initdb
                    .args(["--auth-local=trust", "--auth-host=scram-sha-256"])
                    .arg(format!("--pwfile={}", pwfile.display()));
            }
        }
        let out = initdb.output().expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        PgServer {
            port: free_port(),
            dir,
            server: None,
            password,
            tls: false,
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `postgres://postgres@127.0.0.1:PORT/<dbname>` (with the password, if the server has one).
    pub fn url(&self, dbname: &str) -> String {
        let credentials = match &self.password {
            Some(pw) => format!("postgres:{pw}"),
            None => "postgres".to_string(),
        };
        format!("postgres://{credentials}@127.0.0.1:{}/{dbname}", self.port)
    }

    /// Creates a database (no-op if it exists) and returns its URL.
    pub async fn create_database(&self, dbname: &str) -> String {
        let admin = connect(&self.url("postgres")).await;
        let exists = admin
            .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&dbname])
            .await
            .expect("query pg_database")
            .is_some();
        if !exists {
            admin
                .batch_execute(&format!("CREATE DATABASE {dbname}"))
                .await
                .expect("create database");
        }
        self.url(dbname)
    }

    /// Starts the server again (same port, same data) and waits until it accepts queries.
    pub async fn restart(&mut self) {
        if self.server.as_mut().is_some_and(Server::is_running) {
            return;
        }
        let mut cmd = as_postgres_user(&find_binary("postgres"));
        cmd.arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-p", &self.port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args([
                "-c",
                &format!("unix_socket_directories={}", self.dir.path().display()),
            ])
            .args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
            .args(["-c", "full_page_writes=off", "-c", "max_connections=200"]);
        if self.tls {
            // server.crt and server.key in the data directory are the defaults' names.
            cmd.args(["-c", "ssl=on"]);
        }
        let log = self.dir.path().join("postgres.log");
        self.server = Some(Server::spawn(cmd, log));
        assert!(
            wait_for_port(self.port, Duration::from_secs(20)).await,
            "postgres did not open port {}",
            self.port
        );
        // The port opens before recovery ends: wait for a real query.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok((client, conn)) = tokio_postgres::connect(&self.url("postgres"), NoTls).await
            {
                tokio::spawn(conn);
                if client.simple_query("SELECT 1").await.is_ok() {
                    return;
                }
            }
            assert!(std::time::Instant::now() < deadline, "postgres not ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Fast shutdown (SIGINT): open connections are cut, as in a real outage.
    pub async fn stop(&mut self) {
        if let Some(mut server) = self.server.take() {
            server.signal("INT");
            let deadline = std::time::Instant::now() + Duration::from_secs(15);
            while server.is_running() && std::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            server.kill();
        }
        wait_for_port_closed(self.port, Duration::from_secs(10)).await;
    }

    /// SIGKILL of the postmaster, as a crash would. Its children exit on their own.
    pub async fn kill(&mut self) {
        if let Some(mut server) = self.server.take() {
            server.kill();
        }
        wait_for_port_closed(self.port, Duration::from_secs(10)).await;
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if let Some(server) = &self.server {
            // Immediate shutdown so the backends go too (SIGKILL of the postmaster alone
            // would leave them until they notice).
            server.signal("QUIT");
        }
    }
}

fn as_postgres_user(binary: &std::path::Path) -> Command {
    if running_as_root() {
        // setpriv execs (runuser would fork and not pass our signals on), so the child
        // we hold is the postmaster itself.
        let mut cmd = Command::new("setpriv");
        cmd.args([
            "--reuid=postgres",
            "--regid=postgres",
            "--init-groups",
            "--",
        ])
        .arg(binary);
        cmd
    } else {
        Command::new(binary)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn with_database_replaces_only_the_path() {
        assert_eq!(
            with_database("postgres://u@h:5432/postgres", "x"),
            "postgres://u@h:5432/x"
        );
        assert_eq!(
            with_database("postgres://u:p@h:1/a?sslmode=disable", "b"),
            "postgres://u:p@h:1/b?sslmode=disable"
        );
        assert_eq!(with_database("postgres://h", "b"), "postgres://h/b");
    }

    #[test]
    fn with_user_replaces_only_the_credentials() {
        assert_eq!(
            with_user("postgres://u:p@h:1/db?sslmode=disable", "argus_ingest"),
            "postgres://argus_ingest@h:1/db?sslmode=disable"
        );
        assert_eq!(with_user("postgres://h/db", "r"), "postgres://r@h/db");
    }

    #[test]
    fn redact_hides_the_password() {
        assert_eq!(redact("postgres://u:secret@h/db"), "postgres://u@h/db");
    }
}
