//! A small in-process SMTP server for integration tests.
//!
//! Speaks enough ESMTP (RFC 5321) for lettre's `AsyncSmtpTransport` with
//! connection pooling: EHLO/HELO, MAIL, RCPT, DATA, RSET, NOOP, QUIT, plus
//! PIPELINING-tolerant input handling. [`SmtpServer::start`] speaks plain text
//! without AUTH; [`SmtpServer::start_with`] adds STARTTLS or implicit TLS (with
//! the test certificate under `tests/fixtures/`) and AUTH PLAIN/LOGIN with one
//! username and password.
//!
//! Every accepted message is recorded and can be inspected with
//! [`SmtpServer::messages`] / [`SmtpServer::wait_for_messages`]. The reply to
//! each `RCPT TO` can be scripted with [`SmtpServer::set_rcpt_policy`].

// Each integration test binary compiles this module separately and uses only
// part of the API.
#![allow(dead_code)]

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::task::AbortHandle;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::{JoinHandle, JoinSet};

/// Maximum message size, advertised with the `SIZE` extension.
const MAX_MESSAGE_SIZE: usize = 10_485_760;
/// Maximum length of a command line, CRLF included (RFC 5321 says 512; be generous).
const MAX_COMMAND_LINE: usize = 4096;
/// Maximum length of a single line inside DATA (RFC 5321 says 1000; be generous).
const MAX_DATA_LINE: usize = 1 << 20;
/// Connections idle for longer than this are closed (RFC 5321 suggests 5 minutes).
const IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// One message accepted by the server.
#[derive(Clone, Debug)]
pub struct ReceivedMail {
    /// Reverse path from `MAIL FROM:<...>`, without angle brackets (empty for `<>`).
    pub mail_from: String,
    /// Accepted forward paths from `RCPT TO:<...>`, without angle brackets.
    pub rcpt_to: Vec<String>,
    /// Raw message after dot-unstuffing, CRLF line endings preserved, without
    /// the terminating `.` line.
    pub data: String,
    /// The message came over TLS (STARTTLS or implicit).
    pub secure: bool,
    /// The user that authenticated on the connection, if any.
    pub authenticated_as: Option<String>,
    /// The client sent RCPT and DATA behind MAIL without waiting for its reply (RFC 2920).
    pub pipelined: bool,
}

impl ReceivedMail {
    /// The first header field `name` (case-insensitive) of the message, unfolded and trimmed.
    pub fn header(&self, name: &str) -> Option<String> {
        let head = self.data.split("\r\n\r\n").next().unwrap_or_default();
        let mut value: Option<String> = None;
        for line in head.split("\r\n") {
            if let Some(v) = value.as_mut() {
                if line.starts_with([' ', '\t']) {
                    v.push(' ');
                    v.push_str(line.trim());
                    continue;
                }
                break;
            }
            if let Some((field, rest)) = line.split_once(':')
                && field.eq_ignore_ascii_case(name)
            {
                value = Some(rest.trim().to_owned());
            }
        }
        value
    }
}

/// How the server secures connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ServerTls {
    /// Plain text.
    #[default]
    None,
    /// Offers STARTTLS and refuses MAIL before it.
    StartTls,
    /// TLS from the first byte (SMTPS).
    Implicit,
}

/// Options of [`SmtpServer::start_with`].
#[derive(Clone, Debug, Default)]
pub struct ServerOptions {
    pub tls: ServerTls,
    /// Username and password accepted by AUTH PLAIN and LOGIN; when set, MAIL
    /// without a successful AUTH is refused with 530.
    pub auth: Option<(String, String)>,
    /// Offer (and accept) only AUTH LOGIN, not PLAIN.
    pub login_only: bool,
}

/// Reply the server gives to a `RCPT TO` command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reply {
    /// `250 2.1.5`
    Accept,
    /// `451 4.3.0`
    Transient,
    /// `550 5.1.1`
    Permanent,
    /// `550 5.1.1 <address>: ...`, repeating the address as Postfix does.
    PermanentNamingAddress,
}

type RcptPolicy = Arc<dyn Fn(&str, u32) -> Reply + Send + Sync + 'static>;

struct Shared {
    messages: Mutex<Vec<ReceivedMail>>,
    policy: Mutex<Option<RcptPolicy>>,
    /// Number of RCPT attempts seen so far per recipient (ASCII-lowercased).
    attempts: Mutex<HashMap<String, u32>>,
    new_message: Notify,
    queue_ids: AtomicU64,
    options: ServerOptions,
    tls: Option<TlsAcceptor>,
    connections: AtomicU64,
    open: Mutex<Vec<AbortHandle>>,
    /// How long the server holds its 250 after recording a message (a slow relay); zero by
    /// default.
    data_delay: Mutex<Duration>,
    /// Messages recorded whose 250 is being held.
    holding: AtomicU64,
    /// Messages accepted so far (read without locking the messages).
    accepted: AtomicU64,
}

/// Lock a mutex, ignoring poisoning: a panicking test must not cascade.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Shared {
    fn rcpt_reply(&self, rcpt: &str) -> Reply {
        let tries = {
            let mut attempts = lock(&self.attempts);
            let count = attempts.entry(rcpt.to_ascii_lowercase()).or_insert(0);
            let before = *count;
            *count = count.saturating_add(1);
            before
        };
        // Clone the policy out so it is not called with the lock held.
        let policy = lock(&self.policy).clone();
        match policy {
            Some(f) => f(rcpt, tries),
            None => Reply::Accept,
        }
    }

    fn store(&self, mail: ReceivedMail) {
        lock(&self.messages).push(mail);
        self.accepted.fetch_add(1, Ordering::Relaxed);
        self.new_message.notify_waiters();
    }

    fn next_queue_id(&self) -> String {
        format!("{:010X}", self.queue_ids.fetch_add(1, Ordering::Relaxed) + 1)
    }
}

/// A running test SMTP server. Stops accepting (and drops open connections)
/// when dropped.
pub struct SmtpServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl SmtpServer {
    /// Bind to `127.0.0.1:0` and start serving in the background.
    pub async fn start() -> SmtpServer {
        Self::start_with(ServerOptions::default()).await
    }

    /// Like [`SmtpServer::start`], with TLS and AUTH as `options` say.
    /// A server that refuses `refused` with `reply` and accepts every other recipient.
    pub async fn refusing(refused: &'static str, reply: Reply) -> SmtpServer {
        let server = SmtpServer::start().await;
        server.set_rcpt_policy(move |rcpt, _| if rcpt == refused { reply } else { Reply::Accept });
        server
    }

    pub async fn start_with(options: ServerOptions) -> SmtpServer {
        let tls = (options.tls != ServerTls::None).then(test_tls_acceptor);
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind test SMTP server to 127.0.0.1:0");
        let addr = listener.local_addr().expect("local address of test SMTP server");
        let shared = Arc::new(Shared {
            messages: Mutex::new(Vec::new()),
            policy: Mutex::new(None),
            attempts: Mutex::new(HashMap::new()),
            new_message: Notify::new(),
            queue_ids: AtomicU64::new(0),
            options,
            tls,
            connections: AtomicU64::new(0),
            open: Mutex::new(Vec::new()),
            data_delay: Mutex::new(Duration::ZERO),
            holding: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
        });
        let task = tokio::spawn(accept_loop(listener, Arc::clone(&shared)));
        SmtpServer { addr, shared, task }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::Relaxed)
    }

    /// Closes every open connection abruptly (as a server restart or idle
    /// timeout would); the server keeps accepting new ones.
    pub fn drop_connections(&self) {
        for handle in lock(&self.shared.open).drain(..) {
            handle.abort();
        }
    }

    /// Number of messages accepted so far; cheap (no copy of the messages), for polling.
    pub fn count(&self) -> usize {
        self.shared.accepted.load(Ordering::Relaxed) as usize
    }

    /// The `Message-ID` of every message accepted so far (without angle brackets), in order
    /// of acceptance; `None` for a message without one.
    pub fn message_ids(&self) -> Vec<Option<String>> {
        lock(&self.shared.messages)
            .iter()
            .map(|m| m.header("Message-ID").map(|v| v.trim_matches(['<', '>']).to_owned()))
            .collect()
    }

    /// From now on records every message at its final `.` as before but holds the 250 for
    /// `delay` (a slow relay): the message has arrived, the sender does not know it yet.
    /// `Duration::ZERO` answers at once again.
    pub fn set_data_delay(&self, delay: Duration) {
        *lock(&self.shared.data_delay) = delay;
    }

    /// Messages recorded whose 250 is being held by [`SmtpServer::set_data_delay`] right now:
    /// sends in flight from the sender's point of view.
    pub fn holding(&self) -> usize {
        self.shared.holding.load(Ordering::Relaxed) as usize
    }

    /// All messages accepted so far, in order of acceptance.
    pub fn messages(&self) -> Vec<ReceivedMail> {
        lock(&self.shared.messages).clone()
    }

    /// Accepted messages with `rcpt` among their envelope recipients
    /// (compared ASCII-case-insensitively).
    pub fn messages_to(&self, rcpt: &str) -> Vec<ReceivedMail> {
        lock(&self.shared.messages)
            .iter()
            .filter(|m| m.rcpt_to.iter().any(|r| r.eq_ignore_ascii_case(rcpt)))
            .cloned()
            .collect()
    }

    /// Rule for RCPT TO: a closure deciding the reply per recipient and the
    /// number of times it has been tried before (0-based, counted across all
    /// connections, recipient compared ASCII-case-insensitively), so a test
    /// can reject one address permanently (550 5.1.1) or fail it transiently
    /// (451 4.3.0) the first N times. Without a policy every recipient is
    /// accepted.
    pub fn set_rcpt_policy(&self, f: impl Fn(&str, u32) -> Reply + Send + Sync + 'static) {
        *lock(&self.shared.policy) = Some(Arc::new(f));
    }

    /// Wait until at least `n` messages have been accepted or `timeout`
    /// elapses; returns all messages accepted so far either way (so the
    /// caller should assert on the length).
    pub async fn wait_for_messages(&self, n: usize, timeout: Duration) -> Vec<ReceivedMail> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.shared.new_message.notified();
            tokio::pin!(notified);
            // Register before checking, so a message stored in between is not missed.
            notified.as_mut().enable();
            let messages = self.messages();
            if messages.len() >= n {
                return messages;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.messages();
            }
        }
    }
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        // Aborting the accept loop drops its JoinSet, which aborts every
        // connection task.
        self.task.abort();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    shared.connections.fetch_add(1, Ordering::Relaxed);
                    let handle = connections.spawn(handle_connection(stream, Arc::clone(&shared)));
                    let mut open = lock(&shared.open);
                    open.retain(|h| !h.is_finished());
                    open.push(handle);
                }
                // Transient accept errors (e.g. EMFILE): back off briefly.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
            // Reap finished connection tasks so the set does not grow.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

enum Line {
    Eof,
    /// A complete line (terminator included) is in the buffer.
    Complete,
    /// The line exceeded the limit; it has been consumed and discarded.
    TooLong,
}

/// Read one `\n`-terminated line into `buf` (cleared first), at most `limit`
/// bytes. An over-long line is consumed up to and including its `\n`.
async fn read_line<R: AsyncBufRead + Unpin>(reader: &mut R, buf: &mut Vec<u8>, limit: usize) -> std::io::Result<Line> {
    buf.clear();
    loop {
        let chunk = reader.fill_buf().await?;
        if chunk.is_empty() {
            // EOF; a partial unterminated line is treated as a dropped connection.
            return Ok(Line::Eof);
        }
        let (take, done) = match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (chunk.len(), false),
        };
        let room = limit.saturating_sub(buf.len());
        buf.extend_from_slice(&chunk[..take.min(room)]);
        let overflow = take > room;
        reader.consume(take);
        if overflow {
            return discard_rest_of_line(reader, done).await;
        }
        if done {
            return Ok(Line::Complete);
        }
    }
}

async fn discard_rest_of_line<R: AsyncBufRead + Unpin>(reader: &mut R, mut done: bool) -> std::io::Result<Line> {
    while !done {
        let chunk = reader.fill_buf().await?;
        if chunk.is_empty() {
            return Ok(Line::Eof);
        }
        let take = match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => {
                done = true;
                i + 1
            }
            None => chunk.len(),
        };
        reader.consume(take);
    }
    Ok(Line::TooLong)
}

fn strip_eol(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

#[derive(Default)]
struct Session {
    /// HELO/EHLO has been received.
    greeted: bool,
    /// Reverse path of the open transaction, if any.
    mail_from: Option<String>,
    /// Accepted recipients of the open transaction.
    rcpt_to: Vec<String>,
    /// At least one RCPT was attempted in the open transaction.
    rcpt_attempted: bool,
    /// The client sent more commands behind MAIL without waiting for its reply.
    pipelined: bool,
}

impl Session {
    fn reset(&mut self) {
        self.mail_from = None;
        self.rcpt_to.clear();
        self.rcpt_attempted = false;
        self.pipelined = false;
    }
}

/// The test certificate (127.0.0.1, localhost) signed by the test CA.
fn test_tls_acceptor() -> TlsAcceptor {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let certs = CertificateDer::pem_file_iter(dir.join("test-server.pem"))
        .expect("read test-server.pem")
        .collect::<Result<Vec<_>, _>>()
        .expect("parse test-server.pem");
    let key = PrivateKeyDer::from_pem_file(dir.join("test-server.key")).expect("read test-server.key");
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("test server certificate");
    TlsAcceptor::from(Arc::new(config))
}

/// Counts a held reply for as long as it lives (also when the connection task is aborted).
struct Holding<'a>(&'a AtomicU64);

impl<'a> Holding<'a> {
    fn new(counter: &'a AtomicU64) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        Holding(counter)
    }
}

impl Drop for Holding<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What ended a [`serve`] loop.
enum Outcome {
    Closed,
    /// The client asked for STARTTLS and was told to go ahead.
    StartTls,
}

/// Serve one connection; any I/O error or timeout simply ends it.
async fn handle_connection(stream: TcpStream, shared: Arc<Shared>) {
    let _ = stream.set_nodelay(true);
    if shared.options.tls == ServerTls::Implicit {
        let Some(acceptor) = shared.tls.clone() else { return };
        let Ok(tls) = acceptor.accept(stream).await else { return };
        let (read_half, mut writer) = tokio::io::split(tls);
        let mut reader = BufReader::new(read_half);
        let _ = serve(&mut reader, &mut writer, &shared, true, true).await;
        let _ = writer.shutdown().await;
        return;
    }
    let (read_half, mut writer) = stream.into_split();
    let mut reader = BufReader::new(read_half);
    match serve(&mut reader, &mut writer, &shared, false, true).await {
        Ok(Outcome::StartTls) => {
            let Some(acceptor) = shared.tls.clone() else { return };
            let Ok(stream) = reader.into_inner().reunite(writer) else {
                return;
            };
            let Ok(tls) = acceptor.accept(stream).await else { return };
            let (read_half, mut writer) = tokio::io::split(tls);
            let mut reader = BufReader::new(read_half);
            let _ = serve(&mut reader, &mut writer, &shared, true, false).await;
            let _ = writer.shutdown().await;
        }
        _ => {
            let _ = writer.shutdown().await;
        }
    }
}

/// Reads one line of an AUTH exchange and decodes it from base64.
async fn read_auth_line<R: AsyncBufRead + Unpin>(reader: &mut R) -> std::io::Result<Option<String>> {
    let mut buf = Vec::new();
    match tokio::time::timeout(IDLE_TIMEOUT, read_line(reader, &mut buf, MAX_COMMAND_LINE)).await {
        Ok(Ok(Line::Complete)) => {}
        Ok(Err(e)) => return Err(e),
        _ => return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "AUTH aborted")),
    }
    let line = String::from_utf8_lossy(strip_eol(&buf)).trim().to_owned();
    Ok(decode_b64(&line))
}

fn decode_b64(text: &str) -> Option<String> {
    B64.decode(text.trim())
        .ok()
        .map(|b| String::from_utf8_lossy(&b).into_owned())
}

/// AUTH PLAIN or LOGIN: the user if the credentials match, `Err(reply)` otherwise.
async fn authenticate<R, W>(
    reader: &mut R,
    writer: &mut W,
    arg: &str,
    expected: &(String, String),
) -> std::io::Result<Result<String, &'static str>>
where
    R: AsyncBufRead + Unpin,
    W: AsyncWriteExt + Unpin,
{
    let (mechanism, initial) = match arg.split_once(' ') {
        Some((m, i)) => (m.to_ascii_uppercase(), Some(i.trim().to_owned())),
        None => (arg.to_ascii_uppercase(), None),
    };
    let (user, pass) = match mechanism.as_str() {
        "PLAIN" => {
            let response = match initial {
                Some(i) => decode_b64(&i),
                None => {
                    reply(writer, "334 ").await?;
                    read_auth_line(reader).await?
                }
            };
            let Some(response) = response else {
                return Ok(Err("501 5.5.2 Cannot decode response"));
            };
            let mut fields = response.split('\0');
            let _authzid = fields.next();
            (
                fields.next().unwrap_or_default().to_owned(),
                fields.next().unwrap_or_default().to_owned(),
            )
        }
        "LOGIN" => {
            let user = match initial {
                Some(i) => decode_b64(&i),
                None => {
                    reply(writer, "334 VXNlcm5hbWU6").await?;
                    read_auth_line(reader).await?
                }
            };
            reply(writer, "334 UGFzc3dvcmQ6").await?;
            let pass = read_auth_line(reader).await?;
            match (user, pass) {
                (Some(u), Some(p)) => (u, p),
                _ => return Ok(Err("501 5.5.2 Cannot decode response")),
            }
        }
        _ => return Ok(Err("504 5.5.4 Unrecognized authentication type")),
    };
    if (user.as_str(), pass.as_str()) == (expected.0.as_str(), expected.1.as_str()) {
        Ok(Ok(user))
    } else {
        Ok(Err("535 5.7.8 Authentication credentials invalid"))
    }
}

async fn reply<W: AsyncWriteExt + Unpin>(w: &mut W, text: &str) -> std::io::Result<()> {
    w.write_all(text.as_bytes()).await?;
    w.write_all(b"\r\n").await?;
    w.flush().await
}

async fn serve<R, W>(
    reader: &mut R,
    writer: &mut W,
    shared: &Shared,
    secure: bool,
    banner: bool,
) -> std::io::Result<Outcome>
where
    R: AsyncBufRead + Unpin,
    W: AsyncWriteExt + Unpin,
{
    if banner {
        reply(writer, "220 localhost ESMTP tocsin-test-smtp ready").await?;
    }
    let options = &shared.options;
    let offer_starttls = options.tls == ServerTls::StartTls && !secure;
    let offer_auth = options.auth.is_some() && (secure || options.tls == ServerTls::None);
    let mut authenticated_as: Option<String> = None;
    let mut session = Session::default();
    let mut buf = Vec::new();
    loop {
        let line = match tokio::time::timeout(IDLE_TIMEOUT, read_line(reader, &mut buf, MAX_COMMAND_LINE)).await {
            Err(_elapsed) => {
                reply(writer, "421 4.4.2 localhost Idle timeout, closing connection").await?;
                return Ok(Outcome::Closed);
            }
            Ok(line) => line?,
        };
        match line {
            Line::Eof => return Ok(Outcome::Closed),
            Line::TooLong => {
                reply(writer, "500 5.5.6 Line too long").await?;
                continue;
            }
            Line::Complete => {}
        }
        let text = String::from_utf8_lossy(strip_eol(&buf)).into_owned();
        let (verb, arg) = match text.find(' ') {
            Some(i) => (&text[..i], text[i + 1..].trim()),
            None => (text.as_str(), ""),
        };
        let verb = verb.to_ascii_uppercase();
        match verb.as_str() {
            "EHLO" => {
                if arg.is_empty() {
                    reply(writer, "501 5.5.4 Syntax: EHLO hostname").await?;
                    continue;
                }
                session.reset();
                session.greeted = true;
                let mut greeting = format!(
                    "250-localhost Hello {arg}\r\n\
                     250-PIPELINING\r\n\
                     250-8BITMIME\r\n\
                     250-SMTPUTF8\r\n"
                );
                if offer_starttls {
                    greeting.push_str("250-STARTTLS\r\n");
                }
                if offer_auth {
                    greeting.push_str(if options.login_only {
                        "250-AUTH LOGIN\r\n"
                    } else {
                        "250-AUTH PLAIN LOGIN\r\n"
                    });
                }
                greeting.push_str(&format!("250 SIZE {MAX_MESSAGE_SIZE}"));
                reply(writer, &greeting).await?;
            }
            "HELO" => {
                if arg.is_empty() {
                    reply(writer, "501 5.5.4 Syntax: HELO hostname").await?;
                    continue;
                }
                session.reset();
                session.greeted = true;
                reply(writer, &format!("250 localhost Hello {arg}")).await?;
            }
            "MAIL" => {
                if !session.greeted {
                    reply(writer, "503 5.5.1 Send HELO/EHLO first").await?;
                } else if offer_starttls {
                    reply(writer, "530 5.7.0 Must issue a STARTTLS command first").await?;
                } else if options.auth.is_some() && authenticated_as.is_none() {
                    reply(writer, "530 5.7.0 Authentication required").await?;
                } else if session.mail_from.is_some() {
                    reply(writer, "503 5.5.1 Nested MAIL command").await?;
                } else {
                    match parse_mail_from(arg) {
                        Ok(from) => {
                            session.mail_from = Some(from);
                            // Checked before replying: a client that waits for the reply cannot
                            // have sent anything more yet.
                            session.pipelined = matches!(
                                tokio::time::timeout(Duration::ZERO, reader.fill_buf()).await,
                                Ok(Ok(more)) if !more.is_empty()
                            );
                            reply(writer, "250 2.1.0 Ok").await?;
                        }
                        Err(err) => reply(writer, err).await?,
                    }
                }
            }
            "RCPT" => {
                if session.mail_from.is_none() {
                    reply(writer, "503 5.5.1 Need MAIL command first").await?;
                    continue;
                }
                match parse_path(arg, "TO:") {
                    Ok((to, params)) if !to.is_empty() && params.is_empty() => {
                        session.rcpt_attempted = true;
                        match shared.rcpt_reply(&to) {
                            Reply::Accept => {
                                session.rcpt_to.push(to);
                                reply(writer, "250 2.1.5 Ok").await?;
                            }
                            Reply::Transient => {
                                reply(writer, "451 4.3.0 Temporary failure, try again later").await?;
                            }
                            Reply::Permanent => {
                                reply(writer, "550 5.1.1 Recipient address rejected: no such user").await?;
                            }
                            Reply::PermanentNamingAddress => {
                                let text = format!("550 5.1.1 <{to}>: Recipient address rejected: User unknown");
                                reply(writer, &text).await?;
                            }
                        }
                    }
                    Ok((to, _)) if to.is_empty() => {
                        reply(writer, "501 5.1.3 Empty recipient address").await?;
                    }
                    Ok(_) => reply(writer, "555 5.5.4 RCPT parameters not supported").await?,
                    Err(()) => reply(writer, "501 5.5.4 Syntax: RCPT TO:<address>").await?,
                }
            }
            "DATA" => {
                if !arg.is_empty() {
                    reply(writer, "501 5.5.4 Syntax: DATA").await?;
                    continue;
                }
                let Some(mail_from) = session.mail_from.clone() else {
                    reply(writer, "503 5.5.1 Need MAIL command first").await?;
                    continue;
                };
                if session.rcpt_to.is_empty() {
                    if session.rcpt_attempted {
                        reply(writer, "554 5.5.1 No valid recipients").await?;
                    } else {
                        reply(writer, "503 5.5.1 Need RCPT command first").await?;
                    }
                    continue;
                }
                reply(writer, "354 End data with <CR><LF>.<CR><LF>").await?;
                let body = read_data(reader).await?;
                let rcpt_to = std::mem::take(&mut session.rcpt_to);
                let pipelined = session.pipelined;
                session.reset();
                match body {
                    Some(data) => {
                        let id = shared.next_queue_id();
                        shared.store(ReceivedMail {
                            mail_from,
                            rcpt_to,
                            data,
                            secure,
                            authenticated_as: authenticated_as.clone(),
                            pipelined,
                        });
                        let delay = *lock(&shared.data_delay);
                        if !delay.is_zero() {
                            let _held = Holding::new(&shared.holding);
                            tokio::time::sleep(delay).await;
                        }
                        reply(writer, &format!("250 2.0.0 Ok: queued as {id}")).await?;
                    }
                    None => {
                        reply(writer, "552 5.3.4 Message size exceeds fixed maximum").await?;
                    }
                }
            }
            "RSET" => {
                session.reset();
                reply(writer, "250 2.0.0 Ok").await?;
            }
            "NOOP" => reply(writer, "250 2.0.0 Ok").await?,
            "QUIT" => {
                reply(writer, "221 2.0.0 localhost Bye").await?;
                return Ok(Outcome::Closed);
            }
            "STARTTLS" if offer_starttls => {
                if !arg.is_empty() {
                    reply(writer, "501 5.5.4 Syntax: STARTTLS").await?;
                    continue;
                }
                reply(writer, "220 2.0.0 Ready to start TLS").await?;
                return Ok(Outcome::StartTls);
            }
            "AUTH" if offer_auth => match &options.auth {
                Some(_) if authenticated_as.is_some() => {
                    reply(writer, "503 5.5.1 Already authenticated").await?;
                }
                Some(_) if options.login_only && !arg.to_ascii_uppercase().starts_with("LOGIN") => {
                    reply(writer, "504 5.5.4 Unrecognized authentication type").await?;
                }
                Some(expected) => match authenticate(reader, writer, arg, expected).await? {
                    Ok(user) => {
                        authenticated_as = Some(user);
                        reply(writer, "235 2.7.0 Authentication successful").await?;
                    }
                    Err(answer) => reply(writer, answer).await?,
                },
                None => reply(writer, "502 5.5.1 Command not implemented").await?,
            },
            "VRFY" => reply(writer, "252 2.1.5 Cannot VRFY user").await?,
            "HELP" => reply(writer, "214 2.0.0 See RFC 5321").await?,
            "STARTTLS" | "AUTH" | "EXPN" | "BDAT" | "TURN" | "ETRN" => {
                reply(writer, "502 5.5.1 Command not implemented").await?;
            }
            _ => reply(writer, "500 5.5.2 Command not recognized").await?,
        }
    }
}

/// Parse the argument of `MAIL` (`FROM:<addr> [params]`).
fn parse_mail_from(arg: &str) -> Result<String, &'static str> {
    let (from, params) = parse_path(arg, "FROM:").map_err(|()| "501 5.5.4 Syntax: MAIL FROM:<address>")?;
    for param in params.split_ascii_whitespace() {
        let (key, value) = match param.split_once('=') {
            Some((k, v)) => (k.to_ascii_uppercase(), Some(v)),
            None => (param.to_ascii_uppercase(), None),
        };
        match (key.as_str(), value) {
            ("SIZE", Some(v)) => match v.parse::<u64>() {
                Ok(size) if size > MAX_MESSAGE_SIZE as u64 => {
                    return Err("552 5.3.4 Message size exceeds fixed maximum");
                }
                Ok(_) => {}
                Err(_) => return Err("501 5.5.4 Invalid SIZE parameter"),
            },
            ("BODY", Some(v)) if v.eq_ignore_ascii_case("7BIT") || v.eq_ignore_ascii_case("8BITMIME") => {}
            ("SMTPUTF8", None) => {}
            _ => return Err("555 5.5.4 Unsupported MAIL parameter"),
        }
    }
    Ok(from)
}

/// Parse `<keyword><path> [params]`, e.g. `TO:<a@b> X=Y`, where `keyword`
/// is matched case-insensitively and a space after the colon is tolerated.
/// Returns the address without angle brackets (possibly empty) and the
/// parameter string.
fn parse_path<'a>(arg: &'a str, keyword: &str) -> Result<(String, &'a str), ()> {
    let head = arg.get(..keyword.len()).ok_or(())?;
    if !head.eq_ignore_ascii_case(keyword) {
        return Err(());
    }
    let rest = arg[keyword.len()..].trim_start();
    let rest = rest.strip_prefix('<').ok_or(())?;
    let end = rest.find('>').ok_or(())?;
    let mut addr = &rest[..end];
    // Strip an obsolete source route (`@a,@b:user@host`).
    if addr.starts_with('@') {
        addr = addr.split_once(':').map_or(addr, |(_, mailbox)| mailbox);
    }
    if addr.chars().any(|c| c.is_whitespace() || c == '<') {
        return Err(());
    }
    Ok((addr.to_string(), rest[end + 1..].trim()))
}

/// Read message content after `354` up to the `.` line, dot-unstuffing.
/// Returns `None` if the message exceeded `MAX_MESSAGE_SIZE` (the content is
/// still consumed up to the terminator). EOF before the terminator is an error.
async fn read_data<R: AsyncBufRead + Unpin>(reader: &mut R) -> std::io::Result<Option<String>> {
    let mut data: Vec<u8> = Vec::new();
    let mut too_big = false;
    let mut line = Vec::new();
    loop {
        match tokio::time::timeout(IDLE_TIMEOUT, read_line(reader, &mut line, MAX_DATA_LINE)).await {
            Err(_elapsed) => {
                return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "timeout in DATA"));
            }
            Ok(Err(e)) => return Err(e),
            Ok(Ok(Line::Eof)) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "connection closed in DATA",
                ));
            }
            Ok(Ok(Line::TooLong)) => {
                too_big = true;
                continue;
            }
            Ok(Ok(Line::Complete)) => {}
        }
        if strip_eol(&line) == b"." {
            break;
        }
        if too_big {
            continue;
        }
        let unstuffed = line.strip_prefix(b".").unwrap_or(&line);
        if data.len() + unstuffed.len() > MAX_MESSAGE_SIZE {
            too_big = true;
            data = Vec::new();
            continue;
        }
        data.extend_from_slice(unstuffed);
    }
    if too_big {
        return Ok(None);
    }
    Ok(Some(match String::from_utf8(data) {
        Ok(s) => s,
        Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
    }))
}
