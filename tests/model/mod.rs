//! The model behind tests/safe_cutover.rs and `cargo bench --bench safe_cutover`: random
//! transactions from the application's statement mix, run directly on one copy of a tree and
//! through the proxy on another, every answer and both tables compared (docs/routing.md,
//! "The invariant").

mod run;
mod statements;

#[allow(unused_imports)] // the long run's (benches/safe_cutover.rs)
pub(crate) use run::transactions_run;
pub(crate) use run::{base, check_case, runtime, set_stages};

use proptest::prelude::*;

/// Affiliates in the tree each case starts from.
pub(crate) const TREE: i64 = 60;

/// Named write types (all of them move to `target` together for the write side to flip).
pub(crate) const WRITE_TYPES: &[&str] = &[
    "new_affiliate",
    "bump_parent_referrals",
    "record_deposit",
    "set_status",
    "move_affiliate",
    "delete_affiliate",
    "upsert_by_external_id",
];
pub(crate) const READ_TYPES: &[&str] = &[
    "affiliate_by_id",
    "affiliate_by_external_id",
    "count_active",
    "top_referrers",
    "direct_referrals",
    "network_size",
    "network_by_level",
    "upline",
    "financial_summary",
    "registrations_per_day",
];

/// Columns whose values differ between the two copies for reasons outside the proxy:
/// `now()` at different instants, and the derived counter that v2 serves as its true count
/// (a declared difference: rules' `counter_drift`).
pub(crate) const MASKED: &[&str] = &[
    "registration_date",
    "created_at",
    "updated_at",
    "level_1_referrals",
];

// ------------------------------------------------------------------------------------------
// The generated workload
// ------------------------------------------------------------------------------------------

/// An affiliate a statement names: one of the tree's, or the last one this case inserted.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Key {
    Tree(i64),
    Last,
}

#[derive(Debug, Clone)]
pub(crate) enum Op {
    New {
        parent: i64,
        ext: u8,
    },
    Deposit {
        key: Key,
        cents: i64,
    },
    Status {
        key: Key,
        banned: bool,
    },
    Bump {
        key: Key,
    },
    Move {
        key: i64,
        parent: i64,
    },
    DeleteLeaf {
        key: Key,
    },
    DeleteReturning {
        key: Key,
    },
    Upsert {
        ext: u8,
        name: u8,
    },
    MultiInsert {
        parent: i64,
        ext: u8,
    },
    UpdateFrom {
        parent: Key,
    },
    LockRead {
        key: Key,
    },
    Read {
        key: Key,
    },
    Downline {
        key: i64,
    },
    Savepoint,
    RollbackToSavepoint,
    /// A new affiliate without a name: a NOT NULL violation whose DETAIL lists the failing
    /// row (timestamps given, so that the two sides' rows are the same).
    NewNoName {
        parent: i64,
        ext: u8,
    },
    /// New affiliates under one parent, one execution each (psycopg: `executemany`).
    ManyNew {
        parent: i64,
        exts: Vec<u8>,
    },
    /// Deposits on several affiliates, one execution each (psycopg: `executemany`).
    ManyDeposit {
        keys: Vec<Key>,
        cents: i64,
    },
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum End {
    Commit,
    Rollback,
    /// No BEGIN: each statement on its own.
    Autocommit,
}

/// The client a transaction runs on, and how it talks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Driver {
    /// tokio-postgres, the simple protocol (values inline).
    TokioSimple,
    /// tokio-postgres, the extended protocol (a named statement per execution).
    TokioExtended,
    /// psycopg's ClientCursor (values merged client-side).
    PsycopgClient,
    /// psycopg's default cursor (the extended protocol, unnamed statements).
    PsycopgServer,
    /// psycopg with prepare=True (named prepared statements, reused).
    PsycopgPrepared,
    /// psycopg's pipeline mode: the whole transaction sent before its answers are read.
    PsycopgPipeline,
}

impl Driver {
    fn psycopg_mode(self) -> Option<&'static str> {
        match self {
            Driver::TokioSimple | Driver::TokioExtended => None,
            Driver::PsycopgClient => Some("client"),
            Driver::PsycopgServer => Some("server"),
            Driver::PsycopgPrepared => Some("prepared"),
            Driver::PsycopgPipeline => Some("pipeline"),
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Tx {
    pub(crate) ops: Vec<Op>,
    pub(crate) end: End,
    pub(crate) driver: Driver,
}

#[derive(Debug, Clone)]
pub(crate) struct Phase {
    /// Every write type at `target` (the table's write side is the target).
    pub(crate) writes_at_target: bool,
    /// Stages of the write types otherwise, and of the read types: (stage, percent).
    pub(crate) write_stages: Vec<(&'static str, i16)>,
    pub(crate) read_stages: Vec<(&'static str, i16)>,
    pub(crate) txs: Vec<Tx>,
}

pub(crate) fn key() -> impl Strategy<Value = Key> {
    prop_oneof![(1..=TREE).prop_map(Key::Tree), Just(Key::Last)]
}

pub(crate) fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (1..=TREE, 0u8..12).prop_map(|(parent, ext)| Op::New { parent, ext }),
        3 => (key(), 1i64..500).prop_map(|(key, cents)| Op::Deposit { key, cents }),
        1 => (key(), any::<bool>()).prop_map(|(key, banned)| Op::Status { key, banned }),
        2 => key().prop_map(|key| Op::Bump { key }),
        // Parent below the key: no cycle (v2 refuses them: a declared behaviour change).
        1 => (2..=TREE).prop_flat_map(|key| (Just(key), 1..key))
            .prop_map(|(key, parent)| Op::Move { key, parent }),
        1 => key().prop_map(|key| Op::DeleteLeaf { key }),
        1 => key().prop_map(|key| Op::DeleteReturning { key }),
        1 => (0u8..12, any::<u8>()).prop_map(|(ext, name)| Op::Upsert { ext, name }),
        1 => (1..=TREE, 0u8..12).prop_map(|(parent, ext)| Op::MultiInsert { parent, ext }),
        1 => key().prop_map(|parent| Op::UpdateFrom { parent }),
        2 => key().prop_map(|key| Op::LockRead { key }),
        2 => key().prop_map(|key| Op::Read { key }),
        1 => (1..=TREE).prop_map(|key| Op::Downline { key }),
        1 => Just(Op::Savepoint),
        1 => Just(Op::RollbackToSavepoint),
        1 => (1..=TREE, 0u8..12).prop_map(|(parent, ext)| Op::NewNoName { parent, ext }),
        1 => (1..=TREE, prop::collection::vec(0u8..12, 2..5))
            .prop_map(|(parent, exts)| Op::ManyNew { parent, exts }),
        1 => (prop::collection::vec(key(), 2..5), 1i64..500)
            .prop_map(|(keys, cents)| Op::ManyDeposit { keys, cents }),
    ]
}

pub(crate) fn driver() -> impl Strategy<Value = Driver> {
    prop_oneof![
        Just(Driver::TokioSimple),
        Just(Driver::TokioExtended),
        Just(Driver::PsycopgClient),
        Just(Driver::PsycopgServer),
        Just(Driver::PsycopgPrepared),
        Just(Driver::PsycopgPipeline),
    ]
}

pub(crate) fn tx() -> impl Strategy<Value = Tx> {
    (
        prop::collection::vec(op(), 1..6),
        prop_oneof![
            3 => Just(End::Commit),
            1 => Just(End::Rollback),
            1 => Just(End::Autocommit)
        ],
        driver(),
    )
        .prop_map(|(ops, end, driver)| Tx { ops, end, driver })
}

pub(crate) fn stage() -> impl Strategy<Value = (&'static str, i16)> {
    prop_oneof![
        Just(("shadow", 0)),
        Just(("cutover", 50)),
        Just(("target", 100))
    ]
}

pub(crate) fn phase() -> impl Strategy<Value = Phase> {
    (
        any::<bool>(),
        prop::collection::vec(stage(), WRITE_TYPES.len()),
        prop::collection::vec(stage(), READ_TYPES.len()),
        prop::collection::vec(tx(), 1..16),
    )
        .prop_map(|(writes_at_target, write_stages, read_stages, txs)| Phase {
            writes_at_target,
            write_stages,
            read_stages,
            txs,
        })
}

/// A case: one to three phases, each with its stages and transactions.
pub(crate) fn case() -> impl Strategy<Value = Vec<Phase>> {
    prop::collection::vec(phase(), 1..4)
}
