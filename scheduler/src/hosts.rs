//! Hosts, kept in a slab: peers refer to their host by slot, so scoring a candidate reads its
//! host without hashing or comparing its id.

use std::sync::Arc;
use std::time::{Duration, Instant};

use damselfly_proto::member::Owner;
use tokio::sync::mpsc;

use crate::proto::{HoldTask, SeedTask};
use crate::state::{Id, Map, Set};
use crate::token::Minter;

/// Upload slots assumed for a host that announced 0 (an older or unconfigured node).
const DEFAULT_SLOTS: u32 = 4;

/// Laid out so that what scoring a candidate reads comes first: its first two cache lines
/// hold all of it but the location labels (see `Peer`).
#[repr(C, align(64))]
pub(crate) struct Host {
    pub id: Id,
    /// Open download streams; a host with one is alive whenever it last announced.
    pub streams: u32,
    /// Children currently assigned to this host's peers, over all tasks.
    pub children: u32,
    pub slots: u32,
    pub seed: bool,
    /// Serves and fetches pieces over mutual TLS only.
    pub peer_tls: bool,
    pub last_seen: Instant,
    pub blocked_until: Option<Instant>,
    /// EWMA of bytes/s children measured from this host; 0 until the first report.
    pub throughput: f64,
    pub seed_stream: Option<(u64, mpsc::Sender<SeedTask>)>,
    /// Where preheats send tasks for this host to fetch like a client would.
    pub preheat_stream: Option<(u64, mpsc::Sender<HoldTask>)>,
    pub idc: String,
    /// `region|zone|rack` split into its labels once, not per score.
    pub location: Vec<String>,
    pub ip: String,
    pub port: u32,
    /// Mints tokens for this host's upload server.
    pub minter: Minter,
    /// Children that reported corrupt pieces from this host, and when.
    pub corrupt: Vec<(Id, Instant)>,
    /// Tasks this host has a peer in, so leaving costs its own peers and not a scan.
    pub tasks: Set<Id>,
    /// Bytes the node says it sent its clients from the origin, peers and its cache.
    pub served: [u64; 3],
    /// The node that announced this id first (see `damselfly_proto::member`); `None` for a
    /// host announced without an owner token, which anyone may act for.
    pub owner: Option<Owner>,
}

impl Host {
    /// A host known by `id` only, seen `now`: no address, no zone, nothing assigned yet.
    pub fn new(id: Id, minter: Minter, now: Instant) -> Host {
        Host {
            id,
            ip: String::new(),
            port: 0,
            idc: String::new(),
            location: Vec::new(),
            slots: 0,
            seed: false,
            peer_tls: false,
            minter,
            last_seen: now,
            streams: 0,
            seed_stream: None,
            preheat_stream: None,
            children: 0,
            throughput: 0.0,
            corrupt: Vec::new(),
            blocked_until: None,
            tasks: Set::default(),
            owner: None,
            served: [0; 3],
        }
    }

    pub fn alive(&self, now: Instant, announce_interval: Duration) -> bool {
        self.streams > 0
            || self.seed_stream.is_some()
            || self.preheat_stream.is_some()
            || now.saturating_duration_since(self.last_seen) < announce_interval.saturating_mul(3)
    }

    /// Whether a caller with `owner` may act for this host.
    pub fn owned_by(&self, owner: Option<&Owner>) -> bool {
        self.owner.is_none() || self.owner.as_ref() == owner
    }

    pub fn blocked(&self, now: Instant) -> bool {
        self.blocked_until.is_some_and(|until| now < until)
    }

    pub fn slots(&self) -> u32 {
        if self.slots == 0 {
            DEFAULT_SLOTS
        } else {
            self.slots
        }
    }
}

/// Slot of a host in [`Hosts`].
pub(crate) type HostIx = u32;

#[derive(Default)]
pub(crate) struct Hosts {
    slots: Vec<Option<Host>>,
    free: Vec<HostIx>,
    index: Map<Id, HostIx>,
}

impl Hosts {
    pub fn get(&self, id: &str) -> Option<&Host> {
        self.at(*self.index.get(id)?)
    }

    pub fn get_mut(&mut self, id: &str) -> Option<&mut Host> {
        self.at_mut(*self.index.get(id)?)
    }

    pub fn at(&self, ix: HostIx) -> Option<&Host> {
        self.slots.get(ix as usize)?.as_ref()
    }

    pub fn at_mut(&mut self, ix: HostIx) -> Option<&mut Host> {
        self.slots.get_mut(ix as usize)?.as_mut()
    }

    /// Reads the lines of slot `ix` that scoring a candidate reads, and returns something of
    /// them so that the reads are not optimized away (see `select::Scan::consider_all`).
    pub fn touch(&self, ix: HostIx) -> u32 {
        self.at(ix).map_or(0, |h| h.streams ^ h.idc.len() as u32)
    }

    /// The host's slot, if `peer_host` (a peer's id of it) still names the host in it: a slot
    /// is reused only after the peers of its previous host are gone, this makes sure of it.
    pub fn of(&self, ix: HostIx, peer_host: &Id) -> Option<&Host> {
        self.at(ix).filter(|h| Arc::ptr_eq(&h.id, peer_host))
    }

    pub fn of_mut(&mut self, ix: HostIx, peer_host: &Id) -> Option<&mut Host> {
        self.at_mut(ix).filter(|h| Arc::ptr_eq(&h.id, peer_host))
    }

    /// The interned id and slot of a known host.
    pub fn ix(&self, id: &str) -> Option<(Id, HostIx)> {
        self.index.get_key_value(id).map(|(k, &i)| (k.clone(), i))
    }

    /// Adds a host whose id is not known yet.
    pub fn insert(&mut self, host: Host) -> HostIx {
        let id = host.id.clone();
        let ix = match self.free.pop() {
            Some(ix) => {
                self.slots[ix as usize] = Some(host);
                ix
            }
            None => {
                self.slots.push(Some(host));
                (self.slots.len() - 1) as HostIx
            }
        };
        self.index.insert(id, ix);
        ix
    }

    pub fn remove(&mut self, id: &str) -> Option<Host> {
        let ix = self.index.remove(id)?;
        self.free.push(ix);
        self.slots.get_mut(ix as usize)?.take()
    }

    pub fn values(&self) -> impl Iterator<Item = &Host> {
        self.slots.iter().flatten()
    }

    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut Host> {
        self.slots.iter_mut().flatten()
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }
}

#[cfg(test)]
impl std::ops::Index<&str> for Hosts {
    type Output = Host;

    fn index(&self, id: &str) -> &Host {
        self.get(id).expect("known host")
    }
}

#[cfg(test)]
pub(crate) fn test_host(id: &str) -> Host {
    Host::new(id.into(), Minter::new(&[0; 32]), Instant::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_reused_and_a_stale_peer_id_does_not_match_the_new_host() {
        let mut hosts = Hosts::default();
        let a = hosts.insert(test_host("a"));
        let old_id = hosts.ix("a").expect("a").0;
        assert!(hosts.remove("a").is_some() && hosts.get("a").is_none() && hosts.len() == 0);
        let b = hosts.insert(test_host("b"));
        assert_eq!(a, b);
        assert!(hosts.of(b, &old_id).is_none());
        let (b_id, _) = hosts.ix("b").expect("b");
        assert_eq!(hosts.of(b, &b_id).map(|h| &*h.id), Some("b"));
        assert_eq!(hosts.values().count(), 1);
    }
}
