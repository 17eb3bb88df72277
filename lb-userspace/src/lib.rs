//! The balancer's control plane: the `lb` binary's library.
//!
//! `cli` (in main.rs) talks to `daemon` through `api`; `daemon` owns the
//! desired state and is the only writer of the maps, through `reconcile`
//! and `datapath`; `maglev` is pure; `neighbour` only reports MACs.
pub mod api;
pub mod config;
pub mod daemon;
pub mod datapath;
pub mod health;
pub mod maglev;
pub mod metrics;
pub mod model;
pub mod neighbour;
pub mod reconcile;
