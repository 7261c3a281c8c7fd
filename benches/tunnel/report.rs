//! Results: metrics with their samples per variant, the targets of issue 5 and their
//! verdicts, the printed table and the JSON; and what the machine was.

use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// A target from issue 5, checked against the primary jobgate variant.
#[derive(Debug, Clone)]
pub enum Target {
    /// median ≥ value
    Min(f64),
    /// median ≤ value
    Max(f64),
    /// median − direct median ≤ value
    AddedMax(f64),
    /// median / direct median ≥ value
    RatioMin(f64),
    /// median ≥ fraction × the median of another metric's only variant
    FractionOf(&'static str, f64),
    /// median ≥ factor × another variant's median in the same run (rathole-tls)
    VsVariantMin(&'static str, f64),
    /// median ≤ another variant's median in the same run (idle CPU: rathole-tls's)
    VsVariantAtMost(&'static str),
}

/// The plain L4 tunnel every jobgate figure is also compared with (issue 18).
pub const L4_BASELINE: &str = "rathole-tls";

#[derive(Debug, Default)]
pub struct Metric {
    pub id: String,
    pub scenario: String,
    pub name: String,
    pub unit: &'static str,
    pub higher_is_better: bool,
    pub samples: BTreeMap<String, Vec<f64>>,
    pub targets: Vec<Target>,
    pub notes: Vec<String>,
    pub errors: Vec<String>,
    pub detail: serde_json::Map<String, Value>,
}

pub struct Report {
    pub metrics: Vec<Metric>,
    /// Variant column order.
    pub variants: Vec<String>,
    /// The jobgate variant the targets are checked against.
    pub primary: String,
    pub skipped: Vec<String>,
}

pub fn median(values: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let mid = v.len() / 2;
    Some(if v.len().is_multiple_of(2) {
        (v[mid - 1] + v[mid]) / 2.0
    } else {
        v[mid]
    })
}

/// Nearest-rank percentile of unsorted samples.
pub fn percentile(values: &[f64], p: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

impl Report {
    pub fn metric(
        &mut self,
        id: &str,
        scenario: &str,
        name: &str,
        unit: &'static str,
        higher_is_better: bool,
    ) -> &mut Metric {
        if let Some(i) = self.metrics.iter().position(|m| m.id == id) {
            return &mut self.metrics[i];
        }
        self.metrics.push(Metric {
            id: id.to_owned(),
            scenario: scenario.to_owned(),
            name: name.to_owned(),
            unit,
            higher_is_better,
            ..Default::default()
        });
        let last = self.metrics.len() - 1;
        &mut self.metrics[last]
    }

    pub fn get(&self, id: &str) -> Option<&Metric> {
        self.metrics.iter().find(|m| m.id == id)
    }

    pub fn med(&self, m: &Metric, variant: &str) -> Option<f64> {
        m.samples.get(variant).and_then(|s| median(s))
    }

    pub fn ratio(&self, m: &Metric) -> Option<f64> {
        let d = self.med(m, "direct")?;
        let j = self.med(m, &self.primary)?;
        (d != 0.0).then_some(j / d)
    }

    /// The primary variant's median over `other`'s, in the same run.
    pub fn vs(&self, m: &Metric, other: &str) -> Option<f64> {
        let o = self.med(m, other)?;
        let j = self.med(m, &self.primary)?;
        (o != 0.0).then_some(j / o)
    }

    /// (target text, met?) for each target of `m`.
    pub fn verdicts(&self, m: &Metric) -> Vec<(String, Option<bool>)> {
        let primary = self.med(m, &self.primary);
        let direct = self.med(m, "direct");
        m.targets
            .iter()
            // A comparison with a variant that did not run (rathole not built) is no verdict.
            .filter(
                |t| !matches!(t, Target::VsVariantMin(other, _) | Target::VsVariantAtMost(other) if self.med(m, other).is_none()),
            )
            .map(|t| match t {
                Target::Min(v) => (
                    format!("≥ {} {}", fmt_num(*v, m.unit), m.unit),
                    primary.map(|p| p >= *v),
                ),
                Target::Max(v) => (
                    format!("≤ {} {}", fmt_num(*v, m.unit), m.unit),
                    primary.map(|p| p <= *v),
                ),
                Target::AddedMax(v) => {
                    let added = primary.zip(direct).map(|(p, d)| p - d);
                    (
                        format!(
                            "added ≤ {} {} (is {})",
                            fmt_num(*v, m.unit),
                            m.unit,
                            added.map_or("?".into(), |a| format!("{a:+.0}"))
                        ),
                        added.map(|a| a <= *v),
                    )
                }
                Target::RatioMin(v) => (format!("≥ {v}× direct"), self.ratio(m).map(|r| r >= *v)),
                Target::VsVariantMin(other, f) => (
                    format!("≥ {f}× {other}"),
                    self.vs(m, other).map(|r| r >= *f),
                ),
                Target::VsVariantAtMost(other) => {
                    let theirs = self.med(m, other);
                    (
                        format!(
                            "≤ {other} ({})",
                            theirs.map_or("?".into(), |t| fmt_num(t, m.unit))
                        ),
                        primary.zip(theirs).map(|(p, t)| p <= t),
                    )
                }
                Target::FractionOf(other, f) => {
                    let ceiling = self
                        .get(other)
                        .and_then(|o| o.samples.values().next())
                        .and_then(|s| median(s));
                    (
                        format!(
                            "≥ {f}× quinn ceiling ({})",
                            ceiling.map_or("?".into(), |c| format!("≥ {:.0}", c * f))
                        ),
                        primary.zip(ceiling).map(|(p, c)| p >= c * f),
                    )
                }
            })
            .collect()
    }

    pub fn print_table(&self) {
        let mut header = vec![
            "scenario".to_owned(),
            "metric".to_owned(),
            "unit".to_owned(),
        ];
        header.extend(self.variants.iter().cloned());
        let with_baseline = self.variants.iter().any(|v| v == L4_BASELINE);
        header.push("ratio".to_owned());
        if with_baseline {
            header.push(format!("÷ {L4_BASELINE}"));
        }
        header.extend(["target".to_owned(), "verdict".to_owned()]);
        let mut rows = vec![header];
        for m in &self.metrics {
            let mut row = vec![m.scenario.clone(), m.name.clone(), m.unit.to_owned()];
            for v in &self.variants {
                row.push(match m.samples.get(v).and_then(|s| median(s)) {
                    Some(x) => fmt_num(x, m.unit),
                    None if m.errors.iter().any(|e| e.starts_with(&format!("{v}:"))) => {
                        "ERR".into()
                    }
                    None => "-".into(),
                });
            }
            row.push(self.ratio(m).map_or("-".into(), |r| format!("{r:.2}")));
            if with_baseline {
                row.push(
                    self.vs(m, L4_BASELINE)
                        .map_or("-".into(), |r| format!("{r:.2}")),
                );
            }
            let verdicts = self.verdicts(m);
            row.push(
                verdicts
                    .iter()
                    .map(|(t, _)| t.clone())
                    .collect::<Vec<_>>()
                    .join("; "),
            );
            row.push(verdict_word(&verdicts).to_owned());
            rows.push(row);
        }
        let widths: Vec<usize> = (0..rows[0].len())
            .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
            .collect();
        println!();
        for (i, row) in rows.iter().enumerate() {
            let line: Vec<String> = row
                .iter()
                .zip(&widths)
                .enumerate()
                .map(|(c, (cell, w))| {
                    let pad = w - cell.chars().count();
                    if c >= 3 && c < 3 + self.variants.len() + 1 + usize::from(with_baseline) {
                        format!("{}{cell}", " ".repeat(pad))
                    } else {
                        format!("{cell}{}", " ".repeat(pad))
                    }
                })
                .collect();
            println!("{}", line.join("  ").trim_end());
            if i == 0 {
                let total: usize = widths.iter().sum::<usize>() + 2 * (widths.len() - 1);
                println!("{}", "-".repeat(total));
            }
        }
        for m in &self.metrics {
            for e in &m.errors {
                println!("error  {} {}: {e}", m.scenario, m.name);
            }
        }
        for s in &self.skipped {
            println!("skipped: {s}");
        }
    }

    pub fn to_json(&self) -> Value {
        let metrics: Vec<Value> = self
            .metrics
            .iter()
            .map(|m| {
                let variants: serde_json::Map<String, Value> = m
                    .samples
                    .iter()
                    .map(|(v, s)| (v.clone(), json!({"median": median(s), "samples": s})))
                    .collect();
                let verdicts = self.verdicts(m);
                json!({
                    "id": m.id,
                    "scenario": m.scenario,
                    "metric": m.name,
                    "unit": m.unit,
                    "higher_is_better": m.higher_is_better,
                    "variants": variants,
                    "ratio_vs_direct": self.ratio(m),
                    "targets": verdicts.iter().map(|(t, ok)| json!({"target": t, "met": ok})).collect::<Vec<_>>(),
                    "verdict": verdict_word(&verdicts),
                    "notes": m.notes,
                    "errors": m.errors,
                    "detail": m.detail,
                })
            })
            .collect();
        json!({
            "primary_variant": self.primary,
            "variants": self.variants,
            "metrics": metrics,
            "skipped": self.skipped,
        })
    }
}

pub fn verdict_word(verdicts: &[(String, Option<bool>)]) -> &'static str {
    if verdicts.is_empty() {
        ""
    } else if verdicts.iter().any(|(_, ok)| ok.is_none()) {
        "n/a"
    } else if verdicts.iter().all(|(_, ok)| *ok == Some(true)) {
        "met"
    } else {
        "MISSED"
    }
}

pub fn fmt_num(x: f64, unit: &str) -> String {
    match unit {
        "KiB" | "ratio" => format!("{x:.1}"),
        "ms" if x < 100.0 => format!("{x:.1}"),
        "s" | "×" => format!("{x:.2}"),
        _ if x.abs() >= 100.0 => format!("{x:.0}"),
        _ => format!("{x:.1}"),
    }
}

/// Where the JSON goes: `$JOBGATE_BENCH_JSON`, else `<target>/bench/tunnel.json`.
pub fn json_path() -> PathBuf {
    if let Some(p) = std::env::var_os("JOBGATE_BENCH_JSON") {
        return p.into();
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .or_else(|| {
            // target/<profile>/deps/tunnel-<hash>
            let exe = std::env::current_exe().ok()?;
            Some(exe.parent()?.parent()?.parent()?.to_path_buf())
        })
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    target.join("bench").join("tunnel.json")
}

pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// The whole machine's CPU time so far, in clock ticks (`/proc/stat`).
#[derive(Debug, Clone, Copy)]
pub struct CpuTicks {
    /// user nice system idle iowait irq softirq steal (guest time is inside user).
    pub total: u64,
    /// idle + iowait.
    pub idle: u64,
    /// Taken by the hypervisor.
    pub steal: u64,
}

impl CpuTicks {
    /// Share of the time between `self` and `later` spent as `part` picks, in %.
    pub fn percent(self, later: Self, part: fn(Self) -> u64) -> f64 {
        100.0 * part(later).saturating_sub(part(self)) as f64
            / later.total.saturating_sub(self.total).max(1) as f64
    }

    /// CPU time the whole machine spent busy (neither idle nor stolen) between `self` and
    /// `later`, in µs.
    pub fn busy_us(self, later: Self) -> f64 {
        let busy = |t: Self| t.total.saturating_sub(t.idle).saturating_sub(t.steal);
        busy(later).saturating_sub(busy(self)) as f64 * 1e6 / clock_ticks_per_second()
    }
}

fn clock_ticks_per_second() -> f64 {
    use nix::unistd::{sysconf, SysconfVar};
    match sysconf(SysconfVar::CLK_TCK) {
        Ok(Some(hz)) if hz > 0 => hz as f64,
        _ => 100.0,
    }
}

/// CPU time (user + system) in µs of `who`: this thread, this process (the bench's
/// clients), or its children that have exited and been waited for (read before and
/// after a load tool runs, the tool's own cost).
pub fn cpu_us(who: nix::sys::resource::UsageWho) -> f64 {
    nix::sys::resource::getrusage(who).map_or(f64::NAN, |u| {
        let t = u.user_time() + u.system_time();
        t.tv_sec() as f64 * 1e6 + t.tv_usec() as f64
    })
}

pub fn read_cpu_stat() -> Option<CpuTicks> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    Some(CpuTicks {
        total: f.iter().take(8).sum(),
        idle: f.get(3)? + f.get(4)?,
        steal: *f.get(7)?,
    })
}

pub fn machine_info() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    json!({
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "model": model,
        "kernel": kernel.trim(),
        "mem_total_kib": proc_meminfo("MemTotal:"),
        "loadavg_start": loadavg(),
    })
}

pub fn proc_meminfo(field: &str) -> Option<u64> {
    std::fs::read_to_string("/proc/meminfo")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(field))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Runs `f` for each repetition over the variants, rotating their order each time so
/// no variant always runs first (or right after a heavy one).
pub fn alternate<V>(reps: usize, variants: &[V], mut f: impl FnMut(usize, &V)) {
    for rep in 0..reps {
        for i in 0..variants.len() {
            f(rep, &variants[(i + rep) % variants.len()]);
        }
    }
}

/// A metric's identity: (id, scenario, name, unit, higher is better).
pub type MetricKey<'a> = (&'a str, &'a str, &'a str, &'static str, bool);

pub fn record_error(report: &mut Report, key: MetricKey, variant: &str, e: &anyhow::Error) {
    let (id, scenario, name, unit, higher) = key;
    eprintln!("  {variant}: error: {e:#}");
    report
        .metric(id, scenario, name, unit, higher)
        .errors
        .push(format!("{variant}: {e:#}"));
}

pub fn add_cpu_detail(m: &mut Metric, variant: &str, cpu: &BTreeMap<String, f64>) {
    let entry = m
        .detail
        .entry(format!("cpu_{variant}"))
        .or_insert_with(|| json!([]));
    if let Some(list) = entry.as_array_mut() {
        list.push(json!(cpu));
    }
}
