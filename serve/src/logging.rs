//! How every Damselfly process logs: to stderr, as text for people or JSON for collectors,
//! filtered by a tracing directive that `RUST_LOG` overrides.

use std::fmt;

use tracing_subscriber::EnvFilter;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LogFormat::Human => "human",
            LogFormat::Json => "json",
        })
    }
}

/// Whether `level` is a filter [`init_logging`] accepts; the error says why not.
pub fn check_log_level(level: &str) -> Result<(), String> {
    EnvFilter::try_new(level).map(drop).map_err(|e| e.to_string())
}

/// Installs the process's logger. Call once, before anything logs.
pub fn init_logging(format: LogFormat, level: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Human => builder.init(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_formats_parse_and_print_alike() {
        use clap::ValueEnum;
        for f in [LogFormat::Human, LogFormat::Json] {
            assert_eq!(LogFormat::from_str(&f.to_string(), false), Ok(f));
        }
        assert!(LogFormat::from_str("xml", false).is_err());
        assert!(check_log_level("info,damselfly=debug").is_ok());
        assert!(check_log_level("info,=[").is_err());
    }
}
