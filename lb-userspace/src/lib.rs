//! The balancer's control plane: the `lb` binary's library.
pub mod datapath;
pub mod maglev;
pub mod model;
pub mod reconcile;
