//! Where a task's bytes come from when neither the disk nor another node has them: a [`Source`]
//! (the mirror's is a blob or manifest in an upstream registry, fetched with the requesting
//! client's credentials).

use std::fmt;
use std::ops::Range;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;

/// Where bytes sent to a client came from, for the download metrics' `source` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ByteSource {
    /// Fetched from a [`Source`] (the origin registry) for this request.
    Origin,
    /// Taken from another node.
    Peer,
    /// On disk before the request.
    Cache,
}

impl ByteSource {
    pub fn label(self) -> &'static str {
        match self {
            ByteSource::Origin => "origin",
            ByteSource::Peer => "peer",
            ByteSource::Cache => "cache",
        }
    }
}

/// A blob's place in a registry, as the scheduler is told it.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct SourceSpec {
    /// Base URL such as `https://registry-1.docker.io`.
    pub registry: String,
    pub repository: String,
    pub insecure: bool,
    /// A short-lived `Authorization` value (a Bearer token) that let this node's client read
    /// the blob. Sent only to schedulers reached over TLS, which pass it only to seed peers,
    /// so that a seed can fetch private content for the cluster.
    pub credential: Option<String>,
}

impl std::fmt::Debug for SourceSpec {
    /// Leaves the credential out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceSpec")
            .field("registry", &self.registry)
            .field("repository", &self.repository)
            .field("insecure", &self.insecure)
            .field("credential", &self.credential.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

pub struct SourceResponse {
    /// `false` when a range was asked for and the whole content came back (a `200`): the body
    /// then starts at offset 0.
    pub range_honoured: bool,
    pub body: BoxStream<'static, Result<Bytes, SourceError>>,
}

#[derive(Debug, Clone)]
pub struct SourceError {
    pub message: String,
    /// Worth asking again (a reset, a timeout, a 5xx); not for a 404 or a 401.
    pub retryable: bool,
}

impl SourceError {
    pub fn retryable(message: impl Into<String>) -> Self {
        SourceError { message: message.into(), retryable: true }
    }

    pub fn fatal(message: impl Into<String>) -> Self {
        SourceError { message: message.into(), retryable: false }
    }
}

impl fmt::Display for SourceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for SourceError {}

pub trait Source: Send + Sync + 'static {
    /// Fetches `range` of the content (`None` = all of it) as a stream of bytes.
    fn fetch(&self, range: Option<Range<u64>>) -> BoxFuture<'static, Result<SourceResponse, SourceError>>;

    /// Who vouches for the bytes this source sends (for the mirror, a registry's id): content not yet
    /// verified takes bytes from one supplier only (`Task::claim_supplier`). `None`: no claim.
    fn supplier(&self) -> Option<String> {
        None
    }

    /// Where the content lives at its origin, for a scheduler that may ask a seed peer to
    /// fetch it; `None` when no other node could fetch it.
    fn describe(&self) -> Option<SourceSpec> {
        None
    }
}
