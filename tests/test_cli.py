"""The command line generated from the config dataclasses: help from field metadata, one flag per
field, the same flag names on every command, deprecated aliases, and round trips on tiny models."""
from __future__ import annotations

import argparse
import dataclasses
import typing

import pytest
import torch

import leanformer as lf
from leanformer.cli import build_parser, main
from leanformer.cli._config_args import cli_fields, config_from_args, flag_name, parse_targets
from leanformer.compress.quantization import METHODS, QuantizedLinear
from leanformer.compress.prune import LinearReplacement
from leanformer.capture import find_blocks
from leanformer.files import load_json
from leanformer.targets import Targets

CONFIGS = {"inspect": [lf.InspectConfig], "prune": [lf.PruneConfig], "eval": [lf.EvalConfig],
           "generate": [lf.GenerateConfig], "compress": [METHODS[m] for m in ("kashin", "rtn", "hqq")]}
TEXT = "\n\n".join(f"Story {i}: the little fox ran over the hill, found a river, and sat down to watch the "
                   f"boats go by until the sun went down behind the trees." for i in range(40))


def subparsers() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def actions(parser) -> dict[str, argparse.Action]:
    return {s: a for a in parser._actions for s in a.option_strings}


@pytest.fixture(scope="module")
def parsers():
    return subparsers()


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "stories.txt"
    path.write_text(TEXT)
    return path


# ------------------------------------------------------------------------------ flags from fields


@pytest.mark.parametrize("command", sorted(CONFIGS))
def test_every_field_is_a_flag_with_the_fields_help(command, parsers):
    by_flag = actions(parsers[command])
    for cls in CONFIGS[command]:
        for f in dataclasses.fields(cls):
            if not f.metadata.get("cli", True):
                assert f.name == "filter_fn"  # code, not data: the one field without a flag
                continue
            action = by_flag.get(flag_name(f))
            assert action is not None, f"{command}: no flag for {cls.__name__}.{f.name}"
            assert action.dest == f.name
            assert action.help.startswith(f.metadata["help"]), f"{command} {flag_name(f)}: help not from metadata"
    assert "_" not in "".join(s for a in parsers[command]._actions for s in a.option_strings)


def test_help_shows_each_methods_own_default_and_groups_method_only_flags(parsers):
    help_text = " ".join(parsers["compress"].format_help().split())
    assert "(default: kashin none, rtn 128, hqq 64, gptq 128)" in help_text
    assert "gptq only:" in help_text and "--act-order" in help_text
    assert "kashin only:" in help_text
    assert "(default: 16384)" in " ".join(parsers["inspect"].format_help().split())


def _value(cls, f, hint):
    """A valid value different from the field's default, and the argv that gives it."""
    default = f.default if f.default is not dataclasses.MISSING else None
    if hint == Targets:
        return ["query", "value"], [flag_name(f), "query", "value"]
    if "choices" in f.metadata:
        v = next(c for c in f.metadata["choices"] if c != default)
        return v, [flag_name(f), str(v)]
    inner = next((a for a in typing.get_args(hint) if a is not type(None)), hint)
    if inner is bool:
        return (not default), [("--no-" if default else "--") + flag_name(f)[2:]]
    v = {int: default + 1 if default else 3, float: (default or 0.5) / 2, str: f"{default}.x"}[inner]
    return v, [flag_name(f), str(v)]


FIXED = {lf.PruneConfig: {"by": "index"}, METHODS["kashin"]: {"form": "vector", "rows_per_vector": 1, "codebook": "closed"}}  # values other fields need


@pytest.mark.parametrize("command", sorted(CONFIGS))
def test_every_flag_reaches_its_config(command, parsers):
    for cls in CONFIGS[command]:
        hints = typing.get_type_hints(cls)
        expected, argv = {}, []
        for f in cli_fields(cls):
            if f.name in FIXED.get(cls, {}):
                expected[f.name] = FIXED[cls][f.name]
                argv += [flag_name(f), str(expected[f.name])]
            else:
                expected[f.name], more = _value(cls, f, hints[f.name])
                argv += more
        positional = {"inspect": [], "generate": ["m", "--prompt", "p"], "compress": ["m", "--out", "o"],
                      "eval": ["m"], "prune": ["m", "--out", "o"]}[command]
        if command == "compress":
            positional += ["--method", cls.method]
        args = parsers[command].parse_args(positional + argv)
        assert config_from_args(cls, args) == cls(**expected)


def test_absent_flags_keep_the_dataclass_defaults(parsers):
    args = parsers["compress"].parse_args(["m", "--method", "hqq", "--out", "o"])
    assert config_from_args(METHODS["hqq"], args) == lf.HQQ()
    assert config_from_args(lf.InspectConfig, parsers["inspect"].parse_args([])) == lf.InspectConfig()


def test_the_same_flags_mean_the_same_on_every_command(parsers):
    shared = {"--max-seq-length": ("inspect", "prune", "eval"), "--batch-size": ("inspect", "prune", "eval"),
              "--text": ("inspect", "prune", "eval"), "--dataset": ("inspect", "prune", "eval"),
              "--out": ("inspect", "prune", "eval", "compress"), "--overwrite": ("inspect", "prune", "eval", "compress"),
              "--device": ("inspect", "prune", "eval", "compress", "generate"),
              "--seed": ("inspect", "prune", "compress", "generate"), "--tokens": ("inspect", "prune"),
              "--blocks": ("inspect", "prune")}
    for flag, commands in shared.items():
        found = [actions(parsers[c]).get(flag) for c in commands]
        assert all(found), f"{flag} missing from {[c for c, a in zip(commands, found) if a is None]}"
        assert len({a.dest for a in found}) == 1 and len({a.nargs for a in found}) == 1, flag


def test_targets_follow_the_shared_rule():
    assert parse_targets(["all-linear"]) == "all-linear"
    assert parse_targets([r".*\.q_proj"]) == r".*\.q_proj"
    assert parse_targets(["query", "value"]) == ["query", "value"]
    assert parse_targets(["query"]) == ["query"]


# ------------------------------------------------------------------------------ deprecated aliases


def test_deprecated_aliases_still_work_and_are_hidden(parsers, capsys):
    args = parsers["inspect"].parse_args(["--max-length", "64"])
    assert config_from_args(lf.InspectConfig, args).max_seq_length == 64
    args = parsers["prune"].parse_args(["m", "--layers", "1", "--calibration", "a.txt", "b.txt", "--out", "o"])
    assert args.text == ["a.txt", "b.txt"]
    err = capsys.readouterr().err
    assert "--max-length is deprecated; use --max-seq-length" in err and "--calibration is deprecated; use --text" in err
    assert "--max-length" not in parsers["inspect"].format_help()
    assert "--calibration" not in parsers["prune"].format_help()


# ------------------------------------------------------------------------------ errors


def test_bad_values_name_the_flag(tiny_llama_dir, tmp_path, capsys):
    assert main(["inspect", str(tiny_llama_dir), "--tokens", "0", "--out", str(tmp_path / "a")]) == 2
    assert "--tokens must be positive, got 0" in capsys.readouterr().err
    assert main(["prune", str(tiny_llama_dir), "--layers", "1", "--start", "1", "--out", str(tmp_path / "b")]) == 2
    assert "--start is only for by='index'" in capsys.readouterr().err
    assert main(["compress", str(tiny_llama_dir), "--method", "rtn", "--transform", "random", "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "--transform applies to kashin, kashin-gptq, not to --method rtn; rtn takes --bits, --targets, --cache, --kernel, --group-size, --col-scale" in err
    assert main(["eval", str(tiny_llama_dir), "--text", "x.txt", "--max-eval-samples", "0"]) == 2
    assert "--max-eval-samples must be positive" in capsys.readouterr().err
    assert {p.name for p in tmp_path.iterdir()} == {"tiny-llama"}  # nothing written


def test_api_keywords_are_checked_against_the_config(tiny_llama, tokenizer):
    with pytest.raises(lf.LeanformerError, match="unknown InspectConfig field.*did you mean tokens"):
        lf.inspect(tiny_llama, tokenizer, [TEXT], token=100)
    with pytest.raises(lf.LeanformerError, match="expected a GenerateConfig, got InspectConfig"):
        lf.generate(tiny_llama, tokenizer, "hi", lf.InspectConfig())


# ------------------------------------------------------------------------------ round trips


def test_compress_then_eval_round_trip(tiny_llama_dir, text_file, tmp_path):
    out, ev = tmp_path / "rtn", tmp_path / "ev"
    assert main(["compress", str(tiny_llama_dir), "--method", "rtn", "--bits", "4", "--group-size", "16",
                 "--targets", r".*\.(q|v)_proj", "--out", str(out)]) == 0
    model, tok = lf.load(out)
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    assert len(quantized) == 6 and all(n.endswith(("q_proj", "v_proj")) for n in quantized)
    assert {m.header["group_size"] for m in quantized.values()} == {16}
    assert main(["eval", str(out), "--text", str(text_file), "--max-seq-length", "32", "--batch-size", "4",
                 "--out", str(ev)]) == 0
    metrics = load_json(ev / "metrics.json")
    expected = lf.perplexity(model, tok, [p for p in TEXT.split("\n\n")], max_length=32, batch_size=4)
    assert metrics["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-5)
    assert metrics["n_tokens"] == expected["n_tokens"]


def test_compress_kashin_only_flags_reach_the_saved_layers(tiny_llama_dir, tmp_path):
    out = tmp_path / "k3"
    assert main(["compress", str(tiny_llama_dir), "--method", "kashin", "--bits", "3", "--step-sizes", "shared",
                 "--no-col-scale", "--targets", "down_proj", "--out", str(out)]) == 0
    model, _ = lf.load(out)
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == 3 and all(m.header["bits"] == 3 for m in layers)
    assert all("col_scale" not in m.tensor_names and "scale" in m.tensor_names for m in layers)


def test_prune_round_trip(tiny_llama_dir, text_file, tmp_path):
    out = tmp_path / "pruned"
    assert main(["prune", str(tiny_llama_dir), "--layers", "1", "--by", "linearity", "--replace", "linear",
                 "--text", str(text_file), "--tokens", "600", "--max-seq-length", "32", "--ridge", "0.01",
                 "--out", str(out)]) == 0
    model, tok = lf.load(out)
    blocks = find_blocks(model)[0]
    assert len(blocks) == 3 and sum(isinstance(b, LinearReplacement) for b in blocks) == 1
    assert lf.generate(model, tok, "the fox", max_new_tokens=3)  # still runs end to end
    assert main(["prune", str(tiny_llama_dir), "--layers", "2", "--by", "index", "--start", "0",
                 "--out", str(tmp_path / "plain")]) == 0
    plain, _ = lf.load(tmp_path / "plain")
    assert len(find_blocks(plain)[0]) == 1


def test_pruned_then_quantized_saves_loads_and_evaluates_as_one_directory(tiny_llama_dir, text_file, tmp_path):
    pruned, both, ev = tmp_path / "pruned", tmp_path / "pruned-rtn", tmp_path / "ev"
    assert main(["prune", str(tiny_llama_dir), "--layers", "1", "--by", "linearity", "--replace", "linear",
                 "--text", str(text_file), "--tokens", "600", "--max-seq-length", "32", "--out", str(pruned)]) == 0
    assert main(["compress", str(pruned), "--method", "rtn", "--bits", "4", "--group-size", "16",
                 "--out", str(both)]) == 0
    model, tok = lf.load(both)
    assert [e.transform for e in lf.applied(model)] == ["prune", "quantize"]
    assert sum(isinstance(b, LinearReplacement) for b in find_blocks(model)[0]) == 1
    assert any(isinstance(m, QuantizedLinear) for m in model.modules())
    assert main(["eval", str(both), "--text", str(text_file), "--max-seq-length", "32", "--batch-size", "4",
                 "--out", str(ev)]) == 0
    expected = lf.perplexity(model, tok, [p for p in TEXT.split("\n\n")], max_length=32, batch_size=4)
    assert load_json(ev / "metrics.json")["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-5)


def test_prune_api_takes_a_config_or_the_old_keywords(tiny_llama):
    import copy

    a, b = copy.deepcopy(tiny_llama), copy.deepcopy(tiny_llama)
    ra = lf.prune_layers(a, lf.PruneConfig(n=1, by="index", start=0))
    rb = lf.prune_layers(b, 1, by="index", start=0, max_length=64)  # old keyword spelling
    assert ra.removed == rb.removed == [0]


# ------------------------------------------------------------------------------ generate


def test_generate_cli_matches_the_library_and_sampling_is_seeded(tiny_llama_dir, tiny_bert, capsys):
    model, tok = lf.load(tiny_llama_dir)
    assert main(["generate", str(tiny_llama_dir), "--prompt", "the fox", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.strip() == lf.generate(model, tok, "the fox", max_new_tokens=5)
    state = torch.get_rng_state()
    one = lf.generate(model, tok, "the fox", lf.GenerateConfig(max_new_tokens=8, temperature=1.0, seed=3))
    two = lf.generate(model, tok, "the fox", max_new_tokens=8, temperature=1.0, seed=3)
    assert one == two and torch.equal(state, torch.get_rng_state())  # the caller's random state is untouched
    with pytest.raises(lf.LeanformerError, match="needs a causal LM"):
        lf.generate(tiny_bert, tok, "hi")


def test_evaluate_api_dispatches_like_the_cli(tiny_llama, tiny_bert, tokenizer):
    texts = TEXT.split("\n\n")[:5]
    got = lf.evaluate(tiny_llama, tokenizer, texts=texts, max_eval_samples=3)
    assert got == lf.perplexity(tiny_llama, tokenizer, texts[:3], max_length=128, batch_size=32)
    assert lf.evaluate(tiny_bert, tokenizer, texts=texts, reference=tiny_bert)["embedding_cosine"] == pytest.approx(1)
    with pytest.raises(lf.LeanformerError, match="encoder: pass a reference model"):
        lf.evaluate(tiny_bert, tokenizer, texts=texts)
    with pytest.raises(lf.LeanformerError, match="exactly one of task= or texts="):
        lf.evaluate(tiny_bert, tokenizer)


# ------------------------------------------------------------------------------ export-peft


def test_export_peft_writes_a_peft_adapter(tmp_path, tiny_bert, tokenizer, capsys):
    base_dir = tmp_path / "base"
    tiny_bert.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    model, tok = lf.load(base_dir)
    lf.adapt(model, lf.LoRA(rank=2, targets=["query", "value"]))
    lf.save(model, tok, tmp_path / "adapted")
    assert main(["export-peft", str(tmp_path / "adapted"), "--out", str(tmp_path / "peft")]) == 0
    config = load_json(tmp_path / "peft" / "adapter_config.json")
    assert config["r"] == 2 and sorted(config["target_modules"])[0].endswith("query")
    assert main(["export-peft", str(tmp_path / "adapted"), "--rank", "1", "--out", str(tmp_path / "x")]) == 2
    assert "rank= applies to dylora exports only" in capsys.readouterr().err
