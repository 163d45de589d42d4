//! The example Kubernetes manifests in deploy/ must match the command line: every container's
//! `args` list parses and validates as the binary would.

use std::path::Path;

use clap::Parser;
use damselfly::{Cli, Command};

/// The `args:` lists of a manifest, with Kubernetes' `$(VAR)` references filled in.
fn args_lists(text: &str) -> Vec<Vec<String>> {
    let mut lists = Vec::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        if line.trim() != "args:" {
            continue;
        }
        let mut args = Vec::new();
        while let Some(next) = lines.peek() {
            let Some(item) = next.trim().strip_prefix("- ") else { break };
            let value = item.trim().trim_matches('"');
            let value = value
                .replace("$(POD_IP)", "10.0.0.9")
                .replace("$(HOST_IP)", "10.0.0.8")
                .replace("$(POD_NAME)", "seed-0")
                .replace("$(NODE_NAME)", "node-0");
            assert!(!value.contains("$("), "unknown variable in {value}");
            args.push(value);
            lines.next();
        }
        lists.push(args);
    }
    lists
}

#[test]
fn every_manifest_runs_a_valid_command_line() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes");
    let mut commands = 0;
    for entry in std::fs::read_dir(&dir).expect("deploy/kubernetes") {
        let path = entry.expect("entry").path();
        let text = std::fs::read_to_string(&path).expect("read manifest");
        for args in args_lists(&text) {
            let argv = std::iter::once("damselfly".to_owned()).chain(args.clone());
            let cli = Cli::try_parse_from(argv).unwrap_or_else(|e| panic!("{}: {args:?}: {e}", path.display()));
            match cli.command {
                Command::Mirror(m) => {
                    let cfg = m.into_config().unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                    assert!(!cfg.schedulers.is_empty(), "{}: a cluster node without a scheduler", path.display());
                }
                Command::Scheduler(s) => {
                    s.to_config().unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                }
            }
            commands += 1;
        }
    }
    // Scheduler, seed peers, node daemon.
    assert!(commands >= 3, "found only {commands} commands");
}
