"""Reading Meta-layout checkpoint folders: params.json and consolidated.NN.pth shards.

Any shard count loads on any number of processes: each rank assembles exactly its own
slice of every weight from the shards that hold it (`ShardPlan`), so fewer processes
than shards merge, more processes split. Shards are opened with
`torch.load(mmap=True, weights_only=True)`: nothing is unpickled but tensors, and only
the bytes of the slices a rank needs are read from disk.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import zipfile
from dataclasses import dataclass
from typing import Optional

import torch

from .errors import UserError
from .settings import check_path
from .model import ModelArgs

log = logging.getLogger("llama_cli")

# How Meta's (fairscale) checkpoints split each weight: the dimension, or None if replicated.
COLUMN = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight",
          "feed_forward.w1.weight", "feed_forward.w3.weight")
ROW = ("attention.wo.weight", "feed_forward.w2.weight")
IGNORED = ("rope.freqs",)  # Llama 2 checkpoints carry precomputed rotary tables; we compute our own.
# A quantized weight "X.weight" is stored as "X.weight.q" (integers), "X.weight.scale" and, for int4,
# "X.weight.offset" (quant.py): split like X.weight, the group tables replicated when a row is one group.
QPARTS = (".q", ".scale", ".offset")
HALF_DTYPES = (torch.bfloat16, torch.float16)

# params.json: the keys it may carry, with the Python types each accepts.
PARAM_TYPES = {
    "dim": (int,), "n_layers": (int,), "n_heads": (int,), "n_kv_heads": (int, type(None)),
    "vocab_size": (int,), "multiple_of": (int,), "ffn_dim_multiplier": (int, float, type(None)),
    "norm_eps": (int, float), "rope_theta": (int, float), "use_scaled_rope": (bool,),
    "ffn_hidden_dim": (int, type(None)), "rope_scaling": (dict, type(None)), "quantization": (dict, type(None)),
    "context_length": (int, type(None)),
}


def args_from_params(params: dict) -> tuple[ModelArgs, list[str]]:
    """ModelArgs from a params.json dict; returns (args, unknown keys). Wrong types raise UserError."""
    if not isinstance(params, dict):
        raise UserError("params.json must hold a JSON object like {\"dim\": 4096, \"n_layers\": 32, ...}")
    unknown = sorted(k for k in params if k not in PARAM_TYPES)
    kwargs = {}
    for key in PARAM_TYPES.keys() & params.keys():
        value, types = params[key], PARAM_TYPES[key]
        if isinstance(value, bool) and bool not in types or not isinstance(value, types):
            want = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise UserError(f"params.json: '{key}' must be {want}, got {json.dumps(value)}")
        kwargs[key] = value
    for key in ("dim", "n_layers", "n_heads"):
        if key not in kwargs:
            raise UserError(f"params.json has no '{key}'; a Meta params.json names dim, n_layers, n_heads, ...")
    if kwargs.get("quantization") is not None:
        from .quant import check_mode

        q = kwargs["quantization"]
        keys = ("params.json: quantization.mode", "params.json: quantization.group_size")
        mode, group = check_mode(q.get("mode"), q.get("group_size"), keys)
        kwargs["quantization"] = {"mode": mode, "group_size": group}
        if q.get("embeddings") is not None:  # the token embeddings (and a tied output layer) in a form of their own
            e = q["embeddings"]
            if not isinstance(e, dict) or e.get("group_size") is None:
                raise UserError("params.json: quantization.embeddings must be like "
                                "{\"mode\": \"int8\", \"group_size\": 32}")
            keys = tuple(k.replace("quantization.", "quantization.embeddings.") for k in keys)
            kwargs["quantization"]["embeddings"] = dict(zip(("mode", "group_size"),
                                                            check_mode(e.get("mode"), e.get("group_size"), keys)))
    return ModelArgs(**kwargs), unknown


def resolve_vocab_size(args: ModelArgs, n_words: int, tokenizer_path: str) -> None:
    """params.json's vocab_size -1 means the tokenizer's size; any other value must equal it."""
    if args.vocab_size == -1:
        args.vocab_size = n_words
    elif args.vocab_size != n_words:
        raise UserError(f"params.json says vocab_size={args.vocab_size} but {tokenizer_path} has "
                        f"{n_words} tokens; use the tokenizer that came with this checkpoint")


def open_for_rewrite(ckpt_dir, out, tokenizer_path=None) -> tuple[list[str], dict, ModelArgs]:
    """(shard files, params.json dict, args with vocab_size known) of a folder that an offline tool
    (reshard, quantize) rewrites into `out`."""
    from .tokenizer import find_tokenizer, load_tokenizer

    if out is None:
        raise UserError("--out is required: the folder to write the new checkpoint to")
    files, params_path = find_checkpoint(ckpt_dir)
    params = read_params(params_path)
    args = load_args(params_path)
    if os.path.abspath(out) == os.path.abspath(ckpt_dir):
        raise UserError("--out must be a different folder from --ckpt_dir")
    if args.vocab_size == -1:
        tokenizer_path = tokenizer_path or find_tokenizer(ckpt_dir)
        if not os.path.isfile(tokenizer_path):
            raise UserError("params.json has vocab_size -1 and no tokenizer was found; pass --tokenizer_path")
        resolve_vocab_size(args, load_tokenizer(tokenizer_path).n_words, tokenizer_path)
    return files, params, args


def quantized_form(args: ModelArgs, name: str) -> tuple[str, int]:
    """(mode, group size) of a weight stored quantized: the embeddings' own form for tok_embeddings (and
    a tied output layer, which is the embeddings), args.quantization's for the linear layers."""
    q = args.quantization
    if name == "tok_embeddings.weight":
        if q.get("embeddings") is None:
            raise UserError("the checkpoint stores tok_embeddings quantized but params.json's \"quantization\" "
                            "has no \"embeddings\" form; the weights and params.json do not match")
        return q["embeddings"]["mode"], q["embeddings"]["group_size"]
    return q["mode"], q["group_size"]


def weight_table(args: ModelArgs, quantized=frozenset(),
                 tied: bool = False) -> dict[str, tuple[tuple[int, ...], Optional[int]]]:
    """Every weight of the model: name -> (full unsplit shape, the dimension Meta's checkpoints split it
    along, None where replicated). The one list of names and shapes: the reader, the memory estimate,
    the writers and the tests' random checkpoints all use it. Weights named in `quantized` are listed
    as their parts (QPARTS), in quantized_form's form; with `tied`, the output layer takes the
    embeddings' form."""
    table = _dense_table(args)
    if not quantized:
        return table
    out = {}
    for name, (shape, dim) in table.items():
        source = "tok_embeddings.weight" if tied and name == "output.weight" else name
        if source not in quantized:
            out[name] = (shape, dim)
            continue
        mode, group = quantized_form(args, source)
        rows, cols = shape
        groups = cols // group if group else 1
        out[name + ".q"] = ((rows, cols // 2 if mode == "int4" else cols), dim)
        table_dim = None if dim == 1 and groups == 1 else dim
        out[name + ".scale"] = ((rows, groups), table_dim)
        if mode == "int4":
            out[name + ".offset"] = ((rows, groups), table_dim)
    return out


def _dense_table(args: ModelArgs) -> dict[str, tuple[tuple[int, ...], Optional[int]]]:
    a = args
    hd, kv = a.head_dim, a.n_kv_heads
    table = {"tok_embeddings.weight": ((a.vocab_size, a.dim), 1), "norm.weight": ((a.dim,), None),
             "output.weight": ((a.vocab_size, a.dim), 0)}
    for i in range(a.n_layers):
        p = f"layers.{i}."
        table.update({
            p + "attention.wq.weight": ((a.n_heads * hd, a.dim), 0), p + "attention.wk.weight": ((kv * hd, a.dim), 0),
            p + "attention.wv.weight": ((kv * hd, a.dim), 0), p + "attention.wo.weight": ((a.dim, a.n_heads * hd), 1),
            p + "feed_forward.w1.weight": ((a.hidden_dim, a.dim), 0),
            p + "feed_forward.w3.weight": ((a.hidden_dim, a.dim), 0),
            p + "feed_forward.w2.weight": ((a.dim, a.hidden_dim), 1),
            p + "attention_norm.weight": ((a.dim,), None), p + "ffn_norm.weight": ((a.dim,), None),
        })
    return table


def split_dim(name: str, shape: Optional[tuple] = None) -> Optional[int]:
    """The dimension our model splits `name` along (tok_embeddings: the embedding dim). A quantized part
    splits like its weight, except a group table with one group per row (shape (out, 1)), replicated."""
    for part in QPARTS:
        if name.endswith(".weight" + part):
            dim = split_dim(name[:-len(part)])
            if part != ".q" and dim == 1 and shape is not None and shape[1] == 1:
                return None
            return dim
    if name.endswith(COLUMN) or name == "output.weight":
        return 0
    if name.endswith(ROW) or name == "tok_embeddings.weight":
        return 1
    return None


def is_linear(name: str) -> bool:
    """Whether `name` is a linear layer's weight (what quantization applies to)."""
    return name.endswith(COLUMN + ROW) or name == "output.weight"


def _convert_hint(src: str) -> str:
    out = os.path.join("checkpoints", os.path.splitext(os.path.basename(os.path.normpath(src)))[0] or "model")
    return f"convert it first: llama-cli convert --src {src} --out {out}, then pass --ckpt_dir {out}"


def find_checkpoint(ckpt_dir) -> tuple[list[str], str]:
    """The sorted shard files and the params.json path of a checkpoint folder."""
    if ckpt_dir is None or str(ckpt_dir).strip() == "":
        raise UserError("no checkpoint folder given; pass --ckpt_dir DIR (a folder with consolidated.00.pth and "
                        "params.json)")
    ckpt_dir = check_path(os.fspath(ckpt_dir), "--ckpt_dir")
    if not os.path.exists(ckpt_dir):
        raise UserError(f"checkpoint folder {ckpt_dir} does not exist; pass --ckpt_dir with the folder that holds "
                        "consolidated.00.pth and params.json")
    if not os.path.isdir(ckpt_dir):
        with open(ckpt_dir, "rb") as f:
            if f.read(4) == b"GGUF":
                raise UserError(f"--ckpt_dir {ckpt_dir} is a GGUF file, not a Meta checkpoint folder; "
                                + _convert_hint(ckpt_dir))
        raise UserError(f"--ckpt_dir {ckpt_dir} is a file; pass the folder that holds it and params.json")
    if os.path.isfile(os.path.join(ckpt_dir, "config.json")) and not glob.glob(os.path.join(ckpt_dir, "*.pth")):
        raise UserError(f"{ckpt_dir} is a HuggingFace model folder (config.json), not a Meta checkpoint; "
                        + _convert_hint(ckpt_dir))
    if not os.listdir(ckpt_dir):
        raise UserError(f"checkpoint folder {ckpt_dir} is empty; it should hold consolidated.NN.pth shards and "
                        "params.json (download or convert a model into it)")
    files = sorted(glob.glob(os.path.join(ckpt_dir, "*.pth")))
    if not files:
        raise UserError(f"no *.pth files in {ckpt_dir}; a Meta checkpoint folder holds consolidated.00.pth "
                        "(and .01, ... when sharded) next to params.json")
    params_path = os.path.join(ckpt_dir, "params.json")
    if not os.path.isfile(params_path):
        raise UserError(f"{ckpt_dir} has no params.json; it comes with the checkpoint and describes the model "
                        "(dim, n_layers, n_heads, ...)")
    return files, params_path


def read_params(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            params = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); restore it from the original download") from None
    if not isinstance(params, dict):
        raise UserError(f"{path} must hold a JSON object with the model's dimensions, not {type(params).__name__}")
    return params


def load_args(params_path: str) -> ModelArgs:
    params = read_params(params_path)
    args, unknown = args_from_params(params)
    if unknown:
        log.warning("params.json: ignoring unknown keys %s", ", ".join(unknown))
    return args


def open_shard(path: str) -> dict:
    """Memory-map one shard; only tensors are unpickled."""
    try:
        sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except (zipfile.BadZipFile, RuntimeError, EOFError, OSError) as e:
        raise UserError(f"cannot read checkpoint shard {path} ({_first_line(e)}); the file is damaged or not "
                        "a PyTorch checkpoint: download it again") from None
    except Exception as e:  # weights_only refuses arbitrary objects with an UnpicklingError
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = found.group(1) if found else _first_line(e)
        raise UserError(f"refusing to load {path}: it holds a pickled Python object ({what}), not only tensors; "
                        "only plain tensor checkpoints are loaded") from None
    if not isinstance(sd, dict):
        raise UserError(f"{path} holds a {type(sd).__name__}, not a dict of named tensors")
    return sd


@dataclass(frozen=True)
class ShardPlan:
    """Which part of each weight a rank needs, for n_shards on disk and world_size processes."""
    n_shards: int
    world_size: int
    rank: int

    def range(self, length: int) -> tuple[int, int]:
        """This rank's [start, end) of a dimension of global size `length`."""
        per = length // self.world_size
        return self.rank * per, (self.rank + 1) * per

    def shards_for(self, start: int, end: int, length: int) -> list[tuple[int, int, int]]:
        """(shard index, offset inside that shard, count) covering [start, end) of a split dimension."""
        per = length // self.n_shards
        pieces = []
        for s in range(start // per, (end - 1) // per + 1):
            lo, hi = max(start, s * per), min(end, (s + 1) * per)
            pieces.append((s, lo - s * per, hi - lo))
        return pieces

    def needed_shards(self) -> list[int]:
        """The shards holding anything of this rank's slice (for an evenly split weight)."""
        lo, hi = self.rank * self.n_shards, (self.rank + 1) * self.n_shards  # in units of 1/(W*S)
        return [s for s in range(self.n_shards) if s * self.world_size < hi and (s + 1) * self.world_size > lo]


class CheckpointReader:
    """Assembles any rank's state dict from the shards of one checkpoint."""

    def __init__(self, files: list[str], args: ModelArgs):
        self.files, self.args = files, args
        self._open: dict[int, dict] = {}
        self._shapes0: dict[str, tuple] = {}  # shard 0's tensor shapes, kept without its mapping

    def shape0(self, name: str) -> tuple:
        """The shape of `name` in shard 0, or None when shard 0 lacks it."""
        if not self._shapes0:
            self._shapes0 = {k: tuple(v.shape) for k, v in self.shard(0).items() if hasattr(v, "shape")}
        return self._shapes0.get(name)

    def shard(self, index: int) -> dict:
        if index not in self._open:
            self._open[index] = open_shard(self.files[index])
        return self._open[index]

    def close(self) -> None:
        self._open.clear()

    @property
    def quantized(self) -> frozenset:
        """The weights this checkpoint stores quantized (as QPARTS), read off shard 0's names."""
        self.shape0("tok_embeddings.weight")
        names = frozenset(k[:-2] for k in self._shapes0 if k.endswith(".weight.q"))
        if names and self.args.quantization is None:
            raise UserError(f"{self.files[0]} holds quantized weights but params.json has no \"quantization\"; "
                            "the weights and params.json do not match")
        return names

    def table(self) -> dict[str, tuple[tuple[int, ...], Optional[int]]]:
        return weight_table(self.args, self.quantized, self.tied)

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Full (unsplit) shapes implied by params.json."""
        return {name: shape for name, (shape, _) in self.table().items()}

    @property
    def tied(self) -> bool:
        """Whether the checkpoint has no output layer (the embeddings serve as the output layer)."""
        return (self.shape0("output.weight") is None and self.shape0("output.weight.q") is None
                and (self.shape0("tok_embeddings.weight") or self.shape0("tok_embeddings.weight.q")) is not None)

    def full_tensors(self, dtype: Optional[torch.dtype] = None):
        """(name, whole unsplit tensor) for every weight the checkpoint stores (a tied output layer is
        not repeated), one at a time: each is assembled from the shards that hold pieces of it."""
        shapes = self.expected_shapes()
        self._check_extra_keys(self.shard(0), shapes)
        for name, full in shapes.items():
            if name.startswith("output.weight") and self.tied:
                continue
            src = self._check(name, full)
            if src is None:
                t = self.shard(0)[name]
            else:
                t = torch.cat([self._tensor(s, name, full) for s in range(len(self.files))], dim=src)
            yield name, t.to(dtype) if dtype is not None and not name.endswith(QPARTS) else t

    def _source_dim(self, name: str, full: tuple[int, ...]) -> Optional[int]:
        """The dimension the checkpoint split `name` along, read from shard 0's shape."""
        n = len(self.files)
        shape = self.shape0(name)
        if n == 1:
            return None if shape == full else -1
        for d in range(len(full)):
            if shape[d] * n == full[d] and shape[:d] + shape[d + 1:] == full[:d] + full[d + 1:]:
                return d
        if shape == full:
            return None
        return -1  # matches no split: reported by the caller

    def _check(self, name: str, full: tuple[int, ...]) -> Optional[int]:
        """Check `name` exists with a shape that fits params.json in every shard it is needed from."""
        if self.shape0(name) is None:
            raise UserError(f"checkpoint {self.files[0]} has no tensor '{name}' that params.json "
                            f"(n_layers={self.args.n_layers}) calls for; the weights and params.json do not match")
        src = self._source_dim(name, full)
        if src == -1:
            got = self.shape0(name)
            raise UserError(
                f"tensor '{name}' has shape {list(got)} in {os.path.basename(self.files[0])}, but params.json implies "
                f"{list(full)} for the whole model in {len(self.files)} shard(s); the weights and params.json do "
                "not match")
        t = self.shard(0)[name]
        want = (torch.int8, torch.uint8) if name.endswith(".q") else None
        if (t.dtype not in want) if want else not t.is_floating_point():
            kind = "int8 or uint8 (quantized)" if want else "floating-point"
            raise UserError(f"tensor '{name}' in {os.path.basename(self.files[0])} holds {str(t.dtype)[6:]} values "
                            f"where {kind} values belong; the file is damaged or not a LLaMA checkpoint")
        return src

    def _tensor(self, s: int, name: str, full) -> torch.Tensor:
        sd = self.shard(s)
        if name not in sd:
            raise UserError(f"checkpoint shard {self.files[s]} has no tensor '{name}'; the shards do not belong "
                            "together")
        t = sd[name]
        want = self.shape0(name)
        if tuple(t.shape) != want:
            raise UserError(f"tensor '{name}' has shape {list(t.shape)} in {os.path.basename(self.files[s])} but "
                            f"{list(want)} in {os.path.basename(self.files[0])}; the shards do not belong together")
        return t

    def stored_linear_dtype(self) -> Optional[torch.dtype]:
        """The dtype the linear layers' weights are stored in (read off the first one), or None where they are
        stored quantized."""
        t = self.shard(0).get("layers.0.attention.wq.weight")
        return t.dtype if isinstance(t, torch.Tensor) else None

    def rank_state_dict(self, world_size: int, rank: int, dtype: torch.dtype,
                        device: torch.device = torch.device("cpu"), keep_half: bool = False) -> dict[str, torch.Tensor]:
        """The state dict of `Transformer(args, ModelParallel(world_size, rank))`, in `dtype`; with keep_half,
        linear weights stored in bf16 or fp16 stay so (devices.keeps_half_weights).

        Goes shard by shard: each shard's pieces of this rank's slices are copied into place and
        the shard is unmapped before the next is opened, so peak memory stays near the size of
        this rank's slice. A slice that is exactly one shard's tensor (as many processes as
        shards, same dtype) is used in place, straight from the memory map.
        """
        a = self.args
        plan = ShardPlan(len(self.files), world_size, rank)
        needed = plan.needed_shards()
        table = self.table()
        shapes = {name: shape for name, (shape, _) in table.items()}
        self._check_extra_keys(self.shard(needed[0]), shapes)
        tied = self.tied
        specs = {}
        for name, (full, table_dim) in table.items():
            dim = table_dim if world_size > 1 else None
            if dim == 1 and name.endswith(QPARTS) and full[1] % world_size:
                raise UserError(f"'{name}' ({full[1]} columns: quantization groups or packed pairs) cannot be split "
                                f"evenly over {world_size} processes; run on a process count that divides it")
            if dim is None:
                start, end = 0, 0
            elif (".attention.wk.weight" in name or ".attention.wv.weight" in name) and world_size > a.n_kv_heads:
                head = rank // (world_size // a.n_kv_heads)  # repeated KV head: whole heads per rank
                start, end = head * a.head_dim, (head + 1) * a.head_dim
            else:
                start, end = plan.range(full[dim])
            source = "tok_embeddings" + name[len("output"):] if name.startswith("output.weight") and tied else name
            src = self._check(source, full)
            if src is not None and src != dim:
                needed = sorted(set(needed) | set(range(len(self.files))))  # stored split another way
            elif src is not None and dim is not None:  # a repeated KV head can lie in shards beyond this rank's
                needed = sorted(set(needed) | {shard for shard, _, _ in plan.shards_for(start, end, full[dim])})
            specs[name] = (full, dim, start, end, source, src)

        out: dict[str, torch.Tensor] = {}
        # Keep views into the map only when one shard holds this rank's whole slice: a view of a
        # shard that is also copied from would keep all of that shard's touched pages resident.
        in_place = len(needed) == 1
        for s in needed:
            self._copy_shard(s, needed[0], specs, out, dtype, device, in_place, keep_half)
            self._open.pop(s, None)  # unmap this shard's pages (views kept in `out` stay valid)
        self._open.clear()
        return {k: v.contiguous() for k, v in out.items()}

    def _copy_shard(self, s, first, specs, out, dtype, device, in_place, keep_half) -> None:
        """Copy shard s's pieces of every target slice into `out` (no reference to s survives). Quantized
        parts keep their stored dtypes, and with keep_half linear weights stored in bf16 or fp16 too."""
        model_dtype = dtype
        for name, (full, dim, start, end, source, src) in specs.items():
            for piece, dst_dim, dst_off in self._pieces(s, first, full, dim, start, end, source, src):
                kept = name.endswith(QPARTS) or (keep_half and is_linear(name) and piece.dtype in HALF_DTYPES)
                dtype = None if kept else model_dtype
                shape = list(full)
                if dim is not None:
                    shape[dim] = end - start
                if list(piece.shape) == shape:
                    moved = piece.to(device=device, dtype=dtype or piece.dtype)
                    out[name] = moved if in_place or moved is not piece else moved.clone()
                    continue
                if name not in out:
                    out[name] = torch.empty(shape, dtype=dtype or piece.dtype, device=device)
                out[name].narrow(dst_dim, dst_off, piece.shape[dst_dim]).copy_(piece)

    def _pieces(self, s, first, full, dim, start, end, source, src):
        """(part of shard s's tensor, target dim, offset in the target) for one target slice."""
        if src is None:  # replicated, or a single shard: read it from one shard only
            if s != first:
                return []
            t = self.shard(s)[source]
            return [(t if dim is None else t.narrow(dim, start, end - start), 0, 0)]
        t = self._tensor(s, source, full)
        per = t.shape[src]
        if src == dim:
            plan = ShardPlan(len(self.files), 1, 0)
            return [(t.narrow(dim, off, cnt), dim, s * per + off - start)
                    for shard, off, cnt in plan.shards_for(start, end, full[dim]) if shard == s]
        if dim is not None:
            t = t.narrow(dim, start, end - start)
        return [(t, src, s * per)]

    def _check_extra_keys(self, sd: dict, shapes: dict) -> None:
        extra = sorted(k for k in sd if k not in shapes and k not in IGNORED)
        if extra:
            raise UserError(f"checkpoint holds tensor '{extra[0]}' (and {len(extra) - 1} more) that params.json "
                            f"(n_layers={self.args.n_layers}) has no place for; the weights and params.json do not "
                            "match")


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
