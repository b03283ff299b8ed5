//! The `cutover` command line: parses arguments and calls the library.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use cutover::{connect, migrate};

#[derive(Parser)]
#[command(
    name = "cutover",
    version,
    about = "Carry a live application through a PostgreSQL schema migration"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Apply the migrations (fature_v2 schema, cutover state) in order, each in a
    /// transaction, recorded in cutover.schema_migrations with a checksum.
    ///
    /// A second run does nothing. An applied migration whose file changed is refused, as
    /// is a database that records a migration this binary does not know. Concurrent runs
    /// wait for each other.
    Migrate {
        /// PostgreSQL URL: postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE
        #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
        database_url: String,
        /// Read migrations from this directory instead of those built into the binary.
        #[arg(long, value_name = "DIR")]
        migrations_dir: Option<PathBuf>,
        /// List what would be applied, change nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CUTOVER_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();

    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Migrate {
            database_url,
            migrations_dir,
            dry_run,
        } => {
            let config = connect::parse_url(&database_url)?;
            let set = match migrations_dir {
                Some(dir) => migrate::MigrationSet::from_dir(&dir)?,
                None => migrate::MigrationSet::embedded(),
            };
            let report = migrate::run(&config, &set, dry_run).await?;
            println!("{report}");
            Ok(ExitCode::SUCCESS)
        }
    }
}
