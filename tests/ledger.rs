//! The audit ledger against someone with write access to the database: the triggers that
//! refuse UPDATE and DELETE are dropped first, then rows are edited, deleted, reordered and
//! cut off. `tocsin audit verify` finds each (exit code 3) and names the first broken entry;
//! cutting off the newest entries shows against an anchor recorded earlier.

mod common;

use common::*;
use sqlx::Connection;

/// Runs the demo in a fresh data directory, returns it with the verified anchor.
fn demo() -> (Tocsin, String) {
    let t = Tocsin::new();
    t.run(&["demo"]).ok();
    let out = t.run(&["audit", "verify"]).ok().stdout;
    let anchor = out
        .lines()
        .find_map(|l| l.strip_prefix("anchor for later checks: --anchor "))
        .expect("the anchor is printed")
        .to_owned();
    (t, anchor)
}

/// Runs `sql` against the demo's database as an attacker would: triggers dropped first.
async fn tamper(t: &Tocsin, sql: &[&str]) {
    let url = format!("sqlite://{}", t.data_dir().join("tocsin.db").display());
    let mut db = sqlx::SqliteConnection::connect(&url).await.expect("open the database");
    for statement in ["DROP TRIGGER ledger_no_update", "DROP TRIGGER ledger_no_delete"]
        .iter()
        .chain(sql)
    {
        // The test's own statements: the point is to run them unchecked.
        sqlx::query(sqlx::AssertSqlSafe(statement.to_string()))
            .execute(&mut db)
            .await
            .expect(statement);
    }
    db.close().await.expect("close");
}

fn broken_at(t: &Tocsin, extra: &[&str]) -> String {
    let mut args = vec!["audit", "verify"];
    args.extend_from_slice(extra);
    let run = t.run(&args);
    assert_eq!(run.code, 3, "the tampering goes unnoticed: {}", run.stdout);
    run.stdout
}

#[tokio::test]
async fn edited_deleted_reordered_and_cut_off_entries_are_each_detected() {
    // Edited: who approved is changed in entry 10.
    let (t, _) = demo();
    tamper(&t, &["UPDATE ledger SET actor = 'mallory' WHERE seq = 10"]).await;
    let out = broken_at(&t, &[]);
    assert!(out.contains("entry 10") && out.contains("changed"), "{out}");

    // Edited, and the hash recomputed by a careless forger: the next entry no longer links.
    let (t, _) = demo();
    tamper(&t, &["UPDATE ledger SET detail = '{}', hash = 'f00' WHERE seq = 12"]).await;
    let out = broken_at(&t, &[]);
    assert!(out.contains("entry 12"), "{out}");

    // Deleted: entry 5 removed.
    let (t, _) = demo();
    tamper(&t, &["DELETE FROM ledger WHERE seq = 5"]).await;
    let out = broken_at(&t, &[]);
    assert!(out.contains("entry 6") && out.contains("removed or moved"), "{out}");

    // Reordered: entries 7 and 8 swap places (their numbers stay in sequence).
    let (t, _) = demo();
    tamper(
        &t,
        &[
            "UPDATE ledger SET seq = -7 WHERE seq = 7",
            "UPDATE ledger SET seq = 7 WHERE seq = 8",
            "UPDATE ledger SET seq = 8 WHERE seq = -7",
        ],
    )
    .await;
    let out = broken_at(&t, &[]);
    assert!(out.contains("entry 7"), "{out}");

    // Cut off: the newest entries deleted. The chain that is left is whole, but the anchor
    // recorded before shows it.
    let (t, anchor) = demo();
    let newest: i64 = anchor
        .split(':')
        .next()
        .and_then(|n| n.parse().ok())
        .expect("entry number");
    tamper(&t, &[&format!("DELETE FROM ledger WHERE seq > {}", newest - 3)]).await;
    assert_eq!(t.run(&["audit", "verify"]).code, 0, "a cut chain is still a chain");
    let out = broken_at(&t, &["--anchor", &anchor]);
    assert!(
        out.contains(&format!("entry {newest}")) && out.contains("cut back"),
        "{out}"
    );

    // An untouched ledger passes with its anchor.
    let (t, anchor) = demo();
    t.run(&["audit", "verify", "--anchor", &anchor]).ok();
}
