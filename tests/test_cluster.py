"""Beyond one machine, for real: two SSH "nodes" on loopback driven by DeepSpeed's PDSH runner,
a one-node SLURM (slurmctld, slurmd, munge) on localhost, the authenticated control channel,
and the results folder that shards and array tasks write and one writer merges.

The servers are started here by tests/cluster/*.sh (loopback addresses, throwaway keys and
configs under a temporary folder) and stopped after. Under CI=true a server that cannot
start fails its tests; elsewhere they skip with the reason.
"""

import json
import os
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import cli, llmbench

CLUSTER = Path(__file__).resolve().parent / "cluster"
ROOT = Path(__file__).resolve().parents[1]


def _start(script: str, folder: Path) -> dict:
    """Start a loopback server with tests/cluster/SCRIPT; the environment its one `export` line sets."""
    p = subprocess.run(["bash", str(CLUSTER / script), "start", str(folder)], capture_output=True, text=True, timeout=120)
    if p.returncode != 0:
        why = f"{script} could not start its servers: {p.stderr.strip().splitlines()[-1] if p.stderr.strip() else p.returncode}"
        if os.environ.get("CI"):
            pytest.fail(why + "\n" + p.stderr[-3000:])
        pytest.skip(why)
    name, _, value = p.stdout.strip().removeprefix("export ").partition("=")
    return {name: value}


@pytest.fixture(scope="module")
def ssh_nodes(tmp_path_factory):
    """Two nodes, llmbench-node0 (127.0.0.1) and llmbench-node1 (127.0.0.2), one slot each, over a private sshd."""
    folder = tmp_path_factory.mktemp("sshd")
    env = _start("sshd-local.sh", folder)
    hostfile = folder / "hostfile"
    hostfile.write_text("llmbench-node0 slots=1\nllmbench-node1 slots=1\n")
    yield {"env": dict(os.environ, **env), "hostfile": hostfile}
    subprocess.run(["bash", str(CLUSTER / "sshd-local.sh"), "stop", str(folder)], timeout=60)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    folder = tmp_path_factory.mktemp("slurm")
    env = _start("slurm-local.sh", folder)
    yield dict(os.environ, **env)
    subprocess.run(["bash", str(CLUSTER / "slurm-local.sh"), "stop", str(folder)], timeout=120)


def _records(db: Path, run_id: str | None = None) -> list[dict]:
    args = ["results", *([run_id] if run_id else []), "--db", str(db), "--format", "json"]
    return [json.loads(line) for line in llmbench(*args).stdout.splitlines()]


# -- the launcher's options, read by DeepSpeed's own functions -----------------------------------------

def test_world_size_is_what_deepspeeds_runner_would_start(tmp_path):
    """Hostfile, --include, --exclude and --num-nodes give the ranks DeepSpeed starts; the
    expected counts are read off the hostfile by hand."""
    from llmbench.launch import LaunchOptions, launch_world_size, resolve_resources
    from llmbench.spec import SpecError

    hf = tmp_path / "hostfile"
    hf.write_text("# two workers\nworker-0 slots=4\nworker-1 slots=2\n")
    assert launch_world_size(LaunchOptions(hostfile=str(hf))) == 4 + 2
    assert launch_world_size(LaunchOptions(hostfile=str(hf), include="worker-1")) == 2
    assert launch_world_size(LaunchOptions(hostfile=str(hf), include="worker-0:1,3@worker-1:0")) == 2 + 1
    assert launch_world_size(LaunchOptions(hostfile=str(hf), exclude="worker-0:0")) == 3 + 2
    assert launch_world_size(LaunchOptions(hostfile=str(hf), num_nodes=1)) == 4
    assert list(resolve_resources(LaunchOptions(hostfile=str(hf), include="worker-1@worker-0:2"))) == ["worker-0", "worker-1"]
    assert launch_world_size(LaunchOptions()) is None  # nothing fixes it: the suite's world_size rules
    for bad, words in ((LaunchOptions(hostfile=str(hf), include="worker-9"), "worker-9"),
                       (LaunchOptions(hostfile=str(hf), include="worker-0:7"), "slot"),
                       (LaunchOptions(hostfile=str(hf), include="worker-0", exclude="worker-1"), "mutually exclusive"),
                       (LaunchOptions(hostfile=str(tmp_path / "none")), "no such file")):
        with pytest.raises(SpecError, match=words):
            resolve_resources(bad)


def test_include_without_world_size_plans_the_ranks_it_starts(tmp_path, monkeypatch):
    """`--include localhost:0` used to leave the plan at the default 2 ranks (and the pool
    waiting 600 s for a rank never started); it now plans 1, and a contradicting --set is
    bad input, refused with exit 2 before anything launches (in-process: the CLI as a user
    calls it, without a second interpreter's start-up)."""
    from typer.testing import CliRunner

    from llmbench.cli import app

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    run = CliRunner().invoke
    p = run(app, ["sweep", "smoke", "--include", "localhost:0", "--dry-run", "--db", str(tmp_path / "db")])
    assert p.exit_code == 0, p.output
    rows = [[c.strip() for c in ln.split("│")][1:-1] for ln in p.output.splitlines() if ln.startswith("│ z")]
    assert len(rows) == 4 and all(r[8] == "1" for r in rows), p.output  # the `ranks` column
    bad = run(app, ["sweep", "smoke", "--include", "localhost:0", "--set", "world_size=2", "--dry-run"])
    assert bad.exit_code == 2 and "launcher options start 1 ranks" in bad.output


def test_slurm_variables_map_to_torchs():
    from llmbench.launch.slurm import torch_env_from_slurm

    env = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "7", "SLURM_NODEID": "2",
           "SLURM_TASKS_PER_NODE": "2(x2),3", "SLURMD_NODENAME": "gpu-7"}
    out = torch_env_from_slurm(env)
    assert out == {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "7", "LOCAL_WORLD_SIZE": "3",
                   "LLMBENCH_NODE": "gpu-7", "LLMBENCH_NODE_RANK": "2"}
    assert torch_env_from_slurm({**env, "RANK": "0"}) == {}  # set by a launcher already: left alone
    assert torch_env_from_slurm({}) == {}


def test_per_host_jit_cache(monkeypatch, tmp_path):
    """Nodes sharing a home directory build DeepSpeed's ops in one folder per host; a
    TORCH_EXTENSIONS_DIR the user set is kept as it is."""
    from llmbench.worker import _per_host_extensions_dir

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    _per_host_extensions_dir("node-a")
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(tmp_path / ".cache" / "torch_extensions" / "node-a")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/scratch/ext")
    _per_host_extensions_dir("node-b")
    assert os.environ["TORCH_EXTENSIONS_DIR"] == "/scratch/ext"


# -- the control channel -------------------------------------------------------------------------------

def test_key_file_is_private_and_a_shared_one_is_refused(tmp_path):
    from llmbench.launch.control import read_key, write_key

    keys = tmp_path / "keys"
    keys.mkdir()
    host = socket.gethostname()
    dead, alive, other = (keys / f"pool-{host}-999999999-aa.key", keys / f"pool-{host}-{os.getpid()}-bb.key",
                          keys / "pool-another-host-999999999-cc.key")
    for f in (dead, alive, other):
        f.write_text("x")
    path = write_key(keys)
    assert (path.stat().st_mode & 0o777) == 0o600 and len(read_key(path)) == 64
    # a SIGKILLed driver's key on this host goes; a live driver's, and another host's, stay
    assert not dead.exists() and alive.exists() and other.exists()
    path.chmod(0o644)
    with pytest.raises(ValueError, match="readable by others"):
        read_key(path)


def _stranger(address: str, send: bytes | None) -> str:
    """Connect to the driver's control socket as a stranger; what the driver says before closing."""
    host, _, port = address.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        got = s.makefile("rb").readline()  # the challenge
        if send is not None:
            s.sendall(send)
            s.shutdown(socket.SHUT_WR)
        rest = s.recv(4096)  # b"" once the driver closed the connection
    return got.decode() + rest.decode()


def _strangers(out: Path, found: dict, timeout_s: float = 120.0) -> None:
    """Once the pool's launch line is in its log under `out`, knock on its control socket as five strangers:
    one that sends no hello, one with a well-formed hello but no key, one with a wrong digest,
    one that sends bytes that are not UTF-8, one whose digest is not ASCII."""
    import re
    import time

    from llmbench.launch.control import digest

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        log = _pool_log(out)
        m = re.search(r"--control (\S+:\d+)", log.read_text()) if log.exists() else None
        if m:
            hello = {"type": "hello", "rank": 0, "pid": 1, "host": "evil"}
            found["said"] = [_stranger(m.group(1), send) for send in (
                b"GET / HTTP/1.0\r\n\r\n", (json.dumps(hello) + "\n").encode(),
                (json.dumps({**hello, "auth": digest(b"not the key", "0" * 32)}) + "\n").encode(),
                b"\xff\xfe not utf-8\n", (json.dumps({**hello, "auth": "\u00e9" * 64}) + "\n").encode())]
            return
        time.sleep(0.2)


# -- the results folder: shards and merges ---------------------------------------------------------------

def test_merging_shard_files_is_idempotent(zero_sweep, tmp_path):
    """The session sweep's records written as two shards' files, merged twice: every trial
    once, nothing stored twice; a changed file replaces its record, a merge then finds all unchanged."""
    from llmbench.resultsdir import FolderStore, read_json, write_json
    from llmbench.store import Store

    records = zero_sweep["records"]
    results = tmp_path / "results"
    keys = ["0-of-2", "1-of-2"]
    for i, key in enumerate(keys):
        fs = FolderStore(results, shard=key)
        fs.create_run("R", "zero", "ci", {"host": "x"}, {}, shards=keys)
        for seq, rec in enumerate(records):
            if seq % 2 == i:
                fs.add_trial(dict(rec, run_id="R"), seq)
        fs.finish_run("R", "finished", {"wall_s": 1.0 + i, "pool_starts": 1, "pool_start_s": [5.0],
                                        **({"control_refused": ["a stranger"]} if i == 0 else {})})
    store = Store(tmp_path / "db.sqlite")
    first = store.merge([results])
    assert first == {"runs": 1, "added": len(records), "replaced": 0, "unchanged": 0}
    assert store.merge([results / "R"]) == {"runs": 1, "added": 0, "replaced": 0, "unchanged": len(records)}
    run = store.run("R")
    assert run["status"] == "finished" and run["meta"]["wall_s"] == 3.0 and run["meta"]["pool_starts"] == 2
    assert run["meta"]["control_refused"] == ["a stranger"]  # a shard's refusals reach the merged run
    assert [r["trial_id"] for r in store.trials("R")] == [r["trial_id"] for r in records]
    n_steps = sqlite3.connect(tmp_path / "db.sqlite").execute("SELECT COUNT(*) FROM steps WHERE run_id='R'").fetchone()[0]
    assert n_steps == sum(len(r["step_times_s"]) for r in records)
    f = results / "R" / "trials" / f"{records[0]['trial_id']}.json"
    entry = read_json(f)
    entry["record"]["notes"] = entry["record"]["notes"] + ["edited"]
    write_json(f, entry)
    assert store.merge([results])["replaced"] == 1 and store.merge([results])["unchanged"] == len(records)
    assert "edited" in store.trials("R")[0]["notes"]
    local = dict(records[1], run_id="R", trial_id="/data/my model-z0")  # a local model's path in the id
    FolderStore(results, shard="0-of-2").add_trial(local, 99)
    assert store.merge([results])["added"] == 1 and "/data/my model-z0" in [r["trial_id"] for r in store.trials("R")]
    assert not Path("/data/my model-z0.json").exists() and len(list((results / "R" / "trials").glob("*.json"))) == len(records) + 1
    part = Store(tmp_path / "part.sqlite")  # a run one shard of which has not ended yet
    (results / "R" / "shards" / "1-of-2.json").unlink()
    part.merge([results])
    assert part.run("R")["status"] == "running"


def test_a_results_folder_that_cannot_be_written_does_not_end_the_sweep(zero_sweep, tmp_path):
    """The files are a copy: the store goes on in SQLite and says why the copy stopped."""
    from llmbench.resultsdir import FolderStore
    from llmbench.store import Store

    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the results folder should be")
    store = Store(tmp_path / "db.sqlite", mirror=FolderStore(blocked))
    store.create_run("R", "zero", None, {})
    rec = dict(zero_sweep["records"][0], run_id="R")
    store.add_trial(rec, 0)
    store.finish_run("R", "finished", {})
    assert [r["trial_id"] for r in store.trials("R")] == [rec["trial_id"]] and store.run("R")["status"] == "finished"
    assert store.mirror is None and "not-a-folder" in store.mirror_error


# -- two nodes over SSH ------------------------------------------------------------------------------------

def test_two_nodes_over_ssh_match_the_one_node_sweep(ssh_nodes, zero_sweep, tmp_path):
    """ZeRO 0-3 through DeepSpeed's PDSH runner on two loopback nodes, one slot each, gloo
    between them: every record names both nodes and their node ranks; the two "nodes" share
    this machine's cores (one thread per rank on 2 cores, not 2 each); the per-step losses
    equal the one-node session sweep's for the same trials (tolerance 1e-4 relative; measured
    here: identical)."""
    ids = [f"z{z}-mb4" for z in range(4)]
    env = dict(ssh_nodes["env"])
    # the ranks build DeepSpeed's ops where the session's one-node ranks did (else a per-host folder: a fresh build)
    env["TORCH_EXTENSIONS_DIR"] = os.environ.get("TORCH_EXTENSIONS_DIR") or str(Path.home() / ".cache" / "torch_extensions")
    db, out = tmp_path / "db.sqlite", tmp_path / "out"
    llmbench("sweep", "zero", "--hostfile", str(ssh_nodes["hostfile"]), "--master-addr", "127.0.0.1",
             "--control-addr", "127.0.0.1", "--only", ",".join(ids), "--db", str(db), "--out", str(out), env=env)
    recs = {r["trial_id"]: r for r in _records(db)}
    one = {r["trial_id"]: r for r in zero_sweep["records"]}
    assert sorted(recs) == ids and all(r["status"] == "ok" for r in recs.values())
    cores = len(os.sched_getaffinity(0))
    for tid, r in recs.items():
        assert [(n["node"], n["node_rank"]) for n in r["nodes"]] == [("llmbench-node0", 0), ("llmbench-node1", 1)]
        assert {n["host"] for n in r["nodes"]} == {socket.gethostname()}
        assert all(n["threads"] == max(1, cores // 2) for n in r["nodes"])
        assert r["config_hash"] == one[tid]["config_hash"]  # the same trial, identity and all
        assert r["losses"] == pytest.approx(one[tid]["losses"], rel=1e-4)
    log = next((out / "logs").glob("*.log")).read_text()
    assert "--hostfile" in log and "--nodes llmbench-node0,llmbench-node1" in log


def test_pdsh_killed_under_a_two_node_pool_fails_the_trial_and_leaves_no_rank(ssh_nodes, tmp_path, monkeypatch):
    """The launch's pdsh (DeepSpeed's PDSH runner: one ssh per node) SIGKILLed mid-window: the
    trial fails saying the launcher ended, and no rank remains on either "node": the ranks
    leave when the driver closes their control connections (on a real cluster nothing else
    reaches them), and this host's pids are checked."""
    import signal

    from helpers import assert_nothing_left, run_with_fault
    from llmbench.env import detect_hardware
    from llmbench.launch import LaunchOptions, RankPool
    from llmbench.spec import TrialSpec

    for k, v in ssh_nodes["env"].items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", os.environ.get("TORCH_EXTENSIONS_DIR") or str(Path.home() / ".cache" / "torch_extensions"))
    pool = RankPool(detect_hardware(force_cpu=True), 2, tmp_path / "pool.log",
                    LaunchOptions(hostfile=str(ssh_nodes["hostfile"]), master_addr="127.0.0.1", control_addr="127.0.0.1"),
                    startup_timeout_s=300)

    def kill_pdsh(p):
        import psutil

        family = psutil.Process(p.launcher.proc.pid).children(recursive=True)
        pdsh = [c for c in family if c.cmdline()[:1] == ["pdsh"]]  # (Debian's process is pdsh.bin)
        assert pdsh, [c.cmdline()[:3] for c in family]
        for c in pdsh:
            c.send_signal(signal.SIGKILL)

    spec = TrialSpec(model="tiny", precision="fp32", seq_len=32, micro_batch=2, warmup_steps=2, steps=400,
                     breakdown_steps=0).model_dump()
    try:
        out, detect_s, pids, port = run_with_fault(pool, "pdsh", spec, kill_pdsh)
    finally:
        pool.stop()
    assert out.status == "failed" and "launcher ended" in out.error, out
    assert_nothing_left(pids, port)
    print(f"pdsh SIGKILL: outcome {detect_s:.1f}s after the kill")


# -- SLURM -----------------------------------------------------------------------------------------------

def test_inside_an_allocation_ranks_start_with_srun_and_strangers_are_refused(slurm, tmp_path):
    """`salloc -n 2 llmbench sweep smoke`: llmbench sees the allocation and starts its ranks
    with srun, SLURM's variables mapped to torch's. Meanwhile three strangers knock on the
    control socket (no hello; a well-formed hello without the key; a wrong digest): each gets
    the challenge and a closed connection, is logged and stored with the run, and the sweep
    goes on unaffected."""
    import threading

    db, out = tmp_path / "db.sqlite", tmp_path / "out"
    found: dict = {}
    p = subprocess.Popen(["salloc", "-n", "2", sys.executable, "-m", "llmbench.cli", "sweep", "smoke", "--set",
                          "zero_stage=0,3", "--control-addr", "127.0.0.1", "--db", str(db), "--out", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=slurm, cwd=ROOT)
    knock = threading.Thread(target=_strangers, args=(out, found), daemon=True)
    knock.start()
    stdout, stderr = p.communicate(timeout=600)
    knock.join(5)
    assert p.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert len(found.get("said", [])) == 5
    for said in found["said"]:  # the challenge, then the connection closed
        assert json.loads(said.splitlines()[0])["type"] == "challenge" and said.count("\n") == 1
    recs = _records(db)
    node = subprocess.run(["hostname", "-s"], capture_output=True, text=True).stdout.strip()
    assert [r["status"] for r in recs] == ["ok", "ok"]
    assert all([(n["rank"], n["node"], n["local_rank"]) for n in r["nodes"]] == [(0, node, 0), (1, node, 1)] for r in recs)
    log = _pool_log(out).read_text()
    assert "=== pool start: srun --ntasks=2" in log
    refused = [ln for ln in log.splitlines() if "llmbench control: refused" in ln]
    assert len(refused) == 5 and all("from 127.0.0.1" in ln for ln in refused)
    assert "not a hello" in refused[0] and all("without the pool's key" in refused[i] for i in (1, 2, 4))
    assert "unreadable handshake (UnicodeDecodeError)" in refused[3]
    from llmbench.store import Store

    assert len(Store(db).run()["meta"]["control_refused"]) == 5
    assert not [k for k in (Path.home() / ".cache" / "llmbench" / "keys").glob("*.key")
                if k.read_text() in log]  # the secret never appears on a command line, and its file is gone


def _pool_log(out: Path) -> Path:
    logs = sorted((out / "logs").glob("*.log")) if (out / "logs").exists() else []
    return logs[0] if logs else out / "logs" / "none.log"


def test_slurm_array_shards_merge_into_one_run_and_finalists_decide(slurm, tmp_path):
    """`llmbench sweep smoke --slurm`: a job array of 2 shards running at once, each on its own
    allocation, merged into one run holding exactly the plan's trial keys once each; then
    the 2 best re-measured together in one allocation, and the winner named from them. A task
    requeued by SLURM mid-trial (scontrol requeue, preemption's path) comes back and resumes;
    a requeued task's rerun and a second merge store nothing twice."""
    import yaml

    db, out = tmp_path / "db.sqlite", tmp_path / "out"
    log = tmp_path / "phases.log"
    proc = subprocess.Popen([sys.executable, "-m", "llmbench.cli", "sweep", "smoke", "--set", "zero_stage=0,3", "--slurm",
                             "--cpu", "--shards", "2",
                             "--array-parallelism", "2", "--finalists", "2", "--control-addr", "127.0.0.1",
                             "--db", str(db), "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(slurm, LLMBENCH_PHASE_LOG=str(log)), cwd=ROOT)
    requeued = _requeue_first_task_to_start_a_trial(log, slurm)
    stdout, stderr = proc.communicate(timeout=900)
    p = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    grid = yaml.safe_load((ROOT / "suites" / "smoke.yaml").read_text())["grid"]["zero_stage"]
    expected = sorted(f"z{z}" for z in grid if z in (0, 3))  # the suite's grid under --set zero_stage=0,3
    from llmbench.store import Store

    store = Store(db)
    main, final = sorted((r for r in store.runs()), key=lambda r: r["run_id"])
    assert final["run_id"] == main["run_id"] + "-finalists"
    recs = store.trials(main["run_id"])
    assert sorted(r["trial_id"] for r in recs) == expected and all(r["status"] == "ok" for r in recs)
    assert main["status"] == "finished" and len(main["meta"]["shards"]) == 2
    (a, b) = main["meta"]["shards"].values()
    assert a["started_at"] < b["finished_at"] and b["started_at"] < a["finished_at"]  # the two shards overlapped
    best2 = sorted(recs, key=lambda r: -r["tokens_per_s"])[:2]
    again = store.trials(final["run_id"])
    assert sorted(r["trial_id"] for r in again) == sorted(r["trial_id"] for r in best2)
    assert all(r["rounds_done"] == 2 for r in again)
    fin = main["meta"]["finalists"]
    assert fin["winner"] in {r["trial_id"] for r in again} and f"winner (finalists re-measured together): {fin['winner']}" in p.stdout
    for r in recs + again:
        assert r["nodes"] and all(n["host"] for n in r["nodes"])
    assert (out / f"report-{final['run_id']}.html").exists()
    # a requeued array task (its own command line, in-process): its trials' files exist, so it
    # runs nothing; merging again stores nothing twice
    import shlex

    from typer.testing import CliRunner

    from llmbench.cli import app

    folder = out / "results" / main["run_id"]
    files = {f.name: f.read_bytes() for f in (folder / "trials").glob("*.json")}
    task = (folder / "slurm" / "ws2.sbatch").read_text().splitlines()[-1]
    argv = shlex.split(task.replace("$SLURM_ARRAY_TASK_ID", "0"))
    assert argv[:4] == ["exec", sys.executable, "-m", "llmbench.cli"]
    rq = CliRunner().invoke(app, argv[4:])
    assert rq.exit_code == 0 and "resuming" in rq.output, rq.output[-2000:]
    assert {f.name: f.read_bytes() for f in (folder / "trials").glob("*.json")} == files  # nothing ran again
    m = CliRunner().invoke(app, ["merge", str(out / "results"), "--db", str(db), "--no-report"])
    assert f"0 added, 0 replaced, {len(expected) + 2} unchanged" in m.output, m.output
    assert len(store.trials(main["run_id"])) == len(expected)
    after = Store(db).run(main["run_id"])["meta"]["shards"]["ws2-0-of-2"]  # a requeue adds its part, keeps the first start
    assert a["wall_s"] <= after["wall_s"] < a["wall_s"] + 5 and after["started_at"] == a["started_at"]
    # the task SLURM requeued mid-trial (preemption's path) came back once and finished its shard
    tasks = main["meta"]["slurm_tasks"]
    assert tasks[f"ws2-{requeued}"][-1]["restarts"] == 1 and tasks[f"ws2-{requeued}"][-1]["state"] == "COMPLETED", tasks
    assert all(t[-1]["restarts"] == 0 for k, t in tasks.items() if k != f"ws2-{requeued}"), tasks


def _requeue_first_task_to_start_a_trial(log: Path, env: dict) -> int:
    """As SLURM preempts with requeue: once an array task's pool is up (its trial starting),
    `scontrol requeue` it (SIGTERM to the task, back to pending) and let it start again at once
    (a requeued job otherwise waits ~2 minutes: BeginTime). Returns its array index."""
    import time

    deadline = time.monotonic() + 300
    while True:
        assert time.monotonic() < deadline, "no array task started its pool"
        ends = [ln.split() for ln in (log.read_text().splitlines() if log.exists() else [])]
        pids = [int(e[1]) for e in ends if e[2:] == ["end", "pool-start"]]
        if pids:
            break
        time.sleep(0.05)
    environ = dict(kv.split("=", 1) for kv in Path(f"/proc/{pids[0]}/environ").read_text().split("\0") if "=" in kv)
    job = f"{environ['SLURM_ARRAY_JOB_ID']}_{environ['SLURM_ARRAY_TASK_ID']}"
    subprocess.run(["scontrol", "requeue", job], env=env, check=True, timeout=30)
    while "PENDING" not in subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], env=env, capture_output=True,
                                          text=True, timeout=30).stdout:  # (requeue ends the task first)
        assert time.monotonic() < deadline, f"{job} never went back to pending"
        time.sleep(0.1)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=env, check=True, timeout=30)
    return int(environ["SLURM_ARRAY_TASK_ID"])


def test_a_task_requeued_past_its_limit_runs_nothing(tmp_path):
    """SLURM_RESTART_COUNT above the batch script's LLMBENCH_SLURM_MAX_RESTARTS (--retries): the
    task says so and exits 1 before anything is launched."""
    env = dict(os.environ, SLURM_RESTART_COUNT="2", LLMBENCH_SLURM_MAX_RESTARTS="1")
    p = cli("sweep", "smoke", "--shard", "0/1", "--run-id", "R", "--db", str(tmp_path / "db"), "--out",
                 str(tmp_path / "out"), env=env, check=False)
    assert p.returncode == 1 and "requeued this task 2 times" in p.stderr and "limit 1" in p.stderr, p.stderr
    assert not (tmp_path / "out" / "logs").exists()  # no pool was started


@pytest.mark.slow
def test_a_slurm_time_limit_is_retried_once_then_recorded_as_such(slurm, tmp_path):
    """A trial longer than its task's 1-minute limit (--time 1): SLURM ends the task (TIMEOUT), the
    submitter resubmits it once (--retries 1), the task resumes (the trial before it, done, is not
    run again) and times out again; the long trial is stored once, `timeout`, naming SLURM's
    state, the task and the attempts; the short one once, ok."""
    suite = tmp_path / "long.yaml"
    suite.write_text("name: long\nfixed: {model: tiny, precision: fp32, seq_len: 32, micro_batch: 2, warmup_steps: 2,"
                     " world_size: 2, breakdown_steps: 0, timeout_s: 3600}\ngrid: {steps: [4, 100000]}\n")
    db, out = tmp_path / "db.sqlite", tmp_path / "out"
    p = subprocess.run([sys.executable, "-m", "llmbench.cli", "sweep", str(suite), "--slurm", "--cpu", "--time", "1",
                        "--shards", "1", "--retries", "1", "--finalists", "0", "--control-addr", "127.0.0.1", "--db", str(db),
                        "--out", str(out)], capture_output=True, text=True, timeout=900, env=slurm, cwd=ROOT)
    assert "SLURM ended" in p.stdout and "TIMEOUT" in p.stdout, p.stdout[-3000:] + p.stderr[-3000:]
    recs = {r["trial_id"]: r for r in _records(db)}
    assert sorted(recs) == ["steps=100000", "steps=4"], sorted(recs)
    assert recs["steps=4"]["status"] == "ok"
    long = recs["steps=100000"]
    assert long["status"] == "timeout" and long["error"].startswith("SLURM TIMEOUT: array task"), long["error"]
    assert "2 submission(s)" in long["error"], long["error"]
    from llmbench.store import Store

    run = Store(db).runs()[0]
    (attempts,) = run["meta"]["slurm_tasks"].values()
    assert [a["state"] for a in attempts] == ["TIMEOUT", "TIMEOUT"]
