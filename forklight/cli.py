"""``forklight fit|validate|test|predict -c configs/X.yaml``: LightningCLI with forklight's links.

Model and data are chosen by ``class_path`` (subclass mode), so your own LightningModule or
DataModule plugs in; YAML may interpolate (``parser_mode="omegaconf"``) and ``-c`` stacks
overlays; the resolved config is saved in the run directory.
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

from forklight.data.datamodule import ForkDataModule
from forklight.modules.base import ForkModule


def _tokenizer_name(tokenizer: str | None, name_or_path: str | None) -> str:
    return tokenizer or name_or_path or "toy"


class ForkLightningCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # The data module tokenises with the model's tokenizer and groups up to N traces per question.
        parser.link_arguments(
            ("model.init_args.tokenizer", "model.init_args.name_or_path"), "data.init_args.tokenizer",
            compute_fn=_tokenizer_name,
        )
        parser.link_arguments("model.init_args.num_fork_tokens", "data.init_args.num_fork_tokens")
        parser.link_arguments("model.init_args.trust_remote_code", "data.init_args.trust_remote_code")
        parser.link_arguments("model.init_args.end_token", "data.init_args.end_token")


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
