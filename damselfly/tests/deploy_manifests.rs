//! The example Kubernetes manifests in deploy/ must match the command line: every container's
//! `args` list parses and validates as the binary would, and every member of the cluster reads
//! the cluster secret.

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
    the_example_secret_is_refused_until_replaced(&dir);
    // What the manifests' Secret holds once the user replaced its placeholder. The only test in
    // this binary: nothing else reads the environment meanwhile.
    unsafe { std::env::set_var(damselfly_scheduler::SECRET_ENV, "a-cluster-secret-of-32-bytes-....") };
    // And the preheat token's.
    unsafe { std::env::set_var(damselfly_control::cli::PREHEAT_TOKEN_ENV, "a-preheat-token") };
    let mut commands = 0;
    for entry in std::fs::read_dir(&dir).expect("deploy/kubernetes") {
        let path = entry.expect("entry").path();
        let text = std::fs::read_to_string(&path).expect("read manifest");
        let lists = args_lists(&text);
        let secret_refs = text.matches("secretKeyRef: {name: damselfly-cluster-secret, key: secret}").count();
        assert_eq!(secret_refs, lists.len(), "{}: a member without the cluster secret", path.display());
        for args in lists {
            let argv = std::iter::once("damselfly".to_owned()).chain(args.clone());
            let cli = Cli::try_parse_from(argv).unwrap_or_else(|e| panic!("{}: {args:?}: {e}", path.display()));
            match cli.command {
                Command::Mirror(m) => {
                    let cfg = m.into_config().unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                    assert!(!cfg.schedulers.is_empty(), "{}: a cluster node without a scheduler", path.display());
                }
                Command::Scheduler(s) => {
                    s.core.to_config().unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                    s.control_config(false).map(drop).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                }
                Command::HostsGen(_) | Command::Preheat(_) | Command::Cache(_) => {
                    panic!("{}: the manifests run no hosts-gen, preheat or cache", path.display())
                }
            }
            commands += 1;
        }
    }
    // Scheduler, seed peers, node daemon.
    assert!(commands >= 3, "found only {commands} commands");
}

fn the_example_secret_is_refused_until_replaced(dir: &Path) {
    let text = std::fs::read_to_string(dir.join("namespace.yaml")).expect("namespace.yaml");
    let line = text.lines().find(|l| l.trim_start().starts_with("secret:")).expect("the Secret's value");
    let value = line.split_once(':').expect("key: value").1.trim().trim_matches('"');
    let file = std::env::temp_dir().join(format!("damselfly-example-secret-{}", std::process::id()));
    std::fs::write(&file, value).expect("write");
    let refused = damselfly_scheduler::load_secret(Some(&file));
    let _ = std::fs::remove_file(&file);
    let err = refused.expect_err("the placeholder");
    assert!(err.to_string().contains("placeholder"), "{err}");
}
