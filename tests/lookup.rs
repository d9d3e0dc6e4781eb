//! The bulletin's "am I affected?" lookup through `tocsin serve`: a merchant with the right
//! second factor learns whether it is affected and which categories; without it the answer is
//! the same whether the merchant exists or not; each client is rate-limited; every lookup is
//! logged without personal data.

mod common;

use common::*;
use serde_json::Value;

struct Answer {
    status: u16,
    body: String,
    retry_after: Option<String>,
}

async fn ask(client: &reqwest::Client, base: &str, form: &[(&str, &str)], json: bool) -> Answer {
    let mut request = client.post(format!("{base}/lookup")).form(form);
    if json {
        request = request.header("Accept", "application/json");
    }
    let response = request.send().await.expect("lookup");
    assert_eq!(
        response.headers().get("cache-control").and_then(|v| v.to_str().ok()),
        Some("no-store")
    );
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    Answer {
        status,
        body: response.text().await.expect("body"),
        retry_after,
    }
}

#[tokio::test]
async fn a_merchant_learns_its_exposure_with_its_second_factor_and_nobody_else_learns_anything() {
    tocsin::install_crypto_provider();
    let mut t = Tocsin::new();
    t.set("TOCSIN_BULLETIN__LOOKUPS_PER_HOUR", "9");
    let merchants = [
        merchant(
            "lk-1",
            "en",
            None,
            Some("+8613800001234"),
            None,
            &["account_credentials", "id_number"],
        ),
        merchant(
            "lk-2",
            "en",
            None,
            Some("+8613800005678"),
            None,
            &["account_credentials"],
        ),
        merchant("lk-3", "en", None, None, None, &["account_credentials"]),
    ]
    .join("\n");
    let t = tokio::task::spawn_blocking(move || {
        let incident = approved_incident(&t, "lookup", &merchants, "lk-1,lk-3");
        (t, incident)
    })
    .await
    .expect("setup");
    let (t, incident) = t;
    let server = t.serve();
    let client = reqwest::Client::new();
    let base = server.base.clone();
    let reference = "INC-2026-0001";

    // Before the bulletin is published the incident cannot be looked up at all.
    let early = ask(
        &client,
        &base,
        &[("reference", reference), ("merchant_id", "lk-1"), ("factor", "1234")],
        true,
    )
    .await;
    assert_eq!(early.status, 404);
    let t = tokio::task::spawn_blocking(move || {
        t.run(&["--actor", "alice", "incidents", "bulletin", &incident]).ok();
        (t, incident)
    })
    .await
    .expect("publish");
    let (t, incident) = t;
    let page = std::fs::read_to_string(
        t.data_dir()
            .join("publish/bulletins")
            .join(reference)
            .join("index.en.html"),
    )
    .expect("bulletin page");
    assert!(page.contains("action=\"http://127.0.0.1:8080/lookup\"") && page.contains("name=\"factor\""));

    let form = |id: &'static str, factor: &'static str| {
        vec![
            ("reference", reference),
            ("merchant_id", id),
            ("factor", factor),
            ("lang", "en"),
        ]
    };
    let affected = ask(&client, &base, &form("lk-1", "1234"), true).await;
    assert_eq!(affected.status, 200);
    let v: Value = serde_json::from_str(&affected.body).expect("json");
    assert_eq!(v["outcome"], "affected");
    let categories: Vec<&str> = v["categories"]
        .as_array()
        .expect("list")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        categories.len() >= 2 && categories.iter().all(|c| !c.contains('_')),
        "labels: {categories:?}"
    );
    let html = ask(&client, &base, &form("lk-1", "1234"), false).await;
    assert!(
        html.body.contains("<html lang=\"en\">") && html.body.contains("Yes."),
        "{}",
        html.body
    );

    let not_affected = ask(&client, &base, &form("lk-2", "5678"), true).await;
    assert_eq!(
        serde_json::from_str::<Value>(&not_affected.body).expect("json")["outcome"],
        "not_affected"
    );

    // A wrong factor, an unknown merchant, a merchant without a phone, a malformed id: one
    // and the same answer, so nothing can be told apart.
    let wrong = ask(&client, &base, &form("lk-1", "0000"), false).await;
    for (id, factor) in [("nobody", "1234"), ("lk-3", "1234"), ("lk-2", "1234"), ("../x", "1234")] {
        let other = ask(&client, &base, &form(id, factor), false).await;
        assert_eq!((other.status, &other.body), (wrong.status, &wrong.body), "{id}");
    }
    assert!(wrong.body.contains("could not confirm"), "{}", wrong.body);
    let zh = ask(
        &client,
        &base,
        &[
            ("reference", reference),
            ("merchant_id", "lk-1"),
            ("factor", "1234"),
            ("lang", "zh-CN"),
        ],
        false,
    )
    .await;
    assert!(
        zh.body.contains("<html lang=\"zh-CN\">") && zh.body.contains("是。"),
        "{}",
        zh.body
    );
    let bad = ask(&client, &base, &form("lk-1", "12a4"), true).await;
    assert_eq!(bad.status, 422);
    assert!(bad.body.contains("factor"), "{}", bad.body);

    // Nine lookups an hour per client (nine answered so far): the tenth is refused.
    let limited = ask(&client, &base, &form("lk-1", "1234"), true).await;
    assert_eq!(limited.status, 429, "{}", limited.body);
    assert_eq!(limited.retry_after.as_deref(), Some("3600"));
    assert_eq!(
        serde_json::from_str::<Value>(&limited.body).expect("json")["outcome"],
        "limited"
    );

    // Every lookup is logged, none with a merchant id, a factor or the client's address.
    let log = tokio::task::spawn_blocking(move || t.run(&["--json", "incidents", "lookups", &incident]).ok().stdout)
        .await
        .expect("log");
    let entries: Value = serde_json::from_str(&log).expect("json");
    assert_eq!(entries.as_array().map(Vec::len), Some(10), "{log}");
    for needle in ["lk-1", "lk-2", "nobody", "1234", "5678", "127.0.0.1"] {
        assert!(!log.contains(needle), "the lookup log holds {needle}");
    }
    let outcomes: Vec<&str> = entries
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|e| e["outcome"].as_str())
        .collect();
    assert_eq!(outcomes[0], "limited");
    assert_eq!(outcomes.iter().filter(|o| **o == "unverified").count(), 5);
}
