-- no-transaction
-- Scope classes, frozen drafts and notices that are reproduced rather than copied.
--
-- Why: a cohort of a million merchants shares a handful of classifications and notice
-- variants. Storing each merchant's reasons and each rendered notice in full made the store
-- grow by kilobytes per merchant; now a merchant row points at its class, a draft freezes
-- its inputs (facts, settings, classes, the template set) once, and each delivery records the
-- hash of the exact text it sent, which can be reproduced from those inputs.
--
-- Tables are rebuilt, which SQLite only allows with foreign keys off and outside the
-- migrator's transaction (hence `no-transaction` and the explicit BEGIN/COMMIT).
PRAGMA foreign_keys = OFF;
BEGIN IMMEDIATE;

ALTER TABLE merchants ADD COLUMN last_active_at TEXT;
-- JSON: the natural persons whose data the platform holds for this merchant, by opaque key
-- ({"representative": key?, "contacts": [key], "sub_accounts": [key]}); counted for grading.
ALTER TABLE merchants ADD COLUMN people TEXT NOT NULL DEFAULT '{}';

-- Scoping groups the directory by holdings; the index answers that without reading the table.
CREATE INDEX merchants_by_holdings ON merchants (holdings);

-- JSON GradeSuggestion: the natural persons counted at scoping and the grade they suggest.
ALTER TABLE incidents ADD COLUMN grade_suggestion TEXT;
-- The scope's rows are one contiguous run of `affected_merchants.seq`: reading them by range is
-- a sequential scan.
ALTER TABLE incidents ADD COLUMN scope_seq_from INTEGER;
ALTER TABLE incidents ADD COLUMN scope_seq_to INTEGER;
-- JSON: the exposed categories, kind and mitigations the scope's classes were computed from;
-- drafting compares it with the facts so that a notice never describes a stale classification.
ALTER TABLE incidents ADD COLUMN scope_basis TEXT;

CREATE TABLE scope_classes (
    incident_id     TEXT NOT NULL REFERENCES incidents (id),
    class_no        INTEGER NOT NULL,
    exposed         TEXT NOT NULL,            -- JSON array of category ids
    risk            TEXT NOT NULL,
    risk_reasons    TEXT NOT NULL,            -- JSON array of sentences
    notice_required INTEGER NOT NULL,
    notice_reason   TEXT NOT NULL,
    merchants       INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (incident_id, class_no)
);

-- One row per affected merchant, pointing at its class. `seq` orders the rows as they were
-- scoped (merchant id order) and makes the ids of notices and first deliveries, which are
-- derived from it, sequential: a million of them insert in order instead of at random.
-- No foreign key on incident_id here or in deliveries: a key check per row doubles the cost of
-- inserting a million-merchant scope, and both are only ever written by the store for an
-- incident (and draft) it has just read.
CREATE TABLE affected_merchants_v2 (
    seq             INTEGER PRIMARY KEY,
    incident_id     TEXT NOT NULL,
    merchant_id     TEXT NOT NULL,
    class_no        INTEGER NOT NULL,
    locale          TEXT NOT NULL,
    region          TEXT NOT NULL,
    channel_plan    TEXT NOT NULL,            -- channels in order, comma separated
    first_address   TEXT,                     -- the address on the plan's first channel, when scoped
    merchant_name   TEXT NOT NULL,            -- as addressed when scoped
    merchant_kind   TEXT NOT NULL,
    link_secret     TEXT NOT NULL,            -- random part of the merchant's notice-page link
    reachability    TEXT NOT NULL,
    reached_channel TEXT,
    UNIQUE (incident_id, merchant_id)
);

INSERT INTO scope_classes (incident_id, class_no, exposed, risk, risk_reasons, notice_required, notice_reason, merchants)
    SELECT incident_id, rowid, exposed, risk, risk_reasons, notice_required, notice_reason, 1 FROM affected_merchants;
INSERT INTO affected_merchants_v2 (incident_id, merchant_id, class_no, locale, region, channel_plan, first_address,
                                   merchant_name, merchant_kind, link_secret, reachability, reached_channel)
    SELECT a.incident_id, a.merchant_id, a.rowid, a.locale, COALESCE(m.region, ''),
           replace(replace(replace(a.channel_plan, '[', ''), ']', ''), '"', ''),
           CASE json_extract(a.channel_plan, '$[0]') WHEN 'email' THEN m.email WHEN 'sms' THEN m.phone
                                                     WHEN 'push' THEN m.push_token END,
           COALESCE(m.name, ''), COALESCE(m.kind, 'enterprise'), lower(hex(randomblob(5))),
           a.reachability, a.reached_channel
    FROM affected_merchants a LEFT JOIN merchants m ON m.id = a.merchant_id ORDER BY a.incident_id, a.merchant_id;
DROP TABLE affected_merchants;
ALTER TABLE affected_merchants_v2 RENAME TO affected_merchants;

-- How an incident's affected merchants group (class, language, region, first channel), counted
-- when scoping: drafting finds its notice variants here instead of re-reading every row.
CREATE TABLE scope_groups (
    incident_id   TEXT NOT NULL REFERENCES incidents (id),
    class_no      INTEGER NOT NULL,
    locale        TEXT NOT NULL,
    region        TEXT NOT NULL,
    first_channel TEXT NOT NULL,              -- '' when the merchant has no channel
    merchants     INTEGER NOT NULL,
    PRIMARY KEY (incident_id, class_no, locale, region, first_channel)
);
INSERT INTO scope_groups (incident_id, class_no, locale, region, first_channel, merchants)
    SELECT incident_id, class_no, locale, region,
           CASE WHEN instr(channel_plan, ',') > 0 THEN substr(channel_plan, 1, instr(channel_plan, ',') - 1)
                ELSE channel_plan END, COUNT(*)
    FROM affected_merchants GROUP BY 1, 2, 3, 4, 5;
UPDATE incidents SET
    scope_seq_from = (SELECT MIN(seq) FROM affected_merchants a WHERE a.incident_id = incidents.id),
    scope_seq_to = (SELECT MAX(seq) FROM affected_merchants a WHERE a.incident_id = incidents.id);

-- A responder's decision that overrides whether one merchant must be notified. Kept apart
-- from the scope so that re-scoping does not lose it.
CREATE TABLE notice_overrides (
    incident_id TEXT NOT NULL REFERENCES incidents (id),
    merchant_id TEXT NOT NULL,
    required    INTEGER NOT NULL,
    reason      TEXT NOT NULL,
    actor       TEXT NOT NULL,
    at          TEXT NOT NULL,
    PRIMARY KEY (incident_id, merchant_id)
);

-- Template sources by content hash, stored once and shared by every draft rendered from them.
CREATE TABLE template_sets (
    hash    TEXT PRIMARY KEY,
    sources TEXT NOT NULL                     -- JSON object: template name -> source
);

-- JSON DraftInputs: everything a notice of this version is rendered from, frozen.
ALTER TABLE drafts ADD COLUMN inputs TEXT;
ALTER TABLE drafts ADD COLUMN notice_count INTEGER NOT NULL DEFAULT 0;

CREATE TABLE draft_variants (
    draft_id    TEXT NOT NULL REFERENCES drafts (id),
    variant_no  INTEGER NOT NULL,
    class_no    INTEGER NOT NULL,
    locale      TEXT NOT NULL,
    profiles    TEXT NOT NULL,                -- the legal profiles checked, e.g. platform+cn-pipl-57
    merchants   INTEGER NOT NULL,
    sample_hash TEXT NOT NULL,                -- hash of the sample rendering that was checked
    PRIMARY KEY (draft_id, variant_no)
);

-- Notices drafted from now on are not stored one by one: a notice is its draft's frozen inputs
-- applied to one affected merchant, and its id is derived from the draft id and the merchant's
-- scope row. `notices` keeps the notices of the first schema, rendered in full. Deliveries lose
-- their foreign key to it (rebuilt below) and gain the hash of what they sent.
CREATE TABLE deliveries_v2 (
    id                  TEXT PRIMARY KEY,
    idempotency_key     TEXT NOT NULL UNIQUE,
    incident_id         TEXT NOT NULL,
    draft_id            TEXT NOT NULL,
    notice_id           TEXT NOT NULL,
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
    content_hash        TEXT,                 -- hash of the exact text sent
    created_at          TEXT NOT NULL,
    updated_at          TEXT NOT NULL,
    sent_at             TEXT
) WITHOUT ROWID;                              -- the id is the key: one b-tree less to write per row
INSERT INTO deliveries_v2 (id, idempotency_key, incident_id, draft_id, notice_id, merchant_id, channel, address,
                           plan_position, status, attempts, next_attempt_at, lease_until, last_error, error_class,
                           provider_message_id, content_hash, created_at, updated_at, sent_at)
    SELECT d.id, d.idempotency_key, d.incident_id, d.draft_id, d.notice_id, d.merchant_id, d.channel, d.address,
           d.plan_position, d.status, d.attempts, d.next_attempt_at, d.lease_until, d.last_error, d.error_class,
           d.provider_message_id, n.content_hash, d.created_at, d.updated_at, d.sent_at
    FROM deliveries d LEFT JOIN notices n ON n.id = d.notice_id;
DROP TABLE deliveries;
ALTER TABLE deliveries_v2 RENAME TO deliveries;
CREATE INDEX deliveries_due ON deliveries (status, next_attempt_at);
CREATE INDEX deliveries_by_incident ON deliveries (incident_id, merchant_id);

COMMIT;
PRAGMA foreign_keys = ON;
