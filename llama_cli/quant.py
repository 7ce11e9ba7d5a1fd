"""Weight-only int8 and int4: the forms, quantizing into them, and the matrix product that reads them.

Decoding reads every weight once per token, so fewer bytes per weight is speed. Two forms, both
group-wise along the input dimension (a group never straddles a model-parallel split):
- int8: w = q * scale, q in [-127, 127]; by default one group per output row (per channel);
- int4: w = q * scale + offset, q in [0, 15] (affine, as GGUF's Q4_1; Q4_0 is offset = -8 scale),
  two values per byte, laid out as GGUF's Q4 blocks: within each group of g columns, byte j holds
  column j in its low nibble and column j + g/2 in its high nibble (so one pass over the bytes
  multiplies both halves of the group, and GGUF's blocks are copied as they are).
`scale` and `offset` are (out, n_groups). Activations stay in the model's dtype: the product
dequantizes, in a form that torch.compile fuses into the streaming multiply-and-sum the CPU uses
for one or two rows (parallel.linear), so only the small integers cross the memory bus; eager
code dequantizes the weight and calls the dense product (correct everywhere, not faster). On x86 CPUs
both forms go through our C++ kernels, eager and compiled (native_form, native.py; past their few rows
the operators dequantize the weight for a matrix product themselves); on CUDA, int4 goes through
PyTorch's tinygemm kernel (kernel_form). The token embeddings of a quantized model are int8 (embedding_form;
a lookup dequantizes the rows it reads).
"""

from __future__ import annotations

from typing import Optional

import torch

from .errors import UserError

MODES = ("int8", "int4")
INT4_DEFAULT_GROUP = 32  # measured both faster and better than 64 on SmolLM2-135M (docs/benchmarks.md)


def check_flags(quantize, group_size) -> tuple[Optional[str], Optional[int]]:
    """--quantize and --group_size as given to a command: (None, None) when not quantizing, else check_mode's."""
    if quantize is None and group_size is not None:
        raise UserError("--group_size goes with --quantize int8 or int4")
    return (None, None) if quantize is None else check_mode(quantize, group_size)


def check_mode(mode, group_size, names=("--quantize", "--group_size")) -> tuple[str, Optional[int]]:
    """(mode, group size); the group size stays None (pick_group decides) when not given for int4. names: what
    the mode and the group size are called where they were given (flags, or params.json's keys)."""
    if mode not in MODES:
        raise UserError(f"{names[0]} must be int8 or int4, got {mode!r}")
    if group_size is None:
        return mode, 0 if mode == "int8" else None
    allowed = (0, 32, 64, 128, 256) if mode == "int8" else (32, 64, 128, 256)
    if isinstance(group_size, bool) or group_size not in allowed:
        raise UserError(f"{names[1]} for {mode} must be one of {', '.join(map(str, allowed))} "
                        f"(0: one group per output row), got {group_size!r}")
    return mode, group_size


def pick_group(mode: str, group_size: Optional[int], in_sizes, processes: int = 1, flag: str = "--quantize") -> int:
    """The group size to use: the one asked for, else 0 (per row) for int8 and 32 for int4. in_sizes: the
    linear layers' input sizes, as each of `processes` processes holds them; flag: the mode's flag."""
    if group_size is not None:
        return group_size
    if mode == "int8":
        return 0
    if any(n % INT4_DEFAULT_GROUP for n in in_sizes):
        per = f" per process on {processes} processes" if processes > 1 else ""
        raise UserError(f"int4's groups of {INT4_DEFAULT_GROUP} do not divide this model's input sizes{per} "
                        f"{sorted(set(in_sizes))}; use {flag} int8" + (" or fewer processes" if per else ""))
    return INT4_DEFAULT_GROUP


def embedding_form(width: int) -> tuple[str, int]:
    """The token embeddings' form whenever a model is quantized (at load, or by llama-cli quantize): int8
    with one scale per row. A lookup dequantizes only the rows it reads; a tied output layer uses the same
    form, and per row it runs about 3x faster on the CPU than in groups (measured; the scale multiplies
    once per row instead of once per group). GGUF files keep their own (Q8_0: int8 groups of 32)."""
    return "int8", 0


def quantize(w: torch.Tensor, mode: str, group_size: int, mp=None) -> tuple[torch.Tensor, torch.Tensor,
                                                                           Optional[torch.Tensor]]:
    """(q, scale, offset or None) of a (out, in) weight; group_size 0: one group per row. mp: the ranks that
    split this weight's rows (parallel.ModelParallel), where it is one process's columns of them: a row's int8
    scale is then taken over the whole row, so every process count quantizes to the same values."""
    out, inp = w.shape
    g = group_size or inp
    if inp % g:
        raise UserError(f"--group_size {g} does not divide this weight's input size {inp} (per process); "
                        "choose a group size that does, or another process count")
    wf = w.float().reshape(out, inp // g, g)
    if mode == "int8":
        absmax = wf.abs().amax(-1)  # (out, n_groups)
        if mp is not None and not group_size:
            absmax = mp.all_reduce(absmax, torch.distributed.ReduceOp.MAX)
        scale = absmax.clamp_min(1e-12) / 127
        q = torch.round(wf / scale[..., None]).clamp(-127, 127).to(torch.int8).reshape(out, inp)
        return q, scale, None
    lo, hi = wf.amin(-1), wf.amax(-1)
    scale = ((hi - lo) / 15).clamp_min(1e-12)
    q = torch.round((wf - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8).reshape(out, inp)
    return pack4(q, g), scale, lo


def pack4(q: torch.Tensor, group: int) -> torch.Tensor:
    """(out, in) values 0..15 -> (out, in/2) bytes: in each group, column j low, column j + group/2 high."""
    out, inp = q.shape
    qg = q.reshape(out, inp // group, group)
    return (qg[..., :group // 2] | (qg[..., group // 2:] << 4)).reshape(out, inp // 2).contiguous()


def unpack4(p: torch.Tensor, groups: int) -> torch.Tensor:
    """(out, in/2) bytes in `groups` groups -> (out, in) values 0..15."""
    out, half = p.shape
    pg = p.reshape(out, groups, half // groups)
    return torch.cat((pg & 15, pg >> 4), dim=-1).reshape(out, 2 * half)


def dequantize(q: torch.Tensor, scale: torch.Tensor, offset: Optional[torch.Tensor], dtype=torch.float32):
    """The (out, in) weight a form stands for, in `dtype` (computed in fp32)."""
    groups = scale.shape[1]
    vals = unpack4(q, groups) if offset is not None else q
    out, inp = vals.shape
    w = vals.reshape(out, groups, inp // groups).float() * scale.float()[..., None]
    if offset is not None:
        w = w + offset.float()[..., None]
    return w.reshape(out, inp).to(dtype)


def dequantize_as(q: torch.Tensor, scale: torch.Tensor, offset: Optional[torch.Tensor]) -> torch.Tensor:
    """dequantize's weight for tables already in the activations' half type, each value computed as v * scale
    + offset in one pass a nibble (addcmul: fp32 arithmetic, rounded once) into the weight: about 5 bytes of
    memory traffic a weight against dequantize's ~30 through fp32 temporaries. For the prefills of layers on
    the Triton kernels (many rows, no compiling): ~0.3 s of a 7B-shape int4 prefill on an H100 went there."""
    out, groups = scale.shape
    pg, s = q.reshape(out, groups, -1), scale[..., None]
    if offset is None:
        return (pg * s).reshape(out, -1)
    half = pg.shape[-1]
    w = torch.empty(out, groups, 2 * half, dtype=scale.dtype, device=q.device)
    torch.addcmul(offset[..., None], pg & 15, s, out=w[..., :half])
    torch.addcmul(offset[..., None], pg >> 4, s, out=w[..., half:])
    return w.reshape(out, -1)


def quantized_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, offset: Optional[torch.Tensor],
                     gemv_rows: int) -> torch.Tensor:
    """x @ W.T for a quantized W. Compiled for the CPU with at most gemv_rows rows: one streaming pass over
    the integers (each byte of int4 feeding both halves of its group), sum over groups of
    scale_g * sum_i x_i q_i, plus offset_g * sum_i x_i for int4."""
    per_row_int8 = offset is None and scale.shape[1] == 1
    fused = q.device.type == "cpu" or not per_row_int8  # (a GPU's int8 per row: below, in the activations' dtype)
    if torch.compiler.is_compiling() and fused and x.shape[:-1].numel() <= gemv_rows:
        out, groups = scale.shape
        inp = x.shape[-1]
        g = inp // groups
        xg = x.float().reshape(*x.shape[:-1], 1, groups, g)  # (..., 1, G, g)
        s = scale.float()[..., None]  # (out, G, 1)
        if offset is None:
            y = (xg * q.reshape(out, groups, g) * s).sum((-1, -2))
        else:
            # byte p = lo + 16 hi, so lo_x lo + hi_x hi = (lo_x - hi_x/16) (p & 15) + (hi_x/16) p: one mask
            # and two conversions per byte, no shift (measured 1.3-1.6x faster than unpacking both nibbles)
            p = q.reshape(out, groups, g // 2)
            b = xg[..., g // 2:] * 0.0625
            a = xg[..., :g // 2] - b
            y = ((a * (p & 15) + b * p) * s).sum((-1, -2))
            y = y + (xg.sum(-1) * offset.float()).sum(-1)
        return y.to(x.dtype)
    if per_row_int8:  # the scale after the product
        s = scale[:, 0].to(x.dtype)
        if not torch.compiler.is_compiling():
            return torch.nn.functional.linear(x, q.to(x.dtype)) * s
        if x.shape[:-1].numel() <= gemv_rows:
            # a few rows, compiled (GPUs): a multiply-and-sum that inductor fuses into one pass over the int8
            # weight. (As a product, F.linear(x, q.to(dtype)) * s, inductor's own int8 pattern replaced it by
            # a kernel whose compile failed on CUDA in torch 2.11; with more rows the weight is dequantized.)
            return (x.unsqueeze(-2) * q.to(x.dtype)).sum(-1) * s
    if not torch.compiler.is_compiling() and x.dtype != torch.float32 and scale.dtype == x.dtype and (
            offset is None or offset.dtype == x.dtype):
        return torch.nn.functional.linear(x, dequantize_as(q, scale, offset))
    return torch.nn.functional.linear(x, dequantize(q, scale, offset, x.dtype))


def widen_tables(model) -> None:
    """Group tables (scales, offsets) stored in fp16 (GGUF's) -> fp32, exactly, keeping shared tensors shared:
    the CPU's compiled product reads fp32 tables about 20% faster end to end (SmolLM2 Q4_1, measured), for
    4 more bytes per group of 32 weights."""
    done: dict = {}

    def wide(t):
        if t is None or t.dtype == torch.float32:
            return t
        return done.setdefault(id(t), t.float())

    for m in model.modules():
        if getattr(m, "qscale", None) is not None:
            m.qscale, m.qoffset = wide(m.qscale), wide(m.qoffset)


# A library kernel for the int4 product where one exists (CUDA: the tinygemm kernel gpt-fast uses), in place
# of dequantizing a weight on every call. Its CPU twin takes the same scales and zeros, which is how the CPU
# tests check the conversion. int8 takes none: PyTorch's CUDA int8 weight-only kernel gives each output one
# thread that walks its row alone (uncoalesced reads), so int8 goes through quantized_linear, which a
# compiled step fuses into one pass over the weight.
INNER_K_TILES = (8, 4, 2)  # the kernel's tiling of the input dimension, largest that divides it
# How int4 layers run on CUDA: "auto" (the default; cuda_forms), "tinygemm" (kernel_form); "fused": kept in our
# form with their tables in the activations' dtype, so that a compiled step fuses the unpacking into one
# multiply-and-sum pass over the bytes (quantized_linear, as on the CPU; uncompiled, such a layer dequantizes on
# every call); or "triton": the same form through our Triton kernel for one or two rows (triton_gemv.py), fast
# without compiling. The others stay as knobs for scripts/gpu_check.py (quant_candidates) to time.
CUDA_INT4 = "auto"
# int8 with one scale per row on CUDA: "auto" (cuda_forms), "compiled" (quantized_linear: fast only in a
# compiled step) or "triton" (triton_gemv.py, fast without compiling)
CUDA_INT8 = "auto"
TRITON_ROWS = 2  # up to this many rows the "triton" forms run their kernel; past them they dequantize


def kernel_form(m, device: torch.device) -> bool:
    """Put an int4 linear layer `m` into the library kernel's form for `device` (CUDA's kernel, or elsewhere
    its CPU twin), where it fits (groups 32-256, in % 32 == 0, out % 8 == 0): torch._weight_int4pack_mm
    (tinygemm: values packed by torch._convert_weight_to_int4pack, scales and zeros (groups, out, 2) bf16
    with w = (v - 8) * scale + zero, our w = v * scale + offset). Returns whether it did."""
    q, scale, offset = m.qweight, m.qscale, m.qoffset
    out, groups = scale.shape
    if offset is None:
        return False
    inp = q.shape[1] * 2
    g = inp // groups
    tiles = next((t for t in INNER_K_TILES if inp % (t * 16) == 0), None)
    if g not in (32, 64, 128, 256) or tiles is None or out % 8:
        return False
    from .devices import is_cuda

    v = unpack4(q, groups)  # (out, in) 0..15
    zeros = offset.float() + 8 * scale.float()
    sz = torch.stack([scale.float(), zeros], -1).transpose(0, 1).contiguous()
    if is_cuda(device):  # two values a byte, even columns in the high nibble; tables in bf16
        m.qweight = torch.ops.aten._convert_weight_to_int4pack((v[:, ::2] << 4 | v[:, 1::2]).contiguous(),
                                                               tiles)
        m.kernel, m.kscales = "int4", sz.to(torch.bfloat16)
    else:  # the CPU twin takes fp32 tables too
        m.qweight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(v.int(), tiles)
        m.kernel, m.kscales = "int4-cpu", sz
    m.kgroup = g
    return True


def native_form(m) -> bool:
    """Mark a quantized linear layer `m` on the CPU for our C++ kernels (native.py), where its form fits:
    groups of a multiple of 32 columns, fp32 tables. The weight stays as it is. Returns whether it did."""
    q, scale, offset = m.qweight, m.qscale, m.qoffset
    if scale.dtype != torch.float32 or (offset is not None and offset.dtype != torch.float32):
        return False
    if offset is not None and q.dtype == torch.uint8:
        kind, inp = "int4-native", q.shape[1] * 2
    elif offset is None and q.dtype == torch.int8:
        kind, inp = "int8-native", q.shape[1]
    else:
        return False
    if (inp // scale.shape[1]) % 32:
        return False
    m.qweight, m.qscale = q.contiguous(), scale.contiguous()
    m.qoffset = None if offset is None else offset.contiguous()
    m.kernel = kind
    return True


def use_native(model) -> int:
    """native_form for every quantized linear layer of a CPU model, where the kernels build; how many took it."""
    from . import native
    from .parallel import _Linear

    layers = [m for m in model.modules() if isinstance(m, _Linear) and m.qweight is not None]
    if not layers or not native.available():
        return 0
    return sum(native_form(m) for m in layers)


def kernel_linear(x: torch.Tensor, m) -> torch.Tensor:
    """x @ W.T through the kernel `m` was put in form for (kernel_form, native_form)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if m.kernel in ("int4-native", "int8-native"):
        # the operators take any row count (past 32 rows they dequantize for a matrix product: csrc/products.h)
        if x.dtype != torch.float32:  # activations not fp32
            from .parallel import GEMV_MAX_ROWS

            return quantized_linear(x, m.qweight, m.qscale, m.qoffset, GEMV_MAX_ROWS)
        if m.kernel == "int4-native":
            y = torch.ops.llama_cli.int4_gemv(x2.contiguous(), m.qweight, m.qscale, m.qoffset)
        else:
            y = torch.ops.llama_cli.int8_gemv(x2.contiguous(), m.qweight, m.qscale)
    elif m.kernel in ("int4-triton", "int8-triton"):
        if x2.shape[0] > TRITON_ROWS:  # (prefill) the weight dequantized for a matrix product
            return quantized_linear(x, m.qweight, m.qscale, m.qoffset, 0)
        from .triton_gemv import int4_rows, int8_rows

        if m.kernel == "int4-triton":
            y = int4_rows(x2, m.qweight, m.qscale, m.qoffset)
        else:
            y = int8_rows(x2, m.qweight, m.qscale)
    elif m.kernel == "int4":
        y = torch.ops.aten._weight_int4pack_mm(x2.to(torch.bfloat16), m.qweight, m.kgroup, m.kscales)
    else:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(m.kscales.dtype), m.qweight, m.kgroup, m.kscales)
    return y.to(x.dtype).reshape(*shape[:-1], -1)


def dequantizing_layers(model) -> int:
    """How many quantized linear layers have no library kernel (their product dequantizes per call)."""
    from .parallel import _Linear

    return sum(m.qweight is not None and m.kernel is None for m in model.modules() if isinstance(m, _Linear))


def cuda_forms(rows: int, device: Optional[torch.device] = None) -> tuple[str, str]:
    """(int4's form, int8's) on CUDA for a model whose decode steps have at most `rows` rows: CUDA_INT4 and
    CUDA_INT8, "auto" being our Triton kernels up to TRITON_ROWS rows where Triton is installed and `device`
    is one they were built and timed for (triton_gemv.fits_device), past them (they would dequantize)
    tinygemm for int4 (any row count) and the compiled product for int8. Measured at the 7B
    shape on an H100, batch 1, CUDA graphs without compiling (docs/benchmarks.md, fifteenth session): int4
    groups of 32 346 tok/s on Triton against 206 on tinygemm (276 compiled), int8 248 against 38 dequantizing
    per step (234 compiled)."""
    from . import triton_gemv

    few = rows <= TRITON_ROWS and triton_gemv.available() and (device is None or triton_gemv.fits_device(device))
    int4 = CUDA_INT4 if CUDA_INT4 != "auto" else "triton" if few else "tinygemm"
    int8 = CUDA_INT8 if CUDA_INT8 != "auto" else "triton" if few else "compiled"
    return int4, int8


def triton_form(m, dtype: torch.dtype, int4: str, int8: str) -> bool:
    """Put a quantized linear layer `m` on CUDA in the form `int4` / `int8` (cuda_forms) ask for, other than
    tinygemm: int4 ("fused" or "triton") keeps our form, its tables in the activations' `dtype` (half of fp32's
    bytes; tinygemm's are bf16 too); "triton" marks the layers our kernels take (int4 groups a power of two of at
    least 32 columns; int8 one scale a row, in `dtype`) where Triton is installed. Returns whether it marked `m`."""
    if m.qoffset is not None:
        m.qscale, m.qoffset = m.qscale.to(dtype).contiguous(), m.qoffset.to(dtype).contiguous()
        half = m.qweight.shape[1] // m.qscale.shape[1]  # bytes a group
        fits, kind = int4 == "triton" and half >= 16 and half & (half - 1) == 0, "int4-triton"
    else:
        fits, kind = int8 == "triton" and m.qscale.shape[1] == 1, "int8-triton"
    if not fits:
        return False
    from . import triton_gemv

    if not triton_gemv.available():
        return False
    m.qweight, m.qscale, m.kernel = m.qweight.contiguous(), m.qscale.to(dtype).contiguous(), kind
    return True


def use_kernels(model, device: torch.device, dtype: torch.dtype = torch.bfloat16, rows: int = 1) -> int:
    """Put every quantized linear layer of a CUDA model whose decode steps have at most `rows` rows in the form
    its kernel takes (cuda_forms): int4 kernel_form (tinygemm) or triton_form (our kernels take every group size
    --group_size allows and GGUF's 32); returns how many took a kernel."""
    from .parallel import _Linear

    int4, int8 = cuda_forms(rows, device)
    return sum(kernel_form(m, device) if int4 == "tinygemm" and m.qoffset is not None else
               triton_form(m, dtype, int4, int8)
               for m in model.modules() if isinstance(m, _Linear) and m.qweight is not None)


def quantize_model(model, mode: str, group_size: int, tied: bool = False) -> int:
    """Replace every linear layer's weight (attention, feed-forward, output) by its quantized form and the
    token embeddings by embedding_form's, in place; a tied output layer (`tied`: the checkpoint has
    none of its own) takes the embeddings' form, sharing their tensors where its slice is the same.
    Returns the bytes the weights now take."""
    from .parallel import ColumnParallelLinear, RowParallelLinear

    emb = model.tok_embeddings
    layers = [m for m in model.modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear))]

    def split_rows(m):  # where each process holds some columns of every row: the row's parts are spread
        return m.mp if isinstance(m, RowParallelLinear) or m is emb else None

    group_size = pick_group(mode, group_size, [m.weight.shape[1] for m in layers if m.weight is not None],
                            emb.mp.world_size)
    model.quantized_as = (mode, group_size)
    total, seen = 0, set()

    def put(m, parts):
        nonlocal total
        m.set_quantized(*parts)
        for t in parts:
            if t is not None and id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()

    if emb.weight is not None:
        emb_form = embedding_form(emb.weight.shape[1])
        emb_parts = quantize(emb.weight.detach(), *emb_form, mp=split_rows(emb))
        if tied and model.output.weight is not None:
            same = model.output.weight.shape == emb.weight.shape
            put(model.output, emb_parts if same else quantize(model.output.weight.detach(), *emb_form))
        put(emb, emb_parts)
    for m in layers:
        if m.weight is not None:
            put(m, quantize(m.weight.detach(), mode, group_size, mp=split_rows(m)))
    return total


def attach_quantized(model, state: dict) -> dict:
    """Give the model's linear layers the quantized parts found in a loaded state dict
    ("X.weight.q", "X.weight.scale", "X.weight.offset"); returns the rest of the state dict."""
    rest = {}
    parts: dict = {}
    for name, t in state.items():
        for part in (".q", ".scale", ".offset"):
            if name.endswith(".weight" + part):
                parts.setdefault(name[:-len(".weight" + part)], {})[part] = t
                break
        else:
            rest[name] = t
    for base, p in parts.items():
        model.get_submodule(base).set_quantized(p[".q"], p[".scale"], p.get(".offset"))
    return rest
