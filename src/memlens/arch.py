"""Architecture adapters: the ONLY place in memlens that knows Hugging Face module names.

    adapter = adapter_for(model)                # by config.model_type
    adapter.module_name(3, "mlp_out")           # 'transformer.h.3.mlp.c_proj'
    W = adapter.get_edit_weight(model, 3)        # (d_model, d_ff), whatever the storage layout
    adapter.set_edit_weight(model, 3, W + dW)    # writes it back, bit-exact round trip
    adapter.hook_point("blocks.3.hook_mlp_out")  # HookPoint('transformer.h.3.mlp', 'output')
    parse_hook_name("blocks.3.hook_mlp_out")     # (3, 'hook_mlp_out')

Hook names follow TransformerLens so that a user can guess them:

| hook name                    | module                          | side   |
|------------------------------|---------------------------------|--------|
| ``hook_embed``               | token embedding                 | output |
| ``blocks.L.hook_resid_pre``  | block L                         | input  |
| ``blocks.L.hook_resid_post`` | block L                         | output |
| ``blocks.L.hook_attn_out``   | attention of block L            | output |
| ``blocks.L.hook_mlp_out``    | MLP of block L                  | output |
| ``blocks.L.mlp.hook_post``   | MLP output matrix of block L    | input  |
| ``blocks.L.mlp.hook_pre``    | MLP activation of block L       | input  |
| ``hook_final_norm``          | final norm                      | output |

``blocks.L.mlp.hook_post`` is the key **k** of ROME/MEMIT: the input of the edited matrix W,
whose output is the MLP's contribution **v = W k** to the residual stream.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from memlens.errors import InvalidArgument, LayerOutOfRange, UnknownArchitecture, UnknownName
from memlens.offload import read_tensor, write_tensor

Side = Literal["input", "output"]
Component = Literal[
    "block", "attn", "mlp", "mlp_in", "mlp_act", "mlp_out", "q", "k", "v", "o", "qkv",
    "ln_attn", "ln_mlp",
]


@dataclass(frozen=True)
class ArchSpec:
    """Module paths of one architecture family. Block-level paths are relative to a block."""

    embed: str  # token embedding, e.g. "transformer.wte"
    blocks: str  # nn.ModuleList of blocks, e.g. "transformer.h"
    final_norm: str  # e.g. "transformer.ln_f"
    unembed: str  # output projection to the vocabulary, e.g. "lm_head"
    attn: str  # attention module inside a block
    mlp: str  # MLP module inside a block
    mlp_in: tuple[str, ...]  # matrices that read the residual stream (Llama: gate and up)
    mlp_act: str  # the activation module (its input is the pre-activation)
    mlp_out: str  # the matrix ROME/MEMIT edit; its input is the key k
    ln_attn: str  # norm before attention
    ln_mlp: str | None  # norm before the MLP (None when attention and MLP share ln_attn)
    q: str | None = None  # separate query/key/value projections ...
    k: str | None = None
    v: str | None = None
    qkv: str | None = None  # ... or one fused projection (GPT-2 c_attn, NeoX query_key_value)
    o: str = ""  # attention output projection
    mlp_out_transposed: bool = False  # GPT-2's Conv1D stores the weight as (d_ff, d_model)
    pos_embed: str | None = None  # learned absolute positions, if any
    parallel_attn_mlp: bool = False  # GPT-J / NeoX: attention and MLP read the same residual
    # keyword under which a block hands the attention module its mask: a 4-D (B, 1, Q, K)
    # additive float mask (eager), a boolean one (sdpa, True = attend), or None (sdpa, causal)
    attn_mask_kwarg: str = "attention_mask"


_GPT2 = ArchSpec(
    embed="transformer.wte", pos_embed="transformer.wpe", blocks="transformer.h",
    final_norm="transformer.ln_f", unembed="lm_head",
    attn="attn", mlp="mlp", mlp_in=("mlp.c_fc",), mlp_act="mlp.act", mlp_out="mlp.c_proj",
    ln_attn="ln_1", ln_mlp="ln_2", qkv="attn.c_attn", o="attn.c_proj", mlp_out_transposed=True,
)
_GPT_NEO = ArchSpec(
    embed="transformer.wte", pos_embed="transformer.wpe", blocks="transformer.h",
    final_norm="transformer.ln_f", unembed="lm_head",
    attn="attn", mlp="mlp", mlp_in=("mlp.c_fc",), mlp_act="mlp.act", mlp_out="mlp.c_proj",
    ln_attn="ln_1", ln_mlp="ln_2", q="attn.attention.q_proj", k="attn.attention.k_proj",
    v="attn.attention.v_proj", o="attn.attention.out_proj",
)
_GPTJ = ArchSpec(
    embed="transformer.wte", blocks="transformer.h", final_norm="transformer.ln_f",
    unembed="lm_head", attn="attn", mlp="mlp", mlp_in=("mlp.fc_in",), mlp_act="mlp.act",
    mlp_out="mlp.fc_out", ln_attn="ln_1", ln_mlp=None, q="attn.q_proj", k="attn.k_proj",
    v="attn.v_proj", o="attn.out_proj", parallel_attn_mlp=True,
)
_GPT_NEOX = ArchSpec(
    embed="gpt_neox.embed_in", blocks="gpt_neox.layers", final_norm="gpt_neox.final_layer_norm",
    unembed="lm_head", attn="attention", mlp="mlp", mlp_in=("mlp.dense_h_to_4h",),
    mlp_act="mlp.act", mlp_out="mlp.dense_4h_to_h", ln_attn="input_layernorm",
    ln_mlp="post_attention_layernorm", qkv="attention.query_key_value", o="attention.dense",
    parallel_attn_mlp=True,
)
_LLAMA = ArchSpec(
    embed="model.embed_tokens", blocks="model.layers", final_norm="model.norm", unembed="lm_head",
    attn="self_attn", mlp="mlp", mlp_in=("mlp.gate_proj", "mlp.up_proj"), mlp_act="mlp.act_fn",
    mlp_out="mlp.down_proj", ln_attn="input_layernorm", ln_mlp="post_attention_layernorm",
    q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.o_proj",
)

#: ``config.model_type`` → module layout. Extend with :func:`register_architecture`.
ARCHITECTURES: dict[str, ArchSpec] = {
    "gpt2": _GPT2,
    "gpt_neo": _GPT_NEO,
    "gptj": _GPTJ,
    "gpt_neox": _GPT_NEOX,
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
}


def register_architecture(model_type: str, spec: ArchSpec) -> None:
    """Teach memlens a new ``config.model_type`` (module paths relative to the model and block)."""
    ARCHITECTURES[model_type] = spec


@dataclass(frozen=True)
class HookPoint:
    """A place to read or write an activation: a module's input or output."""

    module: str
    side: Side


_HOOK_NAME = re.compile(r"^blocks\.(\d+)\.(hook_resid_pre|hook_resid_post|hook_attn_out|"
                        r"hook_mlp_out|mlp\.hook_post|mlp\.hook_pre)$")
_BLOCK_HOOKS: dict[str, tuple[Component, Side]] = {
    "hook_resid_pre": ("block", "input"),
    "hook_resid_post": ("block", "output"),
    "hook_attn_out": ("attn", "output"),
    "hook_mlp_out": ("mlp", "output"),
    "mlp.hook_post": ("mlp_out", "input"),
    "mlp.hook_pre": ("mlp_act", "input"),
}


def parse_hook_name(name: str) -> tuple[int, str] | None:
    """``(L, hook)`` of a block hook name ``blocks.L.<hook>`` (see the module docstring), e.g.
    ``parse_hook_name("blocks.3.mlp.hook_post") == (3, "mlp.hook_post")``; None for any other
    name (``hook_embed``, ``hook_final_norm``, module paths, typos)."""
    match = _HOOK_NAME.match(name)
    return None if match is None else (int(match.group(1)), match.group(2))


class ArchAdapter:
    """Resolves module paths, hook names and the edited matrix for one model's architecture."""

    def __init__(self, model_type: str, spec: ArchSpec, n_layers: int):
        self.model_type = model_type
        self.spec = spec
        self.n_layers = n_layers

    def module_name(self, layer: int, component: Component) -> str:
        """Full dotted path of ``component`` in block ``layer``, e.g. ``transformer.h.3.mlp``."""
        if not 0 <= layer < self.n_layers:
            raise LayerOutOfRange(f"layer {layer} out of range: the model has {self.n_layers} "
                                  f"layers (0 … {self.n_layers - 1})")
        if component == "block":
            return f"{self.spec.blocks}.{layer}"
        if component == "mlp_in":
            return f"{self.spec.blocks}.{layer}.{self.spec.mlp_in[0]}"
        relative = getattr(self.spec, component)
        if relative is None:
            raise UnknownArchitecture(
                f"{self.model_type} has no separate '{component}' module "
                f"(fused qkv: {self.spec.qkv!r}, shared norm: ln_mlp={self.spec.ln_mlp!r})"
            )
        return f"{self.spec.blocks}.{layer}.{relative}"

    def edit_module_template(self) -> str:
        """The edited matrix's path with ``{}`` for the layer, as the ROME code writes it."""
        return f"{self.spec.blocks}.{{}}.{self.spec.mlp_out}"

    def hook_point(self, name: str) -> HookPoint:
        """Translate a TransformerLens-style hook name (see module docstring) to a HookPoint."""
        if name == "hook_embed":
            return HookPoint(self.spec.embed, "output")
        if name == "hook_final_norm":
            return HookPoint(self.spec.final_norm, "output")
        parsed = parse_hook_name(name)
        if parsed is None:
            raise UnknownName(
                f"unknown hook name {name!r}; expected hook_embed, hook_final_norm or "
                f"blocks.L.{{{', '.join(_BLOCK_HOOKS)}}}"
            )
        layer, hook = parsed
        component, side = _BLOCK_HOOKS[hook]
        return HookPoint(self.module_name(layer, component), side)

    def get_edit_weight(self, model: nn.Module, layer: int) -> torch.Tensor:
        """The edited matrix W of ``layer`` as a (d_model, d_ff) copy: v = W k."""
        stored = read_tensor(model, f"{self.module_name(layer, 'mlp_out')}.weight")
        return stored.T if self.spec.mlp_out_transposed else stored

    def set_edit_weight(self, model: nn.Module, layer: int, new: torch.Tensor) -> None:
        """Write W (d_model, d_ff) back into ``layer``'s edited matrix, in its storage layout
        (an offloaded matrix into its weights map: :func:`memlens.offload.write_tensor`)."""
        name = f"{self.module_name(layer, 'mlp_out')}.weight"
        weight = model.get_submodule(self.module_name(layer, "mlp_out")).weight
        value = new.T if self.spec.mlp_out_transposed else new
        if value.shape != weight.shape:
            raise InvalidArgument(
                f"edit weight for layer {layer} must be (d_model, d_ff) = "
                f"{tuple(weight.T.shape if self.spec.mlp_out_transposed else weight.shape)}, "
                f"got {tuple(new.shape)}"
            )
        write_tensor(model, name, value)

    def n_kv_heads(self, model: nn.Module) -> int:
        """Number of key/value heads (fewer than query heads under grouped-query attention)."""
        config = model.config
        return int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)

    def attn_head_view(
        self, model: nn.Module, layer: int, which: Literal["q", "k", "v", "o"],
        tensor: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Projection ``which`` of ``layer`` split by head, as (n_heads, d_head, d_model).

        For q/k/v, row ``[h, i]`` is the weight vector that produces feature i of head h from
        the residual stream; for o, ``[h, i]`` is the column that writes feature i of head h back.
        ``tensor`` is a tensor shaped like the stored weight (e.g. its ``.grad``); by default the
        weight itself. The result is a view where the layout allows, so writes go through.
        Fused layouts are handled here: GPT-2's Conv1D ``c_attn`` ([q | k | v] along its
        columns) and NeoX's ``query_key_value`` (per head [q, k, v] along its rows).
        """
        n_heads = int(model.config.num_attention_heads)
        heads = n_heads if which in ("q", "o") else self.n_kv_heads(model)
        if which != "o" and self.spec.qkv is not None:
            module = model.get_submodule(self.module_name(layer, "qkv"))
            t = module.weight if tensor is None else tensor
            index = "qkv".index(which)
            if self.spec.mlp_out_transposed:  # GPT-2 Conv1D: (d_model, 3 * d_model)
                d_model = t.shape[0]
                part = t[:, index * d_model:(index + 1) * d_model]
                return part.T.reshape(n_heads, d_model // n_heads, d_model)
            d_model = t.shape[1]  # NeoX Linear: (3 * d_model, d_model), rows (head, qkv, d_head)
            return t.view(n_heads, 3, d_model // n_heads, d_model)[:, index]
        module = model.get_submodule(self.module_name(layer, which))
        t = module.weight if tensor is None else tensor
        if which == "o":
            if self.spec.mlp_out_transposed:  # Conv1D c_proj: (n_heads * d_head, d_model)
                return t.view(heads, t.shape[0] // heads, t.shape[1])
            return t.T.reshape(heads, t.shape[1] // heads, t.shape[0])  # Linear: (d_model, H*dh)
        return t.view(heads, t.shape[0] // heads, t.shape[1])  # Linear: (heads * d_head, d_model)

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.spec.blocks)

    def embedding(self, model: nn.Module) -> nn.Embedding:
        return model.get_submodule(self.spec.embed)

    def unembedding(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.spec.unembed)

    def final_norm(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.spec.final_norm)


def adapter_for(model: nn.Module) -> ArchAdapter:
    """The adapter of ``model`` (a Hugging Face causal LM), chosen by ``config.model_type``."""
    model_type = getattr(model.config, "model_type", None)
    spec = ARCHITECTURES.get(model_type)
    if spec is None:
        raise UnknownArchitecture(
            f"memlens has no adapter for model_type {model_type!r} (known: "
            f"{', '.join(sorted(ARCHITECTURES))}). Register one with "
            "memlens.arch.register_architecture(model_type, ArchSpec(embed=..., blocks=..., "
            "final_norm=..., unembed=..., attn=..., mlp=..., mlp_in=..., mlp_act=..., "
            "mlp_out=..., ln_attn=..., ln_mlp=...)) giving the module paths of your model."
        )
    missing = [path for path in (spec.embed, spec.blocks, spec.final_norm, spec.unembed)
               if not _has_submodule(model, path)]
    if missing:
        raise UnknownArchitecture(
            f"model_type {model_type!r} is registered but this model lacks module(s) "
            f"{missing}; its adapter does not match this implementation"
        )
    n_layers = len(model.get_submodule(spec.blocks))
    return ArchAdapter(model_type, spec, n_layers)


def _has_submodule(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True
