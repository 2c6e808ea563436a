"""Pictures and tables of NIAH results: a heatmap per method, all methods side by side, a markdown table vs dense."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import LinearSegmentedColormap  # noqa: E402

# Red (missed) -> yellow -> green (found), the usual NIAH colours.
_CMAP = LinearSegmentedColormap.from_list("niah", ["#F0496E", "#EBB839", "#0CD79F"])


def length_label(tokens: int) -> str:
    return f"{tokens // 1024}K" if tokens % 1024 == 0 else str(tokens)


def _draw(ax, result: dict, colorbar: bool):
    import numpy as np

    scores = np.array([[np.nan if v is None else v for v in row] for row in result["scores"]], dtype=float)
    image = ax.imshow(scores, cmap=_CMAP, vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(result["lengths"])), [length_label(n) for n in result["lengths"]])
    ax.set_yticks(range(len(result["depths"])), [f"{d:g}%" for d in result["depths"]])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    limit = result.get("max_position_embeddings")
    if limit and any(n > limit for n in result["lengths"]):
        # A dashed line where the model's trained context ends: beyond it, even dense attention extrapolates.
        past = sum(n <= limit for n in result["lengths"]) - 0.5
        ax.axvline(past, color="black", linestyle="--", linewidth=1)
    overall = result.get("overall")
    ax.set_title(f"{result['method']}\nmean {overall:.2f}" if overall is not None else result["method"], fontsize=10)
    if colorbar:
        plt.colorbar(image, ax=ax, label="score")


def _panel_width(result: dict) -> float:
    return max(2.8, 1.2 + 0.7 * len(result["lengths"]))  # room for the axis labels with a single length


def heatmap(result: dict, path) -> None:
    fig, ax = plt.subplots(figsize=(_panel_width(result) + 0.8, 1.5 + 0.35 * len(result["depths"])))
    _draw(ax, result, colorbar=True)
    fig.suptitle(f"NIAH {result['needle']} | {result['model']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def side_by_side(results: list[dict], path) -> None:
    width = _panel_width(results[0])
    fig, axes = plt.subplots(1, len(results), figsize=(width * len(results) + 0.8,
                                                       1.5 + 0.35 * len(results[0]["depths"])), squeeze=False)
    for i, (ax, result) in enumerate(zip(axes[0], results)):
        _draw(ax, result, colorbar=i == len(results) - 1)
    fig.suptitle(f"NIAH {results[0]['needle']} | {results[0]['model']} | same prompts for every method", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown_table(results: list[dict]) -> str:
    """Mean score per length for each method; with dense present, also how often a method agrees with it per sample."""
    lengths = results[0]["lengths"]
    limit = results[0].get("max_position_embeddings")
    dense = next((r for r in results if r["method"] == "dense"), None)
    heads = [length_label(n) + (" *" if limit and n > limit else "") for n in lengths]
    columns = ["method", *heads, "all", "seconds"] + (["same score as dense", "dense found, method missed"] if dense else [])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for result in results:
        row = [result["method"] + _options_note(result["options"])]
        row += [_fmt(result["per_length"][str(n)]) for n in lengths]
        row += [_fmt(result["overall"]), f"{result['seconds']:.0f}"]
        if dense:
            dense_by_prompt = {_prompt(s): s for s in dense["samples"]}
            pairs = [(dense_by_prompt[_prompt(s)], s) for s in result["samples"] if _prompt(s) in dense_by_prompt]
            same = sum(a["score"] == b["score"] for a, b in pairs)
            lost = sum(a["score"] > b["score"] for a, b in pairs)
            row += [f"{same}/{len(pairs)}", f"{lost}/{len(pairs)}"]
        lines.append("| " + " | ".join(row) + " |")
    counts = {n: max(sum(s["length"] == n for s in r["samples"]) for r in results) for n in lengths}
    per_cell = results[0]["samples_per_cell"] * len(results[0]["depths"])
    if set(counts.values()) == {per_cell}:
        notes = [f"\nScores are mean needle recall over {per_cell} prompts per length "
                 f"({len(results[0]['depths'])} depths x {results[0]['samples_per_cell']} samples); every method saw "
                 "the same prompts."]
    else:  # merged runs (niah-merge)
        notes = ["\nScores are mean needle recall over the prompts of each length ("
                 + ", ".join(f"{length_label(n)}: {c}" for n, c in counts.items()) + "); the methods of one run saw the "
                 "same prompts, and methods are compared prompt by prompt where both ran."]
    if limit and any(n > limit for n in lengths):
        notes.append(f"* beyond the model's max_position_embeddings ({limit}): extrapolation, dense is not expected to work.")
    return "\n".join(lines) + "\n" + "\n".join(notes)


def _prompt(sample: dict) -> tuple:
    return sample["length"], sample["depth"], sample["index"]


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def _options_note(options: dict) -> str:
    return f" ({', '.join(f'{k}={v}' for k, v in options.items())})" if options else ""
