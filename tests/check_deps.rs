//! `scripts/check-deps.sh`, the first step of `make check`: silent when
//! everything is there, installs what is missing through apt-get when root
//! (a stand-in apt-get here, which records its arguments and "installs" the
//! tool), else one line naming exactly what to install.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/check-deps.sh")
}

fn scratch(tag: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("check-deps-{tag}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).unwrap();
    d
}

fn run(tools: &str, install: bool, path_prefix: Option<&Path>) -> Output {
    let mut c = Command::new("bash");
    c.arg(script())
        .env("CHECK_DEPS_TOOLS", tools)
        .env("CHECK_DEPS_INSTALL", if install { "1" } else { "0" });
    if let Some(p) = path_prefix {
        let path = std::env::var("PATH").unwrap_or_default();
        c.env("PATH", format!("{}:{path}", p.display()));
    }
    c.output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn silent_when_everything_is_there() {
    let o = run("sh:dash bash:bash", true, None);
    assert!(o.status.success());
    assert_eq!(text(&o.stdout), "");
    assert_eq!(text(&o.stderr), "");
}

#[test]
fn one_line_naming_what_to_install() {
    let o = run(
        "sh:dash vfu-no-such-tool:vfu-pkg-a vfu-no-such-other:vfu-pkg-b",
        false,
        None,
    );
    assert_eq!(o.status.code(), Some(1));
    let err = text(&o.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("vfu-no-such-tool vfu-no-such-other"), "{err}");
    assert!(
        err.contains("sudo apt-get install vfu-pkg-a vfu-pkg-b"),
        "{err}"
    );
    assert!(!err.contains("dash"), "{err}");
}

#[test]
fn installs_with_apt_get_as_root() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipping: not root, the script would only report");
        return;
    }
    let dir = scratch("apt");
    let log = dir.join("apt.log");
    let fake = dir.join("apt-get");
    // Records every call; "installing" vfu-fake-pkg creates vfu-fake-tool.
    fs::write(
        &fake,
        format!(
            "#!/bin/sh\necho \"$*\" >> '{log}'\n\
             case \"$*\" in *vfu-fake-pkg*) printf '#!/bin/sh\\n' > '{dir}/vfu-fake-tool'; \
             chmod +x '{dir}/vfu-fake-tool';; esac\nexit 0\n",
            log = log.display(),
            dir = dir.display()
        ),
    )
    .unwrap();
    fs::set_permissions(&fake, fs::Permissions::from_mode(0o755)).unwrap();

    let o = run("sh:dash vfu-fake-tool:vfu-fake-pkg", true, Some(&dir));
    assert!(o.status.success(), "{}", text(&o.stderr));
    let calls = fs::read_to_string(&log).unwrap();
    assert!(calls.lines().any(|l| l.contains("update")), "{calls}");
    assert!(
        calls
            .lines()
            .any(|l| l.contains("install") && l.contains("vfu-fake-pkg") && !l.contains("dash")),
        "{calls}"
    );
    assert!(text(&o.stdout).contains("apt-get install vfu-fake-pkg"));

    // A package that does not bring the tool: the one-line report.
    let o = run("vfu-fake-missing:vfu-other-pkg", true, Some(&dir));
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o.stderr).contains("sudo apt-get install vfu-other-pkg"));
    let _ = fs::remove_dir_all(&dir);
}
