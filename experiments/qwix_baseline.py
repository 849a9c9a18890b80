"""qwix (Google's JAX quantization library, PyPI ``qwix==0.1.8``) as a PTQ baseline.

``qwix_ptq(module, variables, calib_batches, w_bits=..., a_bits=..., static=...)`` returns
``(apply, notes)``: ``apply(*inputs, **kwargs)`` runs the qwix-quantized Flax Linen model
and ``notes`` lists every choice or limitation that a reader of a comparison should know
(what was quantized, what was left in float and why, how the static scales were made).

What qwix does here (read from qwix 0.1.8's source, ``qwix/_src``):

* One ``QuantizationRule`` with ``module_path='.*'`` matches every op qwix intercepts in
  every module: ``jax.lax.dot_general`` (every ``nn.Dense``: q/k/v/out, MLP, head),
  ``jax.numpy.einsum`` (the attention matmuls q·kᵀ and attn·V, both operands
  activations) and ``jax.lax.conv_general_dilated`` (the ViT patch embedding). Embedding
  lookups, norms, softmax and activation functions stay in float: qwix has no quantizer
  for them.
* Weights: symmetric ``absmax``, one scale per output channel (all non-contracting axes
  of the weight), quantized once by ``qwix.quantize_params``.
* Activations, ``static=False`` (qwix's dynamic-range quantization, its XLA default):
  symmetric ``absmax`` recomputed on every call, one scale per row of every
  non-contracting axis, i.e. per token (per token and head for attention operands).
* Activations, ``static=True`` (qwix's SRQ): rules with ``act_static_scale=True``. For
  ``nn.Dense`` inputs the model is run under ``qwix.QtProvider`` on each calibration
  batch with the ``quant_stats`` collection mutable (QAT-style: later layers see the
  fake-quantized outputs of earlier ones), then ``qwix.quantize_params(params,
  abstract_ptq_params, quant_stats)`` turns the stats into fixed scales. For the
  attention einsums and the conv the scales come from qwix ``PtqProvider``'s own static
  calibration (the scale it computes from a batch when no quant_stat exists), averaged
  over the calibration batches, because QtProvider's stats are wrong or fail there (see
  below). qwix reduces a static statistic over ``act_batch_axes`` by a *mean* and
  averages it over batches (``SimpleMovingAverage``), so a static scale is the mean of
  per-row absmax values, not their maximum: larger activations are clipped.
  ``static_granularity`` picks ``act_batch_axes``:

  - ``"qwix_default"`` (default): qwix's ``act_batch_axes=(0,)``, the mean over the
    batch only, so one scale per token position (per position and head for attention
    operands). The scales are tied to the calibration sequence length: ``apply`` raises
    for another length.
  - ``"per_tensor"``: the mean over every non-contracting axis, one scale per tensor
    (attn·V's V operand: per head-dim channel), valid for any sequence length (BERT or
    LLaMA batches of varying length). The mean over tokens and heads clips far more:
    on the trained Fashion-MNIST ViT W8A8 top-1 drops to ~76% against ~87% with
    ``"qwix_default"`` (float 88%).

Integer types: qwix accepts ``int8``/``int4`` (native JAX dtypes) and the synthetic
``int2``, ``int3``, ``int5``, ``int6``, ``int7`` (values clipped to ``[-2^(b-1),
2^(b-1)-1]``, stored in an int8 or int4 container, symmetric ``absmax``-type calibration
only; ``minmax`` is ``int8``/``int4`` only). So W4A4, W6A6 and W8A8 all exist; see
:func:`supported_bits`. qwix's symmetric bound is ``qmax + 0.5`` (127.5 for int8): the
absmax value rounds to ``qmax + 1`` and is saturated to ``qmax`` by the int cast (CPU).

qwix 0.1.8 problems met here, worked around, each recorded in ``notes``:

* ``PtqProvider.conv_general_dilated`` raises unless ``act_qtype == weight_qtype``, so
  the patch-embedding conv is left in float when ``w_bits != a_bits`` (or weight-only).
* XLA CPU cannot compile qwix's ``s4 x s4 -> s32`` integer dot or conv ("does not
  support custom element sizes on non-sub-byte types"): on CPU int4-container qvalues
  are widened to int8 right before the matmul/conv (values and scales unchanged).
* ``QtProvider`` names an einsum's operands after the ``dot_general`` that
  ``jnp.einsum`` emits, which swaps them for attn·V ``'bhqk,bkhd->bqhd'``: the stats of
  the attention probabilities land on V's scale and vice versa: a
  ``ScopeParamShapeError`` with qwix's default ``act_batch_axes`` (the failure
  docs/reference_numbers.md, "Peer library: qwix", records for Flax
  ``MultiHeadDotProductAttention``, whose attn·V einsum
  ``'...hqk,...khd->...qhd'`` is swapped the same way), silent with per-tensor scales.
* ``QtProvider``'s ``conv_general_qt`` updates ``quant_stats`` inside a ``custom_vjp``
  and leaks a tracer (``UnexpectedTracerError``).
* Any other failure whose traceback names ``einsum`` or ``conv_general`` is retried with
  that op family left in float, and recorded; other failures are raised.

This module measures nothing; run it as a script for a quick smoke print on random
models (``python experiments/qwix_baseline.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import re
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["qwix_ptq", "supported_bits", "qwix_qtype", "UnsupportedBitsError"]

#: The (w_bits, a_bits) combinations this project compares at.
BIT_COMBOS = ((4, 4), (6, 6), (8, 8))

_OPS_DENSE = ("dot_general",)
_OPS_ATTN = ("einsum",)
_OPS_CONV = ("conv_general_dilated",)
# act_batch_axes per op family for per-tensor static scales (see module docstring):
# nn.Dense inputs are [batch, (tokens,) features] -> mean over (0, 1); attention einsum
# operands are 4-D -> mean over (0, 1, 2), leaving only a non-contracted last axis (V's
# head-dim channels in attn·V); conv lhs has only its batch axis channelwise -> (0,).
_PER_TENSOR_BATCH_AXES = {"dense": (0, 1), "attn": (0, 1, 2), "conv": (0,)}


class UnsupportedBitsError(ValueError):
    """The requested bit width has no qwix integer qtype."""


def qwix_qtype(bits: int) -> str:
    """The qwix qtype name for a signed ``bits``-bit integer, checked against qwix itself.

    Raises:
        UnsupportedBitsError: if qwix 0.1.8 has no such integer type.
    """
    from qwix._src.core import numerics

    if not isinstance(bits, int) or isinstance(bits, bool):
        raise UnsupportedBitsError(f"bits must be an int, got {bits!r}")
    name = f"int{bits}"
    if bits < 2:
        raise UnsupportedBitsError(f"a signed integer needs at least 2 bits, got {bits}")
    try:
        bound = numerics.get_symmetric_bound(name)
        probe = numerics.convert_to(jnp.array([bound, -bound], jnp.float32), name)
    except (TypeError, ValueError) as e:
        raise UnsupportedBitsError(f"qwix has no {bits}-bit integer qtype ({name!r}): {e}") from e
    # The range ends must land on the b-bit integer range (rejects e.g. 'uint8').
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if (int(probe[0]), int(probe[1])) != (hi, lo):
        raise UnsupportedBitsError(f"qwix has no usable {bits}-bit integer qtype ({name!r})")
    return name


def supported_bits() -> dict[tuple[int, int], bool]:
    """Which of W4A4, W6A6, W8A8 qwix supports: ``{(w_bits, a_bits): bool}``.

    Decided by asking qwix's own numerics for each qtype (no hard-coded answer).
    """
    out = {}
    for w, a in BIT_COMBOS:
        try:
            qwix_qtype(w), qwix_qtype(a)
            out[(w, a)] = True
        except UnsupportedBitsError:
            out[(w, a)] = False
    return out


def _rules(rule_cls, w_qtype, a_qtype, static_families, granularity, exclude, act_calibration_method):
    """One rule per op family not in ``exclude``; those in ``static_families`` get static scales."""
    families = {"dense": _OPS_DENSE, "attn": _OPS_ATTN, "conv": _OPS_CONV}
    rules = []
    for fam, ops in families.items():
        if fam in exclude:
            continue
        kw: dict[str, Any] = dict(module_path=".*", op_names=ops, weight_qtype=w_qtype, act_qtype=a_qtype)
        if a_qtype is not None:
            kw["act_calibration_method"] = act_calibration_method
            kw["act_static_scale"] = fam in static_families
            if fam in static_families and granularity == "per_tensor":
                kw["act_batch_axes"] = _PER_TENSOR_BATCH_AXES[fam]
        rules.append(rule_cls(**kw))
    return rules


def qwix_ptq(
    module: nn.Module,
    variables: Any,
    calib_batches: Sequence[tuple],
    *,
    w_bits: int,
    a_bits: int | None,
    static: bool,
    static_granularity: str = "qwix_default",
    act_calibration_method: str = "absmax",
    quantize_attention: bool = True,
    jit: bool = True,
) -> tuple[Callable[..., jax.Array], list[str]]:
    """qwix PTQ of a Flax Linen model; returns ``(apply, notes)``.

    Args:
        module: the float Linen module (unbound), e.g. ``VisionTransformer(cfg)``.
        variables: its variables (``{"params": ...}``); other collections are ignored.
        calib_batches: positional-input tuples, e.g. ``[(images,), ...]`` or
            ``[(ids, mask), ...]``. The first one also builds the quantized param tree.
            Used for calibration only when ``static``.
        w_bits: weight bits (qwix qtype ``f"int{w_bits}"``), per output channel.
        a_bits: activation bits, or ``None`` for weight-only quantization.
        static: static-range (SRQ, calibrated on ``calib_batches``) or dynamic-range
            (per-token absmax at run time) activation quantization.
        static_granularity: ``"qwix_default"`` (qwix's ``act_batch_axes=(0,)``: one
            scale per token position; inputs must have the calibration sequence length)
            or ``"per_tensor"`` (any length, clips more); see the module docstring.
        act_calibration_method: qwix activation calibration (``"absmax"``, qwix's XLA
            default; ``"minmax"`` is asymmetric and only exists for int8/int4).
        quantize_attention: also quantize the two attention einsums (q·kᵀ, attn·V) with
            ``a_bits``; on by default as RepQuant quantizes them too.
        jit: compile ``apply`` (and the calibration passes) with ``jax.jit``; eager is
            quicker for a single call on a tiny model.

    Returns:
        ``apply(*inputs, **kwargs)`` → model outputs, and a list of notes.

    Raises:
        UnsupportedBitsError: for bit widths with no qwix integer qtype.
        ValueError: for an inconsistent request (static without activations, no batches).
    """
    import qwix

    w_qtype = qwix_qtype(w_bits)
    a_qtype = None if a_bits is None else qwix_qtype(a_bits)
    if static and a_qtype is None:
        raise ValueError("static=True needs a_bits: qwix's static scales are for activations")
    if static_granularity not in ("per_tensor", "qwix_default"):
        raise ValueError(f"static_granularity must be 'per_tensor' or 'qwix_default', got {static_granularity!r}")
    if not calib_batches:
        raise ValueError("calib_batches is empty; at least one input tuple is needed to trace the model")
    calib_batches = [tuple(b) if isinstance(b, (tuple, list)) else (b,) for b in calib_batches]
    # quantize_params wants a pure dict of jax.Array (numpy leaves from checkpoints are not).
    params = jax.tree.map(jnp.asarray, flax.core.unfreeze(variables)["params"])

    notes: list[str] = [
        f"qwix {qwix.__version__}: W{w_bits}A{a_bits if a_bits is not None else '-'} "
        f"({'static' if static else 'dynamic' if a_bits else 'weight-only'}); weights {w_qtype} symmetric absmax "
        "per output channel",
    ]
    if a_qtype is not None:
        notes.append(
            f"activations {a_qtype} symmetric {act_calibration_method}, "
            + (
                f"static scales from {len(calib_batches)} batch(es), {static_granularity} "
                + (
                    "(act_batch_axes=(0,): per token position, fixed sequence length) "
                    if static_granularity == "qwix_default"
                    else "(one scale per tensor, any sequence length) "
                )
                + "= mean of per-row absmax averaged over batches, not the max: clips"
                if static
                else "dynamic per-token (per row of every non-contracting axis)"
            )
        )
    notes.append(
        "float: embeddings/position embeddings, norms, softmax, activation functions, residual adds (qwix has "
        "no quantizer for them)"
    )
    exclude: set[str] = set()
    if not quantize_attention:
        exclude.add("attn")
        notes.append("attention einsums (q·kᵀ, attn·V) left in float by request")
    if a_qtype != w_qtype:
        exclude.add("conv")
        notes.append(
            "convs (if any: ViT patch embedding) left in float: qwix PtqProvider.conv_general_dilated requires "
            f"act_qtype == weight_qtype (got {a_qtype} vs {w_qtype})"
        )
    elif a_qtype is not None:
        notes.append("convs (if any: ViT patch embedding) quantized per image (activation) / output channel (weight)")

    if static and a_qtype is not None:
        notes.append(
            "static scales of nn.Dense inputs: qwix's SRQ path (QtProvider quant_stats over the calibration "
            "batches -> quantize_params)"
        )
        fams = [f for f in ("attn", "conv") if f not in exclude]
        if fams:
            notes.append(
                f"static scales of {'/'.join(fams)} inputs: qwix PtqProvider's own static calibration (the scale "
                "it computes from a batch when no quant_stat exists), averaged over the calibration batches, "
                "NOT QtProvider stats, because of two qwix 0.1.8 bugs: (1) QtProvider names an einsum's "
                "operands after the dot_general that jnp.einsum emits, which swaps them for attn·V "
                "'bhqk,bkhd->bqhd' (attn's stats would become V's scale and vice versa: silent with per-tensor "
                "scales, a shape error with qwix's default act_batch_axes); (2) QtProvider's conv_general_qt "
                "updates quant_stats inside a custom_vjp and leaks a tracer (UnexpectedTracerError)"
            )

    # When a build fails, narrow the rules and retry; the failing op family is read from
    # the error (its message and traceback name the qwix op):
    #   * an s4 matmul the backend rejects -> widen int4 containers (values unchanged);
    #   * a failure naming conv_general / einsum -> that family is left float;
    #   * any other failure is raised.
    widen = False
    if jax.default_backend() == "cpu" and any(q in _SUB_BYTE for q in (w_qtype, a_qtype)):
        # Known: XLA CPU rejects qwix's s4 x s4 -> s32 dot and conv ("does not support custom
        # element sizes on non-sub-byte types"); skip the failing compile.
        widen = True
        notes.append(
            "int4-container qvalues widened to int8 just before qwix's integer matmul/conv (values and "
            "scales unchanged): XLA CPU cannot run qwix's native s4 x s4 -> s32 dot or conv"
        )
    for _ in range(4):
        try:
            apply, unused = _build(
                qwix,
                module,
                params,
                calib_batches,
                w_qtype,
                a_qtype,
                static,
                static_granularity,
                frozenset(exclude),
                act_calibration_method,
                jit,
                widen,
            )
            break
        except Exception as e:  # noqa: BLE001 - a qwix failure triggers a narrower rule set
            step = _narrowing(e, widen, exclude, (w_qtype, a_qtype))
            if step is None:
                raise
            msg = f"{type(e).__name__}: {str(e).splitlines()[0][:240]}"
            if step == "widen":
                widen = True
                notes.append(
                    "int4-container qvalues widened to int8 just before qwix's integer matmul/conv (values and "
                    f"scales unchanged) because the native s4 matmul failed on {jax.default_backend()}: {msg}"
                )
            else:
                exclude.add(step)
                notes.append(f"{step} ops excluded (left float) after qwix failed with them: {msg}")
    else:
        raise RuntimeError("qwix_ptq: no working rule set found")
    if unused:
        notes.append(f"rules that matched no op (model has no such op): {[tuple(r.op_names) for r in unused]}")
    return apply, notes


def _narrowing(e, widen, exclude, qtypes) -> str | None:
    """The next narrowing step for build failure ``e`` (see `qwix_ptq`), or None."""
    text = "".join(traceback.format_exception(e))
    if not widen and any(q in _SUB_BYTE for q in qtypes) and re.search(r"custom element sizes|\bs4\[", text):
        return "widen"
    if "conv_general" in text and "conv" not in exclude:
        return "conv"
    if "einsum" in text and "attn" not in exclude:
        return "attn"
    return None  # not attributable to an op family that can be left float: re-raise


#: qwix qtypes whose qvalues are stored in a jnp.int4 container.
_SUB_BYTE = ("int2", "int3", "int4")


@contextlib.contextmanager
def _widened_sub_byte():
    """Within the block, qwix's integer matmul and conv see int4-container qvalues as int8.

    qwix's ``_fast_dot_general`` / ``_fast_conv_general_dilated`` multiply the integer
    qvalues with an int32 accumulator; XLA's CPU backend rejects that for ``s4``
    operands. The cast keeps every value (and the logical ``qtype``), so results are
    those qwix would compute on a backend with s4 dots and convs.
    """
    from qwix._src.core import conv_general as qcg
    from qwix._src.core import dot_general as qdg
    from qwix._src.core import qarray

    def widen(x):
        if isinstance(x, qarray.QArray) and x.qvalue.dtype == jnp.int4:
            zp = None if x.zero_point is None else x.zero_point.astype(jnp.int8)
            return dataclasses.replace(x, qvalue=x.qvalue.astype(jnp.int8), zero_point=zp)
        return x

    def widened(fn):
        return lambda lhs, rhs, *args, **kwargs: fn(widen(lhs), widen(rhs), *args, **kwargs)

    orig_dot, orig_conv = qdg._fast_dot_general, qcg._fast_conv_general_dilated
    qdg._fast_dot_general, qcg._fast_conv_general_dilated = widened(orig_dot), widened(orig_conv)
    try:
        yield
    finally:
        qdg._fast_dot_general, qcg._fast_conv_general_dilated = orig_dot, orig_conv


def _build(qwix, module, params, calib_batches, w_qtype, a_qtype, static, granularity, exclude, act_cal, jit, widen):
    ctx = _widened_sub_byte if widen else contextlib.nullcontext
    key = jax.random.key(0)
    first = calib_batches[0]
    quant_stats: Any = flax.core.FrozenDict()
    if static:
        # qwix SRQ, step 1: run the calibration (QT) model with quant_stats mutable. Only
        # nn.Dense inputs collect stats here (see the notes on the qwix bugs); attention and
        # conv are fake-quantized with dynamic scales during this pass.
        qt_rules = _rules(qwix.QtRule, w_qtype, a_qtype, {"dense"}, granularity, exclude, act_cal)
        qt_model = qwix.quantize_model(module, qwix.QtProvider(qt_rules))
        stats: Any = {}

        def calib_step(stats, batch):
            _, new = qt_model.apply({"params": params, "quant_stats": stats}, *batch, mutable=["quant_stats"])
            return new["quant_stats"]

        calib_step = jax.jit(calib_step) if jit else calib_step
        with ctx():
            for batch in calib_batches:
                stats = calib_step(stats, batch)
        quant_stats = flax.core.unfreeze(stats)

    static_fams = {"dense", "attn", "conv"} if static else set()
    ptq_rules = _rules(qwix.QuantizationRule, w_qtype, a_qtype, static_fams, granularity, exclude, act_cal)
    provider = qwix.PtqProvider(ptq_rules)
    ptq_model = qwix.quantize_model(module, provider)
    abstract = jax.eval_shape(lambda: ptq_model.init(key, *first))["params"]
    unused = provider.get_unused_rules()
    # qwix SRQ, step 2 (PTQ weights for every mode): quantize the float params and turn the
    # quant_stats into scales.
    qparams = qwix.quantize_params(params, abstract, quant_stats)

    flat_abs = flax.traverse_util.flatten_dict(flax.core.unfreeze(abstract))
    flat_q = flax.traverse_util.flatten_dict(flax.core.unfreeze(qparams))
    missing = [p for p in flat_abs if p not in flat_q]
    if missing:
        # Activation scales without quant_stats (attention / conv inputs): let the PTQ model
        # create them from each calibration batch (qwix's quantize_act init path) and average.
        def created(qp, batch):
            _, new = ptq_model.apply({"params": qp}, *batch, mutable=["params"], rngs={"params": key})
            flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(new["params"]))
            return {"/".join(p): _unwrap(flat[p]).astype(jnp.float32) for p in missing}

        created = jax.jit(created) if jit else created

        sums: dict[str, jax.Array] = {}
        with ctx():
            for batch in calib_batches:
                for k, v in created(qparams, batch).items():
                    sums[k] = sums[k] + v if k in sums else v
        for p in missing:
            mean = sums["/".join(p)] / len(calib_batches)
            leaf = flat_abs[p]
            if hasattr(leaf, "how"):  # WithAux scale
                flat_q[p] = leaf.replace(array=mean.astype(leaf.array.dtype))
            else:  # zero point (minmax): averaged, then rounded back to its integer dtype
                flat_q[p] = jnp.round(mean).astype(leaf.dtype)
        qparams = flax.traverse_util.unflatten_dict(flat_q)

    def run(qparams, *inputs, **kwargs):
        return ptq_model.apply({"params": qparams}, *inputs, **kwargs)

    compiled: dict = {}

    def apply(*inputs, **kwargs):
        # Keyword arguments (e.g. BERT's ``pooled``) are static: one compiled function each.
        kw_key = tuple(sorted(kwargs.items()))
        if kw_key not in compiled:
            fn = functools.partial(run, **kwargs)
            compiled[kw_key] = jax.jit(fn) if jit else fn
        with ctx():  # a new input shape retraces, so the patch must be live at every call
            try:
                return compiled[kw_key](qparams, *inputs)
            except flax.errors.ScopeParamShapeError as e:
                if static and granularity == "qwix_default":
                    raise ValueError(
                        "static scales from static_granularity='qwix_default' are per token position and "
                        "need inputs of the calibration sequence length; use static_granularity='per_tensor' "
                        f"for other lengths ({e})"
                    ) from e
                raise

    # Run once on the first batch so that a failing site raises here (and triggers a fallback).
    jax.block_until_ready(apply(*first))
    return apply, unused


def _unwrap(leaf):
    arr = getattr(leaf, "array", leaf)
    return nn.unbox(arr)


def _smoke() -> None:
    import sys
    import time

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    from repquant_zoo.models import vit

    cfg = vit.get_config("vit_tiny_fashion_mnist_p7")
    model = vit.VisionTransformer(cfg)
    x = jax.random.normal(jax.random.key(1), (8, 28, 28, 1))
    variables = model.init(jax.random.key(0), x)
    ref = model.apply(variables, x)
    print("supported:", supported_bits())
    for w, a in BIT_COMBOS:
        for static in (False, True):
            t = time.time()
            apply, notes = qwix_ptq(model, variables, [(x,)], w_bits=w, a_bits=a, static=static)
            err = float(jnp.linalg.norm(apply(x) - ref) / jnp.linalg.norm(ref))
            print(f"W{w}A{a} static={static}: rel L2 {err:.4f} ({time.time() - t:.1f}s)")
    print("\n".join(notes))


if __name__ == "__main__":
    _smoke()
