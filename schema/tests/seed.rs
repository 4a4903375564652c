//! The demo seed against a real Postgres, one fresh database per test.

use std::process::Command;

use argus_schema::migrate;
use argus_schema::seed::{self, SeedError, DEMO_DEVICE_ID, DEMO_ORG_ID, GATEWAY_IDS, SENSOR_IDS};
use argus_testkit::pg::TestDb;
use tokio_postgres::Client;

/// The tables the seed writes.
const TABLES: &[&str] = &[
    "organizations",
    "device_types",
    "asset_types",
    "devices",
    "assets",
    "entity_edges",
    "threshold_rules",
];

/// Every seeded row, as JSON text, table by table, in id order.
async fn all_rows(client: &Client) -> Vec<String> {
    let mut out = Vec::new();
    for t in TABLES {
        let rows = client
            .query(
                &format!("SELECT row_to_json(t)::text FROM {t} t ORDER BY id"),
                &[],
            )
            .await
            .expect("read seeded rows");
        out.extend(
            rows.iter()
                .map(|r| format!("{t}: {}", r.get::<_, String>(0))),
        );
    }
    out
}

async fn count(client: &Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.expect(sql).get(0)
}

#[tokio::test]
async fn seed_twice_gives_the_same_rows_and_the_plans_counts() {
    let db = TestDb::create().await;
    let mut client = db.client().await;
    migrate::migrate(&mut client).await.unwrap();

    let first = seed::seed(&mut client).await.unwrap();
    assert_eq!(first.created(), 37);
    assert_eq!(first.found(), 0);
    let rows = all_rows(&client).await;

    let second = seed::seed(&mut client).await.unwrap();
    assert_eq!(second.created(), 0);
    assert_eq!(second.found(), 37);
    assert_eq!(all_rows(&client).await, rows, "second seed changed rows");

    // The plan's counts (§1.4), in one demo organization.
    let org = "'0a000000-0000-4000-8000-000000000001'";
    assert_eq!(
        count(&client, "SELECT count(*) FROM organizations").await,
        1
    );
    for (sql, want) in [
        ("SELECT count(*) FROM device_types WHERE tenant_id = {org}", 2),
        ("SELECT count(*) FROM asset_types WHERE tenant_id = {org} AND metric_definitions IS NOT NULL AND transformation_engine IS NOT NULL", 2),
        ("SELECT count(*) FROM devices WHERE tenant_id = {org}", 5),
        ("SELECT count(*) FROM devices d JOIN device_types t ON t.id = d.device_type_id WHERE t.name = 'Temperature Sensor' AND d.device_role = 'endpoint'", 3),
        ("SELECT count(*) FROM devices d JOIN device_types t ON t.id = d.device_type_id WHERE t.name = 'RTU Gateway' AND d.device_role = 'gateway'", 2),
        ("SELECT count(*) FROM devices WHERE status = 'active'", 5),
        ("SELECT count(*) FROM assets WHERE tenant_id = {org}", 10),
        ("SELECT count(*) FROM entity_edges WHERE tenant_id = {org} AND source_entity_type = 'Device' AND target_entity_type = 'Asset'", 15),
        // Every link points at a real device and a real asset, and no pair repeats.
        ("SELECT count(DISTINCT (e.source_entity_id, e.target_entity_id)) FROM entity_edges e JOIN devices d ON d.id = e.source_entity_id JOIN assets a ON a.id = e.target_entity_id", 15),
        ("SELECT count(*) FROM threshold_rules WHERE tenant_id = {org} AND is_active", 2),
        ("SELECT count(*) FROM device_types WHERE name IN ('Temperature Sensor', 'RTU Gateway')", 2),
        ("SELECT count(*) FROM asset_types WHERE name IN ('HVAC Unit', 'Pump')", 2),
    ] {
        assert_eq!(count(&client, &sql.replace("{org}", org)).await, want, "{sql}");
    }
}

#[tokio::test]
async fn fixed_ids_are_the_documented_ones() {
    let db = TestDb::create().await;
    let mut client = db.client().await;
    migrate::migrate(&mut client).await.unwrap();
    seed::seed(&mut client).await.unwrap();

    let row = client
        .query_one(
            "SELECT tenant_id, status, device_role FROM devices WHERE id = $1",
            &[&DEMO_DEVICE_ID],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, uuid::Uuid>(0), DEMO_ORG_ID);
    assert_eq!(row.get::<_, String>(1), "active");
    assert_eq!(row.get::<_, String>(2), "endpoint");
    assert_eq!(DEMO_DEVICE_ID, SENSOR_IDS[0]);
    for id in GATEWAY_IDS {
        let role: String = client
            .query_one("SELECT device_role FROM devices WHERE id = $1", &[&id])
            .await
            .unwrap()
            .get(0);
        assert_eq!(role, "gateway");
    }
}

#[tokio::test]
async fn seed_before_migrate_is_refused() {
    let db = TestDb::create().await;
    let mut client = db.client().await;
    let err = seed::seed(&mut client).await.unwrap_err();
    assert!(
        matches!(err, SeedError::NotMigrated { current: 0, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("argus-schema migrate"), "{err}");
}

#[tokio::test]
async fn cli_seed_prints_what_it_created_then_what_it_found() {
    let db = TestDb::create().await;
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_argus-schema"))
            .args(args)
            .env("DATABASE_URL", db.url())
            .output()
            .expect("run argus-schema");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, _, stderr) = run(&["seed"]);
    assert_ne!(code, Some(0));
    assert!(stderr.contains("migrate"), "{stderr}");

    assert_eq!(run(&["migrate"]).0, Some(0));
    let (code, stdout, stderr) = run(&["seed"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stdout.contains("37 rows created, 0 already there"),
        "{stdout}"
    );
    assert!(stdout.contains("devices           5 created"), "{stdout}");
    let (code, stdout, _) = run(&["seed"]);
    assert_eq!(code, Some(0));
    assert!(
        stdout.contains("0 rows created, 37 already there"),
        "{stdout}"
    );
}
