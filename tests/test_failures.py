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


# oneDNN's ISA ceiling (its documented ONEDNN_MAX_CPU_ISA): AVX2 makes this machine answer as
# an AVX2-only CPU does, without fp16 (tests/test_cli.py uses it the same way)
AVX2_ONLY = {"ONEDNN_MAX_CPU_ISA": "AVX2"}


def test_prelaunch_asks_deepspeeds_cpu_accelerator():
    """DeepSpeed's CPU accelerator offers fp16 where oneDNN computes it (AVX512-FP16, AMX-FP16:
    `torch.ops.mkldnn._is_mkldnn_fp16_supported()`, asked here independently); the prelaunch
    check follows it on whichever CPU runs the test."""
    fp16_here = torch.ops.mkldnn._is_mkldnn_fp16_supported()
    reason = prelaunch_unsupported("fp16", "cpu")
    if fp16_here:
        assert reason is None
    else:
        assert "fp16" in reason and "supported_dtypes" in reason
    assert prelaunch_unsupported("bf16", "cpu") is None and prelaunch_unsupported("fp32", "cpu") is None


def test_prelaunch_refuses_fp16_on_a_cpu_without_it():
    """The same check in a process whose oneDNN is capped at AVX2: fp16 refused, bf16 and fp32 not."""
    import os
    import subprocess
    import sys

    code = ("import torch; from llmbench.failures import prelaunch_unsupported as u; "
            "print(torch.ops.mkldnn._is_mkldnn_fp16_supported()); print(u('fp16', 'cpu')); "
            "print(u('bf16', 'cpu'), u('fp32', 'cpu'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, **AVX2_ONLY)).stdout.splitlines()
    assert out[0] == "False"
    assert "fp16" in out[1] and "supported_dtypes" in out[1]
    assert out[2] == "None None"


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
