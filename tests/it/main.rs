//! The one integration-test binary (one link step keeps a 2-core machine fast). Each concern is a
//! module; add yours with a `mod` line below.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod crash_child;
mod store_wrapper;
mod support;

mod projection_support;
mod store_concurrency;
mod store_conformance;
mod store_crash;

mod projection_delivery;

mod runtime_support;

mod embedding;
mod http_service;
mod projection_catchup;
mod projection_crash;
mod projection_failures;
mod projection_rebuild;
mod runtime_activation;
mod runtime_commands;
mod runtime_crash;
mod runtime_lifecycle;
mod runtime_pipelining;
mod runtime_snapshots;

mod saga_support;

mod saga_crash;
mod saga_deadlines;
mod saga_transfer;
