//! The delivery benchmarks, run small against real peers on loopback: every notice reaches the
//! peer and is recorded, and the figures a reader compares with the reference tools are right
//! (the octets per email that `smtp-source -l` must send, the requests of the HTTP floor).

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use common::smtp_server::SmtpServer;
use common::*;
use wiremock::matchers::{header_exists, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

const NOTICES: usize = 240;

/// `tocsin bench deliver` of [`NOTICES`] notices on `channel` to `--smtp`/`--url` `target`.
fn bench_deliver(t: &Tocsin, channel: &str, target_flag: &str, target: &str) -> serde_json::Value {
    let notices = NOTICES.to_string();
    let args = [
        "bench",
        "deliver",
        "--channel",
        channel,
        target_flag,
        target,
        "--notices",
        &notices,
        "--concurrency",
        "8",
        "--batch",
        "64",
    ];
    t.run(&args).ok().json()
}

#[tokio::test]
async fn the_email_benchmark_delivers_every_notice_and_reports_the_size_the_reference_must_send() {
    let server = SmtpServer::start().await;
    let t = Tocsin::new();
    let smtp = format!("127.0.0.1:{}", server.port());
    let report = tokio::task::spawn_blocking(move || bench_deliver(&t, "email", "--smtp", &smtp))
        .await
        .expect("bench ran");
    assert_eq!(report["accepted"], NOTICES);
    assert_eq!(report["failed"], 0);
    let received = server.messages();
    assert_eq!(received.len(), NOTICES, "every notice reached the server once");
    let mean = received.iter().map(|m| m.data.len()).sum::<usize>() as f64 / NOTICES as f64;
    let reported = report["octets_per_notice"].as_f64().expect("octets_per_notice");
    // The server's copy lacks the CRLF before the closing dot, which the client counts.
    assert!(
        (reported - mean).abs() <= 2.0,
        "reported {reported} octets per notice, the server received {mean}"
    );
    assert!(report["per_second"].as_f64().unwrap_or(0.0) > 0.0);
    assert!(report["cpu_us_per_notice"].as_f64().unwrap_or(0.0) > 0.0);
}

#[tokio::test]
async fn the_http_benchmarks_send_every_request_signed() {
    let peer = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/sms"))
        .and(header_exists("x-tocsin-signature"))
        .and(header_exists("idempotency-key"))
        .respond_with(ResponseTemplate::new(200).set_body_string(r#"{"id":"sink"}"#))
        .mount(&peer)
        .await;
    let url = format!("{}/sms", peer.uri());
    let notices = NOTICES.to_string();
    let t = Tocsin::new();
    let (deliver, floor) = {
        let (url, notices) = (url.clone(), notices.clone());
        tokio::task::spawn_blocking(move || {
            let deliver = bench_deliver(&t, "sms", "--url", &url);
            let floor = t
                .run(&[
                    "bench",
                    "http-floor",
                    "--url",
                    &url,
                    "--requests",
                    &notices,
                    "--concurrency",
                    "8",
                ])
                .ok()
                .json();
            (deliver, floor)
        })
        .await
        .expect("benches ran")
    };
    assert_eq!(deliver["accepted"], NOTICES);
    assert_eq!(deliver["failed"], 0);
    assert_eq!(floor["requests"], NOTICES);
    assert_eq!(floor["failed"], 0);
    let requests = peer.received_requests().await.unwrap_or_default();
    assert_eq!(
        requests.len(),
        2 * NOTICES,
        "each notice and each floor request reached the peer once"
    );
    // The floor's requests are shaped like the webhook's: the same headers, a body as large.
    let size = |r: &wiremock::Request| r.body.len() as f64;
    let (sent, floor_sent) = requests.split_at(NOTICES);
    let mean = |rs: &[wiremock::Request]| rs.iter().map(size).sum::<f64>() / rs.len() as f64;
    assert!(
        (mean(sent) - mean(floor_sent)).abs() < 0.25 * mean(sent),
        "floor bodies {} octets, notices {}",
        mean(floor_sent),
        mean(sent)
    );
}

#[test]
fn the_benchmark_sink_answers_every_request() {
    let listen = format!("127.0.0.1:{}", free_port());
    let mut sink = Command::new(BIN)
        .args(["bench", "sink", "--listen", &listen])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the sink");
    let mut line = String::new();
    BufReader::new(sink.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("the listening line");
    assert!(line.contains(&listen), "unexpected first line: {line:?}");
    let answer = (|| -> std::io::Result<String> {
        use std::io::{Read, Write};
        let mut conn = std::net::TcpStream::connect(&listen)?;
        conn.write_all(b"POST /anything HTTP/1.1\r\nHost: sink\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")?;
        let mut text = String::new();
        conn.read_to_string(&mut text)?;
        Ok(text)
    })();
    let _ = sink.kill();
    let _ = sink.wait();
    let answer = answer.expect("the sink answers");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with(r#"{"id":"sink"}"#), "{answer}");
}
