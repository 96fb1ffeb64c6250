"""llmbench: measure LLM training with real DeepSpeed and say which configuration to use."""

import logging as _logging

__version__ = "0.1.0"

# A quiet console: no line the user did not cause. Importing transformers' model code imports
# torchao, which logs a warning per optional CUDA extension it cannot load on this machine
# ("Failed to load …_C_mxfp8….so") and registers two enums that torch's pytree warns about
# (torch/utils/_pytree.py, "… is an Enum subclass …"). Neither concerns a benchmark; silence
# those two loggers at the source (errors still show).
for _name in ("torchao", "torch.utils._pytree"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)
