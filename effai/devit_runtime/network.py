"""Addresses and the gloo process group of a collaborative run: joining it (bound to the given address), bounded waits
on every send and receive, and why a group did not form or a peer stopped answering, naming the device.
Ranks and failures: docs/distill.md, "effai/devit_runtime/coordinator.py, device.py, messages.py, network.py".
"""

from __future__ import annotations

import os
import re
from datetime import timedelta
from typing import Any, Callable

import torch.distributed as dist

from effai.devit_runtime.messages import DEVICE_FIELDS, KEY, describe, parse_message
from effai.errors import EffaiError, UsageError


class DeviceLost(EffaiError):
    """A device (or the coordinator) stopped answering mid-run."""


class DeviceExited(EffaiError):
    """A device process the coordinator started itself (run_local) has exited; `rank` is its rank."""

    def __init__(self, message: str, rank: int):
        super().__init__(message)
        self.rank = rank


def parse_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise UsageError(f"--coordinator '{text}' must be HOST:PORT, like 192.168.1.10:29500 or 127.0.0.1:0")
    return host, int(port)


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _td(seconds: float) -> timedelta:
    return timedelta(seconds=seconds)


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    line = re.sub(r"^\[[^\]]*\]\s*", "", text[0]) if text else type(e).__name__   # gloo's "[file.cc:545] "
    return line.split(". ")[0][:200]


def wait(work: Any, who: str, what: str, timeout_s: float) -> None:
    try:
        work.wait(_td(timeout_s))
    except Exception as e:
        raise DeviceLost(f"{who} {what} failed: {first_line(e)}; it died, hung or the network dropped "
                         f"(timeout {timeout_s:g}s); the run is aborted") from e


def _gloo_device(local: str | None) -> Any:
    """gloo's socket on `local` (the address the coordinator listens on, or a device's address towards it); gloo's
    default device (GLOO_SOCKET_IFNAME, else this host's name) when that variable is set or `local` is a wildcard."""
    if os.environ.get("GLOO_SOCKET_IFNAME") or not local or local in ("0.0.0.0", "::"):
        return dist.ProcessGroupGloo.create_default_device()
    return dist.ProcessGroupGloo.create_device(hostname=local)


def init_group(store: Any, rank: int, world: int, timeout_s: float, address: str, local: str | None,
                watch: Callable[[], None] | None = None) -> Any:
    """Join the gloo process group (returned). When it does not form, say why: the coordinator ended the run (a
    device's view), a device that reported ready never joined (named), else the network."""
    try:
        opts = dist.ProcessGroupGloo._Options()
        opts._devices = [_gloo_device(local)]
        opts._timeout = _td(timeout_s)
        return dist.ProcessGroupGloo(dist.PrefixStore(f"{KEY}/pg", store), rank, world, opts)
    except Exception as e:
        if rank > 0 and not _reachable(store):   # not the network: the coordinator ended the run (it says why)
            raise coordinator_failed(e, address, "") from e
        named = _never_joined(store, world, timeout_s, watch)
        if named is not None:
            raise named from e
        raise EffaiError(f"gloo could not connect the {world} processes of the run at {address} within "
                         f"{timeout_s:g}s ({first_line(e)}); across hosts set GLOO_SOCKET_IFNAME to the network "
                         "interface the devices share, on every host") from e


def _reachable(store: Any) -> bool:
    try:
        store.check([f"{KEY}/start"])
        return True
    except Exception:
        return False


def coordinator_failed(e: Exception, address: str, timed_out: str) -> EffaiError:
    """A device's store call failed: the coordinator closed the rendezvous (it ended the run and its own error says
    why), or it did not answer within the wait (`timed_out` says which)."""
    if isinstance(e, dist.DistNetworkError) or not timed_out:
        return EffaiError(f"the coordinator at {address} ended the run ({first_line(e)}); its own output says why")
    return EffaiError(f"the coordinator at {address} {timed_out} ({first_line(e)})")


def _never_joined(store: Any, world: int, timeout_s: float, watch: Callable[[], None] | None) -> EffaiError | None:
    """Why the process group did not form, naming the device: a process run_local started that has exited (its exit
    code and log), else the devices that reported ready but never said they were joining; None: not known."""
    if watch is not None:
        try:
            watch()
        except EffaiError as e:
            return e
    try:
        missing = [r for r in range(1, world) if not store.check([f"{KEY}/joining/{r}"])]
        who = []
        for r in missing:
            try:
                info = parse_message(store.get(f"{KEY}/device/{r}"), DEVICE_FIELDS, "a device's description",
                                     required=())
            except UsageError:
                info = None
            who.append(describe(r, info))
    except Exception:   # the store is gone (the coordinator ended the run)
        return None
    if not who:
        return None
    return EffaiError(f"{', '.join(who)} reported ready, then never joined the process group within {timeout_s:g}s "
                      "(crashed?); check that device's output")
