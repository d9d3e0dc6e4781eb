-- Tocsin schema, SQLite. Times are UTC RFC 3339 text with a fixed width, so they sort as text.
-- JSON columns hold lists and documents the stages read whole.

CREATE TABLE merchants (
    id                TEXT PRIMARY KEY,
    name              TEXT NOT NULL,
    kind              TEXT NOT NULL,
    locale            TEXT NOT NULL,
    region            TEXT NOT NULL,
    email             TEXT,
    phone             TEXT,
    push_token        TEXT,
    postal_address    TEXT,
    holdings          TEXT NOT NULL,          -- JSON array of category ids
    created_at        TEXT,
    marketing_opt_out INTEGER NOT NULL DEFAULT 0,
    imported_at       TEXT NOT NULL,
    updated_at        TEXT NOT NULL
);

CREATE TABLE incidents (
    id              TEXT PRIMARY KEY,
    reference       TEXT NOT NULL UNIQUE,
    state           TEXT NOT NULL,
    title           TEXT NOT NULL,
    kind            TEXT NOT NULL,
    severity        TEXT NOT NULL,
    correlation_key TEXT,
    facts           TEXT,                     -- JSON IncidentFacts once confirmed
    scope_rule      TEXT,                     -- JSON ScopeRule once scoped
    detected_at     TEXT NOT NULL,            -- earliest detection among its events
    opened_at       TEXT NOT NULL,
    updated_at      TEXT NOT NULL
);
-- At most one open incident per correlation key: concurrent events cannot open two.
CREATE UNIQUE INDEX incidents_open_by_key ON incidents (correlation_key)
    WHERE correlation_key IS NOT NULL AND state NOT IN ('closed', 'dismissed');

CREATE TABLE events (
    id          TEXT PRIMARY KEY,
    source      TEXT NOT NULL,
    external_id TEXT NOT NULL,
    incident_id TEXT NOT NULL REFERENCES incidents (id),
    kind        TEXT NOT NULL,
    severity    TEXT NOT NULL,
    title       TEXT NOT NULL,
    body        TEXT NOT NULL,                -- the parsed event as JSON
    detected_at TEXT NOT NULL,
    received_at TEXT NOT NULL,
    UNIQUE (source, external_id)
);
CREATE INDEX events_by_incident ON events (incident_id);

CREATE TABLE incident_transitions (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    incident_id TEXT NOT NULL REFERENCES incidents (id),
    from_state  TEXT,
    to_state    TEXT NOT NULL,
    actor       TEXT NOT NULL,
    reason      TEXT NOT NULL,
    at          TEXT NOT NULL
);
CREATE INDEX transitions_by_incident ON incident_transitions (incident_id, seq);

CREATE TABLE affected_merchants (
    incident_id      TEXT NOT NULL REFERENCES incidents (id),
    merchant_id      TEXT NOT NULL,
    exposed          TEXT NOT NULL,           -- JSON array of category ids
    risk             TEXT NOT NULL,
    risk_reasons     TEXT NOT NULL,           -- JSON array of sentences
    notice_required  INTEGER NOT NULL,
    notice_reason    TEXT NOT NULL,
    channel_plan     TEXT NOT NULL,           -- JSON array of channels, in order
    locale           TEXT NOT NULL,
    reachability     TEXT NOT NULL,
    reached_channel  TEXT,
    PRIMARY KEY (incident_id, merchant_id)
);

CREATE TABLE drafts (
    id           TEXT PRIMARY KEY,
    incident_id  TEXT NOT NULL REFERENCES incidents (id),
    version      INTEGER NOT NULL,
    state        TEXT NOT NULL,
    content_hash TEXT NOT NULL,
    drafted_by   TEXT NOT NULL,
    drafted_at   TEXT NOT NULL,
    approved_by  TEXT,
    approved_at  TEXT,
    UNIQUE (incident_id, version)
);

CREATE TABLE notices (
    id            TEXT PRIMARY KEY,
    draft_id      TEXT NOT NULL REFERENCES drafts (id),
    merchant_id   TEXT NOT NULL,
    locale        TEXT NOT NULL,
    sections      TEXT NOT NULL,              -- JSON NoticeSections
    email_subject TEXT NOT NULL,
    email_text    TEXT NOT NULL,
    email_html    TEXT NOT NULL,
    sms_text      TEXT NOT NULL,
    push_title    TEXT NOT NULL,
    push_body     TEXT NOT NULL,
    content_hash  TEXT NOT NULL,
    UNIQUE (draft_id, merchant_id)
);

CREATE TABLE deliveries (
    id                  TEXT PRIMARY KEY,
    idempotency_key     TEXT NOT NULL UNIQUE,
    incident_id         TEXT NOT NULL REFERENCES incidents (id),
    draft_id            TEXT NOT NULL REFERENCES drafts (id),
    notice_id           TEXT NOT NULL REFERENCES notices (id),
    merchant_id         TEXT NOT NULL,
    channel             TEXT NOT NULL,
    address             TEXT NOT NULL,
    plan_position       INTEGER NOT NULL,
    status              TEXT NOT NULL,
    attempts            INTEGER NOT NULL DEFAULT 0,
    next_attempt_at     TEXT NOT NULL,
    lease_until         TEXT,
    last_error          TEXT,
    error_class         TEXT,
    provider_message_id TEXT,
    created_at          TEXT NOT NULL,
    updated_at          TEXT NOT NULL,
    sent_at             TEXT
);
CREATE INDEX deliveries_due ON deliveries (status, next_attempt_at);
CREATE INDEX deliveries_by_incident ON deliveries (incident_id, merchant_id);

CREATE TABLE bulletins (
    id           TEXT PRIMARY KEY,
    incident_id  TEXT NOT NULL REFERENCES incidents (id),
    version      INTEGER NOT NULL,
    reason       TEXT NOT NULL,
    summary      TEXT NOT NULL,
    content_hash TEXT NOT NULL,
    published_at TEXT NOT NULL,
    UNIQUE (incident_id, version)
);

CREATE TABLE bulletin_coverage (
    bulletin_id TEXT NOT NULL REFERENCES bulletins (id),
    merchant_id TEXT NOT NULL,
    PRIMARY KEY (bulletin_id, merchant_id)
);

CREATE TABLE filings (
    id           TEXT PRIMARY KEY,
    incident_id  TEXT NOT NULL REFERENCES incidents (id),
    regulator    TEXT NOT NULL,
    stage        TEXT NOT NULL,
    content      TEXT NOT NULL,               -- JSON: the items as filed
    content_hash TEXT NOT NULL,
    deadline_at  TEXT NOT NULL,
    created_at   TEXT NOT NULL,
    submitted_at TEXT,
    claimed_until TEXT,                       -- a submission in progress (lease), see store
    transport    TEXT NOT NULL,
    location     TEXT,
    UNIQUE (incident_id, regulator, stage)
);

-- Append-only, hash-chained audit ledger.
CREATE TABLE ledger (
    seq         INTEGER PRIMARY KEY,
    at          TEXT NOT NULL,
    actor       TEXT NOT NULL,
    action      TEXT NOT NULL,
    incident_id TEXT,
    detail      TEXT NOT NULL,
    prev_hash   TEXT NOT NULL,
    hash        TEXT NOT NULL UNIQUE
);
CREATE INDEX ledger_by_incident ON ledger (incident_id, seq);
CREATE TRIGGER ledger_no_update BEFORE UPDATE ON ledger
BEGIN SELECT RAISE(ABORT, 'the audit ledger is append-only'); END;
CREATE TRIGGER ledger_no_delete BEFORE DELETE ON ledger
BEGIN SELECT RAISE(ABORT, 'the audit ledger is append-only'); END;
