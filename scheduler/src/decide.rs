//! Decisions: where one download gets its pieces (parents, the origin, a seed, or nowhere
//! yet), and the task-wide pushes that follow from what peers report (pinned digests,
//! quarantine, waking waiting peers).

use std::collections::hash_map::DefaultHasher;
use std::collections::VecDeque;
use std::hash::{Hash, Hasher};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::config::SchedulerConfig;
use crate::hosts::Hosts;
use crate::metrics::{DecisionKind, Metrics};
use crate::proto::download_response::Kind;
use crate::proto::{BackToSource, Parent, Parents, PieceDigest, PieceDigests, Quarantined, SeedTask, Wait};
use crate::select::{select, Policy};
use crate::state::{Id, PeerState, SeedTrigger, Set, Sha, SoftState, Task};
use crate::token::Grant;

/// What `Wait` tells a download to expect.
const WAIT_MS: u32 = 200;
/// Peers wait this long for a triggered seed to register before the origin rules apply again.
pub(crate) const SEED_WAIT: Duration = Duration::from_secs(10);
/// A task's seed is not asked again sooner than this, so a failing seed is not asked in a loop.
const SEED_RETRY: Duration = Duration::from_secs(60);

/// What a decision needs besides the state.
pub(crate) struct Env<'a> {
    pub cfg: &'a SchedulerConfig,
    pub metrics: &'a Metrics,
    pub now: Instant,
}

enum Choice {
    Parents(Vec<usize>),
    Origin(&'static str),
    Seed(Id),
    Wait,
}

impl SoftState {
    /// Decides where peer `child` of `digest` gets its pieces and tells it. With `quiet`, a
    /// peer that is waiting and has to go on waiting is not told again.
    pub fn decide(&mut self, env: &Env, digest: &str, child: &str, quiet: bool) -> Option<DecisionKind> {
        let started = Instant::now();
        let SoftState { hosts, tasks, seeds, seed_waits, rng, .. } = self;
        let task = tasks.get_mut(digest)?;
        let ci = task.idx(child)?;
        // Nobody to tell (the stream ended or stopped reading), or nothing left to fetch.
        task.peers[ci].tx.as_ref()?;
        if task.peers[ci].state == PeerState::Finished {
            return None;
        }
        let kind = if let Some(reason) = task.quarantined.clone() {
            quarantine_peer(task, hosts, ci, &reason);
            DecisionKind::Quarantined
        } else {
            let policy = Policy {
                idc_only: env.cfg.idc_only,
                announce_interval: env.cfg.announce_interval,
                max_parents: env.cfg.max_parents.max(1),
                now: env.now,
            };
            let sel = select(hosts, task, ci, &policy, rng);
            let choice = if !sel.chosen.is_empty() {
                Choice::Parents(sel.chosen)
            } else if hosts.get(child).is_some_and(|h| h.seed) {
                Choice::Origin("seed peers fetch new tasks from the origin")
            } else if task.peers[ci].origin_slot {
                Choice::Origin("no parent yet; keep fetching from the origin")
            } else if sel.blocked_any {
                // A pull must never fail where a direct pull would succeed.
                Choice::Origin("every parent is blocked")
            } else {
                seed_or_origin(hosts, seeds, task, ci, env)
            };
            match choice {
                Choice::Parents(chosen) => {
                    give_parents(task, hosts, ci, &chosen, env);
                    DecisionKind::Parents
                }
                Choice::Origin(reason) => {
                    back_to_source(task, hosts, ci, reason);
                    DecisionKind::BackToSource
                }
                Choice::Seed(seed) => {
                    trigger_seed(hosts, seed_waits, task, seed, env.now);
                    wait(task, hosts, ci);
                    DecisionKind::Seed
                }
                Choice::Wait => {
                    if quiet && task.peers[ci].state == PeerState::Waiting {
                        return None;
                    }
                    wait(task, hosts, ci);
                    DecisionKind::Wait
                }
            }
        };
        env.metrics.decision(kind, started.elapsed());
        Some(kind)
    }

    /// Decides again for the waiting peers of `digest` if something they wait for happened.
    /// Each decision may wake the others again (a waiter sent to the origin becomes a parent
    /// for the rest); every round takes at least one peer out of waiting, so this ends.
    pub fn settle(&mut self, env: &Env, digest: &str) {
        loop {
            let Some(task) = self.tasks.get_mut(digest) else { return };
            if !std::mem::take(&mut task.wake) || task.waiting.is_empty() {
                return;
            }
            let waiters: Vec<Id> = task.waiting.iter().cloned().collect();
            for w in waiters {
                self.decide(env, digest, &w, true);
            }
        }
    }

    /// Decides again for the children a parent left behind.
    pub fn reschedule_all(&mut self, env: &Env, digest: &str, children: &[Id]) {
        for c in children {
            let downloading = self.tasks.get(digest).and_then(|t| Some(t.peers[t.idx(c)?].downloading()));
            if downloading == Some(true) {
                self.decide(env, digest, c, false);
            }
        }
    }
}

fn seed_or_origin(hosts: &Hosts, seeds: &Set<Id>, task: &Task, ci: usize, env: &Env) -> Choice {
    // A seed can only fetch what names its registry and repository, with the task's length
    // (a seed registers the digest's first length).
    let fetchable = !task.is_alternate()
        && task.source.as_ref().is_some_and(|s| !s.registry.is_empty() && !s.repository.is_empty());
    let may_trigger = fetchable
        && match &task.seed {
            None => true,
            Some(t) => {
                let age = env.now.saturating_duration_since(t.at);
                if !t.settled && age < SEED_WAIT {
                    return Choice::Wait;
                }
                age >= SEED_RETRY
            }
        };
    if may_trigger {
        if let Some(seed) = pick_seed(hosts, seeds, task, ci, env.now) {
            return Choice::Seed(seed);
        }
    }
    if task.origin_fetchers < env.cfg.origin_limit {
        Choice::Origin("no peer holds the task yet")
    } else {
        Choice::Wait
    }
}

/// The live seed for this task by rendezvous hashing of the digest, so that while the set of
/// seeds stays the same every scheduler sends a task to the same one.
fn pick_seed(hosts: &Hosts, seeds: &Set<Id>, task: &Task, ci: usize, now: Instant) -> Option<Id> {
    let child = &task.peers[ci];
    // A seed the child could not take pieces from is no help to it.
    let tls = hosts.of(child.hix, &child.host).is_some_and(|h| h.peer_tls);
    seeds
        .iter()
        .filter(|s| **s != child.host && !child.blocked.contains(s) && task.idx(*s).is_none())
        .filter(|s| {
            hosts.get(s).is_some_and(|h| {
                !h.blocked(now) && h.peer_tls == tls && h.seed_stream.as_ref().is_some_and(|(_, tx)| !tx.is_closed())
            })
        })
        .max_by_key(|s| {
            let mut h = DefaultHasher::new();
            (&*task.digest, &***s).hash(&mut h);
            h.finish()
        })
        .cloned()
}

fn trigger_seed(
    hosts: &mut Hosts,
    seed_waits: &mut VecDeque<(Instant, Id, Id)>,
    task: &mut Task,
    seed: Id,
    now: Instant,
) {
    let msg = SeedTask { digest: task.content_digest().to_owned(), length: task.length, source: task.source.clone() };
    if let Some((_, tx)) = hosts.get(&seed).and_then(|h| h.seed_stream.as_ref()) {
        if tx.try_send(msg).is_err() {
            // The trigger still times out, after which the origin rules apply.
            tracing::warn!(seed = %seed, digest = %task.digest, "seed stream full or closed");
        }
    }
    seed_waits.push_back((now, task.digest.clone(), seed.clone()));
    task.seed = Some(SeedTrigger { host: seed, at: now, settled: false });
}

fn give_parents(task: &mut Task, hosts: &mut Hosts, ci: usize, chosen: &[usize], env: &Env) {
    task.unlink_parents(hosts, ci);
    let child = task.peers[ci].host.clone();
    let count = task.piece_count();
    let ttl = env.cfg.token_ttl.as_secs().min(crate::token::MAX_TOKEN_LIFETIME);
    let grant = Grant::new(&child, unix_now().saturating_add(ttl));
    let mut parents = Vec::with_capacity(chosen.len());
    for &pi in chosen {
        let peer = &task.peers[pi];
        let Some(h) = hosts.of(peer.hix, &peer.host) else { continue };
        parents.push(Parent {
            host_id: String::from(&*peer.host),
            ip: h.ip.clone(),
            port: h.port,
            token: h.minter.mint_for(&grant, task.content_digest()),
            // Only what the parent holds: nobody is sent for a piece its parent is still
            // fetching, possibly from that very child. A parent still fetching from the
            // origin that already has children lists nothing here: each of its new pieces is
            // offered to one child as it arrives (see `piece_finished`), and the rest get it
            // from that child, so its uplink carries each piece about once. Its first child
            // sees everything it holds, so a node reading ranges from the origin for a long
            // time still shares what it has. Once finished it lists everything.
            pieces: if peer.state == PeerState::Origin && !peer.children.is_empty() {
                Vec::new()
            } else {
                peer.held(count)
            },
        });
        task.link(hosts, ci, pi);
    }
    task.release_slot(ci);
    task.set_state(ci, PeerState::Peers);
    let msg = Parents { parents, length: task.length, piece_size: task.piece_size };
    task.peers[ci].push(Kind::Parents(msg));
}

fn back_to_source(task: &mut Task, hosts: &mut Hosts, ci: usize, reason: &str) {
    task.unlink_parents(hosts, ci);
    task.take_slot(ci);
    task.peers[ci].may_pin = true;
    task.set_state(ci, PeerState::Origin);
    task.peers[ci].push(Kind::BackToSource(BackToSource { reason: reason.to_owned() }));
}

fn wait(task: &mut Task, hosts: &mut Hosts, ci: usize) {
    task.unlink_parents(hosts, ci);
    task.set_state(ci, PeerState::Waiting);
    task.peers[ci].push(Kind::Wait(Wait { retry_after_ms: WAIT_MS }));
}

/// Tells one download of a quarantined task to take nothing from peers. It goes to the origin
/// whatever the origin limit: peers have nothing trustworthy to offer it.
fn quarantine_peer(task: &mut Task, hosts: &mut Hosts, i: usize, reason: &str) {
    task.unlink_parents(hosts, i);
    if task.peers[i].downloading() || task.peers[i].state == PeerState::Idle {
        task.set_state(i, PeerState::Origin);
    }
    task.peers[i].push(Kind::Quarantined(Quarantined { reason: reason.to_owned() }));
    task.peers[i].push(Kind::BackToSource(BackToSource { reason: reason.to_owned() }));
}

pub(crate) fn quarantine(task: &mut Task, hosts: &mut Hosts, reason: String) {
    if task.quarantined.is_some() {
        return;
    }
    tracing::warn!(digest = %task.digest, %reason, "task quarantined");
    for i in 0..task.peers.len() {
        if task.peers[i].tx.is_some() {
            quarantine_peer(task, hosts, i, &reason);
        } else {
            task.unlink_parents(hosts, i);
        }
    }
    task.quarantined = Some(reason);
}

/// Pins `sha` for piece `n` as reported from the origin by peer `from`: new digests go to the
/// task's other downloads, a different one quarantines the task.
pub(crate) fn pin_piece(task: &mut Task, hosts: &mut Hosts, from: usize, n: u32, sha: Sha) {
    let slot = n as usize;
    if task.digests.len() <= slot {
        task.digests.resize(slot + 1, None);
    }
    match task.digests[slot] {
        None => {
            task.digests[slot] = Some(sha);
            if task.pinned_by.is_none() {
                task.pinned_by = Some(task.peers[from].host.clone());
            }
            let msg = PieceDigests {
                piece_size: task.piece_size,
                digests: vec![PieceDigest { number: n, sha256: hex(&sha) }],
            };
            task.push_all(&Kind::PieceDigests(msg), Some(from));
        }
        Some(pinned) if pinned == sha => {}
        Some(_) => quarantine(task, hosts, format!("two different sha256 for piece {n}")),
    }
}

/// Pins a full digest list announced by `by`: fills what is not pinned, quarantines on any
/// difference with what is. The list is a member's word that it verified the blob; the task
/// is trusted only once a download verified content checked against it (`finish`).
pub(crate) fn pin_all(task: &mut Task, hosts: &mut Hosts, list: &[Sha], by: &Id) {
    if task.digests.len() < list.len() {
        task.digests.resize(list.len(), None);
    }
    let mut new = Vec::new();
    for (n, sha) in list.iter().enumerate() {
        match task.digests[n] {
            None => {
                task.digests[n] = Some(*sha);
                new.push(PieceDigest { number: n as u32, sha256: hex(sha) });
            }
            Some(pinned) if pinned == *sha => {}
            Some(_) => return quarantine(task, hosts, format!("two different sha256 lists announced (piece {n})")),
        }
    }
    if !new.is_empty() && task.pinned_by.is_none() {
        task.pinned_by = Some(by.clone());
    }
    if !new.is_empty() {
        task.push_all(&Kind::PieceDigests(PieceDigests { piece_size: task.piece_size, digests: new }), None);
    }
}

pub(crate) fn pinned(task: &Task) -> Vec<PieceDigest> {
    let pinned = task.digests.iter().enumerate();
    pinned.filter_map(|(n, d)| Some(PieceDigest { number: n as u32, sha256: hex(d.as_ref()?) })).collect()
}

pub(crate) fn hex(sha: &Sha) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(64);
    for &b in sha {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    s
}

/// Parses a lower-case hex sha256.
pub(crate) fn parse_sha(s: &str) -> Option<Sha> {
    let b = s.as_bytes();
    if b.len() != 64 {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = nibble(b[2 * i])? << 4 | nibble(b[2 * i + 1])?;
    }
    Some(out)
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha_hex_round_trips_and_refuses_upper_case_and_bad_lengths() {
        let s = "00ff".repeat(16);
        let sha = parse_sha(&s).expect("valid");
        assert_eq!(hex(&sha), s);
        assert!(parse_sha(&s.to_uppercase()).is_none());
        assert!(parse_sha(&s[2..]).is_none());
        assert!(parse_sha(&format!("{}zz", &s[2..])).is_none());
    }
}
