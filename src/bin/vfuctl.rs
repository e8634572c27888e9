//! `vfuctl`: a command-line vfio-user client, built on
//! [`vfio_user::client`], for inspecting, poking, live-migrating and
//! checkpointing devices served by vfio-user servers.
//!
//! Run `vfuctl --help` for the commands and `vfuctl COMMAND --help` for
//! each one. Exit codes: 0 success, 1 local failure, 2 bad arguments,
//! 3 cannot connect / server gone, 4 refused step or protocol error,
//! 5 a `--verify` / `--compare` check found a difference.

#[path = "vfuctl/access.rs"]
mod access;
#[path = "vfuctl/checkpoint.rs"]
mod checkpoint;
#[path = "vfuctl/cli.rs"]
mod cli;
#[path = "vfuctl/info.rs"]
mod info;
#[path = "vfuctl/migrate.rs"]
mod migrate;
#[path = "vfuctl/pcidecode.rs"]
mod pcidecode;

use cli::{flag, parse_args, valued, Failure, Opt, Parsed};

/// Options of `vfuctl info`.
const INFO_OPTS: [Opt; 2] = [flag("json"), valued("timeout")];
/// Options of `vfuctl read`.
const READ_OPTS: [Opt; 2] = [flag("raw"), valued("timeout")];
/// Options of `vfuctl write`.
const WRITE_OPTS: [Opt; 2] = [valued("width"), valued("timeout")];
/// Options of `vfuctl migrate`.
pub(crate) const MIGRATE_OPTS: [Opt; 13] = [
    valued("from"),
    valued("to"),
    valued("guest-mem-mib"),
    valued("pre-copy-rounds"),
    valued("threshold"),
    valued("chunk"),
    valued("set"),
    valued("compare"),
    flag("verify"),
    flag("force"),
    flag("no-progress"),
    flag("json"),
    valued("timeout"),
];
/// Options of `vfuctl save`.
const SAVE_OPTS: [Opt; 2] = [flag("stop"), valued("timeout")];
/// Options of `vfuctl load`.
const LOAD_OPTS: [Opt; 3] = [flag("stop"), flag("force"), valued("timeout")];

const USAGE: &str = "\
Usage: vfuctl [--timeout SECS] COMMAND [ARGS...]
       vfuctl COMMAND --help

A command-line client for vfio-user servers (devices built on libvfio-user).

Commands:
  info SOCKET [--json]                 describe a device: regions, IRQs,
                                       migration support, PCI config space
  read SOCKET REGION OFFSET [LEN]      hex dump of LEN bytes of a region
  write SOCKET REGION OFFSET VALUE...  write values to a region
  migrate --from SRC --to DST [...]    live-migrate a device between servers
  save SOCKET FILE                     checkpoint a device's state to a file
  load SOCKET FILE                     restore a device's state from a file
  help [COMMAND]                       show this or a command's help

Global options:
  --timeout SECS   bound on every wait for a server (default 10)
  -h, --help       show this help
  -V, --version    show the version

Exit codes:
  0  success
  1  local failure (file I/O, corrupted checkpoint file, memory)
  2  bad arguments
  3  cannot connect, or a server went away or stopped answering
  4  a server refused a step, or broke the protocol
  5  a --verify or --compare check found a difference";

struct Command {
    name: &'static str,
    usage: &'static str,
    opts: &'static [Opt],
    run: fn(&Parsed) -> Result<(), Failure>,
}

const COMMANDS: [Command; 6] = [
    Command {
        name: "info",
        usage: info::USAGE,
        opts: &INFO_OPTS,
        run: info::run,
    },
    Command {
        name: "read",
        usage: access::READ_USAGE,
        opts: &READ_OPTS,
        run: access::run_read,
    },
    Command {
        name: "write",
        usage: access::WRITE_USAGE,
        opts: &WRITE_OPTS,
        run: access::run_write,
    },
    Command {
        name: "migrate",
        usage: migrate::USAGE,
        opts: &MIGRATE_OPTS,
        run: migrate::run,
    },
    Command {
        name: "save",
        usage: checkpoint::SAVE_USAGE,
        opts: &SAVE_OPTS,
        run: checkpoint::run_save,
    },
    Command {
        name: "load",
        usage: checkpoint::LOAD_USAGE,
        opts: &LOAD_OPTS,
        run: checkpoint::run_load,
    },
];

fn find(name: &str) -> Option<&'static Command> {
    COMMANDS.iter().find(|c| c.name == name)
}

/// What a run ends with: the failure and the usage text to show with it.
type Outcome = Result<(), (Failure, Option<&'static str>)>;

fn run(args: &[String]) -> Outcome {
    // Global options come before the command.
    let mut global_timeout = None;
    let mut i = 0;
    while let Some(a) = args.get(i) {
        match a.as_str() {
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            "-V" | "--version" => {
                println!("vfuctl {}", env!("CARGO_PKG_VERSION"));
                return Ok(());
            }
            "--timeout" => {
                let Some(v) = args.get(i + 1) else {
                    return Err((
                        Failure::Usage("option '--timeout' needs a value".into()),
                        Some(USAGE),
                    ));
                };
                global_timeout = Some(v.clone());
                i += 2;
            }
            s if s.starts_with("--timeout=") => {
                global_timeout = Some(s["--timeout=".len()..].to_string());
                i += 1;
            }
            s if s.starts_with('-') => {
                return Err((Failure::Usage(format!("unknown option '{s}'")), Some(USAGE)))
            }
            _ => break,
        }
    }
    let Some(name) = args.get(i) else {
        return Err((Failure::Usage("no command given".into()), Some(USAGE)));
    };
    let rest = &args[i + 1..];
    if name == "help" {
        return match rest.first() {
            None => {
                println!("{USAGE}");
                Ok(())
            }
            Some(c) => match find(c) {
                Some(cmd) => {
                    println!("{}", cmd.usage);
                    Ok(())
                }
                None => Err((
                    Failure::Usage(format!("unknown command '{c}'")),
                    Some(USAGE),
                )),
            },
        };
    }
    let Some(cmd) = find(name) else {
        return Err((
            Failure::Usage(format!("unknown command '{name}'")),
            Some(USAGE),
        ));
    };
    // A global --timeout goes first, so that the command's own wins.
    let mut cmd_args = Vec::with_capacity(rest.len() + 1);
    if let Some(t) = global_timeout {
        cmd_args.push(format!("--timeout={t}"));
    }
    cmd_args.extend_from_slice(rest);
    let parsed = parse_args(&cmd_args, cmd.opts).map_err(|f| (f, Some(cmd.usage)))?;
    if parsed.help {
        println!("{}", cmd.usage);
        return Ok(());
    }
    (cmd.run)(&parsed).map_err(|f| {
        let usage = matches!(f, Failure::Usage(_)).then_some(cmd.usage);
        (f, usage)
    })
}

fn main() {
    // Die quietly of SIGPIPE when the output is cut short (`| head`), as
    // command-line tools do, instead of failing to print.
    // SAFETY: restoring the default disposition of a signal is always sound;
    // no handler of ours is involved.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };

    let mut args = Vec::new();
    for a in std::env::args_os().skip(1) {
        match a.into_string() {
            Ok(s) => args.push(s),
            Err(a) => {
                eprintln!("vfuctl: argument {a:?} is not valid UTF-8");
                std::process::exit(cli::EXIT_USAGE);
            }
        }
    }
    let code = match run(&args) {
        Ok(()) => 0,
        Err((f, usage)) => {
            eprintln!("vfuctl: {f}");
            if let Some(u) = usage {
                eprintln!();
                eprintln!("{u}");
            }
            f.code()
        }
    };
    std::process::exit(code);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn dispatch_and_usage_errors() {
        assert!(run(&s(&["--help"])).is_ok());
        assert!(run(&s(&["help", "migrate"])).is_ok());
        assert!(run(&s(&["info", "--help"])).is_ok());
        for bad in [
            &[][..],
            &["bogus"],
            &["--bogus", "info"],
            &["help", "bogus"],
            &["info"],
            &["info", "--nope", "x"],
            &["--timeout"],
            &["--timeout", "-3", "info", "/nonexistent"],
            &["read", "s", "bar9", "0"],
            &["write", "s", "bar0", "0"],
            &["write", "s", "bar0", "0", "0x100", "--width", "1"],
            &["write", "s", "bar0", "0", "1", "--width", "3"],
        ] {
            match run(&s(bad)) {
                Err((f, _)) => assert_eq!(f.code(), cli::EXIT_USAGE, "{bad:?}: {f}"),
                Ok(()) => panic!("{bad:?} succeeded"),
            }
        }
        // Well-formed, but nothing listens there.
        let (f, usage) = run(&s(&["info", "/nonexistent/vfuctl.sock"])).unwrap_err();
        assert_eq!(f.code(), cli::EXIT_CONNECTION);
        assert!(usage.is_none());
    }

    #[test]
    fn every_command_has_help_and_timeout() {
        for c in &COMMANDS {
            assert!(c.usage.starts_with("Usage: vfuctl "), "{}", c.name);
            assert!(c.opts.iter().any(|o| o.name == "timeout"), "{}", c.name);
            assert!(USAGE.contains(&format!("  {} ", c.name)), "{}", c.name);
        }
    }
}
