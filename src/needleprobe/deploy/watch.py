"""Scoring a model's own forward passes while it generates: no second forward.

:class:`Watch` hooks the probed site (the same taps as ``extract``: :func:`needleprobe.extract.sites.capture_sites`, without
the early stop) and the model's forward.  ``model.generate`` runs one forward over the prompts (the prefill) and one
per new token (with the KV cache, over that token alone); after each, the watch reads the site's activations of the
positions that forward computed, applies the probe, and feeds the running aggregate of each sequence
(:class:`needleprobe.analysis.online.RunningAggregate`).  Which positions are real tokens comes from the forward's own
``attention_mask`` (left padding in a batch), so padded prompts are scored exactly on their tokens.

Special tokens (BOS, padding, chat-template markers) are scored but not counted in the aggregate, as ``extract``
never labels them; given a ``text_mask`` (``Monitor.prompts``), only the prompt's text tokens count, as the probe
was trained on them alone (a chat template's own text, such as a default system prompt, is then left out).  The last token ``generate`` returns is never fed to the model (generation ends after sampling
it), so it has no score.  A sequence stops being watched once it is stopped by :func:`monitor_stopping_criteria` or
has fed an end-of-sequence token; the pad tokens ``generate`` feeds it afterwards are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..errors import NeedleprobeError
from ..analysis.online import RunningAggregate


@dataclass
class WatchedSequence:
    """One sequence of a batch: every token fed to the model, in order (padding left out)."""

    token_ids: list[int] = field(default_factory=list)
    logits: list[float] = field(default_factory=list)
    """The probe's logit of each token (float32 values)."""
    generated: list[bool] = field(default_factory=list)
    """True for tokens the model generated, False for the prompt's."""
    counted: list[bool] = field(default_factory=list)
    """False for special tokens, which the aggregate leaves out."""
    running: RunningAggregate | None = None
    crossed_at: int | None = None
    """Index (into ``token_ids``) of the token after which the running aggregate first was above the threshold."""
    stopped_at: int | None = None
    """Index of the last token scored when the stopping criterion ended the sequence (None: not stopped)."""
    ended: bool = False

    @property
    def score(self) -> float:
        """The running aggregate now (the document score of the counted tokens so far)."""
        return self.running.value

    @property
    def flagged(self) -> bool:
        return self.crossed_at is not None

    def counted_logits(self) -> np.ndarray:
        return np.asarray(self.logits, np.float32)[np.asarray(self.counted, bool)]

    def to_dict(self) -> dict[str, Any]:
        return {"score": self.score, "flagged": self.flagged, "crossed_at": self.crossed_at,
                "stopped_at": self.stopped_at, "n_tokens": len(self.token_ids),
                "n_generated": int(sum(self.generated))}


class Watch:
    """``with monitor.watch(model) as w: model.generate(...)``; then ``w.sequences``, one per batch row."""

    def __init__(self, monitor, model, tokenizer, text_mask=None):
        self.monitor, self.model = monitor, model
        self.text_mask = None if text_mask is None else np.asarray(text_mask.cpu() if hasattr(text_mask, "cpu")
                                                                    else text_mask, dtype=bool)
        self.special = set(getattr(tokenizer, "all_special_ids", []) or [])
        gc = getattr(model, "generation_config", None)
        eos = getattr(gc, "eos_token_id", None)
        self.eos = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
        self.sequences: list[WatchedSequence] = []
        self.forwards = 0
        """Forward passes of the model seen inside the ``with`` (each scored once, none added)."""
        self._seen = 0  # columns of the current batch already scored
        self._prompt = 0
        self._ids: torch.Tensor | None = None
        self._stack = None

    # -- hooks --------------------------------------------------------------------------
    def __enter__(self) -> "Watch":
        import contextlib

        from ..model.hooks import find_blocks
        from ..extract.sites import capture_sites

        if self.monitor._watch is not None:
            raise NeedleprobeError("this monitor is already watching a model (one watch at a time)")
        m = self.monitor
        w = torch.from_numpy(np.ascontiguousarray(m.weight, np.float32))
        self._w, self._b = w, torch.tensor(m.bias, dtype=torch.float32)
        self._stack = contextlib.ExitStack()
        self._cap = self._stack.enter_context(capture_sites(find_blocks(self.model), [(m.site, m.layer)],
                                                            stop_early=False))
        pre = self.model.register_forward_pre_hook(self._inputs, with_kwargs=True)
        post = self.model.register_forward_hook(self._after)
        self._stack.callback(pre.remove)
        self._stack.callback(post.remove)
        m._watch = self
        return self

    def __exit__(self, *exc) -> None:
        self.monitor._watch = None
        self._stack.close()

    def _inputs(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            raise NeedleprobeError("the watch needs input_ids (generation from inputs_embeds is not supported)")
        mask = kwargs.get("attention_mask")
        self._ids = ids.detach()
        self._mask = (torch.ones_like(ids) if mask is None else mask.detach())
        self._cap.outputs.clear()

    def _after(self, module, args, output) -> None:
        self.forwards += 1
        m = self.monitor
        acts = self._cap.outputs.get((m.site, m.layer))
        if acts is None:
            raise RuntimeError(f"the forward did not reach blocks.{m.layer}.hook_{m.site}")
        ids, mask = self._ids, self._mask
        B, T = ids.shape
        start = mask.shape[1] - T  # the columns this forward computed (the KV cache holds those before)
        fresh = start == 0 and not (self.sequences and len(self.sequences) == B and T == self._seen + 1
                                    and torch.equal(ids[:, : self._seen].cpu(), self._ids_seen))
        if fresh:  # a new generate (or a plain forward): a new batch of sequences
            self.sequences = [WatchedSequence(running=RunningAggregate(m.aggregation, m.params, m.threshold))
                              for _ in range(B)]
            self._seen, self._prompt = 0, T
            self._ids_seen = ids[:, :0].cpu()
        first = max(start, self._seen)  # without a cache, a forward recomputes columns already scored
        if first >= start + T:
            return
        a = acts[:, first - start :].float()
        logits = (a @ self._w.to(a.device) + self._b.to(a.device)).cpu().numpy()  # [B, new]
        new_ids = ids[:, first - start :].cpu().numpy()
        new_mask = mask[:, first : start + T].cpu().numpy().astype(bool)
        for b, seq in enumerate(self.sequences):
            if seq.ended:
                continue
            for j in np.flatnonzero(new_mask[b]):
                tok = int(new_ids[b, j])
                gen = first + j >= self._prompt
                if gen or self.text_mask is None:
                    counted = tok not in self.special
                else:
                    counted = bool(self.text_mask[b, first + j])
                seq.token_ids.append(tok)
                seq.logits.append(float(logits[b, j]))
                seq.generated.append(bool(gen))
                seq.counted.append(counted)
                if counted:
                    seq.running.extend([logits[b, j]])
                    if seq.crossed_at is None and seq.running.crossed_at is not None:
                        seq.crossed_at = len(seq.token_ids) - 1
                if gen and tok in self.eos:
                    seq.ended = True
                    break
        self._seen = start + T
        self._ids_seen = torch.cat([self._ids_seen, ids[:, first - start :].cpu()], 1) if start else ids.cpu()

    # -- stopping ----------------------------------------------------------------------------
    def should_stop(self) -> list[bool]:
        """Per sequence: its running aggregate has crossed the threshold (those newly so are marked stopped)."""
        out = []
        for seq in self.sequences:
            if seq.crossed_at is not None and seq.stopped_at is None and not seq.ended:
                seq.stopped_at, seq.ended = len(seq.token_ids) - 1, True
            out.append(seq.stopped_at is not None)
        return out

    @property
    def stopped(self) -> list[int]:
        """Batch rows the stopping criterion ended."""
        return [b for b, s in enumerate(self.sequences) if s.stopped_at is not None]


def monitor_stopping_criteria(monitor):
    """A ``StoppingCriteria`` bound to ``monitor``'s active watch (see ``Monitor.stopping_criteria``)."""
    from transformers import StoppingCriteria

    class MonitorStop(StoppingCriteria):
        """Ends each sequence whose running aggregate crossed the monitor's threshold."""

        def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
            watch = monitor._watch
            if watch is None:
                raise NeedleprobeError("monitor.stopping_criteria() works inside `with monitor.watch(model):`")
            done = watch.should_stop()
            if len(done) != input_ids.shape[0]:
                raise NeedleprobeError(f"the watch saw a batch of {len(done)}, generate has {input_ids.shape[0]} "
                                       "sequences (beam search and other expanded batches are not supported)")
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    return MonitorStop()
