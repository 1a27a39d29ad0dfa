"""TopK language models (Takahashi et al. 2025): sparse MLP activations you can read and steer.

    from memlens import topk
    topk.to_topk(handle.model, k=64)                      # convert in place (config records it)
    report = topk.neuron_report(handle, texts)            # token / semantic entropy per neuron
    topk.steer(handle, layer=2, unit=17, delta=8.0, prompts=["The city of"])
    pair = topk.train_pair(config, tokenizer, train_blocks, heldout_blocks, TopKTrainConfig())

The activation and the conversion (with its config round trip) are core, in
:mod:`memlens.topk_mlp`, because :func:`memlens.load_model` re-applies them; they are
re-exported here. Modules: ``data`` (an organism's text in blocks), ``train`` (TopK model and
dense twin, snapshots over training), ``neurons`` (entropies, top tokens), ``steer`` (add δ to
one neuron while generating), ``formation`` (neurons followed over the snapshots). The whole study in one call is :func:`memlens.studies.topk.run_all`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from memlens.topk_mlp import (
    ACTIVATIONS,
    TopK,
    TopKError,
    TopKSettings,
    alpha_at,
    apply_topk_from_config,
    default_layers,
    set_alpha,
    to_topk,
    topk_modules,
    topk_settings,
)

_LAZY = {
    "neuron_report": "memlens.topk.neurons",
    "NeuronReport": "memlens.topk.neurons",
    "LayerNeurons": "memlens.topk.neurons",
    "plot_entropy_by_layer": "memlens.topk.neurons",
    "steer": "memlens.topk.steer",
    "steer_report": "memlens.topk.steer",
    "auto_neurons": "memlens.topk.steer",
    "SteerReport": "memlens.topk.steer",
    "TopKTrainConfig": "memlens.topk.train",
    "train_pair": "memlens.topk.train",
    "sparsity_report": "memlens.topk.train",
    "PairResult": "memlens.topk.train",
    "list_snapshots": "memlens.topk.train",
    "formation_report": "memlens.topk.formation",
    "FormationReport": "memlens.topk.formation",
}

if TYPE_CHECKING:
    from memlens.topk.neurons import (
        LayerNeurons,
        NeuronReport,
        neuron_report,
        plot_entropy_by_layer,
    )
    from memlens.topk.steer import SteerReport, auto_neurons, steer, steer_report
    from memlens.topk.train import PairResult, TopKTrainConfig, sparsity_report, train_pair


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'memlens.topk' has no attribute {name!r}")


__all__ = [
    "ACTIVATIONS", "LayerNeurons", "NeuronReport", "PairResult", "SteerReport", "TopK",
    "TopKError", "TopKSettings", "TopKTrainConfig", "alpha_at", "apply_topk_from_config",
    "auto_neurons", "default_layers", "neuron_report", "plot_entropy_by_layer",
    "set_alpha", "sparsity_report", "steer", "steer_report", "to_topk", "topk_modules",
    "topk_settings", "train_pair",
]
