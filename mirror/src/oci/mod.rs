//! Strict parsing of what arrives from the network (paths, digests, names, `Range`) and the
//! OCI error vocabulary sent back.

pub mod error;
pub mod kind;
pub mod range;
pub mod registry_prefix;
pub mod route;

pub use error::{error_body, ErrorCode};
pub use kind::ContentKind;
pub use range::{content_range, parse_range, unsatisfied_content_range, RangeError, RangeSpec};
pub use route::{parse_route, Reference, Route, RouteError, RouteKind};
