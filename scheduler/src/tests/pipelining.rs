//! Downloading peers serve each other (pipelining), but only pieces they hold: so two peers
//! may be parents of each other, never for the same piece.

use std::collections::{BTreeSet, HashMap};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::proto::Reschedule;

/// What the children were told a host holds must be a subset of what it reported.
fn check(held: &HashMap<String, BTreeSet<u32>>, msgs: &[Kind]) {
    for m in msgs {
        let told: Vec<(&str, &[u32])> = match m {
            Kind::Parents(p) => p.parents.iter().map(|p| (p.host_id.as_str(), &p.pieces[..])).collect(),
            Kind::PieceAvailable(a) => vec![(a.host_id.as_str(), &a.pieces[..])],
            _ => continue,
        };
        for (host, pieces) in told {
            let has = held.get(host).cloned().unwrap_or_default();
            assert!(pieces.iter().all(|n| has.contains(n)), "{host} advertised {pieces:?} but holds {has:?}");
        }
    }
}

/// Pieces of `host` announced in `msgs` through `PieceAvailable`.
fn offered(msgs: &[Kind], host: &str) -> Vec<u32> {
    msgs.iter()
        .filter_map(|m| match m {
            Kind::PieceAvailable(p) if p.host_id == host => Some(p.pieces.clone()),
            _ => None,
        })
        .flatten()
        .collect()
}

#[test]
fn two_downloading_peers_are_parents_of_each_other_for_different_pieces_only() {
    let s = sched(|_| {});
    let mut o = Dl::open(&s, host("o"));
    assert_eq!(last(&o.take()), "back_to_source");
    let mut a = Dl::open(&s, host("a"));
    // A parent still fetching from the origin lists nothing: its pieces are offered one by one.
    assert_eq!(parents(&a.take()), Some(vec![("o".to_owned(), vec![])]));
    let mut b = Dl::open(&s, host("b"));
    let mut first = parents(&b.take()).expect("parents");
    first.sort();
    assert_eq!(first, [("a".to_owned(), vec![]), ("o".to_owned(), vec![])]);
    o.piece(0, "", &sha(0));
    o.piece(1, "", &sha(1));
    // Each fresh origin piece goes to one child only.
    let (to_a, to_b) = (offered(&a.take(), "o"), offered(&b.take(), "o"));
    assert_eq!((to_a.len(), to_b.len()), (1, 1), "a got {to_a:?}, b got {to_b:?}");
    assert_ne!(to_a, to_b);
    a.piece(to_a[0], "o", "");
    b.piece(to_b[0], "o", "");
    a.send(Req::Reschedule(Reschedule { stalled: vec![] }));
    let a_view: HashMap<_, _> = parents(&a.take()).expect("parents").into_iter().collect();
    // A cycle of peers: a fetches from b and b from a, each only what the other holds.
    assert_eq!(a_view.get("b"), Some(&to_b));
    assert_eq!(offered(&b.take(), "a"), to_a);
    let st = s.lock();
    let task = st.tasks.get(D).expect("task");
    let (ia, ib) = (task.idx("a").expect("a"), task.idx("b").expect("b"));
    assert!(task.peers[ia].children.contains("b") && task.peers[ib].children.contains("a"));
}

/// A simulated node: what it was told its parents hold, and whether it may use the origin.
struct Sim {
    id: String,
    dl: Dl,
    view: HashMap<String, BTreeSet<u32>>,
    origin: bool,
}

impl Sim {
    fn apply(&mut self, msgs: &[Kind]) {
        for m in msgs {
            match m {
                Kind::Parents(p) => {
                    self.view =
                        p.parents.iter().map(|p| (p.host_id.clone(), p.pieces.iter().copied().collect())).collect();
                    self.origin = false;
                }
                Kind::PieceAvailable(a) => {
                    if let Some(v) = self.view.get_mut(&a.host_id) {
                        v.extend(a.pieces.iter().copied());
                    }
                }
                Kind::BackToSource(_) => (self.view, self.origin) = (HashMap::new(), true),
                _ => {}
            }
        }
    }
}

#[test]
fn in_a_random_swarm_no_child_is_told_of_a_piece_its_parent_lacks() {
    const PEERS: usize = 8;
    let mut rng = SmallRng::seed_from_u64(7);
    let s = sched(|c| c.max_parents = 3);
    let mut held: HashMap<String, BTreeSet<u32>> = HashMap::new();
    let mut sims: Vec<Sim> = Vec::new();
    for i in 0..PEERS {
        let id = format!("p{i}");
        let dl = Dl::open(&s, host(&id));
        sims.push(Sim { id, dl, view: HashMap::new(), origin: false });
        for sim in &mut sims {
            let msgs = sim.dl.take();
            check(&held, &msgs);
            sim.apply(&msgs);
        }
    }
    for _ in 0..2000 {
        let sim = &mut sims[rng.gen_range(0..PEERS)];
        let mine = held.entry(sim.id.clone()).or_default().clone();
        let missing: Vec<u32> = (0..N).filter(|n| !mine.contains(n)).collect();
        if missing.is_empty() {
            continue;
        }
        let n = missing[rng.gen_range(0..missing.len())];
        let from = sim.view.iter().find(|(_, pieces)| pieces.contains(&n)).map(|(p, _)| p.clone());
        match from {
            Some(parent) => {
                // The parent holds it, so it is not fetching it (from this child or anyone).
                assert!(held[&parent].contains(&n));
                sim.dl.piece(n, &parent, "");
            }
            None if sim.origin => sim.dl.piece(n, "", &sha(n as u8)),
            None if rng.gen_bool(0.05) => {
                sim.dl.send(Req::Reschedule(Reschedule { stalled: vec![] }));
                continue;
            }
            None => continue,
        }
        held.entry(sim.id.clone()).or_default().insert(n);
        if held[&sim.id].len() == N as usize {
            sim.dl.send(Req::Finished(proto::Finished {}));
        }
        for sim in &mut sims {
            let msgs = sim.dl.take();
            check(&held, &msgs);
            sim.apply(&msgs);
        }
    }
    assert_eq!(held.values().filter(|h| h.len() == N as usize).count(), PEERS, "everyone finished");
}
