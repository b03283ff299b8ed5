-- fature_v2: the target schema of the Fature CPA migration (seed plan, day 1).
-- Changes from the seed's SQL and their reasons: docs/seed-sql-changes.md.

CREATE SCHEMA IF NOT EXISTS fature_v2;

-- ltree is a trusted extension (PostgreSQL 13+): a database owner may create it.
-- Installed in public, where an existing installation usually lives; every function
-- below pins its search_path to (fature_v2, public).
CREATE EXTENSION IF NOT EXISTS ltree SCHEMA public;

CREATE TABLE fature_v2.affiliates_optimized (
    affiliate_id           BIGINT PRIMARY KEY,
    parent_affiliate_id    BIGINT,
    external_id            VARCHAR(50) UNIQUE NOT NULL,
    name                   VARCHAR(100) NOT NULL,
    email                  VARCHAR(255),
    phone                  VARCHAR(20),
    document               VARCHAR(50),
    status                 VARCHAR(20) DEFAULT 'active',
    registration_date      TIMESTAMP NOT NULL,

    -- Hierarchy (derived: maintained by the triggers of 0002, never written by the app)
    hierarchy_path         public.LTREE NOT NULL,
    hierarchy_level        INTEGER NOT NULL,
    direct_referrals_count INTEGER DEFAULT 0,
    total_network_size     INTEGER DEFAULT 0,

    -- Financial
    total_deposits         DECIMAL(15,2) DEFAULT 0,
    total_bets             DECIMAL(15,2) DEFAULT 0,
    total_withdrawals      DECIMAL(15,2) DEFAULT 0,
    total_ggr              DECIMAL(15,2) DEFAULT 0,

    -- Commissions
    total_cpa_earned       DECIMAL(15,2) DEFAULT 0,
    total_rev_earned       DECIMAL(15,2) DEFAULT 0,
    total_commissions_paid DECIMAL(15,2) DEFAULT 0,

    -- Performance metadata
    last_commission_calc   TIMESTAMP,
    network_hash           VARCHAR(64),
    last_activity          TIMESTAMP,

    -- Audit
    created_at             TIMESTAMP DEFAULT NOW(),
    updated_at             TIMESTAMP DEFAULT NOW(),

    CONSTRAINT chk_positive_counts CHECK (
        direct_referrals_count >= 0 AND
        total_network_size >= 0 AND
        hierarchy_level > 0
    ),
    CONSTRAINT chk_valid_status CHECK (
        status IN ('active', 'inactive', 'suspended', 'banned')
    ),
    -- ON DELETE SET NULL: a deleted affiliate's children become roots (see 0002).
    CONSTRAINT fk_parent_affiliate FOREIGN KEY (parent_affiliate_id)
        REFERENCES fature_v2.affiliates_optimized (affiliate_id)
        ON DELETE SET NULL
        DEFERRABLE INITIALLY DEFERRED
);

-- Closure table: one row per (ancestor, descendant) pair at any distance.
CREATE TABLE fature_v2.hierarchy_index (
    id             BIGSERIAL PRIMARY KEY,
    ancestor_id    BIGINT NOT NULL,
    descendant_id  BIGINT NOT NULL,
    level_distance INTEGER NOT NULL,
    path_weight    DECIMAL(10,4) DEFAULT 1.0,

    created_at     TIMESTAMP DEFAULT NOW(),
    is_active      BOOLEAN DEFAULT true,

    UNIQUE (ancestor_id, descendant_id),

    -- ON DELETE CASCADE: the pairs of a deleted affiliate go with it.
    FOREIGN KEY (ancestor_id)
        REFERENCES fature_v2.affiliates_optimized (affiliate_id) ON DELETE CASCADE,
    FOREIGN KEY (descendant_id)
        REFERENCES fature_v2.affiliates_optimized (affiliate_id) ON DELETE CASCADE,

    CONSTRAINT chk_positive_distance CHECK (level_distance > 0),
    CONSTRAINT chk_different_ids CHECK (ancestor_id != descendant_id)
);

-- Indexes (seed, day 1 afternoon)
CREATE INDEX idx_affiliates_parent ON fature_v2.affiliates_optimized (parent_affiliate_id)
    WHERE parent_affiliate_id IS NOT NULL;
CREATE INDEX idx_affiliates_external ON fature_v2.affiliates_optimized (external_id);
CREATE INDEX idx_affiliates_status ON fature_v2.affiliates_optimized (status)
    WHERE status = 'active';
CREATE INDEX idx_affiliates_registration ON fature_v2.affiliates_optimized (registration_date);
CREATE INDEX idx_hierarchy_path_gist ON fature_v2.affiliates_optimized
    USING GIST (hierarchy_path);
CREATE INDEX idx_hierarchy_path_btree ON fature_v2.affiliates_optimized
    USING BTREE (hierarchy_path);

CREATE INDEX idx_ancestor_level ON fature_v2.hierarchy_index (ancestor_id, level_distance)
    WHERE is_active = true;
CREATE INDEX idx_descendant_level ON fature_v2.hierarchy_index (descendant_id, level_distance)
    WHERE is_active = true;
CREATE INDEX idx_level_distance ON fature_v2.hierarchy_index (level_distance)
    WHERE is_active = true;
CREATE INDEX idx_ancestor_active_level
    ON fature_v2.hierarchy_index (ancestor_id, is_active, level_distance)
    WHERE is_active = true;
CREATE INDEX idx_performance_lookup ON fature_v2.affiliates_optimized (
    status, hierarchy_level, direct_referrals_count
) WHERE status = 'active' AND direct_referrals_count > 0;

-- Not in the seed: the ON DELETE CASCADE above and subtree moves look pairs up by
-- descendant alone, which the partial indexes above cannot serve.
CREATE INDEX idx_hierarchy_descendant ON fature_v2.hierarchy_index (descendant_id);
