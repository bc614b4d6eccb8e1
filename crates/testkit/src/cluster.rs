//! A private PostgreSQL cluster for tests that stop and restart the database server itself
//! (the fault suite's F2) or need a quiet one of their own: `initdb` into a temporary
//! directory, served on a free port of 127.0.0.1 with trust authentication, removed on drop.
//! It uses the machine's PostgreSQL binaries (`pg_config --bindir`); as root, they run as the
//! `postgres` user, since PostgreSQL refuses to run as root.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::Unavailable;

/// How to stop the server: PostgreSQL's shutdown modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopMode {
    /// Disconnects every client and shuts down cleanly.
    Fast,
    /// Aborts every process without a clean shutdown (a crash); recovery runs at the next
    /// start.
    Immediate,
}

/// A PostgreSQL cluster of the test's own.
#[derive(Debug)]
pub struct PrivateCluster {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    as_postgres: bool,
    options: String,
}

impl PrivateCluster {
    /// Creates a cluster in a fresh temporary directory and starts it.
    ///
    /// # Errors
    /// [`Unavailable::Skip`] when the machine has no PostgreSQL binaries, outside CI.
    ///
    /// # Panics
    /// When the binaries exist but the cluster cannot be created or started (the message holds
    /// the server's log), or under CI when the binaries are missing.
    pub fn start() -> Result<PrivateCluster, Unavailable> {
        PrivateCluster::start_with("")
    }

    /// As [`PrivateCluster::start`], with extra server options (`-c name=value …`), such as
    /// `-c shared_preload_libraries=pg_stat_statements` for counting statements.
    ///
    /// # Errors
    /// As [`PrivateCluster::start`].
    ///
    /// # Panics
    /// As [`PrivateCluster::start`].
    pub fn start_with(options: &str) -> Result<PrivateCluster, Unavailable> {
        let bin = match Command::new("pg_config").arg("--bindir").output() {
            Ok(out) if out.status.success() => {
                PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
            }
            _ if std::env::var_os("CI").is_none() => {
                return Err(Unavailable::Skip(
                    "pg_config is not on PATH: no PostgreSQL binaries for a private cluster"
                        .to_owned(),
                ));
            }
            _ => panic!("CI requires PostgreSQL's binaries (pg_config --bindir)"),
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap_or_else(|e| panic!("finding a free port: {e}"));
        let dir = std::env::temp_dir().join(format!(
            "batch-pg-{}-{}",
            std::process::id(),
            uuid::Uuid::now_v7().simple()
        ));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        let as_postgres = is_root();
        let cluster = PrivateCluster {
            bin,
            dir,
            port,
            as_postgres,
            options: options.to_owned(),
        };
        if as_postgres {
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&cluster.dir)
                .status();
            assert!(
                status.is_ok_and(|s| s.success()),
                "chown of {} to postgres failed",
                cluster.dir.display()
            );
        }
        let data = cluster.data();
        cluster.run(
            "initdb",
            &[
                "-D",
                &data,
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
                "-E",
                "UTF8",
            ],
        );
        cluster.start_again();
        Ok(cluster)
    }

    /// A URL of database `database` on the cluster (`postgres` always exists).
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The process id of the cluster's postmaster, from `postmaster.pid`; `None` while it is
    /// stopped. Benchmarks read the CPU time of it and its children from `/proc`.
    pub fn postmaster_pid(&self) -> Option<u32> {
        std::fs::read_to_string(PathBuf::from(self.data()).join("postmaster.pid"))
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }

    /// Stops the server in `mode` and waits until it is down.
    ///
    /// # Panics
    /// When `pg_ctl` fails.
    pub fn stop(&self, mode: StopMode) {
        let mode = match mode {
            StopMode::Fast => "fast",
            StopMode::Immediate => "immediate",
        };
        self.run("pg_ctl", &["-D", &self.data(), "-m", mode, "-w", "stop"]);
    }

    /// Starts the (stopped) server again on the same port and waits until it accepts
    /// connections. `fsync` is off (an operating-system crash is not simulated, a server crash
    /// is: the data stays in the page cache); commits stay synchronous, so an immediate stop
    /// loses no committed transaction.
    ///
    /// # Panics
    /// When it does not start; the message holds its log.
    pub fn start_again(&self) {
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c fsync=off \
             -c full_page_writes=off -c max_connections=200 {}",
            self.port,
            self.dir.display(),
            self.options
        );
        let log = self.dir.join("server.log");
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data(),
                "-l",
                &log.display().to_string(),
                "-o",
                &options,
                "-w",
                "-t",
                "60",
                "start",
            ],
        );
    }

    fn data(&self) -> String {
        self.dir.join("data").display().to_string()
    }

    /// Runs one of the PostgreSQL binaries, as `postgres` when this process is root.
    fn run(&self, program: &str, args: &[&str]) {
        let path = self.bin.join(program);
        let mut command = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&path);
            c
        } else {
            Command::new(&path)
        };
        let out = command
            .args(args)
            .current_dir(&self.dir)
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", path.display()));
        assert!(
            out.status.success(),
            "{program} {args:?} failed: {}{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
        );
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        let path = self.bin.join("pg_ctl");
        let data = self.data();
        let args = ["-D", data.as_str(), "-m", "immediate", "-w", "stop"];
        let _ = if self.as_postgres {
            Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(&path)
                .args(args)
                .output()
        } else {
            Command::new(&path).args(args).output()
        };
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Whether this process runs as root (uid 0), read from `/proc/self/status`.
fn is_root() -> bool {
    std::fs::read_to_string(Path::new("/proc/self/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().next().map(|uid| uid == "0"))
        })
        .unwrap_or(false)
}
