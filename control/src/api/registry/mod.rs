//! Per-kind rules of the object life cycle, a file per kind, beside the
//! generic verbs of `objects.rs`.

pub(super) mod service;
