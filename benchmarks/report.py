"""The run's record as a markdown report (the issue's targets first, met or not, then one table per part) and plots."""

from __future__ import annotations

import math
from pathlib import Path

from .timing import markdown_table

TARGET_CONTEXT = 131072


def _k(context: int) -> str:
    return f"{context // 1024}K" if context % 1024 == 0 else str(context)


def _f(value, digits: int = 2, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}{suffix}"


def _ratio(numerator, denominator):
    return numerator / denominator if numerator and denominator else None


def _share(part, whole) -> str:
    ratio = _ratio(part, whole)
    return "-" if ratio is None else f"{100 * ratio:.0f}%"


def _rows(record: dict, part: str, **match) -> list[dict]:
    return [r for r in record[part] if all(r.get(k) == v for k, v in match.items())]


def _one(record: dict, part: str, **match) -> dict:
    rows = _rows(record, part, **match)
    return rows[0] if rows else {}


def _sparse_names(record: dict) -> list[str]:
    return record["settings"]["methods"]


# ---------------------------------------------------------------------------------------------------------- tables

def targets(record: dict) -> list[list]:
    """[target, who, measured, met] for each target of issue #14 that this run measured."""
    rows = []
    n = TARGET_CONTEXT
    dense = _one(record, "e2e", context=n, name="dense", chunk=None)
    chunk = record["settings"].get("chunk")
    for name in _sparse_names(record):
        plain = _one(record, "e2e", context=n, name=name, chunk=None)
        chunked = _one(record, "e2e", context=n, name=name, chunk=chunk)
        ttft = _ratio(dense.get("ttft_s"), plain.get("ttft_s"))
        if ttft is not None:
            rows.append(["TTFT at 128K >= 2.5x dense SDPA", name, f"{ttft:.2f}x ({plain['ttft_s']:.2f} s vs "
                         f"{dense['ttft_s']:.2f} s)", ttft >= 2.5])
        decode = _ratio(dense.get("decode_ms_per_token"), plain.get("decode_ms_per_token"))
        if decode is not None:
            rows.append(["decode at 128K >= 2x dense per token", name, f"{decode:.2f}x "
                         f"({plain['decode_ms_per_token']:.1f} vs {dense['decode_ms_per_token']:.1f} ms)", decode >= 2])
        if chunked.get("peak_gib") is not None and plain.get("ttft_s"):
            slower = chunked["ttft_s"] / plain["ttft_s"]
            same = chunked.get("tokens", [None])[:1] == plain.get("tokens", [])[:1]
            rows.append([f"128K prefill, chunk {chunk}: <= 33 GiB, same next token, time within 10%", name,
                         f"{chunked['peak_gib']:.1f} GiB (unchunked {plain['peak_gib']:.1f}), next token "
                         f"{'same' if same else 'differs'}, {chunked['ttft_s']:.2f} s = {slower:.2f}x unchunked",
                         chunked["peak_gib"] <= 33 and same and slower <= 1.1])
    for row in _rows(record, "layer", context=n, kind="kernel"):
        vs_flex, vs_floor = _ratio(row.get("flex_ms"), row.get("kernel_ms")), _ratio(row.get("kernel_ms"),
                                                                                     row.get("floor_ms"))
        if vs_flex is not None and vs_floor is not None:
            rows.append(["layer prefill, 2K budget, 128K: >= 1.5x Flex, <= 1.3x floor", row["name"],
                         f"{row['kernel_ms']:.2f} ms: {vs_flex:.2f}x Flex ({row['flex_ms']:.2f} ms), "
                         f"{vs_floor:.2f}x floor ({row['floor_ms']:.2f} ms)", vs_flex >= 1.5 and vs_floor <= 1.3])
    return [[t, who, what, "**met**" if ok else "not met"] for t, who, what, ok in rows]


def layer_table(record: dict) -> str:
    header = ["context", "method", "prefill ms", "vs dense", "select share", "kernel ms", "Flex, same mask ms",
              "kernel vs Flex", "floor ms", "decode us (eager)", "vs dense", "decode us (CUDA graph)", "vs dense",
              "decode select share (eager)"]
    rows = []
    for row in record["layer"]:
        dense = _one(record, "layer", context=row["context"], kind="dense")
        name = row["name"]
        if row["kind"] == "dense":
            backends = [f"{b} {row[f'{b}_ms']:.2f}" for b in ("cudnn", "flash") if f"{b}_ms" in row]
            name = "dense SDPA" + (f" ({', '.join(backends)})" if backends else "")
        rows.append([
            _k(row["context"]), name, _f(row.get("prefill_ms")),
            _f(_ratio(dense.get("prefill_ms"), row.get("prefill_ms")), 1, "x"),
            _share(row.get("select_ms"), row.get("prefill_ms")),
            _f(row.get("kernel_ms")) if row["kind"] == "method" else "",
            _f(row.get("flex_ms")), _f(_ratio(row.get("flex_ms"), row.get("kernel_ms")), 2, "x"),
            _f(row.get("floor_ms")),
            _f(row.get("decode_eager_us"), 0),
            _f(_ratio(dense.get("decode_eager_us"), row.get("decode_eager_us")), 1, "x"),
            _f(row.get("decode_graph_us"), 1),
            _f(_ratio(dense.get("decode_graph_us"), row.get("decode_graph_us")), 1, "x"),
            _share(row.get("decode_select_eager_us"), row.get("decode_eager_us")),
        ])
    return markdown_table(header, rows)


def e2e_table(record: dict) -> str:
    header = ["context", "method", "TTFT s", "vs dense", "decode ms/token", "vs dense", "peak GiB",
              "chunked TTFT s", "chunked / unchunked time", "chunked peak GiB", "chunked: same tokens"]
    chunk = record["settings"].get("chunk")
    rows = []
    for row in _rows(record, "e2e", chunk=None):
        dense = _one(record, "e2e", context=row["context"], name="dense", chunk=None)
        chunked = _one(record, "e2e", context=row["context"], name=row["name"], chunk=chunk)
        same = (chunked.get("tokens") == row.get("tokens")) if chunked.get("tokens") and row.get("tokens") else None
        rows.append([
            _k(row["context"]), "dense SDPA" if row["name"] == "dense" else row["name"], _f(row.get("ttft_s"), 3),
            _f(_ratio(dense.get("ttft_s"), row.get("ttft_s")), 2, "x"), _f(row.get("decode_ms_per_token"), 1),
            _f(_ratio(dense.get("decode_ms_per_token"), row.get("decode_ms_per_token")), 2, "x"),
            _f(row.get("peak_gib"), 1), _f(chunked.get("ttft_s"), 3),
            _f(_ratio(chunked.get("ttft_s"), row.get("ttft_s")), 2, "x"), _f(chunked.get("peak_gib"), 1),
            "-" if same is None else ("yes" if same else "no"),
        ])
    return markdown_table(header, rows)


def quality_table(record: dict) -> str:
    lengths = sorted({r["length"] for r in record["quality"] if "length" in r})  # error rows have none
    names = list(dict.fromkeys(r["name"] for r in record["quality"]))
    header = ["method"] + [f"passkey {_k(n)}" for n in lengths] + [f"recall {_k(n)}" for n in lengths]
    rows = []
    for name in names:
        cells = [_one(record, "quality", name=name, length=n) for n in lengths]
        rows.append([name] + [_share(c.get("passkey"), 1) if c.get("passkey") is not None and c["passkey"] > 0
                              else ("0%" if c.get("passkey") == 0 else "-") for c in cells]
                    + ["exact" if name == "dense" else _f(c.get("recall"), 3) for c in cells])
    return markdown_table(header, rows)


def markdown(record: dict) -> str:
    env, settings = record["environment"], record["settings"]
    lines = [f"# Every method against dense attention, {env['device']}", ""]
    if not record["performance_figure"]:
        lines += [f"> **Not a performance figure**: a smoke run of the command (tiny shapes and models, "
                  f"{env['device']}).", ""]
    lines += [f"Command: `{env['command']}`", "",
              f"{env['date']}; torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}, transformers "
              f"{env['transformers']}, python {env['python']}, commit {env['commit']}. Every method at its defaults: "
              f"{', '.join(settings['methods'])}. Seconds per part: {record['seconds'] or '-'}.", ""]
    target_rows = targets(record)
    lines += ["## Targets (issue #14)", ""]
    lines += [markdown_table(["target", "method", "measured", "met"], target_rows) if target_rows
              else "Not measured in this run (they are figures at a 128K context).", ""]
    if record["layer"]:
        lines += ["## Single layer", "",
                  "Llama-3-8B attention shape (32 query heads, 8 kv heads, head_dim 128; tiny run: 4, 2, 32), bf16, "
                  "batch 1, causal prefill over random q/k/v. Dense = the faster of SDPA's cuDNN and flash backends "
                  "(prefill), SDPA (decode). prefill = the method's `attend` (its selection included); select share = "
                  "`select` alone over that; kernel = the shared sparse kernel on that selection; Flex = "
                  "FlexAttention (compiled) on exactly the same mask; floor = the 128 x 128 blocks that mask touches "
                  "at dense cuDNN's TFLOP/s. Decode: per step, from a timed sequence of "
                  f"{settings['decode_steps']} steps after the method's own prefill (its decode state evolving as in a "
                  "real generation; the cache grows by one key a step), launched eagerly (host launches included) "
                  "and as one replayed CUDA graph (GPU time only).", "", layer_table(record), ""]
    if record["e2e"]:
        model = record.get("e2e_model", {})
        lines += ["## End to end", "",
                  f"A random-weight Llama with {model.get('config', '?')}'s config in bf16 "
                  f"({_f(model.get('weights_gib'), 1)} GiB of weights), `generate()` batch 1, greedy, "
                  f"{settings['new_tokens']} decode tokens timed after the first (decode: the median interval between "
                  "tokens); dense = the unpatched model (SDPA), run with SDPA's default backends and again without "
                  "cuDNN, the faster of the two for each of TTFT and decode (cuDNN plans every new key length, which "
                  "generate()'s decode pays at every step). "
                  f"Chunked = the same call with `prefill_chunk_size={settings['chunk']}`. Peak = the most GPU memory "
                  "allocated during the call (weights and KV cache included). Random weights: the tokens mean "
                  "nothing, but chunking should not change them.", "", e2e_table(record), ""]
    if record["quality"]:
        q = record.get("quality_settings", {})
        lines += ["## Quality", "",
                  f"{q.get('model')} ({q.get('dtype')}): passkey in {q.get('haystack')}, "
                  f"{len(q.get('depths', []))} prompts per length at depths 0..100% (the same prompts for every "
                  f"method, greedy), and recall: the share of the exact attention mass that each method's selection "
                  f"keeps, mean over layers, heads and queries of the first {settings['recall_prompts']} prompts. "
                  "Few prompts: differences under ~20 points are noise.", "", quality_table(record), ""]
    notes: dict[str, list[str]] = {}  # message -> where (the same note at every context is listed once)
    for part in ("layer", "e2e", "quality"):
        for row in record[part]:
            where = _k(row.get("context") or row.get("length") or 0) + (f" chunk {row['chunk']}" if row.get("chunk")
                                                                       else "")
            messages = [f"{key}: {message}" for key, message in row.get("errors", {}).items()]
            messages += [row[key] for key in ("flex_note", "recall_note") if key in row]
            for message in messages:
                notes.setdefault(f"{part}, {row.get('name')}: {message}", []).append(where)
    if notes:
        lines += ["## Notes and errors", ""] + [f"- {m} ({', '.join(w)})" for m, w in notes.items()] + [""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------- plots

def plots(record: dict, out: Path) -> list[Path]:
    """layer.png (latency vs context), speedup.png (over dense), e2e.png (time to first token, decode, memory)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["dense"] + _sparse_names(record)
    colors = {name: f"C{i}" for i, name in enumerate(names)}
    colors["dense"] = "black"
    written = []

    def series(part, name, key, **match):
        rows = sorted(_rows(record, part, name=name, **match), key=lambda r: r["context"])
        return [(r["context"], r[key]) for r in rows if r.get(key)]

    def axis(ax, part, ylabel, title, log_y=True):
        ax.set_xscale("log", base=2)
        if log_y:
            ax.set_yscale("log")
        contexts = sorted({r["context"] for r in record[part]})
        ax.set_xticks(contexts, [_k(c) for c in contexts])
        ax.set(xlabel="context (tokens)", ylabel=ylabel, title=title)
        ax.grid(True, which="both", alpha=0.3)

    def line(ax, points, **style):
        if points:
            ax.plot(*zip(*points), **style)

    if record["layer"]:
        fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
        for ax, key, ylabel, title in ((axes[0], "prefill_ms", "ms", "one layer, prefill"),
                                       (axes[1], "decode_eager_us", "us per step", "decode, launched eagerly"),
                                       (axes[2], "decode_graph_us", "us per step", "decode, CUDA graph")):
            for name in names:
                line(ax, series("layer", name, key), marker="o", color=colors[name],
                     label="dense SDPA" if name == "dense" else name)
            if key == "prefill_ms":
                for row_name, marker in (("kernel, 2K sink+window", "s"), ("kernel, 2K random blocks", "^")):
                    line(ax, series("layer", row_name, "kernel_ms"), marker=marker, ls=":", color="grey",
                         label=f"{row_name} (shared kernel)")
                    line(ax, series("layer", row_name, "flex_ms"), marker=marker, ls="--", color="tab:olive",
                         label=f"FlexAttention, {row_name[8:]}")
            axis(ax, "layer", ylabel, title)
        axes[0].legend(fontsize=7)
        written.append(_save(fig, out / "layer.png"))

    speedups = [("layer", "prefill_ms", "layer prefill"), ("layer", "decode_graph_us", "layer decode (CUDA graph)"),
                ("e2e", "ttft_s", "time to first token (generate)"),
                ("e2e", "decode_ms_per_token", "decode per token (generate)")]
    if record["layer"] or record["e2e"]:
        fig, axes = plt.subplots(1, 4, figsize=(19, 4.5))
        for ax, (part, key, title) in zip(axes, speedups):
            match = {"chunk": None} if part == "e2e" else {}
            dense = dict(series(part, "dense", key, **match))
            for name in names[1:]:
                points = [(c, dense[c] / v) for c, v in series(part, name, key, **match) if dense.get(c)]
                line(ax, points, marker="o", color=colors[name], label=name)
            ax.axhline(1.0, color="black", lw=1)
            axis(ax, part, "speedup over dense (x)", title)
        axes[0].legend(fontsize=8)
        written.append(_save(fig, out / "speedup.png"))

    if record["e2e"]:
        chunk = record["settings"].get("chunk")
        fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
        for ax, key, ylabel, title in ((axes[0], "ttft_s", "s", "time to first token"),
                                       (axes[1], "decode_ms_per_token", "ms per token", "decode"),
                                       (axes[2], "peak_gib", "GiB", "peak GPU memory")):
            for name in names:
                label = "dense SDPA" if name == "dense" else name
                line(ax, series("e2e", name, key, chunk=None), marker="o", color=colors[name], label=label)
                if key != "decode_ms_per_token":
                    line(ax, series("e2e", name, key, chunk=chunk), marker="x", ls="--", color=colors[name],
                         label=f"{label}, chunked prefill {chunk}")
            axis(ax, "e2e", ylabel, title, log_y=key != "peak_gib")
        axes[0].legend(fontsize=7)
        written.append(_save(fig, out / "e2e.png"))
    return written


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
