//! A minimal W3C WebDriver client over reqwest, driving headless Chromium through
//! `chromedriver` (Debian's `chromium` and `chromium-driver`). Missing binaries fail the test:
//! a browser test that silently skips proves nothing.

use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
pub const CHROMIUM: &str = "/usr/bin/chromium";
/// The key W3C WebDriver names element references by.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A running `chromedriver`, killed when dropped.
pub struct Driver {
    child: Child,
    pub base: String,
    client: reqwest::Client,
}

impl Driver {
    /// Starts `chromedriver` on a free loopback port and waits until it is ready.
    pub async fn start() -> Driver {
        for binary in [CHROMEDRIVER, CHROMIUM] {
            assert!(
                std::path::Path::new(binary).exists(),
                "{binary} is missing: install Debian's chromium and chromium-driver \
                 (apt-get install -y chromium chromium-driver; .ci/run does)"
            );
        }
        let port = super::free_port();
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {CHROMEDRIVER}: {e}"));
        let driver = Driver {
            child,
            base: format!("http://127.0.0.1:{port}"),
            client: reqwest::Client::new(),
        };
        let ready = super::eventually(Duration::from_secs(20), async || {
            let r = driver.client.get(format!("{}/status", driver.base)).send().await.ok()?;
            let status: Value = r.json().await.ok()?;
            status["value"]["ready"].as_bool().filter(|r| *r)
        })
        .await;
        assert!(ready.is_some(), "chromedriver did not become ready on port {port}");
        driver
    }

    /// A new headless Chromium session with its own profile (so its own cookies).
    pub async fn browser(&self) -> Browser {
        let profile = tempfile::tempdir().expect("a profile directory");
        let args = vec![
            "--headless=new".to_owned(),
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-dev-shm-usage".into(),
            "--disable-quic".into(),
            "--no-first-run".into(),
            "--disable-background-networking".into(),
            "--disable-component-update".into(),
            "--disable-sync".into(),
            "--window-size=1280,1600".into(),
            format!("--user-data-dir={}", profile.path().display()),
        ];
        let caps = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": { "binary": CHROMIUM, "args": args },
        }}});
        let r = self
            .client
            .post(format!("{}/session", self.base))
            .json(&caps)
            .send()
            .await
            .expect("new session request");
        let body: Value = r.json().await.expect("new session answer");
        let id = body["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {body}"))
            .to_owned();
        Browser {
            url: format!("{}/session/{id}", self.base),
            client: self.client.clone(),
            _profile: profile,
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One browser session. Dropping it ends the session (closing the browser).
pub struct Browser {
    url: String,
    client: reqwest::Client,
    _profile: tempfile::TempDir,
}

/// An element of the current page.
#[derive(Debug, Clone)]
pub struct Element(String);

impl Browser {
    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut request = self.client.request(method.clone(), format!("{}{path}", self.url));
        if let Some(b) = body {
            request = request.json(&b);
        } else if method == reqwest::Method::POST {
            request = request.json(&json!({}));
        }
        let r = request.send().await.unwrap_or_else(|e| panic!("webdriver {path}: {e}"));
        let status = r.status();
        let value: Value = r.json().await.unwrap_or(Value::Null);
        assert!(status.is_success(), "webdriver {method} {path}: {status} {value}");
        value["value"].clone()
    }

    pub async fn goto(&self, url: &str) {
        self.call(reqwest::Method::POST, "/url", Some(json!({ "url": url })))
            .await;
    }

    pub async fn current_url(&self) -> String {
        self.call(reqwest::Method::GET, "/url", None)
            .await
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    pub async fn source(&self) -> String {
        self.call(reqwest::Method::GET, "/source", None)
            .await
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// The element `css` selects, if the page has one.
    pub async fn try_find(&self, css: &str) -> Option<Element> {
        let r = self
            .client
            .post(format!("{}/element", self.url))
            .json(&json!({ "using": "css selector", "value": css }))
            .send()
            .await
            .expect("find element request");
        if !r.status().is_success() {
            return None;
        }
        let v: Value = r.json().await.ok()?;
        v["value"][ELEMENT].as_str().map(|id| Element(id.to_owned()))
    }

    /// The element `css` selects, waiting up to 10 s for it.
    pub async fn find(&self, css: &str) -> Element {
        match super::eventually(Duration::from_secs(10), async || self.try_find(css).await).await {
            Some(e) => e,
            None => panic!(
                "no element {css} on {}:\n{}",
                self.current_url().await,
                self.source().await
            ),
        }
    }

    pub async fn text_of(&self, e: &Element) -> String {
        self.call(reqwest::Method::GET, &format!("/element/{}/text", e.0), None)
            .await
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// The visible text of what `css` selects.
    pub async fn text(&self, css: &str) -> String {
        let e = self.find(css).await;
        self.text_of(&e).await
    }

    pub async fn attribute(&self, css: &str, name: &str) -> Option<String> {
        let e = self.find(css).await;
        self.call(
            reqwest::Method::GET,
            &format!("/element/{}/attribute/{name}", e.0),
            None,
        )
        .await
        .as_str()
        .map(str::to_owned)
    }

    /// Replaces the value of the input `css` selects with `text`, typed.
    pub async fn fill(&self, css: &str, text: &str) {
        let e = self.find(css).await;
        self.call(reqwest::Method::POST, &format!("/element/{}/clear", e.0), None)
            .await;
        self.call(
            reqwest::Method::POST,
            &format!("/element/{}/value", e.0),
            Some(json!({ "text": text })),
        )
        .await;
    }

    /// Clicks what `css` selects without waiting for anything (a checkbox).
    pub async fn toggle(&self, css: &str) {
        let e = self.find(css).await;
        self.call(reqwest::Method::POST, &format!("/element/{}/click", e.0), None)
            .await;
    }

    /// Clicks a link or submit button and waits until the next page replaced this one (a click
    /// may return before the navigation it starts; the old page's elements must not be read).
    pub async fn click(&self, css: &str) {
        let page = self.find("html").await;
        self.toggle(css).await;
        let replaced = super::eventually(Duration::from_secs(15), async || {
            let r = self
                .client
                .get(format!("{}/element/{}/name", self.url, page.0))
                .send()
                .await
                .ok()?;
            let v: Value = r.json().await.ok()?;
            (v["value"]["error"] == "stale element reference").then_some(())
        })
        .await;
        assert!(replaced.is_some(), "clicking {css} did not lead to a new page");
        self.find("body").await;
    }

    /// A PNG of the viewport (for looking at a failure).
    pub async fn screenshot(&self) -> Vec<u8> {
        use base64::Engine;
        let png = self.call(reqwest::Method::GET, "/screenshot", None).await;
        base64::engine::general_purpose::STANDARD
            .decode(png.as_str().unwrap_or_default())
            .unwrap_or_default()
    }

    /// A cookie of the current page's site, HttpOnly ones included.
    pub async fn cookie(&self, name: &str) -> Option<String> {
        let r = self
            .client
            .get(format!("{}/cookie/{name}", self.url))
            .send()
            .await
            .expect("cookie request");
        if !r.status().is_success() {
            return None;
        }
        let v: Value = r.json().await.ok()?;
        v["value"]["value"].as_str().map(str::to_owned)
    }

    /// Waits until `check` holds for the page (reloaded with `reload` before each look).
    pub async fn wait_until(
        &self,
        reload: Option<&str>,
        timeout: Duration,
        check: impl AsyncFn(&Browser) -> bool,
    ) -> bool {
        let start = Instant::now();
        loop {
            if let Some(url) = reload {
                self.goto(url).await;
            }
            if check(self).await {
                return true;
            }
            if start.elapsed() > timeout {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
}

impl Drop for Browser {
    /// Ends the session with a plain HTTP `DELETE` (drop cannot wait on the async client).
    fn drop(&mut self) {
        let Some(rest) = self.url.strip_prefix("http://") else {
            return;
        };
        let Some((host, path)) = rest.split_once('/') else {
            return;
        };
        if let Ok(mut stream) = std::net::TcpStream::connect(host) {
            let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
            let request =
                format!("DELETE /{path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            let _ = stream.write_all(request.as_bytes());
            // Read the answer (chromedriver keeps the connection open: stop at its JSON body).
            let mut answer = Vec::new();
            let mut chunk = [0u8; 4096];
            while let Ok(n @ 1..) = stream.read(&mut chunk) {
                answer.extend_from_slice(&chunk[..n]);
                let text = String::from_utf8_lossy(&answer);
                if text
                    .split_once("\r\n\r\n")
                    .is_some_and(|(_, body)| body.trim_end().ends_with('}'))
                {
                    break;
                }
            }
        }
    }
}
