//! Parent selection: which peers of a task may serve a child, and which of them serve best.
//!
//! A decision looks at no more than `SAMPLE` peers (a random sample when the task has more),
//! so its cost does not grow with the swarm. Only when the sample has no usable candidate are
//! all the task's peers looked at, which is what tells "nobody yet" from "everybody blocked".

use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::Rng;

use crate::hosts::{HostIx, Hosts};
use crate::state::{Id, PeerState, Task};

/// Candidates looked at per decision.
const SAMPLE: usize = 32;

// Score weights. Terms are each in [0, 1] before weighting, so the weights read as points:
// - free upload slots (fraction of slots not taken by children): 30
// - low load (1 - children/slots, floored at 0): 10
// - throughput children measured from the host, t / (t + 50 MB/s); unmeasured counts 0.5: 15
// - same idc as the child: 20
// - location, the share of the child's `region|zone|rack` labels in common as a prefix: 10
// - seed host: 5
// - progress: finished 20, a downloading peer 10 × the share of pieces it holds (a peer with
//   nothing yet is a weak parent: a finished one with a child or two beats it)
// plus up to 1 point of jitter so that equal peers share the load.
const W_FREE: f64 = 30.0;
const W_LOAD: f64 = 10.0;
const W_RATE: f64 = 15.0;
const RATE_REF: f64 = 50e6;
const W_IDC: f64 = 20.0;
const W_LOCATION: f64 = 10.0;
const W_SEED: f64 = 5.0;
const W_PROGRESS: f64 = 20.0;

pub(crate) struct Policy {
    pub idc_only: bool,
    pub announce_interval: Duration,
    pub max_parents: usize,
    pub now: Instant,
}

pub(crate) struct Selection {
    /// Peer indices, best first.
    pub chosen: Vec<usize>,
    /// Some peer would have been a candidate but for a block (the child's or a global one).
    pub blocked_any: bool,
}

enum Verdict {
    Skip,
    Blocked,
    Score(f64),
}

struct Child<'a> {
    index: usize,
    registry: &'a str,
    blocked: &'a [Id],
    idc: &'a str,
    location: &'a [String],
    peer_tls: bool,
}

pub(crate) fn select(hosts: &Hosts, task: &Task, child: usize, policy: &Policy, rng: &mut SmallRng) -> Selection {
    let host = hosts.of(task.peers[child].hix, &task.peers[child].host);
    let c = Child {
        index: child,
        registry: &task.peers[child].registry,
        blocked: &task.peers[child].blocked,
        idc: host.map_or("", |h| h.idc.as_str()),
        location: host.map_or(&[], |h| h.location.as_slice()),
        peer_tls: host.is_some_and(|h| h.peer_tls),
    };
    let n = task.peers.len();
    let scored = Vec::with_capacity(n.min(SAMPLE));
    let mut scan = Scan { hosts, task, child: c, policy, scored, blocked_any: false };
    if n <= SAMPLE {
        scan.consider_all((0..n).collect(), rng);
    } else {
        scan.consider_all(rand::seq::index::sample(rng, n, SAMPLE).into_vec(), rng);
        if scan.scored.is_empty() {
            scan.blocked_any = false;
            scan.consider_all((0..n).collect(), rng);
        }
    }
    let mut scored = scan.scored;
    scored.sort_unstable_by(|a, b| b.0.total_cmp(&a.0));
    Selection {
        chosen: scored.into_iter().take(policy.max_parents).map(|(_, i)| i).collect(),
        blocked_any: scan.blocked_any,
    }
}

struct Scan<'a> {
    hosts: &'a Hosts,
    task: &'a Task,
    child: Child<'a>,
    policy: &'a Policy,
    scored: Vec<(f64, usize)>,
    blocked_any: bool,
}

impl Scan<'_> {
    /// Scores the peers at `candidates`. Each costs a cache miss on its peer and one on its
    /// host (a decision samples at random, and between decisions the transport's buffers evict
    /// them). Loading them all first, in tight loops with nothing depending on each load,
    /// lets those misses overlap; scoring one candidate at a time waits out each in turn.
    fn consider_all(&mut self, candidates: Vec<usize>, rng: &mut SmallRng) {
        let peers = &self.task.peers;
        let hixs: Vec<HostIx> = candidates.iter().filter_map(|&i| peers.get(i).map(|p| p.hix)).collect();
        let warm = hixs.iter().fold(0u32, |acc, &ix| acc ^ self.hosts.touch(ix));
        std::hint::black_box(warm);
        for i in candidates {
            self.consider(i, rng);
        }
    }

    fn consider(&mut self, i: usize, rng: &mut SmallRng) {
        match verdict(self.hosts, self.task, &self.child, self.policy, i) {
            Verdict::Score(s) => self.scored.push((s + rng.gen::<f64>(), i)),
            Verdict::Blocked => self.blocked_any = true,
            Verdict::Skip => {}
        }
    }
}

fn verdict(hosts: &Hosts, task: &Task, c: &Child, policy: &Policy, i: usize) -> Verdict {
    // One peer per host in a task, so this is also "never the same host".
    if i == c.index {
        return Verdict::Skip;
    }
    let peer = &task.peers[i];
    if !peer.is_candidate() {
        return Verdict::Skip;
    }
    let Some(h) = hosts.of(peer.hix, &peer.host) else { return Verdict::Skip };
    if !h.alive(policy.now, policy.announce_interval) {
        return Verdict::Skip;
    }
    if c.blocked.contains(&peer.host) || h.blocked(policy.now) {
        return Verdict::Blocked;
    }
    if policy.idc_only && !c.idc.is_empty() && h.idc != c.idc {
        return Verdict::Skip;
    }
    // A peer still downloading holds what its registry sent, checked only against digests
    // pinned from that registry's word (see `Task::trusted`); a finished one holds content
    // its node verified.
    if !task.trusted && peer.state != PeerState::Finished && *peer.registry != *c.registry {
        return Verdict::Skip;
    }
    // A TLS host and a plain one cannot exchange pieces.
    if h.peer_tls != c.peer_tls {
        return Verdict::Skip;
    }
    let slots = f64::from(h.slots());
    let children = f64::from(h.children);
    let free = (slots - children).max(0.0) / slots;
    let load = (children / slots).min(1.0);
    let rate = if h.throughput > 0.0 { h.throughput / (h.throughput + RATE_REF) } else { 0.5 };
    let same_idc = !c.idc.is_empty() && h.idc == c.idc;
    let location = if c.location.is_empty() {
        0.0
    } else {
        common_prefix(c.location, &h.location) as f64 / c.location.len() as f64
    };
    let progress = match (peer.state, task.piece_count()) {
        (PeerState::Finished, _) => 1.0,
        (_, Some(count)) => 0.5 * f64::from(peer.pieces.len()) / f64::from(count.max(1)),
        (_, None) => 0.0,
    };
    Verdict::Score(
        W_FREE * free
            + W_LOAD * (1.0 - load)
            + W_RATE * rate
            + if same_idc { W_IDC } else { 0.0 }
            + W_LOCATION * location
            + if h.seed { W_SEED } else { 0.0 }
            + W_PROGRESS * progress,
    )
}

fn common_prefix(a: &[String], b: &[String]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Splits `region|zone|rack` into labels; empty means unknown.
pub(crate) fn location_labels(location: &str) -> Vec<String> {
    if location.is_empty() {
        return Vec::new();
    }
    location.split('|').map(str::to_owned).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn location_prefixes_count_whole_labels_from_the_top() {
        let a = location_labels("eu|z1|r1");
        assert_eq!(common_prefix(&a, &location_labels("eu|z1|r2")), 2);
        assert_eq!(common_prefix(&a, &location_labels("eu|z2|r1")), 1);
        assert_eq!(common_prefix(&a, &location_labels("us|z1|r1")), 0);
        assert_eq!(common_prefix(&a, &location_labels("")), 0);
        assert!(location_labels("").is_empty());
    }
}
