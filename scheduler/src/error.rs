//! The crate's one error type, and how it maps onto gRPC status codes.

/// What can go wrong in the scheduler: a caller's bad input, a call that needs an earlier one
/// (announce before download), or the listeners it serves on.
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),
    /// A request for a download that is over: it failed, a newer registration took it over,
    /// or it was dropped. Its stream was already told.
    #[error("failed precondition: {0}")]
    DownloadEnded(&'static str),
    #[error("the scheduler is shutting down")]
    ShuttingDown,
    /// A bound on the scheduler's state was reached (hosts, a host's tasks).
    #[error("{0}")]
    Exhausted(String),
    /// Another node owns this host id (it announced it first, with another owner token).
    #[error("host id {0} belongs to another node")]
    NotOwner(String),
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
    #[error("TLS: {0}")]
    Tls(String),
}

impl SchedulerError {
    pub(crate) fn invalid(msg: impl Into<String>) -> Self {
        SchedulerError::InvalidArgument(msg.into())
    }

    pub(crate) fn precondition(msg: impl Into<String>) -> Self {
        SchedulerError::FailedPrecondition(msg.into())
    }
}

impl From<SchedulerError> for tonic::Status {
    fn from(e: SchedulerError) -> Self {
        match e {
            SchedulerError::InvalidArgument(m) => tonic::Status::invalid_argument(m),
            SchedulerError::FailedPrecondition(m) => tonic::Status::failed_precondition(m),
            SchedulerError::DownloadEnded(m) => tonic::Status::failed_precondition(m),
            SchedulerError::ShuttingDown => tonic::Status::unavailable("the scheduler is shutting down"),
            SchedulerError::Exhausted(m) => tonic::Status::resource_exhausted(m),
            SchedulerError::NotOwner(id) => {
                tonic::Status::permission_denied(format!("host id {id} belongs to another node"))
            }
            SchedulerError::Io(e) => tonic::Status::internal(e.to_string()),
            SchedulerError::Tls(m) => tonic::Status::internal(m),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_the_status_codes_clients_act_on() {
        assert_eq!(tonic::Status::from(SchedulerError::invalid("x")).code(), tonic::Code::InvalidArgument);
        // The node re-announces on FailedPrecondition, so an unknown host must map to it.
        assert_eq!(tonic::Status::from(SchedulerError::precondition("x")).code(), tonic::Code::FailedPrecondition);
    }
}
