-- The trace context (a W3C traceparent/tracestate carrier, as JSON) of the input that wrote
-- an effect or timer, so the relay's publish and the Celery task continue that input's
-- OpenTelemetry trace. NULL when the writer had no trace (or no opentelemetry-api).
-- Additive: the Rust engine neither reads nor writes it.
ALTER TABLE ironflow.outbox ADD COLUMN IF NOT EXISTS celery_trace_context text;
ALTER TABLE ironflow.timers ADD COLUMN IF NOT EXISTS celery_trace_context text;
