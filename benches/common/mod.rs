//! What the benchmarks share.
#![allow(dead_code)]

use std::collections::BTreeMap;

use pglease::config::ScopeConfig;

/// The scope every benchmark runs pgbench under: the four pgbench tables, read and write.
pub fn bench_scopes(role: &str) -> BTreeMap<String, ScopeConfig> {
    toml::from_str(&format!(
        r#"[bench]
        database = "bench"
        role = "{role}"
        password_env = "UNUSED"
        tables = [{{ name = "public.pgbench_*", allow = ["read", "insert", "update", "delete"] }}]"#
    ))
    .expect("the bench scope parses")
}
