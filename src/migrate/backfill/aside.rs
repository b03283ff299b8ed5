//! What the backfill sets aside while it loads (indexes, unique constraints, keys, triggers),
//! each recorded with the statement that puts it back, and putting it back.

use tokio_postgres::{Client, error::SqlState};

pub(super) enum Keys {
    SetAside,
    Restore,
}

/// What [`set_aside`] takes off a table besides its plain indexes and its unique
/// constraints (but the primary key, and any a key of another table references).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Aside {
    /// Its self-referencing (parent) key and its user triggers too.
    IndexesKeysTriggers,
    /// Nothing more.
    IndexesUnique,
}

/// Sets aside, on `table`, every index that backs no constraint, its unique constraints and
/// what `what` names besides — each recorded in
/// `cutover.backfill_set_aside` with the statement that puts it back, in the same
/// transaction as the drop.
pub(super) async fn set_aside(
    client: &Client,
    table: &str,
    what: Aside,
) -> Result<(), tokio_postgres::Error> {
    client
        .batch_execute("SET lock_timeout = '60s'; BEGIN")
        .await?;
    let mut aside: Vec<(String, String, String)> = client
        .query(
            "SELECT 'index ' || c.relname,
                    'DROP INDEX ' || i.indexrelid::regclass::text,
                    replace(pg_get_indexdef(i.indexrelid), 'CREATE INDEX ', 'CREATE INDEX IF NOT EXISTS ')
             FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
             WHERE i.indrelid = $1::text::regclass
               AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = i.indexrelid)",
            &[&table],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    // The unique constraints but the primary key (which the copy's anti-join and its
    // fallback rely on, and other tables' keys reference): a sorted build once after costs
    // less than a million insertions at random places (ids that do not follow the tree give
    // `external_id` no order).
    {
        let unique = client
            .query(
                "SELECT 'constraint ' || conname,
                        format('ALTER TABLE %s DROP CONSTRAINT %I', $1::text, conname),
                        format('ALTER TABLE %s ADD CONSTRAINT %I %s', $1::text, conname,
                               pg_get_constraintdef(oid))
                 FROM pg_constraint WHERE conrelid = $1::text::regclass AND contype = 'u'
                   AND NOT EXISTS (SELECT 1 FROM pg_constraint f
                                   WHERE f.contype = 'f' AND f.conindid = pg_constraint.conindid
                                     AND f.conrelid <> pg_constraint.conrelid)",
                &[&table],
            )
            .await?;
        aside.extend(unique.iter().map(|r| (r.get(0), r.get(1), r.get(2))));
    }
    if what == Aside::IndexesKeysTriggers {
        // The parent key, checked once at the end (VALIDATE) instead of once per row; the
        // user triggers (v2's hierarchy upkeep, which the plan does in bulk), not entered a
        // million times. The dual-write mirror's are left alone: the stages switch them
        // (migration 0024), and the backfill's sessions are silent to them
        // (`cutover.bulk_load`).
        let more = client
            .query(
                "SELECT 'constraint ' || conname,
                        format('ALTER TABLE %s DROP CONSTRAINT %I', $1::text, conname),
                        format('ALTER TABLE %s ADD CONSTRAINT %I %s NOT VALID; ALTER TABLE %s VALIDATE CONSTRAINT %I',
                               $1::text, conname, pg_get_constraintdef(oid), $1::text, conname)
                 FROM pg_constraint
                 WHERE conrelid = $1::text::regclass AND contype = 'f' AND confrelid = conrelid
                 UNION ALL
                 SELECT 'trigger ' || tgname,
                        format('ALTER TABLE %s DISABLE TRIGGER %I', $1::text, tgname),
                        format('ALTER TABLE %s ENABLE TRIGGER %I', $1::text, tgname)
                 FROM pg_trigger
                 WHERE tgrelid = $1::text::regclass AND NOT tgisinternal AND tgenabled <> 'D'
                   AND tgname NOT LIKE 'cutover\\_mirror\\_%'",
                &[&table],
            )
            .await?;
        aside.extend(more.iter().map(|r| (r.get(0), r.get(1), r.get(2))));
    }
    for (name, drop, restore) in aside {
        client
            .execute(
                "INSERT INTO cutover.backfill_set_aside (name, restore, relation) VALUES ($1, $2, $3)
                 ON CONFLICT (name) DO NOTHING",
                &[&name, &restore, &table],
            )
            .await?;
        client.batch_execute(&drop).await?;
    }
    client.batch_execute("COMMIT; RESET lock_timeout").await?;
    Ok(())
}

/// Puts back everything set aside (by any backfill run, this one or a killed one), on both
/// connections at once: see [`restore_set_aside`].
pub(super) async fn restore_set_aside_on(
    client: &Client,
    second: &Client,
) -> Result<(), tokio_postgres::Error> {
    tokio::try_join!(
        restore_set_aside(client, None),
        restore_set_aside(second, None)
    )?;
    Ok(())
}

/// Puts back what was set aside on `relation` (everything with `None`). Several connections
/// may do it at once: each takes the next item nobody has taken (index builds first, the GiST
/// one, the longest, before all), puts it back and strikes it off in one transaction. Two
/// indexes of one table build side by side; a constraint or a trigger waits for the builds on
/// its table.
pub(super) async fn restore_set_aside(
    client: &Client,
    relation: Option<&str>,
) -> Result<(), tokio_postgres::Error> {
    loop {
        client.batch_execute("BEGIN").await?;
        let Some(row) = client
            .query_opt(
                "SELECT name, restore FROM cutover.backfill_set_aside
                 WHERE $1::text IS NULL OR relation = $1
                 ORDER BY name LIKE 'index %' DESC, restore LIKE '% USING gist %' DESC, name
                 LIMIT 1 FOR UPDATE SKIP LOCKED",
                &[&relation],
            )
            .await?
        else {
            client.batch_execute("COMMIT").await?;
            return Ok(());
        };
        let (name, restore): (String, String) = (row.get(0), row.get(1));
        client.batch_execute(&restore).await?;
        client
            .execute(
                "DELETE FROM cutover.backfill_set_aside WHERE name = $1",
                &[&name],
            )
            .await?;
        client.batch_execute("COMMIT").await?;
    }
}

/// Sets the closure's keys, indexes and unique pair aside for its bulk load, noting first the
/// affiliates that already have their pairs.
pub(super) async fn closure_aside(client: &Client) -> Result<(), tokio_postgres::Error> {
    // The closure's two foreign keys would be checked row by row (a FOR KEY SHARE lock on an
    // affiliate per check: most of the load's time). Every pair the backfill inserts holds
    // by construction, so they are set aside and validated once at the end. A backfill
    // killed here leaves them aside until it is run again.
    closure_keys(client, Keys::SetAside).await?;
    // Its indexes, the unique pair among them, are built once at the end (a sorted build
    // each, instead of an insertion per pair into indexes in random order: 19 s against 7 s
    // for a million affiliates' 2.3 million pairs). Nobody else writes the closure
    // meanwhile: until the backfill is done dual-write hands it every key
    // (`cutover.backfill_running()`). The affiliates that already had their pairs (a
    // backfill run again over v2's rows) are noted first and skipped; putting the unique
    // pair back would refuse a duplicate, loudly.
    client
        .batch_execute(
            "CREATE UNLOGGED TABLE IF NOT EXISTS cutover.backfill_closure_present AS
                 SELECT DISTINCT descendant_id AS affiliate_id FROM fature_v2.hierarchy_index;
             CREATE UNIQUE INDEX IF NOT EXISTS backfill_closure_present_key
                 ON cutover.backfill_closure_present (affiliate_id);
             ANALYZE cutover.backfill_closure_present;",
        )
        .await?;
    set_aside(client, HIERARCHY_INDEX, Aside::IndexesUnique).await
}

/// The closure's keys back (its indexes are back with everything else set aside), and the
/// note of the affiliates that had pairs before dropped.
pub(super) async fn closure_restore(client: &Client) -> Result<(), tokio_postgres::Error> {
    closure_keys(client, Keys::Restore).await?;
    client
        .batch_execute("DROP TABLE cutover.backfill_closure_present")
        .await
}

pub(super) const HIERARCHY_INDEX: &str = "fature_v2.hierarchy_index";

/// The closure's foreign keys, as created by migration 0001.
pub(super) const CLOSURE_KEYS: [(&str, &str); 2] = [
    ("hierarchy_index_ancestor_id_fkey", "ancestor_id"),
    ("hierarchy_index_descendant_id_fkey", "descendant_id"),
];

pub(super) async fn closure_keys(client: &Client, what: Keys) -> Result<(), tokio_postgres::Error> {
    client.batch_execute("SET lock_timeout = '60s'").await?;
    for (name, column) in CLOSURE_KEYS {
        let exists: bool = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_constraint
                                WHERE conname = $1 AND conrelid = 'fature_v2.hierarchy_index'::regclass)",
                &[&name],
            )
            .await?
            .get(0);
        match (&what, exists) {
            (Keys::SetAside, true) => {
                client
                    .batch_execute(&format!(
                        "ALTER TABLE fature_v2.hierarchy_index DROP CONSTRAINT {name}"
                    ))
                    .await?;
            }
            (Keys::Restore, false) => {
                let add = format!(
                    "ALTER TABLE fature_v2.hierarchy_index ADD CONSTRAINT {name}
                         FOREIGN KEY ({column}) REFERENCES fature_v2.affiliates_optimized (affiliate_id)
                         ON DELETE CASCADE NOT VALID;
                     ALTER TABLE fature_v2.hierarchy_index VALIDATE CONSTRAINT {name};"
                );
                match client.batch_execute(&format!("BEGIN; {add} COMMIT")).await {
                    Err(e) if e.code() == Some(&SqlState::FOREIGN_KEY_VIOLATION) => {
                        // Pairs whose affiliate was deleted meanwhile (the cascade was aside
                        // too): rare, so looked for only when the validation finds one.
                        client.batch_execute("ROLLBACK").await?;
                        client
                            .batch_execute(&format!(
                                "BEGIN;
                                 DELETE FROM fature_v2.hierarchy_index h
                                 WHERE NOT EXISTS (SELECT 1 FROM fature_v2.affiliates_optimized a
                                                   WHERE a.affiliate_id = h.{column});
                                 {add}
                                 COMMIT"
                            ))
                            .await?;
                    }
                    Err(e) => {
                        let _ = client.batch_execute("ROLLBACK").await;
                        return Err(e);
                    }
                    Ok(()) => {}
                }
            }
            _ => {}
        }
    }
    client.batch_execute("RESET lock_timeout").await?;
    Ok(())
}
