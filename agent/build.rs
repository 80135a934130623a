//! Builds the kernel programs in `ebpf/` (nightly, bpfel-unknown-none, with
//! bpf-linker) into OUT_DIR so that `cargo build` is the only command.
//! `cargo xtask setup` installs what this needs.
fn main() -> anyhow::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../ebpf")
        .canonicalize()?;
    let root = root
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("non-UTF-8 path {}", root.display()))?;
    println!("cargo:rerun-if-changed={root}/common");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "skiff-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
