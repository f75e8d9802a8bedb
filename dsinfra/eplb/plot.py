"""A picture of a placement, like the figure in DeepSeek EPLB's README: one
panel per layer, GPUs grouped by node, each GPU a stack of its replicas,
coloured by logical expert (a legend, or a colour bar for more than 20
experts), as tall as the load each carries; boxes tall enough carry their
expert's number."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dsinfra.eplb.loads import imbalance, in_order_gpu_loads, slot_loads

_GAP = 0.6  # space between nodes, in GPU widths


def draw_placement(
    weight: torch.Tensor,
    phy2log: torch.Tensor,
    num_nodes: int,
    num_gpus: int,
    path: str,
    layers: Sequence[int] = (0,),
    *,
    title: str = "",
    unit: str = "tokens",
) -> None:
    """Draw the placement of ``layers`` and save it to ``path`` (PNG, SVG, PDF:
    whatever matplotlib writes for the suffix). Needs matplotlib.

    weight: [num_layers, num_logical_experts], loads in ``unit``;
    phy2log: [num_layers, num_replicas], int64.
    title: a line above the panels (e.g. which layers these are), if given.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    weight, phy2log = weight.double().cpu(), phy2log.cpu()
    num_layers, num_experts = weight.shape
    slots_per_gpu = phy2log.shape[1] // num_gpus
    gpus_per_node = num_gpus // num_nodes
    shares = slot_loads(weight, phy2log).view(num_layers, num_gpus, slots_per_gpu)  # each replica's load
    loads = shares.sum(2)
    before, after = imbalance(in_order_gpu_loads(weight, num_gpus)), imbalance(loads)
    few = num_experts <= 20  # a colour of its own for each expert, and a legend
    palette = plt.get_cmap("tab20" if few else "turbo")
    x = torch.arange(num_gpus) + _GAP * (torch.arange(num_gpus) // gpus_per_node)
    label_experts = slots_per_gpu * num_gpus <= 128  # room to write expert ids in the boxes

    figure, axes = plt.subplots(
        len(layers), 1, figsize=(max(6.0, 0.45 * num_gpus + 1.5), 2.6 * len(layers) + 0.4), squeeze=False, layout="constrained"
    )
    for ax, layer in zip(axes[:, 0], layers):
        experts = phy2log[layer].view(num_gpus, slots_per_gpu)
        top = float(loads[layer].max()) or 1.0
        for node in range(num_nodes):
            left, right = x[node * gpus_per_node] - 0.5, x[(node + 1) * gpus_per_node - 1] + 0.5
            ax.axvspan(left, right, color="#f3e6b3" if node % 2 == 0 else "#dbe8f6", zorder=0)
            ax.text((left + right) / 2, 1.13 * top, f"node {node}", ha="center", va="bottom", fontsize=9)
        bottom = torch.zeros(num_gpus, dtype=torch.float64)
        for slot in range(slots_per_gpu):
            expert = experts[:, slot].tolist()
            colour = [palette(e) if few else palette(e / max(1, num_experts - 1)) for e in expert]
            ax.bar(x, shares[layer, :, slot], bottom=bottom, width=0.8, color=colour, edgecolor="white", linewidth=0.8, zorder=2)
            if label_experts:
                for gpu in range(num_gpus):
                    if shares[layer, gpu, slot] > 0.07 * top:
                        centre = float(bottom[gpu] + shares[layer, gpu, slot] / 2)
                        ax.text(float(x[gpu]), centre, str(expert[gpu]), ha="center", va="center", fontsize=8, zorder=3)
            bottom += shares[layer, :, slot]
        ax.axhline(float(loads[layer].mean()), color="black", linestyle="--", linewidth=0.8, zorder=3)
        ax.set_xticks(x.tolist(), [str(g % gpus_per_node) for g in range(num_gpus)], fontsize=8)
        ax.set_xlim(float(x[0]) - 0.7, float(x[-1]) + 0.7)
        ax.set_ylim(0, 1.25 * top)
        ax.set_ylabel(f"load ({unit})")
        ax.set_title(
            f"layer {layer}: max/mean GPU load {after[layer]:.2f} (without replicas: {before[layer]:.2f})",
            fontsize=10,
        )
    axes[-1, 0].set_xlabel("GPU in its node; boxes: replicas by logical expert; dashed: mean GPU load", fontsize=9)
    if title:
        figure.suptitle(title, fontsize=11)
    if few:
        from matplotlib.patches import Patch

        handles = [Patch(facecolor=palette(e), label=f"expert {e}") for e in range(num_experts)]
        figure.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 0.98), fontsize=8, frameon=False)
    else:
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize

        mappable = ScalarMappable(Normalize(0, num_experts - 1), palette)
        bar = figure.colorbar(mappable, ax=axes[:, 0].tolist(), pad=0.01, shrink=min(1.0, 2.5 / len(layers)), aspect=25)
        bar.set_label("logical expert")
    figure.savefig(path, dpi=120, bbox_inches="tight")  # the canvas grows to hold the legend
    plt.close(figure)
