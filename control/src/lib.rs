//! Skiff's control plane: a Kubernetes-compatible apiserver stored in etcd,
//! a scheduler and the controllers, all in one process (`skiff-control`).
//!
//! The apiserver speaks the upstream wire format (k8s-openapi types, JSON;
//! protobuf request bodies are read too) so that kubectl, kube-rs and the
//! Python client work unchanged; the
//! scheduler and controllers are ordinary kube-rs clients of it.

pub mod alloc;
pub mod apiserver;
pub mod auth;
pub mod claims;
pub mod client;
pub mod controllers;
pub mod cron;
pub mod duration;
mod events;
pub mod fit;
mod informer;
pub mod leader;
mod meta;
pub mod pki;
pub mod quantity;
pub mod resources;
pub mod scheduler;
mod secure;
pub mod selector;
pub mod server;
pub mod status;
pub mod storage;
pub mod telemetry;
#[cfg(test)]
mod testutil;
pub mod tokens;
pub mod usage;
