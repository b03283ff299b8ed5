//! A private, throwaway PostgreSQL cluster started from the system's server binaries, for
//! the tests and `cutover demo`.
//!
//! Owns the cluster's whole life: finding `initdb`/`pg_ctl`, a temporary directory, a free
//! port on 127.0.0.1 plus a Unix socket in the directory, and removal. `initdb` refuses to
//! run as root, so as root the server runs as the `postgres` system user. Cleanup happens on
//! drop, and also — because a test binary keeps its cluster in a static that is never
//! dropped, and a process may be killed — through a small watchdog that stops the server
//! and removes the directory once the owning process is gone. It must never touch a
//! cluster it did not create.

use std::{
    fs,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use tokio_postgres::Config;

/// The superuser of every private cluster (trust authentication, loopback only).
pub const SUPERUSER: &str = "postgres";

#[derive(Debug, thiserror::Error)]
pub enum LocalPgError {
    #[error(
        "no PostgreSQL server binaries (initdb, pg_ctl) found in `pg_config --bindir` or /usr/lib/postgresql/*/bin; install them (Debian/Ubuntu: apt install postgresql postgresql-contrib) or set CUTOVER_PG_BINDIR"
    )]
    NoBinaries,

    #[error(
        "running as root, and there is no `postgres` system user to run the server as (initdb refuses root); create one (useradd --system postgres) or run as a normal user"
    )]
    NoServerUser,

    #[error("{step} failed: {detail}")]
    Step { step: &'static str, detail: String },

    #[error("cannot prepare the cluster directory: {0}")]
    Io(#[from] std::io::Error),
}

/// Options for a private cluster.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Extra `postgresql.conf` settings (`name`, `value`).
    pub settings: Vec<(String, String)>,
    /// Server binaries to use instead of the system's (a test builds an installation
    /// without `ltree` this way).
    pub bindir: Option<PathBuf>,
    /// `pg_hba.conf` lines placed before the default trust rules (e.g. to require md5 or
    /// SCRAM from some roles).
    pub hba: Vec<String>,
    /// Files written into the data directory before the server starts, readable by the
    /// server only (e.g. `server.crt` and `server.key` for `ssl = on`).
    pub files: Vec<(String, Vec<u8>)>,
}

/// A running private cluster. Stopped and removed on drop.
#[derive(Debug)]
pub struct LocalPg {
    dir: Option<tempfile::TempDir>,
    bindir: PathBuf,
    port: u16,
    run_as: Option<String>,
}

impl LocalPg {
    /// Starts a new cluster with default settings.
    pub fn start() -> Result<Self, LocalPgError> {
        Self::start_with(Options::default())
    }

    pub fn start_with(options: Options) -> Result<Self, LocalPgError> {
        let bindir = match options.bindir {
            Some(dir) => dir,
            None => find_bindir().ok_or(LocalPgError::NoBinaries)?,
        };
        let server_user = if is_root() {
            let ids = uid_gid_of("postgres").ok_or(LocalPgError::NoServerUser)?;
            Some(("postgres".to_owned(), ids))
        } else {
            None
        };

        let dir = tempfile::Builder::new().prefix("cutover-pg-").tempdir()?;
        if let Some((_, (uid, gid))) = &server_user {
            std::os::unix::fs::chown(dir.path(), Some(*uid), Some(*gid))?;
        }
        let run_as = server_user.map(|(user, _)| user);
        let mut pg = Self {
            dir: Some(dir),
            bindir,
            port: 0,
            run_as,
        };
        pg.spawn_watchdog()?;
        pg.initdb(&options.settings, &options.hba)?;
        pg.write_files(&options.files)?;
        pg.start_server()?;
        Ok(pg)
    }

    fn dir(&self) -> &Path {
        // Only `None` after `stop`, which consumes the directory last.
        self.dir
            .as_ref()
            .expect("cluster directory exists while running")
            .path()
    }

    fn data_dir(&self) -> PathBuf {
        self.dir().join("data")
    }

    /// The TCP port the server listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The directory of the server's Unix socket.
    pub fn socket_dir(&self) -> PathBuf {
        self.dir().to_owned()
    }

    /// A `postgres://` URL for `dbname` as the superuser, over TCP.
    pub fn url(&self, dbname: &str) -> String {
        format!("postgres://{SUPERUSER}@127.0.0.1:{}/{dbname}", self.port)
    }

    /// A connection config for `dbname` as the superuser, over TCP.
    pub fn config(&self, dbname: &str) -> Config {
        let mut config = Config::new();
        config
            .host("127.0.0.1")
            .port(self.port)
            .user(SUPERUSER)
            .dbname(dbname);
        config
    }

    /// The server binaries' directory (for psql, pgbench and friends).
    pub fn bindir(&self) -> &Path {
        &self.bindir
    }

    fn command(&self, program: &str) -> Command {
        let exe = self.bindir.join(program);
        match &self.run_as {
            Some(user) => {
                let mut cmd = Command::new("runuser");
                cmd.args(["-u", user, "--"]).arg(exe);
                cmd
            }
            None => Command::new(exe),
        }
    }

    fn run(&self, step: &'static str, mut cmd: Command) -> Result<(), LocalPgError> {
        let output = cmd
            .stdin(Stdio::null())
            .output()
            .map_err(|e| LocalPgError::Step {
                step,
                detail: e.to_string(),
            })?;
        if output.status.success() {
            return Ok(());
        }
        let mut detail = String::from_utf8_lossy(&output.stderr).trim().to_owned();
        if detail.is_empty() {
            detail = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        }
        Err(LocalPgError::Step { step, detail })
    }

    fn initdb(&self, settings: &[(String, String)], hba: &[String]) -> Result<(), LocalPgError> {
        let mut cmd = self.command("initdb");
        cmd.arg("-D")
            .arg(self.data_dir())
            .args(["-U", SUPERUSER, "-A", "trust", "-E", "UTF8"])
            .args(["--locale=C.UTF-8", "--no-sync", "--no-instructions"]);
        self.run("initdb", cmd)?;

        let mut conf = String::from(
            "\n# cutover private cluster\n\
             listen_addresses = '127.0.0.1'\n\
             fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n\
             max_connections = 300\nshared_buffers = '128MB'\n\
             log_min_messages = warning\n",
        );
        conf.push_str(&format!(
            "unix_socket_directories = '{}'\n",
            self.dir().display()
        ));
        for (name, value) in settings {
            conf.push_str(&format!("{name} = '{}'\n", value.replace('\'', "''")));
        }
        let path = self.data_dir().join("postgresql.conf");
        let mut existing = fs::read_to_string(&path)?;
        existing.push_str(&conf);
        fs::write(&path, existing)?;

        let mut rules = hba.join("\n");
        rules.push_str(
            "\nlocal all all trust\nhost all all 127.0.0.1/32 trust\nhost all all ::1/128 trust\n",
        );
        fs::write(self.data_dir().join("pg_hba.conf"), rules)?;
        Ok(())
    }

    fn write_files(&self, files: &[(String, Vec<u8>)]) -> Result<(), LocalPgError> {
        use std::os::unix::fs::PermissionsExt;
        for (name, contents) in files {
            let path = self.data_dir().join(name);
            fs::write(&path, contents)?;
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600))?;
            if let Some((uid, gid)) = self.run_as.as_deref().and_then(uid_gid_of) {
                std::os::unix::fs::chown(&path, Some(uid), Some(gid))?;
            }
        }
        Ok(())
    }

    fn start_server(&mut self) -> Result<(), LocalPgError> {
        // A port taken between probing and binding makes pg_ctl fail: try a few.
        let mut last = None;
        for _ in 0..5 {
            let port = free_port()?;
            let mut cmd = self.command("pg_ctl");
            cmd.arg("-D")
                .arg(self.data_dir())
                .arg("-l")
                .arg(self.dir().join("server.log"))
                .args(["-w", "-t", "60", "-o"])
                .arg(format!("-p {port}"))
                .arg("start");
            match self.run("pg_ctl start", cmd) {
                Ok(()) => {
                    self.port = port;
                    return Ok(());
                }
                Err(e) => last = Some(e),
            }
        }
        let log = fs::read_to_string(self.dir().join("server.log")).unwrap_or_default();
        Err(match last {
            Some(LocalPgError::Step { step, detail }) => LocalPgError::Step {
                step,
                detail: format!("{detail}\n{log}"),
            },
            Some(other) => other,
            None => unreachable!("the loop runs at least once"),
        })
    }

    /// Stops the server and removes the directory. Idempotent.
    pub fn stop(&mut self) {
        if self.dir.is_none() {
            return;
        }
        let mut cmd = self.command("pg_ctl");
        cmd.arg("-D")
            .arg(self.data_dir())
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let _ = cmd.status();
        // Dropping the TempDir removes it (root may remove the postgres-owned files).
        self.dir.take();
    }

    /// Stops the cluster and removes its directory once this process is gone, however it
    /// ends (a panic in a test that holds the cluster in a static, a kill, Ctrl-C).
    fn spawn_watchdog(&self) -> Result<(), LocalPgError> {
        let pid = std::process::id();
        let data = self.data_dir();
        let pg_ctl = self.bindir.join("pg_ctl");
        let stop = match &self.run_as {
            Some(user) => format!(
                "runuser -u {user} -- '{}' -D '{}' -m immediate stop",
                pg_ctl.display(),
                data.display()
            ),
            None => format!(
                "'{}' -D '{}' -m immediate stop",
                pg_ctl.display(),
                data.display()
            ),
        };
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; \
             if [ -f '{data}/postmaster.pid' ]; then {stop}; fi; rm -rf '{dir}'",
            data = data.display(),
            dir = self.dir().display(),
        );
        // setsid: a Ctrl-C to the owner's process group must not take the watchdog too.
        Command::new("setsid")
            .args(["sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| LocalPgError::Step {
                step: "start the cleanup watchdog",
                detail: e.to_string(),
            })?;
        Ok(())
    }
}

impl Drop for LocalPg {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `CUTOVER_PG_BINDIR`, then `pg_config --bindir`, then the newest `/usr/lib/postgresql/*/bin`.
pub fn find_bindir() -> Option<PathBuf> {
    let has_server = |dir: &Path| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file();
    if let Some(dir) = std::env::var_os("CUTOVER_PG_BINDIR") {
        return Some(PathBuf::from(dir)).filter(|d| has_server(d));
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if has_server(&dir) {
            return Some(dir);
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            has_server(&bin).then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, dir)| dir)
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The system user's uid and gid, from `id` (no getpwnam: it is not thread-safe).
fn uid_gid_of(user: &str) -> Option<(u32, u32)> {
    let id = |flag: &str| -> Option<u32> {
        let out = Command::new("id").args([flag, user]).output().ok()?;
        if !out.status.success() {
            return None;
        }
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    };
    Some((id("-u")?, id("-g")?))
}
