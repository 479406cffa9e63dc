//! The `pglease` binary: argument parsing and process setup. `anyhow` lives only here and in
//! the top-level commands; modules have their own error types.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use pglease::config::{Config, LogFormat};

#[derive(Parser)]
#[command(name = "pglease", version, about = "Least-privilege, time-leased access to production PostgreSQL")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy and its admin API.
    Serve {
        /// Path of the TOML configuration.
        #[arg(long, default_value = "config/pglease.toml")]
        config: PathBuf,
        /// Only check the configuration (and the files it names), then exit.
        #[arg(long)]
        check: bool,
    },
    /// Write a throwaway CA and a server certificate signed by it, for development.
    DevCerts {
        /// Output directory (created if missing).
        #[arg(long, default_value = "certs")]
        out: PathBuf,
        /// Names (DNS or IP) the certificate is valid for.
        #[arg(long = "name", default_values_t = ["localhost".to_string(), "127.0.0.1".to_string()])]
        names: Vec<String>,
    },
    /// Run a throwaway Postgres with the sample `shop` database and the proxy in front of it.
    Demo {
        /// Directory for the throwaway cluster (kept on exit); a temporary one if omitted.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Proxy listen address.
        #[arg(long, default_value = "127.0.0.1:6432")]
        listen: SocketAddr,
        /// Admin API listen address.
        #[arg(long, default_value = "127.0.0.1:9187")]
        admin: SocketAddr,
        /// Print one JSON line with the connection details instead of text.
        #[arg(long)]
        json: bool,
    },
}

fn init_tracing(level: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    // Logs go to stderr: stdout is for command output (`demo --json`).
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pglease: cannot start the runtime: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve { config, check: true } => {
                Config::load(&config)?;
                println!("{}: ok", config.display());
                Ok(())
            }
            Command::Serve { config, check: false } => serve(config).await,
            Command::DevCerts { out, names } => dev_certs(&out, &names),
            Command::Demo { dir, listen, admin, json } => {
                init_tracing("warn,pglease=info", LogFormat::Text);
                pglease::demo::run(pglease::demo::DemoOptions { dir, listen, admin, json }).await
            }
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pglease: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

fn dev_certs(out: &std::path::Path, names: &[String]) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let certs = pglease::tls::generate_dev_certificates(&names)?;
    std::fs::create_dir_all(out).with_context(|| format!("create {}", out.display()))?;
    std::fs::write(out.join("ca.crt"), &certs.ca_pem)?;
    std::fs::write(out.join("server.crt"), &certs.cert_pem)?;
    let key = out.join("server.key");
    std::fs::write(&key, &certs.key_pem)?;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))?;
    println!("wrote {0}/ca.crt, {0}/server.crt, {0}/server.key for {1}", out.display(), names.join(", "));
    Ok(())
}

async fn serve(path: PathBuf) -> anyhow::Result<()> {
    let config = Config::load(&path)?;
    init_tracing(&config.log.level, config.log.format);
    let password = config.upstream.password()?;
    let tls = match (&config.listen.tls_cert, &config.listen.tls_key) {
        (Some(cert), Some(key)) => Some(pglease::tls::ServerTls::from_files(cert, key).context("listen.tls_cert / listen.tls_key")?),
        _ => None,
    };
    let upstream = pglease::upstream::Upstream::new(config.upstream.clone(), password, config.listen.max_message_bytes).context("upstream TLS")?;
    // NOTE: temporary grants are the only intended source of logins; until they land, `serve`
    // knows no logins and refuses every client with the same message as a wrong password.
    let credentials = Arc::new(pglease::auth::StaticCredentials::new());
    let proxy = Arc::new(pglease::server::Proxy::new(config.listen.clone(), tls, upstream, credentials));

    let listener = TcpListener::bind(config.listen.addr).await.with_context(|| format!("listen.addr: cannot listen on {}", config.listen.addr))?;
    let admin_listener = TcpListener::bind(config.admin.addr).await.with_context(|| format!("admin.addr: cannot listen on {}", config.admin.addr))?;
    tracing::info!(proxy = %config.listen.addr, admin = %config.admin.addr, "pglease serving");
    let shutdown = CancellationToken::new();
    let admin_state = pglease::admin::AdminState { metrics: pglease::admin::metrics_handle(), sessions: proxy.sessions.clone() };
    let admin = tokio::spawn(pglease::admin::serve(admin_listener, admin_state, shutdown.clone()));
    let server = tokio::spawn(proxy.run(listener, shutdown.clone()));
    pglease::signals::wait_for_shutdown().await;
    tracing::info!("signal received; shutting down");
    shutdown.cancel();
    server.await?;
    admin.await??;
    Ok(())
}
