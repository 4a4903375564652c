//! The service roles of migration 0007 and TLS to Postgres, against real servers:
//! what each role may and may not do, that migrations on many databases of one
//! cluster at once create the cluster-wide roles safely, that a rollback keeps
//! roles other databases use, that `argus-schema passwords` sets working
//! passwords, and that verify-full checks the server's certificate.

use std::process::Command;

use argus_schema::migrate;
use argus_schema::roles::{self, Password};
use argus_testkit::pg::{with_user, PgServer, TestDb};
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

async fn migrated_seeded() -> TestDb {
    let db = TestDb::create().await;
    let mut client = db.client().await;
    migrate::migrate(&mut client).await.expect("migrate");
    argus_schema::seed::seed(&mut client).await.expect("seed");
    db
}

async fn connect_as(db: &TestDb, role: &str) -> Client {
    argus_schema::connect(&db.url_as(role))
        .await
        .unwrap_or_else(|e| panic!("connect as {role}: {e}"))
}

#[track_caller]
fn assert_refused(result: Result<(), tokio_postgres::Error>, what: &str) {
    let err = result.expect_err(what);
    assert_eq!(
        err.code(),
        Some(&SqlState::INSUFFICIENT_PRIVILEGE),
        "{what}: {err:?}"
    );
}

#[tokio::test]
async fn ingest_and_admin_cannot_update_delete_truncate_or_disable_triggers_on_telemetry_raw() {
    let db = migrated_seeded().await;
    let owner = db.client().await;
    let id = uuid::Uuid::new_v4();
    let device = argus_schema::seed::DEMO_DEVICE_ID;
    let org = argus_schema::seed::DEMO_ORG_ID;

    // The bridge's role stores a reading (the sink's path is COPY and INSERT).
    let ingest = connect_as(&db, roles::INGEST).await;
    let stored = ingest
        .execute(
            "INSERT INTO telemetry_raw (id, tenant_id, device_id, payload, ingestion_source) \
             VALUES ($1, $2, $3, '{\"t\": 1}', 'mqtt') ON CONFLICT (id) DO NOTHING",
            &[&id, &org, &device],
        )
        .await
        .expect("argus_ingest inserts into telemetry_raw");
    assert_eq!(stored, 1);

    for role in [roles::INGEST, roles::ADMIN] {
        let client = connect_as(&db, role).await;
        for sql in [
            "UPDATE telemetry_raw SET payload = '{}'",
            "DELETE FROM telemetry_raw",
            "TRUNCATE telemetry_raw",
            "ALTER TABLE telemetry_raw DISABLE TRIGGER telemetry_raw_no_update_delete",
            "ALTER TABLE telemetry_raw DISABLE TRIGGER ALL",
            "DROP TRIGGER telemetry_raw_no_truncate ON telemetry_raw",
        ] {
            assert_refused(client.batch_execute(sql).await, &format!("{role}: {sql}"));
        }
    }
    // The reading is still there, unchanged, and the triggers are enabled.
    let payload: serde_json::Value = owner
        .query_one("SELECT payload FROM telemetry_raw WHERE id = $1", &[&id])
        .await
        .expect("row")
        .get(0);
    assert_eq!(payload, serde_json::json!({"t": 1}));
    let enabled: i64 = owner
        .query_one(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'telemetry_raw'::regclass \
             AND NOT tgisinternal AND tgenabled = 'O'",
            &[],
        )
        .await
        .expect("triggers")
        .get(0);
    assert_eq!(enabled, 2);
}

#[tokio::test]
async fn each_role_has_what_its_process_needs_and_no_more() {
    let db = migrated_seeded().await;
    let device = argus_schema::seed::DEMO_DEVICE_ID;

    // argus_admin: issues and revokes API keys and certificates.
    let admin = connect_as(&db, roles::ADMIN).await;
    let key_id: uuid::Uuid = admin
        .query_one(
            "INSERT INTO device_api_keys (device_id, prefix, key_digest) \
             VALUES ($1, 'argus_test', '\\x00'::bytea) RETURNING id",
            &[&device],
        )
        .await
        .expect("argus_admin creates an API key")
        .get(0);
    admin
        .execute(
            "UPDATE device_api_keys SET revoked_at = now() WHERE id = $1",
            &[&key_id],
        )
        .await
        .expect("argus_admin revokes it");
    admin
        .execute(
            "UPDATE devices SET network_metadata = '{}'::jsonb, updated_at = now() WHERE id = $1",
            &[&device],
        )
        .await
        .expect("argus_admin records a certificate on the device");
    assert_refused(
        admin.batch_execute("SELECT * FROM telemetry_raw").await,
        "argus_admin reads telemetry",
    );
    assert_refused(
        admin
            .batch_execute("UPDATE devices SET status = 'active'")
            .await,
        "argus_admin changes a device's status",
    );
    assert_refused(
        admin.batch_execute("DELETE FROM device_api_keys").await,
        "argus_admin deletes keys",
    );

    // argus_ingest: registry look-ups and last_used_at, nothing else.
    let ingest = connect_as(&db, roles::INGEST).await;
    ingest
        .batch_execute(
            "SELECT * FROM devices; SELECT * FROM device_types; SELECT * FROM device_api_keys",
        )
        .await
        .expect("argus_ingest reads the registry");
    ingest
        .execute(
            "UPDATE device_api_keys SET last_used_at = now() WHERE id = ANY($1)",
            &[&vec![key_id]],
        )
        .await
        .expect("argus_ingest stamps last_used_at");
    assert_refused(
        ingest
            .batch_execute("UPDATE device_api_keys SET revoked_at = NULL")
            .await,
        "argus_ingest un-revokes a key",
    );
    assert_refused(
        ingest
            .batch_execute(
                "INSERT INTO devices (tenant_id, name) SELECT tenant_id, 'x' FROM devices LIMIT 1",
            )
            .await,
        "argus_ingest registers a device",
    );

    // argus_reader: reads everything but the keys' digests, writes nothing.
    let reader = connect_as(&db, roles::READER).await;
    reader
        .batch_execute(
            "SELECT id, device_id, received_at, payload FROM telemetry_raw; \
             SELECT id, prefix, revoked_at FROM device_api_keys; SELECT * FROM device_certificates",
        )
        .await
        .expect("argus_reader reads");
    assert_refused(
        reader
            .batch_execute("SELECT key_digest FROM device_api_keys")
            .await,
        "argus_reader reads key digests",
    );
    assert_refused(
        reader
            .batch_execute("INSERT INTO telemetry_raw (tenant_id, device_id, payload) SELECT tenant_id, id, '{}' FROM devices LIMIT 1")
            .await,
        "argus_reader writes",
    );
}

/// On a cluster of its own, where the roles do not exist yet: several databases
/// migrate at once (the creation race), then rolling back one keeps the roles the
/// others still use, and rolling back the last drops them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_migrations_share_the_roles_and_a_rollback_keeps_them_for_the_others() {
    let pg = PgServer::start().await;
    let names: Vec<String> = (0..4).map(|i| format!("roles_{i}")).collect();
    let mut urls = Vec::new();
    for n in &names {
        urls.push(pg.create_database(n).await);
    }
    let runs = urls.iter().cloned().map(|url| {
        tokio::spawn(async move {
            let mut c = argus_schema::connect(&url).await.expect("connect");
            migrate::migrate(&mut c).await
        })
    });
    for r in futures::future::join_all(runs).await {
        r.expect("task").expect("every concurrent migrate succeeds");
    }
    let role_count = |url: String| async move {
        let c = argus_schema::connect(&url).await.expect("connect");
        c.query_one(
            "SELECT count(*) FROM pg_roles WHERE rolname = ANY($1)",
            &[&roles::ALL.to_vec()],
        )
        .await
        .expect("pg_roles")
        .get::<_, i64>(0)
    };
    assert_eq!(role_count(urls[0].clone()).await, 3);

    // Roll back all but the last database: the roles stay, and the last still works.
    for url in &urls[..3] {
        let mut c = argus_schema::connect(url).await.expect("connect");
        migrate::rollback(&mut c, Some(6))
            .await
            .expect("rollback 0007");
    }
    assert_eq!(role_count(urls[0].clone()).await, 3);
    let last = with_user(&urls[3], roles::INGEST);
    let c = argus_schema::connect(&last)
        .await
        .expect("argus_ingest logs in");
    c.batch_execute("SELECT count(*) FROM telemetry_raw")
        .await
        .expect("argus_ingest still reads telemetry_raw in the database still migrated");
    let rolled_back = with_user(&urls[0], roles::INGEST);
    let c = argus_schema::connect(&rolled_back).await.expect("login");
    assert_refused(
        c.batch_execute("SELECT count(*) FROM telemetry_raw").await,
        "grants left in a rolled-back database",
    );

    let mut c = argus_schema::connect(&urls[3]).await.expect("connect");
    migrate::rollback(&mut c, Some(6))
        .await
        .expect("last rollback");
    assert_eq!(
        role_count(urls[0].clone()).await,
        0,
        "nothing uses them now"
    );
    // And up again.
    migrate::migrate(&mut c).await.expect("migrate again");
    assert_eq!(role_count(urls[0].clone()).await, 3);
}

/// A non-owner migrating would GRANT nothing (Postgres only warns): refused instead.
#[tokio::test]
async fn migration_0007_refuses_to_run_as_a_role_that_does_not_own_the_tables() {
    let db = TestDb::create().await;
    let mut client = db.client().await;
    migrate::migrate_to(&mut client, 6)
        .await
        .expect("up to 0006");
    let stranger = format!("argus_test_stranger_{}", &db.name()[11..19]);
    client
        .batch_execute(&format!(
            "CREATE ROLE {stranger} LOGIN; GRANT ALL ON SCHEMA public TO {stranger}; \
             GRANT ALL ON ALL TABLES IN SCHEMA public TO {stranger}"
        ))
        .await
        .expect("a role that is not the owner");
    let mut c = argus_schema::connect(&db.url_as(&stranger))
        .await
        .expect("login");
    let err = migrate::migrate(&mut c).await.expect_err("not the owner");
    assert!(err.to_string().contains("must run as the owner"), "{err}");
    drop(c);
    client
        .batch_execute(&format!(
            "REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {stranger}; \
             REVOKE ALL ON SCHEMA public FROM {stranger}; DROP ROLE {stranger}"
        ))
        .await
        .expect("clean up");
}

#[tokio::test]
async fn passwords_are_set_and_only_the_right_one_logs_in() {
    let superuser_pw = uuid::Uuid::new_v4().simple().to_string();
    let pg = PgServer::start_with_password(&superuser_pw).await;
    let url = pg.create_database("argus").await;
    let mut c = argus_schema::connect(&url).await.expect("connect");
    migrate::migrate(&mut c).await.expect("migrate");

    // Through the binary, as an operator would: passwords from the environment only.
    let ingest_pw = uuid::Uuid::new_v4().simple().to_string();
    let admin_pw = uuid::Uuid::new_v4().simple().to_string();
    let out = Command::new(env!("CARGO_BIN_EXE_argus-schema"))
        .arg("passwords")
        .env("DATABASE_URL", &url)
        .env("ARGUS_PG_INGEST_PASSWORD", &ingest_pw)
        .env("ARGUS_PG_ADMIN_PASSWORD", &admin_pw)
        .env_remove("ARGUS_PG_READER_PASSWORD")
        .output()
        .expect("run argus-schema");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("password of argus_ingest set"), "{stdout}");
    assert!(stdout.contains("password of argus_admin set"), "{stdout}");
    assert!(!stdout.contains("argus_reader"), "{stdout}");
    for pw in [&ingest_pw, &admin_pw] {
        assert!(!stdout.contains(pw.as_str()) && !stderr.contains(pw.as_str()));
    }
    // Only the verifier reached the server.
    let stored: String = c
        .query_one(
            "SELECT rolpassword FROM pg_authid WHERE rolname = 'argus_ingest'",
            &[],
        )
        .await
        .expect("pg_authid")
        .get(0);
    assert!(stored.starts_with("SCRAM-SHA-256$"), "{stored}");

    let as_role =
        |role: &str, pw: &str| format!("postgres://{role}:{pw}@127.0.0.1:{}/argus", pg.port());
    let ok = argus_schema::connect(&as_role(roles::INGEST, &ingest_pw))
        .await
        .expect("argus_ingest with its password");
    ok.batch_execute("SELECT 1 FROM telemetry_raw LIMIT 1")
        .await
        .expect("and reads");
    let err = argus_schema::connect(&as_role(roles::INGEST, &admin_pw))
        .await
        .expect_err("wrong password");
    let argus_schema::ConnectError::Connect { source, .. } = &err else {
        panic!("{err}");
    };
    assert_eq!(source.code(), Some(&SqlState::INVALID_PASSWORD), "{err}");
    assert!(!err.to_string().contains(admin_pw.as_str()), "{err}");

    // A role that is not a service role is refused before anything is sent.
    let e = roles::set_passwords(&mut c, &[("postgres", Password::new("x"))])
        .await
        .expect_err("postgres is not a service role");
    assert!(matches!(e, roles::PasswordError::UnknownRole { .. }), "{e}");
}

#[tokio::test]
async fn verify_full_connects_to_the_right_server_and_refuses_a_wrong_ca_or_plain_tcp() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (good, other) = (dir.path().join("good"), dir.path().join("other"));
    argus_pki::Ca::init(&good, &[]).expect("CA and server certificate (localhost, 127.0.0.1)");
    argus_pki::Ca::init(&other, &[]).expect("an unrelated CA");
    let read = |p: std::path::PathBuf| std::fs::read_to_string(p).expect("read PEM");
    let pg = PgServer::start_with_tls(
        &read(good.join("server.crt")),
        &read(good.join("server.key")),
    )
    .await;
    let admin = argus_schema::connect(&pg.url("postgres"))
        .await
        .expect("set-up");
    admin
        .batch_execute("CREATE ROLE tls_user LOGIN")
        .await
        .expect("role");
    let base = format!("postgres://tls_user@127.0.0.1:{}/postgres", pg.port());
    let ca = good.join("ca.crt");
    let wrong_ca = other.join("ca.crt");

    // verify-full with the right CA, by flag and by sslrootcert= in the URL.
    let c = argus_schema::connect_with(&format!("{base}?sslmode=verify-full"), Some(&ca))
        .await
        .expect("verify-full with the server's CA");
    let ssl: String = c
        .query_one(
            "SELECT ssl::text FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .expect("pg_stat_ssl")
        .get(0);
    assert_eq!(ssl, "true");
    argus_schema::connect(&format!(
        "{base}?sslmode=verify-full&sslrootcert={}",
        ca.display()
    ))
    .await
    .expect("sslrootcert= in the URL");
    // A certificate from another CA is refused, before any login.
    let err = argus_schema::connect_with(&format!("{base}?sslmode=verify-full"), Some(&wrong_ca))
        .await
        .expect_err("wrong CA");
    assert!(err.to_string().contains("certificate"), "{err}");

    // The right CA, but a host name the certificate does not name: refused too.
    let wrong_name = format!(
        "postgres://tls_user@db.invalid:{}/postgres?hostaddr=127.0.0.1&sslmode=verify-full",
        pg.port()
    );
    let err = argus_schema::connect_with(&wrong_name, Some(&ca))
        .await
        .expect_err("name not in the certificate");
    assert!(err.to_string().contains("certificate"), "{err}");

    // verify-full without a CA file is a configuration error that says what to set.
    let err = argus_schema::connect(&format!("{base}?sslmode=verify-full"))
        .await
        .expect_err("no CA");
    assert!(err.to_string().contains("--pg-ca-file"), "{err}");

    // Plain TCP: the server's pg_hba.conf lets this role in over TLS only.
    let err = argus_schema::connect(&format!("{base}?sslmode=disable"))
        .await
        .expect_err("plain TCP");
    let argus_schema::ConnectError::Connect { source, .. } = &err else {
        panic!("{err}");
    };
    assert_eq!(
        source.code(),
        Some(&SqlState::INVALID_AUTHORIZATION_SPECIFICATION),
        "{err}"
    );
}
