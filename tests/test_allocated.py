"""The counting CPU allocator (collect/allocated.py) against independent counts: the bytes of
tensors of known sizes, and torch's profiler, which sees every CPU block through c10's own
reporter (ProfiledCPUMemoryReporter), a path the counter does not share."""

import numpy as np
import pytest
import torch

from llmbench.collect import allocated
from llmbench.models import build_config, build_model


@pytest.fixture(scope="module", autouse=True)
def counter():
    assert allocated.install(), allocated.error  # a C++ compiler is part of the test environment (DeepSpeed's JIT ops)


def test_counts_the_bytes_tensors_ask_for():
    c0 = allocated.current()
    allocated.reset_peak()
    a = torch.empty(1_000_003, dtype=torch.float32)
    b = torch.zeros(777, 13, dtype=torch.bfloat16)
    c = torch.ones(5, dtype=torch.int64)
    assert allocated.current() - c0 == 4 * 1_000_003 + 2 * 777 * 13 + 8 * 5
    del a
    assert allocated.current() - c0 == 2 * 777 * 13 + 8 * 5
    assert allocated.peak() - c0 == 4 * 1_000_003 + 2 * 777 * 13 + 8 * 5  # the peak stays where it was
    allocated.reset_peak()
    assert allocated.peak() == allocated.current()
    d = b.float()  # a new block, 4 bytes per element
    assert allocated.peak() - c0 == 2 * 777 * 13 + 8 * 5 + 4 * 777 * 13
    del b, c, d


def test_blocks_cross_to_numpy_and_back():
    """Blocks keep the base allocator's layout (data pointer == context): numpy views of a
    tensor, and tensors made from numpy arrays, behave as before."""
    c0 = allocated.current()
    t = torch.arange(10, dtype=torch.float64)
    view = t.numpy()
    view[0] = 42.0
    assert t[0].item() == 42.0
    u = torch.from_numpy(np.ones(1000))  # numpy's memory: not torch's allocator
    assert allocated.current() - c0 == 80
    del t, view, u
    assert allocated.current() == c0


def _profiler_peak(prof) -> int:
    """The live-bytes peak of the CPU blocks the profiler saw allocated in its window."""
    from torch._C._profiler import _EventType

    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu":
            events.append((e.start_time_ns, e.extra_fields.alloc_size > 0, e.extra_fields.ptr, e.extra_fields.alloc_size))
        stack.extend(e.children)
    live, total, peak = {}, 0, 0
    for _, _, ptr, size in sorted(events):
        if size > 0:
            live[ptr] = size
            total += size
            peak = max(peak, total)
        elif ptr in live:
            total -= live.pop(ptr)
    return peak


def test_a_training_step_peaks_where_the_profiler_says():
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    model = build_model(build_config("tiny", "llama", 64, "sdpa")).train()
    opt = torch.optim.AdamW(model.parameters())
    x = torch.randint(0, model.config.vocab_size, (4, 64))
    c0 = allocated.current()
    allocated.reset_peak()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for _ in range(2):  # the first step also allocates Adam's state
            model(input_ids=x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad()
    counted = allocated.peak() - c0
    seen = _profiler_peak(prof)
    assert seen > 8 * sum(p.numel() for p in model.parameters())  # fp32 weights' gradients and Adam's two moments, at least
    assert counted == pytest.approx(seen, rel=1e-3)
