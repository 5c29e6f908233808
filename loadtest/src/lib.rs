//! The load generator's library: the [`summary`] it prints and saves as JSON, and the
//! [`policy`] bounds it holds every client to. The soak (tests/soak/) reads the same
//! summary type and judges by the same bounds, so each is defined once.
//! The binary (`src/main.rs`) adds the flags, the HTTP clients and the plot.

pub mod policy;
pub mod summary;
