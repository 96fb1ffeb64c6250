"""Start ranks with DeepSpeed's own launcher and keep them as a warm pool across trials.

Four parts: `control` (the authenticated messages between the driver and its ranks),
`process` (the launcher's command line and process tree, and the host state a killed launch
leaves), `slurm` (srun inside an allocation), and `pool` (a warm pool of ranks that runs jobs
on them; `run()` returns a `PoolRun`).
"""

from .control import DriverChannel, RankChannel
from .pool import PoolRun, RankPool
from .process import (LauncherProcess, LaunchOptions, clear_stale_extension_locks, extensions_dir, free_port,
                      launch_world_size, release_shm_buffers, resolve_resources)

__all__ = ["DriverChannel", "RankChannel", "PoolRun", "RankPool", "LauncherProcess", "LaunchOptions",
           "clear_stale_extension_locks", "extensions_dir", "free_port", "launch_world_size", "release_shm_buffers",
           "resolve_resources"]
