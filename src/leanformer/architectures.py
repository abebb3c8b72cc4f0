"""Where each architecture keeps its parts: the block list, the attention and MLP projections, the MLP
activation and the task head. Every verb asks here instead of assuming BERT's or Llama's names.

A table per `config.model_type` (`ARCHITECTURES`) names each part by its path inside one block; a
model type not in the table falls back to a search by name and shape (`_guess`). Adapter targets
follow peft's defaults where peft has them (peft.utils.constants
TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING: the query and value projections, or the fused
qkv projection where the model has one); tests/test_zoo.py checks the table against peft's mapping.

Roles: "q", "k", "v" (fused models name one qkv layer for all three), "o" (attention output),
"mlp_in" (up projection), "mlp_gate" (gated MLPs only; fused gate+up counts as mlp_in and mlp_gate),
"mlp_out" (down projection).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from .errors import LeanformerError
from .targets import head_modules, linear_layers, linear_shape, suffix_summary

__all__ = ["ROLES", "ARCHITECTURES", "Architecture", "adapter_targets", "role_layers", "find_blocks", "use_blocks",
           "find_mlp_activation", "head_modules"]

ROLES = ("q", "k", "v", "o", "mlp_in", "mlp_gate", "mlp_out")
DEFAULT_ROLES = ("q", "v")  # LoRA's choice (Hu et al. 2021, §7.1) and peft's default mapping

# The attribute a user (or a recorded prune) sets to name the block list of an unknown architecture.
BLOCKS_ATTR = "leanformer_blocks"


@dataclass(frozen=True)
class Architecture:
    """Paths of one architecture's parts. `blocks` is relative to the base model (model.base_model);
    the rest are relative to one block. None: the architecture has no such part."""
    blocks: str
    q: str
    k: str
    v: str
    o: str
    mlp_in: str
    mlp_gate: str | None
    mlp_out: str
    mlp_act: str | None

    def role_path(self, role: str) -> str | None:
        return getattr(self, role)


_BERT = Architecture("encoder.layer", "attention.self.query", "attention.self.key", "attention.self.value",
                     "attention.output.dense", "intermediate.dense", None, "output.dense",
                     "intermediate.intermediate_act_fn")
_DEBERTA = Architecture("encoder.layer", "attention.self.query_proj", "attention.self.key_proj",
                        "attention.self.value_proj", "attention.output.dense", "intermediate.dense", None,
                        "output.dense", "intermediate.intermediate_act_fn")
_LLAMA = Architecture("layers", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                      "mlp.up_proj", "mlp.gate_proj", "mlp.down_proj", "mlp.act_fn")
_NEOX_MLP = dict(mlp_in="mlp.dense_h_to_4h", mlp_gate=None, mlp_out="mlp.dense_4h_to_h", mlp_act="mlp.act")

ARCHITECTURES: dict[str, Architecture] = {
    "bert": _BERT,
    "roberta": _BERT,
    "electra": _BERT,
    "deberta-v2": _DEBERTA,
    "distilbert": Architecture("transformer.layer", "attention.q_lin", "attention.k_lin", "attention.v_lin",
                               "attention.out_lin", "ffn.lin1", None, "ffn.lin2", "ffn.activation"),
    "gpt2": Architecture("h", "attn.c_attn", "attn.c_attn", "attn.c_attn", "attn.c_proj", "mlp.c_fc", None,
                         "mlp.c_proj", "mlp.act"),
    "gpt_neox": Architecture("layers", "attention.query_key_value", "attention.query_key_value",
                             "attention.query_key_value", "attention.dense", **_NEOX_MLP),
    "falcon": Architecture("h", "self_attention.query_key_value", "self_attention.query_key_value",
                           "self_attention.query_key_value", "self_attention.dense", **_NEOX_MLP),
    "opt": Architecture("decoder.layers", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                        "self_attn.out_proj", "fc1", None, "fc2", "activation_fn"),
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "gemma": _LLAMA,
    "phi3": Architecture("layers", "self_attn.qkv_proj", "self_attn.qkv_proj", "self_attn.qkv_proj",
                         "self_attn.o_proj", "mlp.gate_up_proj", "mlp.gate_up_proj", "mlp.down_proj",
                         "mlp.activation_fn"),
}

# Fallbacks for model types not in the table.
BLOCK_PATHS = ("model.layers", "model.decoder.layers", "encoder.layer", "transformer.h", "gpt_neox.layers",
               "transformer.layers", "transformer.layer", "layers", "decoder.layers", "h", "blocks", "encoder.layers",
               "layer")
ACTIVATION_NAMES = ("intermediate_act_fn", "act_fn", "activation_fn", "act", "activation")
ROLE_NAMES = {  # last name part of each role's layer, by the conventions of transformers' models
    "q": r"q|query|q_proj|q_lin|query_proj|wq|qkv|qkv_proj|query_key_value|c_attn|wqkv|in_proj",
    "k": r"k|key|k_proj|k_lin|key_proj|wk|qkv|qkv_proj|query_key_value|c_attn|wqkv|in_proj",
    "v": r"v|value|v_proj|v_lin|value_proj|wv|qkv|qkv_proj|query_key_value|c_attn|wqkv|in_proj",
    "o": r"o|o_proj|out_proj|out_lin|dense|c_proj|wo",
    "mlp_in": r"up_proj|fc1|lin1|c_fc|dense_h_to_4h|w1|w3|wi|gate_up_proj|dense",
    "mlp_gate": r"gate_proj|w1|gate_up_proj",
    "mlp_out": r"down_proj|fc2|lin2|c_proj|dense_4h_to_h|w2|wo|dense",
}
ATTENTION_PARENTS = r"attn|attention|self_attn|self_attention|self|mixer"
MLP_PARENTS = r"mlp|ffn|feed_forward|intermediate|output|ff"


def model_type(model: nn.Module) -> str:
    return str(getattr(getattr(model, "config", None), "model_type", "") or type(model).__name__)


def architecture(model: nn.Module) -> Architecture | None:
    """The table entry of this model's type, or None (then the search fallbacks apply)."""
    return ARCHITECTURES.get(model_type(model))


def _base(model: nn.Module) -> nn.Module:
    return getattr(model, "base_model", None) or model


def _prefix(model: nn.Module) -> str:
    """The base model's path inside `model` ("" when model is the base)."""
    base = _base(model)
    if base is model:
        return ""
    return next((n for n, m in model.named_modules() if m is base), "")


def _get(module: nn.Module, path: str) -> nn.Module | None:
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


# ---------------------------------------------------------------------------------------------
# Blocks


def _module_lists(model: nn.Module) -> list[str]:
    """Names of the non-empty nn.ModuleLists not nested in another one: the candidates for a block list."""
    out: list[str] = []
    for n, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) and not any(n.startswith(o + ".") for o in out):
            out.append(n)
    return out


def use_blocks(model: nn.Module, path: str | None) -> None:
    """Name the block list of `model` (its dotted path, e.g. "model.decoder.layers"): every verb then
    uses it. None clears the choice. A path that is not a non-empty nn.ModuleList is an error."""
    if path is None:
        if hasattr(model, BLOCKS_ATTR):
            delattr(model, BLOCKS_ATTR)
        return
    found = _get(model, path)
    if not isinstance(found, nn.ModuleList) or len(found) == 0:
        raise LeanformerError(f"blocks {path!r} is not a non-empty nn.ModuleList of {type(model).__name__}; "
                              f"its module lists are: {', '.join(_module_lists(model)) or '(none)'}")
    setattr(model, BLOCKS_ATTR, path)


def find_blocks(model: nn.Module) -> tuple[nn.ModuleList, str]:
    """The transformer's block list and its dotted path inside `model`: the one named with
    `use_blocks` (--blocks), else the architecture table's, else the first of BLOCK_PATHS under the
    base model, else the one nn.ModuleList of config.num_hidden_layers modules."""
    chosen = getattr(model, BLOCKS_ATTR, None)
    if chosen:
        return _get(model, chosen), chosen
    arch, base, prefix = architecture(model), _base(model), _prefix(model)
    paths = tuple(dict.fromkeys(((arch.blocks,) if arch else ()) + BLOCK_PATHS))
    for path in paths:
        for root, root_prefix in ((base, prefix), (model, "")):
            blocks = _get(root, path)
            if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
                return blocks, f"{root_prefix}.{path}" if root_prefix else path
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    candidates = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and n_layers
                  and len(m) == n_layers]
    if len(candidates) == 1:
        return candidates[0][1], candidates[0][0]
    lists = _module_lists(model)
    raise LeanformerError(
        f"cannot find the transformer block list of {type(model).__name__} (model type {model_type(model)!r}): "
        f"looked for {', '.join(paths)} under the model and its base model, and for one nn.ModuleList of "
        f"config.num_hidden_layers ({n_layers}) modules. Its module lists are: {', '.join(lists) or '(none)'}; "
        "name the block list with --blocks PATH (Python: blocks=PATH)")


def find_mlp_activation(model: nn.Module, block: nn.Module) -> nn.Module | None:
    """The MLP's activation module inside `block` (the table's, else the first leaf named like one of
    ACTIVATION_NAMES); None when there is none."""
    arch = architecture(model)
    if arch is not None and arch.mlp_act:
        found = _get(block, arch.mlp_act)
        if isinstance(found, nn.Module):
            return found
    for name, module in block.named_modules():
        if name.rsplit(".", 1)[-1] in ACTIVATION_NAMES and not list(module.children()):
            return module
    return None


# ---------------------------------------------------------------------------------------------
# Projections by role


def _role_paths(model: nn.Module, block: nn.Module, role: str) -> list[str]:
    """Paths inside one block of the layer(s) playing `role`: the table's when it exists and holds a
    Linear-like layer, else the search by name and shape."""
    layers = linear_layers(block)
    arch = architecture(model)
    if arch is not None:
        path = arch.role_path(role)
        if path is None:
            return []
        if path in layers:
            return [path]
    return _guess(model, layers, role)


def _guess(model: nn.Module, layers: dict[str, nn.Module], role: str) -> list[str]:
    """Layers of one block whose last name part is a conventional name of `role` under an attention
    (q/k/v/o) or MLP parent, reading the hidden size (q/k/v/mlp_in/mlp_gate) or writing it (o/mlp_out)."""
    hidden = int(getattr(getattr(model, "config", None), "hidden_size", 0) or 0)
    attention = role in ("q", "k", "v", "o")
    parents = ATTENTION_PARENTS if attention else MLP_PARENTS
    found = []
    for path, layer in layers.items():
        parts = path.split(".")
        if not re.fullmatch(ROLE_NAMES[role], parts[-1].lower()):
            continue
        if len(parts) > 1 and not any(re.fullmatch(parents, p.lower()) for p in parts[:-1]):
            continue
        if attention and len(parts) > 1 and any(re.fullmatch(MLP_PARENTS, p.lower()) and p != "output"
                                                for p in parts[:-1]):
            continue
        in_f, out_f = linear_shape(layer)
        reads_hidden = role in ("q", "k", "v", "mlp_in", "mlp_gate")
        if hidden and (in_f if reads_hidden else out_f) != hidden:
            continue
        if role == "mlp_in" and parts[-1] == "dense" and "intermediate" not in parts:
            continue  # BERT-style "dense" is the up projection only under "intermediate"
        if role == "mlp_out" and parts[-1] == "dense" and (in_f == out_f or "attention" in parts):
            continue
        found.append(path)
    return found[:1]


def role_layers(model: nn.Module, roles=DEFAULT_ROLES) -> list[str]:
    """Full names of the Linear-like layers playing `roles` in every block, in block order."""
    unknown = [r for r in roles if r not in ROLES]
    if unknown or not roles:
        raise LeanformerError(f"unknown role(s) {unknown or roles!r}; roles are {', '.join(ROLES)}")
    all_layers = linear_layers(model)
    try:
        blocks, path = find_blocks(model)
    except LeanformerError as e:  # roles are found per block; naming the layers needs no block list
        raise LeanformerError(f"{e}; or name the layers with --targets (Python: targets=[...]) — its Linear "
                              f"layers are: {suffix_summary(list(all_layers))}") from e
    chosen: list[str] = []
    missing = []
    # a block with layers to look at (a pruned model's first block may be a fitted linear map)
    reference = next((b for b in blocks if linear_layers(b)), blocks[0])
    for role in roles:
        paths = _role_paths(model, reference, role)
        if not paths:
            missing.append(role)
            continue
        for i in range(len(blocks)):
            for p in paths:
                name = f"{path}.{i}.{p}"
                if name in all_layers and name not in chosen:
                    chosen.append(name)
    if missing:
        arch = architecture(model)
        looked = (f"the {model_type(model)} table names no {' / '.join(missing)} layer" if arch is not None else
                  "looked for layers named " + "; ".join(f"{r}: {ROLE_NAMES[r].replace('|', ', ')}" for r in missing)
                  + f" inside {path}.N (attention parents {ATTENTION_PARENTS.replace('|', ', ')}; MLP parents "
                  f"{MLP_PARENTS.replace('|', ', ')})")
        raise LeanformerError(
            f"{type(model).__name__}: no layer plays the role(s) {', '.join(missing)} ({looked}). Its Linear layers "
            f"are: {suffix_summary(list(all_layers))}; name them with --targets (Python: targets=[...])")
    order = {n: k for k, n in enumerate(all_layers)}
    return sorted(chosen, key=order.__getitem__)


def unambiguous_suffixes(names: list[str], all_names: list[str]) -> list[str]:
    """The shortest dotted suffixes that select exactly `names` among `all_names` under suffix matching
    ("output.dense" would also select BERT's "attention.output.dense", so BERT's MLP output layers come
    back as "layer.0.output.dense", …); one suffix shared by all layers when one suffices."""
    wanted = set(names)

    def selects_only_wanted(suffix: str) -> bool:
        return all(n in wanted for n in all_names if n == suffix or n.endswith("." + suffix))

    out: list[str] = []
    for name in names:
        parts = name.split(".")
        suffix = next(".".join(parts[-k:]) for k in range(1, len(parts) + 1)
                      if selects_only_wanted(".".join(parts[-k:])))
        if suffix not in out:
            out.append(suffix)
    return out


def adapter_targets(model: nn.Module, roles=DEFAULT_ROLES) -> list[str]:
    """Module-name suffixes that select exactly the layers playing `roles` (see ROLES) on this model's
    architecture: ["query", "value"] on BERT, ["q_proj", "v_proj"] on Llama, ["c_attn"] on GPT-2,
    ["layer.0.output.dense", …] for BERT's MLP output. A LeanformerError names what was looked for
    when a role has no layer."""
    all_names = list(linear_layers(model))
    role_layers(model, tuple(roles))  # one error naming every missing role
    out: list[str] = []
    for role in roles:  # in the order asked for: ["q_proj", "v_proj"] even where v_proj is defined first
        out += [s for s in unambiguous_suffixes(role_layers(model, (role,)), all_names) if s not in out]
    return out
