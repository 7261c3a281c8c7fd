//! A hand-rolled malicious agent, built on quinn directly, against the real relay binary
//! (DESIGN.md invariants 4 and 6, issue 4: "a malicious agent can only affect its own
//! mapping"). It holds a valid token, then breaks the wire protocol on purpose: garbage
//! and oversized control frames, malformed or oversized response heads, responses that
//! never come, extra streams, and streams it never reads while a client uploads. Each test
//! asserts the relay's defined reaction AND that a well-behaved session on the same relay
//! kept serving.

mod common;

use bytes::Bytes;
use common::*;
use futures_util::StreamExt;
use http::{HeaderMap, HeaderValue, Request, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use jobgate_protocol::{
    read_frame, AccessMode, CloseCode, ControlMessage, JobInfo, RequestHead, ResponseHead,
    StreamCode, Token, MAX_CONTROL_FRAME, MAX_HEAD_FRAME, PROTOCOL_VERSION,
};
use quinn::{Connection, ConnectionError, RecvStream, SendStream, VarInt};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

/// A relay with one well-behaved session (demo app labelled `good`) and a token for the
/// attacker. Fields drop in order: the agent, then the relay, then the scratch directory.
struct Fixture {
    good: AgentProc,
    relay: RelayProc,
    env: TestEnv,
    /// The attacker's token (a valid one: the attacker is a legitimate cluster user).
    evil_token: String,
}

fn fixture(name: &str) -> Fixture {
    let env = TestEnv::new(&format!("evil-{name}"));
    let good_token = env.token_file("alice");
    let evil_file = env.token_file("mallory");
    let evil_token = std::fs::read_to_string(evil_file)
        .expect("token")
        .trim()
        .to_owned();
    let relay = start_relay(&env, &[]);
    let good = start_demo_agent(&env, &relay, &good_token, "good");
    Fixture {
        good,
        relay,
        env,
        evil_token,
    }
}

/// The well-behaved session on this fixture's relay still answers correctly.
async fn assert_serves(fx: &Fixture, context: &str) {
    common::assert_serves(&fx.env, fx.relay.https_port, &fx.good, context).await
}

// --- The malicious agent's QUIC plumbing ---------------------------------------------------

fn client_config(env: &TestEnv) -> quinn::ClientConfig {
    agent_quic_config(&env.ca, Duration::from_secs(10)).expect("QUIC client config")
}

/// A QUIC connection to the relay, nothing sent on it yet.
async fn dial(fx: &Fixture) -> (quinn::Endpoint, Connection) {
    dial_with(fx, client_config(&fx.env)).await
}

/// [`dial`] with the agent's own QUIC settings.
async fn dial_with(fx: &Fixture, config: quinn::ClientConfig) -> (quinn::Endpoint, Connection) {
    let endpoint = quinn::Endpoint::client(([127, 0, 0, 1], 0).into()).expect("endpoint");
    let addr = ([127, 0, 0, 1], fx.relay.quic_port).into();
    let connecting = endpoint
        .connect_with(config, addr, "localhost")
        .expect("connect");
    let connection = tokio::time::timeout(Duration::from_secs(10), connecting)
        .await
        .expect("QUIC handshake in time")
        .expect("QUIC handshake");
    (endpoint, connection)
}

fn hello(token: &str) -> ControlMessage {
    ControlMessage::Hello {
        version: PROTOCOL_VERSION,
        token: Token(token.to_owned()),
        access: Some(AccessMode::Link),
        share: Default::default(),
        job: JobInfo {
            id: Some("666".into()),
            user: Some("mallory".into()),
            host: Some("cn666".into()),
        },
        resume: None,
        reservation: None,
        moving: false,
    }
}

/// A malicious agent with a live session: its connection, control stream and the URL
/// path suffix (access key) a client needs to reach it.
struct Evil {
    _endpoint: quinn::Endpoint,
    connection: Connection,
    control: (SendStream, RecvStream),
    host: String,
    key_query: String,
}

impl Evil {
    /// `path` with the access key in the query.
    fn path(&self, path: &str) -> String {
        if self.key_query.is_empty() {
            return path.to_owned();
        }
        let sep = if path.contains('?') { '&' } else { '?' };
        format!("{path}{sep}{}", self.key_query)
    }
}

/// Dials and completes Hello → Welcome like an honest agent would.
async fn evil_session(fx: &Fixture) -> Evil {
    evil_session_with(fx, client_config(&fx.env)).await
}

/// [`evil_session`] with the agent's own QUIC settings.
async fn evil_session_with(fx: &Fixture, config: quinn::ClientConfig) -> Evil {
    let (endpoint, connection) = dial_with(fx, config).await;
    let session = hand_made_session(&connection, &hello(&fx.evil_token))
        .await
        .expect("Welcome");
    Evil {
        _endpoint: endpoint,
        connection,
        host: format!("{}.{DOMAIN}", session.name),
        key_query: session.key_query(),
        control: session.control,
    }
}

/// Waits for the relay to close `connection`; returns its application close code.
async fn close_code(connection: &Connection, within: Duration) -> Result<u64, String> {
    match tokio::time::timeout(within, connection.closed()).await {
        Err(_) => Err(format!(
            "the relay did not close the connection within {within:?}"
        )),
        Ok(ConnectionError::ApplicationClosed(close)) => Ok(close.error_code.into_inner()),
        Ok(other) => Err(format!(
            "the connection ended without an application code: {other}"
        )),
    }
}

fn code_name(code: u64) -> String {
    match CloseCode::from_u64(code) {
        Some(c) => format!("{c:?} ({code})"),
        None => format!("unknown ({code})"),
    }
}

// --- (a) Malformed control frames ----------------------------------------------------------

/// What an attacker writes as its first control-stream bytes (then finishes, or not).
struct FirstBytes {
    what: &'static str,
    bytes: Vec<u8>,
    finish: bool,
}

async fn assert_first_frames_close_with_protocol_error(fx: &Fixture, cases: Vec<FirstBytes>) {
    let mut failures = Vec::new();
    for case in cases {
        let (_endpoint, connection) = dial(fx).await;
        let (mut send, mut recv) = connection.open_bi().await.expect("stream");
        let _ = send.write_all(&case.bytes).await;
        if case.finish {
            let _ = send.finish();
        }
        // Whatever the relay answers on the control stream, it must never be a Welcome.
        let answer = tokio::time::timeout(
            Duration::from_secs(5),
            read_frame(&mut recv, MAX_CONTROL_FRAME),
        )
        .await;
        if let Ok(Ok(Some(payload))) = &answer {
            if let Ok(ControlMessage::Welcome { .. }) = ControlMessage::from_payload(payload) {
                failures.push(format!("{}: the relay answered Welcome", case.what));
            }
        }
        match close_code(&connection, Duration::from_secs(5)).await {
            Ok(code) if code == u64::from(CloseCode::ProtocolError.as_u32()) => {}
            Ok(code) => failures.push(format!(
                "{}: closed with {} instead of ProtocolError (answer on the control stream: {})",
                case.what,
                code_name(code),
                match &answer {
                    Ok(Ok(Some(p))) => String::from_utf8_lossy(p).into_owned(),
                    other => format!("{other:?}"),
                }
            )),
            Err(e) => failures.push(format!("{}: {e}", case.what)),
        }
        assert_serves(fx, case.what).await;
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test]
async fn oversized_or_truncated_first_control_frame_closes_with_protocol_error() {
    let fx = fixture("oversized-hello");
    let over = u32::try_from(MAX_CONTROL_FRAME + 1).expect("limit fits u32");
    let hello = hello(&fx.evil_token).to_payload();
    let mut truncated = u32::try_from(hello.len())
        .expect("len")
        .to_be_bytes()
        .to_vec();
    truncated.extend_from_slice(&hello[..hello.len() / 2]);
    let cases = vec![
        FirstBytes {
            what: "length 0xFFFFFFFF",
            bytes: [0xFF; 4].into_iter().chain(*b"{\"type\":").collect(),
            finish: false,
        },
        FirstBytes {
            what: "length MAX_CONTROL_FRAME + 1",
            bytes: over.to_be_bytes().to_vec(),
            finish: false,
        },
        FirstBytes {
            what: "a Hello cut off mid-frame, then FIN",
            bytes: truncated,
            finish: true,
        },
        FirstBytes {
            what: "half a frame header, then FIN",
            bytes: vec![0, 0],
            finish: true,
        },
        FirstBytes {
            what: "FIN before any frame",
            bytes: Vec::new(),
            finish: true,
        },
    ];
    assert_first_frames_close_with_protocol_error(&fx, cases).await;
}

#[tokio::test]
async fn garbage_first_control_frame_closes_with_protocol_error() {
    let fx = fixture("garbage-hello");
    let frame = |payload: &[u8]| {
        let mut out = Vec::new();
        jobgate_protocol::encode_frame(payload, &mut out);
        out
    };
    let cases = vec![
        FirstBytes {
            what: "binary garbage",
            bytes: frame(b"\xde\xad\xbe\xef\x00\xff not json"),
            finish: false,
        },
        FirstBytes {
            what: "JSON that is no message",
            bytes: frame(b"{\"type\":\"gimme_root\",\"version\":1}"),
            finish: false,
        },
        FirstBytes {
            what: "Bye before Hello",
            bytes: frame(&ControlMessage::Bye { reason: "x".into() }.to_payload()),
            finish: false,
        },
        FirstBytes {
            what: "a Welcome from the agent",
            bytes: frame(
                &ControlMessage::Welcome {
                    name: "aaaaaaaaaaaaaaaa".into(),
                    url: "https://aaaaaaaaaaaaaaaa.jobgate.test/".into(),
                    access_url: "https://aaaaaaaaaaaaaaaa.jobgate.test/".into(),
                    resume_ticket: None,
                    limits: Default::default(),
                }
                .to_payload(),
            ),
            finish: false,
        },
    ];
    assert_first_frames_close_with_protocol_error(&fx, cases).await;
}

#[tokio::test]
async fn garbage_on_the_control_stream_after_welcome_ends_only_that_session() {
    let fx = fixture("garbage-after-welcome");
    let mut evil = evil_session(&fx).await;
    let (reports, _reported) = mpsc::unbounded_channel();
    tokio::spawn(misbehave(evil.connection.clone(), reports));
    let (status, _, _) = get(&fx.env, fx.relay.https_port, &evil.host, &evil.path("/ok")).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "the session works before the attack"
    );
    let _ = evil.control.0.write_all(&[0xFF; 4]).await;
    let code = close_code(&evil.connection, Duration::from_secs(5)).await;
    assert_eq!(
        code.map(code_name),
        Ok(code_name(CloseCode::ProtocolError.as_u32().into())),
        "an oversized frame on a live control stream"
    );
    // The mapping is gone with its connection: the relay's own 404, no app behind it.
    let gone = eventually(Duration::from_secs(5), || async {
        let (status, headers, _) =
            get(&fx.env, fx.relay.https_port, &evil.host, &evil.path("/")).await;
        status == StatusCode::NOT_FOUND && headers.get("x-jobgate").is_some()
    })
    .await;
    assert!(gone.is_some(), "the broken session's name still answers");
    assert_serves(&fx, "after the broken control stream").await;
}

#[tokio::test]
async fn silent_agent_is_closed_at_the_handshake_timeout() {
    let fx = fixture("silent-agent");
    // One says nothing at all; one opens the control stream and sends half a header.
    let (_e1, silent) = dial(&fx).await;
    let (_e2, stalled) = dial(&fx).await;
    let (mut send, _recv) = stalled.open_bi().await.expect("stream");
    send.write_all(&[0, 0]).await.expect("write");
    let started = Instant::now();
    let probes = async {
        while started.elapsed() < Duration::from_secs(8) {
            assert_serves(&fx, "while agents stall their handshake").await;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    };
    let (a, b, ()) = tokio::join!(
        close_code(&silent, Duration::from_secs(15)),
        close_code(&stalled, Duration::from_secs(15)),
        probes
    );
    let timeout = code_name(CloseCode::HandshakeTimeout.as_u32().into());
    assert_eq!(a.map(code_name), Ok(timeout.clone()), "silent agent");
    assert_eq!(b.map(code_name), Ok(timeout), "stalled Hello");
    assert_serves(&fx, "after the handshake timeouts").await;
}

// --- (b) Malformed answers on request streams ----------------------------------------------

/// How the malicious agent's request stream ended, from its side.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Released {
    /// The relay sent STOP_SENDING with this code.
    Stopped(u64),
    /// The relay read everything we sent (we had finished).
    ReadToEnd,
    /// Nothing within the time allowed.
    Kept,
}

type Reports = mpsc::UnboundedSender<(String, Released)>;

/// A response head written by hand, so that it can hold what the encoder refuses.
fn raw_response_head(status: u16, headers: &[(&[u8], &[u8])]) -> Vec<u8> {
    let mut payload = vec![0x02];
    payload.extend_from_slice(&status.to_be_bytes());
    payload.extend_from_slice(&(headers.len() as u16).to_be_bytes());
    for (name, value) in headers {
        payload.extend_from_slice(&(name.len() as u16).to_be_bytes());
        payload.extend_from_slice(name);
        payload.extend_from_slice(&(value.len() as u32).to_be_bytes());
        payload.extend_from_slice(value);
    }
    let mut frame = Vec::new();
    jobgate_protocol::encode_frame(&payload, &mut frame);
    frame
}

fn response_frame(status: u16, headers: &[(&'static str, &str)]) -> Vec<u8> {
    let mut map = HeaderMap::new();
    for (name, value) in headers {
        map.append(*name, HeaderValue::from_str(value).expect("value"));
    }
    ResponseHead {
        status: StatusCode::from_u16(status).expect("status"),
        headers: map,
    }
    .to_frame()
}

/// Serves request streams badly, each in the way its path asks for, and reports how the
/// relay released each stream.
async fn misbehave(connection: Connection, reports: Reports) {
    while let Ok((send, recv)) = connection.accept_bi().await {
        tokio::spawn(misbehave_on(send, recv, reports.clone()));
    }
}

async fn misbehave_on(mut send: SendStream, mut recv: RecvStream, reports: Reports) {
    let Ok(Some(payload)) = read_frame(&mut recv, MAX_HEAD_FRAME).await else {
        return;
    };
    let Ok(head) = RequestHead::decode(&payload) else {
        let _ = reports.send(("<undecodable request head>".into(), Released::Kept));
        return;
    };
    let path = head.target.path().to_owned();
    let mut wait = Duration::from_secs(5);
    match path.as_str() {
        "/ok" => {
            let _ = send
                .write_all(&response_frame(200, &[("content-length", "7")]))
                .await;
            let _ = send.write_all(b"evil-ok").await;
            let _ = send.finish();
        }
        "/garbage-head" => {
            let mut frame = Vec::new();
            jobgate_protocol::encode_frame(b"\x02\xde\xad\xbe\xef garbage", &mut frame);
            let _ = send.write_all(&frame).await;
        }
        "/request-head-back" => {
            let _ = send.write_all(&head.to_frame()).await;
        }
        "/length-ffffffff" => {
            let _ = send.write_all(&[0xFF; 4]).await;
            let _ = send.write_all(&[0x02; 1024]).await;
        }
        "/length-over-limit" => {
            let len = u32::try_from(MAX_HEAD_FRAME + 1).expect("fits");
            let _ = send.write_all(&len.to_be_bytes()).await;
            // Offer the whole over-limit payload; the relay must not wait for it.
            let _ = tokio::time::timeout(
                Duration::from_secs(2),
                send.write_all(&vec![0u8; MAX_HEAD_FRAME + 1]),
            )
            .await;
        }
        "/truncated-head" => {
            let frame = response_frame(200, &[("x-a", "b")]);
            let _ = send.write_all(&frame[..frame.len() - 2]).await;
            let _ = send.finish();
        }
        "/crlf-in-header" => {
            let frame =
                raw_response_head(200, &[(b"x-evil", b"a\r\nset-cookie: stolen=1\r\nx-b: c")]);
            let _ = send.write_all(&frame).await;
            let _ = send.write_all(b"evil body").await;
        }
        "/bad-header-name" => {
            let frame = raw_response_head(200, &[(b"set-cookie:\r\nx", b"1")]);
            let _ = send.write_all(&frame).await;
        }
        "/status-1000" => {
            let _ = send.write_all(&raw_response_head(1000, &[])).await;
        }
        "/status-42" => {
            let _ = send.write_all(&raw_response_head(42, &[])).await;
        }
        "/unasked-101" => {
            let frame = response_frame(101, &[("upgrade", "websocket"), ("connection", "upgrade")]);
            let _ = send.write_all(&frame).await;
        }
        "/fin-no-head" => {
            let _ = send.finish();
        }
        "/reset" => {
            let _ = send.reset(VarInt::from_u32(7));
            let _ = reports.send((path, Released::Kept));
            return;
        }
        "/overlong-body" => {
            // Declares 5 bytes, sends a whole extra HTTP response after them.
            let _ = send
                .write_all(&response_frame(200, &[("content-length", "5")]))
                .await;
            let _ = send
                .write_all(b"hello HTTP/1.1 200 OK\r\nx-smuggled: 1\r\ncontent-length: 0\r\n\r\n")
                .await;
            let _ = send.finish();
        }
        "/short-body" => {
            let _ = send
                .write_all(&response_frame(200, &[("content-length", "100")]))
                .await;
            let _ = send.write_all(b"hello").await;
            let _ = send.finish();
        }
        "/never" => {
            // Never answers; reports when (if) the relay lets go of the stream.
            wait = Duration::from_secs(20);
        }
        _ => {}
    }
    let released = match tokio::time::timeout(wait, send.stopped()).await {
        Ok(Ok(Some(code))) => Released::Stopped(code.into_inner()),
        Ok(Ok(None)) => Released::ReadToEnd,
        Ok(Err(_)) | Err(_) => Released::Kept,
    };
    let _ = reports.send((path, released));
}

/// Waits for the malicious agent's report on `path`.
async fn report_for(
    reports: &mut mpsc::UnboundedReceiver<(String, Released)>,
    path: &str,
) -> Released {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(25);
    loop {
        match tokio::time::timeout_at(deadline, reports.recv()).await {
            Ok(Some((p, released))) if p == path => return released,
            Ok(Some(_)) => continue,
            Ok(None) | Err(_) => return Released::Kept,
        }
    }
}

#[tokio::test]
async fn malformed_response_heads_get_502_and_close_only_that_stream() {
    let fx = fixture("bad-heads");
    let evil = evil_session(&fx).await;
    let (reports, mut reported) = mpsc::unbounded_channel();
    tokio::spawn(misbehave(evil.connection.clone(), reports));
    let port = fx.relay.https_port;

    // The mapping works when the agent behaves.
    let (status, _, body) = get(&fx.env, port, &evil.host, &evil.path("/ok")).await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"evil-ok"[..]));
    let _ = report_for(&mut reported, "/ok").await;

    let mut failures = Vec::new();
    for path in [
        "/garbage-head",
        "/request-head-back",
        "/length-ffffffff",
        "/length-over-limit",
        "/truncated-head",
        "/crlf-in-header",
        "/bad-header-name",
        "/status-1000",
        "/status-42",
        "/unasked-101",
        "/fin-no-head",
        "/reset",
    ] {
        let started = Instant::now();
        let answer = tokio::time::timeout(
            Duration::from_secs(10),
            get(&fx.env, port, &evil.host, &evil.path(path)),
        )
        .await;
        let Ok((status, headers, body)) = answer else {
            failures.push(format!("{path}: no answer within 10 s"));
            continue;
        };
        let text = String::from_utf8_lossy(&body);
        if status != StatusCode::BAD_GATEWAY || headers.get("x-jobgate").is_none() {
            failures.push(format!(
                "{path}: expected the relay's 502, got {status}: {text}"
            ));
        }
        if headers.contains_key("set-cookie") || text.contains("evil") || text.contains("stolen") {
            failures.push(format!(
                "{path}: agent bytes leaked to the client: {headers:?} {text}"
            ));
        }
        // The stream, not the connection, is closed; malformed heads are stopped with
        // MalformedHead.
        let released = report_for(&mut reported, path).await;
        let malformed = Released::Stopped(StreamCode::MalformedHead.as_u32().into());
        let fine = match path {
            // Reported at once by the agent itself.
            "/reset" => released == Released::Kept,
            // The agent finished its stream: the relay read it to the end, or stopped it.
            "/truncated-head" | "/fin-no-head" => {
                released == Released::ReadToEnd || released == malformed
            }
            // A well-formed head the relay cannot honour: any stop releases the stream.
            "/unasked-101" => matches!(released, Released::Stopped(_)),
            _ => released == malformed,
        };
        if !fine {
            let expected = &malformed;
            failures.push(format!(
                "{path}: relay released the stream as {released:?}, expected {expected:?}"
            ));
        }
        eprintln!(
            "{path}: {status} in {:?}, stream {released:?}",
            started.elapsed()
        );
    }
    assert!(
        evil.connection.close_reason().is_none(),
        "a bad response head closed the whole agent connection: {:?}",
        evil.connection.close_reason()
    );
    let (status, _, body) = get(&fx.env, port, &evil.host, &evil.path("/ok")).await;
    assert_eq!(
        (status, &body[..]),
        (StatusCode::OK, &b"evil-ok"[..]),
        "the agent's own mapping broke"
    );
    assert_serves(&fx, "after malformed response heads").await;
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test]
async fn wrong_response_body_length_cannot_desync_the_client_connection() {
    let fx = fixture("body-length");
    let evil = evil_session(&fx).await;
    let (reports, _reported) = mpsc::unbounded_channel();
    tokio::spawn(misbehave(evil.connection.clone(), reports));
    let port = fx.relay.https_port;

    // Longer than declared: the client gets exactly the declared bytes, and the next
    // response on the same keep-alive connection is the real one, not the smuggled one.
    let mut sender = h1(&fx.env, port, &evil.host).await;
    let request = |path: &str| {
        Request::get(evil.path(path))
            .header("host", &evil.host)
            .body(empty())
            .expect("request")
    };
    let first = sender.send_request(request("/overlong-body")).await;
    let (status, headers, body) = collect(first.expect("response")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        &body[..],
        b"hello",
        "body beyond Content-Length reached the client"
    );
    assert!(headers.get("x-smuggled").is_none());
    // The relay may close the connection instead (fine); if it keeps it, the next
    // response must be the real one.
    let kept = sender.ready().await.is_ok();
    if kept {
        let second = sender.send_request(request("/ok")).await;
        if let Ok(second) = second {
            let (status, headers, body) = collect(second).await;
            assert!(
                headers.get("x-smuggled").is_none(),
                "a smuggled response was read"
            );
            assert_eq!((status, &body[..]), (StatusCode::OK, &b"evil-ok"[..]));
        }
    }
    eprintln!("overlong body: exactly the declared 5 bytes; connection kept: {kept}");

    // Shorter than declared: the client sees an error, not a hang, and no extra bytes.
    let mut sender = h1(&fx.env, port, &evil.host).await;
    let response = sender.send_request(request("/short-body")).await;
    if let Ok(response) = response {
        let body = tokio::time::timeout(Duration::from_secs(10), response.into_body().collect())
            .await
            .expect("a short body must end in an error, not a hang");
        assert!(body.is_err(), "a truncated body was delivered as complete");
    }
    assert_serves(&fx, "after wrong body lengths").await;
}

/// A client asks the malicious agent for `/never` over HTTP/1.1, then over HTTP/2, and
/// cancels each after 2 s (closing the connection, resetting the h2 stream). Returns how
/// the relay let go of the agent's stream each time, and how long after the cancel.
async fn cancel_unanswered_requests(name: &str) -> Vec<(Released, Duration)> {
    let fx = fixture(name);
    let evil = evil_session(&fx).await;
    let (reports, mut reported) = mpsc::unbounded_channel();
    tokio::spawn(misbehave(evil.connection.clone(), reports));
    let port = fx.relay.https_port;
    let mut outcomes = Vec::new();

    // HTTP/1.1: the client gives up and closes its connection.
    let mut tls = tls_connect(&fx.env, port, &evil.host, &[b"http/1.1"]).await;
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\n\r\n",
        evil.path("/never"),
        evil.host
    );
    tls.write_all(request.as_bytes()).await.expect("write");
    tls.flush().await.expect("flush");
    let mut buf = [0u8; 1024];
    let early = tokio::time::timeout(
        Duration::from_secs(2),
        tokio::io::AsyncReadExt::read(&mut tls, &mut buf),
    )
    .await;
    assert!(
        early.is_err(),
        "the relay answered a request the agent never answered: {early:?}"
    );
    assert_serves(&fx, "while a request hangs on the malicious agent").await;
    drop(tls);
    let cancelled = Instant::now();
    outcomes.push((
        report_for(&mut reported, "/never").await,
        cancelled.elapsed(),
    ));

    // HTTP/2: the client resets the stream and keeps the connection.
    let mut sender = h2(&fx.env, port, &evil.host).await;
    let uri = format!("https://{}:{port}{}", evil.host, evil.path("/never"));
    let request = Request::get(uri).body(empty()).expect("request");
    let pending = tokio::time::timeout(Duration::from_secs(2), sender.send_request(request)).await;
    assert!(pending.is_err(), "the relay answered an unanswered request");
    let cancelled = Instant::now();
    outcomes.push((
        report_for(&mut reported, "/never").await,
        cancelled.elapsed(),
    ));

    assert_serves(&fx, "after cancelled requests").await;
    eprintln!("released after the client cancelled (HTTP/1.1, HTTP/2): {outcomes:?}");
    outcomes
}

#[tokio::test]
async fn unanswered_request_is_released_when_the_client_cancels() {
    for (i, (released, after)) in cancel_unanswered_requests("never-released")
        .await
        .into_iter()
        .enumerate()
    {
        let proto = ["HTTP/1.1", "HTTP/2"][i];
        assert!(
            matches!(released, Released::Stopped(_)) && after < Duration::from_secs(5),
            "{proto}: the relay kept the agent's stream after the client cancelled: \
             {released:?} after {after:?}"
        );
    }
}

#[tokio::test]
async fn unanswered_request_is_reset_with_cancelled_when_the_client_cancels() {
    let cancelled = Released::Stopped(StreamCode::Cancelled.as_u32().into());
    let outcomes = cancel_unanswered_requests("never-cancelled").await;
    let codes: Vec<Released> = outcomes.into_iter().map(|(r, _)| r).collect();
    assert_eq!(
        codes,
        [cancelled.clone(), cancelled],
        "how the relay let go of the agent's stream after the client cancelled \
         (HTTP/1.1, HTTP/2)"
    );
}

// --- (c) Streams the agent may not open ----------------------------------------------------

#[tokio::test]
async fn extra_agent_streams_are_refused_by_flow_control_and_change_nothing() {
    let fx = fixture("extra-streams");
    let evil = evil_session(&fx).await;
    let (reports, _reported) = mpsc::unbounded_channel();
    tokio::spawn(misbehave(evil.connection.clone(), reports));
    let port = fx.relay.https_port;

    // The relay allows the agent exactly one bidirectional stream (the control stream)
    // and no unidirectional ones: further opens wait for credit that never comes.
    let mut opened = Vec::new();
    for _ in 0..3 {
        if let Ok(Ok((mut send, recv))) =
            tokio::time::timeout(Duration::from_millis(500), evil.connection.open_bi()).await
        {
            // A hostile agent would try to pass a "response" on its own stream.
            let _ = send.write_all(&response_frame(200, &[])).await;
            let _ = send.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await;
            opened.push((send, recv));
        }
    }
    let uni = tokio::time::timeout(Duration::from_millis(500), evil.connection.open_uni()).await;
    let uni_opened = matches!(uni, Ok(Ok(_)));
    assert!(
        evil.connection.close_reason().is_none(),
        "the agent's connection ended: {:?}",
        evil.connection.close_reason()
    );
    assert!(
        opened.is_empty() && !uni_opened,
        "the relay gave the agent credit for {} more bidirectional and {} unidirectional \
         streams (it should allow only the control stream)",
        opened.len(),
        usize::from(uni_opened)
    );
    assert_serves(&fx, "after the agent tried to open streams").await;
    // The agent's own mapping still works: nothing was confused.
    let (status, _, body) = get(&fx.env, port, &evil.host, &evil.path("/ok")).await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"evil-ok"[..]));
}

/// What the relay waits for an agent's stream credit (`STREAM_CREDIT_TIMEOUT` in
/// `relay/src/forward.rs`).
const STREAM_CREDIT_TIMEOUT: Duration = Duration::from_secs(10);

#[tokio::test]
async fn agent_that_allows_no_streams_gets_its_clients_a_503_not_a_hang() {
    let fx = fixture("no-credit");
    // The agent lets the relay open no request stream at all, and never raises it.
    let mut config = client_config(&fx.env);
    config.transport_config(jobgate_protocol::quic::transport_config(
        Duration::from_secs(10),
        Duration::from_secs(2),
        0,
    ));
    let evil = evil_session_with(&fx, config).await;
    let port = fx.relay.https_port;

    let asking = async {
        let asked = Instant::now();
        let answer = tokio::time::timeout(
            STREAM_CREDIT_TIMEOUT * 3,
            get(&fx.env, port, &evil.host, &evil.path("/")),
        )
        .await;
        (answer, asked.elapsed())
    };
    // Nobody else waits with it.
    let meanwhile = async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_serves(&fx, "while a request waits for stream credit").await;
    };
    let ((answer, waited), ()) = tokio::join!(asking, meanwhile);
    let Ok((status, _, _)) = answer else {
        panic!("the client still waits after {waited:?} for an agent that allows no streams");
    };
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "answer after {waited:?} for an agent that allows no streams"
    );
    assert!(
        waited >= STREAM_CREDIT_TIMEOUT - Duration::from_millis(500),
        "the relay gave up after {waited:?}, before the agent had {STREAM_CREDIT_TIMEOUT:?} \
         to allow a stream"
    );
    // The agent's connection stays up: it broke no protocol rule.
    assert!(
        evil.connection.close_reason().is_none(),
        "the agent's connection ended: {:?}",
        evil.connection.close_reason()
    );
    assert_serves(&fx, "after a request to an agent that allows no streams").await;
}

// --- (d) An agent that never reads ---------------------------------------------------------

const UPLOAD: u64 = 64 * 1024 * 1024;
const UPLOADS: usize = 2;
/// The relay may hold flow-control windows and buffers, never the uploads themselves.
const MAX_GROWTH_KIB: u64 = 64 * 1024;

/// Accepts request streams and never reads or answers them.
async fn never_read(connection: Connection) {
    let mut held = Vec::new();
    while let Ok(streams) = connection.accept_bi().await {
        held.push(streams);
    }
}

/// Starts a 64 MiB upload to the malicious agent; `sent` counts what the client managed
/// to hand to its connection.
async fn start_upload(
    fx: &Fixture,
    evil: &Evil,
    sent: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<()> {
    let mut sender = h1(&fx.env, fx.relay.https_port, &evil.host).await;
    let chunk = Bytes::from(vec![0x5au8; 64 * 1024]);
    let chunks = UPLOAD / chunk.len() as u64;
    let stream = futures_util::stream::iter(0..chunks).map(move |_| {
        sent.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        Ok::<_, std::io::Error>(Frame::data(chunk.clone()))
    });
    let request = Request::post(evil.path("/upload"))
        .header("host", &evil.host)
        .header("content-length", UPLOAD)
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .expect("request");
    tokio::spawn(async move {
        let _ = sender.send_request(request).await;
    })
}

#[tokio::test]
async fn agent_that_never_reads_keeps_relay_memory_bounded_during_uploads() {
    let fx = fixture("never-reads");
    let pid = fx.relay.proc.pid();
    let evil = evil_session(&fx).await;
    tokio::spawn(never_read(evil.connection.clone()));
    assert_serves(&fx, "before the uploads").await;
    let before = peak_rss_kib(pid);

    let counters: Vec<Arc<AtomicU64>> = (0..UPLOADS).map(|_| Arc::default()).collect();
    let mut uploads = Vec::new();
    for sent in &counters {
        uploads.push(start_upload(&fx, &evil, sent.clone()).await);
    }
    // Wait until back-pressure stalls every upload (no progress for 1.5 s), probing the
    // good session meanwhile.
    let total = || {
        counters
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum::<u64>()
    };
    let started = Instant::now();
    let (mut last, mut last_change) = (0, Instant::now());
    while started.elapsed() < Duration::from_secs(20) {
        assert_serves(&fx, "while uploads push into an agent that never reads").await;
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = total();
        if now != last {
            (last, last_change) = (now, Instant::now());
        } else if last_change.elapsed() > Duration::from_millis(1500) {
            break;
        }
    }
    let after = peak_rss_kib(pid);
    let pushed: Vec<u64> = counters
        .iter()
        .map(|c| c.load(Ordering::Relaxed) >> 20)
        .collect();
    eprintln!(
        "uploads stalled after {:?}: client pushed {pushed:?} MiB; relay peak RSS {before} -> {after} KiB",
        started.elapsed()
    );
    assert!(
        uploads.iter().all(|u| !u.is_finished()),
        "an upload finished although the agent reads nothing"
    );
    assert!(
        counters.iter().all(|c| c.load(Ordering::Relaxed) < UPLOAD),
        "back-pressure never reached the client: it pushed whole uploads {pushed:?} MiB"
    );
    assert!(
        after.saturating_sub(before) < MAX_GROWTH_KIB,
        "relay peak RSS grew {} KiB while {UPLOADS} x {} MiB uploads pushed into an agent \
         that never reads",
        after - before,
        UPLOAD >> 20
    );
    assert_serves(&fx, "while the uploads are stalled").await;
    for upload in uploads {
        upload.abort();
    }
    evil.connection.close(VarInt::from_u32(0), b"done");
    assert_serves(&fx, "after the malicious agent left").await;
}
