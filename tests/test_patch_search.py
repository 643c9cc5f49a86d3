"""Stage 2: the faiss engine's chunked exact kNN equals a float64 oracle for any chunking and
kappa; the dense engine equals brute force with the exact distance bit for bit, whatever its
GEMM rounds; the pruned engine equals brute force with the same exact distance, bit for bit, on seeded
and adversarial data, with consistent pruning statistics."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from spade_faiss import patch_search
from spade_faiss.patch_search import bounds, brute, dense, exact, pruned, window
from spade_faiss.resample import concat_levels


def oracle_knn_mean(q, g, kappa):
    d = torch.cdist(torch.from_numpy(q).double(), torch.from_numpy(g).double()) ** 2
    return d.topk(kappa, dim=1, largest=False).values.mean(1).numpy()


@pytest.mark.parametrize("kappa", [1, 3])
@pytest.mark.parametrize("chunk_bytes", [1, 4000, 10**9])
def test_knn_mean_equals_brute_force(rng, kappa, chunk_bytes):
    galleries = [rng.standard_normal((rng.integers(5, 40), 16)).astype(np.float32) for _ in range(7)]
    q = rng.standard_normal((50, 16)).astype(np.float32)
    got = patch_search.knn_mean(q, patch_search.iter_chunks(galleries, chunk_bytes), kappa)
    np.testing.assert_allclose(got, oracle_knn_mean(q, np.concatenate(galleries), kappa), rtol=1e-4)


def test_kappa_larger_than_every_chunk(rng):
    galleries = [rng.standard_normal((2, 4)).astype(np.float32) for _ in range(5)]
    q = rng.standard_normal((6, 4)).astype(np.float32)
    got = patch_search.knn_mean(q, patch_search.iter_chunks(galleries, 1), 7)
    np.testing.assert_allclose(got, oracle_knn_mean(q, np.concatenate(galleries), 7), rtol=1e-4)
    with pytest.raises(ValueError, match="kappa=11 needs at least 11"):
        patch_search.knn_mean(q, patch_search.iter_chunks(galleries, 1), 11)


def test_chunks_respect_the_byte_bound_and_cast(rng):
    galleries = [rng.standard_normal((3, 3, 8)).astype(np.float16) for _ in range(10)]
    chunks = list(patch_search.iter_chunks(galleries, 9 * 8 * 4 * 3))
    assert [c.shape[0] for c in chunks] == [27, 27, 27, 9]
    assert all(c.dtype == np.float32 for c in chunks)
    np.testing.assert_array_equal(np.concatenate(chunks), np.concatenate([g.reshape(-1, 8) for g in galleries]))


def test_level_maps_shape_and_zero_on_self(rng):
    g = [rng.standard_normal((4, 5, 8)).astype(np.float32) for _ in range(3)]
    maps = patch_search.level_maps(np.stack([g[1], g[2]]), g, kappa=1)
    assert maps.shape == (2, 4, 5)
    np.testing.assert_allclose(maps, 0, atol=1e-4)


def test_concat_levels_equals_torch_interpolate(rng):
    l1 = rng.standard_normal((2, 8, 8, 3)).astype(np.float32)
    l2 = rng.standard_normal((2, 4, 4, 5)).astype(np.float32)
    got = concat_levels([l1, l2])
    up = F.interpolate(torch.from_numpy(l2).permute(0, 3, 1, 2), size=(8, 8), mode="bilinear", align_corners=False)
    want = np.concatenate([l1, up.permute(0, 2, 3, 1).numpy()], axis=-1)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_devices():
    assert patch_search.resolve_search_device("cpu") == "cpu"
    with pytest.raises(ValueError, match="device='tpu'"):
        patch_search.resolve_search_device("tpu")
    if not patch_search.gpu_available():
        assert patch_search.resolve_search_device("auto") == "cpu"
        with pytest.raises(ValueError, match="faiss-gpu"):
            patch_search.resolve_search_device("cuda")


def test_out_of_memory_splits_the_chunk_and_stays_exact(rng, monkeypatch):
    # Stand-in for a GPU (or RAM) allocation failure above a size, around the real faiss search.
    real = brute._knn

    def small_memory(q, g, k, device):
        if g.shape[0] > 30:
            raise RuntimeError("Error in virtual void* faiss::gpu::StandardGpuResourcesImpl: cudaMalloc: out of memory")
        return real(q, g, k, device)
    monkeypatch.setattr(brute, "_knn", small_memory)
    galleries = [rng.standard_normal((50, 8)).astype(np.float32) for _ in range(3)]
    q = rng.standard_normal((20, 8)).astype(np.float32)
    for kappa in (1, 4):
        got = patch_search.knn_mean(q, patch_search.iter_chunks(galleries, 10**9), kappa)
        np.testing.assert_allclose(got, oracle_knn_mean(q, np.concatenate(galleries), kappa), rtol=1e-4)
    monkeypatch.setattr(brute, "_knn", lambda *a: (_ for _ in ()).throw(RuntimeError("other failure")))
    with pytest.raises(RuntimeError, match="other failure"):
        patch_search.knn_mean(q, patch_search.iter_chunks(galleries, 10**9), 1)


# --- the pruned engine: bitwise equal to brute force with the same exact distance -------------

def brute_with_exact(query, gallery, kappa):
    """Brute force over every pair with the exact distance of exact.py: the pruned engine's
    contract, bit for bit (mean of the kappa smallest; nearest with ties to the lowest image,
    then the lowest position)."""
    b, h, w, c = query.shape
    flat = torch.from_numpy(np.concatenate([g.reshape(-1, c) for g in gallery]).astype(np.float32))
    owner = np.concatenate([np.full(g.shape[0] * g.shape[1], i) for i, g in enumerate(gallery)])
    pos = np.concatenate([np.arange(g.shape[0] * g.shape[1]) for g in gallery])
    q = torch.from_numpy(query.reshape(-1, c))
    d = exact.squared_distances(q[:, None, :], flat[None, :, :]).numpy()
    order = np.lexsort((np.arange(d.shape[1])[None, :].repeat(len(d), 0), d), axis=1)
    means = np.take_along_axis(d, order[:, :kappa], 1).astype(np.float64).mean(1).astype(np.float32)
    first = order[:, 0]
    return means.reshape(b, h, w), np.stack([owner[first], pos[first]], -1).reshape(b, h, w, 2), d


def run_pruned(query, gallery, kappa, dims=None, dtype=torch.bfloat16):
    c = query.shape[-1]
    proj = pruned.Projection.fit(np.concatenate([g.reshape(-1, c) for g in gallery]), dims or min(c, 9))
    prepared = [pruned.prepare_image(proj, g, dtype) for g in gallery]
    stats = pruned.SearchStats()
    dist, nearest = pruned.search(query, prepared, kappa, proj, stats)
    return dist, nearest, stats


@pytest.fixture(params=[torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def operand(request):
    return request.param


@pytest.fixture
def small_steps(monkeypatch):
    """Several row blocks, several GEMM chunks, a partial last chunk and padded blocks, and
    blocks whose recomputed bounds take several products (more queries than a group)."""
    monkeypatch.setattr(pruned, "ROWS", 8)
    monkeypatch.setattr(pruned, "GROUP", 3)
    monkeypatch.setattr(pruned, "CHUNK_BYTES", 1)  # one probed group per GEMM call:
    monkeypatch.setattr(pruned, "GROUP_BLOCKS", 4)  # 64 columns


@pytest.mark.parametrize("kappa", [1, 3])
@pytest.mark.parametrize("seed", range(4))
def test_pruned_equals_brute_force_bitwise(rng, operand, small_steps, kappa, seed):
    rng = np.random.default_rng(seed)
    c = int(rng.integers(4, 70))
    h, w = int(rng.integers(1, 7)), int(rng.integers(1, 7))
    gallery = [rng.standard_normal((int(rng.integers(1, 8)), int(rng.integers(1, 8)), c)).astype(np.float32)
               for _ in range(int(rng.integers(1, 6)))]
    query = rng.standard_normal((2, h, w, c)).astype(np.float32)
    query[1, 0, 0] = gallery[-1][0, 0]  # a query equal to a gallery vector: distance 0
    source = len(gallery) - 1
    if sum(g.shape[0] * g.shape[1] for g in gallery) < kappa:
        gallery.append(rng.standard_normal((2, 2, c)).astype(np.float32))
    dist, nearest, _ = run_pruned(query, gallery, kappa, dtype=operand)
    want, want_nearest, d = brute_with_exact(query, gallery, kappa)
    np.testing.assert_array_equal(dist, want)
    np.testing.assert_array_equal(nearest, want_nearest)
    assert tuple(nearest[1, 0, 0]) == (source, 0) and (dist[1, 0, 0] == 0) == (kappa == 1)
    # ... and within float32 rounding of a float64 oracle.
    np.testing.assert_allclose(dist, oracle_knn_mean(query.reshape(-1, c), np.concatenate(
        [g.reshape(-1, c) for g in gallery]), kappa).reshape(dist.shape), rtol=4e-6, atol=1e-12)


@pytest.mark.parametrize("kappa", [1, 3])
def test_pruned_near_ties_large_norms_and_duplicates(operand, small_steps, kappa):
    """Adversarial: hundreds of gallery vectors within 1e-6 (relative) of the same distance to a
    query, on features of norm ~1e4 (bfloat16 rounds far coarser than these gaps), exact
    duplicates and exact ties. The bound must keep every one that can win."""
    rng = np.random.default_rng(1)
    c = 48
    offset = 1e4 * rng.standard_normal(c).astype(np.float32)
    query = (offset + rng.standard_normal((1, 4, 4, c))).astype(np.float32)
    gallery = []
    for _ in range(3):
        img = np.empty((8, 8, c), np.float32)
        for y in range(8):
            for x in range(8):
                u = rng.standard_normal(c)
                u /= np.linalg.norm(u)
                target = query[0, y % 4, x % 4]
                img[y, x] = target + 0.5 * (1 + 1e-6 * rng.random()) * u  # distance ~0.25, gaps 1e-6
        gallery.append(img)
    gallery.append(gallery[1].copy())            # an exact duplicate image
    gallery.append(gallery[0] + 1e3)             # far away, with large centred norms
    gallery[2][3, 3] = gallery[0][3, 3]          # an exact tie between two images
    dist, nearest, _ = run_pruned(query, gallery, kappa, dims=8, dtype=operand)
    want, want_nearest, _ = brute_with_exact(query, gallery, kappa)
    np.testing.assert_array_equal(dist, want)
    np.testing.assert_array_equal(nearest, want_nearest)


def test_a_partial_last_block_with_fewer_than_kappa_vectors(operand, small_steps, monkeypatch):
    """18 gallery vectors: the last block of 16 holds 2, fewer than kappa = 3. A query whose best
    block it is must not take padding for a neighbour (that read past the gallery: uninitialised
    memory, a flaky wrong answer); every re-checked column is a real one, and the result exact."""
    rng = np.random.default_rng(0)
    gallery = [rng.standard_normal((4, 4, 24)).astype(np.float32), rng.standard_normal((1, 2, 24)).astype(np.float32)]
    query = rng.standard_normal((1, 3, 3, 24)).astype(np.float32)
    query[0, 0, 0] = gallery[1][0, 0] + 1e-3  # nearest block: the partial one
    asked = []

    def checked(q, rows_of, q_idx, g_idx):
        asked.append(int(g_idx.max()))
        return exact.pair_distances(q, rows_of, q_idx, g_idx)
    monkeypatch.setattr(pruned, "pair_distances", checked)
    dist, nearest, _ = run_pruned(query, gallery, 3, dtype=operand)
    want, want_nearest, _ = brute_with_exact(query, gallery, 3)
    assert max(asked) < 18
    np.testing.assert_array_equal(dist, want)
    np.testing.assert_array_equal(nearest, want_nearest)


def test_one_image_gallery_and_too_few_vectors(operand):
    rng = np.random.default_rng(2)
    gallery = [rng.standard_normal((3, 2, 5)).astype(np.float32)]
    query = rng.standard_normal((1, 2, 2, 5)).astype(np.float32)
    for kappa in (1, 6):
        dist, nearest, _ = run_pruned(query, gallery, kappa, dtype=operand)
        want, want_nearest, _ = brute_with_exact(query, gallery, kappa)
        np.testing.assert_array_equal(dist, want)
        np.testing.assert_array_equal(nearest, want_nearest)
    with pytest.raises(ValueError, match="kappa=7 needs at least 7"):
        run_pruned(query, gallery, 7, dtype=operand)


def test_pruning_statistics_identical_images_are_searched_once(operand):
    rng = np.random.default_rng(3)
    image = rng.standard_normal((16, 16, 32)).astype(np.float32)
    query = (image[None] + 0.3 * rng.standard_normal((1, 16, 16, 32))).astype(np.float32)
    for k in (1, 4, 8):
        dist, nearest, stats = run_pruned(query, [image] * k, 1, dims=16, dtype=operand)
        want, _, _ = brute_with_exact(query, [image] * k, 1)
        np.testing.assert_array_equal(dist, want)
        assert (nearest[..., 0] == 0).all()   # ties go to the first of the identical images
        q, n = 256, 256
        assert stats.pairs == q * n           # searched once: pairs of one image
        assert q <= stats.exact < stats.pairs  # every location re-checks its answer, and far fewer than all
    # A gallery that is far from the query except for one image: almost everything is skipped.
    far = [image + 100.0 for _ in range(6)] + [image]
    _, nearest, stats = run_pruned(query, far, 1, dims=16, dtype=operand)
    assert (nearest[..., 0] == 6).all() and stats.pruned > 0.8


def test_kappa_neighbours_in_different_images_are_found_with_a_tight_upper_bound(operand):
    """Four noisy copies of an image: each query location has one near neighbour per copy, and
    its other 15 block-mates are far. The upper bound U must come from the kappa best blocks
    (one neighbour each), not from the kappa best vectors of one block (one near and two far,
    a loose U that re-checks most of the gallery)."""
    rng = np.random.default_rng(4)
    image = rng.standard_normal((16, 16, 32)).astype(np.float32)
    copies = [(image + 0.05 * rng.standard_normal(image.shape)).astype(np.float32) for _ in range(4)]
    query = (image[None] + 0.05 * rng.standard_normal((1, 16, 16, 32))).astype(np.float32)
    dist, nearest, stats = run_pruned(query, copies, 3, dims=16, dtype=operand)
    want, want_nearest, _ = brute_with_exact(query, copies, 3)
    np.testing.assert_array_equal(dist, want)
    np.testing.assert_array_equal(nearest, want_nearest)
    assert stats.pruned > 0.9, stats.pruned


def test_gallery_operands_float16_where_exact_enough_else_float32():
    """With float32 operands a gallery image's a~ is kept in float16 (half the cache) when its
    values are far inside float16's range, and in float32 otherwise; either way the result is
    brute force's, bit for bit."""
    rng = np.random.default_rng(11)
    for scale, kept in ((1.0, torch.float16), (1e6, torch.float32)):
        gallery = [(scale * rng.standard_normal((8, 8, 24))).astype(np.float32) for _ in range(3)]
        query = (gallery[1][None] + 0.1 * scale * rng.standard_normal((1, 8, 8, 24))).astype(np.float32)
        proj = pruned.Projection.fit(np.concatenate([g.reshape(-1, 24) for g in gallery]), 9)
        prepared = [pruned.prepare_image(proj, g, torch.float32) for g in gallery]
        assert all(p.ops.values.dtype == kept and p.ops.operand == torch.float32 for p in prepared)
        dist, nearest = pruned.search(query, prepared, 2, proj)
        want, want_nearest, _ = brute_with_exact(query, gallery, 2)
        np.testing.assert_array_equal(dist, want)
        np.testing.assert_array_equal(nearest, want_nearest)


def run_dense(query, gallery, kappa):
    return dense.search(query, [dense.prepare_image(g) for g in gallery], kappa)


@pytest.mark.parametrize("kappa", [1, 3])
@pytest.mark.parametrize("group_bytes", [1, 16 << 20])
@pytest.mark.parametrize("offset", [0.0, 1000.0])
def test_dense_engine_equals_brute_force_bitwise_whatever_the_gemm_rounds(kappa, group_bytes, offset, monkeypatch):
    """Gallery groups of one image (the running threshold moves) and one group; exact duplicates
    across images, a query equal to a gallery vector (distance 0, tied), large norms (features
    offset by 1000: the expansion cancels); and a GEMM whose every product is off by up to half
    the error the engine allows for: the answer is brute force with the exact distance (and so
    the pruned engine's), bit for bit."""
    monkeypatch.setattr(dense, "GROUP_BYTES", group_bytes)
    rng = np.random.default_rng(kappa)
    gallery = [(rng.standard_normal((4, 5, 24)) + offset).astype(np.float32) for _ in range(5)]
    gallery[3][1] = gallery[1][2]
    gallery[4] = gallery[0].copy()
    query = (rng.standard_normal((2, 4, 5, 24)) + offset).astype(np.float32)
    query[0, 0, 0] = gallery[2][3, 4]
    want, want_nearest, _ = brute_with_exact(query, gallery, kappa)
    prepared = [dense.prepare_image(g) for g in gallery]
    norm_max, real = max(im.norm_max for im in prepared), dense._products

    def rough(q2, g):
        y = real(q2, g)
        c = q2.shape[1]
        gamma = (c + 8) * dense.U32 / (1 - (c + 8) * dense.U32)
        allowed = gamma * (q2.double().norm(dim=1) / 2 + norm_max) ** 2
        return (y + torch.from_numpy(rng.uniform(-0.5, 0.5, tuple(y.shape))) * allowed[:, None]).float()
    for products in (real, rough):
        monkeypatch.setattr(dense, "_products", products)
        dist, nearest = dense.search(query, prepared, kappa)
        np.testing.assert_array_equal(dist, want)
        np.testing.assert_array_equal(nearest, want_nearest)


def test_dense_engine_one_image_and_too_few_vectors():
    rng = np.random.default_rng(5)
    gallery = [rng.standard_normal((3, 2, 5)).astype(np.float32)]
    query = rng.standard_normal((1, 2, 2, 5)).astype(np.float32)
    for kappa in (1, 6):
        dist, nearest = run_dense(query, gallery, kappa)
        want, want_nearest, _ = brute_with_exact(query, gallery, kappa)
        np.testing.assert_array_equal(dist, want)
        np.testing.assert_array_equal(nearest, want_nearest)
    with pytest.raises(ValueError, match="kappa=7 needs at least 7"):
        run_dense(query, gallery, 7)


def test_bf16_norm_parts_are_exact(rng):
    values = torch.from_numpy((rng.random(1000) * 10.0 ** rng.integers(-20, 20, 1000)).astype(np.float32))
    parts = bounds.norm_parts(values, torch.bfloat16).double()
    np.testing.assert_array_equal(parts.sum(1).numpy(), values.double().numpy())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_gallery_matrix_is_the_bound_operands_whatever_its_buffer_held(rng, dtype):
    """Every value of a reused buffer is written (no zeroing): a buffer of NaN bytes and one of
    zeros give the same matrix, and a query row times it is ||a~(q) - a~(g)||^2 + 2 lo(q).lo(g)
    (the pad rows: at least the pad norm)."""
    feats = [rng.standard_normal((3, 4, 20)).astype(np.float32) * s for s in (1.0, 3.0)]
    proj = pruned.Projection.fit(np.concatenate([f.reshape(-1, 20) for f in feats]), 7)
    ops = [pruned.prepare_image(proj, f, dtype).ops for f in feats]
    width = ops[0].values.shape[1] + ops[0].split + 6
    size = (24 + 5) * width * dtype.itemsize
    made = [bounds.gallery_matrix(ops, 5, 2.0**40, torch.full((size + 64,), fill, dtype=torch.uint8))
            for fill in (0xFF, 0x00)]
    assert torch.equal(made[0].view(torch.uint8), made[1].view(torch.uint8)) and not made[0].isnan().any()
    q = rng.standard_normal((6, 20)).astype(np.float32)
    rows = pruned.make_operands(proj, q, dtype)
    y = rows.rows.double() @ made[0].double().T
    a_q, _ = proj.augment(q)
    hi_q, lo_q, *_ = bounds._rounded(a_q, dtype, ops[0].split)
    g_vals = torch.cat([o.values for o in ops]).double()
    s = ops[0].split
    a_tilde_g = g_vals[:, :g_vals.shape[1] - s].clone()
    a_tilde_g[:, :s] += g_vals[:, g_vals.shape[1] - s:]
    a_tilde_q = hi_q.double()
    a_tilde_q[:, :s] += lo_q.double()
    want = torch.cdist(a_tilde_q, a_tilde_g) ** 2 + 2 * lo_q.double() @ g_vals[:, g_vals.shape[1] - s:].T
    np.testing.assert_allclose(y[:, :24].numpy(), want.numpy(), rtol=0.02, atol=1e-3 * float(want.max()))
    assert (y[:, 24:] >= 2.0**40 * 0.99).all()


def test_exact_distances_do_not_depend_on_the_batch(rng):
    q = torch.from_numpy(rng.standard_normal((50, 300)).astype(np.float32))
    g = torch.from_numpy(rng.standard_normal((50, 300)).astype(np.float32))
    full = exact.squared_distances(q, g)
    for size in (1, 3, 17):
        np.testing.assert_array_equal(torch.cat([exact.squared_distances(q[i:i + size], g[i:i + size])
                                                 for i in range(0, 50, size)]).numpy(), full.numpy())
    np.testing.assert_allclose(full.numpy(), ((q.double() - g.double()) ** 2).sum(1).numpy(), rtol=exact.SUM_EPS)


def _tree_oracle(q: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The exact distance's contract written out: float32 squared differences, zero-padded to
    a power of two, summed by halving (a fresh tensor per step)."""
    x = (q - g) ** 2
    size = 1 << max(0, (x.shape[-1] - 1).bit_length())
    x = torch.nn.functional.pad(x, (0, size - x.shape[-1]))
    while size > 1:
        size //= 2
        x = x[..., :size] + x[..., size:]
    return x[..., 0]


@pytest.mark.parametrize("width", [1, 2, 7, 256, 300])
@pytest.mark.parametrize("stored", [torch.float16, torch.float32])
def test_pair_distances_are_the_exact_distance_bit_for_bit(rng, width, stored):
    """The re-checking path (gallery rows gathered per image into steps that span images, the
    tree summed in place) gives the contract's bits, for columns in ascending or any order, in
    one step or in several that cut images' runs (at least 256 pairs a step), and for images
    stored in different types."""
    sizes = [5, 1, 9, 6]
    feats = [torch.from_numpy(rng.standard_normal((n, width)).astype(np.float32)).to(stored) for n in sizes]
    offsets = exact.gallery_offsets(sizes, 1)
    q = torch.from_numpy(rng.standard_normal((8, width)).astype(np.float32))
    gallery = torch.cat(feats).float()
    ascending = torch.arange(int(offsets[-1])).repeat_interleave(3)
    many = torch.sort(torch.from_numpy(rng.integers(0, offsets[-1], 1500))).values
    mixed = exact.row_reader(feats[:2] + [f.float() for f in feats[2:]], offsets)
    for g_idx, rows_of in ((ascending, exact.row_reader(feats, offsets)), (many, exact.row_reader(feats, offsets)),
                           (many, mixed), (torch.from_numpy(rng.integers(0, offsets[-1], 200)),
                                           exact.row_reader(feats, offsets))):
        q_idx = torch.from_numpy(rng.integers(0, len(q), len(g_idx)))
        np.testing.assert_array_equal(rows_of(g_idx).numpy(), gallery[g_idx].numpy())
        want = _tree_oracle(q[q_idx], gallery[g_idx]).numpy().view(np.int32)
        np.testing.assert_array_equal(exact.pair_distances(q, rows_of, q_idx, g_idx).numpy().view(np.int32), want)
        np.testing.assert_array_equal(exact.squared_distances(q[q_idx], gallery[g_idx]).numpy().view(np.int32), want)


def test_engine_choice_depends_on_the_configuration_only():
    layer1, layer3 = (56, 56, 256), (14, 14, 1024)
    assert patch_search.level_engine("auto", "cpu", layer1, 50) == "pruned"   # 252 GFLOP of brute force
    assert patch_search.level_engine("auto", "cpu", layer3, 5) == "dense"     # 0.4 GFLOP
    assert patch_search.level_engine("auto", "cpu", layer3, 10) == "pruned"   # 0.8 GFLOP
    assert patch_search.level_engine("pruned", "cpu", layer3, 5) == "pruned"  # asked for
    assert patch_search.level_engine("faiss", "cpu", layer1, 50) == "faiss"
    assert patch_search.level_engine("auto", "cpu", layer3, 5, correspondences=True) == "dense"
    assert patch_search.level_engine("auto", "cuda", layer1, 50, correspondences=True) == "pruned"
    assert patch_search.level_engine("faiss", "cuda", layer3, 5, correspondences=True) == "dense"
    assert patch_search.level_engine("auto", "cpu", layer1, 50, 3) == "window"
    assert patch_search.level_engine("auto", "cpu", layer1, 50, 55) == "pruned"  # covers the grid
    assert patch_search.resolve_engine("auto", "cuda") == "faiss"
    with pytest.raises(ValueError, match="stage2='pruned' runs on the CPU"):
        patch_search.resolve_engine("pruned", "cuda:0")


# --- the window engine: exact within its window ---------------------------------------------

def window_oracle(query, gallery, kappa, radius):
    """Brute force over each location's window, with the exact distance (ties: lowest image,
    then lowest position)."""
    b, h, w, c = query.shape
    dist = np.empty((b, h, w), np.float32)
    nearest = np.empty((b, h, w, 2), np.int64)
    for i in range(b):
        for y in range(h):
            for x in range(w):
                cands = [(k, yy * w + xx) for k in range(len(gallery)) for yy in range(max(0, y - radius),
                         min(h, y + radius + 1)) for xx in range(max(0, x - radius), min(w, x + radius + 1))]
                g = torch.from_numpy(np.stack([gallery[k].reshape(-1, c)[p] for k, p in cands]).astype(np.float32))
                d = exact.squared_distances(torch.from_numpy(query[i, y, x])[None], g).numpy()
                order = np.lexsort((np.array([k * h * w + p for k, p in cands]), d))[:kappa]
                dist[i, y, x] = d[order].astype(np.float64).mean()
                nearest[i, y, x] = cands[order[0]]
    return dist, nearest


@pytest.mark.parametrize("kappa", [1, 3])
@pytest.mark.parametrize("radius", [0, 1, 2, 6])
def test_window_equals_a_brute_force_window_oracle(kappa, radius):
    rng = np.random.default_rng(radius + 10 * kappa)
    h, w, c = 5, 6, 12
    gallery = [rng.standard_normal((h, w, c)).astype(np.float32) for _ in range(3)]
    gallery[2][1, 1] = gallery[0][1, 1]             # a tie between images
    gallery[1] = gallery[1].astype(np.float16)      # stored float16: its exact values
    query = rng.standard_normal((2, h, w, c)).astype(np.float32)
    query[0, 1, 1] = gallery[0][1, 1]               # distance 0, tied between images 0 and 2
    dist, nearest = window.search(query, gallery, kappa, radius)
    want, want_nearest = window_oracle(query, [g.astype(np.float32) for g in gallery], kappa, radius)
    np.testing.assert_array_equal(dist, want)
    np.testing.assert_array_equal(nearest, want_nearest)
    assert tuple(nearest[0, 1, 1]) == (0, 1 * w + 1) and (dist[0, 1, 1] == 0) == (kappa == 1)


def test_window_covering_the_grid_is_the_exact_search():
    rng = np.random.default_rng(5)
    gallery = [rng.standard_normal((4, 4, 8)).astype(np.float32) for _ in range(2)]
    query = rng.standard_normal((1, 4, 4, 8)).astype(np.float32)
    dist, nearest = window.search(query, gallery, 2, radius=3)
    want, want_nearest, _ = brute_with_exact(query, gallery, 2)
    np.testing.assert_array_equal(dist, want)
    np.testing.assert_array_equal(nearest, want_nearest)
    with pytest.raises(ValueError, match="kappa=5 needs at least 5 gallery vectors in every window"):
        window.search(query, gallery, 5, radius=0)
    with pytest.raises(ValueError, match="gallery grids equal"):
        window.search(query, [np.zeros((3, 4, 8), np.float32)], 1, radius=0)


def test_engine_names_in_the_docstrings_are_real_engines():
    import re
    from pathlib import Path

    folder = Path(patch_search.__file__).parent
    named = set()
    for path in folder.glob("*.py"):
        text = path.read_text()
        named |= set(re.findall(r"``(\w+)`` engine", text))
        for group in re.findall(r"engines?[^.]*?\(((?:``\w+``(?:, )?)+)\)", text):
            named |= set(re.findall(r"``(\w+)``", group))
    assert named and named <= set(patch_search.ENGINES), named - set(patch_search.ENGINES)


def test_the_bound_operand_type_is_forced_or_the_faster_one_measured(monkeypatch):
    """bfloat16 bounds only where the CPU has them natively and they measure faster; an entry
    point forces one (benchmarks); results are the same either way (tests above)."""
    import torch

    from spade_faiss.patch_search import bounds

    try:
        for forced in ("float32", "bfloat16"):
            bounds.force_operand(forced)
            assert bounds.operand_dtype() == getattr(torch, forced)
        with pytest.raises(ValueError, match="SPADE_FAISS_BOUND_DTYPE"):
            bounds.force_operand("int8")
        bounds.force_operand(None)
        native = "bf16" in open("/proc/cpuinfo").read()
        for faster in (torch.float32, torch.bfloat16):
            bounds.operand_dtype.cache_clear()
            monkeypatch.setattr(bounds, "_bound_gemm_seconds", lambda d, f=faster: 1.0 if d == f else 2.0)
            assert bounds.operand_dtype() == (faster if native else torch.float32)
    finally:
        bounds.force_operand(None)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_the_integer_screen_passes_exactly_the_values_below_the_threshold(dtype):
    """Oracle: every bit pattern of ``dtype`` near each threshold (both signs, zeros, subnormals
    and huge values), compared as floats with the float32 threshold and as integers with
    ``_threshold_bits``: the same verdict, for thresholds on, between and far from the values."""
    rng = np.random.default_rng(0)
    t = np.concatenate([rng.random(200) * 10.0 ** rng.integers(-30, 30, 200), [2.0**-100, 1.0, 3.0e38],
                        np.asarray(torch.tensor([0.3, 7.1]).to(dtype).float())]).astype(np.float32)
    t = torch.from_numpy(t)
    thr = pruned._threshold_bits(t, dtype)
    base = t.to(dtype).view(pruned._bits(dtype)).long()
    steps = torch.arange(-300, 301)
    patterns = (base[:, None] + steps[None, :]).clamp(torch.iinfo(pruned._bits(dtype)).min,
                                                       torch.iinfo(pruned._bits(dtype)).max)
    patterns = torch.cat([patterns, (-patterns).clamp(min=torch.iinfo(pruned._bits(dtype)).min)], dim=1)
    bits = patterns.to(pruned._bits(dtype))
    values = bits.view(dtype).float()
    finite = torch.isfinite(values)
    by_float = values <= t[:, None]
    by_bits = bits <= thr[:, None]
    assert torch.equal(by_float[finite], by_bits[finite])


def test_a_projection_s_leading_directions_are_the_projection_fitted_narrower(rng):
    sample = rng.standard_normal((300, 24)) @ rng.standard_normal((24, 24))
    wide = pruned.Projection.fit(sample, 20)
    narrow = wide.leading(7)
    fitted = pruned.Projection.fit(sample, 7)
    np.testing.assert_array_equal(narrow.basis, fitted.basis)
    np.testing.assert_array_equal(narrow.mean, fitted.mean)
    assert narrow.basis.flags.c_contiguous and wide.leading(20) is wide


def test_augmented_vectors_are_within_proj_eps_of_the_exact_ones(rng):
    """``Projection.augment`` (float64) against an extended-precision oracle that takes the
    residual directly (``||(I - V V^T)(x - mu)||``, no cancellation): within
    ``PROJ_EPS * ||x - mu||`` for ordinary rows, rows in the basis's span (the residual
    cancels to nothing) and rows of large norm far from the mean. Taken in float32 the error
    is ~2^-12 and the test fails."""
    c, d = 256, 89
    sample = (rng.standard_normal((2000, c)) @ rng.standard_normal((c, c)) * 0.1 + 3).astype(np.float32)
    proj = pruned.Projection.fit(sample, d)
    in_span = (proj.mean + rng.standard_normal((50, d)) @ proj.basis.T * 5).astype(np.float32)
    far = (sample[:50] * 1e3).astype(np.float32)
    x = np.concatenate([sample[:200], in_span, far]).astype(np.float16).astype(np.float32)
    aug, norm = proj.augment(x)
    xl = x.astype(np.longdouble) - proj.mean.astype(np.longdouble)
    basis = proj.basis.astype(np.longdouble)
    p = xl @ basis
    r = np.sqrt(((xl - p @ basis.T) ** 2).sum(1))
    want = np.concatenate([p, r[:, None]], axis=1)
    exact_norm = np.sqrt((xl ** 2).sum(1))
    err = np.sqrt(((aug.numpy().astype(np.longdouble) - want) ** 2).sum(1))
    assert (err <= bounds.PROJ_EPS * exact_norm).all(), float((err / exact_norm).max())
    assert np.allclose(norm.numpy(), exact_norm.astype(np.float64), rtol=2.0**-40)
    assert (r[200:250] < 1e-3 * exact_norm[200:250]).all()  # the cancelling rows are there


@pytest.mark.parametrize("images", [0, 1])
def test_pruned_takes_any_number_of_query_images_as_dense_does(rng, operand, small_steps, images):
    """Zero query images included (an empty batch): the same result as the dense engine."""
    gallery = [rng.standard_normal((3, 5, 6)).astype(np.float32) for _ in range(2)]
    query = rng.standard_normal((images, 4, 3, 6)).astype(np.float32)
    dist, nearest, _ = run_pruned(query, gallery, 1, dtype=operand)
    want_dist, want_nearest = dense.search(query, [dense.prepare_image(g) for g in gallery], 1)
    assert dist.shape == (images, 4, 3) and nearest.shape == (images, 4, 3, 2)
    np.testing.assert_array_equal(dist, want_dist)
    np.testing.assert_array_equal(nearest, want_nearest)


@pytest.mark.parametrize("group", [1, 3, 8])
@pytest.mark.parametrize("step_bytes", [pruned.STEP_BYTES, 1], ids=["one-step", "steps"])
def test_recomputed_bounds_are_each_pair_s_products_within_the_float32_bound(rng, operand, group, step_bytes,
                                                                               monkeypatch):
    """Oracle: float64 products of each (query, block) pair, pairs in random order with blocks
    asked by one query and by many more than a group; every value within the accumulation bound
    the thresholds assume (module doc: gamma times the sum of the terms' magnitudes, and the
    output's rounding), in the pairs' order; in one step of segments or in several (64 each)."""
    monkeypatch.setattr(pruned, "GROUP", group)
    monkeypatch.setattr(pruned, "STEP_BYTES", step_bytes)
    width, n_blocks, n_queries = 40, 12, 30
    cols = torch.from_numpy(rng.standard_normal((n_blocks * pruned.BLOCK, width)).astype(np.float32)).to(operand)
    a = torch.from_numpy(rng.standard_normal((n_queries, width)).astype(np.float32)).to(operand)
    blocks = torch.from_numpy(np.concatenate([np.full(25, 3), [7], rng.integers(0, n_blocks, 200)]))
    q_idx = torch.from_numpy(rng.integers(0, n_queries, len(blocks)))
    shuffle = torch.from_numpy(rng.permutation(len(blocks)))
    blocks, q_idx = blocks[shuffle], q_idx[shuffle]
    y = pruned._bounds(a, cols, q_idx, blocks)
    g = cols.double().view(n_blocks, pruned.BLOCK, width)[blocks]  # (P, BLOCK, width)
    q = a.double()[q_idx][:, None, :]
    want = (g * q).sum(-1)
    gamma = width * 2.0**-24 / (1 - width * 2.0**-24) + 2.0**-24
    out_eps = 2.0**-8 if operand == torch.bfloat16 else 2.0**-24
    slack = gamma * (g * q).abs().sum(-1) + out_eps * want.abs()
    assert y.shape == (len(blocks), pruned.BLOCK) and y.dtype == torch.float32
    assert bool(((y.double() - want).abs() <= slack * 1.0001).all())
    assert pruned._bounds(a, cols, q_idx[:0], blocks[:0]).shape == (0, pruned.BLOCK)


def test_recomputed_bounds_come_in_few_product_shapes_whatever_the_number_of_pairs(rng, monkeypatch):
    """Each shape of a bfloat16 bmm is a oneDNN primitive kept in its cache with its own code:
    one per number of pairs had grown the resident set ~3 MB per image (eighteenth wave). Over
    200 different pair counts the products take a handful of shapes (powers of two from 64 up to
    a step; the padding's values are never read: the bitwise oracle tests above run through it)."""
    shapes = set()
    real_bmm = torch.bmm

    def bmm(x, y):  # the real product; its shape recorded
        shapes.add((tuple(x.shape), tuple(y.shape)))
        return real_bmm(x, y)
    width, n_blocks, n_queries = 40, 12, 30
    cols = torch.from_numpy(rng.standard_normal((n_blocks * pruned.BLOCK, width)).astype(np.float32)).bfloat16()
    a = torch.from_numpy(rng.standard_normal((n_queries, width)).astype(np.float32)).bfloat16()
    step = max(64, pruned.STEP_BYTES // ((pruned.BLOCK + pruned.GROUP) * width * 2))
    monkeypatch.setattr(torch, "bmm", bmm)
    for pairs in range(1, 2 * step * pruned.GROUP, 2 * step * pruned.GROUP // 200):
        blocks = torch.from_numpy(rng.integers(0, n_blocks, pairs))
        q_idx = torch.from_numpy(rng.permutation(pairs) % n_queries)
        assert pruned._bounds(a, cols, q_idx, blocks).shape == (pairs, pruned.BLOCK)
    sizes = sorted({x[0] for x, _ in shapes})
    assert len(sizes) <= 8 and all(n == step or (n >= 64 and n & (n - 1) == 0) for n in sizes), sizes


def _bound_lemma_holds(proj, q, g) -> tuple[bool, np.ndarray]:
    """Whether every (query, gallery) pair's GEMM output is within the threshold's bound of the
    true squared distance (float64), and the queries' rho."""
    qo = bounds.make_operands(proj, q, torch.bfloat16)
    go = bounds.make_gallery_operands(proj, g, torch.bfloat16)
    cols = bounds.gallery_matrix([go], 0, pruned.PAD_NORM)
    split = bounds.split_columns(torch.bfloat16, proj.basis.shape[1] + 1)
    assert go.split == split and cols.shape[1] == qo.rows.shape[1] == proj.basis.shape[1] + 1 + 2 * split + 6
    y = torch.mm(cols, qo.rows.T).double().numpy().T  # (queries, gallery)
    d = ((q.astype(np.float64)[:, None] - g.astype(np.float64)[None]) ** 2).sum(-1)
    m = cols.shape[1]
    gamma = 1.01 * m * 2.0**-24 / (1 - m * 2.0**-24) + 2.0**-24
    bound = (1 + 2.0**-8) * ((np.sqrt(d) + qo.rho[:, None] + go.rho[None]) ** 2
                             + gamma * (qo.norm[:, None] + go.norm[None]) ** 2 + 2 * qo.low[:, None] * go.low[None])
    return bool((y <= bound).all()), qo.rho


@pytest.mark.parametrize("seed", range(3))
def test_split_bfloat16_operands_keep_every_pair_s_bound_and_shrink_rho(seed, monkeypatch):
    """Oracle (float64) for the lemma the threshold rests on, with bfloat16 operands whose
    leading columns are two parts (``a~ = hi + lo``) and without: for every (query, gallery
    vector) pair the GEMM's output is at most ``(1 + 2^-8) [(sqrt(D) + rho(q) + rho(g))^2
    + gamma (N(q) + N(g))^2 + 2 L(q) L(g)]``, D the true squared distance, on features far from
    their mean (large norms: bfloat16 rounds far coarser than the gaps); with rho taken as 0 it
    fails (the test can fail). And the split is what makes rho small: the columns kept as two
    parts carry most of ||a||^2, rho shrinks several times."""
    rng = np.random.default_rng(seed)
    c = 48
    scale = np.geomspace(100.0, 0.1, c)  # a few dominant directions, as real features have
    x = (1e3 * rng.standard_normal(c) + scale * rng.standard_normal((600, c))).astype(np.float32)
    x[200:210] = x[:10] + 1e-3 * rng.standard_normal((10, c)).astype(np.float32)  # near neighbours
    proj = pruned.Projection.fit(x[:400], 24)
    assert bounds.split_columns(torch.bfloat16, 25) == 16 and bounds.split_columns(torch.float32, 25) == 0
    holds, rho_split = _bound_lemma_holds(proj, x[:200], x[200:])
    assert holds
    monkeypatch.setattr(bounds, "SPLIT", 0)
    holds, rho_whole = _bound_lemma_holds(proj, x[:200], x[200:])
    assert holds
    assert np.median(rho_whole / rho_split) > 4
    original = bounds._rounded
    monkeypatch.setattr(bounds, "_rounded", lambda *a: (*original(*a)[:5], 0 * original(*a)[5]))
    assert not _bound_lemma_holds(proj, x[:200], x[200:])[0]


def test_pair_and_block_thresholds_are_never_below_the_exact_ones():
    """Oracle: ``T(q, g)`` in float64 from the unrounded terms (module doc of ``pruned``). The
    float32 thresholds the engine screens blocks and columns with are never below it, for terms
    over twenty orders of magnitude (a block's, never below any of its columns'), and within a
    few parts in a million of it (they are the pair's own, not the gallery's maxima); ``T(q)``,
    against the gallery's maxima, is never below any of them nor below its own float64 value."""
    rng = np.random.default_rng(0)
    n_q, n_g = 64, 16 * 40
    scale = lambda n: rng.random(n) * 10.0 ** rng.uniform(-10, 10, n)  # noqa: E731
    upper, q_rho, q_norm, q_low = scale(n_q), scale(n_q), scale(n_q), scale(n_q)
    g_rho, g_norm, g_low = scale(n_g), scale(n_g), scale(n_g)
    ops = bounds.Operands(torch.empty(n_q, 1), q_rho, q_norm, q_low)
    rows = pruned._Terms.of_queries(upper, ops, 0, n_q)
    columns = pruned._Terms(*(pruned._Terms._up(x) for x in (g_rho, g_norm, g_low)))
    gamma, out_eps = 1.01 * 128 * 2.0**-24, 2.0**-8
    pairs = pruned._Thresholds(rows, columns, columns.block_maxima(n_g // pruned.BLOCK), gamma, out_eps)
    q, g = torch.arange(n_q).repeat_interleave(n_g), torch.arange(n_g).repeat(n_q)
    qn, gn = q.numpy(), g.numpy()
    exact_t = (1 + out_eps) * ((np.sqrt(upper / (1 - exact.SUM_EPS))[qn] + q_rho[qn] + g_rho[gn]) ** 2
                               + gamma * (q_norm[qn] + g_norm[gn]) ** 2 + 2 * q_low[qn] * g_low[gn])
    column_t = pairs.column(q, g).double().numpy()
    assert (column_t >= exact_t).all()
    assert np.median(column_t / exact_t - 1) < 4e-6
    block_t = pairs.block(q, g // pruned.BLOCK).double().numpy()
    assert (block_t >= column_t).all()
    query_t = pairs.query().double().numpy()  # T(q): against the gallery's maxima
    assert (query_t[qn] >= block_t).all()
    assert (query_t >= (1 + out_eps) * ((np.sqrt(upper / (1 - exact.SUM_EPS)) + q_rho + g_rho.max()) ** 2
                        + gamma * (q_norm + g_norm.max()) ** 2 + 2 * q_low * g_low.max())).all()


def test_a_far_image_of_large_norm_adds_no_re_checks_to_the_others(operand):
    """Each pair is held to its own threshold: an image far away, of large norms and rounding,
    among the retrieved ones does not loosen the others' thresholds (with the gallery's maxima it
    did: ~1-3% more re-checks here), and the result is the same."""
    rng = np.random.default_rng(0)
    c = 32
    base = 3 * rng.standard_normal(c)
    gallery = [(base + rng.standard_normal((8, 8, c))).astype(np.float32) for _ in range(3)]
    query = (base + rng.standard_normal((1, 8, 8, c))).astype(np.float32)
    far = (base + 60 * rng.standard_normal((8, 8, c))).astype(np.float32)
    proj = pruned.Projection.fit(np.concatenate([g.reshape(-1, c) for g in gallery]), 12)
    results = []
    for images in (gallery, gallery + [far]):
        stats = pruned.SearchStats()
        dist, _ = pruned.search(query, [pruned.prepare_image(proj, g, operand) for g in images], 1, proj, stats)
        results.append((dist, stats.exact))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    assert results[1][1] == results[0][1]


def test_the_last_level_cache_is_read_from_sysfs(tmp_path):
    """The schedule of the bound GEMM follows the last-level cache (``pruned.ROWS``,
    ``CHUNK_BYTES``): its size is the highest level's, in sysfs's units; none without sysfs."""
    for index, level, size in (("index0", 1, "48K"), ("index1", 1, "32K"), ("index2", 2, "2048K"),
                               ("index3", 3, "491520K")):
        (tmp_path / index).mkdir()
        (tmp_path / index / "level").write_text(f"{level}\n")
        (tmp_path / index / "size").write_text(f"{size}\n")
    assert pruned.last_level_cache_bytes(str(tmp_path)) == 491520 << 10
    (tmp_path / "index3" / "size").write_text("32M\n")
    assert pruned.last_level_cache_bytes(str(tmp_path)) == 32 << 20
    assert pruned.last_level_cache_bytes(str(tmp_path / "none")) is None
    large = (pruned.last_level_cache_bytes() or 0) >= pruned.LARGE_CACHE_BYTES
    assert (pruned.ROWS, pruned.CHUNK_BYTES) == ((2048, 16 << 20) if large else (1024, 4 << 20))
