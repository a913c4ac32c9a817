"""The calibration report (`dist-quant calibrate --report DIR`): every quantizer's calibrated amax and every
quantized weight's error, by Hugging Face name where the bridge maps one (else the Megatron logical name), as
JSON, and a PNG of both by layer (with matplotlib, the `report` extra), so that the layers that quantize badly
stand out. The job gathers what every rank holds (dist_quant.job.merged_quantization); this module only shapes
and writes it."""

from __future__ import annotations

import json
import re
from pathlib import Path

from dist_quant.bridge.mappings import BridgeError

JSON_FILE, PNG_FILE = "calibration_report.json", "calibration_report.png"
_TYPES = (  # Megatron module (logical name) -> its type, the first pattern that matches
    (r"\.linear_qkv$", "attention qkv"),
    (r"\.linear_proj$", "attention out"),
    (r"\.core_attention$", "kv cache"),
    (r"\.experts\..*\.linear_fc1$", "experts fc1"),
    (r"\.experts\..*\.linear_fc2$", "experts fc2"),
    (r"\.linear_fc1$", "mlp fc1"),
    (r"\.linear_fc2$", "mlp fc2"),
    (r"(^|\.)output_layer$", "output layer"),
)
MODULE_TYPES = tuple(name for _, name in _TYPES)
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
WORST_SHOWN = 3  # the worst weights the summary names


def module_type(module: str) -> str:
    return next((name for pattern, name in _TYPES if re.search(pattern, module)), "other")


def layer_of(name: str) -> int | None:
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def _natural(name: str) -> list:
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in name.split(".")]


def _hf_names(registry, megatron: str, suffix: str) -> list[str]:
    """The HF names of a Megatron tensor name, less `suffix`; [] where the bridge maps none."""
    try:
        _, _, names = registry.megatron_to_hf(megatron + suffix)
    except BridgeError:
        return []
    return [name.removesuffix(suffix) for name in names]


def build(quantization: dict, registry, about: dict) -> dict:
    """The report: `about` (model, recipe, layout, data...), then `quantizers` (role, format, amax) and `weights`
    (relative MSE ||fq(w) - w||^2 / ||w||^2), in model order. `quantization`: merged over the ranks;
    `registry`: the bridge's mappings with quantizer state."""
    quantizers = []
    for name in sorted(quantization["quantizers"], key=_natural):
        role, fmt = quantization["quantizers"][name]
        quantizers.append({
            "hf_names": _hf_names(registry, name, "._amax"), "megatron_name": name, "layer": layer_of(name),
            "type": module_type(name.rsplit(".", 1)[0]), "role": role, "format": fmt,
            "amax": quantization["amax"].get(name),
        })
    weights = []
    for module in sorted(quantization["errors"], key=_natural):
        error, norm = quantization["errors"][module]
        weights.append({
            "hf_names": _hf_names(registry, module, ".weight"), "megatron_name": module, "layer": layer_of(module),
            "type": module_type(module), "relative_mse": error / norm if norm > 0 else 0.0,
        })
    return {**about, "quantizers": quantizers, "weights": weights}


def shown_name(entry: dict) -> str:
    """An entry's name for people: its HF names (siblings of a fused module as {a,b}), else the Megatron one."""
    names = entry["hf_names"]
    if len(names) <= 1:
        return names[0] if names else entry["megatron_name"]
    parts = [name.split(".") for name in names]
    head = 0
    while all(len(p) > head + 1 and p[head] == parts[0][head] for p in parts):
        head += 1
    return ".".join(parts[0][:head] + ["{" + ",".join(".".join(p[head:]) for p in parts) + "}"])


def write(directory: str | Path, report: dict) -> list[str]:
    """Write the JSON and, where matplotlib is installed, the PNG into `directory` (made if missing). -> lines for
    the summary: what was written, the worst weights."""
    from dist_quant.job import JobError

    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / JSON_FILE).write_text(json.dumps(report, indent=1))
        try:
            plot(report, directory / PNG_FILE)
            lines = [f"report: {directory / JSON_FILE}, {directory / PNG_FILE}"]
        except ImportError:
            lines = [f"report: {directory / JSON_FILE} (the PNG needs matplotlib: pip install 'dist_quant[report]')"]
    except OSError as error:
        raise JobError(f"--report {directory}: cannot write there ({error.strerror})") from None
    worst = sorted(report["weights"], key=lambda w: w["relative_mse"], reverse=True)[:WORST_SHOWN]
    if worst:
        lines.append("worst weight errors (relative MSE): " + ", ".join(f"{shown_name(w)} {w['relative_mse']:.3e}" for w in worst))
    return lines


def plot(report: dict, path: Path) -> None:
    """Two panels over the layers (the modules outside them, the output layer, after the last): every calibrated
    quantizer's amax by role, every weight's relative MSE by module type with each layer's worst joined by a
    line. Log scales: amax and errors span orders of magnitude. ImportError without matplotlib."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    entries = report["quantizers"] + report["weights"]
    last = max((e["layer"] for e in entries if e["layer"] is not None), default=-1)

    def x(entry: dict) -> int:
        return last + 1 if entry["layer"] is None else entry["layer"]

    def scatter(axes, series: dict[str, list[tuple[int, float]]]) -> None:
        """Each series a little apart along x, so that a layer's series do not cover each other."""
        for i, (label, points) in enumerate(series.items()):
            shift = (i - (len(series) - 1) / 2) * 0.6 / len(series)
            axes.scatter([p[0] + shift for p in points], [p[1] for p in points], s=10, alpha=0.6, label=label)

    figure = Figure(figsize=(11, 8), layout="constrained")
    amax_axes, error_axes = figure.subplots(2, 1, sharex=True)
    calibrated = [q for q in report["quantizers"] if q["amax"] and q["amax"] > 0 and "constant amax" not in q["format"]]
    roles = sorted({q["role"] for q in calibrated})
    scatter(amax_axes, {role: [(x(q), q["amax"]) for q in calibrated if q["role"] == role] for role in roles})
    amax_axes.set(yscale="log", ylabel="calibrated amax", title=f"{report.get('model')}: amax of every calibrated quantizer by layer")
    errors = [w for w in report["weights"] if w["relative_mse"] > 0]
    types = [t for t in (*MODULE_TYPES, "other") if any(w["type"] == t for w in errors)]
    scatter(error_axes, {kind: [(x(w), w["relative_mse"]) for w in errors if w["type"] == kind] for kind in types})
    worst: dict[int, float] = {}
    for w in errors:
        worst[x(w)] = max(worst.get(x(w), 0.0), w["relative_mse"])
    if worst:
        layers = sorted(worst)
        error_axes.plot(layers, [worst[k] for k in layers], color="black", linewidth=0.8, label="worst of the layer")
    error_axes.set(yscale="log", xlabel="layer", ylabel="weight error (relative MSE)",
                   title="quantization error of every quantized weight by layer")
    for axes in (amax_axes, error_axes):
        if axes.has_data():
            axes.legend(loc="best", fontsize="small")
    error_axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    if any(e["layer"] is None for e in entries):
        ticks = [int(t) for t in error_axes.get_xticks() if 0 <= t <= last]
        error_axes.set_xticks([*ticks, last + 1], [*map(str, ticks), "head"])
    figure.savefig(path, dpi=110)
