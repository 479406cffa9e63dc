//! What the policy knows of Postgres's own catalog: the table of built-in functions is the
//! catalog's (regenerated with `PGLEASE_BLESS=1` when a Postgres release changes it), and random
//! SQL that sqlsmith generates over a scope's tables is refused by pglease only for its deliberate
//! deny classes where the scope's backing role would run it; what pglease rewrites (`*`
//! expanded, masks applied) runs wherever the statement ran as written, and no real value of a
//! masked column comes out of it.

mod common;

use std::collections::BTreeMap;
use std::process::Command;

use pglease::policy::ScopePolicy;
use pglease::policy::functions::{self, Volatility};

/// The Postgres major version of the test cluster.
async fn server_major(client: &tokio_postgres::Client) -> u32 {
    let row = client.query_one("SELECT current_setting('server_version_num')::int / 10000", &[]).await.unwrap();
    row.get::<_, i32>(0) as u32
}

async fn superuser(database: &str) -> tokio_postgres::Client {
    let h = common::harness().await;
    let (client, conn) = h.cluster.superuser_config(database).connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    client
}

#[tokio::test]
async fn the_builtin_table_is_the_catalogs() {
    let client = superuser("postgres").await;
    let major = server_major(&client).await;
    let mut rows: Vec<(String, String)> =
        client.query(functions::CATALOG_QUERY, &[]).await.unwrap().iter().map(|r| (r.get(0), r.get(1))).collect();
    // Byte order, as the table is searched (the cluster's collation may sort otherwise).
    rows.sort();
    let live: Vec<(String, Volatility)> = rows
        .iter()
        .map(|(n, v)| {
            let v = match v.as_str() {
                "i" => Volatility::Immutable,
                "s" => Volatility::Stable,
                _ => Volatility::Volatile,
            };
            (n.clone(), v)
        })
        .collect();
    let table: Vec<(String, Volatility)> = functions::BUILTINS.iter().map(|(n, v)| ((*n).to_owned(), *v)).collect();
    let mut aggregates: Vec<String> = client.query(functions::AGGREGATES_QUERY, &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
    aggregates.sort();
    let known: Vec<String> = functions::AGGREGATES.iter().map(|a| (*a).to_owned()).collect();
    let mut row_argument: Vec<String> = client.query(functions::ROW_ARGUMENT_QUERY, &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
    row_argument.sort();
    let known_row: Vec<String> = functions::ROW_ARGUMENT.iter().map(|a| (*a).to_owned()).collect();
    if major == functions::BUILTINS_MAJOR && (live != table || aggregates != known || row_argument != known_row) {
        let source = functions::render_table(major, &rows, &aggregates, &row_argument).unwrap();
        if std::env::var_os("PGLEASE_BLESS").is_some() {
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("src/policy/builtins_pg{major}.rs"));
            std::fs::write(&path, source).unwrap();
            panic!("rewrote {}: build and run again", path.display());
        }
        let missing: Vec<_> = live.iter().filter(|r| !table.contains(r)).take(20).collect();
        let extra: Vec<_> = table.iter().filter(|r| !live.contains(r)).take(20).collect();
        panic!(
            "src/policy/builtins_pg{major}.rs is not this Postgres's catalog (PGLEASE_BLESS=1 rewrites it)\n  in the catalog only: {missing:?}\n  in the table only: {extra:?}\n  aggregates: {aggregates:?}"
        );
    }
    assert_eq!(major, functions::BUILTINS_MAJOR, "the tests run against Postgres {major}; the table is of {}", functions::BUILTINS_MAJOR);
}

#[test]
fn the_table_decides_by_volatility_and_the_deny_classes_stay_denied() {
    // Sorted, without duplicates: the lookups are binary searches.
    assert!(functions::BUILTINS.windows(2).all(|w| w[0].0 < w[1].0));
    assert!(functions::AGGREGATES.windows(2).all(|w| w[0] < w[1]));
    assert!(["count", "max", "string_agg", "row_number", "lag"].iter().all(|a| functions::is_aggregate(a)));
    assert!(!functions::is_aggregate("lower"));
    assert!(functions::ROW_ARGUMENT.windows(2).all(|w| w[0] < w[1]));
    assert!(["row_to_json", "to_jsonb", "hash_record", "json_build_array"].iter().all(|f| functions::takes_a_row(f)));
    assert!(!functions::takes_a_row("name") && !functions::takes_a_row("upper"));
    assert!(functions::BUILTINS.len() > 2000, "{}", functions::BUILTINS.len());
    // Every name of every class that must stay refused by default is refused by default,
    // and is a real built-in (or a pattern over some), so the lists cannot rot unnoticed.
    for (class, names) in functions::INFORMATION {
        for pattern in *names {
            let matching: Vec<&str> = match pattern.strip_suffix('*') {
                Some(prefix) => functions::BUILTINS.iter().map(|(n, _)| *n).filter(|n| n.starts_with(prefix)).collect(),
                None => vec![pattern],
            };
            assert!(!matching.is_empty(), "{class}: {pattern} matches no built-in");
            for name in matching {
                assert!(functions::builtin(name).is_some(), "{class}: {name} is not a built-in");
                assert!(!functions::builtin_allowed_by_default(name), "{class}: {name} is allowed by default");
            }
        }
    }
    for name in functions::NEVER.iter().chain(functions::NAMED_ONLY.iter().flat_map(|(_, n)| n.iter())) {
        assert!(!functions::builtin_allowed_by_default(name), "{name} is allowed by default");
    }
    // Every VOLATILE built-in is refused unless listed: locks, sequences, large objects, WAL,
    // snapshots, replication, SQL from a string.
    for (name, v) in functions::BUILTINS {
        if *v == Volatility::Volatile {
            assert_eq!(functions::builtin_allowed_by_default(name), functions::VOLATILE_ALLOWED.contains(name), "{name}");
        }
    }
    for name in ["nextval", "setval", "currval", "lastval", "lo_get", "pg_advisory_lock", "txid_status", "pg_current_wal_lsn", "query_to_xml", "ts_stat", "ts_rewrite", "pg_export_snapshot", "set_config", "pg_read_file"] {
        assert!(!functions::builtin_allowed_by_default(name), "{name}");
    }
    for name in functions::VOLATILE_ALLOWED {
        assert_eq!(functions::builtin(name), Some(Volatility::Volatile), "{name} is listed as volatile but is not");
    }
    // What the hand list missed, found by random SQL.
    for name in ["current_user", "session_user", "getdatabaseencoding", "pg_client_encoding", "polygon", "diagonal", "int8multirange", "uuid_in", "uuid_ne", "numeric_mod", "timetz", "money"] {
        assert!(functions::builtin_allowed_by_default(name), "{name}");
    }
}

/// The tables and columns the demo's `support` scope may read (`SHOP_SCHEMA` without
/// `orders.items`; `customers.ssn` is read masked).
const SUPPORT_MIRROR: &str = "
    CREATE SCHEMA orders;
    CREATE TABLE public.customers (id bigint PRIMARY KEY, name text, email text, ssn text);
    CREATE TABLE orders.orders (id bigint PRIMARY KEY, customer_id bigint, amount_cents bigint, status text, created_at timestamptz);
";

/// Whether a value contains what the demo's ssn values look like (`ddd-dd-dddd`).
fn looks_like_ssn(value: &str) -> bool {
    let b = value.as_bytes();
    b.windows(11).any(|w| {
        w.iter().enumerate().all(|(i, c)| if i == 3 || i == 6 { *c == b'-' } else { c.is_ascii_digit() })
    })
}

/// How refusals by one of pglease's deliberate deny classes are named.
const INTENDED: &str = "by design: ";

/// The class of a refusal: the deny class of the function it names, or the message itself.
fn refusal_class(message: &str) -> String {
    let reason = message.split_once("\" ").map_or(message, |(_, r)| r);
    if reason.starts_with("does not allow masked column") {
        return format!("{INTENDED}a masked column used to filter, join, sort, group or aggregate");
    }
    let Some(function) = reason.strip_prefix("does not allow calling function ") else { return reason.to_owned() };
    let (schema, name) = function.rsplit_once('.').map_or((None, function), |(s, n)| (Some(s), n));
    let class = if schema.is_some_and(|s| s != "pg_catalog") {
        "functions outside pg_catalog (user-defined, extensions, information_schema's own)".to_owned()
    } else if functions::NEVER.contains(&name) {
        "never allowed (files, large objects, replication control, SQL from a string)".to_owned()
    } else if let Some(class) = functions::named_only_class(name).or(functions::information_class(name)) {
        class.to_owned()
    } else {
        match functions::builtin(name) {
            Some(Volatility::Volatile) => "VOLATILE built-ins (WAL position and control, sequences, snapshots, statistics flushes…)".to_owned(),
            None => "not callable from SQL (handlers)".to_owned(),
            Some(_) => return reason.to_owned(),
        }
    };
    format!("{INTENDED}{class}")
}

/// What Postgres did with a statement run as the backing role.
#[derive(Debug, Clone, PartialEq)]
enum Outcome {
    /// It ran to completion.
    Ran,
    /// It was refused: insufficient privilege.
    Refused,
    /// It failed otherwise (a value out of range, division by zero, the statement timeout…),
    /// possibly while planning, before Postgres checked privileges: whether the role may run
    /// it is not known.
    Failed,
}

#[tokio::test]
async fn random_sql_over_a_scopes_tables_is_refused_hardly_more_than_by_its_role() {
    let h = common::harness().await;
    let database = common::fresh_database().await;
    h.cluster.execute(&database, pglease::demo::SHOP_SCHEMA).await.unwrap();
    // The demo's support scope, on this database, backed by a role of the test's own.
    let mut scope = pglease::demo::demo_scopes().remove("support").unwrap();
    let role = format!("{database}_support");
    scope.role = role.clone();
    scope.database = database.clone();
    let password = "support-secret";
    let sql = pglease::policy::sql::scope_sql("support", &scope);
    h.cluster.execute(&database, &sql).await.unwrap();
    h.cluster.execute(&database, &format!("ALTER ROLE \"{role}\" PASSWORD '{password}'")).await.unwrap();
    let policy = ScopePolicy::from_config("support", &scope);
    // What the proxy knows of the tables (it reads the same from the catalog).
    let schema = pglease::policy::schema::Schema::from_ddl(pglease::demo::SHOP_SCHEMA).unwrap();

    // sqlsmith reads a schema from the catalog, where a role sees every column of every table
    // whatever its privileges: it generates over a mirror of what the scope allows instead.
    let mirror = common::fresh_database().await;
    h.cluster.execute(&mirror, SUPPORT_MIRROR).await.unwrap();
    let target = format!("host={} port={} dbname={mirror} user={} password={}", h.cluster.dir.display(), h.cluster.port, h.cluster.superuser, h.cluster.password);
    let queries = 1500;
    let out = tokio::task::spawn_blocking(move || {
        Command::new("sqlsmith")
            .args([format!("--target={target}"), "--dry-run".into(), "--exclude-catalog".into(), "--seed=7".into(), format!("--max-queries={queries}")])
            .output()
    })
    .await
    .unwrap()
    .expect("sqlsmith runs (scripts/dev.sh test installs it: apt-get install sqlsmith)");
    assert!(out.status.success(), "sqlsmith: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let statements: Vec<&str> = pg_query::split_with_scanner(&text).unwrap().into_iter().map(str::trim).filter(|s| !s.is_empty()).collect();
    assert!(statements.len() >= queries * 9 / 10, "sqlsmith printed {} statements", statements.len());

    // Each statement, straight to Postgres as the backing role, in a transaction rolled back.
    let mut config = h.cluster.superuser_config(&database);
    config.user(&role).password(password);
    let (client, conn) = config.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let mut extra: BTreeMap<String, (usize, String)> = BTreeMap::new();
    let mut codes: BTreeMap<String, usize> = BTreeMap::new();
    let (mut rewrites_ran, mut rewrite_errors, mut broken) = (0, BTreeMap::<String, usize>::new(), Vec::<String>::new());
    let (mut pglease_refused, mut role_refused, mut role_ran, mut only_role) = (0, 0, 0, 0);
    for statement in &statements {
        client.batch_execute("BEGIN; SET LOCAL statement_timeout = '200ms'").await.unwrap();
        let outcome = match client.batch_execute(statement).await {
            Ok(()) => Outcome::Ran,
            Err(e) => match e.code().map(|c| c.code()) {
                Some("42501") => Outcome::Refused,
                Some(code) => {
                    *codes.entry(code.to_owned()).or_default() += 1;
                    Outcome::Failed
                }
                None => panic!("connection lost: {e}"),
            },
        };
        client.batch_execute("ROLLBACK").await.unwrap();
        let verdict = policy.decide_with_schema(statement, Some(&schema));
        let refused_by_role = outcome == Outcome::Refused;
        role_refused += refused_by_role as usize;
        role_ran += (outcome == Outcome::Ran) as usize;
        match verdict.decision {
            pglease::policy::Decision::Deny { message, .. } => {
                pglease_refused += 1;
                if outcome == Outcome::Ran {
                    let entry = extra.entry(refusal_class(&message)).or_insert((0, statement.to_string()));
                    entry.0 += 1;
                }
            }
            _ if refused_by_role => only_role += 1,
            pglease::policy::Decision::Rewrite { sql, .. } => {
                // What runs instead: it runs, and no real ssn comes out of it.
                client.batch_execute("BEGIN; SET LOCAL statement_timeout = '200ms'").await.unwrap();
                match client.simple_query(&sql).await {
                    Ok(messages) => {
                        rewrites_ran += 1;
                        for m in &messages {
                            if let tokio_postgres::SimpleQueryMessage::Row(row) = m {
                                for i in 0..row.len() {
                                    if let Some(value) = row.get(i).filter(|v| looks_like_ssn(v)) {
                                        panic!("a real ssn ({value}) came out of\n{sql}\nrewritten from\n{statement}");
                                    }
                                }
                            }
                        }
                    }
                    Err(e) => {
                        let code = e.code().map(|c| c.code().to_owned()).unwrap_or_default();
                        if outcome == Outcome::Ran {
                            // The statement ran as written and fails rewritten.
                            broken.push(format!("{code} {e}: {sql}"));
                        }
                        *rewrite_errors.entry(code).or_default() += 1;
                    }
                }
                client.batch_execute("ROLLBACK").await.unwrap();
            }
            _ => {}
        }
    }
    let n = statements.len();
    eprintln!("rewritten statements run: {rewrites_ran} without error, and errors by SQLSTATE {rewrite_errors:?}");
    for b in &broken {
        eprintln!("  ran as written, fails rewritten: {}", b.chars().take(400).collect::<String>().replace('\n', " "));
    }
    assert!(rewrites_ran > 0, "no rewritten statement ran");
    assert!(broken.is_empty(), "{} statements ran as written and fail rewritten", broken.len());
    let extra_total: usize = extra.values().map(|(count, _)| count).sum();
    let unintended: usize = extra.iter().filter(|(class, _)| !class.starts_with(INTENDED)).map(|(_, (count, _))| count).sum();
    let percent = |part: usize, of: usize| part as f64 * 100.0 / of.max(1) as f64;
    let mut classes: Vec<_> = extra.into_iter().collect();
    classes.sort_by(|a, b| b.1.0.cmp(&a.1.0));
    eprintln!(
        "{n} statements; the backing role ran {role_ran}, refused {role_refused}, and failed otherwise {}\n\
         pglease refused {pglease_refused}: {extra_total} of those the role ran ({:.1}%), {unintended} of them outside its deny classes ({:.1}%); \
         the role alone refused {only_role}",
        n - role_ran - role_refused,
        percent(extra_total, role_ran),
        percent(unintended, role_ran),
    );
    eprintln!("  the role's other errors, by SQLSTATE: {codes:?}");
    for (class, (count, example)) in &classes {
        eprintln!("  {count:4}  {class}\n        e.g. {}", example.chars().take(300).collect::<String>().replace('\n', " "));
    }
    assert!(role_ran >= n / 5, "too few statements ran to measure anything: {role_ran} of {n}");
    assert!(
        percent(unintended, role_ran) < 3.0,
        "pglease refused {unintended} of the {role_ran} random statements the backing role runs for reasons outside its deny classes"
    );
}
