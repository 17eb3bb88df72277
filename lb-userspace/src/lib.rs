//! The balancer's control plane: the `lb` binary's library.
pub mod maglev;
pub mod model;
