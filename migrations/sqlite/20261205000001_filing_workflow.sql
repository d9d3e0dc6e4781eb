-- Regulator filings become a workflow: drafted (possibly incomplete), approved by a second
-- person, submitted by the profile's method (email, HTTPS, or a document a person files on a
-- portal, followed by the reference number), acknowledged.
--
-- Why a rebuilt table: a report stage without a fixed clock (GDPR's phased information, the
-- CAC's updates) has no deadline, and SQLite cannot drop NOT NULL from a column.
CREATE TABLE filings_new (
    id            TEXT PRIMARY KEY,
    incident_id   TEXT NOT NULL REFERENCES incidents (id),
    regulator     TEXT NOT NULL,
    stage         TEXT NOT NULL,
    content       TEXT NOT NULL,               -- JSON: the items as drafted, the fields missing
    content_hash  TEXT NOT NULL,
    deadline_at   TEXT,                        -- NULL: the stage has no fixed clock
    created_at    TEXT NOT NULL,
    submitted_at  TEXT,                        -- when the regulator had it (the clock stops)
    claimed_until TEXT,                        -- a submission in progress (lease)
    transport     TEXT NOT NULL,               -- email | https | portal
    location      TEXT,                        -- where it went: address, endpoint, document
    authors       TEXT NOT NULL DEFAULT '[]',  -- JSON: every actor who drafted or wrote into it
    written       TEXT NOT NULL DEFAULT '{}',  -- JSON: fields a responder wrote, by field name
    approved_by   TEXT,
    approved_at   TEXT,
    document_at   TEXT,                        -- portal: when the document was produced
    reference_number TEXT,                     -- the regulator's reference for it
    acknowledged_at  TEXT,
    acknowledgement  TEXT,                     -- what the regulator answered (or a note)
    last_error    TEXT,                        -- the last submission attempt's failure
    UNIQUE (incident_id, regulator, stage)
);

INSERT INTO filings_new (id, incident_id, regulator, stage, content, content_hash, deadline_at,
                         created_at, submitted_at, claimed_until, transport, location, authors)
SELECT f.id, f.incident_id, f.regulator, f.stage, f.content, f.content_hash, f.deadline_at,
       f.created_at, f.submitted_at, f.claimed_until, f.transport, f.location,
       COALESCE((SELECT json_array(l.actor) FROM ledger l
                 WHERE l.action = 'filing.drafted' AND json_extract(l.detail, '$.filing_id') = f.id
                 ORDER BY l.seq LIMIT 1), '[]')
FROM filings f;

DROP TABLE filings;
ALTER TABLE filings_new RENAME TO filings;

-- Every submission attempt of a filing and what came back: the evidence of how and when each
-- report reached (or failed to reach) its regulator.
CREATE TABLE filing_submissions (
    seq        INTEGER PRIMARY KEY,
    filing_id  TEXT NOT NULL REFERENCES filings (id),
    at         TEXT NOT NULL,
    actor      TEXT NOT NULL,
    method     TEXT NOT NULL,     -- email | https | portal | reference | acknowledgement
    target     TEXT NOT NULL,     -- the address, endpoint or document path
    outcome    TEXT NOT NULL,     -- sent | document | failed | recorded
    detail     TEXT NOT NULL      -- Message-ID, HTTP status and reply, error, reference
);
CREATE INDEX filing_submissions_by_filing ON filing_submissions (filing_id, seq);
