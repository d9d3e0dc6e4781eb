-- API tokens: only a SHA-256 hash of each token is kept (a token is 256 random bits, so a
-- fast hash is enough and the token cannot be recovered from the database). A token acts as
-- one actor with one role; revoking it keeps the row, for the audit trail.
CREATE TABLE api_tokens (
    id          TEXT PRIMARY KEY,
    hash        TEXT NOT NULL UNIQUE,
    actor       TEXT NOT NULL,
    role        TEXT NOT NULL,      -- responder | approver | auditor | admin
    created_at  TEXT NOT NULL,
    created_by  TEXT NOT NULL,
    expires_at  TEXT,
    revoked_at  TEXT,
    revoked_by  TEXT
);
