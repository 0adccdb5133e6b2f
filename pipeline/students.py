"""Students made from a teacher: cut from it (depth pruning) or initialised in its architecture.

`cut` keeps N of the teacher's decoder layers (DistilBERT, Minitron's depth pruning): the embeddings,
the chosen layers in their order, the final norm and the LM head are copied, the config says N layers
(and keeps each kept layer's own `layer_types` entry), a tied head stays tied. The cut model is a new
model of the teacher's class built from that config, and the teacher's weights are loaded into it
under the layers' new indices (strictly: every weight has its place), so each attention layer knows its
new index (the KV cache is indexed by it).

`like_config` is the teacher's config (its model type, activation, norm, RoPE, attention bias ...)
with a student's sizes, vocabulary and special token ids: a random-init student of the teacher's
architecture, not always Qwen3's.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from kdpipe.errors import KdpipeError

# config entries that hold one value per layer (cut keeps the chosen layers' values)
PER_LAYER = ("layer_types",)
# config entries a student built from a teacher's config must not inherit
NOT_INHERITED = ("quantization_config", "_name_or_path", "architectures", "layer_types",
                 "transformers_version", "dtype", "torch_dtype")


def evenly_spaced(total: int, n: int) -> list[int]:
    """`n` of `total` layer indices, evenly spaced, the first and the last kept (n = 1: the first)."""
    if n == 1:
        return [0]
    return [round(i * (total - 1) / (n - 1)) for i in range(n)]


def choose_layers(total: int, layers: int | None, layer_ids: list[int] | None, source: str) -> list[int]:
    """The teacher's layers to keep: `layer_ids` as given, else `layers` evenly spaced; checked."""
    if layer_ids is None:
        if layers is None or not 1 <= layers <= total:
            raise KdpipeError(f"--layers {layers}: {source} has {total} decoder layers; keep 1 to {total} "
                              "(or list them with --layer-ids)")
        return evenly_spaced(total, layers)
    if not layer_ids:
        raise KdpipeError("--layer-ids is empty; list the teacher's layers to keep, e.g. --layer-ids 0,5,9")
    bad = [i for i in layer_ids if not 0 <= i < total]
    if bad:
        raise KdpipeError(f"--layer-ids: layer {bad[0]} does not exist; {source} has {total} decoder layers, "
                          f"0 to {total - 1}")
    repeated = sorted({i for i in layer_ids if layer_ids.count(i) > 1})
    if repeated:
        raise KdpipeError(f"--layer-ids lists layer {repeated[0]} twice; each kept layer is copied once")
    if layers is not None and layers != len(layer_ids):
        raise KdpipeError(f"--layers {layers} but --layer-ids lists {len(layer_ids)} layers; give one of "
                          "them (or both agreeing)")
    return list(layer_ids)


def decoder_layers(model: Any) -> tuple[str, int]:
    """(state-dict prefix, count) of the model's stack of decoder layers: the module list as long as the
    config's num_hidden_layers (``model.layers`` in Llama/Qwen, ``transformer.h`` in GPT-2)."""
    total = getattr(model.config, "num_hidden_layers", None)
    found = [name for name, module in model.named_modules()
             if isinstance(module, torch.nn.ModuleList) and len(module) == total]
    if not isinstance(total, int) or len(found) != 1:
        raise KdpipeError(f"cannot find the decoder layers of {type(model).__name__} (num_hidden_layers: "
                          f"{total}, matching layer lists: {found or 'none'}); --from supports decoder-only "
                          "models with one stack of layers (Llama, Qwen, Mistral, GPT-2, ...)")
    return found[0], total


def cut(model: Any, layer_ids: list[int]) -> Any:
    """A new model of `model`'s class with only `layer_ids` of its decoder layers (in that order), every
    other weight copied; tied embeddings stay tied."""
    from transformers import AutoModelForCausalLM

    prefix, total = decoder_layers(model)
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = len(layer_ids)
    for key in PER_LAYER:
        values = getattr(config, key, None)
        if isinstance(values, list) and len(values) == total:
            setattr(config, key, [values[i] for i in layer_ids])
    if hasattr(config, "quantization_config"):  # a GGUF teacher is dequantized: the student is plain weights
        del config.quantization_config
    new_index = {old: new for new, old in enumerate(layer_ids)}
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith(prefix + "."):
            index, _, rest = key[len(prefix) + 1:].partition(".")
            if int(index) not in new_index:
                continue
            key = f"{prefix}.{new_index[int(index)]}.{rest}"
        state[key] = value
    student = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    student.load_state_dict(state, strict=True)
    student.generation_config = copy.deepcopy(model.generation_config)
    return student.eval()


def is_causal_lm(config: Any) -> bool:
    """Whether transformers has a causal LM class for this config."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    return type(config) in MODEL_FOR_CAUSAL_LM_MAPPING


def is_tied(model: Any) -> bool:
    out = model.get_output_embeddings()
    return out is not None and out.weight is model.get_input_embeddings().weight


def like_config(teacher: Any, sizes: dict[str, Any], tokenizer: Any, tie: bool) -> Any:
    """The teacher's config (a transformers config) with the student's `sizes` (hidden_size,
    num_hidden_layers, num_attention_heads, num_key_value_heads, head_dim, intermediate_size), the
    tokenizer's vocabulary and special ids, and a tied head or not."""
    from transformers import AutoConfig

    values = {k: v for k, v in teacher.to_dict().items() if k not in NOT_INHERITED}
    values.update(sizes, vocab_size=len(tokenizer), tie_word_embeddings=tie, **token_ids(tokenizer))
    values.pop("model_type", None)
    try:
        return AutoConfig.for_model(teacher.model_type, **values)
    except (ValueError, TypeError) as e:
        raise KdpipeError(f"--like: cannot build a {teacher.model_type} config with these sizes: {e}"
                          ) from None


def token_ids(tokenizer: Any) -> dict[str, int | None]:
    """The model config's bos/eos/pad ids, from the tokenizer (so that transformers never warns that the
    tokenizer has new special tokens)."""
    return {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id}
