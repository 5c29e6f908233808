//! API tests: the service on port 0 against a real `redis-server` started per test.

mod acl;
mod batch_cost;
mod check;
mod config_errors;
mod contract;
mod decide;
mod identity;
mod parity;
mod policies;
mod redis_store;
mod socket;
