//! Delivery status notifications (RFC 3464): a bounce, delay or delivery report read back into
//! [`Receipt`]s keyed by the original message's `Message-ID` (which Tocsin derives from the
//! delivery's idempotency key and records as its provider message id).
//!
//! A DSN is a `multipart/report; report-type=delivery-status` message whose
//! `message/delivery-status` part holds per-message fields, then one block of per-recipient
//! fields (`Final-Recipient`, `Action`, `Status`, `Diagnostic-Code`) per recipient, and whose
//! last part returns the original message (`text/rfc822-headers` or `message/rfc822`).
//!
//! The MIME reading here is deliberately small: header folding, case-insensitive names,
//! quoted parameters, nested multiparts, CRLF or LF line ends, base64 or quoted-printable
//! parts. The receipts carry no address: only the action and the status numbers.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;

use super::{FailureKind, Receipt, ReceiptKey, ReceiptStatus};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DsnError {
    #[error("not a MIME message: {0}")]
    Malformed(String),
    #[error("not a delivery status notification (Content-Type {0})")]
    NotAReport(String),
    #[error("the report has no message/delivery-status part")]
    NoStatusPart,
    #[error("the delivery-status part has no per-recipient block with an Action")]
    NoRecipients,
    #[error(
        "the returned original has no Message-ID and the report no Original-Envelope-Id: \
         the report cannot be matched to a delivery"
    )]
    NoMessageId,
}

/// Reads a raw DSN (the whole message as received) into one receipt per recipient block.
pub fn receipts_from_dsn(raw: &[u8]) -> Result<Vec<Receipt>, DsnError> {
    let text = String::from_utf8_lossy(raw).replace("\r\n", "\n");
    // An mbox "From " separator line is not a header.
    let text = match text.strip_prefix("From ") {
        Some(rest) => rest.split_once('\n').map_or("", |(_, r)| r).to_owned(),
        None => text,
    };
    let top = Entity::parse(&text)?;
    let ct = top.content_type();
    if !ct.mime.starts_with("multipart/") {
        return Err(DsnError::NotAReport(ct.mime));
    }
    let mut found = Found::default();
    collect(&top, 0, &mut found)?;
    let status = found.status.ok_or(DsnError::NoStatusPart)?;
    let mut groups = field_groups(&status).into_iter();
    let per_message = groups.next().unwrap_or_default();
    let message_id = found.original_headers.as_deref().and_then(|h| {
        let headers = parse_headers(h);
        field(&headers, "message-id").and_then(bracketed)
    });
    let key = match message_id {
        Some(id) => id,
        None => field(&per_message, "original-envelope-id")
            .map(|v| xtext_decode(v.trim()))
            .filter(|v| !v.is_empty())
            .ok_or(DsnError::NoMessageId)?,
    };
    let receipts: Vec<Receipt> = groups.filter_map(|g| recipient_receipt(&g, &key)).collect();
    if receipts.is_empty() {
        return Err(DsnError::NoRecipients);
    }
    Ok(receipts)
}

fn recipient_receipt(fields: &[(String, String)], key: &str) -> Option<Receipt> {
    let action = field(fields, "action")?.trim().to_ascii_lowercase();
    // `Action: failed (bad destination mailbox)` style comments are tolerated.
    let action = action.split(|c: char| c.is_whitespace() || c == '(').next()?.to_owned();
    let status = field(fields, "status").and_then(status_code);
    let class = status.as_deref().and_then(|s| s.chars().next());
    let receipt_status = match action.as_str() {
        "failed" if class == Some('4') => ReceiptStatus::InProgress,
        "failed" => ReceiptStatus::Failed(FailureKind::Bounced),
        "delayed" => ReceiptStatus::InProgress,
        "delivered" | "relayed" | "expanded" => ReceiptStatus::Delivered,
        _ => return None,
    };
    let mut detail = format!("action={action}");
    if let Some(s) = &status {
        detail.push_str(&format!("; status={s}"));
    }
    if let Some(diag) = field(fields, "diagnostic-code")
        .map(diagnostic_numbers)
        .filter(|d| !d.is_empty())
    {
        detail.push_str(&format!("; diagnostic={diag}"));
    }
    Some(Receipt {
        key: ReceiptKey::ProviderMessageId(key.to_owned()),
        status: receipt_status,
        detail,
    })
}

/// `x.y.z` with x in 2, 4, 5 (RFC 3463), from the start of a field like `5.1.1 (comment)`.
fn status_code(value: &str) -> Option<String> {
    let token = value
        .split(|c: char| c.is_whitespace() || c == '(')
        .find(|t| !t.is_empty())?;
    is_enhanced_status(token).then(|| token.to_owned())
}

fn is_enhanced_status(token: &str) -> bool {
    let parts: Vec<&str> = token.split('.').collect();
    parts.len() == 3
        && matches!(parts[0], "2" | "4" | "5")
        && parts[1..]
            .iter()
            .all(|p| (1..=3).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()))
}

/// The diagnostic type and status numbers of `Diagnostic-Code: smtp; 550 5.1.1 <a@b>: text`:
/// `smtp 550 5.1.1`. The free text (which may hold the address) is dropped.
fn diagnostic_numbers(value: &str) -> String {
    let (kind, rest) = match value.split_once(';') {
        Some((k, r)) => (k.trim().to_ascii_lowercase(), r),
        None => (String::new(), value),
    };
    let mut out: Vec<String> = Vec::new();
    if !kind.is_empty() && kind.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        out.push(kind);
    }
    let mut tokens = rest.split_whitespace().map(|t| t.trim_end_matches([',', ':', ';']));
    if let Some(first) = tokens.next() {
        // `550 5.1.1`, or a multiline reply's `550-5.1.1`.
        let (reply, joined) = first.split_once('-').unwrap_or((first, ""));
        if reply.len() == 3 && reply.bytes().all(|b| b.is_ascii_digit()) {
            out.push(reply.to_owned());
            let enhanced = if joined.is_empty() { tokens.next() } else { Some(joined) };
            if let Some(enhanced) = enhanced.filter(|t| is_enhanced_status(t)) {
                out.push(enhanced.to_owned());
            }
        } else if is_enhanced_status(first) {
            out.push(first.to_owned());
        }
    }
    out.join(" ")
}

#[derive(Default)]
struct Found {
    /// The decoded body of the first `message/delivery-status` part.
    status: Option<String>,
    /// The returned original's header section.
    original_headers: Option<String>,
}

/// Walks the MIME tree for the status part and the returned original.
fn collect(entity: &Entity, depth: usize, found: &mut Found) -> Result<(), DsnError> {
    if depth > 8 {
        return Err(DsnError::Malformed("MIME parts nested too deeply".into()));
    }
    let ct = entity.content_type();
    match ct.mime.as_str() {
        m if m.starts_with("multipart/") => {
            let boundary = ct
                .param("boundary")
                .filter(|b| !b.is_empty())
                .ok_or_else(|| DsnError::Malformed(format!("{m} without a boundary")))?;
            for part in split_multipart(&entity.body, boundary)? {
                collect(&Entity::parse(&part)?, depth + 1, found)?;
            }
        }
        "message/delivery-status" | "message/global-delivery-status" if found.status.is_none() => {
            found.status = Some(entity.decoded_body());
        }
        "text/rfc822-headers" | "message/global-headers" if found.original_headers.is_none() => {
            found.original_headers = Some(entity.decoded_body());
        }
        "message/rfc822" | "message/global" if found.original_headers.is_none() => {
            let body = entity.decoded_body();
            let headers = body.split_once("\n\n").map_or(body.as_str(), |(h, _)| h).to_owned();
            found.original_headers = Some(headers);
        }
        _ => {}
    }
    Ok(())
}

/// A MIME entity: its header fields (names lowercased, values unfolded) and its body.
struct Entity {
    headers: Vec<(String, String)>,
    body: String,
}

impl Entity {
    /// `text` uses LF line ends.
    fn parse(text: &str) -> Result<Self, DsnError> {
        let (head, body) = match text.strip_prefix('\n') {
            Some(body) => ("", body),
            None => text.split_once("\n\n").unwrap_or((text, "")),
        };
        let headers = parse_headers(head);
        let well_formed = head
            .lines()
            .all(|l| l.starts_with([' ', '\t']) || l.contains(':') || l.trim().is_empty());
        if !well_formed {
            return Err(DsnError::Malformed("a header line has no colon".into()));
        }
        Ok(Self {
            headers,
            body: body.to_owned(),
        })
    }

    fn content_type(&self) -> ContentType {
        field(&self.headers, "content-type").map_or_else(
            || ContentType {
                mime: "text/plain".into(),
                params: Vec::new(),
            },
            ContentType::parse,
        )
    }

    /// The body with its transfer encoding undone (base64, quoted-printable), as text.
    fn decoded_body(&self) -> String {
        let cte = field(&self.headers, "content-transfer-encoding")
            .map(|v| v.trim().to_ascii_lowercase())
            .unwrap_or_default();
        let decoded = match cte.as_str() {
            "base64" => {
                let compact: String = self.body.split_ascii_whitespace().collect();
                B64.decode(compact.as_bytes())
                    .map(|b| String::from_utf8_lossy(&b).replace("\r\n", "\n"))
                    .ok()
            }
            "quoted-printable" => Some(qp_decode(&self.body)),
            _ => None,
        };
        decoded.unwrap_or_else(|| self.body.clone())
    }
}

/// Header fields of a header section (LF line ends): folded lines joined, names lowercased.
fn parse_headers(head: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for line in head.lines() {
        if line.starts_with([' ', '\t']) {
            if let Some((_, value)) = out.last_mut() {
                value.push(' ');
                value.push_str(line.trim());
            }
        } else if let Some((name, value)) = line.split_once(':') {
            out.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
        }
    }
    out
}

/// The first field named `name` (lowercase).
fn field<'a>(fields: &'a [(String, String)], name: &str) -> Option<&'a str> {
    fields.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
}

/// The blank-line separated groups of fields of a delivery-status body.
fn field_groups(body: &str) -> Vec<Vec<(String, String)>> {
    let mut groups = Vec::new();
    let mut current = String::new();
    for line in body.lines() {
        if line.trim().is_empty() {
            if !current.is_empty() {
                groups.push(parse_headers(&current));
                current.clear();
            }
        } else {
            current.push_str(line);
            current.push('\n');
        }
    }
    if !current.is_empty() {
        groups.push(parse_headers(&current));
    }
    groups
}

/// The id inside `<...>` (or the bare token), comments and spaces dropped.
fn bracketed(value: &str) -> Option<String> {
    let id = match (value.find('<'), value.rfind('>')) {
        (Some(a), Some(b)) if a < b => value[a + 1..b].trim().to_owned(),
        _ => value.split_whitespace().next()?.to_owned(),
    };
    (!id.is_empty()).then_some(id)
}

/// RFC 3461 xtext: `+XX` is a hex-coded byte.
fn xtext_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'+'
            && let Some(hex) = value.get(i + 1..i + 3)
            && let Ok(b) = u8::from_str_radix(hex, 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn qp_decode(body: &str) -> String {
    let mut out = Vec::with_capacity(body.len());
    for line in body.split('\n') {
        let line = line.trim_end_matches([' ', '\t']);
        let (line, soft) = match line.strip_suffix('=') {
            Some(l) => (l, true),
            None => (line, false),
        };
        let bytes = line.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'='
                && let Some(hex) = line.get(i + 1..i + 3)
                && let Ok(b) = u8::from_str_radix(hex, 16)
            {
                out.push(b);
                i += 3;
                continue;
            }
            out.push(bytes[i]);
            i += 1;
        }
        if !soft {
            out.push(b'\n');
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

struct ContentType {
    /// `type/subtype`, lowercase.
    mime: String,
    /// Parameter names lowercase, values unquoted.
    params: Vec<(String, String)>,
}

impl ContentType {
    fn parse(value: &str) -> Self {
        let value = strip_comments(value);
        let mut pieces = split_params(&value).into_iter();
        let mime = pieces.next().unwrap_or_default().trim().to_ascii_lowercase();
        let params = pieces
            .filter_map(|p| {
                let (name, value) = p.split_once('=')?;
                let value = value.trim();
                let value = match value.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
                    Some(quoted) => quoted.replace("\\\"", "\"").replace("\\\\", "\\"),
                    None => value.to_owned(),
                };
                Some((name.trim().to_ascii_lowercase(), value))
            })
            .collect();
        Self { mime, params }
    }

    fn param(&self, name: &str) -> Option<&str> {
        self.params.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// Splits at `;` outside quoted strings.
fn split_params(value: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    let mut escaped = false;
    for c in value.chars() {
        match c {
            _ if escaped => {
                escaped = false;
                current.push(c);
            }
            '\\' if quoted => {
                escaped = true;
                current.push(c);
            }
            '"' => {
                quoted = !quoted;
                current.push(c);
            }
            ';' if !quoted => out.push(std::mem::take(&mut current)),
            _ => current.push(c),
        }
    }
    out.push(current);
    out
}

/// Drops `(comments)` outside quoted strings.
fn strip_comments(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let mut depth = 0usize;
    let mut quoted = false;
    for c in value.chars() {
        match c {
            '"' if depth == 0 => {
                quoted = !quoted;
                out.push(c);
            }
            '(' if !quoted => depth += 1,
            ')' if !quoted && depth > 0 => depth -= 1,
            _ if depth > 0 => {}
            _ => out.push(c),
        }
    }
    out
}

/// The body parts of a multipart body (LF line ends), between `--boundary` delimiter lines;
/// the preamble and epilogue are dropped. A missing close delimiter (a truncated bounce) is
/// tolerated; a missing first delimiter is not.
fn split_multipart(body: &str, boundary: &str) -> Result<Vec<String>, DsnError> {
    let delimiter = format!("--{boundary}");
    let mut parts = Vec::new();
    let mut current: Option<String> = None;
    for line in body.split('\n') {
        if let Some(rest) = line.strip_prefix(&delimiter) {
            let rest = rest.trim_end();
            if rest.is_empty() || rest == "--" {
                if let Some(part) = current.take() {
                    // The line break before a delimiter belongs to the delimiter.
                    parts.push(part.strip_suffix('\n').map(str::to_owned).unwrap_or(part));
                }
                if rest == "--" {
                    return Ok(parts);
                }
                current = Some(String::new());
                continue;
            }
        }
        if let Some(part) = current.as_mut() {
            part.push_str(line);
            part.push('\n');
        }
    }
    if let Some(part) = current {
        parts.push(part);
    }
    if parts.is_empty() {
        return Err(DsnError::Malformed(format!(
            "no part starts with the boundary {boundary:?}"
        )));
    }
    Ok(parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Vec<u8> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/dsn")
            .join(name);
        std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    fn crlf(raw: &[u8]) -> Vec<u8> {
        String::from_utf8_lossy(raw).replace('\n', "\r\n").into_bytes()
    }

    fn key(id: &str) -> ReceiptKey {
        ReceiptKey::ProviderMessageId(id.to_owned())
    }

    #[test]
    fn a_postfix_bounce_is_a_hard_bounce_of_the_original_message_id() {
        let raw = fixture("postfix-bounce.eml");
        for raw in [raw.clone(), crlf(&raw)] {
            let receipts = receipts_from_dsn(&raw).expect("parses");
            assert_eq!(
                receipts,
                vec![Receipt {
                    key: key("0f3c1b2a9d8e7f6a5b4c3d2e1f0a9b8c@example.com"),
                    status: ReceiptStatus::Failed(FailureKind::Bounced),
                    detail: "action=failed; status=5.1.1; diagnostic=smtp 550 5.1.1".into(),
                }]
            );
        }
    }

    #[test]
    fn a_gmail_style_bounce_returning_the_whole_message_is_read() {
        let receipts = receipts_from_dsn(&crlf(&fixture("exim-gmail-bounce.eml"))).expect("parses");
        assert_eq!(receipts.len(), 1);
        assert_eq!(receipts[0].key, key("7d1e2f3a4b5c6d7e8f9a0b1c2d3e4f5a@example.com"));
        assert_eq!(receipts[0].status, ReceiptStatus::Failed(FailureKind::Bounced));
        assert_eq!(
            receipts[0].detail,
            "action=failed; status=5.1.1; diagnostic=smtp 550 5.1.1"
        );
    }

    #[test]
    fn a_delay_notice_is_in_progress() {
        let receipts = receipts_from_dsn(&fixture("delayed.eml")).expect("parses");
        assert_eq!(receipts.len(), 1);
        assert_eq!(receipts[0].key, key("1a2b3c4d5e6f708192a3b4c5d6e7f801@example.com"));
        assert_eq!(receipts[0].status, ReceiptStatus::InProgress);
        assert_eq!(receipts[0].detail, "action=delayed; status=4.4.1; diagnostic=x-postfix");
    }

    #[test]
    fn a_delivery_report_in_base64_names_each_recipient_delivered() {
        let receipts = receipts_from_dsn(&fixture("delivered.eml")).expect("parses");
        let want = "99aa88bb77cc66dd55ee44ff33001122@example.com";
        assert_eq!(receipts.len(), 2);
        assert!(
            receipts
                .iter()
                .all(|r| r.key == key(want) && r.status == ReceiptStatus::Delivered)
        );
        assert_eq!(
            receipts[0].detail,
            "action=delivered; status=2.0.0; diagnostic=smtp 250 2.0.0"
        );
        assert_eq!(receipts[1].detail, "action=relayed; status=2.0.0");
    }

    #[test]
    fn a_failed_action_with_a_temporary_status_is_a_soft_bounce() {
        let raw = String::from_utf8_lossy(&fixture("postfix-bounce.eml")).replace("Status: 5.1.1", "Status: 4.2.2");
        let receipts = receipts_from_dsn(raw.as_bytes()).expect("parses");
        assert_eq!(receipts[0].status, ReceiptStatus::InProgress);
    }

    #[test]
    fn receipts_never_carry_the_address() {
        for name in [
            "postfix-bounce.eml",
            "exim-gmail-bounce.eml",
            "delayed.eml",
            "delivered.eml",
        ] {
            for r in receipts_from_dsn(&fixture(name)).expect("parses") {
                assert!(!r.detail.contains('@'), "{name}: {}", r.detail);
            }
        }
    }

    #[test]
    fn a_report_without_a_message_id_says_it_cannot_be_matched() {
        let raw = fixture("no-message-id.eml");
        assert_eq!(receipts_from_dsn(&raw), Err(DsnError::NoMessageId));
        // With an envelope id (RFC 3461 ENVID, xtext-encoded) the report is matched by that.
        let with_envid = String::from_utf8_lossy(&raw).replace(
            "Reporting-MTA: dns; mx.example.com\n",
            "Reporting-MTA: dns; mx.example.com\nOriginal-Envelope-Id: abc+2Bdef@example.com\n",
        );
        let receipts = receipts_from_dsn(with_envid.as_bytes()).expect("parses");
        assert_eq!(receipts[0].key, key("abc+def@example.com"));
        assert_eq!(receipts[0].status, ReceiptStatus::Failed(FailureKind::Bounced));
        assert_eq!(
            receipts[0].detail,
            "action=failed; status=5.2.2; diagnostic=smtp 552 5.2.2"
        );
    }

    #[test]
    fn malformed_input_is_an_error() {
        assert!(matches!(
            receipts_from_dsn(b"this is not an email at all\nreally not"),
            Err(DsnError::Malformed(_))
        ));
        assert!(matches!(
            receipts_from_dsn(b"Subject: hi\nContent-Type: text/plain\n\nhello\n"),
            Err(DsnError::NotAReport(_))
        ));
        assert!(matches!(
            receipts_from_dsn(b"Content-Type: multipart/report; report-type=delivery-status\n\nx\n"),
            Err(DsnError::Malformed(_))
        ));
        assert!(matches!(
            receipts_from_dsn(b"Content-Type: multipart/report; boundary=zz\n\nno delimiter here\n"),
            Err(DsnError::Malformed(_))
        ));
        assert_eq!(
            receipts_from_dsn(
                b"Content-Type: multipart/report; boundary=zz\n\n--zz\nContent-Type: text/plain\n\nhi\n--zz--\n"
            ),
            Err(DsnError::NoStatusPart)
        );
        assert_eq!(
            receipts_from_dsn(
                b"Content-Type: multipart/report; boundary=zz\n\n--zz\nContent-Type: message/delivery-status\n\nReporting-MTA: dns; x\n\n--zz\nContent-Type: text/rfc822-headers\n\nMessage-ID: <a@b>\n--zz--\n"
            ),
            Err(DsnError::NoRecipients)
        );
        assert!(receipts_from_dsn(b"").is_err());
    }

    #[test]
    fn diagnostic_codes_keep_only_numbers() {
        assert_eq!(
            diagnostic_numbers("smtp; 550 5.1.1 <a@b.c>: User unknown"),
            "smtp 550 5.1.1"
        );
        assert_eq!(
            diagnostic_numbers("smtp; 550-5.1.1 The account a@b.c does not exist"),
            "smtp 550 5.1.1"
        );
        assert_eq!(diagnostic_numbers("X-Postfix; host a@b said hello"), "x-postfix");
        assert_eq!(diagnostic_numbers("smtp;5.7.1 denied"), "smtp 5.7.1");
        assert_eq!(diagnostic_numbers("a@b.c"), "");
    }
}
