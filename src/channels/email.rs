//! Email through lettre: SMTP through Tocsin's own connection pool ([`super::smtp`]: plain,
//! STARTTLS or implicit TLS, optional AUTH) or lettre's file transport (the embedded default:
//! one `.eml` per message). The `Message-ID` is derived from the delivery's idempotency key, so
//! a resend after a crash is recognisable, and it is the provider message id a bounce (DSN) is
//! matched by. Messages are DKIM-signed when configured.

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use lettre::address::Envelope;
use lettre::message::dkim::DkimConfig;
use lettre::message::header::{self, ContentTransferEncoding, ContentType, Headers};
use lettre::message::{Body, Mailbox, Mailboxes, SinglePart};
use lettre::{AsyncFileTransport, AsyncTransport, Message, Tokio1Executor};

use super::smtp::SmtpPool;
use super::{Accepted, ChannelSetupError, Outbound, Provider, SendError, dkim, setup_err};
use crate::config::EmailSettings;
use crate::domain::DeliveryId;
use crate::ledger::content_hash;

enum Inner {
    File(AsyncFileTransport<Tokio1Executor>, PathBuf),
    Smtp(Box<SmtpPool>),
}

pub struct EmailTransport {
    inner: Inner,
    from: Mailbox,
    reply_to: Option<Mailbox>,
    id_domain: String,
    dkim: Option<DkimConfig>,
}

impl EmailTransport {
    pub fn from_settings(s: &EmailSettings, file_dir: &Path) -> Result<Self, ChannelSetupError> {
        let from: Mailbox = s
            .from
            .parse()
            .map_err(|e| setup_err("email", format!("email.from: {e}")))?;
        let reply_to = s
            .reply_to
            .as_deref()
            .map(|r| {
                r.parse::<Mailbox>()
                    .map_err(|e| setup_err("email", format!("email.reply_to: {e}")))
            })
            .transpose()?;
        let dkim = dkim::from_settings(s).map_err(|e| setup_err("email", e))?;
        let inner = match s.transport.as_str() {
            "smtp" => Inner::Smtp(Box::new(
                SmtpPool::from_settings(&s.smtp).map_err(|e| setup_err("email", e))?,
            )),
            _ => {
                std::fs::create_dir_all(file_dir)
                    .map_err(|e| setup_err("email", format!("{}: {e}", file_dir.display())))?;
                Inner::File(AsyncFileTransport::<Tokio1Executor>::new(file_dir), file_dir.to_owned())
            }
        };
        let id_domain = from.email.domain().to_owned();
        Ok(Self {
            inner,
            from,
            reply_to,
            id_domain,
            dkim,
        })
    }

    /// Where the file transport writes, if it is the file transport.
    pub fn file_dir(&self) -> Option<&Path> {
        match &self.inner {
            Inner::File(_, dir) => Some(dir),
            Inner::Smtp(_) => None,
        }
    }

    /// The SMTP pool, if the transport is SMTP.
    pub fn smtp_pool(&self) -> Option<&SmtpPool> {
        match &self.inner {
            Inner::Smtp(pool) => Some(pool),
            Inner::File(..) => None,
        }
    }

    /// The `Message-ID` of a mail with this key, without angle brackets: the same key always
    /// gives the same id. A notice's names its delivery (one per key) before a hash of the key,
    /// so a bounce finds its delivery by the delivery's own id, even before the acceptance is
    /// recorded, and no index of random ids is kept; [`delivery_named_by`] reads it back.
    pub fn message_id(&self, key: &str, delivery: Option<&DeliveryId>) -> String {
        let hash = content_hash(key.as_bytes());
        match delivery {
            Some(id) => format!("{id}.{}@{}", &hash[..KEY_HASH_LEN], self.id_domain),
            None => format!("{}@{}", &hash[..32], self.id_domain),
        }
    }

    /// Builds a text + HTML message; the `Message-ID` is derived from the mail's key. The
    /// multipart's `Content-Type` is a header of the message itself (not of its body), so
    /// DKIM can cover it. Returns the envelope and the message as sent: the bytes of lettre's
    /// `Message::formatted` (see [`Self::build_at`]).
    ///
    /// `eight_bit`: the server takes 8-bit content (8BITMIME). Text parts whose lines all fit
    /// SMTP's 998 octets then go as they are (`7bit`, or `8bit` for UTF-8 text) instead of
    /// quoted-printable or base64: no encoding per message, and a third of the size for
    /// Chinese text. DKIM-signed mail keeps lettre's conservative choice, as a relay that
    /// downgrades 8-bit content would break the signature.
    pub fn build(&self, mail: &Mail<'_>, eight_bit: bool) -> Result<(Envelope, Vec<u8>), SendError> {
        let now = std::time::SystemTime::now();
        self.build_at(mail, eight_bit, now, &new_boundary(), self.dkim.is_some())
    }

    /// [`Self::build`] at a given time with a given multipart boundary.
    ///
    /// Unsigned mail is assembled in one buffer of the right size from lettre's own header
    /// types, without lettre's message builder (which parses its own `From` and `To` back to
    /// check them and to make the envelope) and without copying the body between buffers:
    /// the same bytes as `via_lettre`, as a test shows. Signing reads the whole message, so
    /// signed mail goes `via_lettre`.
    fn build_at(
        &self,
        mail: &Mail<'_>,
        eight_bit: bool,
        date: std::time::SystemTime,
        boundary: &str,
        via_lettre: bool,
    ) -> Result<(Envelope, Vec<u8>), SendError> {
        let to: Mailbox = mail
            .to
            .parse()
            .map_err(|_| SendError::permanent("the recipient address is not a valid mailbox"))?;
        let eight_bit = eight_bit && self.dkim.is_none();
        let message_id = format!("<{}>", self.message_id(mail.key, mail.delivery));
        let plain = SinglePart::plain(part_body(mail.text, eight_bit));
        let html = SinglePart::html(part_body(mail.html, eight_bit));
        let content_type = ContentType::parse(&format!("multipart/alternative; boundary=\"{boundary}\""))
            .map_err(|e| SendError::permanent(format!("building the message: {e}")))?;
        let parts = [&plain, &html];
        let encoding = if parts.iter().all(|p| p.raw_body().is_ascii()) {
            ContentTransferEncoding::SevenBit
        } else {
            ContentTransferEncoding::EightBit
        };
        if !via_lettre {
            let mut headers = Headers::new();
            headers.set(header::From::from(Mailboxes::from(self.from.clone())));
            headers.set(header::To::from(Mailboxes::from(to.clone())));
            headers.set(header::Subject::from(mail.subject.to_owned()));
            headers.set(header::MessageId::from(message_id));
            headers.insert_raw(content_language(mail.language));
            headers.set(header::UserAgent::from("Tocsin".to_owned()));
            headers.set(header::MIME_VERSION_1_0);
            headers.set(content_type);
            if let Some(reply_to) = &self.reply_to {
                headers.set(header::ReplyTo::from(Mailboxes::from(reply_to.clone())));
            }
            headers.set(header::Date::new(date));
            headers.set(encoding);
            let headers = headers.to_string();
            let mut out = Vec::with_capacity(headers.len() + 2 + multipart_len(boundary, &parts));
            out.extend_from_slice(headers.as_bytes());
            out.extend_from_slice(b"\r\n");
            write_multipart_body(&mut out, boundary, &parts);
            let envelope = Envelope::new(Some(self.from.email.clone()), vec![to.email])
                .map_err(|e| SendError::permanent(format!("building the message: {e}")))?;
            return Ok((envelope, out));
        }
        let mut body = Vec::with_capacity(multipart_len(boundary, &parts));
        write_multipart_body(&mut body, boundary, &parts);
        let mut builder = Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(mail.subject.to_owned())
            .message_id(Some(message_id))
            .raw_header(content_language(mail.language))
            .user_agent("Tocsin".to_owned())
            .header(header::MIME_VERSION_1_0)
            .header(content_type);
        if let Some(reply_to) = &self.reply_to {
            builder = builder.reply_to(reply_to.clone());
        }
        builder = builder.date(date);
        // A mandatory security notice: deliberately no List-Unsubscribe header.
        let mut message = builder
            .body(Body::dangerous_pre_encoded(body, encoding))
            .map_err(|e| SendError::permanent(format!("building the message: {e}")))?;
        if let Some(dkim) = &self.dkim {
            message.sign(dkim);
        }
        Ok((message.envelope().clone(), message.formatted()))
    }

    /// Sends a mail (a notice, or a regulator filing) through the configured transport; returns
    /// its `Message-ID` without angle brackets.
    pub async fn send_mail(&self, mail: &Mail<'_>) -> Result<String, SendError> {
        if undeliverable_domain(mail.to) {
            return Err(SendError::permanent(
                "the recipient's domain is reserved as invalid and can never receive mail",
            ));
        }
        let eight_bit = match &self.inner {
            Inner::File(..) => true,
            // Until the first connection says, the safe encodings.
            Inner::Smtp(pool) => pool.eight_bit_mime().unwrap_or(false),
        };
        let (envelope, message) = self.build(mail, eight_bit)?;
        self.transmit(&envelope, &message).await?;
        Ok(self.message_id(mail.key, mail.delivery))
    }

    /// Hands a built message to the configured transport.
    async fn transmit(&self, envelope: &Envelope, message: &[u8]) -> Result<(), SendError> {
        match &self.inner {
            Inner::File(t, _) => t
                .send_raw(envelope, message)
                .await
                .map(|_| ())
                .map_err(|e| SendError::transient(format!("writing the message file: {e}"))),
            Inner::Smtp(pool) => pool.send(envelope, message).await,
        }
    }
}

/// A file attached to a mail (a regulator filing's JSON and its readable document).
pub struct MailAttachment<'a> {
    pub filename: &'a str,
    /// `application/json`, `text/html; charset=utf-8`...
    pub content_type: &'a str,
    pub body: &'a [u8],
}

impl EmailTransport {
    /// Sends a text + HTML mail with attachments (`multipart/mixed`), built by lettre's message
    /// builder: rare mail (filings), where clarity beats the notice path's hand-built bytes.
    /// Returns its `Message-ID` without angle brackets (derived from the key, as for notices).
    pub async fn send_with_attachments(
        &self,
        mail: &Mail<'_>,
        attachments: &[MailAttachment<'_>],
    ) -> Result<String, SendError> {
        use lettre::message::{Attachment, MultiPart};
        if undeliverable_domain(mail.to) {
            return Err(SendError::permanent(
                "the recipient's domain is reserved as invalid and can never receive mail",
            ));
        }
        let to: Mailbox = mail
            .to
            .parse()
            .map_err(|_| SendError::permanent("the recipient address is not a valid mailbox"))?;
        let building = |e: &dyn std::fmt::Display| SendError::permanent(format!("building the message: {e}"));
        let mut body = MultiPart::mixed().multipart(MultiPart::alternative_plain_html(
            mail.text.to_owned(),
            mail.html.to_owned(),
        ));
        for a in attachments {
            let content_type = ContentType::parse(a.content_type).map_err(|e| building(&e))?;
            body = body.singlepart(Attachment::new(a.filename.to_owned()).body(a.body.to_vec(), content_type));
        }
        let mut builder = Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(mail.subject.to_owned())
            .message_id(Some(format!("<{}>", self.message_id(mail.key, mail.delivery))))
            .raw_header(content_language(mail.language))
            .user_agent("Tocsin".to_owned());
        if let Some(reply_to) = &self.reply_to {
            builder = builder.reply_to(reply_to.clone());
        }
        let mut message = builder.multipart(body).map_err(|e| building(&e))?;
        if let Some(dkim) = &self.dkim {
            message.sign(dkim);
        }
        self.transmit(message.envelope(), &message.formatted()).await?;
        Ok(self.message_id(mail.key, mail.delivery))
    }
}

/// How much of the key's hash a notice's `Message-ID` carries after its delivery id.
const KEY_HASH_LEN: usize = 20;

/// The delivery a notice's `Message-ID` (with or without angle brackets) names, if it has that
/// form; [`names_delivery`] checks it against the delivery's key.
pub fn delivery_named_by(message_id: &str) -> Option<DeliveryId> {
    let local = message_id.trim().trim_matches(['<', '>']).split_once('@')?.0;
    let (id, hash) = local.split_once('.')?;
    (hash.len() == KEY_HASH_LEN).then(|| id.parse().ok()).flatten()
}

/// Whether `message_id` is the one a notice of `delivery` carries (whatever the domain).
pub fn names_delivery(message_id: &str, delivery: &crate::model::Delivery) -> bool {
    let local = message_id
        .trim()
        .trim_matches(['<', '>'])
        .split_once('@')
        .map(|(l, _)| l);
    let hash = content_hash(delivery.idempotency_key.as_bytes());
    local == Some(format!("{}.{}", delivery.id, &hash[..KEY_HASH_LEN]).as_str())
}

/// A part's body: the text as it is (CRLF line ends) when it is SMTP-safe as it stands (see
/// [`EmailTransport::build`]); otherwise encoded exactly as lettre's `Body::new` encodes a
/// `String`, minus its cost: lettre turns bare line feeds into CRLF by inserting each `\r` in
/// place (moving the rest of the body once per line) and scans the text again to re-check its
/// choice. Here the encoding is chosen as lettre chooses it (on the text as given), the line
/// ends are converted in one pass and the text is encoded as lettre encodes it.
fn part_body(text: &str, eight_bit: bool) -> Body {
    use email_encoding::body::Encoding;
    let crlf = crlf_line_ends(text).into_bytes();
    let safe = smtp_safe_lines(&crlf);
    if safe {
        if crlf.is_ascii() {
            return Body::dangerous_pre_encoded(crlf, ContentTransferEncoding::SevenBit);
        }
        if eight_bit {
            return Body::dangerous_pre_encoded(crlf, ContentTransferEncoding::EightBit);
        }
    }
    match Encoding::choose(text, false) {
        // lettre's chooser looks at line lengths only: a bare CR or a NUL is encoded too (a
        // bare CR before a dot is what SMTP smuggling across lax relays is made of).
        Encoding::SevenBit if safe => Body::dangerous_pre_encoded(crlf, ContentTransferEncoding::SevenBit),
        Encoding::EightBit if safe => Body::dangerous_pre_encoded(crlf, ContentTransferEncoding::EightBit),
        Encoding::SevenBit | Encoding::EightBit | Encoding::QuotedPrintable => {
            Body::dangerous_pre_encoded(quoted_printable::encode(crlf), ContentTransferEncoding::QuotedPrintable)
        }
        Encoding::Base64 => {
            let mut out = String::with_capacity(email_encoding::body::base64::encoded_len(crlf.len()));
            match email_encoding::body::base64::encode(&crlf, &mut out) {
                Ok(()) => Body::dangerous_pre_encoded(out.into_bytes(), ContentTransferEncoding::Base64),
                // Writing into a String does not fail; were it to, lettre encodes it itself.
                Err(_) => Body::new(text.to_owned()),
            }
        }
    }
}

/// Whether CRLF-ended text can travel as `7bit`/`8bit` content (RFC 2045 section 2.7-2.8, RFC
/// 5321 section 4.5.3.1.6): lines of at most 998 octets, no NUL, CR only before LF.
fn smtp_safe_lines(text: &[u8]) -> bool {
    const MAX_LINE: usize = 998;
    if memchr::memchr(0, text).is_some() {
        return false;
    }
    let mut start = 0;
    for at in memchr::memchr_iter(b'\r', text) {
        if text.get(at + 1) != Some(&b'\n') || at - start > MAX_LINE {
            return false;
        }
        start = at + 2;
    }
    text.len() - start.min(text.len()) <= MAX_LINE
}

/// The text with every line feed not already preceded by a carriage return preceded by one.
fn crlf_line_ends(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + text.len() / 16 + 2);
    for line in text.split_inclusive('\n') {
        match line.strip_suffix('\n') {
            Some(content) if !content.ends_with('\r') => {
                out.push_str(content);
                out.push_str("\r\n");
            }
            _ => out.push_str(line),
        }
    }
    out
}

/// A new multipart boundary: 40 random letters and digits, as lettre makes them.
fn new_boundary() -> String {
    use rand::Rng as _;
    rand::rng()
        .sample_iter(rand::distr::Alphanumeric)
        .take(40)
        .map(char::from)
        .collect()
}

/// The `Content-Language` header.
fn content_language(language: &str) -> header::HeaderValue {
    header::HeaderValue::new(
        header::HeaderName::new_from_ascii_str("Content-Language"),
        language.to_owned(),
    )
}

/// The length of [`write_multipart_body`]'s output.
fn multipart_len(boundary: &str, parts: &[&SinglePart]) -> usize {
    parts
        .iter()
        .map(|p| boundary.len() + 4 + 160 + 2 + p.raw_body().len() + 2)
        .sum::<usize>()
        + boundary.len()
        + 6
}

/// The body of a multipart with these parts, as lettre formats it: each part after a boundary
/// line, its headers, a blank line, its encoded body and a line end; then the closing boundary.
fn write_multipart_body(out: &mut Vec<u8>, boundary: &str, parts: &[&SinglePart]) {
    for part in parts {
        out.extend_from_slice(b"--");
        out.extend_from_slice(boundary.as_bytes());
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(part.headers().to_string().as_bytes());
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(part.raw_body());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"--");
    out.extend_from_slice(boundary.as_bytes());
    out.extend_from_slice(b"--\r\n");
}

/// One email: recipient, content, language, and the key its `Message-ID` derives from.
pub struct Mail<'a> {
    pub to: &'a str,
    pub subject: &'a str,
    pub text: &'a str,
    pub html: &'a str,
    pub language: &'a str,
    pub key: &'a str,
    /// The delivery the mail is, if it is a notice (its `Message-ID` names it).
    pub delivery: Option<&'a DeliveryId>,
}

/// Domains reserved by RFC 2606 / RFC 6761 as never resolvable can never receive mail.
fn undeliverable_domain(address: &str) -> bool {
    let domain = address
        .rsplit_once('@')
        .map(|(_, d)| d.to_ascii_lowercase())
        .unwrap_or_default();
    domain == "invalid" || domain.ends_with(".invalid")
}

#[async_trait]
impl Provider for EmailTransport {
    async fn send(&self, m: &Outbound<'_>) -> Result<Accepted, SendError> {
        let n = m.notice;
        self.send_mail(&Mail {
            to: &m.delivery.address,
            subject: &n.email_subject,
            text: &n.email_text,
            html: &n.email_html,
            language: n.locale.as_str(),
            key: &m.delivery.idempotency_key,
            delivery: Some(&m.delivery.id),
        })
        .await
        .map(Accepted::with_id)
    }

    fn accepted_octets(&self) -> Option<u64> {
        match &self.inner {
            Inner::Smtp(pool) => Some(pool.accepted_octets()),
            Inner::File(..) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lettre::message::MultiPart;

    const TEXTS: [&str; 4] = [
        "Hello,\nplain text.\n.a line starting with a dot\n",
        "示例商城: 已处理 — café\r\nsecond line",
        "a very long line that goes on and on and on and on and on and on and on and on and on and on",
        "",
    ];

    #[test]
    fn the_multipart_body_is_what_lettre_formats() {
        for text in TEXTS {
            for html in TEXTS {
                let html = format!("<p>{html}</p>");
                let lettre = MultiPart::alternative()
                    .boundary("b-123")
                    .singlepart(SinglePart::plain(text.to_owned()))
                    .singlepart(SinglePart::html(html.clone()))
                    .formatted();
                let split = lettre.windows(4).position(|w| w == b"\r\n\r\n").expect("a body");
                let parts = [&SinglePart::plain(text.to_owned()), &SinglePart::html(html)];
                let mut ours = Vec::new();
                write_multipart_body(&mut ours, "b-123", &parts);
                assert_eq!(
                    String::from_utf8_lossy(&ours),
                    String::from_utf8_lossy(&lettre[split + 4..])
                );
                assert!(multipart_len("b-123", &parts) >= ours.len(), "sized up front");
            }
        }
    }

    #[test]
    fn unsigned_mail_is_byte_for_byte_what_lettres_builder_makes() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut settings = crate::config::Settings::defaults().expect("defaults").email;
        for reply_to in [None, Some("Privacy Office <privacy@example.com>".to_owned())] {
            settings.reply_to = reply_to;
            let t = EmailTransport::from_settings(&settings, dir.path()).expect("transport");
            let delivery: DeliveryId = "dlv_0123456789abcdef0123456789abcdef".parse().expect("id");
            for (subject, language) in [
                ("Notice of Data Breach (INC-1)", "en"),
                ("数据安全事件通知（INC-1）", "zh-CN"),
            ] {
                for text in TEXTS {
                    for eight_bit in [false, true] {
                        let mail = Mail {
                            to: "merchant@shop.example",
                            subject,
                            text,
                            html: &format!("<p>{text}</p>"),
                            language,
                            key: "key-1",
                            delivery: Some(&delivery),
                        };
                        let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_780_000_000);
                        let (e1, ours) = t.build_at(&mail, eight_bit, at, "b-123", false).expect("ours");
                        let (e2, lettre) = t.build_at(&mail, eight_bit, at, "b-123", true).expect("lettre's");
                        assert_eq!(String::from_utf8_lossy(&ours), String::from_utf8_lossy(&lettre));
                        assert_eq!(e1, e2);
                    }
                }
            }
        }
    }

    #[test]
    fn part_bodies_are_what_lettre_encodes() {
        let long74 = format!("x\n{}\nz", "a".repeat(74));
        let long75 = format!("x\n{}\r\nz", "b".repeat(75));
        let mut texts: Vec<String> = TEXTS.iter().map(|t| (*t).to_owned()).collect();
        texts.extend([
            long74,
            long75,
            "\n\nstarts with line feeds\r\n\r\rends with one\n".to_owned(),
            "=?utf-8?q?=3D?= tab\there ===\n".to_owned(),
            "é".repeat(200),
            "\u{0}\u{1}\u{7f} control\n".to_owned(),
        ]);
        texts.extend([format!("{}\n", "c".repeat(999)), format!("{}\n", "字".repeat(400))]);
        for text in texts {
            let crlf = crlf_line_ends(&text).into_bytes();
            for eight_bit in [false, true] {
                let ours = part_body(&text, eight_bit);
                if smtp_safe_lines(&crlf) && (crlf.is_ascii() || eight_bit) {
                    // As it stands: 7bit or 8bit, the text itself.
                    let expected = if crlf.is_ascii() {
                        ContentTransferEncoding::SevenBit
                    } else {
                        ContentTransferEncoding::EightBit
                    };
                    assert_eq!(ours.encoding(), expected, "{text:?}");
                    assert_eq!(ours.into_vec(), crlf, "{text:?}");
                } else if !smtp_safe_lines(&crlf) {
                    // A bare CR or a NUL never travels as it is.
                    let encoding = ours.encoding();
                    let raw = ours.into_vec();
                    let decoded = match encoding {
                        ContentTransferEncoding::QuotedPrintable => {
                            quoted_printable::decode(&raw, quoted_printable::ParseMode::Strict).expect("QP")
                        }
                        ContentTransferEncoding::Base64 => {
                            use base64::Engine as _;
                            let joined: Vec<u8> = raw.into_iter().filter(|b| !b"\r\n".contains(b)).collect();
                            base64::engine::general_purpose::STANDARD
                                .decode(joined)
                                .expect("base64")
                        }
                        other => panic!("{text:?} went as {other:?}"),
                    };
                    assert_eq!(decoded, crlf, "{text:?}");
                } else {
                    let lettre = Body::new(text.clone());
                    assert_eq!(ours.encoding(), lettre.encoding(), "{text:?}");
                    assert_eq!(ours.into_vec(), lettre.into_vec(), "{text:?}");
                }
            }
        }
    }

    #[test]
    fn only_lines_smtp_can_carry_go_unencoded() {
        assert!(smtp_safe_lines(b""));
        assert!(smtp_safe_lines(format!("{}\r\nb", "a".repeat(998)).as_bytes()));
        assert!(!smtp_safe_lines(format!("{}\r\nb", "a".repeat(999)).as_bytes()));
        assert!(smtp_safe_lines("a".repeat(998).as_bytes()));
        assert!(!smtp_safe_lines("a".repeat(999).as_bytes()));
        assert!(!smtp_safe_lines(b"a\rb\r\n"), "a bare CR");
        assert!(!smtp_safe_lines(b"a\0b\r\n"), "a NUL");
        assert!(smtp_safe_lines("示例\r\n".as_bytes()));
    }

    #[test]
    fn reserved_invalid_domains_are_refused() {
        assert!(undeliverable_domain("a@example.invalid"));
        assert!(undeliverable_domain("a@EXAMPLE.INVALID"));
        assert!(!undeliverable_domain("a@invalid.example.com"));
    }
}
