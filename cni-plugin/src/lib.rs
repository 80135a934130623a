//! Skiff's CNI 1.1 plugin. Not built yet: its issue (pod network) fills this
//! crate with the `skiff-cni` binary.
