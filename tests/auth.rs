//! Who may call the API of a running `tocsin serve`: every endpoint against every role (and no
//! token), tokens kept only as hashes and revocable, events signed by a configured source with
//! a replay window, and the OpenAPI document against the routes actually served.

mod common;

use common::*;
use serde_json::{Value, json};
use tocsin::auth::Role;
use tocsin::http::API;

/// A path of the table with every `{param}` filled with a placeholder.
fn concrete(path: &str) -> String {
    path.split('/')
        .map(|seg| if seg.starts_with('{') { "x" } else { seg })
        .collect::<Vec<_>>()
        .join("/")
}

async fn call(client: &reqwest::Client, base: &str, method: &str, path: &str, token: Option<&str>) -> (u16, Value) {
    let url = format!("{base}{}", concrete(path));
    let mut request = match method {
        "GET" => client.get(url),
        _ => client.post(url).json(&json!({})),
    };
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let (status, body, _) = answer(request.send().await.expect("request")).await;
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_endpoint_checks_its_role_and_every_documented_operation_is_served() {
    tocsin::install_crypto_provider();
    let t = Tocsin::new();
    let server = t.serve();
    let client = reqwest::Client::new();
    let tokens: Vec<(Role, String)> = Role::ALL
        .into_iter()
        .map(|r| (r, t.token(&format!("{r}-person"), r.as_str())))
        .collect();

    // The table: endpoint x role. Allowed means anything but 401/403 (the placeholder ids
    // then give 404, 400 or 422); refused means 403 naming the role.
    let mut table = Vec::new();
    for e in API {
        let (status, _) = call(&client, &server.base, e.method, e.path, None).await;
        assert_eq!(status, 401, "{} {} without a token", e.method, e.path);
        for (role, token) in &tokens {
            let (status, body) = call(&client, &server.base, e.method, e.path, Some(token)).await;
            let allowed = role.may(e.access);
            if allowed {
                assert!(
                    status != 401 && status != 403 && status != 405,
                    "{} {} as {role}: {status} {body}",
                    e.method,
                    e.path
                );
                assert_ne!(body["detail"], "no such operation", "{} {}", e.method, e.path);
            } else {
                assert_eq!(
                    (status, body["field"].as_str()),
                    (403, Some("role")),
                    "{} {} as {role}",
                    e.method,
                    e.path
                );
            }
            table.push(format!(
                "{} {} {role}: {}",
                e.method,
                e.path,
                if allowed { "allowed" } else { "refused" }
            ));
        }
    }
    // A few rows a reader of the policy would check first.
    for row in [
        "POST /api/v1/incidents/{id}/approve responder: refused",
        "POST /api/v1/incidents/{id}/approve approver: allowed",
        "POST /api/v1/incidents/{id}/dispatch approver: refused",
        "GET /api/v1/incidents/{id} auditor: allowed",
        "POST /api/v1/incidents/{id}/confirm auditor: refused",
        "GET /api/v1/audit/verify responder: refused",
        "GET /api/v1/audit/verify auditor: allowed",
        "POST /api/v1/tokens responder: refused",
        "POST /api/v1/tokens admin: allowed",
    ] {
        assert!(table.iter().any(|r| r == row), "{row}");
    }

    // The OpenAPI document served is the table's: the same operations, each with its roles.
    let doc: Value = client
        .get(format!("{}/api/openapi.json", server.base))
        .send()
        .await
        .expect("request")
        .json()
        .await
        .expect("json");
    assert_eq!(doc["openapi"], "3.1.0");
    let mut documented: Vec<(String, String)> = doc["paths"]
        .as_object()
        .expect("paths")
        .iter()
        .flat_map(|(path, ops)| {
            ops.as_object()
                .expect("operations")
                .keys()
                .map(|m| (m.to_uppercase(), path.clone()))
                .collect::<Vec<_>>()
        })
        .collect();
    let mut served: Vec<(String, String)> = API.iter().map(|e| (e.method.to_owned(), e.path.to_owned())).collect();
    documented.sort();
    served.sort();
    assert_eq!(documented, served);
    for e in API {
        let op = &doc["paths"][e.path][e.method.to_lowercase()];
        let roles: Vec<&str> = op["x-roles"]
            .as_array()
            .expect("roles")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        let expected: Vec<&str> = e.access.roles().iter().map(|r| r.as_str()).collect();
        assert_eq!(roles, expected, "{} {}", e.method, e.path);
        let params: Vec<&str> = op["parameters"]
            .as_array()
            .expect("parameters")
            .iter()
            .filter(|p| p["in"] == "path")
            .filter_map(|p| p["name"].as_str())
            .collect();
        let in_path: Vec<&str> = e
            .path
            .split('/')
            .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .collect();
        assert_eq!(params, in_path, "{} {}", e.method, e.path);
    }
    // A path under /api that is not documented is not served.
    let (status, _) = call(&client, &server.base, "GET", "/api/v1/secrets", Some(&tokens[3].1)).await;
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tokens_are_stored_as_hashes_act_as_their_person_and_stop_when_revoked() {
    tocsin::install_crypto_provider();
    let t = Tocsin::new();
    let created = t
        .run(&[
            "--json",
            "--actor",
            "ops",
            "tokens",
            "create",
            "alice",
            "--role",
            "responder",
        ])
        .ok()
        .json();
    let token = created["token"].as_str().expect("token").to_owned();
    let id = created["details"]["id"].as_str().expect("id").to_owned();
    assert!(token.starts_with("tocsin_"));
    // Only the hash is in the database; the list never shows the token.
    let db = std::fs::read(t.data_dir().join("tocsin.db")).expect("database");
    let wal = std::fs::read(t.data_dir().join("tocsin.db-wal")).unwrap_or_default();
    let needle = token.as_bytes();
    for bytes in [&db, &wal] {
        assert!(
            !bytes.windows(needle.len()).any(|w| w == needle),
            "the token is stored in clear"
        );
    }
    let listed = t.run(&["tokens", "list"]).ok().stdout;
    assert!(
        listed.contains(&id) && listed.contains("alice") && !listed.contains(&token),
        "{listed}"
    );
    let refused = t.run(&["--actor", "ops", "tokens", "create", "x", "--role", "root"]);
    assert!(
        refused.code != 0 && refused.stderr.contains("--role"),
        "{}",
        refused.stderr
    );

    let server = t.serve();
    let client = reqwest::Client::new();
    let ingest = |token: String| {
        let client = client.clone();
        let url = format!("{}/api/v1/events", server.base);
        async move {
            let r = client
                .post(url)
                .bearer_auth(token)
                .body(event("tok-1", "tok-key"))
                .send()
                .await
                .expect("request");
            answer(r).await
        }
    };
    let (status, outcome, _) = ingest(token.clone()).await;
    assert_eq!(status, 202, "{outcome}");
    // The change is recorded under the token's person.
    let incident = outcome[0]["incident_id"].as_str().expect("id");
    let view = t.run(&["--json", "incidents", "show", incident]).ok().json();
    assert_eq!(view["transitions"][0]["actor"], "alice");

    let (status, _, _) = ingest(format!("{token}x")).await;
    assert_eq!(status, 401, "a token one character off");
    t.run(&["--actor", "ops", "tokens", "revoke", &id]).ok();
    let (status, problem, _) = ingest(token.clone()).await;
    assert_eq!(status, 401, "{problem}");
    assert!(t.run(&["tokens", "list"]).ok().stdout.contains("REVOKED"));
    let expired = t.run(&[
        "--actor",
        "ops",
        "tokens",
        "create",
        "y",
        "--role",
        "auditor",
        "--expires-at",
        "2020-01-01T00:00:00Z",
    ]);
    assert!(
        expired.code != 0 && expired.stderr.contains("expires_at"),
        "{}",
        expired.stderr
    );

    // An admin manages tokens over the API too; the answer holds the new token once.
    let admin = t.token("root", "admin");
    let r = client
        .post(format!("{}/api/v1/tokens", server.base))
        .bearer_auth(&admin)
        .json(&json!({ "actor": "bob", "role": "approver" }))
        .send()
        .await
        .expect("request");
    let (status, created, _) = answer(r).await;
    assert_eq!(status, 201);
    let bob = created["token"].as_str().expect("token");
    let r = client
        .get(format!("{}/api/v1/incidents", server.base))
        .bearer_auth(bob)
        .send()
        .await
        .expect("request");
    assert_eq!(r.status().as_u16(), 200);
    let r = client
        .get(format!("{}/api/v1/tokens", server.base))
        .bearer_auth(&admin)
        .send()
        .await
        .expect("request");
    let (_, list, _) = answer(r).await;
    assert!(!list.to_string().contains("tocsin_"), "no token in the listing");
    t.run(&["audit", "verify"]).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_source_signs_its_events_and_a_replayed_or_forged_one_is_refused() {
    tocsin::install_crypto_provider();
    const SECRET: &str = "waf-shared-secret-0123456789";
    let mut t = Tocsin::new();
    t.set("TOCSIN_SOURCES__WAF__SECRET", SECRET);
    let server = t.serve();
    let client = reqwest::Client::new();
    let post = |body: String, source: &'static str, timestamp: i64, signature: String| {
        let client = client.clone();
        let url = format!("{}/api/v1/events", server.base);
        async move {
            let r = client
                .post(url)
                .header("X-Tocsin-Source", source)
                .header("X-Tocsin-Timestamp", timestamp.to_string())
                .header("X-Tocsin-Signature", signature)
                .body(body)
                .send()
                .await
                .expect("request");
            answer(r).await
        }
    };
    let body = event("waf-1", "waf-key");
    let now = chrono::Utc::now().timestamp();
    let signed = expected_signature(SECRET, &now.to_string(), body.as_bytes());
    let (status, outcome, _) = post(body.clone(), "waf", now, signed.clone()).await;
    assert_eq!(status, 202, "{outcome}");
    let incident = outcome[0]["incident_id"].as_str().expect("id");
    let view = t.run(&["--json", "incidents", "show", incident]).ok().json();
    assert_eq!(view["transitions"][0]["actor"], "source:waf");

    // Forged: another body under the same signature; an unknown source; an old timestamp.
    let (status, problem, _) = post(event("waf-2", "waf-key"), "waf", now, signed.clone()).await;
    assert_eq!(
        (status, problem["field"].as_str()),
        (401, Some("X-Tocsin-Signature")),
        "{problem}"
    );
    let (status, problem, _) = post(body.clone(), "ids", now, signed).await;
    assert_eq!(
        (status, problem["field"].as_str()),
        (401, Some("X-Tocsin-Source")),
        "{problem}"
    );
    let old = now - 3600;
    let replayed = expected_signature(SECRET, &old.to_string(), body.as_bytes());
    let (status, problem, _) = post(body, "waf", old, replayed).await;
    assert_eq!(
        (status, problem["field"].as_str()),
        (401, Some("X-Tocsin-Timestamp")),
        "{problem}"
    );
    let events = t.run(&["--json", "incidents", "list"]).ok().json();
    assert_eq!(events.as_array().map(Vec::len), Some(1), "nothing forged was stored");
}
