//! End to end: pgbench straight at Postgres, through pgbouncer (session mode) and through pglease
//! (scope policy and audit on), interleaved in one run on one machine, printed as one table, then
//! the scaling curve, idle-session memory (without and with TLS), system calls per transaction,
//! and the targets of issues 6 and 21, met or missed.
//!
//! `scripts/dev.sh bench` (installs pgbouncer, pgbench and strace when missing, then runs this).
//! Knobs (environment): `PGLEASE_BENCH_SECONDS` per pgbench run (default 8),
//! `PGLEASE_BENCH_ROUNDS` (default 2), `PGLEASE_BENCH_IDLE` idle-session counts for the memory
//! slope (default `1000,5000`; empty skips it), `PGLEASE_BENCH_JSON` a file for the raw results,
//! `PGLEASE_BENCH_ONLY_WORKLOAD` / `PGLEASE_BENCH_ONLY_PATH` (exact path names, comma-separated) to run a subset, for profiling,
//! `PGLEASE_BENCH_SYSCALLS=0` skips counting system calls per transaction (strace, `-S` prepared),
//! `PGLEASE_BENCH_WORKERS` pglease's session threads (`listen.workers`; default 1, pgbouncer's
//! one event loop: on this 2-core machine shared with Postgres and pgbench it is the cheaper
//! setting), `PGLEASE_BENCH_RUNTIME` (`current` or a thread count) the runtime that accepts.
//!
//! Paths run on loopback TCP, without TLS and (the `TLS` workloads) with TLS on the client hop:
//! pgbench asks for it (`sslmode=require`) of Postgres, of pgbouncer (`client_tls_sslmode`) and of
//! pglease alike; pglease and pgbouncer reach Postgres without it. Postgres sees the same
//! non-superuser role on every path.
//!
//! The scaling rows pin the proxy to its own CPUs (the last `w` for `listen.workers = w`) and
//! Postgres and pgbench to the first ones (all but the largest `w`, at least one), so every row
//! has the same load side; on a machine with few cores the largest `w` shares a CPU with it. pglease runs in this process so its CPU is this process's rusage (pgbench is a child);
//! the idle sessions are held by a child (this binary re-executed) so they do not count.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use pglease::app::{App, BuildOptions, RunningApp as Running, Secrets};
use pglease::audit::{Durability, WriterKind};
use pglease::cluster::{Cluster, ClusterOptions};
use pglease::config::*;
use pglease::people::{People, Principal};
use tokio::net::TcpListener;

const ROLE: &str = "bench_role";
const ROLE_PASSWORD: &str = "bench-role-pw";

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// One pgbench run's figures.
#[derive(Clone, Copy, Default)]
struct Run {
    tps: f64,
    latency_ms: f64,
    transactions: f64,
    /// CPU seconds the proxy used during the run (None for the direct path).
    cpu_s: Option<f64>,
}

/// How pgbench runs: over TLS or not, and on which CPUs (None = any).
#[derive(Clone, Copy, Default)]
struct Client<'a> {
    tls: bool,
    cpus: Option<&'a [usize]>,
}

fn pgbench(cluster: &Cluster, args: &[&str], target: &Target, client: Client, proxy_cpu: impl Fn() -> Option<f64>) -> Run {
    let before = proxy_cpu();
    let mut cmd = Command::new(cluster.bin("pgbench"));
    cmd.args(args)
        .args(["-h", "127.0.0.1", "-p", &target.port.to_string(), "-U", &target.user, "bench"])
        .env("PGPASSWORD", &target.password)
        .env("PGSSLMODE", if client.tls { "require" } else { "disable" });
    if let Some(cpus) = client.cpus {
        let cpus = cpus.to_vec();
        // SAFETY: pre_exec runs in the forked child before exec; pin() only calls
        // sched_setaffinity, which is async-signal-safe.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                pin(0, &cpus);
                Ok(())
            });
        }
    }
    let out = cmd.output().expect("run pgbench");
    let after = proxy_cpu();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "pgbench via {} failed: {}{}", target.name, text, String::from_utf8_lossy(&out.stderr));
    let field = |prefix: &str, nth: usize| -> f64 {
        text.lines().find(|l| l.starts_with(prefix)).and_then(|l| l.split_whitespace().nth(nth)).and_then(|t| t.parse().ok()).unwrap_or(f64::NAN)
    };
    Run {
        tps: field("tps", 2),
        latency_ms: field("latency average", 3),
        transactions: field("number of transactions actually processed", 5).max(0.0),
        cpu_s: before.zip(after).map(|(b, a)| a - b),
    }
}

/// Where pgbench connects.
#[derive(Clone)]
struct Target {
    name: &'static str,
    port: u16,
    user: String,
    password: String,
    /// The process whose CPU and memory are the proxy's: None = direct, Some(0) = this one.
    pid: Option<u32>,
    /// Its session threads (CPUs it is pinned to in the scaling rows).
    workers: usize,
}

/// A pgbench workload and the paths it runs on.
struct Workload<'a> {
    name: &'static str,
    args: Vec<&'a str>,
    paths: Vec<&'static str>,
    client: Client<'a>,
}

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as f64
}

/// utime + stime of a process, in seconds (`pid` 0 = this process).
fn cpu_seconds(pid: u32) -> f64 {
    let path = if pid == 0 { "/proc/self/stat".to_owned() } else { format!("/proc/{pid}/stat") };
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    // Fields after the parenthesised command name: state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<f64> = rest.split_whitespace().map(|x| x.parse().unwrap_or(0.0)).collect();
    (f.get(11).copied().unwrap_or(0.0) + f.get(12).copied().unwrap_or(0.0)) / ticks_per_second()
}

/// Resident anonymous memory (heap, stacks) of a process: not its file mappings, so that the
/// audit log's mapped pages (which come and go with its records and rotations) do not count.
fn rss_kib(pid: u32) -> f64 {
    let path = if pid == 0 { "/proc/self/status".to_owned() } else { format!("/proc/{pid}/status") };
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("RssAnon:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

/// Restricts thread or process `tid` (0 = the calling thread) to `cpus`.
fn pin(tid: i32, cpus: &[usize]) -> bool {
    // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET and sched_setaffinity get a valid one.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &c in cpus {
            libc::CPU_SET(c, &mut set);
        }
        libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    }
}

/// Pins every thread of process `pid` (this one for 0) and, with `children`, of its child
/// processes (a postmaster's: its background processes; backends it forks later inherit it).
fn pin_process(pid: u32, cpus: &[usize], children: bool) {
    let pid = if pid == 0 { std::process::id() } else { pid };
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten() {
        if let Ok(tid) = task.file_name().to_string_lossy().parse::<i32>() {
            pin(tid, cpus);
        }
    }
    if children {
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(child) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
            let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
            // Field 4, after the parenthesised command name, is the parent's pid.
            let ppid = stat.rsplit_once(')').and_then(|(_, r)| r.split_whitespace().nth(1)).and_then(|p| p.parse::<u32>().ok());
            if ppid == Some(pid) {
                pin_process(child, cpus, false);
            }
        }
    }
}

fn raise_fd_limit() {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain getrlimit/setrlimit on a valid struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        let want = 65_536.max(limit.rlim_cur);
        limit.rlim_cur = want.min(limit.rlim_max.max(want));
        limit.rlim_max = limit.rlim_max.max(want);
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
    }
}

/// The child mode: open sessions in batches as told on stdin, report on stdout, exit at EOF.
fn hold_sessions(spec: &str) {
    let parts: Vec<&str> = spec.split(' ').collect();
    let (port, user, password): (u16, &str, &str) = (parts[0].parse().unwrap(), parts[1], parts[2]);
    // A fourth part: the CA file to trust, and the sessions use TLS.
    let tls = parts.get(3).map(|ca| common::tls_trusting(&std::fs::read(ca).expect("hold: read the CA file")));
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async move {
        let mut held = Vec::new();
        let stdin = std::io::stdin();
        for line in stdin.lock().lines() {
            let Ok(target) = line.unwrap_or_default().trim().parse::<usize>() else { break };
            while held.len() < target {
                let batch = (target - held.len()).min(50);
                let mut tasks = Vec::new();
                for _ in 0..batch {
                    let mut config = tokio_postgres::Config::new();
                    config.host("127.0.0.1").port(port).user(user).password(password).dbname("bench");
                    let tls = tls.clone();
                    tasks.push(tokio::spawn(async move {
                        let (client, task) = match tls {
                            Some(tls) => {
                                config.ssl_mode(tokio_postgres::config::SslMode::Require);
                                let (client, conn) = config.connect(tls).await.expect("hold: connect over TLS");
                                (client, tokio::spawn(async move { drop(conn.await) }))
                            }
                            None => {
                                config.ssl_mode(tokio_postgres::config::SslMode::Disable);
                                let (client, conn) = config.connect(tokio_postgres::NoTls).await.expect("hold: connect");
                                (client, tokio::spawn(async move { drop(conn.await) }))
                            }
                        };
                        client.simple_query("SELECT 1").await.expect("hold: query");
                        (client, task)
                    }));
                }
                for t in tasks {
                    held.push(t.await.unwrap());
                }
            }
            println!("{}", held.len());
            std::io::stdout().flush().unwrap();
        }
    });
}

/// Memory per idle session: anonymous RSS slope of `pid` between the two session counts; over TLS
/// (trusting `ca`) with Some.
fn idle_memory(target: &Target, counts: &[usize], ca: Option<&Path>) -> Option<f64> {
    let pid = target.pid?;
    let [low, high] = counts else { return None };
    let mut spec = format!("{} {} {}", target.port, target.user, target.password);
    if let Some(ca) = ca {
        spec += &format!(" {}", ca.display());
    }
    let mut child = Command::new(std::env::current_exe().unwrap())
        .env("PGLEASE_BENCH_HOLD", spec)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut to = child.stdin.take().unwrap();
    let mut from = BufReader::new(child.stdout.take().unwrap());
    let mut measure = |n: usize| -> f64 {
        writeln!(to, "{n}").unwrap();
        let mut line = String::new();
        from.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), n.to_string(), "holder could not open {n} sessions via {}", target.name);
        std::thread::sleep(Duration::from_millis(500));
        if pid == 0 {
            // What earlier sessions freed stays resident in malloc's arenas and would be reused
            // here, so that the slope read low: hand it back first.
            // SAFETY: malloc_trim has no preconditions.
            unsafe { libc::malloc_trim(0) };
        }
        rss_kib(pid)
    };
    let (a, b) = (measure(*low), measure(*high));
    drop(to);
    let _ = child.wait();
    Some((b - a) / (*high - *low) as f64)
}

/// The proxy's certificate and key, and the CA that signed it.
struct Certs {
    ca: std::path::PathBuf,
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
}

fn write_certs(dir: &Path) -> Certs {
    let dev = pglease::tls::generate_dev_certificates(&["localhost", "127.0.0.1"]).unwrap();
    let certs = Certs { ca: dir.join("ca.crt"), cert: dir.join("server.crt"), key: dir.join("server.key") };
    std::fs::write(&certs.ca, dev.ca_pem).unwrap();
    std::fs::write(&certs.cert, dev.cert_pem).unwrap();
    std::fs::write(&certs.key, dev.key_pem).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&certs.key, std::fs::Permissions::from_mode(0o600)).unwrap();
    certs
}

/// pgbouncer in session mode; clients may use TLS (`client_tls_sslmode = allow`) with `certs`.
fn start_pgbouncer(dir: &Path, pg_port: u16, certs: &Certs) -> (Child, u16) {
    let port = pglease::cluster::free_port().unwrap();
    let dir = &dir.join("pgbouncer");
    std::fs::create_dir(dir).unwrap();
    // Its own copies, for the user it switches to.
    std::fs::copy(&certs.cert, dir.join("server.crt")).unwrap();
    std::fs::copy(&certs.key, dir.join("server.key")).unwrap();
    std::fs::write(dir.join("userlist.txt"), format!("\"{ROLE}\" \"{ROLE_PASSWORD}\"\n")).unwrap();
    std::fs::write(
        dir.join("pgbouncer.ini"),
        format!(
            "[databases]\nbench = host=127.0.0.1 port={pg_port} dbname=bench\n\
             [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n\
             auth_type = scram-sha-256\nauth_file = {dir}/userlist.txt\npool_mode = session\n\
             max_client_conn = 10000\ndefault_pool_size = 10000\nmax_db_connections = 0\n\
             logfile = {dir}/pgbouncer.log\nignore_startup_parameters = extra_float_digits\n\
             server_tls_sslmode = disable\nclient_tls_sslmode = allow\n\
             client_tls_cert_file = {dir}/server.crt\nclient_tls_key_file = {dir}/server.key\n",
            dir = dir.display()
        ),
    )
    .unwrap();
    let mut cmd = Command::new("pgbouncer");
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        // pgbouncer will not run as root; it switches to this user itself, which must be able
        // to write its log.
        let ok = Command::new("chown").args(["-R", "postgres"]).arg(dir).status().is_ok_and(|s| s.success());
        assert!(ok, "chown {} to postgres", dir.display());
        cmd.args(["-u", "postgres"]);
    }
    let stderr = std::fs::File::create(dir.join("stderr")).unwrap();
    let mut child = cmd.arg(dir.join("pgbouncer.ini")).stdout(Stdio::null()).stderr(stderr).spawn().expect("start pgbouncer (scripts/dev.sh bench installs it)");
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return (child, port);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    let log = std::fs::read_to_string(dir.join("pgbouncer.log")).unwrap_or_default() + &std::fs::read_to_string(dir.join("stderr")).unwrap_or_default();
    panic!("pgbouncer did not start:\n{log}");
}

/// pglease named `name` on loopback (its grant and audit files are named after it), TLS allowed
/// (with `certs`) and not required, `workers` session threads.
/// What every pglease of the run shares.
struct Site<'a> {
    dir: &'a Path,
    pg_port: u16,
    scopes: &'a BTreeMap<String, ScopeConfig>,
    certs: &'a Certs,
}

fn pglease_config(site: &Site, name: &str, durability: Durability, writer: WriterKind, workers: usize) -> Config {
    let Site { dir, pg_port, scopes, certs } = *site;
    let tag = name.replace(' ', "-");
    Config {
        listen: ListenConfig {
            addr: "127.0.0.1:0".parse().unwrap(),
            public_host: None,
            tls_ca: None,
            tls_cert: Some(certs.cert.clone()),
            tls_key: Some(certs.key.clone()),
            allow_plaintext: true,
            max_connections: 10_000,
            handshake_timeout: Duration::from_secs(60),
            idle_timeout: None,
            max_message_bytes: 64 << 20,
            client_stall_timeout: Duration::from_secs(300),
            shutdown_grace: Duration::from_secs(1),
            workers: Some(workers),
        },
        upstream: UpstreamConfig {
            host: "127.0.0.1".into(),
            port: pg_port,
            user: ROLE.into(),
            password_env: None,
            password_file: None,
            tls: UpstreamTls::Disable,
            ca_file: None,
            server_name: None,
            allow_md5: false,
            allow_cleartext: false,
            connect_timeout: Duration::from_secs(30),
        },
        admin: AdminConfig { addr: "127.0.0.1:0".parse().unwrap(), public_url: None },
        log: LogConfig::default(),
        grants: GrantsConfig { store: dir.join(format!("grants-{tag}.jsonl")), ..GrantsConfig::default() },
        audit: AuditConfig { path: dir.join(format!("audit-{tag}.jsonl")), durability, writer, ..AuditConfig::default() },
        scopes: scopes.clone(),
        people: BTreeMap::new(),
            control_plane: None,
            notify: Vec::new(),
            identity: Default::default(),
    }
}

async fn start_pglease(config: &Config) -> (Running, String, String) {
    let mut people = People::default();
    people.add("bob", &[Role::Approver], &[], "t");
    let secrets = Secrets { upstream: ROLE_PASSWORD.into(), scopes: [("bench".to_owned(), ROLE_PASSWORD.to_owned())].into() };
    let app = App::build(config, secrets, people, BuildOptions::default()).await.unwrap();
    let grants = app.grants.clone();
    let running = app.start(TcpListener::bind("127.0.0.1:0").await.unwrap(), TcpListener::bind("127.0.0.1:0").await.unwrap()).unwrap();
    let bob = Principal { person: "bob".into(), roles: [Role::Approver].into(), groups: Default::default() };
    let g = grants.issue(&bob, "alice", "bench", Duration::from_secs(8 * 3600), "benchmark").await.unwrap();
    let alice = Principal { person: "alice".into(), roles: [Role::Engineer].into(), groups: Default::default() };
    let g = grants.take_secret(&alice, &g.grant.id).await.unwrap();
    (running, g.grant.login, g.secret.unwrap())
}

/// System calls per transaction of the process `pid` (this one for pglease) during a pgbench
/// run: `strace -c` attached to each of its threads (not `-f`: pgbench, a child started later,
/// is not counted); (total, the largest by name). None without strace. strace slows the traced
/// process down; the counts per transaction are what it measures.
/// System calls per transaction: the total, and the most frequent by name.
type Syscalls = (f64, Vec<(String, f64)>);

fn syscalls_per_tx(cluster: &Cluster, args: &[&str], target: &Target, pid: u32) -> Option<Syscalls> {
    let out = tempfile::NamedTempFile::new().ok()?;
    let threads: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?.flatten().map(|t| t.file_name().to_string_lossy().into_owned()).collect();
    let mut strace = Command::new("strace").args(["-c", "-q", "-o"]).arg(out.path()).args(threads.iter().flat_map(|t| ["-p", t.as_str()])).stderr(Stdio::null()).spawn().ok()?;
    std::thread::sleep(Duration::from_millis(500)); // attached to every thread
    let run = pgbench(cluster, args, target, Client::default(), || None);
    // SAFETY: signalling a child we spawned.
    unsafe { libc::kill(strace.id() as i32, libc::SIGINT) };
    let _ = strace.wait();
    let text = std::fs::read_to_string(out.path()).ok()?;
    let per_tx = |calls: &str| calls.parse::<f64>().ok().map(|c| c / run.transactions.max(1.0));
    let mut by_name: Vec<(String, f64)> = Vec::new();
    let mut total = None;
    for line in text.lines() {
        let cols: Vec<&str> = line.split_whitespace().collect();
        // "% time  seconds  usecs/call  calls  [errors]  syscall"
        if cols.len() >= 5 && cols[0].parse::<f64>().is_ok() {
            let name = cols[cols.len() - 1];
            let Some(n) = per_tx(cols[3]) else { continue };
            if name == "total" {
                total = Some(n);
            } else {
                by_name.push((name.to_owned(), n));
            }
        }
    }
    by_name.sort_by(|a, b| b.1.total_cmp(&a.1));
    by_name.truncate(6);
    total.map(|t| (t, by_name))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

fn main() {
    if let Ok(spec) = std::env::var("PGLEASE_BENCH_HOLD") {
        return hold_sessions(&spec);
    }
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo bench -- --list` probes harness=false benches; nothing to list.
    }
    raise_fd_limit();
    let seconds: u32 = env_or("PGLEASE_BENCH_SECONDS", 8);
    let rounds: usize = env_or("PGLEASE_BENCH_ROUNDS", 2);
    let idle_counts: Vec<usize> =
        std::env::var("PGLEASE_BENCH_IDLE").unwrap_or_else(|_| "1000,5000".into()).split(',').filter_map(|s| s.trim().parse().ok()).collect();
    let max_idle = idle_counts.iter().copied().max().unwrap_or(0);

    let rt = std::sync::Arc::new(match std::env::var("PGLEASE_BENCH_RUNTIME").as_deref() {
        Ok("current") => tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap(),
        Ok(n) if n.parse::<usize>().is_ok() => tokio::runtime::Builder::new_multi_thread().worker_threads(n.parse().unwrap()).enable_all().build().unwrap(),
        _ => tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap(),
    });
    {
        let rt = rt.clone();
        std::thread::spawn(move || rt.block_on(std::future::pending::<()>()));
    }
    let cluster = Cluster::start(ClusterOptions {
        // Room for the held idle sessions and for the connections pgbouncer keeps pooled.
        extra_conf: vec![format!("max_connections = {}", 2 * max_idle + 400), "shared_buffers = 256MB".into()],
        ..ClusterOptions::default()
    })
    .unwrap();
    let dir = tempfile::Builder::new().prefix("pglease-bench-").tempdir().unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    rt.block_on(cluster.execute("postgres", "CREATE DATABASE bench")).unwrap();
    let status = Command::new(cluster.bin("pgbench"))
        .args(["-i", "-q", "-s", "10", "-h", &cluster.socket_dir().display().to_string(), "-p", &cluster.port.to_string(), "-U", &cluster.superuser, "bench"])
        .env("PGPASSWORD", &cluster.password)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "pgbench -i failed");
    let scopes = common::bench_scopes(ROLE);
    let sql = pglease::policy::sql::scope_sql("bench", &scopes["bench"]) + &format!("ALTER ROLE {ROLE} PASSWORD '{ROLE_PASSWORD}';");
    rt.block_on(cluster.execute("bench", &sql)).unwrap();

    let certs = write_certs(dir.path());
    let (mut bouncer, bouncer_port) = start_pgbouncer(dir.path(), cluster.port, &certs);
    let workers: usize = env_or("PGLEASE_BENCH_WORKERS", 1);
    let site = Site { dir: dir.path(), pg_port: cluster.port, scopes: &scopes, certs: &certs };
    let start = |name, durability, writer, workers| rt.block_on(start_pglease(&pglease_config(&site, name, durability, writer, workers)));
    let lease = start("pglease", Durability::Write, WriterKind::Mapped, workers);
    let lease_fsync = start("pglease fsync", Durability::Fsync, WriterKind::Mapped, workers);
    // The same with the audit records appended by write(2), as before the mapped writer.
    let lease_append = start("pglease append", Durability::Write, WriterKind::Append, workers);

    // The scaling curve: one instance per session-thread count, each pinned to that many CPUs of
    // its own; the load (Postgres, pgbench) on the CPUs left, the same for every row.
    let cpus: Vec<usize> = (0..std::thread::available_parallelism().map_or(1, |n| n.get())).collect();
    let scaled: Vec<(usize, &'static str)> = [(1, "pglease w1"), (2, "pglease w2"), (4, "pglease w4"), (8, "pglease w8")]
        .into_iter()
        .filter(|&(w, _)| w <= 2 || 2 * w <= cpus.len())
        .collect();
    let widest = scaled.iter().map(|s| s.0).max().unwrap_or(1);
    let load_cpus: Vec<usize> = cpus[..cpus.len().saturating_sub(widest).max(1)].to_vec();
    let proxy_cpus = |w: usize| cpus[cpus.len().saturating_sub(w)..].to_vec();
    let scaled_leases: Vec<_> = scaled.iter().map(|&(w, name)| start(name, Durability::Write, WriterKind::Mapped, w)).collect();

    let lease_target = |name: &'static str, (running, login, secret): &(Running, String, String), workers: usize| Target {
        name,
        port: running.proxy_addr.port(),
        user: login.clone(),
        password: secret.clone(),
        pid: Some(0),
        workers,
    };
    let mut targets = vec![
        Target { name: "direct", port: cluster.port, user: ROLE.into(), password: ROLE_PASSWORD.into(), pid: None, workers: 0 },
        Target { name: "pgbouncer", port: bouncer_port, user: ROLE.into(), password: ROLE_PASSWORD.into(), pid: Some(bouncer.id()), workers: 1 },
        lease_target("pglease", &lease, workers),
        lease_target("pglease fsync", &lease_fsync, workers),
        lease_target("pglease append", &lease_append, workers),
    ];
    targets.extend(scaled.iter().zip(&scaled_leases).map(|(&(w, name), running)| lease_target(name, running, w)));

    let t = seconds.to_string();
    let c8 = |mode: &'static str| vec!["-n", "-S", "-M", mode, "-c", "8", "-j", "2", "-T", t.as_str()];
    let (plain, tls, pinned) = (Client::default(), Client { tls: true, cpus: None }, Client { tls: false, cpus: Some(&load_cpus) });
    let mut scaled_paths = vec!["direct", "pgbouncer"];
    scaled_paths.extend(scaled.iter().map(|s| s.1));
    let workloads: Vec<Workload> = vec![
        Workload { name: "-S -M simple -c 8", args: c8("simple"), paths: vec!["direct", "pgbouncer", "pglease", "pglease append"], client: plain },
        Workload { name: "-S -M prepared -c 8", args: c8("prepared"), paths: vec!["direct", "pgbouncer", "pglease", "pglease fsync", "pglease append"], client: plain },
        Workload { name: "-S -M prepared -c 1", args: vec!["-n", "-S", "-M", "prepared", "-c", "1", "-j", "1", "-T", &t], paths: vec!["direct", "pgbouncer", "pglease"], client: plain },
        Workload { name: "tpcb -M prepared -c 8", args: vec!["-n", "-M", "prepared", "-c", "8", "-j", "2", "-T", &t], paths: vec!["direct", "pgbouncer", "pglease", "pglease fsync", "pglease append"], client: plain },
        Workload { name: "-S -M simple -c 8 TLS", args: c8("simple"), paths: vec!["direct", "pgbouncer", "pglease"], client: tls },
        Workload { name: "-S -M prepared -c 8 TLS", args: c8("prepared"), paths: vec!["direct", "pgbouncer", "pglease"], client: tls },
        Workload { name: "-S -M prepared -c 64", args: vec!["-n", "-S", "-M", "prepared", "-c", "64", "-j", "2", "-T", &t], paths: vec!["pgbouncer", "pglease", "pglease fsync"], client: plain },
        Workload { name: "-S -M prepared -c 8 pinned", args: c8("prepared"), paths: scaled_paths, client: pinned },
    ];
    let postmaster: u32 = std::fs::read_to_string(cluster.dir.join("data/postmaster.pid")).ok().and_then(|s| s.lines().next()?.trim().parse().ok()).expect("postmaster pid");
    let unpin = || {
        pin_process(0, &cpus, false);
        pin_process(bouncer.id(), &cpus, false);
        pin_process(postmaster, &cpus, true);
    };

    // Profiling aids: run only the workloads / paths whose names contain these.
    let only_workload = std::env::var("PGLEASE_BENCH_ONLY_WORKLOAD").unwrap_or_default();
    let only_path = std::env::var("PGLEASE_BENCH_ONLY_PATH").unwrap_or_default();
    let mut runs: BTreeMap<(&str, &str), Vec<Run>> = BTreeMap::new();
    for round in 1..=rounds {
        for w in workloads.iter().filter(|w| w.name.contains(&only_workload)) {
            for target in targets.iter().filter(|t| w.paths.contains(&t.name) && (only_path.is_empty() || only_path.split(',').any(|p| t.name == p))) {
                if w.client.cpus.is_some() {
                    pin_process(postmaster, &load_cpus, true);
                    if let Some(pid) = target.pid {
                        pin_process(pid, &proxy_cpus(target.workers), false);
                    }
                }
                let pid = target.pid;
                let run = pgbench(&cluster, &w.args, target, w.client, || pid.map(cpu_seconds));
                if w.client.cpus.is_some() {
                    unpin();
                }
                eprintln!("round {round}/{rounds} {:<27} {:<14} {:>9.0} tps {:>8.3} ms", w.name, target.name, run.tps, run.latency_ms);
                runs.entry((w.name, target.name)).or_default().push(run);
            }
        }
    }
    // System calls per transaction, `-S` prepared at 8 clients: pgbouncer, pglease, and pglease
    // with the `append` audit writer.
    let sp_args: Vec<&str> = vec!["-n", "-S", "-M", "prepared", "-c", "8", "-j", "2", "-T", "4"];
    let syscalls: Vec<(&str, Option<Syscalls>)> = if env_or("PGLEASE_BENCH_SYSCALLS", 1) == 1 {
        [(&targets[1], bouncer.id()), (&targets[2], std::process::id()), (&targets[4], std::process::id())].iter().map(|(t, pid)| (t.name, syscalls_per_tx(&cluster, &sp_args, t, *pid))).collect()
    } else {
        Vec::new()
    };
    let mut idle: Vec<(String, Option<f64>)> = Vec::new();
    if idle_counts.len() == 2 {
        for t in &targets[1..3] {
            idle.push((t.name.to_owned(), idle_memory(t, &idle_counts, None)));
        }
        // Over TLS through a fresh pgbouncer: one that held sessions before reuses what they
        // freed, and its slope reads low (pglease's heap is trimmed before each reading).
        let _ = bouncer.kill();
        let _ = bouncer.wait();
        let fresh = dir.path().join("idle-tls");
        std::fs::create_dir(&fresh).unwrap();
        let port;
        (bouncer, port) = start_pgbouncer(&fresh, cluster.port, &certs);
        let t = Target { port, pid: Some(bouncer.id()), ..targets[1].clone() };
        idle.push(("pgbouncer TLS".into(), idle_memory(&t, &idle_counts, Some(&certs.ca))));
        idle.push(("pglease TLS".into(), idle_memory(&targets[2], &idle_counts, Some(&certs.ca))));
    }
    let _ = bouncer.kill();
    let _ = bouncer.wait();
    for (running, _, _) in [lease, lease_fsync, lease_append].into_iter().chain(scaled_leases) {
        rt.block_on(running.stop());
    }

    let stat = |w: &str, p: &str, f: fn(&Run) -> f64| median(runs.get(&(w, p)).map(|r| r.iter().map(f).collect()).unwrap_or_default());
    let tps = |w: &str, p: &str| stat(w, p, |r| r.tps);
    let lat = |w: &str, p: &str| stat(w, p, |r| r.latency_ms);
    let cpu = |w: &str, p: &str| stat(w, p, |r| r.cpu_s.map_or(f64::NAN, |c| c / r.transactions * 1e6));

    println!(
        "\npglease end-to-end benchmark: {rounds} round(s) x {seconds} s per run, interleaved; medians; pgbench scale 10, loopback TCP; pglease with {workers} session thread(s); {} CPU(s)",
        cpus.len()
    );
    println!("{:<27} {:<14} {:>9} {:>10} {:>10} {:>13} {:>11}", "workload", "path", "tps", "latency ms", "vs direct", "vs pgbouncer", "cpu µs/tx");
    for w in &workloads {
        for p in &w.paths {
            println!(
                "{:<27} {:<14} {:>9.0} {:>10.3} {:>10.2} {:>13.2} {:>11.1}",
                w.name,
                p,
                tps(w.name, p),
                lat(w.name, p),
                tps(w.name, p) / tps(w.name, "direct"),
                tps(w.name, p) / tps(w.name, "pgbouncer"),
                cpu(w.name, p)
            );
        }
    }
    let list = |c: &[usize]| c.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(",");
    println!("\nscaling (-S prepared c8): Postgres and pgbench on CPU(s) {}; pgbouncer on CPU(s) {}", list(&load_cpus), list(&proxy_cpus(1)));
    let sw = "-S -M prepared -c 8 pinned";
    for &(w, name) in &scaled {
        println!(
            "  listen.workers = {w} on CPU(s) {:<8} {:>9.0} tps  {:>5.2}x w1  {:>5.2}x pgbouncer  {:>6.1} µs CPU/tx (one CPU's worth: {:.0} tx/s)",
            list(&proxy_cpus(w)),
            tps(sw, name),
            tps(sw, name) / tps(sw, "pglease w1"),
            tps(sw, name) / tps(sw, "pgbouncer"),
            cpu(sw, name),
            1e6 / cpu(sw, name)
        );
    }
    println!("  pgbouncer (one thread)        {:>9.0} tps  {:>6.1} µs CPU/tx (one CPU's worth: {:.0} tx/s)", tps(sw, "pgbouncer"), cpu(sw, "pgbouncer"), 1e6 / cpu(sw, "pgbouncer"));
    for (name, kib) in &idle {
        if let Some(kib) = kib {
            println!("idle session memory via {name:<14} {kib:>8.1} KiB/session (anonymous RSS slope {} → {} sessions)", idle_counts[0], idle_counts[1]);
        }
    }

    for (name, counted) in &syscalls {
        match counted {
            Some((total, top)) => {
                let top: Vec<String> = top.iter().map(|(n, c)| format!("{n} {c:.2}")).collect();
                println!("syscalls per -S prepared c8 transaction via {name:<14} {total:>6.2} ({})", top.join(", "));
            }
            None => println!("syscalls via {name}: strace not available"),
        }
    }

    // (what, measured, target, met: None = reported, no target)
    let mut targets_table: Vec<(String, String, Option<bool>)> = Vec::new();
    let mut check = |what: &str, got: f64, goal: &str, ok: Option<bool>| targets_table.push((what.to_owned(), format!("{got:.2} (target {goal})"), ok));
    let (ss, sp, s1, tb) = ("-S -M simple -c 8", "-S -M prepared -c 8", "-S -M prepared -c 1", "tpcb -M prepared -c 8");
    let (ts, tp, sp64) = ("-S -M simple -c 8 TLS", "-S -M prepared -c 8 TLS", "-S -M prepared -c 64");
    for (label, w) in [("-S simple c8", ss), ("-S prepared c8", sp), ("-S simple c8 TLS", ts), ("-S prepared c8 TLS", tp)] {
        let r = tps(w, "pglease") / tps(w, "pgbouncer");
        check(&format!("{label}: pglease / pgbouncer"), r, ">= 1.10", Some(r >= 1.1));
    }
    let r = tps(ss, "pglease") / tps(ss, "direct");
    check("-S simple c8: pglease / direct", r, ">= 0.70", Some(r >= 0.7));
    let r = tps(sp, "pglease") / tps(sp, "direct");
    check("-S prepared c8: pglease / direct", r, ">= 0.60", Some(r >= 0.6));
    let added = (lat(s1, "pglease") - lat(s1, "direct")) * 1000.0;
    check("-S prepared c1: added latency µs", added, "<= 20", Some(added <= 20.0));
    let r = tps(tb, "pglease") / tps(tb, "pgbouncer");
    check("tpcb c8: pglease / pgbouncer", r, ">= 1.00", Some(r >= 1.0));
    let r = median(vec![cpu(ss, "pglease"), cpu(sp, "pglease")]) / median(vec![cpu(ss, "pgbouncer"), cpu(sp, "pgbouncer")]);
    check("proxy CPU per -S tx: pglease / pgbouncer", r, "<= 1.00", Some(r <= 1.0));
    if let Some((_, Some(kib))) = idle.iter().find(|(n, _)| n == "pglease") {
        check("idle session memory KiB", *kib, "<= 16", Some(*kib <= 16.0));
    }
    if let Some((_, Some(kib))) = idle.iter().find(|(n, _)| n == "pglease TLS") {
        check("idle session memory over TLS KiB", *kib, "reported", None);
    }
    let r = tps(sp64, "pglease fsync") / tps(sp64, "pglease");
    check("fsync / default audit tps, c64", r, ">= 0.90", Some(r >= 0.9));
    let r = median(vec![tps(sp, "pglease fsync") / tps(sp, "pglease"), tps(tb, "pglease fsync") / tps(tb, "pglease")]);
    check("fsync / default audit tps, c8", r, "the disk's bound", None);
    let calls = |n: &str| syscalls.iter().find(|(p, _)| *p == n).and_then(|(_, c)| c.as_ref()).map(|c| c.0);
    if let (Some(lease), Some(bouncer)) = (calls("pglease"), calls("pgbouncer")) {
        check("syscalls per -S tx: pglease - pgbouncer", lease - bouncer, "<= 0.20", Some(lease - bouncer <= 0.2));
    }
    let r = median(vec![tps(ss, "pglease") / tps(ss, "pglease append"), tps(sp, "pglease") / tps(sp, "pglease append")]);
    check("-S c8: mapped / append audit writer", r, "> 1.00", Some(r > 1.0));
    if scaled.len() > 1 {
        let r = tps(sw, "pglease w2") / tps(sw, "pglease w1");
        check("pinned -S c8: workers 2 / workers 1", r, "reported", None);
    }
    println!("\n{:<42} {:<28}", "target", "measured");
    for (what, got, ok) in &targets_table {
        println!("{what:<42} {got:<28} {}", match ok {
            Some(true) => "met",
            Some(false) => "MISSED",
            None => "",
        });
    }
    if let Ok(path) = std::env::var("PGLEASE_BENCH_JSON") {
        let rows: Vec<serde_json::Value> = runs
            .iter()
            .flat_map(|((w, p), rs)| {
                rs.iter().map(move |r| serde_json::json!({"workload": w, "path": p, "tps": r.tps, "latency_ms": r.latency_ms, "transactions": r.transactions, "cpu_s": r.cpu_s}))
            })
            .collect();
        std::fs::write(path, serde_json::to_string_pretty(&serde_json::json!({"runs": rows, "idle_kib": idle.iter().map(|(n, k)| (n.clone(), *k)).collect::<BTreeMap<_, _>>()})).unwrap()).unwrap();
    }
}
