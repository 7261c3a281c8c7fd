//! Owner-only sessions through single sign-on, against a real OpenID provider
//! (`oidc-provider` from npm, installed by `tests/oidc/install.sh`; `.ci/run` runs it
//! before `cargo test`), driven by a small cookie-keeping HTTP client that follows
//! redirects and submits the provider's login form, as a browser would.

mod common;

use common::*;
use futures_util::{SinkExt, StreamExt};
use http::{header, Request, StatusCode};
use jobgate_harness::client::{client_tls, connect_tls, ws_connect, WsTarget};
use jobgate_harness::process::{free_port, wait_tcp};
use jobgate_harness::stack::Session;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

/// Where `tests/oidc/install.sh` puts the provider.
const OP_HOME: &str = "/opt/jobgate-e2e/oidc";
/// The relay's client id and secret at the test provider.
const CLIENT_ID: &str = "jobgate-relay";
const CLIENT_SECRET: &str = "test-client-secret-not-for-production";
/// How long the provider has to start (node on a busy 2-core machine).
const OP_START: Duration = Duration::from_secs(60);
/// Most redirects one navigation follows.
const MAX_REDIRECTS: usize = 20;

/// The test provider, stopped on drop.
struct Op {
    proc: Proc,
    port: u16,
}

impl Op {
    fn issuer(&self) -> String {
        format!("https://localhost:{}", self.port)
    }
}

/// Starts the provider for `relay_port`'s login host (its redirect URI).
fn start_op(env: &TestEnv, relay_port: u16, port: u16) -> Op {
    let modules = Path::new(OP_HOME).join("node_modules");
    assert!(
        modules.join("oidc-provider/package.json").is_file(),
        "the test OpenID provider is not installed: run tests/oidc/install.sh (as root) first"
    );
    // ESM resolves packages from the script's own directory: give it one.
    let dir = env.dir.join("op");
    std::fs::create_dir_all(&dir).expect("op dir");
    let script = dir.join("op.mjs");
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/oidc/op.mjs"),
        &script,
    )
    .expect("copy op.mjs");
    let link = dir.join("node_modules");
    if !link.exists() {
        std::os::unix::fs::symlink(&modules, &link).expect("link node_modules");
    }
    let mut command = Command::new("node");
    command
        .arg(&script)
        .env("OP_PORT", port.to_string())
        .env("OP_CERT", &env.cert)
        .env("OP_KEY", &env.key)
        .env("OP_CLIENT_ID", CLIENT_ID)
        .env("OP_CLIENT_SECRET", CLIENT_SECRET)
        .env(
            "OP_REDIRECT_URI",
            format!("https://login.{DOMAIN}:{relay_port}/callback"),
        );
    let mut proc = Proc::start("op", command).unwrap_or_else(|e| panic!("starting node: {e}"));
    wait_tcp(port, OP_START)
        .unwrap_or_else(|e| panic!("the provider did not start: {e}\n{}", proc.stderr()));
    let _ = proc.child.try_wait();
    Op { proc, port }
}

/// A relay with sign-on through `op`, on `https_port`.
fn start_signon_relay(env: &TestEnv, https_port: u16, op_port: u16, extra: &[&str]) -> RelayProc {
    let secret = env.dir.join("client-secret");
    std::fs::write(&secret, CLIENT_SECRET).expect("secret");
    set_mode(&secret, 0o600);
    let issuer = format!("https://localhost:{op_port}");
    let ca = env.ca.to_string_lossy().into_owned();
    let secret = secret.to_string_lossy().into_owned();
    let mut args = vec![
        "--oidc-issuer",
        &issuer,
        "--oidc-client-id",
        CLIENT_ID,
        "--oidc-client-secret-file",
        &secret,
        "--oidc-ca",
        &ca,
    ];
    args.extend_from_slice(extra);
    start_relay_at(env, https_port, 0, &args)
}

/// A browser, as far as sign-on needs one: cookies per host, redirects followed.
struct Browser {
    tls: std::sync::Arc<rustls::ClientConfig>,
    cookies: HashMap<String, HashMap<String, String>>,
    /// Every URL requested, in order.
    visited: Vec<String>,
    /// Whether requests look like a browser's navigations (else: a script's).
    navigates: bool,
    /// Extra request headers (a script's `Authorization`).
    extra: Vec<(String, String)>,
}

/// Where a navigation ended.
struct Page {
    status: StatusCode,
    url: String,
    body: String,
    headers: http::HeaderMap,
}

fn split_url(url: &str) -> (String, u16, String) {
    let rest = url
        .strip_prefix("https://")
        .unwrap_or_else(|| panic!("not https: {url}"));
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let (host, port) = authority.rsplit_once(':').unwrap_or((authority, "443"));
    let path = if path.is_empty() { "/" } else { path };
    (
        host.to_owned(),
        port.parse().expect("port"),
        path.to_owned(),
    )
}

impl Browser {
    fn new(env: &TestEnv) -> Self {
        Self {
            tls: client_tls(&env.ca, &[b"http/1.1"]).unwrap_or_else(|e| panic!("{e}")),
            cookies: HashMap::new(),
            visited: Vec::new(),
            navigates: true,
            extra: Vec::new(),
        }
    }

    /// One request, no redirect followed; stores the cookies it sets.
    async fn send(&mut self, method: &str, url: &str, form: Option<String>) -> Page {
        let (host, port, path) = split_url(url);
        let tls = connect_tls(&self.tls, port, &host)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .expect("handshake");
        tokio::spawn(conn);
        self.visited.push(url.to_owned());
        let mut request = Request::builder()
            .method(method)
            .uri(&path)
            .header(header::HOST, format!("{host}:{port}"));
        if self.navigates {
            request = request
                .header(header::ACCEPT, "text/html")
                .header("sec-fetch-mode", "navigate")
                .header("sec-fetch-dest", "document")
                .header("sec-fetch-site", "none");
        }
        if method == "POST" {
            request = request.header(header::ORIGIN, format!("https://{host}:{port}"));
        }
        for (name, value) in &self.extra {
            request = request.header(name, value);
        }
        let jar = self.cookies.get(&host).cloned().unwrap_or_default();
        if !jar.is_empty() {
            let cookie: Vec<String> = jar.iter().map(|(k, v)| format!("{k}={v}")).collect();
            request = request.header(header::COOKIE, cookie.join("; "));
        }
        let body = match form {
            Some(form) => {
                request = request.header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
                full(form)
            }
            None => empty(),
        };
        let response = sender
            .send_request(request.body(body).expect("request"))
            .await
            .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
        let (status, headers, body) = collect(response).await;
        for set in headers.get_all(header::SET_COOKIE) {
            let set = set.to_str().expect("ascii cookie");
            assert!(
                !set.to_ascii_lowercase().contains("domain="),
                "a Domain cookie: {set}"
            );
            let (pair, attrs) = set.split_once(';').unwrap_or((set, ""));
            let (name, value) = pair.split_once('=').expect("cookie pair");
            let jar = self.cookies.entry(host.clone()).or_default();
            if value.is_empty() || attrs.contains("Max-Age=0") || attrs.contains("max-age=0") {
                jar.remove(name);
            } else {
                jar.insert(name.to_owned(), value.to_owned());
            }
        }
        Page {
            status,
            url: url.to_owned(),
            body: String::from_utf8_lossy(&body).into_owned(),
            headers,
        }
    }

    /// Navigates to `url`, following redirects; submits the provider's login form as
    /// `user` when it shows up.
    async fn open(&mut self, url: &str, user: &str) -> Page {
        let mut page = self.send("GET", url, None).await;
        for _ in 0..MAX_REDIRECTS {
            if let Some(location) = page.headers.get(header::LOCATION) {
                let location = location.to_str().expect("ascii location").to_owned();
                let next = absolute(&page.url, &location);
                page = self.send("GET", &next, None).await;
                continue;
            }
            if page.body.contains("document.forms[0].submit()") {
                // The provider's self-submitting form (it ends its previous session when
                // the account changes): post its hidden fields, as the page's script does.
                let action = quoted_after(&page.body, "action=\"")
                    .expect("form action")
                    .to_owned();
                let fields: Vec<String> = page
                    .body
                    .split("<input type=\"hidden\" name=\"")
                    .skip(1)
                    .filter_map(|rest| {
                        let (name, rest) = rest.split_once('"')?;
                        let value = rest.split("value=\"").nth(1)?.split('"').next()?;
                        Some(format!("{name}={value}"))
                    })
                    .collect();
                let target = absolute(&page.url, &action);
                page = self.send("POST", &target, Some(fields.join("&"))).await;
                continue;
            }
            if page.body.contains("data-jobgate-confirm") {
                let code = quoted_after(&page.body, "name=\"code\" value=\"")
                    .expect("code in the form")
                    .to_owned();
                let target = absolute(&page.url, "/device");
                page = self
                    .send("POST", &target, Some(format!("code={code}")))
                    .await;
                continue;
            }
            if page.body.contains("Test OP sign-in") {
                let action = quoted_after(&page.body, "action=\"")
                    .expect("form action")
                    .to_owned();
                let target = absolute(&page.url, &action);
                page = self
                    .send("POST", &target, Some(format!("login={user}")))
                    .await;
                continue;
            }
            return page;
        }
        panic!("too many redirects from {url}");
    }

    fn cookie(&self, host: &str, name: &str) -> Option<&String> {
        self.cookies.get(host)?.get(name)
    }
}

/// The demo app's label on a page it answered ("" for the relay's pages).
fn label(page: &Page) -> &str {
    page.headers
        .get("x-app-label")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
}

fn absolute(base: &str, location: &str) -> String {
    if location.starts_with("https://") {
        return location.to_owned();
    }
    let (host, port, _) = split_url(base);
    format!("https://{host}:{port}{location}")
}

struct Stack {
    env: TestEnv,
    op: Op,
    relay: RelayProc,
    /// alice's agent token and its file.
    alice: (String, PathBuf),
}

fn stack(name: &str, extra: &[&str]) -> Stack {
    let env = TestEnv::new(name);
    let relay_port = free_port().expect("port");
    let op_port = free_port().expect("port");
    let op = start_op(&env, relay_port, op_port);
    let relay = start_signon_relay(&env, relay_port, op_port, extra);
    let alice = env.issue_token("alice").unwrap_or_else(|e| panic!("{e}"));
    Stack {
        env,
        op,
        relay,
        alice,
    }
}

fn demo_agent(s: &Stack, flags: &[&str]) -> AgentProc {
    start_demo_agent_with(&s.env, &s.relay, &s.alice.1, "alice", flags)
}

#[tokio::test]
async fn the_owner_signs_in_others_get_403_until_shared_and_logout_ends_it() {
    let s = stack("signon-owner", &[]);
    // No --access: owner is the default on a relay with sign-on.
    let alice_job = demo_agent(&s, &[]);
    assert!(!alice_job.url.contains("jobgate_key"), "{}", alice_job.url);
    let page_url = format!("{}/echo?x=1", alice_job.base());

    let mut alice = Browser::new(&s.env);
    let page = alice.open(&page_url, "alice").await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.body);
    assert_eq!(label(&page), "alice");
    assert!(
        !page.body.contains("jobgate-sso"),
        "the pass reaches the app: {}",
        page.body
    );
    assert_eq!(page.url, page_url, "back at the exact path");
    let host = alice_job.host();
    assert!(alice.cookie(&host, "__Host-jobgate-sso").is_some());
    assert!(alice
        .cookie(&format!("login.{DOMAIN}"), "__Host-jobgate-login")
        .is_some());

    // The ticket that carried the login over is single use.
    let ticket = alice
        .visited
        .iter()
        .find(|u| u.contains("/__jobgate/ticket?t="))
        .expect("a ticket hop")
        .clone();
    let mut thief = Browser::new(&s.env);
    let page = thief.send("GET", &ticket, None).await;
    assert_eq!(page.status, StatusCode::BAD_REQUEST, "a replayed ticket");
    let forged = format!(
        "{}/__jobgate/ticket?t=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        alice_job.base()
    );
    assert_eq!(
        thief.send("GET", &forged, None).await.status,
        StatusCode::BAD_REQUEST
    );
    // A forged pass cookie is no pass.
    thief
        .cookies
        .entry(host.clone())
        .or_default()
        .insert("__Host-jobgate-sso".into(), "forged".into());
    assert_eq!(
        thief.send("GET", &page_url, None).await.status,
        StatusCode::SEE_OTHER
    );

    // bob signs in, but the session is alice's.
    let mut bob = Browser::new(&s.env);
    let page = bob.open(&page_url, "bob").await;
    assert_eq!(page.status, StatusCode::FORBIDDEN);
    assert!(
        page.body.contains("signed in as bob") && page.body.contains("belongs to alice"),
        "{}",
        page.body
    );
    assert!(page.body.contains("/__jobgate/logout"));

    // "Sign in as someone else": the provider asks again (its own session would have
    // signed bob straight back in), and the other account gets in.
    let mut switcher = Browser::new(&s.env);
    switcher.open(&page_url, "bob").await;
    let asked_before = switcher
        .visited
        .iter()
        .filter(|u| u.contains("/interaction/"))
        .count();
    let page = switcher
        .open(&format!("{}/__jobgate/switch", alice_job.base()), "alice")
        .await;
    assert_eq!(
        (page.status, label(&page)),
        (StatusCode::OK, "alice"),
        "{}",
        page.body
    );
    let asked = switcher
        .visited
        .iter()
        .filter(|u| u.contains("/interaction/"))
        .count();
    assert!(asked > asked_before, "the provider did not ask again");

    // Shared with bob by name, and with the physics group (carol).
    let shared_job = demo_agent(
        &s,
        &[
            "--access",
            "owner",
            "--share",
            "bob",
            "--share-group",
            "physics",
        ],
    );
    let page = bob
        .open(&format!("{}/echo", shared_job.base()), "bob")
        .await;
    assert_eq!((page.status, label(&page)), (StatusCode::OK, "alice"));
    let mut carol = Browser::new(&s.env);
    let page = carol
        .open(&format!("{}/echo", shared_job.base()), "carol")
        .await;
    assert_eq!((page.status, label(&page)), (StatusCode::OK, "alice"));

    // Logout on the job host ends the pass and the login, on the relay too: the old
    // cookie, sent again, is no pass.
    let old_pass = alice
        .cookie(&host, "__Host-jobgate-sso")
        .expect("pass")
        .clone();
    let page = alice
        .send(
            "GET",
            &format!("{}/__jobgate/logout", alice_job.base()),
            None,
        )
        .await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(alice.cookie(&host, "__Host-jobgate-sso").is_none());
    alice
        .cookies
        .entry(host.clone())
        .or_default()
        .insert("__Host-jobgate-sso".into(), old_pass.clone());
    let page = alice.send("GET", &page_url, None).await;
    assert_eq!(
        page.status,
        StatusCode::SEE_OTHER,
        "signed out: back to the login host"
    );
    let log = s.relay.proc.stderr();
    let ticket_secret = ticket.split("t=").nth(1).expect("ticket secret");
    for secret in [old_pass.as_str(), ticket_secret, CLIENT_SECRET] {
        assert!(!log.contains(secret), "a secret in the relay's log");
    }
}

#[tokio::test]
async fn the_owners_scripts_use_the_agent_token_and_nobody_elses() {
    let s = stack("signon-bearer", &[]);
    let job = demo_agent(&s, &[]);
    let url = format!("{}/echo", job.base());
    let mut script = Browser::new(&s.env);
    script.navigates = false;
    assert_eq!(
        script.send("GET", &url, None).await.status,
        StatusCode::UNAUTHORIZED
    );
    script.extra = vec![("authorization".into(), format!("Bearer {}", s.alice.0))];
    let page = script.send("GET", &url, None).await;
    assert_eq!((page.status, label(&page)), (StatusCode::OK, "alice"));
    assert!(
        !page.body.to_ascii_lowercase().contains("authorization"),
        "the token reaches the app: {}",
        page.body
    );
    let (bob_token, _) = s.env.issue_token("bob").unwrap_or_else(|e| panic!("{e}"));
    script.extra = vec![("authorization".into(), format!("Bearer {bob_token}"))];
    assert_eq!(
        script.send("GET", &url, None).await.status,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn bad_logins_are_refused_and_a_down_idp_stops_only_new_logins() {
    let mut s = stack("signon-faults", &[]);
    let job = demo_agent(&s, &[]);
    let login = format!("https://login.{DOMAIN}:{}", s.relay.https_port);
    let mut browser = Browser::new(&s.env);
    // Open redirects: only a session name and a plain path are accepted.
    for query in [
        "name=evil.example&path=/",
        "name=abcdefghijklmnop&path=//evil.example/",
        "name=abcdefghijklmnop&path=https://evil.example/",
        "name=abcdefghijklmnop&path=/%5Cevil.example",
    ] {
        let page = browser
            .send("GET", &format!("{login}/start?{query}"), None)
            .await;
        assert_eq!(page.status, StatusCode::BAD_REQUEST, "{query}");
        assert!(page.headers.get(header::LOCATION).is_none());
    }
    // A callback nobody started, and a state from another browser.
    let page = browser
        .send(
            "GET",
            &format!("{login}/callback?code=x&state=forged"),
            None,
        )
        .await;
    assert_eq!(page.status, StatusCode::BAD_REQUEST);
    let mut victim = Browser::new(&s.env);
    let start = victim
        .send(
            "GET",
            &format!(
                "{login}/start?name={}&path=/echo",
                job.host().split('.').next().expect("name")
            ),
            None,
        )
        .await;
    let idp_url = start.headers[header::LOCATION]
        .to_str()
        .expect("ascii")
        .to_owned();
    let state = idp_url
        .split("state=")
        .nth(1)
        .and_then(|v| v.split('&').next())
        .expect("state");
    let page = browser
        .send(
            "GET",
            &format!("{login}/callback?code=x&state={state}"),
            None,
        )
        .await;
    assert_eq!(
        page.status,
        StatusCode::BAD_REQUEST,
        "state bound to another browser"
    );
    assert!(page.body.contains("another browser"), "{}", page.body);

    // alice signs in; then the IdP goes away.
    let url = format!("{}/echo", job.base());
    let mut alice = Browser::new(&s.env);
    assert_eq!(alice.open(&url, "alice").await.status, StatusCode::OK);
    // A WebSocket opened with her pass, from her session's own origin.
    let pass = alice
        .cookie(&job.host(), "__Host-jobgate-sso")
        .expect("pass")
        .clone();
    let target = WsTarget::Relay {
        port: s.relay.https_port,
        tls: client_tls(&s.env.ca, &[b"http/1.1"]).unwrap_or_else(|e| panic!("{e}")),
        session: Session {
            host: job.host(),
            cookie: format!("__Host-jobgate-sso={pass}"),
        },
    };
    let mut ws = ws_connect(&target, "/ws")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let issuer = s.op.issuer();
    s.op.proc.signal(nix::sys::signal::Signal::SIGKILL);
    let _ = s.op.proc.wait_exit(Duration::from_secs(10));
    let mut late = Browser::new(&s.env);
    let page = late.open(&url, "alice").await;
    assert_eq!(page.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        page.body.contains(&issuer),
        "the page names the IdP: {}",
        page.body
    );
    let page = alice.open(&url, "alice").await;
    assert_eq!(
        (page.status, label(&page)),
        (StatusCode::OK, "alice"),
        "signed-in browsers go on"
    );
    ws.send(Message::Text("still here".into()))
        .await
        .expect("send on the live WebSocket");
    let echoed = tokio::time::timeout(Duration::from_secs(30), ws.next())
        .await
        .expect("an echo in time")
        .expect("the socket is open")
        .expect("a message");
    assert_eq!(
        echoed.into_text().expect("text"),
        "still here",
        "live WebSockets go on"
    );
}

#[tokio::test]
async fn a_relay_can_forbid_modes_and_link_sessions_still_work() {
    let s = stack("signon-allowed", &["--allowed-access", "owner"]);
    let bin = s.env.bin.to_string_lossy().into_owned();
    let url_file = s.env.dir.join("refused-url");
    let mut command = agent_command(&s.env, &s.relay, &s.alice.1, &url_file);
    command.args([
        "--access",
        "link",
        "--",
        &bin,
        "demo-app",
        "--listen",
        "127.0.0.1:{port}",
    ]);
    let refused = Proc::start("agent", command).unwrap_or_else(|e| panic!("{e}"));
    let text = refused.wait_for_stderr("does not allow link sessions", Duration::from_secs(30));
    assert!(text.contains("--access owner"), "{text}");
    refused.signal(nix::sys::signal::Signal::SIGTERM);
}

#[tokio::test]
async fn jobgate_login_gets_a_token_through_the_browser() {
    let s = stack("signon-login", &["--login-token-ttl", "2h"]);
    let token_file = s.env.dir.join("home/.config/jobgate/token");
    let mut command = Command::new(&s.env.bin);
    command
        .args([
            "login",
            "--relay",
            &format!("localhost:{}", s.relay.https_port),
            "--relay-ca",
        ])
        .arg(&s.env.ca)
        .arg("--token-file")
        .arg(&token_file);
    let mut login = Proc::start("login", command).unwrap_or_else(|e| panic!("{e}"));
    let (_, line) = login
        .wait_line("/device?code=", Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}"));
    let url = line.trim().to_owned();
    let code = url.split("code=").nth(1).expect("code").to_owned();
    login
        .wait_line(&format!("shows the code {code}"), Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}"));

    // A code nobody started is refused; bob (who has no token yet) confirms his own.
    let mut browser = Browser::new(&s.env);
    let login_host = format!("https://login.{DOMAIN}:{}", s.relay.https_port);
    let page = browser
        .send("GET", &format!("{login_host}/device?code=ZZZZ-ZZZZ"), None)
        .await;
    assert_eq!(page.status, StatusCode::NOT_FOUND);
    let page = browser.open(&url, "bob").await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.body);
    assert!(page.body.contains("token for bob"), "{}", page.body);
    assert_eq!(
        login.wait_exit(Duration::from_secs(60)),
        0,
        "{}",
        login.stderr()
    );

    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&token_file)
        .expect("token file")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let token = std::fs::read_to_string(&token_file).expect("token");
    assert!(
        !login.stderr().contains(token.trim()),
        "the token is never printed"
    );

    // The token opens bob's sessions, beside alice's admin-issued token.
    let bin = s.env.bin.to_string_lossy().into_owned();
    let job = start_agent(
        &s.env,
        &s.relay,
        &token_file,
        &demo_app_command(&bin, "bob"),
    );
    let page = browser.open(&format!("{}/echo", job.base()), "bob").await;
    assert_eq!((page.status, label(&page)), (StatusCode::OK, "bob"));
    let list = Command::new(&s.env.bin)
        .args(["token", "list", "--tokens"])
        .arg(&s.env.tokens)
        .output()
        .expect("token list");
    let list = String::from_utf8_lossy(&list.stdout);
    assert!(list.contains("bob origin=login expires="), "{list}");
    assert!(list.lines().any(|l| l == "alice"), "{list}");
    assert!(
        !s.relay.proc.stderr().contains(token.trim()),
        "the token in the relay's log"
    );
}

#[tokio::test]
async fn an_idp_that_is_not_the_configured_issuer_starts_no_login() {
    // The provider calls itself https://localhost:PORT; this relay expects 127.0.0.1.
    let env = TestEnv::new("signon-issuer");
    let relay_port = free_port().expect("port");
    let op_port = free_port().expect("port");
    let _op = start_op(&env, relay_port, op_port);
    let secret = env.dir.join("client-secret");
    std::fs::write(&secret, CLIENT_SECRET).expect("secret");
    let issuer = format!("https://127.0.0.1:{op_port}");
    let (ca, secret) = (
        env.ca.to_string_lossy().into_owned(),
        secret.to_string_lossy().into_owned(),
    );
    let relay = start_relay_at(
        &env,
        relay_port,
        0,
        &[
            "--oidc-issuer",
            &issuer,
            "--oidc-client-id",
            CLIENT_ID,
            "--oidc-client-secret-file",
            &secret,
            "--oidc-ca",
            &ca,
        ],
    );
    let alice = env.issue_token("alice").unwrap_or_else(|e| panic!("{e}"));
    let bin = env.bin.to_string_lossy().into_owned();
    let job = start_agent(
        &env,
        &relay,
        &alice.1,
        &["--", &bin, "demo-app", "--listen", "127.0.0.1:{port}"],
    );
    let mut browser = Browser::new(&env);
    let page = browser.open(&format!("{}/echo", job.base()), "alice").await;
    assert_eq!(
        page.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        page.body
    );
    assert!(page.body.contains(&issuer), "{}", page.body);
    let logged = relay.proc.stderr();
    assert!(
        !logged.contains(CLIENT_SECRET),
        "the client secret in the log"
    );
}

/// The text after the first `marker` in `body`, up to the next double quote (an HTML
/// attribute's value, where `marker` ends with its opening quote).
fn quoted_after<'a>(body: &'a str, marker: &str) -> Option<&'a str> {
    body.split(marker).nth(1)?.split('"').next()
}

#[tokio::test]
async fn a_reservation_without_a_mode_is_guarded_as_the_relays_default_owner_sessions() {
    use jobgate_agent::dial::{reserve, DialConfig, TransportChoice};
    let s = stack("signon-reserve", &[]);
    let config = DialConfig {
        transport: TransportChoice::Quic,
        ..DialConfig::new(
            format!("127.0.0.1:{}", s.relay.quic_port),
            Some(s.env.ca.clone()),
        )
    };
    let token = jobgate_protocol::Token(s.alice.0.clone());
    // `jobgate launch` names no mode unless the user's config does: the relay's default
    // (owner, with sign-on) guards the URL handed out at submit time.
    let owner = reserve(&config, token.clone(), None, "7001")
        .await
        .expect("reserved");
    assert!(
        !owner.access_url.contains("jobgate_key"),
        "an owner reservation carries no link key: {}",
        owner.access_url
    );
    let link = reserve(
        &config,
        token,
        Some(jobgate_protocol::AccessMode::Link),
        "7002",
    )
    .await
    .expect("reserved");
    assert!(
        link.access_url.contains("jobgate_key="),
        "{}",
        link.access_url
    );

    // Before the job runs, the owner reservation's page is behind the owner's sign-on.
    let mut alice = Browser::new(&s.env);
    let page = alice.open(&owner.url, "alice").await;
    assert_eq!(
        page.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        page.body
    );
    assert!(page.body.contains("batch job 7001"), "{}", page.body);
    let mut bob = Browser::new(&s.env);
    let page = bob.open(&owner.url, "bob").await;
    assert_eq!(page.status, StatusCode::FORBIDDEN, "{}", page.body);
    assert!(!page.body.contains("7001"), "{}", page.body);
}

#[tokio::test]
async fn my_sessions_lists_the_signed_in_users_sessions_and_nobody_elses() {
    use jobgate_agent::dial::{reserve, DialConfig, TransportChoice};
    let s = stack("signon-mine", &[]);
    let owner_job = demo_agent(&s, &[]);
    let link_job = demo_agent(&s, &["--access", "link"]);
    let config = DialConfig {
        transport: TransportChoice::Quic,
        ..DialConfig::new(
            format!("127.0.0.1:{}", s.relay.quic_port),
            Some(s.env.ca.clone()),
        )
    };
    let queued = reserve(
        &config,
        jobgate_protocol::Token(s.alice.0.clone()),
        None,
        "31337",
    )
    .await
    .expect("reserved");
    let home = format!("https://login.{DOMAIN}:{}/", s.relay.https_port);

    // Not signed in yet: the site's sign-in first, then back on the list.
    let mut alice = Browser::new(&s.env);
    let page = alice.open(&home, "alice").await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.body);
    assert!(
        page.url.starts_with(&home),
        "ends on the list: {}",
        page.url
    );
    assert!(
        page.body.contains("Your sessions") && page.body.contains("alice"),
        "{}",
        page.body
    );
    let owner_name = owner_job
        .host()
        .split('.')
        .next()
        .unwrap_or_default()
        .to_owned();
    let link_name = link_job
        .host()
        .split('.')
        .next()
        .unwrap_or_default()
        .to_owned();
    for name in [&owner_name, &link_name, &queued.name] {
        assert!(
            page.body.contains(name.as_str()),
            "{name} missing: {}",
            page.body
        );
    }
    // Owner sessions are linked (the sign-on opens them); a link session's key is only
    // stored hashed, so its row says where to find the private link.
    assert!(
        page.body.contains(&format!("href=\"{}", owner_job.base())),
        "{}",
        page.body
    );
    assert!(!page.body.contains("jobgate_key"), "{}", page.body);
    assert!(page.body.contains("jobgate jobs"), "{}", page.body);
    assert!(
        page.body.contains("queued") && page.body.contains("31337"),
        "{}",
        page.body
    );

    // Another user sees none of it.
    let mut bob = Browser::new(&s.env);
    let page = bob.open(&home, "bob").await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.body);
    assert!(page.body.contains("no sessions"), "{}", page.body);
    for name in [&owner_name, &link_name, &queued.name] {
        assert!(!page.body.contains(name.as_str()), "bob sees {name}");
    }
}
