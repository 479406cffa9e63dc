//! libpq connection strings, in both of libpq's forms (`host=db port=5432 sslmode=verify-full`
//! and `postgresql://user@db:5432/shop?sslmode=verify-full&sslrootcert=ca.crt`), for the
//! commands that connect to a database an operator names: `pglease init --upstream` and
//! `pglease audit replay --target`.
//!
//! tokio-postgres parses both forms too, but refuses libpq keys it does not implement
//! (`sslrootcert`), and its `sslmode` has no `verify-full`; this reads the keys pglease needs,
//! as libpq documents them ("Connection Strings", libpq docs §34.1.1), and names the key that
//! is wrong. Unknown keys are refused rather than ignored.

use std::path::PathBuf;

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "disable" => Self::Disable,
            "allow" => Self::Allow,
            "prefer" => Self::Prefer,
            "require" => Self::Require,
            "verify-ca" => Self::VerifyCa,
            "verify-full" => Self::VerifyFull,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Disable => "disable",
            Self::Allow => "allow",
            Self::Prefer => "prefer",
            Self::Require => "require",
            Self::VerifyCa => "verify-ca",
            Self::VerifyFull => "verify-full",
        }
    }
}

/// The parts of a connection string pglease uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnInfo {
    /// Host name, address, or a unix socket directory (starting with `/`).
    pub host: String,
    pub port: u16,
    pub user: Option<String>,
    /// Only when written in the string; see [`ConnInfo::password_or_env`].
    pub password: Option<String>,
    pub dbname: Option<String>,
    /// libpq's default is `prefer`.
    pub sslmode: SslMode,
    pub sslrootcert: Option<PathBuf>,
    pub application_name: Option<String>,
    pub connect_timeout: Option<u64>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConnInfoError {
    #[error("connection string: {0}")]
    Syntax(String),
    #[error("connection string: invalid value for \"{key}\": {why}")]
    Value { key: String, why: String },
    #[error("connection string: unsupported key \"{0}\" (pglease reads host, port, user, password, dbname, sslmode, sslrootcert, application_name, connect_timeout)")]
    UnknownKey(String),
}

/// Parses either form.
pub fn parse(s: &str) -> Result<ConnInfo, ConnInfoError> {
    let s = s.trim();
    let pairs = if s.starts_with("postgresql://") || s.starts_with("postgres://") { url_pairs(s)? } else { keyword_pairs(s)? };
    // libpq's environment defaults, for the keys the string does not set.
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let mut info = ConnInfo {
        host: env("PGHOST").unwrap_or_else(|| "localhost".into()),
        port: 5432,
        user: env("PGUSER"),
        password: None,
        dbname: env("PGDATABASE"),
        sslmode: SslMode::Prefer,
        sslrootcert: env("PGSSLROOTCERT").map(PathBuf::from),
        application_name: None,
        connect_timeout: None,
    };
    if let Some(port) = env("PGPORT") {
        info.port = port.parse().map_err(|_| ConnInfoError::Value { key: "port".into(), why: "PGPORT is not a port number".into() })?;
    }
    if let Some(mode) = env("PGSSLMODE") {
        info.sslmode = SslMode::parse(&mode).ok_or_else(|| ConnInfoError::Value { key: "sslmode".into(), why: "PGSSLMODE is not a libpq sslmode".into() })?;
    }
    for (key, value) in pairs {
        let bad = |why: &str| ConnInfoError::Value { key: key.clone(), why: why.into() };
        match key.as_str() {
            "host" => info.host = value,
            "port" => info.port = value.parse().map_err(|_| bad("not a port number"))?,
            "user" => info.user = Some(value),
            "password" => info.password = Some(value),
            "dbname" => info.dbname = Some(value),
            "sslmode" => info.sslmode = SslMode::parse(&value).ok_or_else(|| bad("one of disable, allow, prefer, require, verify-ca, verify-full"))?,
            "sslrootcert" => info.sslrootcert = Some(PathBuf::from(value)),
            "application_name" => info.application_name = Some(value),
            "connect_timeout" => info.connect_timeout = Some(value.parse().map_err(|_| bad("seconds, a whole number"))?),
            _ => return Err(ConnInfoError::UnknownKey(key)),
        }
    }
    if info.host.is_empty() {
        info.host = "localhost".into();
    }
    Ok(info)
}

/// `key = value` pairs separated by spaces; values may be single-quoted, with `\` escaping
/// the next character inside or outside quotes.
fn keyword_pairs(s: &str) -> Result<Vec<(String, String)>, ConnInfoError> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            return Ok(out);
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.next() != Some('=') {
            return Err(ConnInfoError::Syntax(format!("missing \"=\" after \"{key}\"")));
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'\'') {
            chars.next();
            loop {
                match chars.next() {
                    Some('\\') => value.extend(chars.next()),
                    Some('\'') => break,
                    Some(c) => value.push(c),
                    None => return Err(ConnInfoError::Syntax(format!("unterminated quoted value for \"{key}\""))),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                chars.next();
                if c == '\\' {
                    value.extend(chars.next());
                } else {
                    value.push(c);
                }
            }
        }
        out.push((key, value));
    }
}

/// `postgresql://[user[:password]@][host][:port][/dbname][?key=value&...]`, percent-decoded.
fn url_pairs(s: &str) -> Result<Vec<(String, String)>, ConnInfoError> {
    let url = url::Url::parse(s).map_err(|e| ConnInfoError::Syntax(format!("not a valid URL: {e}")))?;
    let decode = |v: &str| percent_decode(v).map_err(|why| ConnInfoError::Syntax(why.into()));
    let mut out = Vec::new();
    if !url.username().is_empty() {
        out.push(("user".to_owned(), decode(url.username())?));
    }
    if let Some(p) = url.password() {
        out.push(("password".to_owned(), decode(p)?));
    }
    if let Some(h) = url.host_str().filter(|h| !h.is_empty()) {
        // IPv6 literals come bracketed; libpq takes them without.
        out.push(("host".to_owned(), decode(h.trim_start_matches('[').trim_end_matches(']'))?));
    }
    if let Some(p) = url.port() {
        out.push(("port".to_owned(), p.to_string()));
    }
    let db = url.path().trim_start_matches('/');
    if !db.is_empty() {
        out.push(("dbname".to_owned(), decode(db)?));
    }
    // Not `query_pairs`: that reads `+` as a space (HTML forms); libpq does not.
    for pair in url.query().unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').ok_or_else(|| ConnInfoError::Syntax(format!("query parameter without a value: {}", decode(pair).unwrap_or_default())))?;
        out.push((decode(k)?, decode(v)?));
    }
    Ok(out)
}

fn percent_decode(s: &str) -> Result<String, &'static str> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3).filter(|h| h.bytes().all(|b| b.is_ascii_hexdigit())).ok_or("invalid percent escape")?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| "invalid percent escape")?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "percent escapes are not UTF-8")
}

impl ConnInfo {
    /// The password written in the string, else `PGPASSWORD`, as libpq does.
    pub fn password_or_env(&self) -> Option<String> {
        self.password.clone().or_else(|| std::env::var("PGPASSWORD").ok())
    }

    /// The database, or libpq's default: the user name.
    pub fn database(&self) -> Option<&str> {
        self.dbname.as_deref().or(self.user.as_deref())
    }

    /// Connects with tokio-postgres, honouring `sslmode` and `sslrootcert` as libpq does
    /// (`verify-ca` is checked as `verify-full`, the stricter; `allow` as `prefer`).
    pub async fn connect(&self) -> Result<tokio_postgres::Client, String> {
        let config = self.tokio_config();
        match self.verify() {
            None => {
                let (client, conn) = config.connect(tokio_postgres::NoTls).await.map_err(|e| describe_error(&e))?;
                tokio::spawn(conn);
                Ok(client)
            }
            Some(verify) => {
                let connector = self.rustls(verify)?;
                let (client, conn) = config.connect(connector).await.map_err(|e| describe_error(&e))?;
                tokio::spawn(conn);
                Ok(client)
            }
        }
    }

    fn tokio_config(&self) -> tokio_postgres::Config {
        use tokio_postgres::config::SslMode as Tp;
        let mut config = tokio_postgres::Config::new();
        config.host(&self.host).port(self.port);
        if let Some(u) = &self.user {
            config.user(u);
        }
        if let Some(p) = self.password_or_env() {
            config.password(p);
        }
        if let Some(d) = self.database() {
            config.dbname(d);
        }
        if let Some(a) = &self.application_name {
            config.application_name(a);
        }
        if let Some(t) = self.connect_timeout {
            config.connect_timeout(std::time::Duration::from_secs(t));
        }
        config.ssl_mode(match self.sslmode {
            SslMode::Disable => Tp::Disable,
            SslMode::Allow | SslMode::Prefer => Tp::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => Tp::Require,
        });
        config
    }

    /// How the server's certificate is checked; None without TLS. As libpq: `require` with a
    /// root certificate named checks the chain (pglease checks the name too, the stricter).
    pub fn verify(&self) -> Option<crate::tls::UpstreamVerify> {
        match self.sslmode {
            SslMode::Disable => None,
            SslMode::Require if self.sslrootcert.is_some() => Some(crate::tls::UpstreamVerify::Full),
            SslMode::Allow | SslMode::Prefer | SslMode::Require => Some(crate::tls::UpstreamVerify::None),
            SslMode::VerifyCa | SslMode::VerifyFull => Some(crate::tls::UpstreamVerify::Full),
        }
    }

    /// The root certificate file a verifying connection uses: `sslrootcert`, or libpq's default.
    pub fn root_cert(&self) -> Option<PathBuf> {
        self.sslrootcert.clone().or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".postgresql/root.crt")))
    }

    fn rustls(&self, verify: crate::tls::UpstreamVerify) -> Result<tokio_postgres_rustls::MakeRustlsConnect, String> {
        let root = match verify {
            crate::tls::UpstreamVerify::Full => self.root_cert(),
            crate::tls::UpstreamVerify::None => None,
        };
        let tls = crate::tls::upstream_client_config(verify, root.as_deref()).map_err(|e| format!("sslrootcert: {e}"))?;
        Ok(tokio_postgres_rustls::MakeRustlsConnect::new((*tls).clone()))
    }
}

/// A client whose asynchronous messages (LISTEN notifications) arrive on a channel.
pub type Listening = (tokio_postgres::Client, tokio::sync::mpsc::UnboundedReceiver<tokio_postgres::Notification>);

impl ConnInfo {
    /// Connects as [`ConnInfo::connect`] does, and hands over every notification the session
    /// receives. The channel closes when the connection does.
    pub async fn connect_listening(&self) -> Result<Listening, String> {
        let config = self.tokio_config();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let client = match self.verify() {
            None => {
                let (client, conn) = config.connect(tokio_postgres::NoTls).await.map_err(|e| describe_error(&e))?;
                tokio::spawn(forward(conn, tx));
                client
            }
            Some(verify) => {
                let connector = self.rustls(verify)?;
                let (client, conn) = config.connect(connector).await.map_err(|e| describe_error(&e))?;
                tokio::spawn(forward(conn, tx));
                client
            }
        };
        Ok((client, rx))
    }
}

/// Drives a connection, passing its notifications on until it closes.
async fn forward<S, T>(mut conn: tokio_postgres::Connection<S, T>, tx: tokio::sync::mpsc::UnboundedSender<tokio_postgres::Notification>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        match std::future::poll_fn(|cx| conn.poll_message(cx)).await {
            Some(Ok(tokio_postgres::AsyncMessage::Notification(n))) => {
                if tx.send(n).is_err() {
                    return;
                }
            }
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return,
        }
    }
}

/// A tokio-postgres error as psql would show it: Postgres's severity, SQLSTATE and message
/// (and detail) for an error Postgres sent, the cause chain otherwise — never a bare "db error".
pub fn describe_error(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut s = format!("{} {}: {}", db.severity(), db.code().code(), db.message());
        if let Some(d) = db.detail() {
            s.push_str(&format!(" ({d})"));
        }
        return s;
    }
    let mut s = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        s.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_forms_read_alike() {
        let a = parse("host=db.internal port=5433 user=admin dbname=shop sslmode=verify-full sslrootcert=/etc/ca.crt").unwrap();
        let b = parse("postgresql://admin@db.internal:5433/shop?sslmode=verify-full&sslrootcert=/etc/ca.crt").unwrap();
        assert_eq!(a, b);
        assert_eq!((a.host.as_str(), a.port, a.sslmode), ("db.internal", 5433, SslMode::VerifyFull));
        assert_eq!(a.sslrootcert, Some(PathBuf::from("/etc/ca.crt")));
    }

    #[test]
    fn quoting_escapes_and_defaults() {
        let c = parse(r"host = /var/run/postgresql password='it\'s a secret' dbname=a\ b").unwrap();
        assert_eq!((c.host.as_str(), c.password.as_deref(), c.dbname.as_deref()), ("/var/run/postgresql", Some("it's a secret"), Some("a b")));
        assert_eq!((c.port, c.sslmode), (5432, SslMode::Prefer));
        let u = parse("postgres://us%40er:p%2Fw@[::1]/d%20b?application_name=a+b").unwrap();
        assert_eq!(u.application_name.as_deref(), Some("a+b"), "+ is not a space in libpq URLs");
        assert_eq!((u.user.as_deref(), u.password.as_deref(), u.host.as_str(), u.dbname.as_deref()), (Some("us@er"), Some("p/w"), "::1", Some("d b")));
        assert_eq!(parse("").unwrap().host, "localhost");
    }

    #[test]
    fn errors_name_the_key() {
        assert!(parse("postgresql://h/d%+f").is_err());
        for (s, named) in [("port=x", "port"), ("sslmode=maybe", "sslmode"), ("gssencmode=disable", "gssencmode"), ("host", "host"), ("password='x", "password")] {
            let e = parse(s).unwrap_err().to_string();
            assert!(e.contains(named), "{s}: {e}");
        }
    }
}
