"""Failure classes: decided before launch where DeepSpeed's accelerator can answer; otherwise
by exception type, and by one table of message patterns checked against the pinned libraries."""

import inspect

import torch

from llmbench.failures import PATTERNS, Diverged, Unsupported, classify, prelaunch_unsupported


def raised(fn) -> BaseException:
    try:
        fn()
    except BaseException as e:  # noqa: BLE001
        return e
    raise AssertionError("no exception")


def test_prelaunch_asks_deepspeeds_cpu_accelerator():
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

    dtypes = CPU_Accelerator().supported_dtypes()
    assert torch.float16 not in dtypes and torch.bfloat16 in dtypes
    reason = prelaunch_unsupported("fp16", "cpu")
    assert "fp16" in reason and "supported_dtypes" in reason
    assert prelaunch_unsupported("bf16", "cpu") is None and prelaunch_unsupported("fp32", "cpu") is None


def test_deepspeed_refusals_in_the_table_exist_in_the_pinned_deepspeed():
    """The messages matched are DeepSpeed's own, raised as the table says (source of the installed version)."""
    import deepspeed.ops.op_builder.cpu.no_impl as no_impl
    import deepspeed.runtime.engine as engine

    sources = inspect.getsource(engine) + inspect.getsource(no_impl)
    for cls, text, status, _ in PATTERNS:
        if "deepspeed" in _:
            assert f"raise {cls.__name__}(" in sources and text in sources, text
            line = next(ln for ln in sources.splitlines() if text in ln)
            assert f"raise {cls.__name__}(" in line, line


def test_torch_refusals_are_classified_from_real_errors():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(1, 1, 8, 8)

    def cudnn_on_cpu():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            torch.nn.functional.scaled_dot_product_attention(q, q, q)

    assert classify(raised(cudnn_on_cpu)) == "unsupported"
    assert classify(raised(lambda: torch.ones(2, dtype=torch.float8_e4m3fn) + 1)) == "unsupported"  # no kernel for the dtype
    assert classify(raised(lambda: torch.empty(2**62, dtype=torch.uint8))) == "oom"  # CPU allocator


def test_types_decide_before_messages():
    assert classify(Diverged("nan")) == "diverged"
    assert classify(Unsupported("no fp8 here")) == "unsupported"
    assert classify(MemoryError()) == "oom"
    assert classify(ValueError("Type fp16 is not supported on your device.")) == "unsupported"
    assert classify(ValueError("some other bad value")) == "failed"
    assert classify(RuntimeError("is not supported on your device")) == "failed"  # the type must match too


def test_not_implemented_error_of_a_library_is_unsupported_of_llmbench_a_bug(tmp_path, monkeypatch):
    import importlib.util

    import llmbench.failures as failures

    class Base(torch.nn.Module):
        pass

    assert classify(raised(lambda: Base()(torch.ones(1)))) == "unsupported"  # torch's Module.forward stub
    # the same exception from a `raise` line of llmbench's own code (a package folder, here a
    # stand-in for bench/) is a bug: `failed`; a torch op called from that code is not
    pkg = tmp_path / "bench"
    pkg.mkdir()
    (pkg / "mod.py").write_text("import torch\n\n\ndef todo():\n    raise NotImplementedError('not written yet')\n\n\n"
                                "def op():\n    return torch.ones(2, dtype=torch.float8_e4m3fn) + 1\n")
    spec = importlib.util.spec_from_file_location("standin_mod", pkg / "mod.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(failures, "_PACKAGE", pkg.resolve())
    assert classify(raised(mod.todo)) == "failed"
    assert classify(raised(mod.op)) == "unsupported"
