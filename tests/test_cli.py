"""The real CLI: every shipped YAML parses; fit/validate/test run; the export loads without forklight."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from forklight.cli import build_cli, main
from tests.conftest import CONFIGS, REPO, tiny_overrides

SHIPPED = sorted(str(path.relative_to(CONFIGS)) for path in CONFIGS.rglob("*.yaml"))
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


def test_fast_dev_run_smoke(tmp_path):
    main(["fit", "-c", str(CONFIGS / "ssft.yaml"), *tiny_overrides(tmp_path), "--trainer.fast_dev_run=1"])


def test_bad_config_value_fails_with_the_key(tmp_path):
    with pytest.raises(ValueError, match="model.matching"):
        main(["fit", "-c", str(CONFIGS / "ssft.yaml"), *tiny_overrides(tmp_path), "--model.init_args.matching=greedy"])


def test_a_component_error_is_raised_by_itself(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no runs/ssft here: configs/gfpo.yaml has nothing to start from
    with pytest.raises(ValueError) as error:
        build_cli(["-c", str(CONFIGS / "gfpo.yaml")], run=False)
    assert str(error.value).startswith("model.init_from='runs/ssft/version_*/export' matches nothing")
    assert "Union subtypes" not in str(error.value)
