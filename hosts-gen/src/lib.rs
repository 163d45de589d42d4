//! `damselfly hosts-gen`: points container runtimes at the daemon by merging into their own
//! configuration, and puts it back. Every writer merges into what the user has (keeping its
//! keys, order and comments), saves the original once before its first change, writes
//! atomically, and can show its changes as a diff instead ([`files`]).
//!
//! - containerd: `hosts.toml` per registry ([`containerd`]).

pub mod cli;
pub mod containerd;
pub mod files;
pub mod registry;
