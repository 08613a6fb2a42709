"""PEFT's patterns (target_modules, exclude_modules, rank_pattern, alpha_pattern, layers_pattern, modules_to_save)
are Python `re` patterns; text::Regex (PCRE2, Python dialect) must answer as `re` does, spans and groups included.

Each pattern is tried the way PEFT 0.21 applies it (the wrappers below are read from PEFT's own source, so a PEFT
that changes them fails here first) on module names, and on texts that tell the engines apart: lookbehind, inline
flags, Unicode \\d and case folding, named groups, \\Z, $ before a final newline. std::regex (ECMAScript), what the
verifier used before, answers too: the test also asserts that it really disagrees with `re` on those, so that
agreement of PCRE2 is not an accident of easy cases.
"""
import inspect
import json
import re

import pytest

from conftest import run

# How PEFT 0.21 calls `re` (tuners_utils.check_target_module_exists, utils/other.py get_pattern_key,
# match_target_against_key): (anchor, wrapper of the configured pattern, the source text that shows it).
TARGET = ("fullmatch", "{}", "re.fullmatch(target_pattern, key)")
EXCLUDE = ("fullmatch", "{}", "re.fullmatch(config.exclude_modules, key)")
RANK_ALPHA = ("match", r"(.*\.)?({})$", 'rf"(.*\\.)?({key})$"')
SAVED = ("match", r"(^|.*\.){}($|\..*)", 'rf"(^|.*\\.){m}($|\\..*)"')
LAYERS = ("match", r"(?:^|.*?\.){}\.(?P<idx>\d+)\.", 'rf"(?:^|.*?\\.){pattern}\\.(?P<idx>\\d+)\\."')
LAYERS_DEFAULT = ("match", r".*?\.[^.]*\.(?P<idx>\d+)\.", 'r".*?\\.[^.]*\\.(?P<idx>\\d+)\\."')

MODULES = [
    "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.12.mlp.down_proj",
    "model.layers.3.mlp.experts.7.up_proj", "model.embed_tokens", "lm_head", "model.layers.1.mlp.gate_proj",
    "model.layers.\u0663.self_attn.q_proj", "model.layers.0.self_attn.Q_PROJ", "model.layers.0.self_attn.q_proj\n",
    "blocks.2.attn.\u212aey", "model.decoder.layers.5.fc1",
]

# (kind, configured pattern, why std::regex would differ or None)
PATTERNS = [
    (TARGET, r".*\.(q_proj|v_proj)", None),
    (TARGET, r"model\.layers\.[13]\..*", None),
    (TARGET, r".*(?<!mlp)\.\w+_proj", "lookbehind"),
    (TARGET, r"(?i).*\.q_proj", "inline flag"),
    (TARGET, r"model\.layers\.\d+\.self_attn\.q_proj", "unicode digit"),
    (TARGET, r".*\.(?i:KEY)", "inline flag"),
    (EXCLUDE, r".*\.mlp\.(?!down)\w+", None),
    (EXCLUDE, r"(?P<stack>model)\.layers\.\d\..*", "named group"),
    (RANK_ALPHA, "q_proj", None),
    (RANK_ALPHA, r"layers\.0\.self_attn\.q_proj", None),
    (RANK_ALPHA, "down_proj|up_proj", None),
    (RANK_ALPHA, r"(?<=mlp\.)down_proj", "lookbehind"),
    (RANK_ALPHA, r"q_proj\Z", "\\Z"),
    (RANK_ALPHA, r"(?i:Q_PROJ)", "inline flag"),
    (RANK_ALPHA, r"(?i)Q_PROJ", None),  # global flags inside PEFT's wrapper: re refuses it, so must we
    (SAVED, "lm_head", None),
    (SAVED, "embed_tokens", None),
    (LAYERS, "layers", None),
    (LAYERS, "experts", None),
    (LAYERS, "(?:layers|blocks)", None),
    (LAYERS_DEFAULT, None, None),
]


def peft_source() -> str:
    from peft.tuners import tuners_utils
    from peft.utils import other
    return inspect.getsource(tuners_utils) + inspect.getsource(other)


def python_answer(pattern: str, text: str, anchor: str):
    """`re`'s match as byte spans, or "error" where `re` refuses the pattern."""
    try:
        m = getattr(re, anchor)(pattern, text)
    except re.error:
        return "error"
    if m is None:
        return None
    to_bytes = lambda i: len(text[:i].encode())
    return [None if m.span(g)[0] < 0 else [to_bytes(m.span(g)[0]), to_bytes(m.span(g)[1])]
            for g in range(len(m.groups()) + 1)]


def cases():
    for (anchor, wrapper, _), configured, differs in PATTERNS:
        pattern = wrapper if configured is None else wrapper.format(configured)
        for module in MODULES:
            yield pattern, module, anchor, differs


def test_wrappers_are_pefts():
    source = peft_source()
    for _, _, quoted in (TARGET, EXCLUDE, RANK_ALPHA, SAVED, LAYERS, LAYERS_DEFAULT):
        assert quoted in source, f"PEFT no longer applies patterns as {quoted}"


def test_pcre2_matches_python_re_where_std_regex_does_not(tools_dir):
    requests = [{"pattern": p, "text": t, "anchor": a} for p, t, a, _ in cases()]
    proc = run([tools_dir / "regex_match"], input="".join(json.dumps(r) + "\n" for r in requests))
    answers = [json.loads(line) for line in proc.stdout.split("\n")[:-1]]
    assert len(answers) == len(requests), proc.stderr

    mismatches, std_differs = [], set()
    for (pattern, text, anchor, differs), answer in zip(cases(), answers):
        want = python_answer(pattern, text, anchor)
        ours = "error" if isinstance(answer["pcre2"], dict) else answer["pcre2"]
        if ours != want:
            mismatches.append(f"re.{anchor}({pattern!r}, {text!r}): ours {answer['pcre2']}, Python {want}")
        if answer["std_regex"] != want:
            std_differs.add(differs)
    assert not mismatches, f"{len(mismatches)} of {len(requests)} differ:\n" + "\n".join(mismatches[:10])
    # The hard cases are hard: std::regex got each of them wrong (refused the pattern or matched otherwise).
    assert {d for _, _, d in PATTERNS if d} <= std_differs, std_differs
    assert sum(a["pcre2"] is not None for a in answers) > len(answers) // 5, "too few matches to tell"


def test_pattern_python_refuses_is_refused(tools_dir):
    for pattern in ["(q_proj", "q_proj)", "[a-", "*q", r"\p", "a(?i)b", "(a)(?s)", "((?i)a)", "(?i)a|(?s)b"]:
        with pytest.raises(re.error):
            re.compile(pattern)
        proc = run([tools_dir / "regex_match"],
                   input=json.dumps({"pattern": pattern, "text": "q_proj", "anchor": "fullmatch"}) + "\n")
        assert "error" in json.loads(proc.stdout)["pcre2"], (pattern, proc.stdout)
    # ... and what it accepts is accepted: flags at the start, scoped flags, "(?" inside a class.
    for pattern in ["(?i)a", "(?is)a", "(?i)(?s)a", "a(?i:b)", "[(?i)]", r"[]](?:x)", r"\(?i\)"]:
        re.compile(pattern)
        proc = run([tools_dir / "regex_match"],
                   input=json.dumps({"pattern": pattern, "text": "q_proj", "anchor": "search"}) + "\n")
        assert not isinstance(json.loads(proc.stdout)["pcre2"], dict), (pattern, proc.stdout)
