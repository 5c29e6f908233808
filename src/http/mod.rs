//! The HTTP layer: routes, the quota headers, and the JSON error bodies.

pub mod error;
pub mod headers;
pub mod routes;
