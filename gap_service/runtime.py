"""onnxruntime sessions: provider choice, options and one-off runs.

CUDA is used when the installed onnxruntime offers it, CPU otherwise; options are chosen on
purpose (heuristic cuDNN algorithm search so new shapes do not trigger slow exhaustive
searches, an arena that grows by request size).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort

from .errors import InvalidModelError

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"

ProviderSpec = str | tuple[str, dict[str, str]]


@dataclass(frozen=True)
class RuntimeConfig:
    """How sessions are built. ``providers=None`` means: CUDA if available, else CPU."""

    providers: tuple[ProviderSpec, ...] | None = None
    threads: int = 0  # 0: one per core
    gpu_mem_limit_bytes: int = 0  # 0: no limit
    cuda_options: Mapping[str, str] = field(default_factory=dict)

    def key(self) -> tuple:
        """A hashable form (provider options are dicts): sessions built for equal keys are interchangeable."""
        providers = None if self.providers is None else tuple(
            spec if isinstance(spec, str) else (spec[0], tuple(sorted(spec[1].items()))) for spec in self.providers
        )
        return providers, self.threads, self.gpu_mem_limit_bytes, tuple(sorted(self.cuda_options.items()))


def available_providers() -> list[str]:
    return list(ort.get_available_providers())


def resolve_providers(config: RuntimeConfig) -> list[ProviderSpec]:
    """Concrete provider list with options; CPU is always last as the fallback."""
    available = set(available_providers())
    requested: Sequence[ProviderSpec] = config.providers or ([CUDA, CPU] if CUDA in available else [CPU])
    if CUDA in available:
        _preload_cuda_libraries()
    resolved: list[ProviderSpec] = []
    for spec in requested:
        name = spec if isinstance(spec, str) else spec[0]
        if name not in available:
            log.warning("execution provider %s is not available here; skipping it", name)
            continue
        if name == CUDA and isinstance(spec, str):
            resolved.append((CUDA, cuda_provider_options(config)))
        else:
            resolved.append(spec)
    if not any((p if isinstance(p, str) else p[0]) == CPU for p in resolved):
        resolved.append(CPU)
    return resolved


_CUDA_PRELOADED = False


def _preload_cuda_libraries() -> None:
    """onnxruntime-gpu finds CUDA/cuDNN from the nvidia-* wheels (as PyTorch installs them) this way."""
    global _CUDA_PRELOADED
    if not _CUDA_PRELOADED and hasattr(ort, "preload_dlls"):
        try:
            ort.preload_dlls()
        except Exception as exc:  # the system's own CUDA libraries may still be found
            log.warning("onnxruntime.preload_dlls() failed: %s", exc)
        _CUDA_PRELOADED = True


def cuda_provider_options(config: RuntimeConfig) -> dict[str, str]:
    """HEURISTIC: cuDNN's per-shape EXHAUSTIVE search costs seconds on every new shape (every new
    seed count P). kSameAsRequested: the arena grows by what is asked, not by powers of two.
    use_tf32=0: float32 means float32 (trees must match the CPU's); float16 mode is the fast path."""
    options = {
        "cudnn_conv_algo_search": "HEURISTIC",
        "arena_extend_strategy": "kSameAsRequested",
        "do_copy_in_default_stream": "1",
        "use_tf32": "0",
    }
    if config.gpu_mem_limit_bytes:
        options["gpu_mem_limit"] = str(config.gpu_mem_limit_bytes)
    options.update(config.cuda_options)
    return options


def session_options(config: RuntimeConfig) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = config.threads or (os.cpu_count() or 1)
    options.inter_op_num_threads = 1
    # No spin-waiting between ops: on a small machine the spinning workers starve the gRPC and
    # Python threads (measured, 2 cores: one explanation 124 ms with spinning, 52 ms without).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return options


# IR version written into every model this package builds: onnx may default to a newer IR than
# the installed onnxruntime reads (seen: onnx 1.23 writes IR 14, onnxruntime-gpu 1.31 reads <= 13).
IR_VERSION = 10


def portable(model: onnx.ModelProto) -> onnx.ModelProto:
    """Pin the IR version of a generated model to one every supported onnxruntime reads."""
    model.ir_version = min(model.ir_version or IR_VERSION, IR_VERSION)
    return model


def make_session(model: onnx.ModelProto | bytes, config: RuntimeConfig, what: str) -> ort.InferenceSession:
    """Build a session, turning onnxruntime's failures into a clear model error."""
    data = model if isinstance(model, bytes) else portable(model).SerializeToString()
    try:
        return ort.InferenceSession(data, session_options(config), providers=resolve_providers(config))
    except Exception as exc:
        raise InvalidModelError(f"onnxruntime could not load the {what}: {exc}") from exc


def run_probe(
    model: onnx.ModelProto, input_shapes: Mapping[str, tuple[int, ...]], names: Sequence[str]
) -> dict[str, np.ndarray]:
    """Run the model once on zeros, fetching ``names`` as extra outputs (to learn their shapes)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names if n not in existing)
    session = make_session(probe, RuntimeConfig(providers=(CPU,)), "model for shape probing")
    feeds = {}
    for value in session.get_inputs():
        dtype = np.float32 if "float" in value.type else np.int64
        feeds[value.name] = np.zeros(input_shapes[value.name], dtype=dtype)
    fetched = session.run(list(names), feeds)
    return dict(zip(names, fetched))
