"""What we run on: the accelerator the driver will use, and the environment a trial records."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

from . import __version__
from .precision import Capabilities, auto_precision, describe, detect_capabilities, native_bf16


@dataclass(frozen=True)
class Hardware:
    """The embedded default when no GPU is visible: DeepSpeed's CPU accelerator, gloo, 2 ranks."""

    accelerator: str  # "cuda" or "cpu"
    comm_backend: str  # "nccl" or "gloo"
    world_size: int
    device_name: str
    device_memory_bytes: int
    cpu_cores: int
    caps: Capabilities | None = None  # what `precision: auto` is decided from (llmbench.precision)

    @property
    def precision_auto(self) -> str:
        """What `precision: auto` resolves to on this hardware."""
        return auto_precision(self.caps or Capabilities(self.accelerator))

    @property
    def bf16_native(self) -> bool:
        return native_bf16(self.caps or Capabilities(self.accelerator))

    @property
    def default_model(self) -> str:
        if self.accelerator == "cpu":
            return "tiny"
        # Largest catalog size whose stage-0 model states (16 bytes/param, ZeRO paper) take
        # at most half a device, so every ZeRO stage of the sweep fits; capped at 1.3b so the
        # default sweep stays minutes long.
        budget = self.device_memory_bytes / 2 / 16
        for name, n in (("1.3b", 1.36e9), ("760m", 7.8e8), ("350m", 3.7e8), ("125m", 1.3e8)):
            if n <= budget:
                return name
        return "tiny"

    @property
    def threads_per_rank(self) -> int:
        """On a CPU each rank gets its share of the cores; oversubscription turns timings into noise."""
        return max(1, self.cpu_cores // max(1, self.world_size)) if self.accelerator == "cpu" else max(1, self.cpu_cores // 8)


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def detect_hardware(force_cpu: bool = False) -> Hardware:
    import torch

    cores = usable_cores()
    if not force_cpu and torch.cuda.is_available() and torch.cuda.device_count() > 0:
        props = torch.cuda.get_device_properties(0)
        return Hardware("cuda", "nccl", torch.cuda.device_count(), props.name, props.total_memory, cores,
                        detect_capabilities("cuda"))
    import psutil

    return Hardware("cpu", "gloo", 2, cpu_model_name(), psutil.virtual_memory().total, cores, detect_capabilities("cpu"))


def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def git_commit() -> str | None:
    """The commit of the llmbench code being measured (None for an installed wheel)."""
    here = Path(__file__).resolve().parent
    try:
        top = subprocess.run(["git", "-C", str(here), "rev-parse", "--show-toplevel"], capture_output=True, text=True, timeout=5)
        if top.returncode != 0 or Path(top.stdout.strip()).resolve() != here.parent:
            return None  # an installed copy, perhaps inside some other checkout: not our commit
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def environment(hw: Hardware) -> dict:
    """Versions and devices, recorded with every run and every trial."""
    import torch

    env = {
        "llmbench": __version__,
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "deepspeed": _version("deepspeed"),
        "transformers": _version("transformers"),
        "cuda": torch.version.cuda,
        "nccl": None,
        "host": socket.gethostname(),
        "platform": platform.platform(),
        **{k: v for k, v in asdict(hw).items() if k != "caps"},
        "cpu_capability": hw.caps.cpu_capability if hw.caps else None,
        "bf16_native": hw.bf16_native,
        "bf16_support": describe(hw.caps) if hw.caps else None,
        "precision_auto": hw.precision_auto,
    }
    if hw.accelerator == "cuda":
        env["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        env["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        try:
            import pynvml

            pynvml.nvmlInit()
            env["driver"] = pynvml.nvmlSystemGetDriverVersion()
            pynvml.nvmlShutdown()
        except Exception as e:  # NVML absent: recorded, not fatal
            env["driver"] = f"unavailable: {e}"
    else:
        env["devices"] = [env["device_name"]] * hw.world_size
    return env


def matmul_rates(hw: Hardware) -> dict[str, dict]:
    """Measured matmul TFLOP/s per precision on one rank's share of the device, at the default
    model's linear-layer GEMMs (llmbench.collect.peak, cached): what `llmbench env` shows so a
    user sees at once whether bf16 is fast here."""
    import torch

    from .collect.peak import model_peak
    from .models import build_config

    cuda = hw.accelerator == "cuda"
    before = torch.get_num_threads()
    torch.set_num_threads(hw.threads_per_rank)
    try:
        seq, mb = (1024, 8) if cuda else (128, 4)
        config = build_config(hw.default_model, "llama", seq)
        out = {}
        for p in (("bf16", "fp16", "fp32") if cuda else ("fp32", "bf16")):
            # the device name as a rank records it (worker.py), so trials reuse this measurement
            name = hw.device_name if cuda else f"cpu ({hw.device_name})"
            peak = model_peak(config, mb, seq, p, "cuda:0" if cuda else "cpu", name)
            out[p] = {"tflops": peak.tflops, "source": peak.source, "probe_s": peak.probe_s,
                      "shapes": f"{hw.default_model} model, {mb}×{seq} tokens", "threads": torch.get_num_threads()}
        return out
    finally:
        torch.set_num_threads(before)
