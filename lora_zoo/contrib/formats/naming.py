"""One canonical module naming per base architecture, so LoRAs from different tools line up.

Canonical names are the PEFT paths inside the model the LoRA adapts:
- a transformers model (LLM, CLIP...): the path PEFT gives under ``PeftModel`` without
  ``base_model.model.`` (``model.layers.0.self_attn.q_proj``);
- a Stable-Diffusion-style pipeline: UNet modules keep their bare UNet path
  (``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``, exactly what PEFT on the UNet
  and the text-to-image builder produce), text-encoder modules are prefixed with the pipeline
  component (``text_encoder.text_model.encoder.layers.0.self_attn.q_proj``, ``text_encoder_2.``).

Kohya flattens paths with ``_`` which is ambiguous (``to_q`` vs ``to.q``); with the base
architecture's module list the reverse mapping is exact, without it a vocabulary of compound
names used by diffusers / transformers models resolves the common cases.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from lora_zoo.errors import UnknownLayoutError, UnsupportedVariantError

UNET = "unet"
TEXT_COMPONENTS = ("text_encoder_2", "text_encoder")  # longest first: prefix matching
KOHYA_PREFIX = {UNET: "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}
_KOHYA_IN = (
    ("lora_unet_", UNET),
    ("lora_te1_", "text_encoder"),
    ("lora_te2_", "text_encoder_2"),
    ("lora_te_", "text_encoder"),
)
# compound identifiers that contain "_" (diffusers UNets, CLIP, common LLMs), longest first
_COMPOUNDS = sorted(
    {
        "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v",
        "to_out", "proj_in", "proj_out", "time_emb_proj", "conv_shortcut", "conv_in",
        "conv_out", "time_embedding", "linear_1", "linear_2", "add_embedding", "conv_norm_out",
        "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "text_projection",
        "final_layer_norm", "layer_norm1", "layer_norm2", "token_embedding",
        "position_embedding", "gate_proj", "up_proj", "down_proj", "o_proj", "embed_tokens",
        "lm_head", "c_attn", "c_proj", "c_fc", "add_k_proj", "add_v_proj", "add_q_proj",
        "to_add_out", "norm_out", "proj_mlp", "context_embedder", "x_embedder",
        "dense_h_to_4h", "dense_4h_to_h", "query_key_value", "word_embeddings", "fc_in",
        "fc_out", "w1", "w2", "w3", "wq", "wk", "wv", "wo", "in_proj", "out_proj_weight",
    },
    key=lambda s: -s.count("_"),
)  # fmt: skip
_SGM = re.compile(r"^(input_blocks|output_blocks|middle_block)_")


def split_component(name: str) -> tuple[str, str]:
    """``text_encoder.x.y`` -> (``text_encoder``, ``x.y``); bare names belong to the UNet /
    the single adapted model."""
    for comp in TEXT_COMPONENTS:
        if name.startswith(comp + "."):
            return comp, name[len(comp) + 1 :]
    return UNET, name


def join_component(component: str, path: str) -> str:
    return path if component == UNET else f"{component}.{path}"


_CLIP_TOP = ("encoder.", "embeddings.", "final_layer_norm")


def canonical(component: str, path: str) -> str:
    """Canonical name of ``path`` inside a pipeline ``component``. CLIP text encoders are
    flattened in recent transformers (``encoder.layers...``) but kohya / A1111 / older diffusers
    files say ``text_model.encoder.layers...``; the canonical name keeps ``text_model.`` so both
    line up whatever transformers version wrote them."""
    if component != UNET and path.startswith(_CLIP_TOP):
        path = "text_model." + path
    return join_component(component, path)


def kohya_name(name: str) -> str:
    """Canonical name -> kohya lora name (``lora_unet_down_blocks_0_..._to_q``)."""
    comp, path = split_component(name)
    return KOHYA_PREFIX[comp] + path.replace(".", "_")


def _heuristic_dots(flat: str) -> str:
    tokens = flat.split("_")
    out: list[str] = []
    i = 0
    while i < len(tokens):
        for comp in _COMPOUNDS:
            parts = comp.split("_")
            if tokens[i : i + len(parts)] == parts:
                out.append(comp)
                i += len(parts)
                break
        else:
            out.append(tokens[i])
            i += 1
    return ".".join(out)


def kohya_to_canonical(
    lora_name: str, known: Iterable[str] | None = None, *, file: str | None = None
) -> str:
    """Kohya lora name -> canonical module name; exact when ``known`` canonical names are given."""
    hit = next(((p, c) for p, c in _KOHYA_IN if lora_name.startswith(p)), None)
    if hit is None:
        raise UnknownLayoutError(
            "kohya module name must start with lora_unet_ / lora_te_ / lora_te1_ / lora_te2_",
            file=file,
            key=lora_name,
        )
    prefix, comp = hit
    flat = lora_name[len(prefix) :]
    if known is not None:
        table = {kohya_name(n): n for n in known}
        key = KOHYA_PREFIX[comp] + flat  # lora_te1_ and lora_te_ both mean text_encoder
        if key in table:
            return table[key]
    if comp == UNET and _SGM.match(flat):
        raise UnsupportedVariantError(
            "SGM/LDM-style UNet names (SDXL kohya files) need the base UNet's block layout; "
            "convert the file with diffusers first or pass --base-model with the UNet config",
            file=file,
            key=lora_name,
        )
    return canonical(comp, _heuristic_dots(flat))


_OLD_PROC = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora$")
_OLD_TE_PROC = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


def old_diffusers_path(path: str, component: str) -> str:
    """Older diffusers attention-processor paths -> module paths:
    ``...attn1.processor.to_q_lora`` -> ``...attn1.to_q`` (``to_out`` -> ``to_out.0``);
    text-encoder ``self_attn.to_q_lora`` -> ``self_attn.q_proj``."""
    m = _OLD_PROC.search(path)
    if m:
        proj = m.group(1)
        return path[: m.start()] + "." + ("to_out.0" if proj == "to_out" else proj)
    m = re.search(r"\.(to_q|to_k|to_v|to_out)_lora$", path)
    if m:
        proj = m.group(1)
        if component != UNET:
            return path[: m.start()] + "." + _OLD_TE_PROC[proj]
        return path[: m.start()] + "." + ("to_out.0" if proj == "to_out" else proj)
    return path
