//! What every vfuctl command shares: failures and their exit codes, the
//! option parser, number / region / timeout parsing, names of protocol
//! values, and connecting to a server.

use std::fmt;
use std::path::Path;
use std::time::Duration;

use vfio_user::client::{Client, ClientError, ClientOptions};
use vfio_user::device::migration::*;
use vfio_user::device::{irq, region};
use vfio_user::protocol::cmd;
use vfio_user::Errno;

/// Exit code: a local failure (file I/O, corrupted checkpoint, memory).
pub const EXIT_LOCAL: i32 = 1;
/// Exit code: bad arguments.
pub const EXIT_USAGE: i32 = 2;
/// Exit code: cannot connect, or the server went away / stopped answering.
pub const EXIT_CONNECTION: i32 = 3;
/// Exit code: the server refused a request, or broke the protocol.
pub const EXIT_REFUSED: i32 = 4;
/// Exit code: a `--verify` or `--compare` check found a difference.
pub const EXIT_MISMATCH: i32 = 5;

/// Default bound on every wait for a server.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a command failed; each kind has its own exit code.
#[derive(Debug)]
pub enum Failure {
    /// Something on this side (exit 1).
    Local(String),
    /// Bad command line (exit 2); usage is printed along.
    Usage(String),
    /// Cannot connect, disconnected, timed out (exit 3).
    Connection(String),
    /// Refused request or protocol error (exit 4).
    Refused(String),
    /// A requested comparison found a difference (exit 5).
    Mismatch(String),
}

impl Failure {
    /// The process exit code for this failure.
    pub fn code(&self) -> i32 {
        match self {
            Failure::Local(_) => EXIT_LOCAL,
            Failure::Usage(_) => EXIT_USAGE,
            Failure::Connection(_) => EXIT_CONNECTION,
            Failure::Refused(_) => EXIT_REFUSED,
            Failure::Mismatch(_) => EXIT_MISMATCH,
        }
    }

    /// The message, without the kind.
    pub fn message(&self) -> &str {
        match self {
            Failure::Local(m)
            | Failure::Usage(m)
            | Failure::Connection(m)
            | Failure::Refused(m)
            | Failure::Mismatch(m) => m,
        }
    }

    /// The same failure with `extra` appended to its message.
    pub fn with_note(self, extra: &str) -> Failure {
        let add = |m: String| format!("{m}; {extra}");
        match self {
            Failure::Local(m) => Failure::Local(add(m)),
            Failure::Usage(m) => Failure::Usage(add(m)),
            Failure::Connection(m) => Failure::Connection(add(m)),
            Failure::Refused(m) => Failure::Refused(add(m)),
            Failure::Mismatch(m) => Failure::Mismatch(add(m)),
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message())
    }
}

/// Shorthand for a usage failure.
pub fn usage<T>(msg: impl Into<String>) -> Result<T, Failure> {
    Err(Failure::Usage(msg.into()))
}

/// Turns a client error met while doing `what` into a failure of the right
/// kind.
pub fn client_failure(what: &str, e: &ClientError) -> Failure {
    let msg = format!("{what}: {}", describe(e));
    match e {
        ClientError::Io(_) | ClientError::Timeout | ClientError::Disconnected => {
            Failure::Connection(msg)
        }
        ClientError::Server { .. } | ClientError::Protocol(_) | ClientError::Unsupported(_) => {
            Failure::Refused(msg)
        }
        ClientError::InvalidArgument(_) => Failure::Usage(msg),
    }
}

/// A human description of a client error.
pub fn describe(e: &ClientError) -> String {
    match e {
        ClientError::Server { cmd, errno } => {
            format!("{} refused: {}", cmd_name(*cmd), errno_text(*errno))
        }
        ClientError::Io(errno) => errno_text(*errno),
        ClientError::Timeout => "timed out waiting for the server".into(),
        ClientError::Disconnected => "the server closed the connection".into(),
        other => other.to_string(),
    }
}

/// Attaches a step description to client results.
pub trait At<T> {
    /// Maps an error to a [`Failure`] naming `what` was being done.
    fn at(self, what: &str) -> Result<T, Failure>;
}

impl<T> At<T> for vfio_user::client::Result<T> {
    fn at(self, what: &str) -> Result<T, Failure> {
        self.map_err(|e| client_failure(what, &e))
    }
}

/// `EINVAL (Invalid argument)`.
pub fn errno_text(e: Errno) -> String {
    let text = std::io::Error::from_raw_os_error(e.0).to_string();
    // std appends " (os error N)"; the name says it better.
    let text = match text.find(" (os error") {
        Some(i) => text[..i].to_string(),
        None => text,
    };
    match errno_name(e.0) {
        Some(n) => format!("{n} ({text})"),
        None => format!("errno {} ({text})", e.0),
    }
}

fn errno_name(e: i32) -> Option<&'static str> {
    Some(match e {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EINTR => "EINTR",
        libc::EIO => "EIO",
        libc::E2BIG => "E2BIG",
        libc::EBADF => "EBADF",
        libc::EAGAIN => "EAGAIN",
        libc::ENOMEM => "ENOMEM",
        libc::EACCES => "EACCES",
        libc::EFAULT => "EFAULT",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::ENODEV => "ENODEV",
        libc::EINVAL => "EINVAL",
        libc::ENOSPC => "ENOSPC",
        libc::ERANGE => "ERANGE",
        libc::ENOSYS => "ENOSYS",
        libc::ENOMSG => "ENOMSG",
        libc::ENOTSUP => "ENOTSUP",
        libc::ECONNRESET => "ECONNRESET",
        libc::ENOTCONN => "ENOTCONN",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::ECONNREFUSED => "ECONNREFUSED",
        _ => return None,
    })
}

/// The protocol name of command `c`.
pub fn cmd_name(c: u16) -> String {
    let n = match c {
        cmd::VERSION => "VERSION",
        cmd::DMA_MAP => "DMA_MAP",
        cmd::DMA_UNMAP => "DMA_UNMAP",
        cmd::DEVICE_GET_INFO => "DEVICE_GET_INFO",
        cmd::DEVICE_GET_REGION_INFO => "DEVICE_GET_REGION_INFO",
        cmd::DEVICE_GET_REGION_IO_FDS => "DEVICE_GET_REGION_IO_FDS",
        cmd::DEVICE_GET_IRQ_INFO => "DEVICE_GET_IRQ_INFO",
        cmd::DEVICE_SET_IRQS => "DEVICE_SET_IRQS",
        cmd::REGION_READ => "REGION_READ",
        cmd::REGION_WRITE => "REGION_WRITE",
        cmd::DMA_READ => "DMA_READ",
        cmd::DMA_WRITE => "DMA_WRITE",
        cmd::DEVICE_RESET => "DEVICE_RESET",
        cmd::REGION_WRITE_MULTI => "REGION_WRITE_MULTI",
        cmd::DEVICE_FEATURE => "DEVICE_FEATURE",
        cmd::MIG_DATA_READ => "MIG_DATA_READ",
        cmd::MIG_DATA_WRITE => "MIG_DATA_WRITE",
        other => return format!("command {other}"),
    };
    n.to_string()
}

/// The name of a migration device state.
pub fn state_name(s: u32) -> String {
    let n = match s {
        VFIO_USER_DEVICE_STATE_ERROR => "ERROR",
        VFIO_USER_DEVICE_STATE_STOP => "STOP",
        VFIO_USER_DEVICE_STATE_RUNNING => "RUNNING",
        VFIO_USER_DEVICE_STATE_STOP_COPY => "STOP_COPY",
        VFIO_USER_DEVICE_STATE_RESUMING => "RESUMING",
        VFIO_USER_DEVICE_STATE_RUNNING_P2P => "RUNNING_P2P",
        VFIO_USER_DEVICE_STATE_PRE_COPY => "PRE_COPY",
        VFIO_USER_DEVICE_STATE_PRE_COPY_P2P => "PRE_COPY_P2P",
        other => return format!("state {other}"),
    };
    n.to_string()
}

/// `BAR0`..`BAR5`, `ROM`, `CONFIG`, `VGA`, or `REGION<n>` for
/// device-specific regions.
pub fn region_name(idx: u32) -> String {
    match idx as usize {
        i @ region::BAR0..=region::BAR5 => format!("BAR{i}"),
        region::ROM => "ROM".into(),
        region::CFG => "CONFIG".into(),
        region::VGA => "VGA".into(),
        i => format!("REGION{i}"),
    }
}

/// `INTx`, `MSI`, `MSI-X`, `ERR`, `REQ`, or `IRQ<n>`.
pub fn irq_name(idx: u32) -> String {
    match idx {
        irq::INTX => "INTx".into(),
        irq::MSI => "MSI".into(),
        irq::MSIX => "MSI-X".into(),
        irq::ERR => "ERR".into(),
        irq::REQ => "REQ".into(),
        i => format!("IRQ{i}"),
    }
}

/// Parses a region: an index, or `bar0`..`bar5`, `rom`, `config`/`cfg`,
/// `vga` (any case).
pub fn parse_region(s: &str) -> Result<u32, Failure> {
    let l = s.trim().to_ascii_lowercase();
    let idx = match l.as_str() {
        "rom" => region::ROM,
        "config" | "cfg" => region::CFG,
        "vga" => region::VGA,
        _ => {
            if let Some(n) = l.strip_prefix("bar") {
                match n.parse::<usize>() {
                    Ok(i) if i <= region::BAR5 => i,
                    _ => return usage(format!("unknown region '{s}' (BARs are bar0..bar5)")),
                }
            } else {
                return match parse_u64(&l) {
                    Ok(i) if i <= u64::from(u32::MAX) => Ok(i as u32),
                    _ => usage(format!(
                        "unknown region '{s}' (use an index or bar0..bar5, rom, config, vga)"
                    )),
                };
            }
        }
    };
    Ok(idx as u32)
}

/// Parses an unsigned number: decimal, `0x` hex, `0o` octal or `0b`
/// binary, `_` separators allowed.
pub fn parse_u64(s: &str) -> Result<u64, Failure> {
    let t: String = s.trim().chars().filter(|&c| c != '_').collect();
    let lower = t.to_ascii_lowercase();
    let (digits, radix) = if let Some(h) = lower.strip_prefix("0x") {
        (h, 16)
    } else if let Some(o) = lower.strip_prefix("0o") {
        (o, 8)
    } else if let Some(b) = lower.strip_prefix("0b") {
        (b, 2)
    } else {
        (lower.as_str(), 10)
    };
    if digits.is_empty() || digits.starts_with('+') {
        return usage(format!("invalid number '{s}'"));
    }
    u64::from_str_radix(digits, radix).map_err(|e| {
        Failure::Usage(format!(
            "invalid number '{s}': {}",
            match e.kind() {
                std::num::IntErrorKind::PosOverflow => "too large",
                _ => "not a decimal, 0x-hex, 0o-octal or 0b-binary number",
            }
        ))
    })
}

/// Parses a `usize` number with [`parse_u64`].
pub fn parse_usize(s: &str) -> Result<usize, Failure> {
    let v = parse_u64(s)?;
    usize::try_from(v).map_err(|_| Failure::Usage(format!("'{s}' is too large")))
}

/// Parses a timeout in seconds (fractions allowed), above 0 and at most an
/// hour.
pub fn parse_timeout(s: &str) -> Result<Duration, Failure> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v <= 3600.0 => Ok(Duration::from_secs_f64(v)),
        _ => usage(format!(
            "invalid timeout '{s}' (seconds, above 0 and at most 3600)"
        )),
    }
}

/// One option a command accepts.
#[derive(Clone, Copy, Debug)]
pub struct Opt {
    /// The long name, without `--`.
    pub name: &'static str,
    /// Whether it takes a value (`--name VALUE` or `--name=VALUE`).
    pub value: bool,
}

/// A flag option.
pub const fn flag(name: &'static str) -> Opt {
    Opt { name, value: false }
}

/// An option with a value.
pub const fn valued(name: &'static str) -> Opt {
    Opt { name, value: true }
}

/// A parsed command line.
#[derive(Debug, Default)]
pub struct Parsed {
    /// Arguments that are not options, in order.
    pub positionals: Vec<String>,
    /// `(name, value)` of valued options, in order.
    values: Vec<(&'static str, String)>,
    /// Names of the flags given.
    flags: Vec<&'static str>,
    /// `-h` / `--help` was given.
    pub help: bool,
}

impl Parsed {
    /// Whether flag `name` was given.
    pub fn flag(&self, name: &str) -> bool {
        self.flags.contains(&name)
    }

    /// The last value of option `name`.
    pub fn value(&self, name: &str) -> Option<&str> {
        self.values
            .iter()
            .rev()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Every value of option `name`, in order.
    pub fn values(&self, name: &str) -> Vec<&str> {
        self.values
            .iter()
            .filter(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The `--timeout` value, or the default.
    pub fn timeout(&self) -> Result<Duration, Failure> {
        self.value("timeout")
            .map_or(Ok(DEFAULT_TIMEOUT), parse_timeout)
    }
}

/// Parses `args` against `opts` (plus `-h`/`--help`). Options and
/// positionals may be mixed; `--` ends the options.
pub fn parse_args(args: &[String], opts: &[Opt]) -> Result<Parsed, Failure> {
    let mut p = Parsed::default();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--" {
            p.positionals.extend(it.by_ref().cloned());
            break;
        }
        if a == "-h" || a == "--help" {
            p.help = true;
            continue;
        }
        if let Some(long) = a.strip_prefix("--") {
            let (name, inline) = match long.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (long, None),
            };
            let Some(opt) = opts.iter().find(|o| o.name == name) else {
                return usage(format!("unknown option '--{name}'"));
            };
            if opt.value {
                let v = match inline {
                    Some(v) => v,
                    None => match it.next() {
                        Some(v) => v.clone(),
                        None => return usage(format!("option '--{name}' needs a value")),
                    },
                };
                p.values.push((opt.name, v));
            } else {
                if inline.is_some() {
                    return usage(format!("option '--{name}' takes no value"));
                }
                p.flags.push(opt.name);
            }
            continue;
        }
        if a.len() > 1 && a.starts_with('-') {
            return usage(format!("unknown option '{a}'"));
        }
        p.positionals.push(a.clone());
    }
    Ok(p)
}

/// The host page size.
pub fn host_page_size() -> u64 {
    let v = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE);
    u64::try_from(v.ok().flatten().unwrap_or(0))
        .ok()
        .filter(|&p| p > 0)
        .unwrap_or(4096)
}

/// Connects to the server at `path` (`who` names it in messages: "source",
/// "device", ...), with `timeout` on every wait; `migration` announces the
/// host page size as migration page size (for commands that migrate).
pub fn connect(
    path: &str,
    who: &str,
    timeout: Duration,
    migration: bool,
) -> Result<Client, Failure> {
    let opts = ClientOptions {
        timeout,
        migration_pgsize: migration.then(host_page_size),
        ..ClientOptions::default()
    };
    if !Path::new(path).exists() {
        return Err(Failure::Connection(format!(
            "cannot connect to {who} {path}: no such socket"
        )));
    }
    Client::connect_with(path, opts).map_err(|e| match e {
        ClientError::Io(errno) => Failure::Connection(format!(
            "cannot connect to {who} {path}: {}",
            errno_text(errno)
        )),
        other => client_failure(&format!("negotiating with {who} {path}"), &other),
    })
}

/// Formats a size like lspci: `4K`, `16M`, or bytes.
pub fn human_size(n: u64) -> String {
    const UNITS: [(u64, &str); 4] = [
        (1 << 40, "T"),
        (1 << 30, "G"),
        (1 << 20, "M"),
        (1 << 10, "K"),
    ];
    for (unit, name) in UNITS {
        if n >= unit && n % unit == 0 {
            return format!("{}{name}", n / unit);
        }
    }
    n.to_string()
}

/// Formats a byte count for people: `512 B`, `1.5 KiB`, `3.2 MiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn numbers_in_every_base() {
        assert_eq!(parse_u64("42").unwrap(), 42);
        assert_eq!(parse_u64("0x1F").unwrap(), 31);
        assert_eq!(parse_u64("0o17").unwrap(), 15);
        assert_eq!(parse_u64("0b101").unwrap(), 5);
        assert_eq!(parse_u64("1_000").unwrap(), 1000);
        assert_eq!(parse_u64("0xffffffffffffffff").unwrap(), u64::MAX);
        for bad in [
            "",
            "0x",
            "x1",
            "-1",
            "+1",
            "12a",
            "0x1_0000_0000_0000_0000",
            "0b2",
        ] {
            assert!(matches!(parse_u64(bad), Err(Failure::Usage(_))), "{bad}");
        }
    }

    #[test]
    fn regions_by_name_or_index() {
        assert_eq!(parse_region("bar0").unwrap(), 0);
        assert_eq!(parse_region("BAR5").unwrap(), 5);
        assert_eq!(parse_region("rom").unwrap(), 6);
        assert_eq!(parse_region("Config").unwrap(), 7);
        assert_eq!(parse_region("cfg").unwrap(), 7);
        assert_eq!(parse_region("vga").unwrap(), 8);
        assert_eq!(parse_region("9").unwrap(), 9);
        assert_eq!(parse_region("0x2").unwrap(), 2);
        for bad in ["bar6", "bar", "foo", "-1", "0x100000000"] {
            assert!(parse_region(bad).is_err(), "{bad}");
        }
        assert_eq!(region_name(2), "BAR2");
        assert_eq!(region_name(7), "CONFIG");
        assert_eq!(region_name(10), "REGION10");
        assert_eq!(irq_name(2), "MSI-X");
    }

    #[test]
    fn option_parser() {
        let opts = [flag("json"), valued("set"), valued("timeout")];
        let p = parse_args(
            &s(&[
                "a",
                "--json",
                "--set",
                "x=1",
                "b",
                "--set=y=2",
                "--timeout=0.5",
            ]),
            &opts,
        )
        .unwrap();
        assert_eq!(p.positionals, s(&["a", "b"]));
        assert!(p.flag("json"));
        assert!(!p.help);
        assert_eq!(p.values("set"), vec!["x=1", "y=2"]);
        assert_eq!(p.timeout().unwrap(), Duration::from_millis(500));
        let p = parse_args(&s(&["--", "--json"]), &opts).unwrap();
        assert_eq!(p.positionals, s(&["--json"]));
        assert!(parse_args(&s(&["-h"]), &opts).unwrap().help);
        for bad in [
            &["--nope"][..],
            &["--set"],
            &["--json=1"],
            &["-x"],
            &["--timeout", "0"],
        ] {
            let r = parse_args(&s(bad), &opts).and_then(|p| p.timeout().map(|_| p));
            assert!(matches!(r, Err(Failure::Usage(_))), "{bad:?}");
        }
    }

    #[test]
    fn errors_map_to_exit_codes() {
        let c = |e: ClientError| client_failure("x", &e).code();
        assert_eq!(c(ClientError::Timeout), EXIT_CONNECTION);
        assert_eq!(c(ClientError::Disconnected), EXIT_CONNECTION);
        assert_eq!(c(ClientError::Io(Errno::ENOENT)), EXIT_CONNECTION);
        assert_eq!(
            c(ClientError::Server {
                cmd: cmd::DEVICE_FEATURE,
                errno: Errno::EPERM
            }),
            EXIT_REFUSED
        );
        assert_eq!(c(ClientError::Protocol("bad".into())), EXIT_REFUSED);
        let f = client_failure(
            "destination: moving to RESUMING",
            &ClientError::Server {
                cmd: cmd::DEVICE_FEATURE,
                errno: Errno::EPERM,
            },
        );
        assert_eq!(
            f.message(),
            "destination: moving to RESUMING: DEVICE_FEATURE refused: EPERM (Operation not permitted)"
        );
    }

    #[test]
    fn sizes() {
        assert_eq!(human_size(4096), "4K");
        assert_eq!(human_size(0x4000), "16K");
        assert_eq!(human_size(1 << 20), "1M");
        assert_eq!(human_size(100), "100");
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
    }
}
