-- 0015: an Idempotency-Key names one request, not just one result (issue 17). A retry with the
-- same key and the same body answers the first run; the same key with a different body was
-- answered with the first run too, silently dropping what the caller asked for. The run (and
-- the orchestration) now keeps a fingerprint of the request it was created for: the sha256 of
-- its canonical JSON (orchestrator/engine/runs.py request_fingerprint); a reuse with another
-- fingerprint is refused (422). Rows created before this migration have none and are answered
-- as before.

ALTER TABLE runs ADD COLUMN request_sha256 text;
ALTER TABLE orchestrations ADD COLUMN request_sha256 text;
