//! Demo data (the plan's W1-T1 §1.4), with fixed ids so that other crates,
//! the local stack and tests can refer to it.
//!
//! One organization; 2 device types (temperature sensor, RTU gateway); 2 asset
//! types (HVAC unit, pump) with telemetry configuration; 5 devices (3 sensors,
//! 2 gateways, all `active`); 10 assets; 15 device -> asset links in
//! `entity_edges`; 2 threshold rules. Idempotent: every row has a fixed id and
//! is inserted with `ON CONFLICT (id) DO NOTHING`, so a second run changes
//! nothing and reports every row as found.

use std::fmt;

use serde_json::{json, Value};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Transaction};
use uuid::Uuid;

use crate::pg_error_text;

/// The demo organization (tenant).
pub const DEMO_ORG_ID: Uuid = Uuid::from_u128(0x0a000000_0000_4000_8000_000000000001);
/// Device type "Temperature Sensor".
pub const TEMPERATURE_SENSOR_TYPE_ID: Uuid =
    Uuid::from_u128(0x0b000000_0000_4000_8000_000000000001);
/// Device type "RTU Gateway".
pub const RTU_GATEWAY_TYPE_ID: Uuid = Uuid::from_u128(0x0b000000_0000_4000_8000_000000000002);
/// Asset type "HVAC Unit".
pub const HVAC_ASSET_TYPE_ID: Uuid = Uuid::from_u128(0x0c000000_0000_4000_8000_000000000001);
/// Asset type "Pump".
pub const PUMP_ASSET_TYPE_ID: Uuid = Uuid::from_u128(0x0c000000_0000_4000_8000_000000000002);
/// The three temperature sensors, `0d000000-0000-4000-8000-00000000000{1,2,3}`.
pub const SENSOR_IDS: [Uuid; 3] = [
    Uuid::from_u128(0x0d000000_0000_4000_8000_000000000001),
    Uuid::from_u128(0x0d000000_0000_4000_8000_000000000002),
    Uuid::from_u128(0x0d000000_0000_4000_8000_000000000003),
];
/// The two RTU gateways, `0d000000-0000-4000-8000-00000000000{4,5}`.
pub const GATEWAY_IDS: [Uuid; 2] = [
    Uuid::from_u128(0x0d000000_0000_4000_8000_000000000004),
    Uuid::from_u128(0x0d000000_0000_4000_8000_000000000005),
];
/// The device the README, the local stack and the load tester use by default: the first sensor.
pub const DEMO_DEVICE_ID: Uuid = SENSOR_IDS[0];
/// Every seeded device: sensors, then gateways.
pub const DEVICE_IDS: [Uuid; 5] = [
    SENSOR_IDS[0],
    SENSOR_IDS[1],
    SENSOR_IDS[2],
    GATEWAY_IDS[0],
    GATEWAY_IDS[1],
];
/// The ten assets, `0e000000-0000-4000-8000-0000000000{01..0a}`: five HVAC units, then five pumps.
pub const ASSET_IDS: [Uuid; 10] = numbered(0x0e000000_0000_4000_8000_000000000000);
/// The fifteen device -> asset links, `0f000000-0000-4000-8000-0000000000{01..0f}`.
pub const EDGE_IDS: [Uuid; 15] = numbered(0x0f000000_0000_4000_8000_000000000000);
/// The two threshold rules (HVAC supply temperature, pump vibration).
pub const THRESHOLD_RULE_IDS: [Uuid; 2] = numbered(0x10000000_0000_4000_8000_000000000000);

/// `[base + 1, base + 2, ..., base + N]`.
const fn numbered<const N: usize>(base: u128) -> [Uuid; N] {
    let mut ids = [Uuid::nil(); N];
    let mut i = 0;
    while i < N {
        ids[i] = Uuid::from_u128(base + i as u128 + 1);
        i += 1;
    }
    ids
}

/// The lowest schema version the seed needs (it writes 0002's columns).
pub const REQUIRED_VERSION: i32 = 2;

/// Errors of [`seed`].
#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    /// The database is not migrated far enough.
    #[error(
        "the database is at schema version {current}, the seed needs at least {required}; \
         run `argus-schema migrate` first"
    )]
    NotMigrated { current: i32, required: i32 },
    /// A statement failed.
    #[error("could not {action}: {reason}")]
    Db {
        action: String,
        reason: String,
        #[source]
        source: tokio_postgres::Error,
    },
}

impl SeedError {
    fn db(action: impl Into<String>, source: tokio_postgres::Error) -> Self {
        Self::Db {
            action: action.into(),
            reason: pg_error_text(&source),
            source,
        }
    }

    /// True when running again later may succeed (connection problems).
    pub fn is_retriable(&self) -> bool {
        match self {
            Self::NotMigrated { .. } => false,
            Self::Db { source, .. } => source.is_closed() || source.as_db_error().is_none(),
        }
    }
}

/// Rows created and found, per table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableCount {
    pub table: &'static str,
    pub created: u64,
    pub found: u64,
}

/// What [`seed`] did, per table, in insertion order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeedReport {
    pub tables: Vec<TableCount>,
}

impl SeedReport {
    pub fn created(&self) -> u64 {
        self.tables.iter().map(|t| t.created).sum()
    }

    pub fn found(&self) -> u64 {
        self.tables.iter().map(|t| t.found).sum()
    }

    fn count(&mut self, table: &'static str, created: bool) {
        let entry = match self.tables.iter_mut().find(|t| t.table == table) {
            Some(entry) => entry,
            None => {
                self.tables.push(TableCount {
                    table,
                    created: 0,
                    found: 0,
                });
                // Just pushed, so last_mut() is Some.
                let Some(entry) = self.tables.last_mut() else {
                    return;
                };
                entry
            }
        };
        if created {
            entry.created += 1;
        } else {
            entry.found += 1;
        }
    }
}

impl fmt::Display for SeedReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for t in &self.tables {
            writeln!(
                f,
                "{:<16} {:>2} created, {:>2} already there",
                t.table, t.created, t.found
            )?;
        }
        write!(
            f,
            "seed: {} rows created, {} already there (demo organization {DEMO_ORG_ID}, demo device {DEMO_DEVICE_ID})",
            self.created(),
            self.found()
        )
    }
}

/// Inserts one row with `ON CONFLICT (id) DO NOTHING` and counts it.
async fn insert(
    tx: &Transaction<'_>,
    report: &mut SeedReport,
    table: &'static str,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<(), SeedError> {
    let n = tx
        .execute(sql, params)
        .await
        .map_err(|e| SeedError::db(format!("insert into {table}"), e))?;
    report.count(table, n > 0);
    Ok(())
}

/// The highest applied migration version (0 when nothing is applied).
async fn schema_version(client: &Client) -> Result<i32, SeedError> {
    let exists: bool = client
        .query_one("SELECT to_regclass('schema_migrations') IS NOT NULL", &[])
        .await
        .map_err(|e| SeedError::db("read the schema version", e))?
        .get(0);
    if !exists {
        return Ok(0);
    }
    Ok(client
        .query_one(
            "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
            &[],
        )
        .await
        .map_err(|e| SeedError::db("read the schema version", e))?
        .get(0))
}

/// Inserts the demo data; rows that exist already (by id) are left alone.
/// Runs in one transaction.
pub async fn seed(client: &mut Client) -> Result<SeedReport, SeedError> {
    let current = schema_version(client).await?;
    if current < REQUIRED_VERSION {
        return Err(SeedError::NotMigrated {
            current,
            required: REQUIRED_VERSION,
        });
    }

    let mut report = SeedReport { tables: Vec::new() };
    let tx = client
        .transaction()
        .await
        .map_err(|e| SeedError::db("begin the seed transaction", e))?;

    insert(
        &tx,
        &mut report,
        "organizations",
        "INSERT INTO organizations (id, name, slug) VALUES ($1, $2, $3) ON CONFLICT (id) DO NOTHING",
        &[&DEMO_ORG_ID, &"Argus Demo", &"argus-demo"],
    )
    .await?;

    // Device types.
    let device_types: [(Uuid, &str, &str, &str, Value, Value, Value); 2] = [
        (
            TEMPERATURE_SENSOR_TYPE_ID,
            "Temperature Sensor",
            "Single-point temperature and humidity sensor, one JSON object per reading.",
            "endpoint",
            json!({
                "type": "object",
                "required": ["temperature"],
                "properties": {
                    "temperature": {"type": "number"},
                    "humidity": {"type": "number"},
                    "battery": {"type": "number"},
                    "timestamp": {"type": "string", "format": "date-time"},
                    "messageId": {"type": "string"}
                }
            }),
            json!({"temperature": "$.temperature", "humidity": "$.humidity", "battery": "$.battery"}),
            Value::Null,
        ),
        (
            RTU_GATEWAY_TYPE_ID,
            "RTU Gateway",
            "Remote terminal unit that reports readings for several field devices in one message.",
            "gateway",
            json!({
                "type": "object",
                "required": ["devices"],
                "properties": {
                    "devices": {"type": "array", "items": {"type": "object", "required": ["logicalId", "values"]}},
                    "timestamp": {"type": "string", "format": "date-time"}
                }
            }),
            json!({"values": "$.devices[*].values"}),
            json!({"type": "by_field", "arrayPath": "$.devices", "idField": "logicalId"}),
        ),
    ];
    for (id, name, description, mode, schema, extraction, demux) in &device_types {
        let demux: Option<&Value> = (!demux.is_null()).then_some(demux);
        insert(
            &tx,
            &mut report,
            "device_types",
            "INSERT INTO device_types (id, tenant_id, name, description, processing_mode, \
             protocol_adapter, message_schema, extraction_rules, demux_strategy) \
             VALUES ($1, $2, $3, $4, $5, 'json', $6, $7, $8) ON CONFLICT (id) DO NOTHING",
            &[
                id,
                &DEMO_ORG_ID,
                name,
                description,
                mode,
                schema,
                extraction,
                &demux,
            ],
        )
        .await?;
    }

    // Asset types, with telemetry configuration.
    let asset_types = [
        (
            HVAC_ASSET_TYPE_ID,
            "HVAC Unit",
            "Air handling unit with supply/return air temperature and fan speed.",
            json!([
                {"key": "supply_air_temp", "label": "Supply air temperature", "unit": "°C", "type": "number", "min": -20, "max": 60},
                {"key": "return_air_temp", "label": "Return air temperature", "unit": "°C", "type": "number", "min": -20, "max": 60},
                {"key": "humidity", "label": "Relative humidity", "unit": "%", "type": "number", "min": 0, "max": 100},
                {"key": "fan_speed", "label": "Fan speed", "unit": "rpm", "type": "number", "min": 0, "max": 3000}
            ]),
            json!({"type": "jsonata", "mappings": {"supply_air_temp": "temperature", "humidity": "humidity"}}),
            json!({"type": "weighted", "weights": {"supply_air_temp": 0.6, "humidity": 0.4}, "target": {"supply_air_temp": 18}}),
            json!({"windows": ["1m", "5m", "1h"], "functions": ["avg", "min", "max"]}),
            json!({"supply_air_temp": {"min": -40, "max": 85}, "humidity": {"min": 0, "max": 100}}),
        ),
        (
            PUMP_ASSET_TYPE_ID,
            "Pump",
            "Centrifugal pump with pressure, flow and vibration.",
            json!([
                {"key": "discharge_pressure", "label": "Discharge pressure", "unit": "bar", "type": "number", "min": 0, "max": 25},
                {"key": "flow_rate", "label": "Flow rate", "unit": "m3/h", "type": "number", "min": 0, "max": 500},
                {"key": "vibration", "label": "Vibration velocity", "unit": "mm/s", "type": "number", "min": 0, "max": 50}
            ]),
            json!({"type": "jsonata", "mappings": {"discharge_pressure": "pressure", "flow_rate": "flow", "vibration": "vibration"}}),
            json!({"type": "weighted", "weights": {"vibration": 0.7, "discharge_pressure": 0.3}}),
            json!({"windows": ["1m", "15m", "1h"], "functions": ["avg", "max"]}),
            json!({"vibration": {"min": 0, "max": 100}, "flow_rate": {"min": 0}}),
        ),
    ];
    for (id, name, description, metrics, transformation, health, aggregation, validation) in
        &asset_types
    {
        insert(
            &tx,
            &mut report,
            "asset_types",
            "INSERT INTO asset_types (id, tenant_id, name, description, metric_definitions, \
             transformation_engine, health_algorithm, threshold_rules, event_rules, \
             aggregation_rules, validation_rules, telemetry_config_version) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, '[]', '[]', $8, $9, '1.0.0') \
             ON CONFLICT (id) DO NOTHING",
            &[
                id,
                &DEMO_ORG_ID,
                name,
                description,
                metrics,
                transformation,
                health,
                aggregation,
                validation,
            ],
        )
        .await?;
    }

    // Devices: 3 sensors, 2 gateways, all active.
    for (i, id) in SENSOR_IDS.iter().enumerate() {
        let n = i + 1;
        insert(
            &tx,
            &mut report,
            "devices",
            "INSERT INTO devices (id, tenant_id, device_type_id, name, status, device_role, \
             logical_identifier, protocol, network_metadata) \
             VALUES ($1, $2, $3, $4, 'active', 'endpoint', $5, 'mqtt', $6) ON CONFLICT (id) DO NOTHING",
            &[
                id,
                &DEMO_ORG_ID,
                &TEMPERATURE_SENSOR_TYPE_ID,
                &format!("Demo temperature sensor {n}"),
                &format!("TS-{n:04}"),
                &json!({"site": "demo", "floor": n}),
            ],
        )
        .await?;
    }
    for (i, id) in GATEWAY_IDS.iter().enumerate() {
        let n = i + 1;
        insert(
            &tx,
            &mut report,
            "devices",
            "INSERT INTO devices (id, tenant_id, device_type_id, name, status, device_role, \
             logical_identifier, protocol, network_metadata) \
             VALUES ($1, $2, $3, $4, 'active', 'gateway', $5, 'mqtt', $6) ON CONFLICT (id) DO NOTHING",
            &[
                id,
                &DEMO_ORG_ID,
                &RTU_GATEWAY_TYPE_ID,
                &format!("Demo RTU gateway {n}"),
                &format!("RTU-{n:04}"),
                &json!({"site": "demo", "ports": 4}),
            ],
        )
        .await?;
    }

    // Assets: five HVAC units, then five pumps.
    for (i, id) in ASSET_IDS.iter().enumerate() {
        let (type_id, name) = if i < 5 {
            (HVAC_ASSET_TYPE_ID, format!("HVAC Unit {}", i + 1))
        } else {
            (PUMP_ASSET_TYPE_ID, format!("Pump {}", i - 4))
        };
        insert(
            &tx,
            &mut report,
            "assets",
            "INSERT INTO assets (id, tenant_id, asset_type_id, name, status) \
             VALUES ($1, $2, $3, $4, 'active') ON CONFLICT (id) DO NOTHING",
            &[id, &DEMO_ORG_ID, &type_id, &name],
        )
        .await?;
    }

    // 15 distinct device -> asset links: device d monitors assets d and d+5,
    // and also asset (d+1) mod 5.
    for (k, (device, asset)) in edge_pairs().into_iter().enumerate() {
        insert(
            &tx,
            &mut report,
            "entity_edges",
            "INSERT INTO entity_edges (id, tenant_id, source_entity_id, source_entity_type, \
             target_entity_id, target_entity_type, relationship_type, valid_from) \
             VALUES ($1, $2, $3, 'Device', $4, 'Asset', 'monitors', '2025-01-01T00:00:00Z') \
             ON CONFLICT (id) DO NOTHING",
            &[&EDGE_IDS[k], &DEMO_ORG_ID, &device, &asset],
        )
        .await?;
    }

    // Threshold rules.
    insert(
        &tx,
        &mut report,
        "threshold_rules",
        "INSERT INTO threshold_rules (id, tenant_id, name, description, asset_type_id, metric_key, \
         condition, warning_threshold, critical_threshold, hysteresis, debounce_seconds, \
         cooldown_seconds, event_type, event_severity, event_priority, message_template) \
         VALUES ($1, $2, 'HVAC supply air too warm', 'Supply air temperature above set point.', \
         $3, 'supply_air_temp', $4, 26, 30, 0.5, 60, 300, 'threshold.supply_air_temp.high', \
         'critical', 2, 'Supply air at {{value}} °C on {{asset.name}}') \
         ON CONFLICT (id) DO NOTHING",
        &[
            &THRESHOLD_RULE_IDS[0],
            &DEMO_ORG_ID,
            &HVAC_ASSET_TYPE_ID,
            &json!({"expression": "value > threshold", "operator": ">"}),
        ],
    )
    .await?;
    insert(
        &tx,
        &mut report,
        "threshold_rules",
        "INSERT INTO threshold_rules (id, tenant_id, name, description, asset_type_id, metric_key, \
         condition, warning_threshold, critical_threshold, hysteresis, debounce_seconds, \
         cooldown_seconds, event_type, event_severity, event_priority, message_template) \
         VALUES ($1, $2, 'Pump vibration high', 'Vibration velocity above ISO 10816 zone B.', \
         $3, 'vibration', $4, 4.5, 7.1, 0.2, 120, 600, 'threshold.vibration.high', \
         'warning', 3, 'Vibration {{value}} mm/s on {{asset.name}}') \
         ON CONFLICT (id) DO NOTHING",
        &[
            &THRESHOLD_RULE_IDS[1],
            &DEMO_ORG_ID,
            &PUMP_ASSET_TYPE_ID,
            &json!({"expression": "value > threshold", "operator": ">"}),
        ],
    )
    .await?;

    tx.commit()
        .await
        .map_err(|e| SeedError::db("commit the seed", e))?;
    Ok(report)
}

/// The 15 (device, asset) pairs the seed links, in [`EDGE_IDS`] order.
pub fn edge_pairs() -> Vec<(Uuid, Uuid)> {
    let mut pairs = Vec::with_capacity(15);
    for (d, device) in DEVICE_IDS.iter().enumerate() {
        pairs.push((*device, ASSET_IDS[d]));
        pairs.push((*device, ASSET_IDS[d + 5]));
        pairs.push((*device, ASSET_IDS[(d + 1) % 5]));
    }
    pairs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_the_documented_ones() {
        assert_eq!(
            DEMO_ORG_ID.to_string(),
            "0a000000-0000-4000-8000-000000000001"
        );
        assert_eq!(
            DEMO_DEVICE_ID.to_string(),
            "0d000000-0000-4000-8000-000000000001"
        );
        assert_eq!(
            GATEWAY_IDS[1].to_string(),
            "0d000000-0000-4000-8000-000000000005"
        );
        assert_eq!(
            ASSET_IDS[9].to_string(),
            "0e000000-0000-4000-8000-00000000000a"
        );
        assert_eq!(
            EDGE_IDS[14].to_string(),
            "0f000000-0000-4000-8000-00000000000f"
        );
    }

    #[test]
    fn edge_pairs_are_distinct() {
        let pairs = edge_pairs();
        let mut unique = pairs.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(pairs.len(), 15);
        assert_eq!(unique.len(), 15);
    }
}
