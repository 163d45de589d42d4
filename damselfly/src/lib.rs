//! The `damselfly` command line: one subcommand per part, each parsed by the crate that
//! implements it (`damselfly-mirror`, `damselfly-control` for the scheduler and preheat, `damselfly-hosts-gen`). `main.rs`
//! runs the one chosen.

use clap::{Parser, Subcommand};
use damselfly_cache::cli::CacheArgs;
use damselfly_control::cli::{PreheatArgs, SchedulerArgs};
use damselfly_hosts_gen::cli::HostsGenArgs;
use damselfly_mirror::cli::MirrorArgs;

#[derive(Debug, Parser)]
#[command(name = "damselfly", version, about = "Peer-to-peer container registry mirror")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

// Parsed once at start: the size difference between the variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the node daemon that container runtimes pull through.
    Mirror(MirrorArgs),
    /// Run a scheduler that steers the node daemons of a cluster.
    Scheduler(SchedulerArgs),
    /// Preheat an image: have the cluster's peers fetch its blobs before anyone pulls it.
    Preheat(PreheatArgs),
    /// Point a container runtime at the daemon (merging into its configuration), or put it back.
    HostsGen(HostsGenArgs),
    /// The P2P cache: import a file under an id, export it on any node, stat, delete, list.
    Cache(CacheArgs),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn each_subcommand_parses_its_own_flags() {
        let mirror = Cli::try_parse_from(["damselfly", "mirror", "--listen", "127.0.0.1:1", "--log-format", "json"]);
        assert!(matches!(mirror.map(|c| c.command), Ok(Command::Mirror(_))));
        let scheduler = Cli::try_parse_from(["damselfly", "scheduler", "--origin-limit", "2"]);
        assert!(matches!(scheduler.map(|c| c.command), Ok(Command::Scheduler(_))));
        assert!(Cli::try_parse_from(["damselfly", "mirror", "--origin-limit", "2"]).is_err());
    }
}
