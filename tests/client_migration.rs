//! The client against a real server: live migration (protocol v2) through
//! DEVICE_FEATURE, MIG_DATA_READ and MIG_DATA_WRITE.

mod client_common;

use client_common::*;
use vfio_user::client::ClientOptions;
use vfio_user::device::migration::*;
use vfio_user::device::region;
use vfio_user::Errno;

const BAR0: u32 = region::BAR0 as u32;

fn device_state_blob() -> Vec<u8> {
    (0..3000u32).map(|i| (i * 13 % 256) as u8).collect()
}

#[test]
fn capabilities_and_initial_state() {
    let dev = Dev::default();
    let s = Server::device("migcaps", &dev, Features::default());
    let mut c = s.connect();
    let f = c.migration_flags().unwrap();
    assert_ne!(f & VFIO_MIGRATION_STOP_COPY, 0);
    assert_ne!(f & VFIO_MIGRATION_PRE_COPY, 0);
    assert_eq!(f & VFIO_MIGRATION_P2P, 0);
    assert_eq!(c.mig_state().unwrap(), VFIO_USER_DEVICE_STATE_RUNNING);
    // PROBE echoes the request.
    let probe =
        VFIO_DEVICE_FEATURE_PROBE | VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE;
    let raw = c.device_feature_raw(8, probe, &[]).unwrap();
    assert_eq!(raw, [8u32.to_le_bytes(), probe.to_le_bytes()].concat());
    // SET of the capabilities feature is not supported.
    let e = c
        .device_feature(
            VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_MIGRATION,
            &[0; 8],
        )
        .unwrap_err();
    assert_eq!(e.server_errno(), Some(Errno::EINVAL));
    s.finish(c);
}

#[test]
fn state_transitions_call_the_device_per_arc() {
    let dev = Dev::default();
    let s = Server::device("migstate", &dev, Features::default());
    let mut c = s.connect();
    c.set_mig_state(VFIO_USER_DEVICE_STATE_STOP).unwrap();
    assert_eq!(c.mig_state().unwrap(), VFIO_USER_DEVICE_STATE_STOP);
    c.set_mig_state(VFIO_USER_DEVICE_STATE_RUNNING).unwrap();
    // RUNNING -> STOP_COPY goes through STOP.
    c.set_mig_state(VFIO_USER_DEVICE_STATE_STOP_COPY).unwrap();
    assert_eq!(c.mig_state().unwrap(), VFIO_USER_DEVICE_STATE_STOP_COPY);
    assert_eq!(
        dev.lock().transitions,
        vec![
            VFU_MIGR_STATE_STOP,
            VFU_MIGR_STATE_RUNNING,
            VFU_MIGR_STATE_STOP,
            VFU_MIGR_STATE_STOP_AND_COPY
        ]
    );
    // STOP_COPY -> PRE_COPY is refused, and so are the P2P states.
    let e = c
        .set_mig_state(VFIO_USER_DEVICE_STATE_PRE_COPY)
        .unwrap_err();
    assert_eq!(e.server_errno(), Some(Errno::EINVAL));
    let e = c
        .set_mig_state(VFIO_USER_DEVICE_STATE_RUNNING_P2P)
        .unwrap_err();
    assert_eq!(e.server_errno(), Some(Errno::EINVAL));
    assert_eq!(c.mig_state().unwrap(), VFIO_USER_DEVICE_STATE_STOP_COPY);
    // Back to RUNNING (through STOP).
    c.set_mig_state(VFIO_USER_DEVICE_STATE_RUNNING).unwrap();
    assert_eq!(dev.lock().transitions.len(), 6);
    s.finish(c);
}

#[test]
fn device_state_round_trips_through_mig_data() {
    let blob = device_state_blob();
    let dev = Dev::default();
    dev.lock().mig_out = blob.clone();
    let s = Server::device("migdata", &dev, Features::default());
    let mut c = s.connect_with(ClientOptions {
        max_data_xfer_size: 1024,
        ..ClientOptions::default()
    });

    // Not in a saving state.
    let e = c.mig_data_read(64).unwrap_err();
    assert_eq!(e.server_errno(), Some(Errno::EINVAL));

    // Pre-copy, then stop-and-copy.
    c.set_mig_state(VFIO_USER_DEVICE_STATE_PRE_COPY).unwrap();
    let mut saved = c.mig_data_read(1000).unwrap();
    assert_eq!(saved, blob[..1000]);
    c.set_mig_state(VFIO_USER_DEVICE_STATE_STOP_COPY).unwrap();
    // Requests above our max_data_xfer_size are capped to it.
    let more = c.mig_data_read(5000).unwrap();
    assert_eq!(more.len(), 1024);
    saved.extend_from_slice(&more);
    saved.extend_from_slice(&c.mig_data_read_all(512).unwrap());
    assert_eq!(saved, blob);
    // Region accesses are refused while stopped-and-copying...
    let e = c.region_read(BAR0, 0, 4).unwrap_err();
    assert_eq!(e.server_errno(), Some(Errno::EINVAL));
    // ...and other commands while stopped.
    c.set_mig_state(VFIO_USER_DEVICE_STATE_STOP).unwrap();
    let e = c.device_info().unwrap_err();
    assert_eq!(e.server_errno(), Some(Errno::EINVAL));
    assert_eq!(c.region_read(BAR0, 0, 4).unwrap(), vec![0; 4]);
    // MIG_DATA_WRITE needs RESUMING.
    let e = c.mig_data_write(b"x").unwrap_err();
    assert_eq!(e.server_errno(), Some(Errno::EINVAL));

    // Restore the saved state into the (same) device.
    c.set_mig_state(VFIO_USER_DEVICE_STATE_RESUMING).unwrap();
    c.mig_data_write(&saved).unwrap();
    c.set_mig_state(VFIO_USER_DEVICE_STATE_STOP).unwrap();
    c.set_mig_state(VFIO_USER_DEVICE_STATE_RUNNING).unwrap();
    assert_eq!(dev.lock().mig_in, blob);
    assert_eq!(
        dev.lock().transitions,
        vec![
            VFU_MIGR_STATE_PRE_COPY,
            VFU_MIGR_STATE_STOP_AND_COPY,
            VFU_MIGR_STATE_STOP,
            VFU_MIGR_STATE_RESUME,
            VFU_MIGR_STATE_STOP,
            VFU_MIGR_STATE_RUNNING,
        ]
    );
    assert_eq!(
        c.device_info().unwrap().num_regions,
        region::NUM_REGIONS as u32
    );
    s.finish(c);
}

#[test]
fn migration_page_size_is_negotiated() {
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64;
    let dev = Dev::default();
    let s = Server::device("migpg", &dev, Features::default());
    let c = s.connect_with(ClientOptions {
        migration_pgsize: Some(page),
        ..ClientOptions::default()
    });
    assert_eq!(c.server_caps().migration_pgsize, Some(page));
    s.finish(c);
}
