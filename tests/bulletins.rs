//! Public bulletins through the `tocsin` binary: a cohort too often without contact data gets
//! its bulletin as the notices go out, covering every affected merchant and saying why; every
//! update is an entry of the Atom feed as a real feed parser reads it; both pages parse as HTML
//! without an error, with their language and headings in order; the status page gets each version.

mod common;

use common::*;
use serde_json::Value;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

const SECRET: &str = "status-page-secret";

#[tokio::test]
async fn a_disproportionate_cohort_is_covered_by_a_bulletin_whose_feed_carries_every_update() {
    // The external status page is down for the first push, then takes every version.
    let status = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/bulletins"))
        .respond_with(ResponseTemplate::new(503))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&status)
        .await;
    Mock::given(method("POST"))
        .and(path("/bulletins"))
        .respond_with(ResponseTemplate::new(200))
        .with_priority(2)
        .mount(&status)
        .await;
    let url = format!("{}/bulletins", status.uri());
    tokio::task::spawn_blocking(move || publish_and_update(&url))
        .await
        .expect("flow");
    let pushes = status.received_requests().await.unwrap_or_default();
    let versions: Vec<(i64, String)> = pushes
        .iter()
        .map(|r| {
            let body: Value = serde_json::from_slice(&r.body).expect("json");
            assert_signed(r, SECRET);
            (
                body["version"].as_i64().unwrap_or(0),
                header_text(r, "idempotency-key").to_owned(),
            )
        })
        .collect();
    // Version 1 refused, then versions 1 and 2 taken when version 2 was published.
    assert_eq!(
        versions,
        [
            (1, "bulletin:INC-2026-0001:1".to_owned()),
            (1, "bulletin:INC-2026-0001:1".to_owned()),
            (2, "bulletin:INC-2026-0001:2".to_owned())
        ]
    );
}

fn publish_and_update(status_page: &str) {
    let mut t = Tocsin::new();
    t.set("TOCSIN_BULLETIN__STATUS_PAGE_URL", status_page)
        .set("TOCSIN_BULLETIN__STATUS_PAGE_SECRET", SECRET);
    // One merchant in three has no contact data: over the 30% threshold.
    t.set("TOCSIN_BULLETIN__NO_CONTACT_SHARE", "0.3");
    let merchants = [
        merchant(
            "b-1",
            "en",
            Some("b1@example.com"),
            None,
            None,
            &["account_credentials"],
        ),
        merchant(
            "b-2",
            "zh-CN",
            None,
            Some("+8613800000201"),
            None,
            &["account_credentials"],
        ),
        merchant("b-3", "en", None, None, None, &["account_credentials"]),
    ]
    .join("\n");
    let incident = approved_incident(&t, "bulletins", &merchants, "b-1,b-2,b-3");
    t.run(&["--actor", "alice", "incidents", "dispatch", &incident]).ok();

    let view = t.run(&["--json", "incidents", "show", &incident]).ok().json();
    let first = &view["bulletins"][0];
    assert_eq!(first["covered"], 3, "the bulletin stands in for every notice: {first}");
    let reason = first["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("1 of 3") && reason.contains("no contact data"),
        "{reason}"
    );

    // An update: the facts change, so does the bulletin; the feed keeps both entries.
    let mut facts: Value =
        serde_json::from_str(&std::fs::read_to_string(repo("config/demo/incident.json")).expect("facts"))
            .expect("json");
    facts["measures_taken"]["en"] = Value::from("We reset every exposed password and closed the export interface.");
    facts["measures_taken"]["zh-CN"] = Value::from("我们已重置所有泄露的密码并关闭了导出接口。");
    let file = t.file("amended.json", &facts.to_string());
    t.run(&[
        "--actor",
        "alice",
        "incidents",
        "amend",
        &incident,
        "--facts",
        &file,
        "--reason",
        "passwords reset",
    ])
    .ok();
    t.run(&["--actor", "alice", "incidents", "bulletin", &incident]).ok();
    let view = t.run(&["--json", "incidents", "show", &incident]).ok().json();
    let versions = view["bulletins"].as_array().map(Vec::len).unwrap_or(0);
    assert_eq!(versions, 2, "{}", view["bulletins"]);

    let reference = view["incident"]["reference"].as_str().expect("reference");
    let folder = t.data_dir().join("publish/bulletins").join(reference);
    let atom = std::fs::read(folder.join("feed.atom")).expect("feed");
    let feed = feed_rs::parser::parse(atom.as_slice()).expect("a valid Atom feed");
    assert_eq!(feed.feed_type, feed_rs::model::FeedType::Atom);
    assert_eq!(feed.entries.len(), 2, "every update is an entry");
    let mut ids: Vec<&str> = feed.entries.iter().map(|e| e.id.as_str()).collect();
    ids.dedup();
    assert_eq!(ids.len(), 2, "each with its own id");
    assert!(feed.entries.iter().all(|e| e.updated.is_some() && e.title.is_some()));
    // Both pages parse as HTML without a single error, with their language and headings in
    // order (no level skipped).
    for (file, lang) in [("index.html", "zh-CN"), ("index.en.html", "en")] {
        let html = std::fs::read_to_string(folder.join(file)).expect("page");
        check_html(&html, lang);
    }
    // The page shows both updates and the lookup form, and nobody's data.
    let page = std::fs::read_to_string(folder.join("index.en.html")).expect("page");
    assert_eq!(page.matches("<li><time>").count(), 2, "two updates in the timeline");
    for personal in ["b-1", "b1@example.com", "+86138", "Merchant b"] {
        assert!(!page.contains(personal), "the bulletin leaks {personal}");
    }
}

/// Parses `html` as the HTML standard does (html5ever, with every parse error reported) and
/// checks there is none, that `<html lang>` is `lang` and that headings never skip a level.
fn check_html(html: &str, lang: &str) {
    use html5ever::tendril::TendrilSink;
    use markup5ever_rcdom::{Handle, NodeData, RcDom};
    let opts = html5ever::ParseOpts {
        tree_builder: html5ever::tree_builder::TreeBuilderOpts {
            exact_errors: true,
            ..Default::default()
        },
        ..Default::default()
    };
    let dom = html5ever::parse_document(RcDom::default(), opts)
        .from_utf8()
        .read_from(&mut html.as_bytes())
        .expect("parsed");
    let errors = dom.errors.borrow();
    assert!(errors.is_empty(), "HTML errors: {errors:?}");
    fn walk(node: &Handle, found: &mut Vec<(String, Option<String>)>) {
        if let NodeData::Element { name, attrs, .. } = &node.data {
            let lang = attrs
                .borrow()
                .iter()
                .find(|a| &*a.name.local == "lang")
                .map(|a| a.value.to_string());
            found.push((name.local.to_string(), lang));
        }
        for child in node.children.borrow().iter() {
            walk(child, found);
        }
    }
    let mut elements = Vec::new();
    walk(&dom.document, &mut elements);
    assert_eq!(elements.first(), Some(&("html".to_owned(), Some(lang.to_owned()))));
    let levels: Vec<u32> = elements
        .iter()
        .filter_map(|(name, _)| name.strip_prefix('h').and_then(|n| n.parse().ok()))
        .collect();
    assert_eq!(levels.first(), Some(&1), "{levels:?}");
    assert!(
        levels.windows(2).all(|w| w[1] <= w[0] + 1),
        "a heading level skipped: {levels:?}"
    );
}

/// The checker itself catches a stray end tag.
#[test]
#[should_panic(expected = "HTML errors")]
fn the_html_check_catches_a_stray_end_tag() {
    check_html(
        "<!DOCTYPE html><html lang=\"en\"><head><title>x</title></head><body><h1>a</h1></span><p>x</body></html>",
        "en",
    );
}
