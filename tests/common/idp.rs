//! A real OpenID provider for the tests: `oidc-provider` (OpenID Certified, from npm,
//! installed by `scripts/dev.sh test` into tests/oidc/node_modules) on a loopback port, with
//! people alice (group eng), bob (group dba) and dave (eng; his ID tokens expire after one
//! second), and a browser that signs them in through its login and consent pages.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use pglease::config::{OidcConfig, OidcRoles};
use serde_json::json;
use tokio::io::AsyncBufReadExt;

pub const CLIENT_ID: &str = "pglease";
pub const CLIENT_SECRET: &str = "pglease-client-secret";
/// Another application at the same provider: its ID tokens are not for pglease.
pub const OTHER_CLIENT_ID: &str = "other-app";
pub const OTHER_CLIENT_SECRET: &str = "other-app-secret";

pub struct Idp {
    pub issuer: String,
    /// The host name in the issuer URL (it listens on 127.0.0.1 whatever the name).
    pub host: String,
    pub port: u16,
    pub dir: tempfile::TempDir,
    child: Option<tokio::process::Child>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Idp {
    pub async fn start() -> Idp {
        Self::start_with(true).await
    }

    /// A provider that gives refresh tokens (as most can be set up to), or none.
    pub async fn start_with(refresh_tokens: bool) -> Idp {
        Self::start_as("127.0.0.1", refresh_tokens).await
    }

    /// A provider whose issuer names `host` (`localhost`: another site than the console on
    /// 127.0.0.1, as a real provider is).
    pub async fn start_as(host: &str, refresh_tokens: bool) -> Idp {
        let dir = tempfile::tempdir().unwrap();
        let client = |id: &str, secret: &str| {
            json!({
                "client_id": id, "client_secret": secret, "application_type": "native",
                // The CLI's loopback redirect and the console's (any port: a native client).
                "redirect_uris": ["http://127.0.0.1/callback", "http://127.0.0.1/auth/callback"],
                "grant_types": ["authorization_code", "refresh_token", "urn:ietf:params:oauth:grant-type:device_code"],
                "response_types": ["code"], "token_endpoint_auth_method": "client_secret_basic",
            })
        };
        std::fs::write(dir.path().join("clients.json"), json!([client(CLIENT_ID, CLIENT_SECRET), client(OTHER_CLIENT_ID, OTHER_CLIENT_SECRET)]).to_string()).unwrap();
        if !refresh_tokens {
            std::fs::write(dir.path().join("no-refresh-tokens"), "").unwrap();
        }
        let mut idp = Idp { issuer: String::new(), host: host.to_owned(), port: free_port(), dir, child: None };
        idp.issuer = format!("http://{host}:{}", idp.port);
        for (person, groups) in [("alice", &["eng"][..]), ("bob", &["dba"][..]), ("dave", &["eng"][..])] {
            idp.set_groups(person, Some(groups));
        }
        idp.run(false).await;
        idp
    }

    async fn run(&mut self, rotate: bool) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/oidc/provider.mjs");
        assert!(
            script.parent().unwrap().join("node_modules/oidc-provider").is_dir(),
            "tests/oidc/node_modules is missing: scripts/dev.sh test installs it (npm ci in tests/oidc)"
        );
        let mut child = tokio::process::Command::new("node")
            .arg(&script)
            .arg(self.port.to_string())
            .arg(self.dir.path())
            .arg(&self.host)
            .env("ROTATE", if rotate { "1" } else { "0" })
            .env("NODE_NO_WARNINGS", "1")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("node runs");
        let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let ready = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if line.starts_with("listening") {
                    return true;
                }
            }
            false
        })
        .await;
        assert_eq!(ready.ok(), Some(true), "the OpenID provider did not start");
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        self.child = Some(child);
    }

    /// Stops the provider and starts it again on the same port; with `rotate`, signing with a
    /// new key from now on (the old one still published). Its sessions and grants are lost.
    pub async fn restart(&mut self, rotate: bool) {
        if let Some(mut child) = self.child.take() {
            child.kill().await.unwrap();
        }
        self.run(rotate).await;
    }

    /// `person`'s groups at the provider from now on; `None` removes them (a disabled account).
    pub fn set_groups(&self, person: &str, groups: Option<&[&str]>) {
        let path = self.dir.path().join("people.json");
        let mut people: BTreeMap<String, serde_json::Value> = std::fs::read_to_string(&path).ok().map(|t| serde_json::from_str(&t).unwrap()).unwrap_or_default();
        match groups {
            Some(groups) => drop(people.insert(person.to_owned(), json!({ "groups": groups }))),
            None => drop(people.remove(person)),
        }
        // Written whole and renamed: the provider reads it at any moment.
        let tmp = self.dir.path().join("people.json.tmp");
        std::fs::write(&tmp, serde_json::to_string(&people).unwrap()).unwrap();
        std::fs::rename(tmp, path).unwrap();
    }

    /// `[identity.oidc]` for pglease: eng → engineer, dba → approver (and engineer).
    pub fn config(&self) -> OidcConfig {
        let secret: PathBuf = self.dir.path().join("client-secret");
        {
            use std::os::unix::fs::OpenOptionsExt;
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&secret).unwrap();
            writeln!(f, "{CLIENT_SECRET}").unwrap();
        }
        OidcConfig {
            issuer: self.issuer.clone(),
            client_id: CLIENT_ID.into(),
            client_secret_env: None,
            client_secret_file: Some(secret),
            scopes: vec!["openid".into(), "email".into(), "profile".into(), "groups".into()],
            person_claim: "email".into(),
            groups_claim: "groups".into(),
            roles: OidcRoles { engineer: vec!["eng".into(), "dba".into()], approver: vec!["dba".into()], auditor: vec![], admin: vec![] },
            session_ttl: Duration::from_secs(3600),
            refresh_every: Duration::from_secs(300),
            clock_skew: Duration::from_secs(0),
            bearer_id_tokens: false,
            device_flow: true,
            ca_file: None,
        }
    }

    /// An ID token straight from the provider for `person`, issued to `client` (the test
    /// plays that client's part in the code flow).
    pub fn id_token(&self, person: &str, client: (&str, &str)) -> String {
        let redirect = "http://127.0.0.1:1/callback";
        let verifier = "v".repeat(43);
        let challenge = base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, <sha2::Sha256 as sha2::Digest>::digest(verifier.as_bytes()));
        let query = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("client_id", client.0)
            .append_pair("response_type", "code")
            .append_pair("scope", "openid email profile groups")
            .append_pair("redirect_uri", redirect)
            .append_pair("code_challenge", &challenge)
            .append_pair("code_challenge_method", "S256")
            .append_pair("state", "state-for-a-test-client")
            .append_pair("nonce", "nonce-for-a-test-client")
            .finish();
        let back = Browser::new().sign_in(&format!("{}/auth?{query}", self.issuer), person);
        let code = url::Url::parse(&back).unwrap().query_pairs().find(|(k, _)| k == "code").unwrap().1.into_owned();
        let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
        let basic = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, format!("{}:{}", client.0, client.1));
        let form = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("grant_type", "authorization_code")
            .append_pair("code", &code)
            .append_pair("redirect_uri", redirect)
            .append_pair("code_verifier", &verifier)
            .finish();
        let mut resp = agent
            .post(format!("{}/token", self.issuer))
            .header("Authorization", format!("Basic {basic}"))
            .content_type("application/x-www-form-urlencoded")
            .send(form.as_bytes())
            .unwrap();
        let body: serde_json::Value = resp.body_mut().read_json().unwrap();
        body["id_token"].as_str().unwrap_or_else(|| panic!("no ID token: {body}")).to_owned()
    }
}

/// A browser without a screen: follows the provider's redirects with its cookies, and signs
/// in and consents on the development login pages.
pub struct Browser {
    agent: ureq::Agent,
    cookies: BTreeMap<String, String>,
    /// The last page `sign_in` ended on, when it ended on the provider's own page.
    pub last_page: String,
}

impl Default for Browser {
    fn default() -> Self {
        Self::new()
    }
}

impl Browser {
    pub fn new() -> Self {
        let agent = ureq::Agent::config_builder().http_status_as_error(false).max_redirects(0).build().into();
        Self { agent, cookies: BTreeMap::new(), last_page: String::new() }
    }

    fn remember(&mut self, resp: &ureq::http::Response<ureq::Body>) {
        for value in resp.headers().get_all("set-cookie") {
            let pair = value.to_str().unwrap().split(';').next().unwrap();
            if let Some((name, value)) = pair.split_once('=') {
                if value.is_empty() {
                    self.cookies.remove(name.trim());
                } else {
                    self.cookies.insert(name.trim().to_owned(), value.to_owned());
                }
            }
        }
    }

    fn cookie_header(&self) -> String {
        self.cookies.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("; ")
    }

    /// (status, Location, body) of a GET, or of a form POST when `form` is given.
    pub fn request(&mut self, url: &str, form: Option<&[(&str, &str)]>) -> (u16, Option<String>, String) {
        let mut resp = match form {
            None => self.agent.get(url).header("Cookie", self.cookie_header()).call(),
            Some(pairs) => {
                let body = url::form_urlencoded::Serializer::new(String::new()).extend_pairs(pairs.iter()).finish();
                self.agent.post(url).header("Cookie", self.cookie_header()).content_type("application/x-www-form-urlencoded").send(body.as_bytes())
            }
        }
        .unwrap_or_else(|e| panic!("{url}: {e}"));
        self.remember(&resp);
        let location = resp.headers().get("location").map(|l| url::Url::parse(url).unwrap().join(l.to_str().unwrap()).unwrap().to_string());
        let status = resp.status().as_u16();
        (status, location, resp.body_mut().read_to_string().unwrap_or_default())
    }

    /// Follows `url` through the provider's pages, signing in as `person` and consenting,
    /// until a redirect leaves the provider; returns where it points (not visited).
    pub fn sign_in(&mut self, url: &str, person: &str) -> String {
        let origin = url::Url::parse(url).unwrap().origin();
        let mut url = url.to_owned();
        for _ in 0..20 {
            let (status, location, body) = self.request(&url, None);
            if let Some(next) = location {
                if url::Url::parse(&next).unwrap().origin() != origin {
                    return next;
                }
                url = next;
                continue;
            }
            assert_eq!(status, 200, "{url}: {body}");
            if url.contains("/interaction/") {
                let form: &[(&str, &str)] = if body.contains("name=\"login\"") { &[("prompt", "login"), ("login", person), ("password", "any")] } else { &[("prompt", "consent")] };
                let (_, location, body) = self.request(&url, Some(form));
                url = location.unwrap_or_else(|| panic!("no redirect after the interaction: {body}"));
                continue;
            }
            // The device flow ends on the provider's own success page.
            self.last_page = body;
            return url;
        }
        panic!("the sign-in did not finish");
    }

    /// Enters `user_code` at the provider's device page and signs in as `person`.
    pub fn approve_device(&mut self, issuer: &str, user_code: &str, person: &str) {
        let xsrf = |body: &str| body.split("name=\"xsrf\" value=\"").nth(1).and_then(|r| r.split('"').next()).map(str::to_owned);
        let (_, _, body) = self.request(&format!("{issuer}/device"), None);
        let token = xsrf(&body).expect("the device page has a form");
        let (status, location, body) = self.request(&format!("{issuer}/device"), Some(&[("xsrf", &token), ("user_code", user_code)]));
        let location = match location {
            Some(l) => l,
            // A confirmation page first.
            None => {
                assert_eq!(status, 200, "{body}");
                let token = xsrf(&body).expect("the confirmation page has a form");
                let (_, location, body) = self.request(&format!("{issuer}/device"), Some(&[("xsrf", &token), ("user_code", user_code), ("confirm", "yes")]));
                location.unwrap_or_else(|| panic!("no redirect after confirming: {body}"))
            }
        };
        self.sign_in(&location, person);
        assert!(self.last_page.contains("Sign-in Success"), "the device sign-in did not succeed: {}", self.last_page);
    }
}
