"""The one engine behind `llmbench gate` and `llmbench compare`: match two runs' trials,
judge every figure. `gate` decides (exit code 1 on a regression); `compare` shows the same
verdicts with more figures beside them (`detail`, never judged).

Trials are matched by identity (`config_hash`, identity.py: every setting that can change a
figure): a baseline trial is paired with the candidate trial of the same identity (of the
same trial id where several share it). A candidate trial of the same id but another
identity is "not compared", naming the keys that differ (`attn_implementation: sdpa →
eager`); when fewer than half of the baseline's trials find their identity in the
candidate, the runs are not comparable and `gate` refuses (GateInputError, exit code 2).
Each metric has a direction and a margin:

- Which time is gated: on a GPU, the wall-clock step time (which sets tokens/s). On the CPU
  accelerator, each step time divided by a fixed reference workload timed on the same ranks
  just before and after the window (`step_times_rel`, collect/reference.py): a shared
  machine's effective speed drifts by tens of percent between runs minutes apart (measured:
  docs/gates.md), and the ratio cancels that drift. The other times are shown
  and marked "reported". `time_basis` (wall, rel, cpu) forces one.
- Time-based figures use the rule of asv (airspeed velocity; `asv compare --factor`): a
  change counts only when it exceeds the margin AND the two sides differ significantly, at
  `alpha` (0.01: asv's p_threshold is 0.002 for many samples; here the replicates are 3 to
  8 a side, where 0.002 misses most 20% slowdowns: docs/gates.md). The test is Welch's t on the logs of replicates that
  are nearly independent (compare_time): the trial's rounds (independent windows,
  interleaved with the run's other trials; `--set rounds=N`) where both sides have 3 or
  more, else batch means of each window, which absorb the correlation between neighbouring
  steps but cannot see a level shift between runs: with one window a side, the margin is
  what stops that (the measured false-alarm rates: docs/gates.md). A test on the individual
  steps (asv's Mann-Whitney) would count correlated steps as independent replicates.
- On the CPU accelerator the run decides (run_verdict): a change common to most trials
  (uniform rule) or a change confined to a few trials, measured against the run's median
  change (confined rule).
- Counts that do not depend on time (model-state bytes, weight bytes, parameters) and
  figures with little noise (the trial's own peak memory: its peak less what its rank held
  when it began, so that on a CPU the process's own RSS does not hide it; on a CPU its margin
  is at least CPU_OWN_PEAK_FLOOR_BYTES, the RSS's own stray; final loss, perplexity) use the
  margin alone.
- A trial that was ok in the baseline and is not ok (or absent) in the candidate regresses.

The default margins come from measured noise (docs/gates.md); each can be set.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from .collect.stats import median, replicates, welch_log

@dataclass(frozen=True)
class Metric:
    """A gated figure: the record field, its label, its direction, how it is judged and its
    default margin. kind "time": per-step samples, margin AND significance (asv's rule);
    "count" and "level": the margin alone."""

    field: str
    label: str
    higher_is_better: bool
    kind: str
    margin: float


METRICS: list[Metric] = [
    Metric("step_times_s", "step time", False, "time", 0.10),
    Metric("step_times_rel", "step ÷ reference", False, "time", 0.15),
    Metric("step_cpu_s", "CPU s/step", False, "time", 0.20),
    Metric("step_cpu_rel", "CPU ÷ reference", False, "time", 0.15),
    Metric("model_state_bytes", "model-state bytes", False, "count", 0.01),
    Metric("trial_peak_mem_bytes", "trial's peak memory", False, "level", 0.10),
    # the tensors' own peak as torch's allocator counts it: a count, the same in every run of the
    # same configuration (docs/plan.md), so a 1% change is a change in what the trial allocates
    Metric("trial_allocated_peak_bytes", "tensors' peak memory", False, "count", 0.01),
    Metric("final_loss", "final loss", False, "level", 0.02),
    Metric("weight_bytes", "weight bytes", False, "count", 0.01),
    Metric("perplexity", "perplexity", False, "level", 0.02),
]
# the trial's own peak on the CPU accelerator (RSS above the process's) strays by an amount, not
# a fraction: over 12 identical runs of sweep zero (docs/gates.md) a trial's own peak spread by up
# to 20 MiB whatever its size (z3-mb4: 48-74 MiB, +37% at worst; z0-mb4: 146-150 MiB). Glibc's
# heap and the process's own pages decide it, not the trial's tensors. So on a CPU the margin is
# the default 10% or 32 MiB of the baseline, whichever is larger.
CPU_OWN_PEAK_FLOOR_BYTES = 32 * 2 ** 20
# where a record has no per-step samples (a CSV export): tokens/s by the margin alone
TOKENS_PER_S = Metric("tokens_per_s", "tokens/s", True, "level", METRICS[0].margin)
TIME_FIELDS = {"wall": "step_times_s", "rel": "step_times_rel", "cpu": "step_cpu_s", "cpu-rel": "step_cpu_rel"}
# shown by `compare` beside the judged figures, never judged (detail=True)
DETAIL = [Metric("tokens_per_s", "tokens/s", True, "detail", 0.0), Metric("mfu_vs_measured_peak", "MFU (measured peak)", True, "detail", 0.0),
          Metric("mfu", "MFU", True, "detail", 0.0), Metric("prefill_latency_s", "prefill s", False, "detail", 0.0)]


class GateInputError(ValueError):
    """A baseline or candidate that cannot be read (bad input: exit code 2)."""


@dataclass
class Verdict:
    trial_id: str
    metric: str
    baseline: object
    candidate: object
    change: float | None = None       # candidate / baseline − 1 (of the replicates' geometric means, for time)
    margin: float | None = None
    p_value: float | None = None
    test: str = ""
    outcome: str = "same"             # same, regression, improvement, not compared
    why: str = ""


@dataclass
class GateResult:
    verdicts: list[Verdict] = field(default_factory=list)

    def to_json(self, baseline: str, candidate: str) -> dict:
        """What `gate --json` and `compare --json` write: the decision and every verdict."""
        from dataclasses import asdict

        return {"baseline": baseline, "candidate": candidate, "comparable": True, "passed": self.passed,
                "regressions": self.regressed_trials,
                "verdicts": [asdict(v) for v in self.verdicts]}

    @property
    def regressions(self) -> list[Verdict]:
        return [v for v in self.verdicts if v.outcome == "regression"]

    @property
    def passed(self) -> bool:
        return not self.regressions

    @property
    def regressed_trials(self) -> list[str]:
        return sorted({v.trial_id for v in self.regressions})


def _records_from_file(path: Path) -> list[dict]:
    """`llmbench results --format json|csv|parquet` output."""
    suffix = path.suffix.lower()
    if suffix not in (".json", ".jsonl", ".ndjson", ".parquet", ".csv"):
        raise GateInputError(f"{path}: unknown format (use a run id, or a .json, .csv or .parquet export)")
    try:
        if suffix in (".json", ".jsonl", ".ndjson"):
            text = path.read_text()
            if text.lstrip().startswith("["):
                return json.loads(text)
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        import pandas as pd

        df = pd.read_parquet(path) if suffix == ".parquet" else pd.read_csv(path, dtype={"config_hash": str})
    except (OSError, ValueError) as e:
        raise GateInputError(f"{path}: cannot be read: {e}") from None
    records = []
    for row in df.to_dict("records"):
        for k, v in row.items():
            if isinstance(v, str) and v[:1] in "[{":
                try:
                    row[k] = json.loads(v)
                except ValueError:
                    pass
            elif isinstance(v, float) and math.isnan(v):
                row[k] = None
        records.append(row)
    return records


def parse_margins(items: list[str]) -> dict[str, float]:
    """`--margin METRIC=FRACTION` options → {metric: fraction}; GateInputError names a bad one."""
    known = {m.field for m in METRICS} | {m.label for m in METRICS} | {"run"}
    margins = {}
    for m in items:
        key, eq, val = m.partition("=")
        try:
            if not eq or key not in known:
                raise ValueError
            margins[key] = float(val)
        except ValueError:
            raise GateInputError(f"--margin {m}: use METRIC=FRACTION with METRIC one of "
                                 f"{', '.join(x.field for x in METRICS)}, run") from None
    return margins


def load_side(ref: str, db: Path | None) -> tuple[str, list[dict]]:
    """A run id (or unique prefix) in the store, or an exported results file."""
    path = Path(ref)
    if path.is_file():
        from .schema import migrate

        records = [migrate(r) for r in _records_from_file(path)]  # an export of an older version loads too
        name = str(path)
    else:
        from .store import Store

        if db is None or not Path(db).exists():
            raise GateInputError(f"{ref}: neither a file nor a run (no store at {db})")
        store = Store(db)
        run = store.run(ref)
        if run is None:
            raise GateInputError(f"{ref}: neither a file nor a run in {db}")
        records, name = store.trials(run["run_id"]), run["run_id"]
    if not records or not all("trial_id" in r and "status" in r for r in records):
        raise GateInputError(f"{ref}: holds no llmbench trial records")
    return name, records


def compare_time(a: list[float], b: list[float], alpha: float, rounds: tuple[int, int] = (1, 1),
                 shift: float = 1.0, slower: bool = False) -> tuple[float, float, float, float | None, str, bool]:
    """(baseline, candidate, change, p-value or None, which test, significant?) for
    lower-is-better per-step samples: the geometric means of the replicates on each side
    (collect/stats.replicates: the rounds where both have 3 or more, else batch means of each
    window) and Welch's t on their logs (stats.welch_log) that the ratio equals `shift` (1: no
    change; the common change of the run for the confined rule), two-sided or, `slower`,
    against a slowdown only. Below 6 steps a side: the medians, never significant."""
    ra, rb = replicates(a, rounds[0]), replicates(b, rounds[1])
    if ra and rb and ra[1].endswith("rounds") != rb[1].endswith("rounds"):  # rounds on one side only
        ra, rb = replicates(a), replicates(b)
    if not (ra and rb):
        ma, mb = median(a), median(b)
        return ma, mb, mb / ma - 1, None, "too few samples", False
    diff, p = welch_log(ra[0], rb[0], math.log(shift), greater=slower)
    base = math.exp(statistics.fmean(math.log(x) for x in ra[0]))
    kind = ra[1] if ra[1] == rb[1] else f"{ra[1]} vs {rb[1]}"
    return base, base * math.exp(diff), math.exp(diff) - 1, p, f"Welch t{' (one-sided)' if slower else ''}, {kind}", p < alpha


RUN_MARGIN = 0.15
ALPHA = 0.01  # the significance level of the time test (module docstring)
# the confined rule's margins: a trial's change beyond the run's common change must exceed
# CONFINED_ROUNDS where both sides have 3 or more rounds (the test on them then measures the
# trial's run-to-run noise), else CONFINED_ONE_WINDOW (one window cannot: the margin alone
# must exceed that noise). Both from the noise measured in docs/gates.md.
CONFINED_ROUNDS = 0.10
CONFINED_ONE_WINDOW = 0.60


def rounds_of(rec: dict) -> int:
    """The independent rounds a record's step lists hold (1 for a record before rounds)."""
    return int(rec.get("rounds_done") or 1)


def match(baseline: list[dict], candidate: list[dict]) -> list[tuple[dict, dict | None, list[str]]]:
    """Each baseline trial with its candidate: (baseline, candidate or None, keys that differ).
    The candidate of the same identity (identity.same), of the same trial id first, else one
    of that identity whose id the baseline does not use (a renamed trial); else the candidate
    of the same id, with what differs; else None (absent: it counts as not matching, so a
    candidate run that stopped part-way is refused as not comparable rather than judged)."""
    from .identity import differences, same

    by_id = {r["trial_id"]: r for r in candidate}
    base_ids = {r["trial_id"] for r in baseline}
    used: set[int] = set()
    pairs = []
    for b in baseline:
        c = by_id.get(b["trial_id"])
        if c is None or not same(b, c):
            alt = next((x for x in candidate if id(x) not in used and x["trial_id"] not in base_ids and same(b, x)), None)
            if alt is None:
                pairs.append((b, c, differences(b, c) if c is not None else []))
                continue
            c = alt
        used.add(id(c))
        pairs.append((b, c, []))
    return pairs


def comparable(pairs: list[tuple[dict, dict | None, list[str]]]) -> None:
    """GateInputError when fewer than half of the baseline's trials found their identity."""
    matched = [b for b, c, d in pairs if c is not None and not d]
    if pairs and len(matched) * 2 < len(pairs):
        unmatched = [f"{b['trial_id']}: " + ("; ".join(d[:3]) if c is not None else "absent")
                     for b, c, d in pairs if c is None or d][:4]
        raise GateInputError(f"only {len(matched)} of {len(pairs)} baseline trials have a candidate trial of the same "
                             f"configuration (config_hash), so the runs are not comparable: {', '.join(unmatched)}")


def gate(baseline: list[dict], candidate: list[dict], margins: dict[str, float] | None = None,
         alpha: float = ALPHA, time_basis: str = "auto", decide: str = "auto", detail: bool = False) -> GateResult:
    """Judge every matched trial; see the module docstring. `decide` says who decides on time:
    each trial (`trial`, the default on a GPU), or the whole run (`run`, the default on the CPU
    accelerator): the geometric mean over matched trials of the gated time's ratio must exceed
    the run margin with at least 3/4 of the trials moving the same way; per-trial time
    verdicts are then shown as advisory ("slower", "faster"). `detail` adds the DETAIL figures
    (outcome "reported"): what `compare` shows. GateInputError when the runs are not comparable."""
    margins = margins or {}
    pairs = match(baseline, candidate)
    comparable(pairs)
    out = GateResult()
    timed: list[Timed] = []
    for b, c, differs in pairs:
        unmatched = _configuration_verdict(b, differs) or _status_verdict(b, c)
        if unmatched:
            out.verdicts.append(unmatched)
            continue
        gated, cpu_run = gated_time(b, c, time_basis)
        metrics = METRICS if b.get("step_times_s") and c.get("step_times_s") else [TOKENS_PER_S, *METRICS]
        for m in metrics:
            va, vb = _value(b, m.field), _value(c, m.field)
            if va in (None, []) or vb in (None, []):
                if m.field == gated and TOKENS_PER_S not in metrics:
                    out.verdicts.append(Verdict(b["trial_id"], m.label, f"{len(va or [])} samples", f"{len(vb or [])} samples",
                                                outcome="not compared", why="no such samples in one of the runs"))
                continue
            if m.kind == "time" and m.field not in (gated, "step_times_s"):
                continue  # the other CPU-time views stay in the records; one gated time plus the wall time is shown
            default = m.margin
            if m.field == "trial_peak_mem_bytes" and cpu_run and va:
                default = max(m.margin, CPU_OWN_PEAK_FLOOR_BYTES / va)
            v = Verdict(b["trial_id"], m.label, va, vb, margin=margins.get(m.field, margins.get(m.label, default)))
            if m.kind == "time":
                rounds = (rounds_of(b), rounds_of(c))
                _judge_time(v, m, va, vb, alpha, gated, rounds)
                if m.field == gated:
                    timed.append(Timed(v, va, vb, rounds, cpu_run))
            else:
                _judge_level(v, m, va, vb)
            out.verdicts.append(v)
        if detail:
            out.verdicts += _detail(b, c, {m.field for m in metrics})
    run_level = decide == "run" or (decide == "auto" and timed and all(t.cpu_run for t in timed))
    if run_level and timed:
        out.verdicts.append(run_verdict(timed, margins.get("run", RUN_MARGIN), alpha))
    return out


def _value(r: dict, field: str):
    """A record's figure; the trial's own peak memory computed where a record predates it."""
    v = r.get(field)
    if v is None and field == "trial_peak_mem_bytes" and r.get("peak_mem_bytes") is not None:
        return max(0, r["peak_mem_bytes"] - (r.get("peak_mem_baseline_bytes") or 0))
    return v


@dataclass
class Timed:
    """A trial's gated time: its verdict, both sides' samples and rounds, whether on a CPU."""

    verdict: Verdict
    baseline: list[float]
    candidate: list[float]
    rounds: tuple[int, int]
    cpu_run: bool


def _detail(b: dict, c: dict, judged: set[str]) -> list[Verdict]:
    """The figures `compare` shows beside the judged ones: their change, no verdict."""
    out = []
    for m in DETAIL:
        va, vb = b.get(m.field), c.get(m.field)
        if m.field in judged or va is None or vb is None:
            continue
        out.append(Verdict(b["trial_id"], m.label, va, vb, change=vb / va - 1 if va else None, outcome="reported",
                           why="shown, not judged"))
    return out


def _status_verdict(b: dict, c: dict | None) -> Verdict | None:
    """A trial not ok on either side: not compared (baseline) or a regression (candidate)."""
    tid = b["trial_id"]
    if b["status"] != "ok":
        return Verdict(tid, "status", b["status"], c["status"] if c else "absent",
                       outcome="improvement" if c and c["status"] == "ok" else "not compared",
                       why="not ok in the baseline")
    if c is None or c["status"] != "ok":
        return Verdict(tid, "status", "ok", c["status"] if c else "absent", outcome="regression",
                       why=(c.get("error") or "")[:120] if c else "the candidate has no such trial")
    return None


def _configuration_verdict(b: dict, differs: list[str]) -> Verdict | None:
    """Same trial id, another identity: not compared, naming what differs."""
    if not differs:
        return None
    return Verdict(b["trial_id"], "configuration", "", "", outcome="not compared",
                   why="different configuration: " + "; ".join(differs[:6]) + (" ..." if len(differs) > 6 else ""))


def gated_time(b: dict, c: dict, time_basis: str) -> tuple[str, bool]:
    """(the time field gated for this pair, whether it ran on the CPU accelerator): `time_basis`
    if forced, else the reference ratio on a CPU (per-step CPU seconds are recorded there only)
    and the wall-clock step time elsewhere."""
    cpu_run = bool(b.get("step_cpu_s"))
    has_rel = bool(b.get("step_times_rel")) and bool(c.get("step_times_rel"))
    return TIME_FIELDS.get(time_basis) or ("step_times_rel" if cpu_run and has_rel else "step_times_s"), cpu_run


_NOT_GATED = {"step_times_rel": "see step ÷ reference", "step_cpu_rel": "see CPU ÷ reference",
              "step_cpu_s": "see CPU s/step", "step_times_s": "the wall-clock step time is gated"}


def _judge_time(v: Verdict, m: Metric, va: list[float], vb: list[float], alpha: float, gated: str,
                rounds: tuple[int, int]) -> None:
    """Per-step samples: the change beyond the margin AND significant (compare_time)."""
    v.baseline, v.candidate, v.change, v.p_value, v.test, sig = compare_time(va, vb, alpha, rounds)
    beyond = abs(v.change) > v.margin
    if m.field != gated:
        v.outcome, v.margin, v.why = "reported", None, "not gated: " + _NOT_GATED[gated]
    elif beyond and sig:
        v.outcome = "regression" if (v.change > 0) != m.higher_is_better else "improvement"
    elif beyond:
        v.why = "beyond the margin but not significant"
    elif sig:
        v.why = "significant but within the margin"


def _judge_level(v: Verdict, m: Metric, va: float, vb: float) -> None:
    """One value a side: the relative change against the margin alone."""
    v.change = vb / va - 1 if va else (0.0 if vb == va else math.inf)
    v.test = "margin" if m is not TOKENS_PER_S else "margin only (no per-step samples)"
    if abs(v.change) > v.margin:
        v.outcome = "regression" if (v.change > 0) != m.higher_is_better else "improvement"


def run_verdict(timed: list[Timed], margin: float, alpha: float = ALPHA) -> Verdict:
    """The run-level decision (the CPU default), by two rules; either makes a regression.

    - Uniform: the geometric mean of the matched trials' time ratios (candidate / baseline)
      exceeds `margin` with at least 3/4 of the trials slower (a sign-consistency check: a
      change in common code moves every trial, noise scatters).
    - Confined: a trial whose ratio, divided by the median ratio of the other trials (the
      change common to the run, which on a shared machine includes what the reference did not
      cancel; at least 2 other trials), exceeds CONFINED_ROUNDS tested on the rounds (where
      both sides have 3 or more) or CONFINED_ONE_WINDOW tested on the batch means of all its
      steps (whatever the rounds: a large regression is caught where the rounds are too few
      for their test; there, every candidate step slower than every baseline step also
      counts), and is significantly slower than that common change (compare_time
      with `shift`, one-sided: only a slowdown is looked for; at alpha / trials, Bonferroni's
      bound, since every trial is a chance of a false alarm): a regression confined to a few
      trials, which the uniform rule cannot see.

    The other per-trial verdicts become advice ("slower", "faster")."""
    ratios = [1 + t.verdict.change for t in timed]
    geo = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
    slower, faster = sum(r > 1 for r in ratios), sum(r < 1 for r in ratios)
    need = math.ceil(0.75 * len(ratios))
    confined = []
    for i, t in enumerate(timed):
        v = t.verdict
        if v.outcome in ("regression", "improvement"):  # per-trial verdicts become advice
            v.outcome = "slower" if v.outcome == "regression" else "faster"
            v.why = "advisory: the run-level row decides"
        others = ratios[:i] + ratios[i + 1:]
        if len(others) < 2:
            continue  # no common change to measure against
        common = median(others)
        # with rounds on both sides: beyond CONFINED_ROUNDS, tested on the rounds; and, whatever
        # the rounds, beyond CONFINED_ONE_WINDOW, tested on the batch means of all the steps
        # (a large regression is caught even where the rounds are too few for their test)
        tests = ([(CONFINED_ROUNDS, t.rounds)] if min(t.rounds) >= 3 else []) + [(CONFINED_ONE_WINDOW, (1, 1))]
        for limit, rounds in tests:
            change = compare_time(t.baseline, t.candidate, alpha / len(timed), rounds, common, slower=True)
            beyond = (1 + change[2]) / common - 1
            # past the large margin, a separation of the steps counts as well: every candidate
            # step slower than every baseline step (after the common change), which one stalled
            # step cannot produce and a noisy baseline window (few batch means) cannot hide
            separated = limit == CONFINED_ONE_WINDOW and min(t.candidate) / common > max(t.baseline)
            if beyond > limit and (change[5] or separated):
                v.outcome = "regression"
                v.why = (f"confined: {beyond:+.1%} beyond the other trials' median change ({common - 1:+.1%}), "
                         f"over {limit:.0%} and " + (f"significant ({change[4]})" if change[5] else "every step slower"))
                confined.append(v.trial_id)
                break
    uniform = geo - 1 > margin and slower >= need
    why = "; ".join((["uniform"] if uniform else []) + ([f"confined to {', '.join(confined)}"] if confined else []))
    outcome = "regression" if why else "improvement" if 1 - geo > margin and faster >= need else "same"
    return Verdict("(all trials)", f"{timed[0].verdict.metric}, geometric mean", f"{len(ratios)} trials",
                   f"{slower} slower, {faster} faster", change=geo - 1, margin=margin,
                   test=f"uniform: ≥{need} of {len(ratios)} the same way; confined: one trial beyond the median change",
                   outcome=outcome, why=why)
