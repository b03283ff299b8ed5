//! `cutover migrate`: the schema migrations in `migrations/`, applied in order, each in its
//! own transaction, recorded with a checksum in `cutover.schema_migrations`.
//!
//! Owns the migration files' life cycle: which exist (embedded at build time, or read from
//! a directory), which a database has, and applying the rest. An applied migration is
//! immutable: a file whose checksum changed, or a database that records a migration this
//! binary does not know, stops the run before anything is applied. Concurrent runs (several
//! replicas starting at once) serialize on an advisory lock.
//!
//! Also holds the seed's integrity checks of the `fature_v2` tree ([`integrity`]) and
//! `cutover verify` ([`verify`]).

pub mod backfill;
pub mod copy_in;
pub mod fold;
pub mod integrity;
pub mod progress;
pub mod repair;
pub mod tree;
pub mod verify;

use std::{
    fmt, fs, io,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use sha2::{Digest, Sha256};
use tokio_postgres::{Client, Config, error::SqlState};

use crate::net::connect::{self, ConnectError};

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/migrations.rs"));
}

/// Key of the advisory lock that serializes concurrent `migrate` runs ("cutover" in ASCII).
const MIGRATE_LOCK: i64 = 0x0063_7574_6f76_6572;

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(transparent)]
    Connect(#[from] ConnectError),

    #[error("cannot read migrations from {path}: {source}")]
    ReadDir { path: PathBuf, source: io::Error },

    #[error(
        "migration file {name} must be named VERSION_description.sql, with VERSION a number (e.g. 0005_add_index.sql)"
    )]
    BadName { name: String },

    #[error("migrations {first} and {second} have the same version {version}; renumber one")]
    DuplicateVersion {
        version: i64,
        first: String,
        second: String,
    },

    #[error(
        "migration {name} was applied on {applied_at} with checksum {recorded}, but the file now has checksum {current}; applied migrations are immutable: restore the file and put the change in a new migration"
    )]
    Changed {
        name: String,
        applied_at: String,
        recorded: String,
        current: String,
    },

    #[error(
        "the database records migration {name}, which this cutover does not have; run the cutover version (or --migrations-dir) that applied it"
    )]
    UnknownApplied { name: String },

    #[error(
        "migration {name} sorts before {latest}, which is already applied; give it a version after {latest}"
    )]
    OutOfOrder { name: String, latest: String },

    #[error(
        "the ltree extension is not available on the PostgreSQL server; install its contrib modules (Debian/Ubuntu: apt install postgresql-contrib, RHEL: postgresqlNN-contrib) and run migrate again"
    )]
    LtreeMissing,

    #[error(
        "role {role} does not own public.affiliates: dual-write switches the table's triggers on and off as stages change (ALTER TABLE); run migrate as the table's owner, or a member of the owning role"
    )]
    NotTableOwner { role: String },

    #[error(
        "role {role} lacks a privilege the migrations need ({message}); run migrate as the owner of database {database}, or GRANT CREATE ON DATABASE {database} TO {role}"
    )]
    InsufficientPrivilege {
        role: String,
        database: String,
        message: String,
    },

    #[error(
        "migration {name} failed at {location}: {message} (SQLSTATE {code}); nothing of it was applied"
    )]
    Failed {
        name: String,
        location: String,
        code: String,
        message: String,
    },

    #[error("database error while migrating: {0}")]
    Database(#[from] tokio_postgres::Error),
}

/// One migration file.
#[derive(Debug, Clone)]
pub struct Migration {
    pub version: i64,
    pub name: String,
    pub sql: String,
    /// SHA-256 of the file's bytes, hex.
    pub checksum: String,
}

impl Migration {
    pub fn new(name: &str, sql: &str) -> Result<Self, MigrateError> {
        let digits: String = name.chars().take_while(char::is_ascii_digit).collect();
        let version = digits
            .parse::<i64>()
            .ok()
            .filter(|_| name[digits.len()..].starts_with('_') && name.ends_with(".sql"))
            .ok_or_else(|| MigrateError::BadName {
                name: name.to_owned(),
            })?;
        Ok(Self {
            version,
            name: name.to_owned(),
            sql: sql.to_owned(),
            checksum: hex::encode(Sha256::digest(sql.as_bytes())),
        })
    }
}

/// The migrations a run knows, sorted by version, versions unique.
#[derive(Debug, Clone)]
pub struct MigrationSet {
    migrations: Vec<Migration>,
}

impl MigrationSet {
    /// The repository's `migrations/`, embedded at build time.
    pub fn embedded() -> Self {
        let files = embedded::EMBEDDED
            .iter()
            .map(|(n, s)| (n.to_string(), s.to_string()));
        // The embedded set is checked by a unit test; a bad name fails the build's tests.
        Self::from_files(files).expect("embedded migrations are well-formed")
    }

    /// Every `*.sql` file of a directory.
    pub fn from_dir(path: &Path) -> Result<Self, MigrateError> {
        let read_err = |source| MigrateError::ReadDir {
            path: path.to_owned(),
            source,
        };
        let mut files = Vec::new();
        for entry in fs::read_dir(path).map_err(read_err)? {
            let entry = entry.map_err(read_err)?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".sql") {
                files.push((name, fs::read_to_string(entry.path()).map_err(read_err)?));
            }
        }
        Self::from_files(files)
    }

    pub fn from_files(
        files: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, MigrateError> {
        let mut migrations = files
            .into_iter()
            .map(|(name, sql)| Migration::new(&name, &sql))
            .collect::<Result<Vec<_>, _>>()?;
        migrations.sort_by(|a, b| (a.version, &a.name).cmp(&(b.version, &b.name)));
        if let Some(pair) = migrations.windows(2).find(|w| w[0].version == w[1].version) {
            return Err(MigrateError::DuplicateVersion {
                version: pair[0].version,
                first: pair[0].name.clone(),
                second: pair[1].name.clone(),
            });
        }
        Ok(Self { migrations })
    }

    pub fn iter(&self) -> impl Iterator<Item = &Migration> {
        self.migrations.iter()
    }
}

/// What a run did (or, with `dry_run`, would do).
#[derive(Debug, Default)]
pub struct Report {
    /// Migrations already recorded in the database before this run.
    pub already_applied: usize,
    /// Migrations applied by this run (or pending, on a dry run), in order.
    pub applied: Vec<Applied>,
    pub dry_run: bool,
}

#[derive(Debug)]
pub struct Applied {
    pub name: String,
    pub took: Duration,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.applied.is_empty() {
            return write!(
                f,
                "database is up to date ({} migrations applied)",
                self.already_applied
            );
        }
        for m in &self.applied {
            if self.dry_run {
                writeln!(f, "would apply {}", m.name)?;
            } else {
                writeln!(f, "applied {} ({} ms)", m.name, m.took.as_millis())?;
            }
        }
        let verb = if self.dry_run {
            "would apply"
        } else {
            "applied"
        };
        write!(
            f,
            "{verb} {} migrations ({} already applied)",
            self.applied.len(),
            self.already_applied
        )
    }
}

/// A migration the database records.
struct Recorded {
    name: String,
    checksum: String,
    applied_at: String,
}

/// Applies every migration of `set` that the database does not have yet.
pub async fn run(
    config: &Config,
    set: &MigrationSet,
    dry_run: bool,
) -> Result<Report, MigrateError> {
    let client = connect::connect(config).await?;
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATE_LOCK])
        .await?;
    let result = run_locked(&client, set, dry_run).await;
    // Closing the connection releases the lock too; unlock explicitly to be tidy.
    let _ = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATE_LOCK])
        .await;
    result
}

async fn run_locked(
    client: &Client,
    set: &MigrationSet,
    dry_run: bool,
) -> Result<Report, MigrateError> {
    let recorded = recorded_migrations(client).await?;
    let pending = pending(set, &recorded)?;
    let mut report = Report {
        already_applied: recorded.len(),
        applied: Vec::new(),
        dry_run,
    };
    if dry_run {
        // What would stop the real run stops the dry one (no ltree, no legacy table).
        if !pending.is_empty() {
            prerequisites(client).await?;
        }
        report.applied = pending
            .iter()
            .map(|m| Applied {
                name: m.name.clone(),
                took: Duration::ZERO,
            })
            .collect();
        return Ok(report);
    }
    if pending.is_empty() {
        return Ok(report);
    }

    preflight(client).await?;
    for migration in pending {
        let started = Instant::now();
        apply(client, migration).await?;
        let took = started.elapsed();
        tracing::info!(migration = %migration.name, ms = took.as_millis() as u64, "applied");
        report.applied.push(Applied {
            name: migration.name.clone(),
            took,
        });
    }
    Ok(report)
}

/// The recorded migrations, oldest first; none when the bookkeeping table does not exist.
async fn recorded_migrations(client: &Client) -> Result<Vec<Recorded>, MigrateError> {
    let exists: bool = client
        .query_one(
            "SELECT to_regclass('cutover.schema_migrations') IS NOT NULL",
            &[],
        )
        .await?
        .get(0);
    if !exists {
        return Ok(Vec::new());
    }
    let rows = client
        .query(
            "SELECT name, checksum, to_char(applied_at, 'YYYY-MM-DD HH24:MI:SS TZ')
             FROM cutover.schema_migrations ORDER BY version",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Recorded {
            name: r.get(0),
            checksum: r.get(1),
            applied_at: r.get(2),
        })
        .collect())
}

/// Checks the recorded history against the files and returns what is left to apply.
fn pending<'a>(
    set: &'a MigrationSet,
    recorded: &[Recorded],
) -> Result<Vec<&'a Migration>, MigrateError> {
    for rec in recorded {
        let Some(file) = set.iter().find(|m| m.name == rec.name) else {
            return Err(MigrateError::UnknownApplied {
                name: rec.name.clone(),
            });
        };
        if file.checksum != rec.checksum {
            return Err(MigrateError::Changed {
                name: rec.name.clone(),
                applied_at: rec.applied_at.clone(),
                recorded: rec.checksum[..12.min(rec.checksum.len())].to_owned(),
                current: file.checksum[..12].to_owned(),
            });
        }
    }
    let latest = recorded
        .iter()
        .filter_map(|r| set.iter().find(|m| m.name == r.name))
        .max_by_key(|m| m.version);
    let pending: Vec<&Migration> = set
        .iter()
        .filter(|m| !recorded.iter().any(|r| r.name == m.name))
        .collect();
    if let (Some(latest), Some(first)) = (latest, pending.first())
        && first.version < latest.version
    {
        return Err(MigrateError::OutOfOrder {
            name: first.name.clone(),
            latest: latest.name.clone(),
        });
    }
    Ok(pending)
}

/// Refuses early, before anything is applied, what would certainly fail later.
/// Who runs a migration, where.
struct Prerequisites {
    role: String,
    database: String,
    have_schema: bool,
}

/// What a run needs before it starts (read-only: a dry run checks it too): `ltree`
/// available, and CREATE on the database.
async fn prerequisites(client: &Client) -> Result<Prerequisites, MigrateError> {
    let row = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'ltree'),
                    current_user::text, current_database()::text,
                    has_database_privilege(current_database(), 'CREATE'),
                    to_regnamespace('cutover') IS NOT NULL,
                    coalesce((SELECT pg_has_role(relowner, 'USAGE') FROM pg_class
                              WHERE oid = to_regclass('public.affiliates')), true)",
            &[],
        )
        .await?;
    let (ltree, role, database, may_create, have_schema, owns_table): (
        bool,
        String,
        String,
        bool,
        bool,
        bool,
    ) = (
        row.get(0),
        row.get(1),
        row.get(2),
        row.get(3),
        row.get(4),
        row.get(5),
    );
    if !ltree {
        return Err(MigrateError::LtreeMissing);
    }
    if !may_create {
        return Err(MigrateError::InsufficientPrivilege {
            role,
            database,
            message: "CREATE on the database, to create the fature_v2 and cutover schemas".into(),
        });
    }
    // Dual-write's triggers are switched with the stages by ALTER TABLE (migration 0024).
    if !owns_table {
        return Err(MigrateError::NotTableOwner { role });
    }
    Ok(Prerequisites {
        role,
        database,
        have_schema,
    })
}

async fn preflight(client: &Client) -> Result<(), MigrateError> {
    let Prerequisites {
        role,
        database,
        have_schema,
    } = prerequisites(client).await?;
    if !have_schema
        && let Err(error) = client
            .batch_execute("CREATE SCHEMA IF NOT EXISTS cutover")
            .await
    {
        return Err(match error.as_db_error() {
            Some(db) if *db.code() == SqlState::INSUFFICIENT_PRIVILEGE => {
                MigrateError::InsufficientPrivilege {
                    role,
                    database,
                    message: db.message().to_owned(),
                }
            }
            _ => MigrateError::Database(error),
        });
    }
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS cutover.schema_migrations (
                 version      BIGINT PRIMARY KEY,
                 name         TEXT NOT NULL UNIQUE,
                 checksum     TEXT NOT NULL,
                 applied_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
                 applied_by   TEXT NOT NULL DEFAULT current_user,
                 execution_ms BIGINT NOT NULL
             )",
        )
        .await?;
    Ok(())
}

/// Applies one migration and records it, in one transaction.
async fn apply(client: &Client, migration: &Migration) -> Result<(), MigrateError> {
    let started = Instant::now();
    client.batch_execute("BEGIN").await?;
    if let Err(error) = client.batch_execute(&migration.sql).await {
        let _ = client.batch_execute("ROLLBACK").await;
        return Err(failure(client, migration, error).await);
    }
    let took_ms = started.elapsed().as_millis() as i64;
    let recorded = client
        .execute(
            "INSERT INTO cutover.schema_migrations (version, name, checksum, execution_ms)
             VALUES ($1, $2, $3, $4)",
            &[
                &migration.version,
                &migration.name,
                &migration.checksum,
                &took_ms,
            ],
        )
        .await;
    if let Err(error) = recorded {
        let _ = client.batch_execute("ROLLBACK").await;
        return Err(error.into());
    }
    client.batch_execute("COMMIT").await?;
    Ok(())
}

/// Turns a failed migration into the error an operator can act on.
async fn failure(
    client: &Client,
    migration: &Migration,
    error: tokio_postgres::Error,
) -> MigrateError {
    let Some(db) = error.as_db_error() else {
        return MigrateError::Database(error);
    };
    let code = db.code();
    if *code == SqlState::UNDEFINED_FILE && db.message().contains("ltree") {
        return MigrateError::LtreeMissing;
    }
    if *code == SqlState::INSUFFICIENT_PRIVILEGE {
        let who = client
            .query_one("SELECT current_user::text, current_database()::text", &[])
            .await;
        let (role, database) = match who {
            Ok(row) => (row.get(0), row.get(1)),
            Err(_) => ("current role".to_owned(), "this database".to_owned()),
        };
        return MigrateError::InsufficientPrivilege {
            role,
            database,
            message: db.message().to_owned(),
        };
    }
    let location = match db.position() {
        Some(tokio_postgres::error::ErrorPosition::Original(pos)) => {
            let (line, col) = line_col(&migration.sql, *pos as usize);
            format!("line {line}, column {col}")
        }
        _ => db
            .where_()
            .map(|w| w.lines().next().unwrap_or(w).to_owned())
            .unwrap_or_else(|| "an unknown position".to_owned()),
    };
    MigrateError::Failed {
        name: migration.name.clone(),
        location,
        code: code.code().to_owned(),
        message: db.message().to_owned(),
    }
}

/// 1-based line and column of PostgreSQL's 1-based character position in `text`.
fn line_col(text: &str, position: usize) -> (usize, usize) {
    let before: String = text.chars().take(position.saturating_sub(1)).collect();
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_set_is_well_formed_and_ordered() {
        let set = MigrationSet::embedded();
        let versions: Vec<i64> = set.iter().map(|m| m.version).collect();
        assert!(!versions.is_empty());
        assert!(versions.windows(2).all(|w| w[0] < w[1]), "{versions:?}");
    }

    #[test]
    fn names_must_carry_a_version() {
        for bad in ["add_index.sql", "0005-add.sql", "0005_add.txt", "_0005.sql"] {
            assert!(
                matches!(Migration::new(bad, ""), Err(MigrateError::BadName { .. })),
                "{bad}"
            );
        }
        assert_eq!(Migration::new("0042_x.sql", "").unwrap().version, 42);
    }

    #[test]
    fn duplicate_versions_are_refused() {
        let files = [("01_a.sql", ""), ("1_b.sql", "")].map(|(n, s)| (n.into(), s.into()));
        assert!(matches!(
            MigrationSet::from_files(files),
            Err(MigrateError::DuplicateVersion { version: 1, .. })
        ));
    }

    #[test]
    fn positions_map_to_line_and_column() {
        let sql = "SELECT 1;\nSELEC 2;\n  x";
        assert_eq!(line_col(sql, 1), (1, 1));
        assert_eq!(line_col(sql, 11), (2, 1));
        assert_eq!(line_col(sql, 22), (3, 3));
    }

    fn recorded(name: &str, sql: &str) -> Recorded {
        Recorded {
            name: name.into(),
            checksum: Migration::new(name, sql).unwrap().checksum,
            applied_at: "2026-01-01".into(),
        }
    }

    fn set(files: &[(&str, &str)]) -> MigrationSet {
        MigrationSet::from_files(files.iter().map(|(n, s)| (n.to_string(), s.to_string()))).unwrap()
    }

    #[test]
    fn history_is_checked_against_the_files() {
        let files = set(&[("1_a.sql", "A"), ("2_b.sql", "B"), ("3_c.sql", "C")]);
        let left = pending(&files, &[recorded("1_a.sql", "A")]).unwrap();
        assert_eq!(left.iter().map(|m| m.version).collect::<Vec<_>>(), [2, 3]);

        let changed = pending(&files, &[recorded("1_a.sql", "A, edited")]);
        assert!(matches!(changed, Err(MigrateError::Changed { .. })));

        let unknown = pending(&files, &[recorded("9_z.sql", "Z")]);
        assert!(matches!(unknown, Err(MigrateError::UnknownApplied { .. })));

        let gap = pending(
            &files,
            &[recorded("1_a.sql", "A"), recorded("3_c.sql", "C")],
        );
        assert!(matches!(gap, Err(MigrateError::OutOfOrder { .. })));
    }
}
