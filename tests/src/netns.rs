//! Network namespaces for end-to-end tests (filled in with the e2e suite).
