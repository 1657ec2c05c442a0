"""Qwen3-MoE sparse block: fp32-softmax top-k router, dropless expert dispatch (sort-based with
`jax.lax.ragged_dot` for GPU, Pallas megablox grouped matmuls for TPU; tile-padded looped grouped matmul for
CPU), a dense einsum oracle, and HF's load-balancing loss statistics.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from agq_jax.models.config import Qwen3Config
from agq_jax.models.sharding import MESH_AXES, annotated_param, constrain, logical_to_pspec, target_platform


class RouterStats(NamedTuple):
    """Per-layer sums that HF's load_balancing_loss_func pools over all MoE layers before combining."""

    tokens_per_expert: jax.Array  # [E] top-k selections of valid tokens
    prob_per_expert: jax.Array  # [E] summed router probabilities of valid tokens
    rows: jax.Array  # [] number of valid tokens

    @staticmethod
    def zeros(num_experts: int) -> "RouterStats":
        z = jnp.zeros((num_experts,), jnp.float32)
        return RouterStats(z, z, jnp.zeros((), jnp.float32))

    def __add__(self, other):  # type: ignore[override]
        return RouterStats(*(a + b for a, b in zip(self, other)))


def route(x: jax.Array, router_w: jax.Array, top_k: int, norm_topk_prob: bool):
    """x [N,H], router_w [H,E] -> (probs fp32 [N,E], top weights [N,k] in x.dtype, top experts [N,k] int32)."""
    logits = x @ router_w.astype(x.dtype)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    top_w, top_i = jax.lax.top_k(probs, top_k)
    if norm_topk_prob:
        top_w = top_w / jnp.sum(top_w, axis=-1, keepdims=True)
    return probs, top_w.astype(x.dtype), top_i.astype(jnp.int32)


def router_stats(probs: jax.Array, top_i: jax.Array, valid: jax.Array) -> RouterStats:
    """Statistics of one layer; `valid` [N] masks padding as HF does with attention_mask."""
    num_experts = probs.shape[-1]
    v = valid.astype(jnp.float32)
    counts = jnp.sum(jax.nn.one_hot(top_i, num_experts, dtype=jnp.float32) * v[:, None, None], axis=(0, 1))
    return RouterStats(counts, jnp.sum(probs * v[:, None], axis=0), jnp.sum(v))


def load_balancing_loss(stats: RouterStats, num_experts: int) -> jax.Array:
    """HF `load_balancing_loss_func` from stats pooled over layers (not multiplied by the aux coefficient)."""
    rows = jnp.maximum(stats.rows, 1.0)
    return num_experts * jnp.sum((stats.tokens_per_expert / rows) * (stats.prob_per_expert / rows))


def tile_rows(pairs: int, num_experts: int) -> int:
    """Rows per tile of the CPU grouped matmul: a power of two near a quarter of the mean group size, at most 64.
    Measured on 2 CPU cores (E=16, k=4, 512x256 experts): smaller tiles waste less padding, larger ones pay
    less loop overhead; a quarter of the mean was fastest forward from 8 to 1,024 tokens, 64 forward+backward."""
    return min(64, 1 << max(0, pairs // (4 * num_experts) - 1).bit_length())


class PaddedLayout(NamedTuple):
    """Where each (token, expert) pair sits in a buffer whose expert groups start on tile boundaries."""

    dest: jax.Array  # [M] row of each pair
    tiles: jax.Array  # [G] tiles per group
    start: jax.Array  # [G] first row of each group
    rows: int  # static buffer length: every pair plus at most one partial tile per group


def padded_layout(flat_e: jax.Array, num_experts: int, tile: int) -> PaddedLayout:
    """Sort-free: a pair's rank inside its expert is a cumulative count of one-hot selections."""
    m = flat_e.shape[0]
    onehot = jax.nn.one_hot(flat_e, num_experts, dtype=jnp.int32)
    rank = jnp.take_along_axis(jnp.cumsum(onehot, 0), flat_e[:, None], 1)[:, 0] - 1
    tiles = (jnp.sum(onehot, 0) + tile - 1) // tile
    start = (jnp.cumsum(tiles) - tiles) * tile
    return PaddedLayout(start[flat_e] + rank, tiles, start, (-(-m // tile) + min(num_experts, m)) * tile)


def _hit_groups(tiles):
    hit = jnp.nonzero(tiles > 0, size=tiles.shape[0], fill_value=0)[0]
    return hit, jnp.sum(tiles > 0)


def _gmm_loop(buf, w, tiles, start, offset, tile, transpose_w):
    """out[rows of g] = buf[rows of g] @ w[offset + g] (or its transpose): a loop over the groups that hold rows,
    and inside it over their tiles. w[offset + g] is copied once per group (XLA:CPU copies a dynamic slice
    before a dot); empty groups and trailing empty tiles cost nothing."""
    hit, n_hit = _hit_groups(tiles)
    dims = (((1,), (1,)), ((), ())) if transpose_w else (((1,), (0,)), ((), ()))
    n_out = w.shape[1] if transpose_w else w.shape[2]

    def group(i, out):
        g = hit[i]
        w_g = w[offset + g]

        def one_tile(j, out):
            r = start[g] + j * tile
            y = jax.lax.dot_general(jax.lax.dynamic_slice_in_dim(buf, r, tile), w_g, dims,
                                    preferred_element_type=jnp.float32)
            return jax.lax.dynamic_update_slice_in_dim(out, y.astype(out.dtype), r, 0)
        return jax.lax.fori_loop(0, tiles[g], one_tile, out)
    return jax.lax.fori_loop(0, n_hit, group, jnp.zeros((buf.shape[0], n_out), buf.dtype))


def _tgmm_loop(buf, dy, tiles, start, offset, tile, num_groups):
    """dw[offset + g] = sum over g's tiles of buf_tile.T @ dy_tile (fp32 accumulation); zero elsewhere."""
    hit, n_hit = _hit_groups(tiles)
    k, n = buf.shape[1], dy.shape[1]

    def group(i, dw):
        g = hit[i]

        def one_tile(j, acc):
            r = start[g] + j * tile
            return acc + jax.lax.dot_general(jax.lax.dynamic_slice_in_dim(buf, r, tile),
                                             jax.lax.dynamic_slice_in_dim(dy, r, tile),
                                             (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        acc = jax.lax.fori_loop(0, tiles[g], one_tile, jnp.zeros((k, n), jnp.float32))
        return jax.lax.dynamic_update_index_in_dim(dw, acc.astype(dw.dtype), offset + g, 0)
    return jax.lax.fori_loop(0, n_hit, group, jnp.zeros((num_groups, k, n), buf.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def grouped_matmul_padded(buf: jax.Array, w: jax.Array, tiles: jax.Array, start: jax.Array, offset: jax.Array,
                          tile: int):
    """CPU grouped matmul over a `padded_layout` buffer [P,K] and w [>= offset+G, K, N] -> [P,N] (padding rows
    stay 0); group g uses w[offset + g] (offset selects one layer of stacked experts, see SparseMoeBlock).
    XLA:CPU lowers `jax.lax.ragged_dot` densely (tens of times slower than its flops); this loops over the
    real tiles only. The loops have data-dependent trip counts, so the backward pass (dx = same loop on w.T,
    dw = per-group sum of tile outer products) is written out rather than derived."""
    return _gmm_loop(buf, w, tiles, start, offset, tile, False)


def _gmm_fwd(buf, w, tiles, start, offset, tile):
    return _gmm_loop(buf, w, tiles, start, offset, tile, False), (buf, w, tiles, start, offset)


def _gmm_bwd(tile, res, dy):
    buf, w, tiles, start, offset = res
    dx = _gmm_loop(dy, w, tiles, start, offset, tile, True)
    dw = _tgmm_loop(buf, dy, tiles, start, offset, tile, w.shape[0]).astype(w.dtype)
    return dx, dw, None, None, None


grouped_matmul_padded.defvjp(_gmm_fwd, _gmm_bwd)


def _mlp_loop(buf, w_gate, w_up, w_down, tiles, start, offset, tile):
    """SwiGLU of each tile through its expert's three matrices in one loop over groups and tiles: a third of
    the loop steps and no [P, I] gate / up buffers (measured on 2 cores: block 62 -> 43 ms at 1,024 tokens)."""
    hit, n_hit = _hit_groups(tiles)
    dims = (((1,), (0,)), ((), ()))
    dt = buf.dtype

    def group(i, out):
        e = offset + hit[i]
        wg, wu, wd = w_gate[e], w_up[e], w_down[e]

        def one_tile(j, out):
            r = start[hit[i]] + j * tile
            x = jax.lax.dynamic_slice_in_dim(buf, r, tile)
            gate = jax.lax.dot_general(x, wg, dims, preferred_element_type=jnp.float32).astype(dt)
            up = jax.lax.dot_general(x, wu, dims, preferred_element_type=jnp.float32).astype(dt)
            y = jax.lax.dot_general(jax.nn.silu(gate) * up, wd, dims, preferred_element_type=jnp.float32)
            return jax.lax.dynamic_update_slice_in_dim(out, y.astype(dt), r, 0)
        return jax.lax.fori_loop(0, tiles[hit[i]], one_tile, out)
    return jax.lax.fori_loop(0, n_hit, group, jnp.zeros((buf.shape[0], w_down.shape[2]), dt))


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def grouped_mlp_padded(buf, w_gate, w_up, w_down, tiles, start, offset, tile: int):
    """silu(buf @ w_gate) * (buf @ w_up) @ w_down per group, as three `grouped_matmul_padded` calls compute it
    (same values), fused into one loop for inference. Under differentiation the forward is the three separate
    loops, whose gate / up outputs the backward needs anyway, and the backward is theirs."""
    return _mlp_loop(buf, w_gate, w_up, w_down, tiles, start, offset, tile)


def _mlp_fwd(buf, w_gate, w_up, w_down, tiles, start, offset, tile):
    gate = _gmm_loop(buf, w_gate, tiles, start, offset, tile, False)
    up = _gmm_loop(buf, w_up, tiles, start, offset, tile, False)
    out = _gmm_loop(jax.nn.silu(gate) * up, w_down, tiles, start, offset, tile, False)
    return out, (buf, w_gate, w_up, w_down, gate, up, tiles, start, offset)


def _mlp_bwd(tile, res, dy):
    buf, w_gate, w_up, w_down, gate, up, tiles, start, offset = res
    h, act_vjp = jax.vjp(lambda g, u: jax.nn.silu(g) * u, gate, up)
    dh, dw_down = _gmm_bwd(tile, (h, w_down, tiles, start, offset), dy)[:2]
    dgate, dup = act_vjp(dh)
    dx_g, dw_gate = _gmm_bwd(tile, (buf, w_gate, tiles, start, offset), dgate)[:2]
    dx_u, dw_up = _gmm_bwd(tile, (buf, w_up, tiles, start, offset), dup)[:2]
    return dx_g + dx_u, dw_gate, dw_up, dw_down, None, None, None


grouped_mlp_padded.defvjp(_mlp_fwd, _mlp_bwd)


def experts_ragged(x, top_i, top_w, w_gate, w_up, w_down):
    """Dropless sort-based dispatch with `jax.lax.ragged_dot` (grouped-GEMM kernels on GPU / TPU): sort
    (token, expert) pairs by expert, grouped SwiGLU matmuls, unsort, weighted sum."""
    n, k = top_i.shape
    flat_e = top_i.reshape(-1)
    order = jnp.argsort(flat_e, stable=True)
    xs = jnp.take(x, order // k, axis=0)
    group_sizes = jnp.bincount(flat_e, length=w_gate.shape[0]).astype(jnp.int32)
    dt = x.dtype
    gate = jax.lax.ragged_dot(xs, w_gate.astype(dt), group_sizes)
    up = jax.lax.ragged_dot(xs, w_up.astype(dt), group_sizes)
    out = jax.lax.ragged_dot(jax.nn.silu(gate) * up, w_down.astype(dt), group_sizes)
    out = jnp.take(out, jnp.argsort(order), axis=0).reshape(n, k, -1)
    return jnp.sum(out * top_w[..., None].astype(dt), axis=1)


# Megablox tiles: rows (pairs) x contracted x output dims. Large tiles amortise the per-step overhead of the
# grid; Mosaic needs each tile to be a multiple of 128 or the whole dim (the pair dim is padded to its tile).
GMM_TILE_M, GMM_TILE_K, GMM_TILE_N = 512, 1024, 1024


def _gmm_tiling(m: int, k: int, n: int) -> tuple[int, int, int]:
    """Tiles per call: megablox asks this for each of its three matmuls (forward, dx, dW), whose k and n are
    the forward's dims swapped, so a fixed tuple could not fit them all."""
    return min(GMM_TILE_M, m), min(GMM_TILE_K, k), min(GMM_TILE_N, n)


def _experts_megablox_local(x, top_i, top_w, w_gate, w_up, w_down, *, num_experts: int, expert_axis, reduce_axes,
                            gather_axis, interpret: bool):
    """One device's part of `experts_megablox`: its tokens, its experts [E_local, ...] and FFN slice. With
    `gather_axis` (the tokens are split over the expert axis too) the expert group's tokens are gathered first
    and each device keeps its own rows of the summed output."""
    from jax.experimental.pallas.ops.tpu.megablox import ops as megablox

    if gather_axis is not None:
        x, top_i, top_w = (jax.lax.all_gather(a, gather_axis, tiled=True) for a in (x, top_i, top_w))
    n, k = top_i.shape
    flat_e = top_i.reshape(-1)
    order = jnp.argsort(flat_e, stable=True)
    group_sizes = jnp.bincount(flat_e, length=num_experts).astype(jnp.int32)
    m = n * k
    tm = min(GMM_TILE_M, -(-m // 128) * 128)
    pad = -m % tm
    xs = x.at[order // k].get(mode="promise_in_bounds")  # in bounds by construction: no bounds select
    if pad:  # zero rows in the last group: they add nothing to outputs or weight gradients
        xs = jnp.pad(xs, ((0, pad), (0, 0)))
        group_sizes = group_sizes.at[-1].add(pad)
    offset = None
    if expert_axis is not None:
        offset = (jax.lax.axis_index(expert_axis) * w_gate.shape[0]).astype(jnp.int32)

    def gmm(lhs, w):
        return megablox.gmm(lhs, w, group_sizes, lhs.dtype, _gmm_tiling, offset, None, False, interpret)

    # gate and up as one matmul: the pairs are read once forward, and the backward makes one dx and one dW
    # pass over them instead of two plus a sum
    gate, up = jnp.split(gmm(xs, jnp.concatenate([w_gate, w_up], axis=-1)), 2, axis=-1)
    out = gmm(jax.nn.silu(gate) * up, w_down)[:m]
    out = out.at[jnp.argsort(order)].get(mode="promise_in_bounds", unique_indices=True).reshape(n, k, -1)
    y = jnp.sum(out * top_w[..., None].astype(out.dtype), axis=1)
    if gather_axis is not None:
        y = jax.lax.psum_scatter(y, gather_axis, scatter_dimension=0, tiled=True)
        reduce_axes = tuple(a for a in reduce_axes if a != gather_axis)
    return jax.lax.psum(y, reduce_axes) if reduce_axes else y


def experts_megablox(x, top_i, top_w, w_gate, w_up, w_down, batch_rows: int | None = None):
    """Dropless sort-based dispatch on Pallas megablox grouped matmuls (TPU). Unlike `jax.lax.ragged_dot`,
    whose transpose w.r.t. the expert weights XLA:TPU computes against every expert under a mask, megablox's
    custom VJP runs a grouped transposed matmul (`tgmm`) for dW and `gmm` on w.T for dx, so the backward pass
    does the forward's grouped FLOPs twice, no more.

    A Pallas call is opaque to GSPMD, so under a mesh it runs in `shard_map`: tokens split like the batch
    (`batch_rows` rows of x form one sequence each, x is [batch_rows * T, H]), each device holds its expert
    shard (group_offset) whole over fsdp and sliced over tensor on the FFN dim, and the partial outputs are
    summed over tensor / expert after the weighted combine ([tokens, H], k times smaller than the pairs).
    When the batch is split over the expert axis as well (expert parallelism, `sharding.DEFAULT_RULES`), the
    expert group's tokens are all-gathered before the dispatch and the sum is a reduce-scatter back to them.
    Off TPU the kernels run in Pallas interpret mode (tests)."""
    num_experts = w_gate.shape[0]
    dt = x.dtype
    w_gate, w_up, w_down = (w.astype(dt) for w in (w_gate, w_up, w_down))
    interpret = target_platform() != "tpu"
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names):
        return _experts_megablox_local(x, top_i, top_w, w_gate, w_up, w_down, num_experts=num_experts,
                                       expert_axis=None, reduce_axes=(), gather_axis=None, interpret=interpret)
    rows = batch_rows or x.shape[0]
    batch_spec = logical_to_pspec(("batch",), (rows,), mesh)[0]
    ffn = logical_to_pspec(("expert", None, "moe_mlp"), w_gate.shape, mesh)
    expert_ax, tensor_ax = ffn[0], ffn[2]
    tok = P(batch_spec, None)
    w_in, w_out = P(expert_ax, None, tensor_ax), P(expert_ax, tensor_ax, None)
    reduce_axes = tuple(a for spec in (tensor_ax, expert_ax) if spec is not None
                        for a in ((spec,) if isinstance(spec, str) else spec))
    if isinstance(expert_ax, tuple):
        raise ValueError(f"experts sharded over several mesh axes {expert_ax}: one expert axis expected")
    batch_axes = (batch_spec,) if isinstance(batch_spec, str) else tuple(batch_spec or ())
    gather = expert_ax if expert_ax is not None and expert_ax in batch_axes else None
    local = functools.partial(_experts_megablox_local, num_experts=num_experts, expert_axis=expert_ax,
                              reduce_axes=reduce_axes, gather_axis=gather, interpret=interpret)
    return jax.shard_map(local, mesh=mesh, in_specs=(tok, tok, tok, w_in, w_in, w_out), out_specs=tok,
                         check_vma=False)(x, top_i, top_w, w_gate, w_up, w_down)


def experts_tiled(x, top_i, top_w, w_gate, w_up, w_down, offset=0, num_experts: int | None = None,
                  tile: int | None = None):
    """Dropless dispatch for CPU: pairs scattered into a tile-padded buffer (no sort), a looped grouped SwiGLU
    over it (`grouped_mlp_padded`), gathered back, weighted sum; a decode step of a few tokens reads only the
    experts it selected. With `offset` / `num_experts` the weights hold several layers' experts ([L*E, ...]) and expert
    e of this layer is w[offset + e] (inference inside the layer scan, see `LayerStack`)."""
    n, k = top_i.shape
    num_experts = num_experts or w_gate.shape[0]
    offset = jnp.asarray(offset, jnp.int32)
    tile = tile or tile_rows(n * k, num_experts)
    lay = padded_layout(top_i.reshape(-1), num_experts, tile)
    dt = x.dtype
    buf = jnp.zeros((lay.rows, x.shape[1]), dt).at[lay.dest].set(jnp.repeat(x, k, axis=0), unique_indices=True)
    out = grouped_mlp_padded(buf, w_gate.astype(dt), w_up.astype(dt), w_down.astype(dt), lay.tiles, lay.start,
                             offset, tile)
    out = jnp.take(out, lay.dest, axis=0).reshape(n, k, -1)
    return jnp.sum(out * top_w[..., None].astype(dt), axis=1)


def experts_dense(x, top_i, top_w, w_gate, w_up, w_down):
    """Oracle: every expert on every token, combined with a dense [N,E] weight matrix (test reference)."""
    n = x.shape[0]
    dt = x.dtype
    h = jax.nn.silu(jnp.einsum("nh,ehi->eni", x, w_gate.astype(dt))) * jnp.einsum("nh,ehi->eni", x, w_up.astype(dt))
    y = jnp.einsum("eni,eih->enh", h, w_down.astype(dt))
    combine = jnp.zeros((n, w_gate.shape[0]), dt).at[jnp.arange(n)[:, None], top_i].add(top_w.astype(dt))
    return jnp.einsum("enh,ne->nh", y, combine)


EXPERT_IMPLS = {"ragged": experts_ragged, "tiled": experts_tiled, "megablox": experts_megablox,
                "dense": experts_dense}


EXPERT_PARAMS = ("experts_gate_proj", "experts_up_proj", "experts_down_proj")


def resolve_moe_impl(impl: str, backend: str | None = None) -> str:
    """"auto": the looped CPU kernel ("tiled") on CPU, where XLA lowers ragged_dot densely; megablox on TPU
    (XLA:TPU's ragged_dot weight gradient is dense over all experts); "ragged" on GPU."""
    if impl != "auto":
        return impl
    return {"cpu": "tiled", "tpu": "megablox"}.get(backend or target_platform(), "ragged")


class SparseMoeBlock(nnx.Module):
    """Router + stacked experts [E, ...] (sharded over the `expert` mesh axis)."""

    def __init__(self, cfg: Qwen3Config, *, rngs: nnx.Rngs, dtype, param_dtype, stack: int | None = None):
        h, i, e = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts
        init = nnx.initializers.normal(cfg.initializer_range)
        self.gate = annotated_param(init, rngs, (h, e), ("embed", "router"), param_dtype, stack)
        self.experts_gate_proj = annotated_param(init, rngs, (e, h, i), ("expert", "embed", "moe_mlp"), param_dtype, stack)
        self.experts_up_proj = annotated_param(init, rngs, (e, h, i), ("expert", "embed", "moe_mlp"), param_dtype, stack)
        self.experts_down_proj = annotated_param(init, rngs, (e, i, h), ("expert", "moe_mlp", "embed"), param_dtype, stack)
        self.top_k = cfg.num_experts_per_tok
        self.norm_topk_prob = cfg.norm_topk_prob
        self.impl = cfg.moe_impl
        self.dtype = dtype

    def __call__(self, x: jax.Array, valid: jax.Array, stacked_layer=None) -> tuple[jax.Array, RouterStats]:
        """`stacked_layer`: the expert params hold every layer of the scan ([L, E, ...]) and this is the layer
        to use (tiled impl only; see `LayerStack`)."""
        b, t, h = x.shape
        flat = x.reshape(b * t, h)
        probs, top_w, top_i = route(flat, self.gate[...], self.top_k, self.norm_topk_prob)
        experts = [p[...] for p in (self.experts_gate_proj, self.experts_up_proj, self.experts_down_proj)]
        num_experts = experts[0].shape[-3]
        kw = {}
        if stacked_layer is not None:
            experts = [w.reshape(-1, *w.shape[2:]) for w in experts]  # [L*E, ...]: free, contiguous
            kw = dict(offset=stacked_layer * num_experts, num_experts=num_experts)
        impl = resolve_moe_impl(self.impl)
        if impl == "megablox":
            kw = dict(batch_rows=b)
        y = EXPERT_IMPLS[impl](flat, top_i, top_w, *experts, **kw)
        y = constrain(y.reshape(b, t, h), ("batch", "seq", "act_embed"))
        return y, router_stats(probs, top_i, valid.reshape(-1))
