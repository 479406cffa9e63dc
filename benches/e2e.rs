//! End to end: pgbench straight at Postgres, through pgbouncer (session mode) and through pglease
//! (scope policy and audit on), interleaved in one run on one machine, printed as one table with
//! the ratios issue 6 sets targets for.
//!
//! `scripts/dev.sh bench` (installs pgbouncer and pgbench when missing, then runs this).
//! Knobs (environment): `PGLEASE_BENCH_SECONDS` per pgbench run (default 8),
//! `PGLEASE_BENCH_ROUNDS` (default 2), `PGLEASE_BENCH_IDLE` idle-session counts for the memory
//! slope (default `1000,5000`; empty skips it), `PGLEASE_BENCH_JSON` a file for the raw results,
//! `PGLEASE_BENCH_ONLY_WORKLOAD` / `PGLEASE_BENCH_ONLY_PATH` (exact path names, comma-separated) to run a subset, for profiling,
//! `PGLEASE_BENCH_SYSCALLS=0` skips counting system calls per transaction (strace, `-S` prepared),
//! `PGLEASE_BENCH_WORKERS` pglease's session threads (`listen.workers`; default 1, pgbouncer's
//! one event loop: on this 2-core machine shared with Postgres and pgbench it is the cheaper
//! setting), `PGLEASE_BENCH_RUNTIME` (`current` or a thread count) the runtime that accepts.
//!
//! Every path runs without TLS on loopback TCP (as the reference figures were taken): the cost
//! measured is the proxy's, not the cipher's. Postgres sees the same non-superuser role on every
//! path. pglease runs in this process so its CPU is this process's rusage (pgbench is a child);
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

fn pgbench(cluster: &Cluster, args: &[&str], target: &Target, proxy_cpu: impl Fn() -> Option<f64>) -> Run {
    let before = proxy_cpu();
    let out = Command::new(cluster.bin("pgbench"))
        .args(args)
        .args(["-h", "127.0.0.1", "-p", &target.port.to_string(), "-U", &target.user, "bench"])
        .env("PGPASSWORD", &target.password)
        .env("PGSSLMODE", "disable")
        .output()
        .expect("run pgbench");
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
struct Target {
    name: &'static str,
    port: u16,
    user: String,
    password: String,
    /// The process whose CPU and memory are the proxy's: None = direct, Some(0) = this one.
    pid: Option<u32>,
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

fn rss_kib(pid: u32) -> f64 {
    let path = if pid == 0 { "/proc/self/status".to_owned() } else { format!("/proc/{pid}/status") };
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
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
                    config.ssl_mode(tokio_postgres::config::SslMode::Disable);
                    tasks.push(tokio::spawn(async move {
                        let (client, conn) = config.connect(tokio_postgres::NoTls).await.expect("hold: connect");
                        let task = tokio::spawn(conn);
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

/// Memory per idle session: RSS slope of `pid` between the two session counts.
fn idle_memory(target: &Target, counts: &[usize]) -> Option<f64> {
    let pid = target.pid?;
    let [low, high] = counts else { return None };
    let mut child = Command::new(std::env::current_exe().unwrap())
        .env("PGLEASE_BENCH_HOLD", format!("{} {} {}", target.port, target.user, target.password))
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
        rss_kib(pid)
    };
    let (a, b) = (measure(*low), measure(*high));
    drop(to);
    let _ = child.wait();
    Some((b - a) / (*high - *low) as f64)
}

fn start_pgbouncer(dir: &Path, pg_port: u16) -> (Child, u16) {
    let port = pglease::cluster::free_port().unwrap();
    let dir = &dir.join("pgbouncer");
    std::fs::create_dir(dir).unwrap();
    std::fs::write(dir.join("userlist.txt"), format!("\"{ROLE}\" \"{ROLE_PASSWORD}\"\n")).unwrap();
    std::fs::write(
        dir.join("pgbouncer.ini"),
        format!(
            "[databases]\nbench = host=127.0.0.1 port={pg_port} dbname=bench\n\
             [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n\
             auth_type = scram-sha-256\nauth_file = {dir}/userlist.txt\npool_mode = session\n\
             max_client_conn = 10000\ndefault_pool_size = 10000\nmax_db_connections = 0\n\
             logfile = {dir}/pgbouncer.log\nignore_startup_parameters = extra_float_digits\n\
             server_tls_sslmode = disable\nclient_tls_sslmode = disable\n",
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

fn pglease_config(dir: &Path, pg_port: u16, scopes: &BTreeMap<String, ScopeConfig>, durability: Durability, writer: WriterKind) -> Config {
    let tag = format!("{durability:?}-{writer:?}").to_lowercase();
    Config {
        listen: ListenConfig {
            addr: "127.0.0.1:0".parse().unwrap(),
            public_host: None,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            allow_plaintext: true,
            max_connections: 10_000,
            handshake_timeout: Duration::from_secs(60),
            idle_timeout: None,
            max_message_bytes: 64 << 20,
            client_stall_timeout: Duration::from_secs(300),
            shutdown_grace: Duration::from_secs(1),
            workers: Some(env_or("PGLEASE_BENCH_WORKERS", 1)),
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
fn syscalls_per_tx(cluster: &Cluster, args: &[&str], target: &Target, pid: u32) -> Option<(f64, Vec<(String, f64)>)> {
    let out = tempfile::NamedTempFile::new().ok()?;
    let threads: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?.flatten().map(|t| t.file_name().to_string_lossy().into_owned()).collect();
    let mut strace = Command::new("strace").args(["-c", "-q", "-o"]).arg(out.path()).args(threads.iter().flat_map(|t| ["-p", t.as_str()])).stderr(Stdio::null()).spawn().ok()?;
    std::thread::sleep(Duration::from_millis(500)); // attached to every thread
    let run = pgbench(cluster, args, target, || None);
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
        extra_conf: vec![format!("max_connections = {}", 2 * max_idle + 100), "shared_buffers = 256MB".into()],
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

    let (mut bouncer, bouncer_port) = start_pgbouncer(dir.path(), cluster.port);
    let (lease, lease_login, lease_secret) = rt.block_on(start_pglease(&pglease_config(dir.path(), cluster.port, &scopes, Durability::Write, WriterKind::Mapped)));
    let (lease_fsync, fsync_login, fsync_secret) = rt.block_on(start_pglease(&pglease_config(dir.path(), cluster.port, &scopes, Durability::Fsync, WriterKind::Mapped)));
    // The same with the audit records appended by write(2), as before the mapped writer.
    let (lease_append, append_login, append_secret) = rt.block_on(start_pglease(&pglease_config(dir.path(), cluster.port, &scopes, Durability::Write, WriterKind::Append)));

    let targets = [
        Target { name: "direct", port: cluster.port, user: ROLE.into(), password: ROLE_PASSWORD.into(), pid: None },
        Target { name: "pgbouncer", port: bouncer_port, user: ROLE.into(), password: ROLE_PASSWORD.into(), pid: Some(bouncer.id()) },
        Target { name: "pglease", port: lease.proxy_addr.port(), user: lease_login, password: lease_secret, pid: Some(0) },
        Target { name: "pglease fsync", port: lease_fsync.proxy_addr.port(), user: fsync_login, password: fsync_secret, pid: Some(0) },
        Target { name: "pglease append", port: lease_append.proxy_addr.port(), user: append_login, password: append_secret, pid: Some(0) },
    ];
    let t = seconds.to_string();
    let workloads: [(&str, Vec<&str>, &[&str]); 4] = [
        ("-S -M simple -c 8", vec!["-n", "-S", "-M", "simple", "-c", "8", "-j", "2", "-T", &t], &["direct", "pgbouncer", "pglease", "pglease append"]),
        ("-S -M prepared -c 8", vec!["-n", "-S", "-M", "prepared", "-c", "8", "-j", "2", "-T", &t], &["direct", "pgbouncer", "pglease", "pglease fsync", "pglease append"]),
        ("-S -M prepared -c 1", vec!["-n", "-S", "-M", "prepared", "-c", "1", "-j", "1", "-T", &t], &["direct", "pgbouncer", "pglease"]),
        ("tpcb -M prepared -c 8", vec!["-n", "-M", "prepared", "-c", "8", "-j", "2", "-T", &t], &["direct", "pgbouncer", "pglease", "pglease fsync", "pglease append"]),
    ];
    // Profiling aids: run only the workloads / paths whose names contain these.
    let only_workload = std::env::var("PGLEASE_BENCH_ONLY_WORKLOAD").unwrap_or_default();
    let only_path = std::env::var("PGLEASE_BENCH_ONLY_PATH").unwrap_or_default();
    let mut runs: BTreeMap<(&str, &str), Vec<Run>> = BTreeMap::new();
    for round in 1..=rounds {
        for (name, args, paths) in workloads.iter().filter(|w| w.0.contains(&only_workload)) {
            for target in targets.iter().filter(|t| paths.contains(&t.name) && (only_path.is_empty() || only_path.split(',').any(|p| t.name == p))) {
                let pid = target.pid;
                let run = pgbench(&cluster, args, target, || pid.map(cpu_seconds));
                eprintln!("round {round}/{rounds} {name:<22} {:<14} {:>9.0} tps {:>8.3} ms", target.name, run.tps, run.latency_ms);
                runs.entry((name, target.name)).or_default().push(run);
            }
        }
    }
    // System calls per transaction, `-S` prepared at 8 clients: pgbouncer, pglease, and pglease
    // with the `append` audit writer.
    let sp_args: Vec<&str> = vec!["-n", "-S", "-M", "prepared", "-c", "8", "-j", "2", "-T", "4"];
    let syscalls: Vec<(&str, Option<(f64, Vec<(String, f64)>)>)> = if env_or("PGLEASE_BENCH_SYSCALLS", 1) == 1 {
        [(&targets[1], bouncer.id()), (&targets[2], std::process::id()), (&targets[4], std::process::id())].iter().map(|(t, pid)| (t.name, syscalls_per_tx(&cluster, &sp_args, t, *pid))).collect()
    } else {
        Vec::new()
    };
    let idle: Vec<(&str, Option<f64>)> =
        if idle_counts.len() == 2 { targets[1..3].iter().map(|t| (t.name, idle_memory(t, &idle_counts))).collect() } else { vec![] };
    let _ = bouncer.kill();
    let _ = bouncer.wait();
    rt.block_on(lease.stop());
    rt.block_on(lease_fsync.stop());
    rt.block_on(lease_append.stop());

    let stat = |w: &str, p: &str, f: fn(&Run) -> f64| median(runs.get(&(w, p)).map(|r| r.iter().map(f).collect()).unwrap_or_default());
    let tps = |w: &str, p: &str| stat(w, p, |r| r.tps);
    let lat = |w: &str, p: &str| stat(w, p, |r| r.latency_ms);
    let cpu = |w: &str, p: &str| stat(w, p, |r| r.cpu_s.map_or(f64::NAN, |c| c / r.transactions * 1e6));

    println!(
        "\npglease end-to-end benchmark: {rounds} round(s) x {seconds} s per run, interleaved; medians; pgbench scale 10, loopback TCP, no TLS; pglease with {} session thread(s)",
        env_or("PGLEASE_BENCH_WORKERS", 1)
    );
    println!("{:<22} {:<14} {:>9} {:>10} {:>10} {:>13} {:>11}", "workload", "path", "tps", "latency ms", "vs direct", "vs pgbouncer", "cpu µs/tx");
    for (name, _, paths) in &workloads {
        for p in paths.iter() {
            println!(
                "{:<22} {:<14} {:>9.0} {:>10.3} {:>10.2} {:>13.2} {:>11.1}",
                name,
                p,
                tps(name, p),
                lat(name, p),
                tps(name, p) / tps(name, "direct"),
                tps(name, p) / tps(name, "pgbouncer"),
                cpu(name, p)
            );
        }
    }
    for (name, kib) in &idle {
        if let Some(kib) = kib {
            println!("idle session memory via {name:<10} {kib:>8.1} KiB/session (RSS slope {} → {} sessions)", idle_counts[0], idle_counts[1]);
        }
    }

    for (name, counted) in &syscalls {
        match counted {
            Some((total, top)) => {
                let top: Vec<String> = top.iter().map(|(n, c)| format!("{n} {c:.2}")).collect();
                println!("syscalls per -S prepared c8 transaction via {name:<10} {total:>6.2} ({})", top.join(", "));
            }
            None => println!("syscalls via {name}: strace not available"),
        }
    }

    let mut targets_table: Vec<(String, String, bool)> = Vec::new();
    let mut check = |what: &str, got: f64, goal: &str, ok: bool| targets_table.push((what.to_owned(), format!("{got:.2} (target {goal})"), ok));
    let (ss, sp, s1, tb) = ("-S -M simple -c 8", "-S -M prepared -c 8", "-S -M prepared -c 1", "tpcb -M prepared -c 8");
    let r = tps(ss, "pglease") / tps(ss, "pgbouncer");
    check("-S simple c8: pglease / pgbouncer", r, ">= 1.10", r >= 1.1);
    let r = tps(ss, "pglease") / tps(ss, "direct");
    check("-S simple c8: pglease / direct", r, ">= 0.70", r >= 0.7);
    let r = tps(sp, "pglease") / tps(sp, "pgbouncer");
    check("-S prepared c8: pglease / pgbouncer", r, ">= 1.10", r >= 1.1);
    let r = tps(sp, "pglease") / tps(sp, "direct");
    check("-S prepared c8: pglease / direct", r, ">= 0.60", r >= 0.6);
    let added = (lat(s1, "pglease") - lat(s1, "direct")) * 1000.0;
    check("-S prepared c1: added latency µs", added, "<= 20", added <= 20.0);
    let r = tps(tb, "pglease") / tps(tb, "pgbouncer");
    check("tpcb c8: pglease / pgbouncer", r, ">= 1.00", r >= 1.0);
    let c = median(vec![cpu(ss, "pglease"), cpu(sp, "pglease")]);
    check("proxy CPU per -S query µs", c, "<= 12", c <= 12.0);
    if let Some((_, Some(kib))) = idle.iter().find(|(n, _)| *n == "pglease") {
        check("idle session memory KiB", *kib, "<= 16", *kib <= 16.0);
    }
    let r = median(vec![tps(sp, "pglease fsync") / tps(sp, "pglease"), tps(tb, "pglease fsync") / tps(tb, "pglease")]);
    check("fsync / default audit tps, c8", r, ">= 0.90", r >= 0.9);
    let calls = |n: &str| syscalls.iter().find(|(p, _)| *p == n).and_then(|(_, c)| c.as_ref()).map(|c| c.0);
    if let (Some(lease), Some(bouncer)) = (calls("pglease"), calls("pgbouncer")) {
        check("syscalls per -S tx: pglease - pgbouncer", lease - bouncer, "<= 0.20", lease - bouncer <= 0.2);
    }
    let r = median(vec![tps(ss, "pglease") / tps(ss, "pglease append"), tps(sp, "pglease") / tps(sp, "pglease append")]);
    check("-S c8: mapped / append audit writer", r, "> 1.00", r > 1.0);
    println!("\n{:<40} {:<28}", "target", "measured");
    for (what, got, ok) in &targets_table {
        println!("{what:<40} {got:<28} {}", if *ok { "met" } else { "MISSED" });
    }
    if let Ok(path) = std::env::var("PGLEASE_BENCH_JSON") {
        let rows: Vec<serde_json::Value> = runs
            .iter()
            .flat_map(|((w, p), rs)| {
                rs.iter().map(move |r| serde_json::json!({"workload": w, "path": p, "tps": r.tps, "latency_ms": r.latency_ms, "transactions": r.transactions, "cpu_s": r.cpu_s}))
            })
            .collect();
        std::fs::write(path, serde_json::to_string_pretty(&serde_json::json!({"runs": rows, "idle_kib": idle.iter().map(|(n, k)| (n.to_string(), *k)).collect::<BTreeMap<_, _>>()})).unwrap()).unwrap();
    }
}
