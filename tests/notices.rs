//! Scoping, grading, notice decisions, previews, versions and the merchant's own notice page,
//! through the `tocsin` binary (and `tocsin serve` for HTTP), checked the way a responder or a
//! merchant would check them: counts, what was stored, what was rendered and what was sent.

mod common;

use std::collections::BTreeSet;

use common::*;
use serde_json::{Value, json};

// ---- helpers

/// The demo incident's facts, to be adjusted per test.
fn demo_facts() -> Value {
    serde_json::from_str(&std::fs::read_to_string(repo("config/demo/incident.json")).expect("demo facts"))
        .expect("demo facts are JSON")
}

/// One merchant record as a JSON line: `extra` adds or replaces fields.
fn merchant_line(id: &str, locale: &str, region: &str, holdings: &[&str], extra: Value) -> String {
    let mut m = json!({
        "id": id, "name": format!("Merchant {id}"), "kind": "individual_business",
        "locale": locale, "region": region, "holdings": holdings,
    });
    if let (Some(m), Some(extra)) = (m.as_object_mut(), extra.as_object()) {
        for (k, v) in extra {
            m.insert(k.clone(), v.clone());
        }
    }
    m.to_string()
}

fn import(t: &Tocsin, lines: &[String]) {
    let path = t.file("merchants.jsonl", &lines.join("\n"));
    t.run(&["merchants", "import", &path]).ok();
}

/// Ingests one event under `key` and confirms the incident with `facts`; returns its id.
fn open_incident(t: &Tocsin, key: &str, facts: &Value) -> String {
    let events = t.file(&format!("event-{key}.json"), &event(&format!("ev-{key}"), key));
    let ingested = t.run(&["--json", "events", "ingest", &events]).ok().json();
    let incident = ingested[0]["incident_id"].as_str().expect("incident id").to_owned();
    let facts = t.file(&format!("facts-{key}.json"), &facts.to_string());
    t.run(&["--actor", "alice", "incidents", "confirm", &incident, "--facts", &facts])
        .ok();
    incident
}

fn show(t: &Tocsin, incident: &str) -> Value {
    t.run(&["--json", "incidents", "show", incident]).ok().json()
}

fn scope_merchants(t: &Tocsin, incident: &str, ids: &str) -> Value {
    t.run(&[
        "--json",
        "--actor",
        "alice",
        "incidents",
        "scope",
        incident,
        "--merchants",
        ids,
    ])
    .ok()
    .json()
}

/// Drafts as alice, approves as bob, dispatches and waits; returns the incident view.
fn draft_approve_dispatch(t: &Tocsin, incident: &str) -> Value {
    t.run(&["--actor", "alice", "incidents", "draft", incident]).ok();
    approve_dispatch(t, incident)
}

fn approve_dispatch(t: &Tocsin, incident: &str) -> Value {
    t.run(&["--actor", "bob", "incidents", "approve", incident]).ok();
    t.run(&[
        "--json",
        "--actor",
        "alice",
        "incidents",
        "dispatch",
        incident,
        "--timeout",
        "60",
    ])
    .ok()
    .json()
}

/// Merchant ids of the latest draft's notices (`notices list`).
fn noticed(t: &Tocsin, incident: &str) -> Vec<String> {
    let rows = t.run(&["--json", "notices", "list", incident]).ok().json();
    let mut ids: Vec<String> = rows
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| r[1].as_str().expect("merchant id").to_owned())
        .collect();
    ids.sort();
    ids
}

/// Every file of one outbox channel (`email`, `sms`, `push`), as text.
fn outbox(t: &Tocsin, channel: &str) -> Vec<String> {
    let dir = t.data_dir().join("outbox").join(channel);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    entries
        .map(|e| std::fs::read_to_string(e.expect("outbox entry").path()).expect("outbox file"))
        .collect()
}

/// The decoded plain-text body of every email in the file outbox addressed to `to`.
fn emails_to(t: &Tocsin, to: &str) -> Vec<String> {
    outbox(t, "email")
        .iter()
        .filter(|eml| {
            header_block(eml)
                .lines()
                .any(|l| l.starts_with("To:") && l.contains(to))
        })
        .map(|eml| plain_text(eml))
        .collect()
}

fn header_block(eml: &str) -> &str {
    eml.split("\r\n\r\n").next().unwrap_or(eml)
}

/// The text/plain part of a message, with its transfer encoding undone and LF line ends.
fn plain_text(eml: &str) -> String {
    let start = eml
        .find("Content-Type: text/plain")
        .unwrap_or_else(|| panic!("no text/plain part:\n{eml}"));
    let part = &eml[start..];
    let (headers, rest) = part.split_once("\r\n\r\n").expect("part headers");
    let boundary = eml
        .split_once("boundary=")
        .map(|(_, b)| b.trim_start_matches('"'))
        .and_then(|b| b.split(['"', '\r', ';']).next())
        .expect("a multipart boundary");
    let body = rest.split(&format!("\r\n--{boundary}")).next().unwrap_or(rest);
    let encoding = headers
        .lines()
        .find_map(|l| l.strip_prefix("Content-Transfer-Encoding:"))
        .map(|e| e.trim().to_ascii_lowercase())
        .unwrap_or_default();
    let bytes = match encoding.as_str() {
        "base64" => base64_decode(body),
        "quoted-printable" => quoted_printable_decode(body),
        _ => body.as_bytes().to_vec(),
    };
    String::from_utf8(bytes).expect("UTF-8 text").replace("\r\n", "\n")
}

fn base64_decode(s: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let (mut buf, mut bits) = (0u32, 0u32);
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => continue,
        };
        buf = (buf << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((buf >> bits) as u8);
            buf &= (1 << bits) - 1;
        }
    }
    out
}

fn quoted_printable_decode(s: &str) -> Vec<u8> {
    let s = s.replace("=\r\n", "");
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'='
            && let Some(v) = s.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

/// Characters an SMS takes in GSM-7 (extension characters count twice).
fn gsm7_units(text: &str) -> usize {
    text.chars().map(|c| if "^{}\\[~]|€".contains(c) { 2 } else { 1 }).sum()
}

fn transition_reasons(view: &Value) -> Vec<String> {
    view["transitions"]
        .as_array()
        .expect("transitions")
        .iter()
        .map(|t| t["reason"].as_str().unwrap_or_default().to_owned())
        .collect()
}

fn get_text(url: &str) -> (u16, String, Option<String>) {
    get_text_as(url, None)
}

/// GETs `url`, with a bearer token if given.
fn get_text_as(url: &str, token: Option<&str>) -> (u16, String, Option<String>) {
    tocsin::install_crypto_provider();
    let rt = tokio::runtime::Handle::current();
    tokio::task::block_in_place(|| {
        rt.block_on(async {
            let mut request = reqwest::Client::new().get(url);
            if let Some(token) = token {
                request = request.bearer_auth(token);
            }
            let r = request.send().await.expect("GET");
            let status = r.status().as_u16();
            let cache = r
                .headers()
                .get("cache-control")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            (status, r.text().await.expect("body"), cache)
        })
    })
}

fn get_json(url: &str, token: &str) -> (u16, Value) {
    let (status, body, _) = get_text_as(url, Some(token));
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

fn post_json(url: &str, token: &str, body: &Value) -> (u16, Value) {
    tocsin::install_crypto_provider();
    let rt = tokio::runtime::Handle::current();
    tokio::task::block_in_place(|| {
        rt.block_on(async {
            let r = reqwest::Client::new()
                .post(url)
                .bearer_auth(token)
                .json(body)
                .send()
                .await
                .expect("POST");
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap_or(Value::Null))
        })
    })
}

// ---- 1. dry run

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_reports_the_counts_and_stores_nothing() {
    let t = Tocsin::new();
    import(
        &t,
        &[
            merchant_line(
                "d-1",
                "zh-CN",
                "CN-ZJ",
                &["account_credentials", "phone_number"],
                json!({"email": "d1@example.com", "kind": "natural_person"}),
            ),
            merchant_line("d-2", "en", "SG", &["phone_number"], json!({"phone": "+6590000002"})),
            merchant_line("d-3", "zh-CN", "CN-SH", &["account_credentials"], json!({})),
            merchant_line("d-4", "en", "SG", &["media"], json!({"email": "d4@example.com"})),
        ],
    );
    let incident = open_incident(&t, "dry", &demo_facts());
    let dry = t
        .run(&[
            "--json",
            "--actor",
            "alice",
            "incidents",
            "scope",
            &incident,
            "--categories",
            "account_credentials,phone_number",
            "--dry-run",
        ])
        .ok()
        .json();
    assert_eq!(dry["affected"], 3, "d-4 holds none of the exposed data: {dry}");
    assert_eq!(dry["notice_required"], 3, "{dry}");
    assert_eq!(dry["notice_not_required"], 0, "{dry}");
    assert_eq!(dry["by_risk"], json!({"high": 2, "medium": 1}), "{dry}");
    assert_eq!(
        dry["by_first_channel"],
        json!({"email": 1, "sms": 1, "none": 1}),
        "{dry}"
    );
    assert_eq!(dry["by_locale"], json!({"en": 1, "zh-CN": 2}), "{dry}");
    assert_eq!(dry["unreachable"], 1, "{dry}");
    assert_eq!(
        dry["natural_persons"], 3,
        "three non-enterprise merchants with personal data: {dry}"
    );
    assert_eq!(dry["suggested_grade"], "general", "{dry}");

    let view = show(&t, &incident);
    assert_eq!(view["incident"]["state"], "confirmed", "a dry run stores nothing");
    assert_eq!(view["incident"]["scope_rule"], Value::Null);
    assert_eq!(view["incident"]["grade_suggestion"], Value::Null);
    assert_eq!(view["scope"]["affected"], 0, "{}", view["scope"]);
    assert_eq!(
        view["incident"]["facts"]["grade"], "significant",
        "a dry run does not touch the grade"
    );
    assert!(
        !transition_reasons(&view)
            .iter()
            .any(|r| r.contains("merchants affected")),
        "no scoping on the timeline"
    );
    t.run(&["audit", "verify"]).ok();
}

// ---- 2. scope rules from a file

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scope_rule_file_combines_any_of_except_windows_and_an_id_list() {
    let t = Tocsin::new();
    let held = ["account_credentials", "phone_number"];
    let m = |id: &str, region: &str, created: &str, active: Option<&str>, holdings: &[&str]| {
        let mut extra = json!({"email": format!("{id}@example.com"), "created_at": created});
        if let Some(a) = active {
            extra["last_active_at"] = a.into();
        }
        merchant_line(id, "zh-CN", region, holdings, extra)
    };
    import(
        &t,
        &[
            // In: Zhejiang (any_of[0]), created after the except window.
            m("r-zj-new", "CN-ZJ", "2023-03-01T00:00:00Z", None, &held),
            // Out: Zhejiang but created before 2020 (except[0]).
            m(
                "r-zj-old",
                "CN-ZJ",
                "2019-03-01T00:00:00Z",
                Some("2026-10-01T00:00:00Z"),
                &held,
            ),
            // In: Singapore and active since June (any_of[1]).
            m(
                "r-sg-active",
                "SG",
                "2022-01-01T00:00:00Z",
                Some("2026-09-01T00:00:00Z"),
                &held,
            ),
            // Out: Singapore, last active before the window.
            m(
                "r-sg-idle",
                "SG",
                "2022-01-01T00:00:00Z",
                Some("2025-01-01T00:00:00Z"),
                &held,
            ),
            // Out: Singapore with no activity recorded: a window excludes a missing date.
            m("r-sg-never", "SG", "2022-01-01T00:00:00Z", None, &held),
            // Out: another province.
            m(
                "r-sh",
                "CN-SH",
                "2023-01-01T00:00:00Z",
                Some("2026-10-01T00:00:00Z"),
                &held,
            ),
            // Out: selected by the rule but holds nothing the incident exposed.
            m("r-zj-media", "CN-ZJ", "2023-01-01T00:00:00Z", None, &["media"]),
            // Out: matches the rule but is not in the id list.
            m("r-zj-unlisted", "CN-ZJ", "2023-01-01T00:00:00Z", None, &held),
        ],
    );
    let incident = open_incident(&t, "rules", &demo_facts());
    let ids = t.file(
        "ids.txt",
        "# merchants named by the investigation\nr-zj-new\nr-zj-old\n\n  r-sg-active  \nr-sg-idle\nr-sg-never\nr-sh\nr-zj-media\n",
    );

    // Malformed rules are refused naming the field's path; nothing is stored.
    let bad_region = t.file(
        "bad-region.json",
        &json!({"any_of": [{"regions": ["CN-ZJ"]}], "except": [{"regions": ["zhejiang"]}]}).to_string(),
    );
    let refused = t.run(&[
        "--actor",
        "alice",
        "incidents",
        "scope",
        &incident,
        "--rule",
        &bad_region,
    ]);
    assert_ne!(refused.code, 0);
    assert!(refused.stderr.contains("except[0].regions[0]"), "{}", refused.stderr);
    let bad_time = t.file(
        "bad-time.json",
        &json!({"any_of": [{"regions": ["SG"]}, {"regions": ["SG"], "active_after": "last summer"}]}).to_string(),
    );
    let refused = t.run(&["--actor", "alice", "incidents", "scope", &incident, "--rule", &bad_time]);
    assert_ne!(refused.code, 0);
    assert!(refused.stderr.contains("any_of[1].active_after"), "{}", refused.stderr);
    let unknown_field = t.file(
        "bad-field.json",
        &json!({"regions": ["CN"], "except": [{"region": ["CN-SH"]}]}).to_string(),
    );
    let refused = t.run(&[
        "--actor",
        "alice",
        "incidents",
        "scope",
        &incident,
        "--rule",
        &unknown_field,
    ]);
    assert_ne!(refused.code, 0);
    assert!(
        refused.stderr.contains("except[0]") && refused.stderr.contains("region"),
        "{}",
        refused.stderr
    );
    let view = show(&t, &incident);
    assert_eq!(view["incident"]["state"], "confirmed", "refused rules store nothing");
    assert_eq!(view["incident"]["scope_rule"], Value::Null);

    let rule = t.file(
        "rule.json",
        &json!({
            "any_of": [
                {"regions": ["CN-ZJ"]},
                {"regions": ["SG"], "active_after": "2026-06-01T00:00:00Z"}
            ],
            "except": [{"created_before": "2020-01-01T00:00:00Z"}]
        })
        .to_string(),
    );
    let args = [
        "--json",
        "--actor",
        "alice",
        "incidents",
        "scope",
        &incident,
        "--rule",
        &rule,
        "--merchants-file",
        &ids,
    ];
    let mut dry_args = args.to_vec();
    dry_args.push("--dry-run");
    let dry = t.run(&dry_args).ok().json();
    assert_eq!(dry["affected"], 2, "{dry}");
    let stored = t.run(&args).ok().json();
    assert_eq!(stored["affected"], 2, "{stored}");
    let view = show(&t, &incident);
    assert_eq!(view["incident"]["state"], "scoped");
    assert_eq!(view["scope"]["affected"], 2);
    assert_eq!(view["scope"]["by_locale"], json!({"zh-CN": 2}));
    let rule_stored = &view["incident"]["scope_rule"];
    assert_eq!(rule_stored["any_of"].as_array().map(Vec::len), Some(2), "{rule_stored}");
    assert_eq!(rule_stored["except"].as_array().map(Vec::len), Some(1), "{rule_stored}");
    assert_eq!(
        rule_stored["merchant_ids"].as_array().map(Vec::len),
        Some(7),
        "{rule_stored}"
    );

    t.run(&["--actor", "alice", "incidents", "draft", &incident]).ok();
    assert_eq!(noticed(&t, &incident), ["r-sg-active", "r-zj-new"]);
}

// ---- 3. grade suggestion and override

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scoping_counts_distinct_people_and_a_grade_without_reason_yields_to_the_suggestion() {
    let t = Tocsin::new();
    let exposed = ["phone_number", "contact_persons"];
    import(
        &t,
        &[
            // One person behind two shops: counted once.
            merchant_line(
                "g-person",
                "zh-CN",
                "CN-ZJ",
                &exposed,
                json!({"kind": "natural_person", "representative_key": "person-A",
                       "email": "gp@example.com"}),
            ),
            merchant_line(
                "g-shop",
                "zh-CN",
                "CN-ZJ",
                &["phone_number"],
                json!({"representative_key": "person-A", "email": "gs@example.com"}),
            ),
            // Enterprises count their contact persons only; c-2 works for both.
            merchant_line(
                "g-corp-1",
                "en",
                "SG",
                &exposed,
                json!({"kind": "enterprise", "contact_keys": ["c-1", "c-2"], "email": "gc1@example.com"}),
            ),
            merchant_line(
                "g-corp-2",
                "en",
                "SG",
                &exposed,
                json!({"kind": "enterprise", "contact_keys": ["c-2", "c-3"], "email": "gc2@example.com"}),
            ),
            // An enterprise whose contacts' data was not exposed: nobody counted.
            merchant_line(
                "g-corp-3",
                "en",
                "SG",
                &["phone_number"],
                json!({"kind": "enterprise", "contact_keys": ["c-9"], "email": "gc3@example.com"}),
            ),
            // A person without a key counts as itself; its contacts were not exposed.
            merchant_line(
                "g-solo",
                "en",
                "SG",
                &["phone_number"],
                json!({"kind": "natural_person", "contact_keys": ["c-1", "c-8"], "email": "gso@example.com"}),
            ),
        ],
    );
    let mut facts = demo_facts();
    facts["categories"] = json!(exposed);
    facts.as_object_mut().map(|f| f.remove("grade_reason"));
    assert_eq!(facts["grade"], "significant");
    let incident = open_incident(&t, "grade", &facts);
    let summary = scope_merchants(&t, &incident, "g-person,g-shop,g-corp-1,g-corp-2,g-corp-3,g-solo");
    assert_eq!(summary["affected"], 6, "{summary}");
    // person-A, c-1, c-2, c-3 and g-solo itself.
    assert_eq!(summary["natural_persons"], 5, "{summary}");
    assert_eq!(summary["suggested_grade"], "general", "{summary}");
    assert_eq!(summary["grade"], "general", "{summary}");

    let view = show(&t, &incident);
    assert_eq!(
        view["incident"]["facts"]["grade"], "general",
        "an unexplained grade yields to the count"
    );
    assert_eq!(view["incident"]["grade_suggestion"]["grade"], "general");
    assert_eq!(view["incident"]["grade_suggestion"]["natural_persons"], 5);
    let reasons = transition_reasons(&view);
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("unexplained grade significant was replaced by general")),
        "{reasons:?}"
    );

    let no_reason = t.run(&["--actor", "alice", "incidents", "grade", &incident, "significant"]);
    assert_ne!(no_reason.code, 0);
    assert!(no_reason.stderr.contains("reason"), "{}", no_reason.stderr);
    assert_eq!(show(&t, &incident)["incident"]["facts"]["grade"], "general");

    let why = "Export logs show about 1.3 million people; the directory keys are incomplete.";
    let graded = t
        .run(&[
            "--json",
            "--actor",
            "alice",
            "incidents",
            "grade",
            &incident,
            "significant",
            "--reason",
            why,
        ])
        .ok()
        .json();
    assert_eq!(graded["facts"]["grade"], "significant");
    let view = show(&t, &incident);
    let i = &view["incident"];
    assert_eq!(i["facts"]["grade"], "significant");
    assert_eq!(i["facts"]["grade_reason"]["en"], why);
    assert_eq!(
        i["grade_suggestion"]["grade"], "general",
        "the suggestion stays on record beside the decision"
    );
    assert_eq!(i["grade_suggestion"]["natural_persons"], 5);
    assert_eq!(view["scope"]["grade"], "significant");
    assert_eq!(view["scope"]["suggested_grade"], "general");
    assert!(
        transition_reasons(&view)
            .iter()
            .any(|r| r == "grade set to significant")
    );
    // Setting the suggested grade needs no reason.
    t.run(&["--actor", "alice", "incidents", "grade", &incident, "general"])
        .ok();
    t.run(&["audit", "verify"]).ok();
}

// ---- 4. notice not required (PIPL Art. 57 para 2) and its override

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_data_needs_no_notice_until_a_responder_decides_otherwise() {
    let t = Tocsin::new();
    import(
        &t,
        &[
            merchant_line(
                "n-phone",
                "en",
                "SG",
                &["id_number", "phone_number"],
                json!({"email": "phone@example.com"}),
            ),
            merchant_line(
                "n-enc-1",
                "en",
                "SG",
                &["id_number", "media"],
                json!({"email": "enc1@example.com"}),
            ),
            merchant_line(
                "n-enc-2",
                "zh-CN",
                "CN-ZJ",
                &["id_number"],
                json!({"email": "enc2@example.com"}),
            ),
        ],
    );
    let mut facts = demo_facts();
    facts["categories"] = json!(["id_number", "phone_number"]);
    facts["mitigations"] = json!([{"id": "encrypted_uncompromised_key", "categories": ["id_number"]}]);
    let incident = open_incident(&t, "pipl57", &facts);
    let summary = scope_merchants(&t, &incident, "n-phone,n-enc-1,n-enc-2");
    assert_eq!(summary["affected"], 3, "{summary}");
    assert_eq!(
        summary["notice_not_required"], 2,
        "only encrypted ID numbers exposed: {summary}"
    );
    assert_eq!(summary["notice_required"], 1, "{summary}");

    t.run(&["--actor", "alice", "incidents", "draft", &incident]).ok();
    assert_eq!(noticed(&t, &incident), ["n-phone"]);

    // The override goes through the API (the CLI's --required flag is covered below).
    let server = t.serve();
    let url = format!("{}/api/v1/incidents/{incident}/notice-decisions", server.base);
    let carol = t.token("carol", "responder");
    let (status, problem) = post_json(&url, &carol, &json!({"merchant_id": "n-enc-1", "required": true}));
    assert_eq!((status, problem["field"].as_str()), (400, Some("reason")), "{problem}");
    let (status, problem) = post_json(
        &url,
        &carol,
        &json!({"merchant_id": "n-enc-1", "required": true, "reason": "  "}),
    );
    assert_eq!((status, problem["field"].as_str()), (422, Some("reason")), "{problem}");
    let (status, decided) = post_json(
        &url,
        &carol,
        &json!({"merchant_id": "n-enc-1", "required": true,
                "reason": "the key's custody cannot be proven for this shop's backup"}),
    );
    assert_eq!(status, 200, "{decided}");
    assert_eq!(decided["notice_required"], true, "{decided}");
    assert!(
        decided["notice_reason"]
            .as_str()
            .is_some_and(|r| r.contains("custody cannot be proven")),
        "{decided}"
    );
    drop(server);

    let view = show(&t, &incident);
    assert_eq!(
        view["incident"]["state"], "scoped",
        "a changed decision asks for a new draft"
    );
    assert_eq!(view["scope"]["affected"], 3);
    assert_eq!(view["scope"]["notice_required"], 2, "{}", view["scope"]);
    assert_eq!(view["scope"]["notice_not_required"], 1, "{}", view["scope"]);
    assert!(
        transition_reasons(&view)
            .iter()
            .any(|r| r.contains("notice decision changed")),
        "{:?}",
        transition_reasons(&view)
    );

    let drafted = t
        .run(&["--json", "--actor", "alice", "incidents", "draft", &incident])
        .ok()
        .json();
    assert_eq!(drafted["draft"]["version"], 2);
    assert_eq!(drafted["notices"], 2);
    assert_eq!(noticed(&t, &incident), ["n-enc-1", "n-phone"]);
    let view = approve_dispatch(&t, &incident);
    assert_eq!(emails_to(&t, "phone@example.com").len(), 1);
    assert_eq!(
        emails_to(&t, "enc1@example.com").len(),
        1,
        "notified after the override"
    );
    assert!(
        emails_to(&t, "enc2@example.com").is_empty(),
        "no notice where it is not required"
    );
    assert_eq!(outbox(&t, "email").len(), 2);
    assert!(outbox(&t, "sms").is_empty() && outbox(&t, "push").is_empty());
    // Still listed and recorded, and not mistaken for an unreachable merchant.
    assert_eq!(view["scope"]["affected"], 3);
    assert_eq!(view["scope"]["notice_not_required"], 1);
    assert_eq!(view["reached"], 2);
    assert_eq!(view["unreachable"], json!([]));
    assert_eq!(view["incident"]["state"], "monitoring");
    let verified = t.run(&["--json", "audit", "verify"]).ok().json();
    assert!(verified.get("Intact").is_some(), "{verified}");
}

/// The CLI documents `--required` as taking `true` or `false`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_notice_decision_command_takes_true_or_false() {
    let t = Tocsin::new();
    import(
        &t,
        &[
            merchant_line(
                "c-phone",
                "en",
                "SG",
                &["phone_number"],
                json!({"email": "cp@example.com"}),
            ),
            merchant_line("c-enc", "en", "SG", &["id_number"], json!({"email": "ce@example.com"})),
        ],
    );
    let mut facts = demo_facts();
    facts["categories"] = json!(["id_number", "phone_number"]);
    facts["mitigations"] = json!([{"id": "encrypted_uncompromised_key", "categories": ["id_number"]}]);
    let incident = open_incident(&t, "cli-decision", &facts);
    scope_merchants(&t, &incident, "c-phone,c-enc");
    let decide = |merchant: &str, required: &str, reason: Option<&str>| {
        let mut args = vec![
            "--json",
            "--actor",
            "carol",
            "incidents",
            "notice-decision",
            &incident,
            merchant,
            "--required",
            required,
        ];
        if let Some(r) = reason {
            args.extend(["--reason", r]);
        }
        t.run(&args)
    };
    let missing = decide("c-enc", "true", None);
    assert_ne!(missing.code, 0);
    assert!(
        missing.stderr.contains("not provided") && missing.stderr.contains("--reason"),
        "refused for the missing reason, not for the value: {}",
        missing.stderr
    );
    let on = decide("c-enc", "true", Some("backup key custody unproven")).ok().json();
    assert_eq!(on["notice_required"], true, "{on}");
    let off = decide("c-phone", "false", Some("number was already public on the shop page"))
        .ok()
        .json();
    assert_eq!(off["notice_required"], false, "{off}");
    let view = show(&t, &incident);
    assert_eq!(view["scope"]["notice_required"], 1);
    assert_eq!(view["scope"]["notice_not_required"], 1);
}

// ---- 5. preview in every channel and language

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preview_renders_every_channel_in_every_language_on_the_cli_and_the_api() {
    let t = Tocsin::new();
    let address = "88 Example Road, Suite 5; San Francisco, CA 94105";
    import(
        &t,
        &[merchant_line(
            "pv-ca",
            "en",
            "US-CA",
            &["account_credentials", "phone_number", "precise_location", "media"],
            json!({"email": "pv@example.com", "postal_address": address}),
        )],
    );
    let incident = open_incident(&t, "preview", &demo_facts());
    scope_merchants(&t, &incident, "pv-ca");
    t.run(&["--actor", "alice", "incidents", "draft", &incident]).ok();
    let preview = t.run(&["--json", "notices", "preview", &incident, "pv-ca"]).ok().json();
    assert_eq!(preview["merchant_id"], "pv-ca");
    assert_eq!(preview["version"], 1);
    assert_eq!(preview["merchant_locale"], "en");
    let notices = preview["notices"].as_array().expect("notices");
    let locales: Vec<&str> = notices.iter().filter_map(|n| n["locale"].as_str()).collect();
    assert_eq!(
        locales,
        ["en", "zh-CN"],
        "the merchant's language first, then every other"
    );

    let exposed = [
        ("en", ["account name and password", "mobile phone number"]),
        ("zh-CN", ["账号和密码", "手机号码"]),
    ];
    let held_only = [("en", "precise (GPS) location"), ("zh-CN", "精确位置（GPS）")];
    for n in notices {
        let locale = n["locale"].as_str().expect("locale");
        let s = |k: &str| {
            n[k].as_str()
                .unwrap_or_else(|| panic!("{locale}: {k} missing"))
                .to_owned()
        };
        for k in [
            "email_subject",
            "email_text",
            "email_html",
            "sms_text",
            "push_title",
            "push_body",
            "letter_html",
            "url",
        ] {
            assert!(!s(k).trim().is_empty(), "{locale}: {k} is empty");
        }
        let url = s("url");
        assert!(url.contains("/n/"), "{url}");
        for html in [s("email_html"), s("letter_html")] {
            assert!(html.contains(&format!("lang=\"{locale}\"")), "{locale}");
            assert!(html.contains("<h1"), "{locale}: no <h1>");
            assert!(!html.contains("<table"), "{locale}: layout tables");
        }
        let sms = s("sms_text");
        assert!(sms.contains(&url), "{locale}: the SMS links to the notice: {sms}");
        if locale == "zh-CN" {
            assert!(sms.chars().count() <= 70, "one UCS-2 segment: {sms}");
        } else {
            assert!(gsm7_units(&sms) <= 160 && sms.is_ascii(), "one GSM-7 segment: {sms}");
        }
        assert!(s("push_title").chars().count() <= 50, "{locale}: {}", s("push_title"));
        assert!(s("push_body").chars().count() <= 110, "{locale}: {}", s("push_body"));
        let letter = s("letter_html");
        assert!(letter.contains("A4"), "{locale}: letter page size");
        for line in address.split(';').map(str::trim) {
            assert!(letter.contains(line), "{locale}: letter lacks '{line}'");
        }
        assert!(letter.contains("Merchant pv-ca"));

        // The advice names exactly the exposed categories, each as one list item.
        let advice = n["sections"]["advice"].as_str().expect("advice");
        let listed: BTreeSet<&str> = advice
            .lines()
            .filter_map(|l| l.strip_prefix("- "))
            .filter_map(|l| match locale {
                "en" => l.split_once(": ").map(|(label, _)| label),
                _ => l.split_once('：').map(|(label, _)| label),
            })
            .collect();
        let (_, want) = exposed.iter().find(|(l, _)| *l == locale).expect("labels");
        assert_eq!(listed, want.iter().copied().collect(), "{locale}: {advice}");
        let (_, not_exposed) = held_only.iter().find(|(l, _)| *l == locale).expect("label");
        assert!(!advice.contains(not_exposed), "{locale}: {advice}");
        assert!(!s("email_text").contains(not_exposed), "{locale}");
    }
    let en = &notices[0];
    let text = en["email_text"].as_str().expect("text");
    let headings = [
        "Notice of Data Breach",
        "What Happened",
        "What Information Was Involved",
        "What We Are Doing",
        "What You Can Do",
        "For More Information",
    ];
    let mut at = 0;
    for h in headings {
        let found = text[at..]
            .lines()
            .position(|l| l.trim() == h)
            .unwrap_or_else(|| panic!("heading '{h}' missing or out of order:\n{text}"));
        at += text[at..].lines().take(found + 1).map(|l| l.len() + 1).sum::<usize>();
    }
    assert!(
        en["email_subject"]
            .as_str()
            .is_some_and(|s| s.starts_with("Notice of Data Breach"))
    );

    // The API gives the same preview.
    let server = t.serve();
    let api = format!("{}/api/v1/incidents/{incident}", server.base);
    let reader = t.token("reader", "auditor");
    let (status, over_http) = get_json(&format!("{api}/preview/pv-ca"), &reader);
    assert_eq!(status, 200);
    assert_eq!(over_http, preview);
    let (status, v1) = get_json(&format!("{api}/preview/pv-ca?version=1"), &reader);
    assert_eq!((status, &v1), (200, &preview));
    let (status, problem) = get_json(&format!("{api}/preview/pv-ca?version=7"), &reader);
    assert_eq!((status, problem["field"].as_str()), (422, Some("version")), "{problem}");
    let (status, problem) = get_json(&format!("{api}/preview/nobody-here"), &reader);
    assert_eq!(
        (status, problem["field"].as_str()),
        (422, Some("merchant_id")),
        "{problem}"
    );
}

// ---- 6. versions and diff

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_is_a_new_version_that_says_what_changed_and_leaves_the_first_intact() {
    let t = Tocsin::new();
    import(
        &t,
        &[
            merchant_line(
                "u-en",
                "en",
                "SG",
                &["account_credentials", "phone_number"],
                json!({"email": "u-en@example.com"}),
            ),
            merchant_line(
                "u-zh",
                "zh-CN",
                "CN-ZJ",
                &["account_credentials"],
                json!({"email": "u-zh@example.com"}),
            ),
        ],
    );
    let facts = demo_facts();
    let incident = open_incident(&t, "update", &facts);
    scope_merchants(&t, &incident, "u-en,u-zh");
    let view = draft_approve_dispatch(&t, &incident);
    assert_eq!(view["incident"]["state"], "monitoring");
    let first = emails_to(&t, "u-en@example.com");
    assert_eq!(first.len(), 1);
    let v1_before = t.run(&["--json", "notices", "preview", &incident, "u-en"]).ok().json();
    let deliveries = t.run(&["--json", "incidents", "deliveries", &incident]).ok().json();
    let sent_at = deliveries
        .as_array()
        .expect("deliveries")
        .iter()
        .filter_map(|d| d["sent_at"].as_str())
        .min()
        .expect("a sent delivery")
        .to_owned();
    // `2026-12-01T01:02:03.456789Z` -> `2026-12-01 01:02 UTC`, as the notice writes it.
    let sent_human = format!("{} {} UTC", &sent_at[..10], &sent_at[11..16]);

    let new_measure = "We have also rotated every API key issued to seller-centre integrations.";
    let mut amended = facts.clone();
    amended["measures_taken"]["en"] = json!(format!(
        "{} {new_measure}",
        facts["measures_taken"]["en"].as_str().expect("text")
    ));
    amended["measures_taken"]["zh-CN"] = json!(format!(
        "{}我们还轮换了所有卖家中心集成的 API 密钥。",
        facts["measures_taken"]["zh-CN"].as_str().expect("text")
    ));
    let amended = t.file("amended.json", &amended.to_string());
    t.run(&[
        "--actor",
        "alice",
        "incidents",
        "amend",
        &incident,
        "--facts",
        &amended,
        "--reason",
        "API keys rotated",
    ])
    .ok();
    let bare = t.run(&["--actor", "alice", "incidents", "draft", &incident]);
    assert_ne!(bare.code, 0);
    assert!(bare.stderr.contains("changes.en"), "{}", bare.stderr);
    let changes_en = "We rotated all integration API keys; reconnect your shop tools.";
    let half = t.run(&[
        "--actor",
        "alice",
        "incidents",
        "draft",
        &incident,
        "--changes-en",
        changes_en,
    ]);
    assert_ne!(half.code, 0);
    assert!(half.stderr.contains("changes.zh-CN"), "{}", half.stderr);
    assert_eq!(
        show(&t, &incident)["drafts"].as_array().map(Vec::len),
        Some(1),
        "refused drafts store nothing"
    );
    let v2 = t
        .run(&[
            "--json",
            "--actor",
            "alice",
            "incidents",
            "draft",
            &incident,
            "--changes-en",
            changes_en,
            "--changes-zh",
            "我们轮换了所有集成 API 密钥，请重新连接您的店铺工具。",
        ])
        .ok()
        .json();
    assert_eq!(v2["draft"]["version"], 2);
    assert_eq!(v2["created"], true);
    let view = approve_dispatch(&t, &incident);
    assert_eq!(view["drafts"][1]["state"], "approved");
    assert_eq!(view["drafts"][1]["approved_by"], "bob");

    let mails = emails_to(&t, "u-en@example.com");
    assert_eq!(mails.len(), 2, "the update is a second email");
    let update = mails
        .iter()
        .find(|m| m.contains("This is an update"))
        .expect("an update email");
    let expected = format!("This is an update (version 2) to our notice sent on {sent_human}.");
    assert!(update.contains(&expected), "{expected}\n{update}");
    assert!(update.contains(changes_en), "{update}");
    assert!(update.contains(new_measure), "{update}");
    assert_eq!(emails_to(&t, "u-zh@example.com").len(), 2);

    let v1_after = t
        .run(&["--json", "notices", "preview", &incident, "u-en", "--version", "1"])
        .ok()
        .json();
    assert_eq!(v1_after, v1_before, "version 1 renders as it was sent");
    assert!(
        !v1_after["notices"][0]["email_text"]
            .as_str()
            .is_some_and(|s| s.contains(new_measure))
    );

    let diff = t
        .run(&["--json", "notices", "diff", &incident, "u-en", "1", "2"])
        .ok()
        .json();
    assert_eq!(
        (diff["from_version"].as_i64(), diff["to_version"].as_i64()),
        (Some(1), Some(2))
    );
    let text_diff = diff["changes"]["email.txt"].as_str().expect("email.txt changed");
    let added: Vec<&str> = text_diff
        .lines()
        .filter(|l| l.starts_with('+') && !l.starts_with("+++"))
        .collect();
    assert!(added.iter().any(|l| l.contains(changes_en)), "{text_diff}");
    assert!(added.iter().any(|l| l.contains(new_measure)), "{text_diff}");
    assert!(
        !text_diff
            .lines()
            .any(|l| l.starts_with('-') && !l.starts_with("---") && l.contains(new_measure)),
        "{text_diff}"
    );
    assert!(diff["changes"]["email_subject"].is_string(), "the subject says update");

    let server = t.serve();
    let api = format!("{}/api/v1/incidents/{incident}/diff/u-en", server.base);
    let reader = t.token("reader", "auditor");
    let (status, over_http) = get_json(&format!("{api}?from=1&to=2"), &reader);
    assert_eq!(status, 200);
    assert_eq!(over_http, diff);
    let (status, problem) = get_json(&api, &reader);
    assert_eq!((status, problem["field"].as_str()), (400, Some("from")), "{problem}");
    t.run(&["audit", "verify"]).ok();
}

// ---- 7. completeness names the profile and the element

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incomplete_draft_names_the_legal_profile_and_element() {
    let t = Tocsin::new();
    import(
        &t,
        &[
            merchant_line(
                "k-cn",
                "zh-CN",
                "CN-ZJ",
                &["account_credentials"],
                json!({"email": "kcn@example.com"}),
            ),
            merchant_line(
                "k-ca",
                "en",
                "US-CA",
                &["account_credentials"],
                json!({"email": "kca@example.com"}),
            ),
        ],
    );
    let mut no_cause = demo_facts();
    no_cause["cause"] = json!({"en": no_cause["cause"]["en"].clone()});
    let cn = open_incident(&t, "no-cause", &no_cause);
    scope_merchants(&t, &cn, "k-cn");
    let refused = t.run(&["--actor", "alice", "incidents", "draft", &cn]);
    assert_ne!(refused.code, 0);
    assert!(
        refused.stderr.contains("cn-pipl-57") && refused.stderr.contains("cause"),
        "{}",
        refused.stderr
    );
    assert!(refused.stderr.contains("zh-CN"), "{}", refused.stderr);
    let view = show(&t, &cn);
    assert_eq!(view["incident"]["state"], "scoped");
    assert_eq!(view["drafts"], json!([]));
    assert_eq!(noticed(&t, &cn), Vec::<String>::new());

    let mut undated = demo_facts();
    undated.as_object_mut().map(|f| f.remove("occurred_at"));
    let ca = open_incident(&t, "undated", &undated);
    scope_merchants(&t, &ca, "k-ca");
    let refused = t.run(&["--actor", "alice", "incidents", "draft", &ca]);
    assert_ne!(refused.code, 0);
    assert!(
        refused.stderr.contains("us-ca-1798-82") && refused.stderr.contains("occurred_at"),
        "{}",
        refused.stderr
    );
    assert!(
        !refused.stderr.contains("cn-pipl-57"),
        "a Californian merchant is not checked against PIPL: {}",
        refused.stderr
    );
    let view = show(&t, &ca);
    assert_eq!(view["incident"]["state"], "scoped");
    assert_eq!(view["drafts"], json!([]));
}

// ---- 8. the merchant's own notice page

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_link_in_an_sms_opens_the_merchants_own_notice_and_nothing_else() {
    let t = Tocsin::new();
    import(
        &t,
        &[
            merchant_line(
                "p-sms",
                "en",
                "SG",
                &["account_credentials", "phone_number"],
                json!({"phone": "+6590000101", "name": "Lantern Tea House"}),
            ),
            merchant_line(
                "p-other",
                "en",
                "SG",
                &["account_credentials"],
                json!({"phone": "+6590000102", "name": "Other Shop"}),
            ),
        ],
    );
    let incident = open_incident(&t, "page", &demo_facts());
    scope_merchants(&t, &incident, "p-sms,p-other");
    draft_approve_dispatch(&t, &incident);
    let sms: Vec<Value> = outbox(&t, "sms")
        .iter()
        .map(|s| serde_json::from_str(s).expect("SMS JSON"))
        .collect();
    let mine = sms.iter().find(|s| s["to"] == "+6590000101").expect("an SMS to p-sms");
    let url = mine["url"].as_str().expect("url");
    assert!(mine["text"].as_str().is_some_and(|s| s.contains(url)));
    let preview = t.run(&["--json", "notices", "preview", &incident, "p-sms"]).ok().json();
    assert_eq!(preview["notices"][0]["url"], url, "the preview shows the link sent");
    let token = url.rsplit_once("/n/").expect("a /n/ link").1.to_owned();
    assert_eq!(token.len(), 18, "{token}");

    let server = t.serve();
    let (status, html, cache) = get_text(&format!("{}/n/{token}", server.base));
    assert_eq!(status, 200, "{html}");
    assert_eq!(cache.as_deref(), Some("no-store"));
    assert!(html.contains("Lantern Tea House"), "{html}");
    assert!(!html.contains("Other Shop"));
    for heading in [
        "What Happened",
        "What Information Was Involved",
        "What We Are Doing",
        "What You Can Do",
        "For More Information",
    ] {
        assert!(html.contains(heading), "page lacks '{heading}'");
    }
    assert!(html.contains("lang=\"en\""));

    let forged: String = token[..8]
        .chars()
        .chain(token[8..].chars().map(|c| if c == '0' { '1' } else { '0' }))
        .collect();
    assert_ne!(forged, token);
    for bad in [forged.as_str(), "ffffffff0123456789", "not-a-token"] {
        let (status, body, cache) = get_text(&format!("{}/n/{bad}", server.base));
        assert_eq!(status, 404, "{bad}: {body}");
        assert_eq!(cache.as_deref(), Some("no-store"));
        assert!(!body.contains("Lantern"), "{bad}");
    }
}

// ---- 9. channel limits from the configuration

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notice_link_too_long_for_one_sms_segment_is_refused_at_drafting() {
    let mut t = Tocsin::new();
    let base = format!("https://notices.example.com/{}", "x".repeat(52));
    assert_eq!(base.len(), 80);
    t.set("TOCSIN_SMS__MAX_SEGMENTS", "1")
        .set("TOCSIN_OPERATOR__NOTICE_BASE_URL", base);
    import(
        &t,
        &[merchant_line(
            "l-zh",
            "zh-CN",
            "CN-ZJ",
            &["account_credentials"],
            json!({"phone": "+8613800000901"}),
        )],
    );
    let incident = open_incident(&t, "limits", &demo_facts());
    scope_merchants(&t, &incident, "l-zh");
    let refused = t.run(&["--actor", "alice", "incidents", "draft", &incident]);
    assert_ne!(refused.code, 0);
    assert!(
        refused.stderr.contains("sms (zh-CN)") && refused.stderr.contains("segments"),
        "{}",
        refused.stderr
    );
    assert!(refused.stderr.contains("sms.max_segments"), "{}", refused.stderr);
    let view = show(&t, &incident);
    assert_eq!(view["incident"]["state"], "scoped");
    assert_eq!(view["drafts"], json!([]));

    // The same notice drafts once the configuration allows two segments.
    t.set("TOCSIN_SMS__MAX_SEGMENTS", "2");
    let drafted = t
        .run(&["--json", "--actor", "alice", "incidents", "draft", &incident])
        .ok()
        .json();
    assert_eq!(drafted["draft"]["version"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_marketing_opt_out_does_not_stop_a_mandatory_notice() {
    let t = Tocsin::new();
    import(
        &t,
        &[merchant_line(
            "o-1",
            "en",
            "SG",
            &["account_credentials"],
            json!({"email": "optout@example.com", "marketing_opt_out": true}),
        )],
    );
    let incident = open_incident(&t, "optout", &demo_facts());
    let scope = scope_merchants(&t, &incident, "o-1");
    assert_eq!(scope["notice_required"], 1, "{scope}");
    draft_approve_dispatch(&t, &incident);
    let mails = emails_to(&t, "optout@example.com");
    assert_eq!(mails.len(), 1, "the opted-out merchant still gets the security notice");
    assert!(
        mails[0].contains("regardless of your marketing preferences"),
        "{}",
        mails[0]
    );
    let raw = outbox(&t, "email");
    assert!(raw.iter().all(|eml| !eml.contains("List-Unsubscribe")));
}

/// The zh-CN SMS of a one-merchant incident drafted with `base` as the notice base URL, or the
/// drafting error.
fn zh_sms_with_base(base: Option<&str>) -> Result<String, String> {
    let mut t = Tocsin::new();
    t.set("TOCSIN_SMS__MAX_SEGMENTS", "1");
    if let Some(base) = base {
        t.set("TOCSIN_OPERATOR__NOTICE_BASE_URL", base);
    }
    import(
        &t,
        &[merchant_line(
            "b-zh",
            "zh-CN",
            "CN-ZJ",
            &["account_credentials"],
            json!({"phone": "+8613800000902"}),
        )],
    );
    let incident = open_incident(&t, "boundary", &demo_facts());
    scope_merchants(&t, &incident, "b-zh");
    let drafted = t.run(&["--actor", "alice", "incidents", "draft", &incident]);
    if drafted.code != 0 {
        return Err(drafted.stderr);
    }
    let preview = t.run(&["--json", "notices", "preview", &incident, "b-zh"]).ok().json();
    Ok(preview["notices"][0]["sms_text"].as_str().expect("sms").to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sms_check_holds_at_exactly_one_segment() {
    let sms = zh_sms_with_base(None).expect("the default configuration fits one segment");
    let n = sms.chars().count();
    assert!(n <= 70, "{n}: {sms}");
    // Lengthen the link until the real SMS is exactly 70 characters: still one segment.
    let default_base = "http://127.0.0.1:8080".len();
    let base = |len: usize| format!("http://{}", "x".repeat(len - "http://".len()));
    let pad = 70 - n;
    assert_eq!(
        zh_sms_with_base(Some(&base(default_base + pad))).map(|s| s.chars().count()),
        Ok(70),
        "an SMS of exactly 70 UCS-2 characters is one segment"
    );
    // One character more is refused before anything is stored.
    let over = zh_sms_with_base(Some(&base(default_base + pad + 1))).expect_err("71 characters take two segments");
    assert!(
        over.contains("71 UCS-2 characters") && over.contains("2 segments"),
        "{over}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_notified_the_cohort_is_fixed_and_an_update_reclassifies_it_with_the_new_facts() {
    let t = Tocsin::new();
    import(
        &t,
        &[
            merchant_line(
                "c-1",
                "en",
                "SG",
                &["account_credentials", "postal_address"],
                json!({"email": "c1@example.com"}),
            ),
            merchant_line(
                "c-2",
                "en",
                "SG",
                &["account_credentials"],
                json!({"email": "c2@example.com"}),
            ),
        ],
    );
    let mut facts = demo_facts();
    facts["categories"] = json!(["account_credentials"]);
    let incident = open_incident(&t, "cohort", &facts);
    scope_merchants(&t, &incident, "c-1,c-2");
    draft_approve_dispatch(&t, &incident);
    let v1_link = t.run(&["--json", "notices", "preview", &incident, "c-1"]).ok().json()["notices"][0]["url"].clone();

    // The attacker also took shipping addresses: amend, and the update tells c-1 (who has one).
    facts["categories"] = json!(["account_credentials", "postal_address"]);
    let amended = t.file("more.json", &facts.to_string());
    t.run(&[
        "--actor",
        "alice",
        "incidents",
        "amend",
        &incident,
        "--facts",
        &amended,
        "--reason",
        "addresses too",
    ])
    .ok();
    t.run(&[
        "--actor",
        "alice",
        "incidents",
        "draft",
        &incident,
        "--changes-en",
        "Shipping addresses were also taken.",
        "--changes-zh",
        "收货地址也被窃取。",
    ])
    .ok();
    // With the update drafted, scoping again would still replace the merchants (and the links) the first version went to.
    let rescope = t.run(&[
        "--actor",
        "alice",
        "incidents",
        "scope",
        &incident,
        "--merchants",
        "c-1",
    ]);
    assert_ne!(rescope.code, 0);
    assert!(rescope.stderr.contains("cohort"), "{}", rescope.stderr);

    let v2 = t.run(&["--json", "notices", "preview", &incident, "c-1"]).ok().json();
    let text = v2["notices"][0]["email_text"].as_str().expect("text");
    let involved = text.split("What Information Was Involved").nth(1).expect("section");
    assert!(involved.to_lowercase().contains("address"), "{involved}");
    assert_eq!(v2["notices"][0]["url"], v1_link, "the merchant's link stays the same");
    let c2 = t.run(&["--json", "notices", "preview", &incident, "c-2"]).ok().json();
    let c2_text = c2["notices"][0]["email_text"].as_str().expect("text");
    assert!(
        !c2_text
            .split("What Information Was Involved")
            .nth(1)
            .expect("section")
            .to_lowercase()
            .contains("shipping")
    );
    // Version 1 still reads as it was sent.
    let v1 = t
        .run(&["--json", "notices", "preview", &incident, "c-1", "--version", "1"])
        .ok()
        .json();
    assert!(
        !v1["notices"][0]["email_text"]
            .as_str()
            .expect("text")
            .contains("Shipping addresses were also taken")
    );
    assert!(t.run(&["audit", "verify"]).ok().stdout.contains("intact"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_facts_before_approval_require_scoping_again_and_unknown_categories_are_refused() {
    let t = Tocsin::new();
    import(
        &t,
        &[merchant_line(
            "f-1",
            "en",
            "SG",
            &["account_credentials"],
            json!({"email": "f1@example.com"}),
        )],
    );
    let mut facts = demo_facts();
    let incident = open_incident(&t, "stale", &facts);
    let unknown = t.run(&[
        "--actor",
        "alice",
        "incidents",
        "scope",
        &incident,
        "--categories",
        "favourite_colour",
        "--dry-run",
    ]);
    assert_ne!(unknown.code, 0);
    assert!(
        unknown.stderr.contains("any_categories[0]") && unknown.stderr.contains("unknown data category"),
        "{}",
        unknown.stderr
    );
    scope_merchants(&t, &incident, "f-1");
    facts["mitigations"] = json!([{"id": "encrypted_uncompromised_key"}]);
    let amended = t.file("mitigated.json", &facts.to_string());
    t.run(&[
        "--actor",
        "alice",
        "incidents",
        "amend",
        &incident,
        "--facts",
        &amended,
        "--reason",
        "encrypted",
    ])
    .ok();
    let stale = t.run(&["--actor", "alice", "incidents", "draft", &incident]);
    assert_ne!(stale.code, 0);
    assert!(stale.stderr.contains("scope again"), "{}", stale.stderr);
    scope_merchants(&t, &incident, "f-1");
    // Now the classification follows the mitigation: listed, with its reasons, but skipped.
    let listed = t
        .run(&[
            "--json",
            "incidents",
            "affected",
            &incident,
            "--notice-required",
            "false",
        ])
        .ok()
        .json();
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
    assert_eq!(listed[0]["merchant_id"], "f-1");
    assert!(
        listed[0]["notice_reason"].as_str().is_some_and(|r| r.contains("57")),
        "{listed}"
    );
    assert!(
        listed[0]["risk_reasons"].as_array().is_some_and(|r| !r.is_empty()),
        "{listed}"
    );
    let required = t
        .run(&[
            "--json",
            "incidents",
            "affected",
            &incident,
            "--notice-required",
            "true",
        ])
        .ok()
        .json();
    assert_eq!(required, json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_corrects_a_classification_rule_without_a_rebuild() {
    let mut t = Tocsin::new();
    import(
        &t,
        &[merchant_line(
            "r-1",
            "en",
            "SG",
            &["phone_number"],
            json!({"email": "r1@example.com"}),
        )],
    );
    let incident = open_incident(&t, "rules", &demo_facts());
    let dry = |t: &Tocsin| {
        t.run(&[
            "--json",
            "--actor",
            "alice",
            "incidents",
            "scope",
            &incident,
            "--merchants",
            "r-1",
            "--dry-run",
        ])
        .ok()
        .json()
    };
    assert_eq!(dry(&t)["by_risk"], json!({"medium": 1}));
    // The operator decides a leaked phone number is high risk on this platform.
    let rules_dir = t.data_dir().join("rules");
    std::fs::create_dir_all(&rules_dir).expect("rules dir");
    let shipped = std::fs::read_to_string(repo("config/classification.toml")).expect("shipped rules");
    let corrected = shipped.replacen(
        "id = \"phone_number\"\nlevel = \"medium\"",
        "id = \"phone_number\"\nlevel = \"high\"",
        1,
    );
    assert_ne!(corrected, shipped, "the shipped file has the phone_number rule");
    std::fs::write(rules_dir.join("classification.toml"), corrected).expect("write rules");
    t.set("TOCSIN_PATHS__RULES", rules_dir.display().to_string());
    let high = dry(&t);
    assert_eq!(high["by_risk"], json!({"high": 1}), "{high}");
    // A broken rules file stops every command with the rule named, rather than running on guesses.
    std::fs::write(
        t.data_dir().join("rules").join("classification.toml"),
        "[[category]]\nid = \"favourite_colour\"\nlevel = \"high\"\nreason = \"x\"\n",
    )
    .expect("write rules");
    let broken = t.run(&["incidents", "list"]);
    assert_ne!(broken.code, 0);
    assert!(broken.stderr.contains("classification rules"), "{}", broken.stderr);
}
