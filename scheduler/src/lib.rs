//! Damselfly's scheduler: soft state about hosts, tasks and the peers downloading them, and
//! the rules that tell each download where to get its pieces.

pub mod proto {
    tonic::include_proto!("damselfly.scheduler.v1");
}
pub mod token;
