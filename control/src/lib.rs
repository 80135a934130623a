//! Skiff's control plane: a Kubernetes-compatible apiserver stored in etcd,
//! a scheduler and the controllers, all in one process (`skiff-control`).
//!
//! The apiserver speaks the upstream wire format (k8s-openapi types, JSON;
//! protobuf request bodies are read too) so that kubectl, kube-rs and the
//! Python client work unchanged; the
//! scheduler and controllers are ordinary kube-rs clients of it.

pub mod alloc;
pub mod api;
pub mod auth;
pub mod client;
pub mod controllers;
pub mod duration;
pub mod etcd;
pub mod etcd_pki;
pub mod fit;
mod informer;
pub mod leader;
mod meta;
pub mod patch;
pub mod pki;
pub mod protobuf;
pub mod resources;
pub mod scheduler;
pub mod selector;
pub mod server;
pub mod status;
pub mod store;
pub mod table;
#[cfg(test)]
mod testutil;
pub mod tokens;
pub mod validate;
