"""Activation sites: each is the tensor its name promises, for every supported family, from one forward."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from tiny_models import FAMILIES, make_tiny_model
from transformers import AutoModel

from needleprobe.errors import NeedleprobeError
from needleprobe.model.hooks import find_blocks, model_inputs, run_forward
from needleprobe.extract.sites import SITES, capture_sites, check_requests, parse_hook_name, site_support

N_LAYERS = 3
RTOL = 1e-5
# Variants beside tiny_models' families: GPT-NeoX with a sequential residual, and Gemma 2 (same sandwich norms as Gemma 3).
CASES = (*FAMILIES, "gpt_neox_sequential", "gemma2")
REFUSED = {"gpt_neox": {"resid_mid"}, "bert": {"attn_out", "mlp_out"}}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Load each case at most once per module, float32, eval mode."""
    built = {}

    def get(case):
        if case not in built:
            if case == "gemma2":
                import transformers as tf

                cfg = tf.Gemma2Config(
                    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=N_LAYERS,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                    sliding_window=8, max_position_embeddings=512, pad_token_id=0,
                )
                torch.manual_seed(0)
                built[case] = tf.Gemma2Model(cfg).eval()
            else:
                family = "gpt_neox" if case == "gpt_neox_sequential" else case
                where = make_tiny_model(family, tmp_path_factory.mktemp(case), n_layers=N_LAYERS)
                extra = {"use_parallel_residual": False} if case == "gpt_neox_sequential" else {}
                built[case] = AutoModel.from_pretrained(where, dtype=torch.float32, **extra).eval()
        return built[case]

    return get


def supported(case: str) -> list[str]:
    return [s for s in SITES if s not in REFUSED.get(case, set())]


def all_requests(case: str, layers=range(N_LAYERS)) -> list[tuple[str, int]]:
    return [(s, layer) for layer in layers for s in supported(case)]


def ids_batch(lengths: list[int], seed: int = 0, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded random token ids (clear of special ids) and their mask: [batch, max(lengths)]."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), max(lengths)), pad_id)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(8, 400, (n,), generator=g)
        mask[i, :n] = 1
    return ids, mask


def run_sites(model, requests, ids, mask, stop_early=True) -> dict[tuple[str, int], torch.Tensor]:
    with torch.inference_mode(), capture_sites(find_blocks(model), requests, stop_early) as cap:
        return run_forward(model, cap, model_inputs(model, ids, mask))


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).norm() / want.norm()).item()


@pytest.mark.parametrize("case", CASES)
def test_site_support_names_what_each_family_refuses(case, models):
    support = site_support(models(case))
    assert list(support) == list(SITES)
    assert {s for s, why in support.items() if why} == REFUSED.get(case, set())
    for why in support.values():
        assert why is None or "\n" not in why


@pytest.mark.parametrize("case", CASES)
def test_sites_add_up_and_chain_across_blocks(case, models):
    """resid_mid = resid_pre + attn_out, resid_post = resid_mid + mlp_out (parallel: resid_pre + attn_out + mlp_out)."""
    model = models(case)
    ids, mask = ids_batch([21, 21])
    acts = run_sites(model, all_requests(case), ids, mask)
    assert set(acts) == set(all_requests(case))
    assert all(t.shape == (2, 21, 64) and not t.requires_grad for t in acts.values())
    with torch.inference_mode():
        hidden = model(**model_inputs(model, ids, mask), output_hidden_states=True, use_cache=False).hidden_states
    for layer in range(N_LAYERS):
        a = {s: acts[s, layer] for s in supported(case)}
        assert torch.equal(a["resid_pre"], hidden[layer])
        if layer > 0:
            assert torch.equal(a["resid_pre"], acts["resid_post", layer - 1])
        if case == "bert":
            continue  # post-LN: test_bert_resid_mid_is_the_stream_the_mlp_reads
        if "resid_mid" in a:
            assert rel(a["resid_pre"] + a["attn_out"], a["resid_mid"]) <= RTOL
            assert rel(a["resid_mid"] + a["mlp_out"], a["resid_post"]) <= RTOL
        else:
            assert rel(a["resid_pre"] + a["attn_out"] + a["mlp_out"], a["resid_post"]) <= RTOL
        # no site is trivially another one
        assert rel(a["attn_out"], a["resid_post"] - a["resid_pre"]) > 1e-3


@pytest.mark.parametrize("case", ["gemma3_text", "gemma3_multimodal", "gemma2"])
def test_gemma_outputs_are_after_the_sandwich_norms(case, models):
    """attn_out is post_attention_layernorm(self_attn(...)), mlp_out post_feedforward_layernorm(mlp(...))."""
    model = models(case)
    block = find_blocks(model)[1]
    raw = {}
    handles = [
        block.self_attn.register_forward_hook(lambda m, a, o: raw.__setitem__("attn", o[0])),
        block.mlp.register_forward_hook(lambda m, a, o: raw.__setitem__("mlp", o)),
    ]
    try:
        acts = run_sites(model, [("attn_out", 1), ("mlp_out", 1)], *ids_batch([17]))
    finally:
        for h in handles:
            h.remove()
    with torch.inference_mode():
        torch.testing.assert_close(acts["attn_out", 1], block.post_attention_layernorm(raw["attn"]), rtol=0, atol=0)
        torch.testing.assert_close(acts["mlp_out", 1], block.post_feedforward_layernorm(raw["mlp"]), rtol=0, atol=0)
    assert rel(acts["attn_out", 1], raw["attn"]) > 0.1 and rel(acts["mlp_out", 1], raw["mlp"]) > 0.1


def test_bert_resid_mid_is_the_stream_the_mlp_reads(models):
    """BERT's resid_mid is BertAttention's output: the MLP's input, and the stream its output is added to (then LayerNorm'd)."""
    model = models("bert")
    block = find_blocks(model)[1]
    seen = {}
    handle = block.intermediate.register_forward_pre_hook(lambda m, a: seen.__setitem__("mlp_in", a[0]))
    try:
        acts = run_sites(model, all_requests("bert", [1]), *ids_batch([19]))
    finally:
        handle.remove()
    pre, mid, post = (acts[s, 1] for s in ("resid_pre", "resid_mid", "resid_post"))
    assert torch.equal(mid, seen["mlp_in"])
    with torch.inference_mode():
        assert rel(block.attention(pre)[0], mid) <= RTOL  # no padding: no mask needed
        assert rel(block.output(block.intermediate(mid), mid), post) <= RTOL
    assert rel(mid, pre) > 0.01 and rel(mid, post) > 0.01


@pytest.mark.parametrize("case", CASES)
def test_resid_post_with_other_sites_is_byte_identical_to_single_site_capture(case, models):
    model = models(case)
    blocks = find_blocks(model)
    ids, mask = ids_batch([23, 15], seed=1)
    with torch.inference_mode(), capture_sites(blocks, [("resid_post", 0), ("resid_post", 2)]) as cap:
        alone = run_forward(model, cap, model_inputs(model, ids, mask))
    together = run_sites(model, all_requests(case, [0, 2]), ids, mask)
    for layer in (0, 2):
        assert torch.equal(together["resid_post", layer], alone["resid_post", layer])


@pytest.mark.parametrize("case", CASES)
def test_padded_batch_equals_unpadded_forwards_at_real_positions(case, models):
    """Right padding + mask (as extract builds them with model_inputs) changes no site at a real position."""
    model = models(case)
    lengths = [70, 12, 41]  # 70 > the Gemma fixtures' sliding windows
    ids, mask = ids_batch(lengths, seed=2)
    requests = all_requests(case)
    batch = run_sites(model, requests, ids, mask)
    for i, n in enumerate(lengths):
        alone = run_sites(model, requests, ids[i : i + 1, :n], mask[i : i + 1, :n])
        for key in requests:
            got, want = batch[key][i, :n], alone[key][0]
            assert rel(got, want) <= RTOL, (key, rel(got, want))


def _entered_blocks(model):
    """Count, per block, forward calls that started (pre-hook) and finished (hook)."""
    blocks = find_blocks(model)
    entered, finished = [0] * len(blocks), [0] * len(blocks)
    handles = []
    for i, b in enumerate(blocks):
        handles.append(b.register_forward_pre_hook(lambda m, a, i=i: entered.__setitem__(i, entered[i] + 1)))
        handles.append(b.register_forward_hook(lambda m, a, o, i=i: finished.__setitem__(i, finished[i] + 1)))
    return entered, finished, handles


def _hook_counts(model) -> list[int]:
    return [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()]


def test_forward_stops_after_the_last_requested_site(tmp_path):
    model = AutoModel.from_pretrained(make_tiny_model("llama", tmp_path / "m", n_layers=4)).eval()
    before = _hook_counts(model)
    entered, finished, handles = _entered_blocks(model)
    mlp_calls, norm_calls = [], []
    handles.append(find_blocks(model)[2].mlp.register_forward_hook(lambda *a: mlp_calls.append(1)))
    handles.append(model.norm.register_forward_hook(lambda *a: norm_calls.append(1)))
    ids, mask = ids_batch([9])

    acts = run_sites(model, [("resid_pre", 0), ("mlp_out", 1), ("resid_post", 1), ("resid_mid", 0)], ids, mask)
    assert sorted(acts) == [("mlp_out", 1), ("resid_mid", 0), ("resid_post", 1), ("resid_pre", 0)]
    assert (entered, finished, norm_calls) == ([1, 1, 0, 0], [1, 1, 0, 0], [])

    entered[:], finished[:] = [0] * 4, [0] * 4
    run_sites(model, [("attn_out", 2), ("resid_post", 0)], ids, mask)  # stops inside block 2, before its MLP
    assert (entered, finished, mlp_calls, norm_calls) == ([1, 1, 1, 0], [1, 1, 0, 0], [], [])

    entered[:], finished[:] = [0] * 4, [0] * 4
    run_sites(model, [("resid_pre", 3)], ids, mask)  # block 3 itself never runs
    assert (entered, finished) == ([1, 1, 1, 1], [1, 1, 1, 0])

    for h in handles:
        h.remove()
    assert _hook_counts(model) == before  # capture_sites left no hook behind
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    torch.testing.assert_close(out.hidden_states[2], acts["resid_post", 1], atol=0, rtol=0)


@pytest.mark.parametrize("case", CASES)
def test_any_two_sites_of_the_last_block_are_both_captured_before_the_stop(case, models):
    """The early stop waits for the last site a forward reaches, whatever order the request lists them in."""
    model = models(case)
    ids, mask = ids_batch([11, 7], seed=3)
    full = run_sites(model, all_requests(case, [1]), ids, mask, stop_early=False)
    for a, b in itertools.permutations(supported(case), 2):
        got = run_sites(model, [(a, 1), (b, 1)], ids, mask)
        assert torch.equal(got[a, 1], full[a, 1]) and torch.equal(got[b, 1], full[b, 1]), (a, b)


def test_without_early_stop_every_block_runs(models):
    model = models("llama")
    entered, finished, handles = _entered_blocks(model)
    try:
        run_sites(model, [("attn_out", 0)], *ids_batch([5]), stop_early=False)
    finally:
        for h in handles:
            h.remove()
    assert finished == [1] * N_LAYERS


@pytest.mark.parametrize(
    ("case", "site", "why"),
    [
        ("gpt_neox", "resid_mid", r"resid_mid is not defined for GPTNeoXLayer with use_parallel_residual: .*resid_pre \+ attn_out \+ mlp_out"),
        ("bert", "attn_out", r"attn_out is not defined for BertLayer, a post-LN block: .*sites of this block: resid_pre, resid_mid, resid_post"),
        ("bert", "mlp_out", r"mlp_out is not defined for BertLayer, a post-LN block"),
    ],
)
def test_unsupported_site_is_a_one_line_error(case, site, why, models):
    model = models(case)
    before = _hook_counts(model)
    with pytest.raises(NeedleprobeError, match=rf"^blocks\.1\.hook_{site}: {why}") as e:
        with capture_sites(find_blocks(model), [("resid_post", 1), (site, 1)]):
            pass
    assert "\n" not in str(e.value)
    assert _hook_counts(model) == before  # refused before anything is hooked


@pytest.mark.parametrize(
    ("requests", "message"),
    [
        ([("resid_mdi", 0)], r"unknown activation site 'resid_mdi' \(sites: resid_pre, resid_mid, attn_out, mlp_out, resid_post\)"),
        ([("hook_resid_mid", 0)], r"unknown activation site 'hook_resid_mid'"),
        ([("attn_out", 1), ("resid_pre", 0), ("attn_out", 1)], r"attn_out at layer 1 is requested twice"),
        ([("resid_post", 3)], r"resid_post at layer 3: the model has 3 blocks \(valid 0..2\)"),
        ([("resid_post", -1)], r"resid_post at layer -1: the model has 3 blocks"),
        ([("resid_post", True)], r"resid_post at layer True"),
        ([("resid_post",)], r"a site request is a \(site, layer\) pair"),
        ([], r"no activation site requested"),
    ],
)
def test_bad_requests_are_one_line_errors(requests, message, models):
    with pytest.raises(NeedleprobeError, match=message) as e:
        check_requests(models("llama"), requests)
    assert "\n" not in str(e.value)


def test_requests_come_back_in_forward_order(models):
    got = check_requests(models("llama"), {("resid_post", 0), ("resid_mid", 1), ("attn_out", 1), ("resid_pre", 2)})
    assert got == (("resid_post", 0), ("attn_out", 1), ("resid_mid", 1), ("resid_pre", 2))
    got = check_requests(models("llama"), [("resid_post", np.int64(2))])  # layers read from numpy arrays
    assert got == (("resid_post", 2),) and type(got[0][1]) is int
    with pytest.raises(NeedleprobeError, match="requested twice"):
        check_requests(models("llama"), [("resid_post", np.int64(2)), ("resid_post", 2)])


def test_unknown_block_class_has_only_its_input_and_output():
    blocks = torch.nn.ModuleList([torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)])
    support = site_support(blocks)
    assert [s for s, why in support.items() if why is None] == ["resid_pre", "resid_post"]
    assert support["attn_out"].startswith("attn_out is not defined for Linear: needleprobe does not know where its sublayers write")
    with pytest.raises(NeedleprobeError, match=r"^blocks\.0\.hook_mlp_out: "):
        check_requests(blocks, [("mlp_out", 0)])


def test_transformerlens_names_parse():
    assert parse_hook_name("blocks.12.hook_resid_mid") == ("resid_mid", 12)
    assert parse_hook_name(" blocks.0.hook_attn_out") == ("attn_out", 0)
    for bad in ("blocks.1.hook_attn_in", "blocks.x.hook_resid_pre", "resid_pre", "blocks.1.resid_pre"):
        with pytest.raises(NeedleprobeError, match="is not a site name like 'blocks.3.hook_resid_mid'"):
            parse_hook_name(bad)
