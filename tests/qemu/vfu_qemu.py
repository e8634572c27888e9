#!/usr/bin/env python3
# SPDX-License-Identifier: BSD-3-Clause
"""QEMU interoperability checks for the sample devices.

Runs a real QEMU (with its `vfio-user-pci` device) against the C sample
devices built on this crate's libvfio-user.so.0 and checks, through QMP,
the human monitor and the qtest protocol, that QEMU and the library
understand each other. Called by run.sh, which provides QEMU (usually in a
Debian sid chroot) and the device programs; it can also be run by hand.

Every check prints one line, `PASS: ...` or `FAIL: ...`; details of a
failure follow on lines indented by two spaces. The exit status is 0 iff
nothing failed.

Scenarios:
  gpio    TCG + SeaBIOS: the firmware assigns the gpio card's I/O BAR2;
          port I/O from the monitor reaches the device's registers.
  migdev  qtest accelerator: BAR0 programmed by hand through config space;
          MMIO register access, DMA_MAP with file descriptors, the device's
          DMA into guest RAM checked byte for byte, and a device reset.
Both end with QMP `quit`: QEMU and the device must exit with status 0.
"""

import argparse
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time

GPIO_ID = (0x494F, 0x0DC8)
MIGDEV_ID = (0x494F, 0x0DCF)

# migdev registers (c-tests/samples/README.md).
MIG_MAGIC, MIG_VERSION, MIG_COUNTER, MIG_CTRL = 0x00, 0x04, 0x08, 0x0C
MIG_SCRATCH = 0x10
MIG_DMA_LO, MIG_DMA_HI, MIG_DMA_LEN = 0x50, 0x54, 0x58
MIG_STATE, MIG_CHECKSUM = 0x5C, 0x60
MIG_MAGIC_VALUE = 0x4D494744
MIG_STATE_RUNNING = 1
MIG_WORD_MUL = 2654435761
PAGE = 4096

# Where the migdev scenario puts things in guest-physical space.
MIG_BAR0_ADDR = 0xE0000000
MIG_BUF_ADDR = 0x200000
MIG_BUF_PAGES = 4

# Known QEMU complaints about a server, and what they mean.
QEMU_HINTS = [
    ("max_dma_maps too large",
     "QEMU refuses a server whose VERSION reply announces max_dma_maps above 65535 "
     "(its VFIO_USER_DEF_MAP_MAX); upstream libvfio-user does not send max_dma_maps"),
    ("too small", "QEMU wants the server's pgsizes to be a multiple of 4096"),
]

# What QEMU reports as the address of a BAR that is not mapped.
BAR_UNMAPPED = -1


class Abort(Exception):
    """A check failed in a way that makes the rest of a scenario pointless."""


class Results:
    def __init__(self):
        self.passed = 0
        self.failed = 0

    def ok(self, name, detail=""):
        self.passed += 1
        print(f"PASS: {name}" + (f" ({detail})" if detail else ""), flush=True)

    def fail(self, name, detail=""):
        self.failed += 1
        print(f"FAIL: {name}", flush=True)
        for line in str(detail).splitlines():
            print(f"  {line}", flush=True)

    def check(self, cond, name, detail="", fail_detail=""):
        if cond:
            self.ok(name, detail)
        else:
            self.fail(name, fail_detail or detail)
        return cond


def wait_for(pred, timeout, step=0.05):
    """Polls pred() until it returns something true or timeout passes."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v or time.monotonic() >= deadline:
            return v
        time.sleep(step)


def connect_unix(path, timeout, alive):
    """Connects to a listening UNIX socket, waiting for it to appear."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if not alive():
            raise Abort(f"process exited before {path} accepted a connection")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            return s
        except OSError as e:
            last = e
            s.close()
            time.sleep(0.05)
    raise Abort(f"cannot connect to {path}: {last}")


class Qmp:
    """A minimal synchronous QMP client."""

    def __init__(self, path, alive, timeout=10):
        self.sock = connect_unix(path, timeout, alive)
        self.sock.settimeout(30)
        self.file = self.sock.makefile("rwb")
        self.events = []
        greeting = self._read()
        if "QMP" not in greeting:
            raise Abort(f"unexpected QMP greeting {greeting!r}")
        self.version = greeting["QMP"].get("version", {})
        self.cmd("qmp_capabilities")

    def _read(self):
        line = self.file.readline()
        if not line:
            raise EOFError("QMP connection closed")
        return json.loads(line)

    def cmd(self, name, **args):
        msg = {"execute": name}
        if args:
            msg["arguments"] = args
        self.file.write(json.dumps(msg).encode() + b"\n")
        self.file.flush()
        while True:
            reply = self._read()
            if "event" in reply:
                self.events.append(reply)
                continue
            if "error" in reply:
                raise RuntimeError(f"QMP {name}: {reply['error']}")
            return reply.get("return")

    def hmp(self, line):
        return self.cmd("human-monitor-command", **{"command-line": line})

    def close(self):
        try:
            self.file.close()
            self.sock.close()
        except OSError:
            pass


class QTest:
    """A minimal client of QEMU's qtest protocol (-accel qtest)."""

    def __init__(self, path, alive, timeout=10):
        self.sock = connect_unix(path, timeout, alive)
        self.sock.settimeout(30)
        self.file = self.sock.makefile("rwb")

    def cmd(self, line):
        self.file.write(line.encode() + b"\n")
        self.file.flush()
        while True:
            reply = self.file.readline()
            if not reply:
                raise EOFError("qtest connection closed")
            reply = reply.decode().strip()
            if reply.startswith("IRQ"):
                continue
            if not reply.startswith("OK"):
                raise RuntimeError(f"qtest {line!r}: {reply}")
            return reply[2:].strip()

    def _val(self, line):
        return int(self.cmd(line), 16)

    def outl(self, port, v):
        self.cmd(f"outl {port:#x} {v:#x}")

    def outw(self, port, v):
        self.cmd(f"outw {port:#x} {v:#x}")

    def inl(self, port):
        return self._val(f"inl {port:#x}")

    def inw(self, port):
        return self._val(f"inw {port:#x}")

    def readl(self, addr):
        return self._val(f"readl {addr:#x}")

    def readq(self, addr):
        return self._val(f"readq {addr:#x}")

    def writel(self, addr, v):
        self.cmd(f"writel {addr:#x} {v:#x}")

    def writeq(self, addr, v):
        self.cmd(f"writeq {addr:#x} {v:#x}")

    def memset(self, addr, size, v):
        self.cmd(f"memset {addr:#x} {size:#x} {v:#x}")

    def read(self, addr, size):
        hexdata = self.cmd(f"read {addr:#x} {size:#x}")
        return bytes.fromhex(hexdata[2:] if hexdata.startswith("0x") else hexdata)

    # Legacy PCI configuration mechanism #1 (ports 0xcf8/0xcfc).
    @staticmethod
    def _cfg_addr(slot, fn, reg):
        return 0x80000000 | (slot << 11) | (fn << 8) | (reg & 0xFC)

    def cfg_readl(self, slot, fn, reg):
        self.outl(0xCF8, self._cfg_addr(slot, fn, reg))
        return self.inl(0xCFC)

    def cfg_writel(self, slot, fn, reg, v):
        self.outl(0xCF8, self._cfg_addr(slot, fn, reg))
        self.outl(0xCFC, v)

    def cfg_writew(self, slot, fn, reg, v):
        self.outl(0xCF8, self._cfg_addr(slot, fn, reg))
        self.outw(0xCFC + (reg & 2), v)


class Env:
    """Where things are: the QEMU root (chroot or /), programs, work dir."""

    def __init__(self, args):
        self.root = os.path.abspath(args.root) if args.root else ""
        self.workdir = os.path.abspath(args.workdir)
        self.bindir = os.path.abspath(args.bindir)
        self.qemu = args.qemu
        if self.root and not (self.workdir + "/").startswith(self.root + "/"):
            sys.exit(f"{self.workdir} is not inside {self.root}")

    def inner(self, host_path):
        """The path QEMU sees for a host path under the work dir."""
        return host_path[len(self.root):] if self.root else host_path

    def qemu_cmd(self, qemu_args):
        if not self.root:
            return [self.qemu] + qemu_args
        # A private mount namespace: the mounts QEMU needs in the chroot
        # exist only for it and vanish with it, however the run ends.
        script = ('set -e; r=$1; shift; mount --bind /dev "$r/dev"; '
                  'mount -t proc proc "$r/proc"; exec chroot "$r" "$@"')
        return (["unshare", "--mount", "--propagation", "private", "--",
                 "sh", "-c", script, "sh", self.root, self.qemu] + qemu_args)


def _die_with_parent():
    """Runs in each child before exec: SIGKILL it if this script dies."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    except OSError:
        pass


class Procs:
    """Child processes of a scenario, stopped by PID at the end."""

    def __init__(self):
        self.procs = []

    def start(self, argv, log_path):
        log = open(log_path, "wb")
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                             stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        log.close()
        self.procs.append(p)
        return p

    def stop_all(self):
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.kill(p.pid, signal.SIGTERM)
                    p.wait(timeout=3)
                except subprocess.TimeoutExpired:
                    os.kill(p.pid, signal.SIGKILL)
                    p.wait()
                except ProcessLookupError:
                    pass


def read_text(path):
    try:
        with open(path, "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def tail(path, n=40):
    lines = read_text(path).splitlines()
    return "\n".join(f"{os.path.basename(path)}: {ln}" for ln in lines[-n:]) or \
        f"{os.path.basename(path)}: (empty)"


def wait_exit(p, timeout):
    try:
        return p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


def find_pci(qmp, ids, qdev_id):
    for bus in qmp.cmd("query-pci"):
        for dev in bus.get("devices", []):
            if (dev["id"]["vendor"], dev["id"]["device"]) == ids and \
                    dev.get("qdev_id") == qdev_id:
                return dev
    return None


def bar_of(dev, idx):
    for r in dev.get("regions", []):
        if r.get("bar") == idx:
            return r
    return None


def device_json(qdev_id, sock):
    return json.dumps({"driver": "vfio-user-pci", "id": qdev_id,
                       "socket": {"type": "unix", "path": sock}})


def common_qemu_args(env, qmp_sock, serial_log):
    return ["-machine", "q35,memory-backend=mem", "-m", "256",
            "-object", "memory-backend-memfd,id=mem,size=256M,share=on",
            "-nodefaults", "-nographic", "-display", "none",
            "-serial", f"file:{env.inner(serial_log)}",
            "-qmp", f"unix:{env.inner(qmp_sock)},server=on,wait=off"]


class Scenario:
    def __init__(self, env, res, name):
        self.env, self.res, self.name = env, res, name
        self.procs = Procs()
        self.dir = os.path.join(env.workdir, name)
        os.makedirs(self.dir, exist_ok=True)
        self.dev_log = os.path.join(self.dir, "device.log")
        self.qemu_log = os.path.join(self.dir, "qemu.log")
        self.dev_sock = os.path.join(self.dir, "dev.sock")
        self.qmp_sock = os.path.join(self.dir, "qmp.sock")
        self.serial_log = os.path.join(self.dir, "serial.log")
        self.dev = self.qemu = self.qmp = None

    def ok(self, what, detail=""):
        self.res.ok(f"{self.name}: {what}", detail)

    def fail(self, what, detail=""):
        self.res.fail(f"{self.name}: {what}", detail)

    def logs(self):
        return tail(self.qemu_log) + "\n" + tail(self.dev_log)

    def check(self, cond, what, detail="", fail_detail=""):
        return self.res.check(cond, f"{self.name}: {what}", detail, fail_detail)

    def require(self, cond, what, detail="", fail_detail=""):
        if not self.check(cond, what, detail, fail_detail):
            raise Abort(what)

    def start_device(self, argv):
        argv = [self.dev_sock if a == "@SOCK" else a for a in argv]
        self.dev = self.procs.start(argv, self.dev_log)
        # Both samples log this once their socket is listening.
        ready = wait_for(lambda: "waiting for a client" in read_text(self.dev_log)
                         or self.dev.poll() is not None, 10)
        self.require(ready and self.dev.poll() is None and os.path.exists(self.dev_sock),
                     "device listens on its socket",
                     fail_detail=tail(self.dev_log))

    def start_qemu(self, extra):
        argv = self.env.qemu_cmd(common_qemu_args(self.env, self.qmp_sock, self.serial_log)
                                 + extra)
        self.qemu = self.procs.start(argv, self.qemu_log)
        try:
            self.qmp = Qmp(self.qmp_sock, lambda: self.qemu.poll() is None)
        except (Abort, OSError, EOFError, ValueError, RuntimeError) as e:
            wait_exit(self.qemu, 2)
            qlog = read_text(self.qemu_log)
            hints = "".join(f"hint: {h}\n" for k, h in QEMU_HINTS if k in qlog)
            self.fail("QEMU starts with the vfio-user-pci device",
                      f"{e}\nQEMU exit status: {self.qemu.poll()}\n"
                      f"command: {' '.join(argv)}\n{self.logs()}\n{hints}")
            raise Abort("qemu") from e
        v = self.qmp.version.get("qemu", {})
        self.ok("QEMU starts with the vfio-user-pci device",
                f"QEMU {v.get('major')}.{v.get('minor')}.{v.get('micro')}, "
                f"{self.qmp.version.get('package', '').strip()}")

    def quit_checks(self):
        """QMP quit; QEMU and the device must both exit with status 0."""
        try:
            self.qmp.cmd("quit")
        except (EOFError, OSError):
            pass  # QEMU may close the socket before the reply gets out
        self.qmp.close()
        qrc = wait_exit(self.qemu, 15)
        self.check(qrc == 0, "QEMU exits with status 0 after QMP quit",
                   fail_detail=f"exit status {qrc}\n{tail(self.qemu_log)}")
        drc = wait_exit(self.dev, 15)
        self.check(drc == 0, "device sees the disconnect and exits with status 0",
                   fail_detail=f"exit status {drc}\n{tail(self.dev_log)}")
        qlog = read_text(self.qemu_log)
        bad = [ln for ln in qlog.splitlines() if re.search(r"vfio|error|warn", ln, re.I)]
        self.check(not bad, "QEMU printed no vfio-user errors or warnings",
                   fail_detail="\n".join(bad))

    def run(self):
        try:
            self.body()
        except Abort:
            pass
        except Exception as e:  # an unexpected protocol/QEMU failure
            self.fail(f"unexpected {type(e).__name__}", f"{e}\n{self.logs()}")
        finally:
            if self.qmp:
                self.qmp.close()
            self.procs.stop_all()


class GpioScenario(Scenario):
    """TCG + SeaBIOS; port I/O from the monitor to the gpio card."""

    def body(self):
        self.start_device([os.path.join(self.env.bindir, "gpio"), "-v", "@SOCK"])
        self.start_qemu(["-accel", "tcg", "-device",
                         device_json("gpio0", self.env.inner(self.dev_sock))])

        dev = find_pci(self.qmp, GPIO_ID, "gpio0")
        self.require(dev is not None, "QEMU realized the device: 494f:0dc8 in query-pci",
                     fail_detail=json.dumps(self.qmp.cmd("query-pci"))[:2000])
        info = self.qmp.hmp("info pci")
        self.check("494f:0dc8" in info, "`info pci` lists PCI device 494f:0dc8",
                   fail_detail=info)

        # SeaBIOS enumerates PCI and assigns BARs, then fails to boot.
        def bar2_addr():
            d = find_pci(self.qmp, GPIO_ID, "gpio0")
            r = d and bar_of(d, 2)
            if r and r.get("address") not in (None, BAR_UNMAPPED, 0):
                return r
            return None
        bar = wait_for(bar2_addr, 30, 0.2)
        self.require(bar is not None and bar["type"] == "io" and bar["size"] == 256,
                     "firmware assigned I/O BAR2 (256 bytes)",
                     detail=f"I/O at {bar['address']:#x}" if bar else "",
                     fail_detail=json.dumps(find_pci(self.qmp, GPIO_ID, "gpio0"),
                                            indent=1) + "\n" + tail(self.serial_log))
        others = [r["bar"] for r in dev.get("regions", []) if r.get("bar") != 2]
        self.check(not others, "no BAR other than BAR2", fail_detail=f"BARs {others}")
        port = bar["address"]

        def inp(size, p):
            out = self.qmp.hmp(f"i /{size} {p:#x}")
            m = re.search(r"=\s*0x([0-9a-fA-F]+)", out)
            if not m:
                raise RuntimeError(f"unexpected `i` output {out!r}")
            return int(m.group(1), 16)

        def outp(size, p, v):
            out = self.qmp.hmp(f"o /{size} {p:#x} {v:#x}")
            if out.strip():
                raise RuntimeError(f"unexpected `o` output {out!r}")

        v0 = inp("b", port)
        outp("b", port, 0xA5)
        v1 = inp("b", port)
        self.check(v0 == 0 and v1 == 0xA5,
                   "port write + read of outputs 0-7 (o /b, i /b) through BAR2",
                   f"{v0:#04x} -> {v1:#04x}", f"read {v0:#x} before and {v1:#x} after writing 0xa5")
        outp("b", port + 4, 0x5A)
        v = inp("b", port + 4)
        self.check(v == 0x5A, "port write + read of outputs 8-15", f"{v:#04x}",
                   f"read {v:#x} after writing 0x5a")
        a, b = inp("b", port + 1), inp("b", port + 1)
        self.check(a ^ b == 0xFF, "input register toggles on every read",
                   f"{a:#04x}, {b:#04x}", f"read {a:#x} then {b:#x}")
        # A 4-byte access covers outputs 8-15, inputs 8-15 and two unused bytes.
        outp("w", port + 4, 0x00001234)
        v = inp("w", port + 4)
        self.check(v & 0xFFFF00FF == 0x34, "4-byte port access is handled byte by byte",
                   f"{v:#010x}", f"read {v:#x} after a 4-byte write of 0x1234")
        v = inp("b", port + 0x80)
        self.check(v == 0, "unused register reads 0", fail_detail=f"read {v:#x}")

        log = read_text(self.dev_log)
        want = ["client attached", "outputs 0-7: 0x00 -> 0xa5", "outputs 8-15: 0x00 -> 0x5a",
                "outputs 8-15: 0x5a -> 0x34", "write of 0x12 to register 0x5 ignored"]
        missing = [w for w in want if w not in log]
        self.check(not missing, "device log shows the accesses",
                   fail_detail="missing: " + "; ".join(missing) + "\n" + tail(self.dev_log))

        self.quit_checks()
        self.check("client disconnected" in read_text(self.dev_log),
                   "device logged the disconnect", fail_detail=tail(self.dev_log))


def mig_expected_buffer(counter, pages):
    """The guest buffer after `counter` ticks of migdev's writer, from zeroes."""
    buf = bytearray(pages * PAGE)
    for p in range(pages):
        # The last tick n in 1..counter that wrote page p (n % pages == p).
        n = counter - ((counter - p) % pages)
        if n < 1:
            continue
        words = [(n * MIG_WORD_MUL + i) & 0xFFFFFFFF for i in range(PAGE // 4)]
        buf[p * PAGE:(p + 1) * PAGE] = struct.pack(f"<{PAGE // 4}I", *words)
    return bytes(buf)


class MigdevScenario(Scenario):
    """qtest accelerator; MMIO registers, DMA into guest RAM, device reset."""

    def program_bar0(self, qt, slot):
        qt.cfg_writel(slot, 0, 0x10, MIG_BAR0_ADDR)
        qt.cfg_writew(slot, 0, 0x04, 0x0006)  # memory space + bus master

    def body(self):
        self.start_device([os.path.join(self.env.bindir, "migdev"), "@SOCK", "--log", "debug"])
        qtest_sock = os.path.join(self.dir, "qtest.sock")
        self.start_qemu(["-accel", "qtest",
                         "-qtest", f"unix:{self.env.inner(qtest_sock)},server=on,wait=off",
                         "-qtest-log", "/dev/null",
                         "-device", device_json("mig0", self.env.inner(self.dev_sock))])
        qt = QTest(qtest_sock, lambda: self.qemu.poll() is None)

        dev = find_pci(self.qmp, MIGDEV_ID, "mig0")
        self.require(dev is not None, "QEMU realized the device: 494f:0dcf in query-pci",
                     fail_detail=json.dumps(self.qmp.cmd("query-pci"))[:2000])
        bar = bar_of(dev, 0)
        self.require(bar is not None and bar["type"] == "memory" and bar["size"] == PAGE,
                     "BAR0 is a 4 KiB memory BAR", fail_detail=json.dumps(dev, indent=1))
        slot = dev["slot"]
        cfg0 = qt.cfg_readl(slot, 0, 0)
        self.check(cfg0 == (MIGDEV_ID[1] << 16 | MIGDEV_ID[0]),
                   "config space read through port 0xcfc", f"{cfg0:#010x}",
                   f"read {cfg0:#x}")

        # DMA_MAP: QEMU maps guest RAM when the device is realized. migdev
        # logs every region; "(without direct mapping)" means no fd came.
        def dma_regions():
            """The regions mapped now: {(iova, size): mapped from an fd}."""
            current = {}
            for base, size, what, rest in re.findall(
                    r"DMA region (0x[0-9a-f]+|\(nil\))\+(0x[0-9a-f]+) (mapped|unmapped)(.*)",
                    read_text(self.dev_log)):
                key = (0 if base == "(nil)" else int(base, 16), int(size, 16))
                if what == "mapped":
                    current[key] = "without direct mapping" not in rest
                else:
                    current.pop(key, None)
            return current
        regions = wait_for(dma_regions, 5)
        with_fd = sorted(k for k, fd in regions.items() if fd)
        covers_buf = any(b <= MIG_BUF_ADDR and MIG_BUF_ADDR + MIG_BUF_PAGES * PAGE <= b + s
                         for b, s in with_fd)
        self.check(covers_buf, "DMA_MAP of guest RAM arrived with fds",
                   f"{len(regions)} regions, {len(with_fd)} mapped from an fd: " +
                   ", ".join(f"{b:#x}+{s:#x}" for b, s in with_fd),
                   tail(self.dev_log))

        self.program_bar0(qt, slot)
        dev = find_pci(self.qmp, MIGDEV_ID, "mig0")
        addr = bar_of(dev, 0)["address"]
        self.require(addr == MIG_BAR0_ADDR, "BAR0 programmed through config space",
                     f"{addr:#x}", f"query-pci says {addr:#x}")
        out = self.qmp.hmp(f"xp /2wx {MIG_BAR0_ADDR:#x}")
        self.check(re.search(r":\s*0x4d494744\s+0x00000001", out) is not None,
                   "monitor `xp` reads MAGIC and VERSION from BAR0", out.strip(), out)
        r = lambda off: qt.readl(MIG_BAR0_ADDR + off)  # noqa: E731
        w = lambda off, v: qt.writel(MIG_BAR0_ADDR + off, v)  # noqa: E731

        regs = (r(MIG_MAGIC), r(MIG_VERSION), r(MIG_STATE))
        self.require(regs == (MIG_MAGIC_VALUE, 1, MIG_STATE_RUNNING),
                     "MMIO reads of MAGIC, VERSION, STATE", "%#x %d %d" % regs,
                     "read %#x %#x %#x" % regs + "\n" + self.logs())
        w(MIG_SCRATCH, 0xDEADBEEF)
        w(MIG_SCRATCH + 4, 0x01234567)
        v = (r(MIG_SCRATCH), r(MIG_SCRATCH + 4))
        self.check(v == (0xDEADBEEF, 0x01234567), "MMIO write + read of SCRATCH",
                   fail_detail="read %#x %#x" % v)
        qt.writeq(MIG_BAR0_ADDR + MIG_SCRATCH + 8, 0x1122334455667788)
        v = (r(MIG_SCRATCH + 8), r(MIG_SCRATCH + 12), qt.readq(MIG_BAR0_ADDR + MIG_SCRATCH + 8))
        self.check(v == (0x55667788, 0x11223344, 0x1122334455667788),
                   "8-byte MMIO write + read (two registers)", fail_detail="read %#x %#x %#x" % v)
        w(MIG_MAGIC, 0)
        v = r(MIG_MAGIC)
        self.check(v == MIG_MAGIC_VALUE, "write to a read-only register is ignored",
                   fail_detail=f"MAGIC reads {v:#x}")

        # The device's DMA writer, through the fd-mapped guest RAM.
        length = MIG_BUF_PAGES * PAGE
        qt.memset(MIG_BUF_ADDR, length, 0)
        w(MIG_DMA_LO, MIG_BUF_ADDR)
        w(MIG_DMA_HI, 0)
        w(MIG_DMA_LEN, length)
        w(MIG_CTRL, 1)
        counter = wait_for(lambda: (lambda c: c if c >= 3 * MIG_BUF_PAGES + 1 else 0)(r(MIG_COUNTER)),
                           10, 0.02)
        w(MIG_CTRL, 0)
        counter = r(MIG_COUNTER)
        checksum = r(MIG_CHECKSUM)
        time.sleep(0.05)
        counter2 = r(MIG_COUNTER)
        self.require(counter >= 3 * MIG_BUF_PAGES + 1 and counter2 == counter,
                     "device DMA writer runs and stops on CTRL", f"COUNTER {counter}",
                     f"COUNTER {counter} then {counter2}\n{self.logs()}")
        data = qt.read(MIG_BUF_ADDR, length)
        words = struct.unpack(f"<{length // 4}I", data)
        self.check(sum(words) & 0xFFFFFFFF == checksum,
                   "CHECKSUM register matches guest RAM read back by QEMU", f"{checksum:#010x}",
                   f"device says {checksum:#x}, guest RAM sums to {sum(words) & 0xFFFFFFFF:#x}")
        self.check(data == mig_expected_buffer(counter, MIG_BUF_PAGES),
                   "guest RAM holds exactly the pages the device wrote",
                   f"{MIG_BUF_PAGES} pages after {counter} ticks",
                   "first differing byte at offset %d" %
                   next(i for i, (x, y) in enumerate(zip(data, mig_expected_buffer(
                       counter, MIG_BUF_PAGES))) if x != y)
                   if data != mig_expected_buffer(counter, MIG_BUF_PAGES) else "")
        # migdev logs "migdev[PID] <LEVEL>: ..."; levels 0-4 are warnings or worse.
        bad = [ln for ln in read_text(self.dev_log).splitlines()
               if re.search(r"\] <[0-4]>:", ln)]
        self.check(not bad, "device logged no warnings or errors", fail_detail="\n".join(bad))

        # A system reset must reach the device (VFIO_USER_DEVICE_RESET).
        resets = read_text(self.dev_log).count("device reset")
        self.qmp.cmd("system_reset")
        ok = wait_for(lambda: read_text(self.dev_log).count("device reset") > resets, 5)
        self.check(ok, "system_reset reaches the device (device reset logged)",
                   fail_detail=tail(self.dev_log))
        self.program_bar0(qt, slot)
        v = (r(MIG_SCRATCH), r(MIG_CTRL), r(MIG_COUNTER), r(MIG_MAGIC))
        self.check(v == (0, 0, 0, MIG_MAGIC_VALUE), "registers cleared by the reset",
                   fail_detail="SCRATCH0 %#x CTRL %#x COUNTER %#x MAGIC %#x" % v)
        qt.file.close()
        qt.sock.close()

        self.quit_checks()


SCENARIOS = {"gpio": GpioScenario, "migdev": MigdevScenario}


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="",
                    help="chroot holding QEMU (QEMU runs there); empty: run QEMU directly")
    ap.add_argument("--qemu", default="qemu-system-x86_64", help="QEMU program (inside --root)")
    ap.add_argument("--bindir", required=True, help="directory of the sample device programs")
    ap.add_argument("--workdir", required=True,
                    help="scratch directory for sockets and logs (inside --root)")
    ap.add_argument("scenarios", nargs="*", default=list(SCENARIOS))
    args = ap.parse_args()
    env = Env(args)
    res = Results()
    for name in args.scenarios:
        if name not in SCENARIOS:
            sys.exit(f"unknown scenario {name}")
        SCENARIOS[name](env, res, name).run()
    return 0 if res.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
