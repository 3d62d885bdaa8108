"""What this machine supports: devices, SDPA backends that really run, optional kernels and packages."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
from typing import Any

__all__ = ["bootstrap_meaning", "diagnose", "first_sentences", "sdpa_backends_that_run"]

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
            results[name] = first_sentences(str(exc)) or type(exc).__name__
    return results


def first_sentences(text: str, limit: int = 240) -> str:
    """The first line of ``text``, whole when it fits ``limit``; else cut after the last sentence
    (or, with none, the last word) that fits, with an ellipsis: never mid-sentence without one."""
    line = text.strip().splitlines()[0].strip() if text.strip() else ""
    if len(line) <= limit:
        return line
    head = line[:limit]
    end = max(head.rfind(". "), head.rfind("; "), head.rfind(": "))
    if end > limit // 3:
        return head[:end + 1] + " ..."
    return head.rsplit(" ", 1)[0] + " ..."


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
    from .interception import bootstrap
    from .planning.hardware import Hardware

    hw = Hardware.detect()
    boot = bootstrap.status()
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
        "bootstrap": {**boot, "meaning": bootstrap_meaning(boot)},
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
    lines.append(f"start-up bootstrap: {report['bootstrap']['meaning']}")
    return "\n".join(lines)


def bootstrap_meaning(boot: dict[str, Any]) -> str:
    """The start-up bootstrap's state in this process, and what it means for a user."""
    if not boot.get("booted"):
        return ("not loaded: the transformers_fastpath.pth start-up hook did not run in this interpreter, so "
                "transformers does not accept fastpath= (reinstall the package here: pip install "
                "transformers-fastpath; or call fp.install() / fp.pipeline(), which patch explicitly)")
    if boot.get("disabled_reason"):
        return (f"off ({boot['disabled_reason']}): fastpath never turns on by itself in this process; "
                "a fastpath= argument is removed with one warning and the call runs as plain transformers "
                "(fp.install() / fp.enabled() / fp.pipeline() still opt in explicitly)")
    if boot.get("mode") == "install":
        return ("on for the whole process (TRANSFORMERS_FASTPATH=1 or a policy path): every from_pretrained and "
                "pipeline() uses fastpath, as after fp.install(); fastpath=False turns it off per call")
    return ("passive: transformers accepts fastpath= per call; no process-wide opt-in "
            "(set TRANSFORMERS_FASTPATH=1 for that, or call fp.install())")
