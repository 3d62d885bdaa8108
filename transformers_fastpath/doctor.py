"""What this machine supports: devices, SDPA backends that really run, optional kernels and packages."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
from typing import Any

__all__ = ["diagnose", "sdpa_backends_that_run"]

OPTIONAL_PACKAGES = ("flash_attn", "bitsandbytes", "torchao", "optimum", "peft", "accelerate")


def sdpa_backends_that_run(device: str, dtype: Any = None) -> dict[str, str]:
    """Try each SDPA backend on a small problem; map backend -> "ok" or the error it gave."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dtype = dtype or (torch.float16 if device.startswith("cuda") else torch.float32)
    q = torch.randn(2, 4, 64, 64, device=device, dtype=dtype)
    results: dict[str, str] = {}
    backends = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": getattr(SDPBackend, "CUDNN_ATTENTION", None),
        "math": SDPBackend.MATH,
    }
    for name, backend in backends.items():
        if backend is None:
            results[name] = "not in this torch"
            continue
        try:
            with sdpa_kernel([backend]):
                torch.nn.functional.scaled_dot_product_attention(q, q, q)
            results[name] = "ok"
        except RuntimeError as exc:
            results[name] = str(exc).strip().splitlines()[0][:120] or type(exc).__name__
    return results


def _package_version(module: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return None
    dist = {"flash_attn": "flash-attn"}.get(module, module)
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "installed (version unknown)"


def diagnose() -> dict[str, Any]:
    """Everything ``transformers-fastpath doctor`` prints, as a JSON-safe dict."""
    import torch
    import transformers

    from ._version import __version__
    from .hardware import Hardware
    from .interception import bootstrap

    hw = Hardware.detect()
    devices = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            devices.append({"index": i, "name": props.name, "capability": f"{props.major}.{props.minor}",
                            "memory_gib": round(props.total_memory / 2**30, 1)})
    sdpa_device = "cuda" if torch.cuda.is_available() else "cpu"
    return {
        "versions": {"transformers-fastpath": __version__, "python": platform.python_version(),
                     "torch": torch.__version__, "transformers": transformers.__version__,
                     "cuda": torch.version.cuda},
        "hardware": hw.to_dict(),
        "hardware_summary": hw.describe(),
        "gpus": devices,
        "sdpa_backends": {"device": sdpa_device, **sdpa_backends_that_run(sdpa_device)},
        "fused_encoder_op": hasattr(torch, "_transformer_encoder_layer_fwd"),
        "packages": {name: _package_version(name) for name in OPTIONAL_PACKAGES},
        "bootstrap": bootstrap.status(),
    }


def render(report: dict[str, Any]) -> str:
    lines = ["transformers-fastpath doctor", ""]
    lines.append("versions:  " + ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v))
    lines.append(f"hardware:  {report['hardware_summary']}")
    for gpu in report["gpus"]:
        lines.append(f"  cuda:{gpu['index']}  {gpu['name']}  sm{gpu['capability'].replace('.', '')}  "
                     f"{gpu['memory_gib']} GiB")
    sdpa = dict(report["sdpa_backends"])
    device = sdpa.pop("device")
    lines.append(f"SDPA backends on {device}:")
    for name, result in sdpa.items():
        lines.append(f"  {name:<10} {'runs' if result == 'ok' else 'no: ' + result}")
    lines.append(f"fused encoder op (torch._transformer_encoder_layer_fwd): "
                 f"{'available' if report['fused_encoder_op'] else 'missing'}")
    lines.append("optional packages:")
    for name, version in report["packages"].items():
        lines.append(f"  {name:<13} {version or 'not installed'}")
    boot = report["bootstrap"]
    state = "off (" + boot["disabled_reason"] + ")" if boot["disabled_reason"] else (
        boot["mode"] if boot["booted"] else "not loaded (is the .pth installed?)")
    lines.append(f"start-up bootstrap: {state}")
    return "\n".join(lines)
