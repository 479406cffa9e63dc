//! Which functions a statement may call.
//!
//! Allowlist by default: a built-in function runs only if it is known to be read-only and free
//! of side effects outside the statement (no file, program, network, lock, sequence, setting or
//! signal, and no SQL from a string). Unknown functions (user-defined, extensions) are refused:
//! they may write, and the proxy cannot see inside them. A scope may allow more by name.

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

/// Built-in functions allowed by default (in `pg_catalog`, called qualified or not).
pub const BUILTIN: &[&str] = &[
    // aggregates and window functions
    "count", "sum", "avg", "min", "max", "bool_and", "bool_or", "every", "array_agg", "string_agg", "json_agg", "jsonb_agg",
    "json_object_agg", "jsonb_object_agg", "stddev", "stddev_pop", "stddev_samp", "variance", "var_pop", "var_samp", "corr",
    "covar_pop", "covar_samp", "regr_avgx", "regr_avgy", "regr_count", "regr_intercept", "regr_r2", "regr_slope", "regr_sxx",
    "regr_sxy", "regr_syy", "percentile_cont", "percentile_disc", "mode", "rank", "dense_rank", "row_number", "ntile", "lag", "lead",
    "first_value", "last_value", "nth_value", "cume_dist", "percent_rank", "bit_and", "bit_or", "bit_xor", "any_value",
    // math
    "abs", "ceil", "ceiling", "floor", "round", "trunc", "sign", "sqrt", "cbrt", "exp", "ln", "log", "log10", "power", "pow", "mod",
    "div", "pi", "degrees", "radians", "random", "width_bucket", "gcd", "lcm", "factorial", "sin", "cos", "tan", "asin", "acos", "atan",
    "atan2", "sinh", "cosh", "tanh", "scale", "min_scale", "trim_scale",
    // strings
    "length", "char_length", "character_length", "octet_length", "bit_length", "lower", "upper", "initcap", "substr", "substring",
    "left", "right", "btrim", "ltrim", "rtrim", "lpad", "rpad", "replace", "translate", "reverse", "repeat", "split_part", "strpos",
    "position", "concat", "concat_ws", "format", "md5", "sha224", "sha256", "sha384", "sha512", "encode", "decode", "to_hex", "ascii",
    "chr", "regexp_replace", "regexp_match", "regexp_matches", "regexp_split_to_array", "regexp_split_to_table", "regexp_like",
    "regexp_count", "regexp_instr", "regexp_substr", "starts_with", "string_to_array", "string_to_table", "array_to_string",
    "quote_ident", "quote_literal", "quote_nullable", "to_ascii", "unistr", "normalize", "overlay", "textlen", "like", "ilike",
    // dates and times
    "now", "clock_timestamp", "statement_timestamp", "transaction_timestamp", "timeofday", "date_trunc", "date_part", "extract",
    "age", "to_char", "to_date", "to_timestamp", "to_number", "make_date", "make_time", "make_timestamp", "make_timestamptz",
    "make_interval", "justify_days", "justify_hours", "justify_interval", "isfinite", "date_bin", "timezone", "overlaps",
    // json
    "to_json", "to_jsonb", "row_to_json", "array_to_json", "json_build_object", "jsonb_build_object", "json_build_array",
    "jsonb_build_array", "json_object", "jsonb_object", "json_array_elements", "jsonb_array_elements", "json_array_elements_text",
    "jsonb_array_elements_text", "json_each", "jsonb_each", "json_each_text", "jsonb_each_text", "json_extract_path",
    "jsonb_extract_path", "json_extract_path_text", "jsonb_extract_path_text", "json_object_keys", "jsonb_object_keys", "json_typeof",
    "jsonb_typeof", "jsonb_pretty", "jsonb_set", "jsonb_insert", "jsonb_strip_nulls", "json_strip_nulls", "jsonb_path_query",
    "jsonb_path_exists", "jsonb_path_match", "jsonb_path_query_array", "jsonb_path_query_first", "json_array_length",
    "jsonb_array_length", "json_populate_record", "jsonb_populate_record", "json_to_record", "jsonb_to_record",
    "json_to_recordset", "jsonb_to_recordset",
    // arrays and sets
    "array_length", "array_lower", "array_upper", "array_dims", "array_ndims", "cardinality", "unnest", "array_append",
    "array_prepend", "array_cat", "array_remove", "array_replace", "array_position", "array_positions", "generate_series",
    "generate_subscripts", "array_fill", "trim_array", "array_sample", "array_shuffle",
    // text search (not ts_stat, which runs a query from a string)
    "to_tsvector", "to_tsquery", "plainto_tsquery", "phraseto_tsquery", "websearch_to_tsquery", "ts_rank", "ts_rank_cd",
    "ts_headline", "setweight", "strip", "numnode", "querytree",
    // casts written as calls
    "text", "int2", "int4", "int8", "numeric", "float4", "float8", "bool", "date", "time", "timestamp", "timestamptz", "interval",
    "varchar", "bpchar", "uuid", "inet", "cidr", "bytea", "gen_random_uuid",
    // session and catalog information (what psql's \d family and tab completion call)
    "version", "current_database", "current_schema", "current_schemas", "current_setting", "pg_backend_pid", "pg_typeof",
    "pg_postmaster_start_time", "pg_conf_load_time", "inet_client_addr", "inet_client_port", "inet_server_addr", "inet_server_port",
    "pg_column_size", "pg_relation_size", "pg_total_relation_size", "pg_table_size", "pg_indexes_size", "pg_database_size",
    "pg_tablespace_size", "pg_size_pretty", "pg_size_bytes", "format_type", "pg_get_viewdef", "pg_get_indexdef", "pg_get_constraintdef",
    "pg_get_expr", "pg_get_userbyid", "pg_get_function_arguments", "pg_get_function_result", "pg_get_function_identity_arguments",
    "pg_get_functiondef", "pg_get_triggerdef", "pg_get_ruledef", "pg_get_keywords", "pg_get_serial_sequence",
    "pg_get_statisticsobjdef", "pg_get_statisticsobjdef_columns", "pg_get_statisticsobjdef_expressions", "pg_get_partkeydef",
    "pg_get_partition_constraintdef", "obj_description", "col_description", "shobj_description", "has_table_privilege",
    "has_column_privilege", "has_any_column_privilege", "has_schema_privilege", "has_database_privilege", "has_function_privilege",
    "has_sequence_privilege", "has_type_privilege", "has_language_privilege", "has_tablespace_privilege",
    "has_foreign_data_wrapper_privilege", "has_server_privilege", "has_parameter_privilege", "pg_has_role", "pg_table_is_visible",
    "pg_type_is_visible", "pg_function_is_visible", "pg_operator_is_visible", "pg_opclass_is_visible", "pg_opfamily_is_visible",
    "pg_conversion_is_visible", "pg_collation_is_visible", "pg_statistics_obj_is_visible", "pg_ts_config_is_visible",
    "pg_ts_dict_is_visible", "pg_ts_parser_is_visible", "pg_ts_template_is_visible", "pg_encoding_to_char", "pg_char_to_encoding",
    "pg_tablespace_location", "pg_relation_is_publishable", "pg_relation_filenode", "pg_get_object_address", "pg_identify_object",
    "pg_describe_object", "pg_sleep", "pg_sleep_for", "pg_is_in_recovery", "pg_jit_available", "pg_trigger_depth",
    "pg_listening_channels", "pg_notification_queue_usage", "pg_index_column_has_property", "pg_index_has_property",
    "pg_indexam_has_property", "pg_options_to_table", "pg_get_publication_tables", "row_security_active", "pg_partition_root",
    "pg_partition_tree", "pg_partition_ancestors", "to_regclass", "to_regtype", "to_regproc", "to_regnamespace", "to_regrole",
    // Releases only the session's own advisory locks (asyncpg's pool runs it on every release).
    "pg_advisory_unlock_all",
];
