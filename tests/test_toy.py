"""The toy task: correct traces, recognisable strategies, a tokenizer that loads without forklight."""

from __future__ import annotations

import re

import pytest

from forklight.data.toy import STRATEGIES, build_toy_tokenizer, classify_strategy, generate_toy_records, render_trace


def test_every_question_has_one_correct_trace_per_strategy():
    records = generate_toy_records(300, seed=3, min_terms=2, max_terms=4, min_digits=2, max_digits=3)
    assert len({r.prompt for r in records}) == 300
    for record in records:
        assert [t.source for t in record.traces] == list(STRATEGIES)
        total = sum(int(term) for term in record.prompt.split("+"))
        assert record.answer == str(total)
        for trace in record.traces:
            assert trace.text.endswith(f"so {total}")
            assert classify_strategy(trace.text) == trace.source
            for chain in re.findall(r"[\d+=]*=[\d+=]*", trace.text):  # every step is true arithmetic
                parts = chain.split("=")
                value = sum(int(x) for x in parts[0].split("+"))
                for part in parts[1:]:
                    numbers = [int(x) for x in part.split("+")]
                    assert numbers[0] == value, trace.text
                    value = sum(numbers)


def test_carries_are_written_and_generation_is_seeded():
    assert render_trace([47, 38, 26], "column") == "units 7+8=15+6=21 carry 2. tens 4+3=7+2=9+2=11. so 111"
    assert render_trace([47, 38, 26], "split") == "tens 40+30=70+20=90. units 7+8=15+6=21. 90+21=111. so 111"
    assert render_trace([47, 38, 26], "running") == "47+38=85. 85+26=111. so 111"
    assert [r.prompt for r in generate_toy_records(5, 1)] == [r.prompt for r in generate_toy_records(5, 1)]
    assert [r.prompt for r in generate_toy_records(5, 1)] != [r.prompt for r in generate_toy_records(5, 2)]


@pytest.mark.parametrize("text", ["", "so", "units 7+8=15. so 15 extra", "the answer is 12", "12+13=25."])
def test_classifier_rejects_other_shapes(text):
    assert classify_strategy(text) is None


def test_tokenizer_round_trip_and_loads_with_autotokenizer(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = build_toy_tokenizer()
    text = "units 7+8+6=21 carry 2. so 111"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and tokenizer.decode(ids) == text
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded(text, add_special_tokens=False)["input_ids"] == ids
    rendered = loaded.apply_chat_template([{"role": "user", "content": "1+2"}], add_generation_prompt=True, tokenize=False)
    assert rendered == "<|user|>1+2<|end|><|assistant|>"
    assert loaded.eos_token == "<|end|>"
