"""One collector protocol (collect/collector.py), typed rank results (rank_result.py) and the
failure and teardown path every trial shares (failures.recorded)."""

import gc
import math
import weakref

import pytest
import torch

from llmbench.collect.collector import Base, Collector, observe


class Log(Base):
    """Writes each call it gets to a shared log."""

    def __init__(self, name: str, log: list):
        self.name, self.log = name, log

    def start(self):
        self.log.append(("start", self.name))

    def begin_step(self):
        self.log.append(("begin", self.name))

    def end_step(self):
        self.log.append(("end", self.name))

    def stop(self):
        self.log.append(("stop", self.name))
        return {self.name: len(self.log)}


class Raises(Log):
    def stop(self):
        super().stop()
        raise RuntimeError("stop failed")

    def abort(self):
        self.log.append(("abort", self.name))


class Aborts(Log):
    def abort(self):
        self.log.append(("abort", self.name))


def test_observe_nests_collectors_and_the_last_is_innermost():
    log: list = []
    outs, fields = observe([Log("a", log), Log("b", log)], lambda i: log.append(("step", i)) or i * 10,
                           range(2), lambda: log.append(("sync", None)))
    assert outs == [0, 10]
    step = [("begin", "a"), ("begin", "b"), None, ("end", "b"), ("end", "a")]
    expect = [("start", "a"), ("start", "b")]
    for i in range(2):
        expect += [x if x else ("step", i) for x in step]
    expect += [("sync", None), ("stop", "b"), ("stop", "a")]
    assert log == expect
    assert set(fields) == {"a", "b"}


def test_a_failing_step_aborts_every_collector_and_propagates():
    """The comms recorder wraps deepspeed.comm's functions while started: a step that fails
    must not leave the wrappers in a warm worker."""
    import deepspeed.comm as dist

    from llmbench.collect.comms import CommsRecorder

    original = dist.all_reduce
    log: list = []

    def fail(i):
        assert dist.all_reduce is not original  # wrapped while the step runs
        raise RuntimeError("step failed")

    with pytest.raises(RuntimeError, match="step failed"):
        observe([Aborts("a", log), CommsRecorder(2, "cpu")], fail, range(3), lambda: None)
    assert dist.all_reduce is original
    assert log[-1] == ("abort", "a") and ("stop", "a") not in log  # released, nothing measured


def test_collectors_on_this_device_fill_only_rank_result_fields():
    """Each collector a CPU rank builds, started, given a step and stopped, returns fields the
    rank result has (a name it lacks would fail the trial at the driver); aborting one that
    never started is safe."""
    from llmbench.collect.comms import CommsRecorder
    from llmbench.collect.memory import peak_memory
    from llmbench.collect.reference import ReferenceSpeed
    from llmbench.collect.telemetry import telemetry_sampler
    from llmbench.collect.timing import step_timer
    from llmbench.rank_result import RankResult

    known = {f.alias or name for name, f in RankResult.model_fields.items()} | set(RankResult.model_fields)
    for make in (lambda: peak_memory("cpu"), lambda: ReferenceSpeed("cpu"), lambda: telemetry_sampler("cpu"),
                 lambda: step_timer("cpu"), lambda: CommsRecorder(2, "cpu")):
        make().abort()
        outs, fields = observe([make()], lambda i: i, range(2), lambda: None)
        assert fields and set(fields) <= known, fields
        RankResult().fill(fields)  # and of the right types
    assert isinstance(step_timer("cpu"), Collector)


def test_a_collector_whose_stop_fails_still_lets_the_others_release():
    """Stops run innermost first: when one fails, the outer ones not yet stopped are aborted."""
    log: list = []
    with pytest.raises(RuntimeError, match="stop failed"):
        observe([Aborts("outer", log), Raises("inner", log)], lambda i: i, range(1), lambda: None)
    assert log[-3:] == [("stop", "inner"), ("abort", "inner"), ("abort", "outer")]


def test_peak_memory_sees_an_allocation_inside_its_span_only():
    """The RSS high-water mark is reset at start (proc(5) clear_refs): a 200 MB buffer touched
    and freed before start is not in the peak, one touched after start is."""
    from llmbench.collect.memory import PeakMemory

    big = torch.ones(50_000_000)  # 200 MB, touched
    del big
    gc.collect()
    from llmbench.device import release_host_memory

    release_host_memory()
    m = PeakMemory()
    m.start()
    if not m.hwm_reset:
        pytest.skip("this kernel cannot reset the RSS high-water mark")
    before = m.stop()["memory"]
    assert before["peak_mem_bytes"] - before["baseline_bytes"] < 100e6
    m.start()
    big = torch.ones(50_000_000)
    del big
    after = m.stop()["memory"]
    assert after["peak_mem_bytes"] - after["baseline_bytes"] > 150e6


def test_rank_results_refuse_keys_the_other_end_does_not_know():
    import json

    from pydantic import ValidationError

    from llmbench.rank_result import InferenceResult, RankResult

    r = RankResult(rank=1, losses=[1.0, float("nan")], grad_norms=[None, 2.0])
    r.transformers_config = {"hidden_size": 8}
    wire = json.loads(json.dumps({"type": "result", "trial_id": "t", **r.message()}))  # as the channel sends it
    assert wire["model_config"] == {"hidden_size": 8}  # the record's name for it
    back = RankResult.from_message(wire)
    assert back.rank == 1 and back.grad_norms == [None, 2.0] and back.transformers_config == {"hidden_size": 8}
    assert back.losses[0] == 1.0 and math.isnan(back.losses[1])  # a diverged trial's NaN crosses as NaN
    with pytest.raises(ValidationError, match="bogus"):
        RankResult.from_message({**wire, "bogus": 1})
    with pytest.raises(ValueError):
        r.fill({"bogus": 1})
    with pytest.raises(ValidationError):  # assignments are checked on the rank, where the cause is known
        r.fill({"tokens": "many"})
    with pytest.raises(ValidationError):  # a training result is not an inference result
        InferenceResult.from_message(wire)


def test_a_rank_result_that_does_not_parse_is_a_failed_trial_and_the_sweep_goes_on():
    """The driver's side: _run_one records the mismatch as `failed` (an llmbench bug) instead of raising."""
    from llmbench.launch.pool import PoolRun
    from llmbench.record import base_record
    from llmbench.spec import TrialSpec
    from llmbench.sweep import PlannedTrial, _run_one

    class Pool:
        pids: dict = {}

        def run(self, *a, **k):
            return PoolRun("reported", [{"type": "result", "trial_id": "t", "rank": 0, "status": "ok", "bogus": 1}])

    spec = TrialSpec(model="tiny", precision="fp32")
    t = PlannedTrial(trial_id="t", spec=spec, stats=None)
    rec = base_record("run", "t", spec, None, {})
    _run_one(Pool(), t, rec, None, None)
    assert rec["status"] == "failed" and "does not fit RankResult" in rec["error"] and "bogus" in rec["error"]


def test_recorded_keeps_the_failure_frees_its_frames_then_tears_down():
    """A failure is recorded, not raised; the failed frames' locals (a model, an engine) are
    gone before the teardown runs, so the teardown really frees them."""
    from llmbench.collect.memory import PeakMemory
    from llmbench.failures import recorded
    from llmbench.rank_result import RankResult

    class Model:
        pass

    seen: dict = {}

    def build_and_fail():
        model = Model()
        seen["ref"] = weakref.ref(model)
        raise ValueError("Type fp16 is not supported on your device.")  # DeepSpeed's refusal

    def teardown():
        seen["alive_at_teardown"] = seen["ref"]() is not None

    res = RankResult()
    with recorded(res, PeakMemory(), teardown):
        build_and_fail()
    assert res.status == "unsupported" and "fp16" in res.error and "Traceback" in res.error
    assert seen["alive_at_teardown"] is False
    assert res.memory["peak_mem_bytes"] > 0 and res.teardown_s >= 0

    torn: list = []
    with pytest.raises(KeyboardInterrupt):
        with recorded(RankResult(), PeakMemory(), lambda: torn.append(1)):
            raise KeyboardInterrupt
    assert torn == [1]  # Ctrl-C is not recorded as a failure, but the trial is still torn down


def test_a_failed_teardown_is_recorded_not_raised():
    from llmbench.collect.memory import PeakMemory
    from llmbench.failures import recorded
    from llmbench.rank_result import RankResult

    def teardown():
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    res = RankResult()
    with recorded(res, PeakMemory(), teardown):
        pass
    assert res.status == "failed" and "teardown failed" in res.error and "illegal memory access" in res.error


def test_notes_survive_a_refusal_before_the_build():
    """The checks before the build append their notes to the result even when they then refuse."""
    from llmbench.failures import Unsupported, check_runnable
    from llmbench.spec import TrialSpec

    notes: list = []
    with pytest.raises(Unsupported, match="fp8"):
        check_runnable(TrialSpec(model="tiny", precision="fp32", quant="fp8"), "cpu", 1, notes)
    notes2: list = []
    check_runnable(TrialSpec(model="tiny", precision="fp32", quant="zeropp", zero_stage=3), "cpu", 1, notes2)
    assert any("zero_quantized_gradients" in n for n in notes2) and any("hpz" in n for n in notes2)
