#!/usr/bin/env bash
# Entry point for the README's two commands. Installs what a fresh Debian machine is missing
# (as root), or stops with a message naming it, then runs the demo or the test suite.
#
#   scripts/dev.sh demo [pglease demo options]
#   scripts/dev.sh test [cargo test options]
#   scripts/dev.sh bench           (end to end: direct vs pgbouncer vs pglease; see benches/e2e.rs)
#   scripts/dev.sh fuzz [seconds]  (each cargo-fuzz target for that long; default 30)
#   scripts/dev.sh package         (the .deb in target/debian/, checked; see packaging/)
set -euo pipefail
cd "$(dirname "$0")/.."

die() { echo "scripts/dev.sh: $*" >&2; exit 1; }

have_pg_server() { compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || [ -n "${PGLEASE_PG_BIN:-}" ]; }
# What bindgen loads: libclang.so or libclang-<version>.so (libclang-cpp.so is another library).
have_libclang() {
    [ -n "${LIBCLANG_PATH:-}" ] && return 0
    compgen -G '/usr/lib/llvm-*/lib/libclang.so' >/dev/null || compgen -G '/usr/lib/llvm-*/lib/libclang-[0-9]*.so' >/dev/null \
        || compgen -G '/usr/lib/*-linux-gnu/libclang-[0-9]*.so' >/dev/null
}

install_missing() {
    local packages=()
    have_pg_server || packages+=(postgresql)
    command -v psql >/dev/null || packages+=(postgresql-client)
    command -v pgbench >/dev/null || packages+=(postgresql-contrib)
    # pg_query (the Postgres parser, used by the policy engine) builds with bindgen.
    have_libclang || packages+=(libclang-dev)
    command -v cc >/dev/null || packages+=(build-essential)
    if [ "${1:-}" = bench ]; then command -v pgbouncer >/dev/null || packages+=(pgbouncer); command -v strace >/dev/null || packages+=(strace); fi
    if [ ${#packages[@]} -gt 0 ]; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            echo "installing: ${packages[*]}" >&2
            export DEBIAN_FRONTEND=noninteractive
            apt-get update -qq >&2
            apt-get install -y -qq --no-install-recommends "${packages[@]}" >&2
        else
            die "missing: ${packages[*]} (install them, e.g. apt-get install ${packages[*]})"
        fi
    fi
    # A fresh postgresql package starts a cluster of its own; ours are throwaway, it may stay.
    command -v cargo >/dev/null || die "missing: cargo (install Rust with rustup: https://rustup.rs)"
    id postgres >/dev/null 2>&1 || [ "$(id -u)" != 0 ] || die "running as root but there is no 'postgres' OS user (apt-get install postgresql creates it)"
}

# The driver workloads of tests/drivers.rs: psycopg 3 and asyncpg (PyPI), node-postgres (npm,
# pinned by tests/drivers/node/package-lock.json), the PostgreSQL JDBC driver (Debian); and the
# OpenID provider of tests/oidc.rs (npm); headless Chromium and chromedriver for tests/console.rs
# (Debian); sqlsmith for tests/catalog.rs (Debian).
install_drivers() {
    command -v python3 >/dev/null || die "missing: python3 (for the psycopg and asyncpg workloads)"
    command -v node >/dev/null || die "missing: node (for the node-postgres workload)"
    command -v java >/dev/null || die "missing: java 11+ (for the JDBC workload)"
    # psycopg 3.3.4 bundles libpq 18.0, whose async API hung on 16 KiB TLS records: the large
    # result test keeps pglease honest against it (src/tls.rs, MAX_RECORD_PLAINTEXT).
    if ! python3 -c 'import sys, psycopg, asyncpg; sys.exit(psycopg.__version__ != "3.3.4" or psycopg.pq.__impl__ != "binary")' 2>/dev/null; then
        echo "installing: psycopg[binary]==3.3.4 asyncpg (PyPI)" >&2
        python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore 'psycopg[binary]==3.3.4' 'asyncpg>=0.29,<1' >&2
    fi
    if [ ! -d tests/drivers/node/node_modules/pg ]; then
        echo "installing: node-postgres (npm ci)" >&2
        (cd tests/drivers/node && npm ci --no-audit --no-fund --silent) >&2
    fi
    # The OpenID provider tests/oidc.rs signs in through (oidc-provider, pinned by
    # tests/oidc/package-lock.json).
    if [ ! -d tests/oidc/node_modules/oidc-provider ]; then
        echo "installing: oidc-provider (npm ci)" >&2
        (cd tests/oidc && npm ci --no-audit --no-fund --silent) >&2
    fi
    if [ ! -f /usr/share/java/postgresql.jar ]; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            echo "installing: libpostgresql-jdbc-java" >&2
            export DEBIAN_FRONTEND=noninteractive
            apt-get update -qq >&2
            apt-get install -y -qq --no-install-recommends libpostgresql-jdbc-java >&2
        else
            die "missing: /usr/share/java/postgresql.jar (apt-get install libpostgresql-jdbc-java)"
        fi
    fi
    # tests/catalog.rs measures the policy against random SQL that sqlsmith generates.
    if ! command -v sqlsmith >/dev/null; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            echo "installing: sqlsmith" >&2
            export DEBIAN_FRONTEND=noninteractive
            apt-get update -qq >&2
            apt-get install -y -qq --no-install-recommends sqlsmith >&2
        else
            die "missing: sqlsmith (apt-get install sqlsmith)"
        fi
    fi
    # The console's browser tests drive headless Chromium over WebDriver (chromedriver).
    if [ ! -x /usr/bin/chromedriver ]; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            echo "installing: chromium chromium-driver" >&2
            export DEBIAN_FRONTEND=noninteractive
            apt-get update -qq >&2
            apt-get install -y -qq --no-install-recommends chromium chromium-driver >&2
        else
            die "missing: /usr/bin/chromedriver (apt-get install chromium chromium-driver)"
        fi
    fi
}

# The files the .deb ships besides the binary, generated by that binary (Cargo.toml's
# [package.metadata.deb] assets point here).
package_assets() {
    local bin="${CARGO_TARGET_DIR:-target}/release/pglease" out=target/assets
    rm -rf "$out"
    mkdir -p "$out/completions" "$out/man"
    "$bin" completions bash >"$out/completions/pglease"
    "$bin" completions zsh >"$out/completions/_pglease"
    "$bin" completions fish >"$out/completions/pglease.fish"
    "$bin" man --out "$out/man"
    local f
    for f in "$out"/completions/* "$out/man/pglease.1"; do
        [ -s "$f" ] || die "package: $f is empty"
    done
}

# Looks inside the .deb as an installer would: metadata, files, maintainer scripts, the binary
# runs, the unit passes systemd's own checks.
package_check() {
    local deb="$1" contents path
    scratch="$(mktemp -d)"  # global: the EXIT trap outlives this function
    trap 'rm -rf "$scratch"' EXIT
    dpkg-deb --info "$deb" || die "package: dpkg-deb --info failed"
    contents="$(dpkg-deb --contents "$deb")" || die "package: dpkg-deb --contents failed"
    for path in ./usr/bin/pglease ./usr/lib/systemd/system/pglease.service \
        ./usr/share/bash-completion/completions/pglease ./usr/share/zsh/vendor-completions/_pglease \
        ./usr/share/fish/vendor_completions.d/pglease.fish ./usr/share/man/man1/pglease.1.gz \
        ./usr/share/man/man1/pglease-serve.1.gz ./usr/share/doc/pglease/examples/pglease.toml \
        ./usr/share/doc/pglease/copyright; do
        grep -q " $path\$" <<<"$contents" || die "package: $deb lacks $path"
    done
    echo "package: contents ok ($(grep -c '^-' <<<"$contents") files)" >&2
    dpkg-deb --control "$deb" "$scratch/DEBIAN"
    for path in postinst prerm postrm; do
        [ -x "$scratch/DEBIAN/$path" ] || die "package: no executable $path maintainer script"
        sh -n "$scratch/DEBIAN/$path" || die "package: $path is not valid sh"
    done
    grep -q 'deb-systemd-helper' "$scratch/DEBIAN/postinst" || die "package: postinst lacks the systemd enable step"
    grep -q '^Depends:.*adduser' "$scratch/DEBIAN/control" || die "package: Depends lacks adduser"
    dpkg -x "$deb" "$scratch/root" || die "package: dpkg -x failed"
    "$scratch/root/usr/bin/pglease" --version || die "package: the packaged binary does not run"
    grep -q '^ConditionPathExists=/etc/pglease/pglease.toml' "$scratch/root/usr/lib/systemd/system/pglease.service" \
        || die "package: the unit would start without a config"
    if command -v systemd-analyze >/dev/null; then
        # verify wants ExecStart='s binary to exist: point it at the extracted one. The man
        # pages named by Documentation= are not installed here.
        sed "s#/usr/bin/pglease#$scratch/root/usr/bin/pglease#g" \
            "$scratch/root/usr/lib/systemd/system/pglease.service" >"$scratch/pglease.service"
        systemd-analyze verify --man=no "$scratch/pglease.service" \
            || die "package: systemd-analyze verify failed on pglease.service"
        echo "package: systemd-analyze verify ok" >&2
    else
        echo "package: systemd-analyze not found; skipped verifying the unit" >&2
    fi
}

command="${1:-}"
shift || true
case "$command" in
    demo)
        install_missing
        cargo build --release --locked --bin pglease
        exec "${CARGO_TARGET_DIR:-target}/release/pglease" demo "$@"
        ;;
    test)
        install_missing
        install_drivers
        cargo test --locked "$@"
        ;;
    bench)
        install_missing bench
        # A fresh pgbouncer package may start a service of its own; ours runs on a free port.
        exec cargo bench --locked --bench e2e "$@"
        ;;
    fuzz)
        # libFuzzer needs a nightly toolchain; new inputs go to fuzz/work, the seeds stay as committed.
        seconds="${1:-30}"
        if ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
            echo "scripts/dev.sh: fuzz: skipped: no nightly Rust toolchain on this machine" >&2
            exit 0
        fi
        install_missing
        command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
        cd fuzz
        # ASan's stack-use-after-return check (on by default) moves C locals onto heap "fake
        # stacks"; libpg_query sizes its stack-depth limit from the address of a local, so under
        # it the parser can report "stack depth limit exceeded" at random for shallow statements
        # (Postgres's own stack_is_too_deep warns of the same). Plain builds have no fake stacks.
        export ASAN_OPTIONS="detect_stack_use_after_return=0${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
        for target in startup messages frames policy; do
            mkdir -p "work/$target"
            echo "fuzz: $target for ${seconds}s" >&2
            log="work/$target.log"
            if ! cargo +nightly fuzz run "$target" "work/$target" "corpus/$target" -- -max_total_time="$seconds" -print_final_stats=1 >"$log" 2>&1; then
                # The whole report: the panic message, the input, and libFuzzer's summary.
                grep -v -E '^#[0-9]+\s+(NEW|REDUCE|pulse)' "$log" | tail -n 60 >&2
                die "fuzz: $target failed; the input is in fuzz/artifacts/$target, the log in fuzz/$log"
            fi
            grep -E '^(Done|stat::number_of_executed_units)' "$log" >&2 || true
        done
        ;;
    package)
        install_missing
        command -v dpkg-deb >/dev/null || die "package: missing dpkg-deb (a Debian machine has it)"
        command -v cargo-deb >/dev/null || cargo install --locked cargo-deb
        cargo build --release --locked --bin pglease
        package_assets >&2
        # cargo-deb prints the paths it wrote: the .deb and pglease-dbgsym's .ddeb.
        deb="$(cargo deb --no-build --locked "$@" | grep '\.deb$' | tail -n 1)"
        [ -f "$deb" ] || die "package: cargo deb did not write a .deb (got '$deb')"
        # Only the path on stdout, so callers (Containerfile) can take it.
        package_check "$deb" >&2
        echo "$deb"
        ;;
    *)
        die "usage: scripts/dev.sh demo|test|bench|fuzz|package [options]"
        ;;
esac
