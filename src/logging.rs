//! Logging: what the person running the agent must read as plain `jobgate: …` lines,
//! diagnostics by `RUST_LOG`, or everything as one JSON object per line (`--log-format`).

use clap::ValueEnum;

/// How log events are written (`--log-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// `2026-12-04T22:53:00Z  INFO jobgate_relay::agents: session opened name=…`
    Text,
    /// `{"timestamp":…,"level":"INFO","fields":{"message":"session opened","name":…},"target":…}`
    Json,
}

/// Set once at start: whether status lines go out as JSON events.
static JSON_LOGS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether `--log-format json` is in force (status lines then go out as events).
pub fn json_logs() -> bool {
    JSON_LOGS.load(std::sync::atomic::Ordering::Relaxed)
}

/// Logging for one run: what the person running the agent must read (events with target
/// [`jobgate_agent::USER_TARGET`]) as plain `jobgate: …` lines, diagnostics by `RUST_LOG`
/// (default `default`) with time and level; or everything as JSON lines.
pub fn init_logging(default: &str, format: LogFormat) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;
    let user_target = jobgate_agent::USER_TARGET;
    // The user's lines have a layer of their own (text: `off` here) or are always on
    // in the one JSON stream (`info`).
    let diagnostics = |user_level: &str| {
        let filter = diagnostics_filter(default);
        match format!("{user_target}={user_level}").parse() {
            Ok(directive) => filter.add_directive(directive),
            Err(_) => filter,
        }
    };
    // The hint matters for speed: without one, a filter function counts as "might want
    // TRACE", so the whole subscriber's level stays at TRACE and every `debug!`/`trace!`
    // of the libraries (rustls's `log` records, ~26 per proxied request, each through
    // the `log` bridge and both layers' filters) is built and filtered at run time instead
    // of being skipped by one level compare. The user's lines are `info` and `warn`.
    let for_user = tracing_subscriber::filter::filter_fn(move |meta| meta.target() == user_target)
        .with_max_level_hint(tracing::Level::INFO);
    let _ = match format {
        LogFormat::Text => tracing_subscriber::registry()
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .event_format(UserLine)
                    .with_filter(for_user),
            )
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_filter(diagnostics("off")),
            )
            .try_init(),
        LogFormat::Json => {
            JSON_LOGS.store(true, std::sync::atomic::Ordering::Relaxed);
            tracing_subscriber::registry()
                .with(
                    tracing_subscriber::fmt::layer()
                        .json()
                        .with_current_span(false)
                        .with_writer(std::io::stderr)
                        .with_filter(diagnostics("info")),
                )
                .try_init()
        }
    };
}

/// The diagnostics `RUST_LOG` asks for, or `default`.
fn diagnostics_filter(default: &str) -> tracing_subscriber::EnvFilter {
    tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default))
}

/// `jobgate: <message>` (`jobgate: warning: …` for warnings): the agent's lines for the
/// person who reads the job's output, as they always looked.
struct UserLine;

impl<S, N> tracing_subscriber::fmt::FormatEvent<S, N> for UserLine
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let warning = *event.metadata().level() <= tracing::Level::WARN;
        write!(
            writer,
            "jobgate: {}",
            if warning { "warning: " } else { "" }
        )?;
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing::level_filters::LevelFilter;

    // The only test that installs the process's subscriber (it is global).
    #[test]
    fn library_debug_and_trace_calls_are_skipped_unless_asked_for() {
        init_logging("warn", LogFormat::Text);
        // The user's lines need `info`; more only where `RUST_LOG` asks for more. At
        // `TRACE` every library `trace!` (yamux logs one per frame) would be built and
        // filtered at run time.
        let asked = diagnostics_filter("warn").max_level_hint();
        let expected = asked.unwrap_or(LevelFilter::TRACE).max(LevelFilter::INFO);
        assert_eq!(LevelFilter::current(), expected);
    }
}
