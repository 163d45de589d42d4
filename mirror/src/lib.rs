pub mod api;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod daemon;
pub mod oci;
pub mod proxy;
pub mod upstream;
