//! The one integration-test binary (one link step keeps a 2-core machine fast). Each concern is a
//! module; add yours with a `mod` line below.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

mod store_concurrency;
mod store_conformance;
mod store_crash;
