"""``forklight fit|validate|test|predict -c configs/X.yaml``: LightningCLI with forklight's links.

``forklight prepare -c configs/prepare/X.yaml``: curate a multi-trace corpus into the grouped parquet that ``fit``
reads (``forklight.prepare``; its own parser, same ``-c`` stacking, ``--key=value`` overrides and error rule).

Model and data are chosen by ``class_path`` (subclass mode), so your own LightningModule or
DataModule plugs in; YAML may interpolate (``parser_mode="omegaconf"``) and ``-c`` stacks
overlays; the resolved config is saved in the run directory. Checkpoints are written atomically
(``forklight.checkpointing``) and ``--ckpt_path last`` resumes the newest run of the configured
logger, in that run's own directory.

A user error (:class:`forklight.errors.UserError`: a bad record, a bad config value, a missing
file) ends the program with one line, ``forklight: error: <file:line or key>: ...``, and exit
status 2, as jsonargparse's own config errors do; ``FORKLIGHT_DEBUG=1`` shows its traceback. Any
other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from lightning.pytorch.cli import LightningCLI

from forklight.checkpointing import SHARDED_METADATA, find_last_checkpoint, use_atomic_checkpoints
from forklight.data.datamodule import ForkDataModule
from forklight.errors import ConfigError, UserError
from forklight.modules.base import ForkModule
from forklight.starting import IDENTITY_KEYS, tokenizer_name


# What a checkpoint fixes about its model; everything else (evaluation, optimiser) comes from
# the config and the command line, so `forklight test --ckpt_path X --model.init_args.eval_temperature=0.7` works.
CHECKPOINT_MODEL_KEYS = (*IDENTITY_KEYS, "init_from", "lora")


def constructor_errors(message: str) -> list[str]:
    """The constructors' own messages inside a jsonargparse union error (empty if it is not one)."""
    if "Does not validate against any of the Union subtypes" not in message:
        return []
    reasons = []
    for line in message.splitlines():
        text = line.strip()
        if text.startswith("- ") and not text.startswith("- Expected a <class 'NoneType'>"):
            reasons.append(text[2:])
    return reasons


class ForkLightningCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # The data module tokenises with the model's tokenizer and groups up to N traces per question.
        parser.link_arguments(
            ("model.init_args.tokenizer", "model.init_args.name_or_path", "model.init_args.init_from",
             "model.init_args.gguf_file"),
            "data.init_args.tokenizer",
            compute_fn=tokenizer_name,
        )
        parser.link_arguments("model.init_args.num_fork_tokens", "data.init_args.num_fork_tokens")
        parser.link_arguments("model.init_args.trust_remote_code", "data.init_args.trust_remote_code")
        parser.link_arguments("model.init_args.end_token", "data.init_args.end_token")

    def instantiate_classes(self) -> None:
        """As Lightning's, but a component's own error (e.g. a bad ``model.init_from``) is raised by
        itself, not buried in jsonargparse's "Does not validate against any of the Union subtypes",
        and as a :class:`ConfigError`: a constructor's ``ValueError`` or ``OSError`` (a missing file)
        is its check of a value the config gave it."""
        try:
            super().instantiate_classes()
        except UserError:
            raise
        except (ValueError, OSError) as error:
            reasons = constructor_errors(str(error))
            raise ConfigError("\n".join(reasons) if reasons else str(error)) from error
        model, data = getattr(self, "model", None), getattr(self, "datamodule", None)
        if data is not None and model is not None and getattr(model, "starting_point", None) is not None:
            data.follow_init_from(model.hparams.tokenizer, model.hparams.num_fork_tokens)

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        use_atomic_checkpoints(trainer)  # a kill while saving leaves the previous checkpoint whole
        return trainer

    def before_fit(self) -> None:
        self._pass_on_ckpt_path("fit")

    def before_validate(self) -> None:
        self._pass_on_ckpt_path("validate")

    def before_test(self) -> None:
        self._pass_on_ckpt_path("test")

    def before_predict(self) -> None:
        self._pass_on_ckpt_path("predict")

    def _pass_on_ckpt_path(self, subcommand: str) -> None:
        """Tell the module that Lightning restores its weights from ``--ckpt_path`` (a file or a sharded directory
        that exists: ``last`` with no run yet starts fresh), so that FSDP2's meta-device build leaves its shards to
        the checkpoint instead of first reading the starting weights (:meth:`ForkModule.restores_checkpoint`)."""
        path = self.config[subcommand].get("ckpt_path")
        if path and Path(path).exists() and hasattr(self.model, "restores_from"):
            self.model.restores_from = str(path)

    def _resolve_last_checkpoint(self, subcommand: str) -> None:
        """``--ckpt_path last``: the newest ``last.ckpt`` of the configured logger's runs; ``fit``
        continues in that run's directory (Lightning would look only in the new, empty version dir)."""
        config = self.config[subcommand]
        logger = config["trainer"].get("logger")
        init_args = getattr(logger, "init_args", None) if logger not in (None, True, False) else None
        if logger is False or isinstance(logger, list):
            return
        save_dir = getattr(init_args, "save_dir", None) if init_args is not None else None
        save_dir = save_dir or config["trainer"].get("default_root_dir") or os.getcwd()
        name = (getattr(init_args, "name", None) if init_args is not None else "lightning_logs") or ""
        found = find_last_checkpoint(str(save_dir), str(name))
        if found is None:
            return  # Lightning warns and starts fresh: "last" may be set before the first run
        config["ckpt_path"] = found
        if subcommand == "fit" and init_args is not None and hasattr(init_args, "version"):
            init_args.version = Path(found).parent.parent.name

    def _parse_ckpt_path(self) -> None:
        """Take the model's identity from ``--ckpt_path`` (Lightning's default would also overwrite
        every other hyperparameter given on the command line with the checkpoint's)."""
        subcommand = self.config.get("subcommand")
        if subcommand and self.config[subcommand].get("ckpt_path") == "last":
            self._resolve_last_checkpoint(subcommand)
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and Path(ckpt_path).is_dir():  # sharded (FSDP2, FSDP): its meta.pt holds all but the weights
            if subcommand == "fit" and not shards(self.config[subcommand]["trainer"].get("strategy")):
                raise ConfigError(
                    f"--ckpt_path={ckpt_path} is a sharded checkpoint, whose optimiser state only a sharded strategy "
                    "restores: resume with the overlay that wrote it (-c configs/strategies/fsdp2.yaml), or start a new "
                    f"run from its weights with --model.init_args.init_from={ckpt_path}")
            ckpt_path = str(Path(ckpt_path) / SHARDED_METADATA)
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        # mmap: only the hyperparameters are read here; Lightning loads the weights when it restores.
        saved = torch.load(ckpt_path, weights_only=True, map_location="cpu", mmap=True).get("hyper_parameters", {})
        model = self.config[subcommand]["model"]
        identity = {key: saved[key] for key in CHECKPOINT_MODEL_KEYS if key in saved}
        if identity and getattr(model, "class_path", None):
            update = {subcommand: {"model": {"class_path": model.class_path, "init_args": identity}}}
            self.config = self.parser.parse_object(update, self.config)


def shards(strategy) -> bool:
    """Whether ``trainer.strategy`` (a name or a ``class_path`` config) shards the model (FSDP2, FSDP)."""
    name = str(getattr(strategy, "class_path", strategy) or "")
    return "ModelParallel" in name or "FSDP" in name or name.lower().startswith("fsdp")


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


def main(args: list[str] | None = None, exit_on_error: bool | None = None) -> None:
    """Console entry point; ``args`` replaces ``sys.argv[1:]`` (tests drive the CLI this way).

    ``exit_on_error`` (default: when run as a program, i.e. without ``args``) turns a
    :class:`UserError` into ``forklight: error: <message>`` on stderr and exit status 2; otherwise,
    or with ``FORKLIGHT_DEBUG=1``, it is raised with its traceback.
    """
    if exit_on_error is None:
        exit_on_error = args is None
    command = build_cli
    if (sys.argv[1:] if args is None else args)[:1] == ["prepare"]:  # LightningCLI has no custom subcommands
        from forklight.prepare import prepare_cli

        command, args = prepare_cli, list(sys.argv[2:] if args is None else args[1:])
    if not exit_on_error or os.environ.get("FORKLIGHT_DEBUG", "") not in ("", "0"):
        command(args)
        return
    try:
        command(args)
    except UserError as error:
        print(f"forklight: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
