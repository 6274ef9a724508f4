"""The embedded toy task: multi-strategy arithmetic that a tiny model learns on a CPU.

Every question is a sum of 2-3 (configurable) numbers of two or more digits, with carries,
and comes with one correct trace per strategy, each with a recognisable shape:

- ``column``:  ``units 7+8=15+6=21 carry 2. tens 4+3=7+2=9+2=11. so 111``
- ``running``: ``47+38=85. 85+26=111. so 111``
- ``split``:   ``tens 40+30=70+20=90. units 7+8=15+6=21. 90+21=111. so 111``
- ``direct``:  ``so 111``

Column sums are written as chains of two-operand additions (``7+8=15+6=21``): a tiny model
learns one-digit additions far faster than three- or four-operand ones in a single token.

The strategies play the role of the paper's different teachers: SSFT should give each
strategy its own forking token, random matching should mix them (mode collapse), and
:func:`classify_strategy` measures which strategy a generated trace follows ("purity").

Also here: a character-level tokenizer with a chat template (a plain ``tokenizers`` object,
so an export loads with ``AutoTokenizer`` without forklight). The toy model itself is built from
``model.model_config`` in ``configs/ssft.yaml``.
"""

from __future__ import annotations

import random
import re

from forklight.data.records import QuestionRecord, Trace

STRATEGIES = ("column", "running", "split", "direct")
COLUMN_NAMES = ("units", "tens", "hundreds", "thousands", "tenthousands")

# Characters of the toy vocabulary (digits, operators, lower/upper case letters, punctuation).
_CHARACTERS = list("0123456789+-=*/.,:;()?!'\" _abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ\n")
TOY_SPECIAL_TOKENS = ["<pad>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
TOY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _digit(number: int, place: int) -> int:
    return (number // 10**place) % 10


def _chain(parts: list[int]) -> str:
    """``[7, 8, 6]`` -> ``"7+8=15+6=21"``: running two-operand sums."""
    text, total = str(parts[0]), parts[0]
    for part in parts[1:]:
        total += part
        text += f"+{part}={total}"
    return text


def render_trace(terms: list[int], strategy: str) -> str:
    """The trace of ``strategy`` for the sum of ``terms`` (see the module docstring)."""
    total = sum(terms)
    if strategy == "direct":
        return f"so {total}"
    if strategy == "running":
        steps, running = [], terms[0]
        for term in terms[1:]:
            steps.append(f"{running}+{term}={running + term}.")
            running += term
        return " ".join(steps) + f" so {total}"
    places = max(len(str(term)) for term in terms)
    if strategy == "column":
        steps, carry = [], 0
        for place in range(places):
            digits = [_digit(term, place) for term in terms] + ([carry] if carry else [])
            column_sum = sum(digits)
            step = f"{COLUMN_NAMES[place]} {_chain(digits)}"
            carry = column_sum // 10
            if place < places - 1 and carry:
                step += f" carry {carry}"
            steps.append(step + ".")
        return " ".join(steps) + f" so {total}"
    if strategy == "split":
        steps, partials = [], []
        for place in reversed(range(places)):
            parts = [_digit(term, place) * 10**place for term in terms]
            partials.append(sum(parts))
            steps.append(f"{COLUMN_NAMES[place]} {_chain(parts)}.")
        steps.append(f"{'+'.join(map(str, partials))}={total}.")
        return " ".join(steps) + f" so {total}"
    raise ValueError(f"unknown toy strategy {strategy!r}; choose from {STRATEGIES}")


_STRATEGY_PATTERNS = {
    "direct": re.compile(r"^so \d+$"),
    "running": re.compile(r"^(\d+\+\d+=\d+\. )+so \d+$"),
    "column": re.compile(r"^units [\d+=]+=\d+( carry \d+)?\. (\w+ [\d+=]+=\d+( carry \d+)?\. )*so \d+$"),
    "split": re.compile(r"^(\w+ [\d+=]+=\d+\. )+\d+(\+\d+)+=\d+\. so \d+$"),
}


def classify_strategy(text: str) -> str | None:
    """Which toy strategy a (generated) trace follows, by its shape; None if none matches."""
    text = text.strip()
    for name, pattern in _STRATEGY_PATTERNS.items():
        if pattern.match(text):
            return name
    return None


def generate_toy_records(
    num_questions: int,
    seed: int,
    min_terms: int = 2,
    max_terms: int = 3,
    min_digits: int = 2,
    max_digits: int = 2,
    strategies: tuple[str, ...] = STRATEGIES,
    id_prefix: str = "toy",
) -> list[QuestionRecord]:
    """``num_questions`` distinct toy questions, each with one trace per strategy (seeded)."""
    if not 2 <= min_terms <= max_terms:
        raise ValueError(f"toy task: need 2 <= min_terms <= max_terms, got {min_terms}, {max_terms}")
    if not 1 <= min_digits <= max_digits <= len(COLUMN_NAMES) - 1:
        raise ValueError(f"toy task: need 1 <= min_digits <= max_digits <= 4, got {min_digits}, {max_digits}")
    for strategy in strategies:
        if strategy not in STRATEGIES:
            raise ValueError(f"toy task: unknown strategy {strategy!r}; choose from {STRATEGIES}")
    rng = random.Random(seed)
    records, seen = [], set()
    attempts = 0
    while len(records) < num_questions:
        attempts += 1
        if attempts > 50 * num_questions + 1000:
            raise ValueError(f"toy task: cannot make {num_questions} distinct questions; widen terms/digits")
        num_terms = rng.randint(min_terms, max_terms)
        terms = []
        for _ in range(num_terms):
            digits = rng.randint(min_digits, max_digits)
            terms.append(rng.randint(10 ** (digits - 1), 10**digits - 1))
        prompt = "+".join(map(str, terms))
        if prompt in seen:
            continue
        seen.add(prompt)
        traces = [Trace(text=render_trace(terms, strategy), source=strategy) for strategy in strategies]
        records.append(
            QuestionRecord(
                id=f"{id_prefix}-{len(records)}",
                prompt=prompt,
                messages=None,
                answer=str(sum(terms)),
                traces=traces,
                location=f"toy(seed={seed})#{len(records)}",
            )
        )
    return records


def build_toy_tokenizer():
    """A character-level tokenizer with a chat template; ``<|end|>`` is EOS and end of turn."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(TOY_SPECIAL_TOKENS + _CHARACTERS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r".|\n"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(TOY_SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", eos_token="<|end|>"
    )
    tokenizer.chat_template = TOY_CHAT_TEMPLATE
    return tokenizer
