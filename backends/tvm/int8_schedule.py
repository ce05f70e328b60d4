"""The int8 tensor-core schedule of a GEMM-shaped reduction, with its tile sizes and instruction as parameters.

The ``wmma`` form is dlight's ``MatmulInt8Tensorization`` (``tvm.s_tir.dlight.gpu.matmul``, Apache-2.0) step for
step, with two changes: no software-pipeline annotations (0.27's ``InjectSoftwarePipeline`` crashes on them in
``GetWmmaFragmentSize``), and the tile sizes, fixed there, come from a :class:`TileConfig`, so that the tuning
script (:mod:`qcompile.backends.tvm.tuning`) can try several per GEMM shape (:func:`gemm_key`). :data:`DEFAULT`
is dlight's: a 128x128 block tile of 4x4 warps with 2x2 16x16 fragments each, 16 of K per shared-memory stage,
4-byte copies.

The ``mma`` form keeps the same block and warp tiling but loads fragments with ``ldmatrix`` and multiplies with
``mma.sync.m16n8k32`` (TVM's own ``mma_*`` intrinsics, with shared-memory variants registered here), which
software-pipelines in 0.27: with ``stages`` > 1 the global -> shared copies of the next K steps are ``cp.async``
copies in flight while the current one multiplies (builds set ``tirx.use_async_copy``:
:data:`PASS_CONFIG`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

MICRO = 16  # the M and N of a fragment: wmma m16n16k16, two mma m16n8k32
MICRO_K = {"wmma": 16, "mma": 32}
FRAGMENT_SCOPES = {"wmma": ("wmma.matrix_a", "wmma.matrix_b", "wmma.accumulator"), "mma": ("warp",) * 3}
WARP = 32
PASS_CONFIG = {"tirx.use_async_copy": True}  # cp.async for pipelined copies; nothing else uses it


@dataclass(frozen=True)
class TileConfig:
    """Warps per block along M and N, 16x16 fragments per warp along M and N, K steps of the instruction (16
    wide for ``wmma``, 32 for ``mma``) per shared-memory stage, the vector width (bytes) of the global -> shared
    copies, the tensor-core instruction, and the shared-memory stages in flight (``mma`` only; 1: none)."""

    warps_m: int = 4
    warps_n: int = 4
    frags_m: int = 2
    frags_n: int = 2
    k_inner: int = 1
    vector: int = 4
    instruction: str = "wmma"
    stages: int = 1

    def __post_init__(self) -> None:
        if self.instruction not in MICRO_K or (self.instruction == "wmma" and self.stages != 1):
            raise ValueError(f"no tensor-core schedule for {self}: wmma (not pipelined in 0.27) or mma")

    @property
    def threads(self) -> int:
        return WARP * self.warps_m * self.warps_n

    def as_dict(self) -> dict[str, int | str]:
        return asdict(self)


DEFAULT = TileConfig()


def _main_block(sch: Any) -> Any:
    from tvm.s_tir.dlight.analysis import get_root_block
    from tvm.s_tir.dlight.gpu.matmul import get_reduction_blocks

    blocks = get_reduction_blocks(sch, sch.get_child_blocks(get_root_block(sch)))
    return None if blocks is None else blocks[0]


def gemm_key(func: Any) -> str | None:
    """What a schedule's speed depends on: the main reduction's iteration extents (spatial S, reduction R) and its
    two operands' shapes, e.g. ``S256x56x56x64.R1x1x256|256x56x56x256,64x1x1x256``; epilogues (requantize
    constants, residual adds) do not enter, so every layer of one conv shape shares a key. None if not a GEMM."""
    from tvm import s_tir, tirx

    sch = s_tir.Schedule(func)
    block = _main_block(sch)
    if block is None:
        return None
    stmt = sch.get(block)
    spatial = [int(iv.dom.extent) for iv in stmt.iter_vars if iv.iter_type == tirx.IterVar.DataPar]
    reduce = [int(iv.dom.extent) for iv in stmt.iter_vars if iv.iter_type == tirx.IterVar.CommReduce]
    operands = ",".join("x".join(str(int(d)) for d in r.source.shape) for r in stmt.reads[:2])
    return f"S{'x'.join(map(str, spatial))}.R{'x'.join(map(str, reduce))}|{operands}"


def schedule_int8_gemm(func: Any, config: TileConfig = DEFAULT) -> Any:
    """A traced ``s_tir.Schedule`` of ``func`` on int8 tensor cores, or None where the tensorization does not
    apply; may raise ``ScheduleError`` (e.g. strided convs, whose compute-at fails)."""
    from tvm import s_tir
    from tvm.s_tir.dlight.gpu.matmul import auto_inline_consumer_chain, auto_inline_producers, get_index_map

    sch = s_tir.Schedule(func)
    main_block = _main_block(sch)
    if main_block is None or "dlight.do_not_tensorize" in func.attrs.keys():
        return None
    micro_k = MICRO_K[config.instruction]
    i_factors = [None, 1, config.warps_m, config.frags_m]
    j_factors = [1, None, config.warps_n, config.frags_n]
    k_factors = [None, config.k_inner]
    num_ty = config.warps_m * config.warps_n

    # normalize to C[S, I, J] += A[S, I, K] * B[S, J, K], padded to whole block tiles
    reindex_a = sch.reindex(main_block, ("read", 0))
    reindex_b = sch.reindex(main_block, ("read", 1))
    reindex_c = sch.reindex(main_block, ("write", 0))
    index_maps = get_index_map(sch.get(main_block))
    if index_maps is None:
        return None
    matmul_index_map, a_index_map, b_index_map, c_index_map = index_maps
    sch.transform_layout(reindex_a, ("write", 0), a_index_map)
    sch.transform_layout(reindex_b, ("write", 0), b_index_map)
    sch.transform_layout(reindex_c, ("read", 0), c_index_map)
    sch.transform_block_layout(main_block, matmul_index_map)
    sch.pad_einsum(main_block, [1, MICRO * config.warps_m * config.frags_m, MICRO * config.warps_n * config.frags_n,
                                micro_k * config.k_inner])

    block = main_block
    batch, i, j, k = sch.get_loops(block)
    i, i_inner = sch.split(i, factors=[None, MICRO])
    j, j_inner = sch.split(j, factors=[None, MICRO])
    k, k_inner = sch.split(k, factors=[None, micro_k])
    sch.reorder(i, j, k, i_inner, j_inner, k_inner)
    block_inner = block
    block_outer = sch.blockize(i_inner)
    i0, i1, i2, i3 = sch.split(i, factors=i_factors)
    j0, j1, j2, j3 = sch.split(j, factors=j_factors)
    k0, k1 = sch.split(k, k_factors)
    sch.reorder(i0, j0, i1, j1, j2, i2, k0, k1, i3, j3)
    sch.bind(batch, "blockIdx.z")
    sch.bind(sch.fuse(i0, j0), "blockIdx.x")
    sch.bind(sch.fuse(i1, j1), "blockIdx.y")
    thread_idy = sch.fuse(j2, i2)
    sch.bind(thread_idy, "threadIdx.y")

    def fetch_to_shared(block: Any, idx: int) -> Any:
        block_read = sch.cache_read(block, idx, "shared.dyn")
        sch.compute_at(block_read, k0)
        fused = sch.fuse(*sch.get_loops(block_read)[-2:])
        _, f_1, f_2, f_3 = sch.split(fused, factors=[None, num_ty, WARP, config.vector])
        sch.bind(f_2, "threadIdx.x")
        sch.bind(f_1, "threadIdx.y")
        sch.vectorize(f_3)
        sch.storage_align(block_read, 0, axis=-2, factor=32, offset=16)
        if config.instruction == "wmma":
            sch.annotate(block_read, "tirx.manifest_shared_memory_local_stage", 1)
            sch.annotate(block_read, "double_buffer_scope", 0)
        return block_read

    a_g2s = fetch_to_shared(block_outer, 0)
    b_g2s = fetch_to_shared(block_outer, 1)
    auto_inline_producers(sch, a_g2s)
    auto_inline_producers(sch, b_g2s)

    # shared memory -> fragments; accumulator -> shared memory -> global memory through the epilogue
    fragment_scopes = FRAGMENT_SCOPES[config.instruction]
    a_mat = sch.cache_read(block_outer, 0, fragment_scopes[0])
    b_mat = sch.cache_read(block_outer, 1, fragment_scopes[1])
    sch.compute_at(a_mat, k1)
    sch.compute_at(b_mat, k1)
    accumulator_shared_to_global = sch.cache_write(block_outer, 0, "shared.dyn")
    sch.storage_align(accumulator_shared_to_global, 0, -2, 16, 4)
    store = sch.cache_write(block_outer, 0, fragment_scopes[2])
    sch.reverse_compute_at(store, thread_idy)
    sch.reverse_compute_at(accumulator_shared_to_global, thread_idy)
    i, j = sch.get_loops(store)[-2:]
    i0, i1 = sch.split(i, factors=[None, MICRO])
    j0, j1 = sch.split(j, factors=[None, MICRO])
    sch.reorder(i0, j0, i1, j1)
    block_init_c = sch.decompose_reduction(block_outer, k0)
    block_init_c_inner = sch.get_child_blocks(block_init_c)[0]

    tensorize = _tensorize_wmma if config.instruction == "wmma" else _tensorize_mma
    try:
        tensorize(sch, a_mat, b_mat, store, block_init_c_inner, block_inner)
    except Exception:  # noqa: BLE001 - dlight's rule gives up on any tensorize failure alike
        return None
    if config.stages > 1:  # copies of the next stages in flight (cp.async) while this one multiplies
        sch.annotate(k0, "software_pipeline_stage", [0, 0, config.stages - 1])
        sch.annotate(k0, "software_pipeline_order", [0, 1, 2])
        sch.annotate(k0, "software_pipeline_async_stages", [0])

    auto_inline_consumer_chain(sch, accumulator_shared_to_global)
    fused = sch.fuse(*sch.get_loops(accumulator_shared_to_global)[-2:])
    _, f1, f2 = sch.split(fused, factors=[None, WARP, config.vector])
    sch.bind(f1, "threadIdx.x")
    sch.vectorize(f2)
    return sch


def _tile_fragment(sch: Any, block: Any, height: int, width: int) -> Any:
    """Split a fragment load's two inner loops into tiles of ``height`` x ``width``: the loops over tiles, and
    the first loop within a tile (where a load intrinsic tensorizes)."""
    i, j = sch.get_loops(block)[-2:]
    i0, i1 = sch.split(i, factors=[None, height])
    j0, j1 = sch.split(j, factors=[None, width])
    sch.reorder(i0, j0, i1, j1)
    return i0, j0, i1


def _tensorize_wmma(sch: Any, a_mat: Any, b_mat: Any, store: Any, init: Any, compute: Any) -> None:
    from tvm.s_tir.tensor_intrin.cuda import get_wmma_intrin_group

    intrin_group = get_wmma_intrin_group(load_scope="shared.dyn", store_scope="shared.dyn", in_dtype="int8",
                                         out_dtype="int32", trans_b=True)
    for mat, load in ((a_mat, "load_a"), (b_mat, "load_b")):
        i0, j0, i1 = _tile_fragment(sch, mat, MICRO, MICRO)
        sch.unroll(i0)
        sch.unroll(j0)
        sch.tensorize(i1, intrin_group[load])
    sch.tensorize(sch.get_loops(init)[-2], intrin_group["init"])
    sch.tensorize(sch.get_loops(store)[-2], intrin_group["store"])
    sch.tensorize(sch.get_loops(compute)[-3], intrin_group["compute"])


def _tensorize_mma(sch: Any, a_mat: Any, b_mat: Any, store: Any, init: Any, compute: Any) -> None:
    """``ldmatrix`` into the per-thread layout ``mma.sync`` reads (TVM's index maps of its mma tests), the
    accumulator back through shared memory like wmma's."""
    from tvm.s_tir.tensor_intrin import cuda

    intrin = _mma_intrinsics()
    loads = [_tile_fragment(sch, mat, MICRO, MICRO_K["mma"])[2] for mat in (a_mat, b_mat)]

    def operand(*index: Any) -> tuple[Any, ...]:
        *lead, i, j = index
        return (*lead, i // MICRO, j // MICRO_K["mma"],
                *cuda.shared_16x32_to_ldmatrix_32x16_layout(i % MICRO, j % MICRO_K["mma"]))

    def accumulator(*index: Any) -> tuple[Any, ...]:
        *lead, i, j = index
        return (*lead, i // MICRO, j // MICRO, *cuda.shared_16x16_to_ldmatrix_32x8_layout(i % MICRO, j % MICRO))

    sch.transform_layout(a_mat, ("write", 0), operand)
    sch.transform_layout(b_mat, ("write", 0), operand)
    sch.transform_layout(store, ("read", 0), accumulator)
    sch.tensorize(loads[0], intrin["load_a"])
    sch.tensorize(loads[1], intrin["load_b"])
    sch.tensorize(sch.get_loops(compute)[-3], intrin["compute"])
    sch.tensorize(sch.get_loops(init)[-2], intrin["init"])
    sch.tensorize(sch.get_loops(store)[-2], intrin["store"])


def _mma_intrinsics() -> dict[str, str]:
    """TVM registers its int8 ``ldmatrix`` intrinsics for static shared memory only and its mma stores to global
    memory only; the schedule stages through dynamic shared memory (a 128x128 int32 accumulator tile is 64 KB,
    above the static limit), so those variants are registered here, once."""
    from tvm import s_tir
    from tvm.s_tir.tensor_intrin import cuda

    names = {"load_a": "qcompile_mma_ldmatrix_i8_a_dyn", "load_b": "qcompile_mma_ldmatrix_i8_b_trans_dyn",
             "store": "qcompile_mma_store_16x16_i32_shared_dyn"}
    if s_tir.TensorIntrin.get(names["store"], allow_missing=True) is None:
        s_tir.TensorIntrin.register(names["load_a"], *cuda.get_ldmatrix_intrin(32, "int8", "A", False, "shared.dyn"))
        s_tir.TensorIntrin.register(names["load_b"], *cuda.get_ldmatrix_intrin(32, "int8", "B", True, "shared.dyn"))
        s_tir.TensorIntrin.register(names["store"], *cuda.get_mma_store_intrin("int32", 8, "shared.dyn", False))
    return {**names, "compute": cuda.MMA_i8i8i32_TRANS_B_INTRIN, "init": cuda.MMA_fill_16x16_i32_INTRIN}
