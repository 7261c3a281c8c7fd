//! The bad-input battery at the relay's HTTPS front door (DESIGN.md invariants 4 and 6,
//! issue 4 "Hardening"): slowloris, oversized heads, request-smuggling shapes over raw
//! TLS, and a flood of unknown names. Every test runs against the real relay binary and
//! asserts two things: the bad input gets a clear error (a 4xx or a closed connection,
//! never a hang, never a forwarded ambiguous request), and a well-behaved session on the
//! same relay kept serving throughout.

mod common;

use common::*;
use http::{Request, StatusCode};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// A relay with one well-behaved session whose demo app is labelled `good`.
/// Fields drop in order: the agent, then the relay, then the scratch directory.
struct Fixture {
    good: AgentProc,
    relay: RelayProc,
    env: TestEnv,
}

fn fixture(name: &str, relay_args: &[&str]) -> Fixture {
    let env = TestEnv::new(&format!("hard-{name}"));
    let token = env.token_file("alice");
    let relay = start_relay(&env, relay_args);
    let good = start_demo_agent(&env, &relay, &token, "good");
    Fixture { good, relay, env }
}

/// The well-behaved session on this fixture's relay still answers correctly.
async fn assert_serves(fx: &Fixture, context: &str) {
    common::assert_serves(&fx.env, fx.relay.https_port, &fx.good, context).await
}

/// What came back on a raw connection.
struct Raw {
    bytes: Vec<u8>,
    /// The relay closed the connection (EOF or an error), as opposed to leaving it open.
    closed: bool,
}

impl Raw {
    /// Status codes of every response in the bytes (`HTTP/1.x NNN` at a response start).
    fn statuses(&self) -> Vec<u16> {
        let text = String::from_utf8_lossy(&self.bytes);
        let mut out = Vec::new();
        let mut rest = text.as_ref();
        while let Some(at) = rest.find("HTTP/1.") {
            let line = &rest[at..];
            if let Some(code) = line.get(9..12).and_then(|c| c.parse().ok()) {
                out.push(code);
            }
            rest = &rest[at + 7..];
        }
        out
    }

    fn summary(&self) -> String {
        let text = String::from_utf8_lossy(&self.bytes);
        let shown: String = text.chars().take(600).collect();
        format!(
            "statuses {:?}, connection {}, {} bytes back:\n{shown}",
            self.statuses(),
            if self.closed { "closed" } else { "left open" },
            self.bytes.len()
        )
    }
}

/// Reads everything the peer sends until it closes the connection or `wait` passes.
async fn read_all<R: AsyncRead + Unpin>(reader: &mut R, wait: Duration) -> Raw {
    let deadline = tokio::time::Instant::now() + wait;
    let mut bytes = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match tokio::time::timeout_at(deadline, reader.read(&mut buf)).await {
            Err(_) => {
                return Raw {
                    bytes,
                    closed: false,
                }
            }
            Ok(Ok(0)) | Ok(Err(_)) => {
                return Raw {
                    bytes,
                    closed: true,
                }
            }
            Ok(Ok(n)) => bytes.extend_from_slice(&buf[..n]),
        }
    }
}

/// Writes `request` on a fresh HTTP/1.1 TLS connection to the good session's host and
/// collects what comes back within `wait`. Write errors are ignored: the relay may close
/// while a big request is still being sent, which is a fine answer.
async fn raw_exchange(fx: &Fixture, request: Vec<u8>, wait: Duration) -> Raw {
    let tls = tls_connect(
        &fx.env,
        fx.relay.https_port,
        &fx.good.host(),
        &[b"http/1.1"],
    )
    .await;
    let (mut reader, mut writer) = tokio::io::split(tls);
    // Keep the write half open (no shutdown): the relay must decide on its own.
    let write = tokio::spawn(async move {
        let _ = writer.write_all(&request).await;
        let _ = writer.flush().await;
        writer
    });
    let raw = read_all(&mut reader, wait).await;
    write.abort();
    raw
}

fn marker() -> String {
    format!("smuggled{:016x}", rand::random::<u64>())
}

/// A complete, innocent-looking request that an attacker hides behind an ambiguous one.
fn smuggled_request(fx: &Fixture, marker: &str) -> String {
    format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\n\r\n",
        fx.good.path(&format!("/echo?{marker}=1")),
        fx.good.host()
    )
}

/// Sends an ambiguous request (built by `build` from the good session's echo target, its
/// host and the smuggled request to hide) and asserts the relay refuses it: its only
/// answer is one of `accepted` (or none), the connection is closed, the hidden request
/// was never executed, and the good session serves untouched afterwards.
async fn assert_rejected(name: &str, accepted: &[u16], build: impl Fn(&str, &str, &str) -> String) {
    let fx = fixture(name, &[]);
    assert_serves(&fx, "before the attack").await;
    let marker = marker();
    let request = build(
        &fx.good.path("/echo"),
        &fx.good.host(),
        &smuggled_request(&fx, &marker),
    );
    let raw = raw_exchange(&fx, request.into_bytes(), Duration::from_secs(5)).await;
    let executed = String::from_utf8_lossy(&raw.bytes).contains(&marker);
    let statuses = raw.statuses();
    assert!(
        statuses.len() <= 1 && statuses.iter().all(|s| accepted.contains(s)) && !executed,
        "{name}: expected only one of {accepted:?} (or no answer); got {}{}",
        if executed {
            "the hidden request reached the app; "
        } else {
            ""
        },
        raw.summary()
    );
    assert!(
        raw.closed,
        "{name}: the relay kept the connection open after an unparseable request: {}",
        raw.summary()
    );
    // Several fresh requests: none may find a poisoned connection behind the relay.
    for i in 0..3 {
        assert_serves(&fx, &format!("{name}: follow-up {i}")).await;
    }
}

// --- Request smuggling shapes (raw bytes over TLS) -------------------------------------

/// The ambiguous body: a chunked body that ends at once, then the hidden request. With
/// `Content-Length` covering all of it, a reader that trusts the length sees one request;
/// a reader that trusts `chunked` sees two.
fn chunked_then(hidden: &str) -> String {
    format!("0\r\n\r\n{hidden}")
}

// With both Content-Length and Transfer-Encoding, RFC 9112 §6.3 lets a server either
// reject the request or read it as chunked and close the connection after answering.
// hyper (under the relay) does the latter and drops Content-Length before the relay sees
// it; the app gets an unambiguous chunked request. What must hold: one answer at most,
// the connection closed, the hidden request never executed.
#[tokio::test]
async fn content_length_with_transfer_encoding_never_smuggles() {
    assert_rejected("cl-te", &[400, 200], |target, host, hidden| {
        let body = chunked_then(hidden);
        format!(
            "POST {target} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {}\r\n\
             Transfer-Encoding: chunked\r\n\r\n{body}",
            body.len()
        )
    })
    .await;
}

#[tokio::test]
async fn transfer_encoding_with_content_length_never_smuggles() {
    assert_rejected("te-cl", &[400, 200], |target, host, hidden| {
        let body = chunked_then(hidden);
        format!(
            "POST {target} HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
    })
    .await;
}

#[tokio::test]
async fn conflicting_content_lengths_are_rejected() {
    assert_rejected("cl-cl", &[400], |target, host, hidden| {
        format!(
            "POST {target} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\n\
             Content-Length: {}\r\n\r\n{hidden}",
            hidden.len()
        )
    })
    .await;
}

#[tokio::test]
async fn conflicting_content_length_list_is_rejected() {
    assert_rejected("cl-list", &[400], |target, host, hidden| {
        format!(
            "POST {target} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0, {}\r\n\r\n{hidden}",
            hidden.len()
        )
    })
    .await;
}

#[tokio::test]
async fn obs_fold_header_is_rejected() {
    assert_rejected("obs-fold", &[400], |target, host, hidden| {
        format!(
            "POST {target} HTTP/1.1\r\nHost: {host}\r\nX-Folded: first\r\n  second\r\n\
             Content-Length: 0\r\n\r\n{hidden}"
        )
    })
    .await;
}

#[tokio::test]
async fn obs_folded_transfer_encoding_is_rejected() {
    assert_rejected("obs-fold-te", &[400], |target, host, hidden| {
        let body = chunked_then(hidden);
        format!(
            "POST {target} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {}\r\n\
             Transfer-Encoding:\r\n chunked\r\n\r\n{body}",
            body.len()
        )
    })
    .await;
}

#[tokio::test]
async fn space_before_colon_in_header_name_is_rejected() {
    assert_rejected("space-colon", &[400], |target, host, hidden| {
        let body = chunked_then(hidden);
        format!(
            "POST {target} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {}\r\n\
             Transfer-Encoding : chunked\r\n\r\n{body}",
            body.len()
        )
    })
    .await;
}

#[tokio::test]
async fn invalid_header_name_bytes_are_rejected() {
    for (i, bad) in [
        "X-Bad\x01Name: 1",
        "X Bad: 1",
        "X-Bad(): 1",
        "X-\u{e9}: 1",
        ": empty",
    ]
    .iter()
    .enumerate()
    {
        assert_rejected(&format!("bad-name-{i}"), &[400], |target, host, hidden| {
            format!(
                "POST {target} HTTP/1.1\r\nHost: {host}\r\n{bad}\r\nContent-Length: 0\r\n\r\n\
                 {hidden}"
            )
        })
        .await;
    }
}

#[tokio::test]
async fn invalid_header_value_bytes_are_rejected() {
    for (i, bad) in ["X-Nul: a\x00b", "X-Cr: a\rb", "X-Esc: a\x1bb"]
        .iter()
        .enumerate()
    {
        assert_rejected(&format!("bad-value-{i}"), &[400], |target, host, hidden| {
            format!(
                "POST {target} HTTP/1.1\r\nHost: {host}\r\n{bad}\r\nContent-Length: 0\r\n\r\n\
                 {hidden}"
            )
        })
        .await;
    }
}

#[tokio::test]
async fn transfer_coding_other_than_chunked_is_rejected() {
    assert_rejected("te-gzip-chunked", &[400, 501], |target, host, hidden| {
        format!(
            "POST {target} HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: gzip, chunked\r\n\r\n{}",
            chunked_then(hidden)
        )
    })
    .await;
}

#[tokio::test]
async fn chunked_not_last_is_rejected() {
    assert_rejected(
        "te-chunked-identity",
        &[400, 501],
        |target, host, hidden| {
            let body = chunked_then(hidden);
            format!(
            "POST {target} HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked, identity\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
        },
    )
    .await;
}

#[tokio::test]
async fn chunked_twice_is_rejected() {
    assert_rejected("te-te", &[400, 501], |target, host, hidden| {
        format!(
            "POST {target} HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\
             Transfer-Encoding: chunked\r\n\r\n{}",
            chunked_then(hidden)
        )
    })
    .await;
}

#[tokio::test]
async fn obfuscated_transfer_encoding_is_rejected() {
    assert_rejected("te-xchunked", &[400, 501], |target, host, hidden| {
        let body = chunked_then(hidden);
        format!(
            "POST {target} HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: xchunked\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
    })
    .await;
}

#[tokio::test]
async fn two_host_headers_are_rejected() {
    assert_rejected("host-host", &[400], |target, host, hidden| {
        format!(
            "POST {target} HTTP/1.1\r\nHost: {host}\r\nHost: other.{DOMAIN}\r\n\
             Content-Length: 0\r\n\r\n{hidden}"
        )
    })
    .await;
}

#[tokio::test]
async fn missing_host_is_rejected() {
    // Not ambiguous framing, so the connection may stay open: only the 400 is required.
    let fx = fixture("no-host", &[]);
    let request = format!("GET {} HTTP/1.1\r\n\r\n", fx.good.path("/echo"));
    let raw = raw_exchange(&fx, request.into_bytes(), Duration::from_secs(2)).await;
    assert_eq!(raw.statuses(), [400], "{}", raw.summary());
    assert_serves(&fx, "after a request without Host").await;
}

#[tokio::test]
async fn over_long_request_line_is_rejected() {
    // 100 KiB of target: beyond the 64 KiB head limit, so it is never forwarded.
    assert_rejected("long-line", &[400, 414, 431], |target, host, hidden| {
        let sep = if target.contains('?') { '&' } else { '?' };
        format!(
            "GET {target}{sep}pad={} HTTP/1.1\r\nHost: {host}\r\n\r\n{hidden}",
            "a".repeat(100 * 1024)
        )
    })
    .await;
}

// --- Oversized heads --------------------------------------------------------------------

#[tokio::test]
async fn one_megabyte_header_gets_431_or_a_closed_connection_not_a_hang() {
    let fx = fixture("1mb-header", &[]);
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nX-Big: {}\r\n\r\n",
        fx.good.path("/echo"),
        fx.good.host(),
        "a".repeat(1024 * 1024)
    );
    let started = Instant::now();
    let raw = raw_exchange(&fx, request.into_bytes(), Duration::from_secs(10)).await;
    assert!(
        raw.closed,
        "the relay neither answered nor closed within 10 s: {}",
        raw.summary()
    );
    let statuses = raw.statuses();
    assert!(
        statuses.is_empty() || statuses == [431],
        "expected 431 or no answer: {}",
        raw.summary()
    );
    eprintln!(
        "1 MiB header: {} after {:?}",
        raw.summary().lines().next().unwrap_or(""),
        started.elapsed()
    );
    assert_serves(&fx, "after the 1 MiB header").await;
}

#[tokio::test]
async fn too_many_header_fields_get_431() {
    let fx = fixture("many-headers", &[]);
    let fields: String = (0..500).map(|i| format!("X-H{i}: v\r\n")).collect();
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\n{fields}\r\n",
        fx.good.path("/echo"),
        fx.good.host()
    );
    let raw = raw_exchange(&fx, request.into_bytes(), Duration::from_secs(10)).await;
    assert!(raw.closed, "no close within 10 s: {}", raw.summary());
    let statuses = raw.statuses();
    assert!(
        statuses.is_empty() || statuses == [431],
        "expected 431 or no answer: {}",
        raw.summary()
    );
    assert_serves(&fx, "after 500 header fields").await;
}

// --- Slowloris ----------------------------------------------------------------------------

/// The relay's header read timeout for these tests: 3 s if the relay has a flag for it,
/// else its default (30 s).
fn header_timeout() -> (Duration, Vec<&'static str>) {
    let help = std::process::Command::new(bin())
        .args(["relay", "--help"])
        .output()
        .expect("relay --help");
    if String::from_utf8_lossy(&help.stdout).contains("--header-read-timeout") {
        (Duration::from_secs(3), vec!["--header-read-timeout", "3"])
    } else {
        (Duration::from_secs(30), vec![])
    }
}

/// Slack on top of the timeout: timers, a loaded 2-core machine.
const TIMEOUT_SLACK: Duration = Duration::from_secs(6);

/// How one slow connection ended.
#[derive(Debug)]
struct SlowEnd {
    /// When the relay closed it (`None`: still open at the end of the test).
    closed_after: Option<Duration>,
    /// What the relay sent before closing.
    answer: Vec<u8>,
}

/// Sends `prefix` at once, then `trickle` one byte per second, while watching for the
/// relay to close the connection. Gives up after `give_up`.
async fn trickle<S>(stream: S, prefix: Vec<u8>, trickle: Vec<u8>, give_up: Duration) -> SlowEnd
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let started = Instant::now();
    let (mut reader, mut writer) = tokio::io::split(stream);
    let write = async move {
        let _ = writer.write_all(&prefix).await;
        let _ = writer.flush().await;
        for byte in trickle.iter().cycle() {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if writer.write_all(&[*byte]).await.is_err() || writer.flush().await.is_err() {
                break;
            }
        }
        // The relay refused more bytes: wait for the reader to see the close.
        std::future::pending::<()>().await;
    };
    let read = read_all(&mut reader, give_up);
    tokio::select! {
        raw = read => SlowEnd {
            closed_after: raw.closed.then(|| started.elapsed()),
            answer: raw.bytes,
        },
        () = write => unreachable!("the writer never finishes"),
    }
}

/// Runs `slow` connections (already connected) against the fixture's relay while the
/// good session is probed once a second; asserts each slow connection was closed (with
/// no answer or a 408) within the header timeout plus slack.
async fn assert_slow_connections_are_cut(
    fx: &Fixture,
    timeout: Duration,
    slow: Vec<(String, tokio::task::JoinHandle<SlowEnd>)>,
    what: &str,
) {
    let started = Instant::now();
    let mut probes = 0;
    while slow.iter().any(|(_, h)| !h.is_finished()) && started.elapsed() < timeout + TIMEOUT_SLACK
    {
        assert_serves(fx, &format!("{what}: during the attack")).await;
        probes += 1;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert!(
        probes >= 2,
        "{what}: the good session was probed only {probes} times"
    );
    let open: Vec<&str> = slow
        .iter()
        .filter(|(_, h)| !h.is_finished())
        .map(|(label, _)| label.as_str())
        .collect();
    assert!(
        open.is_empty(),
        "{what}: still open after {:?} (header timeout {timeout:?}): {open:?}",
        started.elapsed()
    );
    let mut closes = Vec::new();
    for (label, handle) in slow {
        let end = handle.await.expect("slow task");
        let closed = end.closed_after.expect("closed");
        assert!(
            closed <= timeout + TIMEOUT_SLACK,
            "{what}: {label} closed only after {closed:?} (header timeout {timeout:?})"
        );
        // Not earlier either: the timeout, not some other error, must be what cut it.
        assert!(
            closed + Duration::from_millis(500) >= timeout,
            "{what}: {label} closed after {closed:?}, before the header timeout {timeout:?}: {:?}",
            String::from_utf8_lossy(&end.answer)
        );
        // Nothing, a 408, or (HTTP/2) only the server's own connection preface frames:
        // never a response to the unfinished request.
        assert!(
            !end.answer.starts_with(b"HTTP/") || end.answer.starts_with(b"HTTP/1.1 408"),
            "{what}: {label} got {:?}",
            String::from_utf8_lossy(&end.answer)
        );
        closes.push(closed.as_millis());
    }
    eprintln!(
        "{what}: closed after {closes:?} ms (header timeout {timeout:?}), {probes} probes served"
    );
    assert_serves(fx, &format!("{what}: after the attack")).await;
}

const SLOW_CONNECTIONS: usize = 16;

#[tokio::test]
async fn slowloris_headers_are_cut_off_at_the_header_timeout() {
    let (timeout, args) = header_timeout();
    let fx = fixture("slowloris", &args);
    let host = fx.good.host();
    let mut slow = Vec::new();
    for _ in 0..SLOW_CONNECTIONS {
        let tls = tls_connect(&fx.env, fx.relay.https_port, &host, &[b"http/1.1"]).await;
        let prefix = Vec::new();
        let bytes = format!(
            "GET {} HTTP/1.1\r\nHost: {host}\r\nX-Slow: {}",
            fx.good.path("/echo"),
            "a".repeat(64)
        );
        let give_up = timeout + TIMEOUT_SLACK * 2;
        let task = tokio::spawn(trickle(tls, prefix, bytes.into_bytes(), give_up));
        slow.push((format!("slowloris {}", slow.len()), task));
    }
    assert_slow_connections_are_cut(&fx, timeout, slow, "slowloris").await;
}

#[tokio::test]
async fn silent_or_half_preface_connections_are_cut_off_at_the_header_timeout() {
    let (timeout, args) = header_timeout();
    let fx = fixture("silent", &args);
    let host = fx.good.host();
    let give_up = timeout + TIMEOUT_SLACK * 2;
    let mut slow = Vec::new();
    for alpn in [&b"http/1.1"[..], &b"h2"[..]] {
        // Silent after the TLS handshake.
        let tls = tls_connect(&fx.env, fx.relay.https_port, &host, &[alpn]).await;
        let label = format!("silent ({})", String::from_utf8_lossy(alpn));
        slow.push((
            label,
            tokio::spawn(async move {
                let started = Instant::now();
                let mut tls = tls;
                let raw = read_all(&mut tls, give_up).await;
                SlowEnd {
                    closed_after: raw.closed.then(|| started.elapsed()),
                    answer: raw.bytes,
                }
            }),
        ));
        // All of the HTTP/2 preface but its last byte, at once.
        let tls = tls_connect(&fx.env, fx.relay.https_port, &host, &[alpn]).await;
        let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r".to_vec();
        let label = format!("half preface ({})", String::from_utf8_lossy(alpn));
        slow.push((
            label,
            tokio::spawn(trickle(tls, preface, Vec::new(), give_up)),
        ));
    }
    assert_slow_connections_are_cut(&fx, timeout, slow, "silent/half preface").await;
}

#[tokio::test]
async fn http2_unfinished_header_block_is_cut_off_at_the_header_timeout() {
    let (timeout, args) = header_timeout();
    let fx = fixture("h2-slow", &args);
    let host = fx.good.host();
    let give_up = timeout + TIMEOUT_SLACK * 2;
    let mut slow = Vec::new();
    for _ in 0..4 {
        let tls = tls_connect(&fx.env, fx.relay.https_port, &host, &[b"h2"]).await;
        let mut prefix = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        // SETTINGS (empty), then HEADERS on stream 1 without END_HEADERS: `:method GET`
        // (HPACK static index 2) and nothing more, ever.
        prefix.extend_from_slice(&[0, 0, 0, 0x4, 0, 0, 0, 0, 0]);
        prefix.extend_from_slice(&[0, 0, 1, 0x1, 0, 0, 0, 0, 1, 0x82]);
        let label = format!("h2 headers {}", slow.len());
        slow.push((
            label,
            tokio::spawn(trickle(tls, prefix, Vec::new(), give_up)),
        ));
    }
    assert_slow_connections_are_cut(&fx, timeout, slow, "h2 unfinished headers").await;
}

// --- Unknown names ------------------------------------------------------------------------

const UNKNOWN_REQUESTS: usize = 10_000;
const UNKNOWN_CONNECTIONS: usize = 4;
/// Peak RSS growth allowed for the whole flood: nothing is kept per unknown name.
const UNKNOWN_MAX_GROWTH_KIB: u64 = 8 * 1024;

fn random_name() -> String {
    const BASE32: &[u8] = b"abcdefghijklmnopqrstuvwxyz234567";
    (0..16)
        .map(|_| BASE32[rand::random::<usize>() % BASE32.len()] as char)
        .collect()
}

/// `n` requests for random unknown names over one keep-alive connection (HTTP/1.1 or
/// HTTP/2); every answer must be the relay's 404 and must not echo the name.
async fn unknown_names(fx: &Fixture, n: usize, http2: bool) {
    let port = fx.relay.https_port;
    let sni = format!("{}.{DOMAIN}", random_name());
    let check = |name: &str, status: StatusCode, headers: &http::HeaderMap, body: &[u8]| {
        assert_eq!(status, StatusCode::NOT_FOUND, "unknown name {name}");
        assert_eq!(
            headers.get("x-jobgate").map(|v| v.as_bytes()),
            Some(&b"relay"[..])
        );
        assert!(
            !String::from_utf8_lossy(body).contains(name),
            "the 404 page echoes the requested name"
        );
    };
    if http2 {
        let mut sender = h2(&fx.env, port, &sni).await;
        for _ in 0..n {
            let name = random_name();
            let request = Request::get(format!("https://{name}.{DOMAIN}:{port}/x?{name}"))
                .body(empty())
                .expect("request");
            sender.ready().await.expect("h2 ready");
            let (status, headers, body) =
                collect(sender.send_request(request).await.expect("response")).await;
            check(&name, status, &headers, &body);
        }
    } else {
        let mut sender = h1(&fx.env, port, &sni).await;
        for _ in 0..n {
            let name = random_name();
            let request = Request::get(format!("/x?{name}"))
                .header("host", format!("{name}.{DOMAIN}:{port}"))
                .body(empty())
                .expect("request");
            sender.ready().await.expect("h1 ready");
            let (status, headers, body) =
                collect(sender.send_request(request).await.expect("response")).await;
            check(&name, status, &headers, &body);
        }
    }
}

async fn flood(fx: &Fixture, total: usize) {
    let per = total / UNKNOWN_CONNECTIONS;
    let connections = (0..UNKNOWN_CONNECTIONS).map(|i| unknown_names(fx, per, i % 2 == 1));
    futures_util::future::join_all(connections).await;
}

#[tokio::test]
async fn ten_thousand_unknown_names_get_404_without_memory_growth() {
    let fx = fixture("unknown", &[]);
    let pid = fx.relay.proc.pid();
    flood(&fx, 1_000).await; // warm-up: allocator pools, TLS sessions, hyper buffers
    let before = peak_rss_kib(pid);
    let started = Instant::now();
    let done = std::sync::atomic::AtomicBool::new(false);
    let attack = async {
        flood(&fx, UNKNOWN_REQUESTS).await;
        done.store(true, std::sync::atomic::Ordering::SeqCst);
    };
    let probe = async {
        while !done.load(std::sync::atomic::Ordering::SeqCst) {
            assert_serves(&fx, "during the unknown-name flood").await;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    };
    tokio::join!(attack, probe);
    let elapsed = started.elapsed();
    let after = peak_rss_kib(pid);
    eprintln!(
        "{UNKNOWN_REQUESTS} unknown names in {elapsed:?}; relay peak RSS {before} -> {after} KiB"
    );
    assert!(
        after.saturating_sub(before) < UNKNOWN_MAX_GROWTH_KIB,
        "relay peak RSS grew {} KiB over {UNKNOWN_REQUESTS} unknown names",
        after - before
    );
    assert_serves(&fx, "after the unknown-name flood").await;
}
