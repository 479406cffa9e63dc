//! The policy decision on arbitrary SQL, for every demo scope: never a panic, and the cached
//! decision (exact text or statement shape) is always the one computed from scratch.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use pglease::policy::ScopePolicy;

fn scopes() -> &'static Vec<ScopePolicy> {
    static SCOPES: OnceLock<Vec<ScopePolicy>> = OnceLock::new();
    SCOPES.get_or_init(|| pglease::demo::demo_scopes().iter().map(|(name, c)| ScopePolicy::from_config(name, c)).collect())
}

fuzz_target!(|data: &[u8]| {
    let Ok(sql) = std::str::from_utf8(data) else { return };
    for scope in scopes() {
        let cached = scope.decide(sql);
        let fresh = scope.decide_uncached(sql);
        // One line, so the whole finding survives a filtered log.
        assert!(cached == fresh, "scope {}: decided {cached:?} from the cache but {fresh:?} from scratch for {sql:?}", scope.name);
    }
});
