//! `damselfly hosts-gen`: its flags and what each runtime's command does.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use crate::containerd::{self, HostsError};
use crate::files::{self, Backup, Change, FileError};
use crate::registry::{Registry, RegistryError};

#[derive(Debug, Clone, Args)]
pub struct HostsGenArgs {
    #[command(subcommand)]
    pub runtime: Runtime,
}

#[derive(Debug, Clone, Subcommand)]
pub enum Runtime {
    /// containerd's hosts.toml files (ctr --hosts-dir, and the CRI plugin's config_path).
    Containerd(ContainerdArgs),
}

#[derive(Debug, Clone, Args)]
pub struct ContainerdArgs {
    /// containerd's hosts directory (the CRI plugin's registry.config_path).
    #[arg(long, value_name = "DIR", default_value = "/etc/containerd/certs.d")]
    pub config_path: PathBuf,
    /// A registry to pull through the daemon: HOST[:PORT] (HTTPS) or a URL such as
    /// http://10.0.0.5:5000 (repeatable).
    #[arg(long = "registry", value_name = "R")]
    pub registries: Vec<String>,
    /// Also every registry without a file of its own (_default/hosts.toml).
    #[arg(long)]
    pub all_registries: bool,
    /// The daemon's mirror address.
    #[arg(long, value_name = "URL", default_value = "http://127.0.0.1:65001")]
    pub mirror: String,
    /// How long containerd waits to connect to the daemon before it goes to the registry
    /// (containerd 2.1 and later read it), e.g. 200ms.
    #[arg(long, value_name = "DUR")]
    pub dial_timeout: Option<String>,
    /// Print a unified diff of every file that would change, and write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Put back every file as it was before the first run, and remove the ones it made.
    #[arg(long, conflicts_with_all = ["registries", "all_registries", "dry_run"])]
    pub restore: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum HostsGenError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Hosts(#[from] HostsError),
    #[error(transparent)]
    File(#[from] FileError),
    #[error("nothing to do: name a registry with --registry, or use --all-registries")]
    Nothing,
    #[error("--mirror {0:?} is not an http(s):// URL")]
    Mirror(String),
}

/// Runs the command; what it changed (or would change) goes to `out`.
pub fn run(args: &HostsGenArgs, out: &mut dyn std::io::Write) -> Result<(), HostsGenError> {
    match &args.runtime {
        Runtime::Containerd(a) => containerd_cmd(a, out),
    }
}

fn containerd_cmd(a: &ContainerdArgs, out: &mut dyn std::io::Write) -> Result<(), HostsGenError> {
    let backup = Backup { base: a.config_path.clone(), root: a.config_path.join("_backup") };
    if a.restore {
        for path in backup.restore()? {
            let _ = writeln!(out, "restored {}", path.display());
        }
        return Ok(());
    }
    if !(a.mirror.starts_with("http://") || a.mirror.starts_with("https://")) {
        return Err(HostsGenError::Mirror(a.mirror.clone()));
    }
    let mut targets: Vec<Option<Registry>> =
        a.registries.iter().map(|r| Registry::parse(r).map(Some)).collect::<Result<_, _>>()?;
    if a.all_registries {
        targets.push(None);
    }
    if targets.is_empty() {
        return Err(HostsGenError::Nothing);
    }
    let mut changes = Vec::new();
    for registry in &targets {
        let path = containerd::hosts_dir(&a.config_path, registry.as_ref()).join("hosts.toml");
        let before = files::read(&path)?;
        let after =
            containerd::merge(&path, before.as_deref(), registry.as_ref(), &a.mirror, a.dial_timeout.as_deref())?;
        changes.push(Change { path, before, after });
    }
    for change in &changes {
        if a.dry_run {
            if !change.is_noop() {
                let _ = write!(out, "{}", change.diff());
            }
            continue;
        }
        let verb = if files::apply(change, &backup)? { "wrote" } else { "unchanged" };
        let _ = writeln!(out, "{verb} {}", change.path.display());
    }
    Ok(())
}
