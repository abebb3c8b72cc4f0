"""llama2.c checkpoints → standard Hugging Face Llama directories.

A llama2.c legacy checkpoint is a 7×int32 header (dim, hidden_dim, n_layers, n_heads, n_kv_heads,
vocab_size, seq_len; a negative vocab_size means the classifier is not shared with the embedding)
followed by fp32 tensors in a fixed order. llama2.c applies rotary embeddings to interleaved pairs
(0,1), (2,3)… of each head, HF Llama to halves (i, i+d/2), so q and k rows are permuted per head.

The tokenizer becomes a `tokenizers` BPE whose merges are *every* split of a vocab string into two
vocab strings, ranked by the merged string's llama2.c score. Repeatedly applying the best-ranked
available merge is exactly llama2.c's "merge the adjacent pair with the highest score" loop, and
the byte fallback (<0xXX> at id byte+3) and the leading space token map onto BPE's byte_fallback
and a Prepend(" ") normalizer. `llama2c_encode` is a direct transcription of run.c's encode, kept
as the reference the tests compare against.
"""
from __future__ import annotations

import math
import os
import struct
from pathlib import Path

import numpy as np
import torch

from .errors import LeanformerError
from .files import output_dir, save_json

# Bump when the conversion changes, so stale caches are rebuilt.
CONVERTER_VERSION = 1
HEADER_FIELDS = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")
SPECIAL_NAMES = {0: "<unk>", 1: "<s>", 2: "</s>"}  # llama2.c stores "<unk>", "\n<s>\n", "\n</s>\n"


# --------------------------------------------------------------------------------------------
# Checkpoint


def read_llama2c_checkpoint(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(header dict, llama2.c tensors by name) from a legacy (version 0) fp32 checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise LeanformerError(f"llama2.c checkpoint not found: {path}")
    data = path.read_bytes()
    if len(data) >= 4 and struct.unpack("<I", data[:4])[0] == 0x616B3432:
        raise LeanformerError(
            f"{path}: a versioned llama2.c export (magic 'ak42'); only the legacy fp32 format "
            "(export.py --version 0) is supported — re-export with version 0")
    if len(data) < 28:
        raise LeanformerError(f"{path}: {len(data)} bytes, too short for the 28-byte llama2.c header")
    hdr = dict(zip(HEADER_FIELDS, struct.unpack("<7i", data[:28])))
    shared = hdr["vocab_size"] > 0
    hdr["vocab_size"] = abs(hdr["vocab_size"])
    hdr["shared_classifier"] = shared
    d, hd, L, nh, nkv, V, T = (hdr[k] for k in HEADER_FIELDS)
    if min(d, hd, L, nh, nkv, V, T) <= 0 or d % nh or nh % nkv or (d // nh) % 2:
        raise LeanformerError(f"{path}: implausible llama2.c header {hdr} (all positive, dim divisible by "
                              "n_heads, n_heads by n_kv_heads, even head size expected)")
    hs, kv = d // nh, d // nh * nkv
    shapes = [("tok_embeddings", (V, d)), ("rms_att", (L, d)), ("wq", (L, d, d)), ("wk", (L, kv, d)),
              ("wv", (L, kv, d)), ("wo", (L, d, d)), ("rms_ffn", (L, d)), ("w1", (L, hd, d)),
              ("w2", (L, d, hd)), ("w3", (L, hd, d)), ("rms_final", (d,))]
    freqs = [("freq_cis_real", (T, hs // 2)), ("freq_cis_imag", (T, hs // 2))]
    n_main = sum(math.prod(s) for _, s in shapes)
    n_freq = sum(math.prod(s) for _, s in freqs)
    n_cls = 0 if shared else V * d
    have = (len(data) - 28) // 4
    # Older exports omit the rotary tables; both layouts are exact sizes, anything else is corrupt.
    if have == n_main + n_freq + n_cls and (len(data) - 28) % 4 == 0:
        layout = shapes + freqs
    elif have == n_main + n_cls and (len(data) - 28) % 4 == 0:
        layout = shapes
    else:
        raise LeanformerError(
            f"{path}: file is {len(data)} bytes but its header ({', '.join(f'{k}={hdr[k]}' for k in HEADER_FIELDS)}"
            f"{'' if shared else ', unshared classifier'}) implies {28 + 4 * (n_main + n_freq + n_cls)} bytes "
            f"(or {28 + 4 * (n_main + n_cls)} without rotary tables): truncated or not a llama2.c legacy checkpoint")
    flat = torch.from_numpy(np.frombuffer(data, dtype="<f4", offset=28).copy())
    tensors, off = {}, 0
    for name, shape in layout + ([("wcls", (V, d))] if not shared else []):
        n = math.prod(shape)
        tensors[name] = flat[off:off + n].view(shape)
        off += n
    return hdr, tensors


def _rope_theta(tensors: dict, head_size: int) -> float:
    """llama2.c always uses 10000; read it back from the stored table when there is one."""
    if "freq_cis_real" not in tensors or tensors["freq_cis_real"].shape[0] < 2:
        return 10000.0
    # Position 1, frequency index 1: angle = theta^(-2/head_size).
    angle = math.atan2(float(tensors["freq_cis_imag"][1, 1]), float(tensors["freq_cis_real"][1, 1]))
    return float(round(angle ** (-head_size / 2)))


def _permute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Interleaved-pair rotary rows (llama2.c / Meta) → rotate-half rows (HF Llama), per head."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def llama2c_to_hf(hdr: dict, t: dict[str, torch.Tensor]):
    # imported here: transformers' model classes pull in its whole modelling stack (about 3 s), which
    # `import leanformer` should not pay; the same holds for every model-class import in this package
    from transformers import LlamaConfig, LlamaForCausalLM

    """A transformers LlamaForCausalLM holding the checkpoint's weights."""
    d, nh, nkv = hdr["dim"], hdr["n_heads"], hdr["n_kv_heads"]
    config = LlamaConfig(
        vocab_size=hdr["vocab_size"], hidden_size=d, intermediate_size=hdr["hidden_dim"],
        num_hidden_layers=hdr["n_layers"], num_attention_heads=nh, num_key_value_heads=nkv,
        head_dim=d // nh, max_position_embeddings=hdr["seq_len"], rms_norm_eps=1e-5,
        rope_theta=_rope_theta(t, d // nh), hidden_act="silu", tie_word_embeddings=hdr["shared_classifier"],
        bos_token_id=1, eos_token_id=2, pad_token_id=None, architectures=["LlamaForCausalLM"])
    sd = {"model.embed_tokens.weight": t["tok_embeddings"], "model.norm.weight": t["rms_final"],
          "lm_head.weight": t["tok_embeddings"] if hdr["shared_classifier"] else t["wcls"]}
    for i in range(hdr["n_layers"]):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = t["rms_att"][i]
        sd[p + "post_attention_layernorm.weight"] = t["rms_ffn"][i]
        sd[p + "self_attn.q_proj.weight"] = _permute_rotary(t["wq"][i], nh)
        sd[p + "self_attn.k_proj.weight"] = _permute_rotary(t["wk"][i], nkv)
        sd[p + "self_attn.v_proj.weight"] = t["wv"][i]
        sd[p + "self_attn.o_proj.weight"] = t["wo"][i]
        sd[p + "mlp.gate_proj.weight"] = t["w1"][i]
        sd[p + "mlp.down_proj.weight"] = t["w2"][i]
        sd[p + "mlp.up_proj.weight"] = t["w3"][i]
    with torch.random.fork_rng(devices=[]):  # the throwaway random init must not move the caller's RNG
        model = LlamaForCausalLM(config)  # llama2.c models are small: init then overwrite is cheap
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise LeanformerError(f"internal: conversion left weights unmatched ({missing}, {unexpected})")
    if hdr["shared_classifier"]:
        model.tie_weights()
    return model.eval()


# --------------------------------------------------------------------------------------------
# Tokenizer


def read_llama2c_tokenizer(path: str | os.PathLike, vocab_size: int | None = None) -> list[tuple[bytes, float]]:
    """[(piece bytes, score)] from a llama2.c tokenizer.bin (int32 max_len, then score, len, bytes)."""
    path = Path(path)
    if not path.is_file():
        raise LeanformerError(f"llama2.c tokenizer not found: {path}")
    data = path.read_bytes()
    vocab, off = [], 4
    try:
        while off < len(data):
            score, n = struct.unpack("<fi", data[off:off + 8])
            if n < 0 or off + 8 + n > len(data):
                raise struct.error
            vocab.append((data[off + 8:off + 8 + n], score))
            off += 8 + n
    except struct.error:
        raise LeanformerError(f"{path}: malformed llama2.c tokenizer at byte {off} (entry {len(vocab)})") from None
    if vocab_size is not None and len(vocab) != vocab_size:
        raise LeanformerError(f"{path}: tokenizer has {len(vocab)} tokens but the checkpoint's vocab_size is "
                              f"{vocab_size}; pass the tokenizer the model was trained with")
    return vocab


def llama2c_encode(vocab: list[tuple[bytes, float]], text: str, bos: bool = False, eos: bool = False) -> list[int]:
    """Reference: llama2.c run.c `encode`, transcribed (dummy space, codepoints, byte+3, best merges)."""
    lookup = {}
    for i, (piece, _) in enumerate(vocab):
        lookup.setdefault(piece, i)
    ids = [1] if bos else []
    if text:
        ids.append(lookup[b" "])
    for ch in text:
        b = ch.encode("utf-8")
        if b in lookup:
            ids.append(lookup[b])
        else:
            ids.extend(x + 3 for x in b)
    while True:
        best, best_id, best_i = -1e10, -1, -1
        for i in range(len(ids) - 1):
            j = lookup.get(vocab[ids[i]][0] + vocab[ids[i + 1]][0])
            if j is not None and vocab[j][1] > best:
                best, best_id, best_i = vocab[j][1], j, i
        if best_i < 0:
            break
        ids[best_i:best_i + 2] = [best_id]
    return ids + ([2] if eos else [])


def _piece(i: int, b: bytes) -> str:
    return SPECIAL_NAMES.get(i) or b.decode("utf-8")


def build_tokenizer(vocab: list[tuple[bytes, float]], model_max_length: int = 512):
    """A PreTrainedTokenizerFast that encodes exactly like llama2.c (see the module docstring)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    try:
        pieces = [_piece(i, b) for i, (b, _) in enumerate(vocab)]
    except UnicodeDecodeError as e:
        raise LeanformerError(f"tokenizer piece is not valid UTF-8 ({e}); cannot build a BPE vocabulary") from e
    if len(set(pieces)) != len(pieces):
        raise LeanformerError("tokenizer has duplicate pieces; llama2.c lookup would be ambiguous")
    ids = {p: i for i, p in enumerate(pieces)}
    special = set(SPECIAL_NAMES)
    merges = []
    for j, p in enumerate(pieces):
        if j in special:
            continue
        for k in range(1, len(p)):
            a, b = p[:k], p[k:]
            if a in ids and b in ids and ids[a] not in special and ids[b] not in special:
                merges.append((-vocab[j][1], j, k, (a, b)))
    merges.sort()  # best score first; ties (same merged token) leftmost split first
    bpe = models.BPE(vocab=ids, merges=[m[3] for m in merges], unk_token="<unk>", byte_fallback=True,
                     fuse_unk=False)
    tok = Tokenizer(bpe)
    tok.normalizer = normalizers.Prepend(" ")  # llama2.c's dummy-prefix space (skipped for empty text)
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>",
        model_max_length=model_max_length, padding_side="right", clean_up_tokenization_spaces=False,
        add_bos_token=True, add_eos_token=False)


# --------------------------------------------------------------------------------------------
# Directory


def convert_llama2c(checkpoint: str | os.PathLike, tokenizer: str | os.PathLike, out: str | os.PathLike,
                    overwrite: bool = False) -> Path:
    """Write a Hugging Face Llama directory (config, safetensors weights, fast tokenizer) to `out`."""
    hdr, tensors = read_llama2c_checkpoint(checkpoint)
    vocab = read_llama2c_tokenizer(tokenizer, hdr["vocab_size"])
    model = llama2c_to_hf(hdr, tensors)
    tok = build_tokenizer(vocab, model_max_length=hdr["seq_len"])
    with output_dir(out, overwrite=overwrite) as stage:
        model.save_pretrained(stage, safe_serialization=True)
        tok.save_pretrained(stage)
        save_json(stage / "llama2c_source.json", {
            "converter_version": CONVERTER_VERSION, "checkpoint": str(Path(checkpoint).absolute()),
            "tokenizer": str(Path(tokenizer).absolute()), "header": hdr})
    return Path(out)
