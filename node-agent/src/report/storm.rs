//! Change-storm control: past a policy's `maxChangesPerNodePerMinute`, changes
//! are folded into one Summary FileChange per policy and minute instead of
//! thousands of objects (a package upgrade touching every binary).

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube_fim_crds::{ChangeCategory, ChangeSummary, DetectionSource, FileChangeSpec};

/// Paths kept as a sample in a summary.
pub const SAMPLE_PATHS: usize = 20;
const WINDOW: Duration = Duration::from_secs(60);

#[derive(Debug)]
struct Window {
    start: Timestamp,
    reported: u32,
    folded: Option<FileChangeSpec>,
}

/// What to do with a change.
#[derive(Debug, PartialEq)]
pub enum Verdict {
    /// Report it as its own FileChange.
    Report,
    /// It was folded into the policy's summary for this minute; the first fold of
    /// a window says so, so the caller can raise an Event and a metric once.
    Folded { first_in_window: bool },
}

/// Per-policy one-minute windows.
#[derive(Debug, Default)]
pub struct StormGuard {
    windows: BTreeMap<String, Window>,
}

impl StormGuard {
    /// Decides about one change of `policy` whose cap is `cap` per minute.
    /// Summaries of windows that have ended are returned by [`StormGuard::due`].
    pub fn admit(&mut self, change: &FileChangeSpec, cap: u32, now: Timestamp) -> Verdict {
        let window = self
            .windows
            .entry(change.policy.clone())
            .or_insert_with(|| Window {
                start: now,
                reported: 0,
                folded: None,
            });
        if window.folded.is_none() && elapsed(window.start, now) >= WINDOW {
            *window = Window {
                start: now,
                reported: 0,
                folded: None,
            };
        }
        if window.reported < cap {
            window.reported += 1;
            return Verdict::Report;
        }
        let first_in_window = window.folded.is_none();
        let summary = window.folded.get_or_insert_with(|| FileChangeSpec {
            node: change.node.clone(),
            policy: change.policy.clone(),
            entry: change.entry.clone(),
            path: change.path.clone(),
            category: ChangeCategory::Summary,
            changed_attributes: vec![],
            before: None,
            after: None,
            detected_time: MicroTime(now),
            source: change.source,
            process: None,
            sequence: None,
            summary: Some(ChangeSummary {
                count: 0,
                added: 0,
                modified: 0,
                removed: 0,
                sample_paths: vec![],
                window_start: MicroTime(window.start),
                window_end: MicroTime(window.start + WINDOW),
            }),
        });
        if let Some(s) = summary.summary.as_mut() {
            s.count += 1;
            match change.category {
                ChangeCategory::Added => s.added += 1,
                ChangeCategory::Modified => s.modified += 1,
                ChangeCategory::Removed => s.removed += 1,
                ChangeCategory::Summary => {}
            }
            if s.sample_paths.len() < SAMPLE_PATHS {
                s.sample_paths.push(change.path.clone());
            }
        }
        summary.path = common_dir(&summary.path, &change.path);
        if summary.source != change.source {
            summary.source = DetectionSource::Scan;
        }
        Verdict::Folded { first_in_window }
    }

    /// Summaries whose window has ended, to be reported now.
    pub fn due(&mut self, now: Timestamp) -> Vec<FileChangeSpec> {
        let mut out = Vec::new();
        for window in self.windows.values_mut() {
            if elapsed(window.start, now) >= WINDOW
                && let Some(mut summary) = window.folded.take()
            {
                summary.detected_time = MicroTime(now);
                out.push(summary);
                window.start = now;
                window.reported = 0;
            }
        }
        out
    }

    /// Summaries still open (at shutdown: report what was folded so far).
    pub fn drain(&mut self, now: Timestamp) -> Vec<FileChangeSpec> {
        self.windows
            .values_mut()
            .filter_map(|w| w.folded.take())
            .map(|mut s| {
                s.detected_time = MicroTime(now);
                s
            })
            .collect()
    }
}

fn elapsed(since: Timestamp, now: Timestamp) -> Duration {
    now.duration_since(since).unsigned_abs()
}

/// The deepest directory containing both paths (`/` at worst).
fn common_dir(a: &str, b: &str) -> String {
    if a == b {
        return a.to_string();
    }
    let mut out = String::new();
    for (x, y) in a.split('/').zip(b.split('/')).skip(1) {
        if x != y {
            break;
        }
        out.push('/');
        out.push_str(x);
    }
    if out.is_empty() { "/".into() } else { out }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn change(path: &str, category: ChangeCategory) -> FileChangeSpec {
        FileChangeSpec {
            node: "n".into(),
            policy: "p".into(),
            entry: "bin".into(),
            path: path.into(),
            category,
            changed_attributes: vec![],
            before: None,
            after: None,
            detected_time: MicroTime(Timestamp::now()),
            source: DetectionSource::Realtime,
            process: None,
            summary: None,
            sequence: None,
        }
    }

    #[test]
    fn past_the_cap_changes_fold_into_one_summary_per_minute() {
        let mut g = StormGuard::default();
        let t0 = Timestamp::now();
        let mut reported = 0;
        let mut first = 0;
        for i in 0..5000 {
            let cat = if i % 2 == 0 {
                ChangeCategory::Modified
            } else {
                ChangeCategory::Added
            };
            match g.admit(&change(&format!("/usr/bin/tool{i}"), cat), 100, t0) {
                Verdict::Report => reported += 1,
                Verdict::Folded { first_in_window } => first += usize::from(first_in_window),
            }
        }
        assert_eq!(reported, 100);
        assert_eq!(first, 1);
        assert!(
            g.due(t0 + Duration::from_secs(30)).is_empty(),
            "window still open"
        );
        let due = g.due(t0 + Duration::from_secs(61));
        assert_eq!(due.len(), 1);
        let s = due[0].summary.as_ref().unwrap();
        assert_eq!(s.count, 4900);
        assert_eq!(s.added + s.modified + s.removed, 4900);
        assert_eq!(s.sample_paths.len(), SAMPLE_PATHS);
        assert_eq!(due[0].category, ChangeCategory::Summary);
        assert_eq!(due[0].path, "/usr/bin");
        // A new window reports individually again.
        assert_eq!(
            g.admit(
                &change("/usr/bin/x", ChangeCategory::Modified),
                100,
                t0 + Duration::from_secs(62)
            ),
            Verdict::Report
        );
    }

    #[test]
    fn policies_have_windows_of_their_own() {
        let mut g = StormGuard::default();
        let t0 = Timestamp::now();
        assert_eq!(
            g.admit(&change("/a", ChangeCategory::Added), 1, t0),
            Verdict::Report
        );
        let mut other = change("/b", ChangeCategory::Added);
        other.policy = "q".into();
        assert_eq!(g.admit(&other, 1, t0), Verdict::Report);
        assert!(matches!(
            g.admit(&change("/c", ChangeCategory::Added), 1, t0),
            Verdict::Folded { .. }
        ));
        assert_eq!(g.drain(t0).len(), 1);
    }

    #[test]
    fn common_dir_of_paths() {
        assert_eq!(common_dir("/usr/bin/a", "/usr/bin/b"), "/usr/bin");
        assert_eq!(common_dir("/usr/bin/a", "/etc/x"), "/");
        assert_eq!(common_dir("/usr/bin", "/usr/bin/a"), "/usr/bin");
    }
}
