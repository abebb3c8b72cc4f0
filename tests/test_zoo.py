"""Every verb on a zoo of architectures (tiny random configs built here, no downloads): inspect,
adapt + one training step + save/load, quantize + save/load, prune + save/load, export to peft.

Each (architecture, verb) outcome is recorded; with LEANFORMER_ZOO_RESULTS=path the module writes
them there as JSON when it finishes, and `python benchmarks/zoo_table.py` (which runs this module so)
turns them into the README's support table. Then Conv1D (GPT-2) as a first-class layer for every
adapter and quantizer, token-flattening MLPs (OPT) in capture, and the clear errors.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
import warnings

import pytest
import torch
import transformers
from peft import PeftModel
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TARGETS
from torch import nn
from transformers.pytorch_utils import Conv1D

import leanformer as lf
from leanformer.architectures import (ROLES, adapter_targets, find_blocks, find_mlp_activation, head_modules,
                                      role_layers, use_blocks)
from leanformer.capture import capture
from leanformer.errors import LeanformerError
from leanformer.targets import dense_weight, linear_shape, select_linear
from leanformer.text import default_corpus

WIDTH = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64, num_hidden_layers=3)
GQA = dict(WIDTH, num_key_value_heads=1)
# name → (transformers config class, its fields for a 3-block width-32 model, encoder or decoder)
ZOO = {
    "BERT": ("BertConfig", WIDTH, "encoder"),
    "RoBERTa": ("RobertaConfig", WIDTH, "encoder"),
    "DistilBERT": ("DistilBertConfig", dict(dim=32, n_heads=2, hidden_dim=64, n_layers=3), "encoder"),
    "DeBERTa-v2": ("DebertaV2Config", WIDTH, "encoder"),
    "ELECTRA": ("ElectraConfig", dict(WIDTH, embedding_size=32), "encoder"),
    "GPT-2": ("GPT2Config", dict(n_embd=32, n_head=2, n_layer=3, n_positions=64), "decoder"),
    "GPT-NeoX": ("GPTNeoXConfig", WIDTH, "decoder"),
    "OPT": ("OPTConfig", dict(hidden_size=32, num_attention_heads=2, ffn_dim=64, word_embed_proj_dim=32,
                              num_hidden_layers=3), "decoder"),
    "Llama": ("LlamaConfig", GQA, "decoder"),
    "Mistral": ("MistralConfig", GQA, "decoder"),
    "Qwen2": ("Qwen2Config", GQA, "decoder"),
    "Phi-3": ("Phi3Config", WIDTH, "decoder"),
    "Gemma": ("GemmaConfig", dict(GQA, head_dim=16), "decoder"),
    "Falcon": ("FalconConfig", dict(hidden_size=32, num_attention_heads=2, num_hidden_layers=3), "decoder"),
    # T5's classifier pools at the one eos of each sequence: minilm's [SEP] (102)
    "T5": ("T5Config", dict(d_model=32, d_kv=16, num_heads=2, d_ff=64, num_layers=3, decoder_start_token_id=0,
                            eos_token_id=102), "encoder-decoder"),
}
# What cannot work, and must fail with a clear error: leanformer reads one residual stream through one
# block list, and an encoder-decoder has two (the error lists them and points to --blocks / --targets).
UNSUPPORTED = {("T5", "inspect"): "block list.*encoder.block, decoder.block.*--blocks",
               ("T5", "adapt"): "block list.*--targets.*SelfAttention.q",
               ("T5", "prune"): "block list.*encoder.block, transformer.decoder.block.*--blocks"}
VERBS = ("inspect", "adapt", "quantize", "prune", "export_peft")
# What the architecture-aware default targets resolve to (peft's mapping where it has the type).
DEFAULT_TARGETS = {"BERT": ["query", "value"], "RoBERTa": ["query", "value"], "DistilBERT": ["q_lin", "v_lin"],
                   "DeBERTa-v2": ["query_proj", "value_proj"], "ELECTRA": ["query", "value"], "GPT-2": ["c_attn"],
                   "GPT-NeoX": ["query_key_value"], "OPT": ["q_proj", "v_proj"], "Llama": ["q_proj", "v_proj"],
                   "Mistral": ["q_proj", "v_proj"], "Qwen2": ["q_proj", "v_proj"], "Phi-3": ["qkv_proj"],
                   "Gemma": ["q_proj", "v_proj"], "Falcon": ["query_key_value"]}
AUTO = {"base": transformers.AutoModel, "causal-lm": transformers.AutoModelForCausalLM,
        "sequence-classification": transformers.AutoModelForSequenceClassification}

OUTCOMES: dict[str, dict[str, dict]] = {}


@pytest.fixture(scope="module", autouse=True)
def one_thread_and_written_outcomes():
    """Width-32 models gain nothing from threads, and on a shared 2-core machine oversubscribed
    threads make each tiny op cost milliseconds; the outcomes are written once at the end."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    path = os.environ.get("LEANFORMER_ZOO_RESULTS")
    if path:
        with open(path, "w") as f:
            json.dump(OUTCOMES, f, indent=1)


@contextlib.contextmanager
def recorded(arch: str, verb: str):
    """Record the outcome of one (architecture, verb): ok, a clear error (LeanformerError), or a failure."""
    started = time.perf_counter()
    entry = {"outcome": "ok"}
    try:
        yield entry
    except LeanformerError as e:
        entry.update(outcome="error", message=str(e))
        raise
    except BaseException as e:
        entry.update(outcome="fail", message=f"{type(e).__name__}: {e}"[:500])
        raise
    finally:
        entry["seconds"] = round(time.perf_counter() - started, 3)
        OUTCOMES.setdefault(arch, {})[verb] = entry


@contextlib.contextmanager
def outcome(arch: str, verb: str):
    """`recorded`, and for an UNSUPPORTED pair the check that it fails with the expected clear error."""
    pattern = UNSUPPORTED.get((arch, verb))
    if pattern is None:
        with recorded(arch, verb) as entry:
            yield entry
    else:
        with pytest.raises(LeanformerError, match=pattern), recorded(arch, verb) as entry:
            yield entry


def provided(arch: str) -> bool:
    return hasattr(transformers, ZOO[arch][0])


def build(arch: str, head: str, vocab_size: int, seed: int = 0) -> nn.Module:
    cls_name, fields, _ = ZOO[arch]
    if not provided(arch):
        OUTCOMES.setdefault(arch, {})["provided"] = {"outcome": "missing", "message": f"transformers "
                                                     f"{transformers.__version__} has no {cls_name}"}
        pytest.skip(f"transformers {transformers.__version__} has no {cls_name}")
    ids = dict(pad_token_id=0, bos_token_id=0, eos_token_id=0)  # inside the vocabulary; minilm's [PAD] is 0
    positions = {} if "n_positions" in fields else {"max_position_embeddings": 64}
    config = getattr(transformers, cls_name)(vocab_size=vocab_size, num_labels=2, **{**ids, **positions, **fields})
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AUTO[head].from_config(config).eval()


def lm_head(arch: str) -> str:
    """The head quantize and prune run with: the LM head of decoders, the bare encoder, and for an
    encoder-decoder its classifier (which feeds the decoder by itself)."""
    return {"decoder": "causal-lm", "encoder": "base", "encoder-decoder": "sequence-classification"}[ZOO[arch][2]]


def outputs(model: nn.Module, batch) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.fixture(scope="module")
def texts():
    return default_corpus()[:24]


@pytest.fixture(scope="module")
def batch(tokenizer):
    return tokenizer(["a short sentence to compare outputs", "another sentence, a little longer than the first one"],
                     padding=True, return_tensors="pt")


# ---------------------------------------------------------------------------------------------
# The zoo: every verb on every architecture


@pytest.mark.parametrize("arch", list(ZOO))
def test_inspect(arch, tokenizer, texts):
    model = build(arch, "base", tokenizer.vocab_size)
    with outcome(arch, "inspect"):
        profile = lf.inspect(model, tokenizer, texts, tokens=80, max_seq_length=32, batch_size=4, sample_size=64,
                             progress=False)
        assert len(profile.layers) == 4 and len(profile.transitions) == 3
        assert all(0 <= t["linearity"] <= 1 for t in profile.transitions)
        assert all(layer["mlp_sparsity"] is not None for layer in profile.layers[1:])  # the MLP was found


@pytest.mark.parametrize("arch", list(ZOO))
def test_adapt_train_step_save_load(arch, tokenizer, batch, tmp_path):
    model = build(arch, "sequence-classification", tokenizer.vocab_size).train()
    with outcome(arch, "adapt") as entry:
        lf.adapt(model, lf.LoRA(rank=2, modules_to_save=head_modules(model)))  # default targets
        targets = lf.applied(model)[-1].config.targets
        entry["targets"] = targets
        assert targets == DEFAULT_TARGETS[arch]
        trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        model(**batch, labels=torch.tensor([0, 1])).loss.backward()
        optimizer.step()
        changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, trainable[n])]
        assert any(".adapters." in n for n in changed)
        model.eval()
        expected = outputs(model, batch)
        lf.save(model, tokenizer, tmp_path / "adapted")
        loaded, _ = lf.load(tmp_path / "adapted")
        torch.testing.assert_close(outputs(loaded, batch), expected, rtol=0, atol=0)


@pytest.mark.parametrize("arch", list(ZOO))
def test_quantize_save_load(arch, tokenizer, batch, tmp_path):
    model = build(arch, lm_head(arch), tokenizer.vocab_size)
    with outcome(arch, "quantize") as entry:
        report = lf.quantize(model, lf.RTN(bits=4, group_size=16), progress=False)
        entry["layers"] = len(report.quantized)
        assert len(report.quantized) == len(select_linear(build(arch, lm_head(arch), tokenizer.vocab_size))) >= 9
        expected = outputs(model, batch)
        lf.save(model, tokenizer, tmp_path / "quantized")
        loaded, _ = lf.load(tmp_path / "quantized")
        torch.testing.assert_close(outputs(loaded, batch), expected, rtol=0, atol=0)


@pytest.mark.parametrize("arch", list(ZOO))
def test_prune_save_load(arch, tokenizer, texts, batch, tmp_path):
    model = build(arch, lm_head(arch), tokenizer.vocab_size)
    with outcome(arch, "prune"):
        result = lf.prune_layers(model, 1, tokenizer=tokenizer, texts=texts, replace="linear", tokens=96, max_length=32)
        assert len(find_blocks(model)[0]) == 3 and result.n_layers_after == 2
        expected = outputs(model, batch)
        lf.save(model, tokenizer, tmp_path / "pruned")
        loaded, _ = lf.load(tmp_path / "pruned")
        torch.testing.assert_close(outputs(loaded, batch), expected, rtol=0, atol=0)


@pytest.mark.parametrize("arch", list(ZOO))
def test_export_peft(arch, tokenizer, batch, tmp_path):
    """peft's model, loaded from our export onto a fresh base, computes what ours does."""
    model = build(arch, "sequence-classification", tokenizer.vocab_size)
    with outcome(arch, "export_peft"):
        lf.adapt(model, lf.LoRA(rank=2, targets="all-linear"))
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        expected = outputs(model, batch)
        lf.export_peft(model, tmp_path / "peft")
        peft_model = PeftModel.from_pretrained(build(arch, "sequence-classification", tokenizer.vocab_size),
                                               tmp_path / "peft").eval()
        torch.testing.assert_close(outputs(peft_model, batch), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Architecture-aware defaults


@pytest.mark.parametrize("arch", [a for a in ZOO if ZOO[a][2] != "encoder-decoder"])
def test_roles_and_peft_defaults(arch):
    """Default targets follow peft's mapping where peft has the type; every role resolves to layers of
    the right shape in every block (or, for gated MLPs only, to a clear error)."""
    model = build(arch, "base", 100)
    targets = adapter_targets(model)
    peft_default = PEFT_TARGETS.get(model.config.model_type)
    if peft_default is not None:
        assert targets == list(peft_default)
    assert select_linear(model, targets) == role_layers(model, ("q", "v"))
    hidden = model.config.hidden_size
    for role in ROLES:
        try:
            names = role_layers(model, (role,))
        except LeanformerError as e:
            assert role == "mlp_gate" and "mlp_gate" in str(e)
            continue
        assert len(names) == 3  # one per block
        shapes = {linear_shape(model.get_submodule(n)) for n in names}
        assert all((i if role in ("q", "k", "v", "mlp_in", "mlp_gate") else o) == hidden for i, o in shapes)
    assert head_modules(build(arch, "sequence-classification", 100)) in (["classifier"], ["score"],
                                                                          ["pre_classifier", "classifier"],
                                                                          ["pooler", "classifier"])


def test_ambiguous_suffixes_come_back_unambiguous(make_tiny_bert):
    """BERT's MLP output "output.dense" is also the end of "attention.output.dense"."""
    model = make_tiny_bert(layers=2)
    mlp_out = adapter_targets(model, ("mlp_out",))
    assert select_linear(model, mlp_out) == ["encoder.layer.0.output.dense", "encoder.layer.1.output.dense"]
    assert adapter_targets(model, ("o",)) == ["attention.output.dense"]
    with pytest.raises(LeanformerError, match="mlp_gate.*--targets"):
        adapter_targets(model, ("q", "mlp_gate"))
    with pytest.raises(LeanformerError, match="roles are q, k, v"):
        adapter_targets(model, ("query",))


def test_unknown_model_types_fall_back_to_names_and_shapes(monkeypatch, make_tiny_llama):
    model = make_tiny_llama(layers=2)
    monkeypatch.setattr(model.config, "model_type", "my-llama")
    assert adapter_targets(model) == ["q_proj", "v_proj"]
    assert adapter_targets(model, ("mlp_gate", "mlp_out")) == ["gate_proj", "down_proj"]
    assert find_blocks(model)[1] == "model.layers"


def test_default_adapter_targets_are_recorded_and_unchanged_for_bert(make_tiny_bert):
    """LoRA() without targets picks the same layers as the old ("query", "value") default on BERT."""
    model, explicit = make_tiny_bert(layers=2), make_tiny_bert(layers=2)
    lf.adapt(model, config := lf.LoRA(rank=2))
    lf.adapt(explicit, lf.LoRA(rank=2, targets=["query", "value"]))
    assert config.targets is None  # the user's config is left as given; the stack holds the choice
    assert lf.applied(model)[-1].config.targets == ["query", "value"]
    assert lf.applied(model)[-1].state["layers"] == lf.applied(explicit)[-1].state["layers"]
    assert lf.applied(model)[-1].to_json()["config"]["targets"] == ["query", "value"]


# ---------------------------------------------------------------------------------------------
# Conv1D (GPT-2): first-class for every adapter and quantizer


def linearized(model: nn.Module) -> nn.Module:
    """The same model with every Conv1D replaced by the equivalent nn.Linear (weight transposed)."""
    import copy

    twin = copy.deepcopy(model)
    for name, module in list(twin.named_modules()):
        if isinstance(module, Conv1D):
            linear = nn.Linear(module.nx, module.nf)
            with torch.no_grad():
                linear.weight.copy_(module.weight.T)
                linear.bias.copy_(module.bias)
            parent, _, child = name.rpartition(".")
            setattr(twin.get_submodule(parent), child, linear)
    return twin


ADAPTERS = {
    "lora": lambda: lf.LoRA(rank=4, targets="all-linear"),
    "lora_xs": lambda: lf.LoRAXS(rank=4, targets="all-linear"),
    "dylora": lambda: lf.DyLoRA(rank=4, targets="all-linear"),
    "krona": lambda: lf.KronA(targets="all-linear"),
    "krona_block": lambda: lf.KronA(targets=["mlp.c_proj"], variant="block_res"),
}


@pytest.mark.parametrize("method", list(ADAPTERS))
def test_conv1d_adapters_equal_their_linear_twin(method, tokenizer, batch, tmp_path):
    gpt2 = build("GPT-2", "sequence-classification", tokenizer.vocab_size)
    twin = linearized(gpt2)
    torch.testing.assert_close(outputs(twin, batch), outputs(gpt2, batch))
    for m in (gpt2, twin):
        torch.manual_seed(3)
        lf.adapt(m, ADAPTERS[method]())
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in m.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    expected = outputs(gpt2, batch)
    torch.testing.assert_close(expected, outputs(twin, batch), rtol=1e-5, atol=1e-6)
    lf.save(gpt2, tokenizer, tmp_path / "gpt2")
    torch.testing.assert_close(outputs(lf.load(tmp_path / "gpt2")[0], batch), expected, rtol=0, atol=0)
    if method != "krona_block":  # merging into the (in, out) Conv1D weight is exact too
        lf.merge(gpt2)
        torch.testing.assert_close(outputs(gpt2, batch), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config", [lf.Kashin(bits=3), lf.RTN(bits=4, group_size=16), lf.HQQ(bits=4, group_size=16)],
                         ids=lambda c: c.method)
def test_conv1d_quantizes_like_its_linear_twin(config, tokenizer, batch):
    """Quantizing a Conv1D stores and computes exactly what quantizing the equivalent Linear does."""
    gpt2 = build("GPT-2", "causal-lm", tokenizer.vocab_size)
    twin = linearized(gpt2)
    reference = {n: dense_weight(m).detach().clone() for n, m in gpt2.named_modules() if isinstance(m, Conv1D)}
    lf.quantize(gpt2, config, progress=False)
    lf.quantize(twin, config, progress=False)
    torch.testing.assert_close(outputs(gpt2, batch), outputs(twin, batch), rtol=0, atol=0)
    for name, w in reference.items():
        rebuilt = gpt2.get_submodule(name).dequantize()
        assert rebuilt.shape == w.shape and (rebuilt - w).norm() < 0.5 * w.norm()


def test_conv1d_adapter_on_a_quantized_base(tokenizer, batch, tmp_path):
    gpt2 = build("GPT-2", "causal-lm", tokenizer.vocab_size)
    lf.quantize(gpt2, lf.RTN(bits=4, group_size=16), progress=False)
    lf.adapt(gpt2, lf.LoRAXS(rank=2))  # its SVD reads the rebuilt (out, in) weight
    expected = outputs(gpt2, batch)
    lf.save(gpt2, tokenizer, tmp_path / "qa")
    torch.testing.assert_close(outputs(lf.load(tmp_path / "qa")[0], batch), expected, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Token-flattening MLPs (OPT) and shape surprises in capture


def test_opt_mlp_activations_are_counted_per_valid_token(tokenizer, batch):
    opt = build("OPT", "base", tokenizer.vocab_size)
    states, _, near_zero = capture(opt, batch, mlp_eps=1e-6)
    n_valid = int(batch["attention_mask"].sum())
    assert all(s.shape == (n_valid, 32) for s in states)
    assert [count for _, count in near_zero] == [n_valid * 64] * 3  # padding removed from the (B·S, ffn) rows
    assert all(0 < zeros < count for zeros, count in near_zero)  # ReLU: a real share of exact zeros


def test_a_shape_surprise_names_the_module(tokenizer, batch):
    opt = build("OPT", "base", tokenizer.vocab_size)
    blocks, path = find_blocks(opt)
    act = find_mlp_activation(opt, blocks[1])
    act.register_forward_hook(lambda _m, _a, out: out.reshape(-1)[:7])  # an output no token layout explains
    with pytest.raises(LeanformerError, match=rf"{path}\.1\.activation_fn: output of shape \(7,\)"):
        capture(opt, batch, mlp_eps=1e-6)


# ---------------------------------------------------------------------------------------------
# Models with unrecognisable parts: the error names what was looked for and the option


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.stages = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])
        self.extra = nn.ModuleList([nn.Linear(4, 4)])


def test_no_block_list_names_what_was_looked_for():
    model = Stack()
    with pytest.raises(LeanformerError, match=r"looked for .*encoder\.layer.*module lists are: stages, extra.*--blocks"):
        find_blocks(model)
    with pytest.raises(LeanformerError, match="'stage' is not a non-empty nn.ModuleList.*stages, extra"):
        use_blocks(model, "stage")
    use_blocks(model, "stages")
    assert find_blocks(model) == (model.stages, "stages")


def test_blocks_option_is_recorded_and_replayed(tokenizer, texts, batch, tmp_path):
    llama = build("Llama", "causal-lm", tokenizer.vocab_size)
    lf.prune_layers(llama, 1, by="index", start=1, replace="linear", blocks="model.layers", tokenizer=tokenizer,
                    texts=texts, tokens=96, max_length=32)
    expected = outputs(llama, batch)
    lf.save(llama, tokenizer, tmp_path / "pruned")
    assert json.loads((tmp_path / "pruned" / "leanformer.json").read_text())["transforms"][0]["config"]["blocks"] == \
        "model.layers"
    torch.testing.assert_close(outputs(lf.load(tmp_path / "pruned")[0], batch), expected, rtol=0, atol=0)
    with pytest.raises(LeanformerError, match="not a non-empty nn.ModuleList"):
        lf.prune_layers(build("Llama", "causal-lm", tokenizer.vocab_size), 1, by="index", blocks="model.norm")


@pytest.mark.parametrize("method", ["lora", "lora_xs", "dylora", "krona"])
def test_conv1d_exports_to_peft_exactly_or_says_why_not(method, tokenizer, batch, tmp_path):
    gpt2 = build("GPT-2", "sequence-classification", tokenizer.vocab_size)
    lf.adapt(gpt2, ADAPTERS[method]())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in gpt2.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    if method == "krona":
        with pytest.raises(LeanformerError, match="LoKr does not wrap Conv1D"):
            lf.export_peft(gpt2, tmp_path / "peft")
        return
    lf.export_peft(gpt2, tmp_path / "peft")
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    peft_model = PeftModel.from_pretrained(build("GPT-2", "sequence-classification", tokenizer.vocab_size),
                                           tmp_path / "peft").eval()
    torch.testing.assert_close(outputs(peft_model, batch), outputs(gpt2, batch), rtol=1e-5, atol=1e-6)


def test_krona_block_variant_finds_the_mlp_input_without_an_mlp_module(tokenizer, batch, tmp_path):
    """OPT keeps fc1 / fc2 directly in the block: the block adapter on fc2 reads fc1's (flattened) input."""
    opt = build("OPT", "causal-lm", tokenizer.vocab_size)
    lf.adapt(opt, lf.KronA(targets=["fc2"], variant="block_res"))
    block = opt.model.decoder.layers[0]
    adapter = block.fc2.adapters["default"]
    with torch.no_grad():
        adapter.res_scale.fill_(0.5)
        adapter.kron_A.normal_()
    seen = {}
    block.fc1.register_forward_pre_hook(lambda _m, args: seen.update(x1=args[0]))
    block.fc2.register_forward_hook(lambda m, args, out: seen.update(extra=out - m.base_layer(args[0])))
    expected = outputs(opt, batch)
    x1 = seen["x1"]
    torch.testing.assert_close(seen["extra"], 0.5 * x1 + x1 @ torch.kron(adapter.kron_A, adapter.kron_B).T)
    lf.save(opt, tokenizer, tmp_path / "krona")
    torch.testing.assert_close(outputs(lf.load(tmp_path / "krona")[0], batch), expected, rtol=0, atol=0)


def test_default_targets_after_pruning_the_first_block(tokenizer, texts):
    llama = build("Llama", "causal-lm", tokenizer.vocab_size)
    lf.prune_layers(llama, 1, by="index", start=0, replace="linear", tokenizer=tokenizer, texts=texts, tokens=96,
                    max_length=32)
    lf.adapt(llama, lf.LoRA(rank=2))
    assert lf.applied(llama)[-1].state["layers"] == [f"model.layers.{i}.self_attn.{p}_proj" for i in (1, 2)
                                                     for p in "qv"]
