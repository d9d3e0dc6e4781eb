-- The watchdog's reminders and escalations: one row per regulator clock (incident, regulator,
-- stage, deadline), point ('before:2h', 'overdue') and recipient, stored before it is sent and
-- marked sent after. A point passed together with a nearer one is kept as 'skipped' (with no
-- recipient) so that it is never sent late.
--
-- Why: a reminder must survive a restart without being lost or sent twice; the row is the
-- promise to send it and its key is the idempotency key the transports carry.
CREATE TABLE clock_reminders (
    incident_id TEXT NOT NULL,
    regulator   TEXT NOT NULL,
    stage       TEXT NOT NULL,
    due_at      TEXT NOT NULL,
    point       TEXT NOT NULL,
    recipient   TEXT NOT NULL,    -- a responder's email address or phone number ('' if skipped)
    channel     TEXT NOT NULL,    -- email | sms ('' if skipped)
    text        TEXT NOT NULL,
    status      TEXT NOT NULL,    -- pending | sent | skipped
    attempts    INTEGER NOT NULL DEFAULT 0,
    last_error  TEXT,
    created_at  TEXT NOT NULL,
    sent_at     TEXT,
    PRIMARY KEY (incident_id, regulator, stage, due_at, point, recipient)
) WITHOUT ROWID;
CREATE INDEX clock_reminders_pending ON clock_reminders (created_at) WHERE status = 'pending';

-- The public "am I affected?" lookup: every lookup, without personal data (the client is a
-- salted hash of its address; the merchant id and the second factor are not kept). The same
-- rows count a client's lookups for its rate limit.
CREATE TABLE lookups (
    at         TEXT NOT NULL,
    reference  TEXT NOT NULL,
    client     TEXT NOT NULL,
    outcome    TEXT NOT NULL     -- affected | not_affected | unverified | limited
);
CREATE INDEX lookups_by_client ON lookups (client, at);
CREATE INDEX lookups_by_reference ON lookups (reference, at);

-- Secrets the database keeps for itself: the salt of the lookup's client hashes (random per
-- installation, so a hash cannot be matched to an address by hashing guesses elsewhere).
CREATE TABLE local_secrets (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
INSERT INTO local_secrets (name, value) VALUES ('lookup_salt', lower(hex(randomblob(32))));

-- When each bulletin version reached the external status page (NULL: not yet, or none is
-- configured): a version is stored before it is pushed, and pushed again until it is taken.
ALTER TABLE bulletins ADD COLUMN status_pushed_at TEXT;
