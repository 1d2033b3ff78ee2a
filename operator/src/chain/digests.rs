//! Verification of every node's published entry digests.
//!
//! A node publishes, per established entry, a digest of the entry's paths and
//! their approved states (`status.entries`); at start its agent checks its
//! baseline on disk against them. Root on the node who changes a file, edits
//! the baseline to match and moves the published digest with the node's own
//! token would pass that check. So the cluster checks every move of a
//! published digest: from the digest it verified last, a new one is explained
//! only by
//!
//! - the node's answers to approvals (`status.entryDigests` of its
//!   FileChanges: each says how the approved state moved an entry's digest,
//!   and is written before the node's baseline takes it in), chained;
//! - a new generation of the entry's policy applied by the node (the entries
//!   are compared anew);
//! - a standing baseline alarm (the alarm is the loud thing already);
//! - the upgrade of the digest format (a digest without the `v2-` mark to one
//!   with it).
//!
//! Anything else, for longer than the grace (the FileChange watch may lag
//! the node's status), is an unexplained move: an `EvidenceGap` naming node,
//! policy, entry and both digests, kept in `status.verification.unexplained`
//! until an admin clears it (annotation [`CLEAR_DIGEST_MOVES`]).
//!
//! What this does not see: a forged answer to a genuine approval (the node
//! answers approvals, so its token can name another "after" digest in the one
//! answer it may give), and a file changed and put back between two
//! verifications. The operator does not hold the states to recompute a move.
//!
//! [`CLEAR_DIGEST_MOVES`]: kube_fim_crds::node::CLEAR_DIGEST_MOVES

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube_fim_crds::{EntryDigest, EntryDigestMove, UnexplainedMove, VerifiedEntry};

/// Unexplained moves listed at most.
const MAX_UNEXPLAINED: usize = 32;
/// Answers followed at most from one verified digest to the published one.
const MAX_STEPS: usize = 4096;
/// The mark of the current digest format (the agent's `ENTRY_DIGEST_V2`).
const FORMAT_V2: &str = "v2-";

/// What a node publishes of its entries, and what the cluster holds.
#[derive(Clone, Copy, Debug)]
pub struct Published<'a> {
    /// `status.entries`.
    pub entries: &'a [EntryDigest],
    /// Per policy, the generation the node applied (`observedGeneration`).
    pub generations: &'a HashMap<String, Option<i64>>,
    /// A baseline alarm stands on the node.
    pub alarm: bool,
    /// The node's answers to approvals: how each moved an entry's digest.
    pub moves: &'a [EntryDigestMove],
    /// Unexplained moves found up to this time are cleared by an admin.
    pub cleared_until: Option<Timestamp>,
}

/// A move not explained yet, for less than the grace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Suspect {
    pub policy: String,
    pub entry: String,
    pub to: String,
    pub since: Timestamp,
}

/// One verification step of one node's entry digests.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Verdict {
    pub entries: Vec<VerifiedEntry>,
    pub unexplained: Vec<UnexplainedMove>,
    pub suspects: Vec<Suspect>,
    /// Moves found unexplained by this step.
    pub found: Vec<UnexplainedMove>,
}

fn generation_moved(verified: Option<i64>, now: Option<i64>) -> bool {
    match (verified, now) {
        (Some(old), Some(new)) => new > old,
        (None, Some(_)) => true,
        _ => false,
    }
}

/// Whether the answers lead from `from` to `to` for the entry.
fn reachable(moves: &[EntryDigestMove], policy: &str, entry: &str, from: &str, to: &str) -> bool {
    let mut next: HashMap<&str, Vec<&str>> = HashMap::new();
    for m in moves
        .iter()
        .filter(|m| m.policy == policy && m.entry == entry)
    {
        next.entry(m.before.as_str()).or_default().push(&m.after);
    }
    let mut seen = HashSet::from([from]);
    let mut queue = VecDeque::from([from]);
    while let Some(at) = queue.pop_front() {
        if at == to {
            return true;
        }
        if seen.len() > MAX_STEPS {
            break;
        }
        for after in next.get(at).into_iter().flatten() {
            if seen.insert(after) {
                queue.push_back(after);
            }
        }
    }
    false
}

/// One step: from the digests verified last (`verified`, empty for a node
/// seen first: what it publishes is taken as it is), the unexplained moves
/// found so far and the suspects of the last step, what the node publishes
/// now, at `now`.
pub fn verify(
    verified: &[VerifiedEntry],
    unexplained: &[UnexplainedMove],
    suspects: &[Suspect],
    published: Published<'_>,
    now: Timestamp,
    grace: Duration,
) -> Verdict {
    let before: BTreeMap<(&str, &str), &VerifiedEntry> = verified
        .iter()
        .map(|v| ((v.policy.as_str(), v.entry.as_str()), v))
        .collect();
    let generation = |policy: &str| published.generations.get(policy).copied().flatten();
    let mut out = Verdict {
        unexplained: unexplained.to_vec(),
        ..Verdict::default()
    };
    let mut current = HashSet::new();
    for e in published.entries {
        current.insert((e.policy.as_str(), e.entry.as_str()));
        let now_generation = generation(&e.policy);
        let checked = VerifiedEntry {
            policy: e.policy.clone(),
            entry: e.entry.clone(),
            digest: e.digest.clone(),
            generation: now_generation,
        };
        let Some(v) = before.get(&(e.policy.as_str(), e.entry.as_str())) else {
            // A newly established entry (or a node seen first).
            out.entries.push(checked);
            continue;
        };
        let explained = v.digest == e.digest
            || published.alarm
            || generation_moved(v.generation, now_generation)
            || (!v.digest.starts_with(FORMAT_V2) && e.digest.starts_with(FORMAT_V2))
            || reachable(published.moves, &e.policy, &e.entry, &v.digest, &e.digest);
        if explained {
            out.entries.push(checked);
            continue;
        }
        let since = suspects
            .iter()
            .find(|s| s.policy == e.policy && s.entry == e.entry && s.to == e.digest)
            .map_or(now, |s| s.since);
        if now.duration_since(since).unsigned_abs() >= grace {
            let found = UnexplainedMove {
                policy: e.policy.clone(),
                entry: e.entry.clone(),
                from: v.digest.clone(),
                to: e.digest.clone(),
                since: Time(since),
            };
            out.found.push(found.clone());
            out.unexplained.push(found);
            // Said once; the next move is judged from here.
            out.entries.push(checked);
        } else {
            out.suspects.push(Suspect {
                policy: e.policy.clone(),
                entry: e.entry.clone(),
                to: e.digest.clone(),
                since,
            });
            out.entries.push((*v).clone());
        }
    }
    // An entry no longer published stays verified while its policy is the
    // generation it was verified at: published again, it is judged from there.
    for v in verified {
        if !current.contains(&(v.policy.as_str(), v.entry.as_str()))
            && published.generations.contains_key(&v.policy)
            && !generation_moved(v.generation, generation(&v.policy))
        {
            out.entries.push(v.clone());
        }
    }
    out.entries
        .sort_by(|a, b| (&a.policy, &a.entry).cmp(&(&b.policy, &b.entry)));
    if let Some(until) = published.cleared_until {
        out.unexplained.retain(|u| u.since.0 > until);
    }
    out.unexplained.truncate(MAX_UNEXPLAINED);
    out
}

/// `web/etc: v2-ab12… → v2-cd34…` for an Event.
pub fn describe(moves: &[UnexplainedMove]) -> String {
    moves
        .iter()
        .map(|m| {
            format!(
                "{}/{}: {} → {}",
                m.policy,
                m.entry,
                short(&m.from),
                short(&m.to)
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn short(digest: &str) -> &str {
    let end = digest
        .char_indices()
        .nth(15)
        .map_or(digest.len(), |(i, _)| i);
    &digest[..end]
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const GRACE: Duration = Duration::from_secs(10);

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + secs).unwrap()
    }

    fn entry(policy: &str, name: &str, digest: &str) -> EntryDigest {
        EntryDigest {
            policy: policy.into(),
            entry: name.into(),
            digest: digest.into(),
            files: 1,
            path: None,
        }
    }

    fn moved(entry: &str, before: &str, after: &str) -> EntryDigestMove {
        EntryDigestMove {
            policy: "p".into(),
            entry: entry.into(),
            before: before.into(),
            after: after.into(),
        }
    }

    struct Node {
        entries: Vec<EntryDigest>,
        generations: HashMap<String, Option<i64>>,
        alarm: bool,
        moves: Vec<EntryDigestMove>,
        cleared_until: Option<Timestamp>,
    }

    impl Node {
        fn new(digests: &[(&str, &str)]) -> Node {
            Node {
                entries: digests.iter().map(|(e, d)| entry("p", e, d)).collect(),
                generations: HashMap::from([("p".to_string(), Some(1))]),
                alarm: false,
                moves: Vec::new(),
                cleared_until: None,
            }
        }

        fn published(&self) -> Published<'_> {
            Published {
                entries: &self.entries,
                generations: &self.generations,
                alarm: self.alarm,
                moves: &self.moves,
                cleared_until: self.cleared_until,
            }
        }

        fn step(&self, last: &Verdict, now: i64) -> Verdict {
            verify(
                &last.entries,
                &last.unexplained,
                &last.suspects,
                self.published(),
                at(now),
                GRACE,
            )
        }
    }

    fn digests(v: &Verdict) -> Vec<(String, String)> {
        v.entries
            .iter()
            .map(|e| (e.entry.clone(), e.digest.clone()))
            .collect()
    }

    #[test]
    fn a_node_seen_first_is_taken_as_it_publishes() {
        let node = Node::new(&[("etc", "v2-a"), ("bin", "v2-b")]);
        let v = node.step(&Verdict::default(), 0);
        assert_eq!(
            digests(&v),
            [("bin".into(), "v2-b".into()), ("etc".into(), "v2-a".into())]
        );
        assert!(v.found.is_empty() && v.suspects.is_empty());
    }

    #[test]
    fn a_move_through_answered_approvals_is_explained() {
        let mut node = Node::new(&[("etc", "v2-a")]);
        let first = node.step(&Verdict::default(), 0);
        node.entries = vec![entry("p", "etc", "v2-c")];
        node.moves = vec![moved("etc", "v2-b", "v2-c"), moved("etc", "v2-a", "v2-b")];
        let v = node.step(&first, 1);
        assert!(v.found.is_empty() && v.suspects.is_empty());
        assert_eq!(digests(&v), [("etc".into(), "v2-c".into())]);
    }

    #[test]
    fn a_move_nothing_explains_is_found_after_the_grace_and_said_once() {
        let mut node = Node::new(&[("etc", "v2-a"), ("bin", "v2-b")]);
        let first = node.step(&Verdict::default(), 0);
        node.entries = vec![entry("p", "etc", "v2-x"), entry("p", "bin", "v2-b")];
        // Another entry's answer explains nothing here.
        node.moves = vec![moved("bin", "v2-a", "v2-x")];
        let waiting = node.step(&first, 1);
        assert!(waiting.found.is_empty());
        assert_eq!(waiting.suspects.len(), 1);
        // Until then, the digest verified stays the old one.
        assert!(digests(&waiting).contains(&("etc".into(), "v2-a".into())));

        let found = node.step(&waiting, 1 + GRACE.as_secs() as i64);
        assert_eq!(found.found.len(), 1, "{found:?}");
        let m = &found.found[0];
        assert_eq!(
            (m.entry.as_str(), m.from.as_str(), m.to.as_str()),
            ("etc", "v2-a", "v2-x")
        );
        assert_eq!(m.since, Time(at(1)));
        assert_eq!(describe(&found.found), "p/etc: v2-a → v2-x");

        let later = node.step(&found, 100);
        assert!(later.found.is_empty(), "said once");
        assert_eq!(later.unexplained.len(), 1, "kept until cleared");
    }

    #[test]
    fn an_answer_arriving_within_the_grace_explains_the_move() {
        let mut node = Node::new(&[("etc", "v2-a")]);
        let first = node.step(&Verdict::default(), 0);
        node.entries = vec![entry("p", "etc", "v2-b")];
        let waiting = node.step(&first, 1);
        assert_eq!(waiting.suspects.len(), 1);
        node.moves = vec![moved("etc", "v2-a", "v2-b")];
        let v = node.step(&waiting, 5);
        assert!(v.found.is_empty() && v.suspects.is_empty());
        assert_eq!(digests(&v), [("etc".into(), "v2-b".into())]);
    }

    #[test]
    fn a_new_generation_an_alarm_or_the_format_upgrade_explain_a_move() {
        let mut node = Node::new(&[("etc", "v2-a")]);
        let first = node.step(&Verdict::default(), 0);

        let mut policy_changed = Node::new(&[("etc", "v2-b")]);
        policy_changed.generations.insert("p".into(), Some(2));
        assert!(policy_changed.step(&first, 100).found.is_empty());

        let mut alarmed = Node::new(&[("etc", "v2-b")]);
        alarmed.alarm = true;
        assert!(alarmed.step(&first, 100).found.is_empty());

        node.entries = vec![entry("p", "etc", "0123")];
        let old_format = node.step(&Verdict::default(), 0);
        node.entries = vec![entry("p", "etc", "v2-a")];
        assert!(node.step(&old_format, 100).found.is_empty());
        // Back to the old format is no upgrade.
        node.entries = vec![entry("p", "etc", "0123")];
        let back = node.step(&first, 0);
        assert!(node.step(&back, 100).found.len() == 1);
    }

    #[test]
    fn an_entry_withdrawn_and_published_again_is_judged_from_its_verified_digest() {
        let mut node = Node::new(&[("etc", "v2-a"), ("bin", "v2-b")]);
        let first = node.step(&Verdict::default(), 0);
        node.entries = vec![entry("p", "bin", "v2-b")];
        let withdrawn = node.step(&first, 1);
        assert!(digests(&withdrawn).contains(&("etc".into(), "v2-a".into())));
        node.entries = vec![entry("p", "etc", "v2-x"), entry("p", "bin", "v2-b")];
        let back = node.step(&withdrawn, 2);
        assert_eq!(node.step(&back, 20).found.len(), 1);
    }

    #[test]
    fn an_admin_clears_what_was_found_up_to_a_time() {
        let mut node = Node::new(&[("etc", "v2-a")]);
        let first = node.step(&Verdict::default(), 0);
        node.entries = vec![entry("p", "etc", "v2-x")];
        let found = node.step(&node.step(&first, 1), 20);
        assert_eq!(found.unexplained.len(), 1);
        node.cleared_until = Some(at(0));
        assert_eq!(node.step(&found, 30).unexplained.len(), 1, "found after");
        node.cleared_until = Some(at(1));
        assert!(node.step(&found, 30).unexplained.is_empty());
    }
}
