//! The HTTP API of a running `tocsin serve`: events in, the lifecycle, the worker delivering
//! to a real SMTP server, the public bulletin served, problem documents for bad input.

mod common;

use std::time::Duration;

use common::smtp_server::SmtpServer;
use common::*;
use serde_json::{Value, json};

/// One lifecycle action on the incident by `who`.
async fn act(api: &Api, id: &str, action: &str, who: &str) -> (u16, Value, String) {
    api.post(who, &format!("/api/v1/incidents/{id}/{action}"), json!({}))
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_lifecycle_over_http_delivers_and_publishes() {
    tocsin::install_crypto_provider();
    let smtp = SmtpServer::start().await;
    let mut t = Tocsin::new();
    t.smtp(smtp.port())
        .set("TOCSIN_DELIVERY__SWEEP_SCHEDULE", "* * * * * *");
    let merchants = [
        merchant(
            "api-1",
            "en",
            Some("one@example.com"),
            None,
            None,
            &["account_credentials"],
        ),
        merchant(
            "api-2",
            "zh-CN",
            Some("two@example.com"),
            None,
            None,
            &["account_credentials", "id_number"],
        ),
        merchant("api-3", "zh-CN", None, None, None, &["account_credentials"]),
    ]
    .join("\n");
    t.run(&["merchants", "import", &t.file("m.jsonl", &merchants)]).ok();
    let server = t.serve();
    let api = t.api(
        &server,
        &[("siem", "responder"), ("alice", "responder"), ("bob", "approver")],
    );
    let client = reqwest::Client::new();

    // Without a token nothing is accepted.
    let r = client
        .post(format!("{}/api/v1/events", server.base))
        .json(&json!({}))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status().as_u16(), 401);
    assert_eq!(
        r.headers().get("www-authenticate").and_then(|v| v.to_str().ok()),
        Some("Bearer")
    );

    // Malformed events: 4xx problem documents naming the field; nothing stored.
    let (status, problem, ctype) = api.post("siem", "/api/v1/events", json!({"source": "siem"})).await;
    assert_eq!(status, 422);
    assert_eq!(ctype, "application/problem+json");
    assert_eq!(problem["field"], "external_id");
    let r = client
        .post(format!("{}/api/v1/events", server.base))
        .bearer_auth(api.token_of("siem"))
        .body("{not json")
        .send()
        .await
        .expect("request");
    assert_eq!(r.status().as_u16(), 400);
    let (_, listed) = api.get("alice", "/api/v1/incidents").await;
    assert_eq!(listed, json!([]));

    let ev: Value = serde_json::from_str(&event("api-e1", "api-key")).expect("event");
    let (status, outcome, _) = api.post("siem", "/api/v1/events", ev.clone()).await;
    assert_eq!(status, 202);
    assert_eq!(outcome[0]["outcome"], "opened");
    let (_, again, _) = api.post("siem", "/api/v1/events", ev).await;
    assert_eq!(again[0]["outcome"], "duplicate");
    let id = outcome[0]["incident_id"].as_str().expect("id").to_owned();

    let facts: Value =
        serde_json::from_str(&std::fs::read_to_string(repo("config/demo/incident.json")).expect("facts"))
            .expect("json");
    let mut bad_facts = facts.clone();
    bad_facts["grade"] = json!("apocalyptic");
    let (status, problem, _) = api
        .post(
            "alice",
            &format!("/api/v1/incidents/{id}/confirm"),
            json!({"facts": bad_facts}),
        )
        .await;
    assert_eq!(status, 422, "{problem}");
    assert_eq!(problem["field"], "grade");

    let (status, _, _) = api
        .post(
            "alice",
            &format!("/api/v1/incidents/{id}/confirm"),
            json!({"facts": facts}),
        )
        .await;
    assert_eq!(status, 200);
    let (status, dry, _) = api
        .post(
            "alice",
            &format!("/api/v1/incidents/{id}/scope"),
            json!({"rule": {"any_categories": ["account_credentials"]}, "dry_run": true}),
        )
        .await;
    assert_eq!((status, dry["affected"].as_u64()), (200, Some(3)));
    let (_, view) = api.get("alice", &format!("/api/v1/incidents/{id}")).await;
    assert_eq!(view["incident"]["state"], "confirmed", "a dry run stores nothing");
    let (status, _, _) = api
        .post(
            "alice",
            &format!("/api/v1/incidents/{id}/scope"),
            json!({"rule": {"any_categories": ["account_credentials"]}}),
        )
        .await;
    assert_eq!(status, 200);
    let (status, drafted, _) = act(&api, &id, "draft", "alice").await;
    assert_eq!((status, drafted["notices"].as_u64()), (200, Some(3)));
    // A responder's token cannot approve; nor can the drafter with an approver's token.
    let (status, problem, _) = act(&api, &id, "approve", "alice").await;
    assert_eq!((status, problem["field"].as_str()), (403, Some("role")), "{problem}");
    let alice_approver = t.token("alice", "approver");
    let r = client
        .post(format!("{}/api/v1/incidents/{id}/approve", server.base))
        .bearer_auth(&alice_approver)
        .json(&json!({}))
        .send()
        .await
        .expect("request");
    let (status, problem, _) = answer(r).await;
    assert_eq!(
        (status, problem["field"].as_str()),
        (403, Some("actor")),
        "four eyes: {problem}"
    );
    let (status, problem, _) = act(&api, &id, "dispatch", "alice").await;
    assert_eq!(status, 409, "dispatch before approval: {problem}");
    let (status, _, _) = act(&api, &id, "approve", "bob").await;
    assert_eq!(status, 200);
    let (status, started, _) = act(&api, &id, "dispatch", "alice").await;
    assert_eq!((status, started["queued"].as_u64()), (202, Some(2)));

    // The server's worker delivers and settles the incident.
    let settled = eventually(Duration::from_secs(20), async || {
        let (_, v) = api.get("alice", &format!("/api/v1/incidents/{id}")).await;
        (v["incident"]["state"] == "monitoring").then_some(v)
    })
    .await
    .expect("the incident reaches monitoring");
    assert_eq!(settled["reached"], 2);
    assert_eq!(settled["unreachable"], json!(["api-3"]));
    assert_eq!(smtp.messages_to("one@example.com").len(), 1);
    assert_eq!(smtp.messages_to("two@example.com").len(), 1);
    let zh = &smtp.messages_to("two@example.com")[0].data;
    assert!(zh.contains("Content-Language: zh-CN"), "{zh}");

    // Notices read back with sections and rendered text.
    let (_, notices) = api.get("alice", &format!("/api/v1/incidents/{id}/notices")).await;
    let nid = notices[0]["id"].as_str().expect("notice id");
    let (_, notice) = api.get("alice", &format!("/api/v1/notices/{nid}")).await;
    assert!(
        notice["notice"]["sections"]["advice"]
            .as_str()
            .is_some_and(|s| !s.is_empty())
    );
    assert!(
        notice["notice"]["email_html"]
            .as_str()
            .is_some_and(|s| s.contains("<html"))
    );
    let (missing, _) = api
        .get("alice", "/api/v1/notices/ntc_00000000000000000000000000000000")
        .await;
    assert_eq!(missing, 404);

    // The public bulletin is served, with its feed.
    let reference = settled["incident"]["reference"].as_str().expect("reference");
    let page = client
        .get(format!("{}/bulletins/{reference}/", server.base))
        .send()
        .await
        .expect("get");
    assert_eq!(page.status().as_u16(), 200);
    let html = page.text().await.expect("html");
    assert!(html.contains("<html lang=\"zh-CN\""), "{html}");
    let feed = client
        .get(format!("{}/bulletins/{reference}/feed.atom", server.base))
        .send()
        .await
        .expect("get");
    assert_eq!(feed.status().as_u16(), 200);
    let index = client
        .get(format!("{}/bulletins/", server.base))
        .send()
        .await
        .expect("get")
        .text()
        .await
        .expect("text");
    assert!(index.contains(reference));
}
