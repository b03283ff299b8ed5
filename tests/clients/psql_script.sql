-- Run by tests/clients.rs with psql, directly and through the proxy; outputs must match.
\set ON_ERROR_STOP 0
CREATE TABLE items (id int PRIMARY KEY, name text, price numeric(10,2), seen timestamptz, tags text[], doc jsonb);
INSERT INTO items VALUES (1, 'um', 1.50, '2024-05-06 07:08:09+00', '{a,b}', '{"x": 1}'), (2, 'dois', NULL, NULL, NULL, NULL);
SELECT * FROM items ORDER BY id; SELECT count(*) AS n FROM items; SELECT 'multi' AS third;
SELECT id, name FROM items WHERE id = 1 \gdesc
SELECT 1/0;
SELEC broken;
INSERT INTO items VALUES (1, 'duplicate');
BEGIN;
INSERT INTO items VALUES (3, 'três');
SELECT missing_column FROM items;
COMMIT;
SELECT count(*) AS after_failed_tx FROM items;
\copy items (id, name, price) FROM 'COPY_INPUT'
\copy (SELECT id, name, price FROM items ORDER BY id) TO STDOUT
\copy items FROM 'COPY_INPUT'
DO $$ BEGIN RAISE NOTICE 'a notice from %', 'plpgsql'; END $$;
SELECT repeat('x', 100000) = repeat('x', 100000) AS big_equal;
\echo done
