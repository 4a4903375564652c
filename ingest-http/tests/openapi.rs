//! Each listener's OpenAPI document (`GET /openapi.json` on the device listener and on
//! the admin listener) against the routes that listener really serves, both ways: every
//! path of the built router is in the document and every documented path is routed; on
//! every path, every documented method is served and every other method answers 405.
//! With and without the certificate API (`--pki-dir`). And every path of the admin
//! document answers 404 on the device listener.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};

use argus_ingest_http::{build_app_and_document, Side};
use axum::routing::get;
use common::*;
use reqwest::{Method, StatusCode};
use serde_json::Value;

/// The methods probed on every path (HEAD follows GET in axum; OPTIONS and TRACE are
/// never routed).
const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

/// The paths a router matches, read from its `Debug` output (axum prints each
/// route's path template; it offers no other way to list them). Fails when none is
/// found, so a change of that output cannot make the comparison pass vacuously.
fn router_paths(router: &axum::Router) -> BTreeSet<String> {
    let text = format!("{router:?}");
    // Only the routes proper: the fallbacks' own catch-all paths follow this field.
    let routes = text.split("fallback_router").next().unwrap();
    let paths: BTreeSet<String> = routes
        .split("RouteId(")
        .filter_map(|part| {
            let (_, rest) = part.split_once("): \"")?;
            let (path, _) = rest.split_once('"')?;
            path.starts_with('/').then(|| path.to_string())
        })
        .collect();
    assert!(
        !paths.is_empty(),
        "no route paths found in the router's Debug output (axum changed it?): {text}"
    );
    paths
}

/// The served document: path → documented methods.
async fn documented(s: &Stack, base: &str) -> (Value, BTreeMap<String, BTreeSet<String>>) {
    let resp = s
        .http
        .get(format!("{base}/openapi.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let doc: Value = resp.json().await.unwrap();
    let paths = doc["paths"]
        .as_object()
        .expect("paths")
        .iter()
        .map(|(path, item)| {
            let methods = item
                .as_object()
                .unwrap()
                .keys()
                .filter(|k| METHODS.contains(&k.as_str()))
                .cloned()
                .collect();
            (path.clone(), methods)
        })
        .collect();
    (doc, paths)
}

/// `{deviceId}` and the like → a UUID nobody has.
fn concrete(path: &str) -> String {
    let mut out = String::new();
    let mut rest = path;
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        let end = rest[start..].find('}').unwrap() + start;
        out.push_str("7e570000-0000-4000-8000-00000000abcd");
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

fn base(app: &App, side: Side) -> &str {
    match side {
        Side::Device => &app.base,
        Side::Admin => &app.admin_base,
    }
}

/// Both directions, on one listener: router paths = documented paths; per path,
/// documented methods are served (never the 404 or 405 fallback) and the others
/// answer 405.
async fn check_side(s: &Stack, app: &App, side: Side) -> BTreeSet<String> {
    let base = base(app, side);
    let (_, doc) = documented(s, base).await;
    let routed = router_paths(&build_app_and_document(app.state.clone(), side).0);
    let described: BTreeSet<String> = doc.keys().cloned().collect();
    let undocumented: Vec<_> = routed.difference(&described).collect();
    assert!(
        undocumented.is_empty(),
        "routes the document does not describe: {undocumented:?}"
    );
    let unrouted: Vec<_> = described.difference(&routed).collect();
    assert!(
        unrouted.is_empty(),
        "documented paths that are not routed: {unrouted:?}"
    );
    for (path, methods) in &doc {
        assert!(!methods.is_empty(), "{path}: no operation");
        for method in METHODS {
            let resp = s
                .http
                .request(
                    Method::from_bytes(method.to_uppercase().as_bytes()).unwrap(),
                    format!("{base}{}", concrete(path)),
                )
                .send()
                .await
                .unwrap();
            let status = resp.status();
            let body: Value = resp.json().await.unwrap_or(Value::Null);
            if methods.contains(method) {
                assert_ne!(
                    status,
                    StatusCode::METHOD_NOT_ALLOWED,
                    "{method} {path} is documented but not routed"
                );
                assert_ne!(
                    body["error"]["message"], "No such endpoint.",
                    "{method} {path} is documented but not routed"
                );
            } else {
                assert_eq!(
                    status,
                    StatusCode::METHOD_NOT_ALLOWED,
                    "{method} {path} answers but is not documented: {body}"
                );
                assert_eq!(error_code(&body), "method_not_allowed");
            }
        }
    }
    described
}

#[tokio::test]
async fn the_document_describes_exactly_the_routes() {
    let s = Stack::start().await;
    let device = check_side(&s, &s.app, Side::Device).await;
    assert_eq!(
        device,
        BTreeSet::from([
            "/api/v1/telemetry/ingest".to_string(),
            "/health".to_string(),
            "/openapi.json".to_string(),
        ])
    );
    let without = check_side(&s, &s.app, Side::Admin).await;
    assert!(!without.contains("/api/v1/telemetry/ingest"), "{without:?}");
    for path in [
        "/api/v1/devices/{deviceId}/api-keys",
        "/api/v1/devices/{deviceId}/api-keys/{keyId}",
        "/health",
        "/ready",
        "/metrics",
        "/openapi.json",
    ] {
        assert!(without.contains(path), "{path}: {without:?}");
    }
    assert!(
        !without
            .iter()
            .any(|p| p.contains("certificate") || p.starts_with("/pki")),
        "no --pki-dir, yet the certificate API is described: {without:?}"
    );

    let pki = tempfile::tempdir().unwrap();
    argus_pki::Ca::init(pki.path(), &[]).expect("pki init");
    let mut cfg = config(s.db.url(), &s.nats, &s.redis.url(), test_limits());
    cfg.pki_dir = Some(pki.path().to_path_buf());
    let mut app = App::start(cfg).await;
    assert_eq!(check_side(&s, &app, Side::Device).await, device);
    let with = check_side(&s, &app, Side::Admin).await;
    let added: BTreeSet<_> = with.difference(&without).cloned().collect();
    assert_eq!(
        added,
        BTreeSet::from([
            "/api/v1/devices/{deviceId}/certificate".to_string(),
            "/pki/crl.der".to_string(),
            "/pki/crl.pem".to_string(),
        ])
    );
    app.stop().await;
}

/// The comparison catches a route mounted beside the document (a plain `.route`).
#[tokio::test]
async fn a_route_outside_the_document_is_caught() {
    let s = Stack::start().await;
    let (_, doc) = documented(&s, &s.app.admin_base).await;
    let router = build_app_and_document(s.app.state.clone(), Side::Admin)
        .0
        .route("/debug/extra", get(|| async { "hi" }));
    let routed = router_paths(&router);
    let undocumented: Vec<_> = routed.iter().filter(|p| !doc.contains_key(*p)).collect();
    assert_eq!(undocumented, ["/debug/extra"]);
}

/// Every operation names its errors with the error body, every 429 and 503 its
/// `Retry-After`, and the ingest operation every status it can answer; the limits are
/// this process's; the same bytes every time.
#[tokio::test]
async fn the_document_names_every_error_and_its_headers() {
    let s = Stack::start().await;
    let (doc, _) = documented(&s, &s.app.base).await;
    let (admin_doc, _) = documented(&s, &s.app.admin_base).await;
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."), "{doc}");
    let ingest = &doc["paths"]["/api/v1/telemetry/ingest"]["post"];
    let statuses: BTreeSet<&str> = ingest["responses"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        statuses,
        BTreeSet::from(["200", "400", "401", "403", "409", "413", "415", "422", "429", "503"])
    );
    assert_eq!(ingest["security"][0]["apiKey"], serde_json::json!([]));
    assert_eq!(
        doc["components"]["securitySchemes"]["apiKey"]["name"],
        "X-API-Key"
    );
    assert_eq!(
        doc["components"]["schemas"]["IngestBody"]["oneOf"][1]["maxItems"],
        test_limits().max_batch_readings
    );
    let every_path = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .chain(admin_doc["paths"].as_object().unwrap());
    for (path, item) in every_path {
        for (method, op) in item.as_object().unwrap() {
            for (status, response) in op["responses"].as_object().unwrap() {
                if status.starts_with('4') || status.starts_with('5') {
                    let json = &response["content"]["application/json"]["schema"]["$ref"];
                    let error_body = json == "#/components/schemas/Error";
                    // /health and /ready answer their own body while down.
                    let own_body = ["/health", "/ready"].contains(&path.as_str());
                    assert!(
                        error_body || own_body,
                        "{method} {path} {status}: {response}"
                    );
                }
                if status == "429"
                    || (status == "503" && !path.ends_with("health") && path != "/ready")
                {
                    assert!(
                        response["headers"]["Retry-After"].is_object(),
                        "{method} {path} {status}: no Retry-After: {response}"
                    );
                }
            }
        }
    }
    let again = s.http.get(s.app.url("/openapi.json")).send().await.unwrap();
    assert_eq!(again.json::<Value>().await.unwrap(), doc);
}

/// Every operation of the admin listener's document (the certificate API included)
/// answers the JSON 404 on the device listener, with the admin token or without: an
/// admin route is not there at all, not merely refused.
#[tokio::test]
async fn admin_paths_are_not_found_on_the_device_listener() {
    let s = Stack::start().await;
    let pki = tempfile::tempdir().unwrap();
    argus_pki::Ca::init(pki.path(), &[]).expect("pki init");
    let mut cfg = config(s.db.url(), &s.nats, &s.redis.url(), test_limits());
    cfg.pki_dir = Some(pki.path().to_path_buf());
    let mut app = App::start(cfg).await;
    let (_, admin) = documented(&s, &app.admin_base).await;
    // Both listeners have their own `/health` and `/openapi.json`; nothing else is shared.
    let only_admin: Vec<_> = admin
        .iter()
        .filter(|(path, _)| !["/health", "/openapi.json"].contains(&path.as_str()))
        .collect();
    // The document is not empty by accident: the operator routes and the metrics.
    for path in [
        "/metrics",
        "/ready",
        "/api/v1/devices/{deviceId}/certificate",
        "/pki/crl.der",
    ] {
        assert!(admin.contains_key(path), "{path}: {admin:?}");
    }
    assert!(only_admin.len() >= 7, "{only_admin:?}");
    for (path, methods) in only_admin {
        for method in methods {
            for token in [Some(ADMIN_TOKEN), None] {
                let url = app.url(&concrete(path));
                let mut req = s.http.request(
                    Method::from_bytes(method.to_uppercase().as_bytes()).unwrap(),
                    &url,
                );
                if let Some(t) = token {
                    req = req.bearer_auth(t);
                }
                let resp = req.send().await.unwrap();
                assert_eq!(resp.status(), StatusCode::NOT_FOUND, "{method} {url}");
                let body: Value = resp.json().await.unwrap();
                assert_eq!(error_code(&body), "not_found", "{method} {url}");
            }
        }
    }
    // The same paths answer on the admin listener (not 404 everywhere).
    let resp = s.http.get(app.admin_url("/metrics")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    app.stop().await;
}

/// Method, path, body, the status and code it answers with the admin token.
type Case = (Method, String, Option<Vec<u8>>, StatusCode, &'static str);

/// Found by reading the document against axum's extractors: a path segment that is not
/// UTF-8 once decoded, and an operator body over axum's 2 MiB, were answered in plain
/// text (400 `Invalid URL: ...`, 413 `Failed to buffer the request body`), outside the
/// document. They answer the stable JSON error now, after the admin check.
#[tokio::test]
async fn operator_routes_answer_the_error_body_for_bad_paths_and_huge_bodies() {
    let s = Stack::start().await;
    let pki = tempfile::tempdir().unwrap();
    argus_pki::Ca::init(pki.path(), &[]).expect("pki init");
    let mut cfg = config(s.db.url(), &s.nats, &s.redis.url(), test_limits());
    cfg.pki_dir = Some(pki.path().to_path_buf());
    let mut app = App::start(cfg).await;
    let huge = vec![b' '; 3 * 1024 * 1024];
    let cases: Vec<Case> = vec![
        (
            Method::POST,
            "/api/v1/devices/%FF/api-keys".into(),
            None,
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            Method::GET,
            "/api/v1/devices/%FF/api-keys".into(),
            None,
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            Method::DELETE,
            format!("/api/v1/devices/{DEVICE}/api-keys/%C0"),
            None,
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            Method::POST,
            "/api/v1/devices/%FF/certificate".into(),
            None,
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            Method::DELETE,
            "/api/v1/devices/%FF/certificate".into(),
            None,
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            Method::POST,
            format!("/api/v1/devices/{DEVICE}/api-keys"),
            Some(huge.clone()),
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
        ),
        (
            Method::POST,
            format!("/api/v1/devices/{DEVICE}/certificate"),
            Some(huge.clone()),
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
        ),
        (
            Method::DELETE,
            format!("/api/v1/devices/{DEVICE}/certificate"),
            Some(huge),
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
        ),
    ];
    for (method, path, body, status, code) in cases {
        for token in [Some(ADMIN_TOKEN), None] {
            let mut req = s.http.request(method.clone(), app.admin_url(&path));
            if let Some(t) = token {
                req = req.bearer_auth(t);
            }
            if let Some(b) = &body {
                req = req
                    .header("content-type", "application/json")
                    .body(b.clone());
            }
            let resp = req.send().await.unwrap();
            let got = resp.status();
            assert_eq!(
                resp.headers()["content-type"],
                "application/json",
                "{method} {path}"
            );
            let answer: Value = resp.json().await.unwrap();
            // The admin check still comes first.
            let (want, want_code) = match token {
                Some(_) => (status, code),
                None => (StatusCode::UNAUTHORIZED, "unauthorized"),
            };
            assert_eq!(got, want, "{method} {path}: {answer}");
            assert_eq!(error_code(&answer), want_code, "{method} {path}");
        }
    }
    app.stop().await;
}
