//! The daemon side's errors, and the one place they become replies ([`CacheError::reply`]).

use damselfly_p2p::import::ImportError;
use damselfly_p2p::net::NetError;
use damselfly_p2p::StoreError;

use crate::protocol::{ErrorKind, Reply};

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("{0}")]
    BadRequest(String),
    #[error("no entry {0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("the file changed while it was imported; nothing was kept")]
    Changed,
    #[error("no room in the cache for {0} bytes")]
    NoSpace(u64),
    #[error("the cluster: {0}")]
    Cluster(String),
    #[error("{0}")]
    Fetch(String),
    #[error("cache I/O: {0}")]
    Io(#[from] std::io::Error),
    /// Writing the client's own file (an export's target) failed.
    #[error("writing the exported file: {0}")]
    Output(std::io::Error),
    #[error("{0}")]
    Store(StoreError),
}

impl From<StoreError> for CacheError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NoSpace(n) => CacheError::NoSpace(n),
            e => CacheError::Store(e),
        }
    }
}

impl From<ImportError> for CacheError {
    fn from(e: ImportError) -> Self {
        match e {
            ImportError::Changed => CacheError::Changed,
            ImportError::NotRegular => CacheError::BadRequest("only a regular file can be imported".into()),
            ImportError::Store(e) => e.into(),
        }
    }
}

impl From<NetError> for CacheError {
    fn from(e: NetError) -> Self {
        match e {
            NetError::Refused(m) => CacheError::Conflict(m),
            e => CacheError::Cluster(e.to_string()),
        }
    }
}

impl CacheError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            CacheError::BadRequest(_) => ErrorKind::BadRequest,
            CacheError::NotFound(_) => ErrorKind::NotFound,
            CacheError::Conflict(_) => ErrorKind::Conflict,
            CacheError::Changed => ErrorKind::Changed,
            CacheError::NoSpace(_) => ErrorKind::NoSpace,
            CacheError::Cluster(_) | CacheError::Fetch(_) => ErrorKind::Cluster,
            CacheError::Output(_) => ErrorKind::Output,
            CacheError::Io(_) | CacheError::Store(_) => ErrorKind::Internal,
        }
    }

    pub fn reply(&self) -> Reply {
        Reply::Error { kind: self.kind(), message: self.to_string() }
    }
}
