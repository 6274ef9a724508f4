"""The real CLI: every shipped YAML parses; fit/validate/test run; the export loads without forklight."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from forklight.cli import build_cli, main
from forklight.data.records import RecordError
from forklight.errors import ConfigError
from tests.conftest import CONFIGS, REPO, tiny_export, tiny_overrides

# configs/prepare/ holds `forklight prepare` configs, not fit overlays (tests/test_prepare.py parses them)
SHIPPED = sorted(str(path.relative_to(CONFIGS)) for path in CONFIGS.rglob("*.yaml")
                 if not str(path.relative_to(CONFIGS)).startswith("prepare/"))
RUN_CONFIGS = [name for name in SHIPPED if "/" not in name]


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_yaml_starts_with_its_command_and_parses(name, capsys):
    text = (CONFIGS / name).read_text()
    assert text.startswith("# forklight "), f"{name} must open with the command that runs it"
    stack = ["-c", str(CONFIGS / name)]
    if "/" in name:  # an overlay stacks on the run config its first line names
        base = text.splitlines()[0].split("-c ")[1].split()[0]
        stack = ["-c", str(REPO / base)] + stack
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *stack, "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"].startswith("forklight.modules.")


def test_overrides_and_links_reach_model_and_data(tmp_path):
    cli = build_cli(["-c", str(CONFIGS / "ssft.yaml"), *tiny_overrides(tmp_path), "--model.init_args.num_fork_tokens=3",
                     "--model.init_args.matching=random", "--data.init_args.batch_size=2"], run=False)
    assert cli.model.hparams.matching == "random" and len(cli.model.fork_token_ids) == 3
    assert cli.datamodule.hparams.num_fork_tokens == 3 and cli.datamodule.max_traces == 3  # linked, set once
    assert cli.datamodule.hparams.tokenizer == "toy" and cli.datamodule.hparams.batch_size == 2


@pytest.mark.slow
def test_fit_then_test_then_export_reloads_with_plain_transformers(tmp_path):
    main(["fit", "-c", str(CONFIGS / "ssft.yaml"), *tiny_overrides(tmp_path, max_steps=3)])
    run_dir = tmp_path / "ssft" / "version_0"
    assert (run_dir / "config.yaml").exists()  # the resolved config is saved with the run
    export = run_dir / "export"
    metadata = json.loads((export / "forklight.json").read_text())
    assert metadata["fork_tokens"] == [f"<think{i}>" for i in range(1, 7)]
    assert metadata["default_tag"] in metadata["fork_tokens"] and sum(metadata["tag_coverage"]) == 3 * 4 * 4
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    assert checkpoint.exists()

    main(["test", "-c", str(CONFIGS / "ssft.yaml"), *tiny_overrides(tmp_path), f"--ckpt_path={checkpoint}"])
    cli = build_cli(["predict", "-c", str(CONFIGS / "ssft.yaml"), *tiny_overrides(tmp_path), f"--ckpt_path={checkpoint}",
                     "--model.init_args.num_fork_tokens=2", "--model.init_args.eval_temperature=0.5"])
    assert cli.model.hparams.eval_temperature == 0.5  # evaluation options come from the command line,
    assert len(cli.model.fork_token_ids) == 6  # the model's identity from the checkpoint
    predictions = [json.loads(line) for line in (tmp_path / "ssft" / "version_2" / "predictions.jsonl").open()]
    assert len(predictions) == 4 * 6  # 4 test questions x 6 tags x 1 sample
    assert {p["tag"] for p in predictions} == set(metadata["fork_tokens"])
    assert all(p["score"] in (0.0, 1.0) and isinstance(p["completion"], str) for p in predictions)

    script = f"""
import sys, json, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained({str(export)!r})
tokenizer = AutoTokenizer.from_pretrained({str(export)!r})
meta = json.load(open({str(export / 'forklight.json')!r}))
prompt = tokenizer.apply_chat_template([{{"role": "user", "content": "12+34"}}], add_generation_prompt=True, tokenize=False)
ids = tokenizer(prompt + meta["default_tag"], add_special_tokens=False, return_tensors="pt").input_ids
assert ids[0, -1].item() == meta["fork_token_ids"][meta["default_tag_index"]]
out = model.generate(ids, max_new_tokens=5, do_sample=False)
assert out.shape[1] > ids.shape[1]
assert not any(name.startswith("forklight") for name in sys.modules)
print("EXPORT_OK")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert "EXPORT_OK" in result.stdout, result.stderr[-2000:]


def test_fast_dev_run_takes_one_step_and_writes_no_run(tmp_path):
    cli = build_cli(["fit", "-c", str(CONFIGS / "ssft.yaml"), *tiny_overrides(tmp_path), "--trainer.fast_dev_run=1"])
    assert cli.trainer.global_step == 1  # one optimiser step, not skipped
    logged = cli.trainer.logged_metrics
    assert logged["train/nonfinite_skipped"] == 0 and 0 < logged["train/loss"] < 20  # a finite token-mean NLL
    assert "val/pass@1" in logged  # one validation batch ran too
    assert not (tmp_path / "ssft").exists()  # no logger run directory (TensorBoard, config.yaml)
    assert not (tmp_path / "export").exists()  # HFExport skips fast_dev_run


def test_bad_config_value_fails_with_the_key(tmp_path):
    with pytest.raises(ValueError, match="model.matching"):
        main(["fit", "-c", str(CONFIGS / "ssft.yaml"), *tiny_overrides(tmp_path), "--model.init_args.matching=greedy"])


def test_a_component_error_is_raised_by_itself(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no runs/ssft here: configs/gfpo.yaml has nothing to start from
    with pytest.raises(ValueError) as error:
        build_cli(["-c", str(CONFIGS / "gfpo.yaml")], run=False)
    assert str(error.value).startswith("model.init_from='runs/ssft/version_*/export' matches nothing")
    assert "Union subtypes" not in str(error.value)


# ---- the user's data is never ignored; a user error is one line, not a traceback ----------------------------------
def _traces_file(path: Path, rows: int = 4, bad_line: str | None = None) -> Path:
    """A grouped jsonl in the toy tokenizer's alphabet; ``bad_line`` replaces line 2."""
    lines = [json.dumps({"id": f"mine{k}", "prompt": f"{k}+1", "answer": str(k + 1), "traces": [f"so {k + 1}"]})
             for k in range(rows)]
    if bad_line is not None:
        lines[1] = bad_line
    path.write_text("\n".join(lines) + "\n")
    return path


def test_an_explicit_train_file_turns_the_toy_task_off(tmp_path):
    train = _traces_file(tmp_path / "traces.jsonl")
    cli = build_cli(["-c", str(CONFIGS / "ssft.yaml"), *tiny_overrides(tmp_path), f"--data.init_args.train={train}"],
                    run=False)
    assert cli.datamodule.toy is None and cli.datamodule.hparams.toy is None  # the saved hparams say so too
    cli.datamodule.setup("fit")
    assert sorted(q.id for q in cli.datamodule.datasets["train"].questions) == [f"mine{k}" for k in range(4)]


@pytest.mark.parametrize("problem", ["missing", "malformed"])
def test_a_missing_or_malformed_train_file_stops_the_run(tmp_path, problem):
    train = tmp_path / "traces.jsonl" if problem == "missing" else _traces_file(tmp_path / "traces.jsonl", bad_line="{")
    with pytest.raises(RecordError, match=f"{train}:2: malformed JSON" if problem == "malformed" else "no such file"):
        main(["fit", "-c", str(CONFIGS / "ssft.yaml"), *tiny_overrides(tmp_path), f"--data.init_args.train={train}"])


def test_a_toy_split_given_as_a_file_is_read_from_the_file(tmp_path):
    val = _traces_file(tmp_path / "val.jsonl", rows=2)
    cli = build_cli(["-c", str(CONFIGS / "ssft.yaml"), *tiny_overrides(tmp_path), f"--data.init_args.val={val}"],
                    run=False)
    cli.datamodule.setup("fit")
    assert [q.id for q in cli.datamodule.datasets["val"].questions] == ["mine0", "mine1"]
    assert len(cli.datamodule.datasets["train"]) == 64  # still the toy task


@pytest.mark.parametrize(("overrides", "keys"), [
    (["--data.init_args.val_size=8"], ["data.init_args.val_size", "data.init_args.toy.num_val"]),
    (["--data.init_args.train=t.jsonl", "--data.init_args.val=v.jsonl", "--data.init_args.val_size=8"],
     ["data.init_args.val", "data.init_args.val_size"]),
], ids=["toy-and-val_size", "val-and-val_size"])
def test_settings_that_would_be_ignored_are_an_error_naming_both_keys(tmp_path, overrides, keys):
    with pytest.raises(ConfigError) as error:
        build_cli(["-c", str(CONFIGS / "ssft.yaml"), *tiny_overrides(tmp_path), *overrides], run=False)
    assert all(key in str(error.value) for key in keys), str(error.value)


def _forklight(tmp_path: Path, *args: str, debug: bool = False) -> subprocess.CompletedProcess:
    """``python -m forklight fit -c configs/ssft.yaml <tiny overrides> *args`` in a fresh process."""
    env = {**os.environ, "FORKLIGHT_DEBUG": "1" if debug else "0"}
    command = [sys.executable, "-m", "forklight", "fit", "-c", str(CONFIGS / "ssft.yaml"), *tiny_overrides(tmp_path), *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)


@pytest.mark.parametrize("problem", ["malformed", "missing", "bad-config-value"])
def test_a_user_error_prints_one_located_line_without_a_traceback(tmp_path, problem):
    train = _traces_file(tmp_path / "traces.jsonl", bad_line='{"id": "q1", "prompt": ')
    args, expected = {
        "malformed": ([f"--data.init_args.train={train}"], f"forklight: error: {train}:2: malformed JSON ("),
        "missing": ([f"--data.init_args.train={tmp_path / 'nope.jsonl'}"],
                    f"forklight: error: {tmp_path / 'nope.jsonl'}: no such file or directory; "),
        "bad-config-value": (["--model.init_args.matching=greedy"], "forklight: error: model.matching"),
    }[problem]
    result = _forklight(tmp_path, *args)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("forklight: error: ")]
    assert len(errors) == 1 and errors[0].startswith(expected), result.stderr[-3000:]
    if problem != "bad-config-value":  # the notice that the explicit file replaced the toy task
        assert "toy task (data.init_args.toy) is off" in result.stdout + result.stderr


def test_forklight_debug_shows_the_traceback(tmp_path):
    train = _traces_file(tmp_path / "traces.jsonl", bad_line="{")
    result = _forklight(tmp_path, f"--data.init_args.train={train}", debug=True)
    assert result.returncode != 0 and "Traceback" in result.stderr and f"{train}:2: malformed JSON" in result.stderr


def _real_model_configs() -> list[str]:
    """Whole run configs (not overlays) that train a real model on files rather than the toy task."""
    configs = {name: yaml.safe_load((CONFIGS / name).read_text())["data"] for name in RUN_CONFIGS}
    return [name for name, data in configs.items() if "class_path" in data and "toy" not in data["init_args"]]


@pytest.mark.parametrize("name", _real_model_configs())
def test_real_model_configs_skip_sanity_validation_and_choose_an_overlong_policy(name):
    config = yaml.safe_load((CONFIGS / name).read_text())
    assert config["trainer"].get("num_sanity_val_steps") == 0, f"{name}: sanity validation generates before step 1"
    assert config["data"]["init_args"].get("overlong") in ("truncate", "skip", "error"), name


def _constructor_arguments(cls) -> set[str]:
    """Every named argument of ``cls``'s constructor chain (SSFTModule's and ForkModule's, ...)."""
    from forklight.modules.base import ForkModule

    return {name for klass in cls.__mro__ if isinstance(klass, type) and issubclass(klass, ForkModule)
            for name, parameter in inspect.signature(klass.__init__).parameters.items()
            if name != "self" and parameter.kind is not parameter.VAR_KEYWORD}


def _saved_hyperparameters(module, tmp_path: Path) -> dict:
    """The ``hyper_parameters`` of a checkpoint of ``module``, as Lightning writes and reloads them."""
    import lightning as L
    import torch

    module.configure_model()
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(module)
    path = tmp_path / "hparams.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=True, map_location="cpu")["hyper_parameters"]
    reloaded = type(module).load_from_checkpoint(path, map_location="cpu")  # rebuilt from them alone
    assert dict(reloaded.hparams) == {key: value for key, value in saved.items() if not key.startswith("_")}  # CLI's keys
    return saved


@pytest.mark.parametrize("name", ["ssft", "gfpo", "grpo"])
def test_checkpoints_store_every_constructor_argument(tmp_path, name):
    """Built directly (tests, ``load_from_checkpoint``) or by the CLI, a module's checkpoint holds every
    argument of its constructors, with the values ``init_from`` fixed (the resolved path, the export's
    tokenizer) and a subclass's own defaults (GFPO's ``fork_policy: learned``)."""
    from forklight.modules.gfpo import GFPOModule
    from forklight.modules.grpo import GRPOModule
    from forklight.modules.ssft import SSFTModule

    export = tiny_export(tmp_path)
    cls = {"ssft": SSFTModule, "gfpo": GFPOModule, "grpo": GRPOModule}[name]
    start = {"init_from": str(tmp_path / "exp*"), "num_fork_tokens": 3}  # a glob: resolved, and saved resolved
    saved = _saved_hyperparameters(cls(**start, group_size=4) if name != "ssft" else cls(**start), tmp_path)
    assert set(saved) == _constructor_arguments(cls)
    assert saved["init_from"] == saved["tokenizer"] == str(export)
    assert saved["fork_policy"] == ("learned" if name == "gfpo" else "coverage")
    if name != "ssft":
        assert saved["group_size"] == 4

    options = [f"--model.init_args.init_from={tmp_path / 'exp*'}", "--model.init_args.num_fork_tokens=3"]
    cli = build_cli(["-c", str(CONFIGS / f"{name}.yaml"), *tiny_overrides(tmp_path), *options], run=False)
    saved = _saved_hyperparameters(cli.model, tmp_path)
    assert set(saved) == _constructor_arguments(cls) | {"_class_path", "_instantiator"}
    assert saved["init_from"] == saved["tokenizer"] == str(export)
    assert saved["fork_policy"] == cli.config.model.init_args.fork_policy
