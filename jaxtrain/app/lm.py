"""The built-in task: a GPT or Llama language model on ``data.source`` (``task=lm``, the default).

Batches are ``{"inputs", "targets"}`` blocks of ``model.block_size`` tokens
drawn from the corpus by :func:`jaxtrain.app.data.get_batch` (pure in seed,
step and process); the loss is :func:`jaxtrain.lm_loss`; samples are text,
decoded by the corpus's tokenizer (``data.tokenizer``, saved in the run
directory), or token ids for a ``.bin``/``.npy`` corpus without one.
"""

from __future__ import annotations

import jax
from flax import nnx

from jaxtrain.app import data, generate, tokenizer
from jaxtrain.app.config import Config, ConfigError, model_config
from jaxtrain.app.tasks import Task
from jaxtrain.losses import lm_loss


def _check_devices(cfg: Config) -> None:
    platform = jax.devices()[0].platform
    if cfg.model.attention == "cudnn" and platform != "gpu":
        raise ConfigError(f"model.attention='cudnn' needs NVIDIA GPUs but this run has {platform} devices; "
                          "use model.attention=xla")


NAMES = {"gpt": "GPT", "llama": "Llama"}


def build_model(cfg: Config, rngs: nnx.Rngs) -> nnx.Module:
    """The model ``cfg.model`` describes: a :class:`~jaxtrain.models.GPT` or :class:`~jaxtrain.models.Llama`."""
    from jaxtrain import models

    core = model_config(cfg.model)
    return (models.Llama if cfg.model.arch == "llama" else models.GPT)(core, rngs=rngs)


def _abstract_model(cfg: Config) -> nnx.Module:
    """The model of ``cfg.model`` with shapes only (no arrays allocated)."""
    return nnx.eval_shape(lambda: build_model(cfg, nnx.Rngs(0)))


def flops_per_token(cfg: Config) -> float:
    """The model's training FLOPs per token (``flops_per_token()``), from shapes only."""
    return _abstract_model(cfg).flops_per_token()


def language_model(cfg: Config, *, with_data: bool = True) -> Task:
    """The language model of ``cfg.model`` on the corpus of ``cfg.data``; ``with_data=False`` reads no corpus
    (enough to restore and sample a checkpoint: the tokenizer comes from ``run_dir``)."""
    mc, tc = cfg.model, cfg.train
    byte_level = data.is_byte_level(cfg.data.source)
    corpus = data.load_corpus(cfg.data) if with_data else None
    tok = corpus.tokenizer if with_data else tokenizer.load_run(cfg.run_dir)

    def model(rngs: nnx.Rngs) -> nnx.Module:
        return build_model(cfg, rngs)

    def sample(state, step: int) -> str:
        return generate.sample_text(state, tc.sample_prompt, tokens=tc.sample_tokens,
                                    temperature=tc.sample_temperature, top_k=tc.sample_top_k,
                                    top_p=tc.sample_top_p, seed=step,
                                    byte_level=byte_level, tokenizer=tok)[0]

    def warm_up(state) -> None:  # compile the decoders the samples will use, before the loop
        generate.sample_text(state, tc.sample_prompt, tokens=1, byte_level=byte_level, tokenizer=tok)
        prompt_len = len(data.prompt_tokens(tc.sample_prompt, byte_level=byte_level, vocab_size=mc.vocab_size,
                                            tokenizer=tok))
        if prompt_len + tc.sample_tokens > mc.block_size:  # past block_size: the sliding window
            generate.sample_text(state, tc.sample_prompt, tokens=1, kv_cache=False, byte_level=byte_level,
                                 tokenizer=tok)

    init_params = None
    if mc.init_from is not None:
        from jaxtrain.app import pretrained

        def init_params(abstract_params):
            return pretrained.load_params(cfg, abstract_params)

    base = dict(name=NAMES[mc.arch], model=model, init_params=init_params, loss_fn=lm_loss, sample=sample,
                warm_up=warm_up, tokens_per_example=mc.block_size, unit="token")
    if not with_data:
        return Task(batch=_no_data, **base)
    if tok is not None and tok.vocab_size > mc.vocab_size:
        raise ConfigError(f"model.vocab_size={mc.vocab_size}: smaller than data.tokenizer="
                          f"'{cfg.data.tokenizer}' with {tok.vocab_size} tokens; set model.vocab_size="
                          f"{tok.vocab_size} or more")
    data.check_corpus(corpus, mc.block_size, mc.vocab_size)
    data.prompt_tokens(tc.sample_prompt, byte_level=byte_level, vocab_size=mc.vocab_size, key="train.sample_prompt",
                       tokenizer=tok)
    _check_devices(cfg)

    def local_batch(step: int, batch_size: int, seed: int, process_index: int = 0, process_count: int = 1):
        return data.get_batch(corpus.train, seed=seed, step=step, batch_size=batch_size, block_size=mc.block_size,
                              process_index=process_index, process_count=process_count)

    def local_eval_batches(batch_size: int, seed: int, process_index: int = 0, process_count: int = 1):
        # a fixed set, independent of the training seed
        return [data.eval_batch(corpus.val, index=i, batch_size=batch_size, block_size=mc.block_size,
                                process_index=process_index, process_count=process_count)
                for i in range(tc.eval_batches)]

    per_token = None  # bytes per target token of the whole (global) validation set, for val_bpb
    if tok is not None:
        targets = (b["targets"] for b in local_eval_batches(tc.batch_size, tc.seed))
        per_token = data.bytes_per_token(targets, tok.token_bytes)
    baseline = data.unigram_entropy(corpus.val)
    abstract = _abstract_model(cfg)
    n_params = abstract.num_params(non_embedding=False)
    fingerprint = corpus.fingerprint
    what = "token ids" if tok is None else f"tokenizer {tok.identity}"
    source = f" from '{mc.init_from}'" if mc.init_from is not None else ""
    describe = (f"{NAMES[mc.arch]} {n_params / 1e6:.2f}M params{source} | corpus '{corpus.name}' ({what}): {len(corpus.train):,} train / "
                f"{len(corpus.val):,} val tokens, fingerprint {fingerprint.rsplit(':', 1)[-1][:8]}, "
                f"unigram entropy {baseline:.4f}")
    if per_token is not None:
        describe += f", {per_token:.3f} bytes/token"

    def save(run_dir) -> None:
        if tok is not None:
            tokenizer.save_run(tok, run_dir)

    return Task(batch=local_batch, local_batch=local_batch,
                eval_batches=local_eval_batches, local_eval_batches=local_eval_batches,
                flops_per_example=abstract.flops_per_token() * mc.block_size, baseline=baseline,
                describe=describe, val_bytes_per_token=per_token, data_fingerprint=fingerprint, save=save, **base)


def _no_data(step: int, batch_size: int, seed: int):
    raise RuntimeError("this language-model task was built without data (with_data=False)")
