"""The command line: options from INI files, priorities, the implicit export command, usage errors."""
from safetensors import safe_open

from conftest import run

HF = "hf_base"
CKPT = "tp1pp1/lora/megatron_ckpt"


def dtypes(path):
    with safe_open(path, "pt") as f:
        return {str(f.get_slice(k).get_dtype()) for k in f.keys()}


def test_config_file_sets_options_and_command_line_wins(adapter_job_bin, mb_fixtures, tmp_path):
    ini = tmp_path / "export.ini"
    ini.write_text(f"hf-model-id = {mb_fixtures / HF}\n"
                   f"megatron-peft-checkpoint = {mb_fixtures / CKPT}\n"
                   f"output-hf-path = {tmp_path / 'from_ini'}\n"
                   "dtype = fp32\n")
    run([adapter_job_bin, "export", "--config", ini])
    assert dtypes(tmp_path / "from_ini" / "adapter_model.safetensors") == {"F32"}

    run([adapter_job_bin, "export", "--config", ini, "--dtype", "bf16",
         "--output-hf-path", tmp_path / "from_cli"])
    assert dtypes(tmp_path / "from_cli" / "adapter_model.safetensors") == {"BF16"}


def test_export_is_the_default_command_and_accepts_trust_remote_code(adapter_job_bin, mb_fixtures, tmp_path):
    out = tmp_path / "adapter"
    proc = run([adapter_job_bin, "--hf-model-id", mb_fixtures / HF, "--megatron-peft-checkpoint",
                mb_fixtures / CKPT, "--output-hf-path", out, "--trust-remote-code"])
    assert "exported LoRA adapter: 4 layers, 56 tensors" in proc.stdout
    assert (out / "adapter_config.json").exists()


def test_usage_errors(adapter_job_bin, mb_fixtures, tmp_path):
    cases = [
        # run_config.yaml's base is a path on the machine it was trained on
        (["export", "--megatron-peft-checkpoint", mb_fixtures / CKPT],
         "--hf-model-id is not given, and the base model"),
        (["export", "--no-such-option"], "unrecognised option '--no-such-option'"),
        (["export", "--hf-model-id", "x", "--megatron-peft-checkpoint", "y", "--dtype", "int8"], "--dtype"),
        (["export", "--hf-model-id", "x", "--megatron-peft-checkpoint", "y", "--backend", "gloo"], "--backend"),
        (["export", "--config", tmp_path / "missing.ini"], "missing.ini"),
        (["frobnicate"], "unknown command 'frobnicate'"),
        (["inspect"], "missing the checkpoint path"),
    ]
    for args, message in cases:
        proc = run([adapter_job_bin, *args], check=False)
        assert proc.returncode == 2, (args, proc.returncode, proc.stderr)
        assert message in proc.stderr, (args, proc.stderr)


def test_help_and_version(adapter_job_bin):
    for command in ("export", "stream", "inspect", "version"):
        proc = run([adapter_job_bin, command, "--help"])
        assert "--help" in proc.stdout
    assert run([adapter_job_bin, "version"]).stdout.startswith("adapter_job ")


def test_dtype_conversions_match_torch(adapter_job_bin, mb_fixtures, tmp_path):
    """--dtype rounds like torch's .to(): bf16 -> fp16 (round to nearest even, subnormals) and fp32."""
    import torch
    from safetensors.torch import load_file

    from dcp_helpers import bits

    reference = load_file(mb_fixtures / "tp1pp1/lora/mb_export_adapter/adapter_model.safetensors")
    for name, dtype in (("fp16", torch.float16), ("fp32", torch.float32)):
        out = tmp_path / name
        run([adapter_job_bin, "export", "--hf-model-id", mb_fixtures / HF, "--megatron-peft-checkpoint",
             mb_fixtures / CKPT, "--output-hf-path", out, "--dtype", name])
        ours = load_file(out / "adapter_model.safetensors")
        for key, want in reference.items():
            assert torch.equal(bits(ours[key]), bits(want.to(dtype))), (name, key)


def settings(text):
    """{key: ([values], source)} from --print-config output, read as configparser-free INI lines."""
    out = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key_value, source = line.split("  # ", 1)
        key, value = (part.strip() for part in key_value.split("=", 1))
        values, _ = out.get(key, ([], None))
        out[key] = (values + [value], source)
    return out


def test_print_config_names_each_source_and_round_trips(adapter_job_bin, repo_root, tmp_path):
    ini = tmp_path / "mine.ini"
    ini.write_text("dtype = fp32\nbackend = nccl\nprompt = from the file\n")
    proc = run([adapter_job_bin, "export", "--print-config", "--config", ini, "--backend", "mpi",
                "--hf-model-id", "/models/base"])
    got = settings(proc.stdout)
    assert got["hf-model-id"] == (["/models/base"], "command line")
    assert got["backend"] == (["mpi"], "command line")              # the command line beats --config
    assert got["dtype"] == (["fp32"], f"--config {ini}")
    assert got["prompt"] == (["from the file"], f"--config {ini}")
    assert got["overwrite"] == (["false"], f"defaults {repo_root / 'config' / 'export.ini'}")
    assert got["top-k"] == (["5"], "built-in default")
    assert "# megatron-peft-checkpoint is not set" in proc.stdout
    assert not (tmp_path / "my_adapter").exists() and "exported" not in proc.stdout

    # What it prints is a config file that gives the same settings.
    again = tmp_path / "printed.ini"
    again.write_text(proc.stdout)
    reread = settings(run([adapter_job_bin, "export", "--print-config", "--config", again]).stdout)
    assert {k: v for k, (v, _) in reread.items()} == {k: v for k, (v, _) in got.items()}
    assert reread["backend"][1] == f"--config {again}"


def export_args(mb_fixtures, out):
    return ["export", "--hf-model-id", mb_fixtures / HF, "--megatron-peft-checkpoint",
            mb_fixtures / "tp2pp2/lora/megatron_ckpt", "--output-hf-path", out, "--verify-device", "cpu"]


def test_log_lines_without_a_terminal(adapter_job_bin, mb_fixtures, tmp_path):
    import re
    proc = run(["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2", adapter_job_bin,
                *export_args(mb_fixtures, tmp_path / "a")])
    lines = proc.stderr.splitlines()
    stamp = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ info "
    final = stamp + r"export: 4/4 layers, 0\.1 MB gathered, 56 tensors \(0\.1 MB\) written, [0-9.]+ MB/s, [0-9.]+ s$"
    assert [l for l in lines if re.match(final, l)], proc.stderr
    assert [l for l in lines if re.match(stamp + r"verify: 4/4 layers", l)], proc.stderr
    assert not [l for l in lines if "\r" in l], "no redrawing in a log"
    # Only rank 0 speaks: one final line per stage, not one per rank.
    assert sum("export: 4/4 layers" in l for l in lines) == 1
    assert "exported LoRA adapter" in proc.stdout and "verification PASSED" in proc.stdout


def test_quiet_and_log_level(adapter_job_bin, mb_fixtures, tmp_path):
    quiet = run([adapter_job_bin, *export_args(mb_fixtures, tmp_path / "q"), "--quiet"])
    assert quiet.stdout == "" and quiet.stderr == ""
    assert (tmp_path / "q" / "adapter_model.safetensors").exists()
    warn = run([adapter_job_bin, *export_args(mb_fixtures, tmp_path / "w"), "--log-level", "warning"])
    assert warn.stdout == "" and warn.stderr == ""
    bad = run([adapter_job_bin, *export_args(mb_fixtures, tmp_path / "b"), "--log-level", "loud"], check=False)
    assert bad.returncode == 2 and "--log-level must be error, warning, info or debug" in bad.stderr
    debug = run([adapter_job_bin, *export_args(mb_fixtures, tmp_path / "d"), "--log-level", "debug"])
    assert sum(" info export: " in l for l in debug.stderr.splitlines()) == 4, "a line per layer"
    # A stage of more steps than quarters: the lines only debug shows say debug.
    merge = ["merge", "--hf-model-id", mb_fixtures / HF, "--megatron-peft-checkpoint",
             mb_fixtures / "tp2pp2/lora/megatron_ckpt", "--no-verify"]
    info = run([adapter_job_bin, *merge, "--output-hf-path", tmp_path / "mi"]).stderr.splitlines()
    debug = run([adapter_job_bin, *merge, "--output-hf-path", tmp_path / "md", "--log-level", "debug"])
    lines = debug.stderr.splitlines()
    steps = int(next(l for l in lines if " info merge: " in l).split("/")[1].split()[0])
    assert steps > 4
    shown = sum(" info merge: " in l for l in info)  # the first step, each quarter, the end
    assert shown == 5 and sum(" info merge: " in l for l in lines) == shown, lines
    assert sum(" debug merge: " in l for l in lines) == steps - shown, lines
    assert not any(" debug " in l for l in info)


def test_progress_bar_on_a_terminal(adapter_job_bin, mb_fixtures, tmp_path):
    import os
    import pty
    import subprocess
    leader, follower = pty.openpty()
    proc = subprocess.run([str(a) for a in [adapter_job_bin, *export_args(mb_fixtures, tmp_path / "t")]],
                          stdout=subprocess.PIPE, stderr=follower, timeout=120)
    os.close(follower)
    shown = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:
            break
        if not chunk:
            break
        shown += chunk
    os.close(leader)
    assert proc.returncode == 0
    text = shown.decode()
    assert "\rexport  [" in text or "\r\x1b[Kexport  [" in text, text
    assert "] 4/4 layers, 0.1 MB gathered, 56 tensors (0.1 MB) written" in text, text
    assert "] 4/4 layers, " in text.split("verify")[-1], text
    assert "#" * 30 in text


def test_print_config_shows_verify_once_and_round_trips(adapter_job_bin, mb_fixtures, tmp_path):
    """--verify and --no-verify are one setting: printed once, as `verify`, and the printed file read back with
    --config keeps it off."""
    common = ["--hf-model-id", mb_fixtures / HF, "--megatron-peft-checkpoint", mb_fixtures / CKPT]
    printed = run([adapter_job_bin, "export", *common, "--no-verify", "--print-config"]).stdout
    lines = [line for line in printed.splitlines() if line.startswith(("verify =", "no-verify"))]
    assert lines == ["verify = false  # no-verify in command line"], lines
    assert not any(line.startswith("no-verify") for line in printed.splitlines())
    ini = tmp_path / "printed.ini"
    ini.write_text(printed)
    proc = run([adapter_job_bin, "export", "--config", ini, "--output-hf-path", tmp_path / "out"])
    assert "not verified (--no-verify was given)" in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    on = run([adapter_job_bin, "export", *common, "--print-config"]).stdout
    assert "verify = true  # built-in default" in on.splitlines()


def test_nccl_backend_with_one_process_says_it_is_not_used(adapter_job_bin, mb_fixtures, tmp_path):
    report = tmp_path / "report.json"
    proc = run([adapter_job_bin, "export", "--hf-model-id", mb_fixtures / HF, "--megatron-peft-checkpoint",
                mb_fixtures / CKPT, "--output-hf-path", tmp_path / "out", "--backend", "nccl", "--no-verify",
                "--report", report])
    note = "--backend nccl: one process moves nothing between ranks, so NCCL was not used"
    assert note in proc.stdout, proc.stdout
    import json
    assert any(n.startswith(note) for n in json.loads(report.read_text())["notes"])


def test_verify_takes_a_config_file(adapter_job_bin, mb_fixtures, tmp_path):
    """verify reads --config FILE as export does (the command line wins) and prints its settings with their
    sources."""
    adapter = tmp_path / "adapter"
    run([adapter_job_bin, "export", "--hf-model-id", mb_fixtures / HF, "--megatron-peft-checkpoint",
         mb_fixtures / CKPT, "--output-hf-path", adapter, "--no-verify"])
    ini = tmp_path / "verify.ini"
    ini.write_text(f"hf-model-id = {mb_fixtures / HF}\nhf-adapter-path = {adapter}\nverify-device = cpu\n"
                   "top-k = 3\n")
    proc = run([adapter_job_bin, "verify", "--config", ini, "--report", tmp_path / "r.json"])
    assert "verification PASSED" in proc.stdout, proc.stdout
    import json
    assert json.loads((tmp_path / "r.json").read_text())["top_k"] == 3
    printed = run([adapter_job_bin, "verify", "--config", ini, "--top-k", "7", "--print-config"]).stdout
    assert f"verify-device = cpu  # --config {ini}" in printed.splitlines(), printed
    assert "top-k = 7  # command line" in printed.splitlines(), printed


def test_stream_help_and_log_are_its_own(adapter_job_bin, mb_fixtures, tmp_path):
    """stream writes one safetensors file: its help has no PEFT-directory options (--output-hf-path,
    --base-model-name-or-path), which it still accepts from export.ini, and its log says stream."""
    help_text = run([adapter_job_bin, "stream", "--help"]).stdout
    assert "--output " in help_text and "replace an existing output file" in help_text
    assert "--output-hf-path" not in help_text and "--base-model-name-or-path" not in help_text
    assert "--output-hf-path" in run([adapter_job_bin, "export", "--help"]).stdout
    proc = run([adapter_job_bin, "stream", "--hf-model-id", mb_fixtures / HF, "--megatron-peft-checkpoint",
                mb_fixtures / CKPT, "--output", tmp_path / "a.safetensors"])
    assert " info stream: 4/4 layers" in proc.stdout + proc.stderr and " info export:" not in proc.stdout + proc.stderr
    assert (tmp_path / "a.safetensors").exists()


def test_progress_styles(adapter_job_bin, mb_fixtures, tmp_path):
    """--progress json: one object per step for schedulers; none: no progress, the summary stays; bar: drawn even
    when stderr is a pipe (as under mpirun); an unknown style is a usage error."""
    import json
    proc = run([adapter_job_bin, *export_args(mb_fixtures, tmp_path / "j"), "--progress", "json"])
    events = [json.loads(l) for l in proc.stderr.splitlines() if l.startswith("{")]
    assert [(e["stage"], e["done"], e["total"]) for e in events if e["stage"] == "export"] == [
        ("export", i, 4) for i in range(1, 5)], events
    assert [e["done"] for e in events if e["stage"] == "verify"] == [1, 2, 3, 4]
    last = [e for e in events if e["stage"] == "export"][-1]
    assert last["eta_s"] == 0 and last["tensors"] == 56 and last["rank"] == 0 and last["unit"] == "layers"
    assert not [l for l in proc.stderr.splitlines() if " info export: " in l]
    assert "exported LoRA adapter" in proc.stdout

    none = run([adapter_job_bin, *export_args(mb_fixtures, tmp_path / "n"), "--progress", "none"])
    assert "export:" not in none.stderr and "verify:" not in none.stderr and "exported LoRA adapter" in none.stdout

    bar = run([adapter_job_bin, *export_args(mb_fixtures, tmp_path / "b"), "--progress", "bar"])
    assert "\x1b[K" in bar.stderr and "[##############################] 4/4 layers" in bar.stderr, bar.stderr

    bad = run([adapter_job_bin, *export_args(mb_fixtures, tmp_path / "x"), "--progress", "loud"], check=False)
    assert bad.returncode == 2 and "--progress must be auto, bar, lines, json or none" in bad.stderr
