"""`Llama`: Meta's public API (build / generate / text_completion), on any device and world size."""

from __future__ import annotations

import logging
import operator
import time
from typing import Callable, List, NamedTuple, Optional, Sequence, TypedDict, Union

import torch
import torch.nn.functional as F

from . import checkpoint, compiled, distributed, memory
from .chat import UNSAFE_ERROR, Llama2Format, check_choice, check_dialog, pick_format
from .cpu_step import NativeStep
from .devices import is_cuda, keeps_half_weights, pick_device, pick_dtype, use_threads
from .engine import Engine, cache_length, decide_compile, decide_graphs, precheck_compile
from .errors import UserError
from .model import Transformer, check_parallel
from .sampling import Sampler, stream_key
from .settings import KV_CACHE_DTYPES, SEED_MAX, Settings, check_text, resolve
from .stopping import StopText
from .tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger("llama_cli")

PAD = -1  # internal padding id; never fed to the model


class CompletionPrediction(TypedDict, total=False):
    generation: str
    tokens: List[str]  # decoded pieces, present when logprobs=True
    logprobs: List[float]  # present when logprobs=True


class ChatPrediction(TypedDict, total=False):
    generation: dict  # {"role": "assistant", "content": ...}
    tokens: List[str]
    logprobs: List[float]


class Generated(NamedTuple):
    """One prompt's outcome: token ids (with the prompt's when echoed), their log-probabilities (or
    None), why it ended ("stop": a stop token or stop text, "length": max_gen_len, "max_seq_len": the
    cache was full), and the text when a stop text cut it (else None: decode the tokens)."""
    tokens: List[int]
    logprobs: Optional[List[float]]
    finish_reason: str
    text: Optional[str] = None


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{name} must be a positive integer, got {value!r}")
    return value


def _weights_for_device(model: Transformer, args, quantize: Optional[str], group_size: Optional[int], tied: bool,
                        device: torch.device, rows: int) -> str:
    """Put the loaded weights in the form that runs fastest on `device`: quantized at load if asked, GGUF's
    fp16 group tables widened on the CPU, int4 and int8 on CUDA's kernels for decode steps of at most `rows`
    rows (quant.cuda_forms), int4 and int8 on our CPU kernels (native.py), dense weights stacked on GPUs.
    Returns what --compile auto weighs: "dequantizing" (some layers still dequantize their weights on every
    call), "kernels" (on the CPU, the linear layers on our kernels: a faster uncompiled step) or "dense"."""
    if quantize is not None:
        from .quant import quantize_model

        size = quantize_model(model, quantize, group_size, tied)
        log.info("quantized the linear layers to %s (group size %s), the embeddings to int8: %.0f MB", quantize,
                 model.quantized_as[1] or "per row", size / 1e6)
    quantized = quantize is not None or args.quantization is not None
    if device.type == "cpu" and args.quantization is not None:
        from .quant import widen_tables

        widen_tables(model)
    if is_cuda(device) and quantized:
        from . import quant

        n = quant.use_kernels(model, device, model.norm.weight.dtype, rows)
        if n:
            log.info("%d quantized layers use a GPU kernel (int4: %s, int8: %s)", n, *quant.cuda_forms(rows, device))
        # the others are fast only compiled, and for 1-2 rows (engine.decide_compile)
        return "dequantizing" if quant.dequantizing_layers(model) else "dense"
    if device.type == "cpu" and quantized:
        from .quant import dequantizing_layers, use_native

        n = use_native(model)
        if n:
            log.info("%d quantized layers use our CPU kernels", n)
        return "dequantizing" if dequantizing_layers(model) else "kernels"
    if device.type == "cpu" and not quantized:
        from .native import use_dense

        n = use_dense(model)
        if n:
            log.info("%d linear layers use our CPU kernel when not compiled", n)
            return "kernels"
    if device.type != "cpu" and not quantized:
        # Stacked QKV and gate/up weights: fewer, larger matmuls on GPUs. Not on the CPU, where it
        # measured no faster and would copy weights that are otherwise used in place from the map.
        model.fuse()
    return "dequantizing" if quantized else "dense"


def _warn_past_context(max_seq_len: int, context_length: int) -> None:
    # no flag named: the generating commands' --max_seq_len is perplexity's --ctx
    log.warning("a context of %d positions is past the %d this model was trained for (context_length in its "
                "params.json); text generated or scored beyond them tends to degrade", max_seq_len, context_length)


def _warn_half_activations(dtype: torch.dtype) -> None:
    name = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))
    log.warning("--dtype %s on the CPU computes in %s without our kernels (SmolLM2-135M: about a third of the "
                "speed); leave --dtype out to keep bf16/fp16-stored weights as they are with fp32 arithmetic",
                name, name)


def _compiling(model, weights: str, compile, device, max_batch_size: int, key: str,
               expected_tokens: Optional[int]) -> bool:
    """Whether the decode step is compiled (engine.decide_compile), for `weights` as _weights_for_device
    returned; warns where CUDA weights then dequantize on every step (not for a job of no decode steps,
    expected_tokens 0: perplexity's prefills dequantize as they would in any batch)."""
    dequantizing = weights == "dequantizing"
    native_step = NativeStep.replaces_compiling(model)  # then auto does not compile
    compiling = decide_compile(compile, device, max_batch_size, key, expected_tokens, dequantizing,
                               kernels=weights == "kernels", native_step=native_step)
    if is_cuda(device) and dequantizing and not compiling and expected_tokens != 0:
        from .quant import cuda_forms

        hint = ("use --max_batch_size 1 or 2 (int8 then runs on our Triton kernel, nothing to compile)"
                if cuda_forms(1, device)[1] == "triton" else "use --compile on with --max_batch_size 1 or 2 (a "
                "first compile takes about a minute, kept for later runs)")
        log.warning("int8 weights (and quantized forms without a CUDA kernel) are dequantized on every step here "
                    "(--max_batch_size %d, not compiled; measured: about a quarter of bf16's speed); for speed %s, "
                    "or --quantize int4, whose kernel takes any number of rows", max_batch_size, hint)
    return compiling


def _kv_dtype(requested, dtype: torch.dtype) -> torch.dtype:
    """The KV cache's type: `requested` (one of settings.KV_CACHE_DTYPES, or a float torch dtype), the activations'
    dtype for None or "auto"."""
    if requested is None or requested == "auto":
        return dtype
    if requested in KV_CACHE_DTYPES or requested in (torch.float32, torch.bfloat16, torch.float16):
        return pick_dtype(torch.device("cpu"), requested)  # a name looked up; a torch dtype as it is
    raise UserError(f"--kv_cache_dtype must be {', '.join(KV_CACHE_DTYPES[:-1])} or {KV_CACHE_DTYPES[-1]}, "
                    f"got {requested!r}")


def _load_model(reader: checkpoint.CheckpointReader, args, mp, dtype: torch.dtype, device: torch.device,
                keep_half: bool) -> tuple[Transformer, bool]:
    """(this rank's model, whether its output layer is tied to the embeddings): its slices read shard by shard
    and assigned to a model made on the meta device (no second copy), parts stored quantized attached as they
    are; the reader is closed."""
    state = reader.rank_state_dict(mp.world_size, mp.rank, dtype, device, keep_half=keep_half)
    tied = reader.tied
    reader.close()
    with torch.device("meta"):
        model = Transformer(args, mp)
    if args.quantization is not None:  # stored quantized (llama-cli quantize, or a GGUF converted as it is)
        from .quant import attach_quantized

        state = attach_quantized(model, state)
    model.load_state_dict(state, assign=True, strict=True)
    model.requires_grad_(False)
    return model, tied


class Llama:
    @staticmethod
    def build(ckpt_dir: str, tokenizer_path: str, max_seq_len: int, max_batch_size: int,
              model_parallel_size: Optional[int] = None, seed: int = 1,
              device: Union[str, torch.device, None] = None, dtype: Union[str, torch.dtype, None] = None,
              compile: Union[str, bool] = "auto", cuda_graphs: Union[str, bool] = "auto",
              expected_tokens: Optional[int] = None, chat_format: str = "auto",
              quantize: Optional[str] = None, group_size: Optional[int] = None,
              tokenizer: Optional[Tokenizer] = None,
              kv_cache_dtype: Union[str, torch.dtype, None] = None, threads: Optional[int] = None) -> "Llama":
        """Load a Meta-layout checkpoint folder and its tokenizer, ready to generate.

        Works on CPU or GPU, in one process or under torchrun with any number of processes
        that the model's heads divide into. device/dtype default to this rank's GPU in bf16
        (fp16 where bf16 is unsupported), else CPU in fp32 (there, with the default dtype, linear
        weights stored in bf16 or fp16 stay so where our kernels run: devices.keeps_half_weights).
        compile and cuda_graphs: "on", "off" or "auto" (see engine.decide_compile / decide_graphs;
        expected_tokens, the job's total tokens to generate, informs compile on the CPU). chat_format: how
        chat_completion turns dialogs into tokens (chat.py): auto (the checkpoint's template, else Meta's
        format for its tokenizer), llama2, llama3 or template. quantize: None, "int8" or "int4" (weight-only,
        quant.py; group_size along the input dimension, default per channel for int8 and 32 for int4).
        tokenizer: the one at tokenizer_path where the caller has loaded it already (not loaded again).
        kv_cache_dtype: the KV cache's type, "fp32", "bf16" or "fp16" (default: dtype's; engine.py).
        threads: CPU threads of this process (torch.set_num_threads; default PyTorch's, one per core, at most a
        container's CPU quota: devices.use_threads; then, with neither this nor OMP_NUM_THREADS given, fewer
        while other work keeps the CPUs busy and more again when it stops: cpu_share.py).
        """
        start = time.perf_counter()
        _positive_int("max_seq_len", max_seq_len)
        _positive_int("max_batch_size", max_batch_size)
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
            raise UserError(f"seed must be an integer from 0 to 2**64 - 1, got {seed!r}")
        check_choice(chat_format)  # before the minutes a load can take
        world_size, rank, local_rank = distributed.world()
        device = pick_device(device, local_rank)
        adapt_threads = use_threads(threads, device)
        default_dtype = dtype is None or dtype == "auto"
        dtype = pick_dtype(device, dtype)
        kv_dtype = _kv_dtype(kv_cache_dtype, dtype)
        half_ok = keeps_half_weights(device)  # the CPU with our kernels
        if half_ok and dtype != torch.float32:
            _warn_half_activations(dtype)
        graphs = decide_graphs(cuda_graphs, device)
        precheck_compile(compile)
        from .quant import check_flags

        quantize, group_size = check_flags(quantize, group_size)

        files, params_path = checkpoint.find_checkpoint(ckpt_dir)
        args = checkpoint.load_args(params_path)
        if args.context_length is not None and max_seq_len > args.context_length:
            _warn_past_context(max_seq_len, args.context_length)
        if args.quantization is not None and quantize is not None:  # before reading any weights
            raise UserError(f"{ckpt_dir} is already quantized ({args.quantization['mode']}); drop --quantize")
        tokenizer = tokenizer or load_tokenizer(tokenizer_path)
        checkpoint.resolve_vocab_size(args, tokenizer.n_words, tokenizer_path)
        check_parallel(args, world_size)
        reader = checkpoint.CheckpointReader(files, args)
        stored = reader.stored_linear_dtype()  # linear weights that can stay bf16/fp16 under fp32 activations:
        stored_half = stored if half_ok and stored in checkpoint.HALF_DTYPES and dtype == torch.float32 else None
        half = stored_half if default_dtype else None  # kept so by default,
        widened = None if default_dtype else stored_half  # widened by an explicit --dtype fp32
        memory.preflight(args, world_size, device, dtype, max_batch_size, max_seq_len, linear_dtype=half,
                         stored_half=widened, kv_dtype=kv_dtype)
        mp = distributed.setup(device, model_parallel_size)
        model, tied = _load_model(reader, args, mp, dtype, device, keep_half=half is not None)
        weights = _weights_for_device(model, args, quantize, group_size, tied, device, max_batch_size)
        key = compiled.shape_key(model, dtype, device, (max_batch_size, cache_length(max_seq_len)), kv_dtype)
        compiling = _compiling(model, weights, compile, device, max_batch_size, key, expected_tokens)
        engine = Engine(model, max_batch_size, max_seq_len, cuda_graphs=graphs, compile_key=key, compile=compiling,
                        kv_dtype=kv_dtype, adapt_threads=adapt_threads)
        kept = "" if half is None or quantize is not None else f" (linear weights {str(half)[6:]} as stored)"
        kv = "" if kv_dtype == dtype else f" in {str(kv_dtype)[6:]}"
        n = torch.get_num_threads()  # (the threads argument may have been None: PyTorch's count)
        on = f"{device} ({n} thread{'s' if n > 1 else ''})" if device.type == "cpu" else str(device)
        log.info("loaded %s (%d shard(s)) on %s as %s%s, rank %d of %d, KV cache %d x %d positions%s, in %.2f s",
                 ckpt_dir, len(files), on, str(dtype)[6:], kept, mp.rank, mp.world_size, max_batch_size,
                 engine.cache_len, kv, time.perf_counter() - start)
        return Llama(model, tokenizer, engine, seed=seed, tokenizer_path=tokenizer_path, chat_format=chat_format)

    def __init__(self, model: Transformer, tokenizer: Tokenizer, engine: Engine, seed: int = 1,
                 tokenizer_path: Optional[str] = None, chat_format: str = "auto"):
        self.model = model
        self.tokenizer = tokenizer
        self.tokenizer_path, self._chat_choice, self._chat_format = tokenizer_path, chat_format, None
        self.engine = engine
        self.device = engine.device
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)
        self._stop = torch.tensor(sorted(tokenizer.stop_ids), device=self.device)

    @property
    def chat_format(self):
        """The dialog format (chat.py), picked on first use: a checkpoint without one can still complete text."""
        if self._chat_format is None:
            self._chat_format = pick_format(self.tokenizer, self.tokenizer_path or "", self._chat_choice)
        return self._chat_format

    def encode_dialog(self, dialog, where: str = "dialog") -> List[int]:
        return self.chat_format.encode(check_dialog(dialog, where), self.tokenizer)

    def chat_completion(self, dialogs: List[List[dict]], temperature: float = 0.6, top_p: float = 0.9,
                        max_gen_len: Optional[int] = None, logprobs: bool = False) -> List[ChatPrediction]:
        """Meta's chat_completion: each dialog's assistant reply, [{"generation": {"role": "assistant",
        "content": ...}}, and with logprobs "tokens" and "logprobs"}]. With the Llama 2 format, a message
        holding its special tags gets Meta's error text as the reply instead."""
        if max_gen_len is None:
            max_gen_len = self.max_seq_len - 1
        if isinstance(dialogs, (str, dict)) or dialogs and isinstance(dialogs[0], dict):
            raise UserError("chat_completion takes a list of dialogs, each a list of messages: "
                            'chat_completion([[{"role": "user", "content": text}]])')
        checked = [check_dialog(d, f"dialog {i}") for i, d in enumerate(dialogs)]
        prompt_tokens = [self.chat_format.encode(d, self.tokenizer) for d in checked]
        unsafe = [self.chat_format.name == "llama2" and Llama2Format.unsafe(d) for d in checked]
        gen, lps = self.generate(prompt_tokens, max_gen_len, temperature, top_p, logprobs=logprobs)
        out = []
        for i, t in enumerate(gen):
            reply = {"role": "assistant", "content": UNSAFE_ERROR if unsafe[i] else self.tokenizer.decode(t)}
            item = {"generation": reply}
            if logprobs:
                item.update(tokens=[self.tokenizer.decode([x]) for x in t], logprobs=lps[i])
            out.append(item)
        return out

    @property
    def max_batch_size(self) -> int:
        return self.engine.max_batch_size

    @property
    def max_seq_len(self) -> int:
        return self.engine.max_seq_len

    @property
    def compiled(self) -> bool:
        return self.engine.compiled

    def generate(self, prompt_tokens: List[List[int]], max_gen_len: int, temperature: float = 0.6,
                 top_p: float = 0.9, logprobs: bool = False, echo: bool = False, top_k: Optional[int] = None,
                 on_step: Optional[Callable[[List[int]], None]] = None):
        """Meta's token-level generation: returns (tokens, logprobs or None), one list per prompt.

        Prompts are batched max_batch_size at a time. on_step, if given, receives the token
        chosen for each row at every decoding step (for streaming).
        """
        s = resolve(Settings(), {"max_gen_len": max_gen_len, "temperature": temperature, "top_p": top_p,
                                 "top_k": top_k or 0}, where="generate()")
        out = self.generate_settings(prompt_tokens, [s] * len(prompt_tokens), logprobs=logprobs, echo=echo,
                                     on_step=on_step)
        return [g.tokens for g in out], ([g.logprobs for g in out] if logprobs else None)

    def generate_settings(self, prompt_tokens: Sequence[Sequence[int]], settings: Sequence[Settings], *,
                          logprobs: bool = False, echo: bool = False,
                          on_step: Optional[Callable[[List[int]], None]] = None,
                          on_first: Optional[Callable[[], None]] = None,
                          keys: Optional[Sequence[int]] = None) -> List[Generated]:
        """`generate` with each prompt's own (resolved) settings; returns a Generated per prompt. on_first, if
        given, is called once a batch's first tokens are chosen (on the host: on a GPU the loop otherwise reads
        them back only every few steps, unless on_step wants every step's). keys: each prompt's draws
        (sampling.stream_key); by default from a new base and the prompt's place in this call."""
        prompt_tokens = self._check_prompts(prompt_tokens)
        if keys is None:
            base = self.new_base()
            keys = [stream_key(base, i, s.seed) for i, s in enumerate(settings)]
        bs = self.engine.max_batch_size
        out: List[Generated] = []
        for i in range(0, len(prompt_tokens), bs):
            out += self._generate_batch(prompt_tokens[i:i + bs], settings[i:i + bs], keys[i:i + bs], logprobs, echo,
                                        on_step, on_first)
        return out

    def new_base(self) -> int:
        """The base of one call's draws (sampling.stream_key): the next number of the generator --seed seeded, so
        a run's first call is the same in every run with that seed, and later calls (a chat's turns) differ."""
        return int(torch.randint(0, 2**62, (1,), generator=self.generator, device=self.generator.device).item())

    def _generate_batch(self, prompt_tokens, settings, keys, logprobs, echo, on_step,
                        on_first=None) -> List[Generated]:
        """Meta's static scheme: every row starts at the shortest prompt's length; longer prompts have
        their own tokens fed in one step at a time; each row stops at a stop token or its own end."""
        bsz = len(prompt_tokens)
        lengths = [len(t) for t in prompt_tokens]
        ends = [n + s.max_gen_len for n, s in zip(lengths, settings)]  # where each row stops, exclusive
        min_len = min(lengths)
        total_len = min(self.max_seq_len, max(ends))
        device = self.device

        tokens = torch.full((bsz, total_len), PAD, dtype=torch.long, device=device)
        for k, t in enumerate(prompt_tokens):
            tokens[k, :len(t)] = torch.tensor(t, dtype=torch.long, device=device)
        token_logprobs = torch.zeros((bsz, total_len), dtype=torch.float, device=device) if logprobs else None
        done = torch.zeros(bsz, dtype=torch.bool, device=device)
        row_end = torch.tensor(ends, device=device)
        input_text_mask = tokens != PAD
        sampler = Sampler(bsz, self.model.params.vocab_size, device, self.generator)
        for i, (s, p, key) in enumerate(zip(settings, prompt_tokens, keys)):
            sampler.set_row(i, s, p[:min_len], key)
        watchers = {i: StopText(self.tokenizer, s.stop) for i, s in enumerate(settings) if s.stop}
        stopped_at: dict[int, int] = {}
        host_every_step = device.type == "cpu" or on_step is not None or bool(watchers)
        check_every = 1 if host_every_step else 8  # host syncs are costly on accelerators

        if logprobs:
            per_row = self.engine.prefill(range(bsz), [p[:min_len] for p in prompt_tokens], all_logits=True)
            logits = torch.stack(per_row)  # (bsz, min_len, vocab)
            if min_len > 1:
                token_logprobs[:, 1:min_len] = -F.cross_entropy(logits[:, :-1].transpose(1, 2),
                                                                tokens[:, 1:min_len], reduction="none")
            last = logits[:, -1]
        else:
            last = self.engine.prefill(range(bsz), [p[:min_len] for p in prompt_tokens])
        for cur_pos in range(min_len, total_len):
            forced = input_text_mask[:, cur_pos]
            draws = [max(0, cur_pos - n) for n in lengths]  # the tokens each row has generated so far
            next_token = torch.where(forced, tokens[:, cur_pos], sampler.sample(last, draws=draws))
            tokens[:, cur_pos] = next_token
            sampler.accept(next_token, forced)
            if logprobs:
                token_logprobs[:, cur_pos] = torch.log_softmax(last, -1).gather(-1, next_token[:, None])[:, 0]
            done |= ~forced & torch.isin(next_token, self._stop)
            done |= row_end <= cur_pos + 1
            if watchers:
                for i, w in watchers.items():
                    if cur_pos >= lengths[i] and not w.stopped:
                        if w.update(tokens[i, lengths[i]:cur_pos + 1].tolist()):
                            done[i] = True
                            stopped_at[i] = cur_pos + 1  # tokens up to the one that completed the stop text
            if on_step is not None:
                on_step(next_token.tolist())
            elif on_first is not None and cur_pos == min_len:
                next_token.tolist()  # (waits for it)
                on_first()
            if (cur_pos - min_len) % check_every == check_every - 1 and bool(done.all()):
                break
            if cur_pos + 1 < total_len:
                last = self.engine.decode(next_token, [cur_pos] * bsz)

        return self._results(tokens, token_logprobs, lengths, ends, total_len, echo, stopped_at, watchers)

    def _check_prompts(self, prompt_tokens) -> list[list[int]]:
        """The prompts as lists of ints (any integer type taken, numpy's and torch's too); a prompt that is not a
        list of this vocabulary's token ids, an empty one, or one longer than the cache, is a UserError."""
        vocab, out = self.model.params.vocab_size, []
        for i, t in enumerate(prompt_tokens):
            try:
                if isinstance(t, (str, bytes)) or any(isinstance(x, bool) for x in t):
                    raise TypeError
                ids = [operator.index(x) for x in t]
            except TypeError:
                raise UserError(f"prompt {i} is not a list of token ids (ints); text goes to text_completion, or "
                                "through tokenizer.encode") from None
            if not ids:
                raise UserError(f"prompt {i} is empty; give at least one token")
            if not 0 <= min(ids) <= max(ids) < vocab:
                raise UserError(f"prompt {i} has token id {min(ids) if min(ids) < 0 else max(ids)}, outside this "
                                f"model's vocabulary (0 to {vocab - 1})")
            if len(ids) > self.max_seq_len:
                raise UserError(f"prompt {i} has {len(ids)} tokens but max_seq_len is {self.max_seq_len}; "
                                f"raise --max_seq_len or shorten the prompt")
            out.append(ids)
        return out

    def _results(self, tokens, token_logprobs, lengths, ends, total_len, echo, stopped_at, watchers) -> List[Generated]:
        """Each row's tokens (and log-probabilities) cut at its stop token, stop text or end, with the
        reason it ended."""
        logprobs = token_logprobs is not None
        all_logprobs = token_logprobs.tolist() if logprobs else None
        out = []
        for i, toks in enumerate(tokens.tolist()):
            start = 0 if echo else lengths[i]
            toks = toks[start:ends[i]]
            probs = all_logprobs[i][start:ends[i]] if logprobs else None
            reason = "length" if ends[i] <= total_len else "max_seq_len"
            for j, t in enumerate(toks[lengths[i] - start:], lengths[i] - start):
                if t in self.tokenizer.stop_ids or t == PAD:
                    reason = "stop" if t != PAD else reason
                    toks, probs = toks[:j], (probs[:j] if logprobs else None)
                    break
            text = None
            if i in stopped_at and stopped_at[i] - start <= len(toks):
                reason = "stop"
                toks = toks[:stopped_at[i] - start]
                probs = probs[:len(toks)] if logprobs else None
                text = (self.tokenizer.decode(toks[:lengths[i]]) if echo else "") + watchers[i].text
            out.append(Generated(toks, probs, reason, text))
        return out

    def text_completion(self, prompts: List[str], temperature: float = 0.6, top_p: float = 0.9,
                        max_gen_len: Optional[int] = None, logprobs: bool = False, echo: bool = False,
                        top_k: Optional[int] = None) -> List[CompletionPrediction]:
        """Complete each prompt; returns [{"generation", and with logprobs "tokens", "logprobs"}]."""
        if max_gen_len is None:
            max_gen_len = self.max_seq_len - 1
        if isinstance(prompts, str):
            raise UserError("text_completion takes a list of prompts, not one text: text_completion([text])")
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise UserError(f"prompt {i} is a {type(p).__name__}, not text")
            check_text(p, f"prompt {i}")
        prompt_tokens = [self.tokenizer.encode(x, bos=self.tokenizer.add_bos, eos=False) for x in prompts]
        gen_tokens, gen_logprobs = self.generate(prompt_tokens, max_gen_len, temperature, top_p,
                                                 logprobs=logprobs, echo=echo, top_k=top_k)
        if logprobs:
            return [{"generation": self.tokenizer.decode(t), "tokens": [self.tokenizer.decode([x]) for x in t],
                     "logprobs": lp} for t, lp in zip(gen_tokens, gen_logprobs)]
        return [{"generation": self.tokenizer.decode(t)} for t in gen_tokens]
