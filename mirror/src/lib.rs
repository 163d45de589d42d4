
pub mod cli;
pub mod config;
pub mod oci;
pub mod upstream;
pub mod api;
pub mod daemon;
pub mod server;
