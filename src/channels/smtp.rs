//! A fast SMTP connection pool on lettre's protocol client.
//!
//! lettre's pooled `AsyncSmtpTransport` opens its sockets without `TCP_NODELAY` and writes the
//! message and its closing dot in two writes, so every message waits for the peer's delayed
//! ACK (~40 ms: ~23 messages a second per connection). This pool opens the socket itself with
//! `TCP_NODELAY` and hands it to [`AsyncSmtpConnection::connect_with_transport`], keeping
//! lettre's protocol handling (EHLO, STARTTLS, AUTH, dot-stuffing, reply parsing).
//!
//! Where the server offers PIPELINING (RFC 2920), a message costs two round trips instead of
//! four: `MAIL`, `RCPT` and `DATA` leave in one segment, then the content, dot-stuffed here in one
//! pass rather than byte by byte, with its closing dot; lettre still formats the commands and
//! parses every reply. For that Tocsin's layer sits above TLS, so STARTTLS is spoken here (see
//! [`SmtpPool::starttls`]) rather than by lettre, which would put TLS above it.
//!
//! Up to `pool_size` connections; idle ones are reused most recently used first, closed when
//! idle longer than the idle timeout. A connection that answered a transaction error is reset
//! (`RSET`) and kept, one that broke or timed out is dropped. A reused connection the server
//! closed while idle is replaced by a fresh one for the same message. Every step (connect,
//! TLS, greeting, each command) is bounded by the timeout.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::str::FromStr;
use std::sync::atomic::AtomicU8;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use lettre::address::Envelope;
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
#[allow(deprecated)]
use lettre::transport::smtp::client::AsyncNetworkStream;
use lettre::transport::smtp::client::{AsyncSmtpConnection, AsyncTokioStream, Certificate, TlsParameters};
use lettre::transport::smtp::commands::{Data, Ehlo, Mail, Rcpt, Rset, Starttls};
use lettre::transport::smtp::extension::{ClientId, Extension, MailBodyParameter, MailParameter, ServerInfo};
use lettre::transport::smtp::response::Response;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

use super::{FailureKind, SendError};
use crate::config::SmtpSettings;

/// How the connection is secured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// Plain text (a local relay).
    None,
    /// Plain connect, then `STARTTLS` (required: a server that does not offer it is refused).
    StartTls,
    /// TLS from the first byte (SMTPS, port 465).
    Tls,
}

impl FromStr for TlsMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(Self::None),
            "starttls" => Ok(Self::StartTls),
            "tls" => Ok(Self::Tls),
            other => Err(format!("unknown TLS mode {other:?}; expected none, starttls or tls")),
        }
    }
}

/// What the pool needs to know; [`SmtpPoolConfig::from_settings`] reads it from the settings.
#[derive(Debug, Clone)]
pub struct SmtpPoolConfig {
    pub host: String,
    pub port: u16,
    pub tls: TlsMode,
    /// Username and password for `AUTH` (PLAIN or LOGIN), if any.
    pub credentials: Option<(String, String)>,
    pub pool_size: usize,
    /// Bound on each step: connect, TLS handshake, greeting, each command, the message.
    pub timeout: Duration,
    pub idle_timeout: Duration,
    /// An extra trusted root certificate (PEM), besides the public roots.
    pub tls_ca_file: Option<PathBuf>,
    /// The EHLO name; the host name when `None`.
    pub hello_name: Option<String>,
}

impl SmtpPoolConfig {
    pub fn from_settings(s: &SmtpSettings) -> Result<Self, String> {
        Ok(Self {
            host: s.host.clone(),
            port: s.port,
            tls: s.tls.parse()?,
            credentials: (!s.username.is_empty()).then(|| (s.username.clone(), s.password.expose().to_owned())),
            pool_size: usize::try_from(s.pool_size).unwrap_or(usize::MAX).max(1),
            timeout: Duration::from_secs(s.timeout_seconds.max(1)),
            idle_timeout: Duration::from_secs(s.idle_timeout_seconds),
            tls_ca_file: s.tls_ca_file.clone(),
            hello_name: s.hello_name.clone(),
        })
    }
}

struct Idle {
    conn: Conn,
    since: Instant,
}

/// A connection, with the way to send bytes ahead of lettre's next read when Tocsin's layer
/// is above TLS.
struct Conn {
    smtp: AsyncSmtpConnection,
    ahead: Option<Ahead>,
    /// The server offers PIPELINING (lettre does not keep that keyword: [`Tap`] heard it).
    pipelining: bool,
}

/// Tocsin's side door into a connection's byte stream, below lettre (see [`Coalesce`]).
type Ahead = Arc<Mutex<Tap>>;

#[derive(Default)]
struct Tap {
    /// Bytes to go out after what lettre has written, at its next read.
    ahead: Vec<u8>,
    /// What the server said while the connection was set up (until taken).
    heard: Option<Vec<u8>>,
}

impl Tap {
    fn listening() -> Self {
        Self {
            ahead: Vec::new(),
            heard: Some(Vec::new()),
        }
    }
}

/// Whether the server's EHLO reply, among what it said during setup, lists PIPELINING
/// (keywords are case-insensitive).
fn offers_pipelining(heard: &[u8]) -> bool {
    heard.split(|b| *b == b'\n').any(|line| {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        line.len() == 14
            && (line.starts_with(b"250-") || line.starts_with(b"250 "))
            && line[4..].eq_ignore_ascii_case(b"PIPELINING")
    })
}

/// A pool of SMTP connections to one server.
pub struct SmtpPool {
    host: String,
    port: u16,
    mode: TlsMode,
    tls: Option<TlsParameters>,
    credentials: Option<Credentials>,
    hello: ClientId,
    timeout: Duration,
    idle_timeout: Duration,
    /// Idle connections, most recently returned last (taken first).
    idle: Mutex<Vec<Idle>>,
    /// One permit per connection that may exist (idle or in use).
    permits: Semaphore,
    opened: AtomicU64,
    /// Whether the server offers 8BITMIME, as its latest EHLO said: 0 not known yet, 1 yes, 2 no.
    eight_bit_mime: AtomicU8,
    /// Octets of message content the server accepted, all messages together.
    accepted_octets: AtomicU64,
}

impl fmt::Debug for SmtpPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SmtpPool")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("mode", &self.mode)
            .field("auth", &self.credentials.is_some())
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Where a transaction failed, for the error message and to know whether a retry on a fresh
/// connection is safe (nothing was committed before the message content).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Connect,
    Tls,
    Greeting,
    Auth,
    MailFrom,
    RcptTo,
    Data,
    Message,
}

impl Stage {
    fn as_str(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::Tls => "TLS",
            Self::Greeting => "greeting",
            Self::Auth => "AUTH",
            Self::MailFrom => "MAIL FROM",
            Self::RcptTo => "RCPT TO",
            Self::Data => "DATA",
            Self::Message => "message",
        }
    }
}

/// A failed step: the error to report, and whether the connection can still be used.
struct Failure {
    error: SendError,
    stage: Stage,
    /// The server's reply code, if it answered (the connection is then in a known state).
    code: Option<String>,
}

impl Failure {
    fn replied(&self) -> bool {
        self.code.is_some()
    }
    /// The server said it is closing the connection.
    fn closing(&self) -> bool {
        self.code.as_deref() == Some("421")
    }
}

impl SmtpPool {
    /// A pool (no connection is opened until the first send).
    pub fn new(config: SmtpPoolConfig) -> Result<Self, String> {
        let tls = match config.tls {
            TlsMode::None => None,
            TlsMode::StartTls | TlsMode::Tls => Some(tls_parameters(&config.host, config.tls_ca_file.as_deref())?),
        };
        let hello = match &config.hello_name {
            Some(name) if !name.is_empty() => ClientId::Domain(name.clone()),
            _ => ClientId::default(),
        };
        Ok(Self {
            host: config.host,
            port: config.port,
            mode: config.tls,
            tls,
            credentials: config.credentials.map(|(u, p)| Credentials::new(u, p)),
            hello,
            timeout: config.timeout,
            idle_timeout: config.idle_timeout,
            idle: Mutex::new(Vec::with_capacity(config.pool_size)),
            permits: Semaphore::new(config.pool_size),
            opened: AtomicU64::new(0),
            eight_bit_mime: AtomicU8::new(0),
            accepted_octets: AtomicU64::new(0),
        })
    }

    pub fn from_settings(s: &SmtpSettings) -> Result<Self, String> {
        Self::new(SmtpPoolConfig::from_settings(s)?)
    }

    /// Connections opened since the pool was made (reuse keeps this low).
    pub fn connections_opened(&self) -> u64 {
        self.opened.load(Ordering::Relaxed)
    }

    /// Whether the server takes 8-bit message content (8BITMIME), as far as the pool knows
    /// (`None` before the first connection).
    /// Octets of message content (headers and body, before dot-stuffing) the server has
    /// accepted so far.
    pub fn accepted_octets(&self) -> u64 {
        self.accepted_octets.load(Ordering::Relaxed)
    }

    pub fn eight_bit_mime(&self) -> Option<bool> {
        match self.eight_bit_mime.load(Ordering::Relaxed) {
            1 => Some(true),
            2 => Some(false),
            _ => None,
        }
    }

    /// Connections waiting for the next message.
    pub fn idle_connections(&self) -> usize {
        lock(&self.idle).len()
    }

    /// Sends one message (already formatted, CRLF line endings) to the envelope's recipients.
    /// Errors carry the SMTP status code only, never the server's text (it may echo addresses).
    pub async fn send(&self, envelope: &Envelope, message: &[u8]) -> Result<(), SendError> {
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| SendError::new(FailureKind::ProviderError, "the SMTP pool is closed"))?;
        let options = mail_options_for(envelope, message);
        // A reused connection may have been closed by the server while idle: if it fails before
        // the message content was sent, nothing was committed, so try again on a new one.
        if let Some(mut conn) = self.take_idle() {
            match self.transaction(&mut conn, envelope, message, &options).await {
                Ok(()) => {
                    self.put_back(conn);
                    self.accepted_octets.fetch_add(message.len() as u64, Ordering::Relaxed);
                    return Ok(());
                }
                Err(f) if f.stage == Stage::MailFrom && (!f.replied() || f.closing()) => {
                    tracing::debug!(error = %f.error.message, "SMTP: pooled connection gone, reconnecting");
                    close(conn);
                }
                Err(f) => {
                    self.recycle(conn, &f).await;
                    return Err(f.error);
                }
            }
        }
        let mut conn = self.connect().await.map_err(|f| f.error)?;
        match self.transaction(&mut conn, envelope, message, &options).await {
            Ok(()) => {
                self.put_back(conn);
                self.accepted_octets.fetch_add(message.len() as u64, Ordering::Relaxed);
                Ok(())
            }
            Err(f) => {
                self.recycle(conn, &f).await;
                Err(f.error)
            }
        }
    }

    /// The most recently used idle connection that is not too old; older ones are closed.
    fn take_idle(&self) -> Option<Conn> {
        let (fresh, stale) = {
            let mut idle = lock(&self.idle);
            let mut stale = Vec::new();
            let mut fresh = None;
            while let Some(entry) = idle.pop() {
                if entry.since.elapsed() < self.idle_timeout && !entry.conn.smtp.has_broken() {
                    fresh = Some(entry.conn);
                    break;
                }
                stale.push(entry.conn);
            }
            // Entries are pushed in return order, so the oldest are at the front.
            let cutoff = self.idle_timeout;
            let mut i = 0;
            while i < idle.len() {
                if idle[i].since.elapsed() >= cutoff {
                    stale.push(idle.remove(i).conn);
                } else {
                    i += 1;
                }
            }
            (fresh, stale)
        };
        stale.into_iter().for_each(close);
        fresh
    }

    fn put_back(&self, conn: Conn) {
        if conn.smtp.has_broken() {
            return;
        }
        lock(&self.idle).push(Idle {
            conn,
            since: Instant::now(),
        });
    }

    /// After a failed transaction: a connection that answered is reset and kept; one that
    /// broke, timed out or is closing (421) is dropped.
    async fn recycle(&self, mut conn: Conn, failure: &Failure) {
        if !failure.replied() || failure.closing() || conn.smtp.has_broken() {
            close(conn);
            return;
        }
        match tokio::time::timeout(self.timeout, conn.smtp.command(Rset)).await {
            Ok(Ok(_)) => self.put_back(conn),
            _ => close(conn),
        }
    }

    async fn transaction(
        &self,
        conn: &mut Conn,
        envelope: &Envelope,
        message: &[u8],
        options: &[MailParameter],
    ) -> Result<(), Failure> {
        let info = conn.smtp.server_info();
        if options.contains(&MailParameter::SmtpUtfEight) && !info.supports_feature(Extension::SmtpUtfEight) {
            return Err(Failure {
                error: SendError::permanent("the address is not ASCII and the SMTP server does not offer SMTPUTF8"),
                stage: Stage::MailFrom,
                code: Some("555".into()),
            });
        }
        if !message.is_ascii() && !info.supports_feature(Extension::EightBitMime) {
            // Built for a server that took 8-bit content; the next attempt is built for this one.
            return Err(Failure {
                error: SendError::new(
                    FailureKind::ProviderError,
                    "the message is 8-bit and the SMTP server no longer offers 8BITMIME",
                ),
                stage: Stage::MailFrom,
                code: Some("555".into()),
            });
        }
        let t = self.timeout;
        let mail = Mail::new(envelope.from().cloned(), options.to_vec());
        match (&conn.ahead, conn.pipelining) {
            (Some(ahead), true) => {
                let ahead = ahead.clone();
                pipelined_transaction(t, &mut conn.smtp, &ahead, envelope, mail, message).await
            }
            _ => {
                let smtp = &mut conn.smtp;
                step(t, Stage::MailFrom, smtp.command(mail)).await?;
                for rcpt in envelope.to() {
                    step(t, Stage::RcptTo, smtp.command(Rcpt::new(rcpt.clone(), vec![]))).await?;
                }
                step(t, Stage::Data, smtp.command(Data)).await?;
                step(t, Stage::Message, smtp.message(message)).await?;
                Ok(())
            }
        }
    }

    /// STARTTLS in plain text (greeting, EHLO, STARTTLS, each reply parsed by lettre), then the
    /// TLS handshake. A server that does not offer STARTTLS is refused (never sent to in
    /// clear), and so is one that sends anything after its go-ahead and before the handshake
    /// (such bytes could be a man in the middle's injected commands).
    #[allow(deprecated)]
    async fn starttls(&self, tcp: TcpStream, params: &TlsParameters) -> Result<AsyncNetworkStream, Failure> {
        use tokio::io::AsyncWriteExt as _;
        let t = self.timeout;
        let plain = async {
            let mut io = tokio::io::BufReader::new(tcp);
            read_reply(&mut io, Stage::Greeting).await?;
            let ehlo = Ehlo::new(self.hello.clone()).to_string();
            io.get_mut()
                .write_all(ehlo.as_bytes())
                .await
                .map_err(network(Stage::Greeting))?;
            let reply = read_reply(&mut io, Stage::Greeting).await?;
            let offered = ServerInfo::from_response(&reply).is_ok_and(|i| i.supports_feature(Extension::StartTls));
            if !offered {
                return Err(Failure {
                    error: SendError::new(
                        FailureKind::Network,
                        "SMTP server does not offer STARTTLS, which the configuration requires",
                    ),
                    stage: Stage::Tls,
                    code: None,
                });
            }
            io.get_mut()
                .write_all(Starttls.to_string().as_bytes())
                .await
                .map_err(network(Stage::Tls))?;
            let go_ahead = read_reply(&mut io, Stage::Tls).await?;
            if go_ahead.code().to_string() != "220" {
                return Err(Failure {
                    error: SendError::new(FailureKind::Network, "SMTP server did not agree to STARTTLS"),
                    stage: Stage::Tls,
                    code: None,
                });
            }
            if !io.buffer().is_empty() {
                return Err(Failure {
                    error: SendError::new(FailureKind::Network, "SMTP server sent data before the TLS handshake"),
                    stage: Stage::Tls,
                    code: None,
                });
            }
            Ok(io.into_inner())
        };
        let tcp = match tokio::time::timeout(t, plain).await {
            Err(_) => return Err(timeout_failure(Stage::Tls, t)),
            Ok(result) => result?,
        };
        #[allow(deprecated)]
        let mut stream = AsyncNetworkStream::use_existing_tokio1(Box::new(tcp));
        match tokio::time::timeout(t, stream.upgrade_tls(params.clone())).await {
            Err(_) => Err(timeout_failure(Stage::Tls, t)),
            Ok(Err(e)) => Err(failure(Stage::Tls, &e)),
            Ok(Ok(())) => Ok(stream),
        }
    }

    /// A new connection: TCP with `TCP_NODELAY`, TLS as configured, greeting and EHLO, AUTH.
    async fn connect(&self) -> Result<Conn, Failure> {
        let t = self.timeout;
        let tcp = match tokio::time::timeout(t, TcpStream::connect((self.host.as_str(), self.port))).await {
            Err(_) => return Err(timeout_failure(Stage::Connect, t)),
            Ok(Err(e)) => {
                return Err(Failure {
                    error: SendError::new(
                        FailureKind::Network,
                        format!("SMTP connect to {}:{} failed: {e}", self.host, self.port),
                    ),
                    stage: Stage::Connect,
                    code: None,
                });
            }
            Ok(Ok(tcp)) => tcp,
        };
        tcp.set_nodelay(true).map_err(|e| Failure {
            error: SendError::new(FailureKind::Network, format!("SMTP: setting TCP_NODELAY: {e}")),
            stage: Stage::Connect,
            code: None,
        })?;
        let ahead: Ahead = Arc::new(Mutex::new(Tap::listening()));
        let (stream, ahead): (Box<dyn AsyncTokioStream>, Option<Ahead>) = match (self.mode, &self.tls) {
            (TlsMode::Tls, Some(params)) => {
                #[allow(deprecated)]
                let mut stream = AsyncNetworkStream::use_existing_tokio1(Box::new(tcp));
                match tokio::time::timeout(t, stream.upgrade_tls(params.clone())).await {
                    Err(_) => return Err(timeout_failure(Stage::Tls, t)),
                    Ok(Err(e)) => return Err(failure(Stage::Tls, &e)),
                    Ok(Ok(())) => {}
                }
                (
                    Box::new(Coalesce::new(Encrypted(stream), Some(ahead.clone()))),
                    Some(ahead),
                )
            }
            (TlsMode::StartTls, Some(params)) => {
                let stream = self.starttls(tcp, params).await?;
                let mut coalesce = Coalesce::new(Encrypted(stream), Some(ahead.clone()));
                // lettre starts with the server's greeting, which came before STARTTLS; after the
                // handshake the client begins again with EHLO (RFC 3207 section 4.2).
                coalesce.unread = STARTTLS_GREETING.to_vec();
                (Box::new(coalesce), Some(ahead))
            }
            _ => (Box::new(Coalesce::new(tcp, Some(ahead.clone()))), Some(ahead)),
        };
        let mut conn = step(
            t,
            Stage::Greeting,
            AsyncSmtpConnection::connect_with_transport(stream, &self.hello),
        )
        .await?;
        if let Some(credentials) = &self.credentials {
            let auth = step(
                t,
                Stage::Auth,
                conn.auth(&[Mechanism::Plain, Mechanism::Login], credentials),
            )
            .await;
            if let Err(mut f) = auth {
                // Any refusal at this stage is about our credentials or configuration.
                if f.replied() && !matches!(f.error.kind, FailureKind::Throttled) {
                    f.error.kind = FailureKind::Auth;
                }
                close(conn);
                return Err(f);
            }
        }
        self.opened.fetch_add(1, Ordering::Relaxed);
        let eight_bit = if conn.server_info().supports_feature(Extension::EightBitMime) {
            1
        } else {
            2
        };
        self.eight_bit_mime.store(eight_bit, Ordering::Relaxed);
        let heard = ahead.as_ref().and_then(|a| lock(a).heard.take()).unwrap_or_default();
        Ok(Conn {
            smtp: conn,
            pipelining: ahead.is_some() && offers_pipelining(&heard),
            ahead,
        })
    }
}

/// `SMTPUTF8` for non-ASCII addresses, `BODY=8BITMIME` for a non-ASCII message.
fn mail_options_for(envelope: &Envelope, message: &[u8]) -> Vec<MailParameter> {
    let mut options = Vec::new();
    let non_ascii = envelope.from().is_some_and(|a| !AsRef::<str>::as_ref(a).is_ascii())
        || envelope.to().iter().any(|a| !AsRef::<str>::as_ref(a).is_ascii());
    if non_ascii {
        options.push(MailParameter::SmtpUtfEight);
    }
    if !message.is_ascii() {
        options.push(MailParameter::Body(MailBodyParameter::EightBitMime));
    }
    options
}

impl From<AsyncSmtpConnection> for Conn {
    fn from(smtp: AsyncSmtpConnection) -> Self {
        Self {
            smtp,
            ahead: None,
            pipelining: false,
        }
    }
}

/// One message in two round trips (RFC 2920): `MAIL` (written by lettre), each `RCPT` and
/// `DATA` leave together and their replies are read in order, every one of them even after a
/// refusal, so the connection stays in step; then the dot-stuffed content and its closing dot.
async fn pipelined_transaction(
    t: Duration,
    smtp: &mut AsyncSmtpConnection,
    ahead: &Ahead,
    envelope: &Envelope,
    mail: Mail,
    message: &[u8],
) -> Result<(), Failure> {
    use std::fmt::Write as _;
    let mut group = String::with_capacity(64 * (envelope.to().len() + 1));
    for rcpt in envelope.to() {
        let _ = write!(group, "{}", Rcpt::new(rcpt.clone(), vec![]));
    }
    let _ = write!(group, "{Data}");
    {
        let mut tap = lock(ahead);
        tap.ahead.clear();
        tap.ahead.extend_from_slice(group.as_bytes());
    }
    let mail = step(t, Stage::MailFrom, smtp.command(mail)).await;
    let mut refused = match mail.and_then(expect(Stage::MailFrom, &["250"])) {
        Ok(_) => None,
        // No reply (or not the one expected): the connection is gone or out of step, and is
        // dropped; nothing was committed, so the message may go on a fresh connection.
        Err(f) if !f.replied() => return Err(f),
        Err(f) => Some(f),
    };
    for _ in envelope.to() {
        let rcpt = step(t, Stage::RcptTo, smtp.read_response()).await;
        match rcpt.and_then(expect(Stage::RcptTo, &["250", "251"])) {
            Ok(_) => {}
            Err(f) if !f.replied() => return Err(out_of_step(refused, f)),
            Err(f) => {
                refused.get_or_insert(f);
            }
        }
    }
    let data = step(t, Stage::Data, smtp.read_response()).await;
    match (refused, data.and_then(expect(Stage::Data, &["354"]))) {
        (None, Ok(_)) => {}
        (None, Err(f)) => return Err(f),
        (Some(f), Err(g)) => return Err(if g.replied() { f } else { out_of_step(Some(f), g) }),
        (Some(f), Ok(_)) => {
            // The server is waiting for content after refusing part of the envelope: end an
            // empty message so the connection is ready for the next (RFC 2920 section 3.1).
            lock(ahead).ahead.extend_from_slice(b".\r\n");
            return match step(t, Stage::Message, smtp.read_response()).await {
                Err(g) if !g.replied() => Err(out_of_step(Some(f), g)),
                _ => Err(f),
            };
        }
    }
    {
        let mut tap = lock(ahead);
        dot_stuff_into(message, &mut tap.ahead);
        tap.ahead.extend_from_slice(b"\r\n.\r\n");
    }
    let sent = step(t, Stage::Message, smtp.read_response()).await;
    sent.and_then(expect(Stage::Message, &["250"]))?;
    Ok(())
}

/// Checks a positive reply is the one this step expects: anything else (a 251 to DATA, a 354
/// to the content) means replies and commands no longer pair up, so the connection must go
/// (a failure without a reply code is never reset and reused).
fn expect(stage: Stage, codes: &'static [&'static str]) -> impl Fn(Response) -> Result<Response, Failure> {
    move |reply| {
        let code = reply.code().to_string();
        if codes.contains(&code.as_str()) {
            Ok(reply)
        } else {
            Err(Failure {
                error: SendError::new(
                    FailureKind::Network,
                    format!(
                        "SMTP {}: unexpected reply {code}; the connection is out of step",
                        stage.as_str()
                    ),
                ),
                stage,
                code: None,
            })
        }
    }
}

/// After a refusal, a later reply of the same group went missing: report the refusal (the
/// news), but as a failure without a reply, so the connection is dropped rather than reset and
/// reused with a reply still owed. A closing 421 stays as it is (dropped anyway).
fn out_of_step(refused: Option<Failure>, missing: Failure) -> Failure {
    match refused {
        Some(f) if f.closing() => f,
        Some(f) => Failure { code: None, ..f },
        None => missing,
    }
}

/// Appends `message` with a dot doubled at the start of every line (RFC 5321 section 4.5.2),
/// as lettre's codec does byte by byte, in runs between the lines that need it.
fn dot_stuff_into(message: &[u8], out: &mut Vec<u8>) {
    out.reserve(message.len() + 16);
    let mut from = 0;
    if message.first() == Some(&b'.') {
        out.push(b'.');
    }
    for at in memchr::memmem::find_iter(message, b"\r\n.") {
        out.extend_from_slice(&message[from..at + 3]);
        out.push(b'.');
        from = at + 3;
    }
    out.extend_from_slice(&message[from..]);
}

/// What lettre reads first on a connection whose greeting came before STARTTLS.
const STARTTLS_GREETING: &[u8] = b"220 TLS established\r\n";

/// Reads one (possibly multi-line) reply and parses it with lettre; a refusal is a failure.
async fn read_reply(io: &mut tokio::io::BufReader<TcpStream>, stage: Stage) -> Result<Response, Failure> {
    use tokio::io::AsyncBufReadExt as _;
    let mut text = String::new();
    loop {
        let before = text.len();
        let n = io.read_line(&mut text).await.map_err(network(stage))?;
        let line = &text[before..];
        if n == 0 || text.len() > HEARD_LIMIT {
            return Err(network(stage)(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "no complete reply",
            )));
        }
        // The last line of a reply has a space (or nothing) after its code.
        if line.len() < 4 || line.as_bytes()[3] != b'-' {
            break;
        }
    }
    let reply: Response = text.parse().map_err(|e| failure(stage, &e))?;
    if reply.is_positive() {
        Ok(reply)
    } else {
        let code = reply.code().to_string();
        // As `classify` says of the same code once lettre speaks.
        let kind = if code == "421" {
            FailureKind::Throttled
        } else {
            FailureKind::Network
        };
        Err(Failure {
            error: SendError::new(kind, format!("SMTP {}: server refused: {code}", stage.as_str())),
            stage,
            code: Some(code),
        })
    }
}

/// An I/O failure at `stage`, as a network failure.
fn network(stage: Stage) -> impl Fn(io::Error) -> Failure {
    move |e| Failure {
        error: SendError::new(
            FailureKind::Network,
            format!("SMTP {}: connection failed: {e}", stage.as_str()),
        ),
        stage,
        code: None,
    }
}

/// Runs one protocol step under the timeout, classifying its failure.
async fn step<T>(
    t: Duration,
    stage: Stage,
    fut: impl Future<Output = Result<T, lettre::transport::smtp::Error>>,
) -> Result<T, Failure> {
    match tokio::time::timeout(t, fut).await {
        Err(_) => Err(timeout_failure(stage, t)),
        Ok(Err(e)) => Err(failure(stage, &e)),
        Ok(Ok(v)) => Ok(v),
    }
}

fn timeout_failure(stage: Stage, t: Duration) -> Failure {
    Failure {
        error: SendError::new(
            FailureKind::Timeout,
            format!("SMTP {}: no answer within {} s", stage.as_str(), t.as_secs()),
        ),
        stage,
        code: None,
    }
}

fn failure(stage: Stage, e: &lettre::transport::smtp::Error) -> Failure {
    Failure {
        error: classify(stage, e),
        stage,
        code: e.status().map(|c| c.to_string()),
    }
}

/// Classifies an SMTP failure. Only a refusal of the recipient or the message (550-554 to
/// RCPT, DATA or the message; 552 "too big" to MAIL) is permanent; a refusal of our sender
/// (MAIL FROM 550/551/553/554) says the relay will take nothing from us, so it is the
/// provider's problem (retried, counted against it) rather than every merchant's. Auth
/// refusals (530, 534, 535, 538, 454) are `Auth`; 421 and a 452 "too many" are throttling;
/// other 4xx and 5xx answers are provider errors (a protocol or configuration problem fixed on
/// our side). A failed STARTTLS is a TLS (network) failure, no reply at all a network failure.
/// The server's text is never kept (it may echo the address), only the status code.
fn classify(stage: Stage, e: &lettre::transport::smtp::Error) -> SendError {
    let at = stage.as_str();
    let Some(code) = e.status() else {
        if e.is_timeout() {
            return SendError::new(FailureKind::Timeout, format!("SMTP {at}: timed out"));
        }
        let what = if e.is_tls() || stage == Stage::Tls {
            format!("TLS failed: {e}")
        } else if e.is_response() {
            // A reply lettre could not parse: its text is not repeated.
            "the server's reply could not be read".to_owned()
        } else {
            format!("connection failed: {e}")
        };
        return SendError::new(FailureKind::Network, format!("SMTP {at}: {what}"));
    };
    let code = code.to_string();
    let transaction = matches!(stage, Stage::RcptTo | Stage::Data | Stage::Message);
    let kind = match (stage, code.as_str()) {
        (Stage::Tls, _) => FailureKind::Network,
        (_, "421") => FailureKind::Throttled,
        (_, "452") if mentions_rate(e) => FailureKind::Throttled,
        (_, "530" | "534" | "535" | "538" | "454") => FailureKind::Auth,
        (Stage::MailFrom, "552") => FailureKind::Rejected,
        (_, "550" | "551" | "552" | "553" | "554") if transaction => FailureKind::Rejected,
        _ => FailureKind::ProviderError,
    };
    let what = match kind {
        FailureKind::Rejected => "refused the recipient or message",
        FailureKind::Auth => "refused our credentials or configuration",
        FailureKind::Throttled => "asked us to slow down",
        FailureKind::Network => "refused TLS",
        _ if stage == Stage::MailFrom && code.starts_with('5') => "refused our sender (configuration?)",
        _ if code.starts_with('4') => "deferred the message",
        _ => "refused the command (configuration?)",
    };
    SendError::new(kind, format!("SMTP {at}: server {what}: {code}"))
}

/// Whether the server's text speaks of a rate or too many of something (the text itself is
/// not kept).
fn mentions_rate(e: &lettre::transport::smtp::Error) -> bool {
    let text = e.to_string().to_ascii_lowercase();
    text.contains("too many") || text.contains("rate")
}

/// Closes a connection politely (QUIT) in the background, bounded in time.
fn close(conn: impl Into<Conn>) {
    let mut conn = conn.into();
    if conn.smtp.has_broken() {
        return;
    }
    if let Ok(handle) = tokio::runtime::Handle::try_current() {
        handle.spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(2), conn.smtp.quit()).await;
        });
    }
}

/// lettre's TLS parameters for `host`: the public roots, plus `ca_file` if given.
fn tls_parameters(host: &str, ca_file: Option<&Path>) -> Result<TlsParameters, String> {
    let mut builder = TlsParameters::builder(host.to_owned());
    if let Some(path) = ca_file {
        let pem = std::fs::read(path).map_err(|e| format!("email.smtp.tls_ca_file {}: {e}", path.display()))?;
        let cert =
            Certificate::from_pem(&pem).map_err(|e| format!("email.smtp.tls_ca_file {}: {e}", path.display()))?;
        builder = builder.add_root_certificate(cert);
    }
    builder.build().map_err(|e| format!("TLS setup for {host}: {e}"))
}

/// A TLS stream made by lettre (implicit TLS), adapted back to tokio's I/O traits so
/// `connect_with_transport` can speak SMTP over it.
#[allow(deprecated)]
struct Encrypted(AsyncNetworkStream);

impl fmt::Debug for Encrypted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Encrypted")
    }
}

impl tokio::io::AsyncRead for Encrypted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let dst = buf.initialize_unfilled();
        match futures_io::AsyncRead::poll_read(Pin::new(&mut self.0), cx, dst) {
            Poll::Ready(Ok(n)) => {
                buf.advance(n);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl tokio::io::AsyncWrite for Encrypted {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        futures_io::AsyncWrite::poll_write(Pin::new(&mut self.0), cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        futures_io::AsyncWrite::poll_flush(Pin::new(&mut self.0), cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        futures_io::AsyncWrite::poll_close(Pin::new(&mut self.0), cx)
    }
}

impl AsyncTokioStream for Encrypted {
    fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.0.peer_addr()
    }
}

/// Holds writes until the next read (or close): lettre writes and flushes the message and its
/// closing dot separately, and every command before reading its reply; held back, each leaves
/// in one segment and one system call. Every lettre write is followed by a read of the reply
/// or by closing, so nothing stays held.
struct Coalesce<S> {
    inner: S,
    out: Vec<u8>,
    written: usize,
    /// Bytes sent ahead by the pool, appended after lettre's own at the next read.
    ahead: Option<Ahead>,
    /// Bytes lettre reads before anything from the stream.
    unread: Vec<u8>,
}

/// What the server says during setup is kept up to this much (an EHLO reply is far shorter).
const HEARD_LIMIT: usize = 16 * 1024;

/// Past this much held data, writes go out without waiting for a read.
const COALESCE_LIMIT: usize = 256 * 1024;

impl<S> Coalesce<S> {
    fn new(inner: S, ahead: Option<Ahead>) -> Self {
        Self {
            inner,
            out: Vec::with_capacity(8 * 1024),
            written: 0,
            ahead,
            unread: Vec::new(),
        }
    }

    /// Moves what the pool sent ahead behind what lettre wrote.
    fn take_ahead(&mut self) {
        if let Some(tap) = &self.ahead {
            let mut tap = lock(tap);
            if !tap.ahead.is_empty() {
                if self.out.is_empty() {
                    std::mem::swap(&mut self.out, &mut tap.ahead);
                } else {
                    self.out.extend_from_slice(&tap.ahead);
                    tap.ahead.clear();
                }
            }
        }
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> Coalesce<S> {
    /// Writes out what is held, then flushes the inner stream.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.out.len() {
            match Pin::new(&mut self.inner).poll_write(cx, &self.out[self.written..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => self.written += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        if !self.out.is_empty() {
            self.out.clear();
            self.written = 0;
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }
}

impl<S: fmt::Debug> fmt::Debug for Coalesce<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Coalesce")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> tokio::io::AsyncRead for Coalesce<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.unread.is_empty() {
            let n = this.unread.len().min(buf.remaining());
            buf.put_slice(&this.unread[..n]);
            this.unread.drain(..n);
            return Poll::Ready(Ok(()));
        }
        this.take_ahead();
        match this.poll_drain(cx) {
            Poll::Ready(Ok(())) => {
                let before = buf.filled().len();
                let read = Pin::new(&mut this.inner).poll_read(cx, buf);
                if let (Poll::Ready(Ok(())), Some(tap)) = (&read, &this.ahead)
                    && let Some(heard) = &mut lock(tap).heard
                    && heard.len() < HEARD_LIMIT
                {
                    heard.extend_from_slice(&buf.filled()[before..]);
                }
                read
            }
            other => other,
        }
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Coalesce<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.out.len() >= COALESCE_LIMIT {
            match this.poll_drain(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        this.out.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Deferred to the next read (see the type's documentation).
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        match this.poll_drain(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut this.inner).poll_shutdown(cx),
            other => other,
        }
    }
}

impl<S: AsyncTokioStream> AsyncTokioStream for Coalesce<S> {
    fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.inner.peer_addr()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_modes_parse() {
        assert_eq!("none".parse::<TlsMode>(), Ok(TlsMode::None));
        assert_eq!("starttls".parse::<TlsMode>(), Ok(TlsMode::StartTls));
        assert_eq!("tls".parse::<TlsMode>(), Ok(TlsMode::Tls));
        assert!("ssl".parse::<TlsMode>().is_err());
    }

    /// Dot-stuffing as lettre's codec does it, byte by byte: the reference.
    fn stuffed_byte_by_byte(message: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut line_start = true;
        let mut after_cr = false;
        for &b in message {
            if b == b'.' && line_start {
                out.push(b'.');
            }
            out.push(b);
            line_start = b == b'\n' && after_cr;
            after_cr = b == b'\r';
        }
        out
    }

    #[test]
    fn dot_stuffing_doubles_a_dot_at_the_start_of_every_line_only() {
        let cases: [&[u8]; 8] = [
            b"",
            b".",
            b".starts\r\n..two\r\nmid.dle\r\n.\r\n",
            b"no dots at all\r\n",
            b"a\n.bare line feed is not a line end\r\n",
            b"a\r.bare CR neither\r\n.\r\n.",
            b"\r\n.\r\n.\r\n",
            "示例\r\n.商城".as_bytes(),
        ];
        for case in cases {
            let mut ours = b"prefix".to_vec();
            dot_stuff_into(case, &mut ours);
            assert_eq!(
                &ours[6..],
                stuffed_byte_by_byte(case),
                "{:?}",
                String::from_utf8_lossy(case)
            );
        }
    }

    #[test]
    fn pipelining_is_read_from_the_ehlo_reply() {
        let heard = b"220 mx ESMTP\r\n250-mx.example\r\n250-SIZE 1000\r\n250-pipelining\r\n250 8BITMIME\r\n";
        assert!(offers_pipelining(heard));
        assert!(offers_pipelining(b"250 PIPELINING\r\n"));
        assert!(!offers_pipelining(b"220 mx\r\n250-mx.example\r\n250 8BITMIME\r\n"));
        assert!(!offers_pipelining(b"250-PIPELININGX\r\n"));
        assert!(
            !offers_pipelining(b"220 PIPELINING\r\n"),
            "a greeting is not an EHLO reply"
        );
    }
}
