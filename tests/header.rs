//! The committed `include/vfio-user/libvfio-user.h` must be exactly what
//! build.rs generates from the Rust FFI (refresh it with
//! `VFU_UPDATE_HEADER=1 cargo build`).

#[test]
fn committed_header_matches_generated() {
    let generated = include_str!(concat!(env!("OUT_DIR"), "/libvfio-user.h"));
    let committed = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/include/vfio-user/libvfio-user.h"
    ))
    .expect("include/vfio-user/libvfio-user.h is missing");
    assert!(
        generated == committed,
        "include/vfio-user/libvfio-user.h is stale: run `VFU_UPDATE_HEADER=1 cargo build` and commit it"
    );
}
