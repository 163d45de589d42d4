//! `damselfly hosts-gen`: points container runtimes at the daemon by merging into their own
//! configuration, and puts it back. Every writer merges into what the user has (keeping its
//! keys, order and comments), saves the original once before its first change, writes
//! atomically, and can show its changes as a diff instead ([`files`]).
//!
//! - containerd: `hosts.toml` per registry ([`containerd`]), and the CRI plugin's
//!   `config_path` in `config.toml` ([`cri`]);
//! - dockerd: `registry-mirrors` in `daemon.json` ([`docker`]);
//! - skopeo, podman, CRI-O: a registries.conf drop-in ([`registries_conf`]);
//! - nydusd: the registry backend of its configuration, printed ([`nydusd`]).

pub mod cli;
pub mod containerd;
pub mod cri;
pub mod docker;
pub mod files;
pub mod nydusd;
pub mod registries_conf;
pub mod registry;
