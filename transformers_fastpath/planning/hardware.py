"""What the plan is made for: the machine's accelerators, or a profile of another machine."""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

__all__ = ["Hardware", "PROFILES"]

DeviceKind = Literal["cpu", "cuda", "mps", "xpu"]


@dataclass(frozen=True)
class Hardware:
    """A description of the devices a model will run on.

    ``Hardware.detect()`` reads this machine; constructing one by hand describes another
    (``Hardware(device="cuda", count=2, memory_gib=80, capability=(9, 0))`` is two H100s),
    so ``explain`` can show what would happen on a server from a laptop.

    Attributes:
        device: ``"cpu"``, ``"cuda"``, ``"mps"`` or ``"xpu"``.
        count: number of accelerators (1 for a CPU).
        memory_gib: memory of one accelerator in GiB (host RAM for a CPU; ``None`` = unknown).
        capability: CUDA compute capability, e.g. ``(9, 0)`` for Hopper.
        name: a human name (``"NVIDIA H100 80GB HBM3"``).
        cpu_count: logical CPU cores available to this process.
        distributed_world_size: processes in the launch group (torchrun / accelerate), 1 if none.
    """

    device: DeviceKind = "cpu"
    count: int = 1
    memory_gib: float | None = None
    capability: tuple[int, int] | None = None
    name: str = ""
    cpu_count: int = 1
    distributed_world_size: int = 1
    extras: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "cuda", "mps", "xpu"):
            raise ValueError(
                f"Hardware.device must be 'cpu', 'cuda', 'mps' or 'xpu', got {self.device!r}"
            )
        if self.count < 1:
            raise ValueError(f"Hardware.count must be >= 1, got {self.count}")
        if self.capability is not None:
            object.__setattr__(self, "capability", tuple(self.capability))

    # -- derived facts the policy reasons about --------------------------------------
    @property
    def is_gpu(self) -> bool:
        """True for CUDA (and ROCm, which torch reports as CUDA) and XPU devices."""
        return self.device in ("cuda", "xpu")

    @property
    def supports_bf16(self) -> bool:
        """bf16 matmuls at full speed: Ampere (sm80) or newer; CPUs run bf16 slowly, so False."""
        if self.device == "cuda":
            return self.capability is not None and self.capability >= (8, 0)
        return self.device == "xpu"

    @property
    def supports_fp8(self) -> bool:
        """float8 tensor cores: Ada (sm89) and Hopper (sm90) or newer."""
        return self.device == "cuda" and self.capability is not None and self.capability >= (8, 9)

    @property
    def total_memory_gib(self) -> float | None:
        return None if self.memory_gib is None else self.memory_gib * self.count

    @property
    def torch_device(self) -> str:
        """The device string of the first device (``"cuda:0"``, ``"cpu"``)."""
        return "cpu" if self.device == "cpu" else f"{self.device}:0"

    def describe(self) -> str:
        if self.device == "cpu":
            mem = f", {self.memory_gib:.0f} GiB" if self.memory_gib else ""
            return f"CPU ({self.cpu_count} cores{mem})"
        parts = [f"{self.count}x {self.name or self.device.upper()}"]
        if self.memory_gib:
            parts.append(f"{self.memory_gib:.0f} GiB each")
        if self.capability:
            parts.append(f"sm{self.capability[0]}{self.capability[1]}")
        if self.distributed_world_size > 1:
            parts.append(f"world size {self.distributed_world_size}")
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("extras")
        data["capability"] = list(self.capability) if self.capability else None
        return data

    # -- constructors ------------------------------------------------------------
    @classmethod
    def detect(cls) -> Hardware:
        """Describe this machine (imports torch)."""
        import torch

        cpu_count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            return cls(
                device="cuda",
                count=torch.cuda.device_count(),
                memory_gib=round(props.total_memory / 2**30, 1),
                capability=(props.major, props.minor),
                name=props.name,
                cpu_count=cpu_count,
                distributed_world_size=world,
            )
        if hasattr(torch, "xpu") and torch.xpu.is_available():
            return cls(device="xpu", count=torch.xpu.device_count(), cpu_count=cpu_count,
                       distributed_world_size=world)
        if torch.backends.mps.is_available():
            return cls(device="mps", count=1, name="Apple MPS", cpu_count=cpu_count)
        return cls(device="cpu", count=1, memory_gib=_host_memory_gib(), name="CPU",
                   cpu_count=cpu_count, distributed_world_size=world)

    @classmethod
    def from_profile(cls, profile: str) -> Hardware:
        """Build a Hardware from a profile name or a compact spec.

        Names: see :data:`PROFILES` (``cpu``, ``t4``, ``a10g``, ``l4``, ``a100-40``, ``a100``,
        ``h100``, ``h200``). Prefix ``Nx`` for several: ``2xh100``. A spec
        ``cuda:COUNTxMEMORY[:smXY]`` describes any GPU: ``cuda:4x24:sm86``.
        ``detect`` means this machine.
        """
        text = profile.strip().lower()
        if text in ("detect", "this", "local"):
            return cls.detect()
        spec = re.fullmatch(r"cuda:(\d+)x(\d+(?:\.\d+)?)(?:gib|gb)?(?::sm(\d)(\d))?", text)
        if spec:
            count, mem, major, minor = spec.groups()
            cap = (int(major), int(minor)) if major else (8, 0)
            return cls(device="cuda", count=int(count), memory_gib=float(mem), capability=cap,
                       name=f"GPU sm{cap[0]}{cap[1]}")
        multi = re.fullmatch(r"(\d+)x(.+)", text)
        count = 1
        if multi:
            count, text = int(multi.group(1)), multi.group(2)
        if text not in PROFILES:
            raise ValueError(
                f"unknown hardware profile {profile!r}; use one of {', '.join(sorted(PROFILES))}"
                " (optionally prefixed 'Nx', e.g. '2xh100'), 'detect', or a spec 'cuda:COUNTxGIB[:smXY]'"
            )
        base = PROFILES[text]
        if base.device == "cpu" and count != 1:
            raise ValueError(f"hardware profile {profile!r}: a CPU profile takes no count")
        return cls(**{**base.to_dict(), "capability": base.capability, "count": count})


def _host_memory_gib() -> float | None:
    try:
        return round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


PROFILES: dict[str, Hardware] = {
    "cpu": Hardware(device="cpu", count=1, memory_gib=32, name="CPU", cpu_count=8),
    "t4": Hardware(device="cuda", memory_gib=16, capability=(7, 5), name="NVIDIA T4"),
    "v100": Hardware(device="cuda", memory_gib=32, capability=(7, 0), name="NVIDIA V100"),
    "a10g": Hardware(device="cuda", memory_gib=24, capability=(8, 6), name="NVIDIA A10G"),
    "l4": Hardware(device="cuda", memory_gib=24, capability=(8, 9), name="NVIDIA L4"),
    "rtx4090": Hardware(device="cuda", memory_gib=24, capability=(8, 9), name="NVIDIA RTX 4090"),
    "a100-40": Hardware(device="cuda", memory_gib=40, capability=(8, 0), name="NVIDIA A100 40GB"),
    "a100": Hardware(device="cuda", memory_gib=80, capability=(8, 0), name="NVIDIA A100 80GB"),
    "h100": Hardware(device="cuda", memory_gib=80, capability=(9, 0), name="NVIDIA H100 80GB"),
    "h200": Hardware(device="cuda", memory_gib=141, capability=(9, 0), name="NVIDIA H200"),
}


def device_kind(device: Any, hardware: Hardware) -> str:
    """The kind of a device given as transformers takes it: ``"cuda"`` for ``"cuda:1"`` or
    ``torch.device("cuda", 1)``; a GPU index (``0``) is one of ``hardware``'s devices, ``-1`` the CPU."""
    if isinstance(device, int) and not isinstance(device, bool):
        return "cpu" if device < 0 or hardware.device == "cpu" else hardware.device
    return str(getattr(device, "type", device)).split(":", 1)[0]
