//! Builds the kernel programs (`agent-ebpf`) for the BPF target; `src/datapath`
//! embeds the object from `OUT_DIR`. Needs `bpf-linker` and the `rust-src`
//! component (`cargo xtask setup` installs both).

use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    // Build the kernel side with the toolchain that builds us (rustup sets this), so one
    // toolchain with `rust-src` is all a machine needs.
    println!("cargo:rerun-if-env-changed=RUSTUP_TOOLCHAIN");
    let toolchain = std::env::var("RUSTUP_TOOLCHAIN").unwrap_or_else(|_| "stable".to_owned());
    if std::env::var_os("RUSTC_BOOTSTRAP").is_none() && !toolchain.starts_with("nightly") {
        // `-Z build-std=core` is how core gets built for bpfel-unknown-none; on a stable
        // toolchain that needs RUSTC_BOOTSTRAP, for the child cargo only.
        // SAFETY: the build script has not started any thread yet.
        unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    }
    let ebpf = Package {
        name: "egret-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../agent-ebpf"),
        ..Package::default()
    };
    aya_build::build_ebpf([ebpf], Toolchain::Custom(&toolchain))
}
