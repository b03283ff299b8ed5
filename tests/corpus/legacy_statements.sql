-- Statements on the legacy table, one per line: rewritten ones must answer the same on the
-- target, the others must be marked not routable with a reason (tests/rewrite_corpus.rs).
SELECT * FROM affiliates WHERE affiliate_id = 10
SELECT * FROM public.affiliates WHERE affiliate_id IN (1, 2, 3) ORDER BY affiliate_id
SELECT * FROM "affiliates" WHERE status = 'inactive' ORDER BY affiliate_id
SELECT * FROM "public"."affiliates" WHERE affiliate_id < 5 ORDER BY 1
SELECT affiliates.* FROM affiliates WHERE affiliate_id = 42
SELECT a.* FROM affiliates a WHERE a.affiliate_id BETWEEN 100 AND 110 ORDER BY a.affiliate_id
SELECT a.*, b.name AS parent_name FROM affiliates a JOIN affiliates b ON b.affiliate_id = a.parent_affiliate_id WHERE a.affiliate_id < 300 ORDER BY a.affiliate_id
SELECT affiliates.name, affiliates.level_1_referrals FROM affiliates WHERE affiliates.affiliate_id = 7
SELECT public.affiliates.name FROM public.affiliates WHERE public.affiliates.affiliate_id = 8
SELECT AFFILIATE_ID, Name, LEVEL_1_REFERRALS FROM AFFILIATES WHERE Affiliate_Id = 9
SELECT "affiliate_id", "level_1_referrals" FROM affiliates WHERE "affiliate_id" = 11
SELECT count(*) FROM affiliates
SELECT count(*), sum(total_deposits), avg(total_bets), min(registration_date), max(level_1_referrals) FROM affiliates
SELECT status, count(*) FROM affiliates GROUP BY status ORDER BY status
SELECT status, sum(level_1_referrals) AS refs FROM affiliates GROUP BY status HAVING sum(level_1_referrals) > 10 ORDER BY status
SELECT parent_affiliate_id, count(*) FROM affiliates WHERE parent_affiliate_id IS NOT NULL GROUP BY parent_affiliate_id ORDER BY count(*) DESC, parent_affiliate_id LIMIT 20
SELECT count(DISTINCT parent_affiliate_id) FROM affiliates
SELECT DISTINCT status FROM affiliates ORDER BY status
SELECT DISTINCT ON (status) status, affiliate_id FROM affiliates ORDER BY status, affiliate_id
SELECT affiliate_id, level_1_referrals FROM affiliates ORDER BY level_1_referrals DESC, affiliate_id LIMIT 10
SELECT affiliate_id FROM affiliates ORDER BY affiliate_id LIMIT 10 OFFSET 20
SELECT affiliate_id FROM affiliates ORDER BY affiliate_id FETCH FIRST 5 ROWS ONLY
SELECT affiliate_id, row_number() OVER (ORDER BY total_deposits DESC, affiliate_id) FROM affiliates WHERE affiliate_id < 200 ORDER BY affiliate_id
SELECT affiliate_id, rank() OVER (PARTITION BY status ORDER BY level_1_referrals DESC) FROM affiliates WHERE affiliate_id < 200 ORDER BY affiliate_id
SELECT affiliate_id, sum(total_deposits) OVER (PARTITION BY parent_affiliate_id) FROM affiliates WHERE affiliate_id < 100 ORDER BY affiliate_id
SELECT affiliate_id, lag(affiliate_id) OVER w, lead(name) OVER w FROM affiliates WHERE affiliate_id < 50 WINDOW w AS (ORDER BY affiliate_id) ORDER BY affiliate_id
SELECT status, percentile_cont(0.5) WITHIN GROUP (ORDER BY total_deposits) FROM affiliates GROUP BY status ORDER BY status
SELECT count(*) FILTER (WHERE level_1_referrals > 0), count(*) FILTER (WHERE status = 'banned') FROM affiliates
SELECT affiliate_id FROM affiliates WHERE affiliate_id IN (SELECT parent_affiliate_id FROM affiliates WHERE affiliate_id < 500) ORDER BY 1
SELECT affiliate_id FROM affiliates a WHERE EXISTS (SELECT 1 FROM affiliates c WHERE c.parent_affiliate_id = a.affiliate_id AND c.status = 'banned') ORDER BY 1
SELECT affiliate_id FROM affiliates a WHERE NOT EXISTS (SELECT 1 FROM affiliates c WHERE c.parent_affiliate_id = a.affiliate_id) AND a.affiliate_id < 400 ORDER BY 1
SELECT a.affiliate_id, (SELECT count(*) FROM affiliates c WHERE c.parent_affiliate_id = a.affiliate_id) AS children FROM affiliates a WHERE a.affiliate_id < 100 ORDER BY 1
SELECT a.affiliate_id, a.level_1_referrals - (SELECT count(*) FROM affiliates c WHERE c.parent_affiliate_id = a.affiliate_id) AS drift FROM affiliates a WHERE a.affiliate_id < 300 ORDER BY 1
SELECT * FROM (SELECT affiliate_id, level_1_referrals FROM affiliates WHERE level_1_referrals > 2) t ORDER BY affiliate_id
SELECT t.n FROM (SELECT count(*) AS n FROM affiliates) t
SELECT x.affiliate_id FROM affiliates x, affiliates y WHERE x.affiliate_id = y.parent_affiliate_id AND y.affiliate_id = 900
SELECT a.affiliate_id, c.affiliate_id FROM affiliates a LEFT JOIN affiliates c ON c.parent_affiliate_id = a.affiliate_id WHERE a.affiliate_id < 20 ORDER BY 1, 2
SELECT a.affiliate_id FROM affiliates a RIGHT JOIN affiliates b ON a.affiliate_id = b.parent_affiliate_id WHERE b.affiliate_id < 30 ORDER BY 1
SELECT a.affiliate_id FROM affiliates a FULL JOIN affiliates b ON a.affiliate_id = b.parent_affiliate_id WHERE coalesce(a.affiliate_id, b.affiliate_id) < 15 ORDER BY 1
SELECT a.affiliate_id, c.child FROM affiliates a CROSS JOIN LATERAL (SELECT min(affiliate_id) AS child FROM affiliates x WHERE x.parent_affiliate_id = a.affiliate_id) c WHERE a.affiliate_id < 40 ORDER BY 1
SELECT a.affiliate_id, g FROM affiliates a, generate_series(1, 2) g WHERE a.affiliate_id < 5 ORDER BY 1, 2
SELECT affiliate_id FROM affiliates WHERE status = 'active' UNION SELECT parent_affiliate_id FROM affiliates WHERE affiliate_id < 10 ORDER BY 1 LIMIT 30
SELECT affiliate_id FROM affiliates WHERE affiliate_id < 10 UNION ALL SELECT affiliate_id FROM affiliates WHERE affiliate_id < 5 ORDER BY 1
SELECT affiliate_id FROM affiliates WHERE affiliate_id < 100 EXCEPT SELECT parent_affiliate_id FROM affiliates ORDER BY 1
SELECT affiliate_id FROM affiliates WHERE affiliate_id < 100 INTERSECT SELECT parent_affiliate_id FROM affiliates ORDER BY 1
WITH top AS (SELECT affiliate_id, level_1_referrals FROM affiliates ORDER BY level_1_referrals DESC, affiliate_id LIMIT 5) SELECT * FROM top ORDER BY affiliate_id
WITH RECURSIVE downline AS (SELECT affiliate_id, 1 AS depth FROM affiliates WHERE parent_affiliate_id = 3 UNION ALL SELECT a.affiliate_id, d.depth + 1 FROM affiliates a JOIN downline d ON a.parent_affiliate_id = d.affiliate_id WHERE d.depth < 10) SELECT depth, count(*) FROM downline GROUP BY depth ORDER BY depth
WITH RECURSIVE up AS (SELECT affiliate_id, parent_affiliate_id, 0 AS distance FROM affiliates WHERE affiliate_id = 2999 UNION ALL SELECT a.affiliate_id, a.parent_affiliate_id, up.distance + 1 FROM affiliates a JOIN up ON a.affiliate_id = up.parent_affiliate_id) SELECT affiliate_id, distance FROM up ORDER BY distance
WITH RECURSIVE tree(id, path) AS (SELECT affiliate_id, ARRAY[affiliate_id] FROM affiliates WHERE affiliate_id = 5 UNION ALL SELECT a.affiliate_id, t.path || a.affiliate_id FROM affiliates a JOIN tree t ON a.parent_affiliate_id = t.id) SELECT id, path FROM tree ORDER BY path
WITH a AS (SELECT * FROM affiliates WHERE status = 'active'), b AS (SELECT * FROM affiliates WHERE status <> 'active') SELECT (SELECT count(*) FROM a), (SELECT count(*) FROM b)
SELECT CASE WHEN level_1_referrals > 5 THEN 'big' WHEN level_1_referrals > 0 THEN 'small' ELSE 'none' END AS size, count(*) FROM affiliates GROUP BY 1 ORDER BY 1
SELECT coalesce(email, '(none)') FROM affiliates WHERE affiliate_id IN (1, 2, 3, 4, 5, 6, 7, 8, 9, 10) ORDER BY affiliate_id
SELECT nullif(level_1_referrals, 0) FROM affiliates WHERE affiliate_id < 10 ORDER BY affiliate_id
SELECT upper(name), lower(email), length(external_id), substr(name, 1, 3) FROM affiliates WHERE affiliate_id < 10 ORDER BY affiliate_id
SELECT name || ' <' || coalesce(email, '') || '>' FROM affiliates WHERE affiliate_id = 12
SELECT affiliate_id FROM affiliates WHERE name LIKE 'Ana%' ORDER BY 1 LIMIT 10
SELECT affiliate_id FROM affiliates WHERE name ILIKE '%silva%' AND affiliate_id < 500 ORDER BY 1
SELECT affiliate_id FROM affiliates WHERE email ~ '^ana\.' ORDER BY 1 LIMIT 5
SELECT affiliate_id::text, total_deposits::int, level_1_referrals::numeric(10,2) FROM affiliates WHERE affiliate_id < 5 ORDER BY affiliate_id
SELECT CAST(total_deposits AS float8) / NULLIF(total_bets, 0) FROM affiliates WHERE affiliate_id < 20 ORDER BY affiliate_id
SELECT round(total_deposits * 1.1, 2), total_cpa_earned + total_rev_earned - total_commissions_paid FROM affiliates WHERE affiliate_id < 20 ORDER BY affiliate_id
SELECT date_trunc('month', registration_date) AS m, count(*) FROM affiliates GROUP BY 1 ORDER BY 1
SELECT extract(year FROM registration_date) AS y, count(*) FROM affiliates GROUP BY 1 ORDER BY 1
SELECT affiliate_id FROM affiliates WHERE registration_date >= '2023-01-01' AND registration_date < '2023-02-01' ORDER BY 1
SELECT affiliate_id FROM affiliates WHERE registration_date > TIMESTAMP '2024-06-01 00:00:00' ORDER BY 1 LIMIT 5
SELECT age(updated_at, created_at) FROM affiliates WHERE affiliate_id = 3
SELECT to_char(registration_date, 'YYYY-MM-DD') FROM affiliates WHERE affiliate_id < 4 ORDER BY affiliate_id
SELECT json_agg(affiliate_id ORDER BY affiliate_id) FROM affiliates WHERE parent_affiliate_id = 1
SELECT jsonb_build_object('id', affiliate_id, 'refs', level_1_referrals) FROM affiliates WHERE affiliate_id = 4
SELECT array_agg(name ORDER BY affiliate_id) FROM affiliates WHERE affiliate_id <= 5
SELECT string_agg(external_id, ',' ORDER BY affiliate_id) FROM affiliates WHERE parent_affiliate_id = 2
SELECT affiliate_id FROM affiliates WHERE affiliate_id = ANY(ARRAY[5, 6, 7]) ORDER BY 1
SELECT affiliate_id FROM affiliates WHERE status IN ('banned', 'suspended') AND level_1_referrals >= 1 ORDER BY 1
SELECT affiliate_id FROM affiliates WHERE parent_affiliate_id IS NULL ORDER BY 1 LIMIT 10
SELECT affiliate_id FROM affiliates WHERE NOT (status = 'active') ORDER BY 1 LIMIT 10
SELECT greatest(total_deposits, total_bets), least(total_withdrawals, total_deposits) FROM affiliates WHERE affiliate_id = 6
SELECT affiliate_id, total_deposits FROM affiliates ORDER BY total_deposits DESC NULLS LAST, affiliate_id LIMIT 5
SELECT count(*) FROM affiliates a JOIN affiliates p ON p.affiliate_id = a.parent_affiliate_id JOIN affiliates g ON g.affiliate_id = p.parent_affiliate_id
SELECT (SELECT max(level_1_referrals) FROM affiliates) AS most, (SELECT min(affiliate_id) FROM affiliates WHERE status = 'banned') AS first_banned
SELECT 1 FROM affiliates WHERE affiliate_id = 1
SELECT exists(SELECT 1 FROM affiliates WHERE external_id = 'aff-00000001')
SELECT affiliate_id FROM affiliates WHERE affiliate_id = 17 FOR UPDATE
SELECT affiliate_id FROM affiliates a WHERE a.affiliate_id = 18 FOR SHARE OF a
SELECT t.affiliate_id FROM affiliates AS t(affiliate_id, parent) WHERE t.parent = 1 ORDER BY 1
SELECT affiliate_id FROM ONLY affiliates WHERE affiliate_id = 19
INSERT INTO affiliates (external_id, name, registration_date) VALUES ('new-1', 'Nova', '2025-01-01') RETURNING affiliate_id, level_1_referrals
INSERT INTO affiliates (affiliate_id, parent_affiliate_id, external_id, name, registration_date) VALUES (50001, 1, 'new-2', 'Nova 2', '2025-01-02'), (50002, 50001, 'new-3', 'Nova 3', '2025-01-03') RETURNING *
INSERT INTO affiliates VALUES (50003, 2, 'new-4', 'Quatro', 'q@example.com', 'active', '2025-01-04')
INSERT INTO public.affiliates (affiliate_id, external_id, name, registration_date) SELECT affiliate_id + 60000, 'copy-' || external_id, name, registration_date FROM affiliates WHERE affiliate_id < 4 RETURNING affiliate_id
INSERT INTO affiliates (affiliate_id, external_id, name, registration_date) VALUES (50010, 'aff-00000001', 'dup', '2025-01-01') ON CONFLICT (external_id) DO NOTHING
INSERT INTO affiliates (affiliate_id, external_id, name, registration_date) VALUES (50011, 'aff-00000002', 'renamed', '2025-01-01') ON CONFLICT (external_id) DO UPDATE SET name = EXCLUDED.name, total_deposits = affiliates.total_deposits + 1 RETURNING affiliate_id, name
INSERT INTO affiliates AS x (affiliate_id, external_id, name, registration_date) VALUES (50012, 'aff-00000003', 'n', '2025-01-01') ON CONFLICT (external_id) DO UPDATE SET status = 'inactive' WHERE x.level_1_referrals >= 0 RETURNING x.level_1_referrals
UPDATE affiliates SET status = 'inactive' WHERE affiliate_id = 20
UPDATE affiliates SET total_deposits = total_deposits + 10.5, updated_at = '2025-05-05' WHERE affiliate_id IN (21, 22) RETURNING affiliate_id, total_deposits
UPDATE affiliates a SET name = upper(a.name) WHERE a.level_1_referrals > 3 AND a.affiliate_id < 200 RETURNING a.affiliate_id, a.level_1_referrals
UPDATE affiliates SET parent_affiliate_id = 1 WHERE affiliate_id = 2500 RETURNING *
UPDATE affiliates a SET total_bets = p.total_bets FROM affiliates p WHERE p.affiliate_id = a.parent_affiliate_id AND a.affiliate_id = 2400 RETURNING a.affiliate_id, a.total_bets
UPDATE affiliates SET email = NULL WHERE affiliate_id = (SELECT min(affiliate_id) FROM affiliates WHERE status = 'banned')
UPDATE affiliates SET level_1_referrals = level_1_referrals + 1 WHERE affiliate_id = 23
DELETE FROM affiliates WHERE affiliate_id = 2999
DELETE FROM affiliates WHERE affiliate_id IN (2998, 2997) RETURNING affiliate_id, level_1_referrals
DELETE FROM affiliates a USING affiliates p WHERE a.parent_affiliate_id = p.affiliate_id AND p.affiliate_id = 2990 AND a.level_1_referrals = 0 RETURNING a.affiliate_id
DELETE FROM public.affiliates WHERE affiliate_id = 2996 RETURNING *
SELECT 'public.affiliates'::regclass::oid > 0 FROM affiliates LIMIT 1
SELECT count(*) FROM affiliates WHERE name = 'affiliates'
SELECT row_to_json(a) FROM affiliates a WHERE affiliate_id = 1
SELECT a FROM affiliates a WHERE affiliate_id = 1
SELECT ctid, affiliate_id FROM affiliates WHERE affiliate_id = 1
SELECT a.xmin FROM affiliates a WHERE affiliate_id = 1
WITH affiliates AS (SELECT 1 AS affiliate_id) SELECT * FROM affiliates
TABLE affiliates
SELECT affiliate_id FROM affiliates WHERE affiliate_id = 1 FOR NO KEY UPDATE
SELECT affiliate_id FROM affiliates WHERE affiliate_id BETWEEN SYMMETRIC 10 AND 5
TRUNCATE affiliates
LOCK TABLE affiliates IN SHARE MODE
COPY affiliates TO STDOUT
ALTER TABLE affiliates ADD COLUMN x int
CREATE VIEW v AS SELECT * FROM affiliates
EXPLAIN SELECT * FROM affiliates
INSERT INTO affiliates (external_id, name, registration_date, level_1_referrals) VALUES ('x', 'y', '2025-01-01', 3)
INSERT INTO affiliates (affiliate_id, external_id, name, registration_date) VALUES (1, 'x', 'y', '2025-01-01') ON CONFLICT ON CONSTRAINT affiliates_pkey DO NOTHING
UPDATE affiliates SET status = 'active' WHERE affiliate_id IN (SELECT affiliate_id FROM affiliates WHERE level_1_referrals > 100)
