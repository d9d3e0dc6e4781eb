//! The HTTP layer: the API under `/api/v1`, the public bulletins under `/bulletins`, and the
//! delivery worker that `tocsin serve` runs beside them. Handlers only translate between HTTP
//! and the engine; errors are RFC 9457 problem documents naming the field and the reason.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

mod console;
mod routes;

pub use routes::{API, Endpoint, openapi};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Extension, MatchedPath, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Router, middleware};
use chrono::Utc;
use serde::Deserialize;
use serde_json::{Value, json};
use tower_http::services::ServeDir;

use crate::auth::Role;
use crate::domain::{Actor, FieldError, Grade, IncidentState, LocalizedText, MerchantId};
use crate::engine::{EngineError, Tocsin};
use crate::incident::IncidentError;
use crate::model::ScopeRule;
use crate::scheduler::Schedule;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(
        "refusing to listen on {0}: Tocsin listens on loopback only (127.0.0.1 or ::1), as it speaks plain HTTP; put a TLS-terminating proxy in front to serve others"
    )]
    NotLoopback(String),
    #[error("server.listen: '{0}' is not an address such as 127.0.0.1:8080")]
    BadAddress(String),
    #[error("listening on {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("server: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Schedule(#[from] crate::scheduler::ScheduleError),
}

/// An API error as `application/problem+json`.
pub struct Problem {
    status: StatusCode,
    title: &'static str,
    detail: String,
    field: Option<String>,
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let mut body = json!({
            "type": "about:blank",
            "title": self.title,
            "status": self.status.as_u16(),
            "detail": self.detail,
        });
        if let Some(field) = self.field {
            body["field"] = field.into();
        }
        (
            self.status,
            [(header::CONTENT_TYPE, "application/problem+json")],
            body.to_string(),
        )
            .into_response()
    }
}

fn bad_request(field: &str, reason: impl Into<String>) -> Problem {
    Problem {
        status: StatusCode::BAD_REQUEST,
        title: "invalid input",
        detail: format!("{field}: {}", reason.into()),
        field: Some(field.to_owned()),
    }
}

impl From<EngineError> for Problem {
    fn from(e: EngineError) -> Self {
        use crate::ingest::IngestError;
        let detail = e.to_string();
        match &e {
            EngineError::Ingest(IngestError::Invalid { error, .. }) | EngineError::Invalid(error) => Problem {
                status: StatusCode::UNPROCESSABLE_ENTITY,
                title: "invalid input",
                detail,
                field: Some(error.field.clone()),
            },
            EngineError::Incident(IncidentError::Facts(error)) => Problem {
                status: StatusCode::UNPROCESSABLE_ENTITY,
                title: "invalid input",
                detail,
                field: Some(error.field.clone()),
            },
            EngineError::Ingest(IngestError::Syntax(_)) => bad_request("body", detail),
            EngineError::Directory(crate::directory::DirectoryError::Header(_)) => Problem {
                status: StatusCode::UNPROCESSABLE_ENTITY,
                title: "invalid input",
                detail,
                field: Some("header".into()),
            },
            EngineError::NotFound { .. } | EngineError::Store(crate::store::StoreError::NotFound { .. }) => Problem {
                status: StatusCode::NOT_FOUND,
                title: "not found",
                detail,
                field: None,
            },
            EngineError::Incident(IncidentError::WrongState { .. })
            | EngineError::Store(crate::store::StoreError::Conflict { .. }) => Problem {
                status: StatusCode::CONFLICT,
                title: "conflict with the incident's state",
                detail,
                field: None,
            },
            EngineError::Unauthenticated(_) => Problem {
                status: StatusCode::FORBIDDEN,
                title: "not authenticated",
                detail,
                field: None,
            },
            EngineError::Submission(crate::submission::SubmissionError::Setting(error)) => Problem {
                status: StatusCode::UNPROCESSABLE_ENTITY,
                title: "submission not configured",
                detail,
                field: Some(error.field.clone()),
            },
            EngineError::Submission(_) => Problem {
                status: StatusCode::BAD_GATEWAY,
                title: "the regulator did not take the report",
                detail,
                field: None,
            },
            EngineError::SameActor { .. } | EngineError::FilingAuthor { .. } => Problem {
                status: StatusCode::FORBIDDEN,
                title: "four-eyes rule",
                detail,
                field: Some("actor".into()),
            },
            EngineError::Draft(crate::draft::DraftError::Incomplete { .. })
            | EngineError::Filing(crate::filing::FilingError::Incomplete { .. }) => Problem {
                status: StatusCode::UNPROCESSABLE_ENTITY,
                title: "incomplete",
                detail,
                field: None,
            },
            _ => {
                tracing::error!(error = %e, "request failed");
                Problem {
                    status: StatusCode::INTERNAL_SERVER_ERROR,
                    title: "internal error",
                    detail: "the request could not be completed; see the server log".into(),
                    field: None,
                }
            }
        }
    }
}

type ApiResult = Result<Response, Problem>;

fn ok(value: impl serde::Serialize) -> ApiResult {
    Ok((StatusCode::OK, axum::Json(value)).into_response())
}

#[derive(Clone)]
struct AppState {
    engine: Arc<Tocsin>,
    wake_worker: Arc<tokio::sync::Notify>,
    requests: Arc<crate::metrics::RequestCounter>,
}

impl AppState {
    fn new(engine: Arc<Tocsin>) -> Self {
        AppState {
            engine,
            wake_worker: Arc::new(tokio::sync::Notify::new()),
            requests: Arc::default(),
        }
    }
}

/// Parses a JSON body once, at the edge.
fn body_json(bytes: &Bytes) -> Result<Value, Problem> {
    serde_json::from_slice(bytes).map_err(|e| bad_request("body", format!("not valid JSON: {e}")))
}

/// The router: API and public bulletins (no worker; see [`serve`]).
pub fn router(engine: Arc<Tocsin>) -> Router {
    router_with(AppState::new(engine))
}

fn router_with(state: AppState) -> Router {
    let limit = state.engine.settings.server.body_limit_bytes;
    let bulletins = ServeDir::new(state.engine.paths.bulletins.clone()).append_index_html_on_directories(true);
    let api = routes::api_router()
        .route_layer(middleware::from_fn_with_state(state.clone(), authorize))
        .layer(middleware::from_fn(problems_only));
    Router::new()
        // Probes for supervisors: no data, no token.
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/api/openapi.json", get(|| async { axum::Json(openapi()) }))
        .merge(api)
        // Public: a merchant's own notice (by its unguessable token), the bulletin's lookup.
        .route("/n/{token}", get(notice_page))
        .route("/lookup", post(lookup))
        // Provider callbacks, each authenticated by the provider's own scheme.
        .route("/hooks/twilio/{provider}", post(twilio_status))
        .route("/hooks/aliyun/{provider}", post(aliyun_report))
        .route("/hooks/email/dsn", post(email_dsn))
        .nest_service("/bulletins", bulletins)
        .merge(console::router())
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn_with_state(state.clone(), count_request))
        .with_state(state)
}

/// Errors the framework answers itself (a body over the limit, a method not allowed, a JSON
/// body it could not take) become problem documents like every other API error.
async fn problems_only(request: axum::extract::Request, next: middleware::Next) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    let is_problem = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|t| t.as_bytes().starts_with(b"application/problem+json"));
    if !(status.is_client_error() || status.is_server_error()) || is_problem {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
    let field = matches!(
        status,
        StatusCode::PAYLOAD_TOO_LARGE | StatusCode::UNSUPPORTED_MEDIA_TYPE
    )
    .then(|| "body".to_owned());
    let mut problem = Problem {
        status,
        title: status.canonical_reason().unwrap_or("error"),
        detail: String::from_utf8_lossy(&text).trim().to_owned(),
        field,
    }
    .into_response();
    for name in [header::ALLOW, header::RETRY_AFTER, header::WWW_AUTHENTICATE] {
        if let Some(v) = parts.headers.get(&name) {
            problem.headers_mut().insert(name, v.clone());
        }
    }
    problem
}

/// Counts every answer by method, route template (never the path itself: it may hold a
/// notice's token) and status.
async fn count_request(State(s): State<AppState>, request: axum::extract::Request, next: middleware::Next) -> Response {
    let method = request.method().as_str().to_owned();
    let route = match request.extensions().get::<MatchedPath>() {
        Some(m) if m.as_str().starts_with("/bulletins") => "/bulletins".to_owned(),
        Some(m) => m.as_str().to_owned(),
        None if request.uri().path().starts_with("/bulletins") => "/bulletins".to_owned(),
        None => "unmatched".to_owned(),
    };
    let response = next.run(request).await;
    s.requests.record(&method, &route, response.status().as_u16());
    response
}

async fn metrics(State(s): State<AppState>) -> ApiResult {
    let snapshot = s.engine.metrics_snapshot(Utc::now()).await?;
    Ok((
        [(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
        crate::metrics::render(&snapshot, &s.requests),
    )
        .into_response())
}

/// 200 when every check passes, 503 naming the ones that failed (the reasons go to the log:
/// the probe answers anyone).
async fn readyz(State(s): State<AppState>) -> Response {
    let checks = s.engine.readiness().await;
    let ready = checks.iter().all(|(_, r)| r.is_ok());
    let body: serde_json::Map<String, Value> = checks
        .into_iter()
        .map(|(name, r)| {
            let state = match r {
                Ok(()) => "ok",
                Err(reason) => {
                    tracing::warn!(check = name, %reason, "not ready");
                    "failed"
                }
            };
            (name.to_owned(), json!(state))
        })
        .collect();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(json!({ "ready": ready, "checks": body }))).into_response()
}

/// Who is calling: the actor and role of the bearer token presented.
#[derive(Debug, Clone)]
pub struct Caller {
    pub actor: Actor,
    pub role: Role,
}

fn unauthenticated(detail: &str) -> Response {
    let mut response = Problem {
        status: StatusCode::UNAUTHORIZED,
        title: "not authenticated",
        detail: detail.to_owned(),
        field: Some("Authorization".into()),
    }
    .into_response();
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, axum::http::HeaderValue::from_static("Bearer"));
    response
}

/// Every API request presents a valid token whose role has the endpoint's access; the token's
/// actor is the one every change is recorded under. Events may come signed by a configured
/// source instead (checked by the handler, which has the body).
async fn authorize(
    State(s): State<AppState>,
    matched: MatchedPath,
    mut request: axum::extract::Request,
    next: middleware::Next,
) -> Response {
    let Some(endpoint) = routes::endpoint(request.method(), matched.as_str()) else {
        return Problem {
            status: StatusCode::NOT_FOUND,
            title: "not found",
            detail: "no such operation".into(),
            field: None,
        }
        .into_response();
    };
    let bearer = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .map(str::to_owned);
    let Some(bearer) = bearer else {
        if endpoint.path == "/api/v1/events" && request.headers().contains_key("x-tocsin-source") {
            return next.run(request).await;
        }
        return unauthenticated("send a token: Authorization: Bearer <token> (tocsin tokens create)");
    };
    let token = match s.engine.authenticate(&bearer).await {
        Ok(Some(t)) => t,
        Ok(None) => return unauthenticated("the token is unknown, revoked or expired"),
        Err(e) => return Problem::from(e).into_response(),
    };
    if !token.role.may(endpoint.access) {
        let roles: Vec<&str> = endpoint.access.roles().iter().map(|r| r.as_str()).collect();
        return Problem {
            status: StatusCode::FORBIDDEN,
            title: "not allowed for this role",
            detail: format!(
                "{} {} needs the role {}; this token is a {}",
                endpoint.method,
                endpoint.path,
                roles.join(" or "),
                token.role
            ),
            field: Some("role".into()),
        }
        .into_response();
    }
    request.extensions_mut().insert(Caller {
        actor: token.actor,
        role: token.role,
    });
    next.run(request).await
}

async fn post_events(
    State(s): State<AppState>,
    caller: Option<Extension<Caller>>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    let actor = match caller {
        Some(Extension(c)) => c.actor,
        None => source_actor(&s, &headers, &body)?,
    };
    let text = std::str::from_utf8(&body).map_err(|_| bad_request("body", "is not UTF-8"))?;
    let outcomes = s.engine.ingest_text(text, &actor).await?;
    Ok((StatusCode::ACCEPTED, axum::Json(outcomes)).into_response())
}

/// The actor of an event posted by a configured source (`source:<name>`), once its signature
/// over timestamp and body checks out within the replay window.
fn source_actor(s: &AppState, headers: &HeaderMap, body: &[u8]) -> Result<Actor, Problem> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let forbidden = |detail: String, field: &str| Problem {
        status: StatusCode::UNAUTHORIZED,
        title: "not authenticated",
        detail,
        field: Some(field.to_owned()),
    };
    let name = header("x-tocsin-source").unwrap_or_default();
    let source = s.engine.settings.sources.get(name).ok_or_else(|| {
        forbidden(
            "X-Tocsin-Source: no such source is configured".into(),
            "X-Tocsin-Source",
        )
    })?;
    crate::auth::verify_source_signature(
        source.secret.expose().as_bytes(),
        header("x-tocsin-timestamp"),
        header("x-tocsin-signature"),
        body,
        Utc::now(),
        s.engine.settings.server.replay_window_seconds,
    )
    .map_err(|e| {
        let text = e.to_string();
        let field = text.split(':').next().unwrap_or("X-Tocsin-Signature").to_owned();
        forbidden(text, &field)
    })?;
    format!("source:{name}")
        .parse()
        .map_err(|e: FieldError| bad_request("X-Tocsin-Source", e.reason))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenBody {
    actor: String,
    role: String,
    #[serde(default)]
    expires_at: Option<String>,
}

async fn create_token(State(s): State<AppState>, Extension(caller): Extension<Caller>, body: Bytes) -> ApiResult {
    let body: TokenBody = serde_json::from_slice(&body).map_err(|e| bad_request("body", e.to_string()))?;
    let actor: Actor = body
        .actor
        .parse()
        .map_err(|e: FieldError| bad_request("actor", e.reason))?;
    let role: Role = body
        .role
        .parse()
        .map_err(|e: FieldError| bad_request("role", e.reason))?;
    let expires_at = body
        .expires_at
        .as_deref()
        .map(|t| {
            crate::time::parse_ts(t).map_err(|e| bad_request("expires_at", format!("not an RFC 3339 instant ({e})")))
        })
        .transpose()?;
    let (token, secret) = s.engine.create_token(&actor, role, expires_at, &caller.actor).await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(json!({ "token": secret, "details": token })),
    )
        .into_response())
}

async fn list_tokens(State(s): State<AppState>, uri: axum::http::Uri, Query(page): Query<Page>) -> ApiResult {
    let items = page.of(s.engine.tokens().await?, |t| t.id.to_string())?;
    paged(&uri, items, &page, |t| t.id.to_string())
}

async fn revoke_token(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Extension(caller): Extension<Caller>,
) -> ApiResult {
    s.engine.revoke_token(&id, &caller.actor).await?;
    ok(json!({ "revoked": id }))
}

async fn export_evidence(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Extension(caller): Extension<Caller>,
) -> ApiResult {
    let (archive, name) = s.engine.export_evidence_archive(&id, &caller.actor).await?;
    let file = tokio::fs::File::open(&archive).await.map_err(|e| {
        EngineError::from(crate::evidence::EvidenceError::Write {
            path: archive.display().to_string(),
            reason: e.to_string(),
        })
    })?;
    let body = axum::body::Body::from_stream(tokio_util::io::ReaderStream::new(file));
    Ok((
        [
            (header::CONTENT_TYPE, "application/x-tar".to_owned()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{name}.tar\""),
            ),
            (header::CACHE_CONTROL, "no-store".to_owned()),
        ],
        body,
    )
        .into_response())
}

async fn verify_ledger(State(s): State<AppState>) -> ApiResult {
    ok(crate::ledger::verify(s.engine.store.as_ref())
        .await
        .map_err(EngineError::from)?)
}

/// `?after=&limit=` of a paginated list.
#[derive(Debug, Default, Deserialize)]
struct Page {
    after: Option<String>,
    limit: Option<u32>,
}

const PAGE_DEFAULT: u32 = 100;
const PAGE_MAX: u32 = 1000;

impl Page {
    fn limit(&self) -> Result<u32, Problem> {
        match self.limit {
            None => Ok(PAGE_DEFAULT),
            Some(n) if (1..=PAGE_MAX).contains(&n) => Ok(n),
            Some(_) => Err(bad_request("limit", format!("must be 1 to {PAGE_MAX}"))),
        }
    }

    /// The page of a list held whole (small lists: incidents, tokens, lookups) after the
    /// cursor, `cursor` naming each item as `after` does.
    fn of<T>(&self, items: Vec<T>, cursor: impl Fn(&T) -> String) -> Result<Vec<T>, Problem> {
        let limit = self.limit()? as usize;
        let start = match &self.after {
            None => 0,
            Some(after) => {
                items
                    .iter()
                    .position(|i| cursor(i) == *after)
                    .ok_or_else(|| bad_request("after", "is not an item of this list"))?
                    + 1
            }
        };
        Ok(items.into_iter().skip(start).take(limit).collect())
    }
}

/// One page as a JSON array; when the page is full, `Link: <...>; rel="next"` (RFC 8288)
/// gives the URL of the next one.
fn paged<T: serde::Serialize>(
    uri: &axum::http::Uri,
    items: Vec<T>,
    page: &Page,
    cursor: impl Fn(&T) -> String,
) -> ApiResult {
    let limit = page.limit()?;
    let next = (items.len() == limit as usize)
        .then(|| items.last().map(&cursor))
        .flatten();
    let mut response = (StatusCode::OK, axum::Json(items)).into_response();
    if let Some(after) = next {
        let mut query: Vec<(String, String)> = uri
            .query()
            .map(|q| serde_urlencoded::from_str(q).unwrap_or_default())
            .unwrap_or_default();
        query.retain(|(k, _)| k != "after" && k != "limit");
        query.push(("after".into(), after));
        query.push(("limit".into(), limit.to_string()));
        let query = serde_urlencoded::to_string(&query).unwrap_or_default();
        if let Ok(link) = axum::http::HeaderValue::from_str(&format!("<{}?{query}>; rel=\"next\"", uri.path())) {
            response.headers_mut().insert(header::LINK, link);
        }
    }
    Ok(response)
}

async fn list_incidents(State(s): State<AppState>, uri: axum::http::Uri, Query(page): Query<Page>) -> ApiResult {
    let items = page.of(s.engine.incidents().await?, |i| i.id.to_string())?;
    paged(&uri, items, &page, |i| i.id.to_string())
}

async fn incident_events(State(s): State<AppState>, Path(id): Path<String>) -> ApiResult {
    ok(s.engine.incident_events(&id).await?)
}

async fn list_lookups(
    State(s): State<AppState>,
    Path(id): Path<String>,
    uri: axum::http::Uri,
    Query(page): Query<Page>,
) -> ApiResult {
    let cursor = |l: &crate::model::Lookup| l.at.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true);
    let items = page.of(s.engine.lookups(&id).await?, cursor)?;
    paged(&uri, items, &page, cursor)
}

async fn list_reminders(State(s): State<AppState>, Path(id): Path<String>) -> ApiResult {
    ok(s.engine.reminders(&id).await?)
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct TickBody {
    now: Option<String>,
}

async fn watchdog_tick(State(s): State<AppState>, body: Bytes) -> ApiResult {
    let body: TickBody = if body.is_empty() {
        TickBody::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| bad_request("body", e.to_string()))?
    };
    let now = match body.now.as_deref() {
        Some(t) => {
            crate::time::parse_ts(t).map_err(|e| bad_request("now", format!("not an RFC 3339 instant ({e})")))?
        }
        None => Utc::now(),
    };
    ok(s.engine.watchdog_tick(now).await?)
}

/// Which dead letters: by incident, channel, provider, error class.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct DeliveryFilterParams {
    incident: Option<String>,
    channel: Option<String>,
    provider: Option<String>,
    error_class: Option<String>,
    #[serde(default)]
    after: Option<String>,
    #[serde(default)]
    limit: Option<u32>,
}

impl DeliveryFilterParams {
    async fn filter(&self, s: &AppState) -> Result<crate::store::DeliveryFilter, Problem> {
        Ok(s.engine
            .delivery_filter(
                self.incident.as_deref(),
                self.channel.as_deref(),
                self.provider.as_deref(),
                self.error_class.as_deref(),
            )
            .await?)
    }
}

fn delivery_param(field: &str, raw: &str) -> Result<crate::domain::DeliveryId, Problem> {
    raw.parse().map_err(|e: FieldError| bad_request(field, e.reason))
}

async fn dead_letters(
    State(s): State<AppState>,
    uri: axum::http::Uri,
    Query(q): Query<DeliveryFilterParams>,
) -> ApiResult {
    let page = Page {
        after: q.after.clone(),
        limit: q.limit,
    };
    let after = q.after.as_deref().map(|a| delivery_param("after", a)).transpose()?;
    let items = s
        .engine
        .dead_letters(&q.filter(&s).await?, after.as_ref(), page.limit()?)
        .await?;
    paged(&uri, items, &page, |d| d.id.to_string())
}

async fn redrive(State(s): State<AppState>, Extension(caller): Extension<Caller>, body: Bytes) -> ApiResult {
    let q: DeliveryFilterParams = if body.is_empty() {
        DeliveryFilterParams::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| bad_request("body", e.to_string()))?
    };
    if q.after.is_some() || q.limit.is_some() {
        return Err(bad_request(
            "body",
            "a re-drive takes incident, channel, provider and error_class only",
        ));
    }
    let n = s.engine.redrive(&q.filter(&s).await?, &caller.actor).await?;
    ok(json!({ "redriven": n }))
}

async fn delivery_history(State(s): State<AppState>, Path(id): Path<String>) -> ApiResult {
    ok(s.engine.delivery_history(&id).await?)
}

async fn list_providers(State(s): State<AppState>) -> ApiResult {
    ok(s.engine.providers().await?)
}

/// A merchant document: CSV (`Content-Type: text/csv`) or JSON Lines (anything else).
async fn import_merchants(State(s): State<AppState>, headers: HeaderMap, body: Bytes) -> ApiResult {
    let text = std::str::from_utf8(&body).map_err(|_| bad_request("body", "is not UTF-8"))?;
    let csv = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.starts_with("text/csv"));
    ok(s.engine.import_merchants_text(text, csv).await?)
}

#[derive(serde::Deserialize)]
struct DeadlinesQuery {
    incident: Option<String>,
    #[serde(default)]
    all: bool,
}

/// Every regulator clock running (`?all=true`: also met and not started), soonest first.
async fn list_deadlines(State(s): State<AppState>, Query(q): Query<DeadlinesQuery>) -> ApiResult {
    ok(s.engine
        .deadlines(q.incident.as_deref(), q.all, chrono::Utc::now())
        .await?)
}

async fn get_incident(State(s): State<AppState>, Path(id): Path<String>) -> ApiResult {
    ok(s.engine.view(&id).await?)
}

async fn confirm(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> ApiResult {
    let body = body_json(&body)?;
    let facts = body.get("facts").ok_or_else(|| bad_request("facts", "is required"))?;
    ok(s.engine.confirm(&id, facts, &caller.actor).await?)
}

async fn dismiss(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> ApiResult {
    let body = body_json(&body)?;
    let reason = body
        .get("reason")
        .and_then(Value::as_str)
        .ok_or_else(|| bad_request("reason", "is required"))?;
    s.engine.dismiss(&id, reason, &caller.actor).await?;
    ok(json!({ "dismissed": id }))
}

async fn close(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> ApiResult {
    let body = body_json(&body)?;
    let reason = body
        .get("reason")
        .and_then(Value::as_str)
        .unwrap_or("handling finished");
    s.engine.close(&id, reason, &caller.actor).await?;
    ok(json!({ "closed": id }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ScopeBody {
    /// Ignored: the token names the actor (kept so that older clients are not refused).
    #[serde(default, rename = "actor")]
    _actor: Option<String>,
    rule: ScopeRule,
    #[serde(default)]
    dry_run: bool,
}

async fn scope(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> ApiResult {
    let mut de = serde_json::Deserializer::from_slice(&body);
    let body: ScopeBody = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let field = e.path().to_string();
        let reason = e.inner().to_string();
        bad_request(if field == "." { "body" } else { &field }, reason)
    })?;
    ok(s.engine.scope(&id, &body.rule, &caller.actor, body.dry_run).await?)
}

async fn draft(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> ApiResult {
    let body = body_json(&body)?;
    let changes: Option<LocalizedText> = match body.get("changes") {
        None | Some(Value::Null) => None,
        Some(v) => Some(serde_json::from_value(v.clone()).map_err(|e| bad_request("changes", e.to_string()))?),
    };
    ok(s.engine.draft(&id, &caller.actor, changes.as_ref()).await?)
}

/// A required string field of a JSON body.
fn text_field<'a>(body: &'a Value, name: &str) -> Result<&'a str, Problem> {
    body.get(name)
        .and_then(Value::as_str)
        .ok_or_else(|| bad_request(name, "is required (a string)"))
}

async fn amend(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> ApiResult {
    let body = body_json(&body)?;
    let facts = body.get("facts").ok_or_else(|| bad_request("facts", "is required"))?;
    ok(s.engine
        .amend(&id, facts, &caller.actor, text_field(&body, "reason")?)
        .await?)
}

async fn grade(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> ApiResult {
    let body = body_json(&body)?;
    let grade: Grade = text_field(&body, "grade")?
        .parse()
        .map_err(|e: FieldError| bad_request("grade", e.reason))?;
    let reason = body.get("reason").and_then(Value::as_str).unwrap_or("");
    ok(s.engine.set_grade(&id, grade, reason, &caller.actor).await?)
}

async fn notice_decision(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> ApiResult {
    let body = body_json(&body)?;
    let merchant: MerchantId = text_field(&body, "merchant_id")?
        .parse()
        .map_err(|e: FieldError| bad_request("merchant_id", e.reason))?;
    let required = body
        .get("required")
        .and_then(Value::as_bool)
        .ok_or_else(|| bad_request("required", "is required (true or false)"))?;
    ok(s.engine
        .override_notice(&id, &merchant, required, text_field(&body, "reason")?, &caller.actor)
        .await?)
}

#[derive(serde::Deserialize)]
struct VersionQuery {
    version: Option<i64>,
    from: Option<i64>,
    to: Option<i64>,
}

fn merchant_param(raw: &str) -> Result<MerchantId, Problem> {
    raw.parse()
        .map_err(|e: FieldError| bad_request("merchant_id", e.reason))
}

async fn preview(
    State(s): State<AppState>,
    Path((id, merchant)): Path<(String, String)>,
    Query(q): Query<VersionQuery>,
) -> ApiResult {
    ok(s.engine.preview(&id, &merchant_param(&merchant)?, q.version).await?)
}

async fn diff(
    State(s): State<AppState>,
    Path((id, merchant)): Path<(String, String)>,
    Query(q): Query<VersionQuery>,
) -> ApiResult {
    let (Some(from), Some(to)) = (q.from, q.to) else {
        return Err(bad_request("from", "give both ?from=<version>&to=<version>"));
    };
    ok(s.engine.diff(&id, &merchant_param(&merchant)?, from, to).await?)
}

/// A merchant's own notice. The token is the only key: an unknown token gets the same plain
/// 404 as a malformed one, and nothing is cached (the page holds personal data).
async fn notice_page(State(s): State<AppState>, Path(token): Path<String>) -> Response {
    let no_store = [
        (axum::http::header::CACHE_CONTROL, "no-store"),
        (axum::http::header::REFERRER_POLICY, "no-referrer"),
    ];
    match s.engine.notice_page(&token).await {
        Ok(Some(html)) => (StatusCode::OK, no_store, axum::response::Html(html)).into_response(),
        Ok(None) => (StatusCode::NOT_FOUND, no_store, "no such notice").into_response(),
        Err(e) => {
            tracing::error!(error = %e, "rendering a notice page failed");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                no_store,
                "the notice could not be shown",
            )
                .into_response()
        }
    }
}

/// The form of the bulletin's "am I affected?" lookup.
#[derive(Deserialize)]
struct LookupForm {
    reference: String,
    #[serde(default)]
    merchant_id: String,
    #[serde(default)]
    factor: String,
    #[serde(default)]
    lang: Option<String>,
}

/// `POST /lookup`, unauthenticated: answers as an HTML page in the form's language, or as JSON
/// when asked (`Accept: application/json`); 429 once a client has looked up too often.
async fn lookup(state: State<AppState>, request: axum::extract::Request) -> Response {
    // Answers (refusals too) are about one merchant: never cached, never sent on as a referrer.
    let mut response = lookup_answer(state, request).await;
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, axum::http::HeaderValue::from_static("no-store"));
    headers.insert(
        header::REFERRER_POLICY,
        axum::http::HeaderValue::from_static("no-referrer"),
    );
    response
}

async fn lookup_answer(State(s): State<AppState>, request: axum::extract::Request) -> Response {
    let client = request
        .extensions()
        .get::<axum::extract::ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip().to_string())
        .unwrap_or_else(|| "unknown".into());
    let wants_json = request
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/json"));
    let limit = s.engine.settings.server.body_limit_bytes;
    let form: LookupForm = match axum::body::to_bytes(request.into_body(), limit).await {
        Ok(body) => match serde_urlencoded::from_bytes(&body) {
            Ok(f) => f,
            Err(e) => return bad_request("form", e.to_string()).into_response(),
        },
        Err(_) => return bad_request("form", "the body could not be read").into_response(),
    };
    let locale = match form.lang.as_deref() {
        Some("en") => crate::domain::Locale::En,
        _ => crate::domain::Locale::ZhCn,
    };
    let answer = match s
        .engine
        .lookup(
            &form.reference,
            &form.merchant_id,
            &form.factor,
            &client,
            locale,
            Utc::now(),
        )
        .await
    {
        Ok(a) => a,
        Err(e) => return Problem::from(e).into_response(),
    };
    let status = match answer {
        crate::bulletin::LookupAnswer::Limited { .. } => StatusCode::TOO_MANY_REQUESTS,
        _ => StatusCode::OK,
    };
    let retry_after = match &answer {
        crate::bulletin::LookupAnswer::Limited { retry_after_seconds } => Some(retry_after_seconds.to_string()),
        _ => None,
    };
    let mut response = if wants_json {
        (status, axum::Json(&answer)).into_response()
    } else {
        let back = format!(
            "{}/{}/{}",
            s.engine.settings.operator.public_base_url.trim_end_matches('/'),
            form.reference,
            crate::bulletin::page_file(locale)
        );
        match crate::bulletin::render_lookup(&answer, &form.reference, &back, locale, &s.engine.templates) {
            Ok(html) => (status, axum::response::Html(html)).into_response(),
            Err(e) => {
                tracing::error!(error = %e, "rendering a lookup answer failed");
                (StatusCode::INTERNAL_SERVER_ERROR, "the answer could not be shown").into_response()
            }
        }
    };
    if let Some(v) = retry_after.and_then(|v| axum::http::HeaderValue::from_str(&v).ok()) {
        response.headers_mut().insert(header::RETRY_AFTER, v);
    }
    response
}

async fn approve(State(s): State<AppState>, Path(id): Path<String>, Extension(caller): Extension<Caller>) -> ApiResult {
    ok(s.engine.approve(&id, &caller.actor).await?)
}

async fn dispatch(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Extension(caller): Extension<Caller>,
) -> ApiResult {
    let started = s.engine.dispatch(&id, &caller.actor).await?;
    s.wake_worker.notify_one();
    Ok((StatusCode::ACCEPTED, axum::Json(started)).into_response())
}

async fn bulletin(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Extension(caller): Extension<Caller>,
) -> ApiResult {
    ok(s.engine.publish_bulletin(&id, &caller.actor, true).await?)
}

/// An optional string member of a JSON body; present but not a string is an error naming it.
fn opt_str<'a>(body: &'a Value, field: &str) -> Result<Option<&'a str>, Problem> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(bad_request(field, "must be a string")),
    }
}

fn req_str<'a>(body: &'a Value, field: &str) -> Result<&'a str, Problem> {
    opt_str(body, field)?.ok_or_else(|| bad_request(field, "is required"))
}

async fn list_filings(State(s): State<AppState>, Path(id): Path<String>) -> ApiResult {
    ok(s.engine.filings(&id).await?)
}

/// Drafts the reports the incident owes (`regulator` and `stage` optional).
async fn draft_filings(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> ApiResult {
    let body = body_json(&body)?;
    let (regulator, stage) = (opt_str(&body, "regulator")?, opt_str(&body, "stage")?);
    ok(s.engine.draft_filings(&id, regulator, stage, &caller.actor).await?)
}

async fn readiness(State(s): State<AppState>, Path(id): Path<String>) -> ApiResult {
    ok(s.engine.filing_readiness(&id).await?)
}

async fn get_filing(State(s): State<AppState>, Path(id): Path<String>) -> ApiResult {
    ok(s.engine.filing(&id).await?)
}

async fn write_filing_field(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> ApiResult {
    let body = body_json(&body)?;
    let (field, text) = (req_str(&body, "field")?, req_str(&body, "text")?);
    ok(s.engine.write_filing_field(&id, field, text, &caller.actor).await?)
}

async fn approve_filing(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Extension(caller): Extension<Caller>,
) -> ApiResult {
    ok(s.engine.approve_filing(&id, &caller.actor).await?)
}

async fn submit_filing(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Extension(caller): Extension<Caller>,
) -> ApiResult {
    ok(s.engine.submit_filing(&id, &caller.actor).await?)
}

async fn filing_reference(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> ApiResult {
    let body = body_json(&body)?;
    let filed_at = opt_str(&body, "filed_at")?
        .map(|t| {
            crate::time::parse_ts(t).map_err(|e| bad_request("filed_at", format!("not an RFC 3339 instant ({e})")))
        })
        .transpose()?;
    ok(s.engine
        .record_filing_reference(&id, req_str(&body, "reference")?, filed_at, &caller.actor)
        .await?)
}

async fn acknowledge_filing(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> ApiResult {
    let body = body_json(&body)?;
    let note = opt_str(&body, "note")?.unwrap_or_default();
    ok(s.engine
        .acknowledge_filing(&id, opt_str(&body, "reference")?, note, &caller.actor)
        .await?)
}

#[derive(serde::Deserialize)]
struct PageQuery {
    after: Option<String>,
    limit: Option<u32>,
    notice_required: Option<bool>,
}

async fn list_affected(State(s): State<AppState>, Path(id): Path<String>, Query(q): Query<PageQuery>) -> ApiResult {
    let after = q.after.as_deref().map(merchant_param).transpose()?;
    ok(s.engine
        .affected(&id, after.as_ref(), q.limit.unwrap_or(500).min(5000), q.notice_required)
        .await?)
}

async fn list_notices(State(s): State<AppState>, Path(id): Path<String>, Query(q): Query<PageQuery>) -> ApiResult {
    let after = q.after.as_deref().map(merchant_param).transpose()?;
    let notices = s
        .engine
        .notices(&id, after.as_ref(), q.limit.unwrap_or(500).min(5000))
        .await?;
    let rows: Vec<Value> = notices
        .iter()
        .map(|n| json!({ "id": n.id, "merchant_id": n.merchant_id, "locale": n.locale, "class_no": n.class_no }))
        .collect();
    ok(rows)
}

async fn list_deliveries(
    State(s): State<AppState>,
    Path(id): Path<String>,
    uri: axum::http::Uri,
    Query(page): Query<Page>,
) -> ApiResult {
    let after = page.after.as_deref().map(|a| delivery_param("after", a)).transpose()?;
    let items = s.engine.deliveries_page(&id, after.as_ref(), page.limit()?).await?;
    paged(&uri, items, &page, |d| d.id.to_string())
}

async fn get_notice(State(s): State<AppState>, Path(id): Path<String>) -> ApiResult {
    ok(s.engine.notice(&id).await?)
}

/// Twilio's message status callback (form-encoded, signed with `X-Twilio-Signature`).
async fn twilio_status(
    State(s): State<AppState>,
    Path(provider): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<StatusCode, Problem> {
    let params: Vec<(String, String)> =
        serde_urlencoded::from_bytes(&body).map_err(|e| bad_request("body", format!("not a form: {e}")))?;
    let signature = headers.get("x-twilio-signature").and_then(|v| v.to_str().ok());
    s.engine.twilio_status(&provider, &params, signature).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
struct TokenQuery {
    token: Option<String>,
}

/// Aliyun's SMS delivery report push (a JSON array); answered as Aliyun expects.
async fn aliyun_report(
    State(s): State<AppState>,
    Path(provider): Path<String>,
    Query(q): Query<TokenQuery>,
    body: Bytes,
) -> Result<Response, Problem> {
    s.engine.aliyun_report(&provider, q.token.as_deref(), &body).await?;
    Ok(axum::Json(json!({ "code": 0, "msg": "成功" })).into_response())
}

/// A delivery status notification (RFC 3464) piped in by the mail system.
async fn email_dsn(State(s): State<AppState>, headers: HeaderMap, body: Bytes) -> Result<Response, Problem> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim());
    let tally = s.engine.email_dsn(token, &body).await?;
    Ok(axum::Json(tally).into_response())
}

/// The background work of `serve`: the delivery pipelines, and on every tick of the sweep
/// schedule settling incidents whose outbox emptied and checkpointing the database.
async fn worker(state: AppState, schedule: Schedule, mut stop: tokio::sync::watch::Receiver<bool>) {
    let engine = state.engine.clone();
    let dispatcher = engine.dispatcher();
    let deliveries = tokio::spawn({
        let stop = stop.clone();
        let wake = state.wake_worker.clone();
        async move { dispatcher.run(stop, wake).await }
    });
    let system = Actor::system();
    loop {
        if let Ok(incidents) = engine.incidents().await {
            for i in incidents.iter().filter(|i| i.state == IncidentState::Notifying) {
                if let Err(e) = engine.settle(&i.id, &system).await {
                    tracing::error!(incident = %i.id, error = %e, "settling an incident failed");
                }
            }
        }
        // Large commits do not wait for the WAL to be copied back; it is done here, off the
        // request path.
        if let Err(e) = engine.store.checkpoint().await {
            tracing::warn!(error = %e, "checkpointing the database failed");
        }
        tokio::select! {
            _ = tokio::time::sleep(until_next(&schedule, Duration::from_secs(10))) => {}
            _ = stop.changed() => break,
        }
    }
    // The pipelines saw the same stop: they claim nothing more and record what is in flight.
    let _ = deliveries.await;
}

/// How long until `schedule` next fires (`otherwise` if it never does), at least 10 ms.
fn until_next(schedule: &Schedule, otherwise: Duration) -> Duration {
    let now = Utc::now();
    schedule
        .next_after(now)
        .map(|t| (t - now).to_std().unwrap_or_default())
        .unwrap_or(otherwise)
        .max(Duration::from_millis(10))
}

/// The deadline watchdog of `serve`: a round on every tick of `watchdog.schedule`.
async fn watchdog(engine: Arc<Tocsin>, schedule: Schedule, mut stop: tokio::sync::watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(until_next(&schedule, Duration::from_secs(60))) => {}
            _ = stop.changed() => break,
        }
        if let Err(e) = engine.watchdog_tick(Utc::now()).await {
            tracing::error!(error = %e, "the deadline watchdog's round failed");
        }
    }
}

/// Checks that `listen` is a loopback address.
pub fn loopback_addr(listen: &str) -> Result<SocketAddr, ServeError> {
    let addr: SocketAddr = listen.parse().map_err(|_| ServeError::BadAddress(listen.to_owned()))?;
    if addr.ip().is_loopback() {
        Ok(addr)
    } else {
        Err(ServeError::NotLoopback(listen.to_owned()))
    }
}

/// Serves the API, the bulletins and the worker until `shutdown` resolves.
pub async fn serve(
    engine: Arc<Tocsin>,
    listen: &str,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let addr = loopback_addr(listen)?;
    let schedule = Schedule::parse(&engine.settings.delivery.sweep_schedule)?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind {
            addr: listen.to_owned(),
            source,
        })?;
    let local = listener.local_addr()?;
    // Printed (not only logged) so a supervisor or test harness can find a port-0 server.
    println!("tocsin listening on http://{local}");
    tracing::info!(%local, "listening");
    let state = AppState::new(engine);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let watchdog_schedule = Schedule::parse(&state.engine.settings.watchdog.schedule)?;
    let watchdog_task = tokio::spawn(watchdog(state.engine.clone(), watchdog_schedule, stop_rx.clone()));
    let worker_task = tokio::spawn(worker(state.clone(), schedule, stop_rx));
    let app = router_with(state);
    // On the signal the workers stop claiming at once, while the server finishes its requests.
    let stopping = async move {
        shutdown.await;
        tracing::info!("stopping: no new deliveries are claimed; sends in flight finish");
        let _ = stop_tx.send(true);
    };
    // The peer's address reaches the handlers: the public lookup's rate limit is per client.
    let result = axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
        .with_graceful_shutdown(stopping)
        .await;
    let _ = worker_task.await;
    let _ = watchdog_task.await;
    tracing::info!("stopped");
    Ok(result?)
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_addresses_are_accepted() {
        assert!(loopback_addr("127.0.0.1:8080").is_ok());
        assert!(loopback_addr("[::1]:0").is_ok());
        assert!(matches!(loopback_addr("0.0.0.0:8080"), Err(ServeError::NotLoopback(_))));
        assert!(matches!(loopback_addr("localhost"), Err(ServeError::BadAddress(_))));
    }
}
