//! The merchant directory: import from JSON Lines or CSV (schema in
//! `config/schemas/merchant.schema.json`). Each row is parsed on its own: a bad row is
//! reported with its line number, field and reason and nothing of it is stored; good rows
//! are upserted by id, so re-importing updates and never duplicates.

use std::collections::BTreeSet;
use std::path::Path;

use serde::Serialize;
use serde_json::{Map, Value};

use crate::domain::{FieldError, MerchantId};
use crate::input::Fields;
use crate::model::{Merchant, People};
use crate::store::{Store, StoreError, UpsertCounts};
use crate::taxonomy::Taxonomy;

#[derive(Debug, thiserror::Error)]
pub enum DirectoryError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}: unknown format; use a .jsonl, .json or .csv file")]
    Format(String),
    #[error("CSV header: {0}")]
    Header(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A rejected row: where, which field, why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RowError {
    pub line: u64,
    pub field: String,
    pub reason: String,
}

impl std::fmt::Display for RowError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}: {}: {}", self.line, self.field, self.reason)
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ImportReport {
    pub counts: UpsertCounts,
    pub rejected: Vec<RowError>,
}

/// An ISO 3166-1 country (`SG`) or 3166-2 subdivision (`CN-ZJ`) code.
pub fn is_region(region: &str) -> bool {
    let (country, sub) = region.split_once('-').unwrap_or((region, ""));
    country.len() == 2
        && country.chars().all(|c| c.is_ascii_uppercase())
        && (region.len() == 2
            || (1..=3).contains(&sub.len()) && sub.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit()))
}

/// Parses one merchant record.
pub fn parse_merchant(value: &Value, taxonomy: &Taxonomy) -> Result<Merchant, FieldError> {
    let mut f = Fields::of(value)?;
    let id: MerchantId = f.parsed("id")?;
    let region = f.string("region", 2, 6)?;
    let region_ok = is_region(&region);
    if !region_ok {
        return Err(FieldError::new(
            "region",
            "must be an ISO 3166 code such as CN-ZJ, SG or DE",
        ));
    }
    let holdings: Vec<_> = f.list("holdings", |s, field| taxonomy.parse_category(s, field))?;
    let merchant = Merchant {
        id,
        name: f.string("name", 1, 200)?,
        kind: f.parsed("kind")?,
        locale: f.parsed("locale")?,
        region,
        email: f.opt_parsed("email")?,
        phone: f.opt_parsed("phone")?,
        push_token: f.opt_parsed("push_token")?,
        postal_address: f.opt_string("postal_address", 1, 500)?,
        holdings: holdings.into_iter().collect::<BTreeSet<_>>(),
        created_at: f.opt_time("created_at")?,
        last_active_at: f.opt_time("last_active_at")?,
        marketing_opt_out: f.opt_bool("marketing_opt_out")?.unwrap_or(false),
        people: People {
            representative: f.opt_string("representative_key", 1, 128)?,
            contacts: f.list("contact_keys", person_key)?,
            sub_accounts: f.list("sub_account_keys", person_key)?,
        },
    };
    f.finish()?;
    Ok(merchant)
}

/// An opaque key for a natural person (for example a hash of an ID number): never the number.
fn person_key(raw: &str, field: &str) -> Result<String, FieldError> {
    let key = raw.trim();
    if (1..=128).contains(&key.len()) && key.chars().all(|c| c.is_ascii_graphic()) {
        Ok(key.to_owned())
    } else {
        Err(FieldError::new(field, "must be 1-128 printable ASCII characters"))
    }
}

fn row_error(line: u64, e: FieldError) -> RowError {
    RowError {
        line,
        field: e.field,
        reason: e.reason,
    }
}

/// Keeps a parsed row unless its id already appeared in the file: which of two rows for one
/// merchant is right is not ours to guess.
#[derive(Default)]
struct Kept {
    rows: Vec<Merchant>,
    lines: std::collections::HashMap<MerchantId, u64>,
}

fn keep(line: u64, m: Merchant, good: &mut Kept, bad: &mut Vec<RowError>) {
    match good.lines.get(&m.id) {
        Some(first) => bad.push(RowError {
            line,
            field: "id".into(),
            reason: format!("repeats the id of line {first}"),
        }),
        None => {
            good.lines.insert(m.id.clone(), line);
            good.rows.push(m);
        }
    }
}

/// Parses JSON Lines; blank lines are skipped.
pub fn parse_jsonl(text: &str, taxonomy: &Taxonomy) -> (Vec<Merchant>, Vec<RowError>) {
    let mut good = Kept::default();
    let mut bad = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let n = i as u64 + 1;
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Value>(line) {
            Ok(v) => match parse_merchant(&v, taxonomy) {
                Ok(m) => keep(n, m, &mut good, &mut bad),
                Err(e) => bad.push(row_error(n, e)),
            },
            Err(e) => bad.push(RowError {
                line: n,
                field: "(row)".into(),
                reason: format!("not valid JSON: {e}"),
            }),
        }
    }
    (good.rows, bad)
}

const CSV_COLUMNS: &[&str] = &[
    "id",
    "name",
    "kind",
    "locale",
    "region",
    "email",
    "phone",
    "push_token",
    "postal_address",
    "holdings",
    "created_at",
    "last_active_at",
    "marketing_opt_out",
    "representative_key",
    "contact_keys",
    "sub_account_keys",
];

/// Parses CSV with a header row; list columns (`holdings`, `contact_keys`, `sub_account_keys`)
/// are `;`-separated and an empty cell means absent.
pub fn parse_csv(text: &str, taxonomy: &Taxonomy) -> Result<(Vec<Merchant>, Vec<RowError>), DirectoryError> {
    let mut reader = csv::ReaderBuilder::new().flexible(true).from_reader(text.as_bytes());
    let header = reader
        .headers()
        .map_err(|e| DirectoryError::Header(e.to_string()))?
        .clone();
    for (i, h) in header.iter().enumerate() {
        if header.iter().take(i).any(|earlier| earlier.trim() == h.trim()) {
            return Err(DirectoryError::Header(format!("column '{h}' appears twice")));
        }
        if !CSV_COLUMNS.contains(&h.trim()) {
            return Err(DirectoryError::Header(format!(
                "unknown column '{h}'; expected {}",
                CSV_COLUMNS.join(",")
            )));
        }
    }
    let mut good = Kept::default();
    let mut bad = Vec::new();
    for record in reader.records() {
        let record = match record {
            Ok(r) => r,
            Err(e) => {
                let line = e.position().map(|p| p.line()).unwrap_or(0);
                bad.push(RowError {
                    line,
                    field: "(row)".into(),
                    reason: e.to_string(),
                });
                continue;
            }
        };
        let line = record.position().map(|p| p.line()).unwrap_or(0);
        if record.len() != header.len() {
            bad.push(RowError {
                line,
                field: "(row)".into(),
                reason: format!("has {} cells, the header has {}", record.len(), header.len()),
            });
            continue;
        }
        let mut obj = Map::new();
        for (name, cell) in header.iter().zip(record.iter()) {
            let (name, cell) = (name.trim(), cell.trim());
            if cell.is_empty() {
                continue;
            }
            let value = match name {
                "holdings" | "contact_keys" | "sub_account_keys" => Value::Array(
                    cell.split(';')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(|s| Value::String(s.into()))
                        .collect(),
                ),
                "marketing_opt_out" => match cell {
                    "true" | "1" | "yes" => Value::Bool(true),
                    "false" | "0" | "no" => Value::Bool(false),
                    _ => Value::String(cell.into()),
                },
                _ => Value::String(cell.into()),
            };
            obj.insert(name.to_owned(), value);
        }
        obj.entry("holdings").or_insert_with(|| Value::Array(Vec::new()));
        match parse_merchant(&Value::Object(obj), taxonomy) {
            Ok(m) => keep(line, m, &mut good, &mut bad),
            Err(e) => bad.push(row_error(line, e)),
        }
    }
    Ok((good.rows, bad))
}

/// Imports a `.jsonl`/`.json` or `.csv` file into the directory.
pub async fn import_file(store: &dyn Store, path: &Path, taxonomy: &Taxonomy) -> Result<ImportReport, DirectoryError> {
    let text = std::fs::read_to_string(path).map_err(|source| DirectoryError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    let csv = match ext.as_str() {
        "jsonl" | "ndjson" | "json" => false,
        "csv" => true,
        _ => return Err(DirectoryError::Format(path.display().to_string())),
    };
    import_text(store, &text, csv, taxonomy).await
}

/// Imports a document: CSV with a header row, or JSON Lines.
pub async fn import_text(
    store: &dyn Store,
    text: &str,
    csv: bool,
    taxonomy: &Taxonomy,
) -> Result<ImportReport, DirectoryError> {
    let (good, rejected) = if csv {
        parse_csv(text, taxonomy)?
    } else {
        parse_jsonl(text, taxonomy)
    };
    import(store, &good, rejected).await
}

/// Stores parsed merchants, carrying the rejected rows into the report.
pub async fn import(
    store: &dyn Store,
    merchants: &[Merchant],
    rejected: Vec<RowError>,
) -> Result<ImportReport, DirectoryError> {
    let counts = store.upsert_merchants(merchants).await?;
    tracing::info!(
        inserted = counts.inserted,
        updated = counts.updated,
        unchanged = counts.unchanged,
        rejected = rejected.len(),
        "merchant directory imported"
    );
    Ok(ImportReport { counts, rejected })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn taxonomy() -> Taxonomy {
        Taxonomy::builtin().expect("taxonomy")
    }

    #[test]
    fn bad_rows_are_reported_by_line_and_field_and_good_rows_kept() {
        let text = concat!(
            r#"{"id":"m-1","name":"A","kind":"enterprise","locale":"en","region":"SG","email":"a@example.com","holdings":["email_address"]}"#,
            "\n",
            "\n",
            r#"{"id":"m-2","name":"B","kind":"enterprise","locale":"en","region":"SG","phone":"12345","holdings":[]}"#,
            "\n",
            r#"{"id":"m-3","name":"C","kind":"robot","locale":"en","region":"SG","holdings":[]}"#,
            "\n",
            "not json\n",
        );
        let text = format!("{text}{}\n", text.lines().next().unwrap_or_default());
        let (good, bad) = parse_jsonl(&text, &taxonomy());
        assert_eq!(good.len(), 1);
        let seen: Vec<_> = bad.iter().map(|e| (e.line, e.field.as_str())).collect();
        assert_eq!(seen, vec![(3, "phone"), (4, "kind"), (5, "(row)"), (6, "id")]);
        assert!(bad[3].reason.contains("line 1"));
    }

    #[test]
    fn csv_rows_parse_with_split_holdings_and_empty_cells() {
        let text = "id,name,kind,locale,region,email,phone,push_token,postal_address,holdings,created_at,marketing_opt_out\n\
                    m-1,\"Shop, Ltd\",enterprise,zh-CN,CN-ZJ,,+8613800000000,,,phone_number;real_name,,true\n\
                    m-2,X,enterprise,xx,CN-ZJ,,,,,,,\n";
        let (good, bad) = parse_csv(text, &taxonomy()).expect("header ok");
        assert_eq!(good.len(), 1);
        assert_eq!(good[0].name, "Shop, Ltd");
        assert_eq!(good[0].holdings.len(), 2);
        assert!(good[0].email.is_none() && good[0].marketing_opt_out);
        assert_eq!((bad[0].line, bad[0].field.as_str()), (3, "locale"));
    }

    #[test]
    fn demo_directory_parses_completely() {
        let text = include_str!("../config/demo/merchants.jsonl");
        let (good, bad) = parse_jsonl(text, &taxonomy());
        assert!(bad.is_empty(), "{bad:?}");
        assert_eq!(good.len(), 50);
        let csv = include_str!("../config/demo/merchants.csv");
        let (good, bad) = parse_csv(csv, &taxonomy()).expect("header");
        assert!(bad.is_empty(), "{bad:?}");
        assert_eq!(good.len(), 6);
    }
}
