//! What every Damselfly server shares: serving HTTP on a bound listener until a shutdown
//! signal ([`serve`], [`serve_with`]), the endpoints every server answers the same way
//! ([`health`], [`metrics`]), and how its process logs ([`init_logging`]). The mirror API, its
//! health and metrics ports, the piece upload server and the scheduler's HTTP port all run on
//! this; none of them has an accept loop of its own.

mod accept;
mod activity;
mod endpoints;
mod logging;
mod tls;

pub use accept::{serve, serve_limited, serve_with, PeerAddr};
pub use activity::{until_idle, Activity, Limits, Watched};
pub use endpoints::{health, metrics, text, OPENMETRICS};
pub use logging::{check_log_level, init_logging, LogFormat};
pub use tls::{pem_certificates, server_config, server_tls};
