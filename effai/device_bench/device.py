"""What a device is, read from its own files: model, SoC/CPU, cores with max clocks and capacities, OS, kernel.

Reads /proc, /sys, /etc/os-release and (Android) getprop through any DeviceFS; cores are grouped into clusters by
(capacity, max clock), the biggest last, which is what a runner needs to pin work to the big cores.
Sources file by file: docs/bench.md, "effai/device_bench/device.py".
"""

from __future__ import annotations

import re
from typing import Any

from effai.device_bench.base import DeviceFS
from effai.device_bench.hostfs import read_line, read_number
from effai.device_bench.thermal import CPU, cpus

# Arm "CPU part" ids (implementer 0x41) -> core name: the usual mobile/board cores.
ARM_PARTS = {
    0xD03: "Cortex-A53", 0xD04: "Cortex-A35", 0xD05: "Cortex-A55", 0xD07: "Cortex-A57", 0xD08: "Cortex-A72",
    0xD09: "Cortex-A73", 0xD0A: "Cortex-A75", 0xD0B: "Cortex-A76", 0xD0C: "Neoverse-N1", 0xD0D: "Cortex-A77",
    0xD0E: "Cortex-A76AE", 0xD40: "Neoverse-V1", 0xD41: "Cortex-A78", 0xD42: "Cortex-A78AE", 0xD44: "Cortex-X1",
    0xD46: "Cortex-A510", 0xD47: "Cortex-A710", 0xD48: "Cortex-X2", 0xD49: "Neoverse-N2", 0xD4B: "Cortex-A78C",
    0xD4D: "Cortex-A715", 0xD4E: "Cortex-X3", 0xD4F: "Neoverse-V2", 0xD80: "Cortex-A520", 0xD81: "Cortex-A720",
    0xD82: "Cortex-X4", 0xD85: "Cortex-X925", 0xD87: "Cortex-A725",
}
GETPROPS = {"model": "ro.product.model", "manufacturer": "ro.product.manufacturer", "soc": "ro.soc.model",
            "soc_vendor": "ro.soc.manufacturer", "platform": "ro.board.platform",
            "android": "ro.build.version.release", "sdk": "ro.build.version.sdk", "abi": "ro.product.cpu.abi"}


def parse_cpuinfo(text: str) -> dict[str, Any]:
    """{"cpu": model name or Arm core names, "hardware": Hardware line, "processors": count} from /proc/cpuinfo."""
    fields: dict[str, list[str]] = {}
    for line in text.splitlines():
        if ":" in line:
            key, _, value = line.partition(":")
            fields.setdefault(key.strip().lower(), []).append(value.strip())
    out: dict[str, Any] = {"processors": len(fields.get("processor", []))}
    if fields.get("model name"):
        out["cpu"] = fields["model name"][0]
    parts = []
    for p in fields.get("cpu part", []):
        try:
            name = ARM_PARTS.get(int(p, 16), f"part {p}")
        except ValueError:
            continue
        if name not in parts:
            parts.append(name)
    if parts and "cpu" not in out:
        out["cpu"] = " + ".join(parts)
    if fields.get("hardware"):
        out["hardware"] = fields["hardware"][0]
    return out


def os_release(text: str) -> str | None:
    """PRETTY_NAME (else NAME VERSION) from /etc/os-release."""
    values = {}
    for line in text.splitlines():
        m = re.match(r'^([A-Z_]+)=(.*)$', line.strip())
        if m:
            values[m.group(1)] = m.group(2).strip().strip('"')
    return values.get("PRETTY_NAME") or " ".join(v for v in (values.get("NAME"), values.get("VERSION")) if v) or None


def getprops(fs: DeviceFS) -> dict[str, str]:
    """Android system properties of interest; {} on a device without getprop."""
    out: dict[str, str] = {}
    for key, prop in GETPROPS.items():
        code, value = fs.run(["getprop", prop], timeout=5.0)
        if code == 127:
            return {}
        if code == 0 and value.strip():
            out[key] = value.strip()
    return out


def core_table(fs: DeviceFS) -> list[dict[str, Any]]:
    """[{"cpu": 0, "max_mhz": 2400.0, "capacity": 1024}, ...] with whatever each core exposes."""
    table = []
    for name in cpus(fs):
        entry: dict[str, Any] = {"cpu": int(name[3:])}
        khz = read_number(fs, f"{CPU}/{name}/cpufreq/cpuinfo_max_freq")
        if khz is not None:
            entry["max_mhz"] = khz / 1000.0
        cap = read_number(fs, f"{CPU}/{name}/cpu_capacity")
        if cap is not None:
            entry["capacity"] = int(cap)
        table.append(entry)
    return table


def clusters(cores: list[dict[str, Any]]) -> list[list[int]]:
    """Core ids grouped by (capacity, max clock), smallest first: the last group is the big cores."""
    groups: dict[tuple[float, float], list[int]] = {}
    for c in cores:
        groups.setdefault((c.get("capacity", 0), c.get("max_mhz", 0.0)), []).append(c["cpu"])
    return [groups[k] for k in sorted(groups)]


def _darwin(fs: DeviceFS) -> dict[str, Any]:
    """macOS has no /proc: ask sysctl and sw_vers (only when `uname -s` says Darwin)."""
    code, kind = fs.run(["uname", "-s"], timeout=5.0)
    if code != 0 or kind.strip() != "Darwin":
        return {}
    out: dict[str, Any] = {}
    for key, argv in (("model", ["sysctl", "-n", "hw.model"]), ("cpu", ["sysctl", "-n", "machdep.cpu.brand_string"]),
                      ("cores", ["sysctl", "-n", "hw.ncpu"]), ("os", ["sw_vers", "-productVersion"])):
        code, value = fs.run(argv, timeout=5.0)
        if code == 0 and value.strip():
            out[key] = int(value) if key == "cores" and value.strip().isdigit() else value.strip()
    if "os" in out:
        out["os"] = f"macOS {out['os']}"
    return out


def describe(fs: DeviceFS) -> dict[str, Any]:
    """Model, soc/cpu, cores (count, per core max clock and capacity, clusters), os, kernel, machine."""
    info = parse_cpuinfo(fs.read_text("/proc/cpuinfo") or "")
    cores = core_table(fs)
    desc: dict[str, Any] = {"cores": len(cores) or info.get("processors") or None}
    if info.get("cpu"):
        desc["cpu"] = info["cpu"]
    if info.get("hardware"):
        desc["soc"] = info["hardware"]
    model = read_line(fs, "/proc/device-tree/model") or read_line(fs, "/sys/firmware/devicetree/base/model")
    if not model:
        vendor, product = read_line(fs, "/sys/class/dmi/id/sys_vendor"), read_line(fs, "/sys/class/dmi/id/product_name")
        model = " ".join(v for v in (vendor, product) if v) or None
    if model:
        desc["model"] = model
    props = getprops(fs)
    if props:
        desc["model"] = " ".join(v for v in (props.get("manufacturer"), props.get("model")) if v) or desc.get("model")
        soc = props.get("soc") or props.get("platform")
        if soc:
            desc["soc"] = " ".join(v for v in (props.get("soc_vendor"), soc) if v)
        desc["os"] = f"Android {props['android']}" + (f" (API {props['sdk']})" if props.get("sdk") else "") \
            if props.get("android") else "Android"
        if props.get("abi"):
            desc["abi"] = props["abi"]
    else:
        pretty = os_release(fs.read_text("/etc/os-release") or "")
        if pretty:
            desc["os"] = pretty
    kernel = read_line(fs, "/proc/version")
    if kernel:
        m = re.match(r"Linux version (\S+)", kernel)
        desc["kernel"] = m.group(1) if m else kernel[:120]
    code, machine = fs.run(["uname", "-m"], timeout=5.0)
    if code == 0 and machine.strip():
        desc["machine"] = machine.strip()
    if not info.get("processors") and not cores:
        desc.update(_darwin(fs))
    if any("max_mhz" in c or "capacity" in c for c in cores):
        desc["cpus"] = cores
        groups = clusters(cores)
        if len(groups) > 1:
            desc["clusters"] = groups
    return desc
