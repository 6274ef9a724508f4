"""``forklight fit|validate|test|predict -c configs/X.yaml``: LightningCLI with forklight's links.

Model and data are chosen by ``class_path`` (subclass mode), so your own LightningModule or
DataModule plugs in; YAML may interpolate (``parser_mode="omegaconf"``) and ``-c`` stacks
overlays; the resolved config is saved in the run directory.
"""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch.cli import LightningCLI

from forklight.data.datamodule import ForkDataModule
from forklight.modules.base import IDENTITY_KEYS, ForkModule, tokenizer_name


# What a checkpoint fixes about its model; everything else (evaluation, optimiser) comes from
# the config and the command line, so `forklight test --ckpt_path X --model.init_args.eval_temperature=0.7` works.
CHECKPOINT_MODEL_KEYS = (*IDENTITY_KEYS, "init_from")


class ForkLightningCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # The data module tokenises with the model's tokenizer and groups up to N traces per question.
        parser.link_arguments(
            ("model.init_args.tokenizer", "model.init_args.name_or_path", "model.init_args.init_from"),
            "data.init_args.tokenizer",
            compute_fn=tokenizer_name,
        )
        parser.link_arguments("model.init_args.num_fork_tokens", "data.init_args.num_fork_tokens")
        parser.link_arguments("model.init_args.trust_remote_code", "data.init_args.trust_remote_code")
        parser.link_arguments("model.init_args.end_token", "data.init_args.end_token")

    def _parse_ckpt_path(self) -> None:
        """Take the model's identity from ``--ckpt_path`` (Lightning's default would also overwrite
        every other hyperparameter given on the command line with the checkpoint's)."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        # mmap: only the hyperparameters are read here; Lightning loads the weights when it restores.
        saved = torch.load(ckpt_path, weights_only=True, map_location="cpu", mmap=True).get("hyper_parameters", {})
        model = self.config[subcommand]["model"]
        identity = {key: saved[key] for key in CHECKPOINT_MODEL_KEYS if key in saved}
        if identity and getattr(model, "class_path", None):
            update = {subcommand: {"model": {"class_path": model.class_path, "init_args": identity}}}
            self.config = self.parser.parse_object(update, self.config)


def build_cli(args: list[str] | None = None, run: bool = True) -> ForkLightningCLI:
    """The CLI on ``args`` (default ``sys.argv[1:]``); ``run=False`` only instantiates (no subcommand)."""
    return ForkLightningCLI(
        ForkModule,
        ForkDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        parser_kwargs={"parser_mode": "omegaconf"},
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def main(args: list[str] | None = None) -> None:
    """Console entry point; ``args`` replaces ``sys.argv[1:]`` (tests drive the CLI this way)."""
    build_cli(args)


if __name__ == "__main__":
    main()
