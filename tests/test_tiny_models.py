"""Checks that the tiny offline fixtures really look like the models they stand in for.

Other tests trust these fixtures to reproduce real module layouts, BOS/chat
behaviour and character offsets; if a transformers upgrade changes any of
that, these fast checks fail first and point at the fixture, not the tool.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModel, AutoTokenizer

from tiny_models import (
    BOS,
    END_OF_TURN,
    EOS,
    FAMILIES,
    PAD,
    START_OF_TURN,
    UNK,
    make_tiny_model,
    make_tokenizer,
)

N_LAYERS = 3
DECODERS = tuple(f for f in FAMILIES if f != "bert")
UNICODE_TEXT = "Hello naïve café in 東京 😀! The needle, 2024.\n\nNext line."


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def tok(tok_dir):
    return AutoTokenizer.from_pretrained(tok_dir)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """Build each family at most once per module: building is the slow part."""
    built = {}

    def get(family):
        if family not in built:
            built[family] = make_tiny_model(family, tmp_path_factory.mktemp(family), n_layers=N_LAYERS)
        return built[family]

    return get


def test_tokenizer_special_tokens(tok):
    """Gemma-like ids and right padding, which the extraction code relies on."""
    assert tok.padding_side == "right"
    assert (tok.pad_token, tok.eos_token, tok.bos_token, tok.unk_token) == (PAD, EOS, BOS, UNK)
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (0, 1, 2)
    for special in (START_OF_TURN, END_OF_TURN):
        assert tok.convert_tokens_to_ids(special) != tok.unk_token_id
        assert tok(special, add_special_tokens=False).input_ids == [tok.convert_tokens_to_ids(special)]
    assert 400 <= len(tok) <= 520


def test_bos_prepended_once_and_no_eos(tok):
    """Like Gemma/Llama: exactly one leading BOS, nothing appended."""
    ids = tok("the needle").input_ids
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert tok.eos_token_id not in ids
    assert tok("the needle", add_special_tokens=False).input_ids == ids[1:]


def test_unicode_round_trip_without_unk(tok):
    """Byte-level BPE must encode any text, so no <unk> and exact decode."""
    ids = tok(UNICODE_TEXT, add_special_tokens=False).input_ids
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == UNICODE_TEXT


def test_offsets_are_character_spans(tok):
    """Offsets index characters of the input (untrimmed: a leading space belongs to its token)."""
    enc = tok(UNICODE_TEXT, return_offsets_mapping=True)
    offsets = enc.offset_mapping
    assert offsets[0] == (0, 0)  # BOS covers no text
    prev_end = 0
    for tid, (start, end) in zip(enc.input_ids[1:], offsets[1:]):
        assert 0 <= start < end <= len(UNICODE_TEXT)
        # Tokens holding part of a multi-byte character overlap by that character.
        assert start >= prev_end - 1
        prev_end = end
        piece = tok.decode([tid])
        if "\ufffd" not in piece:  # whole characters only
            assert UNICODE_TEXT[start:end] == piece
    assert offsets[-1][1] == len(UNICODE_TEXT)
    # A word preceded by a space: its token's span includes that space.
    i = UNICODE_TEXT.index(" needle")
    assert (i, i + len(" needle")) in offsets


def test_chat_template_renders_gemma_style(tok):
    """Same prompt shape as Gemma 3, so chat-prompt handling is exercised realistically."""
    messages = [{"role": "user", "content": "Where is the needle?"}]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == "<bos><start_of_turn>user\nWhere is the needle?<end_of_turn>\n"
    text_gen = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text_gen == text + "<start_of_turn>model\n"
    multi = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": [{"type": "text", "text": "Bye"}]},
    ]
    assert tok.apply_chat_template(multi, tokenize=False) == (
        "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n"
    )


def test_chat_template_tokenizes_with_exactly_one_bos(tok):
    """The template already holds BOS, so the rendered text must be tokenized without specials."""
    messages = [{"role": "user", "content": "naïve café 東京 😀"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False).input_ids
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert ids.count(tok.convert_tokens_to_ids(START_OF_TURN)) == 2
    assert tok.decode(ids) == text
    # Adding specials on top would double the BOS: the pitfall this guards against.
    assert tok(text).input_ids.count(tok.bos_token_id) == 2


@pytest.mark.parametrize("family", FAMILIES)
def test_family_builds_and_loads_offline(family, model_dirs, tok):
    """AutoModel/AutoTokenizer load from the saved dir and a padded batch runs."""
    path = model_dirs(family)
    model = AutoModel.from_pretrained(path)
    mtok = AutoTokenizer.from_pretrained(path)
    assert not model.training
    assert model.dtype == torch.float32

    blocks = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == N_LAYERS]
    assert len(blocks) == 1, "block list must be unambiguous"

    text_config = model.config.get_text_config()
    assert text_config.vocab_size == len(mtok)
    assert getattr(text_config, "max_position_embeddings", getattr(text_config, "n_positions", 0)) >= 512

    if family == "bert":
        assert len(mtok) == 30522
        ids = mtok("the needle").input_ids
        assert ids[0] == mtok.cls_token_id and ids[-1] == mtok.sep_token_id
    else:
        # Every decoder tokenizes exactly like make_tokenizer's tokenizer
        # (AutoTokenizer substitutes Qwen2Tokenizer for qwen2; it must agree).
        assert mtok(UNICODE_TEXT).input_ids == tok(UNICODE_TEXT).input_ids
        assert text_config.pad_token_id == mtok.pad_token_id
        assert text_config.bos_token_id == mtok.bos_token_id
        assert text_config.eos_token_id == mtok.eos_token_id
        assert mtok.chat_template == tok.chat_template

    enc = mtok(["the needle", "a longer haystack sentence here"], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**enc, output_hidden_states=True, **({} if family == "bert" else {"use_cache": False}))
    assert len(out.hidden_states) == N_LAYERS + 1
    assert out.last_hidden_state.shape[:2] == enc["input_ids"].shape
    assert torch.isfinite(out.last_hidden_state).all()


def test_seed_controls_initialisation(tmp_path):
    """Same seed -> identical weights, so fixtures are reproducible across runs."""
    a = AutoModel.from_pretrained(make_tiny_model("llama", tmp_path / "a", n_layers=1, seed=0))
    b = AutoModel.from_pretrained(make_tiny_model("llama", tmp_path / "b", n_layers=1, seed=0))
    c = AutoModel.from_pretrained(make_tiny_model("llama", tmp_path / "c", n_layers=1, seed=1))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["layers.0.self_attn.q_proj.weight"], sc["layers.0.self_attn.q_proj.weight"])


def test_unknown_family_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown family"):
        make_tiny_model("t5", tmp_path)
