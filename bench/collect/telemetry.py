"""GPU telemetry from NVML (nvidia-ml-py), sampled in the background during the timed window.

Absent GPUs or NVML: every field is empty and the reason is recorded; nothing fails. Both
samplers are collectors (collector.py): `stop()` returns `{"telemetry": {...}}`.
"""

from __future__ import annotations

import statistics
import threading
import time

from .collector import Base


class NoTelemetry(Base):
    """Where there is no NVIDIA GPU: nothing sampled, and the record says why."""

    def stop(self) -> dict:
        return {"telemetry": {"available": False, "reason": "no CUDA device: NVML telemetry applies to NVIDIA GPUs"}}


def telemetry_sampler(accelerator: str):
    """An NVML sampler of this rank's GPU (found by UUID: NVML ignores CUDA_VISIBLE_DEVICES), or NoTelemetry."""
    if accelerator != "cuda":
        return NoTelemetry()
    import torch

    index = torch.cuda.current_device()
    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    return NvmlSampler(index, uuid=f"GPU-{uuid}" if uuid else None)


class NvmlSampler(Base):
    """Samples one device every `interval_s`; energy from the device's counter (mJ) around the window."""

    def __init__(self, device_index: int, interval_s: float = 0.1, uuid: str | None = None):
        self.index, self.interval_s = device_index, interval_s
        self.samples: list[dict] = []
        self.reason: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._energy_start = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
            # NVML numbers devices ignoring CUDA_VISIBLE_DEVICES (which DeepSpeed's launcher sets
            # for --include); the UUID names the same physical device in both.
            self.handle = (pynvml.nvmlDeviceGetHandleByUUID(uuid) if uuid
                           else pynvml.nvmlDeviceGetHandleByIndex(device_index))
        except Exception as e:  # no driver, no GPU, no library
            self.nvml = self.handle = None
            self.reason = f"NVML unavailable: {type(e).__name__}: {e}"

    def _energy_mj(self):
        try:
            return self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
        except Exception:
            return None

    def _sample(self) -> dict:
        n, h = self.nvml, self.handle
        util = n.nvmlDeviceGetUtilizationRates(h)
        mem = n.nvmlDeviceGetMemoryInfo(h)
        return {
            "t": time.perf_counter(),
            "util_pct": util.gpu,
            "mem_used_bytes": mem.used,
            "power_w": n.nvmlDeviceGetPowerUsage(h) / 1000.0,
            "sm_clock_mhz": n.nvmlDeviceGetClockInfo(h, n.NVML_CLOCK_SM),
            "temp_c": n.nvmlDeviceGetTemperature(h, n.NVML_TEMPERATURE_GPU),
            "throttle_reasons": n.nvmlDeviceGetCurrentClocksThrottleReasons(h),
        }

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append(self._sample())
            except Exception as e:
                self.reason = f"NVML sampling failed: {e}"
                return
            self._stop.wait(self.interval_s)

    def start(self) -> None:
        if self.handle is None:
            return
        self._energy_start = self._energy_mj()
        self._thread = threading.Thread(target=self._run, daemon=True, name="llmbench-nvml")
        self._thread.start()

    def stop(self) -> dict:
        return {"telemetry": self.summary()}

    def summary(self) -> dict:
        """Summary of the window: means, maxima, the throttle reasons seen, energy in joules."""
        if self.handle is None:
            return {"available": False, "reason": self.reason}
        self._stop.set()
        if self._thread:
            self._thread.join()
        end = self._energy_mj()
        energy_j = (end - self._energy_start) / 1000.0 if end is not None and self._energy_start is not None else None
        s = self.samples
        out = {"available": bool(s), "reason": self.reason, "n_samples": len(s), "energy_j": energy_j}
        if s:
            throttles = 0
            for x in s:
                throttles |= x["throttle_reasons"]
            out.update(
                util_pct_mean=statistics.fmean(x["util_pct"] for x in s),
                mem_used_bytes_max=max(x["mem_used_bytes"] for x in s),
                power_w_mean=statistics.fmean(x["power_w"] for x in s),
                power_w_max=max(x["power_w"] for x in s),
                sm_clock_mhz_mean=statistics.fmean(x["sm_clock_mhz"] for x in s),
                temp_c_max=max(x["temp_c"] for x in s),
                throttle_reasons=throttle_names(self.nvml, throttles),
            )
        self._shutdown()
        return out

    def abort(self) -> None:
        """Stop sampling and release NVML, measuring nothing (safe before start)."""
        self._stop.set()
        if self._thread:
            self._thread.join()
        self._shutdown()

    def _shutdown(self) -> None:
        if self.nvml is not None:
            try:
                self.nvml.nvmlShutdown()
            except Exception:
                pass
            self.nvml = None


def throttle_names(nvml, mask: int) -> list[str]:
    names = []
    for attr in dir(nvml):
        if attr.startswith("nvmlClocksThrottleReason") and attr not in ("nvmlClocksThrottleReasonAll", "nvmlClocksThrottleReasonNone"):
            bit = getattr(nvml, attr)
            if isinstance(bit, int) and mask & bit:
                names.append(attr.removeprefix("nvmlClocksThrottleReason"))
    return sorted(names)
