//! Delivery through named providers, end to end through the `tocsin` binary: Twilio and Aliyun
//! SMS with their receipts (signed status callbacks, token-guarded delivery reports, the
//! receipt window), circuit breakers and failover between providers, rate and window limits,
//! `Retry-After`, permanent refusals, dead letters and their re-drive, and the channel plan.
//! Every peer is real and on loopback: wiremock for HTTP providers, the test SMTP server for
//! email, `tocsin serve` for the callbacks.

mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use common::smtp_server::{Reply, SmtpServer};
use common::*;
use serde_json::{Value, json};
use wiremock::matchers::{body_string_contains, method, path};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

const SECRET: &str = "delivery-test-signing-secret";
const ACCOUNT_SID: &str = "AC00000000000000000000000000000042";
const AUTH_TOKEN: &str = "twilio-auth-token-42";
const TWILIO_FROM: &str = "+15005550006";
const HOLDINGS: &[&str] = &["account_credentials"];

// ---------------------------------------------------------------------------------------------
// The incident up to approval, and reading back what happened.

/// Imports `merchants`, opens and confirms an incident, scopes it to exactly those merchants,
/// drafts it as alice and approves it as bob; returns the incident id.
fn approved_incident(t: &Tocsin, key: &str, merchants: &[String]) -> String {
    t.run(&[
        "merchants",
        "import",
        &t.file(&format!("m-{key}.jsonl"), &merchants.join("\n")),
    ])
    .ok();
    let incident = confirmed_incident(t, key);
    let ids: Vec<String> = merchants
        .iter()
        .map(|m| {
            serde_json::from_str::<Value>(m).expect("merchant JSON")["id"]
                .as_str()
                .expect("merchant id")
                .to_owned()
        })
        .collect();
    t.run(&[
        "--actor",
        "alice",
        "incidents",
        "scope",
        &incident,
        "--merchants",
        &ids.join(","),
    ])
    .ok();
    t.run(&["--actor", "alice", "incidents", "draft", &incident]).ok();
    t.run(&["--actor", "bob", "incidents", "approve", &incident]).ok();
    incident
}

/// `tocsin incidents dispatch` (queues and delivers until nothing is pending or `timeout`
/// seconds passed); returns the incident view.
fn dispatch(t: &Tocsin, incident: &str, timeout: u64) -> Value {
    t.run(&[
        "--json",
        "--actor",
        "alice",
        "incidents",
        "dispatch",
        incident,
        "--timeout",
        &timeout.to_string(),
    ])
    .ok()
    .json()
}

fn deliveries(t: &Tocsin, incident: &str) -> Vec<Value> {
    t.run(&["--json", "incidents", "deliveries", incident])
        .ok()
        .json()
        .as_array()
        .expect("a list of deliveries")
        .clone()
}

/// The one delivery of `merchant` on `channel`.
fn one(list: &[Value], merchant: &str, channel: &str) -> Value {
    let found: Vec<&Value> = list
        .iter()
        .filter(|d| d["merchant_id"] == merchant && d["channel"] == channel)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "exactly one {channel} delivery for {merchant}: {list:#?}"
    );
    found[0].clone()
}

fn view(t: &Tocsin, incident: &str) -> Value {
    t.run(&["--json", "incidents", "show", incident]).ok().json()
}

/// The affected-merchant record of `merchant` (reachability, reached channel, plan).
fn affected(t: &Tocsin, incident: &str, merchant: &str) -> Value {
    t.run(&["--json", "incidents", "affected", incident])
        .ok()
        .json()
        .as_array()
        .expect("list")
        .iter()
        .find(|a| a["merchant_id"] == merchant)
        .cloned()
        .unwrap_or_else(|| panic!("{merchant} is affected"))
}

/// A delivery's history as `event/outcome` with the attempt number, in order.
fn steps(events: &Value) -> Vec<(String, i64)> {
    let word = |e: &Value, k: &str| e[k].as_str().unwrap_or("-").to_owned();
    events
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|e| {
            let step = format!("{}/{}", word(e, "event"), word(e, "outcome"));
            (step, e["attempt"].as_i64().unwrap_or(0))
        })
        .collect()
}

fn history(t: &Tocsin, delivery: &Value) -> Value {
    let id = delivery["id"].as_str().expect("delivery id");
    t.run(&["--json", "deliveries", "history", id]).ok().json()
}

/// Polls the incident's deliveries until `check` finds what it wants.
async fn deliveries_until(t: &Tocsin, incident: &str, what: &str, check: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    eventually(Duration::from_secs(20), async || {
        let list = deliveries(t, incident);
        check(&list).then_some(list)
    })
    .await
    .unwrap_or_else(|| panic!("timed out waiting for {what}: {:#?}", deliveries(t, incident)))
}

// ---------------------------------------------------------------------------------------------
// Providers.

/// A Twilio provider `name` (upper-case in the variable names) sending to `base`.
fn twilio_provider(t: &mut Tocsin, name: &str, base: &str, status_callback: Option<&str>) {
    let p = format!("TOCSIN_PROVIDERS__{}", name.to_uppercase());
    t.set(&format!("{p}__KIND"), "twilio")
        .set(&format!("{p}__TWILIO__ACCOUNT_SID"), ACCOUNT_SID)
        .set(&format!("{p}__TWILIO__AUTH_TOKEN"), AUTH_TOKEN)
        .set(&format!("{p}__TWILIO__FROM"), TWILIO_FROM)
        .set(&format!("{p}__TWILIO__BASE_URL"), base);
    if let Some(url) = status_callback {
        t.set(&format!("{p}__TWILIO__STATUS_CALLBACK_URL"), url);
    }
}

/// A generic signed-webhook provider `name` posting to `url`.
fn webhook_provider(t: &mut Tocsin, name: &str, url: &str) {
    let p = format!("TOCSIN_PROVIDERS__{}", name.to_uppercase());
    t.set(&format!("{p}__KIND"), "webhook")
        .set(&format!("{p}__WEBHOOK__URL"), url)
        .set(&format!("{p}__WEBHOOK__SIGNING_SECRET"), SECRET);
}

fn twilio_messages_path() -> String {
    format!("/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json")
}

/// Twilio answers a create with 201 and the message's sid.
async fn twilio_accepting(sid: &str) -> MockServer {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(twilio_messages_path()))
        .respond_with(ResponseTemplate::new(201).set_body_json(json!({
            "sid": sid, "status": "queued", "account_sid": ACCOUNT_SID,
        })))
        .mount(&server)
        .await;
    server
}

/// A push gateway (the generic webhook) that accepts everything.
async fn push_accepting() -> MockServer {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"message_id": "push-ok"})))
        .mount(&server)
        .await;
    server
}

/// Twilio's request signature, computed here from Twilio's documented recipe (not Tocsin's
/// code): base64(HMAC-SHA1(auth token, URL + each POST parameter's name and value, sorted by
/// name)).
fn twilio_signature(token: &str, url: &str, params: &[(&str, &str)]) -> String {
    let mut sorted = params.to_vec();
    sorted.sort();
    let mut data = url.to_owned();
    for (name, value) in sorted {
        data.push_str(name);
        data.push_str(value);
    }
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, token.as_bytes());
    STANDARD.encode(ring::hmac::sign(&key, data.as_bytes()).as_ref())
}

/// Posts a Twilio status callback; returns the HTTP status and the body.
async fn post_twilio(url: &str, params: &[(&str, &str)], signature: Option<&str>) -> (u16, String) {
    let mut request = reqwest::Client::new().post(url).form(params);
    if let Some(sig) = signature {
        request = request.header("X-Twilio-Signature", sig);
    }
    let response = request.send().await.expect("callback request");
    let status = response.status().as_u16();
    (status, response.text().await.unwrap_or_default())
}

fn json_body(request: &Request) -> Value {
    serde_json::from_slice(&request.body).expect("a JSON body")
}

/// Records when each request arrived and for whom (`to` of the generic webhook's JSON).
#[derive(Clone, Default)]
struct Clock(Arc<Mutex<Vec<(Instant, String)>>>);

impl Clock {
    fn note(&self, request: &Request) -> String {
        let to = json_body(request)["to"].as_str().unwrap_or_default().to_owned();
        self.0.lock().expect("clock").push((Instant::now(), to.clone()));
        to
    }
    fn times(&self) -> Vec<Instant> {
        self.0.lock().expect("clock").iter().map(|(at, _)| *at).collect()
    }
    fn times_for(&self, to: &str) -> Vec<Instant> {
        self.0
            .lock()
            .expect("clock")
            .iter()
            .filter(|(_, t)| t == to)
            .map(|(at, _)| *at)
            .collect()
    }
}

/// Accepts every request and notes when it came.
struct AcceptAndNote(Clock);

impl Respond for AcceptAndNote {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        self.0.note(request);
        ResponseTemplate::new(200).set_body_json(json!({"id": "sms-ok"}))
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Twilio: accepted, then delivered by a signed status callback.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twilio_sms_is_accepted_then_delivered_by_a_signed_status_callback_and_a_forged_one_is_refused() {
    tocsin::install_crypto_provider();
    // First, this test's recipe against the example in Twilio's security documentation, so the
    // signatures below are Twilio's and not merely Tocsin's own.
    let doc_params = [
        ("CallSid", "CA1234567890ABCDE"),
        ("Caller", "+12349013030"),
        ("Digits", "1234"),
        ("From", "+12349013030"),
        ("To", "+18005551212"),
    ];
    assert_eq!(
        twilio_signature("12345", "https://mycompany.com/myapp.php?foo=1&bar=2", &doc_params),
        "0/KCTR6DLpKmkAf8muzZqo1nDgQ="
    );

    const SID: &str = "SM0000000000000000000000000000aa01";
    let twilio = twilio_accepting(SID).await;
    let port = free_port();
    let callback = format!("http://127.0.0.1:{port}/hooks/twilio/tw");
    let mut t = Tocsin::new();
    twilio_provider(&mut t, "tw", &twilio.uri(), Some(&callback));
    t.set("TOCSIN_SMS__PROVIDERS", "tw")
        .set("TOCSIN_DELIVERY__SWEEP_SCHEDULE", "* * * * * *");
    let phone = "+8613800000101";
    let incident = approved_incident(
        &t,
        "twilio-ok",
        &[merchant("tw-1", "en", None, Some(phone), None, HOLDINGS)],
    );

    let after = dispatch(&t, &incident, 30);
    assert_eq!(
        after["reached"], 0,
        "accepted is not reached while its receipt is awaited"
    );
    assert_eq!(after["incident"]["state"], "notifying", "a receipt is still awaited");
    let sms = one(&deliveries(&t, &incident), "tw-1", "sms");
    assert_eq!(sms["status"], "accepted", "{sms:#}");
    assert_eq!(sms["provider"], "tw");
    assert_eq!(sms["provider_message_id"], SID);
    assert!(sms["receipt_due_at"].is_string(), "{sms:#}");

    // What Twilio received: its Messages create, authenticated, asking for status callbacks.
    let requests = twilio.received_requests().await.expect("recorded");
    assert_eq!(requests.len(), 1);
    let auth = requests[0]
        .headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .expect("basic auth");
    assert_eq!(
        auth,
        format!("Basic {}", STANDARD.encode(format!("{ACCOUNT_SID}:{AUTH_TOKEN}")))
    );
    let form = form_of(&requests[0]);
    assert_eq!(form_value(&form, "To"), Some(phone));
    assert_eq!(form_value(&form, "From"), Some(TWILIO_FROM));
    assert_eq!(form_value(&form, "StatusCallback"), Some(callback.as_str()));
    assert!(form_value(&form, "Body").is_some_and(|b| !b.is_empty()));

    let server = t.serve_at(&format!("127.0.0.1:{port}"));
    assert_eq!(server.base, format!("http://127.0.0.1:{port}"));
    let delivered = [
        ("AccountSid", ACCOUNT_SID),
        ("MessageSid", SID),
        ("MessageStatus", "delivered"),
        ("SmsStatus", "delivered"),
        ("To", phone),
        ("From", TWILIO_FROM),
    ];

    // Forgeries change nothing: no signature, the wrong key, another URL, altered parameters.
    let undelivered = [
        ("AccountSid", ACCOUNT_SID),
        ("MessageSid", SID),
        ("MessageStatus", "undelivered"),
        ("SmsStatus", "undelivered"),
        ("To", phone),
        ("From", TWILIO_FROM),
    ];
    let forgeries = [
        ("no signature", None),
        (
            "wrong key",
            Some(twilio_signature("not-the-auth-token", &callback, &delivered)),
        ),
        (
            "another URL",
            Some(twilio_signature(
                AUTH_TOKEN,
                "http://127.0.0.1:1/hooks/twilio/tw",
                &delivered,
            )),
        ),
        (
            "signature of other parameters",
            Some(twilio_signature(AUTH_TOKEN, &callback, &undelivered)),
        ),
        ("garbage", Some("not base64 at all!".to_owned())),
    ];
    for (what, signature) in &forgeries {
        let (status, body) = post_twilio(&callback, &delivered, signature.as_deref()).await;
        assert_eq!(status, 403, "{what}: {body}");
        assert!(body.contains("X-Twilio-Signature"), "{what}: {body}");
    }
    let sms = one(&deliveries(&t, &incident), "tw-1", "sms");
    assert_eq!(sms["status"], "accepted", "forged callbacks changed nothing");
    assert_eq!(affected(&t, &incident, "tw-1")["reachability"], "pending");

    // A progress callback ("sent") is recorded and changes nothing either.
    let sent = [
        ("AccountSid", ACCOUNT_SID),
        ("MessageSid", SID),
        ("MessageStatus", "sent"),
    ];
    let (status, _) = post_twilio(&callback, &sent, Some(&twilio_signature(AUTH_TOKEN, &callback, &sent))).await;
    assert_eq!(status, 204);
    assert_eq!(one(&deliveries(&t, &incident), "tw-1", "sms")["status"], "accepted");

    // The genuine callback.
    let (status, body) = post_twilio(
        &callback,
        &delivered,
        Some(&twilio_signature(AUTH_TOKEN, &callback, &delivered)),
    )
    .await;
    assert_eq!(status, 204, "{body}");
    let sms = one(&deliveries(&t, &incident), "tw-1", "sms");
    assert_eq!(sms["status"], "delivered", "{sms:#}");
    assert!(sms["delivered_at"].is_string());
    let a = affected(&t, &incident, "tw-1");
    assert_eq!(a["reachability"], "reached", "{a:#}");
    assert_eq!(a["reached_channel"], "sms");
    let events = history(&t, &sms)["events"].clone();
    assert!(
        events
            .as_array()
            .expect("events")
            .iter()
            .any(|e| e["event"] == "receipt" && e["outcome"] == "delivered"),
        "{events:#}"
    );
    let steps: Vec<String> = steps(&events).into_iter().map(|(s, _)| s).collect();
    assert_eq!(
        steps.first().map(String::as_str),
        Some("attempt/accepted"),
        "{events:#}"
    );
    assert_eq!(
        steps.last().map(String::as_str),
        Some("receipt/delivered"),
        "{events:#}"
    );

    // With its receipt in, the incident settles.
    let settled = eventually(Duration::from_secs(10), async || {
        let v = view(&t, &incident);
        (v["incident"]["state"] == "monitoring").then_some(v)
    })
    .await
    .expect("the incident settles into monitoring once the receipt is in");
    assert_eq!(settled["reached"], 1);
    assert_eq!(settled["unreachable"], json!([]));
    assert_eq!(
        twilio.received_requests().await.expect("recorded").len(),
        1,
        "sent once"
    );
}

// ---------------------------------------------------------------------------------------------
// 2. Twilio: an `undelivered` callback moves the merchant on.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_undelivered_receipt_moves_the_merchant_to_the_next_channel() {
    tocsin::install_crypto_provider();
    const SID: &str = "SM0000000000000000000000000000bb02";
    let twilio = twilio_accepting(SID).await;
    let push = push_accepting().await;
    let port = free_port();
    let callback = format!("http://127.0.0.1:{port}/hooks/twilio/tw");
    let mut t = Tocsin::new();
    twilio_provider(&mut t, "tw", &twilio.uri(), Some(&callback));
    t.set("TOCSIN_SMS__PROVIDERS", "tw")
        .webhook("push", &format!("{}/push", push.uri()), SECRET);
    let token = "push-token-und-0001";
    let incident = approved_incident(
        &t,
        "twilio-undelivered",
        &[merchant(
            "tu-1",
            "en",
            None,
            Some("+8613800000102"),
            Some(token),
            HOLDINGS,
        )],
    );
    dispatch(&t, &incident, 30);
    assert_eq!(one(&deliveries(&t, &incident), "tu-1", "sms")["status"], "accepted");
    assert!(
        push.received_requests().await.expect("recorded").is_empty(),
        "nothing on push while the SMS may still arrive"
    );

    let _server = t.serve_at(&format!("127.0.0.1:{port}"));
    let undelivered = [
        ("AccountSid", ACCOUNT_SID),
        ("MessageSid", SID),
        ("MessageStatus", "undelivered"),
        ("ErrorCode", "30003"),
        ("To", "+8613800000102"),
    ];
    let signature = twilio_signature(AUTH_TOKEN, &callback, &undelivered);
    let (status, body) = post_twilio(&callback, &undelivered, Some(&signature)).await;
    assert_eq!(status, 204, "{body}");

    let list = deliveries_until(&t, &incident, "the push fallback accepted", |l| {
        l.iter().any(|d| d["channel"] == "push" && d["status"] == "accepted")
    })
    .await;
    let sms = one(&list, "tu-1", "sms");
    assert_eq!(sms["status"], "failed", "{sms:#}");
    assert_eq!(sms["error_kind"], "undelivered");
    assert_eq!(sms["error_class"], "permanent");
    let pushed = one(&list, "tu-1", "push");
    assert_eq!(pushed["provider_message_id"], "push-ok");
    let events = history(&t, &sms)["events"].clone();
    assert!(
        events
            .as_array()
            .expect("events")
            .iter()
            .any(|e| e["event"] == "receipt"
                && e["outcome"] == "failed"
                && e["detail"].as_str().is_some_and(|d| d.contains("30003"))),
        "the receipt and Twilio's error code are in the history: {events:#}"
    );

    // Twilio retries its callbacks: the same one again starts no second fallback.
    let (status, _) = post_twilio(&callback, &undelivered, Some(&signature)).await;
    assert_eq!(status, 204);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let list = deliveries(&t, &incident);
    assert_eq!(list.len(), 2, "{list:#?}");
    let requests = push.received_requests().await.expect("recorded");
    assert_eq!(requests.len(), 1);
    assert_eq!(json_body(&requests[0])["to"], token);
    let a = affected(&t, &incident, "tu-1");
    assert_eq!(
        (a["reachability"].as_str(), a["reached_channel"].as_str()),
        (Some("reached"), Some("push"))
    );
}

// ---------------------------------------------------------------------------------------------
// 3. The receipt window closes without a receipt.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_receipt_within_the_window_moves_the_merchant_on() {
    tocsin::install_crypto_provider();
    const SID: &str = "SM0000000000000000000000000000cc03";
    let twilio = twilio_accepting(SID).await;
    let push = push_accepting().await;
    let port = free_port();
    let callback = format!("http://127.0.0.1:{port}/hooks/twilio/tw");
    let mut t = Tocsin::new();
    twilio_provider(&mut t, "tw", &twilio.uri(), Some(&callback));
    t.set("TOCSIN_SMS__PROVIDERS", "tw")
        .set("TOCSIN_SMS__RECEIPT_TIMEOUT_SECONDS", "1")
        .set("TOCSIN_DELIVERY__SWEEP_SCHEDULE", "* * * * * *")
        .webhook("push", &format!("{}/push", push.uri()), SECRET);
    let incident = approved_incident(
        &t,
        "twilio-silent",
        &[merchant(
            "ts-1",
            "en",
            None,
            Some("+8613800000103"),
            Some("push-token-silent-01"),
            HOLDINGS,
        )],
    );
    let started = Instant::now();
    dispatch(&t, &incident, 30);
    let sms = one(&deliveries(&t, &incident), "ts-1", "sms");
    assert_eq!(sms["status"], "accepted");

    // No callback ever comes; the running server's worker closes the window.
    let _server = t.serve_at(&format!("127.0.0.1:{port}"));
    let list = deliveries_until(&t, &incident, "the push fallback accepted", |l| {
        l.iter().any(|d| d["channel"] == "push" && d["status"] == "accepted")
    })
    .await;
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "not before the window closed"
    );
    let sms = one(&list, "ts-1", "sms");
    assert_eq!(sms["status"], "failed", "{sms:#}");
    assert_eq!(sms["error_kind"], "no_receipt");
    assert_eq!(sms["error_class"], "permanent");
    assert!(
        history(&t, &sms)["events"]
            .as_array()
            .expect("events")
            .iter()
            .any(|e| e["event"] == "receipt_timeout"),
        "the history says the window closed"
    );
    assert_eq!(push.received_requests().await.expect("recorded").len(), 1);
    let settled = eventually(Duration::from_secs(10), async || {
        let v = view(&t, &incident);
        (v["incident"]["state"] == "monitoring").then_some(v)
    })
    .await
    .expect("the incident settles");
    assert_eq!(settled["reached"], 1);
    assert_eq!(affected(&t, &incident, "ts-1")["reached_channel"], "push");
    assert_eq!(
        twilio.received_requests().await.expect("recorded").len(),
        1,
        "the SMS is not sent again"
    );
}

// ---------------------------------------------------------------------------------------------
// 4. Aliyun: delivery reports by token.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn aliyun_reports_confirm_delivery_and_need_the_token() {
    tocsin::install_crypto_provider();
    const KEY_SECRET: &str = "aliyun-access-key-secret";
    const REPORT_TOKEN: &str = "aliyun-report-token-7";
    let aliyun = MockServer::start().await;
    for (number, biz) in [("8613800000201", "BIZ201^0"), ("8613800000202", "BIZ202^0")] {
        Mock::given(method("POST"))
            .and(path("/"))
            .and(body_string_contains(format!("PhoneNumbers={number}")))
            .respond_with(ResponseTemplate::new(200).set_body_json(json!({
                "Code": "OK", "Message": "OK", "BizId": biz, "RequestId": "F655A8D5-B967-440B-8683-DAD6FF8DE990",
            })))
            .mount(&aliyun)
            .await;
    }
    let push = push_accepting().await;
    let port = free_port();
    let mut t = Tocsin::new();
    t.set("TOCSIN_PROVIDERS__ALI__KIND", "aliyun_sms")
        .set("TOCSIN_PROVIDERS__ALI__ALIYUN_SMS__ACCESS_KEY_ID", "LTAI5tTestKeyId")
        .set("TOCSIN_PROVIDERS__ALI__ALIYUN_SMS__ACCESS_KEY_SECRET", KEY_SECRET)
        .set("TOCSIN_PROVIDERS__ALI__ALIYUN_SMS__SIGN_NAME", "示例商城")
        .set("TOCSIN_PROVIDERS__ALI__ALIYUN_SMS__TEMPLATE_CODE", "SMS_000001")
        .set("TOCSIN_PROVIDERS__ALI__ALIYUN_SMS__TEMPLATE_CODE_EN", "SMS_000002")
        .set("TOCSIN_PROVIDERS__ALI__ALIYUN_SMS__REPORT_TOKEN", REPORT_TOKEN)
        .set("TOCSIN_PROVIDERS__ALI__ALIYUN_SMS__BASE_URL", aliyun.uri())
        .set("TOCSIN_SMS__PROVIDERS", "ali")
        .webhook("push", &format!("{}/push", push.uri()), SECRET);
    let incident = approved_incident(
        &t,
        "aliyun",
        &[
            merchant(
                "al-1",
                "zh-CN",
                None,
                Some("+8613800000201"),
                Some("push-token-al-1"),
                HOLDINGS,
            ),
            merchant(
                "al-2",
                "en",
                None,
                Some("+8613800000202"),
                Some("push-token-al-2"),
                HOLDINGS,
            ),
        ],
    );
    let after = dispatch(&t, &incident, 30);
    assert_eq!(after["reached"], 0, "Aliyun reports delivery: accepted is not reached");
    let list = deliveries(&t, &incident);
    let (s1, s2) = (one(&list, "al-1", "sms"), one(&list, "al-2", "sms"));
    for (d, biz) in [(&s1, "BIZ201^0"), (&s2, "BIZ202^0")] {
        assert_eq!(d["status"], "accepted", "{d:#}");
        assert_eq!(d["provider"], "ali");
        assert_eq!(d["provider_message_id"], biz);
    }

    // What Aliyun received: SendSms, signed, our delivery id as OutId, the number without '+'.
    let requests = aliyun.received_requests().await.expect("recorded");
    assert_eq!(requests.len(), 2);
    for r in &requests {
        let form = form_of(r);
        let params: std::collections::BTreeMap<String, String> = form.iter().cloned().collect();
        assert_eq!(params.get("Action").map(String::as_str), Some("SendSms"));
        let signature = params.get("Signature").expect("signed").clone();
        assert_eq!(
            tocsin::channels::aliyun::sign("POST", &params, KEY_SECRET),
            signature,
            "the signature covers what was sent"
        );
        let (merchant_id, template) = match params.get("PhoneNumbers").map(String::as_str) {
            Some("8613800000201") => ("al-1", "SMS_000001"),
            Some("8613800000202") => ("al-2", "SMS_000002"),
            other => panic!("unexpected PhoneNumbers {other:?}"),
        };
        assert_eq!(params.get("TemplateCode").map(String::as_str), Some(template));
        assert_eq!(
            params.get("OutId").map(String::as_str),
            one(&list, merchant_id, "sms")["id"].as_str()
        );
        let template_param: Value =
            serde_json::from_str(params.get("TemplateParam").expect("template param")).expect("JSON");
        assert!(template_param["url"].as_str().is_some_and(|u| u.contains("/n/")));
    }

    let server = t.serve_at(&format!("127.0.0.1:{port}"));
    let hook = format!("{}/hooks/aliyun/ali", server.base);
    let report = json!([
        {
            "phone_number": "8613800000201", "send_time": "2026-12-01 10:00:00",
            "report_time": "2026-12-01 10:00:04", "success": true, "err_code": "DELIVERED",
            "err_msg": "用户接收成功", "sms_size": "1", "biz_id": "BIZ201^0", "out_id": s1["id"],
        },
        {
            "phone_number": "8613800000202", "send_time": "2026-12-01 10:00:00",
            "report_time": "2026-12-01 10:00:06", "success": false, "err_code": "MK:0001",
            "err_msg": "号码停机", "sms_size": "1", "biz_id": "BIZ202^0",
        }
    ]);
    let client = reqwest::Client::new();
    for url in [hook.clone(), format!("{hook}?token=wrong"), format!("{hook}?token=")] {
        let r = client.post(&url).json(&report).send().await.expect("post");
        assert_eq!(r.status().as_u16(), 403, "{url}");
    }
    // Another provider's name (or a Twilio one) is not an Aliyun endpoint.
    let r = client
        .post(format!("{}/hooks/aliyun/nope?token={REPORT_TOKEN}", server.base))
        .json(&report)
        .send()
        .await
        .expect("post");
    assert_eq!(r.status().as_u16(), 404);
    let list = deliveries(&t, &incident);
    assert_eq!(
        one(&list, "al-1", "sms")["status"],
        "accepted",
        "refused reports change nothing"
    );
    assert_eq!(one(&list, "al-2", "sms")["status"], "accepted");

    let r = client
        .post(format!("{hook}?token={REPORT_TOKEN}"))
        .json(&report)
        .send()
        .await
        .expect("post");
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(
        r.json::<Value>().await.expect("JSON"),
        json!({"code": 0, "msg": "成功"})
    );

    let list = deliveries_until(&t, &incident, "al-2's push fallback accepted", |l| {
        l.iter()
            .any(|d| d["merchant_id"] == "al-2" && d["channel"] == "push" && d["status"] == "accepted")
    })
    .await;
    // al-1: matched by out_id, delivered. al-2: matched by biz_id, undelivered, moved on.
    assert_eq!(one(&list, "al-1", "sms")["status"], "delivered");
    assert!(
        !list
            .iter()
            .any(|d| d["merchant_id"] == "al-1" && d["channel"] == "push"),
        "al-1 was reached by SMS: {list:#?}"
    );
    let s2 = one(&list, "al-2", "sms");
    assert_eq!(s2["status"], "failed");
    assert_eq!(s2["error_kind"], "undelivered");
    assert_eq!(affected(&t, &incident, "al-1")["reached_channel"], "sms");
    assert_eq!(affected(&t, &incident, "al-2")["reached_channel"], "push");
    let pushes = push.received_requests().await.expect("recorded");
    assert_eq!(pushes.len(), 1);
    assert_eq!(json_body(&pushes[0])["to"], "push-token-al-2");
}

// ---------------------------------------------------------------------------------------------
// 5. Circuit breaker and failover between providers.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_provider_is_skipped_by_its_circuit_breaker_and_the_next_one_is_used() {
    let a = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(503))
        .mount(&a)
        .await;
    let b = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"id": "from-b"})))
        .mount(&b)
        .await;
    let mut t = Tocsin::new();
    webhook_provider(&mut t, "a", &format!("{}/sms", a.uri()));
    webhook_provider(&mut t, "b", &format!("{}/sms", b.uri()));
    t.set("TOCSIN_SMS__PROVIDERS", "a,b")
        .set("TOCSIN_PROVIDERS__A__BREAKER__FAILURE_THRESHOLD", "2")
        .set("TOCSIN_PROVIDERS__A__BREAKER__COOLDOWN_SECONDS", "600")
        // One send per round, so the breaker's effect is exact.
        .set("TOCSIN_DELIVERY__CONCURRENCY", "1");
    let merchants: Vec<String> = (1..=5)
        .map(|i| {
            merchant(
                &format!("cb-{i}"),
                "en",
                None,
                Some(&format!("+86138000003{i:02}")),
                None,
                HOLDINGS,
            )
        })
        .collect();
    let incident = approved_incident(&t, "breaker", &merchants);
    let after = dispatch(&t, &incident, 60);
    assert_eq!(after["reached"], 5, "{after:#}");

    let to_a = a.received_requests().await.expect("recorded");
    let to_b = b.received_requests().await.expect("recorded");
    assert_eq!(to_a.len(), 2, "a is tried until its breaker opens, then skipped");
    assert_eq!(to_b.len(), 5, "every merchant went out through b");
    let list = deliveries(&t, &incident);
    assert_eq!(list.len(), 5);
    for d in &list {
        assert_eq!(d["status"], "accepted", "{d:#}");
        assert_eq!(d["provider"], "b", "{d:#}");
        assert_eq!(d["provider_message_id"], "from-b");
    }
    // The two that met a's failure were retried on b, and the history shows both providers.
    let retried: Vec<&Value> = list.iter().filter(|d| d["attempts"] == 2).collect();
    assert_eq!(retried.len(), 2, "{list:#?}");
    for d in retried {
        let events = history(&t, d)["events"].clone();
        let providers: Vec<(&str, &str)> = events
            .as_array()
            .expect("events")
            .iter()
            .filter(|e| e["event"] == "attempt")
            .map(|e| {
                (
                    e["provider"].as_str().unwrap_or("-"),
                    e["outcome"].as_str().unwrap_or("-"),
                )
            })
            .collect();
        assert_eq!(providers, [("a", "retry"), ("b", "accepted")], "{events:#}");
    }

    let providers = t.run(&["--json", "deliveries", "providers"]).ok().json();
    let status = |name: &str| {
        providers
            .as_array()
            .expect("list")
            .iter()
            .find(|p| p["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("provider {name} listed: {providers:#}"))
    };
    let (pa, pb) = (status("a"), status("b"));
    assert_eq!(pa["channel"], "sms");
    assert_eq!((pa["position"].as_u64(), pb["position"].as_u64()), (Some(1), Some(2)));
    assert_eq!(pa["breaker"], "open", "{pa:#}");
    assert_eq!(pa["consecutive_failures"], 2);
    assert_eq!(pa["last_error_kind"], "provider_error");
    assert!(pa["open_until"].is_string());
    assert_eq!(pb["breaker"], "closed", "{pb:#}");
    assert_eq!(pb["consecutive_failures"], 0);
}

// ---------------------------------------------------------------------------------------------
// 6. Rate and window limits.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rate_limits_hold_deliveries_back() {
    // A token bucket: 5 per second, bursts of 5.
    let clock = Clock::default();
    let gateway = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(AcceptAndNote(clock.clone()))
        .mount(&gateway)
        .await;
    let mut t = Tocsin::new();
    webhook_provider(&mut t, "r", &format!("{}/sms", gateway.uri()));
    t.set("TOCSIN_SMS__PROVIDERS", "r")
        .set("TOCSIN_PROVIDERS__R__LIMITS__RATE_PER_SECOND", "5")
        .set("TOCSIN_PROVIDERS__R__LIMITS__BURST", "5");
    let merchants: Vec<String> = (1..=20)
        .map(|i| {
            merchant(
                &format!("rl-{i:02}"),
                "en",
                None,
                Some(&format!("+86138000004{i:02}")),
                None,
                HOLDINGS,
            )
        })
        .collect();
    let incident = approved_incident(&t, "rate", &merchants);
    let after = dispatch(&t, &incident, 60);
    assert_eq!(after["reached"], 20, "{after:#}");
    let mut times = clock.times();
    times.sort();
    assert_eq!(times.len(), 20, "each merchant once");
    for (i, start) in times.iter().enumerate() {
        let in_window = times[i..]
            .iter()
            .take_while(|t| t.duration_since(*start) < Duration::from_secs(1))
            .count();
        assert!(
            in_window <= 10,
            "{in_window} sends within one second from send #{i}: more than burst 5 + rate 5"
        );
    }
    let spread = times[19].duration_since(times[0]);
    assert!(
        spread >= Duration::from_millis(2500),
        "15 sends beyond the burst at 5/s take about 3 s, took {spread:?}"
    );

    // A sliding window: at most 3 per 60 seconds; the rest wait.
    let gateway = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"id": "w"})))
        .mount(&gateway)
        .await;
    let mut t = Tocsin::new();
    webhook_provider(&mut t, "w", &format!("{}/sms", gateway.uri()));
    t.set("TOCSIN_SMS__PROVIDERS", "w")
        .set("TOCSIN_PROVIDERS__W__LIMITS__WINDOW_SECONDS", "60")
        .set("TOCSIN_PROVIDERS__W__LIMITS__WINDOW_MAX", "3");
    let merchants: Vec<String> = (1..=6)
        .map(|i| {
            merchant(
                &format!("wl-{i}"),
                "en",
                None,
                Some(&format!("+86138000005{i:02}")),
                None,
                HOLDINGS,
            )
        })
        .collect();
    let incident = approved_incident(&t, "window", &merchants);
    let after = dispatch(&t, &incident, 3);
    assert_eq!(after["incident"]["state"], "notifying", "three still wait");
    assert_eq!(gateway.received_requests().await.expect("recorded").len(), 3);
    let list = deliveries(&t, &incident);
    let count = |status: &str| list.iter().filter(|d| d["status"] == status).count();
    assert_eq!((count("accepted"), count("pending")), (3, 3), "{list:#?}");
    for d in list.iter().filter(|d| d["status"] == "pending") {
        assert_eq!(d["attempts"], 0, "held back, not failed: {d:#}");
    }
}

// ---------------------------------------------------------------------------------------------
// 7. Retry-After, and permanent refusals.

/// 429 with `Retry-After: 2` once for one number, then 200; 400 for another.
struct ThrottleThenAccept {
    clock: Clock,
    throttled: AtomicU32,
}

impl Respond for ThrottleThenAccept {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let to = self.clock.note(request);
        match to.as_str() {
            "+8613800000601" if self.throttled.fetch_add(1, Ordering::SeqCst) == 0 => ResponseTemplate::new(429)
                .insert_header("Retry-After", "2")
                .set_body_json(json!({"error": "slow down"})),
            "+8613800000602" => ResponseTemplate::new(400).set_body_json(json!({"error": "invalid number"})),
            _ => ResponseTemplate::new(200).set_body_json(json!({"id": "sms-ok"})),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retry_after_is_honoured_and_permanent_errors_are_not_retried() {
    let clock = Clock::default();
    let sms = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ThrottleThenAccept {
            clock: clock.clone(),
            throttled: AtomicU32::new(0),
        })
        .mount(&sms)
        .await;
    let push = push_accepting().await;
    let mut t = Tocsin::new();
    t.webhook("sms", &format!("{}/sms", sms.uri()), SECRET)
        .webhook("push", &format!("{}/push", push.uri()), SECRET);
    let incident = approved_incident(
        &t,
        "retry-after",
        &[
            merchant("ra-1", "en", None, Some("+8613800000601"), None, HOLDINGS),
            merchant(
                "rb-1",
                "en",
                None,
                Some("+8613800000602"),
                Some("push-token-rb-1"),
                HOLDINGS,
            ),
        ],
    );
    let after = dispatch(&t, &incident, 30);
    assert_eq!(after["reached"], 2, "{after:#}");

    let throttled = clock.times_for("+8613800000601");
    assert_eq!(throttled.len(), 2, "429, then accepted");
    let gap = throttled[1].duration_since(throttled[0]);
    assert!(
        gap >= Duration::from_secs(2),
        "Retry-After: 2 honoured, retried after {gap:?}"
    );
    let list = deliveries(&t, &incident);
    let ra = one(&list, "ra-1", "sms");
    assert_eq!(
        (ra["status"].as_str(), ra["attempts"].as_i64()),
        (Some("accepted"), Some(2))
    );
    let events = history(&t, &ra)["events"].clone();
    assert!(
        events
            .as_array()
            .expect("events")
            .iter()
            .any(|e| e["outcome"] == "retry" && e["error_kind"] == "throttled"),
        "{events:#}"
    );
    // The whole history in order: the throttled attempt, then the accepting one.
    let steps = steps(&events);
    assert_eq!(
        steps,
        [("attempt/retry".to_owned(), 1), ("attempt/accepted".to_owned(), 2)],
        "{events:#}"
    );

    assert_eq!(
        clock.times_for("+8613800000602").len(),
        1,
        "a 400 is sent once and not retried"
    );
    let rb = one(&list, "rb-1", "sms");
    assert_eq!(rb["status"], "failed", "{rb:#}");
    assert_eq!(rb["attempts"], 1);
    assert_eq!(rb["error_class"], "permanent");
    assert_eq!(rb["error_kind"], "rejected");
    let pushed = one(&list, "rb-1", "push");
    assert_eq!(pushed["status"], "accepted", "the refusal moved rb-1 to push");
    assert_eq!(push.received_requests().await.expect("recorded").len(), 1);
    assert_eq!(affected(&t, &incident, "rb-1")["reached_channel"], "push");
}

// ---------------------------------------------------------------------------------------------
// 8. Dead letters and their re-drive.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dead_letters_are_redriven_by_filter() {
    let gw = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(503))
        .mount(&gw)
        .await;
    let mut t = Tocsin::new();
    webhook_provider(&mut t, "gw", &format!("{}/sms", gw.uri()));
    t.set("TOCSIN_SMS__PROVIDERS", "gw")
        .set("TOCSIN_DELIVERY__MAX_ATTEMPTS", "2");
    let incident = approved_incident(
        &t,
        "dead",
        &[merchant("dl-1", "en", None, Some("+8613800000701"), None, HOLDINGS)],
    );
    let after = dispatch(&t, &incident, 30);
    assert_eq!(after["unreachable"], json!(["dl-1"]), "{after:#}");
    assert_eq!(gw.received_requests().await.expect("recorded").len(), 2, "max_attempts");
    let sms = one(&deliveries(&t, &incident), "dl-1", "sms");
    assert_eq!(sms["status"], "dead", "{sms:#}");
    assert_eq!(sms["error_class"], "transient");
    assert_eq!(sms["error_kind"], "provider_error");

    let dead = t.run(&["--json", "deliveries", "dead"]).ok().json();
    assert_eq!(dead.as_array().map(Vec::len), Some(1), "{dead:#}");
    assert_eq!(dead[0]["id"], sms["id"]);
    assert_eq!(dead[0]["provider"], "gw");
    let filtered = t
        .run(&[
            "--json",
            "deliveries",
            "dead",
            "--incident",
            &incident,
            "--error-class",
            "provider_error",
        ])
        .ok()
        .json();
    assert_eq!(filtered.as_array().map(Vec::len), Some(1));

    // Filters that match nothing re-drive nothing.
    for filter in [
        &["--channel", "email"][..],
        &["--provider", "email"],
        &["--error-class", "permanent"],
        &["--provider", "gw", "--channel", "push"],
    ] {
        let mut args = vec!["--json", "--actor", "carol", "deliveries", "redrive"];
        args.extend_from_slice(filter);
        let r = t.run(&args).ok().json();
        assert_eq!(r["redriven"], 0, "{filter:?}");
    }
    assert_eq!(one(&deliveries(&t, &incident), "dl-1", "sms")["status"], "dead");
    // An unknown provider or class is refused, not taken as "no match".
    let unknown = t.run(&["--actor", "carol", "deliveries", "redrive", "--provider", "nope"]);
    assert_ne!(unknown.code, 0);
    assert!(unknown.stderr.contains("nope"), "{}", unknown.stderr);
    let unknown = t.run(&["--actor", "carol", "deliveries", "redrive", "--error-class", "flaky"]);
    assert_ne!(unknown.code, 0);

    // The gateway recovers; the matching re-drive puts the letter back and it goes out.
    gw.reset().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"id": "after-redrive"})))
        .mount(&gw)
        .await;
    let r = t
        .run(&[
            "--json",
            "--actor",
            "carol",
            "deliveries",
            "redrive",
            "--provider",
            "gw",
            "--error-class",
            "transient",
        ])
        .ok()
        .json();
    assert_eq!(r["redriven"], 1);
    let pending = one(&deliveries(&t, &incident), "dl-1", "sms");
    assert_eq!(
        (pending["status"].as_str(), pending["attempts"].as_i64()),
        (Some("pending"), Some(0))
    );
    let again = t
        .run(&["--json", "--actor", "carol", "deliveries", "redrive"])
        .ok()
        .json();
    assert_eq!(again["redriven"], 0, "nothing dead is left to re-drive");

    let after = dispatch(&t, &incident, 30);
    let sms = one(&deliveries(&t, &incident), "dl-1", "sms");
    assert_eq!(sms["status"], "accepted", "{sms:#}");
    assert_eq!(sms["provider_message_id"], "after-redrive");
    assert_eq!(after["reached"], 1, "{after:#}");
    assert_eq!(after["unreachable"], json!([]));
    assert_eq!(gw.received_requests().await.expect("recorded").len(), 1);
    let dead = t.run(&["--json", "deliveries", "dead"]).ok().json();
    assert_eq!(dead, json!([]));

    let h = history(&t, &sms);
    let steps: Vec<(String, String)> = h["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| {
            (
                e["event"].as_str().unwrap_or("-").to_owned(),
                e["outcome"].as_str().unwrap_or("-").to_owned(),
            )
        })
        .collect();
    let expected = [
        ("attempt", "retry"),
        ("attempt", "dead"),
        ("redrive", "pending"),
        ("attempt", "accepted"),
    ]
    .map(|(a, b)| (a.to_owned(), b.to_owned()));
    assert_eq!(steps, expected, "{h:#}");
    let redrive = h["events"]
        .as_array()
        .expect("events")
        .iter()
        .find(|e| e["event"] == "redrive")
        .cloned()
        .expect("redrive event");
    assert_eq!(redrive["detail"], "carol", "the re-drive names who did it");
    t.run(&["audit", "verify"]).ok();
}

// ---------------------------------------------------------------------------------------------
// 9. The channel plan.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fallback_follows_the_plan_and_never_repeats_a_channel() {
    let smtp = SmtpServer::start().await;
    let rcpt_tries = Arc::new(AtomicU32::new(0));
    let tries = rcpt_tries.clone();
    smtp.set_rcpt_policy(move |rcpt, _| {
        if rcpt == "fb@example.com" {
            tries.fetch_add(1, Ordering::SeqCst);
            Reply::Permanent
        } else {
            Reply::Accept
        }
    });
    let sms = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(400).set_body_json(json!({"error": "invalid number"})))
        .mount(&sms)
        .await;
    let push = push_accepting().await;
    let mut t = Tocsin::new();
    t.smtp(smtp.port())
        .webhook("sms", &format!("{}/sms", sms.uri()), SECRET)
        .webhook("push", &format!("{}/push", push.uri()), SECRET)
        // Email comes twice in the plan; a version still goes out on it once.
        .set("TOCSIN_DELIVERY__CHANNEL_ORDER", "email,sms,email,push");
    let incident = approved_incident(
        &t,
        "plan",
        &[
            merchant(
                "fb-1",
                "en",
                Some("fb@example.com"),
                Some("+8613800000801"),
                Some("push-token-fb-1"),
                HOLDINGS,
            ),
            merchant(
                "fb-2",
                "en",
                Some("fb2@example.com"),
                Some("+8613800000802"),
                None,
                HOLDINGS,
            ),
        ],
    );
    let after = dispatch(&t, &incident, 30);
    assert_eq!(after["reached"], 2, "{after:#}");

    let list = deliveries(&t, &incident);
    let mut fb1: Vec<&Value> = list.iter().filter(|d| d["merchant_id"] == "fb-1").collect();
    fb1.sort_by_key(|d| d["plan_position"].as_i64());
    let trail: Vec<(&str, i64, &str)> = fb1
        .iter()
        .map(|d| {
            (
                d["channel"].as_str().unwrap_or("-"),
                d["plan_position"].as_i64().unwrap_or(-1),
                d["status"].as_str().unwrap_or("-"),
            )
        })
        .collect();
    assert_eq!(
        trail,
        [("email", 0, "failed"), ("sms", 1, "failed"), ("push", 3, "accepted")],
        "email 550, SMS 400, email skipped (already used), push: {fb1:#?}"
    );
    assert_eq!(fb1[0]["error_class"], "permanent");
    assert_eq!(fb1[1]["error_kind"], "rejected");
    assert_eq!(rcpt_tries.load(Ordering::SeqCst), 1, "the mailbox was tried once");
    assert!(smtp.messages_to("fb@example.com").is_empty());
    assert_eq!(sms.received_requests().await.expect("recorded").len(), 1);
    assert_eq!(push.received_requests().await.expect("recorded").len(), 1);
    assert_eq!(affected(&t, &incident, "fb-1")["reached_channel"], "push");

    // fb-2 was reached on its first channel and nothing else went to it.
    let fb2: Vec<&Value> = list.iter().filter(|d| d["merchant_id"] == "fb-2").collect();
    assert_eq!(fb2.len(), 1, "{fb2:#?}");
    assert_eq!(fb2[0]["channel"], "email");
    assert_eq!(smtp.messages_to("fb2@example.com").len(), 1);
}

// ---------------------------------------------------------------------------------------------
// 10. Push tokens the platforms no longer know.

/// A fresh P-256 key in PKCS#8 PEM, as Apple's `AuthKey_<id>.p8`.
fn apns_key_pem() -> String {
    use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).expect("generate a key");
    let b64 = STANDARD.encode(pkcs8.as_ref());
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).expect("ascii"))
        .collect();
    format!(
        "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
        lines.join("\n")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fcm_and_apns_unregistered_tokens_are_permanent() {
    tocsin::install_crypto_provider();
    // FCM: the HTTP v1 API with a service-account grant; UNREGISTERED for one token.
    let smtp = SmtpServer::start().await;
    let fcm = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/token"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "access_token": "ya29.delivery-test", "expires_in": 3600, "token_type": "Bearer",
        })))
        .mount(&fcm)
        .await;
    Mock::given(method("POST"))
        .and(path("/v1/projects/tocsin-test/messages:send"))
        .and(body_string_contains("fcm-token-gone"))
        .respond_with(ResponseTemplate::new(404).set_body_json(json!({"error": {
            "code": 404, "message": "Requested entity was not found.", "status": "NOT_FOUND",
            "details": [{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": "UNREGISTERED"}],
        }})))
        .with_priority(1)
        .mount(&fcm)
        .await;
    Mock::given(method("POST"))
        .and(path("/v1/projects/tocsin-test/messages:send"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"name": "projects/tocsin-test/messages/0:42"})))
        .with_priority(5)
        .mount(&fcm)
        .await;
    let mut t = Tocsin::new();
    let account = repo("tests/fixtures/fcm-service-account.json");
    t.smtp(smtp.port())
        .set("TOCSIN_DELIVERY__CHANNEL_ORDER", "push,email,sms")
        .set("TOCSIN_PUSH__PROVIDERS", "fcm")
        .set("TOCSIN_PROVIDERS__FCM__KIND", "fcm")
        .set(
            "TOCSIN_PROVIDERS__FCM__FCM__SERVICE_ACCOUNT_FILE",
            account.to_str().expect("path"),
        )
        .set("TOCSIN_PROVIDERS__FCM__FCM__BASE_URL", fcm.uri())
        .set("TOCSIN_PROVIDERS__FCM__FCM__TOKEN_URL", format!("{}/token", fcm.uri()));
    let incident = approved_incident(
        &t,
        "fcm",
        &[
            merchant(
                "fu-1",
                "en",
                Some("fu1@example.com"),
                None,
                Some("fcm-token-gone"),
                HOLDINGS,
            ),
            merchant(
                "fu-2",
                "en",
                Some("fu2@example.com"),
                None,
                Some("fcm-token-live"),
                HOLDINGS,
            ),
        ],
    );
    let after = dispatch(&t, &incident, 30);
    assert_eq!(after["reached"], 2, "{after:#}");
    let list = deliveries(&t, &incident);
    let gone = one(&list, "fu-1", "push");
    assert_eq!(gone["status"], "failed", "{gone:#}");
    assert_eq!(gone["error_kind"], "unregistered");
    assert_eq!(gone["error_class"], "permanent");
    assert_eq!(gone["attempts"], 1);
    assert_eq!(one(&list, "fu-1", "email")["status"], "accepted", "moved on to email");
    assert_eq!(smtp.messages_to("fu1@example.com").len(), 1);
    let live = one(&list, "fu-2", "push");
    assert_eq!(live["status"], "accepted");
    assert_eq!(live["provider"], "fcm");
    assert_eq!(live["provider_message_id"], "projects/tocsin-test/messages/0:42");
    assert!(smtp.messages_to("fu2@example.com").is_empty());
    let sends: Vec<Request> = fcm
        .received_requests()
        .await
        .expect("recorded")
        .into_iter()
        .filter(|r| r.url.path().ends_with("messages:send"))
        .collect();
    assert_eq!(sends.len(), 2, "the unregistered token is not retried");
    let providers = t.run(&["--json", "deliveries", "providers"]).ok().json();
    let fcm_status = providers
        .as_array()
        .expect("list")
        .iter()
        .find(|p| p["name"] == "fcm")
        .cloned()
        .expect("fcm listed");
    assert_eq!(
        (
            fcm_status["breaker"].as_str(),
            fcm_status["consecutive_failures"].as_i64()
        ),
        (Some("closed"), Some(0)),
        "a dead token says nothing about FCM's health: {fcm_status:#}"
    );

    // APNs: HTTP/2 (h2c to the loopback peer) with a provider token; 410 Unregistered.
    let apns = MockServer::start().await;
    const GONE: &str = "00aa00aa00aa00aa00aa00aa00aa00aa00aa00aa00aa00aa00aa00aa00aa00aa";
    const LIVE: &str = "11bb11bb11bb11bb11bb11bb11bb11bb11bb11bb11bb11bb11bb11bb11bb11bb";
    Mock::given(method("POST"))
        .and(path(format!("/3/device/{GONE}")))
        .respond_with(ResponseTemplate::new(410).set_body_json(json!({
            "reason": "Unregistered", "timestamp": 1_700_000_000_000_i64,
        })))
        .mount(&apns)
        .await;
    Mock::given(method("POST"))
        .and(path(format!("/3/device/{LIVE}")))
        .respond_with(ResponseTemplate::new(200))
        .mount(&apns)
        .await;
    let smtp = SmtpServer::start().await;
    let mut t = Tocsin::new();
    let key = t.file("AuthKey_KEY1234567.p8", &apns_key_pem());
    t.smtp(smtp.port())
        .set("TOCSIN_DELIVERY__CHANNEL_ORDER", "push,email,sms")
        .set("TOCSIN_PUSH__PROVIDERS", "apple")
        .set("TOCSIN_PROVIDERS__APPLE__KIND", "apns")
        .set("TOCSIN_PROVIDERS__APPLE__APNS__TEAM_ID", "TEAM123456")
        .set("TOCSIN_PROVIDERS__APPLE__APNS__KEY_ID", "KEY1234567")
        .set("TOCSIN_PROVIDERS__APPLE__APNS__PRIVATE_KEY_FILE", key)
        .set("TOCSIN_PROVIDERS__APPLE__APNS__TOPIC", "com.example.merchant")
        .set("TOCSIN_PROVIDERS__APPLE__APNS__BASE_URL", apns.uri());
    let incident = approved_incident(
        &t,
        "apns",
        &[
            merchant("au-1", "en", Some("au1@example.com"), None, Some(GONE), HOLDINGS),
            merchant("au-2", "en", Some("au2@example.com"), None, Some(LIVE), HOLDINGS),
        ],
    );
    let after = dispatch(&t, &incident, 30);
    assert_eq!(after["reached"], 2, "{after:#}");
    let list = deliveries(&t, &incident);
    let gone = one(&list, "au-1", "push");
    assert_eq!(gone["status"], "failed", "{gone:#}");
    assert_eq!(gone["error_kind"], "unregistered");
    assert_eq!(gone["error_class"], "permanent");
    assert_eq!(gone["attempts"], 1);
    assert_eq!(one(&list, "au-1", "email")["status"], "accepted");
    assert_eq!(smtp.messages_to("au1@example.com").len(), 1);
    let live = one(&list, "au-2", "push");
    assert_eq!(live["status"], "accepted", "{live:#}");
    assert_eq!(live["provider"], "apple");
    let requests = apns.received_requests().await.expect("recorded");
    assert_eq!(requests.len(), 2, "one request per device, the 410 not retried");
    for r in &requests {
        assert_eq!(
            r.headers.get("apns-topic").and_then(|v| v.to_str().ok()),
            Some("com.example.merchant")
        );
        assert!(
            r.headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.starts_with("bearer ")),
            "a provider token"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Receipts are only believed from whoever may give them.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_twilio_provider_using_an_api_key_accepts_no_callback_signed_with_an_empty_key() {
    tocsin::install_crypto_provider();
    const SID: &str = "SM0000000000000000000000000000dd04";
    let twilio = twilio_accepting(SID).await;
    let port = free_port();
    let callback = format!("http://127.0.0.1:{port}/hooks/twilio/tw");
    let mut t = Tocsin::new();
    // Basic auth with an API key; no auth token, so there is no key to check signatures with.
    t.set("TOCSIN_PROVIDERS__TW__KIND", "twilio")
        .set("TOCSIN_PROVIDERS__TW__TWILIO__ACCOUNT_SID", ACCOUNT_SID)
        .set(
            "TOCSIN_PROVIDERS__TW__TWILIO__API_KEY_SID",
            "SK00000000000000000000000000000001",
        )
        .set("TOCSIN_PROVIDERS__TW__TWILIO__API_KEY_SECRET", "api-key-secret")
        .set("TOCSIN_PROVIDERS__TW__TWILIO__FROM", TWILIO_FROM)
        .set("TOCSIN_PROVIDERS__TW__TWILIO__BASE_URL", twilio.uri())
        .set("TOCSIN_PROVIDERS__TW__TWILIO__STATUS_CALLBACK_URL", &callback)
        .set("TOCSIN_SMS__PROVIDERS", "tw");
    let incident = approved_incident(
        &t,
        "twilio-apikey",
        &[merchant("tk-1", "en", None, Some("+8613800000901"), None, HOLDINGS)],
    );
    dispatch(&t, &incident, 30);
    let sms = one(&deliveries(&t, &incident), "tk-1", "sms");
    assert_eq!(sms["status"], "accepted", "{sms:#}");
    let _server = t.serve_at(&format!("127.0.0.1:{port}"));
    // Anyone can compute an HMAC with an empty key.
    let forged = [
        ("AccountSid", ACCOUNT_SID),
        ("MessageSid", SID),
        ("MessageStatus", "undelivered"),
    ];
    let (status, body) = post_twilio(&callback, &forged, Some(&twilio_signature("", &callback, &forged))).await;
    assert_eq!(
        status, 403,
        "a signature keyed by the empty string proves nothing: {body}"
    );
    assert_eq!(one(&deliveries(&t, &incident), "tk-1", "sms")["status"], "accepted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_aliyun_report_cannot_settle_another_providers_delivery() {
    tocsin::install_crypto_provider();
    const REPORT_TOKEN: &str = "aliyun-report-token-8";
    let smtp = SmtpServer::start().await;
    let aliyun = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"Code": "OK", "BizId": "BIZ999^0"})))
        .mount(&aliyun)
        .await;
    let mut t = Tocsin::new();
    t.smtp(smtp.port())
        .set("TOCSIN_PROVIDERS__ALI__KIND", "aliyun_sms")
        .set("TOCSIN_PROVIDERS__ALI__ALIYUN_SMS__ACCESS_KEY_ID", "LTAI5tTestKeyId")
        .set("TOCSIN_PROVIDERS__ALI__ALIYUN_SMS__ACCESS_KEY_SECRET", "secret")
        .set("TOCSIN_PROVIDERS__ALI__ALIYUN_SMS__SIGN_NAME", "示例商城")
        .set("TOCSIN_PROVIDERS__ALI__ALIYUN_SMS__TEMPLATE_CODE", "SMS_000001")
        .set("TOCSIN_PROVIDERS__ALI__ALIYUN_SMS__REPORT_TOKEN", REPORT_TOKEN)
        .set("TOCSIN_PROVIDERS__ALI__ALIYUN_SMS__BASE_URL", aliyun.uri())
        .set("TOCSIN_SMS__PROVIDERS", "ali");
    // Reached by email (SMTP: no receipts), with SMS as the next channel.
    let incident = approved_incident(
        &t,
        "cross-receipt",
        &[merchant(
            "xr-1",
            "en",
            Some("xr1@example.com"),
            Some("+8613800000902"),
            None,
            HOLDINGS,
        )],
    );
    let after = dispatch(&t, &incident, 30);
    assert_eq!(after["reached"], 1, "{after:#}");
    let email = one(&deliveries(&t, &incident), "xr-1", "email");
    assert_eq!(email["status"], "accepted");

    let server = t.serve_at(&format!("127.0.0.1:{}", free_port()));
    // A report with the right Aliyun token whose out_id names the email delivery.
    let report = json!([{
        "phone_number": "8613800000902", "success": false, "err_code": "MK:0001",
        "biz_id": "BIZ999^0", "out_id": email["id"],
    }]);
    let r = reqwest::Client::new()
        .post(format!("{}/hooks/aliyun/ali?token={REPORT_TOKEN}", server.base))
        .json(&report)
        .send()
        .await
        .expect("post");
    assert_eq!(r.status().as_u16(), 200, "Aliyun is answered as it expects");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let list = deliveries(&t, &incident);
    assert_eq!(
        one(&list, "xr-1", "email")["status"],
        "accepted",
        "an SMS provider's report says nothing about an email: {list:#?}"
    );
    assert!(
        !list.iter().any(|d| d["channel"] == "sms"),
        "no SMS fallback for a merchant reached by email: {list:#?}"
    );
    assert!(aliyun.received_requests().await.expect("recorded").is_empty());
}
