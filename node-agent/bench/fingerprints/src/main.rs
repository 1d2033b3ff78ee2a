//! The cost of SHA-256 beside BLAKE3, as the agent computes it.
//!
//! 1. Per changed file: the agent's extra read of a changed file, both
//!    digests from one pass (`HostRoot::blake3_and_sha256`), by size, file
//!    in the page cache; beside it what BLAKE3 alone costs for that file.
//! 2. Per scan, if every file were hashed twice: the same over a real tree
//!    (default `/usr/bin`; `BENCH_TREE`), BLAKE3 alone (what a scan reads)
//!    against BLAKE3 + SHA-256 in one pass, one thread, after a warm-up read
//!    so the page cache holds the tree in both runs.
//!
//! Run: `cargo run --release --manifest-path node-agent/bench/fingerprints/Cargo.toml`.
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sha2::Digest;

fn hash_file(path: &Path, sha: bool, buf: &mut [u8]) -> std::io::Result<u64> {
    let mut f = std::fs::File::open(path)?;
    let mut b3 = blake3::Hasher::new();
    let mut s = sha2::Sha256::new();
    let mut total = 0;
    loop {
        let n = f.read(buf)?;
        if n == 0 {
            break;
        }
        b3.update(&buf[..n]);
        if sha {
            s.update(&buf[..n]);
        }
        total += n as u64;
    }
    std::hint::black_box(b3.finalize());
    if sha {
        std::hint::black_box(s.finalize());
    }
    Ok(total)
}

/// Fastest of `runs` runs of `f`.
fn fastest(runs: usize, mut f: impl FnMut()) -> Duration {
    (0..runs)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .min()
        .unwrap_or_default()
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let Ok(ft) = e.file_type() else { continue };
        if ft.is_dir() {
            walk(&e.path(), out);
        } else if ft.is_file() {
            out.push(e.path());
        }
    }
}

fn main() {
    let mut buf = vec![0u8; 256 * 1024];
    let dir = std::env::temp_dir().join(format!("kube-fim-bench-sha-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    println!("per changed file (page cache, fastest of 20 runs, one thread):");
    println!("{:>10} {:>14} {:>18} {:>14}", "size", "BLAKE3 alone", "BLAKE3 + SHA-256", "SHA-256 adds");
    for size in [4usize << 10, 64 << 10, 1 << 20, 16 << 20, 256 << 20] {
        let path = dir.join(format!("f{size}"));
        let content: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
        std::fs::write(&path, &content).expect("write");
        let runs = if size >= 16 << 20 { 5 } else { 20 };
        let alone = fastest(runs, || {
            hash_file(&path, false, &mut buf).expect("read");
        });
        let both = fastest(runs, || {
            hash_file(&path, true, &mut buf).expect("read");
        });
        println!(
            "{:>10} {:>11.1} µs {:>15.1} µs {:>11.1} µs",
            human(size as u64),
            alone.as_secs_f64() * 1e6,
            both.as_secs_f64() * 1e6,
            (both.as_secs_f64() - alone.as_secs_f64()) * 1e6
        );
        let _ = std::fs::remove_file(&path);
    }
    let _ = std::fs::remove_dir(&dir);

    let tree = std::env::var("BENCH_TREE").unwrap_or_else(|_| "/usr/bin".into());
    let mut files = Vec::new();
    walk(Path::new(&tree), &mut files);
    let mut bytes = 0;
    for f in &files {
        bytes += hash_file(f, false, &mut buf).unwrap_or(0);
    }
    let scan = |sha: bool, buf: &mut [u8]| {
        fastest(3, || {
            for f in &files {
                let _ = hash_file(f, sha, buf);
            }
        })
    };
    let alone = scan(false, &mut buf);
    let both = scan(true, &mut buf);
    println!(
        "\nscan of {tree}: {} files, {} (page cache, fastest of 3, one thread):",
        files.len(),
        human(bytes)
    );
    let rate = |d: Duration| bytes as f64 / d.as_secs_f64() / (1 << 20) as f64;
    println!(
        "  BLAKE3 alone            {:>8.3} s  {:>7.0} MiB/s",
        alone.as_secs_f64(),
        rate(alone)
    );
    println!(
        "  BLAKE3 + SHA-256        {:>8.3} s  {:>7.0} MiB/s  ({:.2}x)",
        both.as_secs_f64(),
        rate(both),
        both.as_secs_f64() / alone.as_secs_f64()
    );
}

fn human(b: u64) -> String {
    match b {
        b if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{} MiB", b >> 20),
        b => format!("{} KiB", b >> 10),
    }
}
