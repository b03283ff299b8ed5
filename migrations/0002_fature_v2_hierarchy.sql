-- fature_v2 hierarchy maintenance (seed plan, day 2), completed for UPDATE and DELETE.
--
-- Invariants kept by the triggers below, for every row of affiliates_optimized:
--   hierarchy_path         = the ids from the root down to the row ('1.7.42')
--   hierarchy_level        = nlevel(hierarchy_path)  (roots are level 1)
--   direct_referrals_count = number of rows whose parent is this row
--   total_network_size     = number of rows below this row, at any depth
--   hierarchy_index        = one (ancestor, descendant, distance) row per pair
--
-- INSERT  : path and level from the parent; closure rows; counters of the ancestors.
-- UPDATE  : a new parent moves the whole subtree (paths, levels, closure, counters of
--           the old and the new ancestors); a move under the row itself or one of its
--           descendants is refused (23514, constraint chk_no_cycle); affiliate_id is
--           immutable (0A000).
-- DELETE  : the row's children become roots (fk_parent_affiliate is ON DELETE SET NULL,
--           which runs the UPDATE path for each child), each recorded in
--           detached_affiliates with its former parent; the row's closure pairs go with it
--           (ON DELETE CASCADE); its ancestors' counters drop by one.
--
-- Every function pins search_path: triggers run in the application's session, whose
-- search_path is the application's.

-- Children detached from a deleted parent. Legacy has no foreign key and keeps the child
-- pointing at the deleted id; v2 cannot, so the child becomes a root and is recorded here
-- so that verify and repair know the difference is expected.
CREATE TABLE fature_v2.detached_affiliates (
    affiliate_id     BIGINT PRIMARY KEY
                     REFERENCES fature_v2.affiliates_optimized (affiliate_id) ON DELETE CASCADE,
    former_parent_id BIGINT NOT NULL,
    detached_at      TIMESTAMP NOT NULL DEFAULT NOW()
);

-- Closure rows of one affiliate, from its path (seed's function, set-based).
CREATE FUNCTION fature_v2.build_hierarchy_index(p_affiliate_id BIGINT)
RETURNS INTEGER
LANGUAGE plpgsql
SET search_path = fature_v2, public
AS $$
DECLARE
    affiliate_path LTREE;
    inserted_count INTEGER;
BEGIN
    SELECT hierarchy_path INTO affiliate_path
    FROM affiliates_optimized
    WHERE affiliate_id = p_affiliate_id;

    IF NOT FOUND THEN
        RAISE EXCEPTION 'affiliate % not found in fature_v2.affiliates_optimized', p_affiliate_id
            USING ERRCODE = 'no_data_found';
    END IF;

    INSERT INTO hierarchy_index (ancestor_id, descendant_id, level_distance)
    SELECT t.label::BIGINT, p_affiliate_id, nlevel(affiliate_path) - t.ord::INTEGER
    FROM unnest(string_to_array(affiliate_path::TEXT, '.')) WITH ORDINALITY AS t(label, ord)
    WHERE t.ord < nlevel(affiliate_path)
    ON CONFLICT (ancestor_id, descendant_id)
        DO UPDATE SET level_distance = EXCLUDED.level_distance;

    GET DIAGNOSTICS inserted_count = ROW_COUNT;
    RETURN inserted_count;
END;
$$;

-- The path and level a child of p_parent gets (a root's when p_parent is NULL).
-- 23503 when the parent is not in v2.
CREATE FUNCTION fature_v2.child_position(
    p_parent BIGINT, p_child BIGINT, OUT path LTREE, OUT level INTEGER
)
LANGUAGE plpgsql
SET search_path = fature_v2, public
AS $$
BEGIN
    IF p_parent IS NULL THEN
        path := p_child::TEXT::LTREE;
        level := 1;
        RETURN;
    END IF;

    SELECT hierarchy_path || p_child::TEXT, hierarchy_level + 1 INTO path, level
    FROM affiliates_optimized
    WHERE affiliate_id = p_parent;

    IF NOT FOUND THEN
        RAISE EXCEPTION 'parent affiliate % of affiliate % is not in fature_v2.affiliates_optimized',
                p_parent, p_child
            USING ERRCODE = 'foreign_key_violation',
                  CONSTRAINT = 'fk_parent_affiliate',
                  HINT = 'Insert parents before their children.';
    END IF;
END;
$$;

-- Refuses a move of p_node under p_parent that would make a cycle (23514, chk_no_cycle).
CREATE FUNCTION fature_v2.refuse_cycle(p_node BIGINT, p_parent BIGINT)
RETURNS VOID
LANGUAGE plpgsql
AS $$
BEGIN
    RAISE EXCEPTION 'cannot move affiliate % under affiliate %: it is the affiliate itself or one of its descendants',
            p_node, p_parent
        USING ERRCODE = 'check_violation',
              CONSTRAINT = 'chk_no_cycle',
              HINT = 'A move under a descendant would make a cycle in the affiliate tree.';
END;
$$;

-- BEFORE INSERT: path and level from the parent.
CREATE FUNCTION fature_v2.update_hierarchy_on_insert()
RETURNS TRIGGER
LANGUAGE plpgsql
SET search_path = fature_v2, public
AS $$
BEGIN
    SELECT path, level INTO NEW.hierarchy_path, NEW.hierarchy_level
    FROM child_position(NEW.parent_affiliate_id, NEW.affiliate_id);
    RETURN NEW;
END;
$$;

CREATE TRIGGER trg_update_hierarchy_insert
    BEFORE INSERT ON fature_v2.affiliates_optimized
    FOR EACH ROW EXECUTE FUNCTION fature_v2.update_hierarchy_on_insert();

-- AFTER INSERT: closure rows and the counters of the ancestors.
CREATE FUNCTION fature_v2.update_referral_counters()
RETURNS TRIGGER
LANGUAGE plpgsql
SET search_path = fature_v2, public
AS $$
BEGIN
    IF NEW.parent_affiliate_id IS NULL THEN
        RETURN NULL;
    END IF;

    PERFORM build_hierarchy_index(NEW.affiliate_id);

    UPDATE affiliates_optimized
    SET direct_referrals_count = direct_referrals_count + 1
    WHERE affiliate_id = NEW.parent_affiliate_id;

    UPDATE affiliates_optimized
    SET total_network_size = total_network_size + 1
    WHERE affiliate_id IN (
        SELECT ancestor_id FROM hierarchy_index WHERE descendant_id = NEW.affiliate_id
    );

    RETURN NULL;
END;
$$;

CREATE TRIGGER trg_update_referral_counters
    AFTER INSERT ON fature_v2.affiliates_optimized
    FOR EACH ROW EXECUTE FUNCTION fature_v2.update_referral_counters();

-- BEFORE UPDATE of the parent (or the id): refuse cycles and immutable ids, set the
-- row's own new path and level so that RETURNING shows them.
CREATE FUNCTION fature_v2.check_hierarchy_on_update()
RETURNS TRIGGER
LANGUAGE plpgsql
SET search_path = fature_v2, public
AS $$
BEGIN
    IF NEW.affiliate_id <> OLD.affiliate_id THEN
        RAISE EXCEPTION 'affiliate_id is immutable in fature_v2 (% -> %)',
                OLD.affiliate_id, NEW.affiliate_id
            USING ERRCODE = 'feature_not_supported',
                  HINT = 'Hierarchy paths and closure rows are keyed by affiliate_id.';
    END IF;

    IF NEW.parent_affiliate_id = NEW.affiliate_id OR EXISTS (
        SELECT 1 FROM hierarchy_index
        WHERE ancestor_id = NEW.affiliate_id AND descendant_id = NEW.parent_affiliate_id
    ) THEN
        PERFORM refuse_cycle(NEW.affiliate_id, NEW.parent_affiliate_id);
    END IF;

    SELECT path, level INTO NEW.hierarchy_path, NEW.hierarchy_level
    FROM child_position(NEW.parent_affiliate_id, NEW.affiliate_id);
    RETURN NEW;
END;
$$;

CREATE TRIGGER trg_check_hierarchy_update
    BEFORE UPDATE OF parent_affiliate_id, affiliate_id ON fature_v2.affiliates_optimized
    FOR EACH ROW
    WHEN (OLD.parent_affiliate_id IS DISTINCT FROM NEW.parent_affiliate_id
          OR OLD.affiliate_id <> NEW.affiliate_id)
    EXECUTE FUNCTION fature_v2.check_hierarchy_on_update();

-- AFTER UPDATE of the parent: move the subtree.
--
-- Works from the state of the tables at the time it runs, not from OLD/NEW paths, so a
-- statement that moves several rows (even one inside another's subtree) ends consistent
-- whatever order the row triggers run in: each run is "re-hang this subtree, as the
-- closure now records it, under the row's parent, as it now is".
CREATE FUNCTION fature_v2.move_subtree()
RETURNS TRIGGER
LANGUAGE plpgsql
SET search_path = fature_v2, public
AS $$
DECLARE
    node         BIGINT := NEW.affiliate_id;
    new_parent   BIGINT := NEW.parent_affiliate_id;
    node_label   LTREE := NEW.affiliate_id::TEXT::LTREE;
    below        BIGINT[];
    subtree      BIGINT[];
    old_anc      BIGINT[];
    new_path     LTREE;
BEGIN
    -- Descendants that still exist (a DELETE of several rows may have removed some).
    below := ARRAY(
        SELECT h.descendant_id
        FROM hierarchy_index h
        JOIN affiliates_optimized d ON d.affiliate_id = h.descendant_id
        WHERE h.ancestor_id = node
    );
    subtree := below || node;

    IF new_parent = ANY (subtree) THEN
        PERFORM refuse_cycle(node, new_parent);
    END IF;

    -- Leave the old ancestors.
    old_anc := ARRAY(SELECT ancestor_id FROM hierarchy_index WHERE descendant_id = node);

    UPDATE affiliates_optimized
    SET total_network_size = total_network_size - cardinality(subtree)
    WHERE affiliate_id = ANY (old_anc);

    DELETE FROM hierarchy_index
    WHERE ancestor_id = ANY (old_anc) AND descendant_id = ANY (subtree);

    IF OLD.parent_affiliate_id IS NOT NULL THEN
        UPDATE affiliates_optimized
        SET direct_referrals_count = direct_referrals_count - 1
        WHERE affiliate_id = OLD.parent_affiliate_id;
    END IF;

    -- Paths and levels of the subtree, re-rooted at the node's new path.
    SELECT path INTO new_path FROM child_position(new_parent, node);

    UPDATE affiliates_optimized d
    SET hierarchy_path = CASE WHEN d.affiliate_id = node THEN new_path
                              ELSE new_path || subpath(d.hierarchy_path, index(d.hierarchy_path, node_label) + 1)
                         END,
        hierarchy_level = CASE WHEN d.affiliate_id = node THEN nlevel(new_path)
                               ELSE nlevel(new_path) + nlevel(d.hierarchy_path)
                                    - index(d.hierarchy_path, node_label) - 1
                          END
    WHERE d.affiliate_id = ANY (subtree);

    IF new_parent IS NULL THEN
        RETURN NULL;
    END IF;

    -- A detached child given a parent again is no longer detached.
    DELETE FROM detached_affiliates WHERE affiliate_id = node;

    -- Join the new ancestors.
    UPDATE affiliates_optimized
    SET direct_referrals_count = direct_referrals_count + 1
    WHERE affiliate_id = new_parent;

    INSERT INTO hierarchy_index (ancestor_id, descendant_id, level_distance)
    SELECT a.ancestor_id, s.descendant_id, a.distance + 1 + s.distance
    FROM (
        SELECT ancestor_id, level_distance AS distance
        FROM hierarchy_index WHERE descendant_id = new_parent
        UNION ALL
        SELECT new_parent, 0
    ) a
    CROSS JOIN (
        SELECT h.descendant_id, h.level_distance AS distance
        FROM hierarchy_index h WHERE h.ancestor_id = node AND h.descendant_id = ANY (below)
        UNION ALL
        SELECT node, 0
    ) s
    ON CONFLICT (ancestor_id, descendant_id)
        DO UPDATE SET level_distance = EXCLUDED.level_distance;

    UPDATE affiliates_optimized
    SET total_network_size = total_network_size + cardinality(subtree)
    WHERE affiliate_id = new_parent
       OR affiliate_id IN (SELECT ancestor_id FROM hierarchy_index WHERE descendant_id = new_parent);

    RETURN NULL;
END;
$$;

CREATE TRIGGER trg_move_subtree
    AFTER UPDATE OF parent_affiliate_id ON fature_v2.affiliates_optimized
    FOR EACH ROW
    WHEN (OLD.parent_affiliate_id IS DISTINCT FROM NEW.parent_affiliate_id)
    EXECUTE FUNCTION fature_v2.move_subtree();

-- BEFORE DELETE: record the children about to be detached (ON DELETE SET NULL then
-- makes them roots through the UPDATE path above).
CREATE FUNCTION fature_v2.record_detached_children()
RETURNS TRIGGER
LANGUAGE plpgsql
SET search_path = fature_v2, public
AS $$
BEGIN
    INSERT INTO detached_affiliates (affiliate_id, former_parent_id)
    SELECT affiliate_id, OLD.affiliate_id
    FROM affiliates_optimized
    WHERE parent_affiliate_id = OLD.affiliate_id
    ON CONFLICT (affiliate_id) DO UPDATE
        SET former_parent_id = EXCLUDED.former_parent_id,
            detached_at = EXCLUDED.detached_at;
    RETURN OLD;
END;
$$;

CREATE TRIGGER trg_record_detached_children
    BEFORE DELETE ON fature_v2.affiliates_optimized
    FOR EACH ROW EXECUTE FUNCTION fature_v2.record_detached_children();

-- AFTER DELETE: the deleted row leaves its parent's and ancestors' counters. Ancestors
-- come from the row's last path: its closure pairs may already be gone (CASCADE).
CREATE FUNCTION fature_v2.release_deleted_affiliate()
RETURNS TRIGGER
LANGUAGE plpgsql
SET search_path = fature_v2, public
AS $$
BEGIN
    IF OLD.parent_affiliate_id IS NULL THEN
        RETURN NULL;
    END IF;

    UPDATE affiliates_optimized
    SET direct_referrals_count = direct_referrals_count - 1
    WHERE affiliate_id = OLD.parent_affiliate_id;

    UPDATE affiliates_optimized
    SET total_network_size = total_network_size - 1
    WHERE affiliate_id IN (
        SELECT t.label::BIGINT
        FROM unnest(string_to_array(OLD.hierarchy_path::TEXT, '.')) WITH ORDINALITY AS t(label, ord)
        WHERE t.ord < nlevel(OLD.hierarchy_path)
    );

    RETURN NULL;
END;
$$;

CREATE TRIGGER trg_release_deleted_affiliate
    AFTER DELETE ON fature_v2.affiliates_optimized
    FOR EACH ROW EXECUTE FUNCTION fature_v2.release_deleted_affiliate();
