use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Where Debian's PostgreSQL 15 server programs are (`dev/up` installs them).
const BIN: &str = "/usr/lib/postgresql/15/bin";

/// A PostgreSQL server of its own (loopback, a throwaway data directory), for tests that kill a
/// primary and promote a streaming standby without disturbing the shared `dev/up` cluster. Runs
/// as the `postgres` user, which the server programs require; stopped and removed on drop.
pub struct PostgresServer {
    dir: PathBuf,
    port: u16,
}

/// Runs a server program as `postgres`, as the role `outbox` where it connects (the password
/// `outbox`, as `dev/up` and [`PostgresServer::primary`] create it); panics with its output
/// when it fails.
fn run_as_postgres(program: &str, args: &[&str]) {
    let path = Path::new(BIN).join(program);
    assert!(
        path.exists(),
        "{} is missing: install PostgreSQL 15 with dev/up",
        path.display()
    );
    let output = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(&path)
        .args(args)
        .env("PGPASSWORD", "outbox")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    assert!(
        output.status.success(),
        "{program} {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

impl PostgresServer {
    /// A new primary: `initdb`, started, with the role and database `outbox` (password
    /// `outbox`, as in `dev/up`).
    pub fn primary() -> Self {
        let server = Self::unstarted();
        let data = server.data();
        run_as_postgres(
            "initdb",
            &["-D", &data, "-A", "trust", "-U", "postgres", "--no-sync"],
        );
        server.configure();
        server.start();
        let output = Command::new("psql")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &server.port.to_string(),
                "-U",
                "postgres",
            ])
            .args(["-d", "postgres", "-v", "ON_ERROR_STOP=1", "-q"])
            .args(["-c", "CREATE ROLE outbox LOGIN SUPERUSER PASSWORD 'outbox'"])
            .args(["-c", "CREATE DATABASE outbox OWNER outbox"])
            .output()
            .expect("run psql");
        assert!(
            output.status.success(),
            "create the outbox role: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        server
    }

    /// A streaming standby of the server at `source` (`host:port`: a primary whose superuser
    /// `outbox` may replicate, as here and in `dev/up`, or a proxy in front of it, which then
    /// carries the replication stream), made with `pg_basebackup` and started. Hot standby: it
    /// answers read-only queries.
    pub fn standby_of(source: &str) -> Self {
        let (host, port) = source.rsplit_once(':').expect("host:port");
        let server = Self::unstarted();
        let data = server.data();
        run_as_postgres(
            "pg_basebackup",
            &[
                "-h",
                host,
                "-p",
                port,
                "-U",
                "outbox",
                "-D",
                &data,
                "-R",
                "-X",
                "stream",
                "--no-sync",
                "-c",
                "fast",
            ],
        );
        server.configure();
        server.start();
        server
    }

    /// A data directory of its own (empty) and a port.
    fn unstarted() -> Self {
        let dir = std::env::temp_dir().join(format!("outbox-pg-{}", crate::short_id()));
        std::fs::create_dir_all(&dir).expect("create the data directory");
        let status = Command::new("chown")
            .args(["postgres:postgres"])
            .arg(&dir)
            .status()
            .expect("chown the data directory");
        assert!(status.success(), "chown {}", dir.display());
        PostgresServer {
            dir,
            port: crate::free_port(),
        }
    }

    fn data(&self) -> String {
        self.dir.join("data").display().to_string()
    }

    /// Loopback only, its own port and socket directory (appended last, so a standby's copy of
    /// its primary's settings is overridden); as many connections as `dev/up`'s cluster, which
    /// a hot standby of it needs at least.
    fn configure(&self) {
        // A copy of a Debian cluster has its configuration in /etc, not in the data directory.
        let hba = self.dir.join("data/pg_hba.conf");
        if !hba.exists() {
            std::fs::write(
                &hba,
                "local all all trust\nhost all all 127.0.0.1/32 trust\n\
                 host replication all 127.0.0.1/32 trust\n",
            )
            .expect("write pg_hba.conf");
            std::fs::write(self.dir.join("data/pg_ident.conf"), "").expect("write pg_ident.conf");
        }
        let conf = self.dir.join("data/postgresql.conf");
        let mut text = std::fs::read_to_string(&conf).unwrap_or_default();
        text.push_str(&format!(
            "\nlisten_addresses = '127.0.0.1'\nport = {}\nunix_socket_directories = '{}'\n\
             max_connections = 300\nshared_buffers = 64MB\nwal_level = replica\n\
             max_wal_senders = 10\nhot_standby = on\n",
            self.port,
            self.dir.display()
        ));
        std::fs::write(&conf, text).expect("write postgresql.conf");
        let status = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(self.dir.join("data"))
            .status()
            .expect("chown the data directory");
        assert!(status.success(), "chown {}", self.dir.display());
    }

    fn start(&self) {
        let log = self.dir.join("server.log").display().to_string();
        run_as_postgres(
            "pg_ctl",
            &["-D", &self.data(), "-l", &log, "-w", "-t", "60", "start"],
        );
    }

    /// `127.0.0.1:<port>`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// A URL for the `outbox` role and database.
    pub fn url(&self) -> String {
        format!("postgres://outbox:outbox@127.0.0.1:{}/outbox", self.port)
    }

    /// SIGKILLs the server and its backends at once, as a crashed machine would leave it: no
    /// shutdown checkpoint, nothing more sent to standbys.
    pub fn kill(&self) {
        self.sigkill();
        let deadline = Instant::now() + Duration::from_secs(30);
        while crate::port_open(self.port) {
            assert!(Instant::now() < deadline, "the killed server still listens");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Promotes a standby to primary (`pg_ctl promote`), waiting until it accepts writes.
    pub fn promote(&self) {
        run_as_postgres("pg_ctl", &["-D", &self.data(), "-w", "-t", "60", "promote"]);
    }

    /// SIGKILLs the backends, then the postmaster (once it is gone they belong to init).
    fn sigkill(&self) {
        let Some(pid) = self.postmaster_pid() else {
            return;
        };
        let _ = Command::new("pkill")
            .args(["-9", "-P", &pid.to_string()])
            .status();
        let _ = Command::new("kill")
            .args(["-9", &pid.to_string()])
            .stderr(Stdio::null())
            .status();
    }

    fn postmaster_pid(&self) -> Option<u32> {
        let text = std::fs::read_to_string(self.dir.join("data/postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        self.sigkill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
