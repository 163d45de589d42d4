//! `damselfly`: parses the command line and hands each subcommand to the crate that implements
//! it, with logging set up and a shutdown signal (SIGINT or SIGTERM) to stop on.

use anyhow::Context;
use clap::Parser;
use damselfly::{Cli, Command};
use damselfly_serve::init_logging;

fn main() -> anyhow::Result<()> {
    keep_freed_memory();
    let cli = Cli::parse();
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start the runtime")?;
    match cli.command {
        Command::Mirror(args) => {
            let config = args.into_config().context("invalid configuration")?;
            init_logging(config.log_format, &config.log_level);
            runtime.block_on(async {
                let stop = stop_signal()?;
                damselfly_mirror::cli::run(config, stop).await.context("the mirror failed")
            })
        }
        Command::Scheduler(args) => {
            init_logging(args.core.log_format, &args.core.log_level);
            runtime.block_on(async {
                let stop = stop_signal()?;
                damselfly_control::cli::run(args, stop).await.context("the scheduler failed")
            })
        }
        Command::Preheat(args) => {
            runtime.block_on(damselfly_control::cli::preheat(&args)).context("preheat failed")?;
            Ok(())
        }
        Command::HostsGen(args) => {
            damselfly_hosts_gen::cli::run(&args, &mut std::io::stdout()).context("hosts-gen failed")
        }
        Command::Cache(args) => match runtime.block_on(damselfly_cache::cli::run(&args)) {
            Ok(()) => Ok(()),
            Err(failure) => {
                eprintln!("damselfly cache: {}", failure.message);
                std::process::exit(failure.code);
            }
        },
    }
}

/// Streaming churns through buffers of a few hundred KiB (socket reads, staged chunks). By
/// default glibc hands such blocks back to the kernel as soon as they are freed, and the next
/// read faults in fresh zeroed pages, which costs CPU on every cold blob (`docs/benchmarks.md`).
/// Freed memory is kept for reuse instead, up to a bound.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 8 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 128 << 20);
    }
}

/// Resolves at the first SIGINT or SIGTERM. Watching starts now, so a signal that arrives while
/// the daemon starts is not lost.
fn stop_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
    })
}
