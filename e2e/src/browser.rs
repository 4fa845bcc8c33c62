//! A headless Chromium driven over WebDriver for the web UI's browser tests.
//!
//! [`Browser::start`] runs Debian's `chromedriver` on a free loopback port in its own
//! process group, opens a session on `/usr/bin/chromium` with a fresh profile in a temp
//! dir, and wraps the async WebDriver client in blocking helpers. Dropping it closes the
//! session and kills the driver's whole process group (so no Chromium is left behind).

use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::{Value, json};

use crate::skip_unless;

/// The Chromium binary (Debian package `chromium`).
pub const CHROMIUM: &str = "/usr/bin/chromium";
/// The WebDriver server (Debian package `chromium-driver`).
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// Chromium's flags: headless, no sandbox (we run as root), and nothing that reaches
/// out to the network on its own.
const CHROMIUM_FLAGS: &[&str] = &[
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--disable-crash-reporter",
    "--disable-breakpad",
    "--window-size=1280,900",
];

/// Whether a browser test can run: `chromium` and `chromedriver` are installed; prints
/// the SKIP line when not.
pub fn browser_ok(test: &str) -> bool {
    !(skip_unless(
        Path::new(CHROMIUM).exists(),
        test,
        "chromium not installed (apt-get install chromium)",
    ) || skip_unless(
        Path::new(CHROMEDRIVER).exists(),
        test,
        "chromedriver not installed (apt-get install chromium-driver)",
    ))
}

/// Where screenshots and page dumps go: `$STEAD_TEST_OUT/<test>`, or
/// `target/ui-screenshots/<test>` next to the test executable.
pub fn output_dir(test: &str) -> PathBuf {
    let base = match std::env::var_os("STEAD_TEST_OUT") {
        Some(p) => PathBuf::from(p),
        None => {
            let exe = std::env::current_exe().expect("current_exe");
            // target/debug/deps/<test>-hash -> target/ui-screenshots
            exe.ancestors()
                .nth(3)
                .map(|t| t.join("ui-screenshots"))
                .unwrap_or_else(|| std::env::temp_dir().join("ui-screenshots"))
        }
    };
    let dir = base.join(test);
    std::fs::create_dir_all(&dir).expect("create screenshot dir");
    dir
}

/// A free loopback port (bound once, then released).
fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// A headless Chromium session; see the module docs.
pub struct Browser {
    rt: tokio::runtime::Runtime,
    client: Option<Client>,
    driver: Child,
    _profile: tempfile::TempDir,
    out: PathBuf,
}

impl Browser {
    /// Starts chromedriver and a Chromium session; screenshots of `test` go to
    /// [`output_dir`]. `None` (after the SKIP line) when Chromium is not installed.
    pub fn start(test: &str) -> Option<Browser> {
        if !browser_ok(test) {
            return None;
        }
        let out = output_dir(test);
        let profile = tempfile::Builder::new()
            .prefix("stead-chromium-")
            .tempdir()
            .expect("profile dir");
        let port = free_port();
        let log = std::fs::File::create(out.join("chromedriver.log")).expect("driver log");
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .process_group(0)
            .spawn()
            .expect("spawn chromedriver");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        let mut b = Browser {
            rt,
            client: None,
            driver,
            _profile: profile,
            out,
        };
        b.wait_driver(port);
        b.client = Some(b.connect(port));
        Some(b)
    }

    /// Waits up to 10 s for chromedriver to accept connections.
    fn wait_driver(&mut self, port: u16) {
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(st)) = self.driver.try_wait() {
                panic!("chromedriver exited: {st}");
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "chromedriver did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// A WebDriver session on Chromium with [`CHROMIUM_FLAGS`] and the fresh profile.
    fn connect(&self, port: u16) -> Client {
        let mut args: Vec<String> = CHROMIUM_FLAGS.iter().map(|s| s.to_string()).collect();
        args.push(format!(
            "--user-data-dir={}",
            self._profile.path().display()
        ));
        let caps = json!({
            "browserName": "chrome",
            "goog:chromeOptions": { "binary": CHROMIUM, "args": args },
        });
        let Value::Object(caps) = caps else {
            unreachable!("json object")
        };
        let url = format!("http://127.0.0.1:{port}");
        self.rt
            .block_on(async {
                ClientBuilder::new(HttpConnector::new())
                    .capabilities(caps)
                    .connect(&url)
                    .await
            })
            .expect("webdriver session")
    }

    fn client(&self) -> &Client {
        self.client.as_ref().expect("session open")
    }

    /// The directory screenshots go to.
    pub fn out_dir(&self) -> &Path {
        &self.out
    }

    /// Navigates to `url` and waits for the page to load.
    pub fn goto(&self, url: &str) {
        self.rt
            .block_on(self.client().goto(url))
            .unwrap_or_else(|e| panic!("goto {url}: {e}"));
    }

    /// The current URL.
    pub fn url(&self) -> String {
        self.rt
            .block_on(self.client().current_url())
            .map(|u| u.to_string())
            .unwrap_or_default()
    }

    /// The text of the first element matching `css`, `None` if there is none.
    pub fn text(&self, css: &str) -> Option<String> {
        self.rt.block_on(async {
            let el = self.client().find(Locator::Css(css)).await.ok()?;
            el.text().await.ok()
        })
    }

    /// The texts of all elements matching `css`.
    pub fn texts(&self, css: &str) -> Vec<String> {
        self.rt.block_on(async {
            let mut out = Vec::new();
            if let Ok(els) = self.client().find_all(Locator::Css(css)).await {
                for el in els {
                    out.push(el.text().await.unwrap_or_default());
                }
            }
            out
        })
    }

    /// An attribute of the first element matching `css`.
    pub fn attr(&self, css: &str, name: &str) -> Option<String> {
        self.rt.block_on(async {
            let el = self.client().find(Locator::Css(css)).await.ok()?;
            el.attr(name).await.ok().flatten()
        })
    }

    /// Polls `f` every 50 ms until it is true or `timeout` passes; the time it took.
    pub fn wait(&self, timeout: Duration, mut f: impl FnMut(&Browser) -> bool) -> Option<Duration> {
        let start = Instant::now();
        loop {
            if f(self) {
                return Some(start.elapsed());
            }
            if start.elapsed() > timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until an element matches `css`; panics with the page source otherwise.
    pub fn wait_css(&self, css: &str, timeout: Duration) {
        if self.wait(timeout, |b| b.text(css).is_some()).is_none() {
            panic!(
                "no element {css} after {timeout:?} on {}\n{}",
                self.url(),
                self.source()
            );
        }
    }

    /// Waits until the element `css` contains `text`; the time it took, or a panic with
    /// the page source.
    pub fn wait_text(&self, css: &str, text: &str, timeout: Duration) -> Duration {
        self.wait(timeout, |b| b.text(css).is_some_and(|t| t.contains(text)))
            .unwrap_or_else(|| {
                panic!(
                    "{css} never contained {text:?} after {timeout:?} on {} (it reads {:?})\n{}",
                    self.url(),
                    self.text(css),
                    self.source()
                )
            })
    }

    /// Clicks the first element matching `css` (found again if a live update replaced
    /// it between the lookup and the click).
    pub fn click(&self, css: &str) {
        let mut tries = 0;
        loop {
            let r = self.rt.block_on(async {
                let el = self.client().find(Locator::Css(css)).await?;
                el.click().await
            });
            match r {
                Ok(()) => return,
                Err(e) if tries >= 20 => panic!("click {css}: {e}\n{}", self.source()),
                Err(_) => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    /// Types `text` into the first element matching `css`.
    pub fn type_into(&self, css: &str, text: &str) {
        self.rt
            .block_on(async {
                let el = self.client().find(Locator::Css(css)).await?;
                el.send_keys(text).await
            })
            .unwrap_or_else(|e| panic!("type into {css}: {e}"));
    }

    /// Accepts the open `confirm` (or `alert`) dialog, waiting up to 5 s for it.
    pub fn accept_alert(&self) {
        let start = Instant::now();
        loop {
            match self.rt.block_on(self.client().accept_alert()) {
                Ok(()) => return,
                Err(e) if start.elapsed() > Duration::from_secs(5) => {
                    panic!("no dialog to accept: {e}")
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// Runs `script` (a function body; `arguments` holds `args`) and returns its result.
    pub fn js(&self, script: &str, args: Vec<Value>) -> Value {
        self.rt
            .block_on(self.client().execute(script, args))
            .unwrap_or_else(|e| panic!("script failed: {e}\n{script}"))
    }

    /// Runs an async `script` whose last argument is the callback to call with the result.
    pub fn js_async(&self, script: &str, args: Vec<Value>) -> Value {
        self.rt
            .block_on(self.client().execute_async(script, args))
            .unwrap_or_else(|e| panic!("async script failed: {e}\n{script}"))
    }

    /// The page's HTML.
    pub fn source(&self) -> String {
        self.rt.block_on(self.client().source()).unwrap_or_default()
    }

    /// Saves a PNG of the viewport as `<out_dir>/<name>.png`; returns its path.
    pub fn screenshot(&self, name: &str) -> PathBuf {
        let png = self
            .rt
            .block_on(self.client().screenshot())
            .unwrap_or_else(|e| panic!("screenshot {name}: {e}"));
        let path = self.out.join(format!("{name}.png"));
        std::fs::write(&path, png).expect("write screenshot");
        path
    }

    /// Resizes the window (for screenshots of long pages).
    pub fn window_size(&self, width: u32, height: u32) {
        self.rt
            .block_on(self.client().set_window_size(width, height))
            .unwrap_or_else(|e| panic!("window size: {e}"));
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Some(c) = self.client.take() {
            let _ = self
                .rt
                .block_on(async { tokio::time::timeout(Duration::from_secs(5), c.close()).await });
        }
        // chromedriver leads its own process group; Chromium and its helpers are in it.
        if let Some(pgid) = rustix::process::Pid::from_raw(self.driver.id() as i32) {
            let _ = rustix::process::kill_process_group(pgid, rustix::process::Signal::KILL);
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
