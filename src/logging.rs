//! The log filter every pglease process uses.

use tracing_subscriber::EnvFilter;

/// Crates that dump raw HTTP bytes at trace level, bearer tokens included: silenced whatever
/// `RUST_LOG` asks for, so that turning logging up never writes a secret.
const NEVER_LOGGED: &[&str] = &["ureq=off", "ureq_proto=off"];

/// `RUST_LOG` if set, else `default`; in both cases without [`NEVER_LOGGED`].
pub fn filter(default: &str) -> EnvFilter {
    let mut filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    for directive in NEVER_LOGGED {
        filter = filter.add_directive(directive.parse().expect("static directive"));
    }
    filter
}
