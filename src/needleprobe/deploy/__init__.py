"""The probe as a deployed monitor: score text in your own process, watch a model while it generates, export a
bundle that loads without the run.

- :mod:`.online`: running document aggregates, token by token, equal to the offline ones;
- :mod:`.monitor`: :class:`Monitor` (load from a config, a run directory or a bundle; ``score``);
- :mod:`.watch`: hooks on ``model.generate`` and a stopping criterion;
- :mod:`.bundle`: ``export`` to safetensors + ``monitor.json`` + a model card;
- :mod:`.scan`: the ``needleprobe scan`` command's reading and writing of lines.

Nothing here is imported by ``import needleprobe``; :class:`Monitor` is imported on first use.
"""
