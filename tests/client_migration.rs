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

/// Connects, retrying while the server is between two clients.
fn connect_retry(s: &Server) -> vfio_user::client::Client {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match vfio_user::client::Client::connect(&s.path) {
            Ok(c) => return c,
            Err(e) => {
                assert!(std::time::Instant::now() < deadline, "connect: {e}");
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
    }
}

/// A client that leaves while the device is in any migration state: the
/// library walks the device back to RUNNING through the legal arcs (the
/// device's transition callback sees each one, in order) before the reset
/// callback runs with LOST_CONN, and the next client finds a working device.
/// An explicit DEVICE_RESET leaves the migration state alone.
#[test]
fn lost_connection_in_any_state_returns_to_running() {
    use vfio_user::device::ResetType;
    const V_STOP: u32 = VFU_MIGR_STATE_STOP;
    const V_RUN: u32 = VFU_MIGR_STATE_RUNNING;
    // (state the client leaves the device in, arcs to get there from
    // RUNNING, arcs the library makes once it has gone)
    let cases: [(u32, &[u32], &[u32]); 5] = [
        (VFIO_USER_DEVICE_STATE_RUNNING, &[], &[]),
        (VFIO_USER_DEVICE_STATE_STOP, &[V_STOP], &[V_RUN]),
        (
            VFIO_USER_DEVICE_STATE_STOP_COPY,
            &[V_STOP, VFU_MIGR_STATE_STOP_AND_COPY],
            &[V_STOP, V_RUN],
        ),
        (
            VFIO_USER_DEVICE_STATE_PRE_COPY,
            &[VFU_MIGR_STATE_PRE_COPY],
            &[V_RUN],
        ),
        (
            VFIO_USER_DEVICE_STATE_RESUMING,
            &[V_STOP, VFU_MIGR_STATE_RESUME],
            &[V_STOP, V_RUN],
        ),
    ];
    let dev = Dev::default();
    dev.lock().mig_out = device_state_blob();
    // Two clients per case, one for the DEVICE_RESET check, one to verify.
    let s = Server::device_serving("miglost", &dev, Features::default(), 2 * cases.len() + 2);
    for (i, (state, to, back)) in cases.iter().enumerate() {
        let mut c = connect_retry(&s);
        assert_eq!(c.mig_state().unwrap(), VFIO_USER_DEVICE_STATE_RUNNING);
        let before = dev.lock().transitions.len();
        c.set_mig_state(*state).unwrap();
        // Leave mid-way through the data as well where there is data.
        match *state {
            VFIO_USER_DEVICE_STATE_PRE_COPY | VFIO_USER_DEVICE_STATE_STOP_COPY => {
                assert!(!c.mig_data_read(100).unwrap().is_empty());
            }
            VFIO_USER_DEVICE_STATE_RESUMING => c.mig_data_write(&[1, 2, 3]).unwrap(),
            _ => {}
        }
        assert_eq!(dev.lock().transitions[before..], **to, "state {state}");
        let resets = dev.lock().resets.len();
        drop(c);

        // The next client: the device is RUNNING and its BAR works.
        let mut c = connect_retry(&s);
        assert_eq!(
            c.mig_state().unwrap(),
            VFIO_USER_DEVICE_STATE_RUNNING,
            "after leaving in state {state}"
        );
        let st = dev.lock();
        assert_eq!(
            st.transitions[before + to.len()..],
            **back,
            "arcs back from state {state}"
        );
        assert_eq!(st.resets[resets..], [ResetType::LostConn]);
        drop(st);
        let v = 0x5a5a_0000u32 + i as u32;
        c.region_write(BAR0, 0x10, &v.to_le_bytes()).unwrap();
        assert_eq!(c.region_read(BAR0, 0x10, 4).unwrap(), v.to_le_bytes());
        // Hand the device to the next case's client.
        drop(c);
    }

    // An explicit device reset keeps the migration state.
    // (STOP and STOP_COPY refuse DEVICE_RESET altogether.)
    let mut c = connect_retry(&s);
    c.set_mig_state(VFIO_USER_DEVICE_STATE_RESUMING).unwrap();
    let before = dev.lock().transitions.len();
    c.reset().unwrap();
    assert_eq!(c.mig_state().unwrap(), VFIO_USER_DEVICE_STATE_RESUMING);
    assert_eq!(dev.lock().transitions.len(), before);
    assert_eq!(dev.lock().resets.last(), Some(&ResetType::Device));
    drop(c);
    let mut c = connect_retry(&s);
    assert_eq!(c.mig_state().unwrap(), VFIO_USER_DEVICE_STATE_RUNNING);
    assert_eq!(dev.lock().transitions[before..], [V_STOP, V_RUN]);
    s.finish(c);
}
