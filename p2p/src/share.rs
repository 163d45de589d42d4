//! What a store whose pieces are shared with other nodes needs from outside, handed in by
//! whoever composes the node ([`crate::Store::share`]): how missing pieces are fetched (a
//! [`Fetcher`]), and who hears about pieces and tasks ([`StoreEvent`]s on a channel). The store
//! and its tasks know nothing of the network behind them.

use std::ops::Range;
use std::sync::Arc;

use tokio::sync::mpsc;

use crate::digest::Digest;
use crate::meta::TaskMeta;
use crate::source::Source;
use crate::task::TaskRef;

/// What a store tells whoever its pieces are shared with, in the order it happened.
#[derive(Debug)]
pub(crate) enum StoreEvent {
    /// Piece `piece` of `digest`, written here from a source, hashed to `sha256` (hex): what
    /// other nodes will verify it by.
    PieceHashed { digest: Digest, piece: usize, sha256: String },
    /// The task is verified and every piece's digest is known: others can take all of it here.
    TaskReady(TaskMeta),
    /// Content assembled here with pieces from other nodes failed its digest: the piece
    /// digests it was checked against were wrong. `Withdrawn` follows.
    Poisoned(Digest),
    /// The store dropped the task (evicted, or its content proved wrong).
    Withdrawn(Digest),
}

/// Fills the pieces a reader claimed (fetch `id` of `pieces`), in the background.
pub(crate) trait Fetcher: Send + Sync + 'static {
    fn fetch(&self, task: TaskRef, id: u64, pieces: Range<usize>, source: Arc<dyn Source>);
}

/// From the source alone: a store that shares nothing, or one whose network has shut down.
pub(crate) struct Direct;

impl Fetcher for Direct {
    fn fetch(&self, task: TaskRef, id: u64, pieces: Range<usize>, source: Arc<dyn Source>) {
        tokio::spawn(crate::fetch::run(task, id, pieces, source));
    }
}

/// A store's link to the nodes it shares pieces with (set once, at composition).
pub(crate) struct Sharing {
    pub(crate) fetcher: Arc<dyn Fetcher>,
    events: mpsc::UnboundedSender<StoreEvent>,
}

impl Sharing {
    pub(crate) fn new(fetcher: Arc<dyn Fetcher>) -> (Sharing, mpsc::UnboundedReceiver<StoreEvent>) {
        let (events, rx) = mpsc::unbounded_channel();
        (Sharing { fetcher, events }, rx)
    }

    /// Sends `event`; nobody listening any more (the node shut down) is no error here.
    pub(crate) fn emit(&self, event: StoreEvent) {
        let _ = self.events.send(event);
    }
}
