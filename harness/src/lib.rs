//! The test-and-bench harness of jobgate: what the end-to-end tests (`tests/`), the tunnel
//! bench (`benches/tunnel/`) and the soak (`benches/soak/`) share.
//!
//! * [`process`]: child processes with collected stderr, reaped on drop; figures from /proc;
//! * [`startup`]: the relay's startup lines, parsed in one place;
//! * [`stack`]: a scratch PKI and tokens, relays and agents of the real `jobgate` binary;
//! * [`client`]: TLS, HTTP/1.1, HTTP/2 and WebSocket clients of the front door;
//! * [`app`]: the backend app of the benches and the soak;
//! * [`etcd`]: a real etcd server for the cluster tests.
//!
//! Steps come in two forms: a `Result` one for benches, and a panicking one with the names
//! the tests use (`start_relay`, `start_agent`, `get`, ...), re-exported at the root.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod app;
pub mod client;
pub mod error;
pub mod etcd;
pub mod process;
pub mod stack;
pub mod startup;

pub use client::{
    agent_quic_config, assert_serves, collect, demo_byte, download_checked, empty, eventually,
    full, get, h1, h2, hand_made_session, json, metric_sample, plain_http, status_of, tls_connect,
    upload_checked, HandMadeSession, TestBody,
};
pub use error::{Error, Result};
pub use process::{peak_rss_kib, rss_kib, spawn, Proc};
pub use stack::{
    agent_command, bin, demo_app_command, set_mode, start_agent, start_agent_command, start_app,
    start_demo_agent, start_demo_agent_with, start_relay, start_relay_at, start_relay_via,
    AgentProc, RelayProc, TestEnv, DOMAIN,
};
