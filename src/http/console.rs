//! The responder console under `/console`: server-rendered pages (handlebars, plain forms, no
//! JavaScript) in zh-CN and en for working an incident from a browser — the incidents with the
//! time left on each regulator clock, and one incident's timeline, scope, drafts and their
//! previews, approval, delivery progress, bulletin and filings.
//!
//! Handlers only translate between forms and the engine, as the API's do. Sign-in is by API
//! token: the token is kept in an `HttpOnly; SameSite=Strict` cookie and authenticated again on
//! every request, so revoking or expiring it takes effect at once and instances share no
//! session store. Every form carries a CSRF token derived from the session (an HMAC keyed by
//! it); the sign-in form a double-submitted random value. Every answer is `no-store`, may not
//! be framed, and runs under a strict content security policy.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::{Router, middleware};
use chrono::{DateTime, Utc};
use handlebars::Handlebars;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{AppState, Problem};
use crate::auth::{Access, Role};
use crate::domain::{Actor, DeliveryStatus, IncidentState, Locale, LocalizedText, MerchantId};
use crate::engine::{EngineError, IncidentView};
use crate::model::{DraftState, ScopeRule};

/// The session cookie: the API token itself (HttpOnly, never readable by a script).
const SESSION_COOKIE: &str = "tocsin_console";
/// The sign-in form's double-submitted value.
const LOGIN_COOKIE: &str = "tocsin_console_login";
const LANG_COOKIE: &str = "tocsin_console_lang";

/// The policy of every console answer: nothing but our stylesheet and our own forms; no
/// script at all; never framed. Previews of email HTML are `srcdoc` frames under the same
/// policy, sandboxed (no scripts, an opaque origin).
const CSP: &str = "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; \
                   frame-ancestors 'none'; base-uri 'none'";

/// How many failed deliveries the incident page lists.
const FAILURES_SHOWN: usize = 50;
/// How many merchants the incident page links previews for.
const PREVIEW_LINKS: u32 = 10;

const TEMPLATES: [(&str, &str); 6] = [
    ("console/head", include_str!("console/head.hbs")),
    ("console/foot", include_str!("console/foot.hbs")),
    ("console/login", include_str!("console/login.hbs")),
    ("console/incidents", include_str!("console/incidents.hbs")),
    ("console/incident", include_str!("console/incident.hbs")),
    ("console/preview", include_str!("console/preview.hbs")),
];
const STRINGS: &str = include_str!("console/strings.toml");
const STYLESHEET: &str = include_str!("console/console.css");

#[derive(Debug, thiserror::Error)]
pub(super) enum ConsoleError {
    #[error("console template {name}: {reason}")]
    Template { name: String, reason: String },
    #[error("console strings: {0}")]
    Strings(String),
}

/// The console's templates (their own registry: strict, escaping HTML) and strings.
struct Console {
    pages: Handlebars<'static>,
    /// Locale (`en`, `zh-CN`) to key to text.
    strings: BTreeMap<String, BTreeMap<String, String>>,
}

impl Console {
    fn load() -> Result<Self, ConsoleError> {
        let mut pages = Handlebars::new();
        pages.set_strict_mode(true);
        for (name, source) in TEMPLATES {
            pages
                .register_template_string(name, source)
                .map_err(|e| ConsoleError::Template {
                    name: name.to_owned(),
                    reason: e.to_string(),
                })?;
        }
        let strings: BTreeMap<String, BTreeMap<String, String>> =
            toml::from_str(STRINGS).map_err(|e| ConsoleError::Strings(e.to_string()))?;
        for locale in Locale::ALL {
            if !strings.contains_key(locale.as_str()) {
                return Err(ConsoleError::Strings(format!("no table [{locale}]")));
            }
        }
        Ok(Self { pages, strings })
    }

    fn strings(&self, locale: Locale) -> &BTreeMap<String, String> {
        static EMPTY: BTreeMap<String, String> = BTreeMap::new();
        self.strings.get(locale.as_str()).unwrap_or(&EMPTY)
    }

    /// One string in `locale` (its key when the table lacks it).
    fn text(&self, locale: Locale, key: &str) -> String {
        self.strings(locale).get(key).cloned().unwrap_or_else(|| key.to_owned())
    }

    fn render(&self, name: &str, context: &Value) -> Response {
        match self.pages.render(name, context) {
            Ok(html) => Html(html).into_response(),
            Err(e) => {
                tracing::error!(template = name, error = %e, "rendering a console page failed");
                (StatusCode::INTERNAL_SERVER_ERROR, "the page could not be shown").into_response()
            }
        }
    }
}

/// The console's routes, mounted beside the API.
pub(super) fn router() -> Router<AppState> {
    match Console::load() {
        Ok(console) => Router::new()
            .route("/console", get(incidents_page))
            .route("/console/", get(incidents_page))
            .route("/console/console.css", get(stylesheet))
            .route("/console/login", get(login_page).post(login))
            .route("/console/logout", post(logout))
            .route("/console/incidents/{id}", get(incident_page))
            .route("/console/incidents/{id}/preview", get(preview_page))
            .route("/console/incidents/{id}/{action}", post(act))
            .layer(Extension(Arc::new(console)))
            .layer(middleware::map_response(secure_headers)),
        Err(e) => {
            tracing::error!(error = %e, "the responder console could not be loaded");
            Router::new()
                .route("/console", any(unavailable))
                .route("/console/{*rest}", any(unavailable))
                .layer(middleware::map_response(secure_headers))
        }
    }
}

async fn unavailable() -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        "the console is unavailable; see the server log",
    )
        .into_response()
}

/// Nothing a console page holds (incidents, merchants, tokens) is cached or framed.
async fn secure_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    for (name, value) in [
        (header::CACHE_CONTROL, "no-store"),
        (header::PRAGMA, "no-cache"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::CONTENT_SECURITY_POLICY, CSP),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

async fn stylesheet() -> Response {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], STYLESHEET).into_response()
}

// ---- cookies, language, session, CSRF

/// The value of cookie `name` in the request.
fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim().to_owned())
}

/// A `Set-Cookie` value scoped to the console; `Secure` when the proxy in front says the
/// browser spoke HTTPS.
fn set_cookie(headers: &HeaderMap, name: &str, value: &str, max_age: Option<i64>) -> Option<HeaderValue> {
    let https = headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("https"));
    let mut text = format!("{name}={value}; Path=/console; HttpOnly; SameSite=Strict");
    if let Some(age) = max_age {
        text.push_str(&format!("; Max-Age={age}"));
    }
    if https {
        text.push_str("; Secure");
    }
    HeaderValue::from_str(&text).ok()
}

#[derive(Deserialize, Default)]
struct LangQuery {
    lang: Option<String>,
}

/// The page's language: `?lang=` (remembered in a cookie), else the cookie, else the
/// browser's preference, else Chinese.
fn language(headers: &HeaderMap, asked: Option<&str>) -> (Locale, Option<HeaderValue>) {
    if let Some(locale) = asked.and_then(|l| l.parse::<Locale>().ok()) {
        let remember = set_cookie(headers, LANG_COOKIE, locale.as_str(), Some(365 * 24 * 3600));
        return (locale, remember);
    }
    if let Some(locale) = cookie(headers, LANG_COOKIE).and_then(|l| l.parse::<Locale>().ok()) {
        return (locale, None);
    }
    let preferred = headers
        .get(header::ACCEPT_LANGUAGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .map(|v| v.trim().to_ascii_lowercase());
    match preferred {
        Some(l) if l.starts_with("en") => (Locale::En, None),
        _ => (Locale::ZhCn, None),
    }
}

/// A signed-in responder: the token's actor and role, and the session's CSRF token.
struct Session {
    actor: Actor,
    role: Role,
    csrf: String,
}

/// The CSRF token of a session: HMAC-SHA256 keyed by the session's token (so it changes with
/// every sign-in and needs no storage).
fn csrf_of(token: &str) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, token.as_bytes());
    hex::encode(ring::hmac::sign(&key, b"tocsin console csrf").as_ref())
}

/// Compares two strings in time independent of where they differ.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && !a.is_empty() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The session the request's cookie holds, authenticated now.
async fn session(s: &AppState, headers: &HeaderMap) -> Result<Option<Session>, EngineError> {
    let Some(token) = cookie(headers, SESSION_COOKIE).filter(|t| !t.is_empty()) else {
        return Ok(None);
    };
    Ok(s.engine.authenticate(&token).await?.map(|t| Session {
        actor: t.actor,
        role: t.role,
        csrf: csrf_of(&token),
    }))
}

fn redirect(to: &str) -> Response {
    let mut response = StatusCode::SEE_OTHER.into_response();
    if let Ok(v) = HeaderValue::from_str(to) {
        response.headers_mut().insert(header::LOCATION, v);
    }
    response
}

fn to_login() -> Response {
    redirect("/console/login")
}

fn with_cookie(mut response: Response, cookie: Option<HeaderValue>) -> Response {
    if let Some(c) = cookie {
        response.headers_mut().append(header::SET_COOKIE, c);
    }
    response
}

/// The fields of a form body (a field given twice: the first).
struct Form(Vec<(String, String)>);

impl Form {
    fn parse(body: &Bytes) -> Self {
        Form(serde_urlencoded::from_bytes(body).unwrap_or_default())
    }
    fn get(&self, name: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
    fn text(&self, name: &str) -> &str {
        self.get(name).unwrap_or_default()
    }
}

fn forbidden(reason: &'static str) -> Response {
    (StatusCode::FORBIDDEN, reason).into_response()
}

fn internal(e: &EngineError) -> Response {
    tracing::error!(error = %e, "a console request failed");
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        "the request could not be completed; see the server log",
    )
        .into_response()
}

/// What every page's header needs.
fn base(c: &Console, locale: Locale, session: Option<&Session>, title: String) -> serde_json::Map<String, Value> {
    let other = if locale == Locale::En { Locale::ZhCn } else { Locale::En };
    let mut map = serde_json::Map::new();
    map.insert("t".into(), json!(c.strings(locale)));
    map.insert("lang".into(), json!(locale.as_str()));
    map.insert("other_lang".into(), json!(other.as_str()));
    map.insert("page_title".into(), json!(title));
    map.insert("refresh".into(), json!(false));
    map.insert("message".into(), Value::Null);
    map.insert(
        "user".into(),
        session.map_or(
            Value::Null,
            |s| json!({ "actor": s.actor.as_str(), "role": s.role.as_str() }),
        ),
    );
    map.insert(
        "csrf".into(),
        json!(session.map(|s| s.csrf.as_str()).unwrap_or_default()),
    );
    map
}

/// A message at the top of a page: an outcome (`ok`) or a refusal (`error`) with its detail.
fn message(kind: &str, title: String, detail: String) -> Value {
    json!({ "kind": kind, "title": title, "detail": detail })
}

// ---- sign-in

async fn login_page(
    State(s): State<AppState>,
    Extension(c): Extension<Arc<Console>>,
    headers: HeaderMap,
    Query(q): Query<LangQuery>,
) -> Response {
    let (locale, lang_cookie) = language(&headers, q.lang.as_deref());
    match session(&s, &headers).await {
        Ok(Some(_)) => return with_cookie(redirect("/console"), lang_cookie),
        Ok(None) => {}
        Err(e) => return internal(&e),
    }
    with_cookie(login_form(&c, &headers, locale, None, StatusCode::OK), lang_cookie)
}

/// The sign-in form with a fresh double-submit value (cookie and hidden field).
fn login_form(c: &Console, headers: &HeaderMap, locale: Locale, error: Option<&str>, status: StatusCode) -> Response {
    let value = hex::encode(rand::random::<[u8; 32]>());
    let mut ctx = base(c, locale, None, c.text(locale, "sign_in_heading"));
    ctx.insert("login_csrf".into(), json!(value));
    if let Some(key) = error {
        ctx.insert("message".into(), message("error", c.text(locale, key), String::new()));
    }
    let mut response = c.render("console/login", &Value::Object(ctx));
    *response.status_mut() = status;
    with_cookie(response, set_cookie(headers, LOGIN_COOKIE, &value, Some(3600)))
}

async fn login(
    State(s): State<AppState>,
    Extension(c): Extension<Arc<Console>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (locale, _) = language(&headers, None);
    let form = Form::parse(&body);
    // Login CSRF: the form must come from a page we served to this browser.
    let expected = cookie(&headers, LOGIN_COOKIE).unwrap_or_default();
    if !same(form.text("csrf"), &expected) {
        return login_form(&c, &headers, locale, Some("login_expired"), StatusCode::FORBIDDEN);
    }
    let token = form.text("token").trim();
    match s.engine.authenticate(token).await {
        Ok(Some(t)) => {
            tracing::info!(actor = %t.actor, role = %t.role, "console sign-in");
            let mut response = redirect("/console");
            if let Some(v) = set_cookie(&headers, SESSION_COOKIE, token, None) {
                response.headers_mut().append(header::SET_COOKIE, v);
            }
            with_cookie(response, set_cookie(&headers, LOGIN_COOKIE, "", Some(0)))
        }
        Ok(None) => login_form(&c, &headers, locale, Some("login_failed"), StatusCode::UNAUTHORIZED),
        Err(e) => internal(&e),
    }
}

async fn logout(State(s): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let form = Form::parse(&body);
    match session(&s, &headers).await {
        Ok(Some(session)) if !same(form.text("csrf"), &session.csrf) => forbidden("missing or wrong CSRF token"),
        Ok(_) => with_cookie(to_login(), set_cookie(&headers, SESSION_COOKIE, "", Some(0))),
        Err(e) => internal(&e),
    }
}

// ---- formatting

fn when(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M UTC").to_string()
}

fn when_opt(t: Option<DateTime<Utc>>) -> String {
    t.map(when).unwrap_or_default()
}

/// "1 d 3 h 20 min" / "1天3小时20分钟"; "overdue by ..." once negative.
fn time_left(c: &Console, locale: Locale, minutes: i64) -> String {
    let m = minutes.unsigned_abs();
    let (d, h, min) = (m / 1440, (m % 1440) / 60, m % 60);
    let sep = if locale == Locale::En { " " } else { "" };
    let mut parts = Vec::new();
    if d > 0 {
        parts.push(format!("{d}{}", c.text(locale, "unit_d")));
    }
    if h > 0 || d > 0 {
        parts.push(format!("{h}{}", c.text(locale, "unit_h")));
    }
    parts.push(format!("{min}{}", c.text(locale, "unit_min")));
    let span = parts.join(sep);
    if minutes < 0 {
        format!("{}{sep}{span}", c.text(locale, "overdue_by"))
    } else {
        span
    }
}

fn state_label(c: &Console, locale: Locale, state: IncidentState) -> String {
    c.text(locale, &format!("state_{}", state.as_str()))
}

fn clocks_json(c: &Console, locale: Locale, clocks: &[crate::clocks::ClockView]) -> Vec<Value> {
    clocks
        .iter()
        .map(|k| {
            let label = if locale == Locale::En { &k.label_en } else { &k.label_zh };
            json!({
                "regulator": k.regulator_name,
                "stage": label,
                "due": k.due_local.clone().unwrap_or_default(),
                "time_left": k.minutes_left.map(|m| time_left(c, locale, m)).unwrap_or_else(|| "—".into()),
                "status": k.status,
                "status_label": c.text(locale, &format!("clock_{}", k.status)),
            })
        })
        .collect()
}

fn counts(map: &BTreeMap<String, i64>) -> Vec<Value> {
    map.iter().map(|(k, v)| json!({ "name": k, "count": v })).collect()
}

// ---- pages

async fn incidents_page(
    State(s): State<AppState>,
    Extension(c): Extension<Arc<Console>>,
    headers: HeaderMap,
    Query(q): Query<LangQuery>,
) -> Response {
    let (locale, lang_cookie) = language(&headers, q.lang.as_deref());
    let session = match session(&s, &headers).await {
        Ok(Some(session)) => session,
        Ok(None) => return with_cookie(to_login(), lang_cookie),
        Err(e) => return internal(&e),
    };
    let (incidents, clocks) = match (
        s.engine.incidents().await,
        s.engine.deadlines(None, false, Utc::now()).await,
    ) {
        (Ok(i), Ok(k)) => (i, k),
        (Err(e), _) | (_, Err(e)) => return internal(&e),
    };
    let rows: Vec<Value> = incidents
        .iter()
        .rev()
        .map(|i| {
            let mine: Vec<_> = clocks
                .iter()
                .filter(|k| k.incident_id == i.id.as_str())
                .cloned()
                .collect();
            json!({
                "id": i.id.as_str(),
                "reference": i.reference,
                "title": i.title,
                "state_label": state_label(&c, locale, i.state),
                "opened_at": when(i.opened_at),
                "clocks": clocks_json(&c, locale, &mine),
            })
        })
        .collect();
    let mut ctx = base(&c, locale, Some(&session), c.text(locale, "incidents"));
    ctx.insert("incidents".into(), json!(rows));
    with_cookie(c.render("console/incidents", &Value::Object(ctx)), lang_cookie)
}

/// An incident id or reference as it may appear in a console path.
fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 100 && id.chars().all(|ch| ch.is_ascii_alphanumeric() || "._-".contains(ch))
}

#[derive(Deserialize, Default)]
struct IncidentQuery {
    lang: Option<String>,
    done: Option<String>,
}

async fn incident_page(
    State(s): State<AppState>,
    Extension(c): Extension<Arc<Console>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<IncidentQuery>,
) -> Response {
    let (locale, lang_cookie) = language(&headers, q.lang.as_deref());
    let session = match session(&s, &headers).await {
        Ok(Some(session)) => session,
        Ok(None) => return with_cookie(to_login(), lang_cookie),
        Err(e) => return internal(&e),
    };
    let done = q
        .done
        .as_deref()
        .and_then(Action::parse)
        .map(|a| message("ok", c.text(locale, &format!("done_{}", a.name())), String::new()));
    let page = Page {
        message: done,
        ..Page::default()
    };
    with_cookie(render_incident(&s, &c, &session, locale, &id, page).await, lang_cookie)
}

/// What an incident page shows beside the incident: a message, what to put back in the forms.
#[derive(Default)]
struct Page {
    message: Option<Value>,
    status: Option<StatusCode>,
    facts_text: Option<String>,
    scope_form: Option<(String, String)>,
}

async fn render_incident(
    s: &AppState,
    c: &Console,
    session: &Session,
    locale: Locale,
    id: &str,
    page: Page,
) -> Response {
    if !valid_id(id) {
        return not_found(c, locale, session);
    }
    let view = match s.engine.view(id).await {
        Ok(v) => v,
        Err(EngineError::NotFound { .. }) => return not_found(c, locale, session),
        Err(e) => return internal(&e),
    };
    let key = view.incident.id.as_str().to_owned();
    let clocks = s.engine.deadlines(Some(&key), true, Utc::now()).await;
    let deliveries = s.engine.deliveries(&key).await;
    let affected = s.engine.affected(&key, None, PREVIEW_LINKS, Some(true)).await;
    let (clocks, deliveries, affected) = match (clocks, deliveries, affected) {
        (Ok(k), Ok(d), Ok(a)) => (k, d, a),
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => return internal(&e),
    };
    let mut ctx = base(c, locale, Some(session), view.incident.reference.clone());
    let state = view.incident.state;
    let can_respond = session.role.may(Access::Respond);
    let can_approve = session.role.may(Access::Approve);
    let latest = view.drafts.last();
    let approved_once = view.drafts.iter().any(|d| d.state == DraftState::Approved);
    use IncidentState as S;
    let forms = json!({
        "confirm": can_respond && state == S::Triage,
        "scope": can_respond && matches!(state, S::Confirmed | S::Scoped | S::Drafted) && !approved_once,
        "draft": can_respond && (matches!(state, S::Scoped | S::Drafted) || (approved_once && matches!(state, S::Notifying | S::Monitoring))),
        "changes": approved_once,
        "approve": state == S::Drafted && latest.is_some_and(|d| d.state == DraftState::Drafted),
        "dispatch": can_respond && state == S::Approved,
        "bulletin": can_respond && matches!(state, S::Approved | S::Notifying | S::Monitoring | S::Closed),
        "filings": can_respond && view.incident.facts.is_some() && !matches!(state, S::Triage | S::Dismissed),
    });
    ctx.insert("forms".into(), forms);
    ctx.insert("can_approve".into(), json!(can_approve));
    ctx.insert(
        "own_draft".into(),
        json!(latest.is_some_and(|d| d.state == DraftState::Drafted && d.drafted_by == session.actor)),
    );
    ctx.insert("refresh".into(), json!(state == S::Notifying && page.message.is_none()));
    ctx.insert("state_label".into(), json!(state_label(c, locale, state)));
    ctx.insert("detected_at".into(), json!(when(view.incident.detected_at)));
    ctx.insert("opened_at".into(), json!(when(view.incident.opened_at)));
    ctx.insert(
        "incident".into(),
        json!({
            "id": key,
            "reference": view.incident.reference,
            "title": view.incident.title,
            "state": state.as_str(),
        }),
    );
    ctx.insert("clocks".into(), json!(clocks_json(c, locale, &clocks)));
    ctx.insert("transitions".into(), json!(transitions(c, locale, &view)));
    let scope = &view.scope;
    ctx.insert(
        "scope".into(),
        json!({
            "affected": scope.affected,
            "notice_required": scope.notice_required,
            "notice_not_required": scope.notice_not_required,
            "unreachable": scope.unreachable,
            "natural_persons": scope.natural_persons.map(|n| n.to_string()).unwrap_or_default(),
            "grade": scope.grade.map(|g| g.to_string()).unwrap_or_default(),
            "suggested_grade": scope.suggested_grade.map(|g| g.to_string()).unwrap_or_default(),
            "by_risk": counts(&scope.by_risk),
            "by_channel": counts(&scope.by_first_channel),
            "by_locale": counts(&scope.by_locale),
        }),
    );
    let (categories, merchants) = page.scope_form.unwrap_or_else(|| {
        let rule = view.incident.scope_rule.clone().unwrap_or_default();
        let categories = if rule.any_categories.is_empty() && rule.merchant_ids.is_empty() {
            view.incident
                .facts
                .as_ref()
                .map(|f| {
                    f.categories
                        .iter()
                        .map(|c| c.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .unwrap_or_default()
        } else {
            rule.any_categories
                .iter()
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let merchants = rule
            .merchant_ids
            .iter()
            .map(|m| m.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        (categories, merchants)
    });
    ctx.insert(
        "scope_form".into(),
        json!({ "categories": categories, "merchant_ids": merchants }),
    );
    let facts_text = page.facts_text.unwrap_or_else(|| {
        view.incident
            .facts
            .as_ref()
            .and_then(|f| serde_json::to_string_pretty(f).ok())
            .unwrap_or_default()
    });
    ctx.insert("facts_text".into(), json!(facts_text));
    let drafts: Vec<Value> = view
        .drafts
        .iter()
        .rev()
        .map(|d| {
            json!({
                "version": d.version,
                "state": match d.state { DraftState::Drafted => "drafted", DraftState::Approved => "approved" },
                "drafted_by": d.drafted_by.as_str(),
                "drafted_at": when(d.drafted_at),
                "approved_by": d.approved_by.as_ref().map(|a| a.as_str()).unwrap_or_default(),
                "approved_at": when_opt(d.approved_at),
                "notices": d.notice_count,
            })
        })
        .collect();
    ctx.insert("drafts".into(), json!(drafts));
    let previews: Vec<&str> = if view.drafts.is_empty() {
        Vec::new()
    } else {
        affected.iter().map(|a| a.merchant_id.as_str()).collect()
    };
    ctx.insert("previews".into(), json!(previews));
    let channels: Vec<Value> = view
        .deliveries
        .iter()
        .map(|t| {
            let total = t.sent + t.failed + t.dead + t.pending;
            json!({
                "channel": t.channel,
                "sent": t.sent,
                "delivered": t.delivered,
                "failed": t.failed,
                "dead": t.dead,
                "pending": t.pending,
                "total": total,
                "done": total - t.pending,
                "complete": t.pending == 0,
            })
        })
        .collect();
    ctx.insert("channels".into(), json!(channels));
    let failures = failures(&deliveries);
    ctx.insert(
        "more_failures".into(),
        json!(failures.len().saturating_sub(FAILURES_SHOWN)),
    );
    ctx.insert(
        "failures".into(),
        json!(failures.into_iter().take(FAILURES_SHOWN).collect::<Vec<_>>()),
    );
    let bulletins: Vec<Value> = view
        .bulletins
        .iter()
        .rev()
        .map(|b| {
            json!({
                "version": b.version,
                "published_at": when(b.published_at),
                "covered": b.covered,
                "reason": b.reason,
            })
        })
        .collect();
    ctx.insert("bulletins".into(), json!(bulletins));
    let filings: Vec<Value> = view
        .filings
        .iter()
        .map(|f| {
            json!({
                "regulator": f.regulator_name,
                "stage": f.stage_label,
                "state": serde_json::to_value(f.state).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default(),
                "transport": f.transport,
                "due": when_opt(f.deadline_at),
                "time_left": f.minutes_left.map(|m| time_left(c, locale, m)).unwrap_or_default(),
                "missing": f.missing.len(),
                "approved_by": f.approved_by.as_ref().map(|a| a.as_str()).unwrap_or_default(),
            })
        })
        .collect();
    ctx.insert("filings".into(), json!(filings));
    if let Some(m) = page.message {
        ctx.insert("message".into(), m);
    }
    let mut response = c.render("console/incident", &Value::Object(ctx));
    if let Some(status) = page.status
        && response.status() == StatusCode::OK
    {
        *response.status_mut() = status;
    }
    response
}

fn transitions(c: &Console, locale: Locale, view: &IncidentView) -> Vec<Value> {
    view.transitions
        .iter()
        .map(|t| {
            json!({
                "at": when(t.at),
                "from": t.from_state.map(|s| state_label(c, locale, s)).unwrap_or_default(),
                "to": state_label(c, locale, t.to_state),
                "actor": t.actor.as_str(),
                "reason": t.reason,
            })
        })
        .collect()
}

/// Failed and dead deliveries, each with what was tried next for the same merchant and
/// version (the fallback channel and where it stands). No addresses, no provider text.
fn failures(deliveries: &[crate::model::Delivery]) -> Vec<Value> {
    deliveries
        .iter()
        .filter(|d| matches!(d.status, DeliveryStatus::Failed | DeliveryStatus::Dead))
        .map(|d| {
            let next = deliveries
                .iter()
                .filter(|n| {
                    n.merchant_id == d.merchant_id && n.draft_id == d.draft_id && n.plan_position > d.plan_position
                })
                .min_by_key(|n| n.plan_position);
            json!({
                "merchant": d.merchant_id.as_str(),
                "channel": d.channel.to_string(),
                "status": d.status.as_str(),
                "kind": d.error_kind.map(|k| k.as_str()).unwrap_or_default(),
                "fallback": next.map(|n| format!("{} ({})", n.channel, n.status.as_str())).unwrap_or_default(),
            })
        })
        .collect()
}

fn not_found(c: &Console, locale: Locale, session: &Session) -> Response {
    let mut ctx = base(c, locale, Some(session), c.text(locale, "err_not_found"));
    ctx.insert(
        "message".into(),
        message("error", c.text(locale, "err_not_found"), String::new()),
    );
    ctx.insert("incidents".into(), json!([]));
    let mut response = c.render("console/incidents", &Value::Object(ctx));
    *response.status_mut() = StatusCode::NOT_FOUND;
    response
}

#[derive(Deserialize)]
struct PreviewQuery {
    merchant: Option<String>,
    version: Option<i64>,
    lang: Option<String>,
}

async fn preview_page(
    State(s): State<AppState>,
    Extension(c): Extension<Arc<Console>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<PreviewQuery>,
) -> Response {
    let (locale, lang_cookie) = language(&headers, q.lang.as_deref());
    let session = match session(&s, &headers).await {
        Ok(Some(session)) => session,
        Ok(None) => return with_cookie(to_login(), lang_cookie),
        Err(e) => return internal(&e),
    };
    let merchant = q.merchant.as_deref().unwrap_or_default().trim();
    let merchant: MerchantId = match merchant.parse() {
        Ok(m) if valid_id(&id) => m,
        _ => return with_cookie(not_found(&c, locale, &session), lang_cookie),
    };
    let preview = match s.engine.preview(&id, &merchant, q.version).await {
        Ok(p) => p,
        Err(e) => {
            let (status, title, detail) = refusal(&c, locale, e);
            let page = Page {
                message: Some(message("error", title, detail)),
                status: Some(status),
                ..Page::default()
            };
            return with_cookie(render_incident(&s, &c, &session, locale, &id, page).await, lang_cookie);
        }
    };
    let notices: Vec<Value> = preview
        .notices
        .iter()
        .map(|n| {
            json!({
                "locale": n.locale.as_str(),
                "own": n.locale == preview.merchant_locale,
                "email_subject": n.email_subject,
                "email_text": n.email_text,
                "email_html": n.email_html,
                "sms_text": n.sms_text,
                "push_title": n.push_title,
                "push_body": n.push_body,
                "letter_html": n.letter_html,
                "url": n.url,
            })
        })
        .collect();
    let mut ctx = base(&c, locale, Some(&session), c.text(locale, "preview_heading"));
    ctx.insert("incident_id".into(), json!(id));
    ctx.insert("reference".into(), json!(preview.incident_reference));
    ctx.insert("merchant_id".into(), json!(preview.merchant_id.as_str()));
    ctx.insert("version".into(), json!(preview.version));
    ctx.insert(
        "draft_state".into(),
        json!(match preview.draft_state {
            DraftState::Drafted => "drafted",
            DraftState::Approved => "approved",
        }),
    );
    ctx.insert("notices".into(), json!(notices));
    with_cookie(c.render("console/preview", &Value::Object(ctx)), lang_cookie)
}

// ---- actions

/// What a console form asks of the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Confirm,
    Scope,
    Draft,
    Approve,
    Dispatch,
    Bulletin,
    Filings,
}

impl Action {
    const ALL: [Action; 7] = [
        Action::Confirm,
        Action::Scope,
        Action::Draft,
        Action::Approve,
        Action::Dispatch,
        Action::Bulletin,
        Action::Filings,
    ];

    fn name(self) -> &'static str {
        match self {
            Action::Confirm => "confirm",
            Action::Scope => "scope",
            Action::Draft => "draft",
            Action::Approve => "approve",
            Action::Dispatch => "dispatch",
            Action::Bulletin => "bulletin",
            Action::Filings => "filings",
        }
    }

    fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.name() == name)
    }

    /// The access each needs, as its API operation does.
    fn access(self) -> Access {
        match self {
            Action::Approve => Access::Approve,
            _ => Access::Respond,
        }
    }
}

/// A refused or failed action as a page message: the status, a headline in the page's
/// language and the engine's detail (server errors are logged and not detailed).
fn refusal(c: &Console, locale: Locale, e: EngineError) -> (StatusCode, String, String) {
    let problem = Problem::from(e);
    let key = match problem.status {
        StatusCode::FORBIDDEN if problem.field.as_deref() == Some("actor") => "err_four_eyes",
        StatusCode::FORBIDDEN => "err_role",
        StatusCode::CONFLICT => "err_state",
        StatusCode::NOT_FOUND => "err_not_found",
        s if s.is_client_error() => "err_invalid",
        _ => "err_internal",
    };
    let detail = if problem.status.is_server_error() {
        String::new()
    } else {
        problem.detail
    };
    (problem.status, c.text(locale, key), detail)
}

fn comma_list(text: &str) -> Vec<String> {
    text.split([',', '\n', ' ', '，'])
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// `POST /console/incidents/{id}/{action}`: checks session, CSRF and role, asks the engine,
/// and answers with a redirect to the incident page (or the page with the refusal).
async fn act(
    State(s): State<AppState>,
    Extension(c): Extension<Arc<Console>>,
    headers: HeaderMap,
    Path((id, action)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let (locale, _) = language(&headers, None);
    let session = match session(&s, &headers).await {
        Ok(Some(session)) => session,
        Ok(None) => return to_login(),
        Err(e) => return internal(&e),
    };
    let form = Form::parse(&body);
    if !same(form.text("csrf"), &session.csrf) {
        return forbidden("missing or wrong CSRF token");
    }
    let Some(action) = Action::parse(&action) else {
        return not_found(&c, locale, &session);
    };
    if !valid_id(&id) {
        return not_found(&c, locale, &session);
    }
    let mut page = Page::default();
    if !session.role.may(action.access()) {
        let roles: Vec<&str> = action.access().roles().iter().map(|r| r.as_str()).collect();
        page.message = Some(message(
            "error",
            c.text(locale, "err_role"),
            format!("{}: {} ({})", action.name(), roles.join(" / "), session.role),
        ));
        page.status = Some(StatusCode::FORBIDDEN);
        return render_incident(&s, &c, &session, locale, &id, page).await;
    }
    let actor = &session.actor;
    let outcome: Result<Option<String>, EngineError> = match action {
        Action::Confirm => {
            let text = form.text("facts");
            match serde_json::from_str::<Value>(text) {
                Ok(facts) => s.engine.confirm(&id, &facts, actor).await.map(|_| None),
                Err(e) => {
                    page.facts_text = Some(text.to_owned());
                    Err(crate::domain::FieldError::new("facts", format!("not valid JSON: {e}")).into())
                }
            }
        }
        Action::Scope => {
            let categories = form.text("categories");
            let merchants = form.text("merchant_ids");
            page.scope_form = Some((categories.to_owned(), merchants.to_owned()));
            let rule = json!({ "any_categories": comma_list(categories), "merchant_ids": comma_list(merchants) });
            match serde_json::from_value::<ScopeRule>(rule) {
                Ok(rule) => {
                    let dry_run = form.get("dry_run").is_some();
                    match s.engine.scope(&id, &rule, actor, dry_run).await {
                        Ok(summary) if dry_run => Ok(Some(format!(
                            "{}: {} {} · {} {}",
                            c.text(locale, "dry_run_result"),
                            c.text(locale, "affected"),
                            summary.affected,
                            c.text(locale, "notice_required"),
                            summary.notice_required
                        ))),
                        Ok(_) => Ok(None),
                        Err(e) => Err(e),
                    }
                }
                Err(e) => Err(crate::domain::FieldError::new("scope", e.to_string()).into()),
            }
        }
        Action::Draft => {
            let (en, zh) = (form.text("changes_en").trim(), form.text("changes_zh").trim());
            let changes = (!en.is_empty() || !zh.is_empty()).then(|| LocalizedText {
                en: (!en.is_empty()).then(|| en.to_owned()),
                zh_cn: (!zh.is_empty()).then(|| zh.to_owned()),
            });
            s.engine.draft(&id, actor, changes.as_ref()).await.map(|_| None)
        }
        Action::Approve => s.engine.approve(&id, actor).await.map(|_| None),
        Action::Dispatch => {
            let started = s.engine.dispatch(&id, actor).await.map(|_| None);
            s.wake_worker.notify_one();
            started
        }
        Action::Bulletin => s.engine.publish_bulletin(&id, actor, true).await.map(|_| None),
        Action::Filings => s.engine.draft_filings(&id, None, None, actor).await.map(|_| None),
    };
    match outcome {
        Ok(None) => redirect(&format!("/console/incidents/{id}?done={}", action.name())),
        Ok(Some(note)) => {
            page.message = Some(message("ok", note, String::new()));
            render_incident(&s, &c, &session, locale, &id, page).await
        }
        Err(e) => {
            let (status, title, detail) = refusal(&c, locale, e);
            page.message = Some(message("error", title, detail));
            page.status = Some(status);
            render_incident(&s, &c, &session, locale, &id, page).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_console_loads_and_both_locales_have_every_string() {
        let c = Console::load().expect("the console loads");
        let en: Vec<&String> = c.strings(Locale::En).keys().collect();
        let zh: Vec<&String> = c.strings(Locale::ZhCn).keys().collect();
        assert_eq!(en, zh, "en and zh-CN hold the same keys");
        for state in [
            "triage",
            "confirmed",
            "scoped",
            "drafted",
            "approved",
            "notifying",
            "monitoring",
            "closed",
            "dismissed",
        ] {
            assert!(c.strings(Locale::En).contains_key(&format!("state_{state}")), "{state}");
        }
    }

    #[test]
    fn csrf_tokens_differ_per_session_and_compare_exactly() {
        let (a, b) = (csrf_of("tocsin_a"), csrf_of("tocsin_b"));
        assert_ne!(a, b);
        assert_eq!(a.len(), 64);
        assert!(same(&a, &csrf_of("tocsin_a")));
        assert!(!same(&a, &b) && !same("", "") && !same(&a, &a[..63]));
    }

    #[test]
    fn time_left_reads_in_both_languages() {
        let c = Console::load().expect("the console loads");
        assert_eq!(time_left(&c, Locale::En, 1565), "1 d 2 h 5 min");
        assert_eq!(time_left(&c, Locale::En, -30), "overdue by 30 min");
        assert_eq!(time_left(&c, Locale::ZhCn, 125), "2小时5分钟");
    }

    #[test]
    fn cookies_are_read_by_name() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; tocsin_console=tocsin_x; b=2"),
        );
        assert_eq!(cookie(&h, SESSION_COOKIE).as_deref(), Some("tocsin_x"));
        assert_eq!(cookie(&h, "c"), None);
    }
}
