//! Shared plumbing for the end-to-end tests: the `jobgate-harness` crate (real `jobgate`
//! processes, real TLS, real HTTP/1.1, HTTP/2 and WebSocket clients), under the names the
//! tests use.
#![allow(dead_code, unused_imports)]

pub use jobgate_harness::*;

/// The `jobgate` binary cargo built for these tests (the harness finds the same file
/// next to the test executable; this checks that they agree).
pub fn bin() -> &'static str {
    let built = env!("CARGO_BIN_EXE_jobgate");
    debug_assert_eq!(
        std::fs::canonicalize(built).ok(),
        std::fs::canonicalize(jobgate_harness::bin()).ok(),
        "the harness runs another jobgate binary than cargo built"
    );
    built
}
