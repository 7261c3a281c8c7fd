//! Scenario 3: bulk downloads and uploads on one connection (curl), HTTP/1.1 and HTTP/2,
//! against the quinn ceiling (`ceiling.rs`).

use crate::ceiling::quinn_ceiling;
use crate::report::{add_cpu_detail, alternate, record_error, Report, Target};
use crate::setup::{missing, JobgateStack, Setup, Tools};
use crate::tools::{curl_transfer, HttpVariant, Payload};
use crate::Opts;
use jobgate_harness::process::proc_status_kib;

pub fn scenario_bulk(
    opts: &Opts,
    tools: &Tools,
    setup: &Setup,
    download_variants: &[HttpVariant],
    upload_variants: &[HttpVariant],
    download_path: &str,
    report: &mut Report,
) {
    let size = format!("{} MiB", opts.bulk_bytes >> 20);
    let sc = "3 bulk".to_owned();
    eprintln!("[bulk] quinn ceiling, {size} × {} reps", opts.reps);
    for rep in 0..opts.reps {
        match quinn_ceiling(setup, opts.bulk_bytes) {
            Ok((rate, cpu)) => {
                eprintln!("  rep {rep} quinn ceiling: {rate:.0} MB/s, {cpu:.0} µs CPU per MB");
                report
                    .metric(
                        "bulk.ceiling",
                        &sc,
                        &format!("quinn 1-stream ceiling ({size})"),
                        "MB/s",
                        true,
                    )
                    .samples
                    .entry("ceiling".into())
                    .or_default()
                    .push(rate);
                report
                    .metric(
                        "bulk.ceiling.cpu",
                        &sc,
                        "quinn ceiling CPU per MB (both ends)",
                        "µs",
                        false,
                    )
                    .samples
                    .entry("ceiling".into())
                    .or_default()
                    .push(cpu);
            }
            Err(e) => record_error(
                report,
                (
                    "bulk.ceiling",
                    &sc,
                    &format!("quinn 1-stream ceiling ({size})"),
                    "MB/s",
                    true,
                ),
                "ceiling",
                &e,
            ),
        }
    }
    if tools.curl.is_none() {
        report.skipped.push(missing("bulk", "curl"));
        return;
    }
    // direct-tls is left out of bulk: nginx's TLS throughput is not what is compared.
    let down: Vec<HttpVariant> = download_variants
        .iter()
        .filter(|v| v.name != "direct-tls")
        .cloned()
        .collect();
    // HTTP/2 rows: a quarter of the size, one repetition, direct and the primary variant
    // only (time budget); the targets are checked on the HTTP/1.1 rows.
    let h2_down: Vec<HttpVariant> = down
        .iter()
        .filter(|v| v.name == "direct" || v.name == report.primary)
        .cloned()
        .collect();
    let h2_up: Vec<HttpVariant> = upload_variants
        .iter()
        .filter(|v| v.name == "direct" || v.name == report.primary)
        .cloned()
        .collect();
    let quarter_path = if download_path == "/big" {
        "/quarter".to_owned()
    } else {
        format!("/bytes?n={}", opts.bulk_bytes / 4)
    };
    let plans = [
        (
            false,
            "h1",
            opts.bulk_bytes,
            opts.reps,
            download_path,
            &setup.big,
            &down[..],
            upload_variants,
        ),
        (
            true,
            "h2",
            opts.bulk_bytes / 4,
            1,
            &quarter_path[..],
            &setup.quarter,
            &h2_down[..],
            &h2_up[..],
        ),
    ];
    for (h2, proto, bytes, reps, download, upload_file, down_variants, up_variants) in plans {
        for (upload, variants, what) in [
            (false, down_variants, "download"),
            (true, up_variants, "upload"),
        ] {
            let id = format!("bulk.{what}.{proto}");
            let name = format!("{what} ({proto}, {} MiB)", bytes >> 20);
            eprintln!("[bulk] curl {name} × {reps} reps");
            alternate(reps, variants, |rep, v| {
                match curl_transfer(
                    tools,
                    setup,
                    v,
                    upload,
                    h2,
                    &Payload {
                        bytes,
                        download_path: download,
                        upload_file,
                    },
                ) {
                    Ok(t) => {
                        eprintln!(
                            "  rep {rep} {}: {:.0} MB/s (cpu µs/MB {:?})",
                            v.name, t.mb_s, t.cpu_us_per_mb
                        );
                        let m = report.metric(&id, &sc, &name, "MB/s", true);
                        m.samples.entry(v.name.clone()).or_default().push(t.mb_s);
                        if m.targets.is_empty() && !h2 {
                            m.targets =
                                vec![Target::Min(400.0), Target::FractionOf("bulk.ceiling", 0.7)];
                            if !upload {
                                // rathole carries downloads from nginx (no upload sink).
                                m.targets
                                    .push(Target::VsVariantMin(crate::report::L4_BASELINE, 1.25));
                            }
                        }
                        add_cpu_detail(m, &v.name, &t.cpu_us_per_mb);
                        if !h2 {
                            let total: f64 = t.cpu_us_per_mb.values().sum();
                            report
                                .metric(
                                    &format!("{id}.cpu"),
                                    &sc,
                                    &format!("{what} server CPU per MB"),
                                    "µs",
                                    false,
                                )
                                .samples
                                .entry(v.name.clone())
                                .or_default()
                                .push(total);
                        }
                    }
                    Err(e) => record_error(report, (&id, &sc, &name, "MB/s", true), &v.name, &e),
                }
            });
        }
    }
}

/// The peak RSS of each variant's relay so far (after the bulk transfers).
pub fn record_relay_peaks(stacks: &[JobgateStack], report: &mut Report) {
    for s in stacks {
        if let Ok(hwm) = proc_status_kib(s.relay.proc.pid(), "VmHWM:") {
            report
                .metric(
                    "bulk.relay_hwm",
                    "3 bulk",
                    "relay peak RSS (whole run so far)",
                    "MiB",
                    false,
                )
                .samples
                .entry(s.name.clone())
                .or_default()
                .push(hwm as f64 / 1024.0);
        }
    }
}
