//! What an operator watches: counters and gauges in the Prometheus text format on
//! `GET /metrics`, and `GET /healthz` for load balancers, both on the optional
//! `--listen-metrics` address (plain HTTP: keep it on loopback or an admin network).
//!
//! Counting costs one relaxed atomic add per event; gauges that the relay already knows
//! (live and parked sessions, requests in flight) are read only when scraped. No label
//! ever holds a user name or a session name: the audit log is the place for those.

use crate::pages::Page;
use crate::Shared;
use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// How long a metrics client may take to send its request head.
const METRICS_HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// A value that goes up and down; [`Gauge::enter`] counts one until the guard drops.
#[derive(Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    /// Counts one more until the returned guard is dropped.
    pub fn enter(&self) -> GaugeGuard<'_> {
        self.0.fetch_add(1, Relaxed);
        GaugeGuard(self)
    }

    /// The current value.
    pub fn get(&self) -> i64 {
        self.0.load(Relaxed)
    }
}

/// Holds one unit of a [`Gauge`].
pub struct GaugeGuard<'a>(&'a Gauge);

impl Drop for GaugeGuard<'_> {
    fn drop(&mut self) {
        (self.0).0.fetch_sub(1, Relaxed);
    }
}

/// An owned unit of a gauge, for tasks that outlive the request that started them.
pub struct OwnedGaugeGuard {
    shared: Arc<Shared>,
    pick: fn(&Metrics) -> &Gauge,
}

impl OwnedGaugeGuard {
    /// Counts one more on the gauge `pick` selects, until dropped.
    pub(crate) fn enter(shared: Arc<Shared>, pick: fn(&Metrics) -> &Gauge) -> Self {
        pick(&shared.metrics).0.fetch_add(1, Relaxed);
        Self { shared, pick }
    }
}

impl Drop for OwnedGaugeGuard {
    fn drop(&mut self) {
        (self.pick)(&self.shared.metrics).0.fetch_sub(1, Relaxed);
    }
}

/// Every counter the relay keeps.
#[derive(Default)]
pub struct Metrics {
    /// Requests the front door received (every one, forwarded or answered by the relay).
    pub requests: AtomicU64,
    /// Answers from apps, by status class (1xx … 5xx).
    pub app_responses: [AtomicU64; 5],
    /// Pages the relay answered with itself, by [`Page`].
    pub pages: [AtomicU64; Page::ALL.len()],
    /// Client connections (TCP, after TLS) open now.
    pub client_connections: Gauge,
    /// Upgraded connections (WebSockets) being piped now.
    pub upgraded: Gauge,
    /// Sessions opened with a fresh name.
    pub sessions_opened: AtomicU64,
    /// Sessions that got their old name back with a resume ticket.
    pub sessions_resumed: AtomicU64,
    /// Agent connections that ended (their name parked or ended).
    pub sessions_closed: AtomicU64,
    /// `Hello`s refused (bad token, limits, bad ticket…).
    pub agents_refused: AtomicU64,
    /// QUIC handshakes that failed, and connections that never said `Hello` in time.
    pub agent_handshakes_failed: AtomicU64,
    /// Client connections closed at once because a cap was reached: [total, per IP].
    pub client_connections_refused: [AtomicU64; 2],
    /// Client connections closed because nothing was in flight for the idle timeout.
    pub client_connections_idle_closed: AtomicU64,
    /// Agent connections between their first packet and an admitted (or refused) `Hello`.
    pub pending_handshakes: Gauge,
    /// New agent connections asked to prove their address (QUIC Retry) under load.
    pub agent_handshakes_retried: AtomicU64,
    /// New agent connections refused because `max_pending_handshakes` were pending.
    pub agent_handshakes_over_cap: AtomicU64,
    /// Sessions whose receive window came out of the memory budget (full window) now.
    pub sessions_full_window: Gauge,
    /// Sessions admitted with the small window because the memory budget was spent.
    pub sessions_small_window: AtomicU64,
    /// Live sessions by transport: [QUIC, TCP/TLS].
    pub sessions_transport: [Gauge; 2],
    /// Agent connections accepted over TLS/TCP on the HTTPS listener (UDP blocked).
    pub agent_tcp_connections: AtomicU64,
    /// Browser connections handed to the relay of the cluster that holds their session.
    pub peer_forwarded_connections: AtomicU64,
}

impl Metrics {
    /// The gauge of live sessions over `kind`.
    pub(crate) fn sessions_by_transport(&self, kind: jobgate_transport::TransportKind) -> &Gauge {
        match kind {
            jobgate_transport::TransportKind::Quic => &self.sessions_transport[0],
            jobgate_transport::TransportKind::Tcp => &self.sessions_transport[1],
        }
    }

    /// Counts a client connection closed at once because of `over`.
    pub(crate) fn count_client_refused(&self, over: crate::limits::OverCap) {
        let index = match over {
            crate::limits::OverCap::Total => 0,
            crate::limits::OverCap::PerIp => 1,
        };
        self.client_connections_refused[index].fetch_add(1, Relaxed);
    }

    /// Counts the answer the front door is about to send.
    pub(crate) fn count_response<B>(&self, response: &Response<B>) {
        self.requests.fetch_add(1, Relaxed);
        match response.extensions().get::<Page>() {
            Some(page) => {
                if let Some(counter) = self.pages.get(page.index()) {
                    counter.fetch_add(1, Relaxed);
                }
            }
            None => {
                let class = usize::from(response.status().as_u16() / 100);
                if let Some(counter) = self.app_responses.get(class.wrapping_sub(1)) {
                    counter.fetch_add(1, Relaxed);
                }
            }
        }
    }
}

/// Renders every metric in the Prometheus text exposition format (version 0.0.4).
pub(crate) fn render(shared: &Shared) -> String {
    let m = &shared.metrics;
    let (live, parked) = shared.routes.counts();
    let mut out = String::with_capacity(4096);
    let mut family = |name: &str, kind: &str, help: &str, samples: &[(&str, f64)]| {
        let _ = writeln!(out, "# HELP jobgate_{name} {help}");
        let _ = writeln!(out, "# TYPE jobgate_{name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "jobgate_{name}{labels} {value}");
        }
    };
    let n = |a: &AtomicU64| a.load(Relaxed) as f64;
    family(
        "sessions",
        "gauge",
        "Sessions by state: live (agent connected) or parked (agent gone, name held for the resume grace).",
        &[
            ("{state=\"live\"}", live as f64),
            ("{state=\"parked\"}", parked as f64),
        ],
    );
    family(
        "sessions_by_transport",
        "gauge",
        "Live sessions by the transport their agent uses: quic, or tcp (TLS over TCP where UDP is blocked).",
        &[
            ("{transport=\"quic\"}", m.sessions_transport[0].get() as f64),
            ("{transport=\"tcp\"}", m.sessions_transport[1].get() as f64),
        ],
    );
    if let Some(cluster) = &shared.cluster {
        let by_relay: Vec<(String, f64)> = cluster
            .node
            .sessions_by_relay()
            .into_iter()
            .map(|(relay, count)| (format!("{{relay=\"{relay}\"}}"), count as f64))
            .collect();
        let samples: Vec<(&str, f64)> = by_relay.iter().map(|(l, v)| (l.as_str(), *v)).collect();
        family(
            "cluster_sessions",
            "gauge",
            "In a cluster: sessions held by each relay alive (node id), from etcd's routes as this relay sees them.",
            &samples,
        );
        let this = format!("{{relay=\"{}\"}}", cluster.node.node_id());
        family(
            "cluster_node",
            "gauge",
            "In a cluster: this relay's node id (always 1).",
            &[(this.as_str(), 1.0)],
        );
        family(
            "peer_forwarded_connections_total",
            "counter",
            "In a cluster: browser connections handed to the relay that holds their session.",
            &[("", n(&m.peer_forwarded_connections))],
        );
    }
    let per_core = shared.core_load.snapshot();
    if per_core.len() > 1 {
        let labels: Vec<String> = (0..per_core.len())
            .map(|core| format!("{{core=\"{core}\"}}"))
            .collect();
        let (clients, agents): (Vec<_>, Vec<_>) = labels
            .iter()
            .zip(&per_core)
            .map(|(label, (clients, agents))| {
                (
                    (label.as_str(), *clients as f64),
                    (label.as_str(), *agents as f64),
                )
            })
            .unzip();
        family(
            "core_client_connections_total",
            "counter",
            "With cores > 1: client connections each core accepted (the kernel spreads them by address).",
            &clients,
        );
        family(
            "core_agent_connections",
            "gauge",
            "With cores > 1: agent connections (QUIC) each core drives now.",
            &agents,
        );
    }
    family(
        "agent_tcp_connections_total",
        "counter",
        "Agent connections accepted over TLS/TCP on the HTTPS listener.",
        &[("", n(&m.agent_tcp_connections))],
    );
    family(
        "sessions_opened_total",
        "counter",
        "Sessions admitted, by whether a resume ticket gave the old name back.",
        &[
            ("{resumed=\"false\"}", n(&m.sessions_opened)),
            ("{resumed=\"true\"}", n(&m.sessions_resumed)),
        ],
    );
    family(
        "sessions_closed_total",
        "counter",
        "Agent connections that ended.",
        &[("", n(&m.sessions_closed))],
    );
    family(
        "agents_refused_total",
        "counter",
        "Hellos refused (token, limits, ticket, malformed).",
        &[("", n(&m.agents_refused))],
    );
    family(
        "agent_handshakes_failed_total",
        "counter",
        "Agent connections that failed the QUIC handshake or sent no Hello in time.",
        &[("", n(&m.agent_handshakes_failed))],
    );
    family(
        "requests_total",
        "counter",
        "Requests received by the front door.",
        &[("", n(&m.requests))],
    );
    let classes = ["1xx", "2xx", "3xx", "4xx", "5xx"];
    let app: Vec<(String, f64)> = classes
        .iter()
        .zip(&m.app_responses)
        .map(|(class, c)| (format!("{{class=\"{class}\"}}"), n(c)))
        .collect();
    let app: Vec<(&str, f64)> = app.iter().map(|(l, v)| (l.as_str(), *v)).collect();
    family(
        "app_responses_total",
        "counter",
        "Responses from apps, by status class.",
        &app,
    );
    let pages: Vec<(String, f64)> = Page::ALL
        .iter()
        .zip(&m.pages)
        .map(|(page, c)| {
            (
                format!(
                    "{{page=\"{}\",code=\"{}\"}}",
                    page.metric_label(),
                    page.status().as_u16()
                ),
                n(c),
            )
        })
        .collect();
    let pages: Vec<(&str, f64)> = pages.iter().map(|(l, v)| (l.as_str(), *v)).collect();
    family(
        "relay_pages_total",
        "counter",
        "Answers the relay gave itself instead of the app's, by page.",
        &pages,
    );
    family(
        "requests_in_flight",
        "gauge",
        "Requests waiting for the app's response head.",
        &[(
            "",
            shared.in_flight.load(std::sync::atomic::Ordering::Relaxed) as f64,
        )],
    );
    family(
        "upgraded_connections",
        "gauge",
        "Upgraded connections (WebSockets) open through the relay.",
        &[("", m.upgraded.get() as f64)],
    );
    family(
        "client_connections",
        "gauge",
        "Client connections open on the front door.",
        &[("", m.client_connections.get() as f64)],
    );
    family(
        "client_connections_refused_total",
        "counter",
        "Client connections closed at once because a cap was reached (before TLS).",
        &[
            ("{cap=\"total\"}", n(&m.client_connections_refused[0])),
            ("{cap=\"per_ip\"}", n(&m.client_connections_refused[1])),
        ],
    );
    family(
        "client_connections_idle_closed_total",
        "counter",
        "Client connections closed after the idle timeout with nothing in flight.",
        &[("", n(&m.client_connections_idle_closed))],
    );
    family(
        "agent_handshakes_pending",
        "gauge",
        "Agent connections between their first packet and their Hello's answer.",
        &[("", m.pending_handshakes.get() as f64)],
    );
    family(
        "agent_handshakes_retried_total",
        "counter",
        "New agent connections sent a QUIC Retry (address validation) under load.",
        &[("", n(&m.agent_handshakes_retried))],
    );
    family(
        "agent_handshakes_refused_total",
        "counter",
        "New agent connections refused because max_pending_handshakes were pending.",
        &[("", n(&m.agent_handshakes_over_cap))],
    );
    family(
        "sessions_by_window",
        "gauge",
        "Live sessions by receive window: full (from the memory budget) or small (budget spent).",
        &[
            ("{window=\"full\"}", m.sessions_full_window.get() as f64),
            (
                "{window=\"small\"}",
                (live as i64 - m.sessions_full_window.get()).max(0) as f64,
            ),
        ],
    );
    family(
        "sessions_small_window_total",
        "counter",
        "Sessions admitted with the small receive window because the memory budget was spent.",
        &[("", n(&m.sessions_small_window))],
    );
    family(
        "runtime_tasks",
        "gauge",
        "Tasks alive in the relay's async runtimes (the main one and, with cores > 1, each core's).",
        &[(
            "",
            (tokio::runtime::Handle::try_current()
                .map_or(0, |runtime| runtime.metrics().num_alive_tasks())
                + shared.core_load.tasks_alive()) as f64,
        )],
    );
    family(
        "draining",
        "gauge",
        "1 while the relay drains (SIGTERM), else 0.",
        &[("", f64::from(u8::from(*shared.draining.borrow())))],
    );
    if let Some((rss, fds)) = process_figures() {
        family(
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory of the relay process.",
            &[("", rss as f64)],
        );
        family(
            "process_open_fds",
            "gauge",
            "Open file descriptors of the relay process.",
            &[("", fds as f64)],
        );
    }
    out
}

/// Resident bytes and open descriptors of this process, where /proc tells.
fn process_figures() -> Option<(u64, u64)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let rss_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let fds = std::fs::read_dir("/proc/self/fd").ok()?.count() as u64;
    Some((rss_kib * 1024, fds))
}

/// Serves `/metrics` and `/healthz` on `listener` until the task is aborted.
pub(crate) async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let mut backoff = crate::limits::AcceptBackoff::new("metrics");
    loop {
        let (tcp, _) = match listener.accept().await {
            Ok(accepted) => {
                backoff.succeeded();
                accepted
            }
            Err(e) => {
                backoff.failed(&e).await;
                continue;
            }
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| answer(shared.clone(), req));
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(METRICS_HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}

async fn answer(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.uri().path().starts_with(crate::admin::API_PREFIX) {
        return Ok(crate::admin::answer(&shared, &req));
    }
    let (status, content_type, body) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => (
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            render(&shared),
        ),
        (&Method::GET, "/healthz") if *shared.draining.borrow() => (
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain; charset=utf-8",
            "draining\n".to_owned(),
        ),
        (&Method::GET, "/healthz") => (
            StatusCode::OK,
            "text/plain; charset=utf-8",
            "ok\n".to_owned(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found: try /metrics or /healthz\n".to_owned(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    Ok(response)
}
