//! What `damselfly cache` and the daemon say on the admin socket. A connection carries
//! requests one after another; each is answered by any number of [`Reply::Progress`] lines and
//! then one final reply.

use serde::{Deserialize, Serialize};

/// The socket's name in the daemon's data directory (inside `admin/`, owner-only).
pub const SOCKET: &str = "admin/cache.sock";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// The file to import comes as a descriptor beside this line.
    Import {
        id: String,
        #[serde(default)]
        tag: String,
        replicas: u32,
        /// Seconds; absent: kept until deleted.
        #[serde(default)]
        ttl_secs: Option<u64>,
    },
    /// The client's file for the content comes as a descriptor beside this line (empty, open
    /// for writing). Content held here is answered by [`Reply::Ready`] with a read-only
    /// descriptor of it, for the client to clone or copy; content taken from peers is written
    /// into the client's file as it arrives, answered by [`Reply::Written`].
    Export {
        id: String,
        #[serde(default)]
        tag: String,
    },
    Stat {
        id: String,
        #[serde(default)]
        tag: String,
        #[serde(default)]
        local: bool,
    },
    Delete {
        id: String,
        #[serde(default)]
        tag: String,
        #[serde(default)]
        all: bool,
    },
    List,
}

/// What a long request is doing now.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Import: hashing (and placing) the file.
    Hashing,
    /// Import: waiting for other nodes to hold replicas (`done` of `total` holders).
    Replicas,
    /// Export: taking pieces from peers (and writing them into the client's file).
    Fetching,
    /// Export: the client copying content held by the daemon (its own progress, never sent
    /// by the daemon).
    Copying,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    Progress {
        phase: Phase,
        done: u64,
        total: u64,
    },
    Imported {
        entry: EntryInfo,
        placement: String,
    },
    /// The content is held here whole and verified; its descriptor comes beside this line.
    Ready {
        entry: EntryInfo,
        from_peers: bool,
    },
    /// The content came from peers and is in the client's file, whole, verified and synced.
    Written {
        entry: EntryInfo,
    },
    Stat {
        entry: EntryInfo,
    },
    Deleted {
        everywhere: bool,
    },
    Entries {
        entries: Vec<EntryInfo>,
    },
    Error {
        kind: ErrorKind,
        message: String,
    },
}

/// An entry as a client sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryInfo {
    pub id: String,
    pub tag: String,
    pub digest: String,
    pub length: u64,
    /// Milliseconds since the Unix epoch.
    pub created_ms: u64,
    /// When every holder drops it; absent: never.
    pub expires_ms: Option<u64>,
    pub replicas: u32,
    /// The plain URL a preheated file came from; absent for an import.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Host ids that keep it, as the scheduler says; absent for a local answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holders: Option<Vec<String>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// No such entry (here, or in the cluster).
    NotFound,
    /// The request itself is wrong (a bad id, no file passed).
    BadRequest,
    /// The id names other content already.
    Conflict,
    /// The file changed while it was imported.
    Changed,
    /// No room in the cache.
    NoSpace,
    /// The cluster could not be asked, or could not deliver.
    Cluster,
    /// The export's own file could not be written (its filesystem full, say).
    Output,
    /// Anything else.
    Internal,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_read_as_written_and_refuse_strangers() {
        let r: Request = serde_json::from_str(r#"{"op":"stat","id":"a"}"#).unwrap();
        assert_eq!(r, Request::Stat { id: "a".into(), tag: String::new(), local: false });
        let back: Request = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back, r);
        assert!(serde_json::from_str::<Request>(r#"{"op":"stat","id":"a","path":"/etc/shadow"}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"op":"format"}"#).is_err());
    }
}
