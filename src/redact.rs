//! Personal data kept out of the logs. Tocsin's own log lines name deliveries, merchants'
//! ids and references, never an address; but an error a peer sends back may repeat one (an
//! SMTP server's "550 <someone@example.com>: no such user", a library's debug line). So every
//! line the log writer is given passes through [`redact`] before it reaches the output:
//! email addresses become `[email]` and phone numbers `[phone]`.

use std::borrow::Cow;
use std::io::{self, Write};

/// `text` with every email address replaced by `[email]` and every phone number (a `+` and 7
/// to 15 digits, or a mobile number's 11 digits standing alone) by `[phone]`.
pub fn redact(text: &str) -> Cow<'_, str> {
    let emails = redact_emails(text);
    match redact_phones(&emails) {
        Cow::Borrowed(_) => emails,
        Cow::Owned(s) => Cow::Owned(s),
    }
}

fn is_local_part(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"._%+-'!#$&*/=?^`{|}~".contains(&c)
}

fn is_domain_part(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'.' || c == b'-'
}

fn redact_emails(text: &str) -> Cow<'_, str> {
    let bytes = text.as_bytes();
    if !bytes.contains(&b'@') {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'@' {
            i += 1;
            continue;
        }
        let mut start = i;
        while start > copied && is_local_part(bytes[start - 1]) {
            start -= 1;
        }
        let mut end = i + 1;
        while end < bytes.len() && is_domain_part(bytes[end]) {
            end += 1;
        }
        // A trailing dot ends the sentence, not the domain.
        while end > i + 1 && bytes[end - 1] == b'.' {
            end -= 1;
        }
        let domain = &text[i + 1..end];
        if start < i && domain.contains('.') && !domain.starts_with('.') {
            out.push_str(&text[copied..start]);
            out.push_str("[email]");
            copied = end;
            i = end;
        } else {
            i += 1;
        }
    }
    if copied == 0 {
        return Cow::Borrowed(text);
    }
    out.push_str(&text[copied..]);
    Cow::Owned(out)
}

/// Characters that make a run of digits part of something else: an id (`m-0000001`,
/// a UUID's segment), a number with a decimal point, a time.
fn joins_digits(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"-_.:/".contains(&c)
}

fn redact_phones(text: &str) -> Cow<'_, str> {
    let bytes = text.as_bytes();
    let mut out = String::new();
    let mut copied = 0;
    let mut i = 0;
    while i < bytes.len() {
        if !bytes[i].is_ascii_digit() {
            i += 1;
            continue;
        }
        let mut start = i;
        let mut end = i;
        while end < bytes.len() && bytes[end].is_ascii_digit() {
            end += 1;
        }
        let digits = end - start;
        let plus = start > 0 && bytes[start - 1] == b'+';
        if plus {
            start -= 1;
        }
        let before_ok = start == 0 || !joins_digits(bytes[start - 1]);
        let after_ok = end == bytes.len() || !joins_digits(bytes[end]);
        let run = &bytes[i..end];
        // Without the plus only the shapes of a Chinese mobile number are taken (11 digits
        // from 1, or 13 from 861): counts and epoch times must stay readable.
        let bare_mobile = (digits == 11 && run[0] == b'1') || (digits == 13 && run.starts_with(b"861"));
        let phone = if plus {
            (7..=15).contains(&digits)
        } else {
            bare_mobile && before_ok
        };
        if phone && after_ok {
            out.push_str(&text[copied..start]);
            out.push_str("[phone]");
            copied = end;
        }
        i = end;
    }
    if copied == 0 {
        return Cow::Borrowed(text);
    }
    out.push_str(&text[copied..]);
    Cow::Owned(out)
}

/// A log writer that redacts each line before handing it to `W`. The fmt subscriber formats
/// an event whole and writes it in one call, so a line is never split across two writes.
pub struct Redacting<W>(pub W);

impl<W: Write> Write for Redacting<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        self.0.write_all(redact(&text).as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

/// Makes a [`Redacting`] writer over standard error for each log line.
#[derive(Debug, Clone, Copy, Default)]
pub struct RedactingStderr;

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for RedactingStderr {
    type Writer = Redacting<io::Stderr>;

    fn make_writer(&'a self) -> Self::Writer {
        Redacting(io::stderr())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn email_addresses_are_replaced_wherever_they_stand() {
        assert_eq!(
            redact("550 5.1.1 <li.wei+shop@mail.example.cn>: Recipient address rejected"),
            "550 5.1.1 <[email]>: Recipient address rejected"
        );
        assert_eq!(redact("to a@b.co and c.d@e.org."), "to [email] and [email].");
        assert_eq!(redact("\"to\":\"x_y@z.com\""), "\"to\":\"[email]\"");
    }

    #[test]
    fn phone_numbers_are_replaced_with_or_without_the_plus() {
        assert_eq!(
            redact("The 'To' number +8613800138000 is not valid"),
            "The 'To' number [phone] is not valid"
        );
        assert_eq!(redact("PhoneNumbers=13800138000&x"), "PhoneNumbers=[phone]&x");
        assert_eq!(redact("to=8613800138000"), "to=[phone]");
        assert_eq!(redact("\"to\":\"+14155550100\""), "\"to\":\"[phone]\"");
    }

    #[test]
    fn ids_times_and_counts_are_left_alone() {
        for text in [
            "delivery=0193f6a2-1c2b-7d3e-8f40-446655440000 attempt=3",
            "2026-12-01T17:36:47.123456Z  INFO merchant=m-0000001 sent=1200",
            "incident INC-2026-0042 notices=1000000 at=1764590000000",
            "no at sign @ here, nor@dot",
        ] {
            assert_eq!(redact(text), text);
        }
    }

    #[test]
    fn a_redacting_writer_scrubs_what_it_is_given() {
        let mut out = Vec::new();
        Redacting(&mut out)
            .write_all(b"WARN send failed error=550 <a@b.cn> +8613900000001\n")
            .expect("write");
        assert_eq!(
            String::from_utf8_lossy(&out),
            "WARN send failed error=550 <[email]> [phone]\n"
        );
    }
}
