-- Run by tests/dual_write.rs with psql: directly on one database (dual-write off) and
-- through the proxy on an identical one (dual-write on). The transcripts must be equal,
-- and on the second database fature_v2 must then equal legacy (cutover verify).
-- Times are literals wherever a statement returns them; now() only where nothing shows it.
\set ON_ERROR_STOP 0
\set VERBOSITY verbose

-- the application's own statements (../shared/workloads/fature_app.sql), literal form
INSERT INTO affiliates (parent_affiliate_id, external_id, name, email, registration_date)
VALUES (1, 'dw-1', 'Nova Um', 'um@example.com', now())
RETURNING affiliate_id;
UPDATE affiliates SET level_1_referrals = level_1_referrals + 1, updated_at = now()
WHERE affiliate_id = 1;
UPDATE affiliates SET total_deposits = total_deposits + 10.50, updated_at = now()
WHERE affiliate_id = 7;
UPDATE affiliates SET status = 'suspended', updated_at = now() WHERE affiliate_id = 8;
INSERT INTO affiliates (external_id, name, email, registration_date)
VALUES ('dw-up', 'Upsert', 'up@example.com', now())
ON CONFLICT (external_id) DO UPDATE SET name = EXCLUDED.name, email = EXCLUDED.email, updated_at = now();
INSERT INTO affiliates (external_id, name, email, registration_date)
VALUES ('dw-up', 'Upsert de novo', NULL, now())
ON CONFLICT (external_id) DO UPDATE SET name = EXCLUDED.name, email = EXCLUDED.email, updated_at = now();

-- several rows, a child before its parent in one statement
INSERT INTO affiliates (affiliate_id, parent_affiliate_id, external_id, name, registration_date)
VALUES (100002, 100001, 'dw-child', 'Filho', '2024-01-01'),
       (100001, 2, 'dw-parent', 'Pai', '2024-01-01'),
       (100003, 100002, 'dw-grandchild', 'Neto', '2024-01-01')
RETURNING affiliate_id, parent_affiliate_id, level_1_referrals, status, total_deposits;

-- INSERT … SELECT
INSERT INTO affiliates (parent_affiliate_id, external_id, name, email, registration_date)
SELECT affiliate_id, 'dw-sel-' || affiliate_id, 'Sel ' || affiliate_id, NULL, '2024-02-01'
FROM affiliates WHERE affiliate_id BETWEEN 3 AND 5
RETURNING affiliate_id, external_id;

-- ON CONFLICT DO NOTHING, DO UPDATE with RETURNING
INSERT INTO affiliates (external_id, name, registration_date) VALUES ('dw-1', 'conflito', '2024-01-01')
ON CONFLICT DO NOTHING RETURNING affiliate_id;
INSERT INTO affiliates (external_id, name, email, registration_date)
VALUES ('dw-1', 'Renomeada', 'novo@example.com', '2024-01-01')
ON CONFLICT (external_id) DO UPDATE SET name = EXCLUDED.name, email = EXCLUDED.email,
    updated_at = '2024-03-03'
RETURNING affiliate_id, name, email;

-- a subtree moves (v2 moves paths, closure and counters with it)
UPDATE affiliates SET parent_affiliate_id = 9, updated_at = now() WHERE affiliate_id = 100001;

-- UPDATE … FROM, RETURNING
UPDATE affiliates a SET total_bets = a.total_bets + p.total_deposits + 1
FROM affiliates p
WHERE p.affiliate_id = a.parent_affiliate_id
  AND a.affiliate_id IN (SELECT affiliate_id FROM affiliates WHERE parent_affiliate_id < 100 ORDER BY 1 LIMIT 2)
RETURNING a.affiliate_id, a.total_bets;

-- DELETE … USING, RETURNING
DELETE FROM affiliates a USING affiliates p
WHERE a.parent_affiliate_id = p.affiliate_id AND p.external_id = 'dw-child'
RETURNING a.affiliate_id, a.name;

-- a parent with children goes: legacy's children keep pointing at it, v2's become roots
SELECT min(parent_affiliate_id) AS victim FROM affiliates WHERE parent_affiliate_id > 20 \gset
DELETE FROM affiliates WHERE affiliate_id = :victim;
UPDATE affiliates SET total_withdrawals = total_withdrawals + 3 WHERE parent_affiliate_id = :victim;

-- errors from legacy reach the client as they are (positions included)
INSERT INTO affiliates (external_id, name, registration_date) VALUES ('dw-1', 'dup', '2024-01-01');
INSERT INTO affiliates (external_id, nme, registration_date) VALUES ('dw-x', 'x', '2024-01-01');
UPDATE affiliates SET status = 'x' WHERE affiliate_id = 1 / 0;

-- transactions, savepoints, rollbacks
BEGIN;
INSERT INTO affiliates (parent_affiliate_id, external_id, name, registration_date)
VALUES (3, 'dw-tx-1', 'Tx Um', '2024-05-05') RETURNING affiliate_id;
SAVEPOINT s1;
UPDATE affiliates SET total_deposits = total_deposits + 99 WHERE external_id = 'dw-tx-1';
INSERT INTO affiliates (parent_affiliate_id, external_id, name, registration_date)
VALUES (3, 'dw-tx-gone', 'Desfeita', '2024-05-05');
ROLLBACK TO SAVEPOINT s1;
INSERT INTO affiliates (parent_affiliate_id, external_id, name, registration_date)
SELECT affiliate_id, 'dw-tx-2', 'Tx Dois', '2024-05-05' FROM affiliates WHERE external_id = 'dw-tx-1';
RELEASE SAVEPOINT s1;
COMMIT;
BEGIN;
INSERT INTO affiliates (parent_affiliate_id, external_id, name, registration_date)
VALUES (4, 'dw-rolled-back', 'Nunca', '2024-05-05');
UPDATE affiliates SET status = 'banned' WHERE affiliate_id = 4;
ROLLBACK;
BEGIN;
UPDATE affiliates SET status = 'inactive' WHERE affiliate_id = 5;
SELECT 1 / 0;
COMMIT;

-- COPY FROM STDIN into the legacy table
COPY affiliates (affiliate_id, parent_affiliate_id, external_id, name, email, registration_date) FROM STDIN;
200002	200001	dw-copy-2	Cópia Dois	c2@example.com	2024-04-04 00:00:00
200001	1	dw-copy-1	Cópia Um	\N	2024-04-04 00:00:00
\.

-- PREPARE / EXECUTE
PREPARE deposit(numeric, bigint) AS
UPDATE affiliates SET total_deposits = total_deposits + $1, updated_at = now() WHERE affiliate_id = $2;
EXECUTE deposit(1.25, 12);
EXECUTE deposit(2.50, 13);
DEALLOCATE deposit;

SELECT affiliate_id, parent_affiliate_id, external_id, name, email, status, level_1_referrals,
       total_deposits, total_bets, total_withdrawals
FROM affiliates WHERE external_id LIKE 'dw-%' OR affiliate_id <= 15 ORDER BY affiliate_id;
\echo done
