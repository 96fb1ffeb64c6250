"""Hostile text and paths (docs/faults.md): markup, ANSI escape sequences, bidi overrides and
very long strings in a label, a suite name, a model path, a trial's error and the stored
environment; names with `../` used to build files. Escaped in HTML, neutralised on the terminal,
cut where long; every file under the chosen output folder, with a safe name."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import cli

ESC, BIDI = "\x1b", "\u202e"
MARKUP = "[red]red[/red][/bogus]"  # rich would colour the first and raise on the second
HTML = "<img src=x onerror=alert(1)><script>alert(1)</script>"
LONG = "L" * 5000


def _hostile(tag: str) -> str:
    # (30 levels of ../ reach / from any folder: an escape would land in /tmp/llmbench-escape-*)
    return f"{tag}{HTML}{ESC}[2J{ESC}]0;pwned\x07{MARKUP}{BIDI}gnp.exe {'../' * 30}tmp/llmbench-escape-{tag}"


def _assert_neutral(text: str) -> None:
    assert ESC not in text and "\x07" not in text and BIDI not in text, repr(text[:2000])
    assert "L" * 500 not in text  # cut where long
    assert "Traceback" not in text


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


def test_a_sweep_with_hostile_names_everywhere(tmp_path):
    """A real one-trial sweep whose suite name, label and model directory (so its trial id)
    carry markup, escape sequences, `../` and 5,000 characters, into an output folder with
    spaces and quotes, with --profile (trace files named by trial): the terminal shows them
    neutralised, the report escaped, every file lands under --out, and the store keeps them
    exactly as given."""
    from transformers import LlamaConfig

    model = tmp_path / f"m {_hostile('model')}".replace("/", "|")  # (a folder's name holds no '/'; its path does)
    model.mkdir()
    LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, max_position_embeddings=64, tie_word_embeddings=False).to_json_file(model / "config.json")
    suite_name = _hostile("suite") + LONG
    suite = tmp_path / "hostile.yaml"
    suite.write_text(json.dumps({"name": suite_name, "fixed": {"precision": "fp32", "seq_len": 32, "micro_batch": 2,
                                                               "warmup_steps": 2, "steps": 2, "breakdown_steps": 0},
                                 "grid": {"model": [str(model)]}}))
    label = _hostile("label") + LONG
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    out = cwd / "out dir ü '$(touch x)'"
    before = _files(tmp_path)
    p = subprocess.run([sys.executable, "-m", "llmbench.cli", "sweep", str(suite), "--label", label, "--profile",
                        "--db", str(out / "s.db"), "--out", str(out)], capture_output=True, text=True, cwd=cwd,
                       timeout=600, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    _assert_neutral(p.stdout + p.stderr)
    assert "more characters]" in p.stdout  # the trial id (the model's path) cut on the terminal
    new = _files(tmp_path) - before - {out}
    assert new and all(out in f.parents for f in new), sorted(map(str, new - {f for f in new if out in f.parents}))
    assert not list(Path("/tmp").glob("llmbench-escape-*"))
    for f in new:
        assert ".." not in f.relative_to(out).parts and all(ESC not in part for part in f.relative_to(out).parts), f
    traces = list((out / "traces").rglob("*.json"))
    assert len(traces) == 2, traces  # one per rank, named safely
    html = next(out.glob("report-*.html")).read_text()
    assert "<script>alert" not in html and "<img src=x" not in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    assert ESC not in html and BIDI not in html and "\\x1b[2J" in html and "more characters]" in html
    assert LONG not in html
    rec = json.loads(cli("results", "--db", str(out / "s.db"), "--format", "json").stdout)
    from llmbench.store import Store

    stored = Store(out / "s.db").runs()[0]
    assert stored["label"] == label and stored["suite"] == suite_name  # kept exactly as given
    assert rec["model"] == str(model) and rec["status"] == "ok"


def test_hostile_records_are_neutralised_in_every_view(zero_sweep, tmp_path):
    """The session's records stored again with a hostile error, notes, label and environment (as
    a run on a strange machine, or an exception quoting anything, would leave them): `results`,
    `best`, `gate` and `report` show them neutralised and cut; the HTML escapes them."""
    from llmbench.store import Store

    db = tmp_path / "h.db"
    store = Store(db)
    run_env = dict(zero_sweep["records"][0]["env"], host=_hostile("host"), device_name=_hostile("device") + LONG)
    for run_id in ("base", "cand"):
        store.create_run(run_id, _hostile("suite"), _hostile("label") + LONG, run_env, {})
        for seq, rec in enumerate(zero_sweep["records"]):
            rec = dict(rec, run_id=run_id, env=run_env, notes=list(rec["notes"]) + [_hostile("note") + LONG])
            if seq == 0:
                rec["trial_id"] = f"{MARKUP}{ESC}[5m-z0"
            if seq == 1:
                rec.update(status="failed", error=f"RuntimeError: {_hostile('error')}{LONG}\n  at line 1\n{MARKUP} the last line")
            store.add_trial(rec, seq)
        store.finish_run(run_id, "finished", {})
    store.close()
    exported = cli("results", "base", "--db", str(db), "--format", "json").stdout  # data: escaped by JSON, never cut
    assert ESC not in exported and BIDI not in exported
    assert json.loads(exported.splitlines()[1])["error"].startswith(f"RuntimeError: {_hostile('error')}{LONG}")
    for args in (["results"], ["results", "base"], ["best"],
                 ["gate", "base", "cand"], ["report", "base", "--out", str(tmp_path / "r")], ["runs"]):
        p = cli(*args, "--db", str(db), check=False)
        assert p.returncode in (0, 1), (args, p.stdout[-2000:], p.stderr[-2000:])
        _assert_neutral(p.stdout + p.stderr)
        if args == ["results", "base"]:
            assert "[red]red[/red][/bogus]\\x1b[5m-z0" in p.stdout, p.stdout  # as written, not read as markup
    html = next((tmp_path / "r").glob("report-*.html")).read_text()
    assert "<script>alert" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert ESC not in html and BIDI not in html and LONG not in html
    assert "[/bogus] the last line</pre>" in html  # a long error keeps its end, where the error is
    from html import unescape

    start = html.rindex("<pre>{")  # the environment, last on the page
    env = json.loads(unescape(html[start + 5:html.index("</pre>", start)]))  # whole and valid, each value cut
    assert env["device_name"].startswith("device<img") and "more characters]" in env["device_name"]
    assert env["device_name"].endswith("L" * 100) and "\\x1b[2J" in env["device_name"]  # its end kept, escapes shown


@pytest.mark.parametrize("args, needle", [
    (["sweep", "zero", "--set", f"model=/no/{ESC}[2Jsuch{MARKUP}"], "--set model=/no/\\x1b[2Jsuch"),
    (["sweep", "zero", "--set", f"model=/no/such{MARKUP}{BIDI}"], "unknown model"),
    (["sweep", "zero", "--run-id", "../../etc"], "--run-id"),
    (["sweep", "zero", "--run-id", f"r{ESC}[31m"], "--run-id"),
    (["results", f"no{ESC}[2J-such{MARKUP}"], "run 'no\\x1b[2J-such[red]red[/red][/bogus]' not found"),
])
def test_hostile_bad_input_is_one_neutral_line(args, needle, tmp_path):
    db = tmp_path / "x.db"
    if args[0] == "results":
        from llmbench.store import Store

        Store(db).close()
    p = cli(*args, "--db", str(db), *(["--out", str(tmp_path / "out")] if args[0] == "sweep" else []), check=False)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1 and needle in lines[0], p.stderr
    _assert_neutral(p.stdout + p.stderr)
    if MARKUP in " ".join(args):
        assert "[/bogus]" in lines[0]
    assert not (tmp_path / "out").exists()
