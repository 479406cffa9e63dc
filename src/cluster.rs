//! A throwaway PostgreSQL cluster: `initdb` into a temporary directory, TLS and SCRAM on,
//! listening on a free loopback port and a unix socket in its own directory.
//!
//! Used by `pglease demo` and by the integration tests. Postgres refuses to run as root, so
//! when pglease runs as root the cluster runs as the `postgres` OS user, which owns its
//! directory. A watchdog process stops the server and removes the directory if this process
//! dies without cleaning up (a killed test run must not leave servers behind).

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rand::RngCore;

use crate::tls::generate_dev_certificates;

/// A running throwaway cluster. Dropping it stops the server and deletes its files.
pub struct Cluster {
    pub dir: PathBuf,
    pub port: u16,
    /// Superuser name and password.
    pub superuser: String,
    pub password: String,
    /// PEM of the CA that signed the server's certificate (for `verify-full`).
    pub ca_pem: String,
    pub ca_file: PathBuf,
    bin: PathBuf,
    server: Option<Child>,
    watchdog: Option<Child>,
    keep_dir: bool,
}

/// The OS user a server must run as, when we are root.
struct RunAs {
    uid: u32,
    gid: u32,
}

fn run_as() -> anyhow::Result<Option<RunAs>> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let name = std::ffi::CString::new("postgres").expect("no NUL");
    // SAFETY: getpwnam returns a pointer to static storage or NULL; read at once, single use.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    if pw.is_null() {
        bail!("running as root, and there is no `postgres` OS user to run the throwaway PostgreSQL server as (install the postgresql package)");
    }
    // SAFETY: pw is non-null and points to a valid passwd struct.
    let (uid, gid) = unsafe { ((*pw).pw_uid, (*pw).pw_gid) };
    Ok(Some(RunAs { uid, gid }))
}

/// Finds the PostgreSQL server binaries: `$PGLEASE_PG_BIN`, else the newest
/// `/usr/lib/postgresql/*/bin`, else `pg_config --bindir`.
pub fn find_bin_dir() -> anyhow::Result<PathBuf> {
    if let Ok(dir) = std::env::var("PGLEASE_PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, p): &(u32, PathBuf)| p.join("initdb").exists())
        .collect();
    versions.sort();
    if let Some((_, dir)) = versions.pop() {
        return Ok(dir);
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("initdb").exists() {
            return Ok(dir);
        }
    }
    bail!("PostgreSQL server binaries (initdb, postgres) not found: install postgresql (Debian: apt-get install postgresql) or set PGLEASE_PG_BIN")
}

/// A loopback TCP port free at the time of asking.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn random_password() -> String {
    let mut raw = [0u8; 18];
    rand::rngs::OsRng.fill_bytes(&mut raw);
    raw.iter().map(|b| format!("{b:02x}")).collect()
}

fn chown_tree(path: &Path, owner: &RunAs) -> anyhow::Result<()> {
    std::os::unix::fs::chown(path, Some(owner.uid), Some(owner.gid)).with_context(|| format!("chown {}", path.display()))?;
    if path.is_dir() {
        for entry in std::fs::read_dir(path)? {
            chown_tree(&entry?.path(), owner)?;
        }
    }
    Ok(())
}

fn command(bin: &Path, name: &str, owner: &Option<RunAs>) -> Command {
    let mut cmd = Command::new(bin.join(name));
    if let Some(o) = owner {
        cmd.uid(o.uid).gid(o.gid);
        // initdb and postgres look up $HOME-relative nothing, but some tools read it.
        cmd.env("HOME", "/tmp");
    }
    cmd.env_remove("PGDATA").env_remove("PGHOST").env_remove("PGPORT");
    cmd
}

/// Options for a new cluster.
#[derive(Default)]
pub struct ClusterOptions {
    /// Directory to create the cluster in (must not exist or be empty); a temporary one if None.
    pub dir: Option<PathBuf>,
    /// Keep the directory when the cluster is dropped.
    pub keep_dir: bool,
    /// Extra `postgresql.conf` lines.
    pub extra_conf: Vec<String>,
}


impl Cluster {
    /// `initdb`, configure TLS and SCRAM, start, and wait until it accepts connections.
    pub fn start(options: ClusterOptions) -> anyhow::Result<Self> {
        let bin = find_bin_dir()?;
        let owner = run_as()?;
        let dir = match &options.dir {
            Some(d) => {
                std::fs::create_dir_all(d).with_context(|| format!("create {}", d.display()))?;
                std::fs::canonicalize(d)?
            }
            None => tempfile::Builder::new().prefix("pglease-pg-").tempdir()?.keep(),
        };
        let data = dir.join("data");
        if data.exists() {
            bail!("{} already holds a cluster; choose an empty directory", dir.display());
        }
        let password = random_password();
        let superuser = "postgres".to_owned();
        std::fs::write(dir.join("pwfile"), format!("{password}\n"))?;
        if let Some(o) = &owner {
            chown_tree(&dir, o)?;
        }

        let out = command(&bin, "initdb", &owner)
            .args(["-D"])
            .arg(&data)
            .args(["-U", &superuser, "--auth=scram-sha-256", "-E", "UTF8", "--locale=C", "--no-sync", "--pwfile"])
            .arg(dir.join("pwfile"))
            .stdin(Stdio::null())
            .output()
            .context("run initdb")?;
        std::fs::remove_file(dir.join("pwfile"))?;
        if !out.status.success() {
            bail!("initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        }

        let certs = generate_dev_certificates(&["localhost", "127.0.0.1"])?;
        std::fs::write(data.join("server.crt"), &certs.cert_pem)?;
        std::fs::write(data.join("server.key"), &certs.key_pem)?;
        let ca_file = dir.join("upstream-ca.crt");
        std::fs::write(&ca_file, &certs.ca_pem)?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(data.join("server.key"), std::fs::Permissions::from_mode(0o600))?;
        }

        let port = free_port()?;
        let mut conf = vec![
            format!("port = {port}"),
            "listen_addresses = '127.0.0.1'".into(),
            format!("unix_socket_directories = '{}'", dir.display()),
            "ssl = on".into(),
            "ssl_cert_file = 'server.crt'".into(),
            "ssl_key_file = 'server.key'".into(),
            "password_encryption = 'scram-sha-256'".into(),
            "max_connections = 200".into(),
            "shared_buffers = 128MB".into(),
            "fsync = off".into(),
            "synchronous_commit = off".into(),
            "full_page_writes = off".into(),
            "logging_collector = off".into(),
            "log_min_messages = warning".into(),
        ];
        conf.extend(options.extra_conf.iter().cloned());
        let mut pgconf = std::fs::read_to_string(data.join("postgresql.conf"))?;
        pgconf.push_str("\n# pglease throwaway cluster\n");
        for line in &conf {
            pgconf.push_str(line);
            pgconf.push('\n');
        }
        std::fs::write(data.join("postgresql.conf"), pgconf)?;
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all scram-sha-256\nhost all all 127.0.0.1/32 scram-sha-256\nhost all all ::1/128 scram-sha-256\n",
        )?;
        if let Some(o) = &owner {
            chown_tree(&dir, o)?;
        }

        let log = std::fs::File::create(dir.join("postgres.log"))?;
        if let Some(o) = &owner {
            std::os::unix::fs::chown(dir.join("postgres.log"), Some(o.uid), Some(o.gid))?;
        }
        drop(log);
        let mut cluster = Cluster {
            dir,
            port,
            superuser,
            password,
            ca_pem: certs.ca_pem,
            ca_file,
            bin,
            server: None,
            watchdog: None,
            keep_dir: options.keep_dir,
        };
        cluster.spawn_server()?;
        cluster.wait_ready()?;
        Ok(cluster)
    }

    /// Starts the server process (appending to its log) and the watchdog that outlives us.
    fn spawn_server(&mut self) -> anyhow::Result<()> {
        let owner = run_as()?;
        let log = std::fs::OpenOptions::new().append(true).open(self.dir.join("postgres.log"))?;
        let server = command(&self.bin, "postgres", &owner)
            .arg("-D")
            .arg(self.dir.join("data"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .context("start postgres")?;
        if let Some(mut w) = self.watchdog.take() {
            let _ = w.kill();
            let _ = w.wait();
        }
        self.watchdog = spawn_watchdog(server.id(), &self.dir, self.keep_dir);
        self.server = Some(server);
        Ok(())
    }

    /// Fast shutdown (every session is terminated), then start again on the same port; returns
    /// once the server accepts connections.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        self.start_again()
    }

    /// Starts a [stopped](Self::stop) server again on the same port; returns once it accepts
    /// connections.
    pub fn start_again(&mut self) -> anyhow::Result<()> {
        self.spawn_server()?;
        self.wait_ready()
    }

    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(child) = self.server.as_mut()
                && let Some(status) = child.try_wait()?
            {
                let log = std::fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default();
                bail!("postgres exited with {status} during startup:\n{log}");
            }
            let ok = Command::new(self.bin.join("pg_isready"))
                .args(["-q", "-h"])
                .arg(&self.dir)
                .args(["-p", &self.port.to_string()])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ok {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("postgres did not become ready within 60s (log: {})", self.dir.join("postgres.log").display());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The unix socket directory (the `host` for unix-socket connections).
    pub fn socket_dir(&self) -> &Path {
        &self.dir
    }

    /// A tokio-postgres config for the superuser over the unix socket.
    pub fn superuser_config(&self, database: &str) -> tokio_postgres::Config {
        let mut c = tokio_postgres::Config::new();
        c.host_path(&self.dir).port(self.port).user(&self.superuser).password(&self.password).dbname(database);
        c
    }

    /// Runs SQL (several statements allowed) as the superuser.
    pub async fn execute(&self, database: &str, sql: &str) -> anyhow::Result<()> {
        let (client, conn) = self.superuser_config(database).connect(tokio_postgres::NoTls).await.context("connect to the throwaway cluster")?;
        let task = tokio::spawn(conn);
        let result = client.batch_execute(sql).await.with_context(|| format!("run SQL on {database}"));
        drop(client);
        let _ = task.await;
        result
    }

    /// Path of a server binary (`pgbench`, `psql`…) next to this cluster's `postgres`.
    pub fn bin(&self, name: &str) -> PathBuf {
        self.bin.join(name)
    }

    /// Fast shutdown, then wait for the server to exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.server.take() {
            // SAFETY: kill with a valid pid and signal has no memory-safety preconditions.
            unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
        if let Some(mut w) = self.watchdog.take() {
            let _ = w.kill();
            let _ = w.wait();
        }
        if !self.keep_dir {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Stops the server (and removes its directory) once this process is gone.
fn spawn_watchdog(server_pid: u32, dir: &Path, keep_dir: bool) -> Option<Child> {
    let me = std::process::id();
    let cleanup = if keep_dir { String::new() } else { format!("; sleep 1; rm -rf '{}'", dir.display()) };
    let script = format!(
        "while kill -0 {me} 2>/dev/null; do sleep 1; done; kill -INT {server_pid} 2>/dev/null; \
         for i in $(seq 1 30); do kill -0 {server_pid} 2>/dev/null || break; sleep 1; done{cleanup}"
    );
    Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .ok()
}
