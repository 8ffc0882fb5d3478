"""Fixes to TVM 0.27's Relax ONNX converters for the shape arithmetic transformer exporters write.

Each class below subclasses TVM's converter for one op and handles the pattern TVM gets wrong,
deferring to TVM for everything else, so each can be sent upstream as a patch to
tvm/relax/frontend/onnx/onnx_frontend.py. `convert_map()` is TVM's op -> converter map with these
swapped in; frontends/onnx_import.py uses it only during our import (TVM's module is not patched).

Why each is needed (what real exports contain):

- Range(0, dim, 1) with dim a symbolic shape value (position ids, causal masks): TVM computes the
  length at run time and binds it to a fresh var ("range_len_0"), so every tensor broadcast against
  it (x + pos_emb[range]) loses its shape, and a later Reshape(-1) / Expand / Shape->Slice fails.
  Fix: integer start/delta known at import time and a scalar limit -> relax.op.arange, whose length
  (limit - start) ceildiv delta stays symbolic in terms of the input dims.
- ConstantOfShape fed an empty shape tensor (a 0-d result, TorchScript exporter): TVM broadcasts
  the 1-element `value` tensor to the empty shape, which broadcast_to rejects (ndim 1 -> 0).
  Fix: the value attribute is a scalar (the spec says a 1-element tensor), used as such.
- Expand of a tensor whose shape the importer does not know (only its rank): TVM iterates the
  unknown shape ("'NoneType' object is not iterable"). Fix: broadcast_to the target when no target
  dim is the literal 1 (then the output shape is the target, checked at run time), else the ONNX
  broadcast rule at run time (data * ones(target)), which keeps the rank.
- Slice / Gather / Unsqueeze / Squeeze / Concat on the result of Shape of a tensor whose dims are
  not known at import time (an R.Shape(ndim=k) value, not a ShapeExpr): TVM's converters only take
  ShapeExpr or tensors. Fix: materialize the shape as an int64 tensor first (shape_to_tensor).
- Unsqueeze of a rank-1 shape value (decode graphs with past key/values build [batch, heads, past +
  seq, dim] this way): a ShapeExpr is not a tensor, so unsqueezing it to [1, n] goes via a tensor.
- Reshape to a shape computed at run time (an int64 tensor, TorchScript exports), or with -1 / 0 of
  a tensor whose shape is unknown (only its rank): relax.reshape takes neither. Fix: compute the
  target at run time from the input's runtime shape (0 -> copy, -1 -> numel / product of the
  others) and reshape to that shape tensor (tensor_to_shape); the importer (frontends/onnx_import.py)
  then gives the result dims from ONNX shape inference.
- Reshape of a symbolic scalar (a dim computed from Shape -> Squeeze -> Add, which TVM holds as a
  TIR expression, not a tensor) to [1] or [-1]: the dynamo exporter writes this for past + seq in
  decode graphs (Llama's mask and KV expand targets), then Concats it into a shape. TVM passed the
  expression to relax.reshape ("Reshape expects the input data to be a Tensor"). Fix: the result is
  the one-element shape value [expr], as TVM's Unsqueeze(axis 0) makes it, so the Concat stays a
  ShapeExpr; a reshape to [] is the scalar itself.
- Reshape with -1 of a tensor whose dims are known, where a dim is a sum (past + seq in decode
  graphs): TVM solves -1 as numel // product(other dims), and its arithmetic cannot cancel a sum,
  so the dim stays b * (p + s) * 32 // (p * 8 + s * 8); the LLVM build then fails lowering that
  division in the buffer shapes ("Binding of variable rmod ... conflicts"). Fix: match each other
  target dim with an equal input dim and take the product of the input dims left over (b * 4).
"""
from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, tirx
from tvm.relax.frontend.onnx import onnx_frontend as _tvm

_INT = ("int32", "int64")


def _const_int(x):
    """A Python int if x is an integer scalar known at import time (constant or IntImm), else None."""
    if isinstance(x, tvm.ir.GenericConst):
        v = x.value.numpy()
        if v.size == 1 and v.dtype.kind in "iu":
            return int(v.reshape(()))
    if isinstance(x, tirx.IntImm):
        return int(x.value)
    return None


def _is_shape_value(x) -> bool:
    """An R.Shape-typed expression that is not a literal ShapeExpr (e.g. shape_of(t), dims unknown)."""
    return (isinstance(x, relax.Expr) and not isinstance(x, relax.ShapeExpr)
            and isinstance(getattr(x, "ty", None), relax.ShapeType))


def _as_tensor(bb, x):
    """Shape values (ShapeExpr or R.Shape vars) -> 1-D int64 tensors; other exprs unchanged."""
    if isinstance(x, relax.ShapeExpr) or _is_shape_value(x):
        return bb.normalize(relax.op.shape_to_tensor(x))
    return x


def _data_as_tensor(bb, inputs, literal_shapes: bool = False):
    """`inputs` with input 0 turned into a 1-D int64 tensor when it is a shape value whose dims are
    unknown (and, with literal_shapes, a literal ShapeExpr too): TVM's converters expect tensors there."""
    x = inputs[0]
    if _is_shape_value(x) or (literal_shapes and isinstance(x, relax.ShapeExpr)):
        return _tvm.onnx_input([_as_tensor(bb, x)] + list(inputs[1:]))
    return inputs


def _shape_known(x) -> bool:
    ty = getattr(x, "ty", None)
    return isinstance(ty, relax.TensorType) and ty.shape is not None


class Range(_tvm.Range):
    """Range(start, limit, delta) with a symbolic scalar limit keeps a symbolic output length."""

    @classmethod
    def _impl_v12(cls, bb, inputs, attr, params):
        start, limit, delta = (_tvm.get_constant(i, params) for i in inputs[:3])
        s, d = _const_int(start), _const_int(delta)
        if s is not None and d is not None and d > 0 and tvm.ir.is_prim_expr(limit) \
                and str(limit.ty) in _INT and not isinstance(limit, tirx.IntImm):
            dtype = str(start.ty.dtype)
            lim = limit if str(limit.ty) == "int64" else tirx.Cast("int64", limit)
            out = relax.op.arange(relax.prim_value(tirx.const(s, "int64")), relax.prim_value(lim),
                                  relax.prim_value(tirx.const(d, "int64")), "int64")
            return out if dtype == "int64" else relax.op.astype(out, dtype)
        return super()._impl_v12(bb, inputs, attr, params)


class ConstantOfShape(_tvm.ConstantOfShape):
    """ConstantOfShape whose `value` is a 1-element tensor, also for an empty (0-d) target shape."""

    @classmethod
    def _impl_v9(cls, bb, inputs, attr, params):
        shape = _tvm.get_constant(inputs[0], params)
        value = attr.get("value")
        arr = _tvm.get_numpy(value) if value is not None else np.zeros((1,), "float32")
        scalar = arr.reshape(())  # the spec: a one-element tensor
        dtype = str(arr.dtype)
        if isinstance(shape, tvm.ir.GenericConst):
            dims = [int(v) for v in shape.value.numpy().reshape(-1)]
            return relax.const(np.full(dims, scalar, dtype), dtype)
        if isinstance(shape, relax.ShapeExpr) and len(shape.values) == 0:
            return relax.const(np.asarray(scalar, dtype), dtype)
        if not isinstance(shape, relax.ShapeExpr) and not _is_shape_value(shape):
            shape = bb.normalize(relax.op.tensor_to_shape(shape))
        return relax.op.broadcast_to(relax.const(scalar, dtype), shape)


class Expand(_tvm.Expand):
    """Expand of a tensor of unknown dims: ONNX broadcasting done by multiplying with ones(target)."""

    @classmethod
    def _impl_v13(cls, bb, inputs, attr, params):
        data, shape = inputs[0], _tvm.get_constant(inputs[1], params)
        if _shape_known(data) and not _is_shape_value(shape):
            return super()._impl_v13(bb, inputs, attr, params)
        if isinstance(shape, tvm.ir.GenericConst):
            shape = relax.ShapeExpr([int(v) for v in shape.value.numpy().reshape(-1)])
        elif not isinstance(shape, relax.ShapeExpr) and not _is_shape_value(shape):
            shape = bb.normalize(relax.op.tensor_to_shape(shape))
        if isinstance(shape, relax.ShapeExpr) and all(_const_int(d) is None or _const_int(d) > 1
                                                       for d in shape.values):
            # no target dim can keep a larger input dim: output shape = target (checked at run time)
            return relax.op.broadcast_to(data, shape)
        dtype = str(data.ty.dtype)
        ones = bb.normalize(relax.op.broadcast_to(relax.const(1, dtype), shape))
        if dtype == "bool":
            return relax.op.logical_and(data, ones)
        return relax.op.multiply(data, ones)


class Slice(_tvm.Slice):
    """Slice of a shape value whose dims are unknown at import time goes through an int64 tensor."""

    @classmethod
    def _impl_v13(cls, bb, inputs, attr, params):
        return super()._impl_v13(bb, _data_as_tensor(bb, inputs), attr, params)


class Gather(_tvm.Gather):
    """Gather from a shape value whose dims are unknown at import time goes through an int64 tensor."""

    @classmethod
    def _impl_v13(cls, bb, inputs, attr, params):
        return super()._impl_v13(bb, _data_as_tensor(bb, inputs), attr, params)


class Unsqueeze(_tvm.Unsqueeze):
    """Unsqueeze of a shape value (ShapeExpr or R.Shape) unsqueezes it as a 1-D int64 tensor."""

    @classmethod
    def _impl_v13(cls, bb, inputs, attr, params):
        return super()._impl_v13(bb, _data_as_tensor(bb, inputs, literal_shapes=True), attr, params)


class Squeeze(_tvm.Squeeze):
    """Squeeze of an R.Shape value of unknown dims goes through an int64 tensor."""

    @classmethod
    def _impl_v13(cls, bb, inputs, attr, params):
        return super()._impl_v13(bb, _data_as_tensor(bb, inputs), attr, params)


class Concat(_tvm.Concat):
    """Concat mixing shape values (ShapeExpr or R.Shape) with int64 tensors concatenates tensors.

    TVM keeps an all-shape-like Concat (ShapeExprs and 1-D int64 constants) as a ShapeExpr, which
    stays; any other mix reached relax.concat with ShapeExpr fields, which it rejects.
    """

    @classmethod
    def _impl_v13(cls, bb, inputs, attr, params):
        def shape_like(x):
            if isinstance(x, relax.ShapeExpr):
                return True
            if isinstance(x, relax.Var) and x.name in params[1]:
                x = _tvm.get_constant(x, params)
            return (isinstance(x, tvm.ir.GenericConst) and x.ty.ndim == 1
                    and str(x.ty.dtype) == "int64")

        mixed = any(isinstance(i, relax.ShapeExpr) for i in inputs) and not all(shape_like(i) for i in inputs)
        if mixed or any(_is_shape_value(i) for i in inputs):
            inputs = _tvm.onnx_input([_as_tensor(bb, i) for i in inputs])
        return super()._impl_v13(bb, inputs, attr, params)


def _symbolic_scalar(x):
    """x as an int64 expression if it is a symbolic (not literal) integer scalar, else None."""
    if not tvm.ir.is_prim_expr(x) or isinstance(x, tirx.IntImm) or str(x.ty) not in _INT:
        return None
    return x if str(x.ty) == "int64" else tirx.Cast("int64", x)


def _static_target(new_shape) -> list | None:
    """The entries of a reshape target known at import time (ints or PrimExprs), else None."""
    if isinstance(new_shape, tvm.ir.GenericConst):
        return [int(v) for v in new_shape.value.numpy().reshape(-1)]
    if isinstance(new_shape, relax.ShapeExpr):
        return [_const_int(v) if _const_int(v) is not None else v for v in new_shape.values]
    return None


def _fill_by_cancelling(in_dims, target):
    """target with its 0 entries copied from in_dims and its -1 solved by cancelling equal dims:
    each other target dim is matched with an equal input dim, the -1 is the product of the input dims
    left over (integers divided exactly). None where that does not work out."""
    target = [in_dims[i] if isinstance(d, int) and d == 0 and i < len(in_dims) else d
              for i, d in enumerate(target)]
    if sum(isinstance(d, int) and d == -1 for d in target) != 1:
        return None
    ana = tvm.sym.Analyzer()
    left = list(in_dims)
    int_rest = 1
    for d in target:
        if isinstance(d, int) and d == -1:
            continue
        match = next((j for j, x in enumerate(left) if ana.can_prove_equal(x, d)), None)
        if match is not None:
            left.pop(match)
        elif isinstance(d, int) and d > 0:
            int_rest *= d
        else:
            return None
    int_left = int(np.prod([int(x) for x in left if isinstance(x, tirx.IntImm)], dtype=np.int64))
    if int_left % int_rest:
        return None
    fill = tirx.const(int_left // int_rest, "int64")
    for x in left:
        if not isinstance(x, tirx.IntImm):
            fill = fill * x
    return [ana.simplify(fill) if isinstance(d, int) and d == -1 else d for d in target]


class Reshape(_tvm.Reshape):
    """Reshape with 0 / -1 entries of a tensor whose dims are unknown: the target computed at run time.
    Reshape with -1 of a tensor whose dims are known: -1 solved by cancelling equal dims.
    Reshape of a symbolic scalar to one element: a one-element shape value."""

    @classmethod
    def _impl_v13(cls, bb, inputs, attr, params):
        data, new_shape = inputs[0], _tvm.get_constant(inputs[1], params)
        target = _static_target(new_shape)
        scalar = _symbolic_scalar(data)
        if scalar is not None and target is not None and all(isinstance(d, int) for d in target):
            if target in ([1], [-1]):
                return relax.ShapeExpr([scalar])
            if not target:
                return data
        if (target is not None and not attr.get("allowzero", 0) and _shape_known(data)
                and isinstance(data.ty.shape, relax.ShapeExpr) and not isinstance(data, tvm.ir.GenericConst)):
            dims = _fill_by_cancelling(list(data.ty.shape.values), target)
            if dims is not None:
                return relax.op.reshape(data, relax.ShapeExpr(dims))
        plain = (isinstance(data, relax.Expr) and isinstance(getattr(data, "ty", None), relax.TensorType)
                 and not isinstance(data, tvm.ir.GenericConst) and data.ty.ndim >= 0)
        static_target = isinstance(new_shape, (tvm.ir.GenericConst, relax.ShapeExpr))
        if not plain or attr.get("allowzero", 0) or (static_target and _shape_known(data)):
            return super()._impl_v13(bb, inputs, attr, params)
        if isinstance(new_shape, relax.ShapeExpr):
            if not any(_const_int(v) in (0, -1) for v in new_shape.values):
                return relax.op.reshape(data, new_shape)
            new_shape = _as_tensor(bb, new_shape)
        if isinstance(new_shape, tvm.ir.GenericConst):
            target = [int(v) for v in new_shape.value.numpy().reshape(-1)]
            if 0 not in target and -1 not in target:
                return relax.op.reshape(data, target)
        new_shape = _as_tensor(bb, new_shape)
        rank = _tvm._get_known_tensor_length(new_shape)
        if rank is None:
            return super()._impl_v13(bb, inputs, attr, params)
        new_shape = bb.normalize(relax.op.astype(new_shape, "int64"))
        in_shape = bb.normalize(relax.op.shape_to_tensor(bb.normalize(relax.op.shape_of(data))))
        in_rank = data.ty.ndim
        # 0 copies the input dim at the same position (positions past the input rank never hold 0)
        if in_rank >= rank:
            same_pos = relax.op.strided_slice(in_shape, [0], [0], [rank])
        else:
            pad = relax.op.full((rank - in_rank,), relax.const(1, "int64"), "int64")
            same_pos = relax.op.concat([in_shape, pad], axis=0)
        zero, neg = relax.const(0, "int64"), relax.const(-1, "int64")
        dims = bb.normalize(relax.op.where(relax.op.equal(new_shape, zero), same_pos, new_shape))
        # -1 takes numel / product of the other dims
        known = bb.normalize(relax.op.where(relax.op.equal(dims, neg), relax.const(1, "int64"), dims))
        numel = relax.op.prod(in_shape, keepdims=True)
        fill = bb.normalize(relax.op.floor_divide(numel, relax.op.prod(known, keepdims=True)))
        dims = bb.normalize(relax.op.where(relax.op.equal(dims, neg), fill, dims))
        return relax.op.reshape(data, bb.normalize(relax.op.tensor_to_shape(dims)))


OVERRIDES = {c.__name__: c for c in (Range, ConstantOfShape, Expand, Slice, Gather, Unsqueeze, Squeeze,
                                     Concat, Reshape)}


def convert_map() -> dict:
    """TVM's ONNX op -> converter map with nibble's fixed converters in place of TVM's."""
    return {**_tvm._get_convert_map(), **OVERRIDES}
