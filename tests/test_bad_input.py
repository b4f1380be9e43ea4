"""The bad-input matrix: every way a user can hand edgekit something wrong, run through the real CLI.

Each row runs `edgekit ...` in its own process and folder (also its cwd and $TMPDIR) and must exit
non-zero with exactly one line, `edgekit: error: ...`, matching the row's pattern; no traceback, no
"internal error" (an unhandled exception), and the folder must be byte-for-byte what it was before
(no bundle, no temporary folder, no lock file). Rows are forked from one warm process
(tests/cli_zygote.py, which saves ~3 s of imports per row) and a few also run through a fresh `edgekit`
executable; `ROW_COUNT` is the number quoted in the README.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from cli_zygote import Zygote

HERE = Path(__file__).resolve().parent
STORIES = HERE.parent / "edgekit" / "data" / "stories260k"
BIN = Path(sys.executable).with_name("edgekit")


@dataclass(frozen=True)
class Row:
    id: str
    argv: tuple[str, ...]  # {m}: broken-models folder, {b}: a good bundle, {d}: this row's folder
    expect: str  # regex the error line must match (case-insensitive)
    setup: Callable[[Path, Path], None] | None = None  # (row folder, good bundle) → None
    needs_mount: bool = False


def _copy_bundle(name: str, mutate: Callable[[Path], None]) -> Callable[[Path, Path], None]:
    def setup(d: Path, bundle: Path) -> None:
        shutil.copytree(bundle, d / name)
        mutate(d / name)

    return setup


def _edit_manifest(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def mutate(b: Path) -> None:
        m = json.loads((b / "edgekit.json").read_text())
        edit(m)
        (b / "edgekit.json").write_text(json.dumps(m))

    return mutate


def _flip_byte(b: Path) -> None:
    p = b / "model.onnx"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))


def _mkdir(*names: str) -> Callable[[Path, Path], None]:
    def setup(d: Path, bundle: Path) -> None:
        for n in names:
            (d / n).mkdir(parents=True)

    return setup


def _write(name: str, text: str) -> Callable[[Path, Path], None]:
    def setup(d: Path, bundle: Path) -> None:
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_text(text)

    return setup


EXPORT = ("export",)
ROWS: list[Row] = [
    # --- where the model comes from ---
    Row("missing-path", (*EXPORT, "./no-such-model"), r"not found"),
    Row("missing-hub-id", (*EXPORT, "nobody/no-such-model"), r"not found.*Hugging Face cache"),
    Row("model-path-is-a-file", (*EXPORT, "{m}/llama/config.json"), r"config\.json is not a GGUF file \(bad magic"),
    # --- GGUF files ---
    Row("gguf-not-gguf", (*EXPORT, "{m}/gguf/not-gguf.gguf"), r"not-gguf\.gguf is not a GGUF file"),
    Row("gguf-truncated", (*EXPORT, "{m}/gguf/truncated.gguf"), r"truncated\.gguf is truncated"),
    Row("gguf-unsupported-architecture", (*EXPORT, "{m}/gguf/phi3.gguf"), r"GGUF architecture 'phi3' is not supported"),
    Row("gguf-unsupported-tensor-type", (*EXPORT, "{m}/gguf/f64.gguf"), r"output\.weight has type F64"),
    Row("gguf-no-tokenizer", (*EXPORT, "{m}/gguf/no-tokenizer.gguf"), r"has no tokenizer metadata"),
    Row("gguf-folder-with-two", (*EXPORT, "{m}/gguf"), r"holds \d+ GGUF files"),
    Row("gguf-keep-without-gguf", (*EXPORT, "stories260k", "--quant", "keep"), r"--quant keep .*GGUF"),
    Row(
        "int4-algo-q4_1-other-block",
        (*EXPORT, "stories260k", "--quant", "int4", "--int4-algo", "q4_1", "--block-size", "128"),
        r"q4_1 has blocks of 32",
    ),
    Row(
        "int4-algo-hqq-symmetric",
        (*EXPORT, "stories260k", "--quant", "int4", "--int4-algo", "hqq", "--symmetric"),
        r"hqq fits a zero point per block",
    ),
    Row(
        "int4-algo-gptq-standard-flavour",
        (*EXPORT, "stories260k", "--quant", "int4", "--int4-algo", "gptq", "--flavour", "standard"),
        r"standard graph \(mobile EPs\) has no int4 weights",
    ),
    Row(
        "kv-cache-fp16-under-fp32",
        (*EXPORT, "stories260k", "--kv-cache", "fp16"),
        r"--kv-cache fp16 with fp32 activations: .*4-160x slower",
    ),
    Row(
        "kv-cache-int8-standard-flavour",
        (*EXPORT, "stories260k", "--quant", "int8", "--kv-cache", "int8", "--flavour", "standard"),
        r"--kv-cache int8: the standard graph .* no quantized cache",
    ),
    Row(
        "kv-window-without-a-sliding-window",
        (*EXPORT, "stories260k", "--kv-window"),
        r"--kv-window: no kept layer of .* has a sliding window shorter than the context",
    ),
    Row(
        "kv-window-standard-flavour",
        (*EXPORT, "stories260k", "--kv-window", "--flavour", "standard"),
        r"--kv-window: the standard graph's cache is plain Concat ops",
    ),
    Row("fill-unknown", (*EXPORT, "stories260k", "--skip", "1", "--fill", "median"), r"'median' is not one of"),
    Row(
        "gguf-keep-standard-flavour",
        (*EXPORT, "{m}/gguf-ok/ok.gguf", "--quant", "keep", "--flavour", "standard"),
        r"--quant keep needs the fused flavour",
    ),
    Row("folder-not-a-model", (*EXPORT, "{m}/empty"), r"no config\.json"),
    Row("config-not-json", (*EXPORT, "{m}/config-not-json"), r"not valid JSON"),
    Row("config-not-an-object", (*EXPORT, "{m}/config-list"), r"JSON object"),
    Row("config-bad-values", (*EXPORT, "{m}/config-zero-heads"), r"config|heads"),
    Row("config-absurd-layer-count", (*EXPORT, "{m}/config-1e9-layers"), r"missing from the checkpoint"),
    Row("config-zero-layers", (*EXPORT, "{m}/config-0-layers"), r"num_hidden_layers must be a whole number"),
    Row("config-without-weights", (*EXPORT, "{m}/no-weights"), r"no weights"),
    Row("safetensors-truncated", (*EXPORT, "{m}/truncated"), r"cannot read weights model\.safetensors"),
    Row("safetensors-corrupt-header", (*EXPORT, "{m}/corrupt-header"), r"cannot read weights model\.safetensors"),
    Row("safetensors-padded", (*EXPORT, "{m}/padded-safetensors"), r"cannot read weights model\.safetensors"),
    Row("safetensors-empty-file", (*EXPORT, "{m}/empty-safetensors"), r"cannot read weights model\.safetensors"),
    Row("weights-shape-mismatch", (*EXPORT, "{m}/wrong-shapes"), r"has shape .* but the config implies"),
    Row("weights-tensor-missing", (*EXPORT, "{m}/missing-tensor"), r"missing from the checkpoint"),
    Row("unsupported-architecture", (*EXPORT, "{m}/gpt2"), r"unsupported architecture 'gpt2'"),
    Row("unsupported-activation", (*EXPORT, "{m}/gelu"), r"unsupported activation"),
    Row("gemma3-soft-capping", (*EXPORT, "{m}/gemma3-softcap"), r"final_logit_softcapping .*soft-capping"),
    Row("gemma3-multimodal", (*EXPORT, "{m}/gemma3-multimodal"), r"multimodal.*gemma3_text"),
    # --- code in the checkpoint: refused by default, pickles never unpickled freely ---
    Row("remote-code-refused", (*EXPORT, "{m}/remote-code"), r"auto_map.*--trust-remote-code"),
    Row("pickle-refused-by-default", (*EXPORT, "{m}/pickle"), r"pickle weights.*--allow-pickle"),
    Row("malicious-pickle-refused", (*EXPORT, "{m}/evil-pickle"), r"pickle weights.*--allow-pickle"),
    Row("malicious-pickle-with-flag", (*EXPORT, "{m}/evil-pickle", "--allow-pickle"), r"refusing.*posix\.system"),
    Row(
        "malicious-raw-pickle-with-flag",
        (*EXPORT, "{m}/evil-raw-pickle", "--allow-pickle"),
        r"refusing .*besides tensors",
    ),
    # --- skip sets ---
    Row("skip-not-a-number", (*EXPORT, "stories260k", "--skip", "two"), r"--skip two: expected a whole number"),
    Row("skip-negative", (*EXPORT, "stories260k", "--skip", "-1"), r"--skip -1"),
    Row("skip-unknown-rule", (*EXPORT, "stories260k", "--skip", "best:2"), r"RULE one of auto, cosine, gatenorm"),
    Row("skip-ranked-every-layer", (*EXPORT, "stories260k", "--skip", "gatenorm:5"), r"between 0 and 4"),
    Row("skip-every-layer", (*EXPORT, "stories260k", "--skip", "5"), r"5 layers"),
    Row("skip-more-than-layers", (*EXPORT, "stories260k", "--skip", "99"), r"5 layers"),
    Row("skip-layers-out-of-range", (*EXPORT, "stories260k", "--skip-layers", "2,7"), r"layer 7 is out of range"),
    Row("skip-layers-malformed", (*EXPORT, "stories260k", "--skip-layers", "1;2"), r"cannot read '1;2'"),
    Row("skip-layers-empty-item", (*EXPORT, "stories260k", "--skip-layers", "1,,2"), r"cannot read ''"),
    Row("skip-layers-backwards", (*EXPORT, "stories260k", "--skip-layers", "3-1"), r"runs backwards"),
    Row("skip-layers-duplicate", (*EXPORT, "stories260k", "--skip-layers", "1,1"), r"listed twice"),
    Row("skip-layers-empty", (*EXPORT, "stories260k", "--skip-layers", " "), r"empty layer list"),
    Row("skip-layers-huge-range", (*EXPORT, "stories260k", "--skip-layers", "0-9999999"), r"implausibly long"),
    Row("skip-layers-huge-number", (*EXPORT, "stories260k", "--skip-layers", "1" * 5000), r"cannot read '1111"),
    Row("skip-layers-unicode-digit", (*EXPORT, "stories260k", "--skip-layers", "²"), r"cannot read '²'"),
    Row("skip-and-skip-layers", (*EXPORT, "stories260k", "--skip", "1", "--skip-layers", "2"), r"not both"),
    # --- options ---
    Row("quant-unknown", (*EXPORT, "stories260k", "--quant", "int3"), r"--quant.*int3"),
    Row("block-size-invalid", (*EXPORT, "stories260k", "--quant", "int4", "--block-size", "24"), r"power of two"),
    Row("accuracy-level-invalid", (*EXPORT, "stories260k", "--accuracy-level", "9"), r"must be 0-4"),
    Row("int8-kernel-unknown", (*EXPORT, "stories260k", "--int8-kernel", "fast"), r"--int8-kernel.*fast"),
    Row(
        "int8-kernel-not-int8",
        (*EXPORT, "stories260k", "--quant", "int4", "--int8-kernel", "dynamic"),
        r"needs --quant int8",
    ),
    Row(
        "int8-kernel-standard-flavour",
        (*EXPORT, "stories260k", "--quant", "int8", "--int8-kernel", "dynamic", "--flavour", "standard"),
        r"needs the fused flavour",
    ),
    Row("max-context-too-long", (*EXPORT, "stories260k", "--max-context", "100000"), r"--max-context 100000"),
    Row("max-context-too-short", (*EXPORT, "stories260k", "--max-context", "1"), r"--max-context 1"),
    Row("verify-text-missing", (*EXPORT, "stories260k", "--quant", "int8", "--verify-text", "nope.txt"), r"nope\.txt"),
    # --- where the bundle goes ---
    Row(
        "output-exists",
        (*EXPORT, "stories260k", "-o", "{d}/good"),
        r"already exists.*--force",
        _copy_bundle("good", lambda b: None),
    ),
    Row("output-is-a-file", (*EXPORT, "stories260k", "-o", "{d}/file"), r"not a folder", _write("file", "x")),
    Row("output-parent-is-a-file", (*EXPORT, "stories260k", "-o", "{d}/file/b"), r"not a folder", _write("file", "x")),
    Row(
        "output-foreign-folder-force",
        (*EXPORT, "stories260k", "-o", "{d}/photos", "--force"),
        r"not an edgekit bundle",
        _write("photos/cat.jpg", "meow"),
    ),
    Row("output-not-writable", (*EXPORT, "stories260k", "-o", "{d}/ro/b"), r"not writable|read-only", needs_mount=True),
    Row("output-reserved-name", (*EXPORT, "stories260k", "-o", "{d}/.b.edgekit-tmp-1-abcd"), r"reserved"),
    # --- reading bundles: inspect and verify ---
    Row("inspect-missing", ("inspect", "{d}/nothing"), r"does not exist"),
    Row("inspect-not-a-bundle", ("inspect", "{d}/plain"), r"not an edgekit bundle", _mkdir("plain")),
    Row(
        "inspect-temp-folder",
        ("inspect", "{d}/.b.edgekit-tmp-99999999-abcd"),
        r"unfinished export",
        _mkdir(".b.edgekit-tmp-99999999-abcd"),
    ),
    Row(
        "manifest-not-json",
        ("inspect", "{d}/b"),
        r"not valid JSON",
        _copy_bundle("b", lambda b: (b / "edgekit.json").write_text("{")),
    ),
    Row(
        "manifest-deeply-nested",
        ("inspect", "{d}/b"),
        r"nests too deeply",
        _copy_bundle("b", lambda b: (b / "edgekit.json").write_text("[" * 100_000)),
    ),
    Row(
        "manifest-future-schema",
        ("inspect", "{d}/b"),
        r"schema 2",
        _copy_bundle("b", _edit_manifest(lambda m: m.update(schema_version=2))),
    ),
    Row(
        "manifest-missing-key",
        ("inspect", "{d}/b"),
        r"lacks 'graph'",
        _copy_bundle("b", _edit_manifest(lambda m: m.pop("graph"))),
    ),
    Row(
        "manifest-wrong-type",
        ("inspect", "{d}/b"),
        r"architecture\.num_layers must be int",
        _copy_bundle("b", _edit_manifest(lambda m: m["architecture"].update(num_layers="5"))),
    ),
    Row(
        "manifest-path-escape",
        ("verify", "{d}/b"),
        r"not a file name inside the bundle",
        _copy_bundle("b", _edit_manifest(lambda m: m["files"].update({"../x": m["files"]["model.onnx"]}))),
    ),
    Row(
        "manifest-layers-inconsistent",
        ("inspect", "{d}/b"),
        r"each of the 5 layers",
        _copy_bundle("b", _edit_manifest(lambda m: m["skip"].update(kept=[0, 1]))),
    ),
    Row("verify-tampered-file", ("verify", "{d}/b"), r"sha256 differs", _copy_bundle("b", _flip_byte)),
    Row(
        "verify-missing-file",
        ("verify", "{d}/b"),
        r"tokenizer\.json: missing",
        _copy_bundle("b", lambda b: (b / "tokenizer.json").unlink()),
    ),
    Row(
        "verify-extra-file",
        ("verify", "{d}/b"),
        r"evil\.py: not in the manifest",
        _copy_bundle("b", lambda b: (b / "evil.py").write_text("import os")),
    ),
    Row("verify-emulate-unknown-core", ("verify", "{b}", "--emulate", "cortex-a99"), r"cores are cortex-a53"),
    Row(
        "verify-text-without-emulate",
        ("verify", "{b}", "--text", str(STORIES.parent / "calib-tinystories.txt")),
        r"--text goes with --emulate",
    ),
]

RECIPE = (STORIES.parent / "recipes" / "raspberry-pi-5.yaml").read_text()
LONG_PROMPT = "once upon a time " * 300  # ~1,500 tokens; stories260k serves 512
CALIB = str(STORIES.parent / "calib-tinystories.txt")
TAMPERED = _copy_bundle("b", _flip_byte)
ROWS += [
    # --- recipes ---
    Row(
        "recipe-unknown-key",
        (*EXPORT, "stories260k", "--recipe", "r.yaml"),
        r"runtime\.thredas: unknown key",
        _write("r.yaml", RECIPE.replace("  threads: 4", "  threads: 4\n  thredas: 2")),
    ),
    Row(
        "recipe-wrong-type",
        (*EXPORT, "stories260k", "--recipe", "r.yaml"),
        r"device\.cores: 'four'",
        _write("r.yaml", RECIPE.replace("  cores: 4", "  cores: four")),
    ),
    Row(
        "recipe-path-like-name",
        (*EXPORT, "stories260k", "--recipe", "r.yaml"),
        r"must be a plain name",
        _write("r.yaml", RECIPE.replace("name: raspberry-pi-5", "name: ../../etc/passwd")),
    ),
    Row("recipe-not-yaml", (*EXPORT, "stories260k", "--recipe", "r.yaml"), r"not valid YAML", _write("r.yaml", "a: [")),
    Row("recipe-unknown-name", (*EXPORT, "stories260k", "--recipe", "mars-rover"), r"unknown recipe 'mars-rover'"),
    # --- run, profile, eval on bad bundles and bad requests ---
    Row(
        "run-tampered-bundle", ("run", "{d}/b", "Once"), r"does not match its manifest.*--no-integrity-check", TAMPERED
    ),
    Row("run-not-a-bundle", ("run", "{m}/llama", "Once"), r"not an edgekit bundle"),
    Row("run-prompt-longer-than-context", ("run", "{b}", LONG_PROMPT), r"prompt is \d+ tokens.*at most 512"),
    Row("run-unknown-provider", ("run", "{b}", "Once", "--provider", "bogus"), r"unknown provider 'bogus'"),
    Row(
        "run-provider-not-installed",
        ("run", "{b}", "Once", "--provider", "coreml"),
        r"'coreml'.*not in this onnxruntime",
    ),
    Row(
        "run-affinity-not-a-cpu", ("run", "{b}", "Once", "--threads", "2", "--affinity", "²"), r"'²' is not a processor"
    ),
    Row("run-bad-sampling", ("run", "{b}", "Once", "--top-p", "1.5"), r"top.p"),
    Row("profile-tampered-bundle", ("profile", "{d}/b"), r"does not match its manifest", TAMPERED),
    Row("profile-unknown-provider", ("profile", "{b}", "--provider", "bogus"), r"unknown provider 'bogus'"),
    Row("eval-tampered-bundle", ("eval", "{d}/b", "--text", CALIB), r"does not match its manifest", TAMPERED),
    Row("eval-empty-text", ("eval", "{b}", "--text", "empty.txt"), r"empty", _write("empty.txt", " \n\n ")),
    Row("eval-missing-text", ("eval", "{b}", "--text", "nope.txt"), r"nope\.txt"),
    Row("eval-fill-on-a-bundle", ("eval", "{b}", "--fill", "mean", "--text", CALIB), r"is a bundle.*--fill"),
]
ROW_COUNT = len(ROWS)


# --- the broken checkpoints, built once ---


class _Evil:
    """Unpickling this runs a shell command; a safe loader must refuse before it runs."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


def _checkpoint(root: Path, name: str, config: dict | None = None, weights: bool = True) -> Path:
    d = root / name
    shutil.copytree(STORIES, d, ignore=None if weights else shutil.ignore_patterns("*.safetensors"))
    if config is not None:
        base = json.loads((STORIES / "config.json").read_text())
        base.update(config)
        (d / "config.json").write_text(json.dumps(base))
    return d


def _build_broken_models(root: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    sd = load_file(STORIES / "model.safetensors")
    (root / "empty").mkdir()
    _checkpoint(root, "llama")
    (_checkpoint(root, "config-not-json") / "config.json").write_text("{not json")
    (_checkpoint(root, "config-list") / "config.json").write_text("[1, 2]")
    _checkpoint(root, "config-zero-heads", {"num_attention_heads": 0, "num_key_value_heads": 0})
    _checkpoint(root, "config-1e9-layers", {"num_hidden_layers": 10**9})
    _checkpoint(root, "config-0-layers", {"num_hidden_layers": 0})
    _checkpoint(root, "no-weights", weights=False)
    for name, cut in [
        ("truncated", lambda b: b[: len(b) // 2]),
        ("corrupt-header", lambda b: b[:8] + b"\xff\xfe" + b[10:]),
        ("empty-safetensors", lambda b: b""),
        ("padded-safetensors", lambda b: b + b"\0" * 64),
    ]:
        p = _checkpoint(root, name) / "model.safetensors"
        p.write_bytes(cut(p.read_bytes()))
    _checkpoint(root, "wrong-shapes", {"intermediate_size": 256})
    d = _checkpoint(root, "missing-tensor")
    save_file({k: v for k, v in sd.items() if "layers.3.mlp.up_proj" not in k}, d / "model.safetensors")
    _checkpoint(root, "gpt2", {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    _checkpoint(root, "gelu", {"hidden_act": "gelu"})
    _checkpoint(root, "gemma3-softcap", {"model_type": "gemma3_text", "final_logit_softcapping": 30.0})
    _checkpoint(
        root, "gemma3-multimodal", {"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"]}
    )
    d = _checkpoint(root, "remote-code", {"auto_map": {"AutoConfig": "evil.EvilConfig"}})
    (d / "evil.py").write_text(f"open({str(root / 'PWNED-remote')!r}, 'w').close()\n")
    d = _checkpoint(root, "pickle", weights=False)
    torch.save(sd, d / "pytorch_model.bin")
    d = _checkpoint(root, "evil-pickle", weights=False)
    torch.save({**sd, "model.norm.weight": _Evil(root / "PWNED-zip")}, d / "pytorch_model.bin")
    d = _checkpoint(root, "evil-raw-pickle", weights=False)
    (d / "pytorch_model.bin").write_bytes(pickle.dumps({"model.norm.weight": _Evil(root / "PWNED-raw")}))
    _build_broken_ggufs(root / "gguf", root / "gguf-ok")


def _build_broken_ggufs(bad: Path, ok: Path) -> None:
    import numpy as np
    from gguf_testing import write_random_gguf

    bad.mkdir()
    ok.mkdir()
    write_random_gguf(ok / "ok.gguf", qtype="Q8_0")
    (bad / "not-gguf.gguf").write_bytes(b"PK\x03\x04" + bytes(4096))
    data = (ok / "ok.gguf").read_bytes()
    (bad / "truncated.gguf").write_bytes(data[: len(data) // 2])
    write_random_gguf(bad / "phi3.gguf", arch="phi3")
    write_random_gguf(bad / "f64.gguf", extra_tensors={"output.weight": np.zeros((128, 64), dtype=np.float64)})
    write_random_gguf(bad / "no-tokenizer.gguf", tokenizer=False)


# --- running the rows ---

# Run through a fresh `edgekit` executable too (start-up path, import-time behaviour), not only forked.
FRESH = {"missing-path", "remote-code-refused", "malicious-pickle-with-flag", "skip-layers-out-of-range"}
# Third-party caches that persist between runs by design, not edgekit's temporaries: onnxruntime 1.32
# keeps a telemetry session id in $TMPDIR/.ses, torch's dynamo makes an empty $TMPDIR/torchinductor_$USER.
THIRD_PARTY_TMP = re.compile(r"^(\.ses|torchinductor_[^/]*)$")


@dataclass
class Outcome:
    rc: int
    stderr: str
    before: set[str]
    after: set[str]
    tmp_left: list[str]


def _tree(d: Path) -> set[str]:
    return {p.relative_to(d).as_posix() for p in d.rglob("*")}


def _env(tmp: Path) -> dict[str, str]:
    env = {**os.environ, "TMPDIR": str(tmp), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp.parent / "hf-home")}
    env["EDGEKIT_CACHE"] = str(tmp.parent / "edgekit-cache")  # GGUF conversions: outside the checked folders
    env.pop("EDGEKIT_DEBUG", None)
    return env


def _run_row(row: Row, d: Path, models: Path, bundle: Path, zygote: Zygote | None) -> Outcome:
    work, tmp = d / "work", d / "tmp"
    before = _tree(work)
    argv = [a.format(m=models, b=bundle, d=work) for a in row.argv]
    if zygote is None:
        cmd = [str(BIN)] if BIN.exists() else [sys.executable, "-c", "from edgekit.cli import main; main()"]
        r = subprocess.run([*cmd, *argv], cwd=work, env=_env(tmp), capture_output=True, text=True, timeout=300)
        rc, stderr = r.returncode, r.stderr
    else:
        rc = zygote.run(argv, work, _env(tmp), d / "stdout", d / "stderr")
        stderr = (d / "stderr").read_text()
    left = sorted(p for p in _tree(tmp) if not THIRD_PARTY_TMP.match(p.split("/")[0]))
    return Outcome(rc, stderr, before, _tree(work), left)


def _selected(session: pytest.Session) -> list[str]:
    return [m.group(1) for item in session.items if (m := re.match(r"test_bad_input\[(.*)\]$", item.name))]


@pytest.fixture(scope="module")
def matrix(request, tmp_path_factory, bundle_factory):
    models = tmp_path_factory.mktemp("broken-models")
    _build_broken_models(models)
    bundle = bundle_factory(skip=2, quant="int4")
    root = tmp_path_factory.mktemp("matrix")
    wanted = set(_selected(request.session)) or {r.id for r in ROWS}
    mounts: list[Path] = []
    jobs: list[tuple[str, Row, Path, bool]] = []
    for row in ROWS:
        if row.id not in wanted:
            continue
        for fresh in (False, True) if row.id in FRESH else (False,):
            d = root / (row.id + ("-fresh" if fresh else ""))
            (d / "work").mkdir(parents=True)
            (d / "tmp").mkdir()
            if row.setup:
                row.setup(d / "work", bundle)
            if row.needs_mount and not _read_only_folder(d / "work" / "ro", mounts):
                continue
            jobs.append((row.id, row, d, fresh))
    results: dict[str, list[Outcome]] = {}
    zygote = Zygote()
    try:
        with ThreadPoolExecutor(max_workers=1) as pool:  # fresh processes alongside the forked ones
            fresh_jobs = {j[2]: pool.submit(_run_row, j[1], j[2], models, bundle, None) for j in jobs if j[3]}
            for row_id, row, d, fresh in jobs:
                if not fresh:
                    results.setdefault(row_id, []).append(_run_row(row, d, models, bundle, zygote))
            for row_id, _, d, fresh in jobs:
                if fresh:
                    results.setdefault(row_id, []).append(fresh_jobs[d].result())
    finally:
        zygote.close()
        for m in mounts:
            subprocess.run(["umount", str(m)], check=False)
    return models, results


def _read_only_folder(path: Path, mounts: list[Path]) -> bool:
    """A folder the export cannot write into, even as root: a read-only tmpfs mount, else chmod."""
    path.mkdir()
    if os.geteuid() == 0:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(path)], capture_output=True)
        if r.returncode == 0:
            mounts.append(path)
            return True
        return False
    path.chmod(0o555)
    return True


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input(matrix, row: Row):
    models, results = matrix
    if row.id not in results:
        pytest.skip("running as root without permission to mount a read-only tmpfs (needs CAP_SYS_ADMIN)")
    for out in results[row.id]:
        lines = out.stderr.strip().splitlines()
        assert out.rc not in (0, -9), f"rc {out.rc}"
        assert "Traceback" not in out.stderr, out.stderr
        assert len(lines) == 1, f"expected one line on stderr, got:\n{out.stderr}"
        assert lines[0].startswith("edgekit: error: ")
        assert "internal error" not in lines[0], lines[0]
        assert re.search(row.expect, lines[0], re.IGNORECASE), lines[0]
        assert out.after == out.before, f"left behind: {sorted(out.after ^ out.before)}"
        assert out.tmp_left == [], f"left in $TMPDIR: {out.tmp_left}"
    assert not list(models.glob("PWNED*")), "code from the checkpoint ran"


def test_matrix_row_count_is_in_readme():
    readme = (HERE.parent / "README.md").read_text()
    m = re.search(r"bad-input matrix of (\d+) rows", readme)
    assert m, "README's Reliability and security section must quote the matrix size"
    assert int(m.group(1)) == ROW_COUNT
