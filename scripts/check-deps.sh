#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
#
# The first step of `make check`: makes sure the tools the checks run are
# there. Missing Debian packages are installed with apt-get when that is
# possible (running as root on a machine with apt-get); otherwise one line
# says exactly what to install, and the script fails. Missing rustfmt or
# clippy are added with rustup when it is there.
#
# usage: check-deps.sh
#
# Environment:
#   CHECK_DEPS_INSTALL=0  never install anything, only report
#   CHECK_DEPS_TOOLS      the "tool:package" pairs to check (for tests);
#                         default: every tool make check runs

set -u

tools=${CHECK_DEPS_TOOLS:-"cc:gcc g++:g++ make:make pkg-config:pkg-config cmake:cmake meson:meson ninja:ninja-build valgrind:valgrind"}
install=${CHECK_DEPS_INSTALL:-1}

missing_tools=()
missing_pkgs=()
for pair in $tools; do
    tool=${pair%%:*}
    pkg=${pair#*:}
    if ! command -v "$tool" >/dev/null 2>&1; then
        missing_tools+=("$tool")
        missing_pkgs+=("$pkg")
    fi
done

# cargo fmt and cargo clippy are rustup components, not Debian packages.
missing_components=()
if [[ -z ${CHECK_DEPS_TOOLS:-} ]]; then
    cargo fmt --version >/dev/null 2>&1 || missing_components+=(rustfmt)
    cargo clippy --version >/dev/null 2>&1 || missing_components+=(clippy)
fi

if [[ ${#missing_components[@]} -gt 0 && $install != 0 ]] && command -v rustup >/dev/null 2>&1; then
    echo "check-deps: rustup component add ${missing_components[*]}"
    if rustup component add "${missing_components[@]}" >/dev/null 2>&1; then
        missing_components=()
    fi
fi

if [[ ${#missing_pkgs[@]} -gt 0 && $install != 0 && $(id -u) == 0 ]] &&
        command -v apt-get >/dev/null 2>&1; then
    echo "check-deps: apt-get install ${missing_pkgs[*]} (for ${missing_tools[*]})"
    if DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
                --no-install-recommends "${missing_pkgs[@]}" >/dev/null; then
        still=()
        for t in "${missing_tools[@]}"; do
            command -v "$t" >/dev/null 2>&1 || still+=("$t")
        done
        if [[ ${#still[@]} -eq 0 ]]; then
            missing_pkgs=()
            missing_tools=()
        fi
    fi
fi

if [[ ${#missing_pkgs[@]} -eq 0 && ${#missing_components[@]} -eq 0 ]]; then
    exit 0
fi

# One line, saying exactly what to install.
msg="make check needs"
if [[ ${#missing_pkgs[@]} -gt 0 ]]; then
    msg+=" ${missing_tools[*]}: install them with 'sudo apt-get install ${missing_pkgs[*]}' (Debian package names)"
fi
if [[ ${#missing_components[@]} -gt 0 ]]; then
    [[ ${#missing_pkgs[@]} -gt 0 ]] && msg+=" and"
    msg+=" cargo ${missing_components[*]}: 'rustup component add ${missing_components[*]}'"
fi
echo "$msg" >&2
exit 1
