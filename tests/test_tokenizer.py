"""sdtorch.tokenizer against transformers' CLIPTokenizer built offline from the same merges file.

transformers 4's (slow) CLIPTokenizer, on its ftfy path, is the reference for the default
`fix_text=True`: SD 1.x was trained and is run through it. transformers 5 no longer has it (its
CLIPTokenizer is the tokenizers-backed one, NFC instead of ftfy); there we compare the default
against transformers 5 fed the text transformers 4 would have cleaned, and `fix_text=False`
against transformers 5 on the raw text.
"""

import random
import subprocess
import sys

import ftfy
import pytest
import regex
import torch
from oracles import write_clip_vocab

from sdtorch.errors import SdtorchError
from sdtorch.tokenizer import CLIPTokenizer, get_tokenizer

N_RANDOM = 600

# Fragments the random prompts are built from; every family the brief names has its own pool.
POOLS = {
    "ascii": ["cat", "Photo", "PORTRAIT", "of", "a", "the", "astronaut", "Riding", "horse", "Mars", "xyzzy",
              "qwertyuiop", "aaaaaa", "mississippi", "supercalifragilistic", "HDR", "iPhone", "McDonald"],
    "sd": ["(masterpiece:1.2)", "best quality", "((ultra detailed))", "[blurry]", "{castle}", "8k", "4K UHD",
           "by greg rutkowski", "trending on artstation", "BREAK", "AND", "<lora:foo_v2:0.8>", "(red:0.7)",
           "embedding:neg", "\\(parens\\)", "1girl", "f/1.8", "50mm", "--ar 16:9", "[cat:dog:0.5]"],
    "punct": [",", ".", "!", "?", ";", ":", "...", "--", "-", "_", "/", "\\", "|", "@", "#", "$", "%", "^",
              "*", "+", "=", "~", "`", "\"", "'", "<", ">", "()", "[]", "{}", "!!!", "?!", "<|", "|>"],
    "digits": ["0", "7", "42", "1234567890", "3.14159", "1e-5", "2024", "1,000,000", "٣٤", "½", "²"],
    "apostrophe": ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'LL", "it's", "don't", "WE'RE", "I'm",
                   "you'll", "she'd", "rock'n'roll", "'", "''", "dogs'", "’s", "I’m", "‘quoted’"],
    "accented": ["café", "naïve", "Ångström", "façade", "Straße", "ÉCOLE", "crème brûlée", "São Paulo",
                 "Øresund", "Łódź", "ﬁne", "ﬂower", "e\u0301", "A\u030a", "İstanbul", "ΣΟΦΙΑ", "ΟΔΟΣ",
                 "Москва", "Ελλάς"],
    "cjk": ["東京", "日本語のテキスト", "中文字符", "한국어", "ｶﾀｶﾅ", "ＬＯＵＤ", "，", "。", "「引用」", "漢字かな交じり文"],  # noqa: E501
    "emoji": ["🎉", "👍🏽", "👨‍👩‍👧", "🇫🇷", "❤️", "✨✨", "🐱", "☃", "🔥🔥🔥", "©", "™", "→", "∞"],
    "html": ["&amp;", "&lt;", "&gt;", "&quot;", "&#39;", "&nbsp;", "&amp;amp;", "&eacute;", "&#x1F600;",
             "&copy;",
             "AT&T", "&", "&foo;", "<b>bold</b>"],
    "mojibake": ["SchÃ¶n", "cafÃ©", "â€œquotedâ€\x9d", "Ã¼ber", "IÃ±tÃ«rnÃ¢tiÃ´nÃ lizÃ¦tiÃ¸n"],
    "special": ["<|startoftext|>", "<|endoftext|>", "<|ENDOFTEXT|>", "x<|endoftext|>y", "a:<|endoftext|>"],
    "odd": ["\x00", "\x7f", "\x1c", "\u200b", "\ufeff", "\u00ad", "\x85", "\u2028", "\U0001d400", "\ud7ff"],
}
SEPARATORS = [" ", " ", " ", "", ", ", "  ", "\t", "\n", "\r\n", " \t \n ", "\u00a0", "\u3000", "\u2003"]

FIXED = [
    "", " ", "\t\n  \r", "a photo of a cat", "(masterpiece:1.2), best quality", "A Photo Of A CAT",
    "a photograph of an astronaut riding a horse", "&amp;", "&amp;amp;", "<b>&amp;</b>", "I’m here", "ΟΔΟΣ",
    "it's we're we've i'm you'll he'd don't IT'S", "   leading and trailing   ", "tabs\tand\nnewlines\r\n",
    "ﬁne ＬＯＵＤ，東京", "emoji 🎉👍🏽👨‍👩‍👧", "<|startoftext|>hi<|endoftext|>", "<|ENDOFTEXT|>", "a:<|endoftext|>",
    "x<|endoftext|>y", "SchÃ¶n", "1234567890 3.14", "word " * 100, "a, " * 80, "🎉" * 40, "東京" * 60,
    "(masterpiece:1.2), (best quality:1.1), ultra-detailed, 8k, photo of a beautiful woman, long hair, "
    "looking at viewer, cinematic lighting, depth of field, bokeh, sharp focus, intricate details, "
    "highly detailed face, by artgerm and greg rutkowski and alphonse mucha, trending on artstation, "
    "octane render, unreal engine 5, volumetric fog, golden hour",
]


def random_strings(n: int = N_RANDOM) -> list[str]:
    """`n` prompts mixing the pools; about one in six is long enough to be truncated."""
    rng = random.Random(0)
    names = sorted(POOLS)
    out = []
    for _ in range(n):
        k = rng.randint(30, 90) if rng.random() < 0.17 else rng.randint(0, 10)
        family = rng.sample(names, rng.randint(1, 3))
        parts = [rng.choice(POOLS[rng.choice(family)]) for _ in range(k)]
        text = "".join(p + rng.choice(SEPARATORS) for p in parts)
        out.append(text.upper() if rng.random() < 0.05 else text)
    return out


STRINGS = FIXED + random_strings()


def transformers4_clean(text: str) -> str:
    """What transformers 4's CLIPTokenizer._tokenize does before its regex (ftfy path)."""
    return regex.sub(r"\s+", " ", ftfy.fix_text(text)).strip().lower()


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """transformers' CLIPTokenizer from vocab.json + merges.txt, derived as OpenAI CLIP does."""
    import transformers

    folder = write_clip_vocab(tmp_path_factory.mktemp("clip_vocab"))
    tok = transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    # SD 1.x's tokenizer (openai/clip-vit-large-patch14): pads with EOS.
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (49406, 49407, 49407)
    assert tok.pad_token == "<|endoftext|>" and len(tok) == 49408
    if not tok.is_fast:
        assert tok.fix_text is ftfy.fix_text, "transformers 4 fell back to BasicTokenizer: ftfy not found"
    return tok


@pytest.fixture(scope="module")
def nfc_tok() -> CLIPTokenizer:
    return CLIPTokenizer(fix_text=False)


def hf_ids(tok, texts: list[str]) -> torch.Tensor:
    return tok(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def assert_same(ours: torch.Tensor, ref: torch.Tensor, texts: list[str]) -> None:
    assert ours.shape == ref.shape == (len(texts), 77) and ours.dtype == torch.long
    bad = [i for i in range(len(texts)) if not torch.equal(ours[i], ref[i])]
    if bad:
        i = bad[0]
        pytest.fail(f"{len(bad)} of {len(texts)} differ, first {texts[i]!r}:\nours {ours[i]}\nref  {ref[i]}")


def test_strings_cover_the_brief():
    assert len(STRINGS) >= 500
    long = sum(len(get_tokenizer().encode(t)) > 75 for t in STRINGS)
    assert long >= 50, long  # truncation gets exercised


def test_default_matches_transformers4(hf):
    tok = get_tokenizer()
    if not hf.is_fast:  # transformers 4: the reference itself, on the raw strings
        assert_same(tok(STRINGS), hf_ids(hf, STRINGS), STRINGS)
    else:  # transformers 5: its BPE on transformers 4's cleaned text. As it then finds special
        # tokens after the clean-up instead of before, strings with '<|' are left to the next test.
        texts = [t for t in STRINGS if "<|" not in t]
        assert len(texts) >= 500
        assert_same(tok(texts), hf_ids(hf, [transformers4_clean(t) for t in texts]), texts)


def test_nfc_matches_transformers5(hf, nfc_tok):
    if not hf.is_fast:
        pytest.skip("fix_text=False reproduces transformers 5's tokenizer")
    assert_same(nfc_tok(STRINGS), hf_ids(hf, STRINGS), STRINGS)


@pytest.mark.parametrize(
    ("text", "default", "nfc"),
    [  # `default` as transformers 4.57's slow CLIPTokenizer gives it, `nfc` as transformers 5.24's
        ("x<|endoftext|>y", [343, 49407, 344], [343, 49407, 344]),
        ("a:<|endoftext|>", [320, 281, 49407], [320, 281, 49407]),
        ("<|ENDOFTEXT|>", [49407], [27, 347, 40786, 4160, 91, 285]),
        ("a:<|ENDOFTEXT|>", [320, 25, 27, 347, 40786, 4160, 91, 285],
         [320, 25, 27, 347, 40786, 4160, 91, 285]),
        ("<|startoftext|>cat", [49406, 2368], [49406, 2368]),
        ("&amp; I’m", [261, 328, 880], [261, 6259, 282, 328, 728, 503, 332]),
        ("<b>&amp;</b>", [283, 321, 29, 261, 6259, 26, 34308, 321, 285],
         [283, 321, 29, 261, 6259, 26, 34308, 321, 285]),
        ("ΟΔΟΣ", [138, 123, 138, 112, 138, 123, 139, 480], [138, 123, 138, 112, 138, 123, 139, 481]),
    ],
)
def test_special_tokens_and_known_differences(text, default, nfc, nfc_tok):
    assert get_tokenizer().encode(text) == default
    assert nfc_tok.encode(text) == nfc


def test_truncation_and_padding():
    tok = get_tokenizer()
    ids = tok.encode("word " * 100)
    row = tok("word " * 100)[0]
    assert len(ids) == 100 and row.tolist() == [49406, *ids[:75], 49407]
    short = CLIPTokenizer(pad_id=0)(["a cat", ""], length=10)
    assert short.tolist() == [[49406, 320, 2368, 49407] + [0] * 6, [49406, 49407] + [0] * 8]
    assert tok([]).shape == (0, 77)
    with pytest.raises(SdtorchError):
        tok("a cat", length=1)


def test_decode_round_trip():
    tok = get_tokenizer()
    rng = random.Random(0)
    for _ in range(100):
        words = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(1, 12))) for _ in range(8)]
        text = " ".join(words)
        assert tok.decode(tok.encode(text)) == text
        assert tok.decode(tok(text, length=200)[0]) == text  # padded row: BOS skipped, stops at EOS


def test_get_tokenizer_is_cached():
    assert get_tokenizer() is get_tokenizer()
    tok = get_tokenizer()
    constants = (tok.bos_id, tok.eos_id, tok.pad_id, tok.context_length, tok.vocab_size)
    assert constants == (49406, 49407, 49407, 77, 49408)


def test_import_does_not_pull_transformers():
    code = "import sys, sdtorch.tokenizer; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
