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
        CREATE OR REPLACE FUNCTION ironflow.uuidv7() RETURNS uuid
        LANGUAGE sql VOLATILE PARALLEL SAFE AS $fn$
            SELECT encode(
                set_bit(set_bit(
                    overlay(uuid_send(gen_random_uuid())
                            PLACING substring(int8send(
                                floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint
                            ) FROM 3)
                            FROM 1 FOR 6),
                    52, 1), 53, 1),
                'hex')::uuid
        $fn$;
    END IF;
END
$$;
