-- enqueue() validates headers as the Rust writer does, so a SQL writer can neither store headers
-- the relay cannot publish nor spoof the headers the relay sets (Java consumers read the last
-- x-sequence header, so an appended copy would win). Rows written by a raw INSERT are still
-- checked by the relay, which holds or dead-letters an invalid row on its own.
CREATE OR REPLACE FUNCTION {schema}.enqueue(topic text, key text, payload bytea, headers jsonb DEFAULT NULL)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    bad record;
    sequence bigint;
BEGIN
    IF enqueue.headers IS NOT NULL THEN
        IF jsonb_typeof(enqueue.headers) <> 'object' THEN
            RAISE EXCEPTION 'outbox.enqueue: headers must be a JSON object of text values, not %',
                jsonb_typeof(enqueue.headers) USING ERRCODE = 'invalid_parameter_value';
        END IF;
        FOR bad IN SELECT h.key AS name, jsonb_typeof(h.value) AS type
                     FROM jsonb_each(enqueue.headers) AS h
                    WHERE h.key = '' OR h.key IN ('x-sequence', 'x-source')
                       OR jsonb_typeof(h.value) <> 'string'
        LOOP
            IF bad.name = '' THEN
                RAISE EXCEPTION 'outbox.enqueue: a header name is empty'
                    USING ERRCODE = 'invalid_parameter_value';
            ELSIF bad.name IN ('x-sequence', 'x-source') THEN
                RAISE EXCEPTION 'outbox.enqueue: header "%" is reserved: the relay sets it', bad.name
                    USING ERRCODE = 'invalid_parameter_value';
            ELSE
                RAISE EXCEPTION 'outbox.enqueue: header "%" must be a JSON string, not %', bad.name, bad.type
                    USING ERRCODE = 'invalid_parameter_value';
            END IF;
        END LOOP;
    END IF;
    INSERT INTO {schema}.message (topic, key, payload, headers)
    VALUES (
        enqueue.topic,
        convert_to(enqueue.key, 'UTF8'),
        enqueue.payload,
        (SELECT jsonb_agg(jsonb_build_object('name', h.key, 'text', h.value))
           FROM jsonb_each_text(enqueue.headers) AS h)
    )
    RETURNING id INTO sequence;
    RETURN sequence;
END
$$;
