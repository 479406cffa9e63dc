//! Sign-ins: who holds a pglease session token, until when, with which roles.
//!
//! A token is 256 random bits, given to the person once (`pglease login` keeps it in a 0600
//! file). What is stored is its SHA-256, as for the static tokens. The identity provider's
//! refresh token is stored sealed (ChaCha20-Poly1305) under a key derived from the session
//! token, so the store alone, or a copy of it, can neither sign in nor refresh.
//!
//! Without a control plane the store is one JSON file, rewritten whole on each change (there
//! are as many rows as people signed in); with one, the `pglease.logins` table.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::SystemTime;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use rand::RngCore;
use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::hkdf;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::Role;
use crate::control_plane::conn::Conn;

/// Session tokens start with this, so a leaked one is recognisable (secret scanners).
pub const TOKEN_PREFIX: &str = "pls_";

/// How a person signed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Via {
    /// With the identity provider: roles and groups are the provider's, read again on refresh.
    #[default]
    Oidc,
    /// In the console with a static token of `[people]`: roles and groups are read from the
    /// config at every call (a reload that changes them applies at once).
    Token,
}

/// One signed-in person.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Login {
    #[serde(default)]
    pub via: Via,
    pub person: String,
    /// The roles at sign-in (what the person was told); calls use the roles their groups give
    /// under the config in force.
    pub roles: BTreeSet<Role>,
    pub groups: BTreeSet<String>,
    /// The identity provider's subject (`sub`); a refresh must name the same one.
    #[serde(default)]
    pub subject: Option<String>,
    #[serde(with = "crate::time::serde_rfc3339")]
    pub issued_at: SystemTime,
    #[serde(with = "crate::time::serde_rfc3339")]
    pub expires_at: SystemTime,
    /// When roles and groups were last read from the identity provider.
    #[serde(with = "crate::time::serde_rfc3339")]
    pub refreshed_at: SystemTime,
    /// The identity provider's refresh token, sealed (see [`seal`]); none if it gave none.
    pub sealed_refresh: Option<String>,
}

/// A new session token and its SHA-256 (hex), the key it is stored under.
pub fn new_token() -> (String, String) {
    let mut raw = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut raw);
    let token = format!("{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(raw));
    let hash = token_sha256(&token);
    (token, hash)
}

pub fn token_sha256(token: &str) -> String {
    crate::people::hex(&Sha256::digest(token.as_bytes()))
}

struct KeyLen;
impl hkdf::KeyType for KeyLen {
    fn len(&self) -> usize {
        32
    }
}

fn sealing_key(token: &str) -> LessSafeKey {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, b"pglease login").extract(token.as_bytes());
    let mut key = [0u8; 32];
    prk.expand(&[b"refresh token seal"], KeyLen).and_then(|okm| okm.fill(&mut key)).expect("32 bytes is a valid HKDF-SHA256 output length");
    LessSafeKey::new(UnboundKey::new(&aead::CHACHA20_POLY1305, &key).expect("32-byte ChaCha20 key"))
}

/// `secret` sealed under a key derived from the session `token`: base64 of nonce‖ciphertext.
pub fn seal(token: &str, secret: &str) -> String {
    let mut nonce = [0u8; aead::NONCE_LEN];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    let mut data = secret.as_bytes().to_vec();
    sealing_key(token).seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::empty(), &mut data).expect("sealing cannot fail for this size");
    let mut out = nonce.to_vec();
    out.extend_from_slice(&data);
    STANDARD.encode(out)
}

/// What [`seal`] sealed, if `token` is the one it was sealed with.
pub fn open(token: &str, sealed: &str) -> Option<String> {
    let raw = STANDARD.decode(sealed).ok()?;
    if raw.len() < aead::NONCE_LEN {
        return None;
    }
    let (nonce, data) = raw.split_at(aead::NONCE_LEN);
    let mut data = data.to_vec();
    let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
    let plain = sealing_key(token).open_in_place(nonce, Aad::empty(), &mut data).ok()?;
    String::from_utf8(plain.to_vec()).ok()
}

/// Where sign-ins are kept. Errors are messages for the log; callers fail closed on them.
#[async_trait::async_trait]
pub trait LoginStore: Send + Sync {
    async fn get(&self, token_sha256: &str) -> Result<Option<Login>, String>;
    async fn put(&self, token_sha256: &str, login: &Login) -> Result<(), String>;
    /// Replaces the row only if it is still there with `refreshed_at` as read; false if not.
    async fn update(&self, token_sha256: &str, read: SystemTime, login: &Login) -> Result<bool, String>;
    async fn delete(&self, token_sha256: &str) -> Result<(), String>;
}

/// One JSON file (mode 0600), read at start, written whole (temporary file, fsync, rename).
pub struct FileLoginStore {
    inner: std::sync::Arc<FileInner>,
}

struct FileInner {
    path: PathBuf,
    logins: Mutex<BTreeMap<String, Login>>,
}

impl FileLoginStore {
    pub fn open(path: PathBuf) -> Result<Self, String> {
        let logins = match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| format!("{} does not read as sign-ins: {e}", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        };
        Ok(Self { inner: std::sync::Arc::new(FileInner { path, logins: Mutex::new(logins) }) })
    }

    /// Runs a change off the async threads (it writes and fsyncs the file).
    async fn change<T: Send + 'static>(&self, f: impl FnOnce(&mut BTreeMap<String, Login>) -> T + Send + 'static) -> Result<T, String> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || inner.change(f)).await.map_err(|e| format!("sign-in store task failed: {e}"))?
    }
}

impl FileInner {
    fn write(&self, logins: &BTreeMap<String, Login>) -> Result<(), String> {
        use std::io::Write;
        use std::os::unix::fs::PermissionsExt;
        let dir = self.path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
        let fail = |e: std::io::Error| format!("cannot write {}: {e}", self.path.display());
        let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(fail)?;
        tmp.as_file().set_permissions(std::fs::Permissions::from_mode(0o600)).map_err(fail)?;
        tmp.write_all(&serde_json::to_vec(logins).expect("logins serialize")).map_err(fail)?;
        tmp.as_file().sync_all().map_err(fail)?;
        tmp.persist(&self.path).map_err(|e| fail(e.error))?;
        std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(fail)
    }

    fn change<T>(&self, f: impl FnOnce(&mut BTreeMap<String, Login>) -> T) -> Result<T, String> {
        let mut logins = self.logins.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = logins.clone();
        let out = f(&mut next);
        let now = SystemTime::now();
        next.retain(|_, l| l.expires_at > now);
        self.write(&next)?;
        *logins = next;
        Ok(out)
    }
}

#[async_trait::async_trait]
impl LoginStore for FileLoginStore {
    async fn get(&self, token_sha256: &str) -> Result<Option<Login>, String> {
        Ok(self.inner.logins.lock().unwrap_or_else(|p| p.into_inner()).get(token_sha256).cloned())
    }

    async fn put(&self, token_sha256: &str, login: &Login) -> Result<(), String> {
        let (key, login) = (token_sha256.to_owned(), login.clone());
        self.change(move |m| drop(m.insert(key, login))).await
    }

    async fn update(&self, token_sha256: &str, read: SystemTime, login: &Login) -> Result<bool, String> {
        let (key, login) = (token_sha256.to_owned(), login.clone());
        self.change(move |m| match m.get_mut(&key) {
            Some(row) if row.refreshed_at == read => {
                *row = login;
                true
            }
            _ => false,
        })
        .await
    }

    async fn delete(&self, token_sha256: &str) -> Result<(), String> {
        let key = token_sha256.to_owned();
        self.change(move |m| drop(m.remove(&key))).await
    }
}

/// The control plane's `pglease.logins`: every instance knows every sign-in.
pub struct PgLoginStore {
    conn: Conn,
}

impl PgLoginStore {
    pub fn new(conninfo: &str) -> Self {
        Self { conn: Conn::new(conninfo) }
    }
}

#[async_trait::async_trait]
impl LoginStore for PgLoginStore {
    async fn get(&self, token_sha256: &str) -> Result<Option<Login>, String> {
        let row = self
            .conn
            .with(async |c| c.query_opt("SELECT body::text FROM pglease.logins WHERE token_sha256 = $1 AND expires_at > now()", &[&token_sha256]).await)
            .await?;
        row.map(|r| serde_json::from_str::<Login>(r.get(0)).map_err(|e| format!("a stored sign-in does not read back: {e}"))).transpose()
    }

    async fn put(&self, token_sha256: &str, login: &Login) -> Result<(), String> {
        let body = serde_json::to_string(login).expect("logins serialize");
        let expires = crate::time::rfc3339(login.expires_at);
        self.conn
            .with(async |c| {
                c.execute("DELETE FROM pglease.logins WHERE expires_at < now()", &[]).await?;
                c.execute(
                    "INSERT INTO pglease.logins (token_sha256, body, expires_at) VALUES ($1, $2::text::jsonb, $3::text::timestamptz)
                     ON CONFLICT (token_sha256) DO UPDATE SET body = excluded.body, expires_at = excluded.expires_at",
                    &[&token_sha256, &body, &expires],
                )
                .await
            })
            .await
            .map(drop)
    }

    async fn update(&self, token_sha256: &str, read: SystemTime, login: &Login) -> Result<bool, String> {
        let body = serde_json::to_string(login).expect("logins serialize");
        let read = crate::time::rfc3339(read);
        let expires = crate::time::rfc3339(login.expires_at);
        let n = self
            .conn
            .with(async |c| {
                c.execute(
                    "UPDATE pglease.logins SET body = $2::text::jsonb, expires_at = $4::text::timestamptz WHERE token_sha256 = $1 AND body->>'refreshed_at' = $3",
                    &[&token_sha256, &body, &read, &expires],
                )
                .await
            })
            .await?;
        Ok(n == 1)
    }

    async fn delete(&self, token_sha256: &str) -> Result<(), String> {
        self.conn.with(async |c| c.execute("DELETE FROM pglease.logins WHERE token_sha256 = $1", &[&token_sha256]).await).await.map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_refresh_token_opens_only_with_its_session_token() {
        let (token, hash) = new_token();
        assert!(token.starts_with(TOKEN_PREFIX) && hash.len() == 64);
        let sealed = seal(&token, "rt-secret");
        assert!(!sealed.contains("rt-secret"));
        assert_eq!(open(&token, &sealed).as_deref(), Some("rt-secret"));
        let (other, _) = new_token();
        assert_eq!(open(&other, &sealed), None);
        let mut tampered = STANDARD.decode(&sealed).unwrap();
        *tampered.last_mut().unwrap() ^= 1;
        assert_eq!(open(&token, &STANDARD.encode(tampered)), None);
        assert_eq!(open(&token, "not base64!"), None);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn the_file_store_keeps_sign_ins_across_a_restart_and_drops_expired_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("logins.json");
        let now = SystemTime::now();
        let login = |ttl: i64| Login {
            via: Via::Oidc,
            subject: None,
            person: "alice@example.com".into(),
            roles: [Role::Engineer].into(),
            groups: ["eng".to_owned()].into(),
            issued_at: now,
            expires_at: if ttl > 0 { now + std::time::Duration::from_secs(ttl as u64) } else { now - std::time::Duration::from_secs(1) },
            refreshed_at: now,
            sealed_refresh: None,
        };
        let store = FileLoginStore::open(path.clone()).unwrap();
        store.put("a", &login(60)).await.unwrap();
        store.put("b", &login(-1)).await.unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let again = FileLoginStore::open(path.clone()).unwrap();
        assert_eq!(again.get("a").await.unwrap().unwrap().person, "alice@example.com");
        assert_eq!(again.get("b").await.unwrap(), None);
        let a = again.get("a").await.unwrap().unwrap();
        let mut later = a.clone();
        later.refreshed_at = a.refreshed_at + std::time::Duration::from_secs(1);
        assert!(again.update("a", a.refreshed_at, &later).await.unwrap());
        assert!(!again.update("a", a.refreshed_at, &later).await.unwrap(), "a second writer that read the old row loses");
        again.delete("a").await.unwrap();
        assert!(!again.update("a", later.refreshed_at, &later).await.unwrap(), "a deleted sign-in stays deleted");
        assert_eq!(FileLoginStore::open(path).unwrap().get("a").await.unwrap(), None);
    }
}
