//! The responder console driven end to end in headless Chromium: two responders sign in with
//! their tokens, one confirms, scopes and drafts, the drafter's approval is refused, the other
//! previews and approves, the notices are dispatched and the page shows them delivered. Also:
//! CSRF refusals, `no-store`, the sign-in redirect and the Chinese pages.

mod common;

use std::time::Duration;

use common::smtp_server::SmtpServer;
use common::webdriver::{Browser, Driver};
use common::*;
use serde_json::Value;

/// Signs in on `browser` with `token`, in `lang`, and waits for the incident list.
async fn sign_in(browser: &Browser, base: &str, token: &str, lang: &str) {
    browser.goto(&format!("{base}/console/login?lang={lang}")).await;
    browser.fill("#token", token).await;
    browser.click("#sign-in").await;
    browser.find("#whoami").await;
}

async fn sign_out(browser: &Browser) {
    browser.click("#logout").await;
    browser.find("#token").await;
}

/// The incident page's state (`data-state`), after opening it.
async fn state(browser: &Browser) -> String {
    browser.attribute("#state", "data-state").await.unwrap_or_default()
}

fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
}

fn header(r: &reqwest::Response, name: &str) -> String {
    r.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_responders_work_an_incident_in_the_console_until_it_is_delivered() {
    tocsin::install_crypto_provider();
    let started = std::time::Instant::now();
    let smtp = SmtpServer::start().await;
    let mut t = Tocsin::new();
    t.smtp(smtp.port())
        .set("TOCSIN_DELIVERY__SWEEP_SCHEDULE", "* * * * * *");
    let merchants = [
        merchant(
            "con-1",
            "en",
            Some("one@example.com"),
            None,
            None,
            &["account_credentials"],
        ),
        merchant(
            "con-2",
            "zh-CN",
            Some("two@example.com"),
            None,
            None,
            &["account_credentials", "id_number"],
        ),
        merchant(
            "con-3",
            "zh-CN",
            Some("three@example.com"),
            None,
            None,
            &["phone_number"],
        ),
    ]
    .join("\n");
    t.run(&["merchants", "import", &t.file("m.jsonl", &merchants)]).ok();
    let alice = t.token("alice", "responder");
    let alice_approver = t.token("alice", "approver");
    let created = t
        .run(&[
            "--json", "--actor", "ops", "tokens", "create", "bob", "--role", "approver",
        ])
        .ok()
        .json();
    let bob = created["token"].as_str().expect("bob's token").to_owned();
    let bob_token_id = created["details"]["id"].as_str().expect("its id").to_owned();
    let server = t.serve();
    let base = server.base.clone();
    let api = t.api(&server, &[("siem", "responder")]);
    let ev: Value = serde_json::from_str(&event("con-e1", "con-key")).expect("event");
    let (status, outcome, _) = api.post("siem", "/api/v1/events", ev).await;
    assert_eq!(status, 202, "{outcome}");
    let id = outcome[0]["incident_id"].as_str().expect("id").to_owned();
    let page = format!("{base}/console/incidents/{id}");

    // Without a session: the sign-in page, never a console page; nothing is cached.
    let http = no_redirects();
    let r = http.get(format!("{base}/console")).send().await.expect("get");
    assert_eq!(r.status().as_u16(), 303);
    assert_eq!(header(&r, "location"), "/console/login");
    assert_eq!(header(&r, "cache-control"), "no-store");
    let r = http.get(&page).send().await.expect("get");
    assert_eq!(
        (r.status().as_u16(), header(&r, "location")),
        (303, "/console/login".into())
    );
    let r = http.get(format!("{base}/console/login")).send().await.expect("get");
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(header(&r, "cache-control"), "no-store");
    assert_eq!(header(&r, "x-frame-options"), "DENY");
    assert!(header(&r, "content-security-policy").contains("frame-ancestors 'none'"));
    // Login CSRF: a sign-in without the form's double-submitted value is refused.
    let r = http
        .post(format!("{base}/console/login"))
        .form(&[("token", alice.as_str()), ("csrf", "forged")])
        .send()
        .await
        .expect("post");
    assert_eq!(r.status().as_u16(), 403);
    assert!(
        r.headers()
            .get_all("set-cookie")
            .iter()
            .all(|c| !c.to_str().unwrap_or_default().starts_with("tocsin_console="))
    );

    let driver = Driver::start().await;
    let a = driver.browser().await;
    let b = driver.browser().await;

    // Alice, a responder, signs in (a wrong token first) and opens the incident.
    a.goto(&format!("{base}/console/login?lang=en")).await;
    assert!(a.source().await.contains("<html lang=\"en\">"));
    a.fill("#token", "tocsin_not-a-token").await;
    a.click("#sign-in").await;
    assert!(a.text("#message").await.contains("unknown, revoked or expired"));
    sign_in(&a, &base, &alice, "en").await;
    assert!(a.text("#whoami").await.contains("alice"));
    let reference = a.text("#incidents .incident-link").await;
    assert!(reference.starts_with("INC-"), "{reference}");
    a.click("#incidents .incident-link").await;
    assert_eq!(state(&a).await, "triage");

    // She confirms with the demo facts, pasted as JSON; the regulator clocks start.
    let facts: Value =
        serde_json::from_str(&std::fs::read_to_string(repo("config/demo/incident.json")).expect("facts"))
            .expect("json");
    a.fill("#facts", "{\"grade\": ").await;
    a.click("#confirm-submit").await;
    assert!(a.text("#message").await.contains("Invalid input"));
    a.fill("#facts", &facts.to_string()).await;
    a.click("#confirm-submit").await;
    assert!(a.text("#message").await.contains("confirmed"), "{}", a.source().await);
    assert_eq!(state(&a).await, "confirmed");
    assert!(a.text("#clocks").await.contains("min"), "clocks with the time left");
    a.goto(&format!("{base}/console")).await;
    assert!(a.text("#incidents .clocks").await.contains("min"));
    a.goto(&page).await;

    // Scopes (a dry run first) and drafts.
    a.fill("#categories", "account_credentials, id_number, phone_number")
        .await;
    a.toggle("#dry_run").await;
    a.click("#scope-submit").await;
    assert!(a.text("#message").await.contains("Dry run"));
    assert_eq!(state(&a).await, "confirmed");
    a.click("#scope-submit").await;
    assert_eq!(a.text("#scope-affected").await, "3");
    assert_eq!(state(&a).await, "scoped");
    assert!(a.text("#scope-risk").await.len() > 3);
    assert!(a.text("#scope-channel").await.contains("email"));
    assert!(a.text("#scope-locale").await.contains("zh-CN"));
    a.click("#draft-submit").await;
    assert_eq!(state(&a).await, "drafted");
    assert!(a.text("#drafts .drafted-by").await.contains("alice"));
    // A responder may not approve: no button, and a forged form is refused for the role.
    assert!(a.try_find("#approve-submit").await.is_none());
    assert!(a.text("#approve-role").await.contains("cannot approve"));

    // CSRF: her own session cookie without the form's token is refused, as is a wrong token.
    let session = a.cookie("tocsin_console").await.expect("the session cookie");
    assert_eq!(session, alice, "the cookie holds the token");
    for csrf in [None, Some("00".repeat(32))] {
        let mut form = vec![("facts".to_owned(), "{}".to_owned())];
        if let Some(c) = csrf {
            form.push(("csrf".into(), c));
        }
        let r = http
            .post(format!("{page}/dispatch"))
            .header("cookie", format!("tocsin_console={session}"))
            .form(&form)
            .send()
            .await
            .expect("post");
        assert_eq!(r.status().as_u16(), 403);
        assert_eq!(header(&r, "cache-control"), "no-store");
    }
    let r = http
        .get(&page)
        .header("cookie", format!("tocsin_console={session}"))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(header(&r, "cache-control"), "no-store");
    let html = r.text().await.expect("html");
    assert!(html.contains(&reference));

    // With her approver token she is still the drafter: four eyes refuses.
    sign_out(&a).await;
    sign_in(&a, &base, &alice_approver, "en").await;
    a.goto(&page).await;
    assert!(a.text("#approve-own").await.contains("another person"));
    a.click("#approve-submit").await;
    let refusal = a.text("#message").await;
    assert!(refusal.contains("Four-eyes rule"), "{refusal}");
    assert_eq!(state(&a).await, "drafted");
    sign_out(&a).await;

    // Bob, an approver, works in Chinese: previews a notice, then approves.
    sign_in(&b, &base, &bob, "zh-CN").await;
    let source = b.source().await;
    assert!(source.contains("<html lang=\"zh-CN\">"), "{source}");
    assert!(source.contains("事件") && source.contains("退出登录"));
    b.goto(&page).await;
    assert!(b.text("#timeline").await.contains("已确认"));
    b.click(".preview-link").await;
    b.find(".notice").await;
    let preview = b.source().await;
    assert!(preview.contains("data-locale=\"zh-CN\"") && preview.contains("data-locale=\"en\""));
    assert!(
        preview.contains("sandbox=\"\""),
        "email HTML only inside sandboxed frames"
    );
    assert!(!b.text(".notice .email-subject").await.is_empty());
    b.click("#back").await;
    b.click("#approve-submit").await;
    assert!(b.text("#message").await.contains("通知已批准"));
    assert_eq!(state(&b).await, "approved");
    assert!(b.text("#drafts .approved-by").await.contains("bob"));

    // Alice dispatches; the page shows the deliveries completing.
    sign_in(&a, &base, &alice, "en").await;
    a.goto(&page).await;
    a.click("#dispatch-submit").await;
    assert!(a.text("#message").await.contains("Dispatch started"));
    // The page refreshes itself while notifying: read each look as one snapshot of its source.
    let delivered = a
        .wait_until(Some(&page), Duration::from_secs(60), async |br: &Browser| {
            let source = br.source().await;
            let email = source
                .split_once("id=\"channel-email\"")
                .and_then(|(_, row)| row.split_once("</tr>"))
                .map(|(row, _)| row.to_owned())
                .unwrap_or_default();
            email.contains("class=\"sent\">3<")
                && email.contains("class=\"pending\">0<")
                && source.contains("data-state=\"monitoring\"")
        })
        .await;
    assert!(delivered, "deliveries did not complete:\n{}", a.source().await);
    assert!(a.text("#channel-email .progress").await.contains("complete"));
    assert!(a.text("#timeline").await.contains("monitoring"));
    assert_eq!(smtp.messages().len(), 3);

    // Signing out ends the session: the old page needs a sign-in again.
    sign_out(&a).await;
    a.goto(&page).await;
    a.find("#token").await;
    // Revoking a token ends its console session at once (every request authenticates).
    b.goto(&page).await;
    b.find("#approve-submit, #state").await;
    t.run(&["--actor", "ops", "tokens", "revoke", &bob_token_id]).ok();
    b.goto(&page).await;
    b.find("#token").await;
    eprintln!("console test took {:?}", started.elapsed());
}
