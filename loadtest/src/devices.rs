//! The run's simulated devices: rows in Postgres (active devices of the demo organization,
//! named `loadtest-<run>-<n>` so runs never collide) and client certificates issued through
//! `argus_pki` from the CA in `--pki-dir`.
//!
//! Certificates and keys are kept in memory for the run (handed to rustls directly) and never
//! written to disk: the CA's `index.json` records the serials, nothing else is left behind.
//! "Unknown" devices get a certificate but no row, to exercise the `unknown_device` DLQ path.

use std::path::Path;

use anyhow::Context;
use argus_pki::{Ca, Subject};
use uuid::Uuid;

/// A simulated device's identity.
#[derive(Clone)]
pub struct Device {
    pub id: Uuid,
    /// False for devices deliberately absent from the registry.
    pub registered: bool,
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("id", &self.id)
            .field("registered", &self.registered)
            .finish_non_exhaustive()
    }
}

/// Inserts `known` active devices of the demo organization for `run_id`; returns their ids.
pub async fn register(
    pg: &tokio_postgres::Client,
    run_id: &str,
    known: usize,
) -> anyhow::Result<Vec<Uuid>> {
    let ids: Vec<Uuid> = (0..known).map(|_| Uuid::new_v4()).collect();
    let names: Vec<String> = (0..known)
        .map(|i| format!("loadtest-{run_id}-{i}"))
        .collect();
    if known > 0 {
        pg.execute(
            "INSERT INTO devices (id, tenant_id, name, status) \
             SELECT id, $1, name, 'active' FROM unnest($2::uuid[], $3::text[]) AS t(id, name)",
            &[&argus_schema::seed::DEMO_ORG_ID, &ids, &names],
        )
        .await
        .context("inserting the run's devices (is the schema migrated and seeded?)")?;
    }
    Ok(ids)
}

/// Issues one client certificate per device id (CN = the id), valid for one day.
pub fn issue(pki_dir: &Path, ids: &[(Uuid, bool)]) -> anyhow::Result<Vec<Device>> {
    let ca = Ca::load(pki_dir)
        .with_context(|| format!("loading the CA from --pki-dir {}", pki_dir.display()))?;
    let subjects: Vec<Subject> = ids.iter().map(|(id, _)| Subject::Device(*id)).collect();
    let issued = ca
        .issue_many(&subjects, 1)
        .context("issuing device certificates")?;
    issued
        .into_iter()
        .zip(ids)
        .map(|(i, (id, registered))| {
            let key_pem = i
                .private_key_pem
                .context("the CA returned no private key for a generated certificate")?;
            Ok(Device {
                id: *id,
                registered: *registered,
                cert_pem: i.certificate_pem,
                key_pem,
            })
        })
        .collect()
}
