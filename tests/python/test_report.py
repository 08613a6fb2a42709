"""verification.h5, the report JSON and the table, read back from report_demo's deterministic report.

h5py reads the HDF5 file independently of our writer; every dataset and attribute is held against
the JSON (written by nlohmann), and the full logits against the formula the tool used.
"""
import json
import math
import re
import unicodedata

import h5py
import numpy as np
import pytest

from conftest import run

VOCAB = 32
VARIANTS = ["base", "peft", "merged"]


def logit(p, v, t, j):
    """report_demo.cc's Logit(): multiples of 1/1024, exact in float32."""
    adapter = 11 * (j % 5) if v > 0 else 0
    merge_error = ((t + j) % 3) / 1024.0 if v == 2 else 0.0
    return ((p * 29 + t * 17 + j * 37 + adapter) % 97) / 8.0 - 6.0 + merge_error


def expected_logits(p, v, tokens):
    return np.array([[logit(p, v, t, j) for j in range(VOCAB)] for t in range(tokens)], dtype=np.float32)


@pytest.fixture(scope="module")
def demo(tools_dir, tmp_path_factory):
    stem = tmp_path_factory.mktemp("report") / "demo"
    proc = run([tools_dir / "report_demo", stem])
    report = json.loads(stem.with_suffix(".json").read_text())
    with h5py.File(stem.with_suffix(".h5"), "r") as f:
        yield f, report, proc.stdout


@pytest.fixture(scope="module")
def empty(tools_dir, tmp_path_factory):
    stem = tmp_path_factory.mktemp("report") / "empty"
    proc = run([tools_dir / "report_demo", stem, "--empty"])
    report = json.loads(stem.with_suffix(".json").read_text())
    with h5py.File(stem.with_suffix(".h5"), "r") as f:
        yield f, report, proc.stdout


def strings(dataset):
    info = h5py.check_string_dtype(dataset.dtype)
    assert info is not None and info.encoding == "utf-8" and info.length is None, dataset.name
    return list(dataset.asstr()[()])


def numbers(dataset, dtype):
    assert dataset.dtype == np.dtype(dtype), (dataset.name, dataset.dtype)
    assert dataset.ndim == 1, dataset.name
    return dataset[()]


def test_root_attributes(demo):
    f, report, _ = demo
    assert set(f.attrs) == {"base_model", "adapter_path", "device", "compute_dtype", "top_k", "passed", "seconds"}
    for key in ("base_model", "adapter_path", "device", "compute_dtype"):
        assert f.attrs[key] == report[key], key
        assert h5py.check_string_dtype(f.attrs.get_id(key).dtype).encoding == "utf-8"
    assert f.attrs["top_k"].dtype == np.int64 and f.attrs["top_k"] == report["top_k"] == 5
    assert f.attrs["passed"].dtype == np.uint8 and f.attrs["passed"] == report["passed"] == 0
    assert f.attrs["seconds"].dtype == np.float64 and f.attrs["seconds"] == report["seconds"]
    assert set(f) == {"prompts", "checks", "adapter_tensors"}


def test_prompts_match_json_and_formula(demo):
    f, report, _ = demo
    assert len(report["prompts"]) == 2
    assert sorted(f["prompts"]) == [str(i) for i in range(len(report["prompts"]))]
    for p, want in enumerate(report["prompts"]):
        group = f["prompts"][str(p)]
        assert set(group) == {"token_ids", "logits", "top_k"}
        assert set(group.attrs) == {"prompt"} and group.attrs["prompt"] == want["prompt"]
        token_ids = numbers(group["token_ids"], np.int64)
        assert token_ids.tolist() == want["token_ids"]
        tokens = len(token_ids)

        assert list(group["logits"]) == sorted(VARIANTS)
        for v, variant in enumerate(VARIANTS):
            logits = group["logits"][variant]
            assert logits.dtype == np.float32 and logits.shape == (tokens, VOCAB)
            np.testing.assert_array_equal(logits[()], expected_logits(p, v, tokens))

        assert list(want["top_k"]) == VARIANTS
        assert sorted(group["top_k"]) == sorted(VARIANTS)
        for v, variant in enumerate(VARIANTS):
            top = group["top_k"][variant]
            assert set(top) == {"ids", "logits", "probabilities", "text"}
            ids = numbers(top["ids"], np.int64)
            top_logits = numbers(top["logits"], np.float32)
            probabilities = numbers(top["probabilities"], np.float32)
            text = strings(top["text"])
            entries = want["top_k"][variant]
            assert len(entries) == len(ids) == 5
            assert ids.tolist() == [e["id"] for e in entries]
            assert text == [e["text"] for e in entries]
            assert top_logits.tolist() == [np.float32(e["logit"]) for e in entries]
            assert probabilities.tolist() == [np.float32(e["probability"]) for e in entries]

            # Independently: the best 5 at the last position, ties to the lower id, and the softmax.
            last = expected_logits(p, v, tokens)[-1].astype(np.float64)
            order = np.argsort(-last, kind="stable")[:5]
            assert ids.tolist() == order.tolist()
            np.testing.assert_array_equal(top_logits, last[order].astype(np.float32))
            softmax = np.exp(last - last.max()) / np.exp(last - last.max()).sum()
            np.testing.assert_allclose(probabilities, softmax[order], rtol=1e-6)


def test_checks_match_json(demo):
    f, report, _ = demo
    checks = report["checks"]
    group = f["checks"]
    assert set(group) == {"name", "passed", "figure", "threshold", "relation", "detail"}
    assert strings(group["name"]) == [c["name"] for c in checks]
    assert numbers(group["passed"], np.uint8).tolist() == [int(c["passed"]) for c in checks]
    assert numbers(group["figure"], np.float64).tolist() == [c["figure"] for c in checks]
    assert numbers(group["threshold"], np.float64).tolist() == [c["threshold"] for c in checks]
    assert strings(group["relation"]) == [c["relation"] for c in checks]
    assert strings(group["detail"]) == [c["detail"] for c in checks]

    # The figures follow from the formula: peft and merged differ by 2/1024 at most.
    by_name = {c["name"]: c for c in checks}
    diff = max(np.abs(expected_logits(p, 1, len(pr["token_ids"])) - expected_logits(p, 2, len(pr["token_ids"]))).max()
               for p, pr in enumerate(report["prompts"]))
    assert by_name["peft_vs_merged_max_abs_logit_diff"]["figure"] == diff == 2 / 1024
    assert not by_name["peft_vs_merged_max_abs_logit_diff"]["passed"]
    assert [c["passed"] for c in checks].count(False) == 1


def test_adapter_tensors_match_json(demo):
    f, report, _ = demo
    tensors = report["adapter_tensors"]
    group = f["adapter_tensors"]
    assert set(group) == {"name", "shape", "dtype", "mean", "std", "max_abs", "frobenius_norm"}
    assert strings(group["name"]) == [t["name"] for t in tensors]
    assert strings(group["dtype"]) == [t["dtype"] for t in tensors]
    assert h5py.check_vlen_dtype(group["shape"].dtype) == np.dtype(np.int64)
    assert [s.tolist() for s in group["shape"][()]] == [t["shape"] for t in tensors]
    assert [t["shape"] for t in tensors][-1] == []  # a scalar: an empty sequence
    for key in ("mean", "std", "max_abs", "frobenius_norm"):
        assert numbers(group[key], np.float64).tolist() == [t[key] for t in tensors], key


def test_json_leaves_out_full_logits(demo):
    _, report, _ = demo
    assert list(report) == ["base_model", "adapter_path", "device", "compute_dtype", "top_k", "passed",
                            "seconds", "checks", "prompts", "adapter_tensors"]
    assert list(report["prompts"][0]) == ["prompt", "token_ids", "top_k"]


def test_empty_report_has_zero_length_datasets(empty):
    f, report, table = empty
    assert report["prompts"] == report["checks"] == report["adapter_tensors"] == []
    assert len(f["prompts"]) == 0
    assert f.attrs["passed"] == 0
    for name, dtype in [("name", None), ("passed", np.uint8), ("figure", np.float64),
                        ("threshold", np.float64), ("relation", None), ("detail", None)]:
        dataset = f["checks"][name]
        assert dataset.shape == (0,), name
        if dtype is None:
            assert strings(dataset) == []
        else:
            assert dataset.dtype == dtype
    for name in ("name", "shape", "dtype", "mean", "std", "max_abs", "frobenius_norm"):
        assert f["adapter_tensors"][name].shape == (0,), name
    assert table.endswith("checks: none\nverification FAILED (no checks were run)\n")


# --- the table -------------------------------------------------------------------------------

INVISIBLE = [(0x80, 0x9F), (0xAD, 0xAD), (0x200B, 0x200F), (0x2028, 0x202E), (0x2060, 0x206F), (0xFEFF, 0xFEFF)]


def escape(text):
    """The table's escaping (report.cc Escape): C escapes, \\xNN / \\uNNNN, edge spaces as ␠."""
    if not text:
        return '""'
    first, last = len(text) - len(text.lstrip(" ")), len(text.rstrip(" "))
    out = []
    for i, ch in enumerate(text):
        c = ord(ch)
        if ch == " " and (i < first or i >= last):
            out.append("\u2420")
        elif ch in "\n\t\r\\":
            out.append({"\n": "\\n", "\t": "\\t", "\r": "\\r", "\\": "\\\\"}[ch])
        elif c < 0x20 or c == 0x7F:
            out.append(f"\\x{c:02x}")
        elif any(lo <= c <= hi for lo, hi in INVISIBLE) or (i == 0 and unicodedata.combining(ch)):
            out.append(f"\\u{c:04x}")
        else:
            out.append(ch)
    return "".join(out)


def width(text):
    return sum(0 if unicodedata.combining(ch) else 2 if unicodedata.east_asian_width(ch) in "WF" else 1
               for ch in text)


def prompt_section(table, index):
    lines = table.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"prompt {index} ("))
    end = next(i for i in range(start + 1, len(lines)) if not lines[i].startswith("  "))
    return lines[start:end]


def row_pattern(entries):
    """A rank's row: each variant's escaped text, padding, then its probability."""
    cells = [rf"(?P<text{v}>{re.escape(escape(e['text']))})\s+(?P<prob{v}>{re.escape(format(e['probability'], '.4f'))})"
             for v, e in enumerate(entries)]
    return r"^  \s*\d+   " + r"\s+".join(cells) + "$"


def test_table_shows_top_k_side_by_side(demo):
    _, report, table = demo
    header = table.splitlines()[0]
    for part in ("base model: demo/tiny-llama", "adapter: /runs/demo adapter", "device: cpu", "dtype: float32"):
        assert part in header
    shown = set()
    for p, prompt in enumerate(report["prompts"]):
        section = prompt_section(table, p)
        title = f"prompt {p} ({len(prompt['token_ids'])} tokens): "
        if prompt["prompt"]:
            assert section[0] == title + escape(prompt["prompt"])
        else:
            assert section[0] == title + "(token ids: " + " ".join(map(str, prompt["token_ids"])) + ")"
        names = section[1]
        assert names.split() == ["rank", *VARIANTS]
        rows = section[2:]
        assert len(rows) == report["top_k"]
        probability_columns = set()
        for rank, row in enumerate(rows, start=1):
            assert row.startswith(f"  {rank:>4}   ")
            entries = [prompt["top_k"][v][rank - 1] for v in VARIANTS]
            match = re.match(row_pattern(entries), row)
            assert match, (row, row_pattern(entries))
            # Aligned: each variant's text starts under its name, probabilities in one column.
            for v, variant in enumerate(VARIANTS):
                assert width(row[:match.start(f"text{v}")]) == width(names[:names.index(variant)]), row
            probability_columns.add(tuple(width(row[:match.start(f"prob{v}")]) for v in range(3)))
            shown.update(e["text"] for e in entries)
        assert len(probability_columns) == 1, rows
    # The demo's vocabulary must keep the escaping visible in its top-k.
    assert any(t.startswith(" ") for t in shown) and any(t.endswith(" ") for t in shown), shown
    assert any(escape(t).replace("\u2420", " ") != t for t in shown), shown


def test_table_escapes_control_characters(demo):
    _, _, table = demo
    for ch in "\t\r\x01\x7f\u200b":
        assert ch not in table, repr(ch)
    for line in table.splitlines():
        assert line == line.rstrip(" "), f"trailing spaces: {line!r}"


def test_table_lists_checks_and_verdict(demo):
    _, report, table = demo
    lines = table.splitlines()
    for check in report["checks"]:
        verdict = "PASS" if check["passed"] else "FAIL"
        figure, threshold = format(check["figure"], ".6g"), format(check["threshold"], ".6g")
        pattern = (rf"^  {verdict}  {re.escape(check['name'])}\s+{re.escape(figure)}  "
                   rf"{re.escape(check['relation'])}\s+{re.escape(threshold)}\s+")
        assert any(re.match(pattern, line) for line in lines), pattern
    assert re.search(r"^  FAIL  peft_vs_merged_max_abs_logit_diff\s+0\.00195312  <=  0\.001 ", table, re.M)
    assert lines[-1] == "verification FAILED (1 of 3 checks)"
    assert math.isclose(report["checks"][0]["figure"], 2 / 1024)
