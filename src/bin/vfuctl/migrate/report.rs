//! What `vfuctl migrate` reports: the statistics of a migration, the
//! progress line on a terminal, and the final summary.

use std::io::Write;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::super::cli::{human_bytes, Failure};

use super::*;

/// What a migration did.
#[derive(Debug, Default)]
pub(super) struct Stats {
    pub(super) pre_copy: bool,
    pub(super) rounds: u32,
    pub(super) device_bytes_pre: u64,
    pub(super) device_bytes_stop: u64,
    pub(super) mem_bytes: u64,
    pub(super) page_size: u64,
    pub(super) initial_pages: u64,
    pub(super) dirty_pages: u64,
    /// Device data written to the destination before the source stopped.
    pub(super) streamed_pre: u64,
    pub(super) downtime: Duration,
    pub(super) down: Downtime,
    pub(super) verify: Option<(bool, Duration)>,
    pub(super) total: Duration,
}

/// The parts of the downtime.
#[derive(Debug, Default)]
pub(super) struct Downtime {
    /// Source to STOP_COPY.
    pub(super) stop: Duration,
    /// MIG_DATA_READ from the source.
    pub(super) read: Duration,
    /// MIG_DATA_WRITE to the destination.
    pub(super) write: Duration,
    /// Last dirty-page harvest and copy, logging stop.
    pub(super) dirty_pages: Duration,
    /// Destination to STOP then RUNNING.
    pub(super) resume: Duration,
}

impl Stats {
    pub(super) fn device_bytes(&self) -> u64 {
        self.device_bytes_pre + self.device_bytes_stop
    }

    pub(super) fn pages_copied(&self) -> u64 {
        self.initial_pages + self.dirty_pages
    }

    pub(super) fn moved_bytes(&self) -> u64 {
        self.device_bytes()
            .saturating_add(self.pages_copied().saturating_mul(self.page_size))
    }
}

/// The in-place progress line on a terminal.
pub(super) struct Progress {
    pub(super) enabled: bool,
    pub(super) start: Instant,
    pub(super) last: Option<Instant>,
    pub(super) shown: bool,
}

impl Progress {
    pub(super) fn new(enabled: bool) -> Progress {
        Progress {
            enabled,
            start: Instant::now(),
            last: None,
            shown: false,
        }
    }

    /// Shows `phase` and the counters; at most every 100 ms unless `force`.
    pub(super) fn show(&mut self, phase: &str, st: &Stats, force: bool) {
        if !self.enabled {
            return;
        }
        let now = Instant::now();
        if !force
            && self
                .last
                .is_some_and(|l| now - l < Duration::from_millis(100))
        {
            return;
        }
        self.last = Some(now);
        let secs = (now - self.start).as_secs_f64().max(1e-6);
        let rate = st.moved_bytes() as f64 / secs;
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "\r\x1b[K{phase}: round {}, device data {}, guest pages copied {}, {}/s",
            st.rounds,
            human_bytes(st.device_bytes()),
            st.pages_copied(),
            human_bytes(rate as u64)
        );
        let _ = err.flush();
        self.shown = true;
    }

    /// Ends the progress line.
    pub(super) fn finish(&mut self) {
        if self.shown {
            let mut err = std::io::stderr().lock();
            let _ = writeln!(err);
            self.shown = false;
        }
    }
}

pub(super) fn stderr_is_tty() -> bool {
    std::io::IsTerminal::is_terminal(&std::io::stderr())
}

pub(super) fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

pub(super) fn print_summary(
    o: &Options,
    st: &Stats,
    compares: &[(CompareSpec, Option<u64>)],
    compare_error: Option<&Failure>,
) {
    if o.json {
        let cmp: Vec<Value> = compares
            .iter()
            .map(|(c, d)| {
                json!({
                    "spec": c.text,
                    "region": c.region,
                    "offset": c.offset,
                    "len": c.len,
                    "identical": d.is_none(),
                    "first_difference": d,
                })
            })
            .collect();
        let v = json!({
            "status": "ok",
            "source": o.from,
            "destination": o.to,
            "pre_copy": st.pre_copy,
            "rounds": st.rounds,
            "device_bytes": st.device_bytes(),
            "device_bytes_pre_copy": st.device_bytes_pre,
            "device_bytes_stop_copy": st.device_bytes_stop,
            "guest_memory_bytes": st.mem_bytes,
            "page_size": st.page_size,
            "guest_pages_copied": st.pages_copied(),
            "initial_pages": st.initial_pages,
            "dirty_pages": st.dirty_pages,
            "downtime_ms": ms(st.downtime),
            "downtime_parts_ms": {
                "source_stop": ms(st.down.stop),
                "stop_copy_read": ms(st.down.read),
                "stop_copy_write": ms(st.down.write),
                "dirty_pages": ms(st.down.dirty_pages),
                "verify": st.verify.map(|(_, d)| ms(d)),
                "resume": ms(st.down.resume),
            },
            "device_bytes_streamed_before_stop": st.streamed_pre,
            "chunk": o.chunk,
            "total_ms": ms(st.total),
            "verify": st.verify.map(|(ok, d)| json!({"identical": ok, "ms": ms(d)})),
            "compare": cmp,
            "compare_error": compare_error.map(|f| f.message().to_string()),
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&v).unwrap_or_else(|_| v.to_string())
        );
        return;
    }
    println!("Migrated {} -> {}", o.from, o.to);
    if st.pre_copy {
        println!("  pre-copy rounds: {}", st.rounds);
    } else {
        println!("  pre-copy rounds: 0 (no PRE_COPY)");
    }
    println!(
        "  device data: {} bytes ({}; {} pre-copy, {} stop-copy)",
        st.device_bytes(),
        human_bytes(st.device_bytes()),
        st.device_bytes_pre,
        st.device_bytes_stop
    );
    if st.mem_bytes > 0 {
        println!(
            "  guest memory: {}, {} pages of {} bytes copied ({} initial, {} dirty)",
            human_bytes(st.mem_bytes),
            st.pages_copied(),
            st.page_size,
            st.initial_pages,
            st.dirty_pages
        );
    } else {
        println!("  guest memory: none");
    }
    let verify = match st.verify {
        Some((_, d)) => format!(", verify {:.3}", ms(d)),
        None => String::new(),
    };
    let d = &st.down;
    println!(
        "  downtime: {:.3} ms (source stop {:.3}, stop-copy read {:.3}, write {:.3}, dirty pages {:.3}{verify}, resume {:.3})",
        ms(st.downtime),
        ms(d.stop),
        ms(d.read),
        ms(d.write),
        ms(d.dirty_pages),
        ms(d.resume)
    );
    println!(
        "  streamed before the source stopped: {} bytes of device data",
        st.streamed_pre
    );
    println!("  total time: {:.3} ms", ms(st.total));
    if let Some((ok, _)) = st.verify {
        println!(
            "  verify: {}",
            if ok {
                "guest memories identical"
            } else {
                "guest memories differ"
            }
        );
    }
    for (c, d) in compares {
        match d {
            None => println!("  compare {}: identical", c.text),
            Some(at) => println!("  compare {}: differs at {at:#x}", c.text),
        }
    }
    if let Some(f) = compare_error {
        println!("  compare: {}", f.message());
    }
}
