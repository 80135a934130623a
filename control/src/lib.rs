//! Skiff's control plane. Not built yet: its issue fills this crate with
//! the `skiff-control` binary.
