//! A real PostgreSQL 15 for the store tests: one fresh database per test on a server shared
//! with every test running at the same time. It lives in `outpost-testkit` (`postgres.rs`),
//! next to the hub end-to-end tests that use it too.

pub use outpost_testkit::{skip_postgres_tests as skip_peer_tests, PgDatabase};
