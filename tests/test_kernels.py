"""volref's compiled bf16 softmax (volref.models.kernels) against PyTorch, and its fallbacks."""

from __future__ import annotations

import logging

import pytest
import torch

from volref.models import kernels
from volref.models import mae as mae_module


@pytest.fixture
def native():
    if kernels.native_softmax() is None:
        pytest.skip("the native softmax cannot run here (no C compiler or no AVX-512)")
    return kernels


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """A kernel state that forgets what was built, caching into a temporary directory."""
    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setenv("VOLREF_CACHE", str(tmp_path))
    return tmp_path


@pytest.mark.parametrize("n", [1, 15, 16, 17, 333, 1024])
def test_softmax_matches_torch_within_bf16_rounding(native, n):
    g = torch.Generator().manual_seed(n)
    x = (torch.randn(3, 7, n, generator=g) * 6).bfloat16()
    x[0, 0, 0] = 80.0  # one dominant entry
    want = x.float().softmax(dim=-1)
    got = x.clone()
    assert native.softmax_bf16_(got)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=2 ** -8, atol=1e-30)
    # no worse than PyTorch's own bf16 softmax, element by element
    assert (got.float() - want).abs().max() <= (x.softmax(-1).float() - want).abs().max()


def test_masked_keys_get_exactly_zero_and_rows_are_independent(native):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 50, generator=g).bfloat16()
    x[:, ::3] = float("-inf")
    x[2, 1] = -200.0  # far below the row's max: exp underflows to 0 as in PyTorch
    got = x.clone()
    native.softmax_bf16_(got)
    assert (got[:, ::3] == 0).all() and got[2, 1] == 0
    torch.testing.assert_close(got.float().sum(-1), torch.ones(4), rtol=0, atol=0.02)
    for r in range(4):  # a row's bytes do not depend on the rows computed with it
        alone = x[r:r + 1].clone()
        native.softmax_bf16_(alone)
        assert torch.equal(alone[0], got[r])


def test_softmax_refuses_what_it_cannot_take(native):
    x = torch.randn(4, 8)
    assert not native.softmax_bf16_(x)  # fp32
    y = torch.randn(8, 4).bfloat16().t()
    before = y.clone()
    assert not native.softmax_bf16_(y)  # not contiguous
    assert torch.equal(y, before)


@pytest.mark.parametrize("masked", [False, True])
def test_bf16_attention_with_the_kernel_matches_fp32_sdpa(native, masked, monkeypatch):
    monkeypatch.setattr(mae_module, "FUSED_QUERY_CHUNK", 48)  # uneven chunks of 100 queries
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 3, 100, 8, generator=g) for _ in range(3))
    key_mask = torch.rand(2, 100, generator=g) > 0.3 if masked else None
    got = mae_module.chunked_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), key_mask)
    want = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=None if key_mask is None else key_mask[:, None, None, :])
    torch.testing.assert_close(got.float(), want, rtol=0.02, atol=0.02)
    monkeypatch.setattr(kernels, "_state", {"lib": None})  # PyTorch's softmax instead
    aten = mae_module.chunked_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), key_mask)
    assert (got.float() - want).abs().max() <= 1.5 * (aten.float() - want).abs().max()


def test_builds_once_into_the_cache_under_a_source_hash(native, fresh):
    lib = kernels.native_softmax()
    assert lib is not None
    built = list(fresh.glob("softmax_bf16-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    kernels._state.clear()
    assert kernels.native_softmax() is not None  # loaded, not rebuilt
    assert built[0].stat().st_mtime_ns == stamp
    assert [p.name for p in fresh.iterdir()] == [built[0].name]  # no temporary left behind


def test_switched_off_or_without_compiler_falls_back(fresh, monkeypatch, caplog):
    monkeypatch.setenv("VOLREF_NATIVE", "0")
    with caplog.at_level(logging.INFO, logger="volref.models.kernels"):
        assert kernels.native_softmax() is None
    assert "VOLREF_NATIVE=0" in caplog.text
    x = torch.randn(2, 5).bfloat16()
    assert not kernels.softmax_bf16_(x)

    monkeypatch.delenv("VOLREF_NATIVE")
    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setenv("CC", str(fresh / "no-such-compiler"))
    with caplog.at_level(logging.INFO, logger="volref.models.kernels"):
        assert kernels.native_softmax() is None
    assert "could not build" in caplog.text
    assert list(fresh.iterdir()) == []
