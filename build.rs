//! Build steps beside rustc:
//! - compile the variadic `vfu_log` shim (C);
//! - give the shared library its SONAME and export list;
//! - generate the API part of `libvfio-user.h` with cbindgen into OUT_DIR
//!   (between the hand-written preamble and trailer of src/ffi).
//!   `tests/header.rs` fails when the committed header differs; run
//!   `VFU_UPDATE_HEADER=1 cargo build` to refresh the committed copy.

use std::env;
use std::path::PathBuf;

fn main() {
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());

    println!("cargo:rerun-if-changed=src/ffi/log_shim.c");
    cc::Build::new()
        .file("src/ffi/log_shim.c")
        .flag_if_supported("-Wall")
        .flag_if_supported("-Wextra")
        .warnings_into_errors(true)
        .compile("vfu_log_shim");

    let map = root.join("src/ffi/exports.map");
    println!("cargo:rerun-if-changed={}", map.display());
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libvfio-user.so.0");
    println!(
        "cargo:rustc-cdylib-link-arg=-Wl,--version-script={}",
        map.display()
    );
    // The shim is referenced only from C's point of view; keep it in the
    // shared library.
    println!("cargo:rustc-cdylib-link-arg=-Wl,--undefined=vfu_log");

    for f in [
        "src/ffi/mod.rs",
        "src/ffi/dma.rs",
        "src/ffi/pci.rs",
        "src/ffi/region_fds.rs",
        "src/ffi/header_preamble.h",
        "src/ffi/header_trailer.h",
        "cbindgen.toml",
    ] {
        println!("cargo:rerun-if-changed={f}");
    }
    println!("cargo:rerun-if-env-changed=VFU_UPDATE_HEADER");
    let preamble = std::fs::read_to_string(root.join("src/ffi/header_preamble.h")).unwrap();
    let trailer = std::fs::read_to_string(root.join("src/ffi/header_trailer.h")).unwrap();
    let config = cbindgen::Config::from_file(root.join("cbindgen.toml")).unwrap();
    let header = out.join("libvfio-user.h");
    cbindgen::Builder::new()
        .with_config(config)
        .with_src(root.join("src/ffi/mod.rs"))
        .with_after_include(preamble)
        .with_trailer(trailer)
        .generate()
        .expect("cbindgen failed")
        .write_to_file(&header);
    if env::var_os("VFU_UPDATE_HEADER").is_some() {
        std::fs::copy(&header, root.join("include/vfio-user/libvfio-user.h")).unwrap();
    }
}
