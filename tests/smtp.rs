//! The SMTP email provider against the real test SMTP server on loopback: plain, STARTTLS,
//! implicit TLS, AUTH, reply classification, connection reuse and replacement, Message-ID
//! and DKIM.

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use common::smtp_server::{ReceivedMail, Reply, ServerOptions, ServerTls, SmtpServer};
use sha2::{Digest, Sha256};
use tocsin::channels::{EmailTransport, FailureKind, Mail};
use tocsin::config::{EmailSettings, Secret, Settings};

fn fixture(name: &str) -> PathBuf {
    common::repo("tests/fixtures").join(name)
}

fn settings(port: u16, tls: &str) -> EmailSettings {
    tocsin::install_crypto_provider();
    let mut s = Settings::defaults().expect("defaults").email;
    s.transport = "smtp".into();
    s.smtp.host = "127.0.0.1".into();
    s.smtp.port = port;
    s.smtp.tls = tls.into();
    s.smtp.timeout_seconds = 5;
    s.smtp.pool_size = 4;
    if tls != "none" {
        s.smtp.tls_ca_file = Some(fixture("test-ca.pem"));
    }
    s
}

fn transport(s: &EmailSettings) -> EmailTransport {
    let dir = tempfile::tempdir().expect("temp dir");
    EmailTransport::from_settings(s, dir.path()).expect("transport")
}

fn mail<'a>(to: &'a str, key: &'a str) -> Mail<'a> {
    Mail {
        to,
        subject: "Security incident notice / 安全事件通知",
        text: "Dear merchant,\n\nwe write about a security incident.  It   concerns you.\n",
        html: "<p>Dear merchant,</p><p>we write about a security incident.</p>",
        language: "en",
        key,
        delivery: None,
    }
}

/// The value of the first header `name` (case-insensitive), unfolded.
fn header(data: &str, name: &str) -> Option<String> {
    let head = data.split("\r\n\r\n").next().unwrap_or_default();
    let mut found: Option<String> = None;
    for line in head.split("\r\n") {
        if line.starts_with([' ', '\t']) {
            if let Some(v) = found.as_mut() {
                v.push_str(line);
            }
            continue;
        }
        if found.is_some() {
            break;
        }
        if let Some((n, v)) = line.split_once(':')
            && n.eq_ignore_ascii_case(name)
        {
            found = Some(v.trim_start().to_owned());
        }
    }
    found
}

async fn one(server: &SmtpServer) -> ReceivedMail {
    let got = server.wait_for_messages(1, Duration::from_secs(5)).await;
    assert_eq!(got.len(), 1, "one message arrives");
    got.into_iter().next().expect("one")
}

#[tokio::test]
async fn plain_smtp_sends_with_the_key_derived_message_id_and_no_list_unsubscribe() {
    let server = SmtpServer::start().await;
    let t = transport(&settings(server.port(), "none"));
    let id = t
        .send_mail(&mail("merchant@shop.example", "delivery-key-1"))
        .await
        .expect("sent");
    let got = one(&server).await;
    assert_eq!(got.rcpt_to, vec!["merchant@shop.example".to_owned()]);
    assert!(!got.secure);
    assert!(
        got.pipelined,
        "the server offers PIPELINING: MAIL, RCPT and DATA in one go"
    );
    assert_eq!(header(&got.data, "Message-ID"), Some(format!("<{id}>")));
    assert_eq!(id, t.message_id("delivery-key-1", None), "derived from the key");
    assert!(!id.contains(['<', '>']));
    assert!(id.ends_with("@example.com"), "{id}");
    assert_ne!(id, t.message_id("delivery-key-2", None));
    // A notice's Message-ID names its delivery, then a hash of its key; a bounce finds the
    // delivery by it, and only the right key matches.
    let delivery: tocsin::domain::DeliveryId = "dlv_0123456789abcdef0123456789abcdef".parse().expect("id");
    let notice_id = t.message_id("delivery-key-1", Some(&delivery));
    assert_eq!(notice_id, t.message_id("delivery-key-1", Some(&delivery)), "stable");
    assert!(
        notice_id.starts_with("dlv_0123456789abcdef0123456789abcdef."),
        "{notice_id}"
    );
    assert_eq!(
        tocsin::channels::delivery_named_by(&format!("<{notice_id}>")),
        Some(delivery)
    );
    assert_eq!(
        tocsin::channels::delivery_named_by(&id),
        None,
        "a filing's id names no delivery"
    );
    assert_eq!(header(&got.data, "List-Unsubscribe"), None);
    assert_eq!(header(&got.data, "Content-Language").as_deref(), Some("en"));
    assert!(
        header(&got.data, "Content-Type").is_some_and(|c| c.starts_with("multipart/alternative")),
        "{}",
        got.data
    );
    // A resend of the same delivery carries the same Message-ID.
    let again = t
        .send_mail(&mail("merchant@shop.example", "delivery-key-1"))
        .await
        .expect("sent");
    assert_eq!(again, id);
}

#[tokio::test]
async fn starttls_upgrades_before_the_transaction() {
    let server = SmtpServer::start_with(ServerOptions {
        tls: ServerTls::StartTls,
        ..ServerOptions::default()
    })
    .await;
    let t = transport(&settings(server.port(), "starttls"));
    t.send_mail(&mail("merchant@shop.example", "k-starttls"))
        .await
        .expect("sent");
    let got = one(&server).await;
    assert!(got.secure, "sent after STARTTLS");
    assert!(got.pipelined, "MAIL, RCPT and DATA in one go after STARTTLS too");
}

#[tokio::test]
async fn starttls_is_required_when_configured() {
    // A server that does not offer STARTTLS is not sent to in clear.
    let server = SmtpServer::start().await;
    let t = transport(&settings(server.port(), "starttls"));
    let err = t
        .send_mail(&mail("merchant@shop.example", "k"))
        .await
        .expect_err("refused");
    assert_eq!(err.kind, FailureKind::Network, "{err:?}");
    assert!(server.messages().is_empty());
}

#[tokio::test]
async fn implicit_tls_speaks_tls_from_the_first_byte() {
    let server = SmtpServer::start_with(ServerOptions {
        tls: ServerTls::Implicit,
        ..ServerOptions::default()
    })
    .await;
    let t = transport(&settings(server.port(), "tls"));
    t.send_mail(&mail("merchant@shop.example", "k-tls"))
        .await
        .expect("sent");
    let got = one(&server).await;
    assert!(got.secure);
    assert!(got.pipelined);
}

#[tokio::test]
async fn an_untrusted_certificate_is_a_network_failure() {
    let server = SmtpServer::start_with(ServerOptions {
        tls: ServerTls::Implicit,
        ..ServerOptions::default()
    })
    .await;
    let mut s = settings(server.port(), "tls");
    s.smtp.tls_ca_file = None;
    let err = transport(&s)
        .send_mail(&mail("merchant@shop.example", "k"))
        .await
        .expect_err("untrusted");
    assert_eq!(err.kind, FailureKind::Network, "{err:?}");
}

fn with_auth(port: u16, user: &str, pass: &str) -> EmailSettings {
    let mut s = settings(port, "starttls");
    s.smtp.username = user.into();
    s.smtp.password = Secret::new(pass);
    s
}

#[tokio::test]
async fn auth_with_the_right_credentials_sends() {
    let server = SmtpServer::start_with(ServerOptions {
        tls: ServerTls::StartTls,
        auth: Some(("tocsin".into(), "s3cret pass".into())),
        ..ServerOptions::default()
    })
    .await;
    let t = transport(&with_auth(server.port(), "tocsin", "s3cret pass"));
    t.send_mail(&mail("merchant@shop.example", "k-auth"))
        .await
        .expect("sent");
    let got = one(&server).await;
    assert_eq!(got.authenticated_as.as_deref(), Some("tocsin"));
    assert!(got.secure);
}

#[tokio::test]
async fn auth_login_is_used_when_the_server_offers_only_login() {
    let server = SmtpServer::start_with(ServerOptions {
        tls: ServerTls::Implicit,
        auth: Some(("tocsin".into(), "pw".into())),
        login_only: true,
    })
    .await;
    let mut s = with_auth(server.port(), "tocsin", "pw");
    s.smtp.tls = "tls".into();
    transport(&s)
        .send_mail(&mail("merchant@shop.example", "k-login"))
        .await
        .expect("sent");
    assert_eq!(one(&server).await.authenticated_as.as_deref(), Some("tocsin"));
}

#[tokio::test]
async fn refused_credentials_are_an_auth_failure() {
    let server = SmtpServer::start_with(ServerOptions {
        tls: ServerTls::StartTls,
        auth: Some(("tocsin".into(), "right".into())),
        ..ServerOptions::default()
    })
    .await;
    let t = transport(&with_auth(server.port(), "tocsin", "wrong"));
    let err = t.send_mail(&mail("merchant@shop.example", "k")).await.expect_err("535");
    assert_eq!(err.kind, FailureKind::Auth, "{err:?}");
    assert!(err.message.contains("535"), "{}", err.message);
    // Without credentials the server's 530 is an auth failure too.
    let t = transport(&settings(server.port(), "starttls"));
    let err = t.send_mail(&mail("merchant@shop.example", "k")).await.expect_err("530");
    assert_eq!(err.kind, FailureKind::Auth, "{err:?}");
}

#[tokio::test]
async fn replies_are_classified_and_the_connection_is_kept_after_a_refusal() {
    let server = SmtpServer::start().await;
    server.set_rcpt_policy(|rcpt, _| match rcpt {
        "gone@shop.example" => Reply::Permanent,
        "busy@shop.example" => Reply::Transient,
        _ => Reply::Accept,
    });
    let t = transport(&settings(server.port(), "none"));
    let err = t.send_mail(&mail("gone@shop.example", "k1")).await.expect_err("550");
    assert_eq!(err.kind, FailureKind::Rejected, "{err:?}");
    assert_eq!(err.class(), tocsin::model::ErrorClass::Permanent);
    assert!(err.message.contains("550"), "{}", err.message);
    assert!(!err.message.contains("gone@"), "no address in {}", err.message);
    let err = t.send_mail(&mail("busy@shop.example", "k2")).await.expect_err("451");
    assert_eq!(err.kind, FailureKind::ProviderError, "{err:?}");
    assert_eq!(err.class(), tocsin::model::ErrorClass::Transient);
    t.send_mail(&mail("ok@shop.example", "k3")).await.expect("sent");
    assert_eq!(server.messages().len(), 1);
    assert_eq!(server.connections(), 1, "the connection was reset (RSET) and reused");
}

#[tokio::test]
async fn the_pool_reuses_at_most_pool_size_connections() {
    let server = SmtpServer::start().await;
    let t = Arc::new(transport(&settings(server.port(), "none")));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..60 {
        let t = Arc::clone(&t);
        tasks.spawn(async move {
            let key = format!("reuse-{i}");
            t.send_mail(&mail("merchant@shop.example", &key)).await
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.expect("task").expect("sent");
    }
    assert_eq!(server.messages().len(), 60);
    assert!(server.connections() <= 4, "{} connections", server.connections());
    let pool = t.smtp_pool().expect("smtp");
    assert_eq!(pool.connections_opened(), server.connections());
    assert!(pool.idle_connections() >= 1);
    // Sequential sends reuse one connection.
    let before = server.connections();
    for i in 0..5 {
        t.send_mail(&mail("merchant@shop.example", &format!("seq-{i}")))
            .await
            .expect("sent");
    }
    assert_eq!(server.connections(), before);
}

#[tokio::test]
async fn a_connection_the_server_dropped_is_replaced() {
    let server = SmtpServer::start().await;
    let t = transport(&settings(server.port(), "none"));
    t.send_mail(&mail("merchant@shop.example", "d1")).await.expect("sent");
    server.drop_connections();
    tokio::time::sleep(Duration::from_millis(50)).await;
    t.send_mail(&mail("merchant@shop.example", "d2"))
        .await
        .expect("sent on a new connection");
    assert_eq!(server.messages().len(), 2);
    assert_eq!(server.connections(), 2);
}

#[tokio::test]
async fn idle_connections_past_the_idle_timeout_are_not_reused() {
    let server = SmtpServer::start().await;
    let mut s = settings(server.port(), "none");
    s.smtp.idle_timeout_seconds = 0;
    let t = transport(&s);
    for i in 0..3 {
        t.send_mail(&mail("merchant@shop.example", &format!("i{i}")))
            .await
            .expect("sent");
    }
    assert_eq!(server.connections(), 3);
}

#[tokio::test]
async fn a_server_that_does_not_answer_is_a_timeout_and_a_closed_port_a_network_failure() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    let mut s = settings(port, "none");
    s.smtp.timeout_seconds = 1;
    let err = transport(&s)
        .send_mail(&mail("m@shop.example", "k"))
        .await
        .expect_err("silent");
    assert_eq!(err.kind, FailureKind::Timeout, "{err:?}");
    silent.abort();

    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = closed.local_addr().expect("addr").port();
    drop(closed);
    let err = transport(&settings(port, "none"))
        .send_mail(&mail("m@shop.example", "k"))
        .await
        .expect_err("closed");
    assert_eq!(err.kind, FailureKind::Network, "{err:?}");
}

// ---- DKIM ----------------------------------------------------------------------------------

/// The DKIM-Signature tags (whitespace inside values removed).
fn dkim_tags(value: &str) -> Vec<(String, String)> {
    value
        .split(';')
        .filter_map(|t| t.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.split_whitespace().collect()))
        .collect()
}

fn tag<'a>(tags: &'a [(String, String)], name: &str) -> &'a str {
    tags.iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("no {name}= tag"))
}

/// RFC 6376 relaxed header canonicalization of one (possibly folded) header field.
fn relaxed_header(name: &str, value: &str) -> String {
    let unfolded = value.replace("\r\n", "");
    let collapsed: Vec<&str> = unfolded.split([' ', '\t']).filter(|p| !p.is_empty()).collect();
    format!("{}:{}", name.trim().to_ascii_lowercase(), collapsed.join(" "))
}

/// RFC 6376 relaxed body canonicalization.
fn relaxed_body(body: &str) -> String {
    let mut lines: Vec<String> = body
        .split("\r\n")
        .map(|l| {
            let parts: Vec<&str> = l.split([' ', '\t']).collect();
            let mut s = String::new();
            for (i, p) in parts.iter().enumerate() {
                if i > 0 && !s.ends_with(' ') {
                    s.push(' ');
                }
                s.push_str(p);
            }
            s.trim_end().to_owned()
        })
        .collect();
    while lines.last().is_some_and(String::is_empty) {
        lines.pop();
    }
    if lines.is_empty() {
        return String::new();
    }
    lines.join("\r\n") + "\r\n"
}

/// The raw header fields (name, value with folding kept) of a message.
fn raw_headers(data: &str) -> Vec<(String, String)> {
    let head = data.split("\r\n\r\n").next().unwrap_or_default();
    let mut out: Vec<(String, String)> = Vec::new();
    for line in head.split("\r\n") {
        if line.starts_with([' ', '\t']) {
            if let Some((_, v)) = out.last_mut() {
                v.push_str("\r\n");
                v.push_str(line);
            }
        } else if let Some((n, v)) = line.split_once(':') {
            out.push((n.to_owned(), v.to_owned()));
        }
    }
    out
}

/// The public key of `tests/fixtures/dkim-test-rsa.pem` (PKCS#1 DER).
fn dkim_public_key() -> Vec<u8> {
    let pem = std::fs::read_to_string(fixture("dkim-test-rsa.pub.pem")).expect("public key");
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    B64.decode(b64).expect("base64")
}

/// Verifies an rsa-sha256 relaxed/relaxed DKIM signature as a receiving MTA would (RFC 6376
/// section 6), with the public key a DNS TXT record would carry. Returns the tags.
fn verify_dkim(data: &str, public_key: &[u8]) -> Vec<(String, String)> {
    let headers = raw_headers(data);
    let (sig_name, sig_value) = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("DKIM-Signature"))
        .expect("a DKIM-Signature header");
    let tags = dkim_tags(&sig_value.replace("\r\n", ""));
    assert_eq!(tag(&tags, "v"), "1");
    assert_eq!(tag(&tags, "a"), "rsa-sha256");
    assert_eq!(tag(&tags, "c"), "relaxed/relaxed");

    // Body hash.
    let body = data.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or_default();
    let bh = B64.encode(Sha256::digest(relaxed_body(body).as_bytes()));
    assert_eq!(tag(&tags, "bh"), bh, "body hash");

    // Signed header fields, in h= order, then the signature header with b= emptied.
    let mut signed = String::new();
    for name in tag(&tags, "h").split(':') {
        if let Some((n, v)) = headers.iter().rev().find(|(n, _)| n.eq_ignore_ascii_case(name)) {
            signed.push_str(&relaxed_header(n, v));
            signed.push_str("\r\n");
        }
    }
    let unfolded = sig_value.replace("\r\n", "");
    let without_b: Vec<String> = unfolded
        .split(';')
        .map(|t| match t.split_once('=') {
            Some((k, _)) if k.trim() == "b" => format!("{k}="),
            _ => t.to_owned(),
        })
        .collect();
    signed.push_str(&relaxed_header(sig_name, &without_b.join(";")));

    let signature = B64.decode(tag(&tags, "b")).expect("b= is base64");
    ring::signature::UnparsedPublicKey::new(&ring::signature::RSA_PKCS1_2048_8192_SHA256, public_key)
        .verify(signed.as_bytes(), &signature)
        .expect("the DKIM signature verifies");
    tags
}

#[tokio::test]
async fn messages_are_dkim_signed_and_the_signature_verifies() {
    let server = SmtpServer::start().await;
    let mut s = settings(server.port(), "none");
    s.dkim_selector = Some("tocsin2026".into());
    s.dkim_domain = Some("example.com".into());
    s.dkim_private_key_file = Some(fixture("dkim-test-rsa.pem"));
    let t = transport(&s);
    t.send_mail(&mail("merchant@shop.example", "k-dkim"))
        .await
        .expect("sent");
    let got = one(&server).await;
    let tags = verify_dkim(&got.data, &dkim_public_key());
    assert_eq!(tag(&tags, "d"), "example.com");
    assert_eq!(tag(&tags, "s"), "tocsin2026");
    let signed: Vec<String> = tag(&tags, "h").split(':').map(str::to_ascii_lowercase).collect();
    for h in [
        "from",
        "to",
        "subject",
        "date",
        "message-id",
        "content-type",
        "mime-version",
        "content-language",
    ] {
        assert!(signed.iter().any(|s| s == h), "{h} is signed: {signed:?}");
        assert!(header(&got.data, h).is_some(), "{h} is present, so it is covered");
    }

    // A changed subject or body no longer verifies.
    let tampered = got.data.replacen("we write about", "we write ab0ut", 1);
    let result = std::panic::catch_unwind(|| verify_dkim(&tampered, &dkim_public_key()));
    assert!(result.is_err(), "a tampered body fails");
    let tampered = got.data.replacen("Content-Language: en", "Content-Language: fr", 1);
    assert_ne!(tampered, got.data);
    let result = std::panic::catch_unwind(|| verify_dkim(&tampered, &dkim_public_key()));
    assert!(result.is_err(), "a tampered signed header fails");
}

#[tokio::test]
async fn half_configured_dkim_is_refused_at_setup() {
    let mut s = settings(2525, "none");
    s.dkim_selector = Some("tocsin".into());
    let dir = tempfile::tempdir().expect("temp dir");
    let err = EmailTransport::from_settings(&s, dir.path()).err().expect("refused");
    assert!(err.to_string().contains("dkim"), "{err}");
}

// ---- Throughput (manual) --------------------------------------------------------------------

/// Throughput of the pool against an external sink, e.g. Postfix's
/// `smtp-sink -c -u root 127.0.0.1:2525 1000`:
/// `TOCSIN_SMTP_BENCH=127.0.0.1:2525 cargo test --release --test smtp -- --ignored --nocapture`
/// (`TOCSIN_SMTP_BENCH_MESSAGES`, default 20000; `TOCSIN_SMTP_BENCH_CONCURRENCY`, default 16,
/// which is also the pool size). Messages are built (MIME, Message-ID) as in production, or
/// with `TOCSIN_SMTP_BENCH_PREBUILT=1` one pre-formatted message is sent (the pool alone).
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs an external SMTP sink; run by hand"]
async fn throughput_against_an_external_sink() {
    let Ok(target) = std::env::var("TOCSIN_SMTP_BENCH") else {
        eprintln!("set TOCSIN_SMTP_BENCH=host:port");
        return;
    };
    let env_num = |k: &str, d: usize| std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d);
    let total = env_num("TOCSIN_SMTP_BENCH_MESSAGES", 20_000);
    let concurrency = env_num("TOCSIN_SMTP_BENCH_CONCURRENCY", 16);
    let (host, port) = target.rsplit_once(':').expect("host:port");
    let mut s = settings(port.parse().expect("port"), "none");
    s.smtp.host = host.to_owned();
    s.smtp.pool_size = u32::try_from(concurrency).expect("pool size");
    let t = Arc::new(transport(&s));
    // ~2 KB: 1 KB of text and 1 KB of HTML.
    let text: Arc<str> = "Dear merchant, we write about a security incident. ".repeat(20).into();
    let html: Arc<str> = format!("<p>{}</p>", "Dear merchant, we write about an incident. ".repeat(23)).into();
    let prebuilt = std::env::var("TOCSIN_SMTP_BENCH_PREBUILT").is_ok_and(|v| v == "1");
    fn pool_of(t: &EmailTransport) -> &tocsin::channels::smtp::SmtpPool {
        t.smtp_pool().expect("smtp")
    }
    let started = std::time::Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..concurrency {
        let (t, text, html) = (Arc::clone(&t), Arc::clone(&text), Arc::clone(&html));
        let n = total / concurrency + usize::from(w < total % concurrency);
        workers.spawn(async move {
            let mut bytes = 0usize;
            for i in 0..n {
                let key = format!("bench-{w}-{i}");
                let m = Mail {
                    to: "merchant@shop.example",
                    subject: "Security incident notice",
                    text: &text,
                    html: &html,
                    language: "en",
                    key: &key,
                    delivery: None,
                };
                if prebuilt {
                    // The pool alone: the same pre-formatted message every time.
                    let (envelope, raw) = t.build(&m, true).expect("builds");
                    bytes = raw.len();
                    for _ in 0..n {
                        pool_of(&t).send(&envelope, &raw).await.expect("sent");
                    }
                    break;
                }
                if i == 0 {
                    bytes = t.build(&m, true).expect("builds").1.len();
                }
                t.send_mail(&m).await.expect("sent");
            }
            bytes
        });
    }
    let mut size = 0;
    while let Some(r) = workers.join_next().await {
        size = size.max(r.expect("worker"));
    }
    let secs = started.elapsed().as_secs_f64();
    let pool = t.smtp_pool().expect("smtp");
    eprintln!(
        "pool{}: {total} messages of {size} bytes, {concurrency} concurrent, {} connections: {secs:.2} s, {:.0} msg/s",
        if prebuilt {
            " (pre-built message)"
        } else {
            " (building each message)"
        },
        pool.connections_opened(),
        total as f64 / secs
    );
}
