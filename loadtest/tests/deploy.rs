//! Checks of the production deployment files (compose/docker-compose.yml, the EMQX,
//! Prometheus and Grafana configuration), since no Docker engine runs here.
//!
//! The metric check scrapes the running local stack (`compose/test` starts it and
//! exports `.stack/env`): every metric the dashboard or an alert queries must be one the
//! bridge or the sidecar really exports.

// Helpers below unwrap freely: a malformed deployment file should fail the test loudly.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_yaml::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn compose() -> Value {
    let text = std::fs::read_to_string(repo().join("compose/docker-compose.yml")).unwrap();
    serde_yaml::from_str(&text).expect("compose/docker-compose.yml parses as YAML")
}

/// Services with YAML merge keys (`<<: *anchor`) resolved.
fn services() -> Vec<(String, Value)> {
    let mut doc = compose();
    doc.apply_merge().unwrap();
    doc["services"]
        .as_mapping()
        .expect("a services mapping")
        .iter()
        .map(|(k, v)| (k.as_str().unwrap().to_string(), v.clone()))
        .collect()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence()
        .map(|s| {
            s.iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn every_service_has_a_pinned_image_or_build_and_a_health_check() {
    let services = services();
    let names: BTreeSet<_> = services.iter().map(|(n, _)| n.as_str()).collect();
    for expected in [
        "emqx",
        "nats-1",
        "nats-2",
        "nats-3",
        "postgres",
        "redis",
        "migrate",
        "bridge-0",
        "bridge-1",
        "bridge-2",
        "ingest-http",
        "prometheus",
        "alertmanager",
        "alert-receiver",
        "crl-exporter",
        "grafana",
    ] {
        assert!(
            names.contains(expected),
            "compose has no service {expected}"
        );
    }
    for (name, svc) in &services {
        let image = svc["image"].as_str();
        assert!(
            image.is_some() || !svc["build"].is_null(),
            "{name}: neither image nor build"
        );
        // `argus:<tag>` is this repository's own image, built from ../Dockerfile.
        let ours = image.is_some_and(|i| i.starts_with("argus:"));
        if let (Some(image), true, false) = (image, svc["build"].is_null(), ours) {
            let tag = image.rsplit_once(':').map(|(_, t)| t).unwrap_or("");
            assert!(
                tag.chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_digit() || c == 'v')
                    && tag != "latest",
                "{name}: image {image} is not pinned to a version"
            );
        }
        let test = strings(&svc["healthcheck"]["test"]);
        assert!(!test.is_empty(), "{name}: no health check");
    }
}

/// The sidecar: devices reach its TLS listener, never the admin one (API keys,
/// certificates, `/metrics`), which only the internal network sees; Prometheus scrapes
/// the admin listener; a revoke kicks through EMQX's API with a key from the env file.
#[test]
fn the_sidecar_publishes_only_its_tls_device_listener() {
    let services = services();
    let (_, svc) = services
        .iter()
        .find(|(n, _)| n == "ingest-http")
        .expect("an ingest-http service");
    let env = &svc["environment"];
    let var = |name: &str| {
        env[name]
            .as_str()
            .unwrap_or_else(|| panic!("ingest-http: no {name}"))
    };
    let device_port = var("ARGUS_HTTP_LISTEN")
        .rsplit(':')
        .next()
        .unwrap()
        .to_string();
    let admin_port = var("ARGUS_HTTP_ADMIN_LISTEN")
        .rsplit(':')
        .next()
        .unwrap()
        .to_string();
    assert_ne!(device_port, admin_port);
    assert!(var("ARGUS_HTTP_TLS_CERT").starts_with('/'));
    assert!(var("ARGUS_HTTP_TLS_KEY").starts_with('/'));
    assert!(
        env.get("ARGUS_HTTP_INSECURE_HTTP").is_none(),
        "the device listener must be TLS"
    );
    assert_eq!(var("ARGUS_PKI_PROFILE"), "production");
    assert!(var("ARGUS_HTTP_CRL_URL").contains(&format!(":{admin_port}/")));
    assert!(var("ARGUS_HTTP_EMQX_API_URL").starts_with("http://emqx:"));
    for secret in ["ARGUS_HTTP_EMQX_API_KEY", "ARGUS_HTTP_EMQX_API_SECRET"] {
        assert!(
            var(secret).contains(":?"),
            "{secret} must come from compose/.env"
        );
    }
    let published = strings(&svc["ports"]);
    assert!(
        published
            .iter()
            .any(|p| p.ends_with(&format!(":{device_port}"))),
        "the device listener is not published: {published:?}"
    );
    assert!(
        !published.iter().any(|p| p.contains(&admin_port)),
        "the admin listener is published: {published:?}"
    );
    assert!(strings(&svc["expose"]).contains(&admin_port));
    let health = strings(&svc["healthcheck"]["test"]).join(" ");
    assert!(
        health.contains(&format!(":{admin_port}/health")),
        "{health}"
    );
    let prometheus =
        std::fs::read_to_string(repo().join("compose/prometheus/prometheus.yml")).unwrap();
    assert!(
        prometheus.contains(&format!("\"ingest-http:{admin_port}\"")),
        "Prometheus must scrape the admin listener"
    );
}

#[test]
fn nats_is_a_three_node_cluster_at_2_10_23_or_later() {
    for (name, svc) in services().iter().filter(|(n, _)| n.starts_with("nats-")) {
        if name == "nats-exporter" {
            continue;
        }
        let image = svc["image"].as_str().unwrap();
        let version = image.split(':').nth(1).unwrap().trim_end_matches("-alpine");
        let parts: Vec<u32> = version.split('.').map(|p| p.parse().unwrap()).collect();
        assert!(
            parts >= vec![2, 10, 23],
            "{name}: {image} is older than 2.10.23 (earlier 2.10 releases lose data on a crash)"
        );
    }
    let conf = std::fs::read_to_string(repo().join("compose/nats/nats.conf")).unwrap();
    for node in ["nats-1", "nats-2", "nats-3"] {
        assert!(
            conf.contains(&format!("nats-route://{node}:6222")),
            "no route to {node}"
        );
    }
    assert!(conf.contains("jetstream"));
}

#[test]
fn every_mounted_file_exists_and_pki_is_never_baked_in() {
    let compose_dir = repo().join("compose");
    for (name, svc) in services() {
        for volume in strings(&svc["volumes"]) {
            let source = volume.split(':').next().unwrap();
            if source.starts_with("${ARGUS_PKI_DIR")
                || source.starts_with("${ARGUS_BRIDGE_CERTS_DIR")
            {
                continue; // operator-provided certificates: docs/setup.md says how to make them
            }
            if source.starts_with('.') {
                let path = compose_dir.join(source);
                assert!(path.exists(), "{name}: mounted {source} does not exist");
            }
        }
    }
    let dockerfile = std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
    assert!(
        dockerfile.contains("USER argus"),
        "the runtime image must not run as root"
    );
    let ignore = std::fs::read_to_string(repo().join(".dockerignore")).unwrap();
    assert!(
        ignore.contains("*.key"),
        "keys must never enter the build context"
    );
}

/// The source of a volume `${VAR:-default}/rest:/target[:ro]`: (VAR, rest), or `None` when
/// the source does not start with a variable.
fn mounted_from(volume: &str) -> Option<(String, String)> {
    let inner = volume.strip_prefix("${")?;
    let (expr, after) = inner.split_once('}')?;
    let var = expr.split([':', '-', '?']).next()?.to_string();
    let rest = after.split(':').next()?.trim_start_matches('/').to_string();
    Some((var, rest))
}

/// issue 17, "The CA key stays with the signer": only the sidecar (its admin side signs)
/// mounts the CA directory; EMQX gets three public or own files of it; every bridge replica
/// mounts the CA certificate and its own certificate directory, nothing else; no other
/// service sees a certificate directory at all.
#[test]
fn the_ca_key_stays_with_the_signer_and_each_bridge_has_only_its_own_keys() {
    let mut bridges = 0;
    for (name, svc) in services() {
        let mounts: Vec<(String, String)> = strings(&svc["volumes"])
            .iter()
            .filter_map(|v| mounted_from(v))
            .filter(|(var, _)| var == "ARGUS_PKI_DIR" || var == "ARGUS_BRIDGE_CERTS_DIR")
            .collect();
        let pki: BTreeSet<&str> = mounts
            .iter()
            .filter(|(var, _)| var == "ARGUS_PKI_DIR")
            .map(|(_, rest)| rest.as_str())
            .collect();
        let bridge_dirs: Vec<&str> = mounts
            .iter()
            .filter(|(var, _)| var == "ARGUS_BRIDGE_CERTS_DIR")
            .map(|(_, rest)| rest.as_str())
            .collect();
        match name.as_str() {
            "ingest-http" => {
                assert_eq!(
                    pki,
                    BTreeSet::from([""]),
                    "ingest-http: the whole CA directory"
                );
                assert!(bridge_dirs.is_empty(), "ingest-http mounts bridge keys");
            }
            "emqx" => assert_eq!(
                pki,
                BTreeSet::from(["ca.crt", "server.crt", "server.key"]),
                "emqx may mount only ca.crt and its own server certificate and key"
            ),
            // Postgres serves TLS with the broker's server certificate (`--san postgres`).
            "postgres" => assert_eq!(
                pki,
                BTreeSet::from(["server.crt", "server.key"]),
                "postgres may mount only its server certificate and key"
            ),
            // Clients verify servers against the CA certificate, nothing more.
            "migrate" => assert_eq!(pki, BTreeSet::from(["ca.crt"])),
            "crl-exporter" => assert_eq!(pki, BTreeSet::from(["metrics"])),
            bridge if bridge.starts_with("bridge-") => {
                bridges += 1;
                let n = bridge.trim_start_matches("bridge-");
                assert_eq!(
                    pki,
                    BTreeSet::from(["ca.crt"]),
                    "{bridge}: only ca.crt of the CA directory"
                );
                assert_eq!(
                    bridge_dirs,
                    vec![format!("bridge-{n}")],
                    "{bridge}: only its own certificates"
                );
                let replica = &svc["environment"]["ARGUS_BRIDGE_REPLICA"];
                assert_eq!(
                    replica.as_str(),
                    Some(n),
                    "{bridge}: ARGUS_BRIDGE_REPLICA must be {n}, the slot of its certificates"
                );
            }
            other => assert!(mounts.is_empty(), "{other} mounts certificates: {mounts:?}"),
        }
    }
    assert!(bridges >= 2, "fewer than two bridge replicas");
    let prometheus =
        std::fs::read_to_string(repo().join("compose/prometheus/prometheus.yml")).unwrap();
    for n in 0..bridges {
        assert!(
            prometheus.contains(&format!("bridge-{n}:9101")),
            "prometheus.yml does not scrape bridge-{n}"
        );
    }
}

/// Names of environment variables and `${VAR}` references that hold a secret.
fn is_secret_name(name: &str) -> bool {
    ["PASSWORD", "TOKEN", "COOKIE", "SECRET", "API_KEY"]
        .iter()
        .any(|s| name.contains(s))
}

/// issue 17, "Secrets": every secret a service is given comes from a `${VAR:?}` reference
/// (compose refuses to start without it), never a literal or a `${VAR:-default}`.
#[test]
fn no_secret_has_a_default_left_in() {
    let text = std::fs::read_to_string(repo().join("compose/docker-compose.yml")).unwrap();
    // No `${SECRET:-…}` or bare `${SECRET}` anywhere in the file.
    let mut rest = text.as_str();
    while let Some(start) = rest.find("${") {
        let end = rest[start..].find('}').unwrap() + start;
        let expr = &rest[start + 2..end];
        let name = expr.split([':', '-', '?']).next().unwrap();
        if is_secret_name(name) {
            assert!(
                expr.starts_with(&format!("{name}:?")),
                "${{{expr}}}: a secret must be required (`${{{name}:?…}}`), with no default"
            );
        }
        rest = &rest[end..];
    }
    // Every secret-named environment entry is such a reference (or a file path).
    let mut checked = BTreeSet::new();
    for (service, svc) in services() {
        let Some(env) = svc["environment"].as_mapping() else {
            continue;
        };
        for (key, value) in env {
            let key = key.as_str().unwrap();
            if !is_secret_name(key) || key.ends_with("_FILE") {
                continue;
            }
            let value = value.as_str().unwrap_or_default();
            assert!(
                value.contains(":?"),
                "{service}: {key} is not a required secret reference: {value:?}"
            );
            checked.insert(key.to_string());
        }
    }
    for required in [
        "EMQX_NODE__COOKIE",
        "EMQX_DASHBOARD__DEFAULT_PASSWORD",
        "ARGUS_ADMIN_TOKEN",
    ] {
        assert!(checked.contains(required), "no service sets {required}");
    }
}

#[test]
fn env_example_lists_every_variable_and_secrets_have_no_defaults() {
    let text = std::fs::read_to_string(repo().join("compose/docker-compose.yml")).unwrap();
    let example = std::fs::read_to_string(repo().join("compose/.env.example")).unwrap();
    let listed: std::collections::BTreeMap<&str, &str> = example
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .collect();
    let mut rest = text.as_str();
    let mut seen = 0;
    while let Some(start) = rest.find("${") {
        let end = rest[start..].find('}').unwrap() + start;
        let expr = &rest[start + 2..end];
        let name = expr.split([':', '-', '?']).next().unwrap();
        assert!(
            listed.contains_key(name),
            ".env.example does not list {name}"
        );
        if expr.contains(":?") {
            assert_eq!(
                listed[name], "",
                "secret {name} must have no working default"
            );
        }
        seen += 1;
        rest = &rest[end..];
    }
    assert!(seen > 5);
}

#[test]
fn services_connect_as_their_roles_over_verified_tls_never_as_the_superuser() {
    // Which role each Postgres URL of each service must log in as (docs/schema.md, "Roles").
    let expected: &[(&str, &str, &str)] = &[
        ("migrate", "DATABASE_URL", "argus_owner"),
        ("bridge-0", "DATABASE_URL", "argus_ingest"),
        ("bridge-1", "DATABASE_URL", "argus_ingest"),
        ("bridge-2", "DATABASE_URL", "argus_ingest"),
        ("ingest-http", "DATABASE_URL", "argus_ingest"),
        ("ingest-http", "ADMIN_DATABASE_URL", "argus_admin"),
    ];
    let services = services();
    let superuser = services
        .iter()
        .find(|(n, _)| n == "postgres")
        .map(|(_, s)| {
            s["environment"]["POSTGRES_USER"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .expect("a postgres service");
    for (name, svc) in &services {
        let Some(env) = svc["environment"].as_mapping() else {
            continue;
        };
        for (k, v) in env {
            let (Some(k), Some(url)) = (k.as_str(), v.as_str()) else {
                continue;
            };
            if !url.starts_with("postgres://") {
                continue;
            }
            let user = url["postgres://".len()..].split([':', '@']).next().unwrap();
            assert_ne!(user, superuser, "{name}: {k} logs in as the superuser");
            assert!(
                url.contains("sslmode=verify-full"),
                "{name}: {k} does not verify the server (sslmode=verify-full)"
            );
            assert!(
                env.get("PGSSLROOTCERT").is_some() || url.contains("sslrootcert="),
                "{name}: {k} has no CA to verify against"
            );
        }
    }
    for (name, var, role) in expected {
        let svc = &services.iter().find(|(n, _)| n == name).unwrap().1;
        let url = svc["environment"][*var]
            .as_str()
            .unwrap_or_else(|| panic!("{name}: no {var}"));
        assert!(
            url.starts_with(&format!("postgres://{role}:")),
            "{name}: {var} must log in as {role}"
        );
    }
    // The server: TLS on, network logins over TLS only.
    let pg = &services.iter().find(|(n, _)| n == "postgres").unwrap().1;
    assert!(
        strings(&pg["command"]).iter().any(|a| a == "ssl=on"),
        "postgres: ssl=on"
    );
    let init = std::fs::read_to_string(repo().join("compose/postgres/init-owner.sh")).unwrap();
    assert!(
        init.contains("hostssl all all all"),
        "init-owner.sh: hostssl"
    );
}

#[test]
fn emqx_config_has_every_security_setting() {
    let conf = std::fs::read_to_string(repo().join("compose/emqx/emqx.conf")).unwrap();
    let flat: String = conf
        .lines()
        .map(|l| l.split('#').next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    for needle in [
        "verify = verify_peer",
        "fail_if_no_peer_cert = true",
        "enable_crl_check = true",
        "peer_cert_as_clientid = cn",
        "peer_cert_as_username = cn",
        "no_match = deny",
        "max_inflight",
    ] {
        assert!(flat.contains(needle), "emqx.conf lacks `{needle}`");
    }
    for listener in ["tcp", "ws"] {
        assert!(
            flat.contains(&format!("listeners.{listener}.default {{ enable = false"))
                || flat.contains(&format!("listeners.{listener}.default.enable = false")),
            "emqx.conf does not disable the plain {listener} listener"
        );
    }
    let acl = std::fs::read_to_string(repo().join("compose/emqx/acl.conf")).unwrap();
    assert!(
        acl.contains("devices/${clientid}/telemetry")
            || acl.contains("devices/${username}/telemetry")
    );
    assert!(
        acl.contains("{deny, all}"),
        "acl.conf must end by denying everything else"
    );
}

/// The EMQX zone keeps to the bridge's MQTT 5 flow control: `mqtt.max_inflight` is
/// the Receive Maximum the compose file gives the bridge (EMQX uses the smaller of the
/// two), and the bridge asks for sessions that never expire.
#[test]
fn emqx_inflight_window_matches_the_bridge_receive_maximum() {
    let conf = std::fs::read_to_string(repo().join("compose/emqx/emqx.conf")).unwrap();
    let setting = |name: &str| {
        conf.lines()
            .map(|l| l.split('#').next().unwrap_or("").trim())
            .find_map(|l| {
                l.strip_prefix(name)?
                    .trim()
                    .strip_prefix('=')
                    .map(str::trim)
            })
            .unwrap_or_else(|| panic!("emqx.conf lacks `{name}`"))
            .to_string()
    };
    let compose = std::fs::read_to_string(repo().join("compose/docker-compose.yml")).unwrap();
    let env = |name: &str| {
        compose
            .lines()
            .find_map(|l| l.trim().strip_prefix(&format!("{name}:")))
            .map(|v| v.trim().trim_matches('"').to_string())
            .unwrap_or_else(|| panic!("docker-compose.yml does not set {name}"))
    };
    assert_eq!(env("ARGUS_BRIDGE_MQTT_VERSION"), "5");
    assert_eq!(
        setting("max_inflight"),
        env("ARGUS_BRIDGE_MAX_INFLIGHT"),
        "EMQX's max_inflight caps the bridge's Receive Maximum"
    );
    assert_eq!(env("ARGUS_BRIDGE_SESSION_EXPIRY"), "never");
    // Re-sends of unacknowledged messages stay (the bridge skips their DUP copies).
    assert_eq!(setting("retry_interval"), "30s");
}

/// Every `argus_*` metric name in the dashboard and the Prometheus config.
fn queried_metrics() -> BTreeSet<String> {
    let dashboard =
        std::fs::read_to_string(repo().join("compose/grafana/dashboards/argus.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&dashboard).unwrap();
    let mut names = BTreeSet::new();
    for panel in json["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for token in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if token.starts_with("argus_") {
                    let base = ["_bucket", "_sum", "_count"]
                        .iter()
                        .find_map(|s| token.strip_suffix(s))
                        .unwrap_or(token);
                    names.insert(base.to_string());
                }
            }
        }
    }
    names
}

/// Every `argus_*` metric name the alert rules query (compose/prometheus/rules/argus.yml).
fn alert_metrics() -> BTreeSet<String> {
    let rules = std::fs::read_to_string(repo().join("compose/prometheus/rules/argus.yml")).unwrap();
    let doc: Value = serde_yaml::from_str(&rules).expect("the rule file parses as YAML");
    let mut names = BTreeSet::new();
    for group in doc["groups"].as_sequence().unwrap() {
        for rule in group["rules"].as_sequence().unwrap() {
            let expr = rule["expr"].as_str().unwrap();
            for token in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if token.starts_with("argus_") {
                    let base = ["_bucket", "_sum", "_count"]
                        .iter()
                        .find_map(|s| token.strip_suffix(s))
                        .unwrap_or(token);
                    names.insert(base.to_string());
                }
            }
        }
    }
    names
}

#[test]
fn production_prometheus_loads_the_rules_and_sends_to_alertmanager() {
    let config: Value = serde_yaml::from_str(
        &std::fs::read_to_string(repo().join("compose/prometheus/prometheus.yml")).unwrap(),
    )
    .unwrap();
    let rule_files = strings(&config["rule_files"]);
    assert_eq!(rule_files, ["rules/argus.yml"]);
    let prometheus = services()
        .into_iter()
        .find(|(n, _)| n == "prometheus")
        .unwrap()
        .1;
    assert!(
        strings(&prometheus["volumes"])
            .iter()
            .any(|v| v == "./prometheus/rules:/etc/prometheus/rules:ro"),
        "the prometheus service does not mount compose/prometheus/rules"
    );
    let targets = &config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"];
    assert_eq!(strings(targets), ["alertmanager:9093"]);
    let jobs: BTreeSet<_> = config["scrape_configs"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|j| j["job_name"].as_str().unwrap().to_string())
        .collect();
    for job in [
        "argus-bridge",
        "argus-ingest-http",
        "argus-crl",
        "prometheus",
    ] {
        assert!(jobs.contains(job), "prometheus.yml does not scrape {job}");
    }
}

async fn scrape(url: &str) -> String {
    reqwest::get(url)
        .await
        .unwrap_or_else(|e| panic!("scrape {url}: {e}"))
        .text()
        .await
        .unwrap()
}

fn stack_var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run through compose/test, which starts the stack and exports .stack/env")
    })
}

/// One MQTT message (over mTLS, as the demo device) and one HTTP reading, so the
/// histograms the dashboard reads have samples to export.
async fn send_traffic() {
    let url = stack_var("MQTT_URL");
    let port = url.rsplit(':').next().unwrap();
    let device = stack_var("DEMO_DEVICE_ID");
    let status = std::process::Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", port, "-q", "1"])
        .args(["--cafile", &stack_var("MQTT_CA_FILE")])
        .args(["--cert", &stack_var("DEMO_DEVICE_CERT")])
        .args(["--key", &stack_var("DEMO_DEVICE_KEY")])
        .args(["-t", &format!("devices/{device}/telemetry")])
        .args([
            "-m",
            &format!(r#"{{"deployCheck": "{}"}}"#, uuid::Uuid::new_v4()),
        ])
        .status()
        .expect("run mosquitto_pub");
    assert!(status.success(), "mosquitto_pub failed");

    let http = stack_var("INGEST_HTTP_URL");
    let admin = stack_var("INGEST_HTTP_ADMIN_URL");
    let ca = stack_var("INGEST_HTTP_CA_FILE");
    let client = argus_loadtest::http::client(1, Some(std::path::Path::new(&ca))).unwrap();
    let key: serde_json::Value = client
        .post(format!("{admin}/api/v1/devices/{device}/api-keys"))
        .bearer_auth(stack_var("ARGUS_ADMIN_TOKEN"))
        .json(&serde_json::json!({"expiresInDays": 1}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let key = key["key"].as_str().expect("a new API key").to_string();
    let response = client
        .post(format!("{http}/api/v1/telemetry/ingest"))
        .header("X-API-Key", key)
        .json(&serde_json::json!({"deviceId": device, "metrics": {"deployCheck": 1}, "messageId": uuid::Uuid::new_v4().to_string()}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "HTTP ingest of the deploy check");
}

/// The metric names (`# TYPE` lines) and the full text of every component's `/metrics`.
async fn scrape_all() -> (BTreeSet<String>, String) {
    let mut exported = String::new();
    for url in stack_var("BRIDGE_METRICS_URLS").split(',') {
        exported.push_str(&scrape(&format!("{}/metrics", url.trim_end_matches('/'))).await);
    }
    let admin = stack_var("INGEST_HTTP_ADMIN_URL");
    exported.push_str(&scrape(&format!("{}/metrics", admin.trim_end_matches('/'))).await);
    let names = exported
        .lines()
        .filter(|l| l.starts_with("# TYPE "))
        .filter_map(|l| l.split_whitespace().nth(2))
        .map(String::from)
        .collect();
    (names, exported)
}

/// Also the metrics of the alert rules (one test: two would publish as the same demo
/// device at once, and the broker drops one of the two connections). Of those, the CRL's
/// is written by compose/lib/crl-metric, and a counter that appears only at its first
/// event must at least be a name the code defines.
#[tokio::test]
async fn every_dashboard_and_alert_metric_is_exported_by_the_running_stack() {
    let queried = queried_metrics();
    assert!(
        queried.len() >= 10,
        "dashboard queries too few metrics: {queried:?}"
    );
    let alerts = alert_metrics();
    assert!(
        alerts.len() >= 15,
        "the rules query too few metrics: {alerts:?}"
    );
    // Not registered at zero (pipeline/src/metrics.rs): present after the first Redis error.
    let first_event_only = ["argus_registry_redis_errors_total"];
    let crl_metric = std::fs::read_to_string(repo().join("compose/lib/crl-metric")).unwrap();
    let pipeline_names = std::fs::read_to_string(repo().join("pipeline/src/metrics.rs")).unwrap();
    let alerts_missing = |names: &BTreeSet<String>| -> Vec<String> {
        alerts
            .iter()
            .filter(|m| !names.contains(*m))
            .filter(|m| !(m.starts_with("argus_pki_") && crl_metric.contains(m.as_str())))
            .filter(|m| {
                !(first_event_only.contains(&m.as_str())
                    && pipeline_names.contains(&format!("\"{m}\"")))
            })
            .cloned()
            .collect()
    };
    send_traffic().await;
    // The bridge that took the message exports its histograms once the batch is acked.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let (names, exported) = loop {
        let (names, exported) = scrape_all().await;
        let complete =
            queried.iter().all(|m| names.contains(m)) && alerts_missing(&names).is_empty();
        if complete || std::time::Instant::now() > deadline {
            break (names, exported);
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    };
    let missing: Vec<_> = queried.iter().filter(|m| !names.contains(*m)).collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics nobody exports: {missing:?}\nexported: {names:?}"
    );
    let missing = alerts_missing(&names);
    assert!(
        missing.is_empty(),
        "alert rules query metrics nobody exports: {missing:?}\nexported: {names:?}"
    );
    // Histograms the dashboard takes quantiles of must be real histograms (with buckets).
    for name in &queried {
        assert!(
            !exported.contains(&format!("# TYPE {name} summary")),
            "{name} is exported as a summary, but the dashboard needs buckets"
        );
    }
}

/// The NATS users of `compose/nats/authorization.conf`: (user, password env var).
fn nats_users() -> Vec<(String, String)> {
    let conf = std::fs::read_to_string(repo().join("compose/nats/authorization.conf")).unwrap();
    let mut users = Vec::new();
    let mut user = None;
    for line in conf.lines().map(str::trim) {
        if let Some(u) = line.strip_prefix("user:") {
            user = Some(u.trim().to_string());
        } else if let (Some(var), Some(u)) = (line.strip_prefix("password: $"), user.take()) {
            users.push((u, var.trim().to_string()));
        }
    }
    assert!(users.len() >= 5, "{users:?}");
    users
}

#[test]
fn every_nats_client_logs_in_as_its_user_and_no_nats_password_has_a_default() {
    let users = nats_users();
    let secret = |var: &str| format!("${{{var}:?set {var} in compose/.env}}");
    let mut clients = 0;
    for (name, svc) in services() {
        let env = &svc["environment"];
        if name.starts_with("nats-") && name != "nats-exporter" {
            // Each server has every user's password, as a secret without a default,
            // and includes the one authorization file.
            for (_, var) in &users {
                assert_eq!(
                    env[var.as_str()].as_str(),
                    Some(secret(var).as_str()),
                    "{name}: {var}"
                );
            }
            assert!(
                strings(&svc["volumes"])
                    .iter()
                    .any(|v| v.starts_with("./nats/authorization.conf:")),
                "{name} mounts compose/nats/authorization.conf"
            );
            continue;
        }
        if env["NATS_URLS"].is_null() {
            continue;
        }
        clients += 1;
        let user = env["NATS_USER"]
            .as_str()
            .unwrap_or_else(|| panic!("{name} connects to NATS without NATS_USER"));
        let (_, var) = users
            .iter()
            .find(|(u, _)| u == user)
            .unwrap_or_else(|| panic!("{name}: NATS user {user} is not in authorization.conf"));
        assert_eq!(
            env["NATS_PASSWORD"].as_str(),
            Some(secret(var).as_str()),
            "{name}: NATS_PASSWORD must be its user's secret, without a default"
        );
    }
    assert!(
        clients >= 3,
        "migrate, bridge and ingest-http connect to NATS"
    );
    let conf = std::fs::read_to_string(repo().join("compose/nats/nats.conf")).unwrap();
    assert!(conf
        .lines()
        .any(|l| l.trim() == "include ./authorization.conf"));
}
