"""Token-level labels: which tokens are needles, which are sampled negatives.

Everything here happens before the model runs and depends only on the
tokenizer, the text and the seeds, so the rows of the cache are known up front
(and never depend on batch size or on where an interrupted run resumed).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .documents import Document, stable_hash
from ..errors import NeedleprobeError

_SENTINEL = "\x00NEEDLEPROBE-DOCUMENT\x00"


@dataclass
class TokenizedDoc:
    doc: Document
    input_ids: np.ndarray
    """int64 [T]: the model input, specials included, after truncation."""
    offsets: np.ndarray
    """int64 [T, 2]: character span of each token in ``doc.text`` ([-1, -1] outside it)."""
    labelable: np.ndarray
    """bool [T]: a document-text token (not BOS/CLS/SEP/pad/template)."""
    positive: np.ndarray
    """bool [T]: labelable and overlapping a needle span."""
    n_full_tokens: int
    """Length before truncation."""
    needles_lost: int = 0
    needle_tokens_lost: int = 0

    @property
    def n_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def truncated(self) -> bool:
        return self.n_full_tokens > self.n_tokens


def chat_affixes(tokenizer, add_generation_prompt: bool = False) -> tuple[str, str]:
    """The chat template's text before and after a user turn's content (with ``add_generation_prompt``, the suffix
    ends with the assistant turn's opening, as a prompt for generation does).

    Rendering once with a sentinel (rather than per document) keeps spans exact:
    templates such as Gemma's ``| trim`` would otherwise shift characters.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise NeedleprobeError(
            f"model.chat_template is true but tokenizer {tokenizer.name_or_path!r} has no chat template"
        )
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": _SENTINEL}], tokenize=False, add_generation_prompt=add_generation_prompt
    )
    if rendered.count(_SENTINEL) != 1:
        raise NeedleprobeError(f"chat template of {tokenizer.name_or_path!r} does not render the user content once")
    prefix, suffix = rendered.split(_SENTINEL)
    return prefix, suffix


def _overlaps(offsets: np.ndarray, spans: tuple[tuple[int, int], ...]) -> np.ndarray:
    hit = np.zeros(len(offsets), dtype=bool)
    for s, e in spans:
        hit |= (offsets[:, 0] < e) & (offsets[:, 1] > s)
    return hit


def tokenize_documents(tokenizer, docs: list[Document], max_length: int, chat_template: bool,
                       add_generation_prompt: bool = False) -> list[TokenizedDoc]:
    """Tokenize with character offsets and label every token against the needle spans.

    Without a chat template the tokenizer adds its own specials (BOS, or CLS/SEP);
    with one, the rendered template already holds BOS, so specials are not added
    again (a double BOS changes every activation).  ``add_generation_prompt``: each
    document as a prompt to generate a reply to (the monitor's ``prompts``).
    """
    if not docs:
        return []
    if not getattr(tokenizer, "is_fast", False):
        raise NeedleprobeError(f"tokenizer {tokenizer.name_or_path!r} is not a fast tokenizer: character offsets are needed")
    prefix, suffix = chat_affixes(tokenizer, add_generation_prompt) if chat_template else ("", "")
    texts = [prefix + d.text + suffix for d in docs]
    kw = dict(add_special_tokens=not chat_template, return_offsets_mapping=True, return_special_tokens_mask=True)
    enc = tokenizer(texts, truncation=True, max_length=max_length, **kw)
    full_len = [len(ids) for ids in enc["input_ids"]]
    maybe_cut = [i for i, n in enumerate(full_len) if n >= max_length]
    full_enc = {}
    if maybe_cut:
        more = tokenizer([texts[i] for i in maybe_cut], truncation=False, verbose=False, **kw)
        for j, i in enumerate(maybe_cut):
            full_enc[i] = (more["offset_mapping"][j], more["special_tokens_mask"][j])
            full_len[i] = len(more["input_ids"][j])

    start = len(prefix)
    out = []
    for i, doc in enumerate(docs):
        end = start + len(doc.text)
        off, lab, pos = _label(enc["offset_mapping"][i], enc["special_tokens_mask"][i], start, end, doc.needle_spans)
        td = TokenizedDoc(doc, np.asarray(enc["input_ids"][i], dtype=np.int64), off, lab, pos, full_len[i])
        if i in full_enc:
            foff, _, fpos = _label(*full_enc[i], start, end, doc.needle_spans)
            td.needle_tokens_lost = int(fpos.sum() - pos.sum())
            td.needles_lost = sum(
                1 for s in doc.needle_spans if _overlaps(foff[fpos], (s,)).any() and not _overlaps(off[pos], (s,)).any()
            )
        out.append(td)
    return out


def _label(offsets, special, start: int, end: int, spans) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(offsets into the document text, is-text-token, is-needle) for one tokenized document.

    ``start``/``end`` delimit the document inside the rendered text; tokens
    outside it (template markup) and special tokens are never labelled.
    """
    off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    special = np.asarray(special, dtype=bool)
    inside = (off[:, 1] > off[:, 0]) & (off[:, 0] >= start) & (off[:, 1] <= end) & ~special
    text_off = np.where(inside[:, None], off - start, -1)
    return text_off, inside, inside & _overlaps(text_off, spans)


def select_rows(td: TokenizedDoc, negatives_per_doc: int, sampling_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The token positions stored for one document, ascending, and their labels.

    All needle tokens, plus ``negatives_per_doc`` other text tokens drawn with an
    RNG keyed on (sampling_seed, doc_id): the draw is the same whatever the batch
    size, the document order or the process.
    """
    pos = np.flatnonzero(td.positive)
    cand = np.flatnonzero(td.labelable & ~td.positive)
    k = min(negatives_per_doc, cand.size)
    rng = np.random.default_rng([sampling_seed, stable_hash(td.doc.doc_id)])
    neg = np.sort(rng.choice(cand, size=k, replace=False)) if k else cand[:0]
    rows = np.concatenate([pos, neg])
    labels = np.concatenate([np.ones(pos.size, np.int8), np.zeros(neg.size, np.int8)])
    order = np.argsort(rows, kind="stable")
    return rows[order].astype(np.int32), labels[order]


def apply_caps(tdocs: list[TokenizedDoc], max_docs: int | None, max_tokens: int | None) -> list[TokenizedDoc]:
    """Deterministic caps in file order: the first N documents, then a token budget."""
    if max_docs is not None:
        tdocs = tdocs[:max_docs]
    if max_tokens is not None:
        kept, total = [], 0
        for td in tdocs:
            if total + td.n_tokens > max_tokens:
                break
            kept.append(td)
            total += td.n_tokens
        tdocs = kept
    return tdocs


def bucket_length(n: int) -> int:
    """Padded length for a document of ``n`` tokens, a function of ``n`` alone.

    Attention reductions run over the padded length, and their float rounding
    depends on it (measured: 1e-6 differences on MiniLM between padded and
    unpadded runs), while stacking more documents of one length changes
    nothing.  Padding each document to a bucket of its own length therefore
    makes every row bit-identical for any batch size.  Buckets grow
    geometrically (steps of 1/8), so padding wastes at most 12.5%.
    """
    step = max(8, 1 << max(0, n.bit_length() - 4))
    return -(-n // step) * step


def plan_batches(lengths: list[int], doc_batch_size: int, max_batch_tokens: int | None) -> tuple[np.ndarray, list[np.ndarray]]:
    """Length-sorted processing order and its batches (documents of one length bucket each).

    Sorting longest-first (stable, so ties keep file order) keeps padding small
    and surfaces out-of-memory on the first batch, not the last.  The order does
    not depend on the batch size, so neither does the row order of the cache.
    """
    order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")
    buckets = [bucket_length(int(lengths[i])) for i in order]
    batches: list[np.ndarray] = []
    i = 0
    while i < len(order):
        j = i + 1
        while j < len(order) and buckets[j] == buckets[i]:
            if max_batch_tokens is not None:
                if (j - i + 1) * buckets[i] > max_batch_tokens:
                    break
            elif j - i >= doc_batch_size:
                break
            j += 1
        batches.append(order[i:j])
        i = j
    return order, batches
