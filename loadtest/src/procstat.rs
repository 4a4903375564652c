//! Bridge CPU and memory, sampled from `/proc/<pid>/stat` and `/proc/<pid>/status`.
//!
//! CPU % is the sum over the sampled pids of (user + system ticks) per wall second,
//! where 100 % is one full core. RSS is the sum of `VmRSS` over the pids.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::stop::Stop;
use serde::Serialize;

/// Kernel clock ticks per second for `/proc/<pid>/stat` (`USER_HZ`). It is 100 on every
/// Linux architecture we run on; reading it via `sysconf` would need `unsafe` FFI.
const CLK_TCK: f64 = 100.0;

/// `utime + stime` in ticks, parsed from the text of `/proc/<pid>/stat`.
pub fn parse_stat_ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ')' come field 3 (state) onwards; utime and stime are fields 14 and 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// `VmRSS` in KiB, parsed from the text of `/proc/<pid>/status`.
pub fn parse_status_rss_kib(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Summary of the samples taken during a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct ProcSummary {
    pub samples: u64,
    pub cpu_percent_mean: f64,
    pub cpu_percent_max: f64,
    pub rss_mib_mean: f64,
    pub rss_mib_max: f64,
}

/// Reduces (cpu %, rss MiB) samples.
pub fn summarize(samples: &[(f64, f64)]) -> Option<ProcSummary> {
    if samples.is_empty() {
        return None;
    }
    let n = samples.len() as f64;
    Some(ProcSummary {
        samples: samples.len() as u64,
        cpu_percent_mean: samples.iter().map(|s| s.0).sum::<f64>() / n,
        cpu_percent_max: samples.iter().map(|s| s.0).fold(0.0, f64::max),
        rss_mib_mean: samples.iter().map(|s| s.1).sum::<f64>() / n,
        rss_mib_max: samples.iter().map(|s| s.1).fold(0.0, f64::max),
    })
}

fn read_ticks_and_rss(pids: &[u32]) -> Option<(u64, u64)> {
    let mut ticks = 0;
    let mut rss = 0;
    for pid in pids {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        ticks += parse_stat_ticks(&stat)?;
        rss += parse_status_rss_kib(&status)?;
    }
    Some((ticks, rss))
}

/// Samples the pids every `every` until stopped; returns the per-interval samples.
pub async fn sample(pids: Vec<u32>, every: Duration, stop: Stop) -> Vec<(f64, f64)> {
    let mut out = Vec::new();
    if pids.is_empty() {
        return out;
    }
    let Some((mut last_ticks, _)) = read_ticks_and_rss(&pids) else {
        tracing::warn!(
            ?pids,
            "Cannot read /proc for the bridge pids; CPU and RSS are not sampled."
        );
        return out;
    };
    let mut last = Instant::now();
    loop {
        if stop.wait_timeout(every).await {
            break;
        }
        let Some((ticks, rss_kib)) = read_ticks_and_rss(&pids) else {
            tracing::warn!(?pids, "A bridge process went away; sampling stops.");
            break;
        };
        let now = Instant::now();
        let secs = now.duration_since(last).as_secs_f64().max(1e-3);
        let cpu = ticks.saturating_sub(last_ticks) as f64 / CLK_TCK / secs * 100.0;
        out.push((cpu, rss_kib as f64 / 1024.0));
        last_ticks = ticks;
        last = now;
    }
    out
}

/// Reads every `<prefix>*.pid` in `dir` (the local stack's `.stack/pids`), e.g. `bridge-`
/// for the bridge replicas or `ingest-http` for the sidecar; only live processes.
pub fn pids_from_dir(dir: &Path, prefix: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = entries
        .flatten()
        .filter(|e| {
            let n = e.file_name();
            let n = n.to_string_lossy();
            n.starts_with(prefix) && n.ends_with(".pid")
        })
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .filter_map(|s| s.trim().parse().ok())
        .filter(|pid: &u32| Path::new(&format!("/proc/{pid}")).exists())
        .collect();
    pids.sort_unstable();
    pids
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ticks_even_with_odd_command_names() {
        let stat = "1234 (argus bridge) (x)) S 1 1234 1234 0 -1 4194560 500 0 0 0 250 50 0 0 20 0 9 0 100 200000000 3000 18446744073709551615";
        assert_eq!(parse_stat_ticks(stat), Some(300));
        assert_eq!(parse_stat_ticks("garbage"), None);
    }

    #[test]
    fn parses_vmrss() {
        let status = "Name:\targus-bridge\nVmPeak:\t  99999 kB\nVmRSS:\t   20480 kB\nThreads:\t9\n";
        assert_eq!(parse_status_rss_kib(status), Some(20480));
        assert_eq!(parse_status_rss_kib("Name: x\n"), None);
    }

    #[test]
    fn summary_is_mean_and_max() {
        let s = summarize(&[(50.0, 10.0), (150.0, 30.0)]).unwrap();
        assert_eq!(s.samples, 2);
        assert!((s.cpu_percent_mean - 100.0).abs() < 1e-9);
        assert!((s.cpu_percent_max - 150.0).abs() < 1e-9);
        assert!((s.rss_mib_mean - 20.0).abs() < 1e-9);
        assert!((s.rss_mib_max - 30.0).abs() < 1e-9);
        assert_eq!(summarize(&[]), None);
    }

    #[test]
    fn samples_this_process() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (h, stop) = crate::stop::stop_pair();
        let samples = rt.block_on(async move {
            let task = tokio::spawn(sample(
                vec![std::process::id()],
                Duration::from_millis(20),
                stop,
            ));
            tokio::time::sleep(Duration::from_millis(90)).await;
            h.stop();
            task.await.unwrap()
        });
        assert!(!samples.is_empty());
        assert!(samples.iter().all(|(_, rss)| *rss > 0.0));
    }
}

/// One process tree to sample: a root pid (from a `.pid` file) and its descendants (the
/// Postgres backends under the postmaster, for example).
#[derive(Debug, Clone)]
pub struct Group {
    pub name: String,
    pub root: u32,
}

/// CPU and memory of one process tree during the run.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct GroupSummary {
    pub name: String,
    pub cpu_percent_mean: f64,
    pub cpu_percent_max: f64,
    /// Peak of the summed RSS of the tree (shared pages counted once per process).
    pub rss_mib_max: f64,
}

/// Whole-machine CPU during the run (100 % = one core, so at most `cpus` x 100).
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct SystemCpu {
    pub cpu_percent_mean: f64,
    pub cpu_percent_max: f64,
}

/// `(pid, ppid, utime+stime)` from the text of `/proc/<pid>/stat`.
pub fn parse_stat_ppid_ticks(stat: &str) -> Option<(u32, u64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ppid: u32 = fields.get(1)?.parse().ok()?;
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((ppid, utime + stime))
}

/// `(busy, total)` jiffies from the first line of `/proc/stat`.
pub fn parse_proc_stat_busy(text: &str) -> Option<(u64, u64)> {
    let line = text.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    if v.len() < 5 {
        return None;
    }
    // user nice system idle iowait irq softirq steal ...: idle and iowait are not busy.
    let total: u64 = v.iter().take(8).sum();
    Some((total - v[3] - v[4], total))
}

/// Every process: pid -> (ppid, ticks).
fn snapshot() -> HashMap<u32, (u32, u64)> {
    let mut out = HashMap::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            if let Some(v) = parse_stat_ppid_ticks(&stat) {
                out.insert(pid, v);
            }
        }
    }
    out
}

/// The root and all its descendants present in `snap`.
pub fn tree(snap: &HashMap<u32, (u32, u64)>, root: u32) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    for (pid, (ppid, _)) in snap {
        children.entry(*ppid).or_default().push(*pid);
    }
    let mut out = Vec::new();
    let mut todo = vec![root];
    while let Some(p) = todo.pop() {
        if snap.contains_key(&p) && !out.contains(&p) {
            out.push(p);
            if let Some(c) = children.get(&p) {
                todo.extend(c);
            }
        }
    }
    out
}

fn system_busy() -> Option<(u64, u64)> {
    parse_proc_stat_busy(&std::fs::read_to_string("/proc/stat").ok()?)
}

/// Samples every group (process tree) and the whole machine until stopped.
pub async fn sample_groups(
    groups: Vec<Group>,
    every: Duration,
    stop: Stop,
) -> (Vec<GroupSummary>, Option<SystemCpu>) {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let mut last = snapshot();
    let mut last_sys = system_busy();
    let mut last_at = Instant::now();
    let mut per_group: Vec<Vec<(f64, f64)>> = vec![Vec::new(); groups.len()];
    let mut sys: Vec<f64> = Vec::new();
    loop {
        if stop.wait_timeout(every).await {
            break;
        }
        let snap = snapshot();
        let now = Instant::now();
        let secs = now.duration_since(last_at).as_secs_f64().max(1e-3);
        for (g, samples) in groups.iter().zip(per_group.iter_mut()) {
            let members = tree(&snap, g.root);
            if members.is_empty() {
                continue;
            }
            // A process born since the last sample contributes from its next sample on.
            let ticks: u64 = members
                .iter()
                .filter_map(|p| Some(snap.get(p)?.1.saturating_sub(last.get(p)?.1)))
                .sum();
            let rss_kib: u64 = members
                .iter()
                .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
                .filter_map(|s| parse_status_rss_kib(&s))
                .sum();
            samples.push((
                ticks as f64 / CLK_TCK / secs * 100.0,
                rss_kib as f64 / 1024.0,
            ));
        }
        let now_sys = system_busy();
        if let (Some((b0, t0)), Some((b1, t1))) = (last_sys, now_sys) {
            if t1 > t0 {
                sys.push((b1 - b0) as f64 / (t1 - t0) as f64 * cpus * 100.0);
            }
        }
        last = snap;
        last_sys = now_sys;
        last_at = now;
    }
    let summaries = groups
        .iter()
        .zip(per_group)
        .filter_map(|(g, s)| {
            let sum = summarize(&s)?;
            Some(GroupSummary {
                name: g.name.clone(),
                cpu_percent_mean: (sum.cpu_percent_mean * 10.0).round() / 10.0,
                cpu_percent_max: (sum.cpu_percent_max * 10.0).round() / 10.0,
                rss_mib_max: (sum.rss_mib_max * 10.0).round() / 10.0,
            })
        })
        .collect();
    let system = (!sys.is_empty()).then(|| SystemCpu {
        cpu_percent_mean: (sys.iter().sum::<f64>() / sys.len() as f64 * 10.0).round() / 10.0,
        cpu_percent_max: (sys.iter().copied().fold(0.0, f64::max) * 10.0).round() / 10.0,
    });
    (summaries, system)
}

/// One group per live `*.pid` file in `dir` (named after the file), plus this process.
pub fn groups_from_dir(dir: &Path) -> Vec<Group> {
    let mut out = vec![Group {
        name: "argus-loadtest".into(),
        root: std::process::id(),
    }];
    if let Ok(entries) = std::fs::read_dir(dir) {
        let mut found: Vec<Group> = entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().to_string();
                let stem = name.strip_suffix(".pid")?.to_string();
                let pid: u32 = std::fs::read_to_string(e.path())
                    .ok()?
                    .trim()
                    .parse()
                    .ok()?;
                Path::new(&format!("/proc/{pid}"))
                    .exists()
                    .then_some(Group {
                        name: stem,
                        root: pid,
                    })
            })
            .collect();
        found.sort_by(|a, b| a.name.cmp(&b.name));
        out.extend(found);
    }
    out
}

#[cfg(test)]
mod group_tests {
    use super::*;

    #[test]
    fn proc_stat_busy_excludes_idle_and_iowait() {
        let text = "cpu  100 0 50 800 40 5 5 0 0 0\ncpu0 1 2 3\n";
        assert_eq!(parse_proc_stat_busy(text), Some((160, 1000)));
    }

    #[test]
    fn trees_follow_parent_links() {
        let snap: HashMap<u32, (u32, u64)> = [
            (1, (0, 0)),
            (10, (1, 5)),
            (11, (10, 5)),
            (12, (10, 5)),
            (20, (1, 5)),
        ]
        .into();
        let mut t = tree(&snap, 10);
        t.sort();
        assert_eq!(t, vec![10, 11, 12]);
        assert!(tree(&snap, 99).is_empty());
        assert_eq!(
            parse_stat_ppid_ticks("5 (a b) S 42 1 1 0 -1 0 0 0 0 0 7 3 0 0"),
            Some((42, 10))
        );
    }

    #[test]
    fn samples_this_process_tree_and_the_machine() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (h, stop) = crate::stop::stop_pair();
        let (groups, sys) = rt.block_on(async move {
            let task = tokio::spawn(sample_groups(
                vec![Group {
                    name: "me".into(),
                    root: std::process::id(),
                }],
                Duration::from_millis(30),
                stop,
            ));
            tokio::time::sleep(Duration::from_millis(120)).await;
            h.stop();
            task.await.unwrap()
        });
        assert_eq!(groups.len(), 1);
        assert!(groups[0].rss_mib_max > 0.0);
        assert!(sys.is_some());
    }
}
