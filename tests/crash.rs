//! Crashes and stops of `tocsin serve` in the middle of a large dispatch, through the real
//! binary and a real SMTP server on loopback: a SIGKILL loses no delivery and re-sends only what
//! was in flight when the process died (the rows it had claimed and not yet recorded), and a
//! SIGTERM stops claiming at once, finishes and records what is in flight and exits cleanly, so
//! that a restart sends nothing twice.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use common::smtp_server::SmtpServer;
use common::*;
use serde_json::Value;

const HOLDINGS: &[&str] = &["account_credentials"];

/// `n` merchants with an email address each (and nothing else), as JSONL.
fn merchants(prefix: &str, n: usize) -> String {
    (0..n)
        .map(|i| {
            let id = format!("{prefix}-{i:05}");
            let locale = if i % 2 == 0 { "en" } else { "zh-CN" };
            merchant(
                &id,
                locale,
                Some(&format!("{id}@shop{}.example.com", i % 97)),
                None,
                None,
                HOLDINGS,
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Imports `n` merchants, opens and confirms an incident, scopes every merchant holding
/// account credentials (all of them), drafts as alice, approves as bob and queues the
/// deliveries without sending (`dispatch --no-wait`); returns the incident id.
fn queued_incident(t: &Tocsin, prefix: &str, n: usize) -> String {
    let imported = t
        .run(&[
            "--json",
            "merchants",
            "import",
            &t.file(&format!("{prefix}.jsonl"), &merchants(prefix, n)),
        ])
        .ok()
        .json();
    assert_eq!(imported["counts"]["inserted"], n, "{imported:#}");
    let incident = confirmed_incident(t, prefix);
    let scope = t
        .run(&[
            "--json",
            "--actor",
            "alice",
            "incidents",
            "scope",
            &incident,
            "--categories",
            "account_credentials",
        ])
        .ok()
        .json();
    assert_eq!(scope["affected"], n, "{scope:#}");
    t.run(&["--actor", "alice", "incidents", "draft", &incident]).ok();
    t.run(&["--actor", "bob", "incidents", "approve", &incident]).ok();
    let queued = t
        .run(&[
            "--json",
            "--actor",
            "alice",
            "incidents",
            "dispatch",
            &incident,
            "--no-wait",
        ])
        .ok()
        .json();
    assert_eq!(queued["queued"], n, "{queued:#}");
    incident
}

fn deliveries(t: &Tocsin, incident: &str) -> Vec<Value> {
    t.run(&["--json", "incidents", "deliveries", incident])
        .ok()
        .json()
        .as_array()
        .expect("a list of deliveries")
        .clone()
}

fn by_status(list: &[Value]) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for d in list {
        *counts
            .entry(d["status"].as_str().unwrap_or("?").to_owned())
            .or_insert(0) += 1;
    }
    counts
}

fn ids_with_status(list: &[Value], status: &str) -> HashSet<String> {
    list.iter()
        .filter(|d| d["status"] == status)
        .map(|d| d["id"].as_str().expect("delivery id").to_owned())
        .collect()
}

/// Polls the running server's API until the incident has no delivery pending or sending and
/// `sent` of them were accepted; returns how long it took.
async fn until_all_sent(server: &Server, token: &str, incident: &str, sent: usize, timeout: Duration) -> Duration {
    let client = reqwest::Client::new();
    let url = format!("{}/api/v1/incidents/{incident}", server.base);
    let start = Instant::now();
    let mut last = Value::Null;
    loop {
        if let Ok(r) = client.get(&url).bearer_auth(token).send().await
            && let Ok(view) = r.json::<Value>().await
        {
            let email = view["deliveries"]
                .as_array()
                .and_then(|l| l.iter().find(|c| c["channel"] == "email"))
                .cloned()
                .unwrap_or(Value::Null);
            if email["pending"] == 0 && email["sent"] == sent {
                return start.elapsed();
            }
            last = email;
        }
        assert!(
            start.elapsed() < timeout,
            "not all {sent} deliveries were sent within {timeout:?}; last tally: {last:#}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Polls until the SMTP server has accepted at least `n` messages; returns how long it took.
async fn until_received(smtp: &SmtpServer, n: usize, timeout: Duration) -> Duration {
    let start = Instant::now();
    while smtp.count() < n {
        assert!(
            start.elapsed() < timeout,
            "only {} of {n} messages arrived within {timeout:?}",
            smtp.count()
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    start.elapsed()
}

/// Waits until the SMTP server's count stops moving (bytes already in its sockets when the
/// sender died or stopped are still read); returns the final count.
async fn settled_count(smtp: &SmtpServer) -> usize {
    let mut last = smtp.count();
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = smtp.count();
        if now == last {
            return now;
        }
        last = now;
    }
}

/// How many times each Message-ID arrived; panics on a message without one.
fn arrivals(smtp: &SmtpServer) -> HashMap<String, usize> {
    let mut seen = HashMap::new();
    for (i, id) in smtp.message_ids().into_iter().enumerate() {
        let id = id.unwrap_or_else(|| panic!("message {i} has no Message-ID"));
        *seen.entry(id).or_insert(0) += 1;
    }
    seen
}

fn lost_lease_warnings(log: &str) -> usize {
    log.lines().filter(|l| l.contains("leases lost")).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkill_mid_delivery_loses_nothing_and_duplicates_only_what_was_in_flight() {
    const N: usize = 10_000;
    const KILL_AFTER: usize = 2_000;
    tocsin::install_crypto_provider();
    let started = Instant::now();
    let smtp = SmtpServer::start().await;
    let mut t = Tocsin::new();
    t.smtp(smtp.port())
        // A short lease so the restarted worker takes the dead one's rows over quickly; many
        // sends in flight at once so the kill catches some of them.
        .set("TOCSIN_DELIVERY__LEASE_SECONDS", "2")
        .set("TOCSIN_DELIVERY__CONCURRENCY", "32")
        .set("TOCSIN_DELIVERY__BATCH", "128");
    let incident = queued_incident(&t, "ck", N);
    let setup = started.elapsed();
    let queued = deliveries(&t, &incident);
    assert_eq!(queued.len(), N);
    assert_eq!(by_status(&queued).get("pending"), Some(&N), "--no-wait sent nothing");
    assert_eq!(smtp.count(), 0);

    // Run until a good share went out, then kill the process outright.
    let mut server = t.serve_logged("serve-1.log");
    let to_kill = until_received(&smtp, KILL_AFTER, Duration::from_secs(120)).await;
    server.kill_hard();
    let seen_at_kill = smtp.count();
    let received_at_kill = settled_count(&smtp).await;
    drop(server);
    assert!(
        received_at_kill < N,
        "the kill came too late to prove anything: {received_at_kill} of {N} already received"
    );

    // With no process running: what the store says was claimed and not recorded.
    let at_kill = deliveries(&t, &incident);
    let counts = by_status(&at_kill);
    let sending_at_kill = ids_with_status(&at_kill, "sending");
    let s = sending_at_kill.len();
    let accepted_at_kill = counts.get("accepted").copied().unwrap_or(0);
    let pending_at_kill = counts.get("pending").copied().unwrap_or(0);
    assert_eq!(
        s + accepted_at_kill + pending_at_kill,
        N,
        "at the kill every delivery is pending, sending or accepted: {counts:?}"
    );
    assert!(
        received_at_kill >= accepted_at_kill,
        "{accepted_at_kill} recorded as accepted but only {received_at_kill} received"
    );
    assert!(
        received_at_kill - accepted_at_kill <= s,
        "{} messages arrived without being recorded, more than the {s} sends in flight",
        received_at_kill - accepted_at_kill
    );

    // Restart and let it finish.
    let restarted = Instant::now();
    let mut server = t.serve_logged("serve-2.log");
    let to_finish = until_all_sent(
        &server,
        &t.token("watcher", "auditor"),
        &incident,
        N,
        Duration::from_secs(180),
    )
    .await;
    server.terminate();
    let exit = server.wait_exit(Duration::from_secs(20));
    assert!(exit.is_some_and(|s| s.success()), "serve exits cleanly: {exit:?}");
    let restart_total = restarted.elapsed();
    drop(server);
    let received = settled_count(&smtp).await;

    // Nothing lost: every delivery accepted, each with its Message-ID received at least once.
    let after = deliveries(&t, &incident);
    assert_eq!(after.len(), N, "no delivery appeared or vanished");
    assert_eq!(by_status(&after).get("accepted"), Some(&N), "{:?}", by_status(&after));
    let seen = arrivals(&smtp);
    let mut owner: HashMap<String, String> = HashMap::new();
    for d in &after {
        let mid = d["provider_message_id"]
            .as_str()
            .unwrap_or_else(|| panic!("accepted without a Message-ID: {d:#}"));
        assert!(seen.contains_key(mid), "delivery {} ({mid}) never arrived", d["id"]);
        assert!(
            owner
                .insert(mid.to_owned(), d["id"].as_str().expect("id").to_owned())
                .is_none(),
            "two deliveries share the Message-ID {mid}"
        );
        assert!(
            d["attempts"].as_i64().unwrap_or(0) == 1 || sending_at_kill.contains(d["id"].as_str().expect("id")),
            "only rows the dead worker held were claimed again: {d:#}"
        );
    }
    assert_eq!(seen.len(), N, "every message that arrived belongs to a delivery");
    // Every message went to its delivery's address.
    let address: HashMap<&str, &str> = after
        .iter()
        .map(|d| {
            (
                d["provider_message_id"].as_str().expect("mid"),
                d["address"].as_str().expect("address"),
            )
        })
        .collect();
    for m in smtp.messages() {
        let mid = m.header("Message-ID").expect("Message-ID");
        let mid = mid.trim_matches(['<', '>']);
        assert_eq!(m.rcpt_to, [address[mid]], "message {mid} went to its own recipient");
    }

    // Duplicates only of what was in flight.
    let duplicates = received - seen.len();
    let duplicated: Vec<(&String, &usize)> = seen.iter().filter(|(_, n)| **n > 1).collect();
    for (mid, times) in &duplicated {
        assert!(
            sending_at_kill.contains(&owner[*mid]),
            "{mid} arrived {times} times but its delivery {} was not in flight at the kill",
            owner[*mid]
        );
        assert_eq!(**times, 2, "{mid}: at most one resend per delivery");
    }
    assert!(
        duplicates <= s,
        "{duplicates} duplicates, more than the {s} deliveries in flight at the kill"
    );
    let reclaimed = after.iter().filter(|d| d["attempts"].as_i64().unwrap_or(0) > 1).count();
    assert_eq!(
        reclaimed, s,
        "each row held at the kill was claimed again once, no other"
    );
    let lost = lost_lease_warnings(&t.log("serve-1.log")) + lost_lease_warnings(&t.log("serve-2.log"));

    // Every merchant counts as reached, and the evidence survived the crash: the ledger's
    // hash chain is intact.
    let view = t.run(&["--json", "incidents", "show", &incident]).ok().json();
    assert_eq!(view["reached"], N, "every merchant reached");
    t.run(&["audit", "verify"]).ok();

    eprintln!(
        "sigkill: {N} deliveries; setup {setup:.1?}; first {KILL_AFTER} received after {to_kill:.1?}; \
         {seen_at_kill} received at the kill ({received_at_kill} once settled); at the kill \
         {accepted_at_kill} accepted, S = {s} sending, {pending_at_kill} pending; restart finished in \
         {to_finish:.1?} ({restart_total:.1?} with the stop); {received} messages for {} Message-IDs: \
         {duplicates} duplicates; lost-lease warnings {lost}; total {:.1?}",
        seen.len(),
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_claiming_finishes_what_is_in_flight_and_exits_cleanly() {
    const N: usize = 3_000;
    tocsin::install_crypto_provider();
    let started = Instant::now();
    let smtp = SmtpServer::start().await;
    let mut t = Tocsin::new();
    t.smtp(smtp.port())
        .set("TOCSIN_DELIVERY__CONCURRENCY", "20")
        .set("TOCSIN_DELIVERY__BATCH", "128");
    let incident = queued_incident(&t, "ct", N);
    let setup = started.elapsed();

    // A slow relay: each message is recorded at its final dot and its 250 held for a while, so
    // the signal comes while messages have arrived that Tocsin does not know about yet.
    smtp.set_data_delay(Duration::from_millis(300));
    let mut server = t.serve_logged("serve-1.log");
    until_received(&smtp, 50, Duration::from_secs(60)).await;
    let start = Instant::now();
    while smtp.holding() == 0 {
        assert!(start.elapsed() < Duration::from_secs(30), "no send ever in flight");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let signalled = Instant::now();
    server.terminate();
    let (before_signal, held_at_signal) = (smtp.count(), smtp.holding());
    let exit = server.wait_exit(Duration::from_secs(15));
    let to_exit = signalled.elapsed();
    let status = exit.unwrap_or_else(|| panic!("serve still running {to_exit:?} after SIGTERM"));
    assert!(status.success(), "serve exits with success on SIGTERM: {status}");
    assert!(to_exit < Duration::from_secs(10), "stopped in {to_exit:?}");
    drop(server);
    let at_exit = smtp.count();
    let received = settled_count(&smtp).await;
    assert_eq!(
        received, at_exit,
        "nothing arrived after the process had exited: it had waited for its sends"
    );
    let sent_after_signal = received - before_signal;

    let stopped = deliveries(&t, &incident);
    let counts = by_status(&stopped);
    assert_eq!(counts.get("sending"), None, "nothing left claimed: {counts:?}");
    let pending = counts.get("pending").copied().unwrap_or(0);
    let accepted = counts.get("accepted").copied().unwrap_or(0);
    assert!(pending > 0, "it stopped claiming: {counts:?}");
    assert_eq!(pending + accepted, N, "{counts:?}");
    // Everything sent was recorded, and everything recorded was sent.
    let recorded: HashSet<&str> = stopped
        .iter()
        .filter(|d| d["status"] == "accepted")
        .map(|d| d["provider_message_id"].as_str().expect("accepted with a Message-ID"))
        .collect();
    let seen = arrivals(&smtp);
    assert_eq!(seen.len(), received, "no message arrived twice before the stop");
    for mid in seen.keys() {
        assert!(
            recorded.contains(mid.as_str()),
            "{mid} was sent but its delivery is not recorded as accepted"
        );
    }
    assert_eq!(recorded.len(), received, "every accepted delivery arrived");
    let log = t.log("serve-1.log");
    assert!(log.contains("stopping"), "the server said it was stopping:\n{log}");

    // Restart (a quick relay now) and finish: nothing sent twice.
    smtp.set_data_delay(Duration::ZERO);
    let mut server = t.serve_logged("serve-2.log");
    let to_finish = until_all_sent(
        &server,
        &t.token("watcher", "auditor"),
        &incident,
        N,
        Duration::from_secs(120),
    )
    .await;
    server.terminate();
    let exit = server.wait_exit(Duration::from_secs(15));
    assert!(exit.is_some_and(|s| s.success()), "{exit:?}");
    drop(server);
    let total = settled_count(&smtp).await;
    let seen = arrivals(&smtp);
    let after = deliveries(&t, &incident);
    assert_eq!(by_status(&after).get("accepted"), Some(&N), "{:?}", by_status(&after));
    assert_eq!(total, N, "exactly one message per delivery, no duplicates");
    assert_eq!(seen.len(), N);
    for d in &after {
        assert_eq!(d["attempts"], 1, "no delivery was claimed twice: {d:#}");
        let mid = d["provider_message_id"].as_str().expect("Message-ID");
        assert_eq!(seen.get(mid), Some(&1), "{mid}");
    }
    let view = t.run(&["--json", "incidents", "show", &incident]).ok().json();
    assert_eq!(view["reached"], N, "every merchant reached");
    t.run(&["audit", "verify"]).ok();

    eprintln!(
        "sigterm: {N} deliveries; setup {setup:.1?}; {before_signal} received at the signal, \
         {held_at_signal} of them awaiting their 250, {sent_after_signal} more sent after it; exited {status} in {to_exit:.2?}; {accepted} accepted, \
         {pending} pending at the stop; restart finished in {to_finish:.1?}; {total} messages, 0 duplicates; \
         total {:.1?}",
        started.elapsed()
    );
}
