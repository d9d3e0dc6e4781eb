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
