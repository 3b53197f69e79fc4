-- Converts an EMQX 4 emqx_backend_pgsql database (the original tables: text payloads, 32-bit
-- positions, no index) to this extension's schema, keeping every row.
--
--   harness migrate --from-emqx --module M.wasm --rules R     (each pool's database)
--   psql -1 -v ON_ERROR_STOP=1 -f schema/from-emqx4.sql mqtt   (by hand)
--
-- Both run it in one transaction: it all happens, or nothing does. The original tables are not
-- dropped: they move to the schema `emqx4`, to keep until you are satisfied (then
-- `DROP SCHEMA emqx4 CASCADE`). Run it once, with the brokers stopped.

DO $$
BEGIN
    IF to_regclass('mqtt_msg') IS NULL OR NOT EXISTS (
        SELECT 1 FROM information_schema.columns
        WHERE table_schema = current_schema() AND table_name = 'mqtt_msg'
          AND column_name = 'payload' AND data_type = 'text')
    THEN
        RAISE EXCEPTION 'no EMQX 4 tables here: mqtt_msg with a text payload was not found';
    END IF;
    CREATE SCHEMA emqx4;
    -- Moving (not renaming) keeps their indexes and sequences out of the new tables' way.
    ALTER TABLE mqtt_msg SET SCHEMA emqx4;
    IF to_regclass('mqtt_acked') IS NOT NULL THEN ALTER TABLE mqtt_acked SET SCHEMA emqx4; END IF;
    IF to_regclass('mqtt_client') IS NOT NULL THEN ALTER TABLE mqtt_client SET SCHEMA emqx4; END IF;
    IF to_regclass('mqtt_sub') IS NOT NULL THEN ALTER TABLE mqtt_sub SET SCHEMA emqx4; END IF;
    IF to_regclass('mqtt_retain') IS NOT NULL THEN ALTER TABLE mqtt_retain SET SCHEMA emqx4; END IF;
END $$;

\ir schema.sql

DO $$
BEGIN
    -- Text payloads become their UTF-8 bytes; ids are kept, so positions stay valid.
    INSERT INTO mqtt_msg (id, msgid, sender, topic, qos, retain, payload, arrived)
    SELECT id, msgid, sender, coalesce(topic, ''), coalesce(qos, 1), coalesce(retain, 0) <> 0,
           convert_to(coalesce(payload, ''), 'UTF8'), coalesce(arrived::timestamptz, now())
    FROM emqx4.mqtt_msg;
    PERFORM setval(pg_get_serial_sequence('mqtt_msg', 'id'), coalesce((SELECT max(id) FROM mqtt_msg), 0) + 1, false);

    -- EMQX kept positions per exact topic. The regex below matches that topic literally; a
    -- subscription refreshes it when it next subscribes (wildcards included).
    IF to_regclass('emqx4.mqtt_acked') IS NOT NULL THEN
        INSERT INTO mqtt_acked (clientid, topic, topic_re, mid, created)
        SELECT clientid, topic, '^' || regexp_replace(topic, '([^[:alnum:]])', '\\\1', 'g') || '$',
               coalesce(mid, 0), coalesce(created::timestamptz, now())
        FROM emqx4.mqtt_acked WHERE clientid IS NOT NULL AND topic IS NOT NULL;
    END IF;
    IF to_regclass('emqx4.mqtt_client') IS NOT NULL THEN
        INSERT INTO mqtt_client (clientid, state, node, online_at, offline_at, created)
        SELECT clientid, coalesce(state, 0), node, online_at::timestamptz, offline_at::timestamptz,
               coalesce(created::timestamptz, now())
        FROM emqx4.mqtt_client WHERE clientid IS NOT NULL;
    END IF;
    IF to_regclass('emqx4.mqtt_sub') IS NOT NULL THEN
        INSERT INTO mqtt_sub (clientid, topic, qos, created)
        SELECT clientid, topic, coalesce(qos, 0), coalesce(created::timestamptz, now())
        FROM emqx4.mqtt_sub WHERE clientid IS NOT NULL AND topic IS NOT NULL;
    END IF;
    IF to_regclass('emqx4.mqtt_retain') IS NOT NULL THEN
        INSERT INTO mqtt_retain (topic, msgid, sender, qos, payload, arrived)
        SELECT topic, msgid, sender, coalesce(qos, 0), convert_to(coalesce(payload, ''), 'UTF8'),
               coalesce(arrived::timestamptz, now())
        FROM emqx4.mqtt_retain WHERE topic IS NOT NULL;
    END IF;
END $$;
