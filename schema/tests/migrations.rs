//! The migration runner and the migrations, against a real Postgres: one
//! fresh database per test (argus-testkit), so the tests run in parallel.

use std::collections::BTreeSet;
use std::process::Command;

use argus_schema::migrate::{self, MigrateError, MIGRATIONS};
use argus_testkit::pg::TestDb;
use tokio_postgres::Client;

// ---------------------------------------------------------------------------
// The expected schema, written from the plan (W1-T1 §1.1) and the brief's
// "Database" section, not from the migration files.
// ---------------------------------------------------------------------------

/// `table.column|type|null or not null|default`. For the tables the plan
/// creates (and 0003 to 0006) this is every column; for the tables it extends,
/// the columns it adds plus the brief's `devices` columns.
const EXPECTED_COLUMNS: &str = "
devices.id|uuid|not null|gen_random_uuid()
devices.tenant_id|uuid|not null|
devices.device_type_id|uuid|null|
devices.name|text|not null|
devices.status|text|not null|'active'::text
devices.created_at|timestamp with time zone|not null|now()
devices.updated_at|timestamp with time zone|not null|now()
devices.device_role|text|null|'endpoint'::text
devices.parent_device_id|uuid|null|
devices.logical_identifier|text|null|
devices.last_seen_at|timestamp with time zone|null|
devices.network_metadata|jsonb|null|'{}'::jsonb
devices.protocol|text|null|'mqtt'::text
assets.health_score_updated_at|timestamp with time zone|null|
assets.health_score_computed_by|text|null|
assets.last_telemetry_at|timestamp with time zone|null|
asset_types.metric_definitions|jsonb|null|
asset_types.transformation_engine|jsonb|null|
asset_types.health_algorithm|jsonb|null|
asset_types.threshold_rules|jsonb|null|
asset_types.event_rules|jsonb|null|
asset_types.aggregation_rules|jsonb|null|
asset_types.validation_rules|jsonb|null|
asset_types.telemetry_config_version|text|null|'1.0.0'::text
asset_types.telemetry_config_updated_at|timestamp with time zone|null|now()
asset_types.telemetry_config_updated_by|uuid|null|
device_types.processing_mode|text|null|'endpoint'::text
device_types.protocol_adapter|text|null|'json'::text
device_types.message_schema|jsonb|null|
device_types.extraction_rules|jsonb|null|
device_types.demux_strategy|jsonb|null|
device_types.chunking_config|jsonb|null|
device_types.transformation_rules|jsonb|null|
entity_edges.source_entity_id|uuid|not null|
entity_edges.source_entity_type|text|not null|
entity_edges.target_entity_id|uuid|not null|
entity_edges.target_entity_type|text|not null|
entity_edges.relationship_type|text|not null|
entity_edges.valid_from|timestamp with time zone|not null|now()
entity_edges.valid_until|timestamp with time zone|null|
telemetry_history.id|uuid|not null|gen_random_uuid()
telemetry_history.tenant_id|uuid|not null|
telemetry_history.entity_id|uuid|not null|
telemetry_history.entity_type|text|not null|
telemetry_history.metric_key|text|not null|
telemetry_history.value|numeric|null|
telemetry_history.value_text|text|null|
telemetry_history.value_json|jsonb|null|
telemetry_history.unit|text|null|
telemetry_history.quality|text|null|'good'::text
telemetry_history.timestamp|timestamp with time zone|not null|
telemetry_history.received_at|timestamp with time zone|not null|now()
telemetry_history.source_device_id|uuid|null|
telemetry_history.source_message_id|text|null|
telemetry_history.metadata|jsonb|null|'{}'::jsonb
telemetry_history.created_at|timestamp with time zone|not null|now()
telemetry_raw.id|uuid|not null|gen_random_uuid()
telemetry_raw.tenant_id|uuid|not null|
telemetry_raw.device_id|uuid|not null|
telemetry_raw.payload|jsonb|not null|
telemetry_raw.payload_size_bytes|integer|null|
telemetry_raw.correlation_id|text|null|
telemetry_raw.sequence_number|integer|null|
telemetry_raw.total_chunks|integer|null|
telemetry_raw.device_timestamp|timestamp with time zone|null|
telemetry_raw.received_at|timestamp with time zone|not null|now()
telemetry_raw.ingestion_source|text|null|'mqtt'::text
telemetry_raw.mqtt_topic|text|null|
telemetry_raw.client_id|text|null|
telemetry_raw.created_at|timestamp with time zone|not null|now()
telemetry_raw.content_sha256|bytea|null|
telemetry_raw.mqtt_properties|jsonb|null|
telemetry_chunks.id|uuid|not null|gen_random_uuid()
telemetry_chunks.tenant_id|uuid|not null|
telemetry_chunks.device_id|uuid|not null|
telemetry_chunks.correlation_id|text|not null|
telemetry_chunks.sequence_number|integer|not null|
telemetry_chunks.total_chunks|integer|not null|
telemetry_chunks.chunk_payload|jsonb|not null|
telemetry_chunks.received_at|timestamp with time zone|not null|now()
telemetry_chunks.expires_at|timestamp with time zone|not null|(now() + '00:01:00'::interval)
telemetry_transactions.id|uuid|not null|gen_random_uuid()
telemetry_transactions.tenant_id|uuid|not null|
telemetry_transactions.correlation_id|text|not null|
telemetry_transactions.gateway_device_id|uuid|not null|
telemetry_transactions.total_logical_devices|integer|not null|
telemetry_transactions.processed_devices|integer|null|0
telemetry_transactions.status|text|null|'pending'::text
telemetry_transactions.started_at|timestamp with time zone|not null|now()
telemetry_transactions.completed_at|timestamp with time zone|null|
telemetry_transactions.error_message|text|null|
telemetry_transactions.metadata|jsonb|null|'{}'::jsonb
threshold_rules.id|uuid|not null|gen_random_uuid()
threshold_rules.tenant_id|uuid|not null|
threshold_rules.name|text|not null|
threshold_rules.description|text|null|
threshold_rules.asset_type_id|uuid|null|
threshold_rules.specific_asset_ids|uuid[]|null|
threshold_rules.metric_key|text|not null|
threshold_rules.condition|jsonb|not null|
threshold_rules.warning_threshold|numeric|null|
threshold_rules.critical_threshold|numeric|null|
threshold_rules.hysteresis|numeric|null|0
threshold_rules.debounce_seconds|integer|null|60
threshold_rules.cooldown_seconds|integer|null|300
threshold_rules.event_type|text|not null|
threshold_rules.event_severity|text|not null|
threshold_rules.event_priority|integer|null|3
threshold_rules.message_template|text|null|
threshold_rules.is_active|boolean|null|true
threshold_rules.created_by|uuid|null|
threshold_rules.created_at|timestamp with time zone|not null|now()
threshold_rules.updated_at|timestamp with time zone|not null|now()
device_certificates.id|uuid|not null|gen_random_uuid()
device_certificates.device_id|uuid|not null|
device_certificates.serial_number|text|not null|
device_certificates.fingerprint_sha256|text|not null|
device_certificates.not_before|timestamp with time zone|not null|
device_certificates.not_after|timestamp with time zone|not null|
device_certificates.revoked_at|timestamp with time zone|null|
device_certificates.revocation_reason|text|null|
device_certificates.created_at|timestamp with time zone|not null|now()
device_api_keys.id|uuid|not null|gen_random_uuid()
device_api_keys.device_id|uuid|not null|
device_api_keys.prefix|text|not null|
device_api_keys.key_digest|bytea|not null|
device_api_keys.created_at|timestamp with time zone|not null|now()
device_api_keys.last_used_at|timestamp with time zone|null|
device_api_keys.expires_at|timestamp with time zone|null|
device_api_keys.revoked_at|timestamp with time zone|null|
";

/// Tables whose columns must be exactly the expected ones (no more).
const COMPLETE_TABLES: &[&str] = &[
    "devices",
    "telemetry_history",
    "telemetry_raw",
    "telemetry_chunks",
    "telemetry_transactions",
    "threshold_rules",
    "device_certificates",
    "device_api_keys",
];

/// Every table we create.
const TABLES: &[&str] = &[
    "organizations",
    "users",
    "device_types",
    "devices",
    "asset_types",
    "assets",
    "entity_edges",
    "telemetry_history",
    "telemetry_raw",
    "telemetry_chunks",
    "telemetry_transactions",
    "threshold_rules",
    "device_certificates",
    "device_api_keys",
];

/// (table, column, allowed values): the plan's and the brief's CHECK constraints.
const EXPECTED_CHECKS: &[(&str, &str, &[&str])] = &[
    (
        "devices",
        "status",
        &["active", "disabled", "decommissioned"],
    ),
    (
        "devices",
        "device_role",
        &["endpoint", "gateway", "gateway_chunked", "rtu_multiport"],
    ),
    (
        "device_types",
        "processing_mode",
        &["endpoint", "gateway", "gateway_chunked", "rtu_multiport"],
    ),
    ("telemetry_history", "entity_type", &["Device", "Asset"]),
    (
        "telemetry_history",
        "quality",
        &["good", "uncertain", "bad"],
    ),
    (
        "telemetry_raw",
        "ingestion_source",
        &["mqtt", "http", "bridge"],
    ),
    (
        "telemetry_transactions",
        "status",
        &["pending", "processing", "completed", "failed"],
    ),
    (
        "threshold_rules",
        "event_severity",
        &["info", "warning", "critical"],
    ),
];

/// `table.column -> table.column on delete <action>`.
const EXPECTED_FKS: &str = "
devices.tenant_id -> organizations.id on delete cascade
devices.device_type_id -> device_types.id on delete no action
devices.parent_device_id -> devices.id on delete set null
asset_types.telemetry_config_updated_by -> users.id on delete no action
telemetry_history.tenant_id -> organizations.id on delete cascade
telemetry_history.source_device_id -> devices.id on delete set null
telemetry_raw.tenant_id -> organizations.id on delete cascade
telemetry_raw.device_id -> devices.id on delete cascade
telemetry_chunks.tenant_id -> organizations.id on delete cascade
telemetry_chunks.device_id -> devices.id on delete cascade
telemetry_transactions.tenant_id -> organizations.id on delete cascade
telemetry_transactions.gateway_device_id -> devices.id on delete cascade
threshold_rules.tenant_id -> organizations.id on delete cascade
threshold_rules.asset_type_id -> asset_types.id on delete cascade
threshold_rules.created_by -> users.id on delete set null
device_certificates.device_id -> devices.id on delete cascade
device_api_keys.device_id -> devices.id on delete cascade
";

/// `index name|table|definition after USING`, in Postgres' canonical form.
/// Unique constraints appear as their unique indexes (marked `unique`).
const EXPECTED_INDEXES: &str = "
idx_devices_role|devices|btree (device_role)
idx_devices_parent|devices|btree (parent_device_id)
idx_devices_last_seen|devices|btree (last_seen_at)
idx_assets_health_updated|assets|btree (health_score_updated_at)
idx_assets_last_telemetry|assets|btree (last_telemetry_at)
idx_asset_types_config_version|asset_types|btree (telemetry_config_version, telemetry_config_updated_at)
idx_telemetry_entity|telemetry_history|btree (entity_id, entity_type, \"timestamp\" DESC)
idx_telemetry_tenant|telemetry_history|btree (tenant_id, \"timestamp\" DESC)
idx_telemetry_metric_key|telemetry_history|btree (metric_key)
idx_telemetry_timestamp|telemetry_history|btree (\"timestamp\" DESC)
idx_telemetry_quality|telemetry_history|btree (quality) WHERE (quality <> 'good'::text)
idx_telemetry_metadata|telemetry_history|gin (metadata)
telemetry_raw_pkey|telemetry_raw|unique btree (id)
idx_telemetry_raw_device|telemetry_raw|btree (device_id, received_at DESC)
idx_telemetry_raw_tenant|telemetry_raw|btree (tenant_id, received_at DESC)
idx_telemetry_raw_correlation|telemetry_raw|btree (correlation_id) WHERE (correlation_id IS NOT NULL)
idx_telemetry_chunks_correlation|telemetry_chunks|btree (correlation_id)
idx_telemetry_chunks_expires|telemetry_chunks|btree (expires_at)
telemetry_chunks_correlation_id_sequence_number_key|telemetry_chunks|unique btree (correlation_id, sequence_number)
idx_telemetry_tx_correlation|telemetry_transactions|btree (correlation_id)
idx_telemetry_tx_status|telemetry_transactions|btree (status)
telemetry_transactions_correlation_id_key|telemetry_transactions|unique btree (correlation_id)
idx_threshold_rules_tenant|threshold_rules|btree (tenant_id)
idx_threshold_rules_asset_type|threshold_rules|btree (asset_type_id)
idx_threshold_rules_active|threshold_rules|btree (is_active) WHERE (is_active = true)
idx_entity_edges_device_asset|entity_edges|btree (source_entity_id, target_entity_id) WHERE ((source_entity_type = 'Device'::text) AND (target_entity_type = 'Asset'::text))
idx_entity_edges_relationship|entity_edges|btree (relationship_type, valid_from, valid_until)
device_certificates_serial_number_key|device_certificates|unique btree (serial_number)
idx_device_certificates_device|device_certificates|btree (device_id)
device_api_keys_key_digest_key|device_api_keys|unique btree (key_digest)
idx_device_api_keys_device|device_api_keys|btree (device_id)
";

fn lines(text: &str) -> BTreeSet<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

async fn strings(client: &Client, sql: &str) -> BTreeSet<String> {
    client
        .query(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"))
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect()
}

async fn columns(client: &Client) -> BTreeSet<String> {
    strings(
        client,
        "SELECT c.relname || '.' || a.attname || '|' || format_type(a.atttypid, a.atttypmod) || '|' \
           || CASE WHEN a.attnotnull THEN 'not null' ELSE 'null' END || '|' \
           || COALESCE(pg_get_expr(d.adbin, d.adrelid), '') \
         FROM pg_attribute a \
         JOIN pg_class c ON c.oid = a.attrelid \
         LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum \
         WHERE c.relnamespace = 'public'::regnamespace AND c.relkind = 'r' \
           AND a.attnum > 0 AND NOT a.attisdropped",
    )
    .await
}

/// A sorted text dump of every object in the public schema: tables, columns
/// (name, type, nullability, default), constraints, indexes, triggers,
/// functions and types. Column positions are left out on purpose: a column
/// dropped and added again gets a new position but is the same schema.
async fn catalog_dump(client: &Client) -> String {
    let queries = [
        "SELECT 'relation ' || relname || ' ' || relkind::text FROM pg_class \
         WHERE relnamespace = 'public'::regnamespace",
        "SELECT 'column ' || c.relname || '.' || a.attname || ' ' || format_type(a.atttypid, a.atttypmod) \
           || CASE WHEN a.attnotnull THEN ' not null' ELSE '' END \
           || COALESCE(' default ' || pg_get_expr(d.adbin, d.adrelid), '') \
         FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid \
         LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum \
         WHERE c.relnamespace = 'public'::regnamespace AND a.attnum > 0 AND NOT a.attisdropped",
        "SELECT 'constraint ' || conrelid::regclass::text || ' ' || conname || ' ' \
           || pg_get_constraintdef(oid) \
         FROM pg_constraint WHERE connamespace = 'public'::regnamespace",
        "SELECT 'index ' || indexdef FROM pg_indexes WHERE schemaname = 'public'",
        "SELECT 'trigger ' || pg_get_triggerdef(t.oid) FROM pg_trigger t \
         JOIN pg_class c ON c.oid = t.tgrelid \
         WHERE c.relnamespace = 'public'::regnamespace AND NOT t.tgisinternal",
        "SELECT 'function ' || proname || '(' || pg_get_function_identity_arguments(oid) || ') ' \
           || md5(prosrc) FROM pg_proc WHERE pronamespace = 'public'::regnamespace",
        "SELECT 'type ' || typname || ' ' || typtype::text FROM pg_type \
         WHERE typnamespace = 'public'::regnamespace",
        "SELECT 'extension ' || extname FROM pg_extension",
    ];
    let mut all = BTreeSet::new();
    for q in queries {
        all.extend(strings(client, q).await);
    }
    all.into_iter().collect::<Vec<_>>().join("\n")
}

/// Asserts two catalog dumps are equal, printing only the lines that differ.
#[track_caller]
fn assert_same_schema(actual: &str, expected: &str, what: &str) {
    let a: BTreeSet<&str> = actual.lines().collect();
    let e: BTreeSet<&str> = expected.lines().collect();
    let extra: Vec<_> = a.difference(&e).collect();
    let missing: Vec<_> = e.difference(&a).collect();
    assert!(
        extra.is_empty() && missing.is_empty(),
        "{what}\nonly in actual: {extra:#?}\nonly in expected: {missing:#?}"
    );
}

/// The dump without the runner's own bookkeeping table.
fn without_bookkeeping(dump: &str) -> String {
    dump.lines()
        .filter(|l| !l.contains("schema_migrations"))
        .collect::<Vec<_>>()
        .join("\n")
}

async fn migrated_db() -> (TestDb, Client) {
    let db = TestDb::create().await;
    let mut client = db.client().await;
    migrate::migrate(&mut client).await.expect("migrate");
    (db, client)
}

async fn applied_versions(client: &Client) -> Vec<i32> {
    client
        .query(
            "SELECT version FROM schema_migrations ORDER BY version",
            &[],
        )
        .await
        .expect("read schema_migrations")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

// ---------------------------------------------------------------------------

#[tokio::test]
async fn migrate_creates_every_table_column_check_fk_and_index_of_the_plan() {
    let (_db, client) = migrated_db().await;

    let tables = strings(
        &client,
        "SELECT relname::text FROM pg_class WHERE relnamespace = 'public'::regnamespace AND relkind = 'r'",
    )
    .await;
    for t in TABLES {
        assert!(tables.contains(*t), "table {t} missing");
    }

    let actual = columns(&client).await;
    let expected = lines(EXPECTED_COLUMNS);
    let missing: Vec<_> = expected.difference(&actual).collect();
    assert!(
        missing.is_empty(),
        "columns missing or different: {missing:#?}"
    );
    for table in COMPLETE_TABLES {
        let prefix = format!("{table}.");
        let extra: Vec<_> = actual
            .iter()
            .filter(|c| c.starts_with(&prefix) && !expected.contains(*c))
            .collect();
        assert!(
            extra.is_empty(),
            "unexpected columns in {table}: {extra:#?}"
        );
    }

    // CHECK constraints: one per (table, column), allowing exactly the listed values.
    for (table, column, values) in EXPECTED_CHECKS {
        let defs = strings(
            &client,
            &format!(
                "SELECT pg_get_constraintdef(oid) FROM pg_constraint \
                 WHERE contype = 'c' AND conrelid = 'public.{table}'::regclass"
            ),
        )
        .await;
        let def = defs
            .iter()
            .find(|d| d.contains(&format!("({column} = ")))
            .unwrap_or_else(|| panic!("no CHECK on {table}.{column}; have {defs:?}"));
        let allowed: BTreeSet<&str> = def.split('\'').skip(1).step_by(2).collect();
        let want: BTreeSet<&str> = values.iter().copied().collect();
        assert_eq!(allowed, want, "CHECK on {table}.{column}: {def}");
    }

    let fks = strings(
        &client,
        "SELECT c.conrelid::regclass::text || '.' || a.attname || ' -> ' \
           || c.confrelid::regclass::text || '.' || fa.attname || ' on delete ' \
           || CASE c.confdeltype WHEN 'a' THEN 'no action' WHEN 'r' THEN 'restrict' \
                WHEN 'c' THEN 'cascade' WHEN 'n' THEN 'set null' ELSE 'set default' END \
         FROM pg_constraint c \
         JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = c.conkey[1] \
         JOIN pg_attribute fa ON fa.attrelid = c.confrelid AND fa.attnum = c.confkey[1] \
         WHERE c.contype = 'f' AND c.connamespace = 'public'::regnamespace",
    )
    .await;
    let missing: Vec<_> = lines(EXPECTED_FKS)
        .into_iter()
        .filter(|f| !fks.contains(f))
        .collect();
    assert!(
        missing.is_empty(),
        "foreign keys missing: {missing:#?}\nhave: {fks:#?}"
    );

    let indexes = strings(
        &client,
        "SELECT i.relname || '|' || t.relname || '|' \
           || CASE WHEN x.indisunique THEN 'unique ' ELSE '' END \
           || substring(pg_get_indexdef(i.oid) from ' USING (.*)$') \
         FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid JOIN pg_class t ON t.oid = x.indrelid \
         WHERE t.relnamespace = 'public'::regnamespace",
    )
    .await;
    let missing: Vec<_> = lines(EXPECTED_INDEXES)
        .into_iter()
        .filter(|i| !indexes.contains(i))
        .collect();
    assert!(
        missing.is_empty(),
        "indexes missing or different: {missing:#?}"
    );

    // Every table has a uuid primary key on id.
    for t in TABLES {
        assert!(
            indexes.contains(&format!("{t}_pkey|{t}|unique btree (id)")),
            "{t} has no primary key on id"
        );
    }
}

#[tokio::test]
async fn every_down_migration_restores_the_previous_state_exactly() {
    let db = TestDb::create().await;
    let mut client = db.client().await;

    // Going up one version at a time: the state after each up migration.
    let mut up = vec![catalog_dump(&client).await];
    for m in MIGRATIONS {
        migrate::migrate_to(&mut client, m.version).await.unwrap();
        up.push(without_bookkeeping(&catalog_dump(&client).await));
    }
    assert_eq!(applied_versions(&client).await, vec![1, 2, 3, 4, 5, 6, 7]);

    // Coming down one step at a time must meet the same states.
    for (i, m) in MIGRATIONS.iter().enumerate().rev() {
        let report = migrate::rollback(&mut client, None).await.unwrap();
        assert_eq!(report.rolled_back.len(), 1);
        assert_eq!(report.rolled_back[0].version, m.version);
        let dump = without_bookkeeping(&catalog_dump(&client).await);
        assert_same_schema(
            &dump,
            &up[i],
            &format!(
                "rolling back {} did not restore the state before it",
                m.id()
            ),
        );
    }
    // Version 0: none of our objects is left (only the runner's empty table).
    assert!(applied_versions(&client).await.is_empty());
}

#[tokio::test]
async fn rollback_to_zero_leaves_nothing_and_migrate_again_gives_the_identical_schema() {
    let db = TestDb::create().await;
    let mut client = db.client().await;
    let empty = catalog_dump(&client).await;

    migrate::migrate(&mut client).await.unwrap();
    let first = catalog_dump(&client).await;

    let report = migrate::rollback(&mut client, Some(0)).await.unwrap();
    assert_eq!(
        report
            .rolled_back
            .iter()
            .map(|s| s.version)
            .collect::<Vec<_>>(),
        vec![7, 6, 5, 4, 3, 2, 1]
    );
    assert_eq!(report.current_version, 0);
    assert_same_schema(
        &without_bookkeeping(&catalog_dump(&client).await),
        &empty,
        "objects left after rollback --to 0",
    );
    let leftover = strings(
        &client,
        "SELECT relname::text FROM pg_class WHERE relnamespace = 'public'::regnamespace \
         AND relname NOT LIKE 'schema_migrations%'",
    )
    .await;
    assert!(leftover.is_empty(), "left over: {leftover:?}");

    let again = migrate::migrate(&mut client).await.unwrap();
    assert_eq!(again.applied.len(), MIGRATIONS.len());
    assert_same_schema(
        &catalog_dump(&client).await,
        &first,
        "migrate after rollback --to 0",
    );
}

#[tokio::test]
async fn migrate_twice_changes_nothing() {
    let (_db, mut client) = migrated_db().await;
    let before = catalog_dump(&client).await;
    let report = migrate::migrate(&mut client).await.unwrap();
    assert!(report.applied.is_empty());
    assert_eq!(report.already_applied, MIGRATIONS.len());
    assert_eq!(report.current_version, migrate::latest_version());
    assert_same_schema(&catalog_dump(&client).await, &before, "schema changed");

    // The up files themselves are re-runnable (IF NOT EXISTS everywhere).
    for m in MIGRATIONS {
        client.batch_execute(m.up).await.unwrap_or_else(|e| {
            panic!("{} is not re-runnable: {e:?}", m.id());
        });
    }
    assert_same_schema(&catalog_dump(&client).await, &before, "schema changed");
}

#[tokio::test]
async fn two_migrate_runs_started_together_both_succeed_and_apply_each_migration_once() {
    let db = TestDb::create().await;
    let mut a = db.client().await;
    let mut b = db.client().await;
    let (ra, rb) = tokio::join!(migrate::migrate(&mut a), migrate::migrate(&mut b));
    let (ra, rb) = (ra.expect("first runner"), rb.expect("second runner"));
    // The lock is held for the whole run: one runner did everything.
    let mut counts = [ra.applied.len(), rb.applied.len()];
    counts.sort();
    assert_eq!(counts, [0, MIGRATIONS.len()]);
    assert_eq!(ra.current_version, migrate::latest_version());
    assert_eq!(rb.current_version, migrate::latest_version());
    assert_eq!(applied_versions(&a).await, vec![1, 2, 3, 4, 5, 6, 7]);
}

#[tokio::test]
async fn an_edited_applied_migration_is_refused_with_its_name() {
    let (_db, mut client) = migrated_db().await;
    // Simulate an edit of 0002's up file after it was applied.
    client
        .execute(
            "UPDATE schema_migrations SET checksum = repeat('0', 64) WHERE version = 2",
            &[],
        )
        .await
        .unwrap();
    let before = catalog_dump(&client).await;

    let err = migrate::migrate(&mut client).await.unwrap_err();
    assert!(
        matches!(&err, MigrateError::ChecksumMismatch { version: 2, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("0002_iot_foundation"), "{err}");
    assert!(!err.is_retriable());

    // Rollback refuses too, and nothing changed.
    let err = migrate::rollback(&mut client, None).await.unwrap_err();
    assert!(err.to_string().contains("0002_iot_foundation"), "{err}");
    assert_same_schema(&catalog_dump(&client).await, &before, "schema changed");

    // status shows it.
    let status = migrate::status(&client).await.unwrap();
    assert!(!status.is_up_to_date());
    assert!(status.to_string().contains("CHANGED"));
}

#[tokio::test]
async fn an_unknown_applied_migration_is_refused() {
    let (_db, mut client) = migrated_db().await;
    client
        .execute(
            "INSERT INTO schema_migrations (version, name, checksum) VALUES (99, 'from_the_future', 'x')",
            &[],
        )
        .await
        .unwrap();
    let err = migrate::migrate(&mut client).await.unwrap_err();
    assert!(
        matches!(err, MigrateError::UnknownApplied { version: 99, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("0099_from_the_future"), "{err}");
}

#[tokio::test]
async fn invalid_rollbacks_are_refused_and_change_nothing() {
    let db = TestDb::create().await;
    let mut client = db.client().await;

    // Nothing applied: nothing to roll back, even with --to 0.
    for to in [None, Some(0)] {
        let err = migrate::rollback(&mut client, to).await.unwrap_err();
        assert!(matches!(err, MigrateError::NothingToRollBack), "{err:?}");
    }

    migrate::migrate(&mut client).await.unwrap();
    let before = catalog_dump(&client).await;
    for to in [8, 42, -1] {
        let err = migrate::rollback(&mut client, Some(to)).await.unwrap_err();
        assert!(matches!(err, MigrateError::NoSuchVersion { .. }), "{err:?}");
        assert!(err.to_string().contains(&to.to_string()), "{err}");
    }
    // Not below the current version.
    let err = migrate::rollback(&mut client, Some(7)).await.unwrap_err();
    assert!(
        matches!(
            err,
            MigrateError::TargetNotBelowCurrent {
                target: 7,
                current: 7
            }
        ),
        "{err:?}"
    );
    assert_same_schema(&catalog_dump(&client).await, &before, "schema changed");
    assert_eq!(applied_versions(&client).await, vec![1, 2, 3, 4, 5, 6, 7]);

    // Past the first migration: after rolling back everything, one more step is refused.
    migrate::rollback(&mut client, Some(0)).await.unwrap();
    let err = migrate::rollback(&mut client, None).await.unwrap_err();
    assert!(matches!(err, MigrateError::NothingToRollBack), "{err:?}");
}

#[tokio::test]
async fn status_reports_pending_and_applied() {
    let db = TestDb::create().await;
    let mut client = db.client().await;
    let status = migrate::status(&client).await.unwrap();
    assert_eq!(status.pending(), MIGRATIONS.len());
    assert_eq!(status.current_version, 0);
    // status is read-only: it does not create the bookkeeping table.
    assert!(!catalog_dump(&client).await.contains("schema_migrations"));

    migrate::migrate_to(&mut client, 2).await.unwrap();
    let status = migrate::status(&client).await.unwrap();
    assert_eq!(status.current_version, 2);
    assert_eq!(status.pending(), MIGRATIONS.len() - 2);
    assert!(!status.is_up_to_date());

    migrate::migrate(&mut client).await.unwrap();
    assert!(migrate::status(&client).await.unwrap().is_up_to_date());
}

#[tokio::test]
async fn telemetry_raw_is_append_only() {
    let (_db, mut client) = migrated_db().await;
    argus_schema::seed::seed(&mut client).await.unwrap();
    let org = argus_schema::seed::DEMO_ORG_ID;
    let device = argus_schema::seed::DEMO_DEVICE_ID;
    let id = uuid::Uuid::new_v4();
    let insert = "INSERT INTO telemetry_raw (id, tenant_id, device_id, payload, ingestion_source) \
                  VALUES ($1, $2, $3, '{\"temperature\": 21.5}', 'mqtt') ON CONFLICT (id) DO NOTHING";
    assert_eq!(
        client.execute(insert, &[&id, &org, &device]).await.unwrap(),
        1
    );
    // The idempotent write path: the same id again is a no-op, not an error.
    assert_eq!(
        client.execute(insert, &[&id, &org, &device]).await.unwrap(),
        0
    );
    // A plain duplicate insert hits the primary key.
    let dup = client
        .execute(
            "INSERT INTO telemetry_raw (id, tenant_id, device_id, payload) VALUES ($1, $2, $3, '{}')",
            &[&id, &org, &device],
        )
        .await
        .unwrap_err();
    assert_eq!(
        dup.code(),
        Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION)
    );

    for (what, sql) in [
        ("UPDATE", "UPDATE telemetry_raw SET payload = '{}'"),
        ("DELETE", "DELETE FROM telemetry_raw"),
        ("TRUNCATE", "TRUNCATE telemetry_raw"),
        (
            "DELETE",
            "DELETE FROM devices WHERE id = '0d000000-0000-4000-8000-000000000001'",
        ),
    ] {
        let err = client.batch_execute(sql).await.unwrap_err();
        let db_err = err
            .as_db_error()
            .unwrap_or_else(|| panic!("{sql}: {err:?}"));
        assert_eq!(
            db_err.code(),
            &tokio_postgres::error::SqlState::RESTRICT_VIOLATION,
            "{sql}"
        );
        assert_eq!(
            db_err.message(),
            format!("telemetry_raw is append-only: {what} is not allowed"),
            "{sql}"
        );
    }
    let payload: serde_json::Value = client
        .query_one("SELECT payload FROM telemetry_raw WHERE id = $1", &[&id])
        .await
        .unwrap()
        .get(0);
    assert_eq!(payload, serde_json::json!({"temperature": 21.5}));
}

// ---------------------------------------------------------------------------
// The binary: exit codes and messages a user sees.
// ---------------------------------------------------------------------------

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn run_cli(args: &[&str], database_url: &str) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_argus-schema"))
        .args(args)
        .env("DATABASE_URL", database_url)
        .env_remove("RUST_LOG")
        .output()
        .expect("run argus-schema");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[tokio::test]
async fn cli_unreachable_server_names_host_and_database_but_not_the_password() {
    let port = argus_testkit::free_port();
    let url = format!("postgres://argus:pw-must-not-leak@127.0.0.1:{port}/argus_nowhere");
    for cmd in ["migrate", "rollback", "status", "seed"] {
        let run = run_cli(&[cmd], &url);
        assert_ne!(run.code, 0, "{cmd}: {}", run.stderr);
        assert_eq!(
            run.stderr.trim().lines().count(),
            1,
            "{cmd}: not one line: {}",
            run.stderr
        );
        assert!(
            run.stderr.contains(&format!("127.0.0.1:{port}")),
            "{cmd}: {}",
            run.stderr
        );
        assert!(
            run.stderr.contains("argus_nowhere"),
            "{cmd}: {}",
            run.stderr
        );
        assert!(
            !run.stderr.contains("pw-must-not-leak"),
            "{cmd}: {}",
            run.stderr
        );
        assert!(
            !run.stdout.contains("pw-must-not-leak"),
            "{cmd}: {}",
            run.stdout
        );
    }
}

#[tokio::test]
async fn cli_wrong_password_names_host_and_database_but_not_the_password() {
    let server = argus_testkit::pg::PgServer::start_with_password("the-right-one").await;
    let right = server.url("postgres");
    let wrong = right.replace("the-right-one", "pw-wrong-must-not-leak");
    let run = run_cli(&["status"], &wrong);
    assert_ne!(run.code, 0, "{}", run.stderr);
    assert_eq!(run.stderr.trim().lines().count(), 1, "{}", run.stderr);
    assert!(
        run.stderr.contains(&format!("127.0.0.1:{}", server.port())),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("postgres"), "{}", run.stderr);
    assert!(
        run.stderr.contains("password authentication failed"),
        "{}",
        run.stderr
    );
    for secret in ["pw-wrong-must-not-leak", "the-right-one"] {
        assert!(!run.stderr.contains(secret), "{}", run.stderr);
        assert!(!run.stdout.contains(secret), "{}", run.stdout);
    }
    // The right password gets through (so the failure above was the password).
    let run = run_cli(&["migrate"], &right);
    assert_eq!(run.code, 0, "{}", run.stderr);
}

#[tokio::test]
async fn cli_missing_database_is_one_clear_line() {
    let db = TestDb::create().await;
    let missing = format!("{}_missing", db.name());
    let url = argus_testkit::pg::with_database(db.url(), &missing);
    let run = run_cli(&["migrate"], &url);
    assert_ne!(run.code, 0);
    assert_eq!(run.stderr.trim().lines().count(), 1, "{}", run.stderr);
    assert!(
        run.stderr.contains(&format!("database \"{missing}\"")),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("does not exist"), "{}", run.stderr);
}

#[tokio::test]
async fn cli_migrate_status_rollback() {
    let db = TestDb::create().await;
    let client = db.client().await;

    let run = run_cli(&["status"], db.url());
    assert_eq!(
        run.code, 2,
        "pending migrations: status exits 2: {}",
        run.stdout
    );
    assert!(
        run.stdout.contains("0001     platform_base"),
        "{}",
        run.stdout
    );

    let run = run_cli(&["migrate"], db.url());
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stdout.contains("applied 0007_service_roles"),
        "{}",
        run.stdout
    );
    assert_eq!(run_cli(&["status"], db.url()).code, 0);

    // Bad rollbacks: a clear error, nothing changed.
    let before = catalog_dump(&client).await;
    for to in ["9", "7"] {
        let run = run_cli(&["rollback", "--to", to], db.url());
        assert_ne!(run.code, 0, "--to {to}: {}", run.stdout);
        assert!(
            run.stderr.contains(&format!("version {to}")),
            "{}",
            run.stderr
        );
        assert_eq!(run.stderr.trim().lines().count(), 1, "{}", run.stderr);
    }
    let run = run_cli(&["rollback", "--to", "-1"], db.url());
    assert_ne!(run.code, 0);
    assert_same_schema(&catalog_dump(&client).await, &before, "schema changed");

    // One step by default.
    let run = run_cli(&["rollback"], db.url());
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stdout.contains("rolled back 0007_service_roles"),
        "{}",
        run.stdout
    );
    assert_eq!(applied_versions(&client).await, vec![1, 2, 3, 4, 5, 6]);

    let run = run_cli(&["rollback", "--to", "0"], db.url());
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(applied_versions(&client).await.is_empty());
    let run = run_cli(&["rollback"], db.url());
    assert_ne!(run.code, 0);
    assert!(
        run.stderr.contains("nothing to roll back"),
        "{}",
        run.stderr
    );
}

#[tokio::test]
async fn cli_refuses_an_edited_migration_by_name() {
    let (db, client) = migrated_db().await;
    client
        .execute(
            "UPDATE schema_migrations SET checksum = repeat('f', 64) WHERE version = 3",
            &[],
        )
        .await
        .unwrap();
    let run = run_cli(&["migrate"], db.url());
    assert_ne!(run.code, 0);
    assert!(
        run.stderr.contains("0003_device_certificates"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("changed"), "{}", run.stderr);
}
