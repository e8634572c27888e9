# Thin GNU make wrapper around cargo: builds the library and installs it the
# way C consumers expect to find libvfio-user (shared + static library,
# headers, pkg-config module and CMake package).
#
#   make                      cargo build --release
#   make install              install under $(DESTDIR)$(PREFIX) (default /usr/local)
#   make uninstall            remove what `make install` put there
#   make so-dir               target/so-dir/libvfio-user.so for the Python test suite
#   make check-consumers      install into a scratch prefix and build/run the
#                             C consumer programs of c-tests/consumers against it
#   make check-meson          the meson build (standalone and as a subproject)
#                             and the 2025/2026 API forms (c-tests/meson)
#   make check                every test (see the end of this file)
#   make check-asan           C device tests and C sample devices under ASan+UBSan
#   make sanitizers           Miri, ThreadSanitizer and check-asan
#                             (scripts/sanitizers.sh; needs a nightly toolchain)
#   make bench-io             the C benchmark of SPDK's per-I/O DMA calls
#                             (benches/c/spdk_io.c) against the release library,
#                             and against UPSTREAM_LIB=/path/libvfio-user.so.0
#                             side by side when given (docs/benchmarks.md)
#   make clean                cargo clean
#
# Variables (all overridable on the command line):
#   PREFIX      installation prefix, must be absolute (default /usr/local)
#   DESTDIR     staging root prepended to every installed path (default empty)
#   LIBDIR      library directory, relative to PREFIX (default lib)
#   INCLUDEDIR  header directory, relative to PREFIX (default include)
#   BINDIR      program directory, relative to PREFIX (default bin)
#   CARGO, CARGOFLAGS, CARGO_TARGET_DIR
#   LIB_SO, LIB_A, VFUCTL, HEADER_DIR   the artefacts that get installed; they
#               default to the cargo release outputs and the in-tree headers
#   NO_BUILD=1  make `install`/`so-dir` use the artefacts as they are instead of
#               running cargo first (e.g. when installing as root from a tree
#               built by a normal user, or when LIB_SO/LIB_A point elsewhere)
#   LIBS_PRIVATE  native libraries a static link needs (pkg-config
#               Libs.private and the static CMake target); defaults to what
#               `cargo rustc --release -- --print native-static-libs` reports
#               for this crate on Linux/glibc

SRCDIR := $(patsubst %/,%,$(dir $(abspath $(lastword $(MAKEFILE_LIST)))))

# The package version comes from the [package] table of Cargo.toml.
VERSION := $(shell sed -n '/^\[package\]/,/^\[/s/^version[[:space:]]*=[[:space:]]*"\([^"]*\)".*/\1/p' '$(SRCDIR)/Cargo.toml' | head -n 1)
ifeq ($(VERSION),)
$(error could not read the package version from $(SRCDIR)/Cargo.toml)
endif

# ABI version: the library is a drop-in for libvfio-user.so.0, so the SONAME
# (set by build.rs) stays at 0 independently of the crate version.
SOMAJOR := 0
SONAME := libvfio-user.so.$(SOMAJOR)
REALNAME := libvfio-user.so.$(VERSION)

PREFIX ?= /usr/local
DESTDIR ?=
LIBDIR ?= lib
INCLUDEDIR ?= include
BINDIR ?= bin

CARGO ?= cargo
CARGOFLAGS ?=
CARGO_TARGET_DIR ?= $(SRCDIR)/target
PROFILE_DIR := $(CARGO_TARGET_DIR)/release

LIB_SO ?= $(PROFILE_DIR)/libvfio_user.so
LIB_A ?= $(PROFILE_DIR)/libvfio_user.a
VFUCTL ?= $(PROFILE_DIR)/vfuctl
HEADER_DIR ?= $(SRCDIR)/include/vfio-user

LIBS_PRIVATE ?= -lgcc_s -lutil -lrt -lpthread -lm -ldl -lc

INSTALL ?= install

PC_TEMPLATE := $(SRCDIR)/pkgconfig/libvfio-user.pc.in
CMAKE_CONFIG_TEMPLATE := $(SRCDIR)/cmake/libvfio-userConfig.cmake.in
CMAKE_VERSION_TEMPLATE := $(SRCDIR)/cmake/libvfio-userConfigVersion.cmake.in

# Installed locations.
prefix := $(PREFIX)
libdir := $(prefix)/$(LIBDIR)
includedir := $(prefix)/$(INCLUDEDIR)
bindir := $(prefix)/$(BINDIR)
pkgconfigdir := $(libdir)/pkgconfig
cmakedir := $(libdir)/cmake/libvfio-user

# From $(cmakedir) back up to $(prefix): one "../" per component of LIBDIR
# plus two for cmake/libvfio-user. Used to make the CMake package relocatable.
empty :=
space := $(empty) $(empty)
CMAKE_RELPREFIX := $(patsubst %/,%,$(subst $(space),,$(foreach c,$(subst /, ,$(LIBDIR)) cmake libvfio-user,../)))

# "-lfoo -lbar" -> "foo;bar" for INTERFACE_LINK_LIBRARIES.
LIBS_PRIVATE_CMAKE := $(subst $(space),;,$(strip $(patsubst -l%,%,$(LIBS_PRIVATE))))

HEADERS := $(sort $(wildcard $(HEADER_DIR)/*.h))
CAP_HEADERS := $(sort $(wildcard $(HEADER_DIR)/pci_caps/*.h))

# sed script shared by every generated file. '|' is the delimiter, so it must
# not appear in the substituted values.
SUBST = sed \
	-e 's|@PREFIX@|$(prefix)|g' \
	-e 's|@LIBDIR@|$(LIBDIR)|g' \
	-e 's|@INCLUDEDIR@|$(INCLUDEDIR)|g' \
	-e 's|@VERSION@|$(VERSION)|g' \
	-e 's|@SOMAJOR@|$(SOMAJOR)|g' \
	-e 's|@SONAME@|$(SONAME)|g' \
	-e 's|@REALNAME@|$(REALNAME)|g' \
	-e 's|@RELPREFIX@|$(CMAKE_RELPREFIX)|g' \
	-e 's|@LIBS_PRIVATE@|$(LIBS_PRIVATE)|g' \
	-e 's|@LIBS_PRIVATE_CMAKE@|$(LIBS_PRIVATE_CMAKE)|g' \
	-e "s|@SIZEOF_VOID_P@|$$sizeof_void_p|g"

BUILD_DEP := $(if $(filter 1 yes true,$(NO_BUILD)),,build)

.PHONY: all build install uninstall so-dir check-consumers clean print-version \
	check-install-vars

all: build

build:
	$(CARGO) build --release --manifest-path '$(SRCDIR)/Cargo.toml' \
		--target-dir '$(CARGO_TARGET_DIR)' $(CARGOFLAGS)

print-version:
	@echo $(VERSION)

check-install-vars:
	@case '$(PREFIX)' in /*) ;; *) echo "PREFIX must be an absolute path (got '$(PREFIX)')" >&2; exit 1;; esac
	@case '$(LIBDIR)$(INCLUDEDIR)$(BINDIR)' in /*|*..*) echo "LIBDIR, INCLUDEDIR and BINDIR must be relative to PREFIX" >&2; exit 1;; esac
	@case '$(PREFIX)$(LIBDIR)$(INCLUDEDIR)$(LIBS_PRIVATE)' in *'|'*) echo "'|' is not allowed in PREFIX, LIBDIR, INCLUDEDIR or LIBS_PRIVATE" >&2; exit 1;; esac

install: check-install-vars $(BUILD_DEP)
	@test -f '$(LIB_SO)' || { echo "$(LIB_SO) not found; run 'make' first" >&2; exit 1; }
	@test -f '$(LIB_A)' || { echo "$(LIB_A) not found; run 'make' first" >&2; exit 1; }
	@test -f '$(HEADER_DIR)/libvfio-user.h' || { echo "$(HEADER_DIR)/libvfio-user.h not found" >&2; exit 1; }
	$(INSTALL) -d '$(DESTDIR)$(libdir)' '$(DESTDIR)$(pkgconfigdir)' '$(DESTDIR)$(cmakedir)' \
		'$(DESTDIR)$(includedir)/vfio-user/pci_caps'
	$(INSTALL) -m 0755 '$(LIB_SO)' '$(DESTDIR)$(libdir)/$(REALNAME)'
	ln -sfn '$(REALNAME)' '$(DESTDIR)$(libdir)/$(SONAME)'
	ln -sfn '$(SONAME)' '$(DESTDIR)$(libdir)/libvfio-user.so'
	$(INSTALL) -m 0644 '$(LIB_A)' '$(DESTDIR)$(libdir)/libvfio-user.a'
	$(INSTALL) -m 0644 $(HEADERS) '$(DESTDIR)$(includedir)/vfio-user/'
	$(if $(CAP_HEADERS),$(INSTALL) -m 0644 $(CAP_HEADERS) '$(DESTDIR)$(includedir)/vfio-user/pci_caps/')
	@echo "GEN $(DESTDIR)$(pkgconfigdir)/libvfio-user.pc"
	@echo "GEN $(DESTDIR)$(cmakedir)/libvfio-userConfig.cmake"
	@echo "GEN $(DESTDIR)$(cmakedir)/libvfio-userConfigVersion.cmake"
	@# EI_CLASS (byte 4 of the ELF header) is 1 for 32-bit and 2 for 64-bit
	@# objects; it gives the pointer size the CMake version file checks.
	@sizeof_void_p=$$(( $$(od -An -tu1 -j4 -N1 '$(LIB_SO)') * 4 )) && \
	$(SUBST) '$(PC_TEMPLATE)' > '$(DESTDIR)$(pkgconfigdir)/libvfio-user.pc' && \
	$(SUBST) '$(CMAKE_CONFIG_TEMPLATE)' > '$(DESTDIR)$(cmakedir)/libvfio-userConfig.cmake' && \
	$(SUBST) '$(CMAKE_VERSION_TEMPLATE)' > '$(DESTDIR)$(cmakedir)/libvfio-userConfigVersion.cmake'
	chmod 0644 '$(DESTDIR)$(pkgconfigdir)/libvfio-user.pc' \
		'$(DESTDIR)$(cmakedir)/libvfio-userConfig.cmake' \
		'$(DESTDIR)$(cmakedir)/libvfio-userConfigVersion.cmake'
	@if [ -f '$(VFUCTL)' ]; then \
		echo "$(INSTALL) -d '$(DESTDIR)$(bindir)'"; \
		$(INSTALL) -d '$(DESTDIR)$(bindir)' && \
		echo "$(INSTALL) -m 0755 '$(VFUCTL)' '$(DESTDIR)$(bindir)/vfuctl'" && \
		$(INSTALL) -m 0755 '$(VFUCTL)' '$(DESTDIR)$(bindir)/vfuctl'; \
	fi

uninstall: check-install-vars
	rm -f '$(DESTDIR)$(libdir)/$(REALNAME)' '$(DESTDIR)$(libdir)/$(SONAME)' \
		'$(DESTDIR)$(libdir)/libvfio-user.so' '$(DESTDIR)$(libdir)/libvfio-user.a' \
		'$(DESTDIR)$(pkgconfigdir)/libvfio-user.pc' \
		'$(DESTDIR)$(cmakedir)/libvfio-userConfig.cmake' \
		'$(DESTDIR)$(cmakedir)/libvfio-userConfigVersion.cmake' \
		'$(DESTDIR)$(bindir)/vfuctl'
	rm -f $(foreach h,$(notdir $(HEADERS)),'$(DESTDIR)$(includedir)/vfio-user/$(h)') \
		$(foreach h,$(notdir $(CAP_HEADERS)),'$(DESTDIR)$(includedir)/vfio-user/pci_caps/$(h)')
	@# Directories are removed only if nothing else is left in them.
	rmdir '$(DESTDIR)$(includedir)/vfio-user/pci_caps' '$(DESTDIR)$(includedir)/vfio-user' \
		'$(DESTDIR)$(cmakedir)' 2>/dev/null || true

# The upstream Python test suite loads "$LIBVFIO_SO_DIR/libvfio-user.so".
so-dir: $(BUILD_DEP)
	@test -f '$(LIB_SO)' || { echo "$(LIB_SO) not found; run 'make' first" >&2; exit 1; }
	mkdir -p '$(CARGO_TARGET_DIR)/so-dir'
	ln -sfn '$(abspath $(LIB_SO))' '$(CARGO_TARGET_DIR)/so-dir/libvfio-user.so'
	ln -sfn '$(abspath $(LIB_SO))' '$(CARGO_TARGET_DIR)/so-dir/$(SONAME)'
	@echo "LIBVFIO_SO_DIR=$(abspath $(CARGO_TARGET_DIR)/so-dir)"

# Installs into a scratch prefix (under the cargo target directory) and runs
# the consumer builds against it.
CONSUMER_PREFIX ?= $(CARGO_TARGET_DIR)/consumer-prefix
check-consumers: $(BUILD_DEP)
	rm -rf '$(CONSUMER_PREFIX)'
	$(MAKE) -f '$(SRCDIR)/Makefile' install NO_BUILD=1 DESTDIR= \
		PREFIX='$(abspath $(CONSUMER_PREFIX))'
	'$(SRCDIR)/c-tests/consumers/run.sh' '$(abspath $(CONSUMER_PREFIX))'

clean:
	$(CARGO) clean --manifest-path '$(SRCDIR)/Cargo.toml' --target-dir '$(CARGO_TARGET_DIR)'

# ---------------------------------------------------------------------------
# The README's test command: every check the project has, each printing its
# own "N passed, M failed" (or cargo's) summary. Stops at the first failure.
CHECK_PREFIX := $(CARGO_TARGET_DIR)/check-prefix

.PHONY: check check-deps check-rust check-c check-meson check-asan sanitizers
check: check-deps check-rust check-c check-meson check-asan soak
	@echo "make check: all checks passed"

# Installs the Debian packages the checks need when it can (root with
# apt-get), else says in one line what to install (scripts/check-deps.sh).
check-deps:
	@bash '$(SRCDIR)/scripts/check-deps.sh'
check-rust check-c check-meson check-asan soak: check-deps

check-rust:
	$(CARGO) fmt --manifest-path '$(SRCDIR)/Cargo.toml' --all -- --check
	$(CARGO) clippy --manifest-path '$(SRCDIR)/Cargo.toml' --target-dir '$(CARGO_TARGET_DIR)' \
		--all-targets -- -D warnings
	# The C-sample tests link the debug cdylib, which `cargo test` alone
	# does not build.
	$(CARGO) build --manifest-path '$(SRCDIR)/Cargo.toml' --target-dir '$(CARGO_TARGET_DIR)'
	$(CARGO) test --manifest-path '$(SRCDIR)/Cargo.toml' --target-dir '$(CARGO_TARGET_DIR)'

check-c: build
	rm -rf '$(CHECK_PREFIX)'
	$(MAKE) -f '$(SRCDIR)/Makefile' install NO_BUILD=1 PREFIX='$(CHECK_PREFIX)' DESTDIR=
	bash '$(SRCDIR)/c-tests/abi/run.sh' '$(CHECK_PREFIX)/include' '$(CHECK_PREFIX)/lib'
	bash '$(SRCDIR)/c-tests/consumers/run.sh' '$(CHECK_PREFIX)'
	bash '$(SRCDIR)/c-tests/configspace/run.sh' '$(CHECK_PREFIX)'
	@if [ -x '$(SRCDIR)/c-tests/device/run.sh' ]; then \
		bash '$(SRCDIR)/c-tests/device/run.sh' '$(CHECK_PREFIX)'; fi

# The meson build (meson.build): standalone static/shared installs with
# DESTDIR, the same files as `make install`, a parent project using this tree
# as a subproject; and the 2025/2026 API forms (c-tests/api-compat) against
# each. The meson builds share this cargo target directory, so they reuse
# what `build` and check-rust compiled.
check-meson: build
	bash '$(SRCDIR)/c-tests/meson/run.sh' '$(CARGO_TARGET_DIR)'

# The C device tests and the C sample devices built with
# -fsanitize=address,undefined (leak checking on, no valgrind); the library
# itself stays as built.
check-asan: build
	CARGO_TARGET_DIR='$(CARGO_TARGET_DIR)' bash '$(SRCDIR)/scripts/sanitizers.sh' asan

# Miri, ThreadSanitizer and the above (scripts/sanitizers.sh; Miri and TSan
# need a nightly toolchain, which .ci/run provides).
sanitizers:
	CARGO_TARGET_DIR='$(CARGO_TARGET_DIR)' bash '$(SRCDIR)/scripts/sanitizers.sh'

# The README's main job: build, serve two sample devices, live-migrate one.
.PHONY: demo
demo:
	bash '$(SRCDIR)/scripts/demo.sh'

# A million mixed requests with memory and fds flat (tests/soak.rs), in
# release because a debug build is slow at it.
.PHONY: soak
soak:
	$(CARGO) test --release --manifest-path '$(SRCDIR)/Cargo.toml' --target-dir '$(CARGO_TARGET_DIR)' \
		--test soak -- --ignored --nocapture

# SPDK's per-I/O DMA pattern through the C ABI (benches/c/spdk_io.c), run
# against any number of builds of libvfio-user.so.0 side by side, each
# loaded with dlopen from its path: this tree's release library, plus
# UPSTREAM_LIB when given (built by hand outside the tree), or exactly the
# NAME=PATH list in BENCH_IO_LIBS. BENCH_IO_ARGS: -q (short run), -r N
# (rounds), -o io1,io4,io64,run,mig (rows).
BENCH_IO := $(CARGO_TARGET_DIR)/bench/spdk_io
UPSTREAM_LIB ?=
BENCH_IO_LIBS ?= ours='$(abspath $(LIB_SO))' $(if $(UPSTREAM_LIB),upstream='$(abspath $(UPSTREAM_LIB))')
BENCH_IO_ARGS ?=
CC ?= cc

.PHONY: bench-io
bench-io: $(BUILD_DEP)
	mkdir -p '$(dir $(BENCH_IO))'
	$(CC) -O2 -g -Wall -Wextra -Werror -I'$(SRCDIR)/include' \
		$(foreach f,spdk_io.c bench_util.c mig_read.c,'$(SRCDIR)/benches/c/$(f)') \
		-o '$(BENCH_IO)' -ldl -lpthread
	'$(BENCH_IO)' $(BENCH_IO_ARGS) $(BENCH_IO_LIBS)
