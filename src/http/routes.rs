//! The API's endpoints as one table: the router is built from it, the authorization layer
//! reads each endpoint's access from it, and the OpenAPI document is generated from it, so the
//! three cannot drift apart.

use axum::routing::{MethodRouter, get, post};
use serde_json::{Map, Value, json};

use super::*;
use crate::auth::Access;

/// One operation of the API.
pub struct Endpoint {
    pub method: &'static str,
    pub path: &'static str,
    pub access: Access,
    pub summary: &'static str,
    /// The JSON body's members (`name: what`), `None` for no body.
    pub body: Option<&'static [(&'static str, &'static str)]>,
    /// The query parameters (`name: what`).
    pub query: &'static [(&'static str, &'static str)],
    /// The success status.
    pub status: u16,
    /// The success answer's media type.
    pub produces: &'static str,
    pub(super) route: fn() -> MethodRouter<AppState>,
}

const NONE: &[(&str, &str)] = &[];
const PAGE: &[(&str, &str)] = &[
    ("after", "the last id of the previous page"),
    ("limit", "page size (default 100, at most 1000)"),
];
const DELIVERY_FILTER: &[(&str, &str)] = &[
    ("incident", "an incident id or reference"),
    ("channel", "email, sms, push"),
    ("provider", "a configured provider"),
    (
        "error_class",
        "transient, permanent, or a failure kind such as network or throttled",
    ),
];

macro_rules! endpoint {
    ($method:literal $path:literal, $access:ident, $status:literal, $route:expr, $summary:literal $(, body: $body:expr)? $(, query: $query:expr)? $(, produces: $produces:expr)?) => {
        Endpoint {
            method: $method,
            path: $path,
            access: Access::$access,
            summary: $summary,
            body: endpoint!(@body $($body)?),
            query: endpoint!(@query $($query)?),
            status: $status,
            produces: endpoint!(@produces $($produces)?),
            route: || $route,
        }
    };
    (@produces) => { "application/json" };
    (@produces $produces:expr) => { $produces };
    (@body) => { None };
    (@body $body:expr) => { Some($body) };
    (@query) => { NONE };
    (@query $query:expr) => { $query };
}

/// Every authenticated operation: the API under `/api/v1` and the metrics.
pub static API: &[Endpoint] = &[
    endpoint!("GET" "/metrics", Read, 200, get(metrics),
        "Prometheus metrics: deliveries by channel, provider and status, queue depth, clock slack, provider circuits, requests",
        produces: crate::metrics::CONTENT_TYPE),
    endpoint!("POST" "/api/v1/events", Respond, 202, post(post_events),
        "Ingest security events (Tocsin's format or OCSF 1.x Detection/Incident Findings): a token, or a source's signature",
        body: &[("(body)", "one event, an array, or JSON Lines")]),
    endpoint!("POST" "/api/v1/merchants", Respond, 200, post(import_merchants),
        "Import merchants (new ones added, known ones updated): JSON Lines, or CSV with Content-Type text/csv; rejected rows are listed, the others stored",
        body: &[("(body)", "JSON Lines or CSV, as merchants import reads")]),
    endpoint!("GET" "/api/v1/incidents", Read, 200, get(list_incidents), "List incidents", query: PAGE),
    endpoint!("GET" "/api/v1/incidents/{id}/events", Read, 200, get(incident_events),
        "The security events that opened or joined the incident"),
    endpoint!("GET" "/api/v1/incidents/{id}/lookups", Read, 200, get(list_lookups),
        "The bulletin's \"am I affected?\" lookups (outcome and a salted client hash; no personal data), newest first", query: PAGE),
    endpoint!("GET" "/api/v1/incidents/{id}/reminders", Read, 200, get(list_reminders),
        "Every watchdog reminder and escalation of the incident's clocks, and whether it went"),
    endpoint!("POST" "/api/v1/watchdog/tick", Admin, 200, post(watchdog_tick),
        "Run one watchdog round now (serve runs it on its schedule); now: as if it were then",
        body: &[("now", "optional RFC 3339 instant")]),
    endpoint!("GET" "/api/v1/deliveries/dead", Read, 200, get(dead_letters),
        "Dead letters (attempts used up) matching the filter, in id order",
        query: &[("incident", "an incident id or reference"), ("channel", "email, sms, push"), ("provider", "a configured provider"),
                 ("error_class", "transient, permanent, or a failure kind"), ("after", "the last id of the previous page"), ("limit", "page size (default 100, at most 1000)")]),
    endpoint!("POST" "/api/v1/deliveries/redrive", Respond, 200, post(redrive),
        "Put the matching dead letters back in the outbox with fresh attempts", body: DELIVERY_FILTER),
    endpoint!("GET" "/api/v1/deliveries/{id}", Read, 200, get(delivery_history), "A delivery and its attempts and receipts"),
    endpoint!("GET" "/api/v1/providers", Read, 200, get(list_providers),
        "The configured providers per channel in failover order, with their circuit breakers"),
    endpoint!("GET" "/api/v1/deadlines", Read, 200, get(list_deadlines),
        "Every regulator clock running (all: also filed and not started), soonest first",
        query: &[("incident", "an incident id or reference"), ("all", "true: every clock")]),
    endpoint!("GET" "/api/v1/incidents/{id}", Read, 200, get(get_incident),
        "An incident: timeline, scope, drafts, deliveries, bulletins, filings"),
    endpoint!("POST" "/api/v1/incidents/{id}/confirm", Respond, 200, post(confirm),
        "Confirm an incident with its facts", body: &[("facts", "the incident facts (config/schemas)")]),
    endpoint!("POST" "/api/v1/incidents/{id}/dismiss", Respond, 200, post(dismiss),
        "Dismiss an incident", body: &[("reason", "why")]),
    endpoint!("POST" "/api/v1/incidents/{id}/close", Respond, 200, post(close),
        "Close an incident whose deliveries are final (drafts the summary reports)", body: &[("reason", "optional")]),
    endpoint!("POST" "/api/v1/incidents/{id}/scope", Respond, 200, post(scope),
        "Scope the affected merchants", body: &[("rule", "the scope rule"), ("dry_run", "true: count only")]),
    endpoint!("POST" "/api/v1/incidents/{id}/draft", Respond, 200, post(draft),
        "Draft the notices (a new version is an update)", body: &[("changes", "for an update: {en, zh-CN}")]),
    endpoint!("POST" "/api/v1/incidents/{id}/amend", Respond, 200, post(amend),
        "Amend the facts", body: &[("facts", "the new facts"), ("reason", "why")]),
    endpoint!("POST" "/api/v1/incidents/{id}/grade", Respond, 200, post(grade),
        "Set the grade by hand", body: &[("grade", "general, significant, major, critical"), ("reason", "why")]),
    endpoint!("POST" "/api/v1/incidents/{id}/notice-decisions", Respond, 200, post(notice_decision),
        "Override whether one merchant is notified",
        body: &[("merchant_id", "the merchant"), ("required", "true or false"), ("reason", "why")]),
    endpoint!("POST" "/api/v1/incidents/{id}/approve", Approve, 200, post(approve),
        "Approve the drafted notices (refused for the drafter)"),
    endpoint!("POST" "/api/v1/incidents/{id}/dispatch", Respond, 202, post(dispatch),
        "Queue the approved notices; the worker delivers them"),
    endpoint!("POST" "/api/v1/incidents/{id}/bulletin", Respond, 200, post(bulletin),
        "Publish the public bulletin now"),
    endpoint!("GET" "/api/v1/incidents/{id}/filings", Read, 200, get(list_filings),
        "The incident's regulator reports"),
    endpoint!("POST" "/api/v1/incidents/{id}/filings", Respond, 200, post(draft_filings),
        "Draft the regulator reports owed now", body: &[("regulator", "optional profile id"), ("stage", "optional: initial, update, final")]),
    endpoint!("GET" "/api/v1/incidents/{id}/readiness", Read, 200, get(readiness),
        "Per regulator and stage, the required fields still missing"),
    endpoint!("GET" "/api/v1/incidents/{id}/notices", Read, 200, get(list_notices),
        "The notices of the latest version, by merchant", query: PAGE),
    endpoint!("GET" "/api/v1/incidents/{id}/deliveries", Read, 200, get(list_deliveries),
        "The incident's deliveries, in id order", query: PAGE),
    endpoint!("GET" "/api/v1/incidents/{id}/affected", Read, 200, get(list_affected),
        "The affected merchants with exposure, risk and notice decision",
        query: &[("after", "the last merchant id of the previous page"), ("limit", "page size"), ("notice_required", "true or false")]),
    endpoint!("GET" "/api/v1/incidents/{id}/preview/{merchant}", Read, 200, get(preview),
        "One merchant's notice on every channel and in every language", query: &[("version", "a draft version")]),
    endpoint!("GET" "/api/v1/incidents/{id}/diff/{merchant}", Read, 200, get(diff),
        "What changed for one merchant between two versions", query: &[("from", "version"), ("to", "version")]),
    endpoint!("GET" "/api/v1/notices/{id}", Read, 200, get(get_notice), "A notice's sections and renderings"),
    endpoint!("GET" "/api/v1/filings/{id}", Read, 200, get(get_filing),
        "One regulator report: its items and every submission attempt"),
    endpoint!("POST" "/api/v1/filings/{id}/fields", Respond, 200, post(write_filing_field),
        "Write a field of a draft report", body: &[("field", "the field"), ("text", "its text; empty removes it")]),
    endpoint!("POST" "/api/v1/filings/{id}/approve", Approve, 200, post(approve_filing),
        "Approve a complete report (refused for its authors)"),
    endpoint!("POST" "/api/v1/filings/{id}/submit", Respond, 200, post(submit_filing),
        "Submit an approved report by its regulator's method"),
    endpoint!("POST" "/api/v1/filings/{id}/reference", Respond, 200, post(filing_reference),
        "Record the reference number of a report filed on a portal",
        body: &[("reference", "the regulator's reference"), ("filed_at", "optional RFC 3339 instant")]),
    endpoint!("POST" "/api/v1/filings/{id}/acknowledgement", Respond, 200, post(acknowledge_filing),
        "Record the regulator's acknowledgement", body: &[("reference", "optional"), ("note", "optional")]),
    endpoint!("GET" "/api/v1/tokens", Admin, 200, get(list_tokens), "List API tokens (never their secrets)", query: PAGE),
    endpoint!("POST" "/api/v1/tokens", Admin, 201, post(create_token),
        "Create an API token; the answer holds it, once",
        body: &[("actor", "who the token acts as"), ("role", "responder, approver, auditor or admin"), ("expires_at", "optional RFC 3339 instant")]),
    endpoint!("POST" "/api/v1/tokens/{id}/revoke", Admin, 200, post(revoke_token), "Revoke an API token"),
    endpoint!("POST" "/api/v1/incidents/{id}/evidence", Audit, 200, post(export_evidence),
        "Export the incident's evidence package as a tar archive (also kept in the data directory): notices with content hashes, deliveries CSV, bulletins and coverage, filings, ledger extract, manifest and SHA256SUMS",
        produces: "application/x-tar"),
    endpoint!("GET" "/api/v1/audit/verify", Audit, 200, get(verify_ledger),
        "Walk the audit ledger's hash chain; the first broken link if any",
        query: &[("anchor", "ENTRY:HASH recorded earlier: the ledger must still hold it")]),
];

/// The endpoint a request matched (its route template, as axum's `MatchedPath` gives it).
pub fn endpoint(method: &axum::http::Method, matched: &str) -> Option<&'static Endpoint> {
    API.iter().find(|e| e.path == matched && e.method == method.as_str())
}

/// The API router: every endpoint of [`API`] (two methods on one path are merged).
pub fn api_router() -> axum::Router<AppState> {
    API.iter()
        .fold(axum::Router::new(), |router, e| router.route(e.path, (e.route)()))
}

/// The OpenAPI 3.1 document of [`API`]: operations, parameters, bodies, the roles each needs
/// (`x-roles`), bearer authentication, and problem documents for errors.
pub fn openapi() -> Value {
    let mut paths = Map::new();
    for e in API {
        let mut parameters: Vec<Value> = e
            .path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .map(|name| json!({ "name": name, "in": "path", "required": true, "schema": { "type": "string" } }))
            .collect();
        parameters.extend(e.query.iter().map(|(name, what)| {
            json!({ "name": name, "in": "query", "required": false, "description": what, "schema": { "type": "string" } })
        }));
        let mut op = json!({
            "operationId": format!("{}_{}", e.method.to_lowercase(), e.path.trim_start_matches("/api/v1/").trim_start_matches('/').replace(['/', '{', '}', '-'], "_")),
            "summary": e.summary,
            "parameters": parameters,
            "security": [{ "bearer": [] }],
            "x-roles": e.access.roles().iter().map(|r| r.as_str()).collect::<Vec<_>>(),
            "responses": {
                e.status.to_string(): { "description": "success", "content": { e.produces: { "schema": {} } } },
                "400": { "$ref": "#/components/responses/Problem" },
                "401": { "$ref": "#/components/responses/Problem" },
                "403": { "$ref": "#/components/responses/Problem" },
                "404": { "$ref": "#/components/responses/Problem" },
                "409": { "$ref": "#/components/responses/Problem" },
                "413": { "$ref": "#/components/responses/Problem" },
                "422": { "$ref": "#/components/responses/Problem" },
            },
        });
        if let Some(members) = e.body {
            let properties: Map<String, Value> = members
                .iter()
                .filter(|(name, _)| !name.starts_with('('))
                .map(|(name, what)| (name.to_string(), json!({ "description": what })))
                .collect();
            op["requestBody"] = json!({
                "required": true,
                "content": { "application/json": { "schema": { "type": "object", "properties": properties } } },
            });
        }
        if e.path == "/api/v1/events" {
            op["security"] = json!([{ "bearer": [] }, { "source_signature": [] }]);
        }
        let path = paths.entry(e.path.to_owned()).or_insert_with(|| json!({}));
        path[e.method.to_lowercase()] = op;
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "Tocsin",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Incident notification: events, incidents, notices, deliveries, bulletins, regulator filings. Errors are RFC 9457 problem documents naming the field.",
        },
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearer": { "type": "http", "scheme": "bearer", "description": "A token from `tocsin tokens create`" },
                "source_signature": { "type": "apiKey", "in": "header", "name": "X-Tocsin-Signature",
                    "description": "v1=<hex HMAC-SHA256(secret, \"{X-Tocsin-Timestamp}.{body}\")> with X-Tocsin-Source naming a [sources] entry" },
            },
            "responses": {
                "Problem": {
                    "description": "An RFC 9457 problem document",
                    "content": { "application/problem+json": { "schema": {
                        "type": "object",
                        "properties": {
                            "type": { "type": "string" }, "title": { "type": "string" }, "status": { "type": "integer" },
                            "detail": { "type": "string" }, "field": { "type": "string" },
                        },
                    } } },
                },
            },
        },
    })
}
