"""docs/deepspeed-flags.md, row by row: each config key fed to DeepSpeed's own DeepSpeedConfig
and read back; each launcher option through the launcher's own parser; each flag that does not
exist refused (or, as a config key, ignored) as the page says."""

import pytest
from deepspeed.launcher.runner import parse_args
from deepspeed.runtime.config import DeepSpeedConfig

BASE = {"train_micro_batch_size_per_gpu": 2}


def ds(**extra) -> DeepSpeedConfig:
    return DeepSpeedConfig({**BASE, **extra})


def test_precision_keys():
    assert ds(fp16={"enabled": True}).float16_config.enabled
    assert ds(bf16={"enabled": True}).bfloat16_config.enabled
    with pytest.raises(AssertionError, match="cannot be simultaneously enabled"):
        ds(fp16={"enabled": True}, bf16={"enabled": True})
    c = ds(torch_autocast={"enabled": True, "dtype": "bfloat16"})
    assert c.torch_autocast_enabled and "bfloat16" in str(c.torch_autocast_dtype)


def test_amp_is_refused_and_use_mixed_precision_is_silently_ignored():
    from deepspeed.runtime.config import DeepSpeedConfigError

    with pytest.raises(DeepSpeedConfigError, match="Apex AMP integration has been removed"):
        ds(amp={"enabled": True, "opt_level": "O1"})
    c = ds(use_mixed_precision=True)
    assert not c.float16_config.enabled and not c.bfloat16_config.enabled


def test_batch_print_optimizer_scheduler_and_parallel_keys():
    c = ds(gradient_accumulation_steps=4, steps_per_print=7, optimizer={"type": "AdamW", "params": {"lr": 3e-4}},
           scheduler={"type": "WarmupCosineLR", "params": {"total_num_steps": 100, "warmup_num_steps": 10}})
    assert c.gradient_accumulation_steps == 4 and c.steps_per_print == 7
    assert c.train_batch_size == 2 * 4 * c.world_size  # micro × accumulation × data-parallel ranks
    assert c.optimizer_name == "adamw" and c.optimizer_params["lr"] == 3e-4
    assert c.scheduler_name == "WarmupCosineLR" and c.scheduler_params["warmup_num_steps"] == 10
    assert ds(tensor_parallel={"autotp_size": 2}).tensor_parallel_config.autotp_size == 2
    assert ds(pipeline={"stages": "auto"}).pipeline["stages"] == "auto"


def test_launcher_options_and_flags_that_do_not_exist(capsys):
    a = parse_args(["--num_gpus", "2", "--num_nodes", "1", "train.py", "--deepspeed"])
    assert (a.num_gpus, a.num_nodes, a.user_script, a.user_args) == (2, 1, "train.py", ["--deepspeed"])
    for flag in (["--bfc"], ["--mp", "2"], ["--distributed"], ["--amp"], ["--use_mixed_precision"]):
        with pytest.raises(SystemExit) as e:
            parse_args([*flag, "train.py"])
        assert e.value.code == 2 and f"unrecognized arguments: {flag[0]}" in capsys.readouterr().err
    # after the script, the launcher hands them to the script without a word
    assert parse_args(["train.py", "--bfc"]).user_args == ["--bfc"]
