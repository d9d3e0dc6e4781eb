-- The delivery engine: providers, limits shared through the store, receipts, dead letters.
--
-- Why: "accepted by the provider" and "delivered" are different facts a regulator may ask
-- about; several instances sharing one database must respect a provider's limits together;
-- and every attempt and receipt is evidence of what was done for each merchant.

-- 'sent' meant "accepted by the provider"; it is now called that, and 'delivered' is what a
-- receipt confirms.
UPDATE deliveries SET status = 'accepted' WHERE status = 'sent';

ALTER TABLE deliveries ADD COLUMN provider TEXT;        -- the provider of the latest attempt
ALTER TABLE deliveries ADD COLUMN error_kind TEXT;      -- network, throttled, rejected, bounced ...
ALTER TABLE deliveries ADD COLUMN delivered_at TEXT;    -- when a receipt confirmed delivery
ALTER TABLE deliveries ADD COLUMN receipt_due_at TEXT;  -- accepted, waiting for a receipt until
ALTER TABLE deliveries ADD COLUMN receipt_detail TEXT;  -- the provider's last status words
ALTER TABLE deliveries ADD COLUMN claim_id TEXT;        -- the claim that holds a 'sending' row

-- Claims read only rows waiting to go; partial indexes keep them small and leave the rows
-- already sent (most of a large outbox) out of every status change.
DROP INDEX deliveries_due;
CREATE INDEX deliveries_pending ON deliveries (channel, next_attempt_at) WHERE status = 'pending';
CREATE INDEX deliveries_in_flight ON deliveries (provider, lease_until) WHERE status = 'sending';
CREATE INDEX deliveries_awaiting_receipt ON deliveries (receipt_due_at) WHERE receipt_due_at IS NOT NULL;
CREATE INDEX deliveries_by_provider_message ON deliveries (provider_message_id) WHERE provider_message_id IS NOT NULL;
CREATE INDEX deliveries_dead ON deliveries (incident_id) WHERE status = 'dead';

-- Every attempt and every receipt, in order: the per-merchant delivery ledger.
CREATE TABLE delivery_events (
    delivery_id TEXT NOT NULL,
    at          TEXT NOT NULL,
    event       TEXT NOT NULL,   -- attempt | receipt | receipt_timeout | redrive
    attempt     INTEGER NOT NULL,
    provider    TEXT,
    outcome     TEXT NOT NULL,   -- accepted | retry | failed | dead | delivered | in_progress | pending
    error_kind  TEXT,
    detail      TEXT             -- status codes and provider words, never an address
);
CREATE INDEX delivery_events_by_delivery ON delivery_events (delivery_id);

-- Token buckets and sliding windows of each provider, shared by every instance.
CREATE TABLE provider_limits (
    provider     TEXT PRIMARY KEY,
    tokens       REAL NOT NULL,
    refreshed_at TEXT NOT NULL
);
CREATE TABLE provider_window (
    provider TEXT NOT NULL,
    slot     INTEGER NOT NULL,   -- unix time divided by the slot length
    sent     INTEGER NOT NULL,
    PRIMARY KEY (provider, slot)
) WITHOUT ROWID;

-- Circuit breakers: a provider that keeps failing is skipped until open_until.
CREATE TABLE provider_health (
    provider             TEXT PRIMARY KEY,
    consecutive_failures INTEGER NOT NULL,
    open_until           TEXT,
    last_failure_at      TEXT,
    last_error_kind      TEXT,
    updated_at           TEXT NOT NULL
);
