//! The decision function against the demo scopes, class by class of the threat model.

use super::*;

/// A demo scope; `support` as it was before the demo masked ssn: with ssn denied (the column
/// rules' tests are about denial; `masking()` is the masking one).
fn scope(name: &str) -> ScopePolicy {
    let mut scopes = crate::demo::demo_scopes();
    if name == "support" {
        let rule = &mut scopes.get_mut("support").expect("the demo has support").tables[0];
        rule.mask_columns.clear();
        rule.deny_columns = vec!["ssn".into()];
    }
    ScopePolicy::from_config(name, &scopes[name])
}

#[track_caller]
fn allowed(s: &ScopePolicy, sql: &str) {
    let v = s.decide_uncached(sql);
    assert!(!v.decision.is_deny(), "{} should allow {sql:?}, got {:?}", s.name, v.decision);
}

#[track_caller]
fn denied(s: &ScopePolicy, sql: &str, why: &str) {
    match s.decide_uncached(sql).decision {
        Decision::Deny { message, .. } => assert!(message.contains(why), "{} refused {sql:?} but said {message:?}, expected {why:?}", s.name),
        other => panic!("{} should refuse {sql:?}, got {other:?}", s.name),
    }
}

/// The statement `s` runs instead of `sql` (its row cap applied); panics unless it rewrites.
#[track_caller]
fn rewritten(s: &ScopePolicy, sql: &str) -> String {
    match s.decide_uncached(sql).decision {
        Decision::Rewrite { sql, .. } => sql,
        other => panic!("{} should rewrite {sql:?}, got {other:?}", s.name),
    }
}

#[test]
fn reads_in_scope_are_allowed_and_capped() {
    let s = scope("orders-read");
    allowed(&s, "SELECT * FROM orders.orders WHERE id = 1");
    allowed(&s, "select count(*), status from orders group by status"); // via search_path orders
    allowed(&s, "SELECT o.id, i.sku FROM orders.orders o JOIN orders.items i ON i.order_id = o.id");
    allowed(&s, "EXPLAIN SELECT * FROM orders.orders");
    allowed(&s, "SELECT c.relname FROM pg_catalog.pg_class c WHERE pg_catalog.pg_table_is_visible(c.oid)");
    allowed(&s, "SELECT table_name FROM information_schema.tables");
    let sql = rewritten(&s, "SELECT * FROM orders.orders");
    assert!(sql.ends_with("LIMIT 1000"), "{sql}");
    let sql = rewritten(&s, "SELECT * FROM orders.orders LIMIT 5000");
    assert!(sql.contains("LIMIT 1000") && !sql.contains("5000"), "{sql}");
    assert_eq!(s.decide_uncached("SELECT * FROM orders.orders LIMIT 10").decision, Decision::Allow);
    let sql = rewritten(&s, "SELECT * FROM orders.orders LIMIT $1");
    assert!(sql.contains("LEAST($1, 1000::bigint)"), "{sql}");
    let sql = rewritten(&s, "COPY orders.orders TO STDOUT");
    assert!(sql.contains("LIMIT 1000") && sql.starts_with("COPY (SELECT"), "{sql}");
}

#[test]
fn a_capped_statement_runs_only_as_the_tree_that_was_checked() {
    let s = scope("orders-read");
    // The deparser prints the parameter `$0` as `?`: the rewritten text would not be the statement
    // that was checked, so it is refused (Postgres itself has no parameter $0).
    denied(&s, "SELECT * FROM orders.orders WHERE id = $0", "rewritten statement does not parse");
    denied(&s, "PREPARE p(int) AS SELECT * FROM orders.orders WHERE id = $0", "rewritten statement does not parse");
    // It cannot print a COPY format Postgres does not know: refused before it tries.
    denied(&s, "COPY orders.orders TO STDOUT WITH (FORMAT c)", "COPY format \"c\" not recognized");
    denied(&s, "COPY orders.orders TO STDOUT WITH (FORMAT 1)", "COPY format must be");
    allowed(&s, "COPY orders.orders TO STDOUT WITH (FORMAT csv, HEADER)");
    // Names that need quoting, operators, casts, IN lists and parameters read back the same.
    let sql = rewritten(&s, "SELECT c.relname FROM pg_catalog.pg_class c WHERE c.relkind IN ('r','p','') AND c.relname !~ '^pg_toast' ORDER BY 1");
    assert!(sql.ends_with("LIMIT 1000"), "{sql}");
    let sql = rewritten(&s, "PREPARE p(int) AS SELECT \"ºx\".id FROM orders.orders \"ºx\" WHERE id >>= $1::int AND note ~~ 'a''b' LIMIT $1");
    assert!(sql.contains("LEAST($1, 1000::bigint)") && sql.contains("\"ºx\""), "{sql}");
}

#[test]
fn writes_outside_the_scope_are_refused_with_the_rule() {
    let s = scope("orders-read");
    denied(&s, "DELETE FROM orders.orders WHERE id = 1", "does not allow DELETE on orders.orders");
    assert!(matches!(s.decide_uncached("DELETE FROM orders.orders WHERE id = 1").decision, Decision::Deny { ref message, ref code } if message == "pglease: scope \"orders-read\" does not allow DELETE on orders.orders" && code == "42501"));
    denied(&s, "INSERT INTO orders.items VALUES (1, 'x', 1)", "INSERT on orders.items");
    denied(&s, "UPDATE orders SET status = 'x' WHERE id = 1", "UPDATE on orders.orders");
    denied(&s, "TRUNCATE orders.items", "TRUNCATE");
    denied(&s, "SELECT * FROM public.customers", "SELECT on public.customers");
    // Unqualified names resolve only within the pinned search_path (orders): this is
    // orders.customers, which does not exist; public.customers is out of reach.
    allowed(&s, "SELECT * FROM customers");
    denied(&scope("support"), "SELECT * FROM items", "SELECT on public.items");
    denied(&s, "COPY orders.items FROM STDIN", "COPY FROM");
}

#[test]
fn writes_hidden_inside_reads() {
    let s = scope("orders-read");
    denied(&s, "WITH gone AS (DELETE FROM orders.orders WHERE id = 1 RETURNING *) SELECT * FROM gone", "DELETE");
    denied(&s, "SELECT * INTO orders.copy FROM orders.orders", "DDL");
    denied(&s, "EXPLAIN ANALYZE DELETE FROM orders.orders WHERE id = 1", "DELETE");
    denied(&s, "SELECT * FROM orders.orders FOR UPDATE", "row locks count as UPDATE");
    denied(&s, "SELECT id FROM orders.orders WHERE id = 1 FOR SHARE", "UPDATE");
    denied(&s, "SELECT nextval('orders.seq')", "nextval");
    denied(&s, "SELECT setval('orders.seq', 1)", "setval");
    denied(&s, "SELECT pg_advisory_lock(1)", "pg_advisory_lock");
    denied(&s, "NOTIFY chan, 'x'", "NOTIFY");
    denied(&s, "SELECT pg_notify('chan', 'x')", "pg_notify");
    denied(&s, "SELECT orders.cancel_everything()", "orders.cancel_everything");
    denied(&s, "SELECT my_volatile_function(id) FROM orders.orders", "my_volatile_function");
    denied(&s, "SELECT * FROM orders.orders WHERE id IN (SELECT x FROM unknown_func())", "unknown_func");
    denied(&s, "SELECT 1 WHERE EXISTS (SELECT 1 FROM (WITH x AS (INSERT INTO orders.items VALUES (1,'a',1) RETURNING 1) SELECT * FROM x) y)", "INSERT");
    denied(&s, "SELECT 1 OPERATOR(public.+) 1", "operator public.+");
}

#[test]
fn several_statements_prepared_statements_cursors_and_code() {
    let s = scope("orders-read");
    denied(&s, "SELECT 1; DELETE FROM orders.orders WHERE id = 1; SELECT 2", "DELETE");
    denied(&s, "PREPARE p AS DELETE FROM orders.orders WHERE id = $1", "DELETE");
    let v = s.decide_uncached("PREPARE p AS SELECT * FROM orders.orders WHERE id = $1");
    assert!(!v.decision.is_deny());
    assert_eq!(v.effects, vec![Effect::Prepared("p".into())]);
    allowed(&s, "EXECUTE p(1)");
    assert_eq!(s.decide_uncached("DEALLOCATE ALL").effects, vec![Effect::Deallocated(None)]);
    denied(&s, "DECLARE c CURSOR FOR SELECT * FROM public.customers", "public.customers");
    allowed(&s, "DECLARE c CURSOR FOR SELECT * FROM orders.orders");
    allowed(&s, "FETCH 10 FROM c");
    denied(&s, "DO $$ BEGIN DELETE FROM orders.orders; END $$", "DO blocks");
    denied(&s, "CALL orders.cleanup()", "CALL");
    denied(&s, "PREPARE TRANSACTION 'x'", "two-phase");
}

#[test]
fn session_state_that_changes_meaning_is_pinned() {
    let s = scope("orders-read");
    for sql in [
        "SET search_path = public",
        "SET ROLE postgres",
        "SET SESSION AUTHORIZATION postgres",
        "RESET ROLE",
        "SET standard_conforming_strings = off",
        "SET client_encoding = 'LATIN1'",
        "SET default_transaction_read_only = off",
        "SET statement_timeout = 0",
        "SET LOCAL search_path = public",
        "RESET search_path",
        "SET work_mem = '1GB'",
    ] {
        denied(&s, sql, "does not allow changing setting");
    }
    denied(&s, "SELECT set_config('search_path', 'public', false)", "does not allow changing setting search_path");
    // application_name carries pglease's stamp: a SET keeps it and adds the client's name.
    let v = s.decide_uncached("SET application_name = 'PostgreSQL JDBC Driver'");
    assert_eq!((v.decision, v.effects), (Decision::Allow, vec![Effect::ApplicationName { value: "PostgreSQL JDBC Driver".into(), local: false }]));
    assert_eq!(s.decide_uncached("RESET application_name").effects, vec![Effect::ApplicationName { value: String::new(), local: false }]);
    assert_eq!(s.decide_uncached("SET LOCAL application_name TO x").effects, vec![Effect::ApplicationName { value: "x".into(), local: true }]);
    denied(&s, "SET application_name = 5", "only to a string");
    denied(&s, "SET application_name = 'x'; SELECT 1", "only as a statement of its own");
    denied(&s, "SELECT set_config('application_name', 'x', false)", "set_config");
    denied(&s, "BEGIN READ WRITE", "READ WRITE");
    denied(&s, "START TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ WRITE", "READ WRITE");
    denied(&s, "SET TRANSACTION READ WRITE", "READ WRITE");
    denied(&s, "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE", "READ WRITE");
    allowed(&s, "BEGIN");
    allowed(&s, "BEGIN READ ONLY");
    allowed(&s, "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ");
    allowed(&s, "SET DateStyle = 'ISO, MDY'");
    allowed(&s, "SET TIME ZONE 'UTC'");
    allowed(&s, "RESET ALL");
    allowed(&s, "SHOW search_path");
    allowed(&s, "COMMIT");
    // A write scope may begin read-write transactions, and the dba scope may change settings.
    allowed(&scope("orders-write"), "BEGIN READ WRITE");
    allowed(&scope("dba"), "SET work_mem = '64MB'");
    denied(&scope("dba"), "SET ROLE postgres", "does not allow changing setting role");
}

#[test]
fn name_resolution() {
    let s = scope("orders-read");
    // Case folding and quoting: ORDERS.Orders folds to orders.orders; "Orders" does not.
    allowed(&s, "SELECT * FROM ORDERS.Orders");
    denied(&scope("support"), "SELECT * FROM \"Public\".customers", "SELECT on Public.customers");
    // Unicode-escaped identifiers are decoded by the parser before the check.
    denied(&s, "SELECT * FROM public.U&\"\\0063ustomers\"", "public.customers");
    allowed(&s, "SELECT * FROM orders.U&\"\\006Frders\"");
    // Over-long identifiers are truncated to 63 bytes, as Postgres does.
    let long = format!("orders.{}", "x".repeat(100));
    denied(&scope("support"), &format!("SELECT * FROM {long}"), &format!("orders.{}", "x".repeat(63)));
    // A CTE named like a table hides it only inside its scope.
    allowed(&s, "WITH customers AS (SELECT 1 AS id) SELECT * FROM customers");
    let support = scope("support");
    denied(&support, "WITH orders AS (SELECT * FROM orders) SELECT * FROM orders", "SELECT on public.orders");
    denied(&support, "SELECT (WITH items AS (SELECT 1) SELECT 1), * FROM items", "SELECT on public.items");
    allowed(&support, "WITH items AS (SELECT 1 AS id) SELECT * FROM items");
    allowed(&s, "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 5) SELECT * FROM r");
    // Other databases are never reachable by name.
    denied(&s, "SELECT * FROM otherdb.orders.orders", "other databases");
    // Catalog names resolve to pg_catalog, others along search_path only.
    allowed(&s, "SELECT relname FROM pg_class");
    // A temp table cannot be created to shadow a real one.
    denied(&s, "CREATE TEMP TABLE orders (id int)", "DDL");
}

#[test]
fn column_rules() {
    let s = scope("support");
    allowed(&s, "SELECT id, name, email FROM public.customers");
    allowed(&s, "SELECT c.name, o.amount_cents FROM customers c JOIN orders.orders o ON o.customer_id = c.id");
    denied(&s, "SELECT ssn FROM customers", "column ssn of customers");
    denied(&s, "SELECT * FROM customers", "does not allow * on customers");
    denied(&s, "SELECT c.* FROM customers c", "does not allow *");
    denied(&s, "SELECT c FROM customers c", "whole-row");
    denied(&s, "SELECT row_to_json(customers) FROM customers", "whole-row");
    denied(&s, "SELECT id FROM customers WHERE ssn LIKE '1%'", "column ssn");
    denied(&s, "SELECT id FROM customers ORDER BY ssn", "column ssn");
    denied(&s, "SELECT a.id FROM customers a JOIN customers b USING (ssn)", "column ssn");
    denied(&s, "SELECT id FROM customers NATURAL JOIN orders.orders", "NATURAL JOIN");
    denied(&s, "COPY customers TO STDOUT", "COPY TO");
    denied(&s, "DECLARE c CURSOR FOR SELECT ssn FROM customers", "column ssn");
    denied(&s, "SELECT query_to_xml('select ssn from customers', true, true, '')", "query_to_xml");
    denied(&s, "SELECT * FROM orders.items", "SELECT on orders.items");
}

#[test]
fn server_files_programs_extensions_and_signals() {
    let dba = scope("dba");
    denied(&dba, "COPY orders.orders TO '/tmp/x'", "file on the database server");
    denied(&dba, "COPY orders.orders FROM PROGRAM 'curl evil'", "PROGRAM");
    denied(&dba, "SELECT pg_read_file('/etc/passwd')", "pg_read_file");
    denied(&dba, "SELECT lo_import('/etc/passwd')", "lo_import");
    denied(&dba, "SELECT pg_terminate_backend(1)", "pg_terminate_backend");
    denied(&dba, "SELECT pg_cancel_backend(1)", "pg_cancel_backend");
    denied(&dba, "CREATE EXTENSION dblink", "extensions");
    denied(&dba, "SELECT * FROM dblink('host=evil', 'select 1') AS t(x int)", "dblink");
    denied(&dba, "CREATE SERVER evil FOREIGN DATA WRAPPER postgres_fdw", "foreign servers");
    denied(&dba, "ALTER SYSTEM SET fsync = off", "server administration");
    denied(&dba, "CREATE ROLE mallory SUPERUSER", "roles or privileges");
    denied(&dba, "GRANT ALL ON orders.orders TO PUBLIC", "roles or privileges");
    denied(&dba, "LOAD 'evil.so'", "server administration");
    // …while DDL itself is the dba scope's business.
    allowed(&dba, "CREATE TABLE orders.audit_notes (id int)");
    allowed(&dba, "ALTER TABLE orders.orders ADD COLUMN note text");
    allowed(&dba, "DROP TABLE orders.audit_notes");
    allowed(&dba, "VACUUM ANALYZE orders.orders");
    denied(&scope("orders-write"), "CREATE TABLE orders.x (id int)", "DDL");
    denied(&scope("orders-write"), "VACUUM orders.orders", "maintenance");
}

#[test]
fn writes_in_a_write_scope() {
    let s = scope("orders-write");
    allowed(&s, "INSERT INTO orders.items (order_id, sku, qty) VALUES (1, 'x', 1)");
    allowed(&s, "UPDATE orders.orders SET status = 'paid' WHERE id = 42");
    allowed(&s, "DELETE FROM orders.items WHERE order_id = 42");
    allowed(&s, "WITH moved AS (DELETE FROM orders.items WHERE qty = 0 RETURNING *) SELECT count(*) FROM moved");
    allowed(&s, "COPY orders.items FROM STDIN");
    allowed(&s, "SELECT * FROM orders.orders WHERE id = 1 FOR UPDATE");
    denied(&s, "UPDATE orders.orders SET status = 'paid'", "without WHERE");
    denied(&s, "DELETE FROM orders.items", "without WHERE");
    denied(&s, "INSERT INTO public.customers (id) VALUES (1)", "INSERT on public.customers");
    denied(&s, "INSERT INTO orders.items SELECT * FROM public.customers", "SELECT on public.customers");
    denied(&s, "TRUNCATE orders.items", "TRUNCATE");
}

#[test]
fn anything_that_does_not_parse_is_refused_with_its_parse_error() {
    let s = scope("dba");
    for sql in ["SELEC 1", "SELECT 'unterminated", "DELETE FROM", "SELECT 1; DROP TABLE", "\u{0}"] {
        match s.decide_uncached(sql).decision {
            Decision::Deny { code, message } => {
                assert_eq!(code, "42601", "{sql}");
                assert!(message.contains("cannot parse"), "{message}");
            }
            other => panic!("{sql:?}: {other:?}"),
        }
    }
}

#[test]
fn the_cache_returns_the_same_decision() {
    let s = scope("orders-read");
    let first = s.decide("DELETE FROM orders.orders WHERE id = 1");
    let second = s.decide("DELETE FROM orders.orders WHERE id = 1");
    assert_eq!(first, second);
    assert!(first.decision.is_deny());
}

#[test]
fn scope_sql_grants_exactly_the_rules() {
    let scopes = crate::demo::demo_scopes();
    let sql = super::sql::scope_sql("support", &scopes["support"]);
    assert!(sql.contains("CREATE ROLE \"pglease_support\" LOGIN NOSUPERUSER"), "{sql}");
    // The demo masks ssn: the role reads it (to mask it).
    assert!(sql.contains("GRANT SELECT ON \"public\".\"customers\" TO \"pglease_support\""), "{sql}");
    let mut denying = scopes["support"].clone();
    denying.tables[0].mask_columns.clear();
    denying.tables[0].deny_columns = vec!["ssn".into()];
    assert!(super::sql::scope_sql("support", &denying).contains("attname NOT IN ('ssn')"));
    assert!(sql.contains("GRANT SELECT ON \"orders\".\"orders\" TO \"pglease_support\""), "{sql}");
    assert!(!sql.contains("CREATE ON SCHEMA"), "{sql}");
    let sql = super::sql::scope_sql("orders-read", &scopes["orders-read"]);
    assert!(sql.contains("GRANT SELECT ON ALL TABLES IN SCHEMA \"orders\" TO \"pglease_orders_read\""), "{sql}");
    assert!(!sql.contains("INSERT"), "{sql}");
}

/// Every statement decided through the caches, after a statement of the same shape primed them,
/// gets exactly the decision computed from scratch.
#[test]
fn shape_cache_never_changes_a_decision() {
    let pairs: &[(&str, &str)] = &[
        ("SELECT abalance FROM pgbench_accounts WHERE aid = 1", "SELECT abalance FROM pgbench_accounts WHERE aid = 2"),
        ("SELECT * FROM orders.orders WHERE id = 1 LIMIT 5", "SELECT * FROM orders.orders WHERE id = 1 LIMIT 50000"),
        ("SELECT id FROM orders.orders WHERE status = 'new'", "SELECT id FROM orders.orders WHERE status = 'ssn'"),
        ("SELECT 'email'", "SELECT 'ssn'"),
        ("SELECT email FROM public.customers WHERE id = 1", "SELECT email FROM public.customers WHERE id = 2"),
        ("SELECT set_config('application_name', 'x', false)", "SELECT set_config('search_path', 'x', false)"),
        ("SELECT current_setting('a')", "SELECT current_setting('role')"),
        ("UPDATE orders.orders SET status = 'a' WHERE id = 1", "UPDATE orders.orders SET status = 'b' WHERE id = 2"),
        ("DELETE FROM orders.items WHERE order_id = 1", "DELETE FROM orders.items WHERE order_id = 99"),
        ("INSERT INTO orders.items VALUES (1, 'x', 1)", "INSERT INTO orders.items VALUES (2, 'ssn', 3)"),
        ("SET statement_timeout = 1000", "SET statement_timeout = 0"),
        ("SET search_path = 'orders'", "SET search_path = 'public'"),
        ("BEGIN; SELECT 1; COMMIT", "BEGIN; SELECT 2; COMMIT"),
        ("COPY orders.orders TO STDOUT WITH (FORMAT 'csv')", "COPY orders.orders FROM '/etc/passwd'"),
        ("SELECT * FROM orders.orders ORDER BY 1", "SELECT * FROM orders.orders ORDER BY 2"),
        ("SELECT pg_sleep(1)", "SELECT pg_sleep(2)"),
    ];
    for name in crate::demo::demo_scopes().keys() {
        for (first, second) in pairs {
            let s = scope(name);
            let primed = s.decide(first);
            assert_eq!(primed, s.decide_uncached(first), "{name}: {first}");
            assert_eq!(s.decide(second), s.decide_uncached(second), "{name}: {second} after {first}");
        }
    }
}

#[test]
fn statements_of_one_shape_share_a_decision_where_sound() {
    let scopes: std::collections::BTreeMap<String, ScopeConfig> = toml::from_str(
        r#"[bench]
        database = "bench"
        role = "bench_role"
        password_env = "UNUSED"
        tables = [{ name = "public.pgbench_*", allow = ["read", "update"] }]"#,
    )
    .unwrap();
    let s = ScopePolicy::from_config("bench", &scopes["bench"]);
    for aid in 1..100 {
        assert_eq!(s.decide(&format!("SELECT abalance FROM pgbench_accounts WHERE aid = {aid};")).decision, Decision::Allow);
    }
    assert_eq!(s.databases[&s.default_database].shapes.len(), 1, "one shape");
    // Not shape-cached: session effects, rewrites, statements that read literal values.
    s.decide("PREPARE p AS SELECT 1");
    s.decide("SET statement_timeout = 5");
    assert_eq!(s.databases[&s.default_database].shapes.len(), 1);
    // A literal spelled like a name in the tree is not masked.
    s.decide("SELECT abalance AS \"7\" FROM pgbench_accounts WHERE aid = 7");
    assert_eq!(s.databases[&s.default_database].shapes.len(), 1);
    // The capped scope never shares by shape.
    let capped = scope("orders-read");
    capped.decide("SELECT * FROM orders.orders LIMIT 5");
    assert_eq!(capped.databases[&capped.default_database].shapes.len(), 0);
}

fn custom(toml_text: &str) -> ScopePolicy {
    let scopes: std::collections::BTreeMap<String, ScopeConfig> = toml::from_str(toml_text).expect("scope parses");
    let (name, c) = scopes.iter().next().expect("one scope");
    ScopePolicy::from_config(name, c)
}

/// A scope as permissive as pglease allows, as a driver's own test suite would run under.
fn permissive() -> ScopePolicy {
    custom(
        r#"[app]
        database = "app"
        role = "app"
        password_env = "X"
        settings = ["*"]
        functions = { allow = ["*"] }
        tables = [{ name = "public.*", allow = ["all"] }]"#,
    )
}

#[test]
fn set_config_is_decided_as_the_set_it_is() {
    let app = permissive();
    allowed(&app, "SELECT set_config('jit', 'off', false)"); // asyncpg's type introspection
    allowed(&app, "SELECT pg_catalog.set_config('work_mem', '64MB', true)");
    allowed(&app, "SELECT set_config('myapp.tenant'::text, '7', false)");
    for (sql, why) in [
        ("SELECT set_config('role', 'postgres', false)", "does not allow changing setting role"),
        ("SELECT set_config('ROLE', 'postgres', false)", "does not allow changing setting role"),
        ("SELECT set_config('default_transaction_read_only', 'off', false)", "does not allow changing setting default_transaction_read_only"),
        ("SELECT set_config('standard_conforming_strings', 'off', false)", "does not allow changing setting standard_conforming_strings"),
        ("SELECT set_config('session_authorization', 'postgres', false)", "does not allow changing setting session_authorization"),
        ("SELECT set_config('search_path', 'evil', false)", "only with SET search_path"),
        ("SELECT set_config('application_name', 'x', false)", "only with SET application_name"),
        ("SELECT set_config(name, 'x', false) FROM (VALUES ('role')) v(name)", "written as a string literal"),
        ("SELECT set_config('ro' || 'le', 'x', false)", "written as a string literal"),
        ("SELECT set_config('jit', 'off')", "written as a string literal"),
    ] {
        denied(&app, sql, why);
    }
    // A pinned statement_timeout holds against set_config as against SET.
    denied(&scope("orders-read"), "SELECT set_config('statement_timeout', '0', false)", "statement_timeout");
    denied(&scope("orders-read"), "SELECT set_config('work_mem', '1GB', false)", "work_mem");
    // The value is an ordinary expression: what it reads is checked like anything else.
    denied(&scope("support"), "SELECT set_config('datestyle', (SELECT ssn FROM customers LIMIT 1), false)", "ssn");
}

#[test]
fn what_pools_send_on_release_and_named_dangerous_functions() {
    // asyncpg's pool reset, under any scope.
    for name in ["orders-read", "support", "orders-write"] {
        allowed(&scope(name), "SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL");
    }
    let app = permissive();
    // "*" does not reach the dangerous classes…
    for f in ["pg_advisory_lock(1)", "pg_try_advisory_xact_lock(1)", "pg_terminate_backend(1)", "pg_cancel_backend(1)", "pg_stat_reset()"] {
        denied(&app, &format!("SELECT {f}"), "does not allow calling function");
    }
    denied(&app, "DO $$ BEGIN END $$", "DO blocks");
    denied(&app, "PREPARE TRANSACTION 'x'", "two-phase");
    // …naming them does, with a warning at startup.
    let named = custom(
        r#"[ops]
        database = "app"
        role = "ops"
        password_env = "X"
        functions = { allow = ["*", "pg_advisory_lock", "pg_catalog.pg_cancel_backend"] }
        statements = ["do", "two-phase-commit"]
        tables = [{ name = "public.*", allow = ["all"] }]"#,
    );
    allowed(&named, "SELECT pg_advisory_lock(42)");
    allowed(&named, "SELECT pg_catalog.pg_cancel_backend(1)");
    allowed(&named, "SELECT pg_cancel_backend(1)");
    denied(&named, "SELECT pg_terminate_backend(1)", "pg_terminate_backend");
    denied(&named, "SELECT pg_read_file('/etc/passwd')", "pg_read_file");
    allowed(&named, "DO $$ BEGIN PERFORM 1; END $$");
    allowed(&named, "PREPARE TRANSACTION 'x'");
    allowed(&named, "COMMIT PREPARED 'x'");
    let warnings = named.dangerous_allowances().join("; ");
    for class in ["advisory locks (pg_advisory_lock)", "signalling other sessions (pg_cancel_backend)", "DO blocks", "two-phase commit"] {
        assert!(warnings.contains(class), "{warnings}");
    }
    assert!(app.dangerous_allowances().is_empty());
}

#[test]
fn pg_notify_follows_notify() {
    denied(&scope("orders-read"), "SELECT pg_notify('c', 'x')", "read-only");
    denied(&scope("orders-read"), "NOTIFY c", "read-only");
    allowed(&scope("orders-write"), "SELECT pg_notify('c', 'x')");
    allowed(&scope("orders-write"), "NOTIFY c, 'x'");
}

#[test]
fn a_tracked_search_path_resolves_names() {
    let s = custom(
        r#"[app]
        database = "app"
        role = "app_role"
        password_env = "X"
        settings = ["search_path"]
        tables = [{ name = "app.*", allow = ["read", "insert"] }, { name = "public.t", allow = ["read"] }, { name = "app_role.*", allow = ["read"] }]"#,
    );
    // Pinned path: public.
    allowed(&s, "SELECT * FROM t");
    let v = s.decide_uncached("SET search_path TO app, \"Other\"");
    assert_eq!(v.effects, vec![Effect::SearchPath { path: Some(vec!["app".into(), "Other".into()]), local: false }]);
    assert_eq!(s.decide_uncached("SET LOCAL search_path = app").effects, vec![Effect::SearchPath { path: Some(vec!["app".into()]), local: true }]);
    assert_eq!(s.decide_uncached("RESET search_path").effects, vec![Effect::SearchPath { path: None, local: false }]);
    assert_eq!(s.decide_uncached("SET search_path TO DEFAULT").effects, vec![Effect::SearchPath { path: None, local: false }]);
    assert_eq!(s.decide_uncached("DISCARD ALL").effects, vec![Effect::SearchPath { path: None, local: false }]);
    denied(&s, "SET search_path TO app; SELECT 1", "only as the last statement of a message");
    denied(&s, "RESET ALL; SELECT 1", "only as the last statement of a message");
    allowed(&s, "SELECT 1; RESET ALL");
    // Under [app], `orders` means app.orders; under [public], public.orders (not in scope).
    let app = vec![vec!["app".to_owned()]];
    let public = vec![vec!["public".to_owned()]];
    assert!(!s.decide_in("SELECT * FROM orders", &app, "app").decision.is_deny());
    assert!(s.decide_in("SELECT * FROM orders", &public, "app").decision.is_deny());
    assert!(!s.decide_in("INSERT INTO orders VALUES (1)", &app, "app").decision.is_deny());
    // Unsure which path is in force: allowed only where allowed under every candidate.
    assert!(s.decide_in("SELECT * FROM orders", &[app[0].clone(), public[0].clone()], "app").decision.is_deny());
    // A two-schema path: allowed only if allowed in whichever schema the name resolves to.
    assert!(!s.decide_in("SELECT * FROM t", &[vec!["app".into(), "public".into()]], "app").decision.is_deny());
    assert!(s.decide_in("INSERT INTO t VALUES (1)", &[vec!["app".into(), "public".into()]], "app").decision.is_deny(), "public.t is read-only");
    // $user is the backing role's schema.
    assert!(!s.decide_in("SELECT * FROM x", &[vec!["$user".into()]], "app").decision.is_deny());
    // pg_catalog named later in the path: a user schema before it may hold a pg_* name.
    assert!(s.decide_in("SELECT * FROM pg_class", &[vec!["public".into(), "pg_catalog".into()]], "app").decision.is_deny());
    assert!(!s.decide_in("SELECT * FROM pg_class", &[vec!["app".into(), "pg_catalog".into()]], "app").decision.is_deny());
    assert!(!s.decide_in("SELECT * FROM pg_class", &public, "app").decision.is_deny());
    // A scope that does not allow it cannot change it at all.
    denied(&scope("orders-read"), "SET search_path TO public", "does not allow changing setting search_path");
}

#[test]
fn several_databases() {
    let scopes: std::collections::BTreeMap<String, ScopeConfig> = toml::from_str(
        r#"[app]
        databases = ["shop", "postgres"]
        role = "app"
        password_env = "X"
        tables = [{ name = "public.t", allow = ["read"] }]"#,
    )
    .unwrap();
    let c = &scopes["app"];
    assert_eq!(c.databases(), ["shop", "postgres"]);
    assert_eq!(c.default_database(), "shop");
    let sql = super::sql::scope_sql("app", c);
    assert!(sql.contains("GRANT CONNECT ON DATABASE \"shop\"") && sql.contains("GRANT CONNECT ON DATABASE \"postgres\""), "{sql}");
    assert_eq!(sql.matches("GRANT SELECT ON \"public\".\"t\"").count(), 2, "{sql}");
    assert!(sql.contains("\\connect \"postgres\""), "{sql}");
}

#[test]
fn the_catalogs_are_never_written() {
    let dba = scope("dba");
    for sql in [
        "UPDATE pg_settings SET setting = '0' WHERE name = 'statement_timeout'",
        "UPDATE pg_catalog.pg_settings SET setting = 'x' WHERE name = 'search_path'",
        "DELETE FROM pg_catalog.pg_description WHERE objoid = 1",
        "INSERT INTO information_schema.sql_features VALUES ('x')",
        "TRUNCATE pg_catalog.pg_statistic",
    ] {
        denied(&dba, sql, "does not allow");
    }
    allowed(&dba, "SELECT name, setting FROM pg_settings");
}

#[test]
fn merge_needs_what_its_when_clauses_do() {
    let s = custom(
        r#"[fixer]
        database = "app"
        role = "fixer"
        password_env = "X"
        tables = [{ name = "public.t", allow = ["read", "update"] }, { name = "public.src", allow = ["read"] }]"#,
    );
    let merge = |actions: &str| format!("MERGE INTO t USING src ON t.id = src.id {actions}");
    allowed(&s, &merge("WHEN MATCHED THEN UPDATE SET v = src.v"));
    allowed(&s, &merge("WHEN NOT MATCHED THEN DO NOTHING"));
    allowed(&s, &merge("WHEN MATCHED AND t.v > 0 THEN DO NOTHING WHEN MATCHED THEN UPDATE SET v = 0"));
    denied(&s, &merge("WHEN MATCHED THEN DELETE"), "DELETE on public.t");
    denied(&s, &merge("WHEN NOT MATCHED THEN INSERT VALUES (src.id, src.v)"), "INSERT on public.t");
    denied(&s, &merge("WHEN MATCHED THEN UPDATE SET v = 1 WHEN NOT MATCHED THEN INSERT VALUES (src.id, src.v)"), "INSERT on public.t");
    // A writing MERGE counts as writing every column, a denied one too; one that only reads
    // is checked by the columns it reads.
    let s = custom(
        r#"[fixer]
        database = "app"
        role = "fixer"
        password_env = "X"
        tables = [{ name = "public.t", allow = ["read", "update"], deny_columns = ["secret"] }, { name = "public.src", allow = ["read"] }]"#,
    );
    denied(&s, &merge("WHEN MATCHED THEN UPDATE SET v = 1"), "column secret");
    denied(&s, &merge("WHEN MATCHED AND t.secret = 'x' THEN DO NOTHING"), "secret");
    allowed(&s, &merge("WHEN MATCHED AND t.v = 'x' THEN DO NOTHING"));
    // Under a read-only scope only DO NOTHING passes (Postgres then refuses the MERGE itself
    // in the session's read-only transaction).
    denied(&scope("support"), "MERGE INTO customers c USING customers d ON c.id = d.id WHEN MATCHED THEN DELETE", "DELETE");
}

/// The demo's shop schema as the catalog lists it.
fn shop_schema() -> super::schema::Schema {
    let cols = |c: &[&str]| c.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    super::schema::Schema::of([
        ("public".to_owned(), "customers".to_owned(), cols(&["id", "name", "email", "ssn"])),
        ("orders".to_owned(), "orders".to_owned(), cols(&["id", "customer_id", "amount_cents", "status", "created_at"])),
    ])
}

/// What `s` runs instead of `sql` when it knows the shop's columns, and its notice.
#[track_caller]
fn expanded(s: &ScopePolicy, sql: &str) -> (String, Option<String>) {
    match s.decide_with_schema(sql, Some(&shop_schema())).decision {
        Decision::Rewrite { sql: out, notice, .. } => {
            // Decided again as it is, an expanded statement has no `*` left to expand. (A
            // masked one would be masked again: the proxy never decides its own rewrites.)
            if !notice.as_deref().is_some_and(|n| n.contains("masked")) {
                assert_eq!(s.decide_with_schema(&out, Some(&shop_schema())).decision, Decision::Allow, "{out}");
            }
            (out, notice)
        }
        other => panic!("{} should expand {sql:?}, got {other:?}", s.name),
    }
}

#[track_caller]
fn denied_knowing_columns(s: &ScopePolicy, sql: &str, why: &str) {
    match s.decide_with_schema(sql, Some(&shop_schema())).decision {
        Decision::Deny { message, .. } => assert!(message.contains(why), "{sql:?}: {message:?}, expected {why:?}"),
        other => panic!("{} should refuse {sql:?}, got {other:?}", s.name),
    }
}

#[test]
fn star_over_a_table_with_denied_columns_becomes_the_permitted_columns() {
    let s = scope("support");
    let (sql, notice) = expanded(&s, "SELECT * FROM customers");
    assert_eq!(sql, "SELECT customers.id, customers.name, customers.email FROM customers");
    assert_eq!(notice.as_deref(), Some("pglease: scope \"support\" left out column ssn of public.customers from *"));
    assert_eq!(expanded(&s, "SELECT c.* FROM public.customers AS c WHERE c.id < 10").0, "SELECT c.id, c.name, c.email FROM public.customers AS c WHERE c.id < 10");
    assert_eq!(expanded(&s, "TABLE customers").0, "SELECT customers.id, customers.name, customers.email FROM customers");
    assert_eq!(expanded(&s, "table only public.customers").0, "SELECT customers.id, customers.name, customers.email FROM only public.customers");
    let exports = custom(
        r#"[exports]
        database = "shop"
        role = "exports"
        password_env = "X"
        tables = [{ name = "public.customers", allow = ["read", "copy-out"], deny_columns = ["ssn"] }]"#,
    );
    assert_eq!(expanded(&exports, "COPY customers TO STDOUT WITH (FORMAT csv)").0, "COPY customers (id, name, email) TO STDOUT WITH (FORMAT csv)");
    assert_eq!(expanded(&exports, "COPY public.customers TO STDOUT").0, "COPY public.customers (id, name, email) TO STDOUT");
    assert_eq!(
        expanded(&exports, "COPY (SELECT * FROM customers) TO STDOUT").0,
        "COPY (SELECT customers.id, customers.name, customers.email FROM customers) TO STDOUT"
    );
    denied_knowing_columns(&exports, "COPY customers (id, ssn) TO STDOUT", "ssn");
    denied_knowing_columns(&exports, "COPY customers FROM STDIN", "COPY FROM");
    // Other FROM items keep their own `*`, in FROM order.
    assert_eq!(
        expanded(&s, "SELECT * FROM orders.orders o JOIN customers c ON c.id = o.customer_id").0,
        "SELECT o.*, c.id, c.name, c.email FROM orders.orders o JOIN customers c ON c.id = o.customer_id"
    );
    assert_eq!(expanded(&s, "SELECT o.*, c.* FROM orders.orders o, customers c").0, "SELECT o.*, c.id, c.name, c.email FROM orders.orders o, customers c");
    // Wherever a SELECT is: subqueries, CTEs, set operations, EXISTS, several statements.
    assert_eq!(
        expanded(&s, "SELECT * FROM (SELECT * FROM customers) s").0,
        "SELECT * FROM (SELECT customers.id, customers.name, customers.email FROM customers) s"
    );
    assert_eq!(
        expanded(&s, "WITH x AS (SELECT * FROM customers) SELECT * FROM x").0,
        "WITH x AS (SELECT customers.id, customers.name, customers.email FROM customers) SELECT * FROM x"
    );
    assert_eq!(
        expanded(&s, "SELECT * FROM customers UNION ALL SELECT * FROM customers c").0,
        "SELECT customers.id, customers.name, customers.email FROM customers UNION ALL SELECT c.id, c.name, c.email FROM customers c"
    );
    assert_eq!(expanded(&s, "SELECT 1 WHERE EXISTS (SELECT * FROM customers)").0, "SELECT 1 WHERE EXISTS (SELECT customers.id, customers.name, customers.email FROM customers)");
    assert_eq!(expanded(&s, "SELECT /* all */ * FROM customers; select c.* from customers c").0, "SELECT /* all */ customers.id, customers.name, customers.email FROM customers; select c.id, c.name, c.email from customers c");
    // `count(*)` is no column list.
    allowed(&s, "SELECT count(*) FROM customers");
}

#[test]
fn star_stays_refused_where_no_exact_form_exists() {
    let s = scope("support");
    // Without the columns, as before.
    denied(&s, "SELECT * FROM customers", "ssn");
    // Merged join columns, column aliases, whole rows.
    denied_knowing_columns(&s, "SELECT * FROM customers JOIN customers d USING (id)", "ssn");
    denied_knowing_columns(&s, "SELECT * FROM customers NATURAL JOIN orders.orders", "ssn");
    denied_knowing_columns(&s, "SELECT * FROM customers c(a, b)", "ssn");
    denied_knowing_columns(&s, "SELECT row_to_json(c) FROM customers c", "ssn");
    denied_knowing_columns(&s, "SELECT c::text FROM customers c", "ssn");
    // Expanded, and still refused for what is named outright.
    denied_knowing_columns(&s, "SELECT *, ssn FROM customers", "ssn");
    denied_knowing_columns(&s, "SELECT * FROM customers WHERE ssn LIKE '1%'", "ssn");
    denied_knowing_columns(&s, "SELECT ssn FROM customers", "ssn");
    // `c.*` outside a select list, or from a level that has no `c` of its own, stays refused.
    denied_knowing_columns(&s, "SELECT row_to_json(ROW(c.*)) FROM customers c", "ssn");
    denied_knowing_columns(&s, "SELECT (SELECT row_to_json(ROW(c.*))) FROM customers c", "ssn");
    denied_knowing_columns(&s, "SELECT l.* FROM customers c, LATERAL (SELECT c.*) l", "ssn");
    denied_knowing_columns(&s, "SELECT array_agg(c.*) FROM customers c", "ssn");
    // A CTE named like the table is the CTE; what it reads is checked where it reads it.
    denied_knowing_columns(&s, "WITH customers AS (SELECT ssn FROM public.customers) SELECT * FROM customers", "ssn");
}

#[test]
fn star_expansion_with_quoted_names_and_the_row_cap() {
    let s = custom(
        r#"[capped]
        database = "app"
        role = "capped"
        password_env = "X"
        row_limit = 10
        tables = [{ name = "Sales.Deals", allow = ["read"], deny_columns = ["Margin"] }]"#,
    );
    let cols = |c: &[&str]| c.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let schema = super::schema::Schema::of([("Sales".to_owned(), "Deals".to_owned(), cols(&["Id", "Margin", "select", "note"]))]);
    match s.decide_with_schema(r#"SELECT * FROM "Sales"."Deals""#, Some(&schema)).decision {
        Decision::Rewrite { sql, reason, notice } => {
            assert_eq!(sql, r#"SELECT "Deals"."Id", "Deals"."select", "Deals".note FROM "Sales"."Deals" LIMIT 10"#);
            assert!(reason.starts_with(super::ROW_CAP_REASON) && reason.contains(super::EXPANDED_REASON), "{reason}");
            assert!(notice.is_some_and(|n| n.contains("column Margin of Sales.Deals")));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_star_counts_only_where_it_reaches_a_denied_column() {
    let s = scope("support");
    // Without knowing any columns: `o.*` is the orders' columns, whatever else is joined.
    allowed(&s, "SELECT o.* FROM orders.orders o JOIN customers c ON c.id = o.customer_id WHERE c.name = 'x'");
    allowed(&s, "SELECT * FROM orders.orders WHERE customer_id IN (SELECT id FROM customers)");
    denied(&s, "SELECT * FROM orders.orders o JOIN customers c ON c.id = o.customer_id", "* on customers");
    denied(&s, "SELECT c.* FROM orders.orders o JOIN customers c ON c.id = o.customer_id", "* on customers");
    denied(&s, "SELECT customers.* FROM customers", "* on customers");
    denied(&s, "SELECT x.* FROM customers AS x", "* on customers");
    // Knowing them, a subquery's expanded list is what an outer `*` sees.
    let (sql, _) = expanded(&s, "SELECT x.* FROM (SELECT * FROM customers) x JOIN orders.orders o ON o.customer_id = x.id");
    assert_eq!(sql, "SELECT x.* FROM (SELECT customers.id, customers.name, customers.email FROM customers) x JOIN orders.orders o ON o.customer_id = x.id");
}

/// The demo's support scope with ssn masked (the last four digits) and email masked, instead of
/// denied.
fn masking() -> ScopePolicy {
    custom(
        r#"[support]
        database = "shop"
        role = "support"
        password_env = "X"
        tables = [
          { name = "public.customers", allow = ["read", "copy-out"], mask_columns = { ssn = "partial(0, 4)", email = "email" } },
          { name = "orders.orders", allow = ["read"] },
        ]"#,
    )
}

const SSN: &str = "(CASE WHEN length((ssn)::text) > 4 THEN left((ssn)::text, 0) || repeat('*', length((ssn)::text) - 4) || right((ssn)::text, 4) ELSE repeat('*', length((ssn)::text)) END)";

#[test]
fn masked_columns_read_through_their_masks_in_select_lists() {
    let s = masking();
    let (sql, notice) = expanded(&s, "SELECT id, ssn FROM customers WHERE id = 1");
    assert_eq!(sql, format!("SELECT id, {SSN} AS ssn FROM customers WHERE id = 1"));
    assert_eq!(notice.as_deref(), Some("pglease: scope \"support\" masked column ssn of public.customers"));
    // `*` lists them, masked, under their own names.
    let (sql, notice) = expanded(&s, "SELECT * FROM customers c");
    assert!(sql.starts_with("SELECT c.id, c.name, (CASE WHEN strpos((c.email)::text, '@') > 1"), "{sql}");
    assert!(sql.contains("END) AS email, (CASE WHEN length((c.ssn)::text) > 4"), "{sql}");
    assert!(sql.ends_with("END) AS ssn FROM customers c"), "{sql}");
    assert_eq!(notice.as_deref(), Some("pglease: scope \"support\" masked columns email, ssn of public.customers"));
    // In any expression of a select list, at any level: what flows out is masked.
    for sql in [
        "SELECT upper(ssn) FROM customers",
        "SELECT CASE WHEN ssn LIKE '1%' THEN 'one' END FROM customers",
        "SELECT (SELECT c.ssn) FROM customers c",
        "SELECT x FROM (SELECT ssn AS x FROM customers) s WHERE x LIKE '%1'",
        "SELECT id FROM orders.orders WHERE customer_id IN (SELECT id FROM customers) AND status IN (SELECT ssn FROM customers)",
        "WITH s AS (SELECT ssn FROM customers) SELECT * FROM s",
        "SELECT ssn FROM customers UNION SELECT '123-45-6789'",
        "SELECT DISTINCT ssn FROM customers",
        "SELECT ssn FROM customers ORDER BY 1",
        "TABLE customers",
        "COPY customers TO STDOUT",
        "COPY customers (id, ssn) TO STDOUT",
        "PREPARE q AS SELECT ssn FROM customers WHERE id = $1",
        "DECLARE k CURSOR FOR SELECT ssn FROM customers",
    ] {
        let (out, _) = expanded(&s, sql);
        assert!(out.contains("repeat('*'"), "{sql} → {out}");
    }
    assert_eq!(
        expanded(&s, "COPY customers (id, ssn) TO STDOUT").0,
        format!("COPY (SELECT customers.id, {} AS ssn FROM customers) TO STDOUT", SSN.replace("(ssn)", "(customers.ssn)"))
    );
}

#[test]
fn masked_columns_never_filter_join_sort_group_or_aggregate() {
    let s = masking();
    for sql in [
        "SELECT id FROM customers WHERE ssn = '123-45-6789'",
        "SELECT id FROM customers WHERE ssn LIKE '1%'",
        "SELECT c.id FROM customers c JOIN orders.orders o ON o.status = c.ssn",
        "SELECT c.id FROM customers c JOIN customers d USING (ssn)",
        "SELECT id FROM customers ORDER BY ssn",
        "SELECT DISTINCT ON (ssn) id FROM customers",
        "SELECT count(*) FROM customers GROUP BY ssn",
        "SELECT count(*) FROM customers HAVING max(ssn) > '5'",
        "SELECT max(ssn) FROM customers",
        "SELECT string_agg(ssn, ',') FROM customers",
        "SELECT count(ssn) FROM customers",
        "SELECT row_number() OVER (ORDER BY ssn) FROM customers",
        "SELECT first_value(id) OVER (PARTITION BY ssn) FROM customers",
        "SELECT c.id FROM customers c, LATERAL (SELECT 1 WHERE c.ssn > '5') l",
        "SELECT c.id FROM customers c, LATERAL unnest(ARRAY[c.ssn]) u",
        "SELECT id FROM customers WHERE EXISTS (SELECT 1 FROM customers d WHERE d.ssn = '1')",
        "SELECT (SELECT 1 FROM orders.orders o WHERE o.status = c.ssn) FROM customers c",
        "SELECT id FROM customers WHERE (id, ssn) = (1, 'x')",
        "SELECT id FROM customers WHERE ssn IS NULL",
        "SELECT ssn::int AS n FROM customers ORDER BY ssn",
    ] {
        denied_knowing_columns(&s, sql, "ssn");
    }
    // Whole rows and `*` without known columns stay refused.
    denied(&s, "SELECT * FROM customers", "* on customers");
    denied_knowing_columns(&s, "SELECT row_to_json(c) FROM customers c", "whole-row");
    denied_knowing_columns(&s, "SELECT (c).ssn FROM customers c", "whole-row");
    denied_knowing_columns(&s, "SELECT id FROM customers NATURAL JOIN orders.orders", "NATURAL JOIN");
    // The planner's statistics hold sample values of the masked columns.
    denied_knowing_columns(&s, "SELECT histogram_bounds FROM pg_stats WHERE attname = 'ssn'", "pg_stats");
    denied_knowing_columns(&s, "SELECT * FROM pg_catalog.pg_stats_ext", "pg_stats_ext");
}

#[test]
fn masks_parse_and_render() {
    use super::masks::Mask;
    assert_eq!(Mask::parse("partial(2, 3)"), Ok(Mask::Partial { start: 2, end: 3 }));
    assert_eq!(Mask::parse(" email "), Ok(Mask::Email));
    assert!(Mask::parse("partial(2)").unwrap_err().contains("two counts"));
    assert_eq!(Mask::parse("hash"), Ok(Mask::Hash));
    assert!(Mask::parse("shuffle").unwrap_err().contains("unknown mask"));
    assert!(Mask::parse("sql: left(x, 2)").unwrap_err().contains("{value}"));
    assert!(Mask::parse("sql: left({value}, 2) ||").unwrap_err().contains("one SQL expression"));
    assert_eq!(Mask::parse("sql: left({value}, 2) || '…'").unwrap().sql("c.name"), "(left((c.name), 2) || '…')");
}

/// What an independent review found: join aliases, column alias lists and the planner's
/// statistics reach a denied column without naming it.
#[test]
fn join_aliases_column_aliases_and_statistics_do_not_reach_denied_columns() {
    for s in [scope("support"), masking()] {
        for sql in [
            "SELECT j.* FROM (customers JOIN orders.orders o ON true) AS j",
            "SELECT j.* FROM (customers CROSS JOIN (SELECT 1) x) AS j",
            "SELECT to_json(j) FROM (customers c CROSS JOIN orders.orders) j",
            "SELECT (j).* FROM (customers CROSS JOIN (SELECT 1) x) j",
            "SELECT hash_record(j) FROM (customers CROSS JOIN (SELECT 1) x) j",
            "SELECT d FROM customers c(a, b, e, d)",
            "SELECT id FROM customers c(a, b, e, d) WHERE d LIKE '9%'",
            "SELECT e FROM (customers c CROSS JOIN (SELECT 1) x) AS j(a, b, c2, e)",
            "SELECT histogram_bounds::text FROM pg_stats WHERE attname = 'ssn'",
            "SELECT most_common_vals::text FROM pg_catalog.pg_stats",
        ] {
            match s.decide_with_schema(sql, Some(&shop_schema())).decision {
                Decision::Deny { .. } => {}
                other => panic!("{sql}: {other:?}"),
            }
        }
        // A join alias over tables without denied columns is fine.
        allowed(&s, "SELECT j.* FROM (orders.orders o JOIN orders.orders p ON p.id = o.id) AS j");
    }
}

#[test]
fn hash_masks_call_the_keyed_function_and_nobody_else_may() {
    let s = custom(
        r#"[cards]
        database = "shop"
        role = "cards"
        password_env = "X"
        tables = [{ name = "public.customers", allow = ["read"], mask_columns = { ssn = "hash" } }]"#,
    );
    let (sql, _) = expanded(&s, "SELECT id, ssn FROM customers");
    assert_eq!(sql, "SELECT id, (CASE WHEN (ssn) IS NULL THEN NULL ELSE pglease_masks.hash((ssn)::text) END) AS ssn FROM customers");
    for call in ["SELECT pglease_masks.hash('123-45-6789')", "SELECT \"pglease_masks\".\"hash\"(name) FROM customers", "SELECT id FROM customers WHERE pglease_masks.hash('1') = 'x'"] {
        denied_knowing_columns(&s, call, "does not allow calling function pglease_masks.hash");
    }
    // Scopes without hash masks may not call it either.
    denied(&scope("orders-read"), "SELECT pglease_masks.hash('x')", "pglease_masks.hash");
    // `scope sql` sets it up next to the grants.
    let scopes: std::collections::BTreeMap<String, ScopeConfig> = toml::from_str(
        r#"[cards]
        database = "shop"
        role = "cards"
        password_env = "X"
        tables = [{ name = "public.customers", allow = ["read"], mask_columns = { ssn = "hash" } }]"#,
    )
    .unwrap();
    let sql = super::sql::scope_sql("cards", &scopes["cards"]);
    assert!(sql.contains("SECURITY DEFINER") && sql.contains("GRANT EXECUTE ON FUNCTION pglease_masks.hash(text) TO \"cards\""), "{sql}");
}

#[test]
fn the_demo_support_scope_masks_ssn() {
    let demo = crate::demo::demo_scopes();
    let s = ScopePolicy::from_config("support", &demo["support"]);
    let (sql, notice) = expanded(&s, "SELECT * FROM customers");
    assert!(sql.contains("right((customers.ssn)::text, 4)") && sql.ends_with("END) AS ssn FROM customers"), "{sql}");
    assert!(notice.is_some_and(|n| n.contains("masked column ssn")));
}

/// Support reads EU customers only, and only the orders of the person's own region.
fn filtering() -> ScopePolicy {
    custom(
        r#"[eu]
        database = "shop"
        role = "eu"
        password_env = "X"
        tables = [
          { name = "public.customers", allow = ["read", "update", "delete", "copy-out"], row_filter = "email LIKE '%.eu'" },
          { name = "orders.orders", allow = ["read"], row_filter = "status <> {{person}}" },
        ]"#,
    )
}

#[track_caller]
fn filtered_sql(s: &ScopePolicy, sql: &str) -> String {
    match s.decide_with_schema(sql, Some(&shop_schema())).decision {
        Decision::Rewrite { sql, reason, .. } => {
            assert!(reason.contains(super::FILTERED_REASON), "{reason}");
            sql
        }
        other => panic!("{sql}: {other:?}"),
    }
}

const EU: &str = "(SELECT * FROM customers WHERE (email LIKE '%.eu'))";

#[test]
fn row_filters_reach_every_read_update_delete_and_copy() {
    let s = filtering();
    assert_eq!(filtered_sql(&s, "SELECT id FROM customers"), format!("SELECT id FROM {EU} AS customers"));
    assert_eq!(filtered_sql(&s, "SELECT c.id FROM customers c WHERE c.id = 1"), format!("SELECT c.id FROM {EU} c WHERE c.id = 1"));
    assert_eq!(
        filtered_sql(&s, "SELECT o.id FROM orders.orders o JOIN customers c ON c.id = o.customer_id"),
        format!("SELECT o.id FROM (SELECT * FROM orders.orders WHERE (status <> current_setting('pglease.person'))) o JOIN {EU} c ON c.id = o.customer_id")
    );
    assert_eq!(
        filtered_sql(&s, "SELECT id FROM orders.orders WHERE customer_id IN (SELECT id FROM public.customers)"),
        "SELECT id FROM (SELECT * FROM orders.orders WHERE (status <> current_setting('pglease.person'))) AS orders WHERE customer_id IN (SELECT id FROM (SELECT * FROM public.customers WHERE (email LIKE '%.eu')) AS customers)"
    );
    assert_eq!(
        filtered_sql(&s, "WITH x AS (SELECT id FROM customers) SELECT * FROM x"),
        format!("WITH x AS (SELECT id FROM {EU} AS customers) SELECT * FROM x")
    );
    // UPDATE and DELETE: the condition, ANDed.
    assert_eq!(filtered_sql(&s, "UPDATE customers SET name = 'x' WHERE id = 1 OR id = 2"), "UPDATE customers SET name = 'x' WHERE (id = 1 OR id = 2) AND (email LIKE '%.eu')");
    assert_eq!(filtered_sql(&s, "DELETE FROM customers WHERE id = 3 RETURNING id"), "DELETE FROM customers WHERE (id = 3) AND (email LIKE '%.eu') RETURNING id");
    assert_eq!(filtered_sql(&s, "DELETE FROM customers"), "DELETE FROM customers WHERE (email LIKE '%.eu')");
    assert_eq!(
        filtered_sql(&s, "UPDATE customers c SET name = o.status FROM orders.orders o WHERE o.customer_id = c.id"),
        "UPDATE customers c SET name = o.status FROM (SELECT * FROM orders.orders WHERE (status <> current_setting('pglease.person'))) o WHERE (o.customer_id = c.id) AND (email LIKE '%.eu')"
    );
    // COPY.
    assert_eq!(filtered_sql(&s, "COPY customers TO STDOUT"), "COPY (SELECT * FROM customers WHERE (email LIKE '%.eu')) TO STDOUT");
    assert_eq!(filtered_sql(&s, "COPY customers (id, name) TO STDOUT"), "COPY (SELECT id, name FROM customers WHERE (email LIKE '%.eu')) TO STDOUT");
    // Nothing else may name the table.
    for (sql, why) in [
        ("TRUNCATE customers", "does not allow TRUNCATE"),
        ("SELECT id FROM ONLY customers", "ONLY"),
        ("SELECT id FROM customers TABLESAMPLE system (50)", "TABLESAMPLE"),
        ("LOCK TABLE customers", "has a row filter"),
    ] {
        denied_knowing_columns(&s, sql, why);
    }
    // The session values are settings pglease pins.
    for sql in ["SET pglease.person = 'bob'", "SELECT set_config('pglease.person', 'bob', false)", "RESET pglease.person"] {
        denied(&s, sql, "pglease.person");
    }
    // A filter is one condition.
    use super::rowfilter::condition_sql;
    assert_eq!(condition_sql("owner = {{person}}").unwrap(), "owner = current_setting('pglease.person')");
    for bad in ["true) OR (true", "x = 1; DROP TABLE t", "x = 1 -- ", "owner = {{user}}", ""] {
        assert!(condition_sql(bad).is_err(), "{bad}");
    }
}

#[test]
fn row_filters_compose_with_masks_and_denied_columns() {
    let s = custom(
        r#"[eu]
        database = "shop"
        role = "eu"
        password_env = "X"
        tables = [{ name = "public.customers", allow = ["read"], row_filter = "email LIKE '%.eu'", mask_columns = { ssn = "redact" }, deny_columns = ["name"] }]"#,
    );
    let sql = filtered_sql(&s, "SELECT * FROM customers");
    assert_eq!(
        sql,
        "SELECT * FROM (SELECT customers.id, customers.email, (CASE WHEN (customers.ssn) IS NULL THEN NULL ELSE '[redacted]' END) AS ssn FROM customers WHERE (email LIKE '%.eu')) AS customers"
    );
    denied_knowing_columns(&s, "SELECT id FROM customers WHERE ssn = 'x'", "masked column ssn");
    denied_knowing_columns(&s, "SELECT name FROM customers", "column name");
}

/// What the second review found: attribute notation, join aliases and CTE names.
#[test]
fn attribute_notation_join_aliases_and_cte_names_do_not_unmask() {
    let s = masking();
    for sql in [
        "SELECT t.ts_stat FROM unnest(array['SELECT ssn::tsvector FROM customers']) t",
        "SELECT t.pg_terminate_backend FROM unnest(array[1]) t",
        "SELECT c.row_to_json FROM customers c",
        "SELECT customers.to_jsonb FROM customers",
        "SELECT j.name, j.ssn FROM (customers JOIN orders.orders o ON o.customer_id = customers.id) AS j WHERE j.ssn LIKE '919%'",
        "WITH customers AS (SELECT ssn FROM customers) SELECT ssn FROM customers WHERE ssn > '5'",
        "SELECT name, ssn FROM customers WHERE ssn LIKE '919%'; WITH customers AS (SELECT 1) SELECT 1",
        "DECLARE k CURSOR FOR SELECT ssn FROM customers WHERE ssn > '5' AND EXISTS (WITH customers AS (SELECT 1) SELECT 1)",
    ] {
        match s.decide_with_schema(sql, Some(&shop_schema())).decision {
            Decision::Deny { .. } => {}
            other => panic!("{sql}: {other:?}"),
        }
    }
    // A join alias's masked column comes out masked.
    let (sql, _) = expanded(&s, "SELECT j.ssn FROM (customers CROSS JOIN (SELECT 1) z) AS j");
    assert!(sql.contains("right((j.ssn)::text, 4)"), "{sql}");
    // A CTE named like the table: its body reads the table, masked.
    let (sql, _) = expanded(&s, "WITH customers AS (SELECT ssn FROM customers) SELECT ssn FROM customers");
    assert!(sql.starts_with("WITH customers AS (SELECT (CASE") && sql.matches("repeat('*'").count() >= 2, "{sql}");
    // Functions of builtin names still run as attribute notation where that is all they are…
    allowed(&scope("orders-read"), "SELECT t.upper FROM unnest(array['a']) t");
    // …and columns named like functions are columns where pglease knows the table's columns.
    assert!(!s.decide_with_schema("SELECT c.name FROM customers c", Some(&shop_schema())).decision.is_deny());
    // `(ssn)` is masked, under the name Postgres gives it.
    let (sql, _) = expanded(&s, "SELECT (ssn) FROM customers");
    assert!(sql.starts_with("SELECT ((CASE"), "{sql}");
    // Row filters hold inside a CTE named like their table.
    let f = filtering();
    let sql = filtered_sql(&f, "WITH customers AS (SELECT * FROM customers) SELECT id FROM customers");
    assert_eq!(sql.matches("email LIKE '%.eu'").count(), 2, "{sql}");
}
