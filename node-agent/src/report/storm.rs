//! Change storms: past a policy's `maxChangesPerNodePerMinute`, reports are
//! deferred and paced, never folded. Every change keeps its own FileChange
//! (its number, its name); what the cap bounds is how fast they reach the
//! API server, not whether they do.
//!
//! # The pacing unit: a lane per policy entry
//!
//! Each (policy, entry) of the node is a [`Lane`] with a token bucket of the
//! policy's cap: `cap` reports at once, then one every `60 / cap` seconds.
//! The deliverer ([`super::deliver`]) sends the oldest report among the lanes
//! that hold a token; a lane without one is passed over, its reports wait in
//! the durable queue. So 200 new files under `/etc/ssh` (entry A) then a line
//! appended to `/etc/sudoers` (entry B): A's first `cap` go at once, the rest
//! one every `60 / cap` s, and B's report goes as soon as it is saved, ahead
//! of A's deferred ones. A storm in one entry never delays or folds another
//! entry's change (a lane per policy alone would make B wait behind A's
//! backlog, or one token interval at best).
//!
//! The price: a node writes at most the sum of its lanes' caps per minute
//! (each lane `cap` a minute, plus a burst of `cap` after a quiet minute or a
//! restart), and never more than the agent's `--qps`/`--burst` (10/s, 50 by
//! default) whatever the lanes. A storm of N changes in one lane takes about
//! `(N - cap) * 60 / cap` seconds to deliver (5,000 at the default 100: 49
//! minutes), visible meanwhile as a storm:
//!
//! - a `ChangeStorm` Warning Event on the node's FileIntegrityNode when a
//!   lane's reports start waiting (at most once a minute per lane);
//! - `kube_fim_agent_change_storms_total{policy}`: minutes in which a lane of
//!   the policy had reports waiting for its cap (the `KubeFimChangeStorm`
//!   alert);
//! - `kube_fim_agent_reports_deferred{policy}`: reports waiting for their
//!   lane's cap now; `kube_fim_agent_reports_deferred_total{policy}`: reports
//!   delivered after waiting.
//!
//! Deferred reports are in the durable queue like any other: a restart
//! resumes pacing them (with a full bucket), and nothing detected is lost.
//! Buckets live in memory only.

use std::collections::BTreeMap;
use std::time::Duration;

use kube_fim_crds::FileChangeSpec;
use tokio::time::Instant;

/// The time over which a policy's cap counts.
pub const WINDOW: Duration = Duration::from_secs(60);

/// Slack for the bucket's floating-point arithmetic: a token refilled over
/// exactly its interval is a whole token.
const EPS: f64 = 1e-6;

/// The pacing unit: one entry of one policy on this node.
#[derive(Clone, Debug, Eq, Hash, Ord, PartialEq, PartialOrd)]
pub struct Lane {
    pub policy: String,
    pub entry: String,
}

impl Lane {
    /// The lane of a change.
    pub fn of(spec: &FileChangeSpec) -> Lane {
        Lane {
            policy: spec.policy.clone(),
            entry: spec.entry.clone(),
        }
    }
}

/// A lane's oldest report, as the pacer sees it.
#[derive(Clone, Debug)]
pub struct Head<'a> {
    pub lane: &'a Lane,
    /// Its place in the queue (older is smaller).
    pub seq: u64,
    /// Reports of the lane waiting, this one included.
    pub queued: usize,
    /// The lane's policy's cap per minute.
    pub cap: u32,
    /// Whether it may be sent as far as the protocol goes (the baseline
    /// holding its number is saved).
    pub ready: bool,
}

/// What the deliverer does next.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    /// The report to send now (its lane's token is taken).
    pub send: Option<u64>,
    /// Whether that report waited for its lane's cap.
    pub paced: bool,
    /// When the next lane passed over gets a token.
    pub wake: Option<Instant>,
    /// Reports waiting for their lane's cap, by policy (every policy with a
    /// lane seen, 0 included).
    pub deferred: BTreeMap<String, usize>,
    /// Lanes whose reports start waiting now: announce them (once a minute
    /// per lane at most), with how many wait.
    pub storms: Vec<(Lane, usize)>,
    /// Policies with a new minute of a storm (one per lane and minute).
    pub storm_minutes: Vec<String>,
}

#[derive(Debug)]
struct State {
    tokens: f64,
    last: Instant,
    /// Since when the lane has reports waiting for its cap, until it is empty.
    storm: Option<Instant>,
    /// Whether the lane ran out of tokens in this storm: what it sends now
    /// waited for its cap.
    starved: bool,
    /// Until when the current minute of a storm is counted.
    counted_until: Option<Instant>,
    announced: Option<Instant>,
}

impl State {
    fn refill(&mut self, cap: u32, now: Instant) {
        let cap = f64::from(cap.max(1));
        let gained =
            now.saturating_duration_since(self.last).as_secs_f64() * cap / WINDOW.as_secs_f64();
        self.tokens = (self.tokens + gained).min(cap);
        self.last = now;
    }

    /// When the next token comes.
    fn next_token(&self, cap: u32) -> Instant {
        let missing = (1.0 - self.tokens).max(0.0);
        self.last + WINDOW.mul_f64(missing / f64::from(cap.max(1)))
    }
}

/// The token buckets of the node's lanes.
#[derive(Debug, Default)]
pub struct Pacer {
    lanes: BTreeMap<Lane, State>,
}

impl Pacer {
    /// Decides what to send among the lanes' oldest reports `heads` at
    /// `now`: the oldest ready one whose lane holds a token.
    pub fn plan<'a>(&mut self, heads: impl IntoIterator<Item = Head<'a>>, now: Instant) -> Plan {
        let mut plan = Plan::default();
        let heads: Vec<Head> = heads.into_iter().collect();
        for head in &heads {
            let state = self.lanes.entry(head.lane.clone()).or_insert(State {
                tokens: f64::from(head.cap.max(1)),
                last: now,
                storm: None,
                starved: false,
                counted_until: None,
                announced: None,
            });
            state.refill(head.cap, now);
            if head.ready && state.tokens + EPS >= 1.0 && plan.send.is_none_or(|s| head.seq < s) {
                plan.send = Some(head.seq);
            }
        }
        // Lanes with nothing queued: their storm is over.
        for (lane, state) in &mut self.lanes {
            if !heads.iter().any(|h| h.lane == lane) {
                state.storm = None;
                state.starved = false;
            }
        }
        for head in &heads {
            let Some(state) = self.lanes.get_mut(head.lane) else {
                continue;
            };
            let sending = plan.send == Some(head.seq);
            if sending {
                state.tokens -= 1.0;
                plan.paced = state.starved;
            }
            // Whole tokens left cover that many more; the rest waits.
            let covered = (state.tokens + EPS).max(0.0).floor() as usize + usize::from(sending);
            let waiting = head.queued.saturating_sub(covered);
            *plan.deferred.entry(head.lane.policy.clone()).or_default() += waiting;
            if waiting == 0 {
                continue;
            }
            if state.tokens + EPS < 1.0 {
                state.starved = true;
                let at = state.next_token(head.cap);
                plan.wake = Some(plan.wake.map_or(at, |w| w.min(at)));
            }
            if state.storm.is_none() {
                state.storm = Some(now);
                if state.announced.is_none_or(|a| now >= a + WINDOW) {
                    state.announced = Some(now);
                    plan.storms.push((head.lane.clone(), waiting));
                }
            }
            if state.counted_until.is_none_or(|c| now >= c) {
                state.counted_until = Some(now + WINDOW);
                plan.storm_minutes.push(head.lane.policy.clone());
            }
        }
        for lane in self.lanes.keys() {
            plan.deferred.entry(lane.policy.clone()).or_default();
        }
        plan
    }

    /// The report sent from `lane` was not stored (the API server failed):
    /// its token is the lane's again, so an outage is no storm.
    pub fn give_back(&mut self, lane: &Lane, cap: u32) {
        if let Some(state) = self.lanes.get_mut(lane) {
            state.tokens = (state.tokens + 1.0).min(f64::from(cap.max(1)));
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    fn lane(entry: &str) -> Lane {
        Lane {
            policy: "p".into(),
            entry: entry.into(),
        }
    }

    /// Queued reports by lane, in arrival order, as the queue keeps them.
    #[derive(Default)]
    struct Lanes(BTreeMap<Lane, VecDeque<u64>>, u64);

    impl Lanes {
        fn push(&mut self, entry: &str, n: usize) {
            for _ in 0..n {
                self.0.entry(lane(entry)).or_default().push_back(self.1);
                self.1 += 1;
            }
        }

        fn heads(&self, cap: u32) -> Vec<Head<'_>> {
            self.0
                .iter()
                .filter_map(|(lane, q)| {
                    Some(Head {
                        lane,
                        seq: *q.front()?,
                        queued: q.len(),
                        cap,
                        ready: true,
                    })
                })
                .collect()
        }

        /// Sends what the pacer allows at `now`: the lanes of what went, and
        /// the last plan with the storms and minutes of all of them.
        fn drain(&mut self, pacer: &mut Pacer, cap: u32, now: Instant) -> (Vec<String>, Plan) {
            let mut sent = Vec::new();
            let (mut storms, mut minutes) = (Vec::new(), Vec::new());
            loop {
                let mut plan = pacer.plan(self.heads(cap), now);
                storms.append(&mut plan.storms);
                minutes.append(&mut plan.storm_minutes);
                let Some(seq) = plan.send else {
                    plan.storms = storms;
                    plan.storm_minutes = minutes;
                    return (sent, plan);
                };
                for (lane, q) in &mut self.0 {
                    if q.front() == Some(&seq) {
                        q.pop_front();
                        sent.push(lane.entry.clone());
                    }
                }
                self.0.retain(|_, q| !q.is_empty());
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_storm_in_one_entry_is_paced_and_never_holds_back_another() {
        let (mut pacer, mut lanes) = (Pacer::default(), Lanes::default());
        let t0 = Instant::now();
        lanes.push("ssh", 200);
        let (sent, plan) = lanes.drain(&mut pacer, 20, t0);
        assert_eq!(sent.len(), 20, "the cap goes at once");
        assert_eq!(plan.deferred["p"], 180);
        assert_eq!(plan.storms, [(lane("ssh"), 180)]);
        assert_eq!(plan.storm_minutes, ["p"]);
        assert_eq!(plan.wake, Some(t0 + Duration::from_secs(3)));

        // A change in another entry right after: sent at once, ahead of the
        // 180 older deferred ones.
        lanes.push("sudoers", 1);
        let (sent, plan) = lanes.drain(&mut pacer, 20, t0 + Duration::from_millis(10));
        assert_eq!(sent, ["sudoers"]);
        assert!(!plan.paced);
        assert!(plan.storms.is_empty(), "announced once");

        // Then one every 60/cap = 3 s, each counted as paced; the storm's
        // second minute is counted, not announced again.
        let mut t = t0;
        let mut minutes = 0;
        for _ in 0..20 {
            t += Duration::from_secs(3);
            let plan = pacer.plan(lanes.heads(20), t);
            assert!(plan.send.is_some() && plan.paced, "{plan:?}");
            assert!(plan.storms.is_empty());
            minutes += plan.storm_minutes.len();
            lanes.0.get_mut(&lane("ssh")).unwrap().pop_front();
            let again = pacer.plan(lanes.heads(20), t);
            assert_eq!(again.send, None, "one per token");
            minutes += again.storm_minutes.len();
        }
        assert_eq!(minutes, 1, "the minute from t0 + 60 s");
        assert_eq!(lanes.0[&lane("ssh")].len(), 160);
    }

    #[tokio::test(start_paused = true)]
    async fn every_report_goes_at_the_cap_and_the_storm_ends_with_the_backlog() {
        let (mut pacer, mut lanes) = (Pacer::default(), Lanes::default());
        let t0 = Instant::now();
        lanes.push("bin", 100);
        let mut sent = 0;
        let mut t = t0;
        let mut last = t0;
        while sent < 100 {
            let (went, plan) = lanes.drain(&mut pacer, 30, t);
            sent += went.len();
            if !went.is_empty() {
                last = t;
            }
            t = plan.wake.unwrap_or(t + Duration::from_secs(1));
        }
        // 30 at once, then 70 at 2 s each.
        let took = last - t0;
        assert!(
            took.abs_diff(Duration::from_secs(140)) < Duration::from_millis(10),
            "{took:?}"
        );
        let plan = pacer.plan(lanes.heads(30), last);
        assert_eq!(plan.deferred["p"], 0, "the gauge goes back to 0");
        // A new storm after the backlog and a quiet minute is announced again.
        lanes.push("bin", 31);
        let (went, plan) = lanes.drain(&mut pacer, 30, last + Duration::from_secs(120));
        assert_eq!(went.len(), 30);
        assert_eq!(plan.storms, [(lane("bin"), 1)]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_report_not_saved_yet_waits_without_costing_its_lane_a_token() {
        let mut pacer = Pacer::default();
        let t0 = Instant::now();
        let (a, b) = (lane("a"), lane("b"));
        let head = |lane, seq, ready| Head {
            lane,
            seq,
            queued: 1,
            cap: 1,
            ready,
        };
        let plan = pacer.plan([head(&a, 0, false), head(&b, 1, true)], t0);
        assert_eq!(plan.send, Some(1), "passes the unsaved one");
        let plan = pacer.plan([head(&a, 0, true)], t0);
        assert_eq!(plan.send, Some(0), "its token is still there");
    }
}
