//! Scenario 1: the latency of one small GET on one connection (wrk -c1), p50 and p99.

use crate::report::{add_cpu_detail, alternate, record_error, Report, Target};
use crate::setup::{missing, Setup, Tools};
use crate::tools::{wrk, wrk_variants, HttpVariant};
use crate::Opts;

pub fn scenario_latency(
    opts: &Opts,
    tools: &Tools,
    setup: &Setup,
    variants: &[HttpVariant],
    report: &mut Report,
) {
    const SC: &str = "1 small GET, 1 conn";
    if tools.wrk.is_none() {
        report.skipped.push(missing("latency", "wrk"));
        return;
    }
    let variants = &wrk_variants(variants, "latency", &mut report.skipped);
    eprintln!(
        "[latency] wrk -t1 -c1, {} s × {} reps",
        opts.latency_secs, opts.reps
    );
    for v in variants {
        let _ = wrk(tools, setup, v, 1, 1); // warm-up
    }
    alternate(opts.reps, variants, |rep, v| {
        match wrk(tools, setup, v, 1, opts.latency_secs) {
            Ok(r) => {
                eprintln!(
                    "  rep {rep} {}: p50 {:.0} µs, p99 {:.0} µs, {:.0} req/s",
                    v.name, r.p50_us, r.p99_us, r.rps
                );
                let m = report.metric("latency.p50", SC, "p50 latency", "µs", false);
                m.samples.entry(v.name.clone()).or_default().push(r.p50_us);
                if m.targets.is_empty() {
                    m.targets.push(Target::AddedMax(150.0));
                }
                report
                    .metric("latency.p99", SC, "p99 latency", "µs", false)
                    .samples
                    .entry(v.name.clone())
                    .or_default()
                    .push(r.p99_us);
                let m = report.metric("latency.cpu", SC, "server CPU per request", "µs", false);
                m.samples
                    .entry(v.name.clone())
                    .or_default()
                    .push(r.cpu_us_per_req.values().sum());
                add_cpu_detail(m, &v.name, &r.cpu_us_per_req);
            }
            Err(e) => record_error(
                report,
                ("latency.p50", SC, "p50 latency", "µs", false),
                &v.name,
                &e,
            ),
        }
    });
}
