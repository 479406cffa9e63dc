//! `pglease scope sql`: the Postgres role and native GRANTs that back a scope, so that Postgres
//! itself enforces what it can (defense in depth behind the proxy's own checks).

use crate::config::{Action, ScopeConfig};

fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// SQL that creates the scope's role (without a password: set one with `ALTER ROLE … PASSWORD`)
/// and grants it exactly what the scope's rules allow.
///
/// A scope with several databases gets one section per database after the first, each
/// starting with psql's `\connect` (table privileges are granted inside a database).
pub fn scope_sql(name: &str, scope: &ScopeConfig) -> String {
    let role = quote(&scope.role);
    let databases = scope.databases();
    let mut out = format!(
        "-- Role backing pglease scope \"{name}\". Set its password with ALTER ROLE … PASSWORD; only pglease should know it.\n\
         CREATE ROLE {role} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT NOREPLICATION NOBYPASSRLS;\n"
    );
    for db in &databases {
        out.push_str(&format!("GRANT CONNECT ON DATABASE {} TO {role};\n", quote(db)));
    }
    for (i, db) in databases.iter().enumerate() {
        if databases.len() > 1 {
            out.push_str(&format!("{}-- In database {db}:\n\\connect {}\n", if i == 0 { "" } else { "\n" }, quote(db)));
        }
        out.push_str(&table_grants(scope, &role));
        out.push_str(&row_security(name, scope, &role));
        if scope.tables.iter().any(|t| t.mask_columns.values().any(|m| matches!(super::masks::Mask::parse(m), Ok(super::masks::Mask::Hash)))) {
            out.push_str(&super::masks::hash_setup_sql(&scope.role));
        }
    }
    let dbs: Vec<String> = databases.iter().map(|d| quote(d)).collect();
    out.push_str(&format!(
        "-- Not granted on purpose: CREATE on schemas without a ddl rule, membership in any role\n\
         -- (pg_read_server_files, pg_write_server_files, pg_execute_server_program, pg_signal_backend…).\n\
         -- TEMP on {} is granted to PUBLIC by default: REVOKE TEMP ON DATABASE … FROM PUBLIC if no one needs it.\n",
        dbs.join(", ")
    ));
    out
}

/// The schema and table privileges of a scope's rules, in the database connected to.
fn table_grants(scope: &ScopeConfig, role: &str) -> String {
    let mut out = String::new();
    let mut schemas: Vec<String> = Vec::new();
    for rule in &scope.tables {
        let (schema, table) = rule.name.split_once('.').unwrap_or(("*", "*"));
        let actions: Vec<Action> = if rule.allow.contains(&Action::All) {
            vec![Action::Read, Action::Insert, Action::Update, Action::Delete, Action::Truncate, Action::Ddl]
        } else {
            rule.allow.clone()
        };
        let mut privs: Vec<&str> = Vec::new();
        for a in &actions {
            let p = match a {
                Action::Read | Action::CopyOut => "SELECT",
                Action::Insert | Action::CopyIn => "INSERT",
                Action::Update => "UPDATE",
                Action::Delete => "DELETE",
                Action::Truncate => "TRUNCATE",
                Action::Ddl | Action::Maintenance | Action::All => continue,
            };
            if !privs.contains(&p) {
                privs.push(p);
            }
        }
        if schema.contains('*') {
            out.push_str(&format!(
                "-- {}: schemas matching a wildcard are granted one by one, as they exist now:\n\
                 DO $$ DECLARE s text; BEGIN FOR s IN SELECT nspname FROM pg_namespace WHERE nspname LIKE {} AND nspname NOT LIKE 'pg\\_%' AND nspname <> 'information_schema' LOOP\n\
                 EXECUTE format('GRANT USAGE{} ON SCHEMA %I TO {}', s);{}\n\
                 END LOOP; END $$;\n",
                rule.name,
                like(schema),
                if actions.contains(&Action::Ddl) { ", CREATE" } else { "" },
                role.replace('\'', "''"),
                if privs.is_empty() { String::new() } else { format!(" EXECUTE format('GRANT {} ON ALL TABLES IN SCHEMA %I TO {}', s);", privs.join(", "), role.replace('\'', "''")) }
            ));
            continue;
        }
        if !schemas.contains(&schema.to_owned()) {
            schemas.push(schema.to_owned());
            let create = if actions.contains(&Action::Ddl) { ", CREATE" } else { "" };
            out.push_str(&format!("GRANT USAGE{create} ON SCHEMA {} TO {role};\n", quote(schema)));
        }
        if privs.is_empty() {
            continue;
        }
        if !rule.deny_columns.is_empty() {
            // Column-level grants: every column but the denied ones, as the table is now.
            let denied: Vec<String> = rule.deny_columns.iter().map(|c| format!("'{}'", c.replace('\'', "''"))).collect();
            let col_privs: Vec<&str> = privs.iter().copied().filter(|p| matches!(*p, "SELECT" | "INSERT" | "UPDATE")).collect();
            let other: Vec<&str> = privs.iter().copied().filter(|p| !col_privs.contains(p)).collect();
            let r = role.replace('\'', "''");
            let grants: String = col_privs.iter().map(|p| format!(" EXECUTE format('GRANT {p} (%s) ON %s TO {r}', cols, t);")).collect();
            let other_grants = if other.is_empty() { String::new() } else { format!(" EXECUTE format('GRANT {} ON %s TO {r}', t);", other.join(", ")) };
            out.push_str(&format!(
                "-- {}: every column except {} (re-run after adding columns)\n\
                 DO $$ DECLARE t regclass; cols text; BEGIN FOR t IN SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = '{}' AND c.relname LIKE {} AND c.relkind IN ('r','p','v','m','f') LOOP\n\
                 SELECT string_agg(quote_ident(attname), ', ') INTO cols FROM pg_attribute WHERE attrelid = t AND attnum > 0 AND NOT attisdropped AND attname NOT IN ({});{grants}{other_grants}\n\
                 END LOOP; END $$;\n",
                rule.name,
                rule.deny_columns.join(", "),
                schema.replace('\'', "''"),
                like(table),
                denied.join(", "),
            ));
        } else if table.contains('*') {
            if table == "*" {
                out.push_str(&format!("GRANT {} ON ALL TABLES IN SCHEMA {} TO {role};\n", privs.join(", "), quote(schema)));
            } else {
                out.push_str(&format!(
                    "DO $$ DECLARE t regclass; BEGIN FOR t IN SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = '{}' AND c.relname LIKE {} AND c.relkind IN ('r','p','v','m','f') LOOP EXECUTE format('GRANT {} ON %s TO {}', t); END LOOP; END $$;\n",
                    schema.replace('\'', "''"),
                    like(table),
                    privs.join(", "),
                    role.replace('\'', "''")
                ));
            }
        } else {
            out.push_str(&format!("GRANT {} ON {}.{} TO {role};\n", privs.join(", "), quote(schema), quote(table)));
        }
        if privs.contains(&"INSERT") {
            out.push_str(&format!(
                "GRANT USAGE ON ALL SEQUENCES IN SCHEMA {} TO {role};  -- for serial/identity defaults\n",
                quote(schema)
            ));
        }
    }
    out
}

/// The name of the row-level security policy that backs a scope's row filters.
pub fn policy_name(scope: &str) -> String {
    format!("pglease_{scope}")
}

/// Row-level security for the scope's row filters: each filtered table gets a RESTRICTIVE
/// policy for the role with the filter (ANDed with whatever else applies). A table without row
/// security yet gets it enabled with one permissive policy for everyone, so that other roles
/// go on seeing every row.
fn row_security(scope_name: &str, scope: &ScopeConfig, role: &str) -> String {
    let mut out = String::new();
    for rule in scope.tables.iter() {
        let Some(filter) = &rule.row_filter else { continue };
        let Ok(condition) = super::rowfilter::condition_sql(filter) else { continue };
        let (schema, table) = rule.name.split_once('.').unwrap_or(("*", "*"));
        let policy = policy_name(scope_name);
        out.push_str(&format!(
            "-- {}: rows where {filter} (the filter pglease adds, enforced by Postgres too)\n\
             DO $$ DECLARE t regclass; BEGIN FOR t IN SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname LIKE {} AND c.relname LIKE {} AND c.relkind IN ('r','p') LOOP\n\
             IF NOT (SELECT relrowsecurity FROM pg_class WHERE oid = t) THEN EXECUTE format('ALTER TABLE %s ENABLE ROW LEVEL SECURITY', t); EXECUTE format('CREATE POLICY pglease_everyone ON %s USING (true) WITH CHECK (true)', t); END IF;\n\
             EXECUTE format('DROP POLICY IF EXISTS %I ON %s', '{}', t);\n\
             EXECUTE format('CREATE POLICY %I ON %s AS RESTRICTIVE TO {} USING (%s) WITH CHECK (%s)', '{}', t, {}, {});\n\
             END LOOP; END $$;\n",
            rule.name,
            like(schema),
            like(table),
            policy.replace('\'', "''"),
            role.replace('\'', "''"),
            policy.replace('\'', "''"),
            sql_literal(&condition),
            sql_literal(&condition),
        ));
    }
    out
}

/// `text` as a SQL string literal.
fn sql_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// A `LIKE` pattern (quoted) for a `*` wildcard pattern.
fn like(pattern: &str) -> String {
    let escaped = pattern.replace('\\', "\\\\").replace('_', "\\_").replace('%', "\\%").replace('\'', "''");
    format!("'{}'", escaped.replace('*', "%"))
}
