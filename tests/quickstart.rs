//! The README's production quickstart, line by line, against a throwaway Postgres: so the
//! README cannot say something that does not work.
//!
//! What the test supplies, as a reader would: the upstream's connection string and password
//! (the two `export` lines name a database that is not here), a temporary directory for
//! `/etc/pglease`, free ports for 6432 and 9187, `pglease` and `psql` on PATH (the test build
//! and the cluster's own), and the tokens and grant id the commands print.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

/// The shell lines of the README's "Production quickstart" block.
fn quickstart_lines() -> Vec<String> {
    let readme = include_str!("../README.md");
    let section = readme.split("## Production quickstart").nth(1).expect("README has a Production quickstart section");
    let block = section.split("```sh").nth(1).and_then(|b| b.split("```").next()).expect("a sh block in it");
    block.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(str::to_owned).collect()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Runs one line in bash with the exports so far; returns (success, stdout, stderr).
async fn sh(line: &str, env: &BTreeMap<String, String>, path: &Path) -> (bool, String, String) {
    let out = tokio::process::Command::new("bash")
        .args(["-c", line])
        .envs(env)
        .env("PATH", format!("{}:{}", path.display(), std::env::var("PATH").unwrap_or_default()))
        .output()
        .await
        .unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// `A=1 B='x y' C=z   # comment` as (name, value) pairs, quotes removed.
fn assignments_of(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = text.trim();
    while let Some((name, after)) = rest.split_once('=') {
        let name = name.trim().to_owned();
        let (value, tail) = match after.strip_prefix('\'') {
            Some(quoted) => quoted.split_once('\'').unwrap_or((quoted, "")),
            None => after.split_once(char::is_whitespace).unwrap_or((after, "")),
        };
        out.push((name, value.to_owned()));
        rest = tail.trim();
        if rest.starts_with('#') {
            break;
        }
    }
    out
}

/// The value after `label` on the first line that has it.
fn printed(output: &str, label: &str) -> String {
    output.lines().find_map(|l| l.split_once(label).map(|(_, v)| v.split_whitespace().next().unwrap_or("").to_owned())).unwrap_or_else(|| panic!("no {label:?} in:\n{output}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_production_quickstart_works_as_written() {
    let h = common::harness().await;
    let database = common::fresh_database().await;
    let c = &h.cluster;
    let dir = tempfile::tempdir().unwrap();
    let etc = dir.path().join("etc-pglease");
    let bin = dir.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_pglease"), bin.join("pglease")).unwrap();
    std::os::unix::fs::symlink(common::pg_bin("psql"), bin.join("psql")).unwrap();
    let (proxy_port, admin_port) = (free_port(), free_port());
    let upstream = format!("postgresql://{}@127.0.0.1:{}/{database}?sslmode=verify-full&sslrootcert={}", c.superuser, c.port, c.ca_file.display());

    let mut env: BTreeMap<String, String> = BTreeMap::new();
    let mut last_output = String::new();
    let mut request_output = String::new();
    let mut tokens: BTreeMap<&str, String> = BTreeMap::new();
    let mut server: Option<tokio::process::Child> = None;
    let lines = quickstart_lines();
    assert!(lines.len() >= 8, "{lines:?}");
    for line in &lines {
        let line = line
            .replace("/etc/pglease", &etc.display().to_string())
            .replace("127.0.0.1:6432", &format!("127.0.0.1:{proxy_port}"))
            .replace("127.0.0.1:9187", &format!("127.0.0.1:{admin_port}"));
        if let Some(assignments) = line.strip_prefix("export ") {
            // The reader's own values: the upstream and its password, then what init printed.
            for (name, value) in assignments_of(assignments) {
                let name = name.as_str();
                let value = match name {
                    "PGLEASE_UPSTREAM" => upstream.clone(),
                    "PGPASSWORD" => c.password.clone(),
                    "ADMIN_TOKEN" => tokens["admin"].clone(),
                    "ENGINEER_TOKEN" => tokens["engineer"].clone(),
                    _ => value,
                };
                env.insert(name.to_owned(), value);
            }
            continue;
        }
        if let Some(background) = line.strip_suffix('&') {
            let child = tokio::process::Command::new("bash")
                .args(["-c", &format!("exec {background}")])
                .envs(&env)
                .env("PATH", format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default()))
                .stderr(std::process::Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .unwrap();
            server = Some(child);
            let healthy = common::eventually(Duration::from_secs(30), || async {
                tokio::task::spawn_blocking(move || ureq::get(&format!("http://127.0.0.1:{admin_port}/healthz")).call().ok()).await.unwrap().map(|_| ())
            })
            .await;
            assert!(healthy.is_some(), "pglease serve came up");
            continue;
        }
        let line = line.replace("$GRANT_ID", &env.get("GRANT_ID").cloned().unwrap_or_default());
        let (ok, stdout, stderr) = sh(&line, &env, &bin).await;
        assert!(ok, "{line}\n{stdout}\n{stderr}");
        if line.starts_with("pglease init") {
            tokens.insert("admin", printed(&stdout, "admin:"));
            tokens.insert("engineer", printed(&stdout, "engineer:"));
        }
        if line.contains("grant request") {
            env.insert("GRANT_ID".into(), printed(&stdout, "pglease grant approve "));
            request_output = stdout.clone();
        }
        last_output = stdout;
    }
    assert!(server.is_some(), "the quickstart starts the proxy");
    assert!(last_output.contains("active"), "the grant was approved:\n{last_output}");

    // The engineer pastes the line the request printed; it works now that the grant is approved.
    let request = sh(
        &format!("PGLEASE_ADMIN_TOKEN={} pglease grant show {} --json", tokens["engineer"], env["GRANT_ID"]),
        &env,
        &bin,
    )
    .await;
    assert!(request.0, "{}", request.2);
    let grant: serde_json::Value = serde_json::from_str(&request.1).unwrap();
    assert_eq!(grant["status"], "active");
    let pasted = request_output.lines().find(|l| l.trim_start().starts_with("PGPASSWORD=")).unwrap_or_else(|| panic!("{request_output}")).trim().to_owned();
    assert!(pasted.contains("sslmode=verify-full sslrootcert="), "{pasted}");
    let (ok, out, err) = sh(&format!("{pasted} -Atc 'SELECT 40 + 2'"), &env, &bin).await;
    assert!(ok && out.trim() == "42", "{pasted}\n{out}{err}");
    // Writes are outside the starter scope.
    let (ok, _, err) = sh(&format!("{pasted} -Atc 'CREATE TABLE public.x (id int)'"), &env, &bin).await;
    assert!(!ok && err.contains("scope \"read\" does not allow"), "{err}");
}

/// The README stands on its own: its two commands first, and no link out of the repository.
#[test]
fn the_readme_starts_with_its_two_commands_and_stands_alone() {
    let readme = include_str!("../README.md");
    let first_block = readme.split("```sh").nth(1).and_then(|b| b.split("```").next()).unwrap();
    let commands: Vec<&str> = first_block.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    assert_eq!(commands.len(), 2, "{commands:?}");
    assert!(commands[0].starts_with("scripts/dev.sh demo") && commands[1].starts_with("scripts/dev.sh test"), "{commands:?}");
    assert!(!readme.contains("../"), "the README points outside the repository");
    // Every repository path it names in backquotes exists.
    for path in readme.split('`').skip(1).step_by(2).filter(|p| (p.starts_with("src/") || p.starts_with("tests/") || p.starts_with("scripts/") || p.starts_with("config/")) && !p.contains(' ') && !p.contains('*')) {
        let path = path.trim_end_matches('/');
        assert!(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path).exists(), "README names {path}, which does not exist");
    }
}
