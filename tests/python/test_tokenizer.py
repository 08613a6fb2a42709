"""verify::Tokenizer (through tests/tools/tokenize) against HuggingFace `tokenizers`.

Tokenizers are trained here, on a small built-in corpus, in the shapes real models ship: GPT-2
(ByteLevel), Llama 3 (Split regex + ByteLevel, ignore_merges, a BOS template), Qwen 2 (the same
with NFC; NFD, NFKC and NFKD too), SentencePiece conversions of Llama 2 / Mistral (byte fallback with Prepend + Replace
normalizers, or a Metaspace pre-tokenizer) and Gemma (Replace only). The Megatron-Bridge
fixture's tokenizer.json is checked as it is. For a few hundred probe strings, fixed and random
(seeded), our ids must equal `encode(text).ids` and our text must equal `decode(ids)`, with and
without special tokens.
"""
import json
import random
import unicodedata
from pathlib import Path

import pytest
from tokenizers import (AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers,
                        processors, trainers)

from conftest import run

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                  r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
                 r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "I'm sure you're right, but they'll say it's what we've always done; I'd disagree.",
    "DON'T SHOUT! She'S here, THEY'LL come, we'VE seen it.",
    "In 2024, revenue grew 12.5% to $3,141,592,653 (up from 2,718,281,828).",
    "Call 555-0123 or +1 (800) 123-4567 before 10:30pm on 2025-01-31.",
    "Le café était très animé; naïve résumé, façade, Noël et cœur.",
    "Straße, Äpfel, Öl und Übung: Größe ist nicht alles.",
    "El niño comió piña en la montaña. ¿Qué pasó? ¡Olé!",
    "北京欢迎你，今天天气很好。我们一起去公园散步吧！",
    "日本語のテキストです。カタカナとひらがなを混ぜます。",
    "한국어 텍스트도 포함합니다. 안녕하세요!",
    "مرحبا بالعالم، هذه جملة عربية للاختبار.",
    "שלום עולם, זהו משפט בעברית.",
    "Привет, мир! Съешь же ещё этих мягких французских булок.",
    "Γειά σου Κόσμε, αυτό είναι ελληνικό κείμενο.",
    "Emoji time 😀😃 🎉🎉 👍🏽 👨‍👩‍👧‍👦 🇫🇷🇯🇵 ❤️ done.",
    "def square(x):\n    return x ** 2  # the square\n\nprint(square(12))\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}\n",
    "<html><body class=\"main\">Hello &amp; welcome</body></html>",
    "https://example.com/path?query=value&other=1#anchor",
    "   leading spaces, trailing spaces   ",
    "tabs\tbetween\twords\tand\t\ttwo tabs",
    "line one\nline two\r\nline three\n\n\nafter blank lines",
    "Numbers: 1 22 333 4444 55555 666666 7777777 88888888 999999999 0",
    "Arabic-Indic digits ٠١٢٣٤٥٦٧٨٩ and fullwidth ０１２３ and superscript ²³ and ①②③.",
    "Mixed abc123def 4x4 v2.0.1 COVID-19 3D x86_64 UTF-8.",
    "Hindi: नमस्ते दुनिया, यह एक परीक्षण है।",
    "Thai: สวัสดีชาวโลก นี่คือการทดสอบ",
    "Quotes “curly” and ‘single’ — dashes – and … ellipsis.",
    "Math: ∑ x² ≤ ∞, α + β = γ, √2 ≈ 1.414, ∀x ∃y.",
]

SPECIALS_LLAMA3 = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                   "<|eot_id|>"]
SPECIALS_QWEN2 = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SPECIALS_SP = ["<unk>", "<s>", "</s>"]

FIXED_PROBES = [
    "", " ", "  ", "\t", "\n", "\n\n", " \n ", "\r\n", "a", "Hello world", "Hello  world  ",
    "trailing spaces   ", "   leading", "tab\tsep", "\t\t\tindent", "line1\nline2\r\nline3\n",
    "I'm you're he's we've they'll I'd", "'S 'T 'RE 'VE 'M 'LL 'D", "it's 'tis ''s",
    "12345678901234567890", "3.14159 and 2,718", "1 22 333 4444 55555", "٣٤٥ ١٢", "①②③ ²³ ½",
    "café naïve résumé", "e\u0301 decomposed", "Straße Äpfel", "北京欢迎你", "日本語のテキスト",
    "한국어", "مرحبا بالعالم", "שלום עולם", "Привет, мир!", "Γειά σου", "😀 😃🎉 👍🏽",
    "👨‍👩‍👧‍👦", "🇫🇷🇯🇵", "\u200b zero width \u200d joiner", "nbsp\u00a0here", "ideographic\u3000space",
    "nel\u0085char", "line\u2028separator", "İstanbul ΣΑΣ Ǆ ǅ", "ÀÉÎÕÜ ĀĒĪŌŪ", "ǅungla ᾼ ﬁ",
    "def f(x):\n    return x**2  # comment\n", "$%^&*()_+-=[]{}|;':\",./<>?`~", "   \t\n  ",
    "a" * 300, "ab " * 80, "9" * 50, "hello" + " " * 40 + "world", "\n" * 10 + "x",
    "<s>", "</s>", "<unk>", "<s>hello", "hello<s>", "a<s>b</s>c", " <s> ", "<<s>>", "<s><s>",
    "<|endoftext|>", "text<|endoftext|>more", "<|im_start|>user\nhi<|im_end|>\n",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>",
    "hello world", "say hello world!", "xhello world", "[MASK]", "a [MASK] b", "a   [MASK]   b",
    "foo", "food", "a foo b", "▁already▁metaspace", "<0x41>", "\u0000nul\u0001ctl\u001f",
    "\U0010FFFF\U000E0001", "\ufeffbom", "\ufffd replacement",
]

# Random probes are built from these, so that they stress the boundaries between kinds of text.
ATOMS = [
    "the", "The", "THE", "hello", "world", "tokenizer", "café", "Übung", "北京", "テキスト", "한국", "مرحبا",
    "שלום", "мир", "Κόσμε", "😀", "👍🏽", "👨‍👩‍👧‍👦", "🇫🇷", "'s", "'LL", "'ve", "n't", "0", "7", "42",
    "2024", "3.14", "1,000", "٣", "²", " ", "  ", "   ", "\t", "\n", "\r\n", "\n\n", " \n", "\t ",
    ".", ",", "!", "?", "...", "—", "(", ")", "\"", "'", "#", "$", "%", "_", "->", "==", "//", "▁",
    "<s>", "</s>", "<|endoftext|>", "<|eot_id|>", "<|im_start|>", "[MASK]", "hello world", "foo",
    "é", "e\u0301", "\u00a0", "\u3000", "ǅ", "İ",
]


def corpus():
    rng = random.Random(7)
    lines = list(SENTENCES) * 6
    words = " ".join(SENTENCES).split()
    for _ in range(300):
        lines.append(" ".join(rng.choice(words) for _ in range(rng.randint(3, 14))))
    for _ in range(60):
        lines.append(" ".join(str(rng.randint(0, 10 ** rng.randint(1, 9))) for _ in range(5)))
    return lines


def random_probes(seed, count):
    rng = random.Random(seed)
    probes = []
    for _ in range(count):
        kind = rng.random()
        if kind < 0.6:
            probes.append("".join(rng.choice(ATOMS) for _ in range(rng.randint(1, 12))))
        elif kind < 0.8:
            words = rng.choice(SENTENCES).split(" ")
            start = rng.randrange(len(words))
            probes.append(" ".join(words[start:start + rng.randint(1, 8)]) + rng.choice(["", " ", "\n", "  "]))
        else:
            # Arbitrary code points, surrogates excluded: characters no merge has seen.
            cps = [rng.choice([rng.randint(0x20, 0x7E), rng.randint(0xA0, 0x2FFF), rng.randint(0x3000, 0xD7FF),
                               rng.randint(0xE000, 0xFFFD), rng.randint(0x10000, 0x10FFFF)])
                   for _ in range(rng.randint(1, 8))]
            probes.append("".join(map(chr, cps)))
    return probes


PROBES = FIXED_PROBES + SENTENCES + random_probes(seed=1234, count=600)


def ask(tools_dir, tokenizer_json, requests):
    """One tokenize process answers every request, in order."""
    text = "".join(json.dumps(r) + "\n" for r in requests)
    proc = run([tools_dir / "tokenize", tokenizer_json], input=text)
    # Not splitlines(): decoded text may hold U+0085 or U+2028, which it also splits at.
    answers = [json.loads(line) for line in proc.stdout.split("\n")[:-1]]
    assert len(answers) == len(requests), proc.stderr
    return answers


def compare(tools_dir, tokenizer_json, probes=PROBES, may_fail=lambda text: False, seed=5):
    """Asserts that our encode and decode agree with `tokenizers` on every probe.

    Our tokenizer may refuse (an "error" answer) only texts for which `may_fail` holds.
    """
    reference = Tokenizer.from_file(str(tokenizer_json))
    requests, expected = [], []
    for text in probes:
        for add_special in (True, False):
            requests.append({"text": text, "add_special_tokens": add_special})
            expected.append(("ids", reference.encode(text, add_special_tokens=add_special).ids))
    # Decode what the reference encoded, plus random ids: partial UTF-8, lone byte tokens,
    # specials in odd places and ids past the vocabulary.
    rng = random.Random(seed)
    size = reference.get_vocab_size(with_added_tokens=True)
    id_lists = [reference.encode(text).ids for text in probes]
    id_lists += [[rng.randrange(size + 5) for _ in range(rng.randint(1, 10))] for _ in range(300)]
    id_lists += [[i] for i in range(0, size + 3, max(1, size // 300))]
    for ids in id_lists:
        for skip in (False, True):
            requests.append({"ids": ids, "skip_special_tokens": skip})
            expected.append(("text", reference.decode(ids, skip_special_tokens=skip)))

    answers = ask(tools_dir, tokenizer_json, requests)
    mismatches, refused = [], 0
    for request, (key, want), got in zip(requests, expected, answers):
        if "error" in got and "text" in request and may_fail(request["text"]):
            refused += 1
            continue
        if got.get(key) != want:
            mismatches.append(f"{request!r}\n    ours:   {got!r}\n    theirs: {want!r}")
    assert not mismatches, f"{len(mismatches)} of {len(requests)} differ:\n" + "\n".join(mismatches[:8])
    return refused


def train(tokenizer, vocab_size=700, special_tokens=(), byte_level=False):
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=list(special_tokens), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet() if byte_level else [])
    tokenizer.train_from_iterator(corpus(), trainer=trainer)
    return tokenizer


def save(tokenizer, path: Path, edit=None):
    """Saves tokenizer.json, optionally editing its JSON (what the Python API cannot set)."""
    config = json.loads(tokenizer.to_str())
    if edit:
        edit(config)
    path.write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    return path


def add_byte_fallback_tokens(config):
    """SentencePiece conversions carry <0x00>..<0xFF> in the model vocabulary.

    They go right after the trained tokens; added tokens outside the vocabulary move up, as
    `tokenizers` numbers those from the vocabulary size on.
    """
    vocab = config["model"]["vocab"]
    first = max(vocab.values()) + 1
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = first + b
    for token in config["added_tokens"]:
        if token["content"] not in vocab:
            token["id"] += 256


def template(tokenizer, bos):
    return processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                         special_tokens=[(bos, tokenizer.token_to_id(bos))])


def extra_added_tokens(tokenizer, normalized_word="foo"):
    tokenizer.add_tokens([
        AddedToken("[MASK]", lstrip=True, rstrip=True, normalized=False, special=False),
        AddedToken("hello world", single_word=True, normalized=True),
        AddedToken(normalized_word, normalized=True),
    ])


def test_gpt2_byte_level(tools_dir, tmp_path):
    for add_prefix_space in (False, True):
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
        tokenizer.decoder = decoders.ByteLevel()
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)
        train(tokenizer, special_tokens=["<|endoftext|>"], byte_level=True)
        extra_added_tokens(tokenizer)
        compare(tools_dir, save(tokenizer, tmp_path / f"gpt2_{add_prefix_space}.json"))


def test_byte_level_normalizer_and_legacy_merges(tools_dir, tmp_path):
    """A ByteLevel normalizer instead of the pre-tokenizer, and merges as "a b" strings."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.ByteLevel()
    tokenizer.decoder = decoders.ByteLevel()
    train(tokenizer, vocab_size=400, byte_level=True)
    extra_added_tokens(tokenizer)

    def legacy_merges(config):
        config["model"]["merges"] = [" ".join(pair) for pair in config["model"]["merges"]]

    compare(tools_dir, save(tokenizer, tmp_path / "byte_level_normalizer.json", legacy_merges))


def test_split_behaviors_and_regex_dialect(tools_dir, tmp_path):
    """Every Split behavior, invert, and Oniguruma's dialect: \\uHHHH, line anchors, (?i:)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"[\u3040-\u30FF]+"), behavior="isolated"),
        pre_tokenizers.Split(Regex(r"^[ \t]+|[ \t]+$"), behavior="merged_with_previous"),
        pre_tokenizers.Split(Regex(r"(?i:the|'s)"), behavior="merged_with_next"),
        pre_tokenizers.Split(Regex(r"\p{P}"), behavior="contiguous"),
        pre_tokenizers.Split(Regex(r"\d"), behavior="merged_with_next", invert=True),
        pre_tokenizers.Split(" ", behavior="removed"),
        pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    train(tokenizer, vocab_size=500, byte_level=True)
    compare(tools_dir, save(tokenizer, tmp_path / "split.json"))


def test_llama3_style(tools_dir, tmp_path):
    tokenizer = Tokenizer(models.BPE(ignore_merges=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    train(tokenizer, vocab_size=900, special_tokens=SPECIALS_LLAMA3, byte_level=True)
    tokenizer.post_processor = processors.Sequence([processors.ByteLevel(trim_offsets=False),
                                                    template(tokenizer, "<|begin_of_text|>")])
    extra_added_tokens(tokenizer)
    path = save(tokenizer, tmp_path / "llama3.json")
    assert json.loads(path.read_text())["model"]["ignore_merges"] is True
    compare(tools_dir, path)


def test_qwen2_style_with_nfc(tools_dir, tmp_path):
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    train(tokenizer, vocab_size=800, special_tokens=SPECIALS_QWEN2, byte_level=True)
    compare(tools_dir, save(tokenizer, tmp_path / "qwen2.json"))
    assert any(unicodedata.normalize("NFC", text) != text for text in PROBES), "no probe that NFC changes"


@pytest.mark.parametrize("form", ["NFD", "NFKC", "NFKD"])
def test_unicode_normalizers(tools_dir, tmp_path, form):
    """The other normalization forms (utf8proc's tables against `tokenizers`' own)."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Sequence([getattr(normalizers, form)(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(prepend_scheme="always")
    train(tokenizer, vocab_size=600, special_tokens=["<unk>"])
    compare(tools_dir, save(tokenizer, tmp_path / f"{form}.json"))
    assert any(unicodedata.normalize(form, text) != text for text in PROBES), f"no probe that {form} changes"


def sentencepiece_bpe(unk_fuse=True):
    return models.BPE(unk_token="<unk>", fuse_unk=unk_fuse, byte_fallback=True)


SP_DECODER = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]


def test_llama2_sentencepiece_normalizers(tools_dir, tmp_path):
    """Llama 2 / Mistral v0.1 conversions: Prepend + Replace, no pre-tokenizer, byte fallback."""
    tokenizer = Tokenizer(sentencepiece_bpe())
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence(SP_DECODER + [decoders.Strip(" ", 1, 0)])
    train(tokenizer, special_tokens=SPECIALS_SP)
    tokenizer.post_processor = template(tokenizer, "<s>")
    extra_added_tokens(tokenizer)
    compare(tools_dir, save(tokenizer, tmp_path / "llama2.json", add_byte_fallback_tokens))


def test_sentencepiece_metaspace(tools_dir, tmp_path):
    """Newer Llama 2 / Mistral conversions: Metaspace with prepend_scheme "first", no split."""
    tokenizer = Tokenizer(sentencepiece_bpe(unk_fuse=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tokenizer.decoder = decoders.Sequence(SP_DECODER + [decoders.Strip(" ", 1, 0)])
    train(tokenizer, special_tokens=SPECIALS_SP)
    tokenizer.post_processor = template(tokenizer, "<s>")
    extra_added_tokens(tokenizer)
    compare(tools_dir, save(tokenizer, tmp_path / "metaspace.json", add_byte_fallback_tokens))


def test_gemma_style_replace_only(tools_dir, tmp_path):
    tokenizer = Tokenizer(sentencepiece_bpe())
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    tokenizer.decoder = decoders.Sequence(SP_DECODER)
    train(tokenizer, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"])
    tokenizer.post_processor = template(tokenizer, "<bos>")
    compare(tools_dir, save(tokenizer, tmp_path / "gemma.json", add_byte_fallback_tokens))


def test_metaspace_split_digits_lowercase(tools_dir, tmp_path):
    """The remaining components: Metaspace split + decoder, Digits, Lowercase, Strip, regex Replace."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Strip(left=False, right=True), normalizers.Lowercase(),
                                                 normalizers.Replace(Regex(r"\d{4,}"), "####")])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                       pre_tokenizers.Metaspace(prepend_scheme="always")])
    tokenizer.decoder = decoders.Metaspace(prepend_scheme="always")
    train(tokenizer, vocab_size=500, special_tokens=["<unk>", "[CLS]", "[SEP]"])
    tokenizer.post_processor = processors.BertProcessing(("[SEP]", tokenizer.token_to_id("[SEP]")),
                                                         ("[CLS]", tokenizer.token_to_id("[CLS]")))
    extra_added_tokens(tokenizer, normalized_word="FOO")
    compare(tools_dir, save(tokenizer, tmp_path / "metaspace_split.json"))


def test_megatron_bridge_fixture(tools_dir, mb_fixtures):
    compare(tools_dir, mb_fixtures / "hf_base" / "tokenizer.json")


def test_unsupported_components_are_rejected(tools_dir, tmp_path):
    tokenizer = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    path = save(tokenizer, tmp_path / "wordpiece.json")
    proc = run([tools_dir / "tokenize", path], check=False, input="")
    assert proc.returncode == 2
    assert str(path) in proc.stderr and "WordPiece" in proc.stderr and '"model"' in proc.stderr

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.BertNormalizer()
    path = save(tokenizer, tmp_path / "bert_normalizer.json")
    proc = run([tools_dir / "tokenize", path], check=False, input="")
    assert proc.returncode == 2 and "BertNormalizer" in proc.stderr and '"normalizer"' in proc.stderr
