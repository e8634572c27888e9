//! `vfuctl migrate`: live migration of a device between two servers, done
//! the way a VMM does it (vfio-user migration protocol v2).
//!
//! The guest memory is ours: with `--guest-mem-mib N`, two memfds of N MiB
//! are made, one mapped (with its fd) at IOVA 0 into each server. Guest
//! pages move from the source memory to the destination memory while the
//! source device keeps running, guided by its DMA dirty-page log; device
//! state moves through MIG_DATA_READ / MIG_DATA_WRITE.
//!
//! Device data is streamed: the destination is moved to RESUMING before
//! the source starts pre-copy, and each piece read from the source is
//! written to the destination at once, so the downtime covers only the
//! stop-copy data, the last dirty pages and the state changes.
//!
//! Once the destination has been asked to run, the source is never resumed:
//! two running copies of a device are worse than a failed migration. Before
//! that, a failure moves the source back to the state it started in, and
//! stops and resets the destination (docs/migration.md).

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use vfio_user::client::{Client, GuestMemory};
use vfio_user::device::dma_msg::{DMA_REGION_READ, DMA_REGION_WRITE};
use vfio_user::device::migration::*;
use vfio_user::device::region;

#[path = "migrate/options.rs"]
mod options;
#[path = "migrate/report.rs"]
mod report;

use super::cli::{
    connect, describe, host_page_size, human_bytes, region_name, state_name, At, Failure, Parsed,
};
use options::*;
use report::*;

/// Usage of `vfuctl migrate`.
pub const USAGE: &str = "\
Usage: vfuctl migrate --from SRC --to DST [options]

Live-migrates the device served at SRC into the (fresh) device served at
DST, as a VMM would:
  1. checks that both devices support migration (and, unless --force, that
     they have the same PCI vendor/device IDs);
  2. with --guest-mem-mib N > 0, creates N MiB of guest memory for each side
     and maps it (with its fd) at IOVA 0 into each server;
  3. applies every --set to the source (to start a workload, say);
  4. moves the destination to RESUMING, starts DMA dirty-page logging on
     the source, moves it to PRE_COPY (if it supports that) while it keeps
     running, and runs pre-copy rounds: read the device data available now,
     writing each piece to the destination as soon as it is read, and copy
     the guest pages dirtied since the last round (everything in the
     first), until a round moves at most --threshold bytes or
     --pre-copy-rounds rounds have run;
  5. downtime: source to STOP_COPY, stream the rest of its data to the
     destination, copy the last dirty pages, stop logging, destination to
     STOP then RUNNING; then the source goes to STOP.
On failure before the destination runs, the source is moved back to the
state it started in, and the destination is moved from RESUMING to STOP
and reset (DEVICE_RESET): it never runs with part of a state.

Options:
  --from SOCKET            the source server (required)
  --to SOCKET              the destination server (required)
  --guest-mem-mib N        guest memory size in MiB (default 0: none)
  --pre-copy-rounds MAX    most pre-copy rounds (default 5; 0: no PRE_COPY)
  --threshold BYTES        a round moving at most this ends pre-copy
                           (default 65536)
  --chunk BYTES            most device data per MIG_DATA_WRITE (and per
                           region write) sent to a server (default 32768,
                           what a server reading a request with one recv()
                           gets whole; reads stay as large as the server
                           allows)
  --set REGION:OFFSET=VALUE
                           32-bit write to the source before migrating
                           (repeatable)
  --verify                 before starting the destination, check that both
                           guest memories are byte for byte identical
  --compare REGION:OFFSET:LEN
                           after migrating, check that both devices read the
                           same LEN bytes there (repeatable)
  --force                  migrate between devices with different PCI IDs
  --no-progress            no progress line on a terminal
  --json                   print the summary (or the error) as JSON
  --timeout SECS           bound on every wait for a server (default 10)

Exit codes: 0 migrated; 2 bad arguments; 3 cannot connect, or a server went
away or stopped answering; 4 a server refused a step (the message names
it); 5 --verify or --compare found a difference; 1 local failure.";

/// Most device data moved (a device that never stops producing data must
/// not keep the migration going forever).
const MAX_DEVICE_DATA: u64 = 1 << 34;
/// Size of the first MIG_DATA_READ in stop-copy.
const STOP_COPY_FIRST_READ: usize = 64 << 10;
/// Largest `--chunk`.
const MAX_CHUNK: u64 = 1 << 30;
/// Largest guest memory accepted: 16 GiB, whose dirty bitmap (512 KiB at
/// 4 KiB pages) still fits in one DEVICE_FEATURE reply of the default
/// transfer size.
const MAX_GUEST_MEM_MIB: u64 = 16 << 10;
/// Largest `--compare` length.
const MAX_COMPARE: usize = 1 << 20;
/// Default `--threshold`.
const DEFAULT_THRESHOLD: u64 = 64 << 10;
/// Default `--pre-copy-rounds`.
const DEFAULT_ROUNDS: u32 = 5;
/// Bytes copied at a time in a full guest memory copy.
const COPY_CHUNK: usize = 1 << 20;

/// Runs `vfuctl migrate`.
pub fn run(p: &Parsed) -> Result<(), Failure> {
    let o = parse_options(p)?;
    let mut prog = Progress::new(o.progress && stderr_is_tty());
    let result = migrate(&o, &mut prog);
    prog.finish();
    let (stats, compared) = match result {
        Ok(r) => r,
        Err(f) => {
            if o.json {
                let v = json!({
                    "status": "error",
                    "exit_code": f.code(),
                    "message": f.message(),
                    "source": o.from,
                    "destination": o.to,
                });
                println!("{v}");
            }
            return Err(f);
        }
    };
    // The migration is done; --compare checks come on top.
    let (compares, compare_error) = match compared {
        Ok(c) => (c, None),
        Err(f) => (Vec::new(), Some(f)),
    };
    print_summary(&o, &stats, &compares, compare_error.as_ref());
    if let Some(f) = compare_error {
        return Err(f.with_note("the migration itself completed"));
    }
    let differing: Vec<&str> = compares
        .iter()
        .filter(|(_, d)| d.is_some())
        .map(|(c, _)| c.text.as_str())
        .collect();
    if !differing.is_empty() {
        return Err(Failure::Mismatch(format!(
            "migrated, but the devices differ at --compare {}",
            differing.join(", ")
        )));
    }
    Ok(())
}

/// Who we talk to and what we changed, for the rollback.
struct Session {
    src: Client,
    dst: Client,
    src_initial: u32,
    dst_initial: u32,
    src_touched: bool,
    dst_touched: bool,
    logging: bool,
    dst_run_requested: bool,
}

fn check_migratable(c: &mut Client, who: &str) -> Result<u64, Failure> {
    let flags = match c.migration_flags() {
        Ok(f) => f,
        Err(e) if e.server_errno().is_some() => {
            return Err(Failure::Refused(format!(
                "{who}: the device does not support migration (DEVICE_FEATURE MIGRATION: {})",
                describe(&e)
            )))
        }
        Err(e) => {
            return Err(super::cli::client_failure(
                &format!("{who}: DEVICE_FEATURE MIGRATION"),
                &e,
            ))
        }
    };
    if flags & VFIO_MIGRATION_STOP_COPY == 0 {
        return Err(Failure::Refused(format!(
            "{who}: the device does not support STOP_COPY migration (flags {flags:#x})"
        )));
    }
    Ok(flags)
}

/// Vendor and device ID from config space, if readable.
fn pci_ids(c: &mut Client) -> Option<(u16, u16)> {
    let b = c.region_read(region::CFG as u32, 0, 4).ok()?;
    let v = u16::from_le_bytes([*b.first()?, *b.get(1)?]);
    let d = u16::from_le_bytes([*b.get(2)?, *b.get(3)?]);
    Some((v, d))
}

/// The `--compare` results: each with the offset of its first difference.
type Compared = Result<Vec<(CompareSpec, Option<u64>)>, Failure>;

fn migrate(o: &Options, prog: &mut Progress) -> Result<(Stats, Compared), Failure> {
    let t_start = Instant::now();
    let mut src = connect(&o.from, "source", o.timeout, true)?;
    let mut dst = connect(&o.to, "destination", o.timeout, true)?;
    for c in [&mut src, &mut dst] {
        c.set_max_send_data(o.chunk)
            .map_err(|e| Failure::Usage(format!("--chunk: {e}")))?;
    }
    let src_flags = check_migratable(&mut src, "source")?;
    check_migratable(&mut dst, "destination")?;
    let src_state = src.mig_state().at("source: reading the migration state")?;
    let dst_state = dst
        .mig_state()
        .at("destination: reading the migration state")?;
    if src_state != VFIO_USER_DEVICE_STATE_RUNNING && src_state != VFIO_USER_DEVICE_STATE_STOP {
        return Err(Failure::Refused(format!(
            "source: the device is in migration state {}; migrating needs RUNNING or STOP",
            state_name(src_state)
        )));
    }
    if dst_state != VFIO_USER_DEVICE_STATE_RUNNING && dst_state != VFIO_USER_DEVICE_STATE_STOP {
        return Err(Failure::Refused(format!(
            "destination: the device is in migration state {}; resuming needs RUNNING or STOP",
            state_name(dst_state)
        )));
    }
    if !o.force {
        if let (Some(a), Some(b)) = (pci_ids(&mut src), pci_ids(&mut dst)) {
            if a != b {
                return Err(Failure::Refused(format!(
                    "the source is PCI device {:04x}:{:04x} but the destination is {:04x}:{:04x} (use --force to migrate anyway)",
                    a.0, a.1, b.0, b.1
                )));
            }
        }
    }

    let page = host_page_size();
    let mut mem = None;
    if o.mem_mib > 0 {
        let len = usize::try_from(o.mem_mib << 20)
            .map_err(|_| Failure::Usage("--guest-mem-mib is too large".into()))?;
        let make = |who: &str| {
            GuestMemory::new(len).map(Arc::new).map_err(|e| {
                Failure::Local(format!(
                    "creating {} MiB of {who} guest memory: {e}",
                    o.mem_mib
                ))
            })
        };
        let (sm, dm) = (make("source")?, make("destination")?);
        let flags = DMA_REGION_READ | DMA_REGION_WRITE;
        src.dma_map_memory(0, &sm, true, flags)
            .at("source: DMA_MAP of the guest memory")?;
        dst.dma_map_memory(0, &dm, true, flags)
            .at("destination: DMA_MAP of the guest memory")?;
        mem = Some((sm, dm));
    }
    for s in &o.sets {
        src.region_write(s.region, s.offset, &s.value.to_le_bytes())
            .at(&format!("source: --set {}", s.text))?;
    }

    let mut sess = Session {
        src,
        dst,
        src_initial: src_state,
        dst_initial: dst_state,
        src_touched: false,
        dst_touched: false,
        logging: false,
        dst_run_requested: false,
    };
    let mut st = Stats {
        mem_bytes: o.mem_mib << 20,
        page_size: page,
        ..Stats::default()
    };
    let pre_copy = src_state == VFIO_USER_DEVICE_STATE_RUNNING
        && src_flags & VFIO_MIGRATION_PRE_COPY != 0
        && o.max_rounds > 0;
    match sess.phases(o, prog, &mut st, mem.as_ref(), pre_copy) {
        Ok(()) => {
            st.total = t_start.elapsed();
            // On the same connections: many servers serve only one client.
            let compared = compare_devices(&mut sess, &o.compares);
            Ok((st, compared))
        }
        Err(f) => Err(sess.rollback(f)),
    }
}

type Mems = (Arc<GuestMemory>, Arc<GuestMemory>);

impl Session {
    fn set_src(&mut self, from: u32, to: u32) -> Result<(), Failure> {
        self.src_touched = true;
        self.src.set_mig_state(to).at(&format!(
            "source: moving from {} to {}",
            state_name(from),
            state_name(to)
        ))
    }

    fn set_dst(&mut self, from: u32, to: u32) -> Result<(), Failure> {
        self.dst_touched = true;
        self.dst.set_mig_state(to).at(&format!(
            "destination: moving from {} to {}",
            state_name(from),
            state_name(to)
        ))
    }

    /// Streams device data from the source to the destination: in
    /// pre-copy until a short read (what is available now), in stop-copy
    /// until an empty one (everything). Each piece is written as soon as it
    /// is read. Returns the bytes moved; adds the time spent reading and
    /// writing to `times` (read, write).
    ///
    /// Pre-copy reads ask for as much as the servers allow. Stop-copy reads
    /// start at [`STOP_COPY_FIRST_READ`] and double while they come back
    /// full: servers (ours and upstream's) send a reply as large as the
    /// request whatever the device gave, so asking 1 MiB for the last
    /// 64 KiB would put 1 MiB on the socket inside the downtime, twice
    /// (the data, then the empty read that ends it).
    fn stream_device(
        &mut self,
        until_empty: bool,
        what: &str,
        prog: &mut Progress,
        st: &mut Stats,
        times: &mut (Duration, Duration),
    ) -> Result<u64, Failure> {
        let chunk = self
            .src
            .options()
            .max_data_xfer_size
            .min(self.src.server_caps().max_data_xfer_size)
            .max(1);
        let phase = if until_empty { "stop-copy" } else { "pre-copy" };
        let mut size = if until_empty {
            STOP_COPY_FIRST_READ.min(chunk)
        } else {
            chunk
        };
        let mut got = 0u64;
        loop {
            let t = Instant::now();
            let d = self
                .src
                .mig_data_read(size)
                .at(&format!("source: {what}: MIG_DATA_READ"))?;
            times.0 += t.elapsed();
            let n = d.len() as u64;
            if st.device_bytes() + n > MAX_DEVICE_DATA {
                return Err(Failure::Refused(format!(
                    "source: {what}: the device produced more than {} of migration data",
                    human_bytes(MAX_DEVICE_DATA)
                )));
            }
            if n > 0 {
                let t = Instant::now();
                self.dst.mig_data_write(&d).at(&format!(
                    "destination: {what}: MIG_DATA_WRITE of {n} bytes (after {})",
                    st.device_bytes()
                ))?;
                times.1 += t.elapsed();
            }
            got += n;
            if until_empty {
                st.device_bytes_stop += n;
            } else {
                st.device_bytes_pre += n;
                st.streamed_pre += n;
            }
            prog.show(phase, st, false);
            if n == 0 || (!until_empty && d.len() < size) {
                return Ok(got);
            }
            if d.len() == size {
                size = size.saturating_mul(2).min(chunk);
            }
        }
    }

    /// Copies guest memory: everything (`full`) or the pages the dirty log
    /// reports. Returns the number of pages copied. The log is harvested in
    /// both cases, so that a full copy starts a fresh log.
    fn copy_memory(
        &mut self,
        mems: &Mems,
        full: bool,
        what: &str,
        st: &mut Stats,
    ) -> Result<u64, Failure> {
        let (sm, dm) = mems;
        let len = sm.len() as u64;
        let page = st.page_size;
        let bitmap = self
            .src
            .dma_logging_report(0, len, page)
            .at(&format!("{what}: DMA_LOGGING_REPORT"))?;
        let local = |e| Failure::Local(format!("{what}: copying guest memory: {e}"));
        if full {
            let mut buf = vec![0u8; COPY_CHUNK];
            let mut off = 0u64;
            while off < len {
                let n = (len - off).min(COPY_CHUNK as u64) as usize;
                sm.read(off, &mut buf[..n]).map_err(local)?;
                dm.write(off, &buf[..n]).map_err(local)?;
                off += n as u64;
            }
            let pages = len.div_ceil(page);
            st.initial_pages += pages;
            return Ok(pages);
        }
        let npages = len.div_ceil(page);
        let mut buf = vec![0u8; page as usize];
        let mut copied = 0;
        for (j, byte) in bitmap.iter().enumerate() {
            if *byte == 0 {
                continue;
            }
            for bit in 0..8u64 {
                let pg = 8 * j as u64 + bit;
                if byte & (1 << bit) == 0 || pg >= npages {
                    continue;
                }
                let off = pg * page;
                let n = (len - off).min(page) as usize;
                sm.read(off, &mut buf[..n]).map_err(local)?;
                dm.write(off, &buf[..n]).map_err(local)?;
                copied += 1;
            }
        }
        st.dirty_pages += copied;
        Ok(copied)
    }

    fn phases(
        &mut self,
        o: &Options,
        prog: &mut Progress,
        st: &mut Stats,
        mems: Option<&Mems>,
        pre_copy: bool,
    ) -> Result<(), Failure> {
        let mut src_state = self.src_initial;
        // The destination takes data from the first pre-copy round on.
        self.set_dst(self.dst_initial, VFIO_USER_DEVICE_STATE_RESUMING)?;
        if let Some((sm, _)) = mems {
            self.src
                .dma_logging_start(st.page_size, &[(0, sm.len() as u64)])
                .at("source: starting DMA dirty-page logging")?;
            self.logging = true;
        }
        let mut full_copy_done = false;
        if pre_copy {
            st.pre_copy = true;
            self.set_src(src_state, VFIO_USER_DEVICE_STATE_PRE_COPY)?;
            src_state = VFIO_USER_DEVICE_STATE_PRE_COPY;
            let mut unused = (Duration::ZERO, Duration::ZERO);
            for round in 1..=o.max_rounds {
                st.rounds = round;
                let what = format!("pre-copy round {round}");
                let dev = self.stream_device(false, &what, prog, st, &mut unused)?;
                let mut pages = 0;
                if let Some(m) = mems {
                    let what = format!("source: pre-copy round {round}");
                    pages = self.copy_memory(m, !full_copy_done, &what, st)?;
                    full_copy_done = true;
                }
                prog.show("pre-copy", st, true);
                if dev.saturating_add(pages.saturating_mul(st.page_size)) <= o.threshold {
                    break;
                }
            }
        }

        // Downtime: the source stops here and the destination runs at the end.
        let t0 = Instant::now();
        self.set_src(src_state, VFIO_USER_DEVICE_STATE_STOP_COPY)?;
        st.down.stop = t0.elapsed();
        let mut rw = (Duration::ZERO, Duration::ZERO);
        self.stream_device(true, "stop-copy", prog, st, &mut rw)?;
        (st.down.read, st.down.write) = rw;
        if let Some(m) = mems {
            let t = Instant::now();
            self.copy_memory(m, !full_copy_done, "source: stop-copy", st)?;
            self.src
                .dma_logging_stop()
                .at("source: stopping DMA dirty-page logging")?;
            self.logging = false;
            st.down.dirty_pages = t.elapsed();
            if o.verify {
                let tv = Instant::now();
                let diff = first_difference(m)?;
                st.verify = Some((diff.is_none(), tv.elapsed()));
                if let Some(off) = diff {
                    return Err(Failure::Mismatch(format!(
                        "--verify: the guest memories differ at offset {off:#x} after the final copy; the destination was not started"
                    )));
                }
            }
        } else if o.verify {
            st.verify = Some((true, Duration::ZERO));
        }
        prog.show("stop-copy", st, true);

        let t = Instant::now();
        self.set_dst(VFIO_USER_DEVICE_STATE_RESUMING, VFIO_USER_DEVICE_STATE_STOP)?;
        self.dst_run_requested = true;
        self.set_dst(VFIO_USER_DEVICE_STATE_STOP, VFIO_USER_DEVICE_STATE_RUNNING)?;
        st.down.resume = t.elapsed();
        st.downtime = t0.elapsed();

        self.set_src(
            VFIO_USER_DEVICE_STATE_STOP_COPY,
            VFIO_USER_DEVICE_STATE_STOP,
        )?;
        Ok(())
    }

    /// Undoes what can be undone after `f`, and says what was done.
    fn rollback(&mut self, f: Failure) -> Failure {
        let mut notes = Vec::new();
        let dst_state = if self.dst_touched {
            self.dst.mig_state().ok()
        } else {
            None
        };
        let dst_running = dst_state == Some(VFIO_USER_DEVICE_STATE_RUNNING);
        if self.logging && self.src.dma_logging_stop().is_ok() {
            self.logging = false;
        }
        // Only a destination asked to run may be running with the state.
        let committed = self.dst_run_requested && (dst_running || dst_state.is_none());
        if self.src_touched {
            match self.src.mig_state() {
                Err(_) => notes.push("the source's state is unknown".to_string()),
                Ok(s) if committed => {
                    notes.push(format!(
                        "the source was left in {} (the destination {})",
                        state_name(s),
                        if dst_running {
                            "is running"
                        } else {
                            "may be running"
                        }
                    ));
                }
                Ok(s) if s == self.src_initial => {
                    notes.push(format!("the source is still {}", state_name(s)))
                }
                Ok(s) => match self.src.set_mig_state(self.src_initial) {
                    Ok(()) => notes.push(format!(
                        "the source was moved back from {} to {}",
                        state_name(s),
                        state_name(self.src_initial)
                    )),
                    Err(e) => notes.push(format!(
                        "the source was left in {}: moving it back to {} failed: {}",
                        state_name(s),
                        state_name(self.src_initial),
                        describe(&e)
                    )),
                },
            }
        }
        if self.dst_touched {
            notes.push(match dst_state {
                Some(s) if !committed => self.stop_destination(s),
                Some(s) => format!("the destination is in {}", state_name(s)),
                None => "the destination's state is unknown".to_string(),
            });
        }
        if notes.is_empty() {
            f
        } else {
            f.with_note(&notes.join("; "))
        }
    }

    /// Brings a destination that must not run (it is in `s`) to STOP. One
    /// still in RESUMING is reset first (DEVICE_RESET; the libraries take
    /// it in RESUMING but not in STOP), so that a device that drops its
    /// incoming data on a reset holds none of the source's state, then
    /// moved to STOP. A device may refuse to leave RESUMING with an
    /// incomplete state: it then stays there, not running. Returns what was
    /// done.
    fn stop_destination(&mut self, s: u32) -> String {
        let d = &mut self.dst;
        match s {
            VFIO_USER_DEVICE_STATE_RUNNING => {
                // Not asked to run, so it never left RUNNING: it took no data.
                return "the destination is still RUNNING (it took no data)".to_string();
            }
            VFIO_USER_DEVICE_STATE_STOP => return "the destination is in STOP".to_string(),
            _ => {}
        }
        let reset = if s == VFIO_USER_DEVICE_STATE_RESUMING {
            match d.reset() {
                Ok(()) => " and reset".to_string(),
                Err(e) => format!(" (DEVICE_RESET failed: {})", describe(&e)),
            }
        } else {
            String::new()
        };
        let moved = d.set_mig_state(VFIO_USER_DEVICE_STATE_STOP);
        let now = d.mig_state();
        match (moved, now) {
            (Ok(()), Ok(n)) => format!(
                "the destination was moved from {} to {}{reset}",
                state_name(s),
                state_name(n)
            ),
            (Err(e), Ok(n)) => format!(
                "the destination{} refused to leave {} ({}); it is in {} and does not run",
                if reset == " and reset" {
                    " was reset but"
                } else {
                    &reset
                },
                state_name(s),
                describe(&e),
                state_name(n)
            ),
            (_, Err(_)) => format!(
                "the destination was in {}; its state is now unknown",
                state_name(s)
            ),
        }
    }
}

/// The offset of the first byte where the two memories differ.
fn first_difference(m: &Mems) -> Result<Option<u64>, Failure> {
    let (sm, dm) = m;
    let len = sm.len() as u64;
    let mut a = vec![0u8; COPY_CHUNK];
    let mut b = vec![0u8; COPY_CHUNK];
    let mut off = 0u64;
    let local = |e| Failure::Local(format!("--verify: reading guest memory: {e}"));
    while off < len {
        let n = (len - off).min(COPY_CHUNK as u64) as usize;
        sm.read(off, &mut a[..n]).map_err(local)?;
        dm.read(off, &mut b[..n]).map_err(local)?;
        // The slice comparison is a memcmp; only a difference is searched.
        if a[..n] != b[..n] {
            let i = a[..n]
                .iter()
                .zip(&b[..n])
                .position(|(x, y)| x != y)
                .unwrap_or(0);
            return Ok(Some(off + i as u64));
        }
        off += n as u64;
    }
    Ok(None)
}

/// Runs the `--compare` checks (the source is stopped, the destination
/// running); each result holds the offset of the first difference, if any.
fn compare_devices(sess: &mut Session, specs: &[CompareSpec]) -> Compared {
    let mut out = Vec::new();
    for c in specs {
        let what = |who: &str| {
            format!(
                "--compare {}: reading {} bytes at {:#x} of the {who}'s {}",
                c.text,
                c.len,
                c.offset,
                region_name(c.region)
            )
        };
        let a = sess
            .src
            .region_read(c.region, c.offset, c.len)
            .at(&what("source"))?;
        let b = sess
            .dst
            .region_read(c.region, c.offset, c.len)
            .at(&what("destination"))?;
        let diff = a
            .iter()
            .zip(&b)
            .position(|(x, y)| x != y)
            .map(|i| c.offset + i as u64);
        out.push((c.clone(), diff));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::super::cli::{flag, parse_args, valued};
    use super::*;

    fn opts(args: &[&str]) -> Result<Options, Failure> {
        let a: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        parse_options(&parse_args(&a, &crate::MIGRATE_OPTS)?)
    }

    #[test]
    fn set_and_compare_specs() {
        assert_eq!(
            parse_set("bar0:0x10=0xdeadbeef").unwrap(),
            SetSpec {
                text: "bar0:0x10=0xdeadbeef".into(),
                region: 0,
                offset: 0x10,
                value: 0xdead_beef
            }
        );
        for bad in [
            "bar0:0x10",
            "bar0=1",
            "bar9:0=1",
            "bar0:0=0x100000000",
            "bar0:x=1",
        ] {
            assert!(matches!(parse_set(bad), Err(Failure::Usage(_))), "{bad}");
        }
        let c = parse_compare("config:0:64").unwrap();
        assert_eq!((c.region, c.offset, c.len), (7, 0, 64));
        for bad in ["bar0:0", "bar0:0:0", "bar0:0:1:2", "bar0:0:0x200000"] {
            assert!(
                matches!(parse_compare(bad), Err(Failure::Usage(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn options_are_checked() {
        let o = opts(&[
            "--from", "a", "--to", "b", "--set", "bar0:0=1", "--set", "bar0:4=2",
        ])
        .unwrap();
        assert_eq!((o.mem_mib, o.max_rounds, o.threshold), (0, 5, 65536));
        assert_eq!(o.chunk, vfio_user::client::DEFAULT_MAX_SEND_DATA);
        assert_eq!(
            opts(&["--from", "a", "--to", "b", "--chunk", "0x1000"])
                .unwrap()
                .chunk,
            4096
        );
        assert_eq!(o.sets.len(), 2);
        assert!(o.progress && !o.json && !o.verify);
        let o = opts(&[
            "--from=a",
            "--to=b",
            "--pre-copy-rounds",
            "0",
            "--no-progress",
        ])
        .unwrap();
        assert_eq!(o.max_rounds, 0);
        assert!(!o.progress);
        for bad in [
            &["--to", "b"][..],
            &["--from", "a"],
            &["--from", "a", "--to", "a"],
            &["--from", "a", "--to", "b", "extra"],
            &["--from", "a", "--to", "b", "--guest-mem-mib", "1000000"],
            &["--from", "a", "--to", "b", "--pre-copy-rounds", "-1"],
            &["--from", "a", "--to", "b", "--chunk", "0"],
            &["--from", "a", "--to", "b", "--chunk", "0x40000001"],
        ] {
            assert!(matches!(opts(bad), Err(Failure::Usage(_))), "{bad:?}");
        }
        let _ = (flag("x"), valued("y"));
    }

    #[test]
    fn memory_difference_is_found() {
        let a = Arc::new(GuestMemory::new(3 * COPY_CHUNK / 2).unwrap());
        let b = Arc::new(GuestMemory::new(3 * COPY_CHUNK / 2).unwrap());
        let m = (a.clone(), b.clone());
        assert_eq!(first_difference(&m).unwrap(), None);
        b.write(COPY_CHUNK as u64 + 7, b"x").unwrap();
        assert_eq!(first_difference(&m).unwrap(), Some(COPY_CHUNK as u64 + 7));
    }
}
