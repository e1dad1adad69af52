-- ironflow_celery: the ironflow schema and a uuidv7() for servers older than PostgreSQL 18.
-- PostgreSQL 18 has a built-in pg_catalog.uuidv7(); on 15-17 we create ironflow.uuidv7(),
-- a time-ordered v7 UUID (48-bit Unix milliseconds, version 7, RFC 9562 variant), so the
-- column defaults of migration 0001 resolve on every supported server.
CREATE SCHEMA IF NOT EXISTS ironflow;

DO $$
BEGIN
    IF NOT EXISTS (
        SELECT 1 FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE n.nspname = 'pg_catalog' AND p.proname = 'uuidv7' AND p.pronargs = 0
    ) THEN
        -- Strictly ascending within a session, like PostgreSQL 18's: 48 bits of Unix
        -- milliseconds, then a 12-bit sub-millisecond fraction bumped by one when the clock
        -- has not moved, so rows inserted by one statement keep their insertion order
        -- (claims break created_at ties on id).
        CREATE OR REPLACE FUNCTION ironflow.uuidv7() RETURNS uuid
        LANGUAGE plpgsql VOLATILE AS $fn$
        DECLARE
            ts bigint := floor(extract(epoch FROM clock_timestamp()) * 4096000)::bigint;
            prev bigint := coalesce(
                nullif(current_setting('ironflow.uuidv7_last', true), ''), '0')::bigint;
            bytes bytea := uuid_send(gen_random_uuid());
        BEGIN
            IF ts <= prev THEN
                ts := prev + 1;
            END IF;
            PERFORM set_config('ironflow.uuidv7_last', ts::text, false);
            bytes := overlay(bytes PLACING substring(int8send(ts >> 12) FROM 3) FROM 1 FOR 6);
            bytes := set_byte(bytes, 6, (112 | ((ts >> 8) & 15))::int);    -- version 7
            bytes := set_byte(bytes, 7, (ts & 255)::int);
            bytes := set_byte(bytes, 8, (get_byte(bytes, 8) & 63) | 128);  -- RFC 9562 variant
            RETURN encode(bytes, 'hex')::uuid;
        END
        $fn$;
    END IF;
END
$$;
