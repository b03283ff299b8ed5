-- fature_v2 transactions and real-time commissions (seed plan, day 4 morning).
--
-- A commission-eligible transaction pays its source affiliate's ancestors at distance
-- 1..5 (5%, 3%, 2%, 1%, 0.5% of the amount), each only if that ancestor is active; an
-- inactive ancestor's share is not passed up (the seed's rule, kept as written).

-- Missing from the seed: calculate_commissions_auto() draws batch ids from it.
CREATE SEQUENCE fature_v2.commission_batch_seq;

CREATE TABLE fature_v2.transactions (
    transaction_id          BIGSERIAL PRIMARY KEY,
    affiliate_id            BIGINT NOT NULL,
    transaction_type        VARCHAR(50) NOT NULL,
    amount                  DECIMAL(15,2) NOT NULL,
    currency                VARCHAR(3) DEFAULT 'BRL',
    transaction_date        TIMESTAMP DEFAULT NOW(),

    commission_eligible     BOOLEAN DEFAULT true,
    commission_processed    BOOLEAN DEFAULT false,
    commission_batch_id     BIGINT,

    external_transaction_id VARCHAR(100),
    metadata                JSONB,

    created_at              TIMESTAMP DEFAULT NOW(),
    updated_at              TIMESTAMP DEFAULT NOW(),

    FOREIGN KEY (affiliate_id) REFERENCES fature_v2.affiliates_optimized (affiliate_id),

    CONSTRAINT chk_positive_amount CHECK (amount > 0),
    CONSTRAINT chk_valid_type CHECK (
        transaction_type IN ('deposit', 'bet', 'withdrawal', 'bonus')
    )
);

CREATE INDEX idx_transactions_affiliate
    ON fature_v2.transactions (affiliate_id, transaction_date);
CREATE INDEX idx_transactions_processing
    ON fature_v2.transactions (commission_eligible, commission_processed, transaction_date);
CREATE INDEX idx_transactions_type
    ON fature_v2.transactions (transaction_type, transaction_date);

CREATE TABLE fature_v2.commissions (
    commission_id            BIGSERIAL PRIMARY KEY,
    transaction_id           BIGINT NOT NULL,
    beneficiary_affiliate_id BIGINT NOT NULL,
    source_affiliate_id      BIGINT NOT NULL,
    level_distance           INTEGER NOT NULL,

    base_amount              DECIMAL(15,2) NOT NULL,
    commission_rate          DECIMAL(5,4) NOT NULL,
    commission_amount        DECIMAL(15,2) NOT NULL,
    currency                 VARCHAR(3) DEFAULT 'BRL',

    status                   VARCHAR(20) DEFAULT 'pending',
    processed_at             TIMESTAMP,
    paid_at                  TIMESTAMP,

    created_at               TIMESTAMP DEFAULT NOW(),
    batch_id                 BIGINT,

    FOREIGN KEY (transaction_id) REFERENCES fature_v2.transactions (transaction_id),
    FOREIGN KEY (beneficiary_affiliate_id)
        REFERENCES fature_v2.affiliates_optimized (affiliate_id),
    FOREIGN KEY (source_affiliate_id)
        REFERENCES fature_v2.affiliates_optimized (affiliate_id),

    CONSTRAINT chk_positive_amounts CHECK (
        base_amount > 0 AND commission_amount > 0 AND commission_rate > 0
    ),
    CONSTRAINT chk_valid_status CHECK (
        status IN ('pending', 'approved', 'paid', 'cancelled', 'disputed')
    ),
    CONSTRAINT chk_positive_level CHECK (level_distance > 0)
);

CREATE INDEX idx_commissions_beneficiary
    ON fature_v2.commissions (beneficiary_affiliate_id, status);
CREATE INDEX idx_commissions_transaction
    ON fature_v2.commissions (transaction_id, level_distance);
CREATE INDEX idx_commissions_processing
    ON fature_v2.commissions (status, created_at, batch_id);
CREATE INDEX idx_commissions_payment
    ON fature_v2.commissions (status, paid_at) WHERE status = 'paid';
-- Not in the seed: the foreign key on source_affiliate_id is checked on every delete of
-- an affiliate; without an index that check reads the whole table.
CREATE INDEX idx_commissions_source ON fature_v2.commissions (source_affiliate_id);

-- One transaction's commissions, in one statement; returns the batch id.
-- Shares that round to 0.00 are not paid (commissions require a positive amount).
CREATE FUNCTION fature_v2.pay_commissions(
    p_transaction_id BIGINT,
    p_affiliate_id   BIGINT,
    p_amount         DECIMAL(15,2),
    p_currency       VARCHAR(3)
) RETURNS BIGINT
LANGUAGE plpgsql
SET search_path = fature_v2, public
AS $$
DECLARE
    batch BIGINT := nextval('commission_batch_seq');
BEGIN
    INSERT INTO commissions (
        transaction_id, beneficiary_affiliate_id, source_affiliate_id,
        level_distance, base_amount, commission_rate, commission_amount,
        currency, batch_id
    )
    SELECT p_transaction_id, hi.ancestor_id, p_affiliate_id,
           rules.level_distance, p_amount, rules.commission_rate,
           round(p_amount * rules.commission_rate, 2),
           p_currency, batch
    FROM (VALUES
        (1, 0.05),    -- 5%   level 1
        (2, 0.03),    -- 3%   level 2
        (3, 0.02),    -- 2%   level 3
        (4, 0.01),    -- 1%   level 4
        (5, 0.005)    -- 0.5% level 5
    ) AS rules(level_distance, commission_rate)
    JOIN hierarchy_index hi
      ON hi.descendant_id = p_affiliate_id
     AND hi.level_distance = rules.level_distance
     AND hi.is_active = true
    JOIN affiliates_optimized a
      ON a.affiliate_id = hi.ancestor_id
     AND a.status = 'active'
    WHERE round(p_amount * rules.commission_rate, 2) > 0;

    RETURN batch;
END;
$$;

-- The seed's trigger: a transaction made eligible later is paid when it is updated.
CREATE FUNCTION fature_v2.calculate_commissions_auto()
RETURNS TRIGGER
LANGUAGE plpgsql
SET search_path = fature_v2, public
AS $$
BEGIN
    IF NOT NEW.commission_eligible THEN
        RETURN NEW;
    END IF;

    NEW.commission_batch_id := pay_commissions(
        NEW.transaction_id, NEW.affiliate_id, NEW.amount, NEW.currency);
    NEW.commission_processed := true;
    NEW.updated_at := NOW();
    RETURN NEW;
END;
$$;

CREATE TRIGGER trg_calculate_commissions_auto
    BEFORE UPDATE OF commission_eligible ON fature_v2.transactions
    FOR EACH ROW
    WHEN (NEW.commission_eligible = true AND OLD.commission_processed = false)
    EXECUTE FUNCTION fature_v2.calculate_commissions_auto();

-- Not in the seed: a transaction inserted eligible is paid at once ("real time"). The
-- commissions reference the transaction, so this must run AFTER its row exists.
CREATE FUNCTION fature_v2.calculate_commissions_on_insert()
RETURNS TRIGGER
LANGUAGE plpgsql
SET search_path = fature_v2, public
AS $$
BEGIN
    UPDATE transactions
    SET commission_processed = true,
        commission_batch_id = pay_commissions(
            NEW.transaction_id, NEW.affiliate_id, NEW.amount, NEW.currency),
        updated_at = NOW()
    WHERE transaction_id = NEW.transaction_id;
    RETURN NULL;
END;
$$;

CREATE TRIGGER trg_calculate_commissions_insert
    AFTER INSERT ON fature_v2.transactions
    FOR EACH ROW
    WHEN (NEW.commission_eligible = true AND NEW.commission_processed = false)
    EXECUTE FUNCTION fature_v2.calculate_commissions_on_insert();
