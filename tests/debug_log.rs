//! The library's log at `LOG_DEBUG`: one line per region access in the
//! reference implementation's wording, and the lines it logs when a client
//! goes away; none of the debug lines at `LOG_INFO`.

mod client_common;

use std::sync::{Arc, Mutex};

use client_common::*;
use vfio_user::client::Client;
use vfio_user::device::{log_level, region};
use vfio_user::{Context, Errno};

const BAR0: u32 = region::BAR0 as u32;
const CFG: u32 = region::CFG as u32;

/// Serves one client with the library's log at `level`, then calls run
/// once more with nobody attached; returns (level, line) pairs.
fn session(tag: &str, level: i32, client: impl FnOnce(Client)) -> Vec<(i32, String)> {
    let path = sock_path(tag);
    let lines = Arc::new(Mutex::new(Vec::new()));
    let (l, p) = (lines.clone(), path.clone());
    let (tx, rx) = std::sync::mpsc::channel();
    let server = std::thread::spawn(move || {
        let ctx = Context::new(&p, 0, std::ptr::null_mut()).unwrap();
        let keep = setup_device(&ctx, Dev::default(), Features::default()).unwrap();
        ctx.on_log(level, move |_, lvl, msg| {
            l.lock().unwrap().push((lvl, msg.to_string()))
        })
        .unwrap();
        ctx.realize().unwrap();
        tx.send(()).unwrap();
        ctx.attach().unwrap();
        assert_eq!(ctx.run(), Err(Errno::ENOTCONN));
        // Nobody attached now.
        assert_eq!(ctx.run(), Err(Errno::ENOTCONN));
        drop(ctx);
        drop(keep);
    });
    rx.recv().unwrap();
    client(Client::connect(&path).unwrap());
    server.join().unwrap();
    let v = lines.lock().unwrap().clone();
    v
}

fn accesses(mut c: Client) {
    c.region_write(BAR0, 0x10, &0x1234u32.to_le_bytes())
        .unwrap();
    assert_eq!(
        c.region_read(BAR0, 0x10, 4).unwrap(),
        0x1234u32.to_le_bytes()
    );
    c.region_write(BAR0, 0x20, &[0x5a; 16]).unwrap();
    c.region_read(BAR0, 0x0, 8).unwrap();
    c.region_read(CFG, 0, 2).unwrap();
    // A 1-byte write in the middle of a BAR register is refused.
    let e = c.region_write(CFG, 0x11, &[0]).unwrap_err();
    assert_eq!(e.server_errno(), Some(Errno::EINVAL));
    drop(c);
}

fn has(lines: &[(i32, String)], level: i32, text: &str) -> bool {
    lines.iter().any(|(l, m)| *l == level && m == text)
}

#[test]
fn region_accesses_and_disconnect_are_logged_at_debug() {
    let lines = session("dbg", log_level::DEBUG, accesses);
    let d = log_level::DEBUG;
    for want in [
        "region0: wrote 0x1234 to (0x10:4)",
        "region0: read 0x1234 from (0x10:4)",
        "region0: wrote 16 bytes at 0x20",
        "region0: read 0 from (0:8)",
        "region7: read 0x4e58 from (0:2)",
        "region7: write to (0x11:1) failed: Invalid argument",
        "failed to receive request header: No message of desired type",
    ] {
        assert!(has(&lines, d, want), "no '{want}' in {lines:#?}");
    }
    assert!(
        has(
            &lines,
            log_level::ERR,
            "tran_sock_get_request_header: not connected"
        ),
        "{lines:#?}"
    );
    // In order: the write before the read.
    let pos = |t: &str| lines.iter().position(|(_, m)| m == t).unwrap();
    assert!(pos("region0: wrote 0x1234 to (0x10:4)") < pos("region0: read 0x1234 from (0x10:4)"));
}

#[test]
fn no_debug_lines_below_debug() {
    let lines = session("info", log_level::INFO, accesses);
    assert!(
        lines.iter().all(|(l, _)| *l <= log_level::INFO),
        "{lines:#?}"
    );
    assert!(
        !lines.iter().any(|(_, m)| m.starts_with("region")),
        "{lines:#?}"
    );
    // The error still shows.
    assert!(
        has(
            &lines,
            log_level::ERR,
            "tran_sock_get_request_header: not connected"
        ),
        "{lines:#?}"
    );
}
