//! `pglease login` and `pglease logout`: sign in with the identity provider and keep the
//! resulting pglease session token for the admin commands.
//!
//! The token is kept in `$XDG_CONFIG_HOME/pglease/session.json` (else `~/.config/…`), mode
//! 0600 in a 0700 directory, with the admin URL it is for; never the identity provider's
//! tokens. Admin commands use it when `PGLEASE_ADMIN_TOKEN` is not set and the URL matches.
//!
//! Two ways in: the authorization code flow with PKCE, the browser coming back to a loopback
//! port of this process (RFC 8252); and the device flow for a machine without a browser
//! (`--device`, or automatically when there is no display).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::cli::{ApiClient, CliError};

/// How long the browser has to come back with a code.
const BROWSER_TIMEOUT: Duration = Duration::from_secs(300);

/// What `pglease login` keeps.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Saved {
    pub admin_url: String,
    pub token: String,
    pub person: String,
    #[serde(with = "crate::time::serde_rfc3339")]
    pub expires_at: SystemTime,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Code + PKCE; open a browser unless told not to.
    Browser { open: bool },
    Device,
}

/// The file the session token is kept in.
pub fn session_file() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").filter(|v| !v.is_empty()).map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("pglease").join("session.json"))
}

fn same_url(a: &str, b: &str) -> bool {
    a.trim_end_matches('/') == b.trim_end_matches('/')
}

/// The kept session token for `admin_url`, if there is one that has not expired.
pub fn saved_token(admin_url: &str) -> Option<String> {
    let text = std::fs::read_to_string(session_file()?).ok()?;
    let saved: Saved = serde_json::from_str(&text).ok()?;
    (same_url(&saved.admin_url, admin_url) && saved.expires_at > SystemTime::now()).then_some(saved.token)
}

/// The token admin commands send: `PGLEASE_ADMIN_TOKEN`, else the kept sign-in.
pub fn admin_token(admin_url: &str) -> Option<String> {
    std::env::var("PGLEASE_ADMIN_TOKEN").ok().filter(|t| !t.is_empty()).or_else(|| saved_token(admin_url))
}

fn save(saved: &Saved) -> Result<PathBuf, CliError> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
    let path = session_file().ok_or_else(|| CliError::Refused("neither XDG_CONFIG_HOME nor HOME is set: nowhere to keep the sign-in".into()))?;
    let dir = path.parent().expect("the file is in a directory");
    let fail = |e: std::io::Error| CliError::Refused(format!("cannot write {}: {e}", path.display()));
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(fail)?;
    let tmp = dir.join(format!(".session.json.{}", std::process::id()));
    let mut file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp).map_err(fail)?;
    // An older file created with a laxer mode keeps it through O_CREAT: set it.
    file.set_permissions(std::fs::Permissions::from_mode(0o600)).map_err(fail)?;
    file.write_all(&serde_json::to_vec_pretty(saved).expect("serializes")).map_err(fail)?;
    file.sync_all().map_err(fail)?;
    std::fs::rename(&tmp, &path).map_err(fail)?;
    Ok(path)
}

fn random_text(bytes: usize) -> String {
    let mut raw = vec![0u8; bytes];
    rand::rngs::OsRng.fill_bytes(&mut raw);
    URL_SAFE_NO_PAD.encode(raw)
}

/// Whether a browser can be opened here: one is named, or there is a display.
pub fn has_browser() -> bool {
    let set = |v: &str| std::env::var_os(v).is_some_and(|x| !x.is_empty());
    set("BROWSER") || set("DISPLAY") || set("WAYLAND_DISPLAY") || cfg!(target_os = "macos")
}

fn open_browser(url: &str) -> bool {
    let program = std::env::var("BROWSER").ok().filter(|b| !b.is_empty()).unwrap_or_else(|| if cfg!(target_os = "macos") { "open".into() } else { "xdg-open".into() });
    std::process::Command::new(program)
        .arg(url)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .is_ok()
}

/// Signs in and keeps the token; prints who signed in.
pub fn login(api: &ApiClient, admin_url: &str, flow: Flow, json_out: bool) -> Result<(), CliError> {
    let view = match flow {
        Flow::Browser { open } => browser(api, open)?,
        Flow::Device => device(api)?,
    };
    let token = view["token"].as_str().ok_or_else(|| CliError::Unreachable("the admin API sent no token".into()))?.to_owned();
    let person = view["person"].as_str().unwrap_or_default().to_owned();
    let expires_at = view["expires_at"].as_str().and_then(|t| crate::time::parse_rfc3339(t).ok()).unwrap_or_else(SystemTime::now);
    let path = save(&Saved { admin_url: admin_url.trim_end_matches('/').to_owned(), token, person: person.clone(), expires_at })?;
    let roles = view["roles"].as_array().map(|r| r.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(", ")).unwrap_or_default();
    if json_out {
        println!("{}", json!({ "person": person, "roles": view["roles"], "groups": view["groups"], "expires_at": view["expires_at"], "file": path }));
    } else {
        println!("Signed in as {person} ({roles}) until {}.", view["expires_at"].as_str().unwrap_or("?"));
        println!("The session token is in {} (mode 0600).", path.display());
    }
    Ok(())
}

fn browser(api: &ApiClient, open: bool) -> Result<Value, CliError> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| CliError::Refused(format!("cannot listen on a loopback port for the browser: {e}")))?;
    let port = listener.local_addr().map_err(|e| CliError::Refused(e.to_string()))?.port();
    let redirect_uri = format!("http://127.0.0.1:{port}/callback");
    let verifier = random_text(32);
    let challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()));
    let (state, nonce) = (random_text(24), random_text(24));
    let started = api.post_anonymous("/login/start", json!({ "redirect_uri": redirect_uri, "state": state, "nonce": nonce, "code_challenge": challenge }))?;
    let url = started["authorize_url"].as_str().ok_or_else(|| CliError::Unreachable("the admin API sent no authorization URL".into()))?;
    // Only a web page is handed to the browser opener (never file: or an app's own scheme).
    if !url::Url::parse(url).is_ok_and(|u| matches!(u.scheme(), "https" | "http")) {
        return Err(CliError::Unreachable("the admin API sent an authorization URL that is not http(s)".into()));
    }
    let opened = open && open_browser(url);
    eprintln!("{}", if opened { "Opening the browser to sign in. If it does not open, visit:" } else { "To sign in, open this in a browser on this machine:" });
    eprintln!("  {url}");
    let code = wait_for_code(&listener, &state)?;
    eprintln!("Signing in…");
    api.post_anonymous("/login/finish", json!({ "code": code, "code_verifier": verifier, "redirect_uri": redirect_uri, "nonce": nonce }))
}

/// Answers the browser's requests on the loopback port until one brings the code for
/// `state`. Others (a favicon, a stale tab) get a 404 and are otherwise ignored.
fn wait_for_code(listener: &TcpListener, state: &str) -> Result<String, CliError> {
    let deadline = Instant::now() + BROWSER_TIMEOUT;
    listener.set_nonblocking(true).map_err(|e| CliError::Refused(e.to_string()))?;
    loop {
        if Instant::now() > deadline {
            return Err(CliError::Refused(format!("no sign-in came back within {}; run pglease login again", crate::time::human_duration(BROWSER_TIMEOUT))));
        }
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
            Err(e) => return Err(CliError::Refused(format!("the loopback listener failed: {e}"))),
        };
        if let Some(result) = callback(stream, state) {
            return result;
        }
    }
}

/// One request to the loopback port: `Some` when it was the redirect for this sign-in. A
/// connection has two seconds in all to send its request line (a browser needs far less), so
/// nothing local can hold the listener.
fn callback(mut stream: TcpStream, state: &str) -> Option<Result<String, CliError>> {
    let _ = stream.set_nonblocking(false);
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !head.windows(2).any(|w| w == b"\r\n") && head.len() < 8192 {
        let left = deadline.checked_duration_since(Instant::now()).filter(|d| !d.is_zero())?;
        let _ = stream.set_read_timeout(Some(left));
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => head.extend_from_slice(&chunk[..n]),
        }
    }
    let mut line = String::new();
    BufReader::new(head.as_slice()).read_line(&mut line).ok()?;
    let target = line.strip_prefix("GET ")?.split(' ').next()?;
    let url = url::Url::parse(&format!("http://127.0.0.1{target}")).ok()?;
    let reply = |stream: &mut TcpStream, status: &str, text: &str| {
        let body = format!("<!doctype html><meta charset=utf-8><title>pglease</title><p>{text}</p>");
        let _ = write!(stream, "HTTP/1.1 {status}\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\nCache-Control: no-store\r\n\r\n{body}", body.len());
    };
    if url.path() != "/callback" {
        reply(&mut stream, "404 Not Found", "Not here.");
        return None;
    }
    let param = |name: &str| url.query_pairs().find(|(k, _)| k == name).map(|(_, v)| v.into_owned());
    // Not this sign-in's state: someone else's redirect (or a forged one) is not used.
    if param("state").as_deref() != Some(state) {
        reply(&mut stream, "400 Bad Request", "This sign-in link is not the one pglease is waiting for.");
        return None;
    }
    if let Some(error) = param("error") {
        reply(&mut stream, "200 OK", "The sign-in was not completed. You can close this tab.");
        let detail = param("error_description").map(|d| format!(": {d}")).unwrap_or_default();
        return Some(Err(CliError::Refused(format!("the identity provider refused the sign-in ({error}{detail})"))));
    }
    let code = param("code")?;
    reply(&mut stream, "200 OK", "Signed in to pglease. You can close this tab and return to the terminal.");
    Some(Ok(code))
}

fn device(api: &ApiClient) -> Result<Value, CliError> {
    let start = api.post_anonymous("/login/device", json!({}))?;
    let text = |k: &str| start[k].as_str().unwrap_or_default().to_owned();
    let (device_code, user_code) = (text("device_code"), text("user_code"));
    eprintln!("To sign in, open {} and enter the code {user_code}", text("verification_uri"));
    if let Some(complete) = start["verification_uri_complete"].as_str() {
        eprintln!("  (or open {complete})");
    }
    let mut interval = Duration::from_secs(start["interval"].as_u64().unwrap_or(5).max(1));
    let deadline = Instant::now() + Duration::from_secs(start["expires_in"].as_u64().unwrap_or(600));
    while Instant::now() < deadline {
        std::thread::sleep(interval);
        let (status, body) = api.post_anonymous_status("/login/device/poll", json!({ "device_code": device_code }))?;
        if status == 200 {
            return Ok(body);
        }
        if body["slow_down"].as_bool() == Some(true) {
            interval += Duration::from_secs(5);
        }
    }
    Err(CliError::Refused("the code expired before the sign-in was completed; run pglease login again".into()))
}

/// Ends the kept sign-in, here and on the server.
pub fn logout(admin_url: &str) -> Result<(), CliError> {
    let Some(path) = session_file().filter(|p| p.exists()) else {
        println!("Not signed in.");
        return Ok(());
    };
    let text = std::fs::read_to_string(&path).unwrap_or_default();
    let saved: Option<Saved> = serde_json::from_str(&text).ok();
    let ended = match &saved {
        Some(s) if same_url(&s.admin_url, admin_url) => Some(ApiClient::new(admin_url, Some(s.token.clone())).post("/logout", json!({}))),
        _ => None,
    };
    std::fs::remove_file(&path).map_err(|e| CliError::Refused(format!("cannot remove {}: {e}", path.display())))?;
    match ended {
        Some(Ok(_)) => println!("Signed out{}.", saved.map(|s| format!(" {}", s.person)).unwrap_or_default()),
        Some(Err(e)) => {
            println!("Removed the local sign-in; the server could not end it ({e}): it lasts until it expires.");
        }
        None => println!("Removed the local sign-in (it was for another admin URL, which was not told)."),
    }
    Ok(())
}
