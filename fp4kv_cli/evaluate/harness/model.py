"""``FP4KVLM``: lm-eval's ``HFLM`` with the KV cache really stored in an fp4kv format.

Registered in lm-eval's model registry as ``fp4kv`` (``model_args``: ``pretrained`` — a model
folder, ``.gguf`` file or hub id — plus ``kv_dtype``, ``scales``, ``decode_attention`` and
``sampling_seed``). Everything else — prompts, few-shot sampling, request batching and ordering,
generation budgets, stop sequences, post-processing, filters, metrics — is HFLM's and lm-eval's.

- ``generate_until``: each batch goes through a fresh :class:`~fp4kv_cli.cache.QuantKVCache` and
  fp4kv's decode paths (static steps replayed as CUDA graphs, the fused decode-attention kernel,
  or the gather read: ``decode_attention``), greedy exactly as ``fp4kv eval gsm8k`` decodes, or
  sampled through :mod:`fp4kv_cli.evaluate.sampling` when a task asks for sampling (keys from
  the request's context and its repeat number, so every format draws the same noise).
- ``loglikelihood`` / multiple choice / rolling perplexity: the context (all but its last token)
  is written into the cache, and the continuation is scored in chunks that read it back from the
  buffers (:func:`fp4kv_cli.evaluate.scoring.scored_logits`); the result is handed to HFLM's own
  bookkeeping (greedy check, one-token-continuation sharing, caching hooks).
"""

from __future__ import annotations

import zlib
from collections import Counter
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import Collator
from tqdm import tqdm

from fp4kv_cli.errors import FP4KVError
from fp4kv_cli.evaluate.generate import generate_tokens, greedy_config, neutral_generation_defaults
from fp4kv_cli.evaluate.runner import DECODE_ATTENTION, cache_factory, load_scales_for, parse_kv_dtypes
from fp4kv_cli.evaluate.sampling import RowSampler, SamplingSpec, row_keys
from fp4kv_cli.evaluate.scoring import scored_logits
from fp4kv_cli.model_config import KVShape, load_config_dict
from fp4kv_cli.models import load_model_and_tokenizer, parse_dtype, resolve_device
from fp4kv_cli.quant.registry import get_kv_cache_method

#: lm-eval's dtype names mapped to fp4kv's.
DTYPE_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}


@register_model("fp4kv")
class FP4KVLM(HFLM):
    """lm-eval ``HFLM`` whose KV cache is stored in ``kv_dtype`` (see the module docstring).

    Parameters
    ----------
    pretrained:
        Model folder, ``.gguf`` file or hub id (loaded as ``fp4kv eval gsm8k`` loads it).
    kv_dtype:
        One KV format: ``bf16`` (the model's dtype, the reference), ``fp8``, ``nvfp4``,
        ``blockfp4`` or ``recipe`` (the per-layer formats of ``scales``).
    scales:
        ``scales.json`` from ``fp4kv calibrate`` (calibrated scales, K centering); else dynamic.
    decode_attention:
        ``graph`` / ``fused`` / ``gather``, as ``fp4kv eval gsm8k --decode-attention``.
    sampling_seed:
        Seed of sampled generations (tasks with ``do_sample`` / ``temperature > 0``).
    device, dtype, batch_size, max_length, **kwargs:
        As HFLM (``dtype`` also takes fp4kv's ``bf16`` / ``fp16`` / ``fp32``; ``device`` also
        ``auto``); ``batch_size`` must be a number.
    """

    def __init__(
        self,
        pretrained: str,
        kv_dtype: str = "nvfp4",
        scales: str | None = None,
        decode_attention: str = "graph",
        sampling_seed: int = 0,
        device: str | None = "auto",
        dtype: str | None = "auto",
        batch_size: int | str = 16,
        **kwargs: Any,
    ) -> None:
        if not isinstance(pretrained, str):
            raise FP4KVError("fp4kv's pretrained must be a model folder, .gguf file or hub id")
        if str(batch_size).startswith("auto"):
            raise FP4KVError("batch_size=auto is not supported by the fp4kv model; pass a number")
        kv_dtypes = parse_kv_dtypes(str(kv_dtype))
        if len(kv_dtypes) != 1:
            raise FP4KVError(f"kv_dtype takes one format, got {kv_dtype}; run one evaluation per format")
        if decode_attention not in DECODE_ATTENTION:
            raise FP4KVError(
                f"decode_attention must be one of {', '.join(DECODE_ATTENTION)}, got {decode_attention!r}"
            )
        config = load_config_dict(pretrained)
        self._head_dim = KVShape.from_config(config).head_dim
        self._scales = (None, None) if scales is None else load_scales_for(config, str(scales))
        self._check_format(kv_dtypes[0])
        torch_device = resolve_device(device or "auto")
        self._dtype = parse_dtype(DTYPE_ALIASES.get(str(dtype), str(dtype or "auto")), torch_device)
        model, tokenizer = load_model_and_tokenizer(pretrained, torch_device, self._dtype)
        neutral_generation_defaults(model)
        super().__init__(pretrained=model, tokenizer=tokenizer, batch_size=int(batch_size), **kwargs)
        self.pretrained = pretrained  # for lm-eval's records (HFLM keeps the model object)
        self.decode_attention = decode_attention
        self.sampling_seed = int(sampling_seed)
        self.set_kv_dtype(kv_dtypes[0])

    def set_kv_dtype(self, kv_dtype: str) -> None:
        """Store the KV cache in ``kv_dtype`` from now on (the loaded model is kept); the sampled
        generations start over, so every format draws the same noise per request."""
        self._check_format(kv_dtype)
        self.kv_dtype = kv_dtype
        scales_file, k_offsets = self._scales
        self._make_cache = cache_factory(
            self.model.config, [kv_dtype], scales_file, k_offsets, self._dtype, self.device
        )
        self._seen_contexts: Counter[int] = Counter()

    def _check_format(self, kv_dtype: str) -> None:
        (kv_dtype,) = parse_kv_dtypes(kv_dtype)
        if kv_dtype != "recipe":
            get_kv_cache_method(kv_dtype).check_head_dim(self._head_dim)
        elif self._scales[0] is None:
            raise FP4KVError(
                "kv_dtype=recipe needs scales= with per-layer formats (fp4kv analyze --write-recipe)"
            )

    def new_cache(self, capacity: int) -> Any:
        """A fresh cache of this model's KV format with room for ``capacity`` tokens per row."""
        return self._make_cache(self.kv_dtype, capacity)

    def get_model_info(self) -> dict[str, Any]:
        """HFLM's model info plus the KV format and decode read."""
        return {
            **super().get_model_info(),
            "kv_dtype": self.kv_dtype,
            "decode_attention": self.decode_attention,
        }

    # ------------------------------------------------------------------ generation
    def _model_generate(
        self, context: torch.Tensor, max_length: int, stop: list[str], **generation_kwargs: Any
    ) -> torch.Tensor:
        """``[batch, context + new]`` tokens like HFLM's ``generate``: the left-padded ``context``
        then each row's continuation through the quantized cache, padded after its stop."""
        mask = generation_kwargs.pop("attention_mask", None)
        if mask is None:
            mask = torch.ones_like(context)
        prompts = [row[keep.bool()].tolist() for row, keep in zip(context, mask)]
        new = max_length - context.shape[1]
        config = greedy_config(self.model, self.tokenizer, new, stop)
        sampler = self._sampler(prompts, generation_kwargs)
        cache = self.new_cache(context.shape[1] + new)
        tokens, counts = generate_tokens(
            self.model, self.tokenizer, prompts, cache, config, self.decode_attention, sampler=sampler
        )
        kept = (
            torch.arange(tokens.shape[1], device=tokens.device)[None, :] < counts.to(tokens.device)[:, None]
        )
        tokens = torch.where(kept, tokens, self.tokenizer.pad_token_id)
        return torch.cat([context.to(tokens.device), tokens], dim=1)

    def _sampler(self, prompts: list[list[int]], kwargs: dict[str, Any]) -> RowSampler | None:
        """None for greedy requests; else a sampler keyed by each prompt's tokens and how often
        that prompt was sampled before in this run (lm-eval's ``repeats``)."""
        temperature = float(kwargs.get("temperature") or 0.0)
        if not kwargs.get("do_sample") and temperature == 0.0:
            return None
        spec = SamplingSpec(temperature or 1.0, float(kwargs.get("top_p") or 1.0), self.sampling_seed)
        digests, repeats = [], []
        for prompt in prompts:
            digest = zlib.crc32(torch.tensor(prompt, dtype=torch.int64).numpy().tobytes())
            digests.append(digest)
            repeats.append(self._seen_contexts[digest])
            self._seen_contexts[digest] += 1
        return RowSampler(spec, row_keys(self.sampling_seed, digests, repeats, self.device))

    # ------------------------------------------------------------------ loglikelihood
    def _loglikelihood_tokens(
        self,
        requests: list[tuple[tuple[str, str], list[int], list[int]]],
        disable_tqdm: bool = False,
        override_bs: int | None = None,
    ) -> list[tuple[float, bool]]:
        """HFLM's loglikelihood loop (same ordering, truncation, greedy check and one-token
        sharing) with the logits from :func:`~fp4kv_cli.evaluate.scoring.scored_logits`."""
        results: list[tuple[float, bool]] = []
        reorder = Collator(
            requests,
            sort_fn=lambda req: (-len(req[1] + req[2]), tuple(req[1] + req[2])),
            group_by="contexts" if self.logits_cache else None,
            group_fn=lambda req: req[-2] + req[-1][:-1],
        )
        progress = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0,
                        desc="Running loglikelihood requests")  # fmt: skip
        for chunk in reorder.get_batched(n=override_bs or self.batch_size):
            pairs = []
            for _, context, continuation in chunk:
                window = (context + continuation)[-(self.max_length + 1) :][:-1]
                scored = len(continuation)
                pairs.append((window[:-scored], window[-scored:]))
            capacity = max(len(prefix) + len(scored) for prefix, scored in pairs)
            logits = scored_logits(self.model, pairs, self.new_cache(capacity), self.tokenizer.pad_token_id)
            for (request, context, continuation), row in zip(chunk, logits):
                logprobs = F.log_softmax(row, dim=-1, dtype=self.softmax_dtype).unsqueeze(0)
                greedy = logprobs.argmax(dim=-1)
                for request_str, cont, cont_logprobs in reorder.get_cache(
                    req_str=request, cxt_toks=context, cont_toks=continuation, logits=logprobs
                ):
                    target = torch.tensor(cont, dtype=torch.long, device=cont_logprobs.device).unsqueeze(0)
                    exact = bool((greedy[:, -target.shape[1] :] == target).all())
                    picked = torch.gather(cont_logprobs[:, -target.shape[1] :], 2, target.unsqueeze(-1))
                    answer = (float(picked.sum()), exact)
                    results.append(answer)
                    if request_str is not None:
                        self.cache_hook.add_partial("loglikelihood", request_str, answer)
                    progress.update(1)
        progress.close()
        return reorder.get_original(results)
