"""The ``math`` verifier on gold answers written as datasets write them (MATH-500, DAPO, s1K).

Gold answers are bare LaTeX (``2\\sqrt{2}``, ``\\frac{14}{3}``, ``[-2,7]``) or already inside
``$...$`` / ``\\boxed{}``; predictions are completions that end in ``\\boxed{...}`` or state
"The answer is $...$". Every style has a correct and a wrong prediction.

What math-verify itself cannot judge, left out of the table rather than hard-coded:
- a prediction without math delimiters ("The answer is 2\\sqrt{2}") is read by its plain-number
  extractor as ``2``;
- a truncated decimal against a fraction (``0.333`` for ``\\frac13``) is wrong for math-verify (it
  compares at the precision of both sides), while ``0.3333333`` is right.
"""

from __future__ import annotations

import pytest

from forklight.rewards import MathVerifier, gold_answer_parser, resolve_verifier

# (style, gold as the dataset stores it, a correct completion, a wrong completion)
CASES = [
    # the regressions: bare gold answers read up to their first token, or not at all
    ("radical times integer", r"2\sqrt{2}", r"so the answer is \boxed{2\sqrt{2}}", r"so the answer is \boxed{2}"),
    ("multiple of pi", r"3\pi", r"\boxed{3\pi}", r"\boxed{3}"),
    ("fraction of radical", r"\frac{\sqrt{3}}{2}", r"\boxed{\frac{\sqrt3}{2}}", r"\boxed{\frac{\sqrt{2}}{2}}"),
    ("dfrac", r"\dfrac{14}{3}", r"\boxed{\frac{14}{3}}", r"\boxed{\frac{3}{14}}"),
    ("closed interval", "[-2,7]", r"\boxed{[-2,7]}", r"\boxed{(-2,7)}"),
    ("polynomial", "x^2+7x+10", r"\boxed{(x+2)(x+5)}", r"\boxed{x^2+7x+12}"),
    ("polynomial in several letters", "xy+yz+zx", r"\boxed{zx+xy+yz}", r"\boxed{xy+yz}"),
    ("square root", r"\sqrt{5}", r"The answer is $\sqrt{5}$.", r"The answer is $5$."),
    # fractions and decimals
    ("frac against mixed number", r"\frac{14}{3}", r"The answer is $4\frac{2}{3}$", r"\boxed{4.6}"),
    ("decimal against frac", r"\frac12", r"\boxed{0.5}", r"\boxed{0.25}"),
    ("frac against decimal gold", "0.5", r"\boxed{\frac{1}{2}}", r"\boxed{\frac{1}{3}}"),
    ("decimal gold", "0.125", r"\boxed{\frac18}", r"\boxed{0.12}"),
    ("long decimal against frac", r"\frac{1}{3}", r"\boxed{0.3333333}", r"\boxed{0.3}"),
    ("negative fraction", r"-\frac{1}{3}", r"\boxed{-\frac13}", r"\boxed{\frac13}"),
    ("negative integer", "-4", r"\boxed{-4}", r"\boxed{4}"),
    ("integer (DAPO)", "73", "Final Answer: The final answer is 73. I hope it is correct.", "the answer is 37"),
    ("thousands separator", "10,080", r"\boxed{10080}", r"\boxed{1008}"),
    ("thousands with thin space", r"1,\!000", r"\boxed{1000}", r"\boxed{1}"),
    # radicals and pi
    ("cube root", r"\sqrt[3]{2}", r"\boxed{2^{1/3}}", r"\boxed{\sqrt{2}}"),
    ("radical multiple", r"6\sqrt{3}", r"\boxed{6\sqrt{3}}", r"\boxed{6}"),
    ("pi in inline math", r"2\pi", r"The answer is $2\pi$.", r"The answer is $\pi$."),
    ("fraction of pi", r"\frac{\pi}{4}", r"\boxed{\frac{\pi}{4}}", r"\boxed{\frac{\pi}{2}}"),
    # intervals, tuples, sets, matrices
    ("open interval to infinity", r"(-\infty, 3)", r"\boxed{(-\infty,3)}", r"\boxed{(-\infty,3]}"),
    ("interval with x in", r"x \in [-2,7]", r"\boxed{[-2,7]}", r"\boxed{[-2,8]}"),
    ("polar tuple", r"(3, \frac{\pi}{2})", r"\boxed{\left(3, \frac{\pi}{2}\right)}", r"\boxed{(3, \pi)}"),
    ("set", r"\{1,2\}", r"\boxed{\{2,1\}}", r"\boxed{\{1,3\}}"),
    ("several solutions", "2, -2", r"\boxed{-2, 2}", r"\boxed{2}"),
    ("vector", r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", r"\boxed{\begin{pmatrix} 1 \\ 2 \end{pmatrix}}",
     r"\boxed{\begin{pmatrix} 2 \\ 1 \end{pmatrix}}"),
    ("infinity", r"\infty", r"\boxed{\infty}", r"\boxed{0}"),
    # complex numbers, equations
    ("complex number", "1+2i", r"\boxed{2i+1}", r"\boxed{1-2i}"),
    ("complex, swapped parts", "3+4i", r"\boxed{3+4i}", r"\boxed{4+3i}"),
    ("line equation", "y = 2x+3", r"\boxed{y=2x+3}", r"\boxed{y=3x+2}"),
    ("several equations", "a=2, b=3", r"\boxed{a=2, b=3}", r"\boxed{a=3, b=2}"),
    # text answers
    ("name in text", r"\text{Evelyn}", r"\boxed{\text{Evelyn}}", r"\boxed{\text{Brenda}}"),
    ("choice letter in text", r"\text{(C)}", r"\boxed{\text{(C)}}", r"\boxed{\text{(D)}}"),
    ("choice letter, bare prediction", r"\text{(C)}", r"\boxed{C}", r"\boxed{D}"),
    ("word in text", r"\text{odd}", r"\boxed{\text{odd}}", r"\boxed{\text{even}}"),
    # degrees, units, percent, dollars
    ("degrees", r"90^\circ", r"\boxed{90^\circ}", r"\boxed{45^\circ}"),
    ("degrees, bare prediction", r"90^\circ", r"\boxed{90}", r"\boxed{45}"),
    ("unit in text", r"5\text{ cm}", r"\boxed{5 \text{ cm}}", r"\boxed{6\text{ cm}}"),
    ("percent", r"10\%", r"\boxed{10\%}", r"\boxed{20\%}"),
    ("escaped dollar", r"\$18.90", r"\boxed{\$18.90}", r"\boxed{\$18.00}"),
    ("escaped dollar, bare prediction", r"\$18.90", r"\boxed{18.9}", r"\boxed{19}"),
    # gold answers already in math mode
    ("gold already boxed", r"\boxed{2\sqrt{2}}", r"\boxed{\sqrt{8}}", r"\boxed{2}"),
    ("gold already in dollars", r"$\frac{\sqrt{3}}{2}$", r"\boxed{\dfrac{\sqrt{3}}{2}}", r"\boxed{\sqrt{3}}"),
    ("gold in \\( \\)", r"\(3\pi\)", r"\boxed{3\pi}", r"\boxed{3}"),
]


def test_the_table_has_forty_styles():
    assert len(CASES) >= 40


@pytest.mark.parametrize(("style", "gold", "correct", "wrong"), CASES, ids=[case[0] for case in CASES])
def test_gold_answer_styles(style, gold, correct, wrong):
    verifier = MathVerifier(timeout_s=5)
    assert verifier([correct, wrong], [gold, gold]) == [1.0, 0.0]
    assert verifier.counts == {"parse_failures": 0, "timeouts": 0, "gold_failures": 0}


def test_prose_gold_is_not_read_as_a_product_of_letters():
    verifier = MathVerifier(timeout_s=5)
    assert verifier([r"\boxed{5}"], ["not a number !!"]) == [None]
    assert verifier.counts["gold_failures"] == 1


@pytest.mark.parametrize("gold", [r"2\sqrt{2}", r"\frac{\sqrt{3}}{2}", r"\dfrac{14}{3}", "[-2,7]", "x^2+7x+10",
                                  r"\sqrt{5}", r"3\pi", r"\text{Evelyn}", r"\$18.90", r"(3, \frac{\pi}{2})"])
def test_setup_check_reads_the_whole_gold_answer(gold):
    verifier, extract_answer = resolve_verifier("math")
    read_gold = gold_answer_parser(verifier, extract_answer)
    assert read_gold is not None
    read = read_gold(gold)
    assert read is not None and verifier.same_answer(read, gold)  # all of it, not its first token


def test_setup_check_of_radicals_keeps_the_radical():
    verifier, extract_answer = resolve_verifier("math")
    read_gold = gold_answer_parser(verifier, extract_answer)
    assert read_gold(r"2\sqrt{2}") == r"2\sqrt{2}"
    assert read_gold("not a number !!") is None


def test_same_answer_groups_what_the_verifier_counts_as_equal():
    verifier = MathVerifier(timeout_s=5)
    extracted = [verifier.extract_answer(text) for text in
                 [r"so \boxed{\dfrac{1}{2}}", "The answer is 1/2", r"\boxed{0.5}"]]
    assert all(verifier.same_answer(first, second) for first in extracted for second in extracted)
    assert verifier.same_answer("2.0", "2")
    assert verifier.same_answer(r"2\sqrt{2}", r"\sqrt{8}")
    assert not verifier.same_answer(r"\frac{1}{3}", "0.3")
    assert not verifier.same_answer(r"2\sqrt{2}", "2")
    assert not verifier.same_answer("[-2,7]", "(-2,7)")


def test_same_answer_outside_the_main_thread_compares_strings():
    from concurrent.futures import ThreadPoolExecutor

    verifier = MathVerifier(timeout_s=5)
    with ThreadPoolExecutor(1) as pool:  # no SIGALRM timeouts there: only identical strings are equal
        assert pool.submit(verifier.same_answer, "0.5", r"\frac{1}{2}").result() is False
        assert pool.submit(verifier.same_answer, "7", "7").result() is True
