"""Execution providers: short names → onnxruntime providers with useful options, threads, placement.

A provider missing from the installed onnxruntime is a one-line error that names the providers present
and the package or build that brings the missing one. Some providers now ship as onnxruntime *plugin* EPs
(onnxruntime >= 1.24): a separate package holds the provider's shared library, which is registered with
`ort.register_execution_provider_library` and then chosen by device (`SessionOptions.add_provider_for_devices`)
rather than by name; `onnxruntime-qnn` (the Qualcomm NPU, with an x86-64 HTP simulator on Linux) is one.
Where the built-in provider is absent and the plugin package is installed, edgekit registers the plugin.
After a session is made, `Placement` says how
many graph nodes each provider took (onnxruntime ≥ 1.23 records it on request): a model split across a
mobile provider and the CPU is the classic cause of slow phones, so it is shown, not hidden.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import onnxruntime as ort

from edgekit.errors import EdgekitError

CPU = "CPUExecutionProvider"


@dataclass(frozen=True)
class PluginEP:
    """A provider onnxruntime loads from another package's shared library."""

    package: str  # its import name; the module has get_library_path()
    ep_name: str  # the name it registers under and its devices report


@dataclass(frozen=True)
class ProviderInfo:
    ort_name: str
    brings_it: str  # which package or build has this provider
    plugin: PluginEP | None = None  # where the provider also comes as a plugin EP


PROVIDERS: dict[str, ProviderInfo] = {
    "cpu": ProviderInfo(CPU, "every onnxruntime package"),
    "xnnpack": ProviderInfo(
        "XnnpackExecutionProvider",
        "the Android/iOS packages (onnxruntime-android, onnxruntime-c) or a build with --use_xnnpack",
    ),
    "nnapi": ProviderInfo("NnapiExecutionProvider", "the Android package onnxruntime-android (AAR)"),
    "coreml": ProviderInfo("CoreMLExecutionProvider", "the macOS/iOS onnxruntime packages (pip onnxruntime on macOS)"),
    "qnn": ProviderInfo(
        "QNNExecutionProvider",
        "pip onnxruntime-qnn (a plugin EP: the HTP simulator on Linux x86-64, the NPU on Windows on Snapdragon) "
        "or onnxruntime-android-qnn (AAR)",
        plugin=PluginEP("onnxruntime_qnn", "QNN"),
    ),
    "cuda": ProviderInfo("CUDAExecutionProvider", "pip onnxruntime-gpu (with CUDA 12 and cuDNN 9 installed)"),
    "tensorrt": ProviderInfo("TensorrtExecutionProvider", "pip onnxruntime-gpu plus NVIDIA TensorRT"),
    "dml": ProviderInfo("DmlExecutionProvider", "pip onnxruntime-directml (Windows)"),
    "openvino": ProviderInfo("OpenVINOExecutionProvider", "pip onnxruntime-openvino"),
    "rocm": ProviderInfo("ROCMExecutionProvider", "an onnxruntime build with --use_rocm"),
    "migraphx": ProviderInfo("MIGraphXExecutionProvider", "an onnxruntime build with --use_migraphx"),
    "webgpu": ProviderInfo("WebGpuExecutionProvider", "an onnxruntime build with --use_webgpu (or onnxruntime-web)"),
    "acl": ProviderInfo("ACLExecutionProvider", "an onnxruntime build with --use_acl (Arm Compute Library)"),
    "armnn": ProviderInfo("ArmNNExecutionProvider", "an onnxruntime build with --use_armnn"),
}


@dataclass(frozen=True)
class RuntimeOptions:
    """How to run a bundle: which provider, how many threads, where they may run."""

    provider: str = "cpu"
    threads: int | None = None  # intra-op threads; None: onnxruntime's default (one per physical core)
    affinity: str | None = None  # session.intra_op_thread_affinities, e.g. "1;2;3" (one entry per extra thread)
    spin: bool = True  # busy-wait between ops; off saves power and helps on shared/busy machines
    cpu_fallback: bool = True  # False: fail if the provider cannot take every node
    provider_options: dict[str, str] = field(default_factory=dict)  # passed through, e.g. {"device_type": "GPU"}


@dataclass
class Placement:
    """Graph nodes per execution provider, after onnxruntime's partitioning."""

    requested: str
    nodes: dict[str, int]
    cpu_ops: dict[str, int] = field(default_factory=dict)  # op type → nodes of it the CPU took

    @property
    def total(self) -> int:
        return sum(self.nodes.values())

    @property
    def on_cpu(self) -> int:
        return self.nodes.get(CPU, 0)

    @property
    def fallback(self) -> int:
        """Nodes the requested (non-CPU) provider left to the CPU."""
        return 0 if self.requested == CPU else self.on_cpu

    def summary(self) -> str:
        parts = ", ".join(f"{short_name(ep)} {n}" for ep, n in sorted(self.nodes.items(), key=lambda kv: -kv[1]))
        text = f"{self.total} nodes: {parts}"
        if self.fallback:
            ops = sorted(self.cpu_ops.items(), key=lambda kv: -kv[1])
            listed = ", ".join(f"{op} {n}" for op, n in ops[:6]) + (", …" if len(ops) > 6 else "")
            text += f" ({self.fallback} fell back to CPU: {listed})" if ops else f" ({self.fallback} fell back to CPU)"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "requested": self.requested,
            "nodes": self.nodes,
            "total": self.total,
            "cpu_fallback": self.fallback,
            "cpu_fallback_ops": self.cpu_ops if self.fallback else {},
        }


# Providers that compile static shapes: a bundle's fixed-shape graphs, where it has them, run on these
# (runtime/fixed_engine.py); the dynamic graph would leave most of its nodes to the CPU.
STATIC_SHAPE_PROVIDERS = ("qnn", "nnapi", "coreml")
_REGISTERED: set[str] = set()


@contextlib.contextmanager
def _native_stdout_to_stderr() -> Iterator[None]:
    """Send what native code writes to file descriptor 1 to 2 meanwhile: QNN's libraries print a banner
    ("# LIBNATIVE: ...") on stdout, which would break `--json` output."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)  # plugin EPs registered in this process (registering twice is an error)


def plugin_devices(info: ProviderInfo) -> list[Any]:
    """The devices of `info`'s plugin EP, registering it first; [] where there is no plugin package."""
    if info.plugin is None:
        return []
    try:
        module = importlib.import_module(info.plugin.package)
    except ImportError:
        return []
    name = info.plugin.ep_name
    if name not in _REGISTERED:
        try:
            with _native_stdout_to_stderr():
                ort.register_execution_provider_library(name, module.get_library_path())
        except Exception as e:  # onnxruntime raises its own types for a library it cannot load
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise EdgekitError(f"could not register {info.plugin.package}'s execution provider: {first}") from e
        _REGISTERED.add(name)
    return [d for d in ort.get_ep_devices() if d.ep_name == name]


def short_name(ort_name: str) -> str:
    for key, info in PROVIDERS.items():
        if ort_name in (info.ort_name, info.plugin.ep_name if info.plugin else None):
            return key
    return ort_name.removesuffix("ExecutionProvider")


def resolve(name: str) -> ProviderInfo:
    """Short name (or onnxruntime's full name) → provider, or a one-line error saying where to get it."""
    key = name.lower().removesuffix("executionprovider")
    info = PROVIDERS.get(key) or next((p for p in PROVIDERS.values() if p.ort_name.lower() == name.lower()), None)
    if info is None:
        raise EdgekitError(f"unknown provider '{name}'; choose one of {', '.join(PROVIDERS)}")
    available = ort.get_available_providers()
    if info.ort_name not in available and not plugin_devices(info):
        present = ", ".join(short_name(p) for p in available)
        raise EdgekitError(
            f"provider '{key}' ({info.ort_name}) is not in this onnxruntime {ort.__version__} "
            f"(it has: {present}); it comes with {info.brings_it}"
        )
    return info


def _provider_options(key: str, opts: RuntimeOptions) -> dict[str, str]:
    """Each provider's useful defaults; user-given options win."""
    base: dict[str, str] = {}
    if key == "xnnpack":
        # XNNPACK runs its own thread pool: give it the threads, keep onnxruntime's pool at 1.
        base["intra_op_num_threads"] = str(opts.threads or os.cpu_count() or 1)
    elif key == "coreml":
        base.update({"ModelFormat": "MLProgram", "MLComputeUnits": "ALL"})
    elif key == "qnn":
        base["backend_path"] = _qnn_htp_backend()
        base["htp_performance_mode"] = "burst"
    elif key == "openvino":
        base["device_type"] = "CPU"
        if opts.threads:
            base["num_of_threads"] = str(opts.threads)
    out = {**base, **opts.provider_options}
    if key == "qnn" and "/" not in out["backend_path"] and "\\" not in out["backend_path"]:
        # a bare library name (older qnn recipes wrote libQnnHtp.so): the plugin package's copy, if it has it
        own = Path(base["backend_path"])
        if own.name == out["backend_path"] and own.is_file():
            out["backend_path"] = str(own)
    return out


def _qnn_htp_backend() -> str:
    """The HTP backend library: the plugin package's own copy (full path) where installed."""
    try:
        import onnxruntime_qnn

        return str(onnxruntime_qnn.get_qnn_htp_path())
    except (ImportError, AttributeError):
        return "QnnHtp.dll" if os.name == "nt" else "libQnnHtp.so"


def session_options(opts: RuntimeOptions, key: str) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.log_severity_level = 3  # warnings about unused initializers etc. are noise for users
    if key == "xnnpack":
        so.intra_op_num_threads = 1
    elif opts.threads:
        so.intra_op_num_threads = opts.threads
    if opts.affinity:
        check_affinity(opts.affinity, opts.threads)
        so.add_session_config_entry("session.intra_op_thread_affinities", opts.affinity)
    if not opts.spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if not opts.cpu_fallback and key != "cpu":
        so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    so.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    return so


def check_affinity(spec: str, threads: int | None) -> None:
    """onnxruntime's format: one ';'-separated entry per thread after the first, each a list of
    1-based logical processors ('1,2') or ranges ('1-3'). Bad ids only log an error there; refuse them here."""
    cpus = os.cpu_count() or 1
    entries = spec.split(";")
    if threads is None or len(entries) != threads - 1:
        raise EdgekitError(
            f"--affinity '{spec}': give --threads N and N-1 entries separated by ';' (the first thread is not pinned)"
        )
    for entry in entries:
        for part in entry.split(","):
            bounds = part.split("-")
            # isascii: '²'.isdigit() is True but int('²') raises
            ok = all(b.strip().isascii() and b.strip().isdigit() and 1 <= int(b) <= cpus for b in bounds)
            if not ok or len(bounds) > 2:
                raise EdgekitError(f"--affinity '{spec}': '{part}' is not a processor 1-{cpus} or a range of them")


def with_recipe_options(opts: RuntimeOptions, manifest: dict[str, Any]) -> RuntimeOptions:
    """The options the bundle's recipe gives its provider (e.g. QNN's soc_model), under the user's own."""
    key = opts.provider.lower().removesuffix("executionprovider")
    for p in (manifest.get("target") or {}).get("providers", []):
        if short_name(p["name"]) == key and p.get("options"):
            return replace(opts, provider_options={**p["options"], **opts.provider_options})
    return opts


def create_session(model_path: Path | str, opts: RuntimeOptions) -> tuple[ort.InferenceSession, Placement]:
    """An InferenceSession on the chosen provider (CPU as fallback for what it cannot take)."""
    info = resolve(opts.provider)
    key = short_name(info.ort_name)
    providers: list[Any] = [(info.ort_name, _provider_options(key, opts))]
    if info.ort_name != CPU:
        providers.append(CPU)
    so = session_options(opts, key)
    devices = plugin_devices(info) if info.ort_name not in ort.get_available_providers() else []
    try:
        if devices:  # a plugin EP is chosen by device; onnxruntime adds the CPU provider behind it
            so.add_provider_for_devices(devices, _provider_options(key, opts))
            with _native_stdout_to_stderr():
                session = ort.InferenceSession(str(model_path), so)
        else:
            session = ort.InferenceSession(str(model_path), so, providers=providers)
    except Exception as e:  # onnxruntime raises its own types for a bad model or a refused partition
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EdgekitError(f"onnxruntime could not load {model_path} on {key}: {first}") from e
    return session, placement(session, info.ort_name)


def placement(session: ort.InferenceSession, requested: str) -> Placement:
    nodes: dict[str, int] = {}
    cpu_ops: dict[str, int] = {}
    try:
        for sub in session.get_provider_graph_assignment_info():
            assigned = sub.get_nodes()
            nodes[sub.ep_name] = nodes.get(sub.ep_name, 0) + len(assigned)
            if sub.ep_name == CPU:
                for node in assigned:
                    cpu_ops[node.op_type] = cpu_ops.get(node.op_type, 0) + 1
    except (AttributeError, RuntimeError):  # onnxruntime < 1.23 has no assignment record
        pass
    return Placement(requested, nodes, cpu_ops)


def bundle_placements(folder: Path, manifest: dict[str, Any], opts: RuntimeOptions) -> dict[str, Placement]:
    """Each graph of a bundle (model.onnx, and the fixed-shape pair where it has one) placed on `opts`'s
    provider with the recipe's options: what `inspect --provider` shows."""
    opts = with_recipe_options(opts, manifest)
    files = {"model": manifest["graph"]["file"], **((manifest.get("fixed_shapes") or {}).get("files") or {})}
    return {name: create_session(folder / file, opts)[1] for name, file in files.items()}


def available() -> list[str]:
    """Short names of the providers this onnxruntime has, plugin EPs whose package is installed included."""
    built_in = [short_name(p) for p in ort.get_available_providers()]
    plugins = [k for k, info in PROVIDERS.items() if k not in built_in and info.plugin and plugin_devices(info)]
    return built_in + plugins
