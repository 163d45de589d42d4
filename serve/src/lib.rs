//! Serving HTTP on a bound listener until a shutdown signal ([`serve`], [`serve_with`]), and
//! the endpoints every server of the project answers the same way ([`health`], [`metrics`]).
//! The mirror API, its health and metrics ports, the piece upload server and the scheduler's
//! HTTP port all run on this; none of them has an accept loop of its own.

mod accept;
mod endpoints;

pub use accept::{serve, serve_with};
pub use endpoints::{health, metrics, text, OPENMETRICS};
