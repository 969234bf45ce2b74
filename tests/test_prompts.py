"""A1111's prompt syntax: every doctest of its modules/prompt_parser.py (transcribed in
shared/research/a1111-prompts.md), plus the behaviour its code shows beyond them."""

from __future__ import annotations

import pytest

from sdtorch.errors import SdtorchError
from sdtorch.prompts import (
    parse_extra_networks,
    parse_prompt_attention,
    prompt_schedule,
    prompt_schedules,
    split_and,
    text_at_step,
)

# --- parse_prompt_attention: A1111's doctests, exact floats ---------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("normal text", [("normal text", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        ("(unbalanced", [("unbalanced", 1.1)]),
        ("\\(literal\\]", [("(literal]", 1.0)]),
        ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
        (
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
            [
                ("a ", 1.0),
                ("house", 1.5730000000000004),
                (" ", 1.1),
                ("on", 1.0),
                (" a ", 1.1),
                ("hill", 0.55),
                (", sun, ", 1.1),
                ("sky", 1.4641000000000006),
                (".", 1.1),
            ],
        ),
    ],
)
def test_attention_doctests(text, expected):
    assert parse_prompt_attention(text) == expected  # == on floats: the same products in the same order


@pytest.mark.parametrize(
    "text, expected",
    [
        ("", [("", 1.0)]),
        ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
        ("BREAK a", [("", 1.0), ("BREAK", -1.0), ("a", 1.0)]),
        ("a BREAKfast", [("a BREAKfast", 1.0)]),  # only the whole word
        ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]),  # inside brackets: just scaled
        ("(x:1.5)", [("x", 1.5)]),
        ("(x: 1.5 )", [("x", 1.5)]),  # A1111's \s* around the weight
        ("(x:-1)", [("x", -1.0)]),
        ("[x]", [("x", 1 / 1.1)]),
        ("[[x]]", [("x", 1 / 1.1 / 1.1)]),
        ("((x:2))", [("x", 2 * 1.1)]),
        ("[(x:2)]", [("x", 2 / 1.1)]),
        ("(unclosed [both", [("unclosed ", 1.1), ("both", 1.1 / 1.1)]),  # '(' closed first, then '['
        ("a) b]", [("a) b]", 1.0)]),  # closers with nothing open are text
        ("[x:1.2)", [("x:1.2)", 1 / 1.1)]),  # a weight with no '(' open is text; '[' closed at the end
        ("(x:abc)", [("x:abc", 1.1)]),  # a colon without a number is text
        ("a\\\\b", [("a\\b", 1.0)]),  # \\ is a backslash
        ("a\\b", [("ab", 1.0)]),  # a lone backslash vanishes
        ("\\(x\\)", [("(x)", 1.0)]),
    ],
)
def test_attention_behaviour(text, expected):
    got = parse_prompt_attention(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected], rel=1e-15)


def test_attention_weight_not_a_number():
    with pytest.raises(SdtorchError, match="not a number"):
        parse_prompt_attention("(x:1.2.3)")


# --- schedules: A1111's doctests (steps 10) ----------------------------------------------


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("test", [(10, "test")]),
        ("a [b:3]", [(3, "a "), (10, "a b")]),
        ("a [b: 3]", [(3, "a "), (10, "a b")]),
        ("a [[[b]]:2]", [(2, "a "), (10, "a [[b]]")]),
        ("[(a:2):3]", [(3, ""), (10, "(a:2)")]),
        ("a [b : c : 1] d", [(1, "a b  d"), (10, "a  c  d")]),
        ("a[b:[c:d:2]:1]e", [(1, "abe"), (2, "ace"), (10, "ade")]),
        ("a [unbalanced", [(10, "a [unbalanced")]),
        ("a [b:.5] c", [(5, "a  c"), (10, "a b c")]),
        ("((a][:b:c [d:3]", [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
        ("[a|(b:1.1)]", [(s, "a" if s % 2 else "(b:1.1)") for s in range(1, 11)]),
        ("[fe|]male", [(s, "female" if s % 2 else "male") for s in range(1, 11)]),
        ("[fe|||]male", [(s, "female" if s % 4 == 1 else "male") for s in range(1, 11)]),
    ],
)
def test_schedule_doctests(prompt, expected):
    assert prompt_schedule(prompt, 10) == expected


def test_schedule_doctest_that_a1111_no_longer_passes():
    # A1111's docstring says [[5, 'a  c'], [10, 'a {b|d{ c']] ("not handling this right now"), from
    # before alternation made '|' special. Its code today (lark 1.1.2 and 1.3.1 alike) cannot parse
    # the '|' outside an alternation and uses the prompt as it is; so do we.
    assert prompt_schedule("a [{b|d{:.5] c", 10) == [(10, "a [{b|d{:.5] c")]


@pytest.mark.parametrize(
    "prompt, steps, expected",
    [
        # from A1111's comment at the top of prompt_parser.py (100 steps)
        (
            "fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75]"
            "[ in foreground::0.6][ in background:0.25] [shoddy:masterful:0.5]",
            100,
            [
                (25, "fantasy landscape with a mountain and an oak in foreground shoddy"),
                (50, "fantasy landscape with a lake and an oak in foreground in background shoddy"),
                (60, "fantasy landscape with a lake and an oak in foreground in background masterful"),
                (75, "fantasy landscape with a lake and an oak in background masterful"),
                (100, "fantasy landscape with a lake and a christmas tree in background masterful"),
            ],
        ),
        ("a [b::3] c", 10, [(3, "a b c"), (10, "a  c")]),  # [from::when]
        ("a [b:c:0.29]", 100, [(28, "a b"), (100, "a c")]),  # A1111's int(0.29 * 100) = 28
        ("a [b:c:30]", 10, [(10, "a b")]),  # past the last step: never switches
        ("a [b:c:-1]", 10, [(10, "a c")]),  # before the first: always switched
        ("a [b:c:1e3]", 10, [(10, "a b")]),  # no '.': a step count
        ("a [b:c:3.]", 10, [(10, "a b")]),  # a '.': a fraction, 3.0 * 10 steps
        ("[a|b|]", 4, [(1, "a"), (2, "b"), (3, ""), (4, "a")]),
        ("a|b", 10, [(10, "a|b")]),  # '|' outside brackets: unparsed, used as is
        ("a \\[b:3]", 10, [(10, "a \\[b:3]")]),  # escaped: the attention parser reads it later
        ("(masterpiece, [cat:dog:0.5]", 10, [(5, "(masterpiece, cat"), (10, "(masterpiece, dog")]),
        ("[cat:dog:5]] [blurry", 10, [(5, "cat] [blurry"), (10, "dog] [blurry")]),
        ("a [b:c:2] [d|e]", 3, [(1, "a b d"), (2, "a b e"), (3, "a c d")]),
    ],
)
def test_schedule_behaviour(prompt, steps, expected):
    # each checked against A1111's parser (lark) when written
    assert prompt_schedule(prompt, steps) == expected


def test_schedules_for_many_prompts_and_lookup_by_step():
    a, b = prompt_schedules(["a [b:c:2]", "d"], 4)
    assert a == [(2, "a b"), (4, "a c")] and b == [(4, "d")]
    assert [text_at_step(a, s) for s in (1, 2, 3, 4)] == ["a b", "a b", "a c", "a c"]


def test_absurd_nesting_is_read_as_text():
    prompt = "[" * 3000 + "a:3]"
    assert prompt_schedule(prompt, 10) == [(10, prompt)]


def test_schedule_needs_a_step():
    with pytest.raises(SdtorchError, match="steps"):
        prompt_schedule("a", 0)


# --- AND ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("a cat", [("a cat", 1.0)]),
        ("a cat AND a dog :0.5", [("a cat", 1.0), (" a dog", 0.5)]),
        ("a cat:1.2 AND a dog: -0.5 ", [("a cat", 1.2), (" a dog", -0.5)]),
        ("a ANDROID", [("a ANDROID", 1.0)]),  # only the word
        ("(a:1.2)", [("(a:1.2)", 1.0)]),  # a weight in brackets is not the sub-prompt's
        ("AND", [("", 1.0), ("", 1.0)]),
        ("a:1. AND b:.5", [("a", 1.0), (" b", 0.5)]),
    ],
)
def test_split_and(prompt, expected):
    assert split_and(prompt) == expected


# --- <lora:...> ---------------------------------------------------------------------------


def test_extra_networks_taken_out_with_weights():
    text, found = parse_extra_networks("a cat <lora:styleX:0.8>, <lora:b:1:0.5> <hypernet:h> <lora:c:te=0.3>")
    assert text == "a cat ,   "  # only the tags go, as in A1111; the spaces stay
    assert [(n.kind, n.name) for n in found] == [("lora", "styleX"), ("lora", "b"), ("hypernet", "h"), ("lora", "c")]
    assert found[0].lora_weights() == (0.8, 0.8)
    assert found[1].lora_weights() == (1.0, 0.5)
    assert found[2].lora_weights() == (1.0, 1.0)
    assert found[3].lora_weights() == (0.3, 0.3)  # unet defaults to the text-encoder weight


def test_extra_network_weight_not_a_number():
    _, (tag,) = parse_extra_networks("<lora:x:strong>")
    with pytest.raises(SdtorchError, match="not a number"):
        tag.lora_weights()
