"""Does a bundle compute the same on another machine? What one machine computes (`probe`), and how two
machines' results compare (`compare`).

A probe feeds a text in one prompt (logits at every position) and decodes greedily after a prompt, on
one graph of a bundle: `model.onnx`, its `.ort` twin or the fixed-shape pair. The same probe runs on the
host and, under user-mode emulation, on aarch64 onnxruntime (`edgekit.targets.emulate` starts this module
as `python -m edgekit.runtime.agreement JOBS.json OUT_DIR` there), so it needs numpy and onnxruntime only.
Quantized MatMulNBits kernels differ per CPU feature set (int8 dot products or fp32 compute), which is why
a check on x86 does not vouch for a Raspberry Pi 4.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.bundle.folder import open_bundle
from edgekit.errors import EdgekitError
from edgekit.runtime.fixed_engine import FixedEngine, open_fixed
from edgekit.runtime.kv_engine import KVEngine
from edgekit.runtime.providers import Placement, RuntimeOptions, create_session, with_recipe_options

GRAPHS = ("onnx", "ort", "fixed")
# "exact": every greedy token and every top-1 equal, logits within EXACT_RELATIVE of their scale (what fp32
# kernels give across ISAs); "agrees": the same greedy text, top-1 equal at AGREE_TOP1 of the positions;
# "close": the text diverges but the probe text's perplexity is within CLOSE_PPL of the host's (a kernel
# that rounds differently: the same quality, not the same words); "differs": anything else. Best first.
VERDICTS = ("exact", "agrees", "close", "differs")
EXACT_RELATIVE = 1e-4
AGREE_TOP1 = 0.95
CLOSE_PPL = 0.02


@dataclass(frozen=True)
class ProbeJob:
    bundle: str
    graph: str  # one of GRAPHS
    text_ids: list[int]  # fed as one prompt; logits kept at every position
    prompt_ids: list[int]  # greedy decoding starts after these
    new_tokens: int = 32
    threads: int | None = None
    provider: str = "cpu"  # another provider gets the bundle's recipe options (soc_model for QNN, ...)
    provider_options: dict[str, str] = field(default_factory=dict)  # over the recipe's

    @property
    def key(self) -> str:
        return f"{Path(self.bundle).name}:{self.graph}"


@dataclass(frozen=True)
class Probe:
    greedy: list[int]
    logits: np.ndarray  # [len(text_ids), vocab] float32
    nodes: dict[str, int] = field(default_factory=dict)  # graph nodes per execution provider, as partitioned


@dataclass(frozen=True)
class Agreement:
    greedy_same: int  # leading greedy tokens equal
    greedy_total: int
    top1: float  # share of text positions with the same argmax
    max_abs_dlogit: float
    logit_scale: float  # the host's largest |logit|: what max_abs_dlogit is relative to
    host_ppl: float  # perplexity of the probe text under each machine's logits: is a difference harm or noise?
    other_ppl: float
    verdict: str  # one of VERDICTS

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        same = f"greedy {self.greedy_same}/{self.greedy_total}"
        ppl = f"ppl {self.other_ppl:.2f} vs {self.host_ppl:.2f}"
        return f"{self.verdict:7s} {same}, top-1 {100 * self.top1:.1f}%, max |dlogit| {self.max_abs_dlogit:.2g}, {ppl}"


def _engine(path: str, graph: str, options: RuntimeOptions) -> tuple[KVEngine | FixedEngine, Placement]:
    bundle = open_bundle(path)
    manifest = bundle.manifest
    if options.provider != "cpu":
        options = with_recipe_options(options, manifest)
    if graph == "fixed":
        files = (manifest.get("fixed_shapes") or {}).get("files")
        if not files:
            raise EdgekitError(f"bundle {bundle.path} has no fixed-shape graphs")
        return open_fixed(bundle.path, files, options)
    if graph not in GRAPHS:
        raise EdgekitError(f"graph {graph!r}: expected one of {', '.join(GRAPHS)}")
    model = bundle.model_file if graph == "onnx" else bundle.model_file.with_suffix(".ort")
    if model.relative_to(bundle.path).as_posix() not in manifest["files"]:
        raise EdgekitError(f"bundle {bundle.path} has no {model.name}")
    session, placement = create_session(model, options)
    return KVEngine(session, 0, shared=manifest["graph"].get("flavour") != "standard"), placement


def probe(job: ProbeJob) -> Probe:
    options = RuntimeOptions(provider=job.provider, threads=job.threads, provider_options=dict(job.provider_options))
    engine, placement = _engine(job.bundle, job.graph, options)
    engine.reserve(max(len(job.text_ids), len(job.prompt_ids) + job.new_tokens))
    logits = np.asarray(engine.forward(job.text_ids, all_logits=True), np.float32)
    engine.reset()
    row = engine.forward(job.prompt_ids, all_logits=False)[-1]
    greedy: list[int] = []
    while True:
        greedy.append(int(np.argmax(row)))
        if len(greedy) == job.new_tokens:
            break
        row = engine.forward(greedy[-1:])[0]
    return Probe(greedy, logits, dict(placement.nodes))


def text_perplexity(logits: np.ndarray, text_ids: list[int]) -> float:
    """exp(mean NLL) of text_ids[1:] given the logits at the positions before them."""
    rows = logits[:-1].astype(np.float64)
    top = rows.max(-1, keepdims=True)
    log_z = top[:, 0] + np.log(np.exp(rows - top).sum(-1))
    nll = log_z - rows[np.arange(len(rows)), np.asarray(text_ids[1:])]
    return float(np.exp(nll.mean()))


def compare(host: Probe, other: Probe, text_ids: list[int]) -> Agreement:
    if host.logits.shape != other.logits.shape or len(host.greedy) != len(other.greedy):
        raise EdgekitError(f"probes of different shapes: {host.logits.shape} vs {other.logits.shape}")
    same = next((i for i, (a, b) in enumerate(zip(host.greedy, other.greedy, strict=True)) if a != b), len(host.greedy))
    top1 = float(np.mean(host.logits.argmax(-1) == other.logits.argmax(-1)))
    delta = float(np.max(np.abs(host.logits - other.logits)))
    scale = float(np.max(np.abs(host.logits)))
    ppl = (text_perplexity(host.logits, text_ids), text_perplexity(other.logits, text_ids))
    if same == len(host.greedy) and top1 == 1.0 and delta <= EXACT_RELATIVE * scale:
        verdict = "exact"
    elif same == len(host.greedy) and top1 >= AGREE_TOP1:
        verdict = "agrees"
    else:
        verdict = "close" if abs(ppl[1] / ppl[0] - 1) <= CLOSE_PPL else "differs"
    return Agreement(same, len(host.greedy), top1, delta, scale, *ppl, verdict)


def write_probe(result: Probe, path: Path) -> None:
    np.savez(path, greedy=np.asarray(result.greedy, np.int64), logits=result.logits, nodes=json.dumps(result.nodes))


def read_probe(path: Path) -> Probe:
    with np.load(path) as data:
        nodes = json.loads(str(data["nodes"])) if "nodes" in data else {}
        return Probe([int(t) for t in data["greedy"]], data["logits"], nodes)


def jobs_to_file(jobs: list[ProbeJob], path: Path) -> None:
    path.write_text(json.dumps([asdict(j) for j in jobs]), encoding="utf-8")


def main(argv: list[str]) -> int:
    """`python -m edgekit.runtime.agreement JOBS.json OUT_DIR`: OUT_DIR/<i>.npz per job, in order."""
    jobs_file, out = Path(argv[0]), Path(argv[1])
    jobs = [ProbeJob(**j) for j in json.loads(jobs_file.read_text(encoding="utf-8"))]
    out.mkdir(parents=True, exist_ok=True)
    for i, job in enumerate(jobs):
        try:
            write_probe(probe(job), out / f"{i}.npz")
        except EdgekitError as e:
            (out / f"{i}.error").write_text(str(e), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
