//! The `pglease` binary as a user runs it: help texts, offline scope commands, the admin
//! commands against a running proxy, the auditors' tools, completions and man pages.

mod common;

use std::process::{Command, Output, Stdio};

use common::grants::{ALICE, BOB, EnvOptions, GrantsEnv};

fn pglease(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_pglease"));
    c.args(args).env_remove("PGLEASE_ADMIN_URL").env_remove("PGLEASE_ADMIN_TOKEN");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run pglease")
}

async fn pglease_async(args: Vec<String>, env: Vec<(&'static str, String)>) -> Output {
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        pglease(&args, &env)
    })
    .await
    .unwrap()
}

fn text(o: &[u8]) -> String {
    String::from_utf8_lossy(o).into_owned()
}

/// Every subcommand, as a user types it.
const COMMANDS: &[&[&str]] = &[
    &["serve"],
    &["init"],
    &["grant", "request"],
    &["grant", "approve"],
    &["grant", "deny"],
    &["grant", "issue"],
    &["grant", "revoke"],
    &["grant", "list"],
    &["grant", "show"],
    &["grant", "secret"],
    &["session", "list"],
    &["session", "kill"],
    &["scope", "list"],
    &["scope", "show"],
    &["scope", "check"],
    &["scope", "sql"],
    &["audit", "verify"],
    &["audit", "sessions"],
    &["audit", "show"],
    &["audit", "replay"],
    &["token", "new"],
    &["control-plane", "migrate"],
    &["dev-certs"],
    &["completions"],
    &["man"],
    &["demo"],
];

#[test]
fn every_argument_and_option_has_a_help_line() {
    for cmd in COMMANDS {
        let mut args = cmd.to_vec();
        args.push("--help");
        let out = pglease(&args, &[]);
        let help = text(&out.stdout);
        assert!(out.status.success(), "{cmd:?}: {}", text(&out.stderr));
        let mut section = "";
        for line in help.lines() {
            if !line.starts_with(' ') {
                section = line.trim_end_matches(':');
                continue;
            }
            if !matches!(section, "Arguments" | "Options") || line.trim().is_empty() {
                continue;
            }
            // "  <SCOPE>  The scope's name", "  -h, --help  Print help": a name, then words.
            let trimmed = line.trim_start();
            let described = trimmed.split("  ").filter(|p| !p.trim().is_empty()).count() >= 2;
            // A long help wraps onto lines that start further right; those are the text itself.
            let continuation = line.len() - trimmed.len() > 10;
            assert!(described || continuation, "{cmd:?}: no help for {trimmed:?}\n{help}");
        }
    }
    // Offline commands do not offer the admin API's options.
    for cmd in [&["scope", "check"][..], &["scope", "sql"], &["audit", "show"], &["audit", "verify"]] {
        let help = text(&pglease(&[cmd, &["--help"]].concat(), &[]).stdout);
        assert!(!help.contains("--admin-url"), "{cmd:?}:\n{help}");
    }
    let help = text(&pglease(&["scope", "check", "--help"], &[]).stdout);
    assert!(help.contains("the path `pglease serve` reads") && help.contains("[default: config/pglease.toml]"), "{help}");
    let help = text(&pglease(&["audit", "sessions", "--help"], &[]).stdout);
    assert!(help.contains("One JSON object per line"), "{help}");
}

#[test]
fn offline_scope_commands_say_which_file_and_which_scopes() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("pglease.toml");
    std::fs::write(&config, include_str!("../config/pglease.toml")).unwrap();
    let config = config.to_str().unwrap();
    let out = pglease(&["scope", "sql", "nosuch", "--config", config], &[]);
    let err = text(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("no scope named \"nosuch\"") && err.contains(config) && err.contains("it defines: dba, orders-read"), "{err}");
    let out = pglease(&["scope", "check", "orders-read", "DELETE FROM orders.orders", "--config", config], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stdout).starts_with("deny (42501)"), "{}", text(&out.stdout));
    let out = pglease(&["scope", "check", "orders-read", "SELECT count(*) FROM orders", "--demo"], &[]);
    assert!(out.status.success() && text(&out.stdout).starts_with("rewrite (results are capped at 1000 rows)"), "{}", text(&out.stdout));
    // A missing config file is reported once, with its cause once.
    let out = pglease(&["serve", "--config", "/nonexistent/pglease.toml", "--check"], &[]);
    let err = text(&out.stderr);
    assert!(!out.status.success() && err.matches("No such file or directory").count() == 1, "{err}");
}

#[test]
fn generated_files_print_clean_paths_and_completions_and_man_pages_exist() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = format!("{}/", dir.path().display());
    let out = pglease(&["dev-certs", "--out", &out_dir], &[]);
    let said = text(&out.stdout);
    assert!(out.status.success() && !said.contains("//") && said.contains("ca.crt"), "{said}");
    for shell in ["bash", "zsh", "fish"] {
        let out = pglease(&["completions", shell], &[]);
        assert!(out.status.success() && text(&out.stdout).contains("pglease"), "{shell}");
        assert!(text(&out.stdout).contains("secret"), "{shell}: subcommands are completed");
    }
    let man = dir.path().join("man");
    assert!(pglease(&["man", "--out", man.to_str().unwrap()], &[]).status.success());
    for page in ["pglease.1", "pglease-grant-secret.1", "pglease-audit-replay.1"] {
        let roff = std::fs::read_to_string(man.join(page)).unwrap();
        assert!(roff.contains(".TH"), "{page}");
    }
}

#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_pglease")).args(["completions", "bash"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    // Read nothing: the reader is gone before the writer is done.
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert!(out.status.success() || out.status.signal() == Some(libc::SIGPIPE), "{:?}", out.status);
    assert!(!text(&out.stderr).contains("panicked"), "{}", text(&out.stderr));
}

/// A grant through the CLI as a user would do it, and the auditors' tools on what it did.
#[tokio::test]
async fn admin_and_audit_commands_against_a_running_proxy() {
    let env = GrantsEnv::start(EnvOptions::default()).await;
    let h = common::harness().await;
    let url = env.admin_url.clone();
    let as_user = |token: &str| vec![("PGLEASE_ADMIN_URL", url.clone()), ("PGLEASE_ADMIN_TOKEN", token.to_owned())];
    let run = |args: &[&str], token: &str| pglease_async(args.iter().map(|s| s.to_string()).collect(), as_user(token));

    // Lists in JSON are one array, empty or not.
    let out = run(&["grant", "list", "--json"], ALICE).await;
    assert_eq!(text(&out.stdout).trim(), "[]");
    let out = run(&["scope", "list", "--json"], ALICE).await;
    assert!(serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap().as_array().is_some_and(|a| a.len() >= 5));

    // The whole rule set, durations as written.
    let out = run(&["scope", "show", "read"], ALICE).await;
    let shown = text(&out.stdout);
    for expected in ["max duration:      1h", "break-glass:       up to 10m", "public.t", "read, copy-out", "row limit:         3", "read budget:       none", "statement_timeout: 20s"] {
        assert!(shown.contains(expected), "{expected}:\n{shown}");
    }

    // An approver issues; the secret is shown only to the grant's user, with a ready line.
    let out = run(&["grant", "issue", "--user", "alice", "--scope", "app", "--for", "30m", "--reason", "cli test"], BOB).await;
    let said = text(&out.stdout);
    assert!(out.status.success() && said.contains("pglease grant secret") && !said.contains("PGPASSWORD="), "{said}");
    let id = said.split("pglease grant secret ").nth(1).unwrap().split_whitespace().next().unwrap().to_owned();
    let out = run(&["grant", "secret", &id], ALICE).await;
    let said = text(&out.stdout);
    let line = said.lines().find(|l| l.trim_start().starts_with("PGPASSWORD=")).unwrap_or_else(|| panic!("{said}")).trim().to_owned();
    assert!(line.contains(&format!("sslmode=verify-full sslrootcert={}", h.ca_file.display())), "{line}");
    // The line works as pasted (with the test's psql and port).
    let psql = common::pg_bin("psql");
    let marker = format!("cli_marker_{}", std::process::id());
    let pasted = line.replacen("psql ", &format!("{} ", psql.display()), 1) + &format!(" -Atc \"SELECT '{marker}', count(*) FROM t\" ; exit $?");
    let shell = tokio::process::Command::new("bash").args(["-c", &pasted]).output().await.unwrap();
    assert!(shell.status.success() && text(&shell.stdout).starts_with(&marker), "{}{}", text(&shell.stdout), text(&shell.stderr));

    // The auditors' tools on that session.
    let log = env.audit_log.display().to_string();
    let sessions = pglease_async(vec!["audit".into(), "sessions".into(), log.clone(), "--json".into()], vec![]).await;
    let session = text(&sessions.stdout).lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()).find(|s| s["grant"] == id.as_str()).expect("the session is in the log")["session"].as_u64().unwrap().to_string();
    let out = pglease_async(vec!["audit".into(), "replay".into(), log.clone(), "--session".into(), session.clone(), "--dry-run".into()], vec![]).await;
    let sql = text(&out.stdout);
    assert!(sql.contains(&marker) && !sql.contains(";;") && sql.lines().all(|l| l.trim_end().ends_with(';') || l.contains("-- params")), "{sql}");
    let out = pglease_async(vec!["audit".into(), "show".into(), log.clone(), "--session".into(), "999999".into()], vec![]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("session 999999 is not in"), "{}", text(&out.stderr));

    // Replay targets in both libpq forms, TLS as sslmode says; a target's error carries its SQLSTATE.
    let c = &h.cluster;
    let url = format!("postgresql://{}:{}@127.0.0.1:{}/{}?sslmode=verify-full&sslrootcert={}", c.superuser, c.password, c.port, env.database, c.ca_file.display());
    let kv = format!("host=localhost port={} user={} password={} dbname={} sslmode=require", c.port, c.superuser, c.password, env.database);
    for target in [url, kv] {
        let out = pglease_async(vec!["audit".into(), "replay".into(), log.clone(), "--session".into(), session.clone(), "--target".into(), target.clone()], vec![]).await;
        assert!(out.status.success(), "{target}: {}{}", text(&out.stdout), text(&out.stderr));
    }
    let bad = format!("host=127.0.0.1 port={} user={} password={} dbname=no_such_db sslmode=require", c.port, c.superuser, c.password);
    let out = pglease_async(vec!["audit".into(), "replay".into(), log, "--session".into(), session, "--target".into(), bad], vec![]).await;
    let err = text(&out.stderr);
    assert!(!out.status.success() && err.contains("3D000") && err.contains("no_such_db"), "{err}");
}
