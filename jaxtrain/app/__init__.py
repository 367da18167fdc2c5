"""The application: the ``jaxtrain`` command and everything with files, processes and terminals.

- :mod:`~jaxtrain.app.config`: typed, frozen run configuration (YAML + ``key=value``).
- :mod:`~jaxtrain.app.tasks`: what the loop trains (model factory, loss, batches); :mod:`~jaxtrain.app.lm`
  the built-in GPT language model; :mod:`~jaxtrain.app.data` corpora, batches, prefetch.
- :mod:`~jaxtrain.app.loop`: ``train(config)``, the only impure code.
- :mod:`~jaxtrain.app.checkpoint`, :mod:`~jaxtrain.app.preempt`: Orbax checkpoints with fallback; signals
  and non-finite stops.
- :mod:`~jaxtrain.app.writers`, :mod:`~jaxtrain.app.plot`: JSONL, TensorBoard, progress bar; the PNG.
- :mod:`~jaxtrain.app.generate`, :mod:`~jaxtrain.app.cli`: sampling; the command line.

The core (:mod:`jaxtrain`) never imports this package.
"""
