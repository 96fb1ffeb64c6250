"""A torch.profiler trace of a few steps after the window (`llmbench sweep --trace`), as a
collector (collector.py): `stop()` writes the Chrome trace and returns `{"trace": path}`."""

from __future__ import annotations

from .collector import Base


class Profile(Base):
    def __init__(self, path: str, device_type: str) -> None:
        self.path, self.device_type = path, device_type

    def start(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device_type == "cuda" else [])
        self.prof = profile(activities=acts)
        self.prof.__enter__()

    prof = None

    def stop(self) -> dict:
        self.prof.__exit__(None, None, None)
        self.prof.export_chrome_trace(self.path)
        return {"trace": self.path}

    def abort(self) -> None:
        """Close the profiler without writing a trace."""
        if self.prof is not None:
            self.prof.__exit__(None, None, None)
            self.prof = None
