//! A real browser for the console's tests: headless Chromium driven over WebDriver by its own
//! chromedriver (Debian's `chromium` and `chromium-driver`, installed by `scripts/dev.sh test`).
//! Each `Browser` has its own chromedriver on a free loopback port and its own fresh profile,
//! so tests may run in parallel; everything it started is killed when it is dropped.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use fantoccini::elements::Element;
use fantoccini::error::CmdError;
use fantoccini::wd::TimeoutConfiguration;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// How long `find`, `click` and `fill` wait for their element.
pub const FIND_TIMEOUT: Duration = Duration::from_secs(10);
/// Generous: a 2-core CI machine running several browsers and Postgres clusters at once.
const DRIVER_READY_TIMEOUT: Duration = Duration::from_secs(30);
const SESSION_TIMEOUT: Duration = Duration::from_secs(60);
const PAGE_LOAD_TIMEOUT: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(50);

pub struct Browser {
    /// The WebDriver session, for whatever the helpers below do not cover.
    pub client: Client,
    // Dropped in this order: the session, then chromedriver and its Chromium, then the profile.
    driver: Driver,
    dir: tempfile::TempDir,
}

/// chromedriver in a process group of its own, which the Chromium it starts joins (only
/// Chromium's crash handlers leave it, and they exit with their browser): dropping this kills
/// the group, so a test that panics or forgets `close` leaves no browser behind.
struct Driver {
    child: tokio::process::Child,
    port: u16,
}

impl Drop for Driver {
    fn drop(&mut self) {
        // `id()` is None once the child has been reaped; until then its pid (the group's id)
        // cannot have been reused.
        if let Some(pid) = self.child.id() {
            // SAFETY: kill(2) on the group this struct created; no memory involved.
            unsafe { libc::kill(-(pid as libc::pid_t), libc::SIGKILL) };
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The last lines of chromedriver's output, for panic messages.
fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// Whether chromedriver on `port` answers /status with `"ready": true`.
async fn driver_ready(port: u16) -> bool {
    let probe = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        let request = format!("GET /status HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        // chromedriver keeps the connection open despite `Connection: close`: read until the
        // body is whole JSON.
        let mut response = Vec::new();
        loop {
            let mut chunk = [0; 4096];
            let n = stream.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            response.extend_from_slice(&chunk[..n]);
            let response = String::from_utf8_lossy(&response);
            if let Some((_, body)) = response.split_once("\r\n\r\n")
                && let Ok(status) = serde_json::from_str::<serde_json::Value>(body.trim())
            {
                return status["value"]["ready"].as_bool();
            }
        }
    };
    matches!(tokio::time::timeout(Duration::from_secs(5), probe).await, Ok(Some(true)))
}

async fn start_driver(dir: &Path) -> Driver {
    let log = dir.join("chromedriver.log");
    // The free port may be taken again before chromedriver binds it: then it exits, and we
    // try another.
    for _attempt in 0..5 {
        let port = free_port();
        let out = std::fs::File::create(&log).unwrap();
        let mut driver = Driver {
            child: tokio::process::Command::new(CHROMEDRIVER)
                .arg(format!("--port={port}"))
                // Chromium's own temporary files (its profile lock, scoped dirs) go with the rest.
                .env("TMPDIR", dir)
                .stdin(Stdio::null())
                .stdout(out.try_clone().unwrap())
                .stderr(out)
                .process_group(0)
                .kill_on_drop(true)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot run {CHROMEDRIVER}: {e}")),
            port,
        };
        let deadline = Instant::now() + DRIVER_READY_TIMEOUT;
        loop {
            if driver_ready(port).await {
                return driver;
            }
            if let Some(status) = driver.child.try_wait().unwrap() {
                let tail = log_tail(&log);
                if tail.contains("bind() failed") || tail.contains("Address already in use") {
                    break;
                }
                panic!("chromedriver exited ({status}) before it was ready:\n{tail}");
            }
            if Instant::now() > deadline {
                panic!("chromedriver on port {port} not ready after {DRIVER_READY_TIMEOUT:?}:\n{}", log_tail(&log));
            }
            tokio::time::sleep(POLL).await;
        }
    }
    panic!("chromedriver could not bind a free loopback port in 5 attempts:\n{}", log_tail(&log));
}

fn page_load_error(url: &str, e: CmdError) -> ! {
    panic!("browser: cannot load {url}: {e}")
}

impl Browser {
    /// chromedriver on a free loopback port and a headless Chromium session with a fresh
    /// profile.
    pub async fn start() -> Browser {
        assert!(
            Path::new(CHROMEDRIVER).exists(),
            "{CHROMEDRIVER} is missing: the console's browser tests drive headless Chromium over WebDriver; \
             run scripts/dev.sh test (it installs chromium and chromium-driver)"
        );
        let dir = tempfile::Builder::new().prefix("pglease-browser-").tempdir().unwrap();
        let driver = start_driver(dir.path()).await;
        let profile = dir.path().join("profile");
        let mut capabilities = serde_json::Map::new();
        capabilities.insert("browserName".into(), json!("chrome"));
        capabilities.insert(
            "goog:chromeOptions".into(),
            json!({
                "args": [
                    "--headless=new",
                    // Chromium's sandbox refuses to run as root.
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--window-size=1280,900",
                    format!("--user-data-dir={}", profile.display()),
                    // Nothing beyond loopback is needed: no component downloads in the background.
                    "--disable-component-update",
                ],
                // No password manager: it offers to save, and checks passwords online for leaks.
                "prefs": {
                    "credentials_enable_service": false,
                    "profile.password_manager_enabled": false,
                    "profile.password_manager_leak_detection": false,
                },
            }),
        );
        let url = format!("http://127.0.0.1:{}", driver.port);
        let mut builder = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new());
        let session = builder.capabilities(capabilities).connect(&url);
        let client = match tokio::time::timeout(SESSION_TIMEOUT, session).await {
            Ok(Ok(client)) => client,
            Ok(Err(e)) => panic!("chromedriver could not start Chromium: {e}\n{}", log_tail(&dir.path().join("chromedriver.log"))),
            Err(_) => panic!("Chromium did not start in {SESSION_TIMEOUT:?}\n{}", log_tail(&dir.path().join("chromedriver.log"))),
        };
        // Waiting is done here by polling; no implicit waits inside WebDriver commands.
        client
            .update_timeouts(TimeoutConfiguration::new(Some(Duration::from_secs(30)), Some(PAGE_LOAD_TIMEOUT), Some(Duration::ZERO)))
            .await
            .unwrap();
        Browser { client, driver, dir }
    }

    /// Ends the session (Chromium quits); chromedriver is killed and the profile removed.
    pub async fn close(self) {
        let Browser { client, driver, dir } = self;
        match tokio::time::timeout(Duration::from_secs(30), client.close()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("browser: ending the session failed: {e}"),
            Err(_) => eprintln!("browser: ending the session timed out"),
        }
        drop(driver);
        drop(dir);
    }

    /// Loads `url` and waits for the page to load.
    pub async fn goto(&self, url: &str) {
        self.client.goto(url).await.unwrap_or_else(|e| page_load_error(url, e));
    }

    pub async fn current_url(&self) -> String {
        self.client.current_url().await.map(String::from).unwrap_or_else(|e| format!("(current URL unknown: {e})"))
    }

    pub async fn page_source(&self) -> String {
        self.client.source().await.unwrap_or_else(|e| panic!("browser: page source: {e}"))
    }

    /// Where the browser is, for panic messages.
    async fn whereabouts(&self) -> String {
        let title = self.client.title().await.unwrap_or_else(|e| format!("(unknown: {e})"));
        format!("at {} (title {title:?})", self.current_url().await)
    }

    /// The first element matching the CSS selector, waiting up to `FIND_TIMEOUT` for it.
    pub async fn find(&self, css: &str) -> Element {
        let deadline = Instant::now() + FIND_TIMEOUT;
        loop {
            let error = match self.client.find(Locator::Css(css)).await {
                Ok(element) => return element,
                Err(e) => e,
            };
            if error.is_invalid_selector() {
                panic!("browser: invalid CSS selector {css:?}: {error}");
            }
            if Instant::now() > deadline {
                panic!("browser: no element {css:?} after {FIND_TIMEOUT:?} {}: {error}", self.whereabouts().await);
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Runs `action` on the element until it works: the element may be replaced, covered or
    /// not yet interactable while the page settles.
    async fn with_element<T>(&self, css: &str, what: &str, mut action: impl AsyncFnMut(Element) -> Result<T, CmdError>) -> T {
        let deadline = Instant::now() + FIND_TIMEOUT;
        loop {
            let element = self.find(css).await;
            let error = match action(element).await {
                Ok(value) => return value,
                Err(e) => e,
            };
            let transient = error.is_stale_element_reference()
                || error.is_element_not_interactable()
                || error.is_invalid_element_state()
                || matches!(&error, CmdError::Standard(w) if w.error == fantoccini::error::ErrorStatus::ElementClickIntercepted);
            if !transient || Instant::now() > deadline {
                panic!("browser: cannot {what} {css:?} {}: {error}", self.whereabouts().await);
            }
            tokio::time::sleep(POLL).await;
        }
    }

    pub async fn click(&self, css: &str) {
        self.with_element(css, "click", async |e: Element| e.click().await).await
    }

    /// Clears the field, then types `text` into it.
    pub async fn fill(&self, css: &str, text: &str) {
        self.with_element(css, "fill", async |e: Element| {
            e.clear().await?;
            e.send_keys(text).await
        })
        .await
    }

    /// The element's rendered text.
    pub async fn text(&self, css: &str) -> String {
        self.with_element(css, "read the text of", async |e: Element| e.text().await).await
    }

    /// Polls until the element exists and its text contains `needle`; returns that text.
    pub async fn wait_for_text(&self, css: &str, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match self.client.find(Locator::Css(css)).await {
                Ok(element) => match element.text().await {
                    Ok(text) if text.contains(needle) => return text,
                    Ok(text) => format!("its text was {text:?}"),
                    Err(e) => format!("reading its text failed: {e}"),
                },
                Err(e) => format!("it was not found: {e}"),
            };
            if Instant::now() > deadline {
                panic!("browser: {css:?} did not contain {needle:?} within {timeout:?} {}; {last}", self.whereabouts().await);
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Polls until no element matches the CSS selector.
    pub async fn wait_gone(&self, css: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match self.client.find_all(Locator::Css(css)).await {
                Ok(found) if found.is_empty() => return,
                Ok(found) => format!("{} still there", found.len()),
                Err(e) => format!("looking failed: {e}"),
            };
            if Instant::now() > deadline {
                panic!("browser: {css:?} not gone within {timeout:?} {}: {last}", self.whereabouts().await);
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// A PNG of the viewport in target/console-screenshots/{name}.png, and in the directory
    /// `PGLEASE_SCREENSHOTS` names, if set. Returns the first path.
    pub async fn screenshot(&self, name: &str) -> PathBuf {
        let png = self.client.screenshot().await.unwrap_or_else(|e| panic!("browser: screenshot {name}: {e}"));
        let file = format!("{name}.png");
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/console-screenshots");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(&file);
        std::fs::write(&path, &png).unwrap_or_else(|e| panic!("browser: writing {}: {e}", path.display()));
        if let Some(extra) = std::env::var_os("PGLEASE_SCREENSHOTS").filter(|d| !d.is_empty()) {
            let extra = PathBuf::from(extra);
            std::fs::create_dir_all(&extra).unwrap();
            std::fs::write(extra.join(&file), &png).unwrap_or_else(|e| panic!("browser: writing {}: {e}", extra.join(&file).display()));
        }
        path
    }

    /// The current document's cookies, HttpOnly ones included: (name, value, http_only,
    /// secure, same_site), same_site being "Strict", "Lax" or "None" when the browser says.
    pub async fn cookies(&self) -> Vec<(String, String, bool, bool, Option<String>)> {
        let cookies = self.client.get_all_cookies().await.unwrap_or_else(|e| panic!("browser: cookies: {e}"));
        cookies
            .into_iter()
            .map(|c| {
                let same_site = c.same_site().map(|s| s.to_string());
                (c.name().to_owned(), c.value().to_owned(), c.http_only().unwrap_or(false), c.secure().unwrap_or(false), same_site)
            })
            .collect()
    }
}
