//! The balancer's control plane: the `lb` binary's library.
//!
//! Dependencies flow one way: `cli` -> `api` -> `daemon` -> `reconcile` ->
//! `datapath`, with `model`, `maglev`, `scheduler`, `rebalance` and lb-common at the bottom. `daemon`
//! owns the desired state and is the only writer of the maps, through
//! `reconcile`; `health` and `neighbour` only report; `maglev`, `scheduler` and `rebalance` are pure.
pub mod agent;
pub mod announce;
pub mod api;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod datapath;
pub mod decap;
pub mod health;
pub mod interface;
pub mod maglev;
pub mod metrics;
pub mod model;
pub mod neighbour;
pub mod publish;
pub mod rebalance;
pub mod reconcile;
pub mod scheduler;
pub mod store;
pub mod sync;
