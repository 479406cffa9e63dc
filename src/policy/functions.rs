//! Which functions a statement may call.
//!
//! Allowlist by default, decided from Postgres's own metadata: a built-in function (one of
//! `pg_catalog`, in the table generated from the catalog, see [`BUILTINS`]) runs if Postgres
//! declares it `IMMUTABLE` or `STABLE` (it cannot change the database) and it is not in an
//! [`INFORMATION`] class (what the server is doing, its files and settings, transaction ids).
//! `VOLATILE` built-ins are refused unless listed in [`VOLATILE_ALLOWED`]: that class holds
//! locks, sequences, large objects, WAL and replication control and SQL run from a string.
//! Unknown functions (user-defined, extensions, built-ins of a later Postgres) are refused: they
//! may write, and the proxy cannot see inside them. A scope may allow more by name.
//!
//! Overloads share a name and the decision is by name, so a name counts as volatile when any of
//! its callable overloads is (`ts_rewrite(tsquery, text)` runs a query; its other form does not).

/// Functions never allowed, whatever a scope says: server files and programs, large objects,
/// signalling backends, configuration, replication, and SQL run from a string.
pub const NEVER: &[&str] = &[
    "pg_read_file", "pg_read_binary_file", "pg_ls_dir", "pg_ls_logdir", "pg_ls_waldir", "pg_ls_tmpdir", "pg_ls_archive_statusdir",
    "pg_ls_logicalsnapdir", "pg_ls_logicalmapdir", "pg_ls_replslotdir", "pg_stat_file", "pg_file_write", "pg_file_rename", "pg_file_unlink",
    "pg_file_sync", "pg_logdir_ls", "lo_import", "lo_export", "lo_unlink", "lo_create", "lo_creat", "lo_from_bytea", "lo_put", "lo_get",
    "lo_open", "lo_write", "lowrite", "loread", "lo_truncate", "pg_reload_conf",
    "pg_rotate_logfile", "pg_promote", "pg_switch_wal", "pg_create_restore_point", "pg_backup_start", "pg_backup_stop",
    "pg_start_backup", "pg_stop_backup", "pg_create_physical_replication_slot", "pg_create_logical_replication_slot",
    "pg_drop_replication_slot", "pg_replication_origin_create", "pg_logical_emit_message", "pg_logical_slot_get_changes",
    "pg_logical_slot_peek_changes", "dblink", "dblink_exec", "dblink_connect", "dblink_connect_u", "dblink_send_query", "query_to_xml",
    "query_to_xmlschema", "query_to_xml_and_xmlschema", "cursor_to_xml", "cursor_to_xmlschema", "table_to_xml", "table_to_xmlschema",
    "table_to_xml_and_xmlschema", "schema_to_xml", "schema_to_xmlschema", "schema_to_xml_and_xmlschema", "database_to_xml",
    "database_to_xmlschema", "database_to_xml_and_xmlschema", "ts_stat", "pg_import_system_collations",
    "pg_catalog.binary_upgrade_set_next_pg_type_oid",
];

/// Functions `functions.allow = ["*"]` does not reach: each changes more than the statement's
/// own result. A scope that needs one names it (`allow = ["*", "pg_cancel_backend"]`), and
/// pglease warns at startup naming the class. (`set_config` and `pg_notify` are decided as the
/// `SET` and `NOTIFY` they are.)
pub const NAMED_ONLY: &[(&str, &[&str])] = &[
    ("signalling other sessions", &["pg_terminate_backend", "pg_cancel_backend"]),
    (
        "taking advisory locks",
        &[
            "pg_advisory_lock", "pg_advisory_lock_shared", "pg_advisory_xact_lock", "pg_advisory_xact_lock_shared", "pg_try_advisory_lock",
            "pg_try_advisory_lock_shared", "pg_try_advisory_xact_lock", "pg_try_advisory_xact_lock_shared", "pg_advisory_unlock",
            "pg_advisory_unlock_shared",
        ],
    ),
    (
        "resetting statistics",
        &["pg_stat_reset", "pg_stat_reset_shared", "pg_stat_reset_single_table_counters", "pg_stat_reset_single_function_counters", "pg_stat_reset_slru"],
    ),
];

/// Functions that are statements in disguise, decided by the walk as those statements:
/// `set_config(name, value, is_local)` as `SET`, `pg_notify(channel, payload)` as `NOTIFY`.
pub const DECIDED_AS_STATEMENTS: &[&str] = &["set_config", "pg_notify"];

/// The dangerous class a function belongs to, if it is one `"*"` does not reach.
pub fn named_only_class(name: &str) -> Option<&'static str> {
    NAMED_ONLY.iter().find(|(_, names)| names.contains(&name)).map(|(class, _)| *class)
}

/// How Postgres declares a function may behave (`pg_proc.provolatile`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Volatility {
    /// Same result for the same arguments, reads nothing.
    Immutable,
    /// Reads the database but cannot change it; same result within a statement.
    Stable,
    /// Anything else: may change the database or the session, or return a new value each call.
    Volatile,
}

/// Built-ins that are `IMMUTABLE` or `STABLE` and still not allowed by default: they tell a
/// session about the server rather than the data the scope covers, or leave a trace of the
/// session beyond its statement. A trailing `*` matches any rest of the name. Reachable with
/// `functions.allow = ["*"]` or by name (a DBA scope reading server activity).
pub const INFORMATION: &[(&str, &[&str])] = &[
    (
        "server activity",
        &[
            "pg_stat_get_*",
            "pg_get_replication_slots",
            "pg_lock_status",
            "pg_blocking_pids",
            "pg_prepared_xact",
        ],
    ),
    (
        "server settings, files and build",
        &[
            "pg_show_all_settings",
            "pg_show_all_file_settings",
            "pg_hba_file_rules",
            "pg_ident_file_mappings",
            "pg_config",
            "pg_current_logfile",
            "pg_relation_filepath",
        ],
    ),
    (
        "transaction ids and snapshots",
        &[
            "txid_current",
            "pg_current_xact_id",
            "txid_current_snapshot",
            "pg_current_snapshot",
            "pg_export_snapshot",
        ],
    ),
    ("function validators (they load libraries)", &["fmgr_*"]),
];

/// `VOLATILE` built-ins allowed by default: each returns a fresh value or reads the server's
/// size and state without changing anything but the session's own random seed or locks.
pub const VOLATILE_ALLOWED: &[&str] = &[
    "random",
    "setseed",
    "clock_timestamp",
    "timeofday",
    "gen_random_uuid",
    "pg_sleep",
    "pg_sleep_for",
    "pg_sleep_until",
    "current_query",
    // What psql's `\l+`, `\dt+` and `\db+` show.
    "pg_database_size",
    "pg_relation_size",
    "pg_table_size",
    "pg_indexes_size",
    "pg_total_relation_size",
    "pg_tablespace_size",
    "pg_partition_tree",
    "pg_partition_ancestors",
    "pg_is_in_recovery",
    "pg_jit_available",
    "pg_notification_queue_usage",
    // Releases only the session's own advisory locks (asyncpg's pool runs it on every release).
    "pg_advisory_unlock_all",
];

fn matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => pattern == name,
    }
}

/// The [`INFORMATION`] class a built-in belongs to, if any.
pub fn information_class(name: &str) -> Option<&'static str> {
    INFORMATION
        .iter()
        .find(|(_, names)| names.iter().any(|p| matches(p, name)))
        .map(|(class, _)| *class)
}

/// How a `pg_catalog` function is declared, if the generated table knows it.
pub fn builtin(name: &str) -> Option<Volatility> {
    BUILTINS
        .binary_search_by(|(n, _)| (*n).cmp(name))
        .ok()
        .map(|i| BUILTINS[i].1)
}

/// Whether a built-in runs under a scope that names no functions.
pub fn builtin_allowed_by_default(name: &str) -> bool {
    if NEVER.contains(&name)
        || DECIDED_AS_STATEMENTS.contains(&name)
        || named_only_class(name).is_some()
    {
        return false;
    }
    match builtin(name) {
        Some(Volatility::Immutable | Volatility::Stable) => information_class(name).is_none(),
        Some(Volatility::Volatile) => VOLATILE_ALLOWED.contains(&name),
        None => false,
    }
}

/// The Postgres major version [`BUILTINS`] was generated from.
pub use super::builtins_pg15::MAJOR as BUILTINS_MAJOR;

/// Every callable function of `pg_catalog` in a stock Postgres (no extension's), by name, with
/// the most volatile declaration among its overloads, sorted by name.
pub use super::builtins_pg15::FUNCTIONS as BUILTINS;

/// The query [`BUILTINS`] is generated by. Functions that take or return `internal` or a
/// handler pseudo-type are left out: SQL cannot call them.
pub const CATALOG_QUERY: &str = "SELECT p.proname::text, max(p.provolatile::text) \
    FROM pg_proc p \
    WHERE p.pronamespace = 'pg_catalog'::regnamespace AND p.prokind IN ('f', 'a', 'w') \
      AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e') \
      AND p.prorettype <> ALL ('{internal,language_handler,fdw_handler,index_am_handler,table_am_handler,tsm_handler,trigger,event_trigger}'::regtype[]) \
      AND NOT 'internal'::regtype = ANY (p.proargtypes::regtype[]) \
    GROUP BY 1 ORDER BY 1";

/// The names of `pg_catalog`'s aggregate and window functions (a masked column may not be
/// their argument), sorted.
pub use super::builtins_pg15::AGGREGATES;

/// The query [`AGGREGATES`] is generated by.
pub const AGGREGATES_QUERY: &str = "SELECT DISTINCT p.proname::text FROM pg_proc p \
    WHERE p.pronamespace = 'pg_catalog'::regnamespace AND p.prokind IN ('a', 'w') \
      AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e') \
    ORDER BY 1";

/// The names of `pg_catalog`'s functions that take a whole row as their one argument
/// (`record`, `anyelement`, `"any"`…): what `t.f`, attribute notation for `f(t)`, may call with
/// a table's row. Sorted.
pub use super::builtins_pg15::ROW_ARGUMENT;

/// The query [`ROW_ARGUMENT`] is generated by.
pub const ROW_ARGUMENT_QUERY: &str = "SELECT DISTINCT p.proname::text FROM pg_proc p \
    WHERE p.pronamespace = 'pg_catalog'::regnamespace AND p.prokind IN ('f', 'a', 'w') \
      AND p.pronargs >= 1 AND p.pronargdefaults >= p.pronargs - 1 \
      AND p.proargtypes[0] IN ('record'::regtype, 'anyelement'::regtype, 'anycompatible'::regtype, '\"any\"'::regtype, 'anynonarray'::regtype, 'anycompatiblenonarray'::regtype) \
      AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e') \
    ORDER BY 1";

/// Whether `t.name` may call `name` with the whole row of a table `t`.
pub fn takes_a_row(name: &str) -> bool {
    ROW_ARGUMENT.binary_search(&name).is_ok()
}

/// Whether `name` is an aggregate or window function of `pg_catalog`.
pub fn is_aggregate(name: &str) -> bool {
    AGGREGATES.binary_search(&name).is_ok()
}

/// The source of the generated table, from the rows of [`CATALOG_QUERY`] (name, `i`/`s`/`v`)
/// and of [`AGGREGATES_QUERY`].
pub fn render_table(major: u32, rows: &[(String, String)], aggregates: &[String], row_argument: &[String]) -> Result<String, String> {
    let mut out = format!(
        "//! Generated from the `pg_catalog` of PostgreSQL {major} by `functions::CATALOG_QUERY`, `AGGREGATES_QUERY` and `ROW_ARGUMENT_QUERY`: do not edit.\n\
         //! `tests/catalog.rs` fails when this no longer matches the catalog of the Postgres the tests\n\
         //! run against, and rewrites it with `PGLEASE_BLESS=1`.\n\n\
         use super::functions::Volatility::{{self, *}};\n\n\
         pub const MAJOR: u32 = {major};\n\n\
         pub const FUNCTIONS: &[(&str, Volatility)] = &[\n"
    );
    for (name, volatility) in rows {
        let v = match volatility.as_str() {
            "i" => "Immutable",
            "s" => "Stable",
            "v" => "Volatile",
            other => return Err(format!("function {name}: unknown volatility {other:?}")),
        };
        out.push_str(&format!("    ({name:?}, {v}),\n"));
    }
    for (constant, names) in [("AGGREGATES", aggregates), ("ROW_ARGUMENT", row_argument)] {
        out.push_str(&format!("];\n\npub const {constant}: &[&str] = &[\n"));
        for name in names {
            out.push_str(&format!("    {name:?},\n"));
        }
    }
    out.push_str("];\n");
    Ok(out)
}
