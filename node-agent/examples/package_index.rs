//! What package verification costs on a real node (`make bench` runs it on
//! this machine's own root): the time and memory of indexing its dpkg and
//! rpm databases, and the time per verified change (one more read of the
//! file, in the package's digest kind and BLAKE3).
//!
//! Usage: [SCOPE=/usr/bin:/etc] package_index [ROOT (default /)] [FILES (default 500)]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::path::Path;
use std::time::Instant;

use kube_fim_agent::hostfs::HostRoot;
use kube_fim_agent::packages::{DbError, Index, Packages, Scope, dpkg, rpm};
use kube_fim_agent::telemetry::Telemetry;
use kube_fim_crds::{ChangeCategory, DetectionSource, FileAttributes, FileChangeSpec, FileType};

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let root_path = Path::new(args.get(1).map_or("/", String::as_str));
    let files: usize = args.get(2).and_then(|n| n.parse().ok()).unwrap_or(500);
    let root = HostRoot::open(root_path).expect("root");
    // SCOPE: colon-separated monitored bases (default: everything).
    let scope = Scope::new(
        std::env::var("SCOPE")
            .unwrap_or_default()
            .split(':')
            .filter(|s| !s.is_empty())
            .map(|s| s.as_bytes().to_vec()),
    );
    let mut owned = Vec::new();
    for (manager, build) in [
        (
            "dpkg",
            dpkg::index as fn(&HostRoot, &Scope) -> Result<Index, DbError>,
        ),
        ("rpm", rpm::index),
    ] {
        let before = rss_kib();
        let started = Instant::now();
        let index = match build(&root, &scope) {
            Ok(i) => i,
            Err(e) => {
                println!("{manager}: {e}");
                continue;
            }
        };
        let took = started.elapsed();
        println!(
            "{manager}: {} packages, {} paths, index {:.0} ms, ~{} KiB (RSS +{} KiB)",
            index.packages.len(),
            index.files.len(),
            took.as_secs_f64() * 1000.0,
            index.approx_bytes() / 1024,
            rss_kib().saturating_sub(before)
        );
        for path in index.files.keys() {
            let p = root_path.join(String::from_utf8_lossy(&path[1..]).as_ref());
            if owned.len() < files
                && std::fs::symlink_metadata(&p).is_ok_and(|m| m.is_file() && m.len() > 0)
            {
                owned.push((String::from_utf8_lossy(path).into_owned(), p));
            }
        }
    }
    let changes: Vec<FileChangeSpec> = owned
        .iter()
        .map(|(path, p)| {
            let content = std::fs::read(p).unwrap_or_default();
            FileChangeSpec {
                node: "n".into(),
                policy: "p".into(),
                sequence: None,
                container: None,
                entry: "e".into(),
                path: path.clone(),
                category: ChangeCategory::Modified,
                changed_attributes: vec![],
                before: None,
                after: Some(FileAttributes {
                    file_type: Some(FileType::File),
                    hash: Some(blake3::hash(&content).to_hex().to_string()),
                    ..FileAttributes::default()
                }),
                detected_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
                    k8s_openapi::jiff::Timestamp::now(),
                ),
                source: DetectionSource::Realtime,
                process: None,
                summary: None,
                package: None,
                restored: None,
            }
        })
        .collect();
    let bytes: u64 = owned
        .iter()
        .map(|(_, p)| std::fs::metadata(p).map_or(0, |m| m.len()))
        .sum();
    let telemetry = Telemetry::new("n").expect("telemetry");
    let mut packages = Packages::new(root_path);
    packages.set_scope(scope);
    // The first call indexes; the second is what each later change costs.
    let mut warm: Vec<FileChangeSpec> = changes.iter().take(1).cloned().collect();
    packages.verify(&mut warm, &telemetry);
    let mut timed = changes;
    let started = Instant::now();
    packages.verify(&mut timed, &telemetry);
    let took = started.elapsed();
    let verified = timed.iter().filter(|c| c.package.is_some()).count();
    println!(
        "verify: {} changed package files ({} KiB), {} with a verdict, {:.1} µs per change ({:.0} MiB/s)",
        timed.len(),
        bytes / 1024,
        verified,
        took.as_secs_f64() * 1e6 / timed.len().max(1) as f64,
        bytes as f64 / took.as_secs_f64().max(1e-9) / (1 << 20) as f64
    );
}
