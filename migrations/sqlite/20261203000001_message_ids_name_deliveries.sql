-- A notice's Message-ID now names its delivery (`dlv_<id>.<hash of the key>@domain`), so a
-- bounce finds its delivery by the delivery's own id. Indexing those ids, random in order,
-- cost more than anything else in recording a send (a B-tree insert on a random page per
-- message); only ids a provider chose, and Message-IDs of the earlier form, are indexed now.
DROP INDEX deliveries_by_provider_message;
CREATE INDEX deliveries_by_provider_message ON deliveries (provider_message_id)
    WHERE provider_message_id IS NOT NULL AND substr(provider_message_id, 1, 4) <> 'dlv_';
