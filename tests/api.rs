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

/// A raw body posted with `who`'s token: status, JSON answer, content type.
async fn post_raw(
    api: &Api,
    server: &Server,
    who: &str,
    path: &str,
    ctype: &str,
    body: String,
) -> (u16, Value, String) {
    let r = reqwest::Client::new()
        .post(format!("{}{path}", server.base))
        .bearer_auth(api.token_of(who))
        .header("content-type", ctype)
        .body(body)
        .send()
        .await
        .expect("request");
    answer(r).await
}

/// `GET path` with `who`'s token: status, JSON answer, and the `Link` header's next URL.
async fn get_page(api: &Api, server: &Server, who: &str, path: &str) -> (u16, Value, Option<String>) {
    let r = reqwest::Client::new()
        .get(format!("{}{path}", server.base))
        .bearer_auth(api.token_of(who))
        .send()
        .await
        .expect("request");
    let next = r
        .headers()
        .get("link")
        .and_then(|v| v.to_str().ok())
        .and_then(|l| l.strip_prefix('<'))
        .and_then(|l| l.split_once(">; rel=\"next\""))
        .map(|(url, _)| url.to_owned());
    let (status, body, _) = answer(r).await;
    (status, body, next)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_cli_operations_are_served_with_pages_limits_and_problem_documents() {
    tocsin::install_crypto_provider();
    let smtp = SmtpServer::refusing("flaky@example.com", common::smtp_server::Reply::Transient).await;
    let mut t = Tocsin::new();
    t.smtp(smtp.port())
        .set("TOCSIN_DELIVERY__SWEEP_SCHEDULE", "* * * * * *")
        .set("TOCSIN_DELIVERY__MAX_ATTEMPTS", "2")
        .set("TOCSIN_SERVER__BODY_LIMIT_BYTES", "65536");
    let server = t.serve();
    let api = t.api(
        &server,
        &[
            ("alice", "responder"),
            ("bob", "approver"),
            ("olga", "auditor"),
            ("root", "admin"),
        ],
    );

    // Merchants over HTTP, as JSON Lines or CSV: bad rows listed, the others stored.
    let jsonl = [
        merchant(
            "ops-1",
            "en",
            Some("fine@example.com"),
            None,
            None,
            &["account_credentials"],
        ),
        merchant(
            "ops-2",
            "en",
            Some("flaky@example.com"),
            None,
            None,
            &["account_credentials"],
        ),
        merchant("ops-3", "en", None, None, None, &["no_such_category"]),
    ]
    .join("\n");
    let (status, report, _) = post_raw(
        &api,
        &server,
        "alice",
        "/api/v1/merchants",
        "application/x-ndjson",
        jsonl,
    )
    .await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["counts"]["inserted"], 2);
    assert_eq!(report["rejected"].as_array().map(Vec::len), Some(1), "{report}");
    let csv = "id,name,kind,locale,region,email,holdings\nops-4,Shop Four,individual_business,zh-CN,CN-ZJ,four@example.cn,account_credentials\n";
    let (status, report, _) = post_raw(&api, &server, "alice", "/api/v1/merchants", "text/csv", csv.into()).await;
    assert_eq!(
        (status, report["counts"]["inserted"].as_u64()),
        (200, Some(1)),
        "{report}"
    );
    let (status, problem, ctype) = post_raw(
        &api,
        &server,
        "alice",
        "/api/v1/merchants",
        "text/csv",
        "id,colour\nx,red\n".into(),
    )
    .await;
    assert_eq!(
        (status, ctype.as_str(), problem["field"].as_str()),
        (422, "application/problem+json", Some("header"))
    );
    let (status, _, _) = post_raw(&api, &server, "olga", "/api/v1/merchants", "text/csv", csv.into()).await;
    assert_eq!(status, 403, "an auditor does not import");

    // A body over the configured limit is refused before it is read whole.
    let (status, problem, ctype) = post_raw(
        &api,
        &server,
        "alice",
        "/api/v1/events",
        "application/json",
        "x".repeat(70_000),
    )
    .await;
    assert_eq!((status, ctype.as_str()), (413, "application/problem+json"), "{problem}");
    assert_eq!(problem["field"], "body");

    // Three incidents, listed two at a time: the Link header leads to the rest.
    let mut ids = Vec::new();
    for n in 1..=3 {
        let ev: Value = serde_json::from_str(&event(&format!("ops-e{n}"), &format!("ops-key-{n}"))).expect("event");
        let (_, outcome, _) = api.post("alice", "/api/v1/events", ev).await;
        ids.push(outcome[0]["incident_id"].as_str().expect("id").to_owned());
    }
    let (status, first, next) = get_page(&api, &server, "olga", "/api/v1/incidents?limit=2").await;
    assert_eq!((status, first.as_array().map(Vec::len)), (200, Some(2)));
    let next = next.expect("a next page");
    let (_, second, none) = get_page(&api, &server, "olga", &next).await;
    assert_eq!(second.as_array().map(Vec::len), Some(1));
    assert!(none.is_none(), "the last page has no next");
    let mut listed: Vec<String> = first
        .as_array()
        .into_iter()
        .chain(second.as_array())
        .flatten()
        .map(|i| i["id"].as_str().expect("id").to_owned())
        .collect();
    listed.sort();
    let mut expected = ids.clone();
    expected.sort();
    assert_eq!(listed, expected, "every incident once");
    let (status, problem, _) = get_page(&api, &server, "olga", "/api/v1/incidents?limit=0").await;
    assert_eq!((status, problem["field"].as_str()), (400, Some("limit")));
    let (status, problem, _) = get_page(&api, &server, "olga", "/api/v1/incidents?after=inc_nope").await;
    assert_eq!((status, problem["field"].as_str()), (400, Some("after")));

    // The first incident, delivered: the flaky address uses up its attempts.
    let id = &ids[0];
    let (_, events) = api.get("olga", &format!("/api/v1/incidents/{id}/events")).await;
    assert_eq!(events[0]["external_id"], "ops-e1", "{events}");
    let facts: Value =
        serde_json::from_str(&std::fs::read_to_string(repo("config/demo/incident.json")).expect("facts"))
            .expect("json");
    for (who, action, body) in [
        ("alice", "confirm", json!({ "facts": facts })),
        (
            "alice",
            "scope",
            json!({ "rule": { "merchant_ids": ["ops-1", "ops-2", "ops-4"] } }),
        ),
        ("alice", "draft", json!({})),
        ("bob", "approve", json!({})),
        ("alice", "dispatch", json!({})),
    ] {
        let (status, answer, _) = api.post(who, &format!("/api/v1/incidents/{id}/{action}"), body).await;
        assert!(status < 300, "{action}: {status} {answer}");
    }
    let dead = eventually(Duration::from_secs(30), async || {
        let (_, dead) = api.get("olga", &format!("/api/v1/deliveries/dead?incident={id}")).await;
        (dead.as_array().is_some_and(|d| d.len() == 1)).then_some(dead)
    })
    .await
    .expect("the flaky address is dead-lettered");
    assert_eq!(dead[0]["merchant_id"], "ops-2");
    let dead_id = dead[0]["id"].as_str().expect("id");
    let (status, history) = api.get("olga", &format!("/api/v1/deliveries/{dead_id}")).await;
    assert_eq!(status, 200);
    assert_eq!(
        history["events"]
            .as_array()
            .map(|e| e.iter().filter(|e| e["event"] == "attempt").count()),
        Some(2),
        "{history}"
    );
    let (status, missing) = api
        .get("olga", "/api/v1/deliveries/dlv_00000000000000000000000000000000")
        .await;
    assert_eq!(status, 404, "{missing}");

    // Deliveries one page at a time, in id order.
    let (_, page1, next) = get_page(
        &api,
        &server,
        "olga",
        &format!("/api/v1/incidents/{id}/deliveries?limit=2"),
    )
    .await;
    let (_, page2, _) = get_page(&api, &server, "olga", &next.expect("a next page")).await;
    let all: Vec<&Value> = page1.as_array().into_iter().chain(page2.as_array()).flatten().collect();
    assert_eq!(all.len(), 3);
    assert!(all.windows(2).all(|w| w[0]["id"].as_str() < w[1]["id"].as_str()));

    let (_, providers) = api.get("olga", "/api/v1/providers").await;
    assert!(
        providers
            .as_array()
            .is_some_and(|p| p.iter().any(|p| p["channel"] == "email")),
        "{providers}"
    );

    // The re-drive: a responder's, not an auditor's.
    let (status, _, _) = api
        .post("olga", "/api/v1/deliveries/redrive", json!({ "incident": id }))
        .await;
    assert_eq!(status, 403);
    let (status, problem, _) = api
        .post("alice", "/api/v1/deliveries/redrive", json!({ "channel": "fax" }))
        .await;
    assert!((400..500).contains(&status), "{problem}");
    let (status, redriven, _) = api
        .post("alice", "/api/v1/deliveries/redrive", json!({ "incident": id }))
        .await;
    assert_eq!((status, redriven["redriven"].as_u64()), (200, Some(1)), "{redriven}");

    // The watchdog: its reminders listed; a round run by an admin only.
    let (status, reminders) = api.get("olga", &format!("/api/v1/incidents/{id}/reminders")).await;
    assert!(status == 200 && reminders.is_array(), "{reminders}");
    let (status, _, _) = api.post("alice", "/api/v1/watchdog/tick", json!({})).await;
    assert_eq!(status, 403);
    let (status, round, _) = api
        .post("root", "/api/v1/watchdog/tick", json!({ "now": "not a time" }))
        .await;
    assert_eq!((status, round["field"].as_str()), (400, Some("now")));
    let (status, round, _) = api.post("root", "/api/v1/watchdog/tick", json!({})).await;
    assert_eq!(status, 200, "{round}");
    assert!(round["stored"].is_u64(), "{round}");
    let (status, lookups) = api.get("olga", &format!("/api/v1/incidents/{id}/lookups")).await;
    assert_eq!((status, lookups), (200, json!([])));
}
