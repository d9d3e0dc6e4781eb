//! Test harness: run the real `tocsin` binary against a fresh data directory, with its
//! transports pointed at real peers on loopback (an SMTP server, wiremock HTTP servers).
#![allow(dead_code)]

pub mod smtp_server;
pub mod webdriver;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_tocsin");

/// The repository's own files (demo data, schemas), for tests that read them.
pub fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// One test's Tocsin: a data directory and the environment its commands run with.
pub struct Tocsin {
    pub dir: tempfile::TempDir,
    pub env: Vec<(String, String)>,
}

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{}\nstderr:\n{}", self.stdout, self.stderr))
    }
    pub fn ok(self) -> Self {
        assert_eq!(
            self.code, 0,
            "command failed\nstdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        self
    }
}

impl From<Output> for Run {
    fn from(o: Output) -> Self {
        Run {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

impl Tocsin {
    pub fn new() -> Self {
        Tocsin {
            dir: tempfile::tempdir().expect("temp dir"),
            // Quick retries so transient failures resolve within a test.
            env: vec![
                ("TOCSIN_DELIVERY__BACKOFF_BASE_MS".into(), "20".into()),
                ("TOCSIN_DELIVERY__BACKOFF_MAX_MS".into(), "100".into()),
            ],
        }
    }

    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn set(&mut self, key: &str, value: impl Into<String>) -> &mut Self {
        self.env.push((key.to_owned(), value.into()));
        self
    }

    /// Email over SMTP to `port` on loopback, without TLS.
    pub fn smtp(&mut self, port: u16) -> &mut Self {
        self.set("TOCSIN_EMAIL__TRANSPORT", "smtp")
            .set("TOCSIN_EMAIL__SMTP__HOST", "127.0.0.1")
            .set("TOCSIN_EMAIL__SMTP__PORT", port.to_string())
            .set("TOCSIN_EMAIL__SMTP__TLS", "none")
    }

    /// SMS or push over the signed webhook at `url`.
    pub fn webhook(&mut self, channel: &str, url: &str, secret: &str) -> &mut Self {
        let upper = channel.to_uppercase();
        self.set(&format!("TOCSIN_{upper}__TRANSPORT"), "webhook")
            .set(&format!("TOCSIN_{upper}__URL"), url)
            .set(&format!("TOCSIN_{upper}__SIGNING_SECRET"), secret)
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.arg("--data-dir").arg(self.data_dir()).args(args);
        cmd.env_clear();
        if let Ok(path) = std::env::var("PATH") {
            cmd.env("PATH", path);
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        cmd
    }

    /// Runs `tocsin <args>` to completion.
    pub fn run(&self, args: &[&str]) -> Run {
        self.command(args).output().expect("run tocsin").into()
    }

    /// Runs `tocsin <args>` with `input` on stdin.
    pub fn run_with_stdin(&self, args: &[&str], input: &str) -> Run {
        use std::io::Write;
        let mut child = self
            .command(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write stdin");
        child.wait_with_output().expect("wait").into()
    }

    /// Writes `text` to a file in the data directory's parent and returns its path.
    pub fn file(&self, name: &str, text: &str) -> String {
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).expect("write test file");
        path.display().to_string()
    }

    /// Starts `tocsin serve` on a free loopback port; returns the server and its base URL.
    pub fn serve(&self) -> Server {
        self.spawn_server("127.0.0.1:0", Stdio::null())
    }

    /// Starts `tocsin serve` on `listen` with its stderr going to `stderr`, and waits for the
    /// line that says where it listens.
    fn spawn_server(&self, listen: &str, stderr: Stdio) -> Server {
        let mut child = self
            .command(&["serve", "--listen", listen])
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn serve");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read the listening line");
        let base = line
            .trim()
            .strip_prefix("tocsin listening on ")
            .unwrap_or_else(|| panic!("unexpected first line: {line:?}"))
            .to_owned();
        Server { child, base }
    }
}

impl Tocsin {
    /// Starts `tocsin serve` on `listen` (e.g. `127.0.0.1:PORT` from [`free_port`]), for tests
    /// that must name the server's URL in the configuration before it starts (provider
    /// callbacks); returns the server and its base URL.
    pub fn serve_at(&self, listen: &str) -> Server {
        self.spawn_server(listen, Stdio::null())
    }
}

/// A loopback port that was free a moment ago (bound, read, released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

/// A running `tocsin serve`, killed when dropped.
pub struct Server {
    child: Child,
    pub base: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `check` until it returns `Some`, for at most `timeout`.
pub async fn eventually<T>(timeout: Duration, mut check: impl AsyncFnMut() -> Option<T>) -> Option<T> {
    let start = std::time::Instant::now();
    loop {
        if let Some(v) = check().await {
            return Some(v);
        }
        if start.elapsed() > timeout {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// HMAC-SHA256 over "{timestamp}.{body}", as the webhook transport signs.
pub fn expected_signature(secret: &str, timestamp: &str, body: &[u8]) -> String {
    tocsin::channels::sign(secret.as_bytes(), timestamp.parse().expect("timestamp"), body)
}

/// A header of a request a wiremock peer received, as text (empty when absent).
pub fn header_text<'a>(r: &'a wiremock::Request, name: &str) -> &'a str {
    r.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default()
}

/// Asserts the request carries a valid `X-Tocsin-Signature` for `secret`.
pub fn assert_signed(r: &wiremock::Request, secret: &str) {
    let stamp = header_text(r, "x-tocsin-timestamp");
    assert_eq!(
        header_text(r, "x-tocsin-signature"),
        expected_signature(secret, stamp, &r.body),
        "bad signature"
    );
}

/// Minimal merchant records for tests.
pub fn merchant(
    id: &str,
    locale: &str,
    email: Option<&str>,
    phone: Option<&str>,
    push: Option<&str>,
    holdings: &[&str],
) -> String {
    let mut m = serde_json::json!({
        "id": id, "name": format!("Merchant {id}"), "kind": "individual_business", "locale": locale,
        "region": "CN-ZJ", "holdings": holdings,
    });
    if let Some(e) = email {
        m["email"] = e.into();
    }
    if let Some(p) = phone {
        m["phone"] = p.into();
    }
    if let Some(t) = push {
        m["push_token"] = t.into();
    }
    m.to_string()
}

pub fn event(external_id: &str, key: &str) -> String {
    serde_json::json!({
        "source": "siem", "external_id": external_id, "kind": "leak", "severity": "high",
        "title": "Seller data exported by a compromised operator account",
        "detected_at": "2026-11-28T02:41:00Z", "correlation_key": key,
        "categories": ["account_credentials", "phone_number"]
    })
    .to_string()
}

impl Tocsin {
    /// [`Tocsin::serve`] with the server's log (stderr) written to `log` in the data directory,
    /// for tests that read what the server said (warnings about lost leases, the stop).
    pub fn serve_logged(&self, log: &str) -> Server {
        let file = std::fs::File::create(self.dir.path().join(log)).expect("create the server log");
        self.spawn_server("127.0.0.1:0", Stdio::from(file))
    }

    /// What a server started with [`Tocsin::serve_logged`] wrote to `log` so far.
    pub fn log(&self, log: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(log)).unwrap_or_default()
    }
}

impl Server {
    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL (what `Child::kill` sends on Unix): the process dies at once, mid-send, with
    /// nothing recorded; returns when it has been reaped.
    pub fn kill_hard(&mut self) {
        self.child.kill().expect("SIGKILL the server");
        self.child.wait().expect("reap the server");
    }

    /// Sends SIGTERM (the polite stop) through `kill(1)`.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("run kill -TERM");
        assert!(status.success(), "kill -TERM {} failed: {status}", self.pid());
    }

    /// The exit status once the process has exited, or `None` if it is still running after
    /// `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let start = std::time::Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("poll the server") {
                return Some(status);
            }
            if start.elapsed() > timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Imports `merchants` (JSON lines), confirms an incident with the demo facts, scopes it to
/// the merchants listed and has alice draft and bob approve it; returns the incident id.
pub fn approved_incident(t: &Tocsin, key: &str, merchants: &str, scope: &str) -> String {
    t.run(&["merchants", "import", &t.file("m.jsonl", merchants)]).ok();
    let incident = confirmed_incident(t, key);
    t.run(&[
        "--actor",
        "alice",
        "incidents",
        "scope",
        &incident,
        "--merchants",
        scope,
    ])
    .ok();
    t.run(&["--actor", "alice", "incidents", "draft", &incident]).ok();
    t.run(&["--actor", "bob", "incidents", "approve", &incident]).ok();
    incident
}

/// Ingests one event, confirms it with the demo facts and returns the incident id.
pub fn confirmed_incident(t: &Tocsin, key: &str) -> String {
    let ingested = t
        .run(&[
            "--json",
            "events",
            "ingest",
            &t.file("e.json", &event(&format!("ev-{key}"), key)),
        ])
        .ok()
        .json();
    let incident = ingested[0]["incident_id"].as_str().expect("id").to_owned();
    let facts = repo("config/demo/incident.json");
    t.run(&[
        "--actor",
        "alice",
        "incidents",
        "confirm",
        &incident,
        "--facts",
        facts.to_str().expect("path"),
    ])
    .ok();
    incident
}

/// Drafts the incident's `regulator` `stage` report as alice, has bob approve it and alice
/// submit it; returns the filing as `filings submit --json` prints it.
pub fn file_report(t: &Tocsin, incident: &str, regulator: &str, stage: &str) -> Value {
    let drafted = t
        .run(&[
            "--json",
            "--actor",
            "alice",
            "filings",
            "draft",
            incident,
            "--regulator",
            regulator,
            "--stage",
            stage,
        ])
        .ok()
        .json();
    let id = drafted[0]["filing"]["id"]
        .as_str()
        .expect("a drafted filing")
        .to_owned();
    t.run(&["--actor", "bob", "filings", "approve", &id]).ok();
    t.run(&["--json", "--actor", "alice", "filings", "submit", &id])
        .ok()
        .json()
}

/// The fields of a form-encoded request body (Twilio's, Aliyun's).
pub fn form_of(request: &wiremock::Request) -> Vec<(String, String)> {
    serde_urlencoded::from_bytes(&request.body).expect("a form body")
}

pub fn form_value<'a>(form: &'a [(String, String)], name: &str) -> Option<&'a str> {
    form.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// An API client of a running server holding one token per person, each created with
/// `tocsin tokens create NAME --role ROLE`.
pub struct Api {
    pub base: String,
    pub client: reqwest::Client,
    tokens: std::collections::HashMap<String, String>,
}

impl Tocsin {
    /// A token acting as `name` with `role`, created through the command line.
    pub fn token(&self, name: &str, role: &str) -> String {
        let created = self
            .run(&["--json", "--actor", "ops", "tokens", "create", name, "--role", role])
            .ok()
            .json();
        created["token"].as_str().expect("the token").to_owned()
    }

    /// An API client of `server` for `people` (`(name, role)`).
    pub fn api(&self, server: &Server, people: &[(&str, &str)]) -> Api {
        Api {
            base: server.base.clone(),
            client: reqwest::Client::new(),
            tokens: people
                .iter()
                .map(|(name, role)| (name.to_string(), self.token(name, role)))
                .collect(),
        }
    }
}

/// Status, JSON body (null if none) and content type of an answer.
pub async fn answer(r: reqwest::Response) -> (u16, Value, String) {
    let status = r.status().as_u16();
    let ctype = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    (status, r.json::<Value>().await.unwrap_or(Value::Null), ctype)
}

impl Api {
    pub fn token_of(&self, who: &str) -> &str {
        self.tokens
            .get(who)
            .map(String::as_str)
            .unwrap_or_else(|| panic!("no token for {who}"))
    }

    /// POSTs `body` to `path` (under the server's base) as `who`.
    pub async fn post(&self, who: &str, path: &str, body: Value) -> (u16, Value, String) {
        let r = self
            .client
            .post(format!("{}{path}", self.base))
            .bearer_auth(self.token_of(who))
            .json(&body)
            .send()
            .await
            .expect("request");
        answer(r).await
    }

    /// GETs `path` as `who`: status and JSON body.
    pub async fn get(&self, who: &str, path: &str) -> (u16, Value) {
        let r = self
            .client
            .get(format!("{}{path}", self.base))
            .bearer_auth(self.token_of(who))
            .send()
            .await
            .expect("request");
        let (status, body, _) = answer(r).await;
        (status, body)
    }
}
